//! Collecting participants' work: find the files a collection asks for and write them as one
//! tar stream, with a SHA-256 per file and a final manifest.
//!
//! The archive holds `files/<path>` for every collected file and, last, `manifest.json`:
//! `{"collection", "files": [{"path", "size", "sha256"}], "skipped": [{"path", "reason"}]}`.
//! With one root, `<path>` is relative to it; with several, it starts with the root's own path
//! (without the leading `/`), so files of different roots never collide.
//!
//! Symbolic links are never followed (a matching link is reported as skipped), so nothing
//! outside the roots is read; files are opened with `O_NOFOLLOW` and checked to be regular
//! files. Files are taken in path order until the size limit; a file that does not fit is
//! skipped with the reason, and smaller ones after it may still fit.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use sha2::{Digest, Sha256};

/// Most files one collection takes (the rest are skipped), which bounds the manifest.
pub const MAX_FILES: usize = 100_000;

pub use lablink_protocol::{CollectedFile, CollectionTask, Manifest, SkippedFile};

/// What a collection will take.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    files: Vec<Planned>,
    skipped: Vec<SkippedFile>,
}

#[derive(Debug, Clone)]
struct Planned {
    source: PathBuf,
    name: String,
    size: u64,
}

impl Plan {
    /// How many files will be sent.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// The files left out so far.
    pub fn skipped(&self) -> &[SkippedFile] {
        &self.skipped
    }
}

/// A problem that makes the task itself unusable (a bad pattern or root).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TaskError(String);

fn expand_root(root: &str, hostname: &str) -> Result<PathBuf, TaskError> {
    let root = root.replace("{hostname}", hostname);
    let path = match root.strip_prefix('~') {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => {
            let home = std::env::var_os("HOME")
                .ok_or_else(|| TaskError("a root starts with ~ but HOME is not set".into()))?;
            PathBuf::from(home).join(rest.trim_start_matches('/'))
        }
        _ => PathBuf::from(&root),
    };
    if !path.is_absolute() {
        return Err(TaskError(format!(
            "the root {root:?} is not an absolute path"
        )));
    }
    Ok(path)
}

fn glob_set(patterns: &[String]) -> Result<GlobSet, TaskError> {
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        let glob = GlobBuilder::new(p)
            .literal_separator(true)
            .build()
            .map_err(|e| TaskError(format!("bad pattern {p:?}: {e}")))?;
        set.add(glob);
    }
    set.build().map_err(|e| TaskError(e.to_string()))
}

/// Places on a VM that hold the agent's token, never collected: where the shipped cloud-init
/// (Terraform and EC2) writes `agent.env` with its `API_TOKEN`, and cloud-init's own copies
/// of the user data that carried it (`/var/lib/cloud/instance/user-data.txt`, its scripts,
/// and the instance data under `/run/cloud-init`).
pub const TOKEN_DIRS: [&str; 3] = ["/etc/lablink", "/var/lib/cloud", "/run/cloud-init"];

/// The agent's own files, never collected: [`TOKEN_DIRS`] and its state directory.
pub fn own_files(state_dir: Option<&Path>) -> Vec<PathBuf> {
    TOKEN_DIRS
        .iter()
        .map(Path::new)
        .chain(state_dir)
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned()))
        .collect()
}

