//! Mapping between [`VmRecord`] / [`Operation`] and their rows.

use chrono::{DateTime, Utc};
use lablink_core::{
    AgentStatus, Assignment, GpuHealth, Operation, OperationKind, OperationStatus, Phase,
    StartupTimings, TokenDigest, VmRecord, VmState,
};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{Postgres, Row};

use crate::error::PgError;

/// A query with every column of `lablink_vms` bound as `$1..$29` (see `sql/vm_insert.sql`).
pub(crate) fn bind_record<'q>(
    query: Query<'q, Postgres, PgArguments>,
    r: &VmRecord,
) -> Result<Query<'q, Postgres, PgArguments>, PgError> {
    let a = r.assignment.as_ref();
    let t = &r.timings;
    Ok(query
        .bind(r.hostname.as_str().to_owned())
        .bind(r.instance_id.as_ref().map(|i| i.as_str().to_owned()))
        .bind(r.address.clone())
        .bind(r.state.as_str())
        .bind(r.state.resume().map(Phase::as_str))
        .bind(a.map(|a| a.email.as_str().to_owned()))
        .bind(a.map(|a| a.crd_command.expose().to_owned()))
        .bind(a.map(|a| a.pin.expose().to_owned()))
        .bind(a.map(|a| a.assigned_at))
        .bind(r.gpu_health.as_str())
        .bind(r.in_use)
        .bind(r.agent_status.map(AgentStatus::as_str))
        .bind(r.last_heartbeat)
        .bind(r.boot_id.clone())
        .bind(i64::from(r.restarts))
        .bind(t.provision_start)
        .bind(t.provision_end)
        .bind(t.cloud_init_start)
        .bind(t.cloud_init_end)
        .bind(t.container_start)
        .bind(t.container_end)
        .bind(t.cloud_init_duration_seconds)
        .bind(t.container_startup_duration_seconds)
        .bind(r.last_error.clone())
        .bind(r.token_digest.map(|d| d.as_bytes().to_vec()))
        .bind(to_i64("generation", r.generation)?)
        .bind(r.created_at)
        .bind(r.updated_at)
        .bind(r.state_changed_at))
}

/// A `u64` as a PostgreSQL `bigint`.
pub(crate) fn to_i64(what: &'static str, value: u64) -> Result<i64, PgError> {
    i64::try_from(value).map_err(|_| PgError::OutOfRange { what, value })
}

fn corrupt(column: &'static str, reason: impl std::fmt::Display) -> PgError {
    PgError::Corrupt {
        column,
        reason: reason.to_string(),
    }
}

fn parse<T>(column: &'static str, value: Option<String>) -> Result<Option<T>, PgError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    value
        .map(|v| v.parse::<T>().map_err(|e| corrupt(column, e)))
        .transpose()
}

fn required<T>(column: &'static str, value: Option<T>) -> Result<T, PgError> {
    value.ok_or_else(|| corrupt(column, "missing"))
}

pub(crate) fn phase(column: &'static str, value: Option<String>) -> Result<Option<Phase>, PgError> {
    value
        .map(|v| match v.as_str() {
            "booting" => Ok(Phase::Booting),
            "available" => Ok(Phase::Available),
            "assigned" => Ok(Phase::Assigned),
            other => Err(corrupt(column, format!("unknown phase {other:?}"))),
        })
        .transpose()
}

