//! Starting the Chrome Remote Desktop host for an assignment, without a shell.
//!
//! The participant's command is never run. Only its `--code` value is taken, validated by the
//! same rule as the allocator's ([`lablink_core::CrdCommand`]), and the agent builds the
//! argument vector itself:
//! `start-host --code=<code> --redirect-url=<url> --name=<hostname>`, with the PIN written to
//! stdin twice (start-host asks for it and for its confirmation).

use std::ffi::OsString;
use std::process::Stdio;

use lablink_core::{CrdCommand, DesktopFailure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::client::AssignmentBody;
use crate::config::{AgentConfig, StartHost};

/// Why an assignment was not started. Never holds the code or the PIN.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The command or PIN is not acceptable; nothing was run.
    #[error("{0}")]
    Invalid(String),
    /// `start-host` could not be started, failed, or timed out.
    #[error("{message}")]
    Failed {
        /// What happened, with the end of start-host's stderr (code and PIN blanked out).
        message: String,
        /// The class of failure, for the participant's page.
        failure: DesktopFailure,
        /// start-host's exit status, when it exited.
        exit_status: Option<i32>,
    },
}

impl StartError {
    /// The class of failure the allocator is told: an invalid command or PIN is
    /// `invalid_command`; a failure carries its own.
    pub fn failure(&self) -> DesktopFailure {
        match self {
            Self::Invalid(_) => DesktopFailure::InvalidCommand,
            Self::Failed { failure, .. } => *failure,
        }
    }

    /// start-host's exit status, when it ran and exited.
    pub fn exit_status(&self) -> Option<i32> {
        match self {
            Self::Invalid(_) => None,
            Self::Failed { exit_status, .. } => *exit_status,
        }
    }
}

/// What start-host says when Google refused the one-time code (case-insensitive): the real
/// one prints `Couldn't start host: OAuth error.` when exchanging the authorization code
/// failed (an expired, used or mistyped code); the others are the OAuth error texts and
/// wrappers' wordings of the same.
const CODE_REJECTED: [&str; 5] = [
    "oauth",
    "authorization code",
    "invalid_grant",
    "code has expired",
    "already been used",
];

/// The class of a start-host run that exited with a failure, from what it printed: the
/// code was refused ([`DesktopFailure::CodeRejected`]) or something else failed
/// ([`DesktopFailure::HostFailed`]).
pub fn classify_exit(stderr: &str) -> DesktopFailure {
    let said = stderr.to_lowercase();
    if CODE_REJECTED.iter().any(|sign| said.contains(sign)) {
        DesktopFailure::CodeRejected
    } else {
        DesktopFailure::HostFailed
    }
}

/// The validated pieces of an assignment.
#[derive(Clone)]
pub struct HostInvocation {
    code: String,
    pin: String,
}

impl std::fmt::Debug for HostInvocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostInvocation(***)")
    }
}

impl HostInvocation {
    /// Validates an assignment: the command's `--code` must parse and equal the code the
    /// allocator sent; the PIN must be 6 to 32 digits.
    pub fn from_assignment(a: &AssignmentBody) -> Result<Self, StartError> {
        let command: CrdCommand = a
            .command
            .parse()
            .map_err(|e: lablink_core::Error| StartError::Invalid(e.message().to_owned()))?;
        if command.code() != a.code {
            return Err(StartError::Invalid(
                "the command's --code differs from the assignment's code".into(),
            ));
        }
        if !(6..=32).contains(&a.pin.len()) || !a.pin.bytes().all(|b| b.is_ascii_digit()) {
            return Err(StartError::Invalid("the PIN must be 6 to 32 digits".into()));
        }
        Ok(Self {
            code: command.code().to_owned(),
            pin: a.pin.clone(),
        })
    }

