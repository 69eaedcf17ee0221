//! Mapping between [`VmRecord`] / [`Operation`] / [`RegistrationToken`] and their rows.
//!
//! Every statement is a compile-time checked `sqlx::query_file!` whose rows are anonymous
//! structs, one type per statement. [`vm_row!`] copies the columns of `lablink_vms` out of any
//! of them into a [`VmRow`], whatever nullability sqlx inferred for each column (a column read
//! straight from the table is `T` when it is `NOT NULL`; one that went through a `UNION` or a
//! CTE is `Option<T>`), and [`VmRow::into_record`] rebuilds the domain value, reporting a
//! missing or unreadable value as [`PgError::Corrupt`].

use chrono::{DateTime, Utc};
use lablink_core::{
    AgentStatus, Assignment, CrdCommand, DesktopSession, GpuHealth, Operation, OperationKind,
    OperationStatus, Phase, StartupTimings, VmRecord, VmState,
};
use uuid::Uuid;

use crate::error::PgError;
use lablink_core::registration::{Registration, RegistrationToken};
use lablink_core::secret::TokenDigest;
use lablink_core::usage::{Seconds, Usage};

/// A column value as sqlx hands it back: `T` or `Option<T>` (see the module docs).
pub(crate) trait Column<T> {
    /// The value, `None` for SQL `NULL`.
    fn into_opt(self) -> Option<T>;
}

macro_rules! column_types {
    ($($t:ty),* $(,)?) => {$(
        impl Column<$t> for $t {
            fn into_opt(self) -> Option<$t> {
                Some(self)
            }
        }
        impl Column<$t> for Option<$t> {
            fn into_opt(self) -> Option<$t> {
                self
            }
        }
    )*};
}
column_types!(
    String,
    bool,
    i64,
    f64,
    Vec<u8>,
    DateTime<Utc>,
    serde_json::Value
);

/// Copies the columns of `lablink_vms` out of a row of any `query_file!` that returns them
/// (`SELECT *`, `RETURNING v.*`) into a [`VmRow`].
macro_rules! vm_row {
    ($r:ident) => {{
        use $crate::row::Column as _;
        $crate::row::VmRow {
            hostname: $r.hostname.into_opt(),
            instance_id: $r.instance_id.into_opt(),
            address: $r.address.into_opt(),
            state: $r.state.into_opt(),
            resume: $r.resume.into_opt(),
            email: $r.email.into_opt(),
            crd_command: $r.crd_command.into_opt(),
            pin: $r.pin.into_opt(),
            assigned_at: $r.assigned_at.into_opt(),
            gpu_health: $r.gpu_health.into_opt(),
            in_use: $r.in_use.into_opt(),
            agent_status: $r.agent_status.into_opt(),
            last_heartbeat: $r.last_heartbeat.into_opt(),
            boot_id: $r.boot_id.into_opt(),
            restarts: $r.restarts.into_opt(),
            provision_start: $r.provision_start.into_opt(),
            provision_end: $r.provision_end.into_opt(),
            cloud_init_start: $r.cloud_init_start.into_opt(),
            cloud_init_end: $r.cloud_init_end.into_opt(),
            container_start: $r.container_start.into_opt(),
            container_end: $r.container_end.into_opt(),
            cloud_init_duration_seconds: $r.cloud_init_duration_seconds.into_opt(),
            container_startup_duration_seconds: $r.container_startup_duration_seconds.into_opt(),
            last_error: $r.last_error.into_opt(),
            token_digest: $r.token_digest.into_opt(),
            generation: $r.generation.into_opt(),
            created_at: $r.created_at.into_opt(),
            updated_at: $r.updated_at.into_opt(),
            state_changed_at: $r.state_changed_at.into_opt(),
            machine_identity: $r.machine_identity.into_opt(),
            allow_reboot: $r.allow_reboot.into_opt(),
            instance_type: $r.instance_type.into_opt(),
            usage_starting: $r.usage_starting.into_opt(),
            usage_free: $r.usage_free.into_opt(),
            usage_in_use: $r.usage_in_use.into_opt(),
            usage_idle: $r.usage_idle.into_opt(),
            usage_other: $r.usage_other.into_opt(),
            usage_since: $r.usage_since.into_opt(),
            history: $r.history.into_opt(),
            desktop: $r.desktop.into_opt(),
        }
    }};
}
pub(crate) use vm_row;

