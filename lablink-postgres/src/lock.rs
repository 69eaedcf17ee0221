//! The deployment-wide provisioning lock: a PostgreSQL session advisory lock held on a
//! dedicated pooled connection for as long as the [`ProvisioningLock`] lives.

use lablink_core::{Error, ProvisioningLock, Result};
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

use crate::error::classify;

/// The advisory-lock key LabLink uses by default (the bytes of `"lablink"` followed by 1).
pub(crate) const DEFAULT_LOCK_KEY: i64 = 0x6c61_626c_696e_6b01;

/// Takes the advisory lock `key` on a connection of its own, or fails with `Conflict`.
pub(crate) async fn try_lock(pool: &PgPool, key: i64) -> Result<ProvisioningLock> {
    let op = "lock provisioning";
    let mut conn = pool.acquire().await.map_err(|e| classify(op, e))?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| classify(op, e))?;
    if !locked {
        return Err(Error::conflict("another provisioning operation is running").with_operation(op));
    }
    Ok(ProvisioningLock::new(Held {
        conn: Some(conn),
        key,
    }))
}

/// Keeps the connection that holds the lock; releases the lock when dropped.
struct Held {
    conn: Option<PoolConnection<Postgres>>,
    key: i64,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let key = self.key;
        match tokio::runtime::Handle::try_current() {
            // Unlock, then hand the connection back to the pool. If the unlock fails the
            // connection is closed instead, which also releases the lock.
            Ok(runtime) => {
                runtime.spawn(async move {
                    let unlocked = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
                        .bind(key)
                        .fetch_one(&mut *conn)
                        .await;
                    if !matches!(unlocked, Ok(true)) {
                        tracing::warn!("provisioning lock release failed; closing its connection");
                        let _ = conn.close().await;
                    }
                });
            }
            // No runtime to unlock on: leave the pool and drop the socket, so the server
            // ends the session and with it the lock.
            Err(_) => drop(conn.detach()),
        }
    }
}
