//! [`LabLink`]: the default [`Allocator`], composed from a store, a provisioner, a notifier
//! and a clock by [`LabLinkBuilder`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use uuid::Uuid;

use crate::audit::{AuditEntry, AuditQuery};
use crate::desktop::{DesktopChange, DesktopMode, Reuse};
use crate::logs::clean_lines;
use crate::record::DEFAULT_LOG_CAP_BYTES;
use crate::registration::{MachineRegistration, Registered, RegistrationToken};
use crate::secret::{Pin, RegistrationSecret};
use crate::store::ClaimRequest;
use crate::{
    AgentStatus, AgentToken, Allocator, Assignment, BeforeDestroy, Clock, DestroyTarget, Email,
    Error, ErrorKind, FakeProvisioner, GpuHealth, Granted, Hostname, LaunchOptions,
    ManualProvisioner, MemoryNotifier, MemoryVmStore, MixedProvisioner, Notifier, Operation,
    OrphanPolicy, Phase, Provisioner, RegistrationTokenOptions, Result, SupervisorConfig,
    SystemClock, Telemetry, VmCounts, VmEvent, VmFilter, VmLogs, VmRecord, VmRequest, VmState,
    VmStore,
};

/// Settings of the default allocator. `Default` gives sensible workshop values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AllocatorConfig {
    /// Launched VMs are named `<prefix>-<n>`.
    pub hostname_prefix: String,
    /// Digits in a generated PIN (6–32).
    pub pin_length: usize,
    /// Longest an agent's wait for its assignment is held before it must ask again.
    #[serde(with = "crate::clock::seconds")]
    pub max_wait: Duration,
    /// Cap of each log stream of a VM, in bytes.
    pub log_cap_bytes: usize,
    /// Most VMs one launch may create.
    pub max_launch: usize,
    /// What [`LabLink::reconcile`] does with machines that have no record.
    pub orphan_policy: OrphanPolicy,
    /// The supervisor's loops ([`LabLink::start_supervisor`]).
    pub supervisor: SupervisorConfig,
    /// How participants reach their desktop (the server's `[desktop] mode`).
    pub desktop_mode: DesktopMode,
    /// What happens to a VM whose participant's assignment ends.
    pub reuse: Reuse,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        Self {
            hostname_prefix: "lablink-vm".into(),
            pin_length: 6,
            max_wait: Duration::from_secs(120),
            log_cap_bytes: DEFAULT_LOG_CAP_BYTES,
            max_launch: 1000,
            orphan_policy: OrphanPolicy::default(),
            supervisor: SupervisorConfig::default(),
            desktop_mode: DesktopMode::default(),
            reuse: Reuse::default(),
        }
    }
}

impl AllocatorConfig {
    /// Every problem with these settings, one message each (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if format!("{}-1", self.hostname_prefix)
            .parse::<Hostname>()
            .is_err()
        {
            problems.push(format!(
                "hostname_prefix {:?} does not make valid hostnames",
                self.hostname_prefix
            ));
        }
        if !(Pin::MIN_LEN..=Pin::MAX_LEN).contains(&self.pin_length) {
            problems.push(format!(
                "pin_length must be {}–{}",
                Pin::MIN_LEN,
                Pin::MAX_LEN
            ));
        }
        if self.max_wait.is_zero() {
            problems.push("max_wait must be positive".into());
        }
        if self.log_cap_bytes < 1024 {
            problems.push("log_cap_bytes must be at least 1024".into());
        }
        if self.max_launch == 0 {
            problems.push("max_launch must be at least 1".into());
        }
        problems.extend(self.supervisor.problems());
        problems
    }
}

/// Builds a [`LabLink`]. Every part has an in-memory default, so
/// `LabLinkBuilder::new().build()` gives a working allocator with a fake provisioner.
#[derive(Debug, Default)]
pub struct LabLinkBuilder {
    store: Option<Arc<dyn VmStore>>,
    provisioner: Option<Arc<dyn Provisioner>>,
    notifier: Option<Arc<dyn Notifier>>,
    clock: Option<Arc<dyn Clock>>,
    config: AllocatorConfig,
    before_destroy: Option<Arc<dyn BeforeDestroy>>,
}

