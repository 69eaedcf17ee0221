//! What a supervisor reports: its status, counters and the VMs it flags for an admin, and
//! the status cell its loop, its handle and the allocator share.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{Error, Hostname, ReconcileReport};

/// How many recent supervisor events the status keeps.
const RECENT_EVENTS: usize = 50;

/// Why the supervisor points an admin at a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlagKind {
    /// An assigned VM is in trouble; automation leaves it to the admin (reboot or destroy).
    NeedsAdmin,
    /// The ladder used its budget on this VM; it waits for the admin.
    LadderExhausted,
    /// An assigned VM has not been in use for a while and will be released soon.
    IdleWarning,
    /// An automatic destroy (scheduled destruction, idle release) keeps this VM because the
    /// step before it failed (with `destroy_collects_first`: collecting the participant's
    /// work); the admin collects again or destroys it, with `force`, from the admin page.
    DestroyHeld,
    /// This VM's set-up failed (`STARTUP_ON_ERROR=fail`); the warm pool launches no more VMs
    /// while one is left, since each would fail the same way. The admin fixes the image or
    /// the start-up settings and destroys it.
    SetupFailed,
    /// A machine that registered itself is in trouble (silent, unhealthy, not ready): the
    /// supervisor never reboots or replaces one; the admin checks the machine.
    Registered,
}

impl FlagKind {
    /// Lower-case name, for the UI and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NeedsAdmin => "needs_admin",
            Self::LadderExhausted => "ladder_exhausted",
            Self::IdleWarning => "idle_warning",
            Self::DestroyHeld => "destroy_held",
            Self::SetupFailed => "setup_failed",
            Self::Registered => "registered",
        }
    }
}

/// A VM the supervisor wants an admin to look at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFlag {
    /// The VM.
    pub hostname: Hostname,
    /// Why.
    pub kind: FlagKind,
    /// What is wrong and what would happen, in words (never a secret).
    pub message: String,
}

/// What the supervisor has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorCounters {
    /// Ticks run (as leader or not).
    pub ticks: u64,
    /// Times this replica became leader.
    pub became_leader: u64,
    /// Heartbeat leases that expired (VM marked unhealthy).
    pub leases_expired: u64,
    /// Agent restarts seen (boot id changed).
    pub restarts_seen: u64,
    /// Reboots started by the ladder.
    pub ladder_reboots: u64,
    /// VMs replaced by the ladder.
    pub ladder_replacements: u64,
    /// VMs launched by the pool (and for replacements).
    pub pool_launched: u64,
    /// Idle free VMs beyond K destroyed by the pool.
    pub pool_released: u64,
    /// Assigned VMs released for being idle.
    pub idle_released: u64,
    /// Warnings to participants made (scheduled destruction, idle release).
    pub warnings_made: u64,
    /// Reconcile runs.
    pub reconciles: u64,
    /// Steps that failed (each is retried on a later tick).
    pub errors: u64,
}

/// What one supervisor is doing, for the admin UI and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SupervisorStatus {
    /// This supervisor's id (its candidate name for the leader lease).
    pub id: String,
    /// Whether its loops run.
    pub running: bool,
    /// Whether it holds the leader lease (only the leader acts).
    pub leader: bool,
    /// Who holds the lease, as last seen.
    pub leader_holder: Option<String>,
    /// Until when, as last seen.
    pub leader_until: Option<DateTime<Utc>>,
    /// When the last tick ran.
    pub last_tick: Option<DateTime<Utc>>,
    /// K right now (counting schedule windows); `None` when the pool is off.
    pub pool_target: Option<usize>,
    /// Free VMs (available, booting, requested) at the last tick.
    pub pool_free: usize,
    /// The next scheduled destruction (once every time passed: the last one), if any.
    pub destruction_at: Option<DateTime<Utc>>,
    /// Whether the destruction warning is showing (it is near or past).
    pub destruction_warning: bool,
    /// When reconcile last ran.
    pub last_reconcile_at: Option<DateTime<Utc>>,
    /// What it did.
    pub last_reconcile: Option<ReconcileReport>,
    /// VMs an admin should look at.
    pub flags: Vec<VmFlag>,
    /// Counters since start.
    pub counters: SupervisorCounters,
    /// Newest last: `(when, what)`.
    pub recent: VecDeque<(DateTime<Utc>, String)>,
    /// The last step that failed.
    pub last_error: Option<String>,
}

/// The status cell shared by the loop, the handle and the allocator.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) status: Mutex<SupervisorStatus>,
}

impl Shared {
    pub(crate) fn status(&self) -> MutexGuard<'_, SupervisorStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn snapshot(&self) -> SupervisorStatus {
        self.status().clone()
    }

    pub(crate) fn event(&self, now: DateTime<Utc>, what: String) {
        tracing::info!(event = %what, "supervisor");
        let mut s = self.status();
        s.recent.push_back((now, what));
        while s.recent.len() > RECENT_EVENTS {
            s.recent.pop_front();
        }
    }

    pub(crate) fn error(&self, step: &str, e: &Error) {
        tracing::warn!(step, error = %e, "supervisor step failed; retrying next tick");
        let mut s = self.status();
        s.counters.errors += 1;
        s.last_error = Some(format!("{step}: {e}"));
    }
}