/// Finds the files `task` asks for on this VM (`hostname`), within its size limit. Files
/// under `own` (the agent's configuration and token, see [`own_files`]) are never taken: the
/// agent runs as root, so a broad root or pattern would otherwise reach them; a matching one
/// is reported as skipped.
pub fn plan(task: &CollectionTask, hostname: &str, own: &[PathBuf]) -> Result<Plan, TaskError> {
    let globs = glob_set(&task.patterns)?;
    let roots = task
        .roots
        .iter()
        .map(|r| expand_root(r, hostname))
        .collect::<Result<Vec<_>, _>>()?;
    let prefixed = roots.len() > 1;
    let mut plan = Plan::default();
    let mut candidates = Vec::new();
    for root in &roots {
        if !root.is_dir() {
            plan.skipped.push(SkippedFile {
                path: root.display().to_string(),
                reason: "the root is not a directory on this VM".into(),
            });
            continue;
        }
        // Where the entries really are: nothing below the root is followed.
        let real_root = std::fs::canonicalize(root).unwrap_or_else(|_| root.clone());
        let walk = walkdir::WalkDir::new(root)
            .follow_links(false)
            .sort_by_file_name();
        for entry in walk {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    let path = e.path().unwrap_or(root).display().to_string();
                    plan.skipped.push(SkippedFile {
                        path,
                        reason: format!(
                            "unreadable: {}",
                            e.io_error()
                                .map_or_else(|| e.to_string(), ToString::to_string)
                        ),
                    });
                    continue;
                }
            };
            let kind = entry.file_type();
            if kind.is_dir() {
                continue;
            }
            let Ok(rel) = entry.path().strip_prefix(root) else {
                continue;
            };
            if !globs.is_match(rel) {
                continue;
            }
            let shown = entry.path().display().to_string();
            let Some(rel) = rel.to_str() else {
                plan.skipped.push(SkippedFile {
                    path: shown,
                    reason: "the file name is not UTF-8".into(),
                });
                continue;
            };
            if own.iter().any(|p| real_root.join(rel).starts_with(p)) {
                plan.skipped.push(SkippedFile {
                    path: shown,
                    reason: "the agent's own configuration or token; never collected".into(),
                });
                continue;
            }
            if kind.is_symlink() {
                plan.skipped.push(SkippedFile {
                    path: shown,
                    reason: "a symbolic link; links are not followed".into(),
                });
                continue;
            }
            if !kind.is_file() {
                plan.skipped.push(SkippedFile {
                    path: shown,
                    reason: "not a regular file".into(),
                });
                continue;
            }
            let size = match entry.metadata() {
                Ok(m) => m.len(),
                Err(e) => {
                    plan.skipped.push(SkippedFile {
                        path: shown,
                        reason: format!("unreadable: {e}"),
                    });
                    continue;
                }
            };
            let name = if prefixed {
                let root = root.to_string_lossy();
                format!(
                    "{}/{rel}",
                    root.trim_start_matches('/').trim_end_matches('/')
                )
            } else {
                rel.to_owned()
            };
            // The allocator would refuse the whole upload over this one name.
            if let Some(problem) = lablink_core::artifact::collected_path_problem(&name) {
                plan.skipped.push(SkippedFile {
                    path: shown,
                    reason: format!("{problem}, which the allocator does not accept"),
                });
                continue;
            }
            candidates.push(Planned {
                source: entry.path().to_owned(),
                name,
                size,
            });
        }
    }
    candidates.sort_by(|a, b| a.name.cmp(&b.name));
    let mut left = task.max_bytes;
    for file in candidates {
        if plan.files.len() >= MAX_FILES {
            plan.skipped.push(SkippedFile {
                path: file.source.display().to_string(),
                reason: format!("more than {MAX_FILES} files match"),
            });
        } else if file.size > left {
            plan.skipped.push(SkippedFile {
                path: file.source.display().to_string(),
                reason: format!(
                    "over the size limit: {} bytes, {left} of {} bytes left",
                    file.size, task.max_bytes
                ),
            });
        } else {
            left -= file.size;
            plan.files.push(file);
        }
    }
    Ok(plan)
}

/// A reader that hashes and counts what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

fn open_regular(path: &Path) -> io::Result<(File, std::fs::Metadata)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("no longer a regular file"));
    }
    Ok((file, meta))
}

