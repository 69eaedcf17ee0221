//! What the agent observes on its machine: GPU health (`nvidia-smi`) and whether the research
//! software runs (a process name).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// GPU health as the allocator names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gpu {
    /// `nvidia-smi` succeeded.
    Healthy,
    /// `nvidia-smi` failed or hung.
    Unhealthy,
    /// There is no `nvidia-smi` (a CPU machine).
    NotAvailable,
}

impl Gpu {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "Healthy",
            Self::Unhealthy => "Unhealthy",
            Self::NotAvailable => "N/A",
        }
    }
}

/// Runs `nvidia-smi` once: exit 0 is healthy, a missing program is N/A, anything else
/// (non-zero exit, crash, no answer within `timeout`) is unhealthy.
pub async fn check_gpu(nvidia_smi: &Path, timeout: Duration) -> Gpu {
    let child = Command::new(nvidia_smi)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Gpu::NotAvailable,
        Err(_) => return Gpu::Unhealthy,
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Gpu::Healthy,
        _ => Gpu::Unhealthy,
    }
}

/// Whether a process called `name` runs on this machine: its `comm` (the kernel's 15-byte
/// name) or the file name of its first argument equals `name`. Reads `/proc`.
pub fn process_running(name: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let dir = entry.path();
        let is_pid = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        is_pid && (comm_matches(&dir, name) || argv0_matches(&dir, name))
    })
}

fn comm_matches(dir: &Path, name: &str) -> bool {
    std::fs::read_to_string(dir.join("comm")).is_ok_and(|comm| comm.trim_end() == name)
}

fn argv0_matches(dir: &Path, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    Path::new(std::str::from_utf8(argv0).unwrap_or_default())
        .file_name()
        .is_some_and(|f| f == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies `source` to an executable `target` in a child process: a write descriptor held
    /// here could leak into a process another test forks meanwhile, and exec'ing `target` would
    /// then fail with "Text file busy".
    fn install_executable(source: &Path, target: &Path) {
        let status = std::process::Command::new("install")
            .arg("-m")
            .arg("0755")
            .arg(source)
            .arg(target)
            .status()
            .unwrap();
        assert!(status.success(), "install {} failed", target.display());
    }

    #[tokio::test]
    async fn gpu_health_follows_nvidia_smi() {
        let dir = tempfile::tempdir().unwrap();
        let script = |name: &str, body: &str| {
            let source = dir.path().join(format!("{name}.sh"));
            std::fs::write(&source, format!("#!/bin/sh\n{body}\n")).unwrap();
            let path = dir.path().join(name);
            install_executable(&source, &path);
            path
        };
        let t = Duration::from_secs(10);
        assert_eq!(check_gpu(&script("ok", "exit 0"), t).await, Gpu::Healthy);
        assert_eq!(check_gpu(&script("bad", "exit 9"), t).await, Gpu::Unhealthy);
        let missing = dir.path().join("missing");
        assert_eq!(check_gpu(&missing, t).await, Gpu::NotAvailable);
        let hung = script("hung", "exec sleep 30");
        let short = Duration::from_millis(200);
        assert_eq!(check_gpu(&hung, short).await, Gpu::Unhealthy);
    }

    #[tokio::test]
    async fn a_running_process_is_found_by_name() {
        let name = format!("ll-probe-{}", std::process::id() % 100_000);
        assert!(!process_running(&name));
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join(&name);
        install_executable(Path::new("/bin/sleep"), &program);
        let mut child = tokio::process::Command::new(&program)
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // The child may not have exec'd yet when spawn returns: give /proc a moment.
        let seen = |running: bool| {
            let name = name.clone();
            async move {
                for _ in 0..100 {
                    if process_running(&name) == running {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                false
            }
        };
        assert!(seen(true).await, "{name} not found while running");
        child.kill().await.unwrap();
        assert!(seen(false).await, "{name} still found after it was killed");
    }
}
