//! The audit trail in `lablink_audit`: one row per entry, appended, read newest first by
//! `(at, seq)`, where `seq` (an identity column) keeps the order of appending.

use chrono::{DateTime, Utc};
use lablink_core::audit::{AuditEntry, AuditQuery};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::PgError;
use crate::row::{corrupt, to_i64};

/// A row of `sql/audit_list.sql` (types checked at compile time by `query_file_as!`).
struct AuditRow {
    id: Uuid,
    at: DateTime<Utc>,
    actor: String,
    address: Option<String>,
    action: String,
    target: Option<String>,
    detail: Option<String>,
    ok: bool,
}

impl AuditRow {
    fn into_entry(self) -> Result<AuditEntry, PgError> {
        Ok(AuditEntry {
            id: self.id,
            at: self.at,
            actor: self.actor,
            address: self.address,
            action: self.action.parse().map_err(|e| corrupt("action", e))?,
            target: self.target,
            detail: self.detail,
            ok: self.ok,
        })
    }
}

/// Appends `entry` (an id stored already changes nothing).
pub(crate) async fn append(pool: &PgPool, entry: &AuditEntry) -> Result<(), PgError> {
    sqlx::query_file!(
        "sql/audit_append.sql",
        entry.id,
        entry.at,
        entry.actor,
        entry.address,
        entry.action.as_str(),
        entry.target,
        entry.detail,
        entry.ok,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The entries `query` selects, newest first.
pub(crate) async fn entries(pool: &PgPool, query: &AuditQuery) -> Result<Vec<AuditEntry>, PgError> {
    let limit = to_i64("limit", query.limit as u64)?;
    let rows = sqlx::query_file_as!(AuditRow, "sql/audit_list.sql", limit, query.before)
        .fetch_all(pool)
        .await?;
    rows.into_iter().map(AuditRow::into_entry).collect()
}
