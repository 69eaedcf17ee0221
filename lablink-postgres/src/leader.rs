//! The supervisor leader lease: one row in `lablink_leader`, taken or renewed with a single
//! `INSERT ... ON CONFLICT DO UPDATE ... WHERE` so two replicas can never both hold it.

use chrono::{DateTime, Utc};
use lablink_core::{Error, Result};
use sqlx::PgPool;

use crate::error::classify;
use lablink_core::store::LeaderLease;

/// Gives the lease to `candidate` until `until` if it is free, already theirs, or ended at
/// `now`; returns the lease as it stands.
pub(crate) async fn try_lead(
    pool: &PgPool,
    candidate: &str,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<LeaderLease> {
    let op = "try lead";
    // The statement reads the row from its own snapshot; when another replica inserted the
    // very first lease concurrently the snapshot misses it, so ask again.
    for _ in 0..3 {
        if let Some(lease) = try_lead_once(pool, candidate, now, until).await? {
            return Ok(lease);
        }
    }
    Err(Error::conflict("the leader lease kept changing; try again")
        .with_operation(op)
        .temporary())
}

async fn try_lead_once(
    pool: &PgPool,
    candidate: &str,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Option<LeaderLease>> {
    let op = "try lead";
    let row = sqlx::query!(
        r#"WITH taken AS (
             INSERT INTO lablink_leader (singleton, holder, expires_at) VALUES (true, $1, $3)
             ON CONFLICT (singleton) DO UPDATE
               SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
               WHERE lablink_leader.holder = EXCLUDED.holder OR lablink_leader.expires_at <= $2
             RETURNING holder, expires_at)
           SELECT holder AS "holder!", expires_at AS "expires_at!" FROM taken
           UNION ALL
           SELECT holder, expires_at FROM lablink_leader WHERE NOT EXISTS (SELECT 1 FROM taken)"#,
        candidate,
        now,
        until,
    )
    .fetch_optional(pool)
    .await
    .map_err(|e| classify(op, e))?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(LeaderLease {
        holder: row.holder,
        expires_at: row.expires_at,
    }))
}

/// Ends the lease if `candidate` holds it.
pub(crate) async fn resign(pool: &PgPool, candidate: &str) -> Result<()> {
    sqlx::query!("DELETE FROM lablink_leader WHERE holder = $1", candidate)
        .execute(pool)
        .await
        .map_err(|e| classify("resign", e))?;
    Ok(())
}
