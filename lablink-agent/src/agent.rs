//! The agent's loops: report, heartbeat, GPU, in-use, log shipping, and the assignment wait.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::client::{
    AllocatorClient, AssignmentBody, Backoff, ClientError, Coalesce as _, LogBody, TelemetryBody,
    TimingsBody,
};
use crate::collect::{self, CollectionTask, Manifest};
use crate::config::AgentConfig;
use crate::crd::{HostInvocation, StartError, Started};
use crate::logship::{FileTail, Position};
use crate::probes::{self, Gpu};
use crate::state::StateDir;

/// Most lines of the agent's own log kept for the allocator during an outage.
const MAX_AGENT_LINES: usize = 1000;
/// How long the last report may take at shutdown.
const FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// One of the agent's loops ended, which must not happen (a panic): the agent stops, so
/// that its supervisor (systemd) starts it again.
#[derive(Debug, thiserror::Error)]
#[error("an agent task ended unexpectedly: {0}")]
pub struct AgentFailed(String);

/// Runs the agent until `shutdown` completes. It never gives up on the allocator: every
/// failed call is retried with jittered exponential backoff.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentFailed> {
    let agent = Arc::new(Agent {
        client: AllocatorClient::new(&config),
        reporter: Reporter::default(),
        state: StateDir::new(config.state_dir.clone()),
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
    tasks.spawn(agent.clone().collect_loop());
    tasks.spawn(agent.clone().main_loop());
    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        Some(ended) = tasks.join_next() => Err(AgentFailed(match ended {
            Ok(()) => "a loop returned".to_owned(),
            Err(e) => e.to_string(),
        })),
    };
    match &outcome {
        Ok(()) => tracing::info!("shutting down"),
        Err(e) => tracing::error!(error = %e, "stopping"),
    }
    tasks.shutdown().await;
    agent.flush().await;
    outcome
}

struct Agent {
    config: AgentConfig,
    client: AllocatorClient,
    reporter: Reporter,
    state: StateDir,
}

/// Telemetry waiting to be sent; newer values replace older ones, so a retry always carries
/// the latest state and never more than one pending report.
#[derive(Default)]
struct Reporter {
    pending: Mutex<TelemetryBody>,
    wake: Notify,
}

impl Reporter {
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

/// What identifies an assignment (kept in the state directory): its time, as the allocator
/// sent it.
fn assignment_key(a: &AssignmentBody) -> String {
    a.assigned_at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl Agent {
    /// A line for the allocator's `agent` log stream (and the local log).
    fn note(&self, report: TelemetryBody, line: String) {
        tracing::info!("{line}");
        let mut report = report;
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

    async fn wait_loop(&self) {
        let mut backoff = Backoff::new(self.config.backoff_max);
        // The assignment already handled, also by an earlier run of the agent on this VM:
        // its one-time code was used, so it is not started again.
        let mut handled = self.state.load("assignment").filter(|a| !a.is_empty());
        loop {
            // Once an assignment is handled, only look (no hold) for a release or a new one.
            let hold = if handled.is_some() {
                Duration::ZERO
            } else {
                self.config.wait_timeout
            };
            let asked = Instant::now();
            match self.client.wait_assignment(hold).await {
                Ok(Some(a)) if handled.as_deref() == Some(assignment_key(&a).as_str()) => {
                    backoff.reset();
                    tokio::time::sleep(self.config.recheck_interval).await;
                }
                Ok(Some(a)) => {
                    backoff.reset();
                    let key = assignment_key(&a);
                    self.state.save("assignment", &key);
                    self.start(&a).await;
                    handled = Some(key);
                }
                Ok(None) => {
                    if handled.take().is_some() {
                        self.note(
                            TelemetryBody::default(),
                            "the assignment was released; waiting again".into(),
                        );
                    }
                    // An allocator that answers long-polls at once (shutting down, a tiny
                    // maximum hold) must not make this loop spin.
                    if hold >= Duration::from_secs(1) && asked.elapsed() < Duration::from_secs(1) {
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

    /// Waits for collection requests and carries each out, retrying a failed upload (the
    /// whole archive again) with backoff for as long as the allocator still asks for it.
    async fn collect_loop(self: Arc<Self>) {
        let mut backoff = Backoff::new(self.config.backoff_max);
        loop {
            let hold = self.config.wait_timeout;
            let asked = Instant::now();
            match self.client.collection_task(hold).await {
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

    /// Starts Chrome Remote Desktop for `assignment` and reports the outcome in the agent's
    /// log. A bad or expired code is the participant's problem, not the VM's: the VM's
    /// status stays `running`.
    async fn start(&self, assignment: &AssignmentBody) {
        let outcome = match HostInvocation::from_assignment(assignment) {
            Ok(invocation) => invocation.run(&self.config).await,
            Err(e) => Err(e),
        };
        let at = assignment_key(assignment);
        let line = match outcome {
            Ok(Started::Program) => {
                format!("Chrome Remote Desktop started for the assignment of {at}")
            }
            Ok(Started::DryRun) => {
                format!("dry run: Chrome Remote Desktop would start now for the assignment of {at}")
            }
            Err(e @ StartError::Invalid(_)) => format!("assignment of {at} rejected: {e}"),
            Err(e @ StartError::Failed(_)) => format!("assignment of {at} failed: {e}"),
        };
        self.note(TelemetryBody::default(), line);
    }
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
