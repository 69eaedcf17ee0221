//! The provisioner under the real allocator (`LabLink` + `MemoryVmStore`) and the real
//! terraform binary: state, outputs and store agree at every step, assigned VMs are never
//! touched, a wiped store or a lost variables file never shrinks or replaces the fleet, and
//! an agent that reports during the launch finds its record.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use lablink_core::{
    AgentStatus, AgentToken, Allocator, AllocatorConfig, AllocatorExt, DestroyTarget, Hostname,
    LabLink, LaunchOptions, MemoryVmStore, OperationStatus, Progress, Provisioner, Telemetry,
    VmRequest, VmState,
};
use lablink_terraform::TerraformProvisioner;
use serde_json::json;

const PATIENCE: Duration = Duration::from_secs(120);

async fn make_available(lablink: &impl Allocator, hostname: &Hostname) {
    let telemetry = Telemetry {
        status: Some(AgentStatus::Running),
        ..Default::default()
    };
    let record = lablink.report(hostname, telemetry).await.unwrap();
    assert_eq!(record.state, VmState::Available, "{hostname}");
}

/// Store, provisioner inventory and Terraform's own outputs name the same machines.
async fn assert_agreement(store: &MemoryVmStore, p: &dyn Provisioner, dir: &std::path::Path) {
    let listed = ids(&p.list().await.unwrap());
    assert_eq!(
        state_ids(dir),
        listed,
        "terraform output vs provisioner list"
    );
    assert_eq!(store_ids(store).await, listed, "store vs provisioner list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_grow_and_destroy_by_name_keep_state_outputs_and_store_in_agreement() {
    let dir = tempfile::tempdir().unwrap();
    let provisioner = Arc::new(builder(dir.path()).build().unwrap());
    let store = MemoryVmStore::default();
    let lablink = lablink(&store, provisioner.clone());

    // Launch 3; one gets assigned.
    let op = lablink.launch_and_wait(3, PATIENCE).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    assert_agreement(&store, provisioner.as_ref(), dir.path()).await;
    for name in ["lablink-vm-1", "lablink-vm-2", "lablink-vm-3"] {
        make_available(&lablink, &name.parse().unwrap()).await;
    }
    let granted = lablink
        .request_vm(&VmRequest {
            email: "ada@lab.org".parse().unwrap(),
            crd_command: Some("start-host --code=abc".parse().unwrap()),
        })
        .await
        .unwrap();
    let assigned = granted.hostname.clone();
    let assigned_id = state_ids(dir.path())[assigned.as_str()].clone();
    let first_ids = state_ids(dir.path());

    // Launch 2 more: 5 machines, the first 3 untouched.
    let op = lablink.launch_and_wait(2, PATIENCE).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    assert_agreement(&store, provisioner.as_ref(), dir.path()).await;
    let after_grow = state_ids(dir.path());
    assert_eq!(after_grow.len(), 5);
    for (name, id) in &first_ids {
        assert_eq!(
            &after_grow[name], id,
            "{name} was replaced by the second launch"
        );
    }

    // Destroy one unassigned VM by name: 4 left, the others untouched.
    let doomed: Hostname = first_ids
        .keys()
        .find(|n| n.as_str() != assigned.as_str())
        .unwrap()
        .parse()
        .unwrap();
    let op = lablink
        .destroy(&DestroyTarget::Hostnames(vec![doomed.clone()]))
        .await
        .unwrap();
    let op = lablink.wait_for_operation(op.id, PATIENCE).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    assert_agreement(&store, provisioner.as_ref(), dir.path()).await;
    let after_destroy = state_ids(dir.path());
    assert_eq!(after_destroy.len(), 4);
    assert!(!after_destroy.contains_key(doomed.as_str()));
    for (name, id) in &after_grow {
        if name != doomed.as_str() {
            assert_eq!(
                &after_destroy[name], id,
                "{name} was touched by the destroy"
            );
        }
    }

    // The assigned VM kept its machine and its participant throughout.
    assert_eq!(after_destroy[assigned.as_str()], assigned_id);
    let record = lablink.vm(&assigned).await.unwrap();
    assert_eq!(record.state, VmState::Assigned);
    assert_eq!(record.instance_id.unwrap().as_str(), assigned_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_store_does_not_shrink_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let first = lablink(
        &MemoryVmStore::default(),
        Arc::new(builder(dir.path()).build().unwrap()),
    );
    let op = first.launch_and_wait(3, PATIENCE).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    let before = state_ids(dir.path());
    assert_eq!(before.len(), 3);

    // A new allocator process with an empty store (and a new provisioner on the same
    // working directory) launches 2 VMs under other names.
    let wiped = MemoryVmStore::default();
    let second = lablink_with_prefix(&wiped, builder(dir.path()).build().unwrap(), "wave2");
    let op = second.launch_and_wait(2, PATIENCE).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");

    let after = state_ids(dir.path());
    assert_eq!(after.len(), 5, "the fleet is state ∪ request: {after:?}");
    for (name, id) in &before {
        assert_eq!(
            after.get(name),
            Some(id),
            "{name} was destroyed or replaced"
        );
    }
    assert!(after.contains_key("wave2-1") && after.contains_key("wave2-2"));

    // A third allocator with an empty store and the default names numbers its VM after the
    // machines Terraform already has: nothing is reused, shrunk or replaced.
    let third = lablink(
        &MemoryVmStore::default(),
        Arc::new(builder(dir.path()).build().unwrap()),
    );
    let op = third.launch_and_wait(1, PATIENCE).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    assert_eq!(op.hostnames[0].as_str(), "lablink-vm-4");
    let last = state_ids(dir.path());
    assert_eq!(last.len(), after.len() + 1, "{last:?}");
    for (name, id) in &after {
        assert_eq!(last.get(name), Some(id), "{name} was destroyed or replaced");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_variables_file_neither_shrinks_nor_replaces_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let p = builder(dir.path()).build().unwrap();
    p.launch(&request(&["keep-1", "keep-2"])).await.unwrap();
    let before = state_ids(dir.path());
    std::fs::remove_file(dir.path().join("terraform.tfvars.json")).unwrap();

    let p = builder(dir.path()).build().unwrap();
    let vms = p.launch(&request(&["new-1"])).await.unwrap();
    assert_eq!(ids(&vms).keys().collect::<Vec<_>>(), ["new-1"]);
    let after = state_ids(dir.path());
    assert_eq!(after.len(), 3);
    for (name, id) in &before {
        assert_eq!(
            after.get(name),
            Some(id),
            "{name} was replaced: its token was lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reporting_during_the_launch_finds_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let provisioner = builder(dir.path())
        .with_variables(vars(&[("apply_delay_seconds", json!(3))]))
        .build()
        .unwrap();
    let store = MemoryVmStore::default();
    let lablink = lablink(&store, Arc::new(provisioner));
    let op = lablink.launch(&LaunchOptions { count: 1 }).await.unwrap();

    // The VM's token reaches Terraform through the variables file before the apply; an
    // agent using it while the apply still runs is recognised and its report lands.
    let tfvars = dir.path().join("terraform.tfvars.json");
    let token = loop {
        let vms = std::fs::read(&tfvars)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| {
                v["vms"]["lablink-vm-1"]["token"]
                    .as_str()
                    .map(str::to_owned)
            });
        if let Some(token) = vms {
            break AgentToken::from(token);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(lablink.operation(op.id).await.unwrap().is_running());
    let hostname = lablink.authenticate_agent(&token).await.unwrap();
    assert_eq!(hostname.as_str(), "lablink-vm-1");
    let telemetry = Telemetry {
        status: Some(AgentStatus::Running),
        ..Default::default()
    };
    let record = lablink.report(&hostname, telemetry).await.unwrap();
    assert_eq!(
        record.state,
        VmState::Requested,
        "the apply is still running"
    );

    let op = lablink.wait_for_operation(op.id, PATIENCE).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    let record = lablink.vm(&hostname).await.unwrap();
    assert_eq!(
        record.state,
        VmState::Available,
        "ready as soon as provisioned"
    );
    assert_eq!(
        record.instance_id.unwrap().as_str(),
        state_ids(dir.path())["lablink-vm-1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_lines_stream_terraform_output_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let p = builder(dir.path()).build().unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let mut req = request(&["pv-1", "pv-2"]);
    req.progress = Progress::new(move |line| sink.lock().unwrap().push(line.to_owned()));
    let tokens: Vec<String> = req
        .vms
        .iter()
        .map(|s| s.token.expose().to_owned())
        .collect();
    p.launch(&req).await.unwrap();
    let lines = lines.lock().unwrap().clone();
    assert!(
        lines.iter().any(|l| l.contains("Apply complete!")),
        "{lines:#?}"
    );
    assert!(lines
        .iter()
        .any(|l| l.contains("terraform_data.vm[\"pv-1\"]")));
    for line in &lines {
        for token in &tokens {
            assert!(!line.contains(token.as_str()), "a token leaked: {line}");
        }
    }
    let counts: BTreeMap<_, _> = ids(&p.list().await.unwrap());
    assert_eq!(counts.len(), 2);
}

/// A LabLink whose VMs are named `<prefix>-<n>`.
fn lablink_with_prefix(store: &MemoryVmStore, p: TerraformProvisioner, prefix: &str) -> LabLink {
    LabLink::builder()
        .with_store(Arc::new(store.clone()))
        .with_provisioner(Arc::new(p))
        .with_config(AllocatorConfig {
            hostname_prefix: prefix.into(),
            ..Default::default()
        })
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_launches_on_one_working_directory_are_serialized() {
    // Two provisioners on one directory, in one process: without the in-process lock the
    // second apply would meet the first one's state lock and fail with a Conflict.
    let dir = tempfile::tempdir().unwrap();
    let slow = || {
        builder(dir.path())
            .with_variables(vars(&[("apply_delay_seconds", json!(1))]))
            .build()
            .unwrap()
    };
    let (a, b) = (slow(), slow());
    let (req_a, req_b) = (request(&["a-1"]), request(&["b-1"]));
    let (ra, rb) = tokio::join!(a.launch(&req_a), b.launch(&req_b));
    ra.unwrap();
    rb.unwrap();
    let all = state_ids(dir.path());
    assert_eq!(
        all.keys().collect::<Vec<_>>(),
        ["a-1", "b-1"],
        "neither launch lost the other's VM"
    );
}
