//! The participant's desktop: which kind a deployment hands out ([`DesktopMode`]), how far
//! starting it got for the current assignment ([`DesktopSession`]), and what may change that
//! ([`DesktopChange`]): the agent's reports, a fresh Chrome Remote Desktop command after a
//! failed attempt, and a browser's request for a tunnel to the VM.
//!
//! Nothing here holds a code or a PIN: a report carries only a stage, a class of failure and
//! an exit status.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::wire::wire_enum;
use crate::{CrdCommand, Error, Result};

wire_enum!(
    /// How participants reach their VM's desktop; one per deployment (`Default`: `Crd`).
    DesktopMode {
        /// The participant pastes a Chrome Remote Desktop command; the agent runs
        /// `start-host` with its code.
        #[default]
        Crd = "crd",
        /// The allocator serves a browser desktop (noVNC) and bridges it to the VM's VNC
        /// server through a connection the agent opens.
        Browser = "browser",
    }
);

wire_enum!(
    /// How far starting the participant's desktop got (`Default`: `Assigned`).
    DesktopStage {
        /// The VM is the participant's; its agent has not said it got the assignment.
        #[default]
        Assigned = "assigned",
        /// The agent got the assignment and is starting the desktop.
        Received = "received",
        /// The desktop is up: `start-host` succeeded, or the browser got its first frame.
        Ready = "ready",
        /// Starting the desktop failed; see the [`DesktopFailure`].
        Failed = "failed",
    }
);

wire_enum!(
    /// Why starting the desktop failed, in classes a participant can act on
    /// (`Default`: `HostFailed`).
    DesktopFailure {
        /// Chrome Remote Desktop refused the code: expired, already used or mistyped.
        CodeRejected = "code_rejected",
        /// The command or PIN the agent got is not one it can run.
        InvalidCommand = "invalid_command",
        /// The desktop program failed for another reason (the VM's log says which).
        #[default]
        HostFailed = "host_failed",
        /// The desktop program did not finish in time.
        TimedOut = "timed_out",
        /// The VM's VNC server (browser mode) could not be started or reached.
        DesktopUnavailable = "desktop_unavailable",
    }
);

impl DesktopFailure {
    /// What the participant's page says, in words a participant understands.
    pub fn message(self) -> &'static str {
        match self {
            Self::CodeRejected => "Chrome Remote Desktop did not accept the code: it has probably expired (a code lasts a few minutes) or was used already. Get a new command and paste it below.",
            Self::InvalidCommand => "The command could not be used. Copy the whole Debian Linux command again and paste it below.",
            Self::HostFailed => "Your desktop could not be started on the VM. Try a new command below; if it fails again, ask the organisers.",
            Self::TimedOut => "Starting your desktop took too long. Try a new command below; if it fails again, ask the organisers.",
            Self::DesktopUnavailable => "The desktop on your VM could not be reached. Reload this page in a minute; if it persists, ask the organisers.",
        }
    }
}

/// A browser's request for the agent to open a tunnel to its VNC server: the agent dials
/// `url` (which names `id`) with its own token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelRequest {
    /// The session this tunnel is for.
    pub id: Uuid,
    /// The WebSocket URL the agent dials (`ws://` or `wss://`), on the replica that holds
    /// the browser's connection.
    pub url: String,
    /// When the browser asked.
    pub at: DateTime<Utc>,
}

/// Where starting the desktop of one assignment stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesktopSession {
    /// 1 for the assignment's first command; one more for each fresh command after a failure.
    pub attempt: u32,
    /// How far the current attempt got.
    pub stage: DesktopStage,
    /// Why the current attempt failed (`stage` is `Failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<DesktopFailure>,
    /// The desktop program's exit status, when it ran and the agent said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// When the stage last changed.
    pub at: DateTime<Utc>,
    /// The newest tunnel a browser asked for (browser mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelRequest>,
}

impl DesktopSession {
    /// The session of a new assignment: attempt 1, nothing reported yet.
    pub fn new(at: DateTime<Utc>) -> Self {
        Self {
            attempt: 1,
            stage: DesktopStage::Assigned,
            failure: None,
            exit_status: None,
            at,
            tunnel: None,
        }
    }

    /// A short text that changes whenever the session does (a new attempt, stage or
    /// tunnel), for long polls: `<attempt>-<stage>` or `<attempt>-<stage>-<tunnel id>`.
    pub fn version(&self) -> String {
        match &self.tunnel {
            Some(t) => format!("{}-{}-{}", self.attempt, self.stage, t.id.simple()),
            None => format!("{}-{}", self.attempt, self.stage),
        }
    }

