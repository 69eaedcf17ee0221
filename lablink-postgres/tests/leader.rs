//! Two supervisors, each on its own allocator and pool, on one PostgreSQL database: only
//! the holder of the leader lease acts; when it dies the other takes over.

mod common;

use std::sync::Arc;
use std::time::Duration;

use lablink_core::{
    Allocator, AllocatorConfig, AllocatorExt, DestroyTarget, FakeProvisioner, LabLink,
    SupervisorConfig,
};
use lablink_postgres::PgVmStore;
use sqlx::PgPool;

use common::replica_pool;

const MS: Duration = Duration::from_millis(1);

async fn replica(pool: &PgPool, name: &str, fake: &FakeProvisioner) -> LabLink {
    let mut supervisor = SupervisorConfig {
        tick: 100 * MS,
        leader_lease: 1000 * MS,
        ..Default::default()
    };
    supervisor.pool.enabled = true;
    supervisor.pool.min_available = 2;
    LabLink::builder()
        .with_store(Arc::new(PgVmStore::new(replica_pool(pool, 4, name).await)))
        .with_provisioner(Arc::new(fake.clone()))
        .with_config(AllocatorConfig {
            supervisor,
            ..Default::default()
        })
        .build()
        .unwrap()
}

#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn one_supervisor_acts_at_a_time_and_the_other_takes_over_when_it_dies(pool: PgPool) {
    // One cloud account, two allocator processes.
    let fake = FakeProvisioner::new();
    let a = replica(&pool, "replica-a", &fake).await;
    let b = replica(&pool, "replica-b", &fake).await;
    let sa = a.start_supervisor().unwrap();
    tokio::time::sleep(300 * MS).await;
    let sb = b.start_supervisor().unwrap();

    // For two seconds: A leads, B follows and never acts.
    for _ in 0..20 {
        tokio::time::sleep(100 * MS).await;
        let (ta, tb) = (sa.status(), sb.status());
        assert!(ta.leader, "A lost the lease while alive: {ta:?}");
        assert!(!tb.leader, "two leaders at once");
    }
    let (ta, tb) = (sa.status(), sb.status());
    assert_eq!(tb.leader_holder.as_deref(), Some(ta.id.as_str()));
    assert_eq!(ta.counters.pool_launched, 2);
    assert_eq!(tb.counters.pool_launched, 0, "a follower acted");
    assert_eq!(a.counts().await.unwrap().total, 2);
    assert!(tb.counters.ticks >= 10, "B did not keep trying");

    // A dies without resigning: B takes over once the lease has run out.
    drop(sa);
    let mut waited = Duration::ZERO;
    while !sb.status().leader {
        assert!(waited < Duration::from_secs(10), "B never took over");
        tokio::time::sleep(100 * MS).await;
        waited += 100 * MS;
    }
    assert!(waited >= 500 * MS, "B took a live lease after {waited:?}");

    // B now acts: after the admin destroys everything, B's pool refills it.
    let op = b.destroy(&DestroyTarget::All).await.unwrap();
    b.wait_for_operation(op.id, Duration::from_secs(30))
        .await
        .unwrap();
    let mut waited = Duration::ZERO;
    while b.counts().await.unwrap().total < 2 {
        assert!(waited < Duration::from_secs(10), "B's pool did not refill");
        tokio::time::sleep(100 * MS).await;
        waited += 100 * MS;
    }
    assert_eq!(sb.status().counters.pool_launched, 2);
    assert_eq!(b.counts().await.unwrap().total, 2);

    // A graceful stop hands over at once.
    let c = replica(&pool, "replica-c", &fake).await;
    let sc = c.start_supervisor().unwrap();
    tokio::time::sleep(300 * MS).await;
    assert!(!sc.status().leader);
    sb.stop().await;
    tokio::time::sleep(300 * MS).await;
    assert!(sc.status().leader, "C did not take over after B resigned");
    sc.stop().await;
}
