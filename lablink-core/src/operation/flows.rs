//! The provisioning flows of [`LabLink`]: launch, destroy and reboot, each recorded as an
//! [`Operation`] and finished in a background task.
//!
//! Launch writes every VM record *before* the provisioner is called, so an agent that
//! registers early always finds its record (an upstream bug answered 404 for every launched
//! VM). Launch and destroy hold the store's provisioning lock, so only one runs at a time per
//! deployment, across replicas for shared stores.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::Instrument;

use crate::store::ProvisioningLock;
use crate::{
    AgentStatus, AgentToken, DestroyTarget, Error, ErrorKind, Hostname, LabLink, LaunchOptions,
    LaunchRequest, Operation, OperationKind, Progress, ProvisionedVm, Result, StartupTimings,
    Telemetry, VmEvent, VmFilter, VmRecord, VmSpec, VmState,
};

/// How many recent operations are scanned for hostnames already used (a bound every store
/// can serve; far more than a deployment launches).
const OPERATIONS_SCANNED_FOR_NAMES: usize = 100_000;

/// How long a launch or destroy waits for this process's reconcile to finish.
const LOCK_PATIENCE: Duration = Duration::from_secs(20);

impl LabLink {
    /// The provisioning lock for an admin's launch or destroy. This process's periodic
    /// reconcile holds it for a moment while it lists the machines; that is waited for (up
    /// to [`LOCK_PATIENCE`]) rather than failing an admin's click because a background check
    /// happened to run. Another launch or destroy is a `Conflict` at once, so a double click
    /// never launches twice.
    async fn lock_provisioning_patiently(&self) -> Result<ProvisioningLock> {
        let deadline = tokio::time::Instant::now() + LOCK_PATIENCE;
        loop {
            match self.inner.store.lock_provisioning().await {
                Err(e)
                    if e.is_conflict()
                        && self.inner.reconciling.load(Ordering::Acquire)
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    pub(crate) async fn start_launch(&self, options: &LaunchOptions) -> Result<Operation> {
        if !self.inner.provisioner.capabilities().launch {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "this deployment launches no VMs: its machines join by registering (lablink-agent register)",
            )
            .with_operation("launch"));
        }
        let max = self.inner.config.max_launch;
        if options.count == 0 || options.count > max {
            return Err(Error::invalid_input(format!(
                "the number of VMs to launch must be between 1 and {max}"
            ))
            .with_operation("launch"));
        }
        let lock = self.lock_provisioning_patiently().await?;
        let now = self.inner.clock.now();
        let specs = self.new_specs(options.count).await?;
        let records: Vec<VmRecord> = specs
            .iter()
            .map(|spec| {
                let mut r = VmRecord::new(spec.hostname.clone(), Some(spec.token.digest()), now);
                r.timings.provision_start = Some(now);
                r
            })
            .collect();
        self.inner.store.insert(&records).await?;
        let hostnames = specs.iter().map(|s| s.hostname.clone()).collect();
        let operation = Operation::start(OperationKind::Launch, hostnames, now);
        self.inner.store.put_operation(&operation).await?;
        tracing::info!(operation = %operation.id, count = specs.len(), "launch started");

        let this = self.clone();
        let op = operation.clone();
        let span = tracing::info_span!("launch", operation = %operation.id);
        tokio::spawn(
            async move {
                let _lock = lock;
                let request = |progress| LaunchRequest {
                    vms: specs.clone(),
                    progress,
                };
                let result = this
                    .with_progress(op, |progress| {
                        let provisioner = this.inner.provisioner.clone();
                        let request = request(progress);
                        async move { provisioner.launch(&request).await }
                    })
                    .await;
                this.finish_launch(result, &specs).await;
            }
            .instrument(span),
        );
        Ok(operation)
    }

    /// `count` new hostnames with fresh tokens, `<prefix>-<n>` numbered after the highest
    /// name in use, ever launched (recorded operations) or known to the provider, so a
    /// destroyed VM's name is not reused while its machine may still be shutting down, and a
    /// wiped store does not hand out names of machines that still run.
    async fn new_specs(&self, count: usize) -> Result<Vec<VmSpec>> {
        let store = &self.inner.store;
        let records = store.list(&VmFilter::default()).await?;
        let operations = store.list_operations(OPERATIONS_SCANNED_FOR_NAMES).await?;
        // The inventory only guards names; if it cannot be read, the launch goes ahead and
        // the provisioner's own failure is recorded on the VMs.
        let machines = match self.inner.launcher.capabilities().list {
            true => self.inner.launcher.list().await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "could not read the provider's inventory");
                Vec::new()
            }),
            false => Vec::new(),
        };
        let prefix = format!("{}-", self.inner.config.hostname_prefix);
        let highest = records
            .iter()
            .map(|r| &r.hostname)
            .chain(operations.iter().flat_map(|op| &op.hostnames))
            .chain(machines.iter().map(|m| &m.hostname))
            .filter_map(|h| h.as_str().strip_prefix(&prefix)?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        (1..=count as u64)
            .map(|i| {
                let n = highest.checked_add(i).ok_or_else(|| {
                    Error::invalid_input(format!("no VM numbers are left after {prefix}{highest}"))
                })?;
                Ok(VmSpec {
                    hostname: format!("{prefix}{n}").parse()?,
                    token: AgentToken::generate(),
                })
            })
            .collect()
    }

    /// Runs `work` while recording its progress lines on `op`; then records the outcome.
    pub(crate) async fn with_progress<T, F, Fut>(
        &self,
        mut op: Operation,
        work: F,
    ) -> (Operation, Result<T>)
    where
        F: FnOnce(Progress) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let progress = Progress::new(move |line| {
            let _ = tx.send(line.to_owned());
        });
        let work = work(progress);
        tokio::pin!(work);
        let result = loop {
            tokio::select! {
                result = &mut work => break result,
                Some(line) = rx.recv() => {
                    op.push_progress(line);
                    while let Ok(line) = rx.try_recv() {
                        op.push_progress(line);
                    }
                    self.save_operation(&op).await;
                }
            }
        };
        while let Ok(line) = rx.try_recv() {
            op.push_progress(line);
        }
        (op, result)
    }

    pub(crate) async fn save_operation(&self, op: &Operation) {
        if let Err(e) = self.inner.store.put_operation(op).await {
            tracing::warn!(operation = %op.id, error = %e, "could not record operation progress");
        }
    }

    async fn finish_launch(
        &self,
        (mut op, result): (Operation, Result<Vec<ProvisionedVm>>),
        specs: &[VmSpec],
    ) {
        let now = self.inner.clock.now();
        let (created, failure): (HashMap<Hostname, ProvisionedVm>, Option<String>) = match result {
            Ok(vms) => (
                vms.into_iter()
                    .map(|vm| (vm.hostname.clone(), vm))
                    .collect(),
                None,
            ),
            Err(e) => (HashMap::new(), Some(e.to_string())),
        };
        let mut failed = 0;
        for spec in specs {
            let outcome = match created.get(&spec.hostname) {
                Some(vm) => self.record_provisioned(vm).await,
                None => {
                    failed += 1;
                    let reason = failure
                        .clone()
                        .unwrap_or_else(|| "the provider did not create this VM".into());
                    self.apply_if(&spec.hostname, |_| {
                        Some(VmEvent::ProvisionFailed {
                            reason: reason.clone(),
                        })
                    })
                    .await
                    .map(drop)
                }
            };
            if let Err(e) = outcome {
                tracing::warn!(hostname = %spec.hostname, error = %e, "could not record launch outcome");
            }
            op.done += 1;
        }
        let error = match (failed, failure) {
            (0, _) => None,
            (_, Some(reason)) => Some(reason),
            (n, None) => Some(format!("{n} of {} VMs could not be created", specs.len())),
        };
        tracing::info!(operation = %op.id, failed, "launch finished");
        op.finish(error, now);
        self.save_operation(&op).await;
    }

    /// Records a created machine: `Provisioned`, the provisioning end time, and `AgentReady`
    /// at once if the agent already said it is running while the launch was in flight.
    pub(crate) async fn record_provisioned(&self, vm: &ProvisionedVm) -> Result<()> {
        let now = self.inner.clock.now();
        let event = VmEvent::Provisioned {
            instance_id: vm.instance_id.clone(),
            address: vm.address.clone(),
            instance_type: vm.instance_type.clone(),
        };
        self.apply_if(&vm.hostname, |r| {
            (r.state == VmState::Requested).then(|| event.clone())
        })
        .await?;
        let timings = StartupTimings {
            provision_end: Some(now),
            ..Default::default()
        };
        let telemetry = Telemetry {
            timings: Some(timings),
            ..Default::default()
        };
        self.inner
            .store
            .record_telemetry(&vm.hostname, &telemetry, now)
            .await?;
        self.apply_if(&vm.hostname, |r| {
            (r.state == VmState::Booting && r.agent_status == Some(AgentStatus::Running))
                .then_some(VmEvent::AgentReady)
        })
        .await?;
        Ok(())
    }

    pub(crate) async fn start_destroy(&self, target: &DestroyTarget) -> Result<Operation> {
        let records = match target {
            DestroyTarget::All => self.inner.store.list(&VmFilter::default()).await?,
            DestroyTarget::Hostnames(names) => {
                if names.is_empty() {
                    return Err(Error::invalid_input("no VM named to destroy"));
                }
                let mut records = Vec::with_capacity(names.len());
                for name in names {
                    records.push(self.inner.store.get(name).await?);
                }
                records
            }
        };
        let lock = self.lock_provisioning_patiently().await?;
        let now = self.inner.clock.now();
        let mut machines = Vec::new();
        for record in &records {
            self.apply_if(&record.hostname, |r| {
                (r.state != VmState::Terminated).then_some(VmEvent::Destroy)
            })
            .await?;
            // Wake the agent's waiter: the VM it waits for is going away.
            self.publish(&record.hostname).await;
            if let Some(instance_id) = &record.instance_id {
                machines.push(ProvisionedVm {
                    hostname: record.hostname.clone(),
                    instance_id: instance_id.clone(),
                    address: record.address.clone(),
                    instance_type: record.instance_type.clone(),
                });
            }
        }
        let hostnames: Vec<Hostname> = records.into_iter().map(|r| r.hostname).collect();
        let operation = Operation::start(OperationKind::Destroy, hostnames.clone(), now);
        self.inner.store.put_operation(&operation).await?;
        tracing::info!(operation = %operation.id, count = hostnames.len(), "destroy started");

        let this = self.clone();
        let op = operation.clone();
        let span = tracing::info_span!("destroy", operation = %operation.id);
        tokio::spawn(
            async move {
                let _lock: ProvisioningLock = lock;
                let provisioner = this.inner.provisioner.clone();
                let (op, result) = this
                    .with_progress(op, |_| async move { provisioner.destroy(&machines).await })
                    .await;
                this.finish_destroy(op, result, &hostnames).await;
            }
            .instrument(span),
        );
        Ok(operation)
    }

    pub(crate) async fn finish_destroy(
        &self,
        mut op: Operation,
        result: Result<()>,
        hostnames: &[Hostname],
    ) {
        let error = match result {
            Ok(()) => {
                for hostname in hostnames {
                    let gone = self
                        .apply_if(hostname, |r| {
                            (r.state == VmState::Terminating).then_some(VmEvent::Terminated)
                        })
                        .await;
                    if let Err(e) = gone {
                        tracing::warn!(hostname = %hostname, error = %e, "could not record termination");
                    }
                }
                match self.inner.store.remove(hostnames).await {
                    Ok(_) => None,
                    Err(e) => Some(format!("machines destroyed but records not removed: {e}")),
                }
            }
            // Records stay `Terminating`, visible, so the admin can retry.
            Err(e) => Some(e.to_string()),
        };
        op.finish(error, self.inner.clock.now());
        self.save_operation(&op).await;
    }

    pub(crate) async fn start_reboot(&self, hostname: &Hostname) -> Result<Operation> {
        let record = self.inner.store.get(hostname).await?;
        match &record.registration {
            Some(registration) if !registration.allow_reboot => {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    "the owner of this machine did not allow reboots when registering it",
                )
                .with_context("hostname", hostname))
            }
            None if !self.inner.provisioner.capabilities().reboot => {
                return Err(Error::new(
                    ErrorKind::InvalidConfig,
                    "this provisioner cannot reboot machines",
                ))
            }
            _ => {}
        }
        let Some(instance_id) = record.instance_id.clone() else {
            return Err(Error::new(
                ErrorKind::InvalidTransition,
                "the VM has no machine yet; it cannot be rebooted",
            )
            .with_context("hostname", hostname));
        };
        self.apply_if(hostname, |_| Some(VmEvent::Reboot)).await?;
        let now = self.inner.clock.now();
        let operation = Operation::start(OperationKind::Reboot, vec![hostname.clone()], now);
        self.inner.store.put_operation(&operation).await?;
        let machine = ProvisionedVm {
            hostname: hostname.clone(),
            instance_id,
            address: record.address,
            instance_type: record.instance_type,
        };
        let this = self.clone();
        let op = operation.clone();
        let span = tracing::info_span!("reboot", operation = %operation.id, hostname = %hostname);
        tokio::spawn(
            async move {
                let provisioner = this.inner.provisioner.clone();
                let target = machine.clone();
                let (mut op, result) = this
                    .with_progress(op, |_| async move { provisioner.reboot(&target).await })
                    .await;
                let error = result.err().map(|e| e.to_string());
                if let Some(reason) = &error {
                    let reason = format!("reboot failed: {reason}");
                    let marked = this
                        .apply_if(&machine.hostname, |r| {
                            matches!(r.state, VmState::Rebooting { .. }).then(|| {
                                VmEvent::MarkUnhealthy {
                                    reason: reason.clone(),
                                }
                            })
                        })
                        .await;
                    if let Err(e) = marked {
                        tracing::warn!(error = %e, "could not record the failed reboot");
                    }
                }
                op.finish(error, this.inner.clock.now());
                this.save_operation(&op).await;
            }
            .instrument(span),
        );
        Ok(operation)
    }
}

