//! Collecting participants' work off the VMs through their agents.
//!
//! An admin asks for a collection (all VMs or some); each VM's agent learns of it through its
//! long-poll `GET /api/v1/vms/{hostname}/tasks`, finds the files matching
//! [`CollectSettings::patterns`] under [`CollectSettings::roots`] and streams them as one tar
//! archive with a SHA-256 per file and a final manifest to
//! `PUT /api/v1/vms/{hostname}/collections/{id}`. The [`Collector`] spools the upload to a
//! temporary file, checks every checksum, and only then commits it to the
//! [`ArtifactStore`]: the archive first, then the manifest (the commit point). A cut upload
//! leaves nothing behind, and the agent retries the whole collection.
//!
//! Everything lives in the artifact store, so a restarted allocator (or one with an S3 store,
//! on another machine) knows every collection:
//!
//! - `collections/<hostname>/status.json`: the current request and its progress,
//! - `collections/<hostname>/manifest.json`: the last complete collection,
//! - `collections/<hostname>/<id>.tar`: its archive.
//!
//! Several allocator replicas may share one store (S3): each agent's task poll and each
//! upload read the VM's status from the store, so a collection asked for through one replica
//! reaches an agent polling another at its next poll; only the admin page's live table shows
//! this replica's view.

mod allocator;
pub mod archive;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{Seek, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use lablink_core::{
    ArtifactStore, BeforeDestroy, Error, ErrorKind, Hostname, MemoryArtifactStore, Result,
    VmRecord, VmState,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use allocator::{CollectingAllocator, Destroyed};
pub use archive::{CollectedFile, SkippedFile};
/// The agent's task, and the status an upload answers with, are wire types.
pub use lablink_protocol::{CollectionState, CollectionStatus, CollectionTask};

/// What to collect, the limits, and how destroy uses collections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectSettings {
    /// Directories searched on each VM. `~` is the agent's home directory, `{hostname}` the
    /// VM's name (for VMs sharing one file system, like local demo VMs). The agent never
    /// collects its own configuration (`/etc/lablink`, holding `agent.env` with its
    /// `API_TOKEN`), cloud-init's copies of the user data that carried the token
    /// (`/var/lib/cloud`, `/run/cloud-init`) or its state directory, even under a root of
    /// `/`; it reports such files as skipped.
    pub roots: Vec<String>,
    /// Glob patterns matched against paths relative to a root: `*` stays within a folder,
    /// `**` crosses folders (`**/*.slp` is every `.slp` file at any depth).
    pub patterns: Vec<String>,
    /// Most bytes of files collected from one VM; files that do not fit are skipped and
    /// reported.
    pub max_vm_bytes: u64,
    /// Most bytes of all VMs' collections together.
    pub max_total_bytes: u64,
    /// Destroy collects from the VMs first and does not destroy a VM whose collection
    /// failed; a request that says `force` destroys at once without collecting. This covers the supervisor's automatic
    /// destroys of VMs that may hold a participant's work too (the scheduled destruction at
    /// the end of a workshop, idle release): a VM whose collection failed is kept and
    /// flagged (`destroy_held`) for the admin.
    pub destroy_collects_first: bool,
    /// How long destroy waits for the collections, seconds; a VM not done by then counts as
    /// failed.
    pub destroy_wait_seconds: u64,
    /// Uploads that fail their checks before a collection counts as failed (cut uploads do
    /// not count: the agent just retries).
    pub max_attempts: u32,
}

impl Default for CollectSettings {
    fn default() -> Self {
        Self {
            roots: vec!["~".into()],
            patterns: vec!["**/*.slp".into()],
            max_vm_bytes: 1 << 30,
            max_total_bytes: 50 << 30,
            destroy_collects_first: false,
            destroy_wait_seconds: 300,
            max_attempts: 5,
        }
    }
}

impl CollectSettings {
    /// Every problem with these settings (empty when they are usable).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.roots.is_empty() {
            problems.push("[collect] roots must not be empty".into());
        }
        for root in &self.roots {
            if !(root.starts_with('/') || root == "~" || root.starts_with("~/")) {
                problems.push(format!(
                    "[collect] root {root:?} must be an absolute path or start with ~/"
                ));
            }
        }
        if self.patterns.is_empty() {
            problems.push("[collect] patterns must not be empty".into());
        }
        for pattern in &self.patterns {
            if let Err(e) = globset::Glob::new(pattern) {
                problems.push(format!("[collect] pattern {pattern:?} is invalid: {e}"));
            }
        }
        if self.max_vm_bytes == 0 {
            problems.push("[collect] max_vm_bytes must be positive".into());
        }
        if self.max_total_bytes < self.max_vm_bytes {
            problems.push("[collect] max_total_bytes must be at least max_vm_bytes".into());
        }
        if self.destroy_wait_seconds == 0 {
            problems.push("[collect] destroy_wait_seconds must be positive".into());
        }
        if self.max_attempts == 0 {
            problems.push("[collect] max_attempts must be positive".into());
        }
        problems
    }
}

