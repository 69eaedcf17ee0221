//! The workshop-settings and warnings part of the [`VmStore`] conformance suite (stamped out
//! with the rest by [`vm_store_conformance!`](crate::vm_store_conformance)). Each function
//! starts from an empty store.

use std::time::Duration;

use futures::future::join_all;
use uuid::Uuid;

use super::store::{email, host, seed_available, t0};
use crate::settings::{PoolSettings, ScheduleSettings, WorkshopSettings};
use crate::{ErrorKind, VmStore, VmWarning, WarningKind};

/// Settings with `min_available` free VMs and destruction times `hours` after `t0()`.
pub fn workshop_settings(min_available: usize, hours: &[i64]) -> WorkshopSettings {
    WorkshopSettings {
        pool: PoolSettings {
            enabled: true,
            min_available,
            max_total: 40,
            idle_ttl: Duration::from_secs(900),
        },
        destruction: ScheduleSettings {
            times: hours
                .iter()
                .map(|h| t0() + chrono::Duration::hours(*h))
                .collect(),
            warning: Duration::from_secs(1800),
        },
        revision: 0,
        updated_at: Some(t0()),
        updated_by: Some("admin (session)".into()),
    }
}

/// No settings until some are put; a put made from the stored revision stores them as the
/// next revision, every field intact; a put from any other revision is a `Conflict` and
/// changes nothing.
pub async fn workshop_settings_are_saved_only_from_the_stored_revision(store: &dyn VmStore) {
    assert_eq!(
        store.workshop_settings().await.unwrap(),
        None,
        "a new store"
    );
    let first = workshop_settings(2, &[5]);
    let e = store.put_workshop_settings(&first, 1).await.unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::Conflict,
        "nothing is stored at revision 1"
    );
    assert_eq!(store.workshop_settings().await.unwrap(), None);

    let saved = store.put_workshop_settings(&first, 0).await.unwrap();
    assert_eq!(
        saved,
        WorkshopSettings {
            revision: 1,
            ..first.clone()
        }
    );
    assert_eq!(
        store.workshop_settings().await.unwrap().as_ref(),
        Some(&saved)
    );

    let second = WorkshopSettings {
        pool: PoolSettings {
            enabled: false,
            ..first.pool.clone()
        },
        destruction: ScheduleSettings {
            times: Vec::new(),
            warning: Duration::ZERO,
        },
        updated_by: None,
        ..workshop_settings(7, &[])
    };
    for stale in [0, 2] {
        let e = store
            .put_workshop_settings(&second, stale)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict, "from revision {stale}");
    }
    assert_eq!(store.workshop_settings().await.unwrap(), Some(saved));
    let third = store.put_workshop_settings(&second, 1).await.unwrap();
    assert_eq!(third.revision, 2);
    assert_eq!(
        store.workshop_settings().await.unwrap(),
        Some(WorkshopSettings {
            revision: 2,
            ..second
        })
    );

    let many = workshop_settings(1, &[1, 2, 3, 30, 31]);
    let fourth = store.put_workshop_settings(&many, 2).await.unwrap();
    assert_eq!(fourth.destruction.times, many.destruction.times);
    assert_eq!(store.workshop_settings().await.unwrap(), Some(fourth));
}

/// Of many saves made from one revision at once, exactly one is stored.
pub async fn concurrent_settings_saves_store_exactly_one(store: &dyn VmStore) {
    let candidates: Vec<WorkshopSettings> = (1..=8).map(|k| workshop_settings(k, &[])).collect();
    let results = join_all(candidates.iter().map(|s| store.put_workshop_settings(s, 0))).await;
    let saved: Vec<&WorkshopSettings> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(saved.len(), 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        }
    }
    assert_eq!(
        store.workshop_settings().await.unwrap().as_ref(),
        Some(saved[0])
    );
    assert_eq!(saved[0].revision, 1);
}

