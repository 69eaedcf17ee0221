//! [`ArtifactStore`]: keyed blobs (collected participant work, exports), with an in-memory
//! store and a local-directory store. The S3 store lives in `lablink-aws`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::{Error, ErrorKind, Result};

/// One stored artifact, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactInfo {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Keyed blobs. Keys are `/`-separated paths of non-empty segments (no `.` or `..`, no
/// backslash, no control characters, at most 512 characters).
///
/// # Contract
///
/// - `put` replaces what was stored under the key **atomically**: a reader sees the old
///   bytes or the new ones, never a part; a failed `put` leaves the old bytes (or nothing).
/// - `get` of a missing key is an [`ErrorKind::NotFound`] error.
/// - `list(prefix)` gives every key starting with `prefix`, in key order, with its size.
/// - `delete` of a missing key succeeds (deleting is idempotent).
/// - An invalid key is an [`ErrorKind::InvalidInput`] error, never a panic.
///
/// Blobs are held in memory while they pass through; callers bound their size.
#[async_trait]
pub trait ArtifactStore: Send + Sync + Debug {
    /// Stores `bytes` under `key`, replacing what was there.
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()>;
    /// The bytes stored under `key`.
    async fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// The artifacts whose key starts with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ArtifactInfo>>;
    /// Removes `key` (nothing happens when it does not exist).
    async fn delete(&self, key: &str) -> Result<()>;

    /// Stores the content of the file at `path` under `key`, with `put`'s guarantees. The
    /// default reads the file into memory; stores that can stream it override this.
    async fn put_file(&self, key: &str, path: &Path) -> Result<()> {
        let path = path.to_owned();
        let key_text = key.to_owned();
        let bytes =
            blocking(move || std::fs::read(&path).map_err(|e| io_error(e, "put", &key_text)))
                .await?;
        self.put(key, bytes).await
    }

    /// Writes the bytes stored under `key` to the (new or truncated) file at `path`. The
    /// default holds them in memory; stores that can stream them override this.
    async fn get_file(&self, key: &str, path: &Path) -> Result<()> {
        let bytes = self.get(key).await?;
        let path = path.to_owned();
        let key = key.to_owned();
        blocking(move || std::fs::write(&path, bytes).map_err(|e| io_error(e, "get", &key))).await
    }
}

/// Longest path of a collected file, in bytes.
pub const MAX_COLLECTED_PATH: usize = 4096;

/// Why `path` cannot name a collected file inside a VM's folder of the admin's zip, or
/// `None` when it can: 1 to [`MAX_COLLECTED_PATH`] bytes of `/`-separated non-empty segments
/// other than `.` and `..`, without backslashes or control characters. The allocator refuses
/// an upload holding such a path; the agent skips (and reports) such files instead.
pub fn collected_path_problem(path: &str) -> Option<&'static str> {
    if path.len() > MAX_COLLECTED_PATH {
        Some("the path is longer than 4096 bytes")
    } else if path.contains('\\') {
        Some("the path has a backslash")
    } else if path.chars().any(char::is_control) {
        Some("the path has a control character")
    } else if path
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        Some("the path has an empty, '.' or '..' part")
    } else {
        None
    }
}

/// Checks `key` against the rules of [`ArtifactStore`].
pub fn validate_artifact_key(key: &str) -> Result<()> {
    let valid = !key.is_empty()
        && key.len() <= 512
        && !key.contains('\\')
        && !key.chars().any(char::is_control)
        && key
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..");
    if valid {
        Ok(())
    } else {
        Err(Error::invalid_input(
            "an artifact key must be 1 to 512 characters of '/'-separated non-empty segments \
             without '.', '..', backslashes or control characters",
        )
        .with_context("key", key.escape_debug()))
    }
}

/// An [`ArtifactStore`] in memory; clones share the blobs. For tests and demos.
#[derive(Debug, Clone, Default)]
pub struct MemoryArtifactStore {
    blobs: Arc<Mutex<BTreeMap<String, Arc<Vec<u8>>>>>,
}