/// The columns of `lablink_vms`, each `None` when SQL `NULL`. No `Debug`: it holds the
/// Chrome Remote Desktop command and the PIN in the clear.
pub(crate) struct VmRow {
    pub hostname: Option<String>,
    pub instance_id: Option<String>,
    pub address: Option<String>,
    pub state: Option<String>,
    pub resume: Option<String>,
    pub email: Option<String>,
    pub crd_command: Option<String>,
    pub pin: Option<String>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub gpu_health: Option<String>,
    pub in_use: Option<bool>,
    pub agent_status: Option<String>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub boot_id: Option<String>,
    pub restarts: Option<i64>,
    pub provision_start: Option<DateTime<Utc>>,
    pub provision_end: Option<DateTime<Utc>>,
    pub cloud_init_start: Option<DateTime<Utc>>,
    pub cloud_init_end: Option<DateTime<Utc>>,
    pub container_start: Option<DateTime<Utc>>,
    pub container_end: Option<DateTime<Utc>>,
    pub cloud_init_duration_seconds: Option<f64>,
    pub container_startup_duration_seconds: Option<f64>,
    pub last_error: Option<String>,
    pub token_digest: Option<Vec<u8>>,
    pub generation: Option<i64>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub state_changed_at: Option<DateTime<Utc>>,
    pub machine_identity: Option<String>,
    pub allow_reboot: Option<bool>,
    pub instance_type: Option<String>,
    pub usage_starting: Option<f64>,
    pub usage_free: Option<f64>,
    pub usage_in_use: Option<f64>,
    pub usage_idle: Option<f64>,
    pub usage_other: Option<f64>,
    pub usage_since: Option<DateTime<Utc>>,
    pub history: Option<serde_json::Value>,
    pub desktop: Option<serde_json::Value>,
}

/// The values bound to `$1..$39` of `sql/vm_insert.sql` and `sql/vm_update.sql` (every
/// column of `lablink_vms`, in table order). No `Debug`: it holds the Chrome Remote Desktop
/// command and the PIN in the clear.
pub(crate) struct VmArgs<'a> {
    pub hostname: &'a str,
    pub instance_id: Option<&'a str>,
    pub address: Option<&'a str>,
    pub state: &'static str,
    pub resume: Option<&'static str>,
    pub email: Option<&'a str>,
    pub crd_command: Option<&'a str>,
    pub pin: Option<&'a str>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub gpu_health: &'static str,
    pub in_use: bool,
    pub agent_status: Option<&'static str>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub boot_id: Option<&'a str>,
    pub restarts: i64,
    pub provision_start: Option<DateTime<Utc>>,
    pub provision_end: Option<DateTime<Utc>>,
    pub cloud_init_start: Option<DateTime<Utc>>,
    pub cloud_init_end: Option<DateTime<Utc>>,
    pub container_start: Option<DateTime<Utc>>,
    pub container_end: Option<DateTime<Utc>>,
    pub cloud_init_duration_seconds: Option<f64>,
    pub container_startup_duration_seconds: Option<f64>,
    pub last_error: Option<&'a str>,
    pub token_digest: Option<&'a [u8]>,
    pub generation: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub state_changed_at: DateTime<Utc>,
    pub machine_identity: Option<&'a str>,
    pub allow_reboot: Option<bool>,
    pub instance_type: Option<&'a str>,
    pub usage: Seconds,
    pub usage_since: DateTime<Utc>,
    pub history: serde_json::Value,
    pub desktop: Option<serde_json::Value>,
}

