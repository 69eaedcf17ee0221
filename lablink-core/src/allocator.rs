//! The [`Allocator`] trait: everything a host app or the HTTP layer asks of LabLink.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::audit::{AuditEntry, AuditQuery};
use crate::registration::{MachineRegistration, Registered, RegistrationToken};
use crate::secret::{Pin, RegistrationSecret};
use crate::{
    AgentToken, Assignment, CrdCommand, DesktopChange, Email, Error, ErrorKind, Hostname,
    Operation, Result, SupervisorStatus, Telemetry, VmCounts, VmFilter, VmLogs, VmRecord,
};

/// A participant asking for a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRequest {
    /// Who asks.
    pub email: Email,
    /// Their Chrome Remote Desktop command (`None` for a browser desktop).
    pub crd_command: Option<CrdCommand>,
}

/// The VM a participant got.
#[derive(Debug, Clone, PartialEq)]
pub struct Granted {
    /// The VM.
    pub hostname: Hostname,
    /// The PIN for its remote desktop.
    pub pin: Pin,
    /// `false` when the email already held this VM.
    pub newly_assigned: bool,
    /// The request carried the same Chrome Remote Desktop code as the assignment (compared
    /// in constant time): a repeat from whoever pasted that one-time code, such as a double
    /// click or a retry whose first answer was lost.
    pub same_code: bool,
}

/// How many VMs to launch. `Default` is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchOptions {
    /// Number of VMs (at least 1, at most the configured maximum).
    pub count: usize,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        Self { count: 1 }
    }
}

/// A registration token to create. `Default`: valid for a day, any number of machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationTokenOptions {
    /// What the admin calls it (who it was given to, for what).
    pub label: String,
    /// How long it stays valid (one minute to a year).
    pub valid_for: Duration,
    /// How many machines it may register (`None`: any number).
    pub max_uses: Option<u32>,
}

impl Default for RegistrationTokenOptions {
    fn default() -> Self {
        Self {
            label: String::new(),
            valid_for: Duration::from_secs(86_400),
            max_uses: None,
        }
    }
}

impl RegistrationTokenOptions {
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming the first bad
    /// field.
    pub fn check(&self) -> Result<()> {
        const MAX_VALID: Duration = Duration::from_secs(366 * 86_400);
        if !(Duration::from_secs(60)..=MAX_VALID).contains(&self.valid_for) {
            return Err(Error::invalid_input(
                "a registration token is valid for one minute to a year",
            ));
        }
        if self
            .max_uses
            .is_some_and(|n| !(1..=RegistrationToken::MAX_USES).contains(&n))
        {
            return Err(Error::invalid_input(format!(
                "max_uses must be 1–{}",
                RegistrationToken::MAX_USES
            )));
        }
        if self.label.chars().count() > RegistrationToken::MAX_LABEL
            || self.label.chars().any(char::is_control)
        {
            return Err(Error::invalid_input(format!(
                "a label is at most {} characters, without control characters",
                RegistrationToken::MAX_LABEL
            )));
        }
        Ok(())
    }
}

/// Which VMs to destroy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestroyTarget {
    /// Every VM of the deployment.
    All,
    /// These VMs (one or some).
    Hostnames(Vec<Hostname>),
}

