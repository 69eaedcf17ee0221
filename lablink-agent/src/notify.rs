//! Desktop notifications of the allocator's warnings (the VM will be destroyed or released):
//! `notify-send` run without a shell, as the desktop user when the agent runs as root and
//! knows that user (`LABLINK_CRD_USER`: `runuser -u <user> --`, with the user's session bus).
//!
//! A machine whose image has no `notify-send` says so once in the agent's log; the warning
//! still counts as handled (the participant's page shows it either way).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::process::Command;

/// Longest one `notify-send` may run.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// What came of showing a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shown {
    /// `notify-send` ran and succeeded.
    Shown,
    /// Notifications are off (`LABLINK_NOTIFY_SEND=off`).
    Off,
    /// There is no `notify-send`; `first` is true the first time (say it once).
    Missing {
        /// Whether this is the first time it was missing.
        first: bool,
    },
    /// It ran and failed, or could not be started: why.
    Failed(String),
}

/// Shows notifications on the VM's desktop.
#[derive(Debug)]
pub struct DesktopNotifier {
    program: Option<PathBuf>,
    user: Option<String>,
    said_missing: AtomicBool,
}

/// Whether this process runs as root (`/proc/self` belongs to its effective user).
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// The uid of `user`, from `/etc/passwd`.
fn uid_of(user: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == user)
            .then(|| fields.nth(1)?.parse().ok())
            .flatten()
    })
}

impl DesktopNotifier {
    /// Runs `program` (`None`: notifications off), as `user` when the agent runs as root.
    pub fn new(program: Option<PathBuf>, user: Option<String>) -> Self {
        Self {
            program,
            user,
            said_missing: AtomicBool::new(false),
        }
    }

    /// The command that shows `title` and `message`: `notify-send --urgency=critical
    /// --app-name=LabLink -- <title> <message>`, through `runuser` as the desktop user when
    /// the agent is root.
    fn command(&self, program: &Path, title: &str, message: &str) -> Command {
        let args = [
            "--urgency=critical",
            "--app-name=LabLink",
            "--",
            title,
            message,
        ];
        match self.user.as_deref().filter(|_| running_as_root()) {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program).args(args);
                // The user's session bus, where the desktop's notification daemon listens.
                if let Some(uid) = uid_of(user) {
                    let bus = format!("/run/user/{uid}/bus");
                    if Path::new(&bus).exists() {
                        c.env("DBUS_SESSION_BUS_ADDRESS", format!("unix:path={bus}"));
                    }
                }
                c
            }
            None => {
                let mut c = Command::new(program);
                c.args(args);
                c
            }
        }
    }

    /// Shows a notification and waits for `notify-send` (at most 10 s).
    pub async fn show(&self, title: &str, message: &str) -> Shown {
        let Some(program) = &self.program else {
            return Shown::Off;
        };
        let run = self
            .command(program, title, message)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(NOTIFY_TIMEOUT, run).await {
            Err(_) => Shown::Failed(format!("did not finish in {NOTIFY_TIMEOUT:?}")),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Shown::Missing {
                first: !self.said_missing.swap(true, Ordering::Relaxed),
            },
            Ok(Err(e)) => Shown::Failed(format!("could not be started: {e}")),
            Ok(Ok(output)) if output.status.success() => Shown::Shown,
            Ok(Ok(output)) => {
                let said = String::from_utf8_lossy(&output.stderr);
                let said: String = said.split_whitespace().collect::<Vec<_>>().join(" ");
                let said: String = said.chars().take(300).collect();
                Shown::Failed(format!("failed ({}): {said}", output.status))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_program_is_said_once_and_a_failure_says_why() {
        let n = DesktopNotifier::new(Some("/nonexistent/notify-send".into()), None);
        assert_eq!(n.show("t", "m").await, Shown::Missing { first: true });
        assert_eq!(n.show("t", "m").await, Shown::Missing { first: false });
        let off = DesktopNotifier::new(None, None);
        assert_eq!(off.show("t", "m").await, Shown::Off);
        let failing = DesktopNotifier::new(Some("false".into()), None);
        assert!(matches!(failing.show("t", "m").await, Shown::Failed(_)));
    }

    #[tokio::test]
    async fn the_text_is_passed_as_arguments_never_through_a_shell() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("argv");
        let source = dir.path().join("notify-send.source");
        let script = dir.path().join("notify-send");
        std::fs::write(
            &source,
            format!("#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\n", out.display()),
        )
        .unwrap();
        // Installed by a child process: a write descriptor held here could leak into a
        // process another test forks meanwhile, and running the script would then fail
        // with "Text file busy".
        let installed = std::process::Command::new("install")
            .args(["-m", "0755"])
            .arg(&source)
            .arg(&script)
            .status()
            .unwrap();
        assert!(installed.success());
        let n = DesktopNotifier::new(Some(script), None);
        let hostile = "-x $(touch /tmp/pwned) `id`; rm -rf ~";
        assert_eq!(n.show("LabLink: warning", hostile).await, Shown::Shown);
        let argv = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            argv.lines().collect::<Vec<_>>(),
            [
                "--urgency=critical",
                "--app-name=LabLink",
                "--",
                "LabLink: warning",
                hostile
            ]
        );
    }
}
