//! [`PgVmStore`]: the durable [`VmStore`] on PostgreSQL.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use lablink_core::{
    Assignment, Email, Error, Hostname, Operation, Result, Telemetry, VmCounts, VmEvent, VmFilter,
    VmLogs, VmRecord, VmState, VmStore,
};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::claim::Claims;
use crate::error::{classify, PgError};
use crate::reads::Reads;
use crate::row::{
    required, to_i32, to_i64, vm_row, Column, OperationRow, RegistrationTokenRow, VmArgs, VmRow,
};
use crate::{audit, lock, logs, usage};
use lablink_core::audit::{AuditEntry, AuditQuery};
use lablink_core::registration::{self, MachineRegistration, Registered, RegistrationToken};
use lablink_core::secret::TokenDigest;
use lablink_core::store::{ClaimRequest, Claimed, ProvisioningLock};
use lablink_core::usage::FleetUsage;
use lablink_core::RemovedVm;

/// A [`VmStore`] on PostgreSQL, built from an existing [`PgPool`].
///
/// Every state change but the claim reads the row under `FOR UPDATE`, applies the event in
/// Rust through [`VmRecord::apply`] (so through the core state machine) and writes it back
/// with `WHERE generation = <the generation it was computed from>`. A claim, the hot path, is
/// one statement and one round trip (`sql/vm_claim.sql`): the email's VM if it holds one,
/// else `SELECT ... FOR UPDATE SKIP LOCKED` on the partial index of assignable VMs and an
/// `UPDATE` that makes exactly the change `VmRecord::apply(Claim)` makes (`Available` →
/// `Assigned`, checked against the picked generation); tests compare the two. Concurrent
/// claims of one store (and its clones) are grouped, up to 64 per statement
/// (`sql/vm_claim_batch.sql`), so a rush costs a few round trips rather than one transaction
/// per participant. A unique index on the owner's email makes "one email, one VM" hold
/// across processes.
///
/// The constructor does not touch the database; run [`setup`](crate::setup) (or
/// [`PgVmStore::setup`]) once to create the tables.
#[derive(Debug, Clone)]
pub struct PgVmStore {
    pool: PgPool,
    lock_key: i64,
    claims: Arc<Claims>,
    reads: Arc<Reads>,
}

impl PgVmStore {
    /// A store over `pool`. Does not migrate: call [`setup`](Self::setup) first.
    pub fn new(pool: PgPool) -> Self {
        Self {
            claims: Arc::new(Claims::new(pool.clone())),
            reads: Arc::new(Reads::new(pool.clone())),
            pool,
            lock_key: lock::DEFAULT_LOCK_KEY,
        }
    }

    /// Uses another advisory-lock key for [`VmStore::lock_provisioning`] (for two LabLink
    /// deployments sharing one database).
    pub fn with_lock_key(mut self, key: i64) -> Self {
        self.lock_key = key;
        self
    }