/// A VM's last complete collection (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionManifest {
    /// The VM.
    pub hostname: String,
    /// The collection's id.
    pub id: String,
    /// When it was stored.
    pub completed_at: DateTime<Utc>,
    /// The archive's key in the artifact store.
    pub archive: String,
    /// The collected files.
    pub files: Vec<CollectedFile>,
    /// The matching files left out, and why.
    pub skipped: Vec<SkippedFile>,
}

impl CollectionManifest {
    /// Bytes of file content.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Why an upload was not stored. `retry` says whether the collection is still pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRefused {
    /// The HTTP status to answer.
    pub kind: ErrorKind,
    /// What went wrong (no secrets: paths and sizes only).
    pub message: String,
}

impl From<Error> for UploadRefused {
    fn from(e: Error) -> Self {
        Self {
            kind: e.kind(),
            message: e.message().to_owned(),
        }
    }
}

fn refused(kind: ErrorKind, message: impl Into<String>) -> UploadRefused {
    UploadRefused {
        kind,
        message: message.into(),
    }
}

/// Slack over the file bytes for tar headers and the manifest.
const ARCHIVE_OVERHEAD: u64 = 64 << 20;

fn status_key(hostname: &str) -> String {
    format!("collections/{hostname}/status.json")
}

fn manifest_key(hostname: &str) -> String {
    format!("collections/{hostname}/manifest.json")
}

/// Runs collections: hands tasks to agents, checks and stores their uploads, builds the
/// admin's zip. Cheap to share (`Arc`).
pub struct Collector {
    store: Arc<dyn ArtifactStore>,
    settings: CollectSettings,
    statuses: Mutex<HashMap<String, Option<CollectionStatus>>>,
    uploading: Mutex<HashSet<String>>,
    commit: tokio::sync::Mutex<()>,
    changed: watch::Sender<u64>,
}

impl fmt::Debug for Collector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Collector")
            .field("store", &self.store)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Default for Collector {
    /// Default settings, collections kept in memory.
    fn default() -> Self {
        Self::new(
            Arc::new(MemoryArtifactStore::default()),
            CollectSettings::default(),
        )
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|e| Error::internal(e.to_string()))
}

