//! The LabLink VM agent: what runs inside every VM.
//!
//! It registers with the allocator (`initializing`; then, once it has set up the VM's research
//! software — container, tutorial, start-up script, see [`bootstrap`] — `running`), heartbeats with a boot
//! id, waits for its assignment with a bounded long-poll, and then starts Chrome Remote
//! Desktop **without a shell**: only the `--code` value of the participant's command is used,
//! validated, and passed in an argument vector the agent builds itself, with the PIN on stdin.
//! It reports GPU health (`nvidia-smi`), whether the research software is in use, its start-up
//! timings, and ships log files in batches. When the allocator asks for a **collection**
//! (long-poll `GET /api/v1/vms/{hostname}/tasks`), it finds the participants' files matching
//! the allocator's roots and patterns, never following symbolic links and never sending more
//! than the size limit (what it leaves out is reported with the reason), and streams them as
//! one tar archive with a SHA-256 per file and a final manifest ([`collect`]); a failed upload
//! is retried as a whole. When the allocator warns that the VM will be destroyed or released
//! (a warning in the same task poll), it shows a desktop notification with `notify-send`, as
//! the desktop user, once per warning, and acknowledges it ([`notify`]). Every call to the
//! allocator is retried with
//! jittered exponential backoff, for ever, and every report is safe to repeat.
//!
//! **The participant's desktop.** The agent tells the allocator how starting the desktop
//! goes, per attempt: `received`, then `ready`, or `failed` with a class of failure
//! (`code_rejected` when Chrome Remote Desktop refused the code, `invalid_command`,
//! `host_failed`, `timed_out`, `desktop_unavailable`) and start-host's exit status, never the
//! code or the PIN; the participant's page shows it. Once it handled an assignment it waits
//! for the assignment's next change (`seen=<version>`): a fresh command after a failed start
//! is a new attempt, and start-host runs again with its code. In browser mode
//! (`LABLINK_DESKTOP=browser`) it prepares the VNC server ([`vnc`]) and opens the tunnels
//! browsers ask for ([`tunnel`]) instead. When the allocator reuses VMs by resetting them,
//! it asks for a **reset** in the task poll: the agent ends the desktop user's session,
//! removes the remote-desktop registration and restores the home directory from a skeleton,
//! then reports `running` (or `error`, which keeps the VM out of the pool) ([`reset`]).
//!
//! The `lablink-agent` binary reads its settings from the environment (see [`AgentConfig`]);
//! [`main_from_env`] is that binary, for programs that embed it.
//!
//! **Bring-your-own machines.** A lab's own workstation joins the allocator's pool, and leaves
//! it, with the program's two commands (see [`register`]; run them as root):
//!
//! ```text
//! lablink-agent register --allocator-url URL --token TOKEN [--name NAME] [--allow-reboot]
//!                        [--address ADDR] [--config PATH] [--no-service]
//! lablink-agent unregister [--config PATH] [--no-service]
//! ```
//!
//! `register` registers the machine under its hostname (or `--name`), with its identity: a
//! secret of 256 random bits only root can read, kept in `/etc/lablink/machine-identity` (next
//! to the settings file; `LABLINK_IDENTITY_FILE` names another), created at the first
//! registration and kept by `unregister`. It writes its settings to `/etc/lablink/agent.env`
//! (mode 0600, with `LABLINK_REGISTERED=1` and `LABLINK_ALLOW_REBOOT=1` or `0`; other lines
//! kept) and installs, enables and (re)starts the `lablink-agent` systemd service; the token
//! may come from `LABLINK_REGISTRATION_TOKEN` instead. `unregister` tells the allocator,
//! stops and removes the service and removes the settings file. A registered machine whose
//! token the allocator keeps refusing (every answer 401 for `LABLINK_UNREGISTERED_AFTER_SECS`,
//! default 60, with no success in between) stops with exit status [`EXIT_UNREGISTERED`],
//! which its unit does not restart. One whose owner allowed reboots (`--allow-reboot`)
//! reboots when the allocator asks, once the allocator took its `rebooting` report
//! (`LABLINK_REBOOT_COMMAND`, default `systemctl reboot`, run without a shell); any other
//! machine ignores such a request.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lablink_agent::ConfigError> {
//! let config = lablink_agent::AgentConfig::from_env()?;
//! lablink_agent::run(config, async { let _ = tokio::signal::ctrl_c().await; })
//!     .await
//!     .expect("the agent's loops run until shutdown");
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod agent;
pub mod bootstrap;
pub mod client;
pub mod collect;
pub mod config;
pub mod crd;
pub mod logship;
pub mod notify;
pub mod probes;
pub mod register;
pub mod reset;
pub mod state;
#[cfg(test)]
#[path = "../tests/support/http.rs"]
mod test_http;
pub mod tunnel;
pub mod vnc;

use std::ffi::OsString;
use std::process::ExitCode;

pub use agent::{run, AgentFailed};
pub use config::{AgentConfig, ConfigError, StartHost};

/// The exit status of an agent whose machine is no longer registered (the allocator kept
/// refusing its token): `lablink-agent register` writes `RestartPreventExitStatus=3` into
/// its unit.
pub const EXIT_UNREGISTERED: u8 = 3;

/// The `lablink-agent` program with its arguments (without the program name): none runs the
/// agent ([`main_from_env`]); `register` and `unregister` are the commands of [`register`].
pub async fn main_from_args(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args: Vec<OsString> = args.into_iter().collect();
    if args.is_empty() {
        return main_from_env().await;
    }
    let system = register::System::from_env();
    let code = register::main(
        args,
        &system,
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )
    .await;
    ExitCode::from(code)
}

/// The agent program: settings from the environment, logs to stderr (`RUST_LOG`
/// filters them), runs until SIGTERM or Ctrl-C. Bad settings print one line and exit 2; a
/// loop that died makes it exit 1 (for its service manager to restart it); a registered
/// machine whose token the allocator kept refusing exits [`EXIT_UNREGISTERED`].
pub async fn main_from_env() -> ExitCode {
    let config = match AgentConfig::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("lablink-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    match run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(AgentFailed::Unregistered) => ExitCode::from(EXIT_UNREGISTERED),
        Err(AgentFailed::TaskEnded(_)) => ExitCode::FAILURE,
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    () = ctrl_c => {}
                }
            }
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}
