//! The agent's loops: report, heartbeat, GPU, in-use, log shipping, and the assignment wait.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use lablink_protocol::WarningTask;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::client::{
    AllocatorClient, AssignmentBody, Backoff, ClientError, Coalesce as _, LogBody, TelemetryBody,
    TimingsBody,
};
use crate::collect::{self, CollectionTask, Manifest};
use crate::config::AgentConfig;
use crate::logship::{FileTail, Position};
use crate::notify::{DesktopNotifier, Shown};
use crate::probes::{self, Gpu};
use crate::state::StateDir;

mod desktop;
use desktop::BrowserDesktop;

/// Most lines of the agent's own log kept for the allocator during an outage.
const MAX_AGENT_LINES: usize = 1000;
/// How long the last report may take at shutdown.
const FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// How long the agent tries to tell the allocator `rebooting` when it is asked to reboot. The
/// machine reboots only once the allocator took that report; when it did not in time, the
/// agent does not reboot (it tries again if the allocator still asks on a later poll).
const REBOOT_REPORT_DEADLINE: Duration = Duration::from_secs(10);
/// Longest the reboot command may run.
const REBOOT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// After a reboot command succeeded, how long the agent waits for the machine to go down.
/// Still up then, it reports its previous status again (so that the allocator does not show
/// `rebooting` for ever) and asks the allocator for work again.
const REBOOT_GRACE: Duration = Duration::from_secs(300);
/// The agent's log line when the allocator asks for a reboot the owner did not allow.
const REBOOT_NOT_ALLOWED: &str = "asked to reboot, but this machine's owner did not allow it \
(`lablink-agent register --allow-reboot`, LABLINK_ALLOW_REBOOT=1); ignored";

/// The waits of a reboot ([`REBOOT_REPORT_DEADLINE`], [`REBOOT_GRACE`]); tests shorten them.
#[derive(Debug, Clone, Copy)]
struct RebootTiming {
    report_deadline: Duration,
    grace: Duration,
}

impl Default for RebootTiming {
    fn default() -> Self {
        Self {
            report_deadline: REBOOT_REPORT_DEADLINE,
            grace: REBOOT_GRACE,
        }
    }
}

/// Why the agent stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum AgentFailed {
    /// One of the agent's loops ended, which must not happen (a panic): the agent stops, so
    /// that its supervisor (systemd) starts it again.
    #[error("an agent task ended unexpectedly: {0}")]
    TaskEnded(String),
    /// A registered machine's token was refused (401) for
    /// [`AgentConfig::unregistered_after`], with no successful answer in between: the machine
    /// was unregistered (or registered again, with a new token), so running on cannot help.
    /// The binary exits with [`EXIT_UNREGISTERED`](crate::EXIT_UNREGISTERED), which its
    /// systemd unit does not restart.
    #[error(
        "this machine is no longer registered with the allocator (it refused the agent's token)"
    )]
    Unregistered,
}

/// Runs the agent until `shutdown` completes. It never gives up on the allocator: every
/// failed call is retried with jittered exponential backoff. The one exception is a
/// registered machine ([`AgentConfig::registered`]) whose token the allocator keeps refusing
/// (every answer 401 for [`AgentConfig::unregistered_after`]): it stops with
/// [`AgentFailed::Unregistered`].
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentFailed> {
    run_with(config, RebootTiming::default(), shutdown).await
}

