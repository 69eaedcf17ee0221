//! Reconcile: after a crash at every step of a launch (before the provider call, after it,
//! after the first records were written), after a lost store and after a vanished machine,
//! reconcile converges to "every machine has a record and every live record has a machine".
//!
//! A crash is a real one: the first allocator runs on its own tokio runtime, which is shut
//! down at the chosen step, dropping every task of that "process" mid-flight (and with it
//! the provisioning lock). A second allocator over the same store and provider then
//! reconciles.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use lablink_core::store::{ClaimRequest, Claimed, ProvisioningLock};
use lablink_core::{
    Allocator, AllocatorConfig, AllocatorExt, DestroyTarget, ErrorKind, FakeProvisioner, Hostname,
    LabLink, LaunchOptions, LaunchRequest, MemoryVmStore, Operation, OrphanPolicy, ProvisionedVm,
    Provisioner, Telemetry, VmCounts, VmEvent, VmFilter, VmLogs, VmRecord, VmState, VmStore,
};
use tokio::sync::Notify;
use uuid::Uuid;

/// Where the first process dies.
#[derive(Debug, Clone, Copy, PartialEq)]
enum CrashAt {
    /// Records written, the provider not called yet.
    BeforeProviderCall,
    /// The provider created the machines; nothing recorded about them yet.
    AfterProviderCall,
    /// The provider created the machines; the first of them was recorded `Provisioned`.
    AfterFirstRecord,
}

/// A point where the doomed process stops forever and tells the test so.
#[derive(Debug, Default)]
struct Tripwire {
    reached: Notify,
}

impl Tripwire {
    async fn hang(&self) -> ! {
        self.reached.notify_one();
        std::future::pending().await
    }
}

/// The provider of the doomed process: hangs before or after creating the machines.
#[derive(Debug)]
struct CrashingProvisioner {
    inner: FakeProvisioner,
    at: CrashAt,
    wire: Arc<Tripwire>,
}

#[async_trait]
impl Provisioner for CrashingProvisioner {
    fn capabilities(&self) -> lablink_core::Capabilities {
        self.inner.capabilities()
    }
    async fn launch(&self, request: &LaunchRequest) -> lablink_core::Result<Vec<ProvisionedVm>> {
        if self.at == CrashAt::BeforeProviderCall {
            self.wire.hang().await;
        }
        let created = self.inner.launch(request).await?;
        if self.at == CrashAt::AfterProviderCall {
            self.wire.hang().await;
        }
        Ok(created)
    }
    async fn destroy(&self, vms: &[ProvisionedVm]) -> lablink_core::Result<()> {
        self.inner.destroy(vms).await
    }
    async fn list(&self) -> lablink_core::Result<Vec<ProvisionedVm>> {
        self.inner.list().await
    }
    async fn reboot(&self, vm: &ProvisionedVm) -> lablink_core::Result<()> {
        self.inner.reboot(vm).await
    }
}

/// The store of the doomed process: hangs on the second `Provisioned` write when crashing
/// after the first record.
#[derive(Debug)]
struct CrashingStore {
    inner: MemoryVmStore,
    at: CrashAt,
    wire: Arc<Tripwire>,
    provisioned: AtomicUsize,
}