impl MemoryArtifactStore {
    fn blobs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Vec<u8>>>> {
        self.blobs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl ArtifactStore for MemoryArtifactStore {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        validate_artifact_key(key)?;
        self.blobs().insert(key.to_owned(), Arc::new(bytes));
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>> {
        validate_artifact_key(key)?;
        self.blobs()
            .get(key)
            .map(|b| b.as_ref().clone())
            .ok_or_else(|| Error::not_found("no such artifact").with_context("key", key))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ArtifactInfo>> {
        Ok(self
            .blobs()
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ArtifactInfo {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_artifact_key(key)?;
        self.blobs().remove(key);
        Ok(())
    }
}

/// An [`ArtifactStore`] in a local directory: key `a/b` is the file `<dir>/a/b`. A `put`
/// writes a temporary file beside the target, syncs it and renames it into place, so a crash
/// never leaves a partial blob under a key. Temporary files (names starting with `.tmp-`)
/// are not listed.
#[derive(Debug, Clone)]
pub struct LocalDirArtifactStore {
    dir: PathBuf,
}

const TEMP_PREFIX: &str = ".tmp-";

fn io_error(e: std::io::Error, operation: &'static str, key: &str) -> Error {
    let kind = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        _ => ErrorKind::Unavailable,
    };
    Error::new(kind, format!("artifact {operation} failed: {e}"))
        .with_operation(operation)
        .with_context("key", key)
}

impl LocalDirArtifactStore {
    /// A store in `dir` (created on the first `put`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        validate_artifact_key(key)?;
        if key.split('/').any(|s| s.starts_with(TEMP_PREFIX)) {
            return Err(Error::invalid_input(format!(
                "artifact key segments must not start with {TEMP_PREFIX:?}"
            )));
        }
        Ok(self.dir.join(key))
    }

    /// Writes `path` through a temporary file beside it: `fill` writes the content.
    fn put_blocking(
        path: &Path,
        fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let parent = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)?;
        let temp = parent.join(format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4().simple()));
        let written = (|| {
            let mut file = std::fs::File::create(&temp)?;
            fill(&mut file)?;
            file.sync_all()?;
            std::fs::rename(&temp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written
    }

    /// Appends every blob under the directory `dir` (whose key prefix is `rel`) to `out`.
    /// An entry deleted by a concurrent `delete` between reading the directory and looking at
    /// the entry is skipped, not an error: the listing is of the blobs present throughout.
    fn list_blocking(dir: &Path, rel: &str, out: &mut Vec<ArtifactInfo>) -> std::io::Result<()> {
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let key = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let kind = match entry.file_type() {
                Ok(kind) => kind,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            if kind.is_dir() {
                Self::list_blocking(&entry.path(), &key, out)?;
            } else if kind.is_file() {
                match entry.metadata() {
                    Ok(meta) => out.push(ArtifactInfo {
                        key,
                        size: meta.len(),
                    }),
                    Err(e) if gone(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("artifact store task failed: {e}")))?
}

#[async_trait]
impl ArtifactStore for LocalDirArtifactStore {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.path(key)?;
        let key = key.to_owned();
        blocking(move || {
            Self::put_blocking(&path, |f| f.write_all(&bytes)).map_err(|e| io_error(e, "put", &key))
        })
        .await
    }

    async fn put_file(&self, key: &str, source: &Path) -> Result<()> {
        let path = self.path(key)?;
        let source = source.to_owned();
        let key = key.to_owned();
        blocking(move || {
            let mut from = std::fs::File::open(&source).map_err(|e| io_error(e, "put", &key))?;
            Self::put_blocking(&path, |f| std::io::copy(&mut from, f).map(drop))
                .map_err(|e| io_error(e, "put", &key))
        })
        .await
    }

    async fn get_file(&self, key: &str, target: &Path) -> Result<()> {
        let path = self.path(key)?;
        let target = target.to_owned();
        let key = key.to_owned();
        blocking(move || {
            std::fs::copy(&path, &target)
                .map(drop)
                .map_err(|e| io_error(e, "get", &key))
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        let key = key.to_owned();
        blocking(move || std::fs::read(&path).map_err(|e| io_error(e, "get", &key))).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ArtifactInfo>> {
        // Only the directory named by the prefix's complete segments is walked. A prefix
        // whose segments no key can have (`..`, empty, temporary) matches nothing.
        let rel = prefix
            .rsplit_once('/')
            .map_or("", |(rel, _)| rel)
            .to_owned();
        let dir = if rel.is_empty() {
            self.dir.clone()
        } else {
            match self.path(&rel) {
                Ok(dir) => dir,
                Err(_) => return Ok(Vec::new()),
            }
        };
        let prefix = prefix.to_owned();
        blocking(move || {
            let mut all = Vec::new();
            Self::list_blocking(&dir, &rel, &mut all).map_err(|e| io_error(e, "list", &prefix))?;
            all.retain(|a| a.key.starts_with(&prefix));
            all.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(all)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let key = key.to_owned();
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(e, "delete", &key)),
        })
        .await
    }
}
