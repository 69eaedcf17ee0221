//! [`MemoryVmStore`]: the always-available in-process [`VmStore`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::archive::RemovedVm;
use crate::audit::{AuditEntry, AuditQuery, BoundedAuditLog};
use crate::desktop::DesktopSession;
use crate::logs::BoundedLog;
use crate::registration::{self, MachineRegistration, Registered, RegistrationToken};
use crate::secret::TokenDigest;
use crate::store::{ClaimRequest, Claimed, LeaderLease, ProvisioningLock};
use crate::usage::FleetUsage;
use crate::{
    Assignment, Email, Error, ErrorKind, Hostname, LogStream, Operation, Result, Telemetry,
    VmCounts, VmEvent, VmFilter, VmLogs, VmRecord, VmStore,
};

/// An in-process [`VmStore`]: a map of records behind one mutex, with indexes that make
/// claims O(log n). `Clone` shares the state, so several allocators in one process can share
/// a store. Good enough to run a workshop on one machine (state is lost on restart). Its
/// audit trail keeps the newest [`MEMORY_AUDIT_CAP`](crate::audit::MEMORY_AUDIT_CAP)
/// entries (100,000; a few hundred bytes each) and drops older ones.
#[derive(Debug, Clone, Default)]
pub struct MemoryVmStore {
    inner: Arc<Mutex<Inner>>,
    provisioning: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug, Default)]
struct Inner {
    vms: BTreeMap<Hostname, Entry>,
    assignable: BTreeSet<Hostname>,
    by_email: HashMap<Email, Hostname>,
    by_token: HashMap<TokenDigest, Hostname>,
    operations: HashMap<Uuid, Operation>,
    leader: Option<LeaderLease>,
    roster: BTreeSet<Email>,
    secrets: Secrets,
    /// Ended sessions and until when.
    ended_sessions: HashMap<String, DateTime<Utc>>,
    registration_tokens: Vec<RegistrationToken>,
    /// The newest [`MEMORY_AUDIT_CAP`](crate::audit::MEMORY_AUDIT_CAP) audit entries.
    audit: BoundedAuditLog,
    /// The VMs removed so far, oldest first (the newest
    /// [`MEMORY_REMOVED_CAP`](crate::store::MEMORY_REMOVED_CAP)).
    removed: VecDeque<RemovedVm>,
    /// The time of every VM removed so far, including those the cap dropped.
    removed_usage: FleetUsage,
    /// The workshop settings saved last.
    settings: Option<crate::WorkshopSettings>,
    /// Warnings to participants.
    warnings: crate::warning::WarningBook,
}

