//! The deployment-wide provisioning lock: a PostgreSQL session advisory lock held on a
//! dedicated pooled connection for as long as the [`ProvisioningLock`] lives.

use lablink_core::{Error, Result};
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

use crate::error::classify;
use lablink_core::store::ProvisioningLock;

/// The advisory-lock key LabLink uses by default (the bytes of `"lablink"` followed by 1).
pub(crate) const DEFAULT_LOCK_KEY: i64 = 0x6c61_626c_696e_6b01;

/// Takes the advisory lock `key` on a connection of its own, or fails with `Conflict`.
pub(crate) async fn try_lock(pool: &PgPool, key: i64) -> Result<ProvisioningLock> {
    let op = "lock provisioning";
    let conn = pool.acquire().await.map_err(|e| classify(op, e))?;
    // From here until the lock is known to be released, the connection is in a `Locked`
    // guard: if this future is cancelled mid-query, the guard drops it from the pool.
    let mut locked = Locked(Some(conn));
    let taken = sqlx::query_scalar!(r#"SELECT pg_try_advisory_lock($1) AS "taken!""#, key)
        .fetch_one(&mut **locked.conn())
        .await
        .map_err(|e| classify(op, e))?;
    if !taken {
        locked.release();
        return Err(Error::conflict("another provisioning operation is running").with_operation(op));
    }
    Ok(ProvisioningLock::new(Held {
        locked: Some(locked),
        key,
    }))
}

/// A pooled connection that may hold the advisory lock. Only [`release`](Self::release)
/// (called once the lock is known to be free) hands it back to the pool; dropped any other
/// way (a failed unlock, a cancelled future, a runtime shutting down), it is detached from
/// the pool and its socket closed, which ends the session and with it the lock. So a
/// connection never goes back to the pool still holding the lock.
struct Locked(Option<PoolConnection<Postgres>>);

impl Locked {
    fn conn(&mut self) -> &mut PoolConnection<Postgres> {
        self.0.as_mut().expect("present until released or dropped")
    }

    /// Returns the connection to the pool: the lock is not held on it.
    fn release(mut self) {
        drop(self.0.take());
    }

    /// Unlocks, then returns the connection to the pool; on any failure the connection is
    /// closed instead (see [`Locked`]).
    async fn unlock(mut self, key: i64) {
        let unlocked = sqlx::query_scalar!(r#"SELECT pg_advisory_unlock($1) AS "unlocked!""#, key)
            .fetch_one(&mut **self.conn())
            .await;
        if matches!(unlocked, Ok(true)) {
            self.release();
        } else {
            tracing::warn!("provisioning lock release failed; closing its connection");
        }
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            // Leaves the pool; dropping the raw connection closes its socket (no runtime
            // needed), and the server ends the session and releases its locks.
            drop(conn.detach());
        }
    }
}

/// Keeps the connection that holds the lock; releases the lock when dropped.
struct Held {
    locked: Option<Locked>,
    key: i64,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(locked) = self.locked.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            // Unlock, then hand the connection back to the pool. If the task never runs to
            // the end (the runtime shuts down), `Locked` closes the connection instead.
            Ok(runtime) => {
                runtime.spawn(locked.unlock(self.key));
            }
            // No runtime to unlock on: `Locked` closes the connection.
            Err(_) => drop(locked),
        }
    }
}
