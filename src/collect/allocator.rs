//! [`CollectingAllocator`]: any [`Allocator`] whose destroy collects participants' work
//! first, for the HTTP layer and embedders alike.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use lablink_core::registration::Registered;
use lablink_core::secret::RegistrationSecret;
use lablink_core::{
    AgentToken, Allocator, Assignment, AuditEntry, AuditQuery, BeforeDestroy, DesktopChange,
    DestroyTarget, Email, Error, Granted, Hostname, LaunchOptions, MachineRegistration, Operation,
    RegistrationToken, RegistrationTokenOptions, Result, SupervisorStatus, Telemetry, VmCounts,
    VmFilter, VmLogs, VmRecord, VmRequest, VmState,
};
use uuid::Uuid;

use super::Collector;

/// Wraps an allocator so that [`destroy`](Allocator::destroy) collects from the VMs first
/// when [`destroy_collects_first`](super::CollectSettings::destroy_collects_first) is on,
/// and leaves the VMs whose collection failed; everything else is the inner allocator's.
///
/// ```no_run
/// # async fn run(lablink: lablink_core::LabLink) -> lablink_core::Result<()> {
/// use std::sync::Arc;
/// use lablink::collect::{CollectingAllocator, Collector};
/// use lablink_core::{Allocator, DestroyTarget};
///
/// let collecting = CollectingAllocator::new(Arc::new(lablink), Arc::new(Collector::default()));
/// // Collected (when destroy_collects_first is on), then destroyed.
/// collecting.destroy(&DestroyTarget::All).await?;
/// # Ok(()) }
/// ```
///
/// The supervisor's own automatic destroys (scheduled destruction, idle release) do not go
/// through an [`Allocator`]: give it the same [`Collector`] as its
/// [`BeforeDestroy`] step with
/// [`LabLinkBuilder::with_before_destroy`](lablink_core::LabLinkBuilder::with_before_destroy).
#[derive(Debug, Clone)]
pub struct CollectingAllocator<A: ?Sized = dyn Allocator> {
    inner: Arc<A>,
    collector: Arc<Collector>,
}

/// What a destroy with collect-first did.
#[derive(Debug, Clone, PartialEq)]
pub struct Destroyed {
    /// The destroy operation, when any VM was destroyed.
    pub operation: Option<Operation>,
    /// VMs not destroyed because their collection failed, with the reason.
    pub blocked: BTreeMap<String, String>,
}

impl Destroyed {
    /// A sentence naming the blocked VMs.
    pub fn message(&self) -> String {
        let names: Vec<&str> = self.blocked.keys().map(String::as_str).collect();
        format!(
            "the collection failed on {}, so it was not destroyed; collect again or destroy with force",
            names.join(", ")
        )
    }
}

impl<A: Allocator + ?Sized> CollectingAllocator<A> {
    /// `inner`, collecting with `collector` before it destroys.
    pub fn new(inner: Arc<A>, collector: Arc<Collector>) -> Self {
        Self { inner, collector }
    }

    /// The wrapped allocator.
    pub fn inner(&self) -> &Arc<A> {
        &self.inner
    }

    /// The collector.
    pub fn collector(&self) -> &Arc<Collector> {
        &self.collector
    }

