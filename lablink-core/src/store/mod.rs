//! The [`VmStore`] trait: durable VM records, the atomic claim, telemetry, operations; and
//! [`MemoryVmStore`], its in-process implementation.

mod memory;

pub use memory::MemoryVmStore;

use std::any::Any;
use std::fmt;
use std::fmt::Debug;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::archive::RemovedVm;
use crate::audit::{AuditEntry, AuditQuery};
use crate::registration::{MachineRegistration, Registered, RegistrationToken};
use crate::secret::{Pin, TokenDigest};
use crate::settings::WorkshopSettings;
use crate::usage::FleetUsage;
use crate::warning::VmWarning;
use crate::{
    CrdCommand, Email, Hostname, Operation, Result, Telemetry, VmEvent, VmLogs, VmRecord, VmState,
};

/// Which records [`VmStore::list`] returns. `Default` lists every record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmFilter {
    /// Only records in one of these state kinds (the `resume` phase of `Unhealthy` /
    /// `Rebooting` is ignored when matching). Empty: any state.
    pub states: Vec<VmState>,
    /// Only the record assigned to this email.
    pub email: Option<Email>,
    /// At most this many records, in hostname order.
    pub limit: Option<usize>,
}

impl VmFilter {
    /// Whether `record` passes the filter (ignoring `limit`).
    pub fn matches(&self, record: &VmRecord) -> bool {
        (self.states.is_empty()
            || self
                .states
                .iter()
                .any(|s| s.as_str() == record.state.as_str()))
            && self
                .email
                .as_ref()
                .is_none_or(|e| record.owner() == Some(e))
    }
}

/// A participant asking for a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimRequest {
    /// Who asks.
    pub email: Email,
    /// Their Chrome Remote Desktop command (`None` for a browser desktop).
    pub crd_command: Option<CrdCommand>,
    /// The PIN to record if a new VM is assigned (ignored when the email already has one).
    pub pin: Pin,
}

/// The result of a successful [`VmStore::claim`].
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    /// The VM, now owned by the email.
    pub record: VmRecord,
    /// `false` when the email already held this VM (idempotent rejoin).
    pub newly_assigned: bool,
}

/// How many VMs are in each state kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = CountsView))]
pub struct VmCounts {
    /// Every record.
    pub total: usize,
    /// `Requested`.
    pub requested: usize,
    /// `Booting`, or `Resetting` (on its way to free again).
    pub booting: usize,
    /// `Available` (includes ones whose GPU is unhealthy; see `assignable`).
    pub available: usize,
    /// Assignable right now: available, GPU not unhealthy, unassigned.
    pub assignable: usize,
    /// Owned by a participant (`Assigned`, or unhealthy/rebooting resuming assigned).
    pub assigned: usize,
    /// `Unhealthy`.
    pub unhealthy: usize,
    /// `Rebooting`.
    pub rebooting: usize,
    /// `Failed`.
    pub failed: usize,
    /// `Terminating` or `Terminated`.
    pub terminating: usize,
}

impl VmCounts {
    /// Adds one record to the counts.
    pub fn add(&mut self, r: &VmRecord) {
        self.total += 1;
        match r.state {
            VmState::Requested => self.requested += 1,
            VmState::Booting | VmState::Resetting => self.booting += 1,
            VmState::Available => self.available += 1,
            VmState::Assigned => {}
            VmState::Unhealthy { .. } => self.unhealthy += 1,
            VmState::Rebooting { .. } => self.rebooting += 1,
            VmState::Failed => self.failed += 1,
            VmState::Terminating | VmState::Terminated => self.terminating += 1,
        }
        self.assignable += usize::from(r.is_assignable());
        self.assigned += usize::from(r.state.is_owned());
    }
}

/// Who holds the supervisor leader lease and until when (see [`VmStore::try_lead`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderLease {
    /// The candidate holding it (a replica's supervisor id).
    pub holder: String,
    /// When it ends unless renewed.
    pub expires_at: DateTime<Utc>,
}

