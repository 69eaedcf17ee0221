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
//! | `Failed`, instance known       | left for the admin to inspect      | nothing to do                  |
//! | `Terminating` (destroy cut short) | machine destroyed, record removed | record removed               |
//! | none                           | orphan: adopted or terminated ([`OrphanPolicy`]) | —                |
//!
//! Every rule leads to a state the next reconcile leaves alone, so repeated runs converge:
//! afterwards every machine has a record and every live record has a machine.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{
    Error, ErrorKind, Hostname, LabLink, ProvisionedVm, Result, VmEvent, VmFilter, VmRecord,
    VmState,
};

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

/// What one [`LabLink::reconcile`] found and did.
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

/// What to do about one record.
enum Step {
    Attach(ProvisionedVm),
    FailNeverCreated,
    FailLost,
    TerminateMachine(ProvisionedVm),
    FinishDestroy(Option<ProvisionedVm>),
}

impl LabLink {
    /// Compares the provider's inventory with the store and repairs the difference (see the
    /// table in this module's docs). Holds the provisioning lock while it works, so it never
    /// mistakes a running launch for a crashed one; while another launch or destroy runs it
    /// fails with a temporary [`ErrorKind::Conflict`]. A provisioner that cannot list its
    /// machines gives [`ErrorKind::InvalidConfig`].
    ///
    /// Steps that fail are listed in [`ReconcileReport::errors`] and do not stop the others.
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        let provisioner = &self.inner.provisioner;
        if !provisioner.capabilities().list {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "this provisioner cannot list its machines, so it cannot be reconciled",
            )
            .with_operation("reconcile"));
        }
        // Marked from before the lock is taken until after it is released (locals drop in
        // reverse order), so an admin's launch never sees the lock held and the mark absent.
        let _reconciling = Reconciling::mark(&self.inner.reconciling);
        let _lock = self
            .inner
            .store
            .lock_provisioning()
            .await
            .map_err(|e| match e.kind() {
                ErrorKind::Conflict => {
                    Error::conflict("a launch or destroy is running; reconcile after it finishes")
                        .with_operation("reconcile")
                        .temporary()
                }
                _ => e,
            })?;
        let machines = provisioner.list().await?;
        let records = self.inner.store.list(&VmFilter::default()).await?;
        let mut report = ReconcileReport {
            machines: machines.len(),
            records: records.len(),
            ..Default::default()
        };
        let mut unclaimed: HashMap<Hostname, ProvisionedVm> = machines
            .into_iter()
            .map(|m| (m.hostname.clone(), m))
            .collect();

        let mut steps = Vec::new();
        for record in &records {
            // A machine belongs to a record by hostname, and by instance id once it knows one.
            let machine = match unclaimed.get(&record.hostname) {
                Some(m)
                    if record
                        .instance_id
                        .as_ref()
                        .is_none_or(|id| *id == m.instance_id) =>
                {
                    unclaimed.remove(&record.hostname)
                }
                _ => None,
            };
            if let Some(step) = step_for(record, machine) {
                steps.push((record.hostname.clone(), step));
            }
        }

        for (hostname, step) in steps {
            if let Err(e) = self.take_step(&hostname, step, &mut report).await {
                tracing::warn!(hostname = %hostname, error = %e, "reconcile step failed");
                report.errors.push(format!("{hostname}: {e}"));
            }
        }
        let orphans: Vec<ProvisionedVm> = unclaimed.into_values().collect();
        if !orphans.is_empty() {
            self.handle_orphans(orphans, &mut report).await;
        }
        for list in [
            &mut report.attached,
            &mut report.adopted,
            &mut report.terminated,
            &mut report.failed,
            &mut report.removed,
        ] {
            list.sort();
        }
        if report.changed_anything() || !report.errors.is_empty() {
            tracing::info!(
                attached = report.attached.len(),
                adopted = report.adopted.len(),
                terminated = report.terminated.len(),
                failed = report.failed.len(),
                removed = report.removed.len(),
                errors = report.errors.len(),
                "reconciled"
            );
        }
        Ok(report)
    }

    async fn take_step(
        &self,
        hostname: &Hostname,
        step: Step,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        match step {
            Step::Attach(machine) => {
                self.record_provisioned(&machine).await?;
                report.attached.push(hostname.clone());
            }
            Step::FailNeverCreated => {
                let reason = "the launch was interrupted before the provider created the machine";
                self.apply_if(hostname, |r| {
                    (r.state == VmState::Requested).then(|| VmEvent::ProvisionFailed {
                        reason: reason.into(),
                    })
                })
                .await?;
                report.failed.push(hostname.clone());
            }
            Step::FailLost => {
                let reason = "the provider no longer has this machine";
                self.apply_if(hostname, |r| {
                    lost_applies(r.state).then(|| VmEvent::InstanceLost {
                        reason: reason.into(),
                    })
                })
                .await?;
                // A waiting agent (if any) learns its VM is gone.
                self.publish(hostname).await;
                report.failed.push(hostname.clone());
            }
            Step::TerminateMachine(machine) => {
                self.inner
                    .provisioner
                    .destroy(std::slice::from_ref(&machine))
                    .await?;
                report.terminated.push(hostname.clone());
            }
            Step::FinishDestroy(machine) => {
                if let Some(machine) = machine {
                    self.inner
                        .provisioner
                        .destroy(std::slice::from_ref(&machine))
                        .await?;
                }
                self.apply_if(hostname, |r| {
                    (r.state == VmState::Terminating).then_some(VmEvent::Terminated)
                })
                .await?;
                self.inner
                    .store
                    .remove(std::slice::from_ref(hostname))
                    .await?;
                report.removed.push(hostname.clone());
            }
        }
        Ok(())
    }

    async fn handle_orphans(&self, orphans: Vec<ProvisionedVm>, report: &mut ReconcileReport) {
        let policy = self.inner.config.orphan_policy;
        tracing::warn!(
            count = orphans.len(),
            policy = policy.as_str(),
            "machines without a record"
        );
        match policy {
            OrphanPolicy::Terminate => match self.inner.provisioner.destroy(&orphans).await {
                Ok(()) => report
                    .terminated
                    .extend(orphans.into_iter().map(|m| m.hostname)),
                Err(e) => report
                    .errors
                    .push(format!("destroying {} orphan machines: {e}", orphans.len())),
            },
            OrphanPolicy::Adopt => {
                let now = self.inner.clock.now();
                let records: Vec<VmRecord> = orphans
                    .iter()
                    .map(|m| {
                        let mut r = VmRecord::new(m.hostname.clone(), None, now);
                        r.instance_id = Some(m.instance_id.clone());
                        r.address.clone_from(&m.address);
                        r.state = VmState::Failed;
                        r.last_error = Some(
                            "adopted by reconcile: the provider has this machine but the store \
                             had no record, so its agent cannot authenticate; destroy it"
                                .into(),
                        );
                        r
                    })
                    .collect();
                match self.inner.store.insert(&records).await {
                    Ok(_) => report
                        .adopted
                        .extend(orphans.into_iter().map(|m| m.hostname)),
                    Err(e) => report
                        .errors
                        .push(format!("recording {} orphan machines: {e}", orphans.len())),
                }
            }
        }
    }
}

