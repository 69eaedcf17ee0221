//! [`ManualProvisioner`]: the machines that joined by registering (see
//! [`registration`](crate::registration)); and [`MixedProvisioner`], a deployment's own
//! provisioner with those machines beside it.

use std::sync::Arc;

use async_trait::async_trait;

use crate::registration::INSTANCE_ID_PREFIX;
use crate::{
    Capabilities, Clock, Error, ErrorKind, LaunchRequest, Notifier, ProvisionedVm, Provisioner,
    Result, VmEvent, VmFilter, VmRecord, VmState, VmStore,
};

/// The machines that registered themselves, as a [`Provisioner`]: it cannot create machines
/// (`launch` is [`ErrorKind::InvalidConfig`]); `list` returns the registered machines still in
/// the pool; `destroy` unregisters them (their records go to `Terminating`, and the allocator
/// then removes them, so their agent tokens stop working) without touching the machines;
/// `reboot` asks the machine's agent to reboot, only where the owner allowed it when
/// registering ([`ErrorKind::PermissionDenied`] otherwise).
#[derive(Debug, Clone)]
pub struct ManualProvisioner {
    store: Arc<dyn VmStore>,
    notifier: Arc<dyn Notifier>,
    clock: Arc<dyn Clock>,
}

impl ManualProvisioner {
    /// Registered machines are read from `store`; their agents are woken through `notifier`.
    pub fn new(
        store: Arc<dyn VmStore>,
        notifier: Arc<dyn Notifier>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            notifier,
            clock,
        }
    }

    /// Whether `vm` is a registered machine (by its instance id).
    pub fn owns(vm: &ProvisionedVm) -> bool {
        vm.instance_id.as_str().starts_with(INSTANCE_ID_PREFIX)
    }

    async fn registered(&self, vm: &ProvisionedVm) -> Result<Option<VmRecord>> {
        match self.store.get(&vm.hostname).await {
            Ok(r) if r.is_registered() && r.instance_id.as_ref() == Some(&vm.instance_id) => {
                Ok(Some(r))
            }
            Ok(_) => Ok(None),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn in_pool(r: &VmRecord) -> bool {
    r.is_registered() && !matches!(r.state, VmState::Terminating | VmState::Terminated)
}

#[async_trait]
impl Provisioner for ManualProvisioner {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            launch: false,
            reboot: true,
            list: true,
            max_batch: None,
        }
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<ProvisionedVm>> {
        if request.vms.is_empty() {
            return Ok(Vec::new());
        }
        Err(Error::new(
            ErrorKind::InvalidConfig,
            "registered machines cannot be launched: a machine joins by registering (lablink-agent register)",
        ))
    }

    async fn destroy(&self, vms: &[ProvisionedVm]) -> Result<()> {
        for vm in vms {
            if !self.registered(vm).await?.is_some_and(|r| in_pool(&r)) {
                continue;
            }
            let now = self.clock.now();
            match self
                .store
                .apply(&vm.hostname, &VmEvent::Destroy, None, now)
                .await
            {
                Ok(_) => tracing::info!(hostname = %vm.hostname, "registered machine unregistered"),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ProvisionedVm>> {
        let records = self.store.list(&VmFilter::default()).await?;
        Ok(records
            .into_iter()
            .filter(in_pool)
            .filter_map(|r| {
                Some(ProvisionedVm {
                    instance_id: r.instance_id?,
                    hostname: r.hostname,
                    address: r.address,
                    instance_type: r.instance_type,
                })
            })
            .collect())
    }

    async fn reboot(&self, vm: &ProvisionedVm) -> Result<()> {
        let record = self.registered(vm).await?.ok_or_else(|| {
            Error::not_found("no such registered machine").with_context("hostname", &vm.hostname)
        })?;
        if !record.registration.is_some_and(|r| r.allow_reboot) {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                "the owner of this machine did not allow reboots when registering it",
            )
            .with_context("hostname", &vm.hostname));
        }
        // The agent sees the request on its task poll (its record is `Rebooting` and its
        // status was cleared); this only wakes it.
        self.notifier.publish(&vm.hostname).await
    }
}

/// A deployment's provisioner with the registered machines beside it: launches go to the
/// provisioner; `list`, `destroy` and `reboot` go to whichever holds each machine (registered
/// machines are told apart by their instance id). This is what [`LabLink`](crate::LabLink)
/// runs, so every deployment accepts registered machines once an admin creates a
/// registration token.
#[derive(Debug)]
pub struct MixedProvisioner {
    provisioner: Arc<dyn Provisioner>,
    manual: ManualProvisioner,
}

impl MixedProvisioner {
    /// `provisioner` with the machines registered in `manual` beside it.
    pub fn new(provisioner: Arc<dyn Provisioner>, manual: ManualProvisioner) -> Self {
        Self {
            provisioner,
            manual,
        }
    }
}

#[async_trait]
impl Provisioner for MixedProvisioner {
    /// The deployment's provisioner's (a registered machine's reboot depends on what its
    /// owner allowed, not on these).
    fn capabilities(&self) -> Capabilities {
        self.provisioner.capabilities()
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<ProvisionedVm>> {
        self.provisioner.launch(request).await
    }

    async fn destroy(&self, vms: &[ProvisionedVm]) -> Result<()> {
        let (registered, created): (Vec<ProvisionedVm>, Vec<ProvisionedVm>) =
            vms.iter().cloned().partition(ManualProvisioner::owns);
        if !registered.is_empty() {
            self.manual.destroy(&registered).await?;
        }
        if created.is_empty() {
            return Ok(());
        }
        self.provisioner.destroy(&created).await
    }

    async fn list(&self) -> Result<Vec<ProvisionedVm>> {
        let mut machines = match self.provisioner.capabilities().list {
            true => self.provisioner.list().await?,
            false => Vec::new(),
        };
        // The provisioner may itself be a `ManualProvisioner`: each machine once.
        machines.retain(|vm| !ManualProvisioner::owns(vm));
        machines.extend(self.manual.list().await?);
        Ok(machines)
    }

    async fn reboot(&self, vm: &ProvisionedVm) -> Result<()> {
        match ManualProvisioner::owns(vm) {
            true => self.manual.reboot(vm).await,
            false => self.provisioner.reboot(vm).await,
        }
    }
}

/// The provisioner of a deployment whose machines all register themselves (the server's
/// `[provisioner] kind = "manual"`): it launches nothing
/// ([`ErrorKind::InvalidConfig`]) and has no machines of its own; the registered machines
/// beside it ([`MixedProvisioner`]) are the whole pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProvisioner;

#[async_trait]
impl Provisioner for NoProvisioner {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            launch: false,
            reboot: false,
            list: true,
            max_batch: None,
        }
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<ProvisionedVm>> {
        match request.vms.is_empty() {
            true => Ok(Vec::new()),
            false => Err(Error::new(
                ErrorKind::InvalidConfig,
                "this deployment launches no VMs: its machines join by registering (lablink-agent register)",
            )),
        }
    }

    async fn destroy(&self, _vms: &[ProvisionedVm]) -> Result<()> {
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ProvisionedVm>> {
        Ok(Vec::new())
    }

    async fn reboot(&self, _vm: &ProvisionedVm) -> Result<()> {
        Err(Error::new(
            ErrorKind::InvalidConfig,
            "this deployment has no provisioner to reboot machines with",
        ))
    }
}
