//! Three allocator replicas, each with its own pools, on one database.

mod common;

use std::collections::{HashMap, HashSet};

use futures::stream::{self, StreamExt};
use lablink_core::{Allocator, ErrorKind, VmFilter, VmState, VmStore};
use lablink_postgres::PgVmStore;
use sqlx::PgPool;

use common::{replica, request, seed_available, who};

/// 2,000 participants press "get a VM" at once across three replicas; 1,000 VMs exist.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn three_replicas_assign_each_vm_once_and_each_email_once(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    let hosts = seed_available(&store, 1000).await;
    let mut replicas = Vec::new();
    for r in 0..3 {
        replicas.push(replica(&pool, &format!("replica-{r}")).await.0);
    }
    let replicas = &replicas;

    let results: Vec<(usize, lablink_core::Result<lablink_core::Granted>)> = stream::iter(0..2000)
        .map(|i| async move { (i, replicas[i % 3].request_vm(&request(i)).await) })
        .buffer_unordered(256)
        .collect()
        .await;

    let mut granted: HashMap<usize, lablink_core::Granted> = HashMap::new();
    let mut no_capacity = 0;
    for (i, result) in results {
        match result {
            Ok(g) => {
                assert!(g.newly_assigned, "participant {i} was not new");
                granted.insert(i, g);
            }
            Err(e) if e.kind() == ErrorKind::NoCapacity => no_capacity += 1,
            Err(e) => panic!("participant {i}: unexpected error {e}"),
        }
    }
    let vms: HashSet<_> = granted.values().map(|g| g.hostname.clone()).collect();
    assert_eq!(granted.len(), 1000, "exactly 1,000 participants got a VM");
    assert_eq!(vms.len(), 1000, "a VM went to two participants");
    assert_eq!(no_capacity, 1000);
    assert_eq!(vms, hosts.iter().cloned().collect::<HashSet<_>>());

    // The database agrees: 1,000 owned rows, 1,000 distinct owners, matching the answers.
    let assigned = store
        .list(&VmFilter {
            states: vec![VmState::Assigned],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(assigned.len(), 1000);
    let owners: HashMap<String, _> = assigned
        .iter()
        .map(|r| (r.owner().unwrap().as_str().to_owned(), r.hostname.clone()))
        .collect();
    assert_eq!(owners.len(), 1000, "an email owns two VMs");
    for (i, g) in &granted {
        assert_eq!(owners[&format!("{}@example.org", who(*i))], g.hostname);
    }

    // Asking again, on another replica, gives the same VM and PIN back.
    let again: Vec<_> = stream::iter(granted.iter())
        .map(|(i, g)| async move {
            let other = &replicas[(i + 1) % 3];
            (
                g,
                other
                    .request_vm(&request(*i))
                    .await
                    .expect("repeat request"),
            )
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for (first, second) in again {
        assert!(!second.newly_assigned);
        assert_eq!(second.hostname, first.hostname);
        assert_eq!(second.pin, first.pin);
    }
    assert_eq!(store.counts().await.unwrap().assigned, 1000);
}

/// The provisioning lock is exclusive across processes (separate pools, separate sessions).
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn provisioning_is_serialized_across_replicas(pool: PgPool) {
    let a = PgVmStore::new(common::replica_pool(&pool, 2, "replica-a").await);
    let b = PgVmStore::new(common::replica_pool(&pool, 2, "replica-b").await);
    let held = a.lock_provisioning().await.expect("first lock");
    let err = b.lock_provisioning().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    drop(held);
    let mut taken = None;
    for _ in 0..100 {
        match b.lock_provisioning().await {
            Ok(lock) => {
                taken = Some(lock);
                break;
            }
            Err(e) if e.is_conflict() => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(taken.is_some(), "the lock was never released");
    assert_eq!(
        a.lock_provisioning().await.unwrap_err().kind(),
        ErrorKind::Conflict
    );
}
