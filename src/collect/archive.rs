//! The archives of a collection: checking what an agent uploaded (a tar of `files/<path>`
//! entries and a final `manifest.json`) and writing the admin's zip. Both are blocking; run
//! them on a blocking thread.

use std::collections::HashSet;
use std::io::{self, Read, Seek, Write};

use sha2::{Digest, Sha256};

/// Largest `manifest.json` accepted.
const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;
/// Longest skip reason kept.
const MAX_REASON: usize = 500;

use lablink_protocol::Manifest;
pub use lablink_protocol::{CollectedFile, SkippedFile};

/// What a checked archive holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The files, in archive order.
    pub files: Vec<CollectedFile>,
    /// What the agent skipped.
    pub skipped: Vec<SkippedFile>,
}

/// Whether `path` is safe as a relative path inside a VM's folder of the zip (the rule the
/// agent applies too).
fn safe_path(path: &str) -> bool {
    lablink_core::artifact::collected_path_problem(path).is_none()
}

fn sha256_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the archive of collection `id` and checks it: only regular `files/<safe path>`
/// entries, each once, then `manifest.json` naming `id` and listing exactly those files with
/// their sizes and SHA-256 (computed here). Any difference, a missing manifest (a cut upload)
/// or anything after it is an error.
pub fn verify(archive: impl Read, id: &str) -> Result<Verified, String> {
    let mut tar = tar::Archive::new(archive);
    let mut received = Vec::new();
    let mut seen = HashSet::new();
    let mut manifest: Option<Manifest> = None;
    let entries = tar
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("the archive is damaged or cut: {e}"))?;
        if manifest.is_some() {
            return Err("the archive has entries after its manifest".into());
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err("the archive holds something other than regular files".into());
        }
        let path = entry.path_bytes().into_owned();
        let path = String::from_utf8(path).map_err(|_| "an entry name is not UTF-8".to_owned())?;
        if path == "manifest.json" {
            if entry.size() > MAX_MANIFEST_BYTES {
                return Err("the manifest is too large".into());
            }
            let mut json = Vec::new();
            entry
                .read_to_end(&mut json)
                .map_err(|e| format!("the archive is damaged or cut: {e}"))?;
            manifest = Some(
                serde_json::from_slice(&json)
                    .map_err(|e| format!("the manifest is invalid: {e}"))?,
            );
            continue;
        }
        let Some(name) = path.strip_prefix("files/").filter(|n| safe_path(n)) else {
            return Err(format!(
                "unexpected entry {:?} in the archive",
                path.escape_debug().to_string()
            ));
        };
        if !seen.insert(name.to_owned()) {
            return Err(format!("{name:?} is in the archive twice"));
        }
        let mut hash = Sha256::new();
        let mut buf = vec![0; 64 * 1024];
        let mut size = 0u64;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| format!("the archive is damaged or cut: {e}"))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            size += n as u64;
        }
        if size != entry.size() {
            return Err("the archive is cut inside a file".into());
        }
        received.push(CollectedFile {
            path: name.to_owned(),
            size,
            sha256: sha256_hex(&hash.finalize()),
        });
    }
    let manifest = manifest.ok_or("the archive ended before its manifest (the upload was cut)")?;
    if manifest.collection != id {
        return Err("the manifest is for another collection".into());
    }
    if manifest.files != received {
        let bad = manifest
            .files
            .iter()
            .zip(&received)
            .find(|(a, b)| a != b)
            .map(|(a, _)| a.path.clone());
        return Err(match bad {
            Some(path) => format!("{path:?} does not match its checksum or size in the manifest"),
            None => "the manifest does not list exactly the files in the archive".into(),
        });
    }
    let skipped = manifest
        .skipped
        .into_iter()
        .map(|mut s| {
            if s.reason.len() > MAX_REASON {
                let mut end = MAX_REASON;
                while !s.reason.is_char_boundary(end) {
                    end -= 1;
                }
                s.reason.truncate(end);
            }
            s
        })
        .collect();
    Ok(Verified {
        files: received,
        skipped,
    })
}

/// Appends the files of one VM's verified archive to `zip` under `<hostname>/`.
pub fn append_vm<W: Write + Seek>(
    zip: &mut zip::ZipWriter<W>,
    hostname: &str,
    archive: impl Read,
) -> io::Result<()> {
    let mut tar = tar::Archive::new(archive);
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(name) = path.strip_prefix("files/") else {
            continue;
        };
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(entry.size() >= u64::from(u32::MAX));
        zip.start_file(format!("{hostname}/{name}"), options)
            .map_err(io::Error::other)?;
        io::copy(&mut entry, zip)?;
    }
    Ok(())
}

/// Adds one small file at the top of `zip`.
pub fn append_file<W: Write + Seek>(
    zip: &mut zip::ZipWriter<W>,
    name: &str,
    bytes: &[u8],
) -> io::Result<()> {
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file(name, options).map_err(io::Error::other)?;
    zip.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(files: &[(&str, &[u8])], manifest: Option<serde_json::Value>) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, bytes) in files {
            // Raw names, so unsafe ones (`..`) can be tested too.
            let mut h = tar::Header::new_gnu();
            let full = format!("files/{name}");
            h.as_gnu_mut().unwrap().name[..full.len()].copy_from_slice(full.as_bytes());
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append(&h, *bytes).unwrap();
        }
        if let Some(m) = manifest {
            let json = serde_json::to_vec(&m).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(json.len() as u64);
            h.set_mode(0o644);
            tar.append_data(&mut h, "manifest.json", json.as_slice())
                .unwrap();
        }
        tar.into_inner().unwrap()
    }

    fn entry(path: &str, bytes: &[u8]) -> serde_json::Value {
        serde_json::json!({"path": path, "size": bytes.len(), "sha256": sha256_hex(&Sha256::digest(bytes))})
    }

    #[test]
    fn a_complete_archive_verifies() {
        let m = serde_json::json!({"collection": "c", "files": [entry("a/x.slp", b"xx")],
            "skipped": [{"path": "/w/l.slp", "reason": "a symbolic link"}]});
        let v = verify(archive(&[("a/x.slp", b"xx")], Some(m)).as_slice(), "c").unwrap();
        assert_eq!(v.files.len(), 1);
        assert_eq!(v.skipped.len(), 1);
    }

    #[test]
    fn cut_wrong_or_unsafe_archives_are_refused() {
        let good = serde_json::json!({"collection": "c", "files": [entry("x", b"xx")]});
        let whole = archive(&[("x", b"xx")], Some(good.clone()));
        for cut in [0, 100, 600, whole.len() - 1100] {
            assert!(verify(&whole[..cut], "c").is_err(), "cut at {cut}");
        }
        assert!(verify(whole.as_slice(), "other").is_err(), "another id");
        let tampered = archive(&[("x", b"xy")], Some(good.clone()));
        assert!(verify(tampered.as_slice(), "c")
            .unwrap_err()
            .contains("checksum"));
        let extra = archive(&[("x", b"xx"), ("y", b"")], Some(good));
        assert!(verify(extra.as_slice(), "c").is_err());
        let m = serde_json::json!({"collection": "c", "files": [entry("../x", b"")]});
        assert!(verify(archive(&[("../x", b"")], Some(m)).as_slice(), "c").is_err());
        assert!(verify(&b"not a tar at all, clearly"[..], "c").is_err());
    }
}