impl<'a> VmArgs<'a> {
    /// The column values of `r`.
    pub(crate) fn new(r: &'a VmRecord) -> Result<Self, PgError> {
        let a = r.assignment.as_ref();
        let t = &r.timings;
        Ok(Self {
            hostname: r.hostname.as_str(),
            instance_id: r.instance_id.as_ref().map(|i| i.as_str()),
            address: r.address.as_deref(),
            state: r.state.as_str(),
            resume: r.state.resume().map(Phase::as_str),
            email: a.map(|a| a.email.as_str()),
            crd_command: a
                .and_then(|a| a.crd_command.as_ref())
                .map(CrdCommand::expose),
            pin: a.map(|a| a.pin.expose()),
            assigned_at: a.map(|a| a.assigned_at),
            gpu_health: r.gpu_health.as_str(),
            in_use: r.in_use,
            agent_status: r.agent_status.map(AgentStatus::as_str),
            last_heartbeat: r.last_heartbeat,
            boot_id: r.boot_id.as_deref(),
            restarts: i64::from(r.restarts),
            provision_start: t.provision_start,
            provision_end: t.provision_end,
            cloud_init_start: t.cloud_init_start,
            cloud_init_end: t.cloud_init_end,
            container_start: t.container_start,
            container_end: t.container_end,
            cloud_init_duration_seconds: t.cloud_init_duration_seconds,
            container_startup_duration_seconds: t.container_startup_duration_seconds,
            last_error: r.last_error.as_deref(),
            token_digest: r.token_digest.as_ref().map(|d| &d.as_bytes()[..]),
            generation: to_i64("generation", r.generation)?,
            created_at: r.created_at,
            updated_at: r.updated_at,
            state_changed_at: r.state_changed_at,
            machine_identity: r.registration.as_ref().map(|g| g.machine_identity.as_str()),
            allow_reboot: r.registration.as_ref().map(|g| g.allow_reboot),
            instance_type: r.instance_type.as_deref(),
            usage: r.usage.seconds,
            usage_since: r.usage.since,
            history: serde_json::to_value(&r.history).map_err(|e| corrupt("history", e))?,
            desktop: a
                .map(|a| serde_json::to_value(&a.desktop))
                .transpose()
                .map_err(|e| corrupt("desktop", e))?,
        })
    }
}

/// A `u64` as a PostgreSQL `bigint`.
pub(crate) fn to_i64(what: &'static str, value: u64) -> Result<i64, PgError> {
    i64::try_from(value).map_err(|_| PgError::OutOfRange { what, value })
}