impl LabLink {
    /// Destroys those of `hostnames` for which `pick` holds on the record at the moment it
    /// changes (so a VM claimed in between is never taken); returns the hostnames taken.
    /// `Conflict` when another provisioning operation holds the lock.
    pub(crate) async fn destroy_where(
        &self,
        hostnames: &[Hostname],
        pick: impl Fn(&VmRecord) -> bool + Send + Sync,
    ) -> Result<Vec<Hostname>> {
        let lock = self.inner.store.lock_provisioning().await?;
        let mut machines = Vec::new();
        let mut taken = Vec::new();
        for hostname in hostnames {
            // The decision on the record version the change was applied to is the last one.
            let chosen = AtomicBool::new(false);
            let record = match self
                .apply_if(hostname, |r| {
                    let yes = r.state != VmState::Terminating
                        && r.state != VmState::Terminated
                        && pick(r);
                    chosen.store(yes, Ordering::SeqCst);
                    yes.then_some(VmEvent::Destroy)
                })
                .await
            {
                Ok(record) => record,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            if !chosen.load(Ordering::SeqCst) || record.state != VmState::Terminating {
                continue;
            }
            self.publish(hostname).await;
            if let Some(instance_id) = &record.instance_id {
                machines.push(ProvisionedVm {
                    hostname: hostname.clone(),
                    instance_id: instance_id.clone(),
                    address: record.address.clone(),
                    instance_type: record.instance_type.clone(),
                });
            }
            taken.push(hostname.clone());
        }
        if taken.is_empty() {
            return Ok(taken);
        }
        let now = self.inner.clock.now();
        let operation = Operation::start(OperationKind::Destroy, taken.clone(), now);
        self.inner.store.put_operation(&operation).await?;
        let this = self.clone();
        let names = taken.clone();
        let span = tracing::info_span!("destroy", operation = %operation.id);
        tokio::spawn(
            async move {
                let _lock = lock;
                let provisioner = this.inner.provisioner.clone();
                let (op, result) = this
                    .with_progress(operation, |_| async move {
                        provisioner.destroy(&machines).await
                    })
                    .await;
                this.finish_destroy(op, result, &names).await;
            }
            .instrument(span),
        );
        Ok(taken)
    }
}