impl Collector {
    /// Collections stored in `store`, with `settings`.
    pub fn new(store: Arc<dyn ArtifactStore>, settings: CollectSettings) -> Self {
        Self {
            store,
            settings,
            statuses: Mutex::default(),
            uploading: Mutex::default(),
            commit: tokio::sync::Mutex::new(()),
            changed: watch::channel(0).0,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &CollectSettings {
        &self.settings
    }

    /// The artifact store.
    pub fn store(&self) -> &Arc<dyn ArtifactStore> {
        &self.store
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<CollectionStatus>>> {
        self.statuses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current collection of `hostname`, if one was ever asked for, as this process
    /// last read or wrote it.
    pub async fn status(&self, hostname: &str) -> Result<Option<CollectionStatus>> {
        if let Some(status) = self.cached().get(hostname) {
            return Ok(status.clone());
        }
        self.refresh(hostname).await
    }

    /// The current collection of `hostname`, read from the artifact store (so changes made
    /// by another allocator replica sharing the store are seen).
    pub async fn refresh(&self, hostname: &str) -> Result<Option<CollectionStatus>> {
        let status = match self.store.get(&status_key(hostname)).await {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| {
                Error::internal(format!(
                    "collection status of {hostname} is unreadable: {e}"
                ))
            })?),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e),
        };
        self.cached().insert(hostname.to_owned(), status.clone());
        Ok(status)
    }

    async fn save(&self, status: &CollectionStatus) -> Result<()> {
        self.store
            .put(&status_key(&status.hostname), to_json(status)?)
            .await?;
        self.cached()
            .insert(status.hostname.clone(), Some(status.clone()));
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// The last complete collection of `hostname`.
    pub async fn manifest(&self, hostname: &str) -> Result<Option<CollectionManifest>> {
        match self.store.get(&manifest_key(hostname)).await {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
                Error::internal(format!(
                    "collection manifest of {hostname} is unreadable: {e}"
                ))
            })?)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts a new collection on each of `hostnames` (replacing one in progress).
    pub async fn request(&self, hostnames: &[Hostname]) -> Result<Vec<CollectionStatus>> {
        let mut out = Vec::with_capacity(hostnames.len());
        for hostname in hostnames {
            let now = Utc::now();
            let status = CollectionStatus {
                hostname: hostname.to_string(),
                id: uuid::Uuid::new_v4().simple().to_string(),
                state: CollectionState::Requested,
                requested_at: now,
                updated_at: now,
                attempts: 0,
                error: None,
                files: 0,
                bytes: 0,
                skipped: 0,
            };
            self.save(&status).await?;
            tracing::info!(hostname = %hostname, collection = %status.id, "collection requested");
            out.push(status);
        }
        Ok(out)
    }

    /// Bytes of every VM's stored collection but `except`'s.
    async fn stored_bytes(&self, except: &str) -> Result<u64> {
        Ok(self
            .store
            .list("collections/")
            .await?
            .iter()
            .filter(|a| a.key.ends_with(".tar"))
            .filter(|a| a.key.split('/').nth(1) != Some(except))
            .map(|a| a.size)
            .sum())
    }

    /// Bytes `hostname` may still upload.
    async fn budget(&self, hostname: &str) -> Result<u64> {
        let used = self.stored_bytes(hostname).await?;
        Ok(self
            .settings
            .max_vm_bytes
            .min(self.settings.max_total_bytes.saturating_sub(used)))
    }

    /// The collection `hostname`'s agent should do now, if any.
    pub async fn task(&self, hostname: &str) -> Result<Option<CollectionTask>> {
        let Some(status) = self.status(hostname).await? else {
            return Ok(None);
        };
        if !status.state.is_pending() {
            return Ok(None);
        }
        Ok(Some(CollectionTask {
            id: status.id,
            roots: self.settings.roots.clone(),
            patterns: self.settings.patterns.clone(),
            max_bytes: self.budget(hostname).await?,
        }))
    }

    /// Like [`task`](Self::task), holding up to `hold` for one to be asked for (or until
    /// `stop` resolves).
    pub async fn wait_task(
        &self,
        hostname: &str,
        hold: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Option<CollectionTask>> {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::sleep(hold);
        tokio::pin!(deadline, stop);
        // Once per poll from the store: a request made through another replica is seen at
        // the agent's next poll; this process's own requests wake the poll at once.
        self.refresh(hostname).await?;
        loop {
            if let Some(task) = self.task(hostname).await? {
                return Ok(Some(task));
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return Ok(None) },
                () = &mut deadline => return Ok(None),
                () = &mut stop => return Ok(None),
            }
        }
    }

    /// Marks the pending collection of `hostname` failed with `reason` (a VM that did not
    /// answer in time). Does nothing when it is no longer pending.
    pub async fn fail(&self, hostname: &str, id: &str, reason: &str) -> Result<()> {
        if let Some(mut status) = self.status(hostname).await? {
            if status.id == id && status.state.is_pending() {
                status.state = CollectionState::Failed;
                status.error = Some(reason.to_owned());
                status.updated_at = Utc::now();
                self.save(&status).await?;
                tracing::warn!(hostname, collection = id, reason, "collection failed");
            }
        }
        Ok(())
    }

    /// Receives the upload of collection `id` from `hostname`'s agent: spools `body` (at most
    /// the VM's budget plus headers), checks it, and commits it. An upload of a collection
    /// already complete is answered with its status without reading the body.
    pub async fn receive<S, E>(
        &self,
        hostname: &str,
        id: &str,
        body: S,
    ) -> std::result::Result<CollectionStatus, UploadRefused>
    where
        S: Stream<Item = std::result::Result<bytes::Bytes, E>> + Send + Unpin,
        E: fmt::Display,
    {
        let Some(mut status) = self.refresh(hostname).await? else {
            return Err(refused(
                ErrorKind::NotFound,
                "no collection was asked of this VM",
            ));
        };
        if status.id != id {
            return Err(refused(
                ErrorKind::Conflict,
                "this is not the VM's current collection",
            ));
        }
        match status.state {
            CollectionState::Complete => return Ok(status),
            CollectionState::Failed => {
                return Err(refused(
                    ErrorKind::Conflict,
                    "this collection failed; ask for a new one",
                ))
            }
            CollectionState::Requested | CollectionState::Uploading => {}
        }
        let _guard = UploadGuard::take(&self.uploading, hostname).ok_or_else(|| {
            refused(
                ErrorKind::Conflict,
                "an upload of this VM is already in progress",
            )
        })?;
        let limit = self.budget(hostname).await? + ARCHIVE_OVERHEAD;
        status.state = CollectionState::Uploading;
        status.attempts += 1;
        status.updated_at = Utc::now();
        self.save(&status).await?;

        let outcome = self.spool_and_commit(&mut status, body, limit).await;
        match outcome {
            Ok(()) => Ok(status),
            Err((retry, e)) => {
                let give_up = !retry || status.attempts >= self.settings.max_attempts;
                status.state = if give_up {
                    CollectionState::Failed
                } else {
                    CollectionState::Requested
                };
                status.error = Some(e.message.clone());
                status.updated_at = Utc::now();
                // The upload failed either way; a failure to record it is only logged.
                if let Err(save) = self.save(&status).await {
                    tracing::error!(hostname, error = %save, "recording a failed upload failed");
                }
                tracing::warn!(hostname, collection = id, error = %e.message, give_up, "collection upload not stored");
                Err(e)
            }
        }
    }

    /// Spools, checks and commits; on error says whether a retry may succeed.
    async fn spool_and_commit<S, E>(
        &self,
        status: &mut CollectionStatus,
        mut body: S,
        limit: u64,
    ) -> std::result::Result<(), (bool, UploadRefused)>
    where
        S: Stream<Item = std::result::Result<bytes::Bytes, E>> + Send + Unpin,
        E: fmt::Display,
    {
        let io = |e: std::io::Error| {
            (
                true,
                refused(
                    ErrorKind::Unavailable,
                    format!("spooling the upload failed: {e}"),
                ),
            )
        };
        // A named temporary file (removed when dropped), so stores can stream it.
        let spool = tempfile::NamedTempFile::new().map_err(io)?;
        let mut file = tokio::fs::File::from_std(spool.reopen().map_err(io)?);
        let mut received = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                (
                    true,
                    refused(ErrorKind::InvalidInput, format!("the upload was cut: {e}")),
                )
            })?;
            received += chunk.len() as u64;
            if received > limit {
                return Err((
                    false,
                    refused(
                        ErrorKind::InvalidInput,
                        format!("the upload is larger than this VM's limit of {limit} bytes"),
                    ),
                ));
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(io)?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(io)?;
        drop(file);
        let id = status.id.clone();
        let (spool, verified) = tokio::task::spawn_blocking(move || {
            let reader = spool.reopen()?;
            let verified = archive::verify(std::io::BufReader::new(reader), &id);
            Ok::<_, std::io::Error>((spool, verified))
        })
        .await
        .map_err(|e| io(std::io::Error::other(e)))?
        .map_err(io)?;
        let verified = verified.map_err(|m| (true, refused(ErrorKind::InvalidInput, m)))?;
        let bytes: u64 = verified.files.iter().map(|f| f.size).sum();

        let _commit = self.commit.lock().await;
        let used = self
            .stored_bytes(&status.hostname)
            .await
            .map_err(|e| (true, e.into()))?;
        if used + bytes > self.settings.max_total_bytes || bytes > self.settings.max_vm_bytes {
            return Err((
                false,
                refused(
                    ErrorKind::InvalidInput,
                    "the collection does not fit in the size limits",
                ),
            ));
        }
        let previous = self
            .manifest(&status.hostname)
            .await
            .map_err(|e| (true, e.into()))?;
        let manifest = CollectionManifest {
            hostname: status.hostname.clone(),
            id: status.id.clone(),
            completed_at: Utc::now(),
            archive: format!("collections/{}/{}.tar", status.hostname, status.id),
            files: verified.files,
            skipped: verified.skipped,
        };
        let stored = async {
            self.store.put_file(&manifest.archive, spool.path()).await?;
            self.store
                .put(&manifest_key(&status.hostname), to_json(&manifest)?)
                .await
        };
        stored.await.map_err(|e| (true, e.into()))?;
        if let Some(previous) = previous.filter(|p| p.archive != manifest.archive) {
            if let Err(e) = self.store.delete(&previous.archive).await {
                tracing::warn!(hostname = %status.hostname, error = %e, "an old collection archive was not deleted");
            }
        }
        status.state = CollectionState::Complete;
        status.error = None;
        status.files = manifest.files.len();
        status.bytes = bytes;
        status.skipped = manifest.skipped.len();
        status.updated_at = Utc::now();
        self.save(status).await.map_err(|e| (true, e.into()))?;
        tracing::info!(
            hostname = %status.hostname,
            collection = %status.id,
            files = status.files,
            bytes,
            skipped = status.skipped,
            "collection stored"
        );
        Ok(())
    }