pub(crate) fn corrupt(column: &'static str, reason: impl std::fmt::Display) -> PgError {
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

/// `value`, or [`PgError::Corrupt`] when it is `NULL` (a column that must hold a value).
pub(crate) fn required<T>(column: &'static str, value: Option<T>) -> Result<T, PgError> {
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

/// The state stored as `state` and `resume`.
pub(crate) fn state(state: Option<String>, resume: Option<String>) -> Result<VmState, PgError> {
    let state = required("state", state)?;
    let resume = phase("resume", resume)?;
    VmState::from_parts(&state, resume).map_err(|e| corrupt("state", e))
}

/// A digest stored as `bytea` (32 bytes).
pub(crate) fn digest(column: &'static str, bytes: &[u8]) -> Result<TokenDigest, PgError> {
    <[u8; 32]>::try_from(bytes)
        .map(TokenDigest::from_bytes)
        .map_err(|_| corrupt(column, "not 32 bytes"))
}

impl VmRow {
    /// Rebuilds the record stored in this row.
    pub(crate) fn into_record(self) -> Result<VmRecord, PgError> {
        let state = state(self.state, self.resume)?;
        let assignment = match parse("email", self.email)? {
            None => None,
            Some(email) => Some({
                let assigned_at = required("assigned_at", self.assigned_at)?;
                Assignment {
                    email,
                    crd_command: self
                        .crd_command
                        .map(|c| CrdCommand::from_stored(&c).map_err(|e| corrupt("crd_command", e)))
                        .transpose()?,
                    pin: required("pin", parse("pin", self.pin)?)?,
                    assigned_at,
                    desktop: match self.desktop {
                        // Nothing happened to the assignment's desktop yet.
                        None => DesktopSession::new(assigned_at),
                        Some(v) => serde_json::from_value(v).map_err(|e| corrupt("desktop", e))?,
                    },
                }
            }),
        };
        let token_digest = self
            .token_digest
            .map(|bytes| digest("token_digest", &bytes))
            .transpose()?;
        let restarts = required("restarts", self.restarts)?;
        let generation = required("generation", self.generation)?;
        let gpu_health = required("gpu_health", self.gpu_health)?;
        // Both set for a machine that registered itself, both NULL otherwise (a CHECK).
        let registration = match self.machine_identity {
            None => None,
            Some(machine_identity) => Some(Registration {
                machine_identity,
                allow_reboot: required("allow_reboot", self.allow_reboot)?,
            }),
        };
        Ok(VmRecord {
            hostname: required("hostname", parse("hostname", self.hostname)?)?,
            instance_id: parse("instance_id", self.instance_id)?,
            address: self.address,
            state,
            assignment,
            gpu_health: gpu_health
                .parse::<GpuHealth>()
                .map_err(|e| corrupt("gpu_health", e))?,
            in_use: required("in_use", self.in_use)?,
            agent_status: parse("agent_status", self.agent_status)?,
            last_heartbeat: self.last_heartbeat,
            boot_id: self.boot_id,
            restarts: u32::try_from(restarts).map_err(|e| corrupt("restarts", e))?,
            timings: StartupTimings {
                provision_start: self.provision_start,
                provision_end: self.provision_end,
                cloud_init_start: self.cloud_init_start,
                cloud_init_end: self.cloud_init_end,
                container_start: self.container_start,
                container_end: self.container_end,
                cloud_init_duration_seconds: self.cloud_init_duration_seconds,
                container_startup_duration_seconds: self.container_startup_duration_seconds,
            },
            last_error: self.last_error,
            token_digest,
            generation: u64::try_from(generation).map_err(|e| corrupt("generation", e))?,
            created_at: required("created_at", self.created_at)?,
            updated_at: required("updated_at", self.updated_at)?,
            state_changed_at: required("state_changed_at", self.state_changed_at)?,
            registration,
            instance_type: self.instance_type,
            usage: Usage {
                seconds: Seconds {
                    starting: required("usage_starting", self.usage_starting)?,
                    free: required("usage_free", self.usage_free)?,
                    in_use: required("usage_in_use", self.usage_in_use)?,
                    idle: required("usage_idle", self.usage_idle)?,
                    other: required("usage_other", self.usage_other)?,
                },
                since: required("usage_since", self.usage_since)?,
            },
            history: serde_json::from_value(required("history", self.history)?)
                .map_err(|e| corrupt("history", e))?,
        })
    }
}

/// A row of `lablink_operations` (`SELECT *`; the types are checked at compile time by
/// `query_file_as!`).
#[derive(Debug)]
pub(crate) struct OperationRow {
    pub id: Uuid,
    pub kind: String,
    pub status: String,
    pub hostnames: Vec<String>,
    pub done: i64,
    pub progress: Vec<String>,
    pub message: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl OperationRow {
    /// Rebuilds the operation stored in this row.
    pub(crate) fn into_operation(self) -> Result<Operation, PgError> {
        Ok(Operation {
            id: self.id,
            kind: match self.kind.as_str() {
                "launch" => OperationKind::Launch,
                "destroy" => OperationKind::Destroy,
                "reboot" => OperationKind::Reboot,
                other => return Err(corrupt("kind", format!("unknown kind {other:?}"))),
            },
            status: match self.status.as_str() {
                "running" => OperationStatus::Running,
                "succeeded" => OperationStatus::Succeeded,
                "failed" => OperationStatus::Failed,
                other => return Err(corrupt("status", format!("unknown status {other:?}"))),
            },
            hostnames: self
                .hostnames
                .into_iter()
                .map(|h| h.parse().map_err(|e| corrupt("hostnames", e)))
                .collect::<Result<_, _>>()?,
            done: usize::try_from(self.done).map_err(|e| corrupt("done", e))?,
            progress: self.progress,
            message: self.message,
            started_at: self.started_at,
            finished_at: self.finished_at,
        })
    }
}

/// A row of `lablink_registration_tokens` (`SELECT *`; the types are checked at compile time
/// by `query_file_as!`). It holds only the token's digest, never the token.
#[derive(Debug)]
pub(crate) struct RegistrationTokenRow {
    pub id: Uuid,
    pub digest: Vec<u8>,
    pub label: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub max_uses: Option<i32>,
    pub uses: i32,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl RegistrationTokenRow {
    /// Rebuilds the token stored in this row.
    pub(crate) fn into_token(self) -> Result<RegistrationToken, PgError> {
        Ok(RegistrationToken {
            id: self.id,
            digest: digest("digest", &self.digest)?,
            label: self.label,
            created_at: self.created_at,
            expires_at: self.expires_at,
            max_uses: self
                .max_uses
                .map(|m| u32::try_from(m).map_err(|e| corrupt("max_uses", e)))
                .transpose()?,
            uses: u32::try_from(self.uses).map_err(|e| corrupt("uses", e))?,
            revoked_at: self.revoked_at,
        })
    }
}

/// A `u32` as a PostgreSQL `integer`.
pub(crate) fn to_i32(what: &'static str, value: u32) -> Result<i32, PgError> {
    i32::try_from(value).map_err(|_| PgError::OutOfRange {
        what,
        value: u64::from(value),
    })
}
