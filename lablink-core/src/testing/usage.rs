//! The usage part of the [`VmStore`] conformance suite (stamped out with the rest by
//! [`vm_store_conformance!`](crate::vm_store_conformance)). Each function starts from an
//! empty store.

use chrono::{DateTime, Duration, Utc};

use super::store::{claim_request, host, t0};
use crate::usage::Seconds;
use crate::{Telemetry, VmEvent, VmRecord, VmStore};

fn at(seconds: i64) -> DateTime<Utc> {
    t0() + Duration::seconds(seconds)
}

fn seconds_of(store_usage: &crate::FleetUsage, instance_type: &str) -> Seconds {
    store_usage
        .by_instance_type
        .get(instance_type)
        .copied()
        .unwrap_or_default()
}

/// A VM's time is accounted to the kind it was in at each change — starting until ready,
/// free until claimed (the store's claim accounts it), idle until in use — and read up to
/// any `now`; a removed VM's whole time stays in the totals.
pub async fn usage_accumulates_by_kind_and_outlives_the_vm(store: &dyn VmStore) {
    let vm = host("use-1");
    store
        .insert(&[VmRecord::new(vm.clone(), None, at(0))])
        .await
        .unwrap();
    let provisioned = VmEvent::Provisioned {
        instance_id: "i-use1".parse().unwrap(),
        address: None,
        instance_type: Some("g4dn.xlarge".into()),
    };
    store.apply(&vm, &provisioned, None, at(60)).await.unwrap();
    store
        .apply(&vm, &VmEvent::AgentReady, None, at(300))
        .await
        .unwrap();
    let claimed = store.claim(&claim_request("ada"), at(900)).await.unwrap();
    assert_eq!(claimed.record.hostname, vm);
    let in_use = Telemetry {
        in_use: Some(true),
        ..Telemetry::default()
    };
    store
        .record_telemetry(&vm, &in_use, at(1000))
        .await
        .unwrap();

    let usage = store.usage(at(1600)).await.unwrap();
    let want = Seconds {
        starting: 300.0,
        free: 600.0,
        idle: 100.0,
        in_use: 600.0,
        other: 0.0,
    };
    assert_eq!(seconds_of(&usage, "g4dn.xlarge"), want);
    assert_eq!(usage.seconds().total(), 1600.0);
    // Reading later only adds time to the kind the VM is in now.
    let later = store.usage(at(2600)).await.unwrap();
    assert_eq!(seconds_of(&later, "g4dn.xlarge").in_use, 1600.0);

    for (event, when) in [(VmEvent::Destroy, 3000), (VmEvent::Terminated, 3060)] {
        store.apply(&vm, &event, None, at(when)).await.unwrap();
    }
    let record = store.get(&vm).await.unwrap();
    assert_eq!(record.history.assignments.len(), 1, "{:?}", record.history);
    assert_eq!(record.history.assignments[0].ended_at, at(3000));
    store.remove(std::slice::from_ref(&vm)).await.unwrap();
    let gone = store.usage(at(9000)).await.unwrap();
    let whole = Seconds {
        in_use: 2000.0,
        other: 60.0,
        ..want
    };
    assert_eq!(seconds_of(&gone, "g4dn.xlarge"), whole);
    assert_eq!(gone.seconds().total(), 3060.0);
    // What an export needs of it is kept, no secret.
    let removed = store.removed_vms().await.unwrap();
    assert_eq!(removed.len(), 1);
    let kept = &removed[0];
    assert_eq!(kept.hostname, vm);
    assert_eq!(kept.instance_type.as_deref(), Some("g4dn.xlarge"));
    assert_eq!(kept.usage, whole);
    assert_eq!(kept.ended_at, at(3060));
    assert_eq!(kept.history.assignments.len(), 1);
    assert_eq!(
        kept.history.assignments[0].email.as_str(),
        "ada@example.org"
    );
}