    /// Asks `hostnames` for a collection and waits until each is complete or failed; a VM
    /// not done within `wait` is marked failed. The hostnames whose collection failed, with
    /// the reason.
    pub async fn collect_and_wait(
        &self,
        hostnames: &[Hostname],
        wait: Duration,
    ) -> Result<BTreeMap<String, String>> {
        let requested = self.request(hostnames).await?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut changed = self.changed.subscribe();
        let mut failed = BTreeMap::new();
        let mut pending: Vec<CollectionStatus> = requested;
        loop {
            let mut still = Vec::new();
            for asked in pending {
                // The VM's current collection: the one asked for, or a newer request for the
                // same VM (the admin, another destroy, the supervisor) that replaced it and
                // whose outcome is now this VM's.
                let Some(current) = self.status(&asked.hostname).await? else {
                    failed.insert(asked.hostname, "its collection status is gone".into());
                    continue;
                };
                match current.state {
                    CollectionState::Complete => {}
                    CollectionState::Failed => {
                        failed.insert(current.hostname, current.error.unwrap_or_default());
                    }
                    _ => still.push(current),
                }
            }
            pending = still;
            if pending.is_empty() {
                return Ok(failed);
            }
            tokio::select! {
                _ = changed.changed() => {}
                () = tokio::time::sleep_until(deadline) => {
                    for asked in pending {
                        let reason = format!(
                            "no complete upload within {} s (is the VM's agent running?)",
                            wait.as_secs()
                        );
                        self.fail(&asked.hostname, &asked.id, &reason).await?;
                        failed.insert(asked.hostname, reason);
                    }
                    return Ok(failed);
                }
            }
        }
    }