/// A warning due `minutes` after `t0()`.
fn warning(vm: &str, kind: WarningKind, who: &str, minutes: i64) -> VmWarning {
    VmWarning::new(
        host(vm),
        kind,
        email(who),
        t0() + chrono::Duration::minutes(minutes),
        t0(),
    )
}

/// A VM keeps one warning per kind and due time: putting it again (another leader, a
/// retry) returns the stored one; warnings list by hostname, due time and kind, every field
/// intact; a warning for an unknown VM is `NotFound`.
pub async fn warnings_are_kept_once_per_vm_kind_and_due_time(store: &dyn VmStore) {
    let vms = seed_available(store, 2).await;
    assert!(store.all_warnings().await.unwrap().is_empty());
    let late = warning(vms[0].as_str(), WarningKind::Destruction, "ada", 30);
    let early = warning(vms[0].as_str(), WarningKind::IdleRelease, "ada", 10);
    let same_time = warning(vms[0].as_str(), WarningKind::IdleRelease, "ada", 30);
    let other = warning(vms[1].as_str(), WarningKind::Destruction, "bob", 5);
    for w in [&late, &early, &same_time, &other] {
        assert_eq!(&store.put_warning(w).await.unwrap(), w);
    }
    let again = VmWarning {
        message: "another leader's words".into(),
        ..warning(vms[0].as_str(), WarningKind::Destruction, "ada", 30)
    };
    assert_ne!(again.id, late.id);
    assert_eq!(
        store.put_warning(&again).await.unwrap(),
        late,
        "the stored one, unchanged"
    );
    assert_eq!(
        store.all_warnings().await.unwrap(),
        [early, late, same_time, other.clone()],
        "by hostname, due time, kind"
    );
    assert_eq!(store.warnings(&vms[1]).await.unwrap(), [other]);
    assert!(store
        .warnings(&host("vm-unknown"))
        .await
        .unwrap()
        .is_empty());
    let e = store
        .put_warning(&warning("vm-unknown", WarningKind::Destruction, "cy", 1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

/// An acknowledgement keeps its first time and needs the warning's own VM; removed warnings
/// are gone, and so are a removed VM's.
pub async fn warnings_are_acknowledged_once_and_go_with_their_vm(store: &dyn VmStore) {
    let vms = seed_available(store, 2).await;
    let a = warning(vms[0].as_str(), WarningKind::Destruction, "ada", 30);
    let b = warning(vms[0].as_str(), WarningKind::IdleRelease, "ada", 20);
    let c = warning(vms[1].as_str(), WarningKind::Destruction, "bob", 30);
    for w in [&a, &b, &c] {
        store.put_warning(w).await.unwrap();
    }
    let first = t0() + chrono::Duration::minutes(1);
    let acked = store
        .acknowledge_warning(&vms[0], a.id, first)
        .await
        .unwrap();
    assert_eq!(acked.acknowledged_at, Some(first));
    let later = first + chrono::Duration::minutes(5);
    let again = store
        .acknowledge_warning(&vms[0], a.id, later)
        .await
        .unwrap();
    assert_eq!(again.acknowledged_at, Some(first), "the first time stays");
    let e = store
        .acknowledge_warning(&vms[1], a.id, later)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "another VM's warning");
    let e = store
        .acknowledge_warning(&vms[0], Uuid::new_v4(), later)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "an unknown warning");
    let listed = store.warnings(&vms[0]).await.unwrap();
    assert_eq!(listed[1].acknowledged_at, Some(first), "{listed:?}");
    assert_eq!(listed[0].acknowledged_at, None);

    assert_eq!(
        store
            .remove_warnings(&[b.id, Uuid::new_v4()])
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.warnings(&vms[0]).await.unwrap().len(), 1);
    store.remove(std::slice::from_ref(&vms[0])).await.unwrap();
    assert_eq!(
        store.all_warnings().await.unwrap(),
        [c],
        "a removed VM's warnings go with it"
    );
}
