//! Concurrent reads are grouped into shared statements; each still gets exactly its own
//! answer.

mod common;

use futures::stream::{self, StreamExt};
use lablink_core::testing::store::host;
use lablink_core::{ErrorKind, VmStore};
use lablink_postgres::PgVmStore;
use sqlx::PgPool;

use common::seed_available;

/// 3,000 reads at once, a third of them of hostnames that do not exist: every existing one
/// gets its own record, every missing one `NotFound` naming it, on a pool of 4 connections.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn concurrent_reads_each_get_their_own_answer(pool: PgPool) {
    let store = PgVmStore::new(common::replica_pool(&pool, 4, "reads").await);
    let hosts = seed_available(&store, 2000).await;
    let answers: Vec<_> = stream::iter(0..3000)
        .map(|i| {
            let store = store.clone();
            let asked = match hosts.get(i) {
                Some(h) => h.clone(),
                None => host(&format!("missing-{i}")),
            };
            async move { (asked.clone(), store.get(&asked).await) }
        })
        .buffer_unordered(3000)
        .collect()
        .await;
    for (asked, answer) in answers {
        match answer {
            Ok(record) => {
                assert_eq!(record.hostname, asked);
                assert!(hosts.contains(&asked));
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::NotFound, "{asked}: {e}");
                assert!(!hosts.contains(&asked), "{asked} exists: {e}");
                assert!(e.to_string().contains(asked.as_str()), "{e}");
            }
        }
    }
}