    /// Destroys `target`; with `destroy_collects_first`, collects from its VMs first and
    /// leaves the VMs whose collection failed (in [`Destroyed::blocked`]). `force` destroys
    /// at once without collecting: it is how an admin gets rid of a VM whose agent is dead,
    /// and waiting for that VM's collection to fail would take `destroy_wait_seconds`.
    pub async fn destroy_collecting(
        &self,
        target: &DestroyTarget,
        force: bool,
    ) -> Result<Destroyed> {
        if !self.collector.settings().destroy_collects_first || force {
            return self.destroy_now(target).await;
        }
        let vms: Vec<VmRecord> = match target {
            DestroyTarget::All => {
                let vms: Vec<VmRecord> = self
                    .inner
                    .vms(&VmFilter::default())
                    .await?
                    .into_iter()
                    .filter(|vm| !matches!(vm.state, VmState::Terminating | VmState::Terminated))
                    .collect();
                // Nothing to collect from, nor to wait for.
                if vms.is_empty() {
                    return self.destroy_now(target).await;
                }
                vms
            }
            DestroyTarget::Hostnames(names) => {
                let mut vms = Vec::new();
                for name in names {
                    vms.push(self.inner.vm(name).await?);
                }
                vms
            }
        };
        let kept = self.collector.before_destroy(&vms).await?;
        // Only the VMs listed before the wait, less the kept ones: a VM launched meanwhile
        // was not collected, so "all" must not take it. A VM destroyed by someone else during
        // the wait (a forced destroy) is gone: neither blocked nor destroyed again.
        let mut rest = Vec::new();
        let mut blocked = BTreeMap::new();
        for vm in vms {
            match self.inner.vm(&vm.hostname).await {
                Ok(_) => match kept.get(&vm.hostname) {
                    Some(why) => {
                        blocked.insert(vm.hostname.to_string(), why.clone());
                    }
                    None => rest.push(vm.hostname),
                },
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        let operation = match rest.is_empty() {
            true => None,
            false => Some(self.inner.destroy(&DestroyTarget::Hostnames(rest)).await?),
        };
        Ok(Destroyed { operation, blocked })
    }

    /// Destroys `target` without collecting. A collection still pending for a VM destroyed so
    /// fails at once ("destroyed without collecting"), so a destroy waiting for it (another
    /// admin's destroy of all VMs) does not wait for an upload that cannot come.
    async fn destroy_now(&self, target: &DestroyTarget) -> Result<Destroyed> {
        let op = self.inner.destroy(target).await?;
        if let DestroyTarget::Hostnames(hostnames) = target {
            for hostname in hostnames {
                if let Some(current) = self.collector.status(hostname.as_str()).await? {
                    self.collector
                        .fail(
                            hostname.as_str(),
                            &current.id,
                            "destroyed without collecting",
                        )
                        .await?;
                }
            }
        }
        Ok(Destroyed {
            operation: Some(op),
            blocked: BTreeMap::new(),
        })
    }
}

#[async_trait]
impl<A: Allocator + ?Sized> Allocator for CollectingAllocator<A> {
    async fn request_vm(&self, request: &VmRequest) -> Result<Granted> {
        self.inner.request_vm(request).await
    }

    async fn wait_for_assignment(
        &self,
        hostname: &Hostname,
        timeout: Duration,
    ) -> Result<Option<Assignment>> {
        self.inner.wait_for_assignment(hostname, timeout).await
    }

    async fn watch_assignment(
        &self,
        hostname: &Hostname,
        seen: &str,
        timeout: Duration,
    ) -> Result<Option<Assignment>> {
        self.inner.watch_assignment(hostname, seen, timeout).await
    }

    async fn change_desktop(
        &self,
        hostname: &Hostname,
        change: &DesktopChange,
    ) -> Result<VmRecord> {
        self.inner.change_desktop(hostname, change).await
    }

    async fn authenticate_agent(&self, token: &AgentToken) -> Result<Hostname> {
        self.inner.authenticate_agent(token).await
    }

    async fn report(&self, hostname: &Hostname, telemetry: Telemetry) -> Result<VmRecord> {
        self.inner.report(hostname, telemetry).await
    }

    async fn launch(&self, options: &LaunchOptions) -> Result<Operation> {
        self.inner.launch(options).await
    }

    /// Collects first (see [`destroy_collecting`](Self::destroy_collecting)). When a VM's
    /// collection failed, the others are destroyed and the answer is a conflict naming the
    /// kept VMs (and the operation destroying the others, in its context).
    async fn destroy(&self, target: &DestroyTarget) -> Result<Operation> {
        let destroyed = self.destroy_collecting(target, false).await?;
        if destroyed.blocked.is_empty() {
            return destroyed
                .operation
                .ok_or_else(|| Error::not_found("no VM left to destroy"));
        }
        let mut error = Error::conflict(destroyed.message());
        if let Some(op) = &destroyed.operation {
            error = error.with_context("operation", op.id);
        }
        Err(error)
    }

    async fn reboot(&self, hostname: &Hostname) -> Result<Operation> {
        self.inner.reboot(hostname).await
    }

    async fn release(&self, hostname: &Hostname) -> Result<VmRecord> {
        self.inner.release(hostname).await
    }

    async fn vm(&self, hostname: &Hostname) -> Result<VmRecord> {
        self.inner.vm(hostname).await
    }

    async fn vms(&self, filter: &VmFilter) -> Result<Vec<VmRecord>> {
        self.inner.vms(filter).await
    }

    async fn logs(&self, hostname: &Hostname) -> Result<VmLogs> {
        self.inner.logs(hostname).await
    }

    async fn counts(&self) -> Result<VmCounts> {
        self.inner.counts().await
    }

    async fn operation(&self, id: Uuid) -> Result<Operation> {
        self.inner.operation(id).await
    }

    async fn operations(&self, limit: usize) -> Result<Vec<Operation>> {
        self.inner.operations(limit).await
    }

    async fn roster(&self) -> Result<Vec<Email>> {
        self.inner.roster().await
    }

    async fn set_roster(&self, emails: &[Email]) -> Result<()> {
        self.inner.set_roster(emails).await
    }

    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        self.inner.shared_secret(name, candidate).await
    }

    async fn end_admin_session(&self, id: &str, until: DateTime<Utc>) -> Result<()> {
        self.inner.end_admin_session(id, until).await
    }

    async fn admin_session_ended(&self, id: &str) -> Result<bool> {
        self.inner.admin_session_ended(id).await
    }

    async fn create_registration_token(
        &self,
        options: &RegistrationTokenOptions,
    ) -> Result<(RegistrationToken, RegistrationSecret)> {
        self.inner.create_registration_token(options).await
    }

    async fn registration_tokens(&self) -> Result<Vec<RegistrationToken>> {
        self.inner.registration_tokens().await
    }

    async fn revoke_registration_token(&self, id: Uuid) -> Result<RegistrationToken> {
        self.inner.revoke_registration_token(id).await
    }

    async fn register_machine(
        &self,
        secret: &RegistrationSecret,
        request: &MachineRegistration,
    ) -> Result<(Registered, AgentToken)> {
        self.inner.register_machine(secret, request).await
    }

    async fn record_audit(&self, entry: &AuditEntry) -> Result<()> {
        self.inner.record_audit(entry).await
    }

    async fn audit_log(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>> {
        self.inner.audit_log(query).await
    }

    async fn workshop_settings(&self) -> Result<lablink_core::WorkshopSettings> {
        self.inner.workshop_settings().await
    }

    async fn set_workshop_settings(
        &self,
        settings: &lablink_core::WorkshopSettings,
        expected_revision: u64,
    ) -> Result<lablink_core::WorkshopSettings> {
        self.inner
            .set_workshop_settings(settings, expected_revision)
            .await
    }

    async fn vm_warnings(&self, hostname: &Hostname) -> Result<Vec<lablink_core::VmWarning>> {
        self.inner.vm_warnings(hostname).await
    }

    async fn acknowledge_warning(
        &self,
        hostname: &Hostname,
        id: Uuid,
    ) -> Result<lablink_core::VmWarning> {
        self.inner.acknowledge_warning(hostname, id).await
    }

    async fn usage(&self) -> Result<lablink_core::FleetUsage> {
        self.inner.usage().await
    }

    async fn removed_vms(&self) -> Result<Vec<lablink_core::RemovedVm>> {
        self.inner.removed_vms().await
    }

    fn supervision(&self) -> Option<SupervisorStatus> {
        self.inner.supervision()
    }
}

#[cfg(test)]
mod tests {
    use lablink_core::{AgentStatus, AllocatorExt, ErrorKind, LabLink, MemoryArtifactStore};
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::collect::CollectSettings;

    /// The upload an agent makes: `files/<path>` entries, then the manifest.
    fn upload(id: &str, path: &str, bytes: &[u8]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut append = |name: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            tar.append_data(&mut header, name, data).unwrap();
        };
        append(&format!("files/{path}"), bytes);
        let sha256: String = Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let manifest = serde_json::json!({
            "collection": id,
            "files": [{"path": path, "size": bytes.len(), "sha256": sha256}],
        });
        append("manifest.json", &serde_json::to_vec(&manifest).unwrap());
        tar.into_inner().unwrap()
    }

    /// What the agent of `hostname` does with its next collection task: uploads one file,
    /// or (`refuse`) fails it.
    fn agent(
        collector: Arc<Collector>,
        hostname: Hostname,
        refuse: bool,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let task = collector
                .wait_task(
                    hostname.as_str(),
                    Duration::from_secs(60),
                    std::future::pending(),
                )
                .await
                .unwrap()
                .expect("a collection task");
            if refuse {
                collector
                    .fail(hostname.as_str(), &task.id, "the disk is unreadable")
                    .await
                    .unwrap();
                return;
            }
            let body = upload(&task.id, "work.slp", b"the participant's labels");
            let stream = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(body))]);
            collector
                .receive(hostname.as_str(), &task.id, stream)
                .await
                .unwrap();
        })
    }

    /// An embedder's destroy through the `Allocator` API, with no HTTP layer: the VMs are
    /// collected first, a VM whose collection failed is kept, and an allocator wrapping the
    /// collecting one (here one that does not collect itself) keeps that behaviour.
    #[tokio::test]
    async fn destroy_collects_first_without_http_and_under_another_wrapper() {
        let lablink = LabLink::builder().build().unwrap();
        let op = lablink
            .launch_and_wait(2, Duration::from_secs(10))
            .await
            .unwrap();
        for hostname in &op.hostnames {
            let running = Telemetry {
                status: Some(AgentStatus::Running),
                heartbeat: Some("boot-1".into()),
                ..Default::default()
            };
            lablink.report(hostname, running).await.unwrap();
        }
        let (kept, collected) = (op.hostnames[0].clone(), op.hostnames[1].clone());
        let collector = Arc::new(Collector::new(
            Arc::new(MemoryArtifactStore::default()),
            CollectSettings {
                destroy_collects_first: true,
                ..CollectSettings::default()
            },
        ));
        let collecting = CollectingAllocator::new(Arc::new(lablink.clone()), collector.clone());
        let outer: Arc<dyn Allocator> = Arc::new(CollectingAllocator::new(
            Arc::new(collecting) as Arc<dyn Allocator>,
            Arc::default(),
        ));
        let agents = [
            agent(collector.clone(), kept.clone(), true),
            agent(collector.clone(), collected.clone(), false),
        ];

        let err = outer.destroy(&DestroyTarget::All).await.unwrap_err();
        for agent in agents {
            agent.await.unwrap();
        }
        assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
        assert!(err.message().contains(kept.as_str()), "{err}");
        assert!(!err.message().contains(collected.as_str()), "{err}");
        // The collected VM's work is stored, and only then was it destroyed.
        let manifest = collector
            .manifest(collected.as_str())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(manifest.files[0].path, "work.slp");
        assert!(matches!(
            lablink.vm(&collected).await.map(|r| r.state),
            Ok(VmState::Terminating | VmState::Terminated) | Err(_)
        ));
        // The VM whose collection failed is still there.
        assert_eq!(lablink.vm(&kept).await.unwrap().state, VmState::Available);
    }
}
