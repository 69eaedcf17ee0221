//! Bounded log storage: one row per line, per-stream byte accounting, trimmed in the same
//! transaction as the append so the cap always holds.
//!
//! Semantics match [`lablink_core::BoundedLog`]: each line counts its length plus one byte
//! (its newline); a line longer than the cap keeps only its last `cap - 1` bytes; beyond the
//! cap the oldest lines are dropped, never the new ones.

use lablink_core::{Hostname, LogAppend, LogStream, VmLogs};
use sqlx::{PgConnection, Row};

use crate::error::PgError;
use crate::row::to_i64;

/// Appends `append` to its stream of `hostname` and trims the stream to `cap` bytes. The
/// caller holds the VM row lock and commits.
pub(crate) async fn append(
    conn: &mut PgConnection,
    hostname: &Hostname,
    append: &LogAppend,
    cap: usize,
) -> Result<(), PgError> {
    let lines = fit(&append.lines, cap);
    if lines.is_empty() {
        return Ok(());
    }
    let stream = append.stream.as_str();
    let added: usize = lines.iter().map(|l| l.len() + 1).sum();
    // Locks the stream's accounting row: appends to one stream are serialized.
    let held: i64 = sqlx::query_scalar(include_str!("../sql/log_stream_lock.sql"))
        .bind(hostname.as_str())
        .bind(stream)
        .fetch_one(&mut *conn)
        .await?;
    sqlx::query(include_str!("../sql/log_append.sql"))
        .bind(hostname.as_str())
        .bind(stream)
        .bind(&lines)
        .execute(&mut *conn)
        .await?;
    let cap = to_i64("log cap", cap as u64)?;
    let mut total = held + to_i64("log bytes", added as u64)?;
    if total > cap {
        let dropped: i64 = sqlx::query_scalar(include_str!("../sql/log_trim.sql"))
            .bind(hostname.as_str())
            .bind(stream)
            .bind(total - cap)
            .fetch_one(&mut *conn)
            .await?;
        total -= dropped;
    }
    sqlx::query(include_str!("../sql/log_stream_set_bytes.sql"))
        .bind(hostname.as_str())
        .bind(stream)
        .bind(total)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The lines of one batch that can survive a cap of `cap` bytes: each cut to its last
/// `cap - 1` bytes, empty ones skipped, and only the newest that fit together.
fn fit(lines: &[String], cap: usize) -> Vec<String> {
    let max_line = cap.saturating_sub(1);
    let mut kept: Vec<&str> = Vec::new();
    let mut bytes = 0;
    for line in lines.iter().rev() {
        let line = tail_within(line, max_line);
        if line.is_empty() {
            continue;
        }
        if bytes + line.len() + 1 > cap {
            break;
        }
        bytes += line.len() + 1;
        kept.push(line);
    }
    kept.into_iter().rev().map(str::to_owned).collect()
}

/// The last at most `max` bytes of `s`, cut on a character boundary.
fn tail_within(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Every stream of `hostname`, lines joined by `\n`, oldest first.
pub(crate) async fn read(conn: &mut PgConnection, hostname: &Hostname) -> Result<VmLogs, PgError> {
    let rows = sqlx::query(include_str!("../sql/log_read.sql"))
        .bind(hostname.as_str())
        .fetch_all(conn)
        .await?;
    let mut logs = VmLogs::default();
    for row in rows {
        let stream: String = row.try_get("stream")?;
        let text: String = row.try_get("text")?;
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

#[cfg(test)]
mod tests {
    use lablink_core::BoundedLog;

    use super::*;

    #[test]
    fn a_batch_is_fitted_exactly_like_the_core_bounded_log() {
        let batches: Vec<Vec<String>> = vec![
            (0..100).map(|i| format!("line {i:03}")).collect(),
            vec!["x".repeat(500), "short".into()],
            vec!["é".repeat(80)],
            vec![String::new(), "a".into()],
        ];
        for cap in [0, 1, 2, 10, 64, 100, 1000] {
            for lines in &batches {
                let mut reference = BoundedLog::default();
                reference.append(lines, cap);
                let fitted = fit(lines, cap);
                assert_eq!(fitted.join("\n"), reference.text(), "cap {cap}");
                assert!(fitted.iter().map(|l| l.len() + 1).sum::<usize>() <= cap);
            }
        }
    }
}
