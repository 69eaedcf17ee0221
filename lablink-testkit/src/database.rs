//! [`TestDatabase`]: a fresh, migrated database on the PostgreSQL server `DATABASE_URL`
//! points at (`scripts/with-postgres.sh` starts one), dropped by
//! [`drop_database`](TestDatabase::drop_database).

use std::str::FromStr;
use std::sync::{Arc, Mutex};

use lablink::postgres::{PgNotifier, PgVmStore};
use lablink::{LabLink, LabLinkBuilder};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};

/// A fresh database, migrated; every pool it handed out is closed when it is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    /// Connect options of the new database.
    pub options: PgConnectOptions,
    server: PgConnectOptions,
    name: String,
    pools: Mutex<Vec<PgPool>>,
}

impl TestDatabase {
    /// A database on the server of `DATABASE_URL`. Fails (never skips) when it is unset.
    pub async fn create() -> Self {
        let url = std::env::var("DATABASE_URL").expect(
            "DATABASE_URL must point at a PostgreSQL server for this test (scripts/with-postgres.sh starts one)",
        );
        Self::create_at(&url).await
    }

    /// A database on the server of `url`.
    pub async fn create_at(url: &str) -> Self {
        let server = PgConnectOptions::from_str(url).expect("DATABASE_URL is a postgres URL");
        let name = format!("lablink_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = server
            .connect()
            .await
            .expect("PostgreSQL answers at DATABASE_URL");
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        let db = Self {
            options: server.clone().database(&name),
            server,
            name,
            pools: Mutex::default(),
        };
        let pool = db.pool(2).await;
        lablink::postgres::setup(&pool).await.unwrap();
        pool.close().await;
        db
    }

    /// A pool of its own on the database, as each replica has.
    pub async fn pool(&self, max_connections: u32) -> PgPool {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .connect_with(self.options.clone())
            .await
            .unwrap();
        self.pools.lock().unwrap().push(pool.clone());
        pool
    }

    /// An allocator's store and notifier on this database (one "server process").
    pub async fn builder(&self) -> LabLinkBuilder {
        let pool = self.pool(10).await;
        let notifier = PgNotifier::connect(pool.clone()).await.unwrap();
        LabLink::builder()
            .with_store(Arc::new(PgVmStore::new(pool)))
            .with_notifier(Arc::new(notifier))
    }

    /// Closes its pools and drops the database.
    pub async fn drop_database(self) {
        let pools = std::mem::take(&mut *self.pools.lock().unwrap());
        for pool in pools {
            pool.close().await;
        }
        if let Ok(mut conn) = self.server.connect().await {
            let _ = conn
                .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
                .await;
        }
    }
}