    /// Applies `change` at `now`; whether anything changed. A report for another attempt is
    /// stale and changes nothing; within an attempt a stage never goes back (`Ready` stays).
    /// A new command is refused while the current attempt is under way or succeeded.
    pub fn apply(
        &mut self,
        change: &DesktopChange,
        command: &mut Option<CrdCommand>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        match change {
            DesktopChange::Report(report) => {
                if report.attempt != self.attempt
                    || self.stage == DesktopStage::Ready
                    || (self.stage == report.stage && self.failure == report.failure)
                    || report.stage == DesktopStage::Assigned
                {
                    return Ok(false);
                }
                self.stage = report.stage;
                self.failure = if report.stage == DesktopStage::Failed {
                    Some(report.failure.unwrap_or_default())
                } else {
                    None
                };
                self.exit_status = report.exit_status;
                self.at = now;
            }
            DesktopChange::NewCommand(fresh) => {
                if command.is_none() {
                    return Err(Error::invalid_input(
                        "this VM's desktop opens in the browser; it takes no Chrome Remote Desktop command",
                    ));
                }
                match self.stage {
                    DesktopStage::Failed | DesktopStage::Assigned => {}
                    DesktopStage::Received => {
                        return Err(Error::conflict(
                            "your desktop is being started with your last command; wait for the outcome",
                        ))
                    }
                    DesktopStage::Ready => {
                        return Err(Error::conflict(
                            "your desktop is already running; open Chrome Remote Desktop to reach it",
                        ))
                    }
                }
                *command = Some(fresh.clone());
                self.attempt += 1;
                self.stage = DesktopStage::Assigned;
                self.failure = None;
                self.exit_status = None;
                self.at = now;
            }
            DesktopChange::Tunnel(request) => self.tunnel = Some(request.clone()),
        }
        Ok(true)
    }
}

/// What the agent says about starting the desktop. Never a code or PIN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesktopReport {
    /// The attempt this is about (from the assignment the agent got).
    pub attempt: u32,
    /// `Received`, `Ready` or `Failed`.
    pub stage: DesktopStage,
    /// Why it failed.
    #[serde(default)]
    pub failure: Option<DesktopFailure>,
    /// The desktop program's exit status, when it ran.
    #[serde(default)]
    pub exit_status: Option<i32>,
}

/// A change to an assignment's [`DesktopSession`] (see [`DesktopSession::apply`]).
#[derive(Clone, PartialEq)]
pub enum DesktopChange {
    /// The agent's report.
    Report(DesktopReport),
    /// The participant's fresh Chrome Remote Desktop command after a failed attempt.
    NewCommand(CrdCommand),
    /// A browser asks for a tunnel.
    Tunnel(TunnelRequest),
}

impl fmt::Debug for DesktopChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Report(r) => f.debug_tuple("Report").field(r).finish(),
            Self::NewCommand(_) => f.write_str("NewCommand(***)"),
            Self::Tunnel(t) => f.debug_tuple("Tunnel").field(t).finish(),
        }
    }
}

wire_enum!(
    /// What happens to a VM when its participant's assignment ends (`[allocator] reuse`;
    /// `Default`: `Keep`).
    Reuse {
        /// It is free again as it is (the participant's files and desktop stay): for
        /// deployments where that is wanted, and VMs whose client cannot reset.
        #[default]
        Keep = "keep",
        /// Its work is collected (when collection is on), then its agent ends the desktop
        /// session, removes the desktop registration and restores the home directory; only
        /// then is it free again. A failed reset keeps it out of the pool.
        Reset = "reset",
        /// It is destroyed (collected first when collection before destroy is on); the pool
        /// launches a new one.
        Replace = "replace",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    fn report(attempt: u32, stage: DesktopStage) -> DesktopChange {
        DesktopChange::Report(DesktopReport {
            attempt,
            stage,
            failure: (stage == DesktopStage::Failed).then_some(DesktopFailure::CodeRejected),
            exit_status: None,
        })
    }

    #[test]
    fn a_failed_attempt_takes_a_fresh_command_and_stale_reports_change_nothing() {
        let t = DateTime::UNIX_EPOCH;
        let mut command = Some("x --code=first".parse::<CrdCommand>().unwrap());
        let mut s = DesktopSession::new(t);
        assert!(s
            .apply(&report(1, DesktopStage::Received), &mut command, t)
            .unwrap());
        let fresh: CrdCommand = "x --code=second".parse().unwrap();
        let refused = s
            .apply(&DesktopChange::NewCommand(fresh.clone()), &mut command, t)
            .unwrap_err();
        assert!(refused.is_conflict(), "{refused}");
        assert!(s
            .apply(&report(1, DesktopStage::Failed), &mut command, t)
            .unwrap());
        assert_eq!(s.failure, Some(DesktopFailure::CodeRejected));
        assert!(s
            .apply(&DesktopChange::NewCommand(fresh.clone()), &mut command, t)
            .unwrap());
        assert_eq!((s.attempt, s.stage), (2, DesktopStage::Assigned));
        assert_eq!(command, Some(fresh));
        assert!(
            !s.apply(&report(1, DesktopStage::Ready), &mut command, t)
                .unwrap(),
            "a report of attempt 1 is stale"
        );
        assert!(s
            .apply(&report(2, DesktopStage::Ready), &mut command, t)
            .unwrap());
        assert!(!s
            .apply(&report(2, DesktopStage::Failed), &mut command, t)
            .unwrap());
        assert_eq!(s.stage, DesktopStage::Ready);
    }

    #[test]
    fn a_browser_desktop_takes_no_command() {
        let t = DateTime::UNIX_EPOCH;
        let mut s = DesktopSession::new(t);
        let change = DesktopChange::NewCommand("x --code=a".parse().unwrap());
        assert!(s.apply(&change, &mut None, t).is_err());
        assert_eq!(s.version(), "1-assigned");
    }
}