impl LabLinkBuilder {
    /// A builder with every default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where VM records live (default: [`MemoryVmStore`]).
    pub fn with_store(mut self, store: Arc<dyn VmStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// What creates machines (default: [`FakeProvisioner`]). Machines that register
    /// themselves join beside them (see [`MixedProvisioner`]).
    pub fn with_provisioner(mut self, provisioner: Arc<dyn Provisioner>) -> Self {
        self.provisioner = Some(provisioner);
        self
    }

    /// What wakes waiting agents (default: [`MemoryNotifier`]).
    pub fn with_notifier(mut self, notifier: Arc<dyn Notifier>) -> Self {
        self.notifier = Some(notifier);
        self
    }

    /// The clock (default: [`SystemClock`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The settings.
    pub fn with_config(mut self, config: AllocatorConfig) -> Self {
        self.config = config;
        self
    }

    /// What the supervisor runs before destroying VMs that may hold a participant's work
    /// (default: nothing; see [`BeforeDestroy`]).
    pub fn with_before_destroy(mut self, hook: Arc<dyn BeforeDestroy>) -> Self {
        self.before_destroy = Some(hook);
        self
    }

    /// The allocator, or an [`ErrorKind::InvalidConfig`] error listing every problem.
    pub fn build(self) -> Result<LabLink> {
        let problems = self.config.problems();
        if !problems.is_empty() {
            return Err(Error::new(ErrorKind::InvalidConfig, problems.join("; ")));
        }
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryVmStore::default()));
        let notifier = self
            .notifier
            .unwrap_or_else(|| Arc::new(MemoryNotifier::default()));
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let registered = ManualProvisioner::new(store.clone(), notifier.clone(), clock.clone());
        let provisioner = self
            .provisioner
            .unwrap_or_else(|| Arc::new(FakeProvisioner::default()));
        Ok(LabLink {
            inner: Arc::new(Inner {
                store,
                provisioner: Arc::new(MixedProvisioner::new(provisioner.clone(), registered)),
                launcher: provisioner,
                notifier,
                clock,
                config: self.config,
                supervision: std::sync::Mutex::new(None),
                before_destroy: std::sync::Mutex::new(self.before_destroy),
                turned_away: crate::demand::TurnedAway::default(),
                roster: crate::roster::Roster::default(),
                reconciling: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }
}

/// The default [`Allocator`]. Cheap to clone (clones share everything).
#[derive(Debug, Clone)]
pub struct LabLink {
    pub(crate) inner: Arc<Inner>,
}

/// A [`LabLink`] that does not keep it alive (what its supervisor's task holds).
#[derive(Debug, Clone)]
pub(crate) struct WeakLabLink(std::sync::Weak<Inner>);

impl WeakLabLink {
    /// The allocator, while any clone of it lives.
    pub(crate) fn upgrade(&self) -> Option<LabLink> {
        self.0.upgrade().map(|inner| LabLink { inner })
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) store: Arc<dyn VmStore>,
    pub(crate) provisioner: Arc<dyn Provisioner>,
    /// The provisioner given to the builder, without the registered machines: what the
    /// flows that compare its inventory with the records list (registered machines are
    /// their records; listing them again would read every record twice).
    pub(crate) launcher: Arc<dyn Provisioner>,
    pub(crate) notifier: Arc<dyn Notifier>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: AllocatorConfig,
    /// The status of the supervisor started on this allocator, if any.
    pub(crate) supervision: std::sync::Mutex<Option<Arc<crate::supervision::Shared>>>,
    /// What the supervisor runs before destroying VMs that may hold a participant's work.
    pub(crate) before_destroy: std::sync::Mutex<Option<Arc<dyn BeforeDestroy>>>,
    /// Participants refused for lack of a free VM (demand for the warm pool).
    pub(crate) turned_away: crate::demand::TurnedAway,
    /// Who may take a VM (see [`Allocator::set_roster`]).
    pub(crate) roster: crate::roster::Roster,
    /// Set while this process's reconcile holds the provisioning lock: an admin's launch or
    /// destroy waits for it instead of answering `Conflict`.
    pub(crate) reconciling: std::sync::atomic::AtomicBool,
}

/// How often a state reaction is retried when another writer changed the record first.
const APPLY_ATTEMPTS: usize = 8;

impl LabLink {
    /// A builder.
    pub fn builder() -> LabLinkBuilder {
        LabLinkBuilder::new()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn VmStore> {
        &self.inner.store
    }

    /// The provisioner: the one given to the builder, with the registered machines beside
    /// it ([`MixedProvisioner`]).
    pub fn provisioner(&self) -> &Arc<dyn Provisioner> {
        &self.inner.provisioner
    }

    /// The notifier.
    pub fn notifier(&self) -> &Arc<dyn Notifier> {
        &self.inner.notifier
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// The settings.
    pub fn config(&self) -> &AllocatorConfig {
        &self.inner.config
    }

    /// A handle that does not keep this allocator alive.
    pub(crate) fn downgrade(&self) -> WeakLabLink {
        WeakLabLink(Arc::downgrade(&self.inner))
    }

    /// Participants refused for lack of a free VM (demand for the warm pool).
    pub(crate) fn turned_away(&self) -> &crate::demand::TurnedAway {
        &self.inner.turned_away
    }

    /// Replaces what the supervisor runs before destroying VMs that may hold a participant's
    /// work (`None`: nothing); takes effect at its next tick.
    pub fn set_before_destroy(&self, hook: Option<Arc<dyn BeforeDestroy>>) {
        *self
            .inner
            .before_destroy
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// What the supervisor runs before destroying VMs that may hold a participant's work.
    pub fn before_destroy(&self) -> Option<Arc<dyn BeforeDestroy>> {
        self.inner
            .before_destroy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies the event `decide` picks for the current record, if any, with an optimistic
    /// generation check, re-reading and deciding again when another writer got there first.
    pub(crate) async fn apply_if(
        &self,
        hostname: &Hostname,
        decide: impl Fn(&VmRecord) -> Option<VmEvent> + Send + Sync,
    ) -> Result<VmRecord> {
        let store = &self.inner.store;
        let mut record = store.get(hostname).await?;
        for _ in 0..APPLY_ATTEMPTS {
            let Some(event) = decide(&record) else {
                return Ok(record);
            };
            let now = self.inner.clock.now();
            match store
                .apply(hostname, &event, Some(record.generation), now)
                .await
            {
                Ok(updated) => return Ok(updated),
                Err(e) if e.is_conflict() => record = store.get(hostname).await?,
                Err(e) => return Err(e),
            }
        }
        Err(Error::conflict("the VM kept changing; try again")
            .with_context("hostname", hostname)
            .temporary())
    }

    /// Wakes waiters of `hostname`. A failed publish only costs latency (waiters re-read on
    /// their timeout), so it is logged, not returned.
    pub(crate) async fn publish(&self, hostname: &Hostname) {
        if let Err(e) = self.inner.notifier.publish(hostname).await {
            tracing::warn!(hostname = %hostname, error = %e, "notify failed; waiters will re-read later");
        }
    }

    /// Waits until `done` holds for `hostname`'s assignment, at most `timeout` (capped by
    /// `max_wait`); the assignment then. Subscribes before it reads, so a change in between
    /// is not missed.
    async fn wait_until(
        &self,
        hostname: &Hostname,
        timeout: Duration,
        done: impl Fn(Option<&Assignment>) -> bool + Send,
    ) -> Result<Option<Assignment>> {
        let deadline = tokio::time::Instant::now() + timeout.min(self.inner.config.max_wait);
        let mut wakes = self.inner.notifier.subscribe(hostname).await?;
        loop {
            let assignment = self.live_vm(hostname).await?.assignment;
            if done(assignment.as_ref()) {
                return Ok(assignment);
            }
            match tokio::time::timeout_at(deadline, wakes.next()).await {
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(Error::new(ErrorKind::Unavailable, "the notifier stopped")
                        .with_context("hostname", hostname))
                }
                Err(_elapsed) => return Ok(assignment),
            }
        }
    }

    /// Ends `hostname`'s assignment as `[allocator] reuse` says (see
    /// [`Allocator::release`]).
    async fn end_assignment(&self, hostname: &Hostname) -> Result<VmRecord> {
        let record = self.inner.store.get(hostname).await?;
        let reuse = self.inner.config.reuse;
        let Some(owner) = record.owner().cloned() else {
            // Nothing to end: the usual transition error says so.
            return self.apply_if(hostname, |_| Some(VmEvent::Release)).await;
        };
        if reuse != Reuse::Keep {
            if let Some(hook) = self.before_destroy() {
                let kept = hook.before_destroy(std::slice::from_ref(&record)).await?;
                if let Some(why) = kept.get(hostname) {
                    return Err(Error::conflict(format!(
                        "the participant's work could not be collected ({why}), so the VM stays assigned; collect again, or destroy it"
                    ))
                    .with_context("hostname", hostname));
                }
            }
        }
        let same_owner = |r: &VmRecord| r.owner() == Some(&owner);
        let record = match reuse {
            // A registered machine is not destroyed: it is reset instead.
            Reuse::Replace if !record.is_registered() => {
                self.destroy_where(std::slice::from_ref(hostname), same_owner)
                    .await?;
                self.inner.store.get(hostname).await?
            }
            Reuse::Keep => {
                self.apply_if(hostname, |r| same_owner(r).then_some(VmEvent::Release))
                    .await?
            }
            Reuse::Reset | Reuse::Replace => {
                self.apply_if(hostname, |r| same_owner(r).then_some(VmEvent::Reset))
                    .await?
            }
        };
        self.publish(hostname).await;
        Ok(record)
    }

    /// Looks up a VM for an agent operation, checking it is not being torn down.
    async fn live_vm(&self, hostname: &Hostname) -> Result<VmRecord> {
        let record = self.inner.store.get(hostname).await?;
        if matches!(record.state, VmState::Terminating | VmState::Terminated) {
            return Err(
                Error::not_found("VM is being destroyed").with_context("hostname", hostname)
            );
        }
        Ok(record)
    }
}

/// The state change an agent report calls for, if any.
fn reaction(record: &VmRecord) -> Option<VmEvent> {
    let live = matches!(
        record.state,
        VmState::Booting | VmState::Available | VmState::Assigned
    );
    let error = record.agent_status == Some(AgentStatus::Error);
    let sick = record.gpu_health == GpuHealth::Unhealthy || error;
    match record.state {
        // An error before the VM was ever ready is its set-up failing (STARTUP_ON_ERROR=fail).
        VmState::Resetting if error => Some(VmEvent::SetupFailed {
            reason: "its reset failed (the agent reported an error while resetting it for the next participant; see the VM's log)".into(),
        }),
        _ if error && record.state.phase() == Some(Phase::Booting) => Some(VmEvent::SetupFailed {
            reason: "its set-up failed (the agent reported an error before the VM was ready; see the VM's log)".into(),
        }),
        _ if live && sick => Some(VmEvent::MarkUnhealthy {
            reason: if record.gpu_health == GpuHealth::Unhealthy {
                "GPU reported unhealthy".into()
            } else {
                "agent reported an error".into()
            },
        }),
        VmState::Unhealthy { .. } if !sick => Some(VmEvent::Recovered),
        VmState::Booting | VmState::Resetting | VmState::Rebooting { .. }
            if record.agent_status == Some(AgentStatus::Running) =>
        {
            Some(VmEvent::AgentReady)
        }
        _ => None,
    }
}

#[async_trait]
impl Allocator for LabLink {
    async fn request_vm(&self, request: &VmRequest) -> Result<Granted> {
        let span = tracing::info_span!("request_vm", email = %request.email, hostname = tracing::field::Empty);
        async {
            if !self
                .inner
                .roster
                .admits(&*self.inner.store, &request.email)
                .await?
            {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    "this email is not on the list of registered participants; use the email you registered with, or ask the organisers",
                ));
            }
            let crd_command = match self.inner.config.desktop_mode {
                DesktopMode::Browser => None,
                DesktopMode::Crd => Some(request.crd_command.clone().ok_or_else(|| {
                    Error::invalid_input("give the Chrome Remote Desktop command")
                })?),
            };
            let claim = ClaimRequest {
                email: request.email.clone(),
                crd_command: crd_command.clone(),
                pin: Pin::generate(self.inner.config.pin_length, &mut rand::thread_rng()),
            };
            let now = self.inner.clock.now();
            let claimed = match self.inner.store.claim(&claim, now).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    if e.kind() == ErrorKind::NoCapacity {
                        self.inner.turned_away.refused(&request.email, now);
                    }
                    return Err(e);
                }
            };
            self.inner.turned_away.served(&request.email);
            let hostname = claimed.record.hostname.clone();
            tracing::Span::current().record("hostname", tracing::field::display(&hostname));
            // A repeated request publishes too: if the first one's notification was lost (the
            // notifier failed, or the claim committed but its answer did not arrive), the
            // participant's retry is what wakes the agent, instead of its long-poll timing out.
            self.publish(&hostname).await;
            let assignment = claimed
                .record
                .assignment
                .ok_or_else(|| Error::internal("a claimed VM has no assignment"))?;
            Ok(Granted {
                hostname,
                // A browser desktop has no one-time code to prove anything with.
                same_code: crd_command.is_some() && assignment.crd_command == crd_command,
                pin: assignment.pin,
                newly_assigned: claimed.newly_assigned,
            })
        }
        .instrument(span)
        .await
    }

    async fn wait_for_assignment(
        &self,
        hostname: &Hostname,
        timeout: Duration,
    ) -> Result<Option<Assignment>> {
        self.wait_until(hostname, timeout, |a| a.is_some()).await
    }

    async fn watch_assignment(
        &self,
        hostname: &Hostname,
        seen: &str,
        timeout: Duration,
    ) -> Result<Option<Assignment>> {
        self.wait_until(hostname, timeout, |a| a.is_none_or(|a| a.version() != seen))
            .await
    }

    async fn authenticate_agent(&self, token: &AgentToken) -> Result<Hostname> {
        let digest = token.digest();
        match self.inner.store.get_by_token(&digest).await {
            Ok(record) if record.token_digest.is_some_and(|d| d.verify(token)) => {
                Ok(record.hostname)
            }
            Ok(_) => Err(Error::new(ErrorKind::Unauthenticated, "invalid token")),
            Err(e) if e.is_not_found() => {
                Err(Error::new(ErrorKind::Unauthenticated, "invalid token"))
            }
            Err(e) => Err(e),
        }
    }

    async fn report(&self, hostname: &Hostname, mut telemetry: Telemetry) -> Result<VmRecord> {
        self.live_vm(hostname).await?;
        telemetry.log_cap_bytes = self.inner.config.log_cap_bytes;
        for append in &mut telemetry.logs {
            append.lines = clean_lines(append.lines.iter().map(String::as_str));
        }
        telemetry.logs.retain(|a| !a.lines.is_empty());
        let now = self.inner.clock.now();
        if let Some(timings) = telemetry.timings.take() {
            // Dropped, not refused: the same batch may carry the status that makes the VM
            // ready, and a VM whose clock jumped must still become ready.
            let (kept, dropped) = timings.plausible(now);
            if !dropped.is_empty() {
                tracing::warn!(%hostname, fields = ?dropped, "implausible start-up timings dropped");
            }
            telemetry.timings = Some(kept);
        }
        let record = self
            .inner
            .store
            .record_telemetry(hostname, &telemetry, now)
            .await?;
        // A report can call for a chain of reactions (recovered, then ready); each step is
        // one transition, so the chain is at most a few long.
        let mut record = record;
        for _ in 0..4 {
            if reaction(&record).is_none() {
                break;
            }
            record = self.apply_if(hostname, reaction).await?;
        }
        Ok(record)
    }

    async fn launch(&self, options: &LaunchOptions) -> Result<Operation> {
        self.start_launch(options).await
    }

    async fn destroy(&self, target: &DestroyTarget) -> Result<Operation> {
        self.start_destroy(target).await
    }

    async fn reboot(&self, hostname: &Hostname) -> Result<Operation> {
        self.start_reboot(hostname).await
    }

    async fn release(&self, hostname: &Hostname) -> Result<VmRecord> {
        self.end_assignment(hostname)
            .instrument(tracing::info_span!("release", hostname = %hostname))
            .await
    }

    async fn change_desktop(
        &self,
        hostname: &Hostname,
        change: &DesktopChange,
    ) -> Result<VmRecord> {
        let event = VmEvent::Desktop(change.clone());
        // A change the session refuses (a command while an attempt runs) is the caller's
        // answer, not a race to retry: decided on the record read, and not applied.
        let refused = std::sync::Mutex::new(None);
        let record = self
            .apply_if(hostname, |r| {
                let mut a = r.assignment.clone()?;
                match a
                    .desktop
                    .apply(change, &mut a.crd_command, self.inner.clock.now())
                {
                    Ok(_) => Some(event.clone()),
                    Err(e) => {
                        *refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        None
                    }
                }
            })
            .await?;
        if let Some(e) = refused.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e.with_context("hostname", hostname));
        }
        if record.assignment.is_none() {
            return Err(
                Error::not_found("this VM has no participant").with_context("hostname", hostname)
            );
        }
        self.publish(hostname).await;
        Ok(record)
    }