#[async_trait]
impl VmStore for CrashingStore {
    async fn insert(&self, records: &[VmRecord]) -> lablink_core::Result<Vec<VmRecord>> {
        self.inner.insert(records).await
    }
    async fn get(&self, hostname: &Hostname) -> lablink_core::Result<VmRecord> {
        self.inner.get(hostname).await
    }
    async fn get_by_token(
        &self,
        digest: &lablink_core::secret::TokenDigest,
    ) -> lablink_core::Result<VmRecord> {
        self.inner.get_by_token(digest).await
    }
    async fn list(&self, filter: &VmFilter) -> lablink_core::Result<Vec<VmRecord>> {
        self.inner.list(filter).await
    }
    async fn counts(&self) -> lablink_core::Result<VmCounts> {
        self.inner.counts().await
    }
    async fn apply(
        &self,
        hostname: &Hostname,
        event: &VmEvent,
        expected_generation: Option<u64>,
        now: DateTime<Utc>,
    ) -> lablink_core::Result<VmRecord> {
        if matches!(event, VmEvent::Provisioned { .. })
            && self.at == CrashAt::AfterFirstRecord
            && self.provisioned.fetch_add(1, Ordering::SeqCst) == 1
        {
            self.wire.hang().await;
        }
        self.inner
            .apply(hostname, event, expected_generation, now)
            .await
    }
    async fn claim(
        &self,
        request: &ClaimRequest,
        now: DateTime<Utc>,
    ) -> lablink_core::Result<Claimed> {
        self.inner.claim(request, now).await
    }
    async fn record_telemetry(
        &self,
        hostname: &Hostname,
        telemetry: &Telemetry,
        now: DateTime<Utc>,
    ) -> lablink_core::Result<VmRecord> {
        self.inner.record_telemetry(hostname, telemetry, now).await
    }
    async fn logs(&self, hostname: &Hostname) -> lablink_core::Result<VmLogs> {
        self.inner.logs(hostname).await
    }
    async fn remove(&self, hostnames: &[Hostname]) -> lablink_core::Result<usize> {
        self.inner.remove(hostnames).await
    }
    async fn put_operation(&self, operation: &Operation) -> lablink_core::Result<()> {
        self.inner.put_operation(operation).await
    }
    async fn get_operation(&self, id: Uuid) -> lablink_core::Result<Operation> {
        self.inner.get_operation(id).await
    }
    async fn list_operations(&self, limit: usize) -> lablink_core::Result<Vec<Operation>> {
        self.inner.list_operations(limit).await
    }
    async fn lock_provisioning(&self) -> lablink_core::Result<ProvisioningLock> {
        self.inner.lock_provisioning().await
    }
    async fn try_lead(
        &self,
        candidate: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> lablink_core::Result<lablink_core::store::LeaderLease> {
        self.inner.try_lead(candidate, now, until).await
    }
    async fn resign(&self, candidate: &str) -> lablink_core::Result<()> {
        self.inner.resign(candidate).await
    }
    async fn roster(&self) -> lablink_core::Result<Vec<lablink_core::Email>> {
        self.inner.roster().await
    }
    async fn replace_roster(&self, emails: &[lablink_core::Email]) -> lablink_core::Result<()> {
        self.inner.replace_roster(emails).await
    }
    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> lablink_core::Result<Vec<u8>> {
        self.inner.shared_secret(name, candidate).await
    }
    async fn end_session(
        &self,
        id: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> lablink_core::Result<()> {
        self.inner.end_session(id, until, now).await
    }
    async fn session_ended(&self, id: &str, now: DateTime<Utc>) -> lablink_core::Result<bool> {
        self.inner.session_ended(id, now).await
    }
    async fn append_audit(&self, entry: &lablink_core::AuditEntry) -> lablink_core::Result<()> {
        self.inner.append_audit(entry).await
    }
    async fn audit_entries(
        &self,
        query: &lablink_core::AuditQuery,
    ) -> lablink_core::Result<Vec<lablink_core::AuditEntry>> {
        self.inner.audit_entries(query).await
    }
    async fn workshop_settings(
        &self,
    ) -> lablink_core::Result<Option<lablink_core::WorkshopSettings>> {
        self.inner.workshop_settings().await
    }
    async fn put_workshop_settings(
        &self,
        settings: &lablink_core::WorkshopSettings,
        expected_revision: u64,
    ) -> lablink_core::Result<lablink_core::WorkshopSettings> {
        self.inner
            .put_workshop_settings(settings, expected_revision)
            .await
    }
    async fn put_warning(
        &self,
        warning: &lablink_core::VmWarning,
    ) -> lablink_core::Result<lablink_core::VmWarning> {
        self.inner.put_warning(warning).await
    }
    async fn warnings(
        &self,
        hostname: &Hostname,
    ) -> lablink_core::Result<Vec<lablink_core::VmWarning>> {
        self.inner.warnings(hostname).await
    }
    async fn all_warnings(&self) -> lablink_core::Result<Vec<lablink_core::VmWarning>> {
        self.inner.all_warnings().await
    }
    async fn acknowledge_warning(
        &self,
        hostname: &Hostname,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> lablink_core::Result<lablink_core::VmWarning> {
        self.inner.acknowledge_warning(hostname, id, now).await
    }
    async fn remove_warnings(&self, ids: &[Uuid]) -> lablink_core::Result<usize> {
        self.inner.remove_warnings(ids).await
    }
    async fn usage(&self, now: DateTime<Utc>) -> lablink_core::Result<lablink_core::FleetUsage> {
        self.inner.usage(now).await
    }
    async fn removed_vms(&self) -> lablink_core::Result<Vec<lablink_core::RemovedVm>> {
        self.inner.removed_vms().await
    }
    async fn create_registration_token(
        &self,
        token: &lablink_core::RegistrationToken,
    ) -> lablink_core::Result<()> {
        self.inner.create_registration_token(token).await
    }
    async fn registration_tokens(
        &self,
    ) -> lablink_core::Result<Vec<lablink_core::RegistrationToken>> {
        self.inner.registration_tokens().await
    }
    async fn revoke_registration_token(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> lablink_core::Result<lablink_core::RegistrationToken> {
        self.inner.revoke_registration_token(id, now).await
    }
    async fn register(
        &self,
        token: &lablink_core::secret::TokenDigest,
        request: &lablink_core::MachineRegistration,
        agent_token: lablink_core::secret::TokenDigest,
        now: DateTime<Utc>,
    ) -> lablink_core::Result<lablink_core::registration::Registered> {
        self.inner.register(token, request, agent_token, now).await
    }
}

/// Runs a launch of `count` VMs in a process of its own and kills that process at `at`.
fn crash_a_launch(store: &MemoryVmStore, fake: &FakeProvisioner, count: usize, at: CrashAt) {
    let wire = Arc::new(Tripwire::default());
    let doomed = LabLink::builder()
        .with_store(Arc::new(CrashingStore {
            inner: store.clone(),
            at,
            wire: wire.clone(),
            provisioned: AtomicUsize::new(0),
        }))
        .with_provisioner(Arc::new(CrashingProvisioner {
            inner: fake.clone(),
            at,
            wire: wire.clone(),
        }))
        .build()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        doomed.launch(&LaunchOptions { count }).await.unwrap();
        wire.reached.notified().await;
    });
    // The process dies: every task it had is dropped where it stood.
    drop(runtime);
}

/// Another process over the same store and provider.
fn survivor(store: &MemoryVmStore, fake: &FakeProvisioner, policy: OrphanPolicy) -> LabLink {
    LabLink::builder()
        .with_store(Arc::new(store.clone()))
        .with_provisioner(Arc::new(fake.clone()))
        .with_config(AllocatorConfig {
            orphan_policy: policy,
            ..Default::default()
        })
        .build()
        .unwrap()
}

fn is_live(state: VmState) -> bool {
    state.phase().is_some()
}

/// Every machine has a record naming its instance, and every live record has its machine.
async fn assert_converged(lablink: &LabLink, fake: &FakeProvisioner) {
    let machines: HashMap<Hostname, ProvisionedVm> = fake
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.hostname.clone(), m))
        .collect();
    let records = lablink.vms(&VmFilter::default()).await.unwrap();
    for m in machines.values() {
        let record = records.iter().find(|r| r.hostname == m.hostname);
        assert!(
            record.is_some_and(|r| r.instance_id.as_ref() == Some(&m.instance_id)),
            "machine {} has no record naming it: {record:?}",
            m.hostname
        );
    }
    for r in &records {
        if is_live(r.state) {
            let machine = machines.get(&r.hostname);
            assert!(
                machine.is_some_and(|m| Some(&m.instance_id) == r.instance_id.as_ref()),
                "live record {} ({}) has no machine",
                r.hostname,
                r.state
            );
        }
        assert_ne!(
            r.state,
            VmState::Requested,
            "{} still requested",
            r.hostname
        );
    }
    // Nothing left to do: a second run changes nothing.
    let again = lablink.reconcile().await.unwrap();
    assert!(
        !again.changed_anything(),
        "second reconcile still changed: {again:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_crash_before_the_provider_call_fails_the_requested_records() {
    let (store, fake) = (MemoryVmStore::new(), FakeProvisioner::new());
    std::thread::scope(|s| {
        s.spawn(|| crash_a_launch(&store, &fake, 3, CrashAt::BeforeProviderCall));
    });
    let lablink = survivor(&store, &fake, OrphanPolicy::default());
    assert_eq!(lablink.counts().await.unwrap().requested, 3);

    let report = lablink.reconcile().await.unwrap();
    assert_eq!(report.failed.len(), 3, "{report:?}");
    assert!(report.attached.is_empty() && report.adopted.is_empty());
    for r in lablink.vms(&VmFilter::default()).await.unwrap() {
        assert_eq!(r.state, VmState::Failed);
        assert!(r.last_error.unwrap().contains("interrupted"));
    }
    assert_converged(&lablink, &fake).await;
    // The failed records are destroyable as usual.
    let op = lablink.destroy(&DestroyTarget::All).await.unwrap();
    lablink
        .wait_for_operation(op.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(lablink.counts().await.unwrap().total, 0);
}

#[tokio::test(start_paused = true)]
async fn a_crash_after_the_provider_call_attaches_the_machines_to_their_records() {
    let (store, fake) = (MemoryVmStore::new(), FakeProvisioner::new());
    std::thread::scope(|s| {
        s.spawn(|| crash_a_launch(&store, &fake, 3, CrashAt::AfterProviderCall));
    });
    let lablink = survivor(&store, &fake, OrphanPolicy::Terminate);
    assert_eq!(fake.list().await.unwrap().len(), 3);
    assert_eq!(lablink.counts().await.unwrap().requested, 3);

    let report = lablink.reconcile().await.unwrap();
    assert_eq!(report.attached.len(), 3, "{report:?}");
    assert!(
        report.terminated.is_empty(),
        "a recorded machine was terminated"
    );
    assert_converged(&lablink, &fake).await;
    // Attached VMs are ordinary: their agents (holding the tokens the records know) come up.
    for r in lablink.vms(&VmFilter::default()).await.unwrap() {
        assert_eq!(r.state, VmState::Booting);
        assert!(r.timings.provision_end.is_some());
    }
}

#[tokio::test(start_paused = true)]
async fn a_crash_after_the_first_record_finishes_the_rest() {
    let (store, fake) = (MemoryVmStore::new(), FakeProvisioner::new());
    std::thread::scope(|s| {
        s.spawn(|| crash_a_launch(&store, &fake, 3, CrashAt::AfterFirstRecord));
    });
    let lablink = survivor(&store, &fake, OrphanPolicy::Terminate);
    let counts = lablink.counts().await.unwrap();
    assert_eq!((counts.booting, counts.requested), (1, 2), "{counts:?}");

    let report = lablink.reconcile().await.unwrap();
    assert_eq!(report.attached.len(), 2, "{report:?}");
    assert!(report.failed.is_empty() && report.terminated.is_empty());
    assert_converged(&lablink, &fake).await;
    assert_eq!(lablink.counts().await.unwrap().booting, 3);
}

#[tokio::test(start_paused = true)]
async fn the_lock_of_a_crashed_launch_does_not_block_the_next_one() {
    let (store, fake) = (MemoryVmStore::new(), FakeProvisioner::new());
    std::thread::scope(|s| {
        s.spawn(|| crash_a_launch(&store, &fake, 2, CrashAt::AfterProviderCall));
    });
    let lablink = survivor(&store, &fake, OrphanPolicy::default());
    lablink.reconcile().await.unwrap();
    let op = lablink
        .launch_and_wait(2, Duration::from_secs(60))
        .await
        .unwrap();
    // Numbering continues after the crashed launch's names.
    let names: Vec<String> = op.hostnames.iter().map(|h| h.to_string()).collect();
    assert_eq!(names, ["lablink-vm-3", "lablink-vm-4"]);
    assert_converged(&lablink, &fake).await;
}

#[tokio::test(start_paused = true)]
async fn a_running_launch_is_not_mistaken_for_a_crash() {
    let fake = FakeProvisioner::new().with_latency(Duration::from_secs(30));
    let lablink = LabLink::builder()
        .with_provisioner(Arc::new(fake.clone()))
        .build()
        .unwrap();
    let op = lablink.launch(&LaunchOptions { count: 2 }).await.unwrap();
    let err = lablink.reconcile().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert!(err.is_retryable(), "{err}");
    assert_eq!(
        lablink.counts().await.unwrap().requested,
        2,
        "reconcile touched the launch"
    );
    lablink
        .wait_for_operation(op.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(!lablink.reconcile().await.unwrap().changed_anything());
}

/// The store lost everything (an in-memory allocator restarted) while machines still run.
async fn lost_store(policy: OrphanPolicy) -> (LabLink, FakeProvisioner, Vec<Hostname>) {
    let fake = FakeProvisioner::new();
    let first = survivor(&MemoryVmStore::new(), &fake, policy);
    let op = first
        .launch_and_wait(3, Duration::from_secs(60))
        .await
        .unwrap();
    drop(first);
    (
        survivor(&MemoryVmStore::new(), &fake, policy),
        fake,
        op.hostnames,
    )
}

#[tokio::test(start_paused = true)]
async fn orphans_are_adopted_as_failed_records_by_default() {
    let (lablink, fake, hosts) = lost_store(OrphanPolicy::default()).await;
    let report = lablink.reconcile().await.unwrap();
    assert_eq!(report.adopted, hosts, "{report:?}");
    assert!(report.terminated.is_empty());
    assert_eq!(
        fake.list().await.unwrap().len(),
        3,
        "adopting destroyed a machine"
    );
    for r in lablink.vms(&VmFilter::default()).await.unwrap() {
        assert_eq!(
            r.state,
            VmState::Failed,
            "an adopted VM must never be assignable"
        );
        assert!(r.token_digest.is_none());
        assert!(r.last_error.as_deref().unwrap().contains("adopted"));
    }
    assert_converged(&lablink, &fake).await;
    // Adopted machines are destroyable like any other.
    let op = lablink.destroy(&DestroyTarget::All).await.unwrap();
    lablink
        .wait_for_operation(op.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(fake.list().await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn orphans_are_terminated_when_configured() {
    let (lablink, fake, hosts) = lost_store(OrphanPolicy::Terminate).await;
    let report = lablink.reconcile().await.unwrap();
    assert_eq!(report.terminated, hosts, "{report:?}");
    assert!(fake.list().await.unwrap().is_empty());
    assert_eq!(lablink.counts().await.unwrap().total, 0);
    assert_converged(&lablink, &fake).await;
}

#[tokio::test(start_paused = true)]
async fn a_record_whose_machine_vanished_becomes_failed_and_frees_its_owner() {
    let fake = FakeProvisioner::new();
    let lablink = survivor(&MemoryVmStore::new(), &fake, OrphanPolicy::default());
    let op = lablink
        .launch_and_wait(2, Duration::from_secs(60))
        .await
        .unwrap();
    for h in &op.hostnames {
        let running = Telemetry {
            status: Some(lablink_core::AgentStatus::Running),
            ..Default::default()
        };
        lablink.report(h, running).await.unwrap();
    }
    let request = lablink_core::VmRequest {
        email: lablink_core::testing::store::email("ada"),
        crd_command: Some(lablink_core::testing::store::command("ada")),
    };
    let granted = lablink.request_vm(&request).await.unwrap();
    // Someone deletes the participant's machine in the cloud console.
    let gone = fake
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.hostname == granted.hostname)
        .unwrap();
    fake.destroy(&[gone]).await.unwrap();

    let report = lablink.reconcile().await.unwrap();
    assert_eq!(report.failed, vec![granted.hostname.clone()], "{report:?}");
    let record = lablink.vm(&granted.hostname).await.unwrap();
    assert_eq!(record.state, VmState::Failed);
    assert!(record.assignment.is_none());
    // The participant can ask again and gets the other VM.
    let again = lablink.request_vm(&request).await.unwrap();
    assert_ne!(again.hostname, granted.hostname);
    assert_converged(&lablink, &fake).await;
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_destroy_is_finished() {
    let fake = FakeProvisioner::new();
    let store = MemoryVmStore::new();
    let lablink = survivor(&store, &fake, OrphanPolicy::default());
    let op = lablink
        .launch_and_wait(2, Duration::from_secs(60))
        .await
        .unwrap();
    // The destroy was recorded (records `Terminating`), then the process died.
    for h in &op.hostnames {
        store
            .apply(h, &VmEvent::Destroy, None, Utc::now())
            .await
            .unwrap();
    }
    let report = lablink.reconcile().await.unwrap();
    assert_eq!(report.removed, op.hostnames, "{report:?}");
    assert!(fake.list().await.unwrap().is_empty());
    assert_eq!(lablink.counts().await.unwrap().total, 0);
    assert_converged(&lablink, &fake).await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_record_that_never_learned_its_machine_gets_it_terminated() {
    let (store, fake) = (MemoryVmStore::new(), FakeProvisioner::new());
    std::thread::scope(|s| {
        s.spawn(|| crash_a_launch(&store, &fake, 1, CrashAt::BeforeProviderCall));
    });
    let lablink = survivor(&store, &fake, OrphanPolicy::default());
    lablink.reconcile().await.unwrap();
    // The provider creates the machine late (an eventually consistent inventory).
    let host: Hostname = "lablink-vm-1".parse().unwrap();
    fake.insert_orphan(host.clone());
    let report = lablink.reconcile().await.unwrap();
    assert_eq!(report.terminated, vec![host], "{report:?}");
    assert!(fake.list().await.unwrap().is_empty());
    assert_converged(&lablink, &fake).await;
}
