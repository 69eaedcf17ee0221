//! Reconcile: make the store and the provider's inventory agree again after a crash, a lost
//! store or a machine that vanished.
//!
//! Records are written *before* the provider is called (see `operation/flows.rs`), so every
//! machine a launch creates has a record with its hostname and the digest of the token the
//! machine received. Reconcile therefore matches machines to records by hostname (and by
//! instance id once a record knows it):
//!
//! | record                         | machine exists                     | machine missing                |
//! |--------------------------------|------------------------------------|--------------------------------|
//! | `Requested` (launch cut short) | attached: `Provisioned`            | `Failed` (never created)       |
//! | live (booting … rebooting)     | nothing to do                      | `Failed` (instance lost)       |
//! | `Failed`, instance unknown     | machine terminated (nobody can use it) | nothing to do              |
//! | `Failed`, instance known       | left for the admin to inspect (another machine under its name is terminated) | nothing to do |
//! | `Terminating` (destroy cut short) | machine destroyed, record removed | record removed               |
//! | none                           | orphan: adopted or terminated ([`OrphanPolicy`]) | —                |
//!
//! Every rule leads to a state the next reconcile leaves alone, so repeated runs converge:
//! afterwards every machine has a record and every live record has a machine.

mod run;

use serde::{Deserialize, Serialize};

use crate::Hostname;

/// What reconcile does with a machine the provider has but the store has no record of.
///
/// Such a machine received an agent token at launch that nobody knows any more (the store
/// kept only its digest, and the record is gone), so its agent can never authenticate and the
/// machine can never be handed to a participant. "Adopting" it therefore means recording it,
/// not using it: it gets a `Failed` record carrying its instance id, so it shows in the admin
/// UI and counts, and the admin's destroy (or scheduled destruction) removes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrphanPolicy {
    /// Record it as `Failed` (visible, destroyable, never assigned). The default: an
    /// unrecorded machine usually means the store was lost (an in-memory store restarted)
    /// or is shared by mistake, and destroying machines is the one action that cannot be
    /// undone.
    #[default]
    Adopt,
    /// Destroy it at once. For durable stores, where an unrecorded machine can only be a
    /// leak.
    Terminate,
}

impl OrphanPolicy {
    /// Lower-case name, as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Adopt => "adopt",
            Self::Terminate => "terminate",
        }
    }
}

/// What one [`LabLink::reconcile`](crate::LabLink::reconcile) found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// Machines the provider listed.
    pub machines: usize,
    /// Records the store held.
    pub records: usize,
    /// `Requested` records of an interrupted launch whose machine exists: now provisioned.
    pub attached: Vec<Hostname>,
    /// Machines without a record, recorded as `Failed` ([`OrphanPolicy::Adopt`]).
    pub adopted: Vec<Hostname>,
    /// Machines destroyed: orphans under [`OrphanPolicy::Terminate`], and machines of
    /// `Failed` records that never learned their instance id.
    pub terminated: Vec<Hostname>,
    /// Records whose machine is gone (or was never created): now `Failed`.
    pub failed: Vec<Hostname>,
    /// Records of an interrupted destroy, finished and removed.
    pub removed: Vec<Hostname>,
    /// Steps that could not be done (each is retried by the next reconcile).
    pub errors: Vec<String>,
}

impl ReconcileReport {
    /// Whether reconcile changed anything.
    pub fn changed_anything(&self) -> bool {
        !(self.attached.is_empty()
            && self.adopted.is_empty()
            && self.terminated.is_empty()
            && self.failed.is_empty()
            && self.removed.is_empty())
    }
}