    /// Every VM's current collection and last complete one, by hostname, for `hostnames`
    /// plus every VM the store knows.
    pub async fn overview(
        &self,
        hostnames: &[Hostname],
    ) -> Result<Vec<(String, Option<CollectionStatus>, Option<CollectionManifest>)>> {
        let mut names: Vec<String> = hostnames.iter().map(ToString::to_string).collect();
        for a in self.store.list("collections/").await? {
            if let Some(name) = a.key.split('/').nth(1) {
                names.push(name.to_owned());
            }
        }
        names.sort();
        names.dedup();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let status = self.refresh(&name).await?;
            let manifest = self.manifest(&name).await?;
            if status.is_some() || manifest.is_some() {
                out.push((name, status, manifest));
            }
        }
        Ok(out)
    }

    /// Writes the zip of every VM's last complete collection to a temporary file: a folder
    /// per VM and `_collection_report.json` (every VM's state, files and skipped files). The
    /// file is positioned at its start.
    pub async fn zip(&self, hostnames: &[Hostname]) -> Result<std::fs::File> {
        let overview = self.overview(hostnames).await?;
        let failure = |e: std::io::Error| {
            Error::new(
                ErrorKind::Unavailable,
                format!("writing the zip failed: {e}"),
            )
        };
        let join = |e: tokio::task::JoinError| Error::internal(e.to_string());
        let mut zip = zip::ZipWriter::new(tempfile::tempfile().map_err(failure)?);
        let mut report = Vec::new();
        for (hostname, status, manifest) in overview {
            if let Some(m) = &manifest {
                let local = tempfile::NamedTempFile::new().map_err(failure)?;
                self.store.get_file(&m.archive, local.path()).await?;
                let name = hostname.clone();
                zip = tokio::task::spawn_blocking(move || {
                    let archive = std::io::BufReader::new(local.reopen()?);
                    archive::append_vm(&mut zip, &name, archive).map(|()| zip)
                })
                .await
                .map_err(join)?
                .map_err(failure)?;
            }
            report.push(serde_json::json!({
                "hostname": hostname,
                "current": status,
                "collected": manifest.map(|m| serde_json::json!({
                    "id": m.id,
                    "completed_at": m.completed_at,
                    "files": m.files,
                    "skipped": m.skipped,
                })),
            }));
        }
        let report = to_json(&serde_json::json!({ "generated_at": Utc::now(), "vms": report }))?;
        tokio::task::spawn_blocking(move || {
            archive::append_file(&mut zip, "_collection_report.json", &report)?;
            let mut file = zip.finish().map_err(std::io::Error::other)?;
            file.flush()?;
            file.rewind()?;
            Ok(file)
        })
        .await
        .map_err(join)?
        .map_err(failure)
    }
}

