//! The whole lablink-core conformance suite against PostgreSQL, each test on a fresh database
//! (`#[sqlx::test]` reads `DATABASE_URL`; run under `scripts/with-postgres.sh`).

use lablink_postgres::{PgNotifier, PgVmStore};
use sqlx::PgPool;

lablink_core::vm_store_conformance!(
    #[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
    async fn store(pool: PgPool) -> PgVmStore {
        PgVmStore::new(pool)
    }
);

mod notifier {
    use super::*;

    lablink_core::notifier_conformance!(
        #[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
        async fn notifier(pool: PgPool) -> PgNotifier {
            PgNotifier::connect(pool)
                .await
                .expect("PgNotifier connects to the test database")
        }
    );
}
