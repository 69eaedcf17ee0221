//! `PgNotifier` lifecycle: subscriptions end when the last notifier is dropped, a
//! listening connection that stops answering (a frozen backend, like a half-open TCP
//! connection) is noticed by the keepalive and replaced, and a publishing connection that
//! died since its last use costs no notification.

mod common;

use std::process::Command;
use std::time::Duration;

use lablink_core::testing::store::host;
use lablink_core::{Allocator, Notifier};
use lablink_postgres::{PgNotifier, PgNotifierOptions, PgVmStore};
use sqlx::PgPool;

use common::{listen_backends, replica, replica_pool, request, seed_available};
use lablink_core::notifier::Wake;

/// Long enough for anything here to happen on a loaded machine; a hang fails, not a slow run.
const PATIENCE: Duration = Duration::from_secs(30);

#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn dropping_the_last_notifier_ends_its_subscriptions(pool: PgPool) {
    let notifier = PgNotifier::connect(replica_pool(&pool, 2, "dropped").await)
        .await
        .unwrap();
    let publisher = PgNotifier::connect(pool.clone()).await.unwrap();
    let h = host("vm-a");
    let mut sub = notifier.subscribe(&h).await.unwrap();

    // A clone going away changes nothing: the subscription still gets wake-ups.
    drop(notifier.clone());
    publisher.publish(&h).await.unwrap();
    let wake = tokio::time::timeout(PATIENCE, sub.next()).await.unwrap();
    assert_eq!(wake, Some(Wake::Changed));

    // The last one going away ends the stream (instead of leaving it waiting forever) and
    // closes the listening connection.
    drop(notifier);
    let end = tokio::time::timeout(PATIENCE, sub.next())
        .await
        .expect("the subscription was not closed");
    assert_eq!(end, None);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while listen_backends_named(&pool, "dropped").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the LISTEN connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(sub);
}

/// The publishing connection is kept between publishes; when its backend dies in between
/// (a server restart does that to every connection), the next publish is still delivered.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn a_publish_after_its_connection_died_is_still_delivered(pool: PgPool) {
    let notifier = PgNotifier::connect(replica_pool(&pool, 2, "stale").await)
        .await
        .unwrap();
    let h = host("vm-a");
    let mut sub = notifier.subscribe(&h).await.unwrap();
    notifier.publish(&h).await.unwrap();
    let wake = tokio::time::timeout(PATIENCE, sub.next()).await.unwrap();
    assert_eq!(wake, Some(Wake::Changed));

    // Every backend of the notifier's pool except its LISTEN connection: the one it
    // publishes on.
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'stale' \
         AND query NOT LIKE 'LISTEN %') AS t",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(killed, 1, "the publishing connection was not found");

    notifier
        .publish(&h)
        .await
        .expect("the publish is retried on a fresh connection");
    let wake = tokio::time::timeout(PATIENCE, sub.next()).await.unwrap();
    assert_eq!(wake, Some(Wake::Changed));
    assert_eq!(notifier.reconnects(), 0, "the LISTEN connection was hit");
}

async fn listen_backends_named(pool: &PgPool, app: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = $1 AND query LIKE 'LISTEN %'",
    )
    .bind(app)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn signal(pid: i32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("cannot run kill");
    assert!(
        status.success(),
        "kill -{sig} {pid} failed: this test freezes a PostgreSQL backend, so it needs the \
         server on this machine and the right to signal it (run under scripts/with-postgres.sh)"
    );
}