/// Whether a VM can have work to collect: its agent was heard from and it is not failed or
/// going away.
pub fn may_hold_work(vm: &VmRecord) -> bool {
    vm.last_heartbeat.is_some()
        && !matches!(
            vm.state,
            VmState::Failed | VmState::Terminating | VmState::Terminated
        )
}

/// The supervisor's automatic destroys (the scheduled destruction at the end of a workshop,
/// idle release of assigned VMs) collect first when
/// [`destroy_collects_first`](CollectSettings::destroy_collects_first) is on, as the admin's
/// destroy does: every VM that [may hold work](may_hold_work) is collected, waiting up to
/// `destroy_wait_seconds`, and a VM whose collection failed is kept (flagged for the admin).
#[async_trait::async_trait]
impl BeforeDestroy for Collector {
    async fn before_destroy(&self, vms: &[VmRecord]) -> Result<BTreeMap<Hostname, String>> {
        if !self.settings.destroy_collects_first {
            return Ok(BTreeMap::new());
        }
        let reachable: Vec<Hostname> = vms
            .iter()
            .filter(|vm| may_hold_work(vm))
            .map(|vm| vm.hostname.clone())
            .collect();
        if reachable.is_empty() {
            return Ok(BTreeMap::new());
        }
        let wait = Duration::from_secs(self.settings.destroy_wait_seconds);
        let mut failed = self.collect_and_wait(&reachable, wait).await?;
        Ok(reachable
            .into_iter()
            .filter_map(|h| failed.remove(h.as_str()).map(|why| (h, why)))
            .collect())
    }
}