    async fn vm(&self, hostname: &Hostname) -> Result<VmRecord> {
        self.inner.store.get(hostname).await
    }

    async fn vms(&self, filter: &VmFilter) -> Result<Vec<VmRecord>> {
        self.inner.store.list(filter).await
    }

    async fn logs(&self, hostname: &Hostname) -> Result<VmLogs> {
        self.inner.store.logs(hostname).await
    }

    async fn counts(&self) -> Result<VmCounts> {
        self.inner.store.counts().await
    }

    async fn operation(&self, id: Uuid) -> Result<Operation> {
        self.inner.store.get_operation(id).await
    }

    async fn operations(&self, limit: usize) -> Result<Vec<Operation>> {
        self.inner.store.list_operations(limit).await
    }

    async fn roster(&self) -> Result<Vec<Email>> {
        self.inner.store.roster().await
    }

    async fn set_roster(&self, emails: &[Email]) -> Result<()> {
        self.inner
            .roster
            .replace(&*self.inner.store, emails)
            .await?;
        tracing::info!(emails = emails.len(), "registered participants replaced");
        Ok(())
    }

    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        self.inner.store.shared_secret(name, candidate).await
    }

    async fn end_admin_session(&self, id: &str, until: DateTime<Utc>) -> Result<()> {
        let now = self.inner.clock.now();
        self.inner.store.end_session(id, until, now).await
    }

    async fn admin_session_ended(&self, id: &str) -> Result<bool> {
        let now = self.inner.clock.now();
        self.inner.store.session_ended(id, now).await
    }

    async fn create_registration_token(
        &self,
        options: &RegistrationTokenOptions,
    ) -> Result<(RegistrationToken, RegistrationSecret)> {
        options.check()?;
        let now = self.inner.clock.now();
        let secret = RegistrationSecret::generate();
        let token = RegistrationToken {
            id: Uuid::new_v4(),
            digest: secret.digest(),
            label: options.label.trim().to_owned(),
            created_at: now,
            expires_at: now + crate::clock::span_of(options.valid_for),
            max_uses: options.max_uses,
            uses: 0,
            revoked_at: None,
        };
        self.inner.store.create_registration_token(&token).await?;
        tracing::info!(id = %token.id, label = %token.label, max_uses = ?token.max_uses, expires_at = %token.expires_at, "registration token created");
        Ok((token, secret))
    }

    async fn registration_tokens(&self) -> Result<Vec<RegistrationToken>> {
        self.inner.store.registration_tokens().await
    }

    async fn revoke_registration_token(&self, id: Uuid) -> Result<RegistrationToken> {
        let now = self.inner.clock.now();
        let token = self.inner.store.revoke_registration_token(id, now).await?;
        tracing::info!(id = %id, "registration token revoked");
        Ok(token)
    }

    async fn register_machine(
        &self,
        secret: &RegistrationSecret,
        request: &MachineRegistration,
    ) -> Result<(Registered, AgentToken)> {
        let span = tracing::info_span!("register", hostname = %request.hostname);
        async {
            request.check()?;
            // `<prefix>-<n>` names are the ones launches number.
            let prefix = format!("{}-", self.inner.config.hostname_prefix);
            if request
                .hostname
                .as_str()
                .strip_prefix(&prefix)
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(Error::invalid_input(format!(
                    "names {prefix}<number> are for the VMs this deployment launches; choose another"
                )));
            }
            let token = AgentToken::generate();
            let now = self.inner.clock.now();
            let registered = self
                .inner
                .store
                .register(&secret.digest(), &request.digested(), token.digest(), now)
                .await?;
            tracing::info!(again = registered.again, "machine registered");
            // Waits under the previous token end; the agent starts again with the new one.
            self.publish(&request.hostname).await;
            Ok((registered, token))
        }
        .instrument(span)
        .await
    }

    async fn record_audit(&self, entry: &AuditEntry) -> Result<()> {
        self.inner.store.append_audit(entry).await
    }

    async fn audit_log(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>> {
        self.inner.store.audit_entries(query).await
    }

    async fn workshop_settings(&self) -> Result<crate::WorkshopSettings> {
        crate::supervisor::settings::current(&*self.inner.store, &self.inner.config.supervisor)
            .await
    }

    async fn set_workshop_settings(
        &self,
        settings: &crate::WorkshopSettings,
        expected_revision: u64,
    ) -> Result<crate::WorkshopSettings> {
        let (store, config) = (&*self.inner.store, &self.inner.config.supervisor);
        let now = self.inner.clock.now();
        crate::supervisor::settings::save(store, config, settings, expected_revision, now).await
    }

    async fn vm_warnings(&self, hostname: &Hostname) -> Result<Vec<crate::VmWarning>> {
        self.inner.store.warnings(hostname).await
    }

    async fn acknowledge_warning(&self, hostname: &Hostname, id: Uuid) -> Result<crate::VmWarning> {
        let now = self.inner.clock.now();
        let warning = self
            .inner
            .store
            .acknowledge_warning(hostname, id, now)
            .await?;
        tracing::info!(hostname = %hostname, warning = %id, kind = %warning.kind, "the agent showed the warning");
        Ok(warning)
    }

    async fn usage(&self) -> Result<crate::FleetUsage> {
        self.inner.store.usage(self.inner.clock.now()).await
    }

    async fn removed_vms(&self) -> Result<Vec<crate::RemovedVm>> {
        self.inner.store.removed_vms().await
    }

    fn supervision(&self) -> Option<crate::SupervisorStatus> {
        LabLink::supervision(self)
    }
}