/// The operations of LabLink, as a host app or the HTTP layer calls them. The HTTP layer
/// takes an `Arc<dyn Allocator>`, so a host app can wrap the default implementation
/// ([`LabLink`](crate::LabLink)) to add quotas or its own auth.
///
/// # Contract
///
/// - `request_vm` is idempotent per email: the same email gets the same VM and PIN back. No
///   VM goes to two emails. Without a free VM it fails with
///   [`ErrorKind::NoCapacity`](crate::ErrorKind::NoCapacity); for an email missing from a
///   non-empty [`roster`](Self::roster), with
///   [`ErrorKind::PermissionDenied`](crate::ErrorKind::PermissionDenied) (and no VM).
/// - `wait_for_assignment` subscribes before it reads, so an assignment made at any moment is
///   seen; it answers at once when the VM is already assigned and `Ok(None)` when `timeout`
///   (capped by the configured maximum) passes first.
/// - `launch` writes every VM record (state `Requested`) *before* the provisioner is called,
///   so an agent can never register before its record exists; it returns the running
///   [`Operation`], which the provisioning finishes in the background. Only one launch or
///   destroy runs at a time (a second gets [`ErrorKind::Conflict`](crate::ErrorKind::Conflict)).
/// - Agent reports are idempotent; retries are safe.
/// - Bad input gives [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) and changes
///   nothing.
/// - `shared_secret`, `end_admin_session` and `admin_session_ended` are kept in the store
///   ([`VmStore::shared_secret`](crate::VmStore::shared_secret),
///   [`VmStore::end_session`](crate::VmStore::end_session)), so every allocator on one
///   durable store agrees on a secret and sees a session ended by any of them at once.
/// - `record_audit` and `audit_log` are the store's audit trail
///   ([`VmStore::append_audit`](crate::VmStore::append_audit),
///   [`VmStore::audit_entries`](crate::VmStore::audit_entries)): every allocator on one
///   durable store reads the entries any of them recorded.
/// - `workshop_settings` and `set_workshop_settings` are the store's settings
///   ([`VmStore::workshop_settings`](crate::VmStore::workshop_settings)), or the config's
///   while none were saved: a save through any allocator on one durable store is what every
///   supervisor leader acts on from its next tick. A save is checked
///   ([`WorkshopSettings::check`](crate::WorkshopSettings::check): `InvalidInput` naming
///   the field) and optimistic (`Conflict` when the settings changed since
///   `expected_revision`).
/// - `vm_warnings` and `acknowledge_warning` are the store's warnings
///   ([`VmStore::warnings`](crate::VmStore::warnings)), which the supervisor leader makes.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Allocator: Send + Sync + Debug {
    /// Gives the participant a VM (theirs if they have one).
    async fn request_vm(&self, request: &VmRequest) -> Result<Granted>;

    /// Agent side: waits until `hostname` is assigned, at most `timeout`.
    async fn wait_for_assignment(
        &self,
        hostname: &Hostname,
        timeout: Duration,
    ) -> Result<Option<Assignment>>;

    /// The hostname a token belongs to, or
    /// [`ErrorKind::Unauthenticated`](crate::ErrorKind::Unauthenticated).
    async fn authenticate_agent(&self, token: &AgentToken) -> Result<Hostname>;

    /// Applies an agent's report batch (health, in-use, status, heartbeat, timings, logs).
    async fn report(&self, hostname: &Hostname, telemetry: Telemetry) -> Result<VmRecord>;

    /// Starts launching VMs.
    async fn launch(&self, options: &LaunchOptions) -> Result<Operation>;

    /// Starts destroying VMs.
    async fn destroy(&self, target: &DestroyTarget) -> Result<Operation>;

    /// Starts rebooting a VM.
    async fn reboot(&self, hostname: &Hostname) -> Result<Operation>;

    /// Ends the assignment of a VM, as `[allocator] reuse` says: free again as it is
    /// (`keep`), reset by its agent first (`reset`: `Resetting`, after its work was
    /// collected when collection before destroy is on), or destroyed (`replace`). A VM whose
    /// collection failed stays assigned (a conflict error says why).
    async fn release(&self, hostname: &Hostname) -> Result<VmRecord>;

    /// Applies `change` to the desktop of `hostname`'s current assignment (see
    /// [`DesktopSession::apply`](crate::DesktopSession::apply)) and wakes its agent. Not
    /// found when the VM has no assignment.
    async fn change_desktop(&self, hostname: &Hostname, change: &DesktopChange)
        -> Result<VmRecord>;

    /// Agent side: waits until `hostname`'s assignment is no longer the one whose
    /// [`Assignment::version`] is `seen` (a new attempt, a tunnel request, a release or
    /// another assignment), at most `timeout`; the assignment then (`None`: none).
    async fn watch_assignment(
        &self,
        hostname: &Hostname,
        seen: &str,
        timeout: Duration,
    ) -> Result<Option<Assignment>>;

    /// One VM.
    async fn vm(&self, hostname: &Hostname) -> Result<VmRecord>;

    /// VMs matching `filter`.
    async fn vms(&self, filter: &VmFilter) -> Result<Vec<VmRecord>>;

    /// A VM's logs.
    async fn logs(&self, hostname: &Hostname) -> Result<VmLogs>;

    /// Counts by state.
    async fn counts(&self) -> Result<VmCounts>;

    /// One operation.
    async fn operation(&self, id: Uuid) -> Result<Operation>;

    /// The newest operations, newest first.
    async fn operations(&self, limit: usize) -> Result<Vec<Operation>>;

    /// The registered participants' emails (empty: anyone may take a VM).
    async fn roster(&self) -> Result<Vec<Email>>;

    /// Replaces the registered participants' emails: from then on only they may take a VM
    /// (empty: anyone). Kept in the store, so every replica applies it within seconds.
    async fn set_roster(&self, emails: &[Email]) -> Result<()>;

    /// The secret every replica on this store shares as `name`: the stored one, or
    /// `candidate` once stored. Never log it.
    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>>;

    /// Signs admin session `id` out for every replica until `until` (when its credential
    /// expires anyway).
    async fn end_admin_session(&self, id: &str, until: DateTime<Utc>) -> Result<()>;

    /// Whether admin session `id` was signed out (and has not expired since).
    async fn admin_session_ended(&self, id: &str) -> Result<bool>;

    /// Creates a registration token; its secret is returned here only.
    async fn create_registration_token(
        &self,
        options: &RegistrationTokenOptions,
    ) -> Result<(RegistrationToken, RegistrationSecret)>;

    /// Every registration token, newest first.
    async fn registration_tokens(&self) -> Result<Vec<RegistrationToken>>;

    /// Revokes a registration token: it registers no machine from then on (machines it
    /// registered stay).
    async fn revoke_registration_token(&self, id: Uuid) -> Result<RegistrationToken>;

    /// Registers a machine with a registration token: the machine's record and the agent
    /// token it serves with from now on (a new one at every registration; the previous one
    /// stops working).
    async fn register_machine(
        &self,
        secret: &RegistrationSecret,
        request: &MachineRegistration,
    ) -> Result<(Registered, AgentToken)>;

    /// Records an admin action in the audit trail (kept in the store).
    async fn record_audit(&self, entry: &AuditEntry) -> Result<()>;

    /// The audit trail, newest first, as `query` selects it.
    async fn audit_log(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>>;

    /// The workshop settings in force (the warm pool, the destruction schedule).
    async fn workshop_settings(&self) -> Result<crate::WorkshopSettings>;

    /// Saves new workshop settings made from revision `expected_revision` (normalized:
    /// times sorted, to the second); returns them as saved.
    async fn set_workshop_settings(
        &self,
        settings: &crate::WorkshopSettings,
        expected_revision: u64,
    ) -> Result<crate::WorkshopSettings>;

    /// The warnings to the participant of `hostname`, soonest first.
    async fn vm_warnings(&self, hostname: &Hostname) -> Result<Vec<crate::VmWarning>>;

    /// Records that `hostname`'s agent showed warning `id` (it is not sent again).
    async fn acknowledge_warning(&self, hostname: &Hostname, id: Uuid) -> Result<crate::VmWarning>;

    /// The fleet's VM time by kind and instance type until now, removed VMs included
    /// (see [`crate::usage`]).
    async fn usage(&self) -> Result<crate::FleetUsage>;

    /// What is kept of the VMs removed so far, oldest first.
    async fn removed_vms(&self) -> Result<Vec<crate::RemovedVm>>;

    /// What this allocator's supervisor is doing, for the admin UI and `/metrics`; `None`
    /// when none runs. No default: a wrapping allocator forwards it.
    fn supervision(&self) -> Option<SupervisorStatus>;
}

/// Conveniences on top of any [`Allocator`].
#[async_trait]
pub trait AllocatorExt: Allocator {
    /// Waits until operation `id` finishes, polling every 10 ms, at most `timeout`.
    async fn wait_for_operation(&self, id: Uuid, timeout: Duration) -> Result<Operation> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let op = self.operation(id).await?;
            if !op.is_running() {
                return Ok(op);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(
                    Error::new(ErrorKind::Timeout, "the operation is still running")
                        .with_context("operation", id),
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Launches `count` VMs and waits for the operation to finish (at most `timeout`).
    async fn launch_and_wait(&self, count: usize, timeout: Duration) -> Result<Operation> {
        let op = self.launch(&LaunchOptions { count }).await?;
        self.wait_for_operation(op.id, timeout).await
    }
}

impl<T: Allocator + ?Sized> AllocatorExt for T {}