/// Resumes a frozen backend when the test ends, even if it fails.
struct Thaw(i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

/// The LISTEN backend is frozen (SIGSTOP): its socket stays open, so only the keepalive can
/// tell. An assignment made meanwhile from another replica still reaches the waiter, through
/// the reconnect and resync the keepalive triggers.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn keepalive_replaces_a_listen_connection_that_stopped_answering(pool: PgPool) {
    seed_available(&PgVmStore::new(pool.clone()), 1).await;
    let notifier = PgNotifier::connect_with(
        replica_pool(&pool, 2, "frozen").await,
        PgNotifierOptions {
            keepalive_interval: Duration::from_millis(200),
            keepalive_timeout: Duration::from_millis(500),
            ..PgNotifierOptions::default()
        },
    )
    .await
    .unwrap();
    let lablink = lablink_core::LabLinkBuilder::new()
        .with_store(std::sync::Arc::new(PgVmStore::new(
            replica_pool(&pool, 4, "frozen-store").await,
        )))
        .with_notifier(std::sync::Arc::new(notifier.clone()) as std::sync::Arc<dyn Notifier>)
        .build()
        .unwrap();
    let (assigner, _assigner_notifier) = replica(&pool, "assigner").await;

    let pid: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'frozen' \
           AND query LIKE 'LISTEN %'",
    )
    .fetch_one(&pool)
    .await
    .expect("the notifier's LISTEN backend");
    let waiter = tokio::spawn({
        let lablink = lablink.clone();
        async move {
            lablink
                .wait_for_assignment(&host("vm-00000"), PATIENCE)
                .await
        }
    });
    while notifier.subscribed_hostnames() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the waiter read the store (unassigned) and park.
    tokio::time::sleep(Duration::from_millis(100)).await;

    signal(pid, "STOP");
    let thaw = Thaw(pid);
    let granted = assigner.request_vm(&request(0)).await.unwrap();
    assert_eq!(granted.hostname, host("vm-00000"));

    let got = tokio::time::timeout(PATIENCE + Duration::from_secs(5), waiter)
        .await
        .expect("waiter task")
        .unwrap()
        .unwrap()
        .expect("the waiter was never woken: the frozen LISTEN connection went unnoticed");
    assert_eq!(got.email.as_str(), request(0).email.as_str());
    assert!(notifier.reconnects() >= 1);
    drop(thaw);
    // The replacement is listening: exactly one live LISTEN connection of this notifier
    // once the frozen one, thawed, is gone.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&pool)
            .await
            .unwrap();
        if listen_backends_named(&pool, "frozen").await == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no LISTEN connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        listen_backends(&pool).await,
        2,
        "this notifier's and the assigner's"
    );
}

/// A NOTIFY carries the hostname and nothing else: anyone who can LISTEN on the database
/// must not learn a participant's Chrome Remote Desktop command or PIN from it.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn a_notification_carries_only_the_hostname(pool: PgPool) {
    seed_available(&PgVmStore::new(pool.clone()), 1).await;
    let (allocator, notifier) = replica(&pool, "payload").await;
    let mut raw = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    raw.listen(notifier.channel()).await.unwrap();

    let asked = request(0);
    let granted = allocator.request_vm(&asked).await.unwrap();
    let heard = tokio::time::timeout(PATIENCE, raw.recv())
        .await
        .expect("no notification")
        .unwrap();
    assert_eq!(heard.payload(), granted.hostname.as_str());
    assert!(!heard.payload().contains(granted.pin.expose()));
    let command = asked.crd_command.as_ref().expect("a CRD command");
    assert!(!heard.payload().contains(command.expose()));
}

/// The LISTEN connection is terminated under 50 subscribers: the notifier reconnects and
/// tells every one of them to re-read (what it missed meanwhile is not known).
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn every_subscriber_is_told_to_resync_after_a_reconnect(pool: PgPool) {
    let notifier = PgNotifier::connect(replica_pool(&pool, 2, "resync").await)
        .await
        .unwrap();
    let mut subs = Vec::new();
    for i in 0..50 {
        subs.push(
            notifier
                .subscribe(&host(&format!("vm-{i:02}")))
                .await
                .unwrap(),
        );
    }
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'resync' \
         AND query LIKE 'LISTEN %') AS t",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(killed, 1, "the LISTEN connection was not found");
    for (i, sub) in subs.iter_mut().enumerate() {
        let wake = tokio::time::timeout(PATIENCE, sub.next())
            .await
            .unwrap_or_else(|_| panic!("subscriber {i} was never told to re-read"));
        assert_eq!(wake, Some(Wake::Resync), "subscriber {i}");
    }
    assert_eq!(notifier.reconnects(), 1);
}
