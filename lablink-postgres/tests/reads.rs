//! Concurrent reads are grouped into shared statements; each still gets exactly its own
//! answer.

mod common;

use futures::stream::{self, StreamExt};
use lablink_core::testing::store::host;
use lablink_core::{ErrorKind, VmStore};
use lablink_postgres::PgVmStore;
use sqlx::PgPool;

use common::seed_available;

/// 3,000 reads at once, a third of them of hostnames that do not exist and every existing VM
/// read twice (so one statement often holds a hostname twice): every read of an existing VM
/// gets its record, every read of a missing one `NotFound` naming it, on a pool of 4
/// connections.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn concurrent_reads_each_get_their_own_answer(pool: PgPool) {
    let store = PgVmStore::new(common::replica_pool(&pool, 4, "reads").await);
    let hosts = seed_available(&store, 2000).await;
    let answers: Vec<_> = stream::iter(0..3000)
        .map(|i| {
            let store = store.clone();
            let asked = match hosts.get(i / 2) {
                Some(h) if i < 2000 => h.clone(),
                _ => host(&format!("missing-{i}")),
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
