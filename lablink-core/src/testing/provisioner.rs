//! The [`Provisioner`] conformance suite. Each function starts from a provisioner with no
//! machines.

use std::collections::HashSet;

use super::store::host;
use crate::{AgentToken, ErrorKind, LaunchRequest, ProvisionedVm, Provisioner, VmSpec};

/// A launch request for `names`, each with a fresh token.
pub fn request(names: &[&str]) -> LaunchRequest {
    LaunchRequest {
        vms: names
            .iter()
            .map(|n| VmSpec {
                hostname: host(n),
                token: AgentToken::generate(),
            })
            .collect(),
        ..Default::default()
    }
}

fn names(vms: &[ProvisionedVm]) -> Vec<String> {
    let mut v: Vec<String> = vms.iter().map(|vm| vm.hostname.to_string()).collect();
    v.sort();
    v
}

/// One machine per spec, each with its spec's hostname and a distinct instance id.
pub async fn launch_creates_one_machine_per_spec(p: &dyn Provisioner) {
    let vms = p.launch(&request(&["pv-a", "pv-b", "pv-c"])).await.unwrap();
    assert_eq!(names(&vms), ["pv-a", "pv-b", "pv-c"]);
    let ids: HashSet<_> = vms.iter().map(|vm| vm.instance_id.clone()).collect();
    assert_eq!(ids.len(), 3, "instance ids are not distinct");
}

/// An empty launch creates nothing.
pub async fn an_empty_launch_creates_nothing(p: &dyn Provisioner) {
    assert!(p
        .launch(&LaunchRequest::default())
        .await
        .unwrap()
        .is_empty());
    if p.capabilities().list {
        assert!(p.list().await.unwrap().is_empty());
    }
}

/// `list` reports what was launched, with the same ids.
pub async fn list_shows_launched_machines(p: &dyn Provisioner) {
    if !p.capabilities().list {
        return;
    }
    let mut vms = p.launch(&request(&["pv-a", "pv-b"])).await.unwrap();
    let mut listed = p.list().await.unwrap();
    vms.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    listed.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    let ids = |v: &[ProvisionedVm]| {
        v.iter()
            .map(|vm| (vm.hostname.clone(), vm.instance_id.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&listed), ids(&vms));
}

/// `destroy` removes the named machines and leaves the others.
pub async fn destroy_removes_only_the_named_machines(p: &dyn Provisioner) {
    let vms = p.launch(&request(&["pv-a", "pv-b", "pv-c"])).await.unwrap();
    let doomed: Vec<_> = vms
        .iter()
        .filter(|vm| vm.hostname.as_str() != "pv-b")
        .cloned()
        .collect();
    p.destroy(&doomed).await.unwrap();
    if p.capabilities().list {
        assert_eq!(names(&p.list().await.unwrap()), ["pv-b"]);
    }
}

/// Destroying machines that are already gone is not an error.
pub async fn destroy_is_idempotent(p: &dyn Provisioner) {
    let vms = p.launch(&request(&["pv-a"])).await.unwrap();
    p.destroy(&vms).await.unwrap();
    p.destroy(&vms).await.unwrap();
    if p.capabilities().list {
        assert!(p.list().await.unwrap().is_empty());
    }
}

/// Launching a hostname that exists does not create a second machine.
pub async fn relaunching_a_hostname_does_not_duplicate_it(p: &dyn Provisioner) {
    let first = p.launch(&request(&["pv-a"])).await.unwrap();
    let again = p.launch(&request(&["pv-a", "pv-b"])).await.unwrap();
    let a_again: Vec<_> = again
        .iter()
        .filter(|vm| vm.hostname.as_str() == "pv-a")
        .collect();
    assert!(a_again.len() <= 1);
    if let Some(vm) = a_again.first() {
        assert_eq!(vm.instance_id, first[0].instance_id, "pv-a was replaced");
    }
    if p.capabilities().list {
        assert_eq!(names(&p.list().await.unwrap()), ["pv-a", "pv-b"]);
    }
}

/// `reboot` works on a launched machine and is `NotFound` for an unknown one.
pub async fn reboot_reaches_known_machines_only(p: &dyn Provisioner) {
    let vms = p.launch(&request(&["pv-a"])).await.unwrap();
    let ghost = ProvisionedVm {
        hostname: host("pv-ghost"),
        instance_id: "i-ghost".parse().unwrap(),
        address: None,
        instance_type: None,
    };
    if !p.capabilities().reboot {
        let err = p.reboot(&vms[0]).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
        return;
    }
    p.reboot(&vms[0]).await.unwrap();
    let err = p.reboot(&ghost).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}
