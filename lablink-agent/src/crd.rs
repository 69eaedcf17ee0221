//! Starting the Chrome Remote Desktop host for an assignment, without a shell.
//!
//! The participant's command is never run. Only its `--code` value is taken, validated by the
//! same rule as the allocator's ([`lablink_core::CrdCommand`]), and the agent builds the
//! argument vector itself:
//! `start-host --code=<code> --redirect-url=<url> --name=<hostname>`, with the PIN written to
//! stdin twice (start-host asks for it and for its confirmation).

use std::ffi::OsString;
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use lablink_core::CrdCommand;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::client::Assignment;
use crate::config::{AgentConfig, StartHost};

/// Why an assignment was not started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The command or PIN is not acceptable; nothing was run.
    #[error("{0}")]
    Invalid(String),
    /// `start-host` could not be started, failed, or timed out.
    #[error("{0}")]
    Failed(String),
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
    pub fn from_assignment(a: &Assignment) -> Result<Self, StartError> {
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

    /// The argument vector after the program: `--code=`, `--redirect-url=`, `--name=`.
    pub fn args(&self, redirect_url: &str, hostname: &str) -> [OsString; 3] {
        [
            format!("--code={}", self.code).into(),
            format!("--redirect-url={redirect_url}").into(),
            format!("--name={hostname}").into(),
        ]
    }

    /// Runs `start-host` (or nothing, in dry-run mode) and waits for it.
    pub async fn run(&self, config: &AgentConfig) -> Result<(), StartError> {
        let program = match &config.start_host {
            StartHost::DryRun => {
                tracing::info!(
                    hostname = %config.vm_name,
                    "dry run: Chrome Remote Desktop would start now"
                );
                return Ok(());
            }
            StartHost::Program(path) => path,
        };
        let status = self
            .spawn(program, config)
            .await
            .map_err(|e| StartError::Failed(format!("{}: {e}", program.display())))?;
        if status.success() {
            Ok(())
        } else {
            Err(StartError::Failed(format!(
                "{} exited with {status}",
                program.display()
            )))
        }
    }

    async fn spawn(&self, program: &Path, config: &AgentConfig) -> std::io::Result<ExitStatus> {
        let mut child = Command::new(program)
            .args(self.args(&config.redirect_url, config.vm_name.as_str()))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            let pin = format!("{0}\n{0}\n", self.pin);
            // start-host may exit without reading its PIN; its status says what happened.
            let _ = stdin.write_all(pin.as_bytes()).await;
        }
        match tokio::time::timeout(config.start_host_timeout, child.wait()).await {
            Ok(status) => status,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no exit within {:?}", config.start_host_timeout),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(command: &str, code: &str) -> Assignment {
        Assignment {
            command: command.into(),
            code: code.into(),
            pin: "123456".into(),
            assigned_at: "t".into(),
        }
    }

    #[test]
    fn the_argument_vector_is_built_from_the_code_alone() {
        let cmd = "DISPLAY= /opt/google/chrome-remote-desktop/start-host --code=\"4/0Ab-x_y.z~+\" \
                   --redirect-url=\"https://evil.example\" --name=$(hostname)";
        let inv = HostInvocation::from_assignment(&assignment(cmd, "4/0Ab-x_y.z~+")).unwrap();
        let args = inv.args("https://remotedesktop.google.com/_/oauthredirect", "vm-7");
        assert_eq!(
            args,
            [
                "--code=4/0Ab-x_y.z~+",
                "--redirect-url=https://remotedesktop.google.com/_/oauthredirect",
                "--name=vm-7"
            ]
            .map(OsString::from)
        );
    }

    #[test]
    fn hostile_commands_are_invalid() {
        for (command, code) in [
            ("start-host --code=abc;reboot", "abc;reboot"),
            ("start-host --code=$(curl evil)", "$(curl"),
            ("start-host --code=`id`", "`id`"),
            ("start-host --code=\"abc\nrm -rf /\"", "abc\nrm"),
            ("start-host --code='abc' extra'", "abc'"),
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
}