async fn run_with(
    config: AgentConfig,
    reboot_timing: RebootTiming,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentFailed> {
    let agent = Arc::new(Agent {
        client: AllocatorClient::new(&config),
        reporter: Arc::default(),
        browser: Mutex::default(),
        state: StateDir::new(config.state_dir.clone()),
        status: Mutex::new(None),
        reboot_timing,
        notifier: DesktopNotifier::new(config.notify_send.clone(), config.crd_user.clone()),
        shown: Mutex::default(),
        config,
    });
    let mut shown = agent.config.allocator_url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    tracing::info!(hostname = %agent.config.vm_name, allocator = %shown, "agent starting");
    let mut tasks = JoinSet::new();
    tasks.spawn(agent.clone().report_loop());
    tasks.spawn(agent.clone().heartbeat_loop());
    tasks.spawn(agent.clone().inuse_loop());
    for file in &agent.config.log_files {
        let key = format!("log{}", file.path.display()).replace(['/', '\\'], "_");
        let position = agent
            .state
            .load(&key)
            .and_then(|p| Position::decode(&p))
            .unwrap_or_default();
        let tail = FileTail::new(file.path.clone(), position);
        tasks.spawn(agent.clone().ship_loop(tail, file.stream.as_str(), key));
    }
    tasks.spawn(agent.clone().tasks_loop());
    tasks.spawn(agent.clone().main_loop());
    // Only a registered machine takes a refused token as the end (once the refusals lasted:
    // one 401 may come from a proxy, or an allocator restarting): a VM the allocator created
    // keeps retrying, as its token may not be known yet.
    let unregistered = async {
        if agent.config.registered {
            agent
                .client
                .token_refused(agent.config.unregistered_after)
                .await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        () = unregistered => Err(AgentFailed::Unregistered),
        Some(ended) = tasks.join_next() => Err(AgentFailed::TaskEnded(match ended {
            Ok(()) => "a loop returned".to_owned(),
            Err(e) => e.to_string(),
        })),
    };
    match &outcome {
        Ok(()) => tracing::info!("shutting down"),
        Err(AgentFailed::Unregistered) => tracing::error!(
            refused_for_at_least = ?agent.config.unregistered_after,
            "this machine is no longer registered: the allocator kept refusing its token; \
             stopping (`lablink-agent register` joins it again)"
        ),
        Err(e) => tracing::error!(error = %e, "stopping"),
    }
    tasks.shutdown().await;
    if !matches!(outcome, Err(AgentFailed::Unregistered)) {
        agent.flush().await;
    }
    outcome
}

struct Agent {
    config: AgentConfig,
    client: AllocatorClient,
    reporter: Arc<Reporter>,
    /// The browser desktop of the current assignment (browser mode).
    browser: Mutex<BrowserDesktop>,
    state: StateDir,
    /// The last status the agent reported (put back when a reboot fails).
    status: Mutex<Option<String>>,
    reboot_timing: RebootTiming,
    /// Shows the allocator's warnings on the desktop.
    notifier: DesktopNotifier,
    /// The warnings shown in this run (one whose acknowledgement was lost is not shown twice).
    shown: Mutex<std::collections::HashSet<String>>,
}

/// What came of the allocator's request for a reboot.
enum Reboot {
    /// The allocator took the status `rebooting` and the reboot command succeeded: the
    /// machine is going down. `previous` is the status before.
    Running { previous: Option<String> },
    /// No reboot (not reported, or the command failed); the previous status is back.
    NotDone,
}

/// Telemetry waiting to be sent; newer values replace older ones, so a retry always carries
/// the latest state and never more than one pending report.
#[derive(Default)]
struct Reporter {
    pending: Mutex<TelemetryBody>,
    wake: Notify,
}

impl Reporter {
    /// A line for the allocator's `agent` log stream (and the local log).
    fn line(&self, line: String) {
        tracing::info!("{line}");
        self.send(TelemetryBody {
            logs: vec![LogBody {
                stream: "agent".into(),
                lines: vec![format!("{} {line}", now())],
            }],
            ..Default::default()
        });
    }

    fn send(&self, report: TelemetryBody) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.merge(report);
        if let Some(batch) = pending.logs.iter_mut().find(|b| b.stream == "agent") {
            let excess = batch.lines.len().saturating_sub(MAX_AGENT_LINES);
            batch.lines.drain(..excess);
        }
        drop(pending);
        self.wake.notify_one();
    }

    fn take(&self) -> TelemetryBody {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts back a report that failed, under anything newer.
    fn restore(&self, mut report: TelemetryBody) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        report.merge(std::mem::take(&mut *pending));
        *pending = report;
    }
}

/// What identifies an assignment: its time, as the allocator sent it.
fn assignment_key(a: &AssignmentBody) -> String {
    a.assigned_at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// What identifies one start of the desktop (kept in the state directory): the assignment
/// ([`assignment_key`]) and, after its first attempt, `#<attempt>`. The first attempt keeps
/// the key of agents that knew no attempts, so that one upgraded in the middle of an
/// assignment does not start the host again (its code was used).
fn work_key(a: &AssignmentBody) -> String {
    let at = assignment_key(a);
    if a.attempt <= 1 {
        at
    } else {
        format!("{at}#{}", a.attempt)
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl Agent {
    /// A line for the allocator's `agent` log stream (and the local log).
    fn note(&self, report: TelemetryBody, line: String) {
        tracing::info!("{line}");
        let mut report = report;
        if let Some(status) = &report.status {
            *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status.clone());
        }
        report.logs.push(LogBody {
            stream: "agent".into(),
            lines: vec![format!("{} {line}", now())],
        });
        self.reporter.send(report);
    }

    async fn report_loop(self: Arc<Self>) {
        let mut backoff = Backoff::new(self.config.backoff_max);
        loop {
            self.reporter.wake.notified().await;
            loop {
                let report = self.reporter.take();
                if report.is_empty() {
                    break;
                }
                match self.client.report(&report).await {
                    Ok(()) => backoff.reset(),
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(error = %e, "report failed; retrying");
                        self.reporter.restore(report);
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Err(e) => tracing::error!(error = %e, "report refused; dropped"),
                }
            }
        }
    }

    async fn flush(&self) {
        let report = self.reporter.take();
        if !report.is_empty() {
            let _ = tokio::time::timeout(FLUSH_DEADLINE, self.client.report(&report)).await;
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(self.config.heartbeat_interval);
        loop {
            ticks.tick().await;
            self.reporter.send(TelemetryBody {
                boot_id: Some(self.config.boot_id.clone()),
                ..Default::default()
            });
        }
    }

    /// Checks the GPU now and reports it when it changed from `last`.
    async fn check_gpu(&self, last: Option<Gpu>) -> Gpu {
        let gpu = probes::check_gpu(&self.config.nvidia_smi, self.config.gpu_timeout).await;
        if last != Some(gpu) {
            let report = TelemetryBody {
                gpu_health: Some(gpu.as_str().to_owned()),
                ..Default::default()
            };
            self.note(report, format!("GPU health: {}", gpu.as_str()));
        }
        gpu
    }

    async fn gpu_loop(&self, mut last: Gpu) {
        loop {
            tokio::time::sleep(self.config.gpu_interval).await;
            last = self.check_gpu(Some(last)).await;
        }
    }

    async fn inuse_loop(self: Arc<Self>) {
        let Some(name) = self.config.inuse_process.clone() else {
            return std::future::pending().await;
        };
        let mut last = None;
        loop {
            let probe = name.clone();
            let in_use = tokio::task::spawn_blocking(move || probes::process_running(&probe))
                .await
                .unwrap_or(false);
            if last != Some(in_use) {
                let report = TelemetryBody {
                    in_use: Some(in_use),
                    ..Default::default()
                };
                self.note(report, format!("{name} in use: {in_use}"));
                last = Some(in_use);
            }
            tokio::time::sleep(self.config.inuse_interval).await;
        }
    }

    async fn ship_loop(self: Arc<Self>, mut tail: FileTail, stream: &'static str, key: String) {
        let mut backoff = Backoff::new(self.config.backoff_max);
        loop {
            let batch = match tail.read().await {
                Ok(Some(batch)) => batch,
                Ok(None) => {
                    tokio::time::sleep(self.config.log_poll).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(path = %tail.path().display(), error = %e, "log file unreadable");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            let report = TelemetryBody {
                logs: vec![LogBody {
                    stream: stream.to_owned(),
                    lines: batch.lines.clone(),
                }],
                ..Default::default()
            };
            match self.client.report(&report).await {
                Ok(()) => {
                    tail.acknowledge(&batch);
                    self.state.save(&key, &tail.position().encode());
                    backoff.reset();
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "log batch not delivered; retrying it");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, lines = batch.lines.len(), "log batch refused; skipped");
                    tail.acknowledge(&batch);
                    self.state.save(&key, &tail.position().encode());
                }
            }
        }
    }

    /// Registers (`initializing`, checks, bootstrap, `running`), then waits for assignments
    /// for ever. A bootstrap that failed with `STARTUP_ON_ERROR=fail` reports `error` and
    /// never waits for an assignment.
    async fn main_loop(self: Arc<Self>) {
        let started = Utc::now();
        self.note(
            TelemetryBody {
                status: Some("initializing".into()),
                boot_id: Some(self.config.boot_id.clone()),
                timings: Some(TimingsBody {
                    container_start: Some(started),
                    ..Default::default()
                }),
                ..Default::default()
            },
            format!("agent {} initializing", env!("CARGO_PKG_VERSION")),
        );
        let gpu = self.check_gpu(None).await;
        let bootstrapped = crate::bootstrap::run(
            &self.config.bootstrap,
            self.config.crd_user.as_deref(),
            gpu != Gpu::NotAvailable,
            &self.state,
            |line| self.note(TelemetryBody::default(), line),
        )
        .await;
        if let Err(failed) = bootstrapped {
            // STARTUP_ON_ERROR=fail: the VM reports the failure and is never handed out; its
            // logs and health are still reported.
            self.note(
                TelemetryBody {
                    status: Some("error".into()),
                    ..Default::default()
                },
                format!("{failed}; this VM stays unavailable (STARTUP_ON_ERROR=fail)"),
            );
            return self.gpu_loop(gpu).await;
        }
        let ready = Utc::now();
        self.note(
            TelemetryBody {
                status: Some("running".into()),
                timings: Some(TimingsBody {
                    container_start: Some(started),
                    container_end: Some(ready),
                    container_startup_duration_seconds: Some(
                        (ready - started).num_microseconds().unwrap_or(0) as f64 / 1e6,
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "agent running; waiting for an assignment".into(),
        );
        tokio::join!(self.gpu_loop(gpu), self.wait_loop());
    }

    /// Waits for the VM's assignment and starts the desktop for each new unit of work (an
    /// assignment, or a new attempt of it: [`work_key`]); then waits for the assignment's
    /// next change (`seen`: a new attempt, a tunnel, the release). With an allocator that
    /// sends no versions, it looks again every [`recheck_interval`](AgentConfig::recheck_interval).
    async fn wait_loop(self: &Arc<Self>) {
        let mut backoff = Backoff::new(self.config.backoff_max);
        // The work already handled, also by an earlier run of the agent on this VM: its
        // one-time code was used, so it is not started again. Kept after a release: the
        // next assignment has another key anyway.
        let mut handled = self.state.load("assignment").filter(|a| !a.is_empty());
        // Whether the VM is (as far as the agent knows) assigned, for the release line and
        // to look without holding when the assignment's version is unknown.
        let mut assigned = handled.is_some();
        // The version of the assignment last answered: the next wait holds until it changes.
        let mut seen: Option<String> = None;
        loop {
            let hold = if seen.is_none() && assigned {
                Duration::ZERO
            } else {
                self.config.wait_timeout
            };
            let asked = Instant::now();
            let answer = self.client.wait_assignment(hold, seen.as_deref()).await;
            // An allocator that answers held requests at once (shutting down, a tiny maximum
            // hold) must not make this loop spin.
            let hasty = hold >= Duration::from_secs(1) && asked.elapsed() < Duration::from_secs(1);
            match answer {
                Ok(Some(a)) => {
                    assigned = true;
                    let unchanged = seen.as_deref() == Some(a.version.as_str());
                    let key = work_key(&a);
                    if handled.as_deref() != Some(key.as_str()) {
                        self.state.save("assignment", &key);
                        handled = Some(key);
                        self.start(&a).await;
                    } else if a.mode == "browser" {
                        self.keep_browser_desktop(&a).await;
                    }
                    if a.version.is_empty() {
                        // An allocator without versions: look again in a while.
                        seen = None;
                        backoff.reset();
                        tokio::time::sleep(self.config.recheck_interval).await;
                        continue;
                    }
                    if unchanged && hasty {
                        tokio::time::sleep(backoff.next_delay()).await;
                    } else {
                        backoff.reset();
                    }
                    seen = Some(a.version);
                }
                Ok(None) if seen.is_some() => {
                    // Released, or an allocator shutting down: look once more before taking
                    // it as released.
                    seen = None;
                }
                Ok(None) => {
                    if std::mem::take(&mut assigned) {
                        self.end_browser_desktop();
                        self.note(
                            TelemetryBody::default(),
                            "the assignment was released; waiting again".into(),
                        );
                    }
                    if hasty {
                        tokio::time::sleep(backoff.next_delay()).await;
                    } else {
                        backoff.reset();
                    }
                }
                Err(e) => {
                    let pause = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?pause, "waiting for the assignment failed");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// Waits for tasks and carries each out: a reboot (see [`reboot`](Self::reboot)), or a
    /// collection, retrying a failed upload (the whole archive again) with backoff for as
    /// long as the allocator still asks for it.
    async fn tasks_loop(self: Arc<Self>) {
        let mut backoff = Backoff::new(self.config.backoff_max);
        // Only the owner's local consent lets the allocator reboot the machine.
        let may_reboot = self.config.registered && self.config.allow_reboot;
        let mut said_not_allowed = false;
        loop {
            let hold = self.config.wait_timeout;
            let asked = Instant::now();
            let tasks = self.client.tasks(hold).await;
            if let Ok(Some(tasks)) = &tasks {
                self.warn(&tasks.warnings).await;
            }
            // A collection asked for together with a reboot waits for the machine to be back
            // (the allocator still asks for it then).
            let tasks = match tasks {
                Ok(Some(tasks)) if tasks.reset => {
                    backoff.reset();
                    self.reset().await;
                    continue;
                }
                Ok(Some(tasks)) if tasks.reboot && may_reboot => {
                    match self.reboot().await {
                        Reboot::Running { previous } => {
                            backoff.reset();
                            tokio::time::sleep(self.reboot_timing.grace).await;
                            self.still_up(previous);
                        }
                        Reboot::NotDone => tokio::time::sleep(backoff.next_delay()).await,
                    }
                    continue;
                }
                Ok(Some(tasks)) => {
                    // Not allowed: said once, then the request is ignored (and the polls go
                    // on as usual, paced like empty answers).
                    if tasks.reboot && !said_not_allowed {
                        said_not_allowed = true;
                        tracing::warn!("{REBOOT_NOT_ALLOWED}");
                        self.reporter.send(TelemetryBody {
                            logs: vec![LogBody {
                                stream: "agent".into(),
                                lines: vec![format!("{} {REBOOT_NOT_ALLOWED}", now())],
                            }],
                            ..Default::default()
                        });
                    }
                    Ok(tasks.collection)
                }
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            match tasks {
                Ok(Some(task)) => match self.collect(&task).await {
                    Ok(manifest) => {
                        backoff.reset();
                        let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
                        self.note(
                            TelemetryBody::default(),
                            format!(
                                "collection {}: uploaded {} files ({bytes} bytes); {} skipped",
                                task.id,
                                manifest.files.len(),
                                manifest.skipped.len()
                            ),
                        );
                    }
                    Err(e) => {
                        let pause = backoff.next_delay();
                        self.note(
                            TelemetryBody::default(),
                            format!("collection {} failed, retrying in {pause:?}: {e}", task.id),
                        );
                        tokio::time::sleep(pause).await;
                    }
                },
                Ok(None) => {
                    if hold >= Duration::from_secs(1) && asked.elapsed() < Duration::from_secs(1) {
                        tokio::time::sleep(backoff.next_delay()).await;
                    } else {
                        backoff.reset();
                    }
                }
                Err(e) => {
                    let pause = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?pause, "asking for collection tasks failed");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// Shows each warning on the desktop, once (one already shown in this run is only
    /// acknowledged again), and acknowledges it so the allocator does not send it again. A
    /// missing `notify-send` is said once in the agent's log; the warning counts as handled.
    async fn warn(&self, warnings: &[WarningTask]) {
        for w in warnings {
            let new = self
                .shown
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(w.id.clone());
            if new {
                let line = match self.notifier.show(&w.title, &w.message).await {
                    Shown::Shown => Some(format!("warning shown on the desktop: {}", w.message)),
                    Shown::Off => None,
                    Shown::Missing { first: true } => Some(
                        "no notify-send on this machine: warnings show on the participant's page only"
                            .to_owned(),
                    ),
                    Shown::Missing { first: false } => None,
                    Shown::Failed(why) => {
                        Some(format!("the desktop notification of a warning failed: {why}"))
                    }
                };
                if let Some(line) = line {
                    self.note(TelemetryBody::default(), line);
                }
            }
            if let Err(e) = self.client.acknowledge_warning(&w.id).await {
                tracing::warn!(error = %e, warning = %w.id, "the warning was not acknowledged; again at the next poll");
            }
        }
    }

    /// Finds the files of `task` and streams their archive to the allocator.
    async fn collect(&self, task: &CollectionTask) -> Result<Manifest, CollectFailed> {
        let hostname = self.config.vm_name.to_string();
        let planned = task.clone();
        let own = collect::own_files(self.config.state_dir.as_deref());
        let plan = tokio::task::spawn_blocking(move || collect::plan(&planned, &hostname, &own))
            .await
            .map_err(|e| CollectFailed(e.to_string()))?
            .map_err(|e| CollectFailed(e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(8);
        let id = task.id.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, ChannelWriter(tx.clone()));
            let written = collect::write_archive(&plan, &id, &mut out);
            drop(out);
            if let Err(e) = &written {
                let _ = tx.blocking_send(Err(std::io::Error::new(e.kind(), e.to_string())));
            }
            written
        });
        let chunks = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        let uploaded = self
            .client
            .upload_collection(
                &task.id,
                reqwest::Body::wrap_stream(chunks),
                self.config.upload_timeout,
            )
            .await;
        let written = writer.await.map_err(|e| CollectFailed(e.to_string()))?;
        match (written, uploaded) {
            (Ok(manifest), Ok(_)) => Ok(manifest),
            (Err(e), _) => Err(CollectFailed(format!("reading the files failed: {e}"))),
            (_, Err(e)) => Err(CollectFailed(upload_error(&e))),
        }
    }

    /// The allocator asked for a reboot: reports the status `rebooting` (trying for at most
    /// [`REBOOT_REPORT_DEADLINE`]) and, only once the allocator took it, runs the reboot
    /// command. A machine that reboots without the allocator knowing could be asked again
    /// after every boot; so when the report is not taken there is no reboot (the allocator,
    /// asking again on a later poll, gets another try). When there is no reboot, the
    /// previous status is reported again.
    async fn reboot(&self) -> Reboot {
        let shown = self.config.reboot_command.join(" ");
        let previous = {
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            status.replace("rebooting".into())
        };
        // Sent now, with whatever was waiting, not left to the report loop: the allocator
        // must know before the machine goes down.
        let line = format!("the allocator asked for a reboot; running `{shown}`");
        tracing::info!("{line}");
        let mut report = self.reporter.take();
        report.merge(TelemetryBody {
            status: Some("rebooting".into()),
            logs: vec![LogBody {
                stream: "agent".into(),
                lines: vec![format!("{} {line}", now())],
            }],
            ..Default::default()
        });
        if let Err(mut report) = self
            .deliver_now(report, self.reboot_timing.report_deadline)
            .await
        {
            // Its lines go with the report loop; its status is not `rebooting` after all.
            report.status = None;
            self.reporter.restore(report);
            self.put_back_status(
                previous,
                "the allocator did not take the status `rebooting`, so the machine does not \
                 reboot now (again if the allocator still asks)"
                    .into(),
            );
            return Reboot::NotDone;
        }
        match run_reboot_command(&self.config.reboot_command).await {
            Ok(()) => {
                self.note(
                    TelemetryBody::default(),
                    format!("`{shown}` succeeded; the machine is going down"),
                );
                Reboot::Running { previous }
            }
            Err(e) => {
                self.put_back_status(previous, format!("the reboot failed: `{shown}` {e}"));
                Reboot::NotDone
            }
        }
    }

    /// [`REBOOT_GRACE`] after a reboot command that succeeded the machine is still up: its
    /// previous status is reported again, so that the allocator does not show `rebooting`
    /// for ever.
    fn still_up(&self, previous: Option<String>) {
        let grace = self.reboot_timing.grace;
        self.put_back_status(
            previous,
            format!("the machine is still up {grace:?} after the reboot command; back to work"),
        );
    }

    /// Reports `previous` again (with `line`) in place of `rebooting`; a status noted since
    /// (the bootstrap finished, say) stands instead.
    fn put_back_status(&self, previous: Option<String>, line: String) {
        let back = {
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            if status.as_deref() == Some("rebooting") {
                status.clone_from(&previous);
                previous
            } else {
                None
            }
        };
        self.note(
            TelemetryBody {
                status: back,
                ..Default::default()
            },
            line,
        );
    }

    /// Sends `report` now, retrying for at most `deadline`: `Ok` once the allocator took it,
    /// else the report back (refused, or not delivered in time).
    async fn deliver_now(
        &self,
        report: TelemetryBody,
        deadline: Duration,
    ) -> Result<(), TelemetryBody> {
        let mut backoff = Backoff::new(self.config.backoff_max);
        let sent = tokio::time::timeout(deadline, async {
            loop {
                match self.client.report(&report).await {
                    Ok(()) => return true,
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(error = %e, "report failed; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "report refused");
                        return false;
                    }
                }
            }
        })
        .await
        .unwrap_or(false);
        if sent {
            Ok(())
        } else {
            Err(report)
        }
    }

    /// Reports `status` (with `line` and whatever was waiting) now, trying for the reboot's
    /// report deadline, then leaves it to the report loop: the allocator's next answer to a
    /// task poll depends on it.
    async fn report_status_now(&self, status: &str, line: String) {
        tracing::info!("{line}");
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status.to_owned());
        let mut report = self.reporter.take();
        report.merge(TelemetryBody {
            status: Some(status.to_owned()),
            logs: vec![LogBody {
                stream: "agent".into(),
                lines: vec![format!("{} {line}", now())],
            }],
            ..Default::default()
        });
        if let Err(report) = self
            .deliver_now(report, self.reboot_timing.report_deadline)
            .await
        {
            self.reporter.restore(report);
            self.reporter.wake.notify_one();
        }
    }
}

/// Runs the reboot command (no shell) and waits for it, at most
/// [`REBOOT_COMMAND_TIMEOUT`]. The error says how it failed, with the end of its output.
async fn run_reboot_command(command: &[String]) -> Result<(), String> {
    let Some((program, args)) = command.split_first() else {
        return Err("is empty (LABLINK_REBOOT_COMMAND)".into());
    };
    let run = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(REBOOT_COMMAND_TIMEOUT, run).await {
        Err(_) => return Err(format!("did not finish in {REBOOT_COMMAND_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(format!("could not be started: {e}")),
        Ok(Ok(output)) => output,
    };
    if output.status.success() {
        return Ok(());
    }
    let mut said = String::from_utf8_lossy(&output.stderr).into_owned();
    if said.trim().is_empty() {
        said = String::from_utf8_lossy(&output.stdout).into_owned();
    }
    let said = said.split_whitespace().collect::<Vec<_>>().join(" ");
    let tail: String = {
        let chars: Vec<char> = said.chars().collect();
        chars[chars.len().saturating_sub(300)..].iter().collect()
    };
    Err(if tail.is_empty() {
        format!("failed ({})", output.status)
    } else {
        format!("failed ({}): {tail}", output.status)
    })
}

/// Why one attempt at a collection failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CollectFailed(String);

fn upload_error(e: &ClientError) -> String {
    format!("the upload failed: {e}")
}

/// Hands the archive to the upload, chunk by chunk (blocking: runs on a blocking thread).
struct ChannelWriter(tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.blocking_send(Ok(buf.to_vec())).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload ended early")
        })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::config::StartHost;
    use crate::test_http::{Reply, Request, TestServer};

    fn config(url: &str, registered: bool) -> AgentConfig {
        let mut c = AgentConfig::new(
            url.parse().unwrap(),
            "ws-1".parse().unwrap(),
            Some("agent-token".into()),
        );
        c.registered = registered;
        c.allow_reboot = registered;
        c.unregistered_after = Duration::ZERO;
        c.start_host = StartHost::DryRun;
        c.nvidia_smi = "/nonexistent/nvidia-smi".into();
        c.backoff_max = Duration::from_millis(50);
        c.wait_timeout = Duration::from_secs(1);
        c
    }

    /// Waits (a few seconds at most) until `done` holds for the requests `server` saw.
    async fn until(server: &TestServer, what: &str, done: impl Fn(&[Request]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&server.requests()) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn telemetry(requests: &[Request]) -> Vec<serde_json::Value> {
        requests
            .iter()
            .filter(|r| r.method == "POST" && r.path().ends_with("/telemetry"))
            .map(Request::json)
            .collect()
    }

    fn agent_lines(report: &serde_json::Value) -> String {
        report["logs"].to_string()
    }

    /// The distinct lines of the agent's log stream the server was sent holding `text` (a
    /// report sent again carries its lines again).
    fn distinct_lines(requests: &[Request], text: &str) -> usize {
        let mut lines: Vec<String> = telemetry(requests)
            .iter()
            .filter_map(|t| t["logs"].as_array().cloned())
            .flatten()
            .filter(|batch| batch["stream"] == "agent")
            .filter_map(|batch| batch["lines"].as_array().cloned())
            .flatten()
            .filter_map(|line| line.as_str().map(str::to_owned))
            .filter(|line| line.contains(text))
            .collect();
        lines.sort();
        lines.dedup();
        lines.len()
    }

    #[tokio::test]
    async fn a_registered_machine_whose_token_is_refused_stops() {
        let server = TestServer::start(|_: &Request| {
            Reply::json(401, serde_json::json!({"error": "unknown token"}))
        })
        .await;
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            run(config(&server.url, true), std::future::pending()),
        )
        .await
        .expect("the agent stops by itself");
        assert!(
            matches!(outcome, Err(AgentFailed::Unregistered)),
            "{outcome:?}"
        );
        assert!(outcome
            .unwrap_err()
            .to_string()
            .contains("no longer registered"));
    }

    #[tokio::test]
    async fn a_vm_whose_token_is_refused_keeps_trying() {
        let server = TestServer::start(|_: &Request| {
            Reply::json(401, serde_json::json!({"error": "unknown token"}))
        })
        .await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(run(config(&server.url, false), async {
            let _ = stopped.await;
        }));
        until(&server, "two refused calls", |r| r.len() >= 2).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !agent.is_finished(),
            "a VM the allocator created does not give up"
        );
        stop.send(()).unwrap();
        assert!(agent.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_registered_machine_stops_only_once_the_refusals_lasted() {
        // One 401 (a proxy, an allocator restarting), then answers again: it runs on.
        let refused_once = AtomicBool::new(false);
        let server = TestServer::start(move |_: &Request| {
            if !refused_once.swap(true, Ordering::SeqCst) {
                return Reply::json(401, serde_json::json!({"error": "unknown token"}));
            }
            Reply::empty(204)
        })
        .await;
        let mut c = config(&server.url, true);
        c.unregistered_after = Duration::from_millis(500);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(run(c, async {
            let _ = stopped.await;
        }));
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(server.requests().len() > 5);
        assert!(!agent.is_finished(), "one 401 does not stop the agent");
        stop.send(()).unwrap();
        assert!(agent.await.unwrap().is_ok());

        // Every answer 401: it stops once they lasted, not before.
        let server = TestServer::start(|_: &Request| {
            Reply::json(401, serde_json::json!({"error": "unknown token"}))
        })
        .await;
        let mut c = config(&server.url, true);
        c.unregistered_after = Duration::from_millis(400);
        let started = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(10), run(c, std::future::pending()))
            .await
            .expect("the agent stops by itself");
        assert!(
            matches!(outcome, Err(AgentFailed::Unregistered)),
            "{outcome:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    /// Answers every call, and asks for a reboot on every task poll once the agent reported
    /// `running`. Counts the task polls.
    async fn always_rebooting_allocator(polls: Arc<AtomicUsize>) -> TestServer {
        let running = AtomicBool::new(false);
        TestServer::start(move |r: &Request| {
            let path = r.path();
            if path.ends_with("/telemetry") {
                if r.json()["status"] == "running" {
                    running.store(true, Ordering::SeqCst);
                }
                return Reply::json(200, serde_json::json!({}));
            }
            if path.ends_with("/tasks") {
                polls.fetch_add(1, Ordering::SeqCst);
                if running.load(Ordering::SeqCst) {
                    return Reply::json(
                        200,
                        serde_json::json!({"collection": null, "reboot": true}),
                    );
                }
            }
            Reply::empty(204)
        })
        .await
    }

    #[tokio::test]
    async fn a_reboot_the_owner_did_not_allow_is_ignored_with_one_warning() {
        for (registered, allow_reboot) in [(true, false), (false, true)] {
            let dir = tempfile::tempdir().unwrap();
            let marker = dir.path().join("rebooted");
            let polls = Arc::new(AtomicUsize::new(0));
            let server = always_rebooting_allocator(polls.clone()).await;
            let mut c = config(&server.url, registered);
            c.allow_reboot = allow_reboot;
            c.reboot_command = vec!["touch".into(), marker.display().to_string()];
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let agent = tokio::spawn(run(c, async {
                let _ = stopped.await;
            }));
            until(&server, "the warning", |r| {
                telemetry(r)
                    .iter()
                    .any(|t| agent_lines(t).contains("did not allow it"))
            })
            .await;
            let asked = polls.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let asked = polls.load(Ordering::SeqCst) - asked;
            stop.send(()).unwrap();
            assert!(agent.await.unwrap().is_ok());
            assert!(!marker.exists(), "rebooted without the owner's consent");
            assert!(
                (2..=200).contains(&asked),
                "it keeps polling, at its usual pace: {asked} polls in 1 s"
            );
            let reports = telemetry(&server.requests());
            assert!(reports.iter().all(|t| t["status"] != "rebooting"));
            assert_eq!(
                distinct_lines(&server.requests(), REBOOT_NOT_ALLOWED),
                1,
                "the warning is said once"
            );
        }
    }

    #[tokio::test]
    async fn no_reboot_before_the_allocator_took_the_status_rebooting() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("rebooted");
        // `rebooting` reports are answered 503 while `refusing`; others are taken.
        let refusing = Arc::new(AtomicBool::new(true));
        let refused = Arc::new(AtomicUsize::new(0));
        let taken_before_the_reboot = Arc::new(AtomicBool::new(false));
        let running = AtomicBool::new(false);
        let server = TestServer::start({
            let (marker, refusing, refused, taken) = (
                marker.clone(),
                refusing.clone(),
                refused.clone(),
                taken_before_the_reboot.clone(),
            );
            move |r: &Request| {
                let path = r.path();
                if path.ends_with("/telemetry") {
                    match r.json()["status"].as_str() {
                        Some("running") => running.store(true, Ordering::SeqCst),
                        Some("rebooting") if refusing.load(Ordering::SeqCst) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                            return Reply::json(503, serde_json::json!({"error": "restarting"}));
                        }
                        Some("rebooting") if !marker.exists() => {
                            taken.store(true, Ordering::SeqCst)
                        }
                        _ => {}
                    }
                    return Reply::json(200, serde_json::json!({}));
                }
                if path.ends_with("/tasks") && running.load(Ordering::SeqCst) {
                    return Reply::json(
                        200,
                        serde_json::json!({"collection": null, "reboot": true}),
                    );
                }
                Reply::empty(204)
            }
        })
        .await;
        let mut c = config(&server.url, true);
        c.reboot_command = vec!["touch".into(), marker.display().to_string()];
        let timing = RebootTiming {
            report_deadline: Duration::from_millis(300),
            grace: REBOOT_GRACE,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(run_with(c, timing, async {
            let _ = stopped.await;
        }));
        // Not taken: no reboot, the status put back, and another try on a later poll.
        let not_taken = "did not take the status `rebooting`";
        until(&server, "two tries", |r| distinct_lines(r, not_taken) >= 2).await;
        assert!(
            !marker.exists(),
            "rebooted though the allocator did not know"
        );
        let reports = telemetry(&server.requests());
        // (The lines of a report that was not taken may come again in the next try.)
        let put_back = reports
            .iter()
            .find(|t| agent_lines(t).contains(not_taken) && t["status"] != "rebooting")
            .unwrap();
        assert_eq!(put_back["status"], "running", "{put_back}");
        assert!(refused.load(Ordering::SeqCst) >= 2);

        // Taken: the reboot command runs.
        refusing.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !marker.exists() {
            assert!(Instant::now() < deadline, "the reboot command did not run");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(taken_before_the_reboot.load(Ordering::SeqCst));
        stop.send(()).unwrap();
        assert!(agent.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_machine_still_up_after_the_grace_reports_its_status_again() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("rebooted");
        let told_first = Arc::new(AtomicBool::new(false));
        let server = rebooting_allocator(marker.clone(), told_first.clone()).await;
        let mut c = config(&server.url, true);
        c.reboot_command = vec!["touch".into(), marker.display().to_string()];
        let timing = RebootTiming {
            report_deadline: REBOOT_REPORT_DEADLINE,
            grace: Duration::from_millis(300),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(run_with(c, timing, async {
            let _ = stopped.await;
        }));
        until(&server, "the status again", |r| {
            telemetry(r)
                .iter()
                .any(|t| agent_lines(t).contains("still up"))
        })
        .await;
        let polls = |r: &[Request]| r.iter().filter(|r| r.path().ends_with("/tasks")).count();
        let before = polls(&server.requests());
        until(&server, "polls again", |r| polls(r) >= before + 2).await;
        stop.send(()).unwrap();
        assert!(agent.await.unwrap().is_ok());
        assert!(marker.exists() && told_first.load(Ordering::SeqCst));
        let reports = telemetry(&server.requests());
        let statuses: Vec<&str> = reports
            .iter()
            .filter_map(|t| t["status"].as_str())
            .collect();
        let rebooting = statuses.iter().position(|s| *s == "rebooting").unwrap();
        assert_eq!(statuses[rebooting + 1..], ["running"], "{statuses:?}");
        let again = reports
            .iter()
            .find(|t| agent_lines(t).contains("still up"))
            .unwrap();
        assert_eq!(again["status"], "running", "{again}");
    }

    /// An allocator that asks for one reboot once the agent reported `running`; `rebooting`
    /// reports are checked against `marker` (the reboot command's trace), which must not
    /// exist yet then.
    async fn rebooting_allocator(marker: PathBuf, told_first: Arc<AtomicBool>) -> TestServer {
        let running = AtomicBool::new(false);
        let asked = AtomicBool::new(false);
        TestServer::start(move |r: &Request| {
            let path = r.path();
            if path.ends_with("/telemetry") {
                match r.json()["status"].as_str() {
                    Some("running") => running.store(true, Ordering::SeqCst),
                    Some("rebooting") if !marker.exists() => {
                        told_first.store(true, Ordering::SeqCst)
                    }
                    _ => {}
                }
                return Reply::json(200, serde_json::json!({}));
            }
            if path.ends_with("/tasks")
                && running.load(Ordering::SeqCst)
                && !asked.swap(true, Ordering::SeqCst)
            {
                return Reply::json(200, serde_json::json!({"collection": null, "reboot": true}));
            }
            Reply::empty(204)
        })
        .await
    }

    #[tokio::test]
    async fn a_reboot_is_reported_then_run() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("rebooted");
        let told_first = Arc::new(AtomicBool::new(false));
        let server = rebooting_allocator(marker.clone(), told_first.clone()).await;
        let mut c = config(&server.url, true);
        c.reboot_command = vec!["touch".into(), marker.display().to_string()];
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(run(c, async {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !marker.exists() {
            assert!(Instant::now() < deadline, "the reboot command did not run");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            told_first.load(Ordering::SeqCst),
            "the allocator was told `rebooting` before the reboot"
        );
        until(&server, "the success line", |r| {
            telemetry(r)
                .iter()
                .any(|t| agent_lines(t).contains("succeeded; the machine is going down"))
        })
        .await;
        stop.send(()).unwrap();
        assert!(agent.await.unwrap().is_ok());
        let reports = telemetry(&server.requests());
        let rebooting = reports.iter().find(|t| t["status"] == "rebooting").unwrap();
        assert!(
            agent_lines(rebooting).contains("the allocator asked for a reboot; running `touch "),
            "{rebooting}"
        );
    }

    #[tokio::test]
    async fn a_failed_reboot_is_logged_and_the_status_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let told_first = Arc::new(AtomicBool::new(false));
        let server = rebooting_allocator(dir.path().join("never"), told_first.clone()).await;
        let mut c = config(&server.url, true);
        c.reboot_command = vec!["/nonexistent/reboot".into(), "now".into()];
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(run(c, async {
            let _ = stopped.await;
        }));
        until(&server, "the failure line", |r| {
            telemetry(r)
                .iter()
                .any(|t| agent_lines(t).contains("the reboot failed"))
        })
        .await;
        stop.send(()).unwrap();
        assert!(agent.await.unwrap().is_ok());
        assert!(told_first.load(Ordering::SeqCst));
        let reports = telemetry(&server.requests());
        let failed = reports
            .iter()
            .find(|t| agent_lines(t).contains("the reboot failed"))
            .unwrap();
        assert_eq!(failed["status"], "running", "{failed}");
        assert!(
            agent_lines(failed).contains("`/nonexistent/reboot now` could not be started"),
            "{failed}"
        );
    }

    /// An assignment of attempt `attempt` (version `v<attempt>`) in `mode`.
    fn assignment_json(attempt: u32, mode: &str) -> serde_json::Value {
        let code = format!("4/0Ab-code_{attempt}");
        serde_json::json!({
            "hostname": "ws-1",
            "command": format!("start-host --code={code} --redirect-url=https://remotedesktop.google.com/_/oauthredirect --name=ws-1"),
            "code": code,
            "pin": "908172635",
            "assigned_at": "2026-01-01T00:00:00Z",
            "mode": mode,
            "attempt": attempt,
            "version": format!("v{attempt}"),
        })
    }

    /// The desktop reports the server was sent: `(attempt, stage, failure)`, repeats dropped.
    fn desktop_reports(requests: &[Request]) -> Vec<(u64, String, String)> {
        let mut reports: Vec<(u64, String, String)> = Vec::new();
        for t in telemetry(requests) {
            let d = &t["desktop"];
            if d.is_null() {
                continue;
            }
            let report = (
                d["attempt"].as_u64().unwrap(),
                d["stage"].as_str().unwrap().to_owned(),
                d["failure"].as_str().unwrap_or_default().to_owned(),
            );
            if reports.last() != Some(&report) {
                reports.push(report);
            }
        }
        reports
    }

    #[tokio::test]
    async fn a_new_attempt_starts_the_desktop_again_and_the_wait_names_the_version_seen() {
        let attempt = Arc::new(std::sync::atomic::AtomicU32::new(1));
        let server = TestServer::start({
            let attempt = attempt.clone();
            move |r: &Request| {
                if r.path().ends_with("/assignment") {
                    // The hold "ended" at once: the same assignment until the next attempt.
                    return Reply::json(
                        200,
                        assignment_json(attempt.load(Ordering::SeqCst), "crd"),
                    );
                }
                if r.path().ends_with("/telemetry") {
                    return Reply::json(200, serde_json::json!({}));
                }
                Reply::empty(204)
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(&server.url, false);
        c.state_dir = Some(dir.path().to_owned());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(run(c, async {
            let _ = stopped.await;
        }));
        until(&server, "attempt 1 ready", |r| {
            desktop_reports(r).contains(&(1, "ready".into(), String::new()))
        })
        .await;
        until(&server, "a wait with the version seen", |r| {
            r.iter().any(|r| r.target.contains("seen=v1"))
        })
        .await;
        attempt.store(2, Ordering::SeqCst);
        until(&server, "attempt 2 ready", |r| {
            desktop_reports(r).contains(&(2, "ready".into(), String::new()))
        })
        .await;
        stop.send(()).unwrap();
        assert!(agent.await.unwrap().is_ok());
        // (A `received` still waiting is replaced by the `ready` right after it.)
        let reports = desktop_reports(&server.requests());
        let outcomes: Vec<_> = reports.iter().filter(|d| d.1 != "received").collect();
        assert_eq!(
            outcomes,
            [
                &(1, "ready".into(), String::new()),
                &(2, "ready".into(), String::new())
            ],
            "{reports:?}"
        );
        let requests = server.requests();
        assert_eq!(
            distinct_lines(&requests, "starting Chrome Remote Desktop for"),
            2,
            "each attempt started once"
        );
        assert_eq!(
            distinct_lines(
                &requests,
                "dry run: Chrome Remote Desktop would start now for the assignment of 2026-01-01T00:00:00Z (attempt 2)"
            ),
            1
        );
        assert_eq!(
            StateDir::new(Some(dir.path().to_owned()))
                .load("assignment")
                .as_deref(),
            Some("2026-01-01T00:00:00Z#2")
        );
        let said: String = telemetry(&requests).iter().map(agent_lines).collect();
        assert!(
            !said.contains("code_") && !said.contains("908172635"),
            "{said}"
        );
    }

    #[tokio::test]
    async fn a_browser_assignment_without_a_vnc_server_is_reported_unavailable() {
        let server = TestServer::start(|r: &Request| {
            if r.path().ends_with("/assignment") {
                let mut a = assignment_json(1, "browser");
                a["command"] = "".into();
                a["code"] = "".into();
                return Reply::json(200, a);
            }
            if r.path().ends_with("/telemetry") {
                return Reply::json(200, serde_json::json!({}));
            }
            Reply::empty(204)
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(&server.url, false);
        c.vnc.port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        c.vnc.command = Some(vec!["/nonexistent/vncserver".into()]);
        c.vnc.password_file = Some(dir.path().join("vnc-passwd"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(run(c, async {
            let _ = stopped.await;
        }));
        until(&server, "the failure", |r| {
            desktop_reports(r).iter().any(|d| d.1 == "failed")
        })
        .await;
        stop.send(()).unwrap();
        assert!(agent.await.unwrap().is_ok());
        assert_eq!(
            desktop_reports(&server.requests()),
            [
                (1, "received".into(), String::new()),
                (1, "failed".into(), "desktop_unavailable".into()),
            ]
        );
        assert_eq!(
            distinct_lines(&server.requests(), "the browser desktop is unavailable"),
            1
        );
    }

    /// Asks for a reset on every task poll until the agent reports a status after the
    /// first request for one (as the allocator does); records the statuses.
    async fn resetting_allocator() -> TestServer {
        let asked = AtomicBool::new(false);
        let reported = AtomicBool::new(false);
        TestServer::start(move |r: &Request| {
            let path = r.path();
            if path.ends_with("/telemetry") {
                if asked.load(Ordering::SeqCst) && r.json()["status"].is_string() {
                    reported.store(true, Ordering::SeqCst);
                }
                return Reply::json(200, serde_json::json!({}));
            }
            if path.ends_with("/tasks") && !reported.load(Ordering::SeqCst) {
                asked.store(true, Ordering::SeqCst);
                return Reply::json(200, serde_json::json!({"collection": null, "reset": true}));
            }
            Reply::empty(204)
        })
        .await
    }

    fn statuses(requests: &[Request]) -> Vec<String> {
        telemetry(requests)
            .iter()
            .filter_map(|t| t["status"].as_str().map(str::to_owned))
            .collect()
    }

    #[tokio::test]
    async fn a_reset_restores_the_home_forgets_the_assignment_and_reports_running() {
        let dir = tempfile::tempdir().unwrap();
        let (home, skel, state) = (
            dir.path().join("home"),
            dir.path().join("skel"),
            dir.path().join("state"),
        );
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&skel).unwrap();
        std::fs::write(home.join("work.slp"), "work").unwrap();
        std::fs::write(skel.join(".bashrc"), "# bashrc").unwrap();
        StateDir::new(Some(state.clone())).save("assignment", "2026-01-01T00:00:00Z");
        let server = resetting_allocator().await;
        let mut c = config(&server.url, false);
        c.state_dir = Some(state.clone());
        c.reset.home = Some(home.clone());
        c.reset.skeleton = skel;
        c.reset.end_session = Some(vec!["true".into()]);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(run(c, async {
            let _ = stopped.await;
        }));
        until(&server, "the reset's end", |r| {
            distinct_lines(r, "reset done; waiting for an assignment") == 1
        })
        .await;
        stop.send(()).unwrap();
        assert!(agent.await.unwrap().is_ok());
        let statuses = statuses(&server.requests());
        let reset = statuses.iter().rposition(|s| s == "initializing").unwrap();
        assert_eq!(
            statuses[reset..],
            ["initializing", "running"],
            "{statuses:?}"
        );
        assert!(!home.join("work.slp").exists());
        assert_eq!(
            std::fs::read_to_string(home.join(".bashrc")).unwrap(),
            "# bashrc"
        );
        assert_eq!(
            StateDir::new(Some(state)).load("assignment").as_deref(),
            Some("")
        );
    }

    #[tokio::test]
    async fn a_reset_with_nothing_to_reset_reports_an_error() {
        let server = resetting_allocator().await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = tokio::spawn(run(config(&server.url, false), async {
            let _ = stopped.await;
        }));
        until(&server, "the error", |r| {
            statuses(r).iter().any(|s| s == "error")
        })
        .await;
        stop.send(()).unwrap();
        assert!(agent.await.unwrap().is_ok());
        let reports = telemetry(&server.requests());
        let error = reports.iter().find(|t| t["status"] == "error").unwrap();
        assert!(
            agent_lines(error).contains(
                "reset failed: reset is not configured: set LABLINK_CRD_USER or LABLINK_RESET_HOME"
            ),
            "{error}"
        );
    }
}
