//! Many waiting agents on one process: one LISTEN connection, every waiter woken, even when
//! that connection is killed mid-run.

mod common;

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use lablink_core::{Allocator, Hostname, LabLink};
use lablink_postgres::{PgNotifier, PgVmStore};
use sqlx::PgPool;
use tokio::task::JoinHandle;

use common::{listen_backends, replica, request, seed_available, who};

/// How long a waiter may wait before the test calls it lost (the allocator's own maximum).
const WAIT: Duration = Duration::from_secs(120);

/// Starts one `wait_for_assignment` task per hostname and returns once all are subscribed.
async fn start_waiters(
    lablink: &LabLink,
    notifier: &PgNotifier,
    hosts: &[Hostname],
) -> Vec<(
    Hostname,
    JoinHandle<lablink_core::Result<Option<lablink_core::Assignment>>>,
)> {
    let waiters: Vec<_> = hosts
        .iter()
        .map(|h| {
            let (lablink, h2) = (lablink.clone(), h.clone());
            let task = tokio::spawn(async move { lablink.wait_for_assignment(&h2, WAIT).await });
            (h.clone(), task)
        })
        .collect();
    while notifier.subscribed_hostnames() < hosts.len() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    waiters
}

/// Asserts every waiter got the assignment the store holds for its VM.
async fn assert_every_waiter_got_its_assignment(
    lablink: &LabLink,
    waiters: Vec<(
        Hostname,
        JoinHandle<lablink_core::Result<Option<lablink_core::Assignment>>>,
    )>,
) {
    for (h, task) in waiters {
        let got = task
            .await
            .expect("waiter task")
            .unwrap_or_else(|e| panic!("{h}: {e}"))
            .unwrap_or_else(|| panic!("{h}: never woken with its assignment"));
        let stored = lablink.vm(&h).await.unwrap().assignment.unwrap();
        assert_eq!(got, stored, "{h}: woken with another assignment");
    }
}

/// Samples, until stopped, the largest number of backends the notifier's pool had open.
fn sample_notifier_backends(pool: PgPool, app: &'static str) -> (Arc<AtomicI64>, JoinHandle<()>) {
    let peak = Arc::new(AtomicI64::new(0));
    let p = peak.clone();
    let task = tokio::spawn(async move {
        loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = $1",
            )
            .bind(app)
            .fetch_one(&pool)
            .await
            .expect("pg_stat_activity");
            p.fetch_max(n, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    (peak, task)
}

/// 10,000 agents wait on one process; notifications use at most two connections (one
/// LISTEN, one for publishing) and every agent receives its own assignment.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn ten_thousand_waiters_share_one_listen_connection(pool: PgPool) {
    let hosts = seed_available(&PgVmStore::new(pool.clone()), 10_000).await;
    let (lablink, notifier) = replica(&pool, "waiters").await;
    let (peak, sampler) = sample_notifier_backends(pool.clone(), "waiters-notifier");
    let waiters = start_waiters(&lablink, &notifier, &hosts).await;
    assert_eq!(listen_backends(&pool).await, 1, "one LISTEN connection");

    let granted: Vec<_> = stream::iter(0..hosts.len())
        .map(|i| {
            let lablink = lablink.clone();
            async move { lablink.request_vm(&request(i)).await.expect("a VM") }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(granted.len(), 10_000);
    assert_every_waiter_got_its_assignment(&lablink, waiters).await;
    sampler.abort();

    let peak = peak.load(Ordering::Relaxed);
    assert!(
        (1..=2).contains(&peak),
        "notifications used {peak} connections"
    );
    assert_eq!(listen_backends(&pool).await, 1, "one LISTEN connection");
    assert_eq!(notifier.reconnects(), 0);
}

/// The LISTEN connection is terminated (three times) while 1,000 agents wait and VMs are
/// being assigned: the notifier reconnects, resyncs, and every agent gets its assignment.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn waiters_survive_the_listen_connection_being_killed(pool: PgPool) {
    let hosts = seed_available(&PgVmStore::new(pool.clone()), 1000).await;
    let (lablink, notifier) = replica(&pool, "killed").await;
    let waiters = start_waiters(&lablink, &notifier, &hosts).await;

    let granted = Arc::new(AtomicUsize::new(0));
    let assigner = {
        let lablink = lablink.clone();
        let granted = granted.clone();
        tokio::spawn(async move {
            for i in 0..1000 {
                let g = lablink.request_vm(&request(i)).await.expect("a VM");
                assert!(g.newly_assigned, "{}", who(i));
                granted.fetch_add(1, Ordering::SeqCst);
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    // The first kill lands in the middle of the assignments, so waiters miss NOTIFYs sent
    // while the notifier is down and only the resync after the reconnect can save them.
    while granted.load(Ordering::SeqCst) < 100 && !assigner.is_finished() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut kills_mid_run = Vec::new();
    let mut killed = 0;
    while killed < 3 && !assigner.is_finished() {
        let before = granted.load(Ordering::SeqCst);
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if n > 0 {
            kills_mid_run.push(before);
        }
        killed += n;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assigner.await.expect("assigner");
    assert!(
        kills_mid_run.first().is_some_and(|&g| g < 1000),
        "no kill landed while VMs were being assigned (granted at each kill: {kills_mid_run:?})"
    );
    assert_every_waiter_got_its_assignment(&lablink, waiters).await;
    assert!(
        notifier.reconnects() >= 1,
        "the notifier never noticed it lost its connection"
    );
    assert_eq!(listen_backends(&pool).await, 1, "LISTEN is back, once");
}