    /// The argument vector after the program: `--code=`, `--redirect-url=`, `--name=`, and
    /// `--user-name=` when a user is configured (start-host requires it when run as root).
    pub fn args(&self, redirect_url: &str, hostname: &str, user: Option<&str>) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            format!("--code={}", self.code).into(),
            format!("--redirect-url={redirect_url}").into(),
            format!("--name={hostname}").into(),
        ];
        args.extend(user.map(|u| format!("--user-name={u}").into()));
        args
    }

    /// Runs `start-host` (or nothing, in dry-run mode) and waits for it. A failure carries
    /// the end of start-host's stderr, with the code and PIN blanked out.
    pub async fn run(&self, config: &AgentConfig) -> Result<Started, StartError> {
        let program = match &config.start_host {
            StartHost::DryRun => return Ok(Started::DryRun),
            StartHost::Program(path) => path,
        };
        let failed = |what: String, failure, exit_status| StartError::Failed {
            message: format!("{}: {what}", program.display()),
            failure,
            exit_status,
        };
        let mut child = Command::new(program)
            .args(self.args(
                &config.redirect_url,
                config.vm_name.as_str(),
                config.crd_user.as_deref(),
            ))
            .env_remove("DISPLAY")
            // The host runs on as the desktop user: it must not inherit the VM's token.
            .env_remove("API_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| failed(e.to_string(), DesktopFailure::HostFailed, None))?;
        if let Some(mut stdin) = child.stdin.take() {
            let pin = format!("{0}\n{0}\n", self.pin);
            // start-host may exit without reading its PIN; its status says what happened.
            let _ = stdin.write_all(pin.as_bytes()).await;
        }
        let pipe = child.stderr.take();
        let waited = tokio::time::timeout(config.start_host_timeout, async {
            let stderr = tail(pipe).await;
            child.wait().await.map(|status| (status, stderr))
        })
        .await;
        let (status, stderr) = match waited {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Err(failed(e.to_string(), DesktopFailure::HostFailed, None)),
            Err(_) => {
                return Err(failed(
                    format!("no exit within {:?}", config.start_host_timeout),
                    DesktopFailure::TimedOut,
                    None,
                ))
            }
        };
        if status.success() {
            return Ok(Started::Program);
        }
        let said = String::from_utf8_lossy(&stderr)
            .replace(&self.code, "***")
            .replace(&self.pin, "***");
        let said = said.split_whitespace().collect::<Vec<_>>().join(" ");
        let failure = classify_exit(&said);
        let what = if said.is_empty() {
            format!("exited with {status}")
        } else {
            format!("exited with {status}: {said}")
        };
        Err(failed(what, failure, status.code()))
    }
}

/// How the host was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// start-host ran and succeeded.
    Program,
    /// Dry-run mode: nothing ran.
    DryRun,
}

/// Most bytes of start-host's stderr kept for the report.
const STDERR_TAIL: usize = 4096;

