//! [`LabLink::reconcile`]: the repairs of the table in the [module docs](super).

use std::collections::HashMap;

use super::{OrphanPolicy, ReconcileReport};
use crate::{
    Error, ErrorKind, Hostname, LabLink, ProvisionedVm, Result, VmEvent, VmFilter, VmRecord,
    VmState,
};

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
        // Registered machines are their records: nothing to compare them with (one that
        // registers between the two reads must not look lost). The builder's provisioner may
        // be a `ManualProvisioner` itself.
        let mut machines = self.inner.launcher.list().await?;
        machines.retain(|m| !crate::ManualProvisioner::owns(m));
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
            // A machine belongs to a record by hostname, and by instance id once it knows one;
            // a failed record's hostname takes any machine (see `step_for`).
            let machine = match unclaimed.get(&record.hostname) {
                Some(m)
                    if record.state == VmState::Failed
                        || record
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
                    // A hostname recorded meanwhile keeps its record: that machine is not
                    // adopted, and the next reconcile looks at it again.
                    Ok(stored) => {
                        for (machine, record) in orphans.into_iter().zip(stored) {
                            if record.instance_id.as_ref() == Some(&machine.instance_id) {
                                report.adopted.push(machine.hostname);
                            } else {
                                report.errors.push(format!(
                                    "{}: the provider has machine {} under this name, but its record names {}",
                                    machine.hostname,
                                    machine.instance_id,
                                    record
                                        .instance_id
                                        .as_ref()
                                        .map_or("no machine".to_owned(), |id| id.to_string())
                                ));
                            }
                        }
                    }
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
        // Only an unfinished unregistration of a registered machine needs a repair.
        (VmState::Terminating | VmState::Terminated, None) if record.is_registered() => {
            Some(Step::FinishDestroy(None))
        }
        _ if record.is_registered() => None,
        (VmState::Requested, Some(m)) => Some(Step::Attach(m)),
        (VmState::Requested, None) => Some(Step::FailNeverCreated),
        (VmState::Terminating | VmState::Terminated, m) => Some(Step::FinishDestroy(m)),
        // Nobody can use it: a failed VM is never handed out and never becomes ready again.
        // Its own machine (same instance id) stays for the admin to inspect; another one
        // under its name (one the provider replaced) is terminated.
        (VmState::Failed, Some(m)) if record.instance_id.as_ref() != Some(&m.instance_id) => {
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