    /// Runs the migrations in [`MIGRATOR`](crate::MIGRATOR).
    pub async fn setup(&self) -> Result<()> {
        crate::setup(&self.pool).await
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// PostgreSQL keeps timestamps to the microsecond: every timestamp a store hands back is cut
/// to that precision first, so what a write returns is exactly what a later read returns.
fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// `record` with every timestamp cut to microseconds (see [`micros`]).
fn normalized(mut r: VmRecord) -> VmRecord {
    let t = &mut r.timings;
    for field in [
        &mut t.provision_start,
        &mut t.provision_end,
        &mut t.cloud_init_start,
        &mut t.cloud_init_end,
        &mut t.container_start,
        &mut t.container_end,
        &mut r.last_heartbeat,
    ] {
        *field = field.map(micros);
    }
    if let Some(a) = &mut r.assignment {
        a.assigned_at = micros(a.assigned_at);
    }
    r.created_at = micros(r.created_at);
    r.updated_at = micros(r.updated_at);
    r.state_changed_at = micros(r.state_changed_at);
    r.usage.since = micros(r.usage.since);
    r
}

fn not_found(hostname: &Hostname) -> Error {
    Error::not_found("VM not found").with_context("hostname", hostname)
}

/// The record of `hostname` (`sql/vm_get.sql`).
async fn fetch_record(
    conn: &mut PgConnection,
    hostname: &Hostname,
) -> Result<Option<VmRecord>, PgError> {
    sqlx::query_file!("sql/vm_get.sql", hostname.as_str())
        .fetch_optional(conn)
        .await?
        .map(|r| vm_row!(r).into_record())
        .transpose()
}

/// The record of `hostname`, its row locked until the transaction ends
/// (`sql/vm_get_for_update.sql`).
async fn lock_record(
    conn: &mut PgConnection,
    hostname: &Hostname,
) -> Result<Option<VmRecord>, PgError> {
    sqlx::query_file!("sql/vm_get_for_update.sql", hostname.as_str())
        .fetch_optional(conn)
        .await?
        .map(|r| vm_row!(r).into_record())
        .transpose()
}

/// Writes `record`, computed from a row whose generation was `from_generation`. Returns
/// whether the row still had that generation (and so was written).
async fn write_record(
    conn: &mut PgConnection,
    record: &VmRecord,
    from_generation: u64,
) -> Result<bool, PgError> {
    let a = VmArgs::new(record)?;
    let from_generation = to_i64("generation", from_generation)?;
    let done = sqlx::query_file!(
        "sql/vm_update.sql",
        a.hostname,
        a.instance_id,
        a.address,
        a.state,
        a.resume,
        a.email,
        a.crd_command,
        a.pin,
        a.assigned_at,
        a.gpu_health,
        a.in_use,
        a.agent_status,
        a.last_heartbeat,
        a.boot_id,
        a.restarts,
        a.provision_start,
        a.provision_end,
        a.cloud_init_start,
        a.cloud_init_end,
        a.container_start,
        a.container_end,
        a.cloud_init_duration_seconds,
        a.container_startup_duration_seconds,
        a.last_error,
        a.token_digest,
        a.generation,
        a.created_at,
        a.updated_at,
        a.state_changed_at,
        a.machine_identity,
        a.allow_reboot,
        a.instance_type,
        a.usage.starting,
        a.usage.free,
        a.usage.in_use,
        a.usage.idle,
        a.usage.other,
        a.usage_since,
        a.history,
        from_generation,
        a.desktop,
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A unique violation on the owner's email, as a LabLink conflict.
fn email_taken(error: PgError, assignment: Option<&Assignment>, operation: &'static str) -> Error {
    let is_email = matches!(&error, PgError::Sqlx(sqlx::Error::Database(db))
        if db.is_unique_violation() && db.constraint() == Some("lablink_vms_email_key"));
    match (is_email, assignment) {
        (true, Some(a)) => Error::conflict("this email already holds a VM")
            .with_operation(operation)
            .with_context("email", &a.email),
        _ => classify(operation, error),
    }
}

/// Inserts `record` unless its hostname exists (`sql/vm_insert.sql`); returns whether it
/// was inserted.
async fn insert_record(conn: &mut PgConnection, record: &VmRecord) -> Result<bool, PgError> {
    let a = VmArgs::new(record)?;
    let inserted = sqlx::query_file!(
        "sql/vm_insert.sql",
        a.hostname,
        a.instance_id,
        a.address,
        a.state,
        a.resume,
        a.email,
        a.crd_command,
        a.pin,
        a.assigned_at,
        a.gpu_health,
        a.in_use,
        a.agent_status,
        a.last_heartbeat,
        a.boot_id,
        a.restarts,
        a.provision_start,
        a.provision_end,
        a.cloud_init_start,
        a.cloud_init_end,
        a.container_start,
        a.container_end,
        a.cloud_init_duration_seconds,
        a.container_startup_duration_seconds,
        a.last_error,
        a.token_digest,
        a.generation,
        a.created_at,
        a.updated_at,
        a.state_changed_at,
        a.machine_identity,
        a.allow_reboot,
        a.instance_type,
        a.usage.starting,
        a.usage.free,
        a.usage.in_use,
        a.usage.idle,
        a.usage.other,
        a.usage_since,
        a.history,
        a.desktop,
    )
    .fetch_optional(conn)
    .await?;
    Ok(inserted.is_some())
}

/// The record of the machine registered with `identity` (`sql/vm_get_by_identity.sql`).
async fn fetch_by_identity(
    conn: &mut PgConnection,
    identity: &str,
) -> Result<Option<VmRecord>, PgError> {
    sqlx::query_file!("sql/vm_get_by_identity.sql", identity)
        .fetch_optional(conn)
        .await?
        .map(|r| vm_row!(r).into_record())
        .transpose()
}

/// The registration token whose digest is `digest`, its row locked until the transaction
/// ends (`sql/registration_token_lock.sql`).
async fn lock_registration_token(
    conn: &mut PgConnection,
    digest: &TokenDigest,
) -> Result<Option<RegistrationToken>, PgError> {
    sqlx::query_file_as!(
        RegistrationTokenRow,
        "sql/registration_token_lock.sql",
        &digest.as_bytes()[..]
    )
    .fetch_optional(conn)
    .await?
    .map(RegistrationTokenRow::into_token)
    .transpose()
}

/// A unique violation on the machine identity (the same machine registering under two names
/// at once), as a LabLink conflict.
fn identity_taken(error: PgError, operation: &'static str) -> Error {
    let is_identity = matches!(&error, PgError::Sqlx(sqlx::Error::Database(db))
        if db.is_unique_violation() && db.constraint() == Some("lablink_vms_machine_identity_key"));
    if is_identity {
        Error::conflict(
            "this machine is registering under another name at the same time; \
             unregister it first, or register it under that name",
        )
        .with_operation(operation)
    } else {
        classify(operation, error)
    }
}

fn into_records(rows: impl IntoIterator<Item = VmRow>) -> Result<Vec<VmRecord>, PgError> {
    rows.into_iter().map(VmRow::into_record).collect()
}

#[async_trait]
impl VmStore for PgVmStore {
    async fn insert(&self, records: &[VmRecord]) -> Result<Vec<VmRecord>> {
        let op = "insert";
        let mut tx = self.pool.begin().await.map_err(|e| classify(op, e))?;
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            let record = &normalized(record.clone());
            let inserted = insert_record(&mut tx, record)
                .await
                .map_err(|e| email_taken(e, record.assignment.as_ref(), op))?;
            if inserted {
                out.push(record.clone());
                continue;
            }
            let existing = fetch_record(&mut tx, &record.hostname)
                .await
                .map_err(|e| classify(op, e))?
                .ok_or_else(|| not_found(&record.hostname).with_operation(op))?;
            out.push(existing);
        }
        tx.commit().await.map_err(|e| classify(op, e))?;
        Ok(out)
    }

    async fn get(&self, hostname: &Hostname) -> Result<VmRecord> {
        self.reads
            .get(hostname)
            .await?
            .ok_or_else(|| not_found(hostname))
    }

    async fn get_by_token(&self, digest: &TokenDigest) -> Result<VmRecord> {
        let op = "get by token";
        let row = sqlx::query_file!("sql/vm_get_by_token.sql", &digest.as_bytes()[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| classify(op, e))?;
        match row {
            Some(row) => vm_row!(row).into_record().map_err(|e| classify(op, e)),
            None => Err(Error::not_found("no VM has this token")),
        }
    }

    async fn list(&self, filter: &VmFilter) -> Result<Vec<VmRecord>> {
        let op = "list";
        let mut states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        states.dedup();
        let limit = filter
            .limit
            .map(|l| to_i64("limit", l as u64))
            .transpose()
            .map_err(|e| classify(op, e))?;
        let email = filter.email.as_ref().map(|e| e.as_str());
        let rows = sqlx::query_file!("sql/vm_list.sql", &states[..] as &[&str], email, limit)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| classify(op, e))?;
        into_records(rows.into_iter().map(|r| vm_row!(r))).map_err(|e| classify(op, e))
    }

    async fn counts(&self) -> Result<VmCounts> {
        let op = "counts";
        let rows = sqlx::query_file!("sql/vm_counts.sql")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| classify(op, e))?;
        let mut counts = VmCounts::default();
        for row in rows {
            let state = crate::row::state(row.state.into_opt(), row.resume.into_opt())
                .map_err(|e| classify(op, e))?;
            let gpu_unhealthy = required("gpu_unhealthy", row.gpu_unhealthy.into_opt())
                .map_err(|e| classify(op, e))?;
            let n = required("n", row.n.into_opt()).map_err(|e| classify(op, e))?;
            let n = usize::try_from(n).unwrap_or(0);
            counts.total += n;
            match state {
                VmState::Requested => counts.requested += n,
                VmState::Booting | VmState::Resetting => counts.booting += n,
                VmState::Available => counts.available += n,
                VmState::Assigned => {}
                VmState::Unhealthy { .. } => counts.unhealthy += n,
                VmState::Rebooting { .. } => counts.rebooting += n,
                VmState::Failed => counts.failed += n,
                VmState::Terminating | VmState::Terminated => counts.terminating += n,
            }
            if state.is_assignable() && !gpu_unhealthy {
                counts.assignable += n;
            }
            if state.is_owned() {
                counts.assigned += n;
            }
        }
        Ok(counts)
    }

    async fn apply(
        &self,
        hostname: &Hostname,
        event: &VmEvent,
        expected_generation: Option<u64>,
        now: DateTime<Utc>,
    ) -> Result<VmRecord> {
        let op = "apply";
        let mut tx = self.pool.begin().await.map_err(|e| classify(op, e))?;
        let mut record = lock_record(&mut tx, hostname)
            .await
            .map_err(|e| classify(op, e))?
            .ok_or_else(|| not_found(hostname).with_operation(op))?;
        let from = record.generation;
        if let Some(expected) = expected_generation {
            if from != expected {
                return Err(Error::conflict("the VM changed since it was read")
                    .with_operation(op)
                    .with_context("hostname", hostname)
                    .with_context("expected_generation", expected)
                    .with_context("generation", from));
            }
        }
        if !record.apply(event, now)? {
            return Ok(record);
        }
        let record = normalized(record);
        let assignment = record.assignment.clone();
        let written = write_record(&mut tx, &record, from)
            .await
            .map_err(|e| email_taken(e, assignment.as_ref(), op))?;
        if !written {
            return Err(Error::conflict("the VM changed while it was locked")
                .with_operation(op)
                .with_context("hostname", hostname)
                .temporary());
        }
        tx.commit().await.map_err(|e| classify(op, e))?;
        Ok(record)
    }

    async fn claim(&self, request: &ClaimRequest, now: DateTime<Utc>) -> Result<Claimed> {
        self.claims.claim(request, now).await
    }

    async fn record_telemetry(
        &self,
        hostname: &Hostname,
        telemetry: &Telemetry,
        now: DateTime<Utc>,
    ) -> Result<VmRecord> {
        let op = "record telemetry";
        let mut tx = self.pool.begin().await.map_err(|e| classify(op, e))?;
        let mut record = lock_record(&mut tx, hostname)
            .await
            .map_err(|e| classify(op, e))?
            .ok_or_else(|| not_found(hostname).with_operation(op))?;
        let from = record.generation;
        let changed = record.apply_telemetry(telemetry, now)?;
        let record = normalized(record);
        if changed
            && !write_record(&mut tx, &record, from)
                .await
                .map_err(|e| classify(op, e))?
        {
            return Err(Error::conflict("the VM changed while it was locked")
                .with_operation(op)
                .with_context("hostname", hostname)
                .temporary());
        }
        for append in &telemetry.logs {
            logs::append(&mut tx, hostname, append, telemetry.log_cap_bytes)
                .await
                .map_err(|e| classify(op, e).with_context("hostname", hostname))?;
        }
        tx.commit().await.map_err(|e| classify(op, e))?;
        Ok(record)
    }

    async fn logs(&self, hostname: &Hostname) -> Result<VmLogs> {
        let op = "logs";
        let mut tx = self.pool.begin().await.map_err(|e| classify(op, e))?;
        let exists = sqlx::query_file_scalar!("sql/vm_exists.sql", hostname.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| classify(op, e))?;
        if Column::<bool>::into_opt(exists) != Some(true) {
            return Err(not_found(hostname).with_operation(op));
        }
        let logs = logs::read(&mut tx, hostname)
            .await
            .map_err(|e| classify(op, e))?;
        tx.commit().await.map_err(|e| classify(op, e))?;
        Ok(logs)
    }

    async fn remove(&self, hostnames: &[Hostname]) -> Result<usize> {
        let names: Vec<&str> = hostnames.iter().map(Hostname::as_str).collect();
        usage::remove_keeping(&self.pool, &names)
            .await
            .map_err(|e| classify("remove", e))
    }

    async fn put_operation(&self, operation: &Operation) -> Result<()> {
        let op = "put operation";
        let o = operation;
        let hostnames: Vec<&str> = o.hostnames.iter().map(Hostname::as_str).collect();
        let done = to_i64("done", o.done as u64).map_err(|e| classify(op, e))?;
        sqlx::query_file!(
            "sql/operation_put.sql",
            o.id,
            o.kind.as_str(),
            o.status.as_str(),
            &hostnames[..] as &[&str],
            done,
            &o.progress[..],
            o.message.as_deref(),
            o.started_at,
            o.finished_at,
        )
        .execute(&self.pool)
        .await
        .map_err(|e| classify(op, e))?;
        Ok(())
    }

    async fn get_operation(&self, id: Uuid) -> Result<Operation> {
        let op = "get operation";
        let row = sqlx::query_file_as!(OperationRow, "sql/operation_get.sql", id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| classify(op, e))?
            .ok_or_else(|| Error::not_found("operation not found").with_context("id", id))?;
        row.into_operation().map_err(|e| classify(op, e))
    }

    async fn list_operations(&self, limit: usize) -> Result<Vec<Operation>> {
        let op = "list operations";
        let limit = to_i64("limit", limit as u64).map_err(|e| classify(op, e))?;
        let rows = sqlx::query_file_as!(OperationRow, "sql/operation_list.sql", limit)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| classify(op, e))?;
        rows.into_iter()
            .map(OperationRow::into_operation)
            .collect::<Result<_, _>>()
            .map_err(|e| classify(op, e))
    }

    async fn lock_provisioning(&self) -> Result<ProvisioningLock> {
        lock::try_lock(&self.pool, self.lock_key).await
    }

    async fn try_lead(
        &self,
        candidate: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<lablink_core::store::LeaderLease> {
        crate::leader::try_lead(&self.pool, candidate, now, until).await
    }

    async fn resign(&self, candidate: &str) -> Result<()> {
        crate::leader::resign(&self.pool, candidate).await
    }

    async fn roster(&self) -> Result<Vec<Email>> {
        let op = "roster";
        let rows = sqlx::query_file_scalar!("sql/roster_list.sql")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| classify(op, e))?;
        rows.into_iter()
            .map(|e| {
                e.parse::<Email>()
                    .map_err(|e| classify(op, crate::row::corrupt("email", e)))
            })
            .collect()
    }

    async fn replace_roster(&self, emails: &[Email]) -> Result<()> {
        let op = "replace_roster";
        let emails: Vec<&str> = emails.iter().map(Email::as_str).collect();
        let replace = async {
            let mut tx = self.pool.begin().await?;
            // One writer at a time (replicas seeding or admins uploading together): the list
            // is replaced as a whole, never merged, and never fails on the other's rows.
            // Readers are not blocked.
            sqlx::query!("LOCK TABLE lablink_roster IN SHARE ROW EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await?;
            sqlx::query!("DELETE FROM lablink_roster")
                .execute(&mut *tx)
                .await?;
            sqlx::query_file!("sql/roster_replace.sql", &emails[..] as &[&str])
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        };
        replace.await.map_err(|e| classify(op, e))
    }

    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        let op = "shared_secret";
        sqlx::query_file_scalar!("sql/shared_secret.sql", name, candidate)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| classify(op, e).with_context("name", name))
    }