/// Reads `pipe` to its end, keeping the last [`STDERR_TAIL`] bytes.
async fn tail(pipe: Option<tokio::process::ChildStderr>) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut pipe) = pipe else {
        return kept;
    };
    let mut chunk = [0; 1024];
    while let Ok(n @ 1..) = pipe.read(&mut chunk).await {
        kept.extend_from_slice(&chunk[..n]);
        let excess = kept.len().saturating_sub(STDERR_TAIL);
        kept.drain(..excess);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(command: &str, code: &str) -> AssignmentBody {
        AssignmentBody {
            hostname: "vm-1".into(),
            command: command.into(),
            code: code.into(),
            pin: "123456".into(),
            assigned_at: chrono::DateTime::UNIX_EPOCH,
            mode: "crd".into(),
            attempt: 1,
            version: String::new(),
            tunnel: None,
        }
    }

    #[test]
    fn the_argument_vector_is_built_from_the_code_alone() {
        let cmd = "DISPLAY= /opt/google/chrome-remote-desktop/start-host --code=\"4/0Ab-x_y-z\" \
                   --redirect-url=\"https://evil.example\" --name=$(hostname)";
        let inv = HostInvocation::from_assignment(&assignment(cmd, "4/0Ab-x_y-z")).unwrap();
        let args = inv.args(
            "https://remotedesktop.google.com/_/oauthredirect",
            "vm-7",
            None,
        );
        assert_eq!(
            args,
            [
                "--code=4/0Ab-x_y-z",
                "--redirect-url=https://remotedesktop.google.com/_/oauthredirect",
                "--name=vm-7"
            ]
            .map(OsString::from)
        );
        let args = inv.args("u", "vm-7", Some("participant"));
        assert_eq!(args[3], "--user-name=participant");
    }

    #[test]
    fn hostile_commands_are_invalid() {
        for (command, code) in [
            ("start-host --code=abc;reboot", "abc;reboot"),
            ("start-host --code=$(curl evil)", "$(curl"),
            ("start-host --code=`id`", "`id`"),
            ("start-host --code=\"abc\nrm -rf /\"", "abc\nrm"),
            ("start-host --code='abc;id'", "abc;id"),
            ("start-host --code=\"a b\"", "a b"),
            ("start-host --name=x", ""),
            ("", ""),
        ] {
            let r = HostInvocation::from_assignment(&assignment(command, code));
            assert!(
                matches!(r, Err(StartError::Invalid(_))),
                "{command:?} was accepted"
            );
        }
    }

    #[test]
    fn a_code_that_differs_from_the_command_is_invalid() {
        let r = HostInvocation::from_assignment(&assignment("x --code=abc", "abd"));
        assert!(matches!(r, Err(StartError::Invalid(_))));
    }

    #[test]
    fn a_bad_pin_is_invalid() {
        let mut a = assignment("x --code=abc", "abc");
        a.pin = "12;4567".into();
        assert!(matches!(
            HostInvocation::from_assignment(&a),
            Err(StartError::Invalid(_))
        ));
    }

    #[test]
    fn what_start_host_prints_tells_a_refused_code_from_other_failures() {
        for (said, expected) in [
            // Chrome Remote Desktop's own start-host, for every code Google refuses.
            (
                "Couldn't start host: OAuth error.",
                DesktopFailure::CodeRejected,
            ),
            (
                "OAuth error: the authorization code has expired",
                DesktopFailure::CodeRejected,
            ),
            (
                "error: invalid_grant (Bad Request)",
                DesktopFailure::CodeRejected,
            ),
            (
                "The code has already been used",
                DesktopFailure::CodeRejected,
            ),
            (
                "Couldn't start host: network error.",
                DesktopFailure::HostFailed,
            ),
            (
                "Couldn't start host: Permission denied.",
                DesktopFailure::HostFailed,
            ),
            ("Couldn't start host.", DesktopFailure::HostFailed),
            ("", DesktopFailure::HostFailed),
        ] {
            assert_eq!(classify_exit(said), expected, "{said:?}");
        }
    }

    /// A `start-host` running `body` (installed by a child process, so that no write
    /// descriptor of it leaks into a process another test forks).
    fn start_host(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
        let source = dir.join("start-host.source");
        let script = dir.join("start-host");
        std::fs::write(&source, format!("#!/bin/sh\n{body}\n")).unwrap();
        let installed = std::process::Command::new("install")
            .args(["-m", "0755"])
            .arg(&source)
            .arg(&script)
            .status()
            .unwrap();
        assert!(installed.success());
        script
    }

    async fn run(body: &str, timeout: std::time::Duration) -> Result<Started, StartError> {
        let dir = tempfile::tempdir().unwrap();
        let mut config = AgentConfig::new(
            "http://127.0.0.1:9".parse().unwrap(),
            "vm-1".parse().unwrap(),
            None,
        );
        config.start_host = StartHost::Program(start_host(dir.path(), body));
        config.start_host_timeout = timeout;
        let a = assignment("x --code=4/0Ab-secret", "4/0Ab-secret");
        HostInvocation::from_assignment(&a)
            .unwrap()
            .run(&config)
            .await
    }

    #[tokio::test]
    async fn a_failed_run_is_classified_with_its_exit_status_and_never_quotes_the_code() {
        let second = std::time::Duration::from_secs(20);
        let e = run(
            r#"echo "Couldn't start host: OAuth error. ($1)" >&2; exit 1"#,
            second,
        )
        .await
        .unwrap_err();
        assert_eq!(e.failure(), DesktopFailure::CodeRejected, "{e}");
        assert_eq!(e.exit_status(), Some(1));
        let said = e.to_string();
        assert!(
            said.contains("OAuth error") && !said.contains("secret"),
            "{said}"
        );

        let e = run("echo 'Couldn'\\''t start host.' >&2; exit 3", second)
            .await
            .unwrap_err();
        assert_eq!(
            (e.failure(), e.exit_status()),
            (DesktopFailure::HostFailed, Some(3)),
            "{e}"
        );

        let e = run("exec sleep 30", std::time::Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(
            (e.failure(), e.exit_status()),
            (DesktopFailure::TimedOut, None),
            "{e}"
        );

        assert_eq!(
            run("cat > /dev/null", second).await.unwrap(),
            Started::Program
        );
        let invalid = HostInvocation::from_assignment(&assignment("x --code=a;b", "a;b"));
        assert_eq!(
            invalid.unwrap_err().failure(),
            DesktopFailure::InvalidCommand
        );
    }
}