/// Marks a VM's upload as in progress for as long as it lives.
struct UploadGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    hostname: String,
}

impl<'a> UploadGuard<'a> {
    fn take(set: &'a Mutex<HashSet<String>>, hostname: &str) -> Option<Self> {
        let fresh = set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hostname.to_owned());
        fresh.then(|| Self {
            set,
            hostname: hostname.to_owned(),
        })
    }
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.hostname);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_replica_sharing_the_store_hands_out_a_collection_asked_for_through_another() {
        let store = MemoryArtifactStore::default();
        let a = Collector::new(Arc::new(store.clone()), CollectSettings::default());
        let b = Collector::new(Arc::new(store), CollectSettings::default());
        let vm: Hostname = "vm-1".parse().unwrap();
        // B has seen the VM without a collection (and cached that).
        assert!(b.task("vm-1").await.unwrap().is_none());
        let asked = a.request(std::slice::from_ref(&vm)).await.unwrap();
        let task = b
            .wait_task("vm-1", Duration::ZERO, std::future::pending())
            .await
            .unwrap()
            .expect("the task, read from the shared store");
        assert_eq!(task.id, asked[0].id);
        assert_eq!(task.patterns, ["**/*.slp"]);
        // A failure recorded through B shows in A's overview.
        b.fail("vm-1", &task.id, "no answer").await.unwrap();
        let overview = a.overview(&[vm]).await.unwrap();
        assert_eq!(
            overview[0].1.as_ref().unwrap().state,
            CollectionState::Failed
        );
    }

    /// The current collection of `vm` once it is not `except`.
    async fn newer_than(c: &Collector, vm: &str, except: Option<&str>) -> String {
        for _ in 0..1000 {
            if let Some(s) = c.status(vm).await.unwrap() {
                if Some(s.id.as_str()) != except {
                    return s.id;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no new collection of {vm}");
    }

    /// Two destroys (or a destroy and the supervisor) wait on one VM: the second request
    /// replaces the first collection, and both follow it to its outcome instead of the first
    /// reporting a failure of its own.
    #[tokio::test]
    async fn two_waits_on_one_vm_follow_its_newest_collection() {
        let c = Arc::new(Collector::new(
            Arc::new(MemoryArtifactStore::default()),
            CollectSettings::default(),
        ));
        let vm: Hostname = "vm-1".parse().unwrap();
        let wait = |c: Arc<Collector>, vm: Hostname| {
            tokio::spawn(async move { c.collect_and_wait(&[vm], Duration::from_secs(60)).await })
        };
        let first = wait(c.clone(), vm.clone());
        let id1 = newer_than(&c, "vm-1", None).await;
        let second = wait(c.clone(), vm.clone());
        let id2 = newer_than(&c, "vm-1", Some(&id1)).await;
        c.fail("vm-1", &id2, "the agent refused").await.unwrap();
        for waited in [first, second] {
            let failed = waited.await.unwrap().unwrap();
            assert_eq!(
                failed.get("vm-1").map(String::as_str),
                Some("the agent refused")
            );
        }
    }

    #[test]
    fn settings_problems_name_each_bad_value() {
        let bad = CollectSettings {
            roots: vec!["rel".into()],
            patterns: vec![],
            max_vm_bytes: 10,
            max_total_bytes: 5,
            destroy_wait_seconds: 0,
            max_attempts: 0,
            ..CollectSettings::default()
        };
        let problems = bad.problems().join("\n");
        for expected in [
            "root \"rel\"",
            "patterns must not be empty",
            "max_total_bytes",
            "destroy_wait_seconds",
            "max_attempts",
        ] {
            assert!(problems.contains(expected), "{expected}: {problems}");
        }
        assert!(CollectSettings::default().problems().is_empty());
    }
}
