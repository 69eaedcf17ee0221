//! Bounded log storage: one row per line, per-stream byte accounting, trimmed in the same
//! transaction as the append so the cap always holds.
//!
//! Semantics are core's: a batch keeps what [`lablink_core::logs::fit_lines`] keeps, and beyond the
//! cap the oldest lines are dropped, never the new ones.

use lablink_core::{Hostname, LogAppend, LogStream, VmLogs};
use sqlx::PgConnection;

use crate::error::PgError;
use crate::row::{required, to_i64, Column};
use lablink_core::logs::fit_lines;

/// Appends `append` to its stream of `hostname` and trims the stream to `cap` bytes. The
/// caller holds the VM row lock and commits.
pub(crate) async fn append(
    conn: &mut PgConnection,
    hostname: &Hostname,
    append: &LogAppend,
    cap: usize,
) -> Result<(), PgError> {
    let lines = fit_lines(&append.lines, cap);
    if lines.is_empty() {
        return Ok(());
    }
    let stream = append.stream.as_str();
    let added: usize = lines.iter().map(|l| l.len() + 1).sum();
    // Locks the stream's accounting row: appends to one stream are serialized.
    let held = sqlx::query_file_scalar!("sql/log_stream_lock.sql", hostname.as_str(), stream)
        .fetch_one(&mut *conn)
        .await?;
    let held = required("bytes", Column::<i64>::into_opt(held))?;
    sqlx::query_file!(
        "sql/log_append.sql",
        hostname.as_str(),
        stream,
        &lines[..] as &[&str]
    )
    .execute(&mut *conn)
    .await?;
    let cap = to_i64("log cap", cap as u64)?;
    let mut total = held + to_i64("log bytes", added as u64)?;
    if total > cap {
        let dropped =
            sqlx::query_file_scalar!("sql/log_trim.sql", hostname.as_str(), stream, total - cap)
                .fetch_one(&mut *conn)
                .await?;
        total -= required("dropped bytes", Column::<i64>::into_opt(dropped))?;
    }
    sqlx::query_file!(
        "sql/log_stream_set_bytes.sql",
        hostname.as_str(),
        stream,
        total
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Every stream of `hostname`, lines joined by `\n`, oldest first.
pub(crate) async fn read(conn: &mut PgConnection, hostname: &Hostname) -> Result<VmLogs, PgError> {
    let rows = sqlx::query_file!("sql/log_read.sql", hostname.as_str())
        .fetch_all(conn)
        .await?;
    let mut logs = VmLogs::default();
    for row in rows {
        let stream = required("stream", Column::<String>::into_opt(row.stream))?;
        let text = Column::<String>::into_opt(row.text).unwrap_or_default();
        match stream.as_str() {
            s if s == LogStream::CloudInit.as_str() => logs.cloud_init = text,
            s if s == LogStream::Container.as_str() => logs.container = text,
            s if s == LogStream::Agent.as_str() => logs.agent = text,
            other => {
                return Err(PgError::Corrupt {
                    column: "stream",
                    reason: format!("unknown log stream {other:?}"),
                })
            }
        }
    }
    Ok(logs)
}
