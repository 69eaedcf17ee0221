//! Runs one `terraform` command: in its own process group, with its output streamed line by
//! line (secrets redacted) into a [`Progress`] sink, under a deadline after which it is
//! interrupted (SIGINT, so Terraform saves its state and releases its lock), then terminated
//! (SIGTERM) and finally killed (SIGKILL).

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use lablink_core::Progress;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::{error_excerpt, TfFailure};

/// Lines of stderr kept to explain a failure.
const STDERR_TAIL: usize = 400;

/// How to run `terraform` (shared by every command of one provisioner).
#[derive(Clone)]
pub(crate) struct Runner {
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    pub shutdown_grace: Duration,
    pub stale_lock_after: Duration,
}

/// One command to run.
pub(crate) struct Invocation<'a> {
    /// Its name in messages (`"apply"`).
    pub command: &'static str,
    pub args: Vec<String>,
    /// Where stdout and stderr lines go; `None` captures stdout instead (for `output -json`).
    pub progress: Option<&'a Progress>,
    /// Values that must never leave in a progress line or an error message.
    pub secrets: &'a [String],
}

/// What a successful command printed on stdout (only when it was captured).
#[derive(Debug, Default)]
pub(crate) struct Finished {
    pub stdout: String,
}

enum Line {
    Out(String),
    Err(String),
}

impl Runner {
    /// Runs the command to completion, or until the deadline.
    pub async fn run(&self, inv: Invocation<'_>) -> Result<Finished, TfFailure> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&inv.args)
            .current_dir(&self.dir)
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0")
            .env("CHECKPOINT_DISABLE", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        tracing::debug!(command = inv.command, dir = %self.dir.display(), "running terraform");
        let mut child = cmd.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                TfFailure::MissingBinary {
                    binary: self.binary.clone(),
                    source,
                }
            } else {
                TfFailure::Spawn {
                    binary: self.binary.clone(),
                    source,
                }
            }
        })?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let readers = [
            child
                .stdout
                .take()
                .map(|s| read_lines(s, tx.clone(), Line::Out)),
            child.stderr.take().map(|s| read_lines(s, tx, Line::Err)),
        ];
        let mut out = Output::new(&inv);
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            tokio::select! {
                Some(line) = rx.recv() => out.push(line),
                status = child.wait() => break status,
                _ = tokio::time::sleep_until(deadline) => {
                    self.stop(&mut child, &inv).await;
                    drain(&mut rx, &mut out).await;
                    readers.iter().flatten().for_each(|r| r.abort());
                    return Err(TfFailure::Timeout {
                        command: inv.command,
                        timeout: self.timeout,
                        tail: error_excerpt(&out.stderr),
                    });
                }
            }
        };
        drain(&mut rx, &mut out).await;
        readers.iter().flatten().for_each(|r| r.abort());
        let status: ExitStatus = status.map_err(|source| TfFailure::Spawn {
            binary: self.binary.clone(),
            source,
        })?;
        if status.success() {
            return Ok(Finished { stdout: out.stdout });
        }
        let mut message = error_excerpt(&out.stderr);
        if message.is_empty() {
            message = format!("exit status {status}");
        }
        Err(TfFailure::Failed {
            command: inv.command,
            message,
            stale_lock_after: Some(self.stale_lock_after),
        })
    }

    /// Interrupts the process group, then terminates it, then kills it, each step waiting up
    /// to the grace period for Terraform to exit.
    async fn stop(&self, child: &mut Child, inv: &Invocation<'_>) {
        let Some(pid) = child.id() else { return };
        let group = Pid::from_raw(pid as i32);
        if let Some(progress) = inv.progress {
            progress.report(&format!(
                "terraform {} exceeded its {}s timeout; interrupting it",
                inv.command,
                self.timeout.as_secs_f64()
            ));
        }
        tracing::warn!(command = inv.command, "terraform timed out; stopping it");
        for signal in [Signal::SIGINT, Signal::SIGTERM] {
            // An error means the group is already gone.
            if killpg(group, signal).is_err() {
                break;
            }
            if tokio::time::timeout(self.shutdown_grace, child.wait())
                .await
                .is_ok()
            {
                // The leader exited; whatever it left behind goes too.
                let _ = killpg(group, Signal::SIGKILL);
                return;
            }
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.kill().await;
    }

    /// `args` with the flags every non-interactive command takes.
    pub fn args(&self, command: &str, extra: &[&str]) -> Vec<String> {
        let mut args = vec![command.to_owned(), "-no-color".to_owned()];
        if command != "output" {
            args.push("-input=false".to_owned());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    /// The working directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Collects and forwards output lines.
struct Output<'a> {
    progress: Option<&'a Progress>,
    secrets: &'a [String],
    stdout: String,
    stderr: Vec<String>,
}

impl<'a> Output<'a> {
    fn new(inv: &Invocation<'a>) -> Self {
        Self {
            progress: inv.progress,
            secrets: inv.secrets,
            stdout: String::new(),
            stderr: Vec::new(),
        }
    }

    fn push(&mut self, line: Line) {
        match (line, self.progress) {
            (Line::Out(line), None) => {
                self.stdout.push_str(&line);
                self.stdout.push('\n');
            }
            (Line::Out(line), Some(progress)) => {
                let line = redact(&line, self.secrets);
                if !line.trim().is_empty() {
                    progress.report(&line);
                }
            }
            (Line::Err(line), progress) => {
                let line = redact(&line, self.secrets);
                if let Some(progress) = progress.filter(|_| !line.trim().is_empty()) {
                    progress.report(&line);
                }
                if self.stderr.len() == STDERR_TAIL {
                    self.stderr.remove(0);
                }
                self.stderr.push(line);
            }
        }
    }
}

/// Replaces every secret in `line` by `***`.
pub(crate) fn redact(line: &str, secrets: &[String]) -> String {
    let mut line = line.to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if line.contains(secret.as_str()) {
            line = line.replace(secret.as_str(), "***");
        }
    }
    line
}

fn read_lines<R, F>(
    stream: R,
    tx: mpsc::UnboundedSender<Line>,
    wrap: F,
) -> tokio::task::JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    F: Fn(String) -> Line + Send + 'static,
{
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(wrap(line)).is_err() {
                break;
            }
        }
    })
}

/// Takes the lines still in flight after the process exited. A grandchild that keeps the
/// pipes open cannot hold this up for more than a moment.
async fn drain(rx: &mut mpsc::UnboundedReceiver<Line>, out: &mut Output<'_>) {
    let until = Instant::now() + Duration::from_millis(500);
    while let Ok(Some(line)) = tokio::time::timeout_at(until, rx.recv()).await {
        out.push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_every_secret_occurrence() {
        let secrets = vec!["llt_abc".to_owned(), String::new()];
        assert_eq!(
            redact("token llt_abc and llt_abc again", &secrets),
            "token *** and *** again"
        );
        assert_eq!(redact("nothing here", &secrets), "nothing here");
    }
}