    async fn end_session(&self, id: &str, until: DateTime<Utc>, now: DateTime<Utc>) -> Result<()> {
        let op = "end_session";
        // Pruning first, apart: it is housekeeping, and one statement may not both delete
        // and upsert the same row.
        sqlx::query_file!("sql/session_prune.sql", now)
            .execute(&self.pool)
            .await
            .map_err(|e| classify(op, e))?;
        sqlx::query_file!("sql/session_end.sql", id, until)
            .execute(&self.pool)
            .await
            .map_err(|e| classify(op, e))?;
        Ok(())
    }

    async fn session_ended(&self, id: &str, now: DateTime<Utc>) -> Result<bool> {
        let op = "session_ended";
        sqlx::query_file_scalar!("sql/session_ended.sql", id, now)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| classify(op, e))
    }

    async fn create_registration_token(&self, token: &RegistrationToken) -> Result<()> {
        let op = "create_registration_token";
        let t = token;
        let max_uses = t
            .max_uses
            .map(|m| to_i32("max_uses", m))
            .transpose()
            .map_err(|e| classify(op, e))?;
        let uses = to_i32("uses", t.uses).map_err(|e| classify(op, e))?;
        sqlx::query_file!(
            "sql/registration_token_insert.sql",
            t.id,
            &t.digest.as_bytes()[..],
            t.label,
            t.created_at,
            t.expires_at,
            max_uses,
            uses,
            t.revoked_at,
        )
        .execute(&self.pool)
        .await
        .map_err(|e| classify(op, e).with_context("id", t.id))?;
        Ok(())
    }

    async fn registration_tokens(&self) -> Result<Vec<RegistrationToken>> {
        let op = "registration_tokens";
        let rows = sqlx::query_file_as!(RegistrationTokenRow, "sql/registration_token_list.sql")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| classify(op, e))?;
        rows.into_iter()
            .map(RegistrationTokenRow::into_token)
            .collect::<Result<_, _>>()
            .map_err(|e| classify(op, e))
    }

    async fn revoke_registration_token(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<RegistrationToken> {
        let op = "revoke_registration_token";
        let row = sqlx::query_file_as!(
            RegistrationTokenRow,
            "sql/registration_token_revoke.sql",
            id,
            now
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| classify(op, e))?
        .ok_or_else(|| {
            Error::not_found("no such registration token")
                .with_operation(op)
                .with_context("id", id)
        })?;
        row.into_token().map_err(|e| classify(op, e))
    }

    async fn register(
        &self,
        token: &TokenDigest,
        request: &MachineRegistration,
        agent_token: TokenDigest,
        now: DateTime<Utc>,
    ) -> Result<Registered> {
        let op = "register";
        let hostname = &request.hostname;
        // One transaction: the token row is locked first (registrations with one token run
        // one at a time, so its uses never pass max_uses), then the row under the name (a
        // registration again rewrites it); every refusal returns before anything is written
        // and the transaction rolls back when dropped.
        let mut tx = self.pool.begin().await.map_err(|e| classify(op, e))?;
        let stored = lock_registration_token(&mut tx, token)
            .await
            .map_err(|e| classify(op, e))?;
        let by_name = lock_record(&mut tx, hostname)
            .await
            .map_err(|e| classify(op, e))?;
        let by_identity = fetch_by_identity(&mut tx, &request.machine_identity)
            .await
            .map_err(|e| classify(op, e))?;
        let again = registration::decide(
            stored.as_ref(),
            by_name.as_ref(),
            by_identity.as_ref(),
            request,
            now,
        )?;
        let record = match by_name.filter(|_| again) {
            Some(old) => {
                let from = old.generation;
                let record = normalized(registration::renewed(old, request, agent_token, now));
                let written = write_record(&mut tx, &record, from)
                    .await
                    .map_err(|e| classify(op, e))?;
                if !written {
                    return Err(Error::conflict("the VM changed while it was locked")
                        .with_operation(op)
                        .with_context("hostname", hostname)
                        .temporary());
                }
                record
            }
            None => {
                let record = normalized(request.record(agent_token, now)?);
                let inserted = insert_record(&mut tx, &record)
                    .await
                    .map_err(|e| identity_taken(e, op))?;
                if !inserted {
                    // Another transaction took the name after this one found it free.
                    return Err(Error::conflict(
                        "the name was registered at the same time; try again",
                    )
                    .with_operation(op)
                    .with_context("hostname", hostname)
                    .temporary());
                }
                if let Some(t) = &stored {
                    sqlx::query_file!("sql/registration_token_use.sql", t.id)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| classify(op, e))?;
                }
                record
            }
        };
        tx.commit().await.map_err(|e| classify(op, e))?;
        Ok(Registered { record, again })
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<()> {
        audit::append(&self.pool, entry)
            .await
            .map_err(|e| classify("append_audit", e).with_context("id", entry.id))
    }

    async fn audit_entries(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>> {
        audit::entries(&self.pool, query)
            .await
            .map_err(|e| classify("audit_entries", e))
    }

    async fn workshop_settings(&self) -> Result<Option<lablink_core::WorkshopSettings>> {
        crate::settings::get(&self.pool)
            .await
            .map_err(|e| classify("workshop_settings", e))
    }

    async fn put_workshop_settings(
        &self,
        settings: &lablink_core::WorkshopSettings,
        expected_revision: u64,
    ) -> Result<lablink_core::WorkshopSettings> {
        let pool = &self.pool;
        let saved = crate::settings::put(pool, settings, expected_revision)
            .await
            .map_err(|e| classify("put_workshop_settings", e))?;
        match saved {
            Some(saved) => Ok(saved),
            // Someone saved since (or first): nothing was written.
            None => Err(crate::settings::conflict(pool, expected_revision).await),
        }
    }

    async fn put_warning(
        &self,
        warning: &lablink_core::VmWarning,
    ) -> Result<lablink_core::VmWarning> {
        crate::settings::put_warning(&self.pool, warning)
            .await
            .map_err(|e| classify("put_warning", e).with_context("hostname", &warning.hostname))
    }

    async fn warnings(&self, hostname: &Hostname) -> Result<Vec<lablink_core::VmWarning>> {
        crate::settings::list(&self.pool, hostname)
            .await
            .map_err(|e| classify("warnings", e))
    }

    async fn all_warnings(&self) -> Result<Vec<lablink_core::VmWarning>> {
        crate::settings::list_all(&self.pool)
            .await
            .map_err(|e| classify("all_warnings", e))
    }

    async fn acknowledge_warning(
        &self,
        hostname: &Hostname,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<lablink_core::VmWarning> {
        let op = "acknowledge_warning";
        crate::settings::acknowledge(&self.pool, hostname, id, now)
            .await
            .map_err(|e| classify(op, e))?
            .ok_or_else(|| {
                Error::not_found("no such warning for this VM")
                    .with_operation(op)
                    .with_context("hostname", hostname)
            })
    }

    async fn remove_warnings(&self, ids: &[Uuid]) -> Result<usize> {
        crate::settings::remove(&self.pool, ids)
            .await
            .map_err(|e| classify("remove_warnings", e))
    }

    async fn removed_vms(&self) -> Result<Vec<RemovedVm>> {
        usage::removed_vms(&self.pool)
            .await
            .map_err(|e| classify("removed_vms", e))
    }

    async fn usage(&self, now: DateTime<Utc>) -> Result<FleetUsage> {
        usage::fleet(&self.pool, now)
            .await
            .map_err(|e| classify("usage", e))
    }
}