/// Shared secrets by name; `Debug` shows the names only.
#[derive(Default)]
struct Secrets(HashMap<String, Vec<u8>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

#[derive(Debug)]
struct Entry {
    record: VmRecord,
    logs: [BoundedLog; 3],
}

/// The index keys of a record, to update the indexes after a change.
#[derive(PartialEq)]
struct Keys {
    assignable: bool,
    owner: Option<Email>,
    token: Option<TokenDigest>,
}

impl Keys {
    fn of(r: &VmRecord) -> Self {
        Self {
            assignable: r.is_assignable(),
            owner: r.owner().cloned(),
            token: r.token_digest,
        }
    }
}

impl MemoryVmStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn not_found(hostname: &Hostname) -> Error {
    Error::not_found("VM not found").with_context("hostname", hostname)
}

fn log_index(stream: LogStream) -> usize {
    match stream {
        LogStream::CloudInit => 0,
        LogStream::Container => 1,
        LogStream::Agent => 2,
    }
}

impl Inner {
    fn reindex(&mut self, hostname: &Hostname, old: Option<Keys>, new: Option<Keys>) {
        if let Some(old) = old {
            if old.assignable {
                self.assignable.remove(hostname);
            }
            if let Some(email) = old.owner {
                self.by_email.remove(&email);
            }
            if let Some(token) = old.token {
                self.by_token.remove(&token);
            }
        }
        if let Some(new) = new {
            if new.assignable {
                self.assignable.insert(hostname.clone());
            }
            if let Some(email) = new.owner {
                self.by_email.insert(email, hostname.clone());
            }
            if let Some(token) = new.token {
                self.by_token.insert(token, hostname.clone());
            }
        }
    }

    /// Runs `change` on the record and reindexes it if it changed. `change` must leave the
    /// record untouched when it fails (as [`VmRecord::apply`] and
    /// [`VmRecord::apply_telemetry`] do), so no copy is needed to roll back.
    fn update(
        &mut self,
        hostname: &Hostname,
        change: impl FnOnce(&mut VmRecord) -> Result<bool>,
    ) -> Result<VmRecord> {
        let entry = self
            .vms
            .get_mut(hostname)
            .ok_or_else(|| not_found(hostname))?;
        let old = Keys::of(&entry.record);
        if !change(&mut entry.record)? {
            return Ok(entry.record.clone());
        }
        let record = entry.record.clone();
        let new = Keys::of(&record);
        if old != new {
            self.reindex(hostname, Some(old), Some(new));
        }
        Ok(record)
    }

    fn check_email_free(&self, assignment: &Assignment) -> Result<()> {
        match self.by_email.get(&assignment.email) {
            Some(owner) => Err(Error::conflict("this email already holds a VM")
                .with_context("email", &assignment.email)
                .with_context("hostname", owner)),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl VmStore for MemoryVmStore {
    async fn insert(&self, records: &[VmRecord]) -> Result<Vec<VmRecord>> {
        let mut inner = self.lock();
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            if let Some(existing) = inner.vms.get(&record.hostname) {
                out.push(existing.record.clone());
                continue;
            }
            if let Some(assignment) = &record.assignment {
                inner.check_email_free(assignment)?;
            }
            inner.reindex(&record.hostname, None, Some(Keys::of(record)));
            inner.vms.insert(
                record.hostname.clone(),
                Entry {
                    record: record.clone(),
                    logs: Default::default(),
                },
            );
            out.push(record.clone());
        }
        Ok(out)
    }

    async fn get(&self, hostname: &Hostname) -> Result<VmRecord> {
        self.lock()
            .vms
            .get(hostname)
            .map(|e| e.record.clone())
            .ok_or_else(|| not_found(hostname))
    }

    async fn get_by_token(&self, digest: &TokenDigest) -> Result<VmRecord> {
        let inner = self.lock();
        inner
            .by_token
            .get(digest)
            .and_then(|h| inner.vms.get(h))
            .map(|e| e.record.clone())
            .ok_or_else(|| Error::not_found("no VM has this token"))
    }

    async fn list(&self, filter: &VmFilter) -> Result<Vec<VmRecord>> {
        let inner = self.lock();
        let limit = filter.limit.unwrap_or(usize::MAX);
        if let Some(email) = &filter.email {
            return Ok(inner
                .by_email
                .get(email)
                .and_then(|h| inner.vms.get(h))
                .map(|e| e.record.clone())
                .filter(|r| filter.matches(r) && limit > 0)
                .into_iter()
                .collect());
        }
        Ok(inner
            .vms
            .values()
            .map(|e| &e.record)
            .filter(|r| filter.matches(r))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn counts(&self) -> Result<VmCounts> {
        let mut counts = VmCounts::default();
        for entry in self.lock().vms.values() {
            counts.add(&entry.record);
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
        let mut inner = self.lock();
        if let VmEvent::Claim(assignment) = event {
            inner.check_email_free(assignment)?;
        }
        inner.update(hostname, |record| {
            if let Some(expected) = expected_generation {
                if record.generation != expected {
                    return Err(Error::conflict("the VM changed since it was read")
                        .with_context("hostname", hostname)
                        .with_context("expected_generation", expected)
                        .with_context("generation", record.generation));
                }
            }
            record.apply(event, now)
        })
    }

    async fn claim(&self, request: &ClaimRequest, now: DateTime<Utc>) -> Result<Claimed> {
        let mut inner = self.lock();
        if let Some(hostname) = inner.by_email.get(&request.email) {
            let record = inner.vms[hostname].record.clone();
            return Ok(Claimed {
                record,
                newly_assigned: false,
            });
        }
        let Some(hostname) = inner.assignable.first().cloned() else {
            return Err(Error::new(ErrorKind::NoCapacity, "no VM is free right now")
                .with_operation("claim")
                .temporary());
        };
        let event = VmEvent::Claim(Assignment {
            email: request.email.clone(),
            crd_command: request.crd_command.clone(),
            pin: request.pin.clone(),
            assigned_at: now,
            desktop: DesktopSession::new(now),
        });
        let record = inner.update(&hostname, |r| r.apply(&event, now))?;
        Ok(Claimed {
            record,
            newly_assigned: true,
        })
    }

    async fn record_telemetry(
        &self,
        hostname: &Hostname,
        telemetry: &Telemetry,
        now: DateTime<Utc>,
    ) -> Result<VmRecord> {
        let mut inner = self.lock();
        let record = inner.update(hostname, |r| r.apply_telemetry(telemetry, now))?;
        if let Some(entry) = inner.vms.get_mut(hostname) {
            for append in &telemetry.logs {
                entry.logs[log_index(append.stream)].append(&append.lines, telemetry.log_cap_bytes);
            }
        }
        Ok(record)
    }

    async fn logs(&self, hostname: &Hostname) -> Result<VmLogs> {
        let inner = self.lock();
        let entry = inner.vms.get(hostname).ok_or_else(|| not_found(hostname))?;
        Ok(VmLogs {
            cloud_init: entry.logs[0].text(),
            container: entry.logs[1].text(),
            agent: entry.logs[2].text(),
        })
    }

    async fn remove(&self, hostnames: &[Hostname]) -> Result<usize> {
        let mut inner = self.lock();
        let mut removed = 0;
        for hostname in hostnames {
            if let Some(entry) = inner.vms.remove(hostname) {
                inner.reindex(hostname, Some(Keys::of(&entry.record)), None);
                inner.warnings.forget(hostname);
                let record = &entry.record;
                inner
                    .removed_usage
                    .add(record.instance_type.as_deref(), &record.usage.seconds);
                inner.removed.push_back(RemovedVm::from(record));
                if inner.removed.len() > crate::store::MEMORY_REMOVED_CAP {
                    inner.removed.pop_front();
                }
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn put_operation(&self, operation: &Operation) -> Result<()> {
        self.lock()
            .operations
            .insert(operation.id, operation.clone());
        Ok(())
    }

    async fn get_operation(&self, id: Uuid) -> Result<Operation> {
        self.lock()
            .operations
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::not_found("operation not found").with_context("id", id))
    }

    async fn list_operations(&self, limit: usize) -> Result<Vec<Operation>> {
        let mut ops: Vec<Operation> = self.lock().operations.values().cloned().collect();
        ops.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
        ops.truncate(limit);
        Ok(ops)
    }

    async fn lock_provisioning(&self) -> Result<ProvisioningLock> {
        self.provisioning
            .clone()
            .try_lock_owned()
            .map(ProvisioningLock::new)
            .map_err(|_| {
                Error::conflict("another provisioning operation is running")
                    .with_operation("lock provisioning")
            })
    }

    async fn try_lead(
        &self,
        candidate: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<LeaderLease> {
        let mut inner = self.lock();
        let free = inner
            .leader
            .as_ref()
            .is_none_or(|l| l.holder == candidate || l.expires_at <= now);
        if free {
            inner.leader = Some(LeaderLease {
                holder: candidate.to_owned(),
                expires_at: until,
            });
        }
        Ok(inner
            .leader
            .clone()
            .expect("a lease was just checked or set"))
    }

    async fn resign(&self, candidate: &str) -> Result<()> {
        let mut inner = self.lock();
        if inner.leader.as_ref().is_some_and(|l| l.holder == candidate) {
            inner.leader = None;
        }
        Ok(())
    }

    async fn roster(&self) -> Result<Vec<Email>> {
        Ok(self.lock().roster.iter().cloned().collect())
    }

    async fn replace_roster(&self, emails: &[Email]) -> Result<()> {
        self.lock().roster = emails.iter().cloned().collect();
        Ok(())
    }

    async fn shared_secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>> {
        Ok(self
            .lock()
            .secrets
            .0
            .entry(name.to_owned())
            .or_insert_with(|| candidate.to_vec())
            .clone())
    }

    async fn end_session(&self, id: &str, until: DateTime<Utc>, now: DateTime<Utc>) -> Result<()> {
        let mut inner = self.lock();
        inner.ended_sessions.retain(|_, u| *u > now);
        let ended = inner.ended_sessions.entry(id.to_owned()).or_insert(until);
        *ended = (*ended).max(until);
        Ok(())
    }

    async fn session_ended(&self, id: &str, now: DateTime<Utc>) -> Result<bool> {
        Ok(self
            .lock()
            .ended_sessions
            .get(id)
            .is_some_and(|until| now < *until))
    }

    async fn create_registration_token(&self, token: &RegistrationToken) -> Result<()> {
        let mut inner = self.lock();
        if inner.registration_tokens.iter().any(|t| t.id == token.id) {
            return Err(Error::conflict("a registration token with this id exists"));
        }
        inner.registration_tokens.push(token.clone());
        Ok(())
    }

    async fn registration_tokens(&self) -> Result<Vec<RegistrationToken>> {
        let mut tokens = self.lock().registration_tokens.clone();
        tokens.sort_by_key(|t| std::cmp::Reverse((t.created_at, t.id)));
        Ok(tokens)
    }

    async fn revoke_registration_token(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<RegistrationToken> {
        let mut inner = self.lock();
        let token = inner
            .registration_tokens
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| Error::not_found("no such registration token"))?;
        token.revoked_at.get_or_insert(now);
        Ok(token.clone())
    }

    async fn register(
        &self,
        token: &TokenDigest,
        request: &MachineRegistration,
        agent_token: TokenDigest,
        now: DateTime<Utc>,
    ) -> Result<Registered> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let stored = inner
            .registration_tokens
            .iter()
            .position(|t| t.digest == *token);
        let by_name = inner.vms.get(&request.hostname).map(|e| &e.record);
        let by_identity = inner.vms.values().map(|e| &e.record).find(|r| {
            r.registration
                .as_ref()
                .is_some_and(|reg| reg.machine_identity == request.machine_identity)
        });
        let again = registration::decide(
            stored.map(|i| &inner.registration_tokens[i]),
            by_name,
            by_identity,
            request,
            now,
        )?;
        let record = match by_name.filter(|_| again) {
            Some(old) => registration::renewed(old.clone(), request, agent_token, now),
            None => request.record(agent_token, now)?,
        };
        let old_keys = by_name.map(Keys::of);
        inner.reindex(&request.hostname, old_keys, Some(Keys::of(&record)));
        match inner.vms.get_mut(&request.hostname) {
            Some(entry) => entry.record = record.clone(),
            None => {
                inner.vms.insert(
                    request.hostname.clone(),
                    Entry {
                        record: record.clone(),
                        logs: Default::default(),
                    },
                );
            }
        }
        if !again {
            if let Some(i) = stored {
                inner.registration_tokens[i].uses += 1;
            }
        }
        Ok(Registered { record, again })
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<()> {
        self.lock().audit.append(entry);
        Ok(())
    }

    async fn audit_entries(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>> {
        Ok(self.lock().audit.query(query))
    }

    async fn workshop_settings(&self) -> Result<Option<crate::WorkshopSettings>> {
        Ok(self.lock().settings.clone())
    }

    async fn put_workshop_settings(
        &self,
        settings: &crate::WorkshopSettings,
        expected_revision: u64,
    ) -> Result<crate::WorkshopSettings> {
        crate::settings::put(&mut self.lock().settings, settings, expected_revision)
    }

    async fn put_warning(&self, warning: &crate::VmWarning) -> Result<crate::VmWarning> {
        let mut inner = self.lock();
        if !inner.vms.contains_key(&warning.hostname) {
            return Err(not_found(&warning.hostname));
        }
        Ok(inner.warnings.put(warning))
    }

    async fn warnings(&self, hostname: &Hostname) -> Result<Vec<crate::VmWarning>> {
        Ok(self.lock().warnings.list(Some(hostname)))
    }

    async fn all_warnings(&self) -> Result<Vec<crate::VmWarning>> {
        Ok(self.lock().warnings.list(None))
    }

    async fn acknowledge_warning(
        &self,
        hostname: &Hostname,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<crate::VmWarning> {
        self.lock().warnings.acknowledge(hostname, id, now)
    }

    async fn remove_warnings(&self, ids: &[Uuid]) -> Result<usize> {
        Ok(self.lock().warnings.remove(ids))
    }

    async fn removed_vms(&self) -> Result<Vec<RemovedVm>> {
        Ok(self.lock().removed.iter().cloned().collect())
    }

    async fn usage(&self, now: DateTime<Utc>) -> Result<FleetUsage> {
        let inner = self.lock();
        let mut usage = inner.removed_usage.clone();
        for entry in inner.vms.values() {
            let record = &entry.record;
            usage.add(record.instance_type.as_deref(), &record.usage_at(now));
        }
        Ok(usage)
    }
}
