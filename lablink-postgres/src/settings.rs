//! The workshop settings (`lablink_settings`, one row replaced only from its revision) and
//! the warnings to participants (`lablink_vm_warnings`, one per VM, kind and due time).

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use lablink_core::settings::{self, PoolSettings, ScheduleSettings, WorkshopSettings};
use lablink_core::{Hostname, VmWarning};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::PgError;
use crate::row::{corrupt, to_i64};

/// A row of `lablink_settings` (types checked at compile time by `query_file_as!`).
struct SettingsRow {
    revision: i64,
    pool_enabled: bool,
    pool_min_available: i64,
    pool_max_total: i64,
    pool_idle_ttl_ms: i64,
    destruction_times: Vec<DateTime<Utc>>,
    destruction_warning_ms: i64,
    updated_at: Option<DateTime<Utc>>,
    updated_by: Option<String>,
}

fn count(column: &'static str, value: i64) -> Result<usize, PgError> {
    usize::try_from(value).map_err(|e| corrupt(column, e))
}

fn millis(column: &'static str, value: i64) -> Result<Duration, PgError> {
    u64::try_from(value)
        .map(Duration::from_millis)
        .map_err(|e| corrupt(column, e))
}

fn to_millis(what: &'static str, d: Duration) -> Result<i64, PgError> {
    to_i64(what, u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl SettingsRow {
    fn into_settings(self) -> Result<WorkshopSettings, PgError> {
        Ok(WorkshopSettings {
            pool: PoolSettings {
                enabled: self.pool_enabled,
                min_available: count("pool_min_available", self.pool_min_available)?,
                max_total: count("pool_max_total", self.pool_max_total)?,
                idle_ttl: millis("pool_idle_ttl_ms", self.pool_idle_ttl_ms)?,
            },
            destruction: ScheduleSettings {
                times: self.destruction_times,
                warning: millis("destruction_warning_ms", self.destruction_warning_ms)?,
            },
            revision: u64::try_from(self.revision).map_err(|e| corrupt("revision", e))?,
            updated_at: self.updated_at,
            updated_by: self.updated_by,
        })
    }
}

/// The settings saved last, if any.
pub(crate) async fn get(pool: &PgPool) -> Result<Option<WorkshopSettings>, PgError> {
    sqlx::query_file_as!(SettingsRow, "sql/settings_get.sql")
        .fetch_optional(pool)
        .await?
        .map(SettingsRow::into_settings)
        .transpose()
}

/// Stores `s` as revision `expected + 1` if `expected` is the stored revision: `Ok(None)`
/// when it is not.
pub(crate) async fn put(
    pool: &PgPool,
    s: &WorkshopSettings,
    expected: u64,
) -> Result<Option<WorkshopSettings>, PgError> {
    let min = to_i64("min_available", s.pool.min_available as u64)?;
    let max = to_i64("max_total", s.pool.max_total as u64)?;
    let ttl = to_millis("idle_ttl", s.pool.idle_ttl)?;
    let warning = to_millis("warning", s.destruction.warning)?;
    // PostgreSQL keeps microseconds: what is returned is what a later read gives.
    let times: Vec<DateTime<Utc>> = s
        .destruction
        .times
        .iter()
        .map(|t| t.trunc_subsecs(6))
        .collect();
    let updated_at = s.updated_at.map(|t| t.trunc_subsecs(6));
    let row = if expected == 0 {
        sqlx::query_file_as!(
            SettingsRow,
            "sql/settings_insert.sql",
            s.pool.enabled,
            min,
            max,
            ttl,
            &times[..],
            warning,
            updated_at,
            s.updated_by,
        )
        .fetch_optional(pool)
        .await?
    } else {
        sqlx::query_file_as!(
            SettingsRow,
            "sql/settings_update.sql",
            s.pool.enabled,
            min,
            max,
            ttl,
            &times[..],
            warning,
            updated_at,
            s.updated_by,
            to_i64("revision", expected)?,
        )
        .fetch_optional(pool)
        .await?
    };
    row.map(SettingsRow::into_settings).transpose()
}

/// The error of a save from `expected` that found another revision stored.
pub(crate) async fn conflict(pool: &PgPool, expected: u64) -> lablink_core::Error {
    let stored = match get(pool).await {
        Ok(s) => s.map_or(0, |s| s.revision),
        Err(_) => return settings::conflict(expected, expected),
    };
    settings::conflict(expected, stored)
}

/// A row of `lablink_vm_warnings`.
struct WarningRow {
    id: Uuid,
    hostname: String,
    kind: String,
    email: String,
    due_at: DateTime<Utc>,
    message: String,
    created_at: DateTime<Utc>,
    acknowledged_at: Option<DateTime<Utc>>,
}

impl WarningRow {
    fn into_warning(self) -> Result<VmWarning, PgError> {
        Ok(VmWarning {
            id: self.id,
            hostname: self.hostname.parse().map_err(|e| corrupt("hostname", e))?,
            kind: self.kind.parse().map_err(|e| corrupt("kind", e))?,
            email: self.email.parse().map_err(|e| corrupt("email", e))?,
            due_at: self.due_at,
            message: self.message,
            created_at: self.created_at,
            acknowledged_at: self.acknowledged_at,
        })
    }
}

fn warnings(rows: Vec<WarningRow>) -> Result<Vec<VmWarning>, PgError> {
    rows.into_iter().map(WarningRow::into_warning).collect()
}

/// Stores `w` unless its VM has one of its kind and due time; the stored one.
pub(crate) async fn put_warning(pool: &PgPool, w: &VmWarning) -> Result<VmWarning, PgError> {
    sqlx::query_file_as!(
        WarningRow,
        "sql/warning_put.sql",
        w.id,
        w.hostname.as_str(),
        w.kind.as_str(),
        w.email.as_str(),
        w.due_at.trunc_subsecs(6),
        w.message,
        w.created_at.trunc_subsecs(6),
    )
    .fetch_one(pool)
    .await?
    .into_warning()
}

/// The warnings of `hostname`.
pub(crate) async fn list(pool: &PgPool, hostname: &Hostname) -> Result<Vec<VmWarning>, PgError> {
    let rows = sqlx::query_file_as!(WarningRow, "sql/warning_list.sql", hostname.as_str())
        .fetch_all(pool)
        .await?;
    warnings(rows)
}

/// Every VM's warnings.
pub(crate) async fn list_all(pool: &PgPool) -> Result<Vec<VmWarning>, PgError> {
    let rows = sqlx::query_file_as!(WarningRow, "sql/warning_list_all.sql")
        .fetch_all(pool)
        .await?;
    warnings(rows)
}

/// Records that `hostname`'s agent showed warning `id` at `now`; `None` when that VM has no
/// such warning.
pub(crate) async fn acknowledge(
    pool: &PgPool,
    hostname: &Hostname,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<VmWarning>, PgError> {
    sqlx::query_file_as!(
        WarningRow,
        "sql/warning_acknowledge.sql",
        hostname.as_str(),
        id,
        now.trunc_subsecs(6),
    )
    .fetch_optional(pool)
    .await?
    .map(WarningRow::into_warning)
    .transpose()
}

/// Removes warnings by id; how many went.
pub(crate) async fn remove(pool: &PgPool, ids: &[Uuid]) -> Result<usize, PgError> {
    let done = sqlx::query_file!("sql/warning_remove.sql", ids)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() as usize)
}