/// Whether [`VmEvent::InstanceLost`] applies to a record in `state`.
fn lost_applies(state: VmState) -> bool {
    matches!(
        state,
        VmState::Booting
            | VmState::Available
            | VmState::Assigned
            | VmState::Unhealthy { .. }
            | VmState::Rebooting { .. }
    )
}

/// The repair a record needs, given the machine that belongs to it (if any).
fn step_for(record: &VmRecord, machine: Option<ProvisionedVm>) -> Option<Step> {
    match (record.state, machine) {
        (VmState::Requested, Some(m)) => Some(Step::Attach(m)),
        (VmState::Requested, None) => Some(Step::FailNeverCreated),
        (VmState::Terminating | VmState::Terminated, m) => Some(Step::FinishDestroy(m)),
        (VmState::Failed, Some(m)) if record.instance_id.is_none() => {
            Some(Step::TerminateMachine(m))
        }
        (state, None) if lost_applies(state) => Some(Step::FailLost),
        _ => None,
    }
}

/// Marks this process's reconcile as holding the provisioning lock until dropped.
struct Reconciling<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> Reconciling<'a> {
    fn mark(flag: &'a std::sync::atomic::AtomicBool) -> Self {
        flag.store(true, std::sync::atomic::Ordering::Release);
        Self(flag)
    }
}

impl Drop for Reconciling<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}