/// Held while a provisioning operation runs; dropping it lets the next one start.
pub struct ProvisioningLock {
    _guard: Box<dyn Any + Send + Sync>,
}

impl ProvisioningLock {
    /// Wraps whatever keeps the lock held (a mutex guard, a database connection...).
    pub fn new(guard: impl Any + Send + Sync) -> Self {
        Self {
            _guard: Box::new(guard),
        }
    }
}

impl fmt::Debug for ProvisioningLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProvisioningLock")
    }
}

/// How many removed VMs [`MemoryVmStore`] remembers (a store for demos and tests).
pub const MEMORY_REMOVED_CAP: usize = 100_000;

/// Durable VM records.
///
/// # Contract
///
/// The conformance suite [`testing::store`](crate::testing) checks every point.
///
/// - `insert` is idempotent by hostname: an existing record is left unchanged and returned.
/// - `get`, `apply`, `record_telemetry`, `logs` on an unknown hostname return
///   [`ErrorKind::NotFound`](crate::ErrorKind::NotFound).
/// - Every state change goes through [`VmRecord::apply`] (and so through
///   [`transition`](crate::state::transition)); an illegal event returns
///   [`ErrorKind::InvalidTransition`](crate::ErrorKind::InvalidTransition) and changes
///   nothing. With `expected_generation`, a record whose generation differs is not changed
///   and the call returns [`ErrorKind::Conflict`](crate::ErrorKind::Conflict).
/// - `generation` strictly increases on every change to a record and never otherwise.
/// - `claim` is atomic and exactly-once under any concurrency (across processes for durable
///   stores): an email that owns a VM gets that VM back (`newly_assigned: false`); otherwise
///   one [assignable](VmRecord::is_assignable) VM becomes `Assigned` to it; otherwise
///   [`ErrorKind::NoCapacity`](crate::ErrorKind::NoCapacity). No VM ever has two owners and
///   no email ever owns two VMs.
/// - `record_telemetry` applies [`VmRecord::apply_telemetry`] and appends logs; each log
///   stream keeps at most `log_cap_bytes`, dropping the oldest lines.
/// - `lock_provisioning` gives at most one holder at a time (across processes for durable
///   stores); a second caller gets [`ErrorKind::Conflict`](crate::ErrorKind::Conflict).
/// - `try_lead` is atomic (across processes for durable stores): it gives the lease to
///   `candidate` until `until` when nobody holds it, `candidate` already holds it, or the
///   holder's lease ended at or before `now`; otherwise it changes nothing. Either way it
///   returns the lease as it now stands. `resign` ends the lease only if `candidate` holds it.
/// - `replace_roster` replaces the whole list atomically (duplicates count once); `roster`
///   returns it sorted (across processes for durable stores).
/// - `shared_secret` is insert-if-absent and atomic (across processes for durable stores):
///   the first `candidate` stored under a name is what every call with that name returns,
///   whatever it passes, so replicas starting together agree on one secret. Stores never log
///   or show a secret (nor `Debug`-print one).
/// - `end_session` marks a session id ended until `until` (a repeat keeps the later time)
///   and forgets every session whose `until` is at or before `now`; `session_ended` is true
///   while a session is marked and `now < until` (across processes for durable stores).
/// - `register` is atomic (across processes for durable stores) and decides with
///   [`registration::decide`](crate::registration::decide): an unknown, revoked, expired or
///   (for a new machine) used-up token is
///   [`ErrorKind::Unauthenticated`](crate::ErrorKind::Unauthenticated); a name held by a VM
///   or another machine, or an identity registered under another name, is
///   [`ErrorKind::Conflict`](crate::ErrorKind::Conflict); either way nothing changes. A new
///   machine gets [`MachineRegistration::record`] and counts one use of the token, which
///   never goes past `max_uses` under any concurrency; a machine registering again keeps its
///   record ([`registration::renewed`](crate::registration::renewed)) and counts no use.
/// - `append_audit` keeps an entry as given (across processes for durable stores); an entry
///   whose id is held already changes nothing, so a retried append is recorded once.
///   `audit_entries` returns the newest `limit` entries older than the entry `before` (all
///   when `None`; none when the store does not hold that id), newest first: by `at`, and
///   entries with the same `at` in the reverse order of appending, so paging with the last
///   id of each page gives every entry exactly once. A store may drop the oldest entries
///   past a documented bound ([`MemoryVmStore`] keeps the newest
///   [`MEMORY_AUDIT_CAP`](crate::audit::MEMORY_AUDIT_CAP)).
/// - Every record's [`usage`](VmRecord::usage) is kept as the record computes it, except
///   that a claim may account the VM's free time itself, exactly as
///   [`VmRecord::apply`] would. `usage` sums every record's time up to `now`
///   ([`VmRecord::usage_at`]) and, for every VM removed before, its time as accounted at
///   its last change (a terminated VM's whole time), by instance type.
/// - `remove` keeps a [`RemovedVm`] of every record it removes, in the same step;
///   `removed_vms` returns them oldest first. [`MemoryVmStore`] keeps the newest
///   [`MEMORY_REMOVED_CAP`] (its `usage` still counts every removed VM).
/// - `workshop_settings` is `None` until settings are first put. `put_workshop_settings` is
///   atomic (across processes for durable stores): when the stored revision (0 when none
///   is stored) is `expected_revision` it stores the settings as given with revision
///   `expected_revision + 1` and returns them as stored; otherwise it changes nothing and
///   fails with [`ErrorKind::Conflict`](crate::ErrorKind::Conflict). Durations are kept to
///   the millisecond, times to the microsecond.
/// - `put_warning` keeps at most one warning per VM, kind and due time (across processes
///   for durable stores): it stores the warning unless one with the same three is stored,
///   and returns the stored one either way; for an unknown hostname it fails with
///   [`ErrorKind::NotFound`](crate::ErrorKind::NotFound). `warnings` (one VM's) and
///   `all_warnings` list warnings by hostname, then due time, then kind.
///   `acknowledge_warning` records when the VM's agent showed a warning (a repeat keeps
///   the first time), `NotFound` for a warning that VM does not have. `remove_warnings`
///   removes warnings by id (unknown ids are ignored); `remove` removes a VM's warnings
///   with it.
/// - Stores never read a clock: callers pass `now`.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait VmStore: Send + Sync + Debug {
    /// Inserts records whose hostname is new; returns the stored record for every input, in
    /// input order.
    async fn insert(&self, records: &[VmRecord]) -> Result<Vec<VmRecord>>;

    /// The record of `hostname`.
    async fn get(&self, hostname: &Hostname) -> Result<VmRecord>;

    /// The record whose token digest is `digest`.
    async fn get_by_token(&self, digest: &TokenDigest) -> Result<VmRecord>;

    /// Records matching `filter`, in hostname order.
    async fn list(&self, filter: &VmFilter) -> Result<Vec<VmRecord>>;

    /// Counts by state.
    async fn counts(&self) -> Result<VmCounts>;

    /// Applies `event` to `hostname` through the state machine.
    async fn apply(
        &self,
        hostname: &Hostname,
        event: &VmEvent,
        expected_generation: Option<u64>,
        now: DateTime<Utc>,
    ) -> Result<VmRecord>;

    /// Gives `request.email` its VM, or one assignable VM, or `NoCapacity`.
    async fn claim(&self, request: &ClaimRequest, now: DateTime<Utc>) -> Result<Claimed>;

    /// Applies an agent's telemetry batch.
    async fn record_telemetry(
        &self,
        hostname: &Hostname,
        telemetry: &Telemetry,
        now: DateTime<Utc>,
    ) -> Result<VmRecord>;

    /// The VM's logs.
    async fn logs(&self, hostname: &Hostname) -> Result<VmLogs>;

    /// Removes records (and their logs); unknown hostnames are ignored. Returns how many went.
    async fn remove(&self, hostnames: &[Hostname]) -> Result<usize>;

    /// Inserts or replaces an operation (by id).
    async fn put_operation(&self, operation: &Operation) -> Result<()>;

    /// The operation `id`.
    async fn get_operation(&self, id: Uuid) -> Result<Operation>;

    /// The newest `limit` operations, newest first.
    async fn list_operations(&self, limit: usize) -> Result<Vec<Operation>>;

    /// Takes the deployment-wide provisioning lock, or fails with `Conflict` if it is held.
    async fn lock_provisioning(&self) -> Result<ProvisioningLock>;

    /// Takes or renews the supervisor leader lease for `candidate` until `until`, if it is
    /// free, already `candidate`'s, or expired at `now`. Returns the lease as it stands.
    async fn try_lead(
        &self,
        candidate: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<LeaderLease>;

    /// Gives the leader lease up, if `candidate` holds it.
    async fn resign(&self, candidate: &str) -> Result<()>;

    /// The registered participants' emails, in order (empty: no list is stored).
    async fn roster(&self) -> Result<Vec<Email>>;

    /// Replaces the registered participants' emails as a whole (empty: no list).
    async fn replace_roster(&self, emails: &[Email]) -> Result<()>;

    /// The secret stored as `name`, storing `candidate` first when there is none.
    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>>;

    /// Marks session `id` ended until `until` (when its credential expires anyway), and
    /// forgets the sessions whose `until` is at or before `now`.
    async fn end_session(&self, id: &str, until: DateTime<Utc>, now: DateTime<Utc>) -> Result<()>;

    /// Whether session `id` is marked ended at `now`.
    async fn session_ended(&self, id: &str, now: DateTime<Utc>) -> Result<bool>;

    /// Stores a new registration token.
    async fn create_registration_token(&self, token: &RegistrationToken) -> Result<()>;

    /// Every registration token, newest first.
    async fn registration_tokens(&self) -> Result<Vec<RegistrationToken>>;

    /// Revokes registration token `id` at `now` (revoking again keeps the first time);
    /// returns it.
    async fn revoke_registration_token(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<RegistrationToken>;

    /// Registers a machine with the registration token whose digest is `token`, giving it
    /// the agent token whose digest is `agent_token`.
    async fn register(
        &self,
        token: &TokenDigest,
        request: &MachineRegistration,
        agent_token: TokenDigest,
        now: DateTime<Utc>,
    ) -> Result<Registered>;

    /// Appends an entry to the audit trail (an id held already changes nothing).
    async fn append_audit(&self, entry: &AuditEntry) -> Result<()>;

    /// Audit entries, newest first, as `query` selects them.
    async fn audit_entries(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>>;

    /// The workshop settings an admin saved last, if any.
    async fn workshop_settings(&self) -> Result<Option<WorkshopSettings>>;

    /// Stores `settings` as revision `expected_revision + 1` if the stored revision is
    /// `expected_revision`, else `Conflict`.
    async fn put_workshop_settings(
        &self,
        settings: &WorkshopSettings,
        expected_revision: u64,
    ) -> Result<WorkshopSettings>;

    /// Stores `warning` unless its VM has one of its kind and due time; the stored one.
    async fn put_warning(&self, warning: &VmWarning) -> Result<VmWarning>;

    /// The warnings of `hostname`.
    async fn warnings(&self, hostname: &Hostname) -> Result<Vec<VmWarning>>;

    /// The warnings of every VM.
    async fn all_warnings(&self) -> Result<Vec<VmWarning>>;

    /// Records that `hostname`'s agent showed warning `id` at `now`; the warning.
    async fn acknowledge_warning(
        &self,
        hostname: &Hostname,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<VmWarning>;

    /// Removes warnings by id; how many went.
    async fn remove_warnings(&self, ids: &[Uuid]) -> Result<usize>;

    /// The VMs removed so far (what [`RemovedVm`] keeps), oldest first.
    async fn removed_vms(&self) -> Result<Vec<RemovedVm>>;

    /// The fleet's VM time by kind and instance type up to `now`, removed VMs included.
    async fn usage(&self, now: DateTime<Utc>) -> Result<FleetUsage>;
}