/// Writes the archive of `plan` for collection `id` to `out`, reading each file once. A file
/// that changed size while it was read fails the whole archive (the collection is retried).
pub fn write_archive(plan: &Plan, id: &str, out: impl Write) -> io::Result<Manifest> {
    let mut tar = tar::Builder::new(out);
    let mut manifest = Manifest {
        collection: id.to_owned(),
        files: Vec::with_capacity(plan.files.len()),
        skipped: plan.skipped.clone(),
    };
    for file in &plan.files {
        let (handle, meta) = match open_regular(&file.source) {
            Ok(opened) => opened,
            Err(e) => {
                manifest.skipped.push(SkippedFile {
                    path: file.source.display().to_string(),
                    reason: format!("unreadable: {e}"),
                });
                continue;
            }
        };
        if meta.len() != file.size {
            return Err(io::Error::other(format!(
                "{} changed size while being collected",
                file.source.display()
            )));
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(file.size);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mtime(
            meta.modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs()),
        );
        let mut reader = Hashing {
            inner: handle.take(file.size),
            hash: Sha256::new(),
            count: 0,
        };
        tar.append_data(&mut header, format!("files/{}", file.name), &mut reader)?;
        if reader.count != file.size {
            return Err(io::Error::other(format!(
                "{} changed size while being collected",
                file.source.display()
            )));
        }
        manifest.files.push(CollectedFile {
            path: file.name.clone(),
            size: file.size,
            sha256: hex(&reader.hash.finalize()),
        });
    }
    let json = serde_json::to_vec(&manifest).map_err(io::Error::other)?;
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, "manifest.json", json.as_slice())?;
    tar.into_inner()?.flush()?;
    Ok(manifest)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(root: &Path, max_bytes: u64) -> CollectionTask {
        CollectionTask {
            id: "c1".into(),
            roots: vec![root.display().to_string()],
            patterns: vec!["**/*.slp".into()],
            max_bytes,
        }
    }

    #[test]
    fn plans_matching_files_skips_links_and_what_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("work");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("top.slp"), b"1234").unwrap();
        std::fs::write(root.join("a/b/deep.slp"), b"12").unwrap();
        std::fs::write(root.join("a/notes.txt"), b"no").unwrap();
        std::fs::write(root.join("a/big.slp"), vec![0; 100]).unwrap();
        std::fs::write(dir.path().join("secret.slp"), b"outside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.slp"), root.join("link.slp")).unwrap();
        let plan = plan(&task(&root, 10), "vm-1", &[]).unwrap();
        let names: Vec<_> = plan.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a/b/deep.slp", "top.slp"]);
        let reasons: Vec<_> = plan
            .skipped
            .iter()
            .map(|s| {
                (
                    s.path.rsplit('/').next().unwrap(),
                    s.reason.split(':').next().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            reasons,
            [
                ("link.slp", "a symbolic link; links are not followed"),
                ("big.slp", "over the size limit")
            ]
        );
        let mut out = Vec::new();
        let manifest = write_archive(&plan, "c1", &mut out).unwrap();
        assert_eq!(manifest.files.len(), 2);
        assert_eq!(
            manifest.files[1].sha256,
            hex(&Sha256::digest(b"1234")),
            "the checksum is the file's"
        );
        let mut archive = tar::Archive::new(out.as_slice());
        let paths: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            paths,
            ["files/a/b/deep.slp", "files/top.slp", "manifest.json"]
        );
    }

    #[test]
    fn bad_patterns_and_relative_roots_are_task_errors() {
        let mut t = task(Path::new("/tmp"), 1);
        t.patterns = vec!["a[".into()];
        assert!(plan(&t, "vm", &[]).is_err());
        let t = task(Path::new("relative/dir"), 1);
        assert!(plan(&t, "vm", &[]).is_err());
    }

    #[test]
    fn the_agents_own_configuration_and_state_are_never_collected_even_from_a_root_above_them() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("etc/lablink");
        let state = dir.path().join("var/lib/lablink-agent");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::create_dir_all(dir.path().join("home/ada")).unwrap();
        std::fs::write(config.join("agent.env"), b"API_TOKEN=secret").unwrap();
        std::fs::write(state.join("assignment.json"), b"{}").unwrap();
        std::fs::write(dir.path().join("home/ada/labels.slp"), b"work").unwrap();
        let own = [config, state];
        let mut t = task(dir.path(), 1 << 20);
        t.patterns = vec!["**/*".into()];
        // The root reached through a link to it counts as the same place.
        let link = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(dir.path(), link.path().join("root")).unwrap();
        t.roots.push(link.path().join("root").display().to_string());
        let plan = plan(&t, "vm-1", &own).unwrap();
        let names: Vec<_> = plan
            .files
            .iter()
            .map(|f| f.name.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(names, ["labels.slp", "labels.slp"]);
        let own = "the agent's own configuration or token; never collected";
        let skipped: Vec<_> = plan
            .skipped
            .iter()
            .filter(|s| s.reason == own)
            .map(|s| s.path.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(
            skipped,
            [
                "agent.env",
                "assignment.json",
                "agent.env",
                "assignment.json"
            ]
        );
        assert_eq!(
            own_files(None),
            TOKEN_DIRS.map(PathBuf::from),
            "every token directory is guarded"
        );
    }

    #[test]
    fn names_the_allocator_would_refuse_are_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ok.slp"), b"fine").unwrap();
        std::fs::write(dir.path().join("back\\slash.slp"), b"x").unwrap();
        std::fs::write(dir.path().join("new\nline.slp"), b"x").unwrap();
        let plan = plan(&task(dir.path(), 1 << 20), "vm-1", &[]).unwrap();
        let names: Vec<_> = plan.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["ok.slp"]);
        let skipped: Vec<_> = plan.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert_eq!(
            skipped,
            [
                "the path has a backslash, which the allocator does not accept",
                "the path has a control character, which the allocator does not accept"
            ]
        );
    }

    #[test]
    fn hostname_placeholders_expand() {
        assert_eq!(
            expand_root("/srv/{hostname}/work", "vm-3").unwrap(),
            PathBuf::from("/srv/vm-3/work")
        );
    }
}
