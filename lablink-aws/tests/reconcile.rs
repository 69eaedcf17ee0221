//! Crash safety against moto_server: a launch the emulator completed but the store never
//! heard of (a crash between the EC2 call and the store update) is found by its tags and
//! attached, adopted or terminated by `LabLink::reconcile`; nothing is left running
//! unaccounted.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use lablink_aws::Ec2Provisioner;
use lablink_core::testing::provisioner::request;
use lablink_core::{
    AllocatorConfig, LabLink, MemoryVmStore, OrphanPolicy, Provisioner, VmFilter, VmRecord,
    VmState, VmStore,
};

fn lablink(p: &Arc<Ec2Provisioner>, store: &Arc<MemoryVmStore>, orphans: OrphanPolicy) -> LabLink {
    LabLink::builder()
        .with_store(store.clone())
        .with_provisioner(p.clone())
        .with_config(AllocatorConfig {
            orphan_policy: orphans,
            ..Default::default()
        })
        .build()
        .unwrap()
}

fn names<'a>(hosts: impl IntoIterator<Item = &'a lablink_core::Hostname>) -> BTreeSet<String> {
    hosts.into_iter().map(|h| h.to_string()).collect()
}

/// Every machine EC2 has is recorded in the store, under the same instance id.
async fn nothing_unaccounted(p: &Ec2Provisioner, store: &MemoryVmStore) {
    let records = store.list(&VmFilter::default()).await.unwrap();
    for machine in p.list().await.unwrap() {
        let record = records
            .iter()
            .find(|r| r.hostname == machine.hostname)
            .unwrap_or_else(|| panic!("{} runs without a record", machine.hostname));
        assert_eq!(record.instance_id.as_ref(), Some(&machine.instance_id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_cut_short_before_the_store_update_is_attached() {
    let p = Arc::new(common::provisioner("crash-attach").await);
    let store = Arc::new(MemoryVmStore::default());
    // The allocator records the VMs as Requested, calls EC2, then crashes before recording
    // the instance ids.
    let req = request(&["ca-a", "ca-b"]);
    let now = chrono::Utc::now();
    let records: Vec<VmRecord> = req
        .vms
        .iter()
        .map(|s| VmRecord::new(s.hostname.clone(), Some(s.token.digest()), now))
        .collect();
    store.insert(&records).await.unwrap();
    let vms = p.launch(&req).await.unwrap();

    let report = lablink(&p, &store, OrphanPolicy::Terminate)
        .reconcile()
        .await
        .unwrap();
    assert_eq!(
        names(&report.attached),
        names(req.vms.iter().map(|s| &s.hostname))
    );
    assert!(
        report.terminated.is_empty() && report.errors.is_empty(),
        "{report:?}"
    );
    for vm in &vms {
        let record = store.get(&vm.hostname).await.unwrap();
        assert_eq!(record.instance_id.as_ref(), Some(&vm.instance_id));
        assert_eq!(record.state, VmState::Booting);
    }
    nothing_unaccounted(&p, &store).await;
    p.destroy(&vms).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_the_store_forgot_is_terminated_or_adopted() {
    let p = Arc::new(common::provisioner("crash-forgot").await);
    let store = Arc::new(MemoryVmStore::default());

    // Terminate: the machines nobody recorded are destroyed.
    let forgotten = p.launch(&request(&["cf-a", "cf-b", "cf-c"])).await.unwrap();
    let report = lablink(&p, &store, OrphanPolicy::Terminate)
        .reconcile()
        .await
        .unwrap();
    assert_eq!(
        names(&report.terminated),
        names(forgotten.iter().map(|v| &v.hostname))
    );
    assert!(
        p.list().await.unwrap().is_empty(),
        "nothing is left running"
    );

    // Adopt: they are recorded as Failed with their instance ids, visible and destroyable.
    let forgotten = p.launch(&request(&["cf-d", "cf-e"])).await.unwrap();
    let report = lablink(&p, &store, OrphanPolicy::Adopt)
        .reconcile()
        .await
        .unwrap();
    assert_eq!(
        names(&report.adopted),
        names(forgotten.iter().map(|v| &v.hostname))
    );
    for vm in &forgotten {
        assert_eq!(
            store.get(&vm.hostname).await.unwrap().state,
            VmState::Failed
        );
    }
    nothing_unaccounted(&p, &store).await;
    let again = lablink(&p, &store, OrphanPolicy::Adopt)
        .reconcile()
        .await
        .unwrap();
    assert!(!again.changed_anything(), "reconcile converges: {again:?}");
    p.destroy(&forgotten).await.unwrap();
}

/// A crash between `RunInstances` and `CreateTags`: the instances carry the deployment tag
/// but no hostname. They are listed under their instance ids, and reconcile removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_launched_but_never_named_are_terminated() {
    let proxy = common::FaultProxy::start(&common::endpoint()).await;
    let (builder, calls) = common::builder_at(&proxy.url, "crash-untagged").await;
    let p = Arc::new(builder.build().await.unwrap());
    // Tagging fails, and so does the provisioner's own clean-up: as if it had died there.
    proxy.fail(&["Action=CreateTags"], 503, "ServiceUnavailable");
    proxy.fail(&["Action=TerminateInstances"], 503, "ServiceUnavailable");
    let err = p.launch(&request(&["cu-a", "cu-b"])).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(calls.get("RunInstances"), 1);
    proxy.clear();

    let listed = p.list().await.unwrap();
    assert_eq!(listed.len(), 2, "both instances exist: {listed:?}");
    for vm in &listed {
        assert_eq!(
            vm.hostname.as_str(),
            vm.instance_id.as_str(),
            "listed by instance id"
        );
    }
    let store = Arc::new(MemoryVmStore::default());
    let report = lablink(&p, &store, OrphanPolicy::Terminate)
        .reconcile()
        .await
        .unwrap();
    assert_eq!(report.terminated.len(), 2, "{report:?}");
    assert!(
        p.list().await.unwrap().is_empty(),
        "nothing is left running"
    );
}
