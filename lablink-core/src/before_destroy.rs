//! [`BeforeDestroy`]: what runs before the supervisor destroys VMs that may hold a
//! participant's work.

use std::collections::BTreeMap;
use std::fmt::Debug;

use async_trait::async_trait;

use crate::{Hostname, Result, VmRecord};

/// A step the supervisor runs before its automatic destroys of VMs that may hold a
/// participant's work: the scheduled destruction at the end of a workshop (every VM) and
/// idle release (an assigned VM). The root package's `lablink::collect::Collector`
/// implements it to collect participants' files first when `destroy_collects_first` is on;
/// install it with [`LabLinkBuilder::with_before_destroy`](crate::LabLinkBuilder::with_before_destroy)
/// or [`LabLink::set_before_destroy`](crate::LabLink::set_before_destroy). (Destroys through
/// the [`Allocator`](crate::Allocator) API collect through the root package's
/// `lablink::collect::CollectingAllocator` instead.)
///
/// The other automatic destroys do not call it, because they only take VMs no participant
/// holds: the warm pool trims free (`Available`) VMs beyond K, and the recovery ladder
/// replaces VMs in trouble that are not assigned (assigned ones are flagged for the admin).
///
/// # Contract
///
/// - `before_destroy` gets the records of the VMs about to be destroyed and answers the ones
///   that must be **kept**, each with why (the supervisor logs it, records an event and
///   flags the VM for the admin; it does not ask about that VM again while it stays leader).
///   Every VM not named may be destroyed.
/// - It may take a while (a collection waits for uploads) but finishes in bounded time; the
///   supervisor renews its leader lease meanwhile.
/// - An error keeps every VM of the call; the supervisor asks again on a later tick.
#[async_trait]
pub trait BeforeDestroy: Send + Sync + Debug {
    /// Prepares `vms` for destruction; the ones to keep, with why (never a secret).
    async fn before_destroy(&self, vms: &[VmRecord]) -> Result<BTreeMap<Hostname, String>>;
}
