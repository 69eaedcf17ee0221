//! Helpers shared by the PostgreSQL integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use chrono::Utc;
use lablink_core::testing::store::{claim_request, host};
use lablink_core::{AgentToken, LabLink, LabLinkBuilder, Notifier, VmRecord, VmState, VmStore};
use lablink_postgres::{PgNotifier, PgVmStore};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// A pool on the same (per-test) database as `pool`, with its own connections, like another
/// allocator process would have.
pub async fn replica_pool(pool: &PgPool, max: u32, application_name: &str) -> PgPool {
    let options: PgConnectOptions = (*pool.connect_options())
        .clone()
        .application_name(application_name);
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(std::time::Duration::from_secs(60))
        .connect_with(options)
        .await
        .expect("a second pool on the test database")
}

/// A default allocator on its own pools: one for the store, a small one for the notifier.
pub async fn replica(pool: &PgPool, name: &str) -> (LabLink, PgNotifier) {
    let store = PgVmStore::new(replica_pool(pool, 16, name).await);
    let notifier = PgNotifier::connect(replica_pool(pool, 2, &format!("{name}-notifier")).await)
        .await
        .expect("notifier connects");
    let lablink = LabLinkBuilder::new()
        .with_store(Arc::new(store))
        .with_notifier(Arc::new(notifier.clone()) as Arc<dyn Notifier>)
        .build()
        .expect("allocator");
    (lablink, notifier)
}

/// Inserts `n` VMs that are `Available` right away (hostnames `vm-00000`...), in batches.
pub async fn seed_available(store: &dyn VmStore, n: usize) -> Vec<lablink_core::Hostname> {
    let now = Utc::now();
    let hosts: Vec<_> = (0..n).map(|i| host(&format!("vm-{i:05}"))).collect();
    for chunk in hosts.chunks(1000) {
        let records: Vec<VmRecord> = chunk
            .iter()
            .map(|h| {
                let mut r = VmRecord::new(h.clone(), Some(AgentToken::generate().digest()), now);
                r.state = VmState::Available;
                r
            })
            .collect();
        store.insert(&records).await.expect("seed VMs");
    }
    hosts
}

/// The email of participant `i`.
pub fn who(i: usize) -> String {
    format!("participant-{i:05}")
}

/// A `VmRequest` for participant `i`.
pub fn request(i: usize) -> lablink_core::VmRequest {
    let c = claim_request(&who(i));
    lablink_core::VmRequest {
        email: c.email,
        crd_command: c.crd_command,
    }
}

/// Number of server backends on this test's database whose last statement was a `LISTEN`.
pub async fn listen_backends(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN %'",
    )
    .fetch_one(pool)
    .await
    .expect("pg_stat_activity")
}