/// Rebuilds the record stored in `row` (a `SELECT *` of `lablink_vms`).
pub(crate) fn record_from_row(row: &PgRow) -> Result<VmRecord, PgError> {
    let state: String = row.try_get("state")?;
    let resume = phase("resume", row.try_get("resume")?)?;
    let state = VmState::from_parts(&state, resume).map_err(|e| corrupt("state", e))?;
    let email = parse("email", row.try_get("email")?)?;
    let assignment = match email {
        None => None,
        Some(email) => Some(Assignment {
            email,
            crd_command: required(
                "crd_command",
                parse("crd_command", row.try_get("crd_command")?)?,
            )?,
            pin: required("pin", parse("pin", row.try_get("pin")?)?)?,
            assigned_at: required("assigned_at", row.try_get("assigned_at")?)?,
        }),
    };
    let token_digest: Option<Vec<u8>> = row.try_get("token_digest")?;
    let token_digest = token_digest
        .map(|bytes| {
            <[u8; 32]>::try_from(bytes.as_slice())
                .map(TokenDigest::from_bytes)
                .map_err(|_| corrupt("token_digest", "not 32 bytes"))
        })
        .transpose()?;
    let restarts: i64 = row.try_get("restarts")?;
    let generation: i64 = row.try_get("generation")?;
    let gpu_health: String = row.try_get("gpu_health")?;
    Ok(VmRecord {
        hostname: required("hostname", parse("hostname", row.try_get("hostname")?)?)?,
        instance_id: parse("instance_id", row.try_get("instance_id")?)?,
        address: row.try_get("address")?,
        state,
        assignment,
        gpu_health: gpu_health
            .parse::<GpuHealth>()
            .map_err(|e| corrupt("gpu_health", e))?,
        in_use: row.try_get("in_use")?,
        agent_status: parse("agent_status", row.try_get("agent_status")?)?,
        last_heartbeat: row.try_get("last_heartbeat")?,
        boot_id: row.try_get("boot_id")?,
        restarts: u32::try_from(restarts).map_err(|e| corrupt("restarts", e))?,
        timings: StartupTimings {
            provision_start: row.try_get("provision_start")?,
            provision_end: row.try_get("provision_end")?,
            cloud_init_start: row.try_get("cloud_init_start")?,
            cloud_init_end: row.try_get("cloud_init_end")?,
            container_start: row.try_get("container_start")?,
            container_end: row.try_get("container_end")?,
            cloud_init_duration_seconds: row.try_get("cloud_init_duration_seconds")?,
            container_startup_duration_seconds: row
                .try_get("container_startup_duration_seconds")?,
        },
        last_error: row.try_get("last_error")?,
        token_digest,
        generation: u64::try_from(generation).map_err(|e| corrupt("generation", e))?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        state_changed_at: row.try_get("state_changed_at")?,
    })
}

/// A query with every column of `lablink_operations` bound as `$1..$9`.
pub(crate) fn bind_operation<'q>(
    query: Query<'q, Postgres, PgArguments>,
    op: &Operation,
) -> Result<Query<'q, Postgres, PgArguments>, PgError> {
    let hostnames: Vec<String> = op.hostnames.iter().map(|h| h.as_str().to_owned()).collect();
    Ok(query
        .bind(op.id)
        .bind(op.kind.as_str())
        .bind(op.status.as_str())
        .bind(hostnames)
        .bind(to_i64("done", op.done as u64)?)
        .bind(op.progress.clone())
        .bind(op.message.clone())
        .bind(op.started_at)
        .bind(op.finished_at))
}

/// Rebuilds the operation stored in `row`.
pub(crate) fn operation_from_row(row: &PgRow) -> Result<Operation, PgError> {
    let kind: String = row.try_get("kind")?;
    let status: String = row.try_get("status")?;
    let hostnames: Vec<String> = row.try_get("hostnames")?;
    let done: i64 = row.try_get("done")?;
    let started_at: DateTime<Utc> = row.try_get("started_at")?;
    Ok(Operation {
        id: row.try_get("id")?,
        kind: match kind.as_str() {
            "launch" => OperationKind::Launch,
            "destroy" => OperationKind::Destroy,
            "reboot" => OperationKind::Reboot,
            other => return Err(corrupt("kind", format!("unknown kind {other:?}"))),
        },
        status: match status.as_str() {
            "running" => OperationStatus::Running,
            "succeeded" => OperationStatus::Succeeded,
            "failed" => OperationStatus::Failed,
            other => return Err(corrupt("status", format!("unknown status {other:?}"))),
        },
        hostnames: hostnames
            .into_iter()
            .map(|h| h.parse().map_err(|e| corrupt("hostnames", e)))
            .collect::<Result<_, _>>()?,
        done: usize::try_from(done).map_err(|e| corrupt("done", e))?,
        progress: row.try_get("progress")?,
        message: row.try_get("message")?,
        started_at,
        finished_at: row.try_get("finished_at")?,
    })
}
