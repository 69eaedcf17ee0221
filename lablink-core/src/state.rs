//! The VM state machine: one pure function, [`transition`], that every store applies.
//!
//! ```text
//! Requested ──provisioned──▶ Booting ──agent ready──▶ Available ──claim──▶ Assigned
//!     │                         │                        │  ▲                 │
//!     └─provision failed─▶ Failed◀──boot timeout / set-up failed──┘  └──release───────┤
//! Any live state ──heartbeat lease expired / GPU unhealthy──▶ Unhealthy ──recovered──▶ previous
//! Any live state ──reboot──▶ Rebooting ──agent back──▶ previous      Any ──destroy──▶ Terminating ──▶ Terminated
//! ```
//!
//! "Live" states are the ones with a running agent behind them: `Booting`, `Available`,
//! `Assigned`. `Unhealthy` and `Rebooting` remember the live [`Phase`] to return to, so an
//! assigned VM that is rebooted comes back assigned to the same participant.

use std::fmt;

use serde::{Deserialize, Serialize};

use chrono::{DateTime, Utc};

use crate::desktop::{DesktopChange, DesktopSession};
use crate::secret::Pin;
use crate::{CrdCommand, Email, Error, ErrorKind, InstanceId};

/// The live phase a VM returns to after being unhealthy or rebooted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The machine exists; its agent has not reported ready yet.
    Booting,
    /// Ready and free to assign.
    Available,
    /// Belongs to a participant.
    Assigned,
}

impl Phase {
    /// Lower-case name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Booting => "booting",
            Self::Available => "available",
            Self::Assigned => "assigned",
        }
    }

    fn state(self) -> VmState {
        match self {
            Self::Booting => VmState::Booting,
            Self::Available => VmState::Available,
            Self::Assigned => VmState::Assigned,
        }
    }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state", content = "resume", rename_all = "snake_case")]
pub enum VmState {
    /// Recorded; the provisioner has been (or is about to be) asked for the machine.
    Requested,
    /// The machine exists; its agent has not reported ready.
    Booting,
    /// Ready and free: the only assignable state.
    Available,
    /// Belongs to a participant.
    Assigned,
    /// Missed heartbeats, GPU unhealthy or agent error; returns to `resume` when recovered.
    Unhealthy {
        /// The phase to return to.
        resume: Phase,
    },
    /// Its participant's assignment ended; its agent is resetting it (`[allocator] reuse =
    /// "reset"`). Free again once the agent reports running; failed if the reset fails.
    Resetting,
    /// Being rebooted; returns to `resume` when the agent is back.
    Rebooting {
        /// The phase to return to.
        resume: Phase,
    },
    /// Provisioning failed or the machine never came up. Only `destroy` leaves it.
    Failed,
    /// Being destroyed.
    Terminating,
    /// Gone. Terminal.
    Terminated,
}

impl VmState {
    /// Every state kind, each live one with the `resume` phase `Available` (for tables/tests).
    pub const NAMES: [&'static str; 10] = [
        "requested",
        "booting",
        "available",
        "assigned",
        "resetting",
        "unhealthy",
        "rebooting",
        "failed",
        "terminating",
        "terminated",
    ];

    /// Lower-case name of the state kind (without the resume phase), as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Booting => "booting",
            Self::Available => "available",
            Self::Assigned => "assigned",
            Self::Resetting => "resetting",
            Self::Unhealthy { .. } => "unhealthy",
            Self::Rebooting { .. } => "rebooting",
            Self::Failed => "failed",
            Self::Terminating => "terminating",
            Self::Terminated => "terminated",
        }
    }

    /// The resume phase of `Unhealthy` / `Rebooting`, `None` otherwise.
    pub fn resume(self) -> Option<Phase> {
        match self {
            Self::Unhealthy { resume } | Self::Rebooting { resume } => Some(resume),
            _ => None,
        }
    }

    /// Rebuilds a state from its stored parts ([`as_str`](Self::as_str) and
    /// [`resume`](Self::resume)).
    pub fn from_parts(name: &str, resume: Option<Phase>) -> crate::Result<Self> {
        let need_resume = || {
            resume.ok_or_else(|| Error::invalid_input(format!("state {name} needs a resume phase")))
        };
        Ok(match name {
            "requested" => Self::Requested,
            "booting" => Self::Booting,
            "available" => Self::Available,
            "assigned" => Self::Assigned,
            "resetting" => Self::Resetting,
            "unhealthy" => Self::Unhealthy {
                resume: need_resume()?,
            },
            "rebooting" => Self::Rebooting {
                resume: need_resume()?,
            },
            "failed" => Self::Failed,
            "terminating" => Self::Terminating,
            "terminated" => Self::Terminated,
            other => return Err(Error::invalid_input(format!("unknown VM state {other:?}"))),
        })
    }

    /// The live phase this state is in or will return to.
    pub fn phase(self) -> Option<Phase> {
        match self {
            // Like a booting VM, a resetting one becomes free once its agent says it runs.
            Self::Booting | Self::Resetting => Some(Phase::Booting),
            Self::Available => Some(Phase::Available),
            Self::Assigned => Some(Phase::Assigned),
            Self::Unhealthy { resume } | Self::Rebooting { resume } => Some(resume),
            _ => None,
        }
    }

    /// `true` only for `Available`.
    pub fn is_assignable(self) -> bool {
        self == Self::Available
    }

    /// `true` when the VM belongs to a participant (even while unhealthy or rebooting).
    pub fn is_owned(self) -> bool {
        self.phase() == Some(Phase::Assigned)
    }

    /// `true` for `Terminated`.
    pub fn is_terminal(self) -> bool {
        self == Self::Terminated
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.resume() {
            Some(resume) => write!(f, "{} (resumes {})", self.as_str(), resume.as_str()),
            None => f.write_str(self.as_str()),
        }
    }
}

/// A participant's claim on a VM. Holds secrets: its `Debug` shows only the email.
#[derive(Clone, PartialEq)]
pub struct Assignment {
    /// Who holds the VM.
    pub email: Email,
    /// The participant's Chrome Remote Desktop command (a credential); `None` for a
    /// browser desktop.
    pub crd_command: Option<CrdCommand>,
    /// The PIN generated for this assignment.
    pub pin: Pin,
    /// When the VM was assigned.
    pub assigned_at: DateTime<Utc>,
    /// How far starting the participant's desktop got.
    pub desktop: DesktopSession,
}

impl Assignment {
    /// A text that changes whenever the assignment does: another assignment, a new
    /// attempt, stage or tunnel.
    pub fn version(&self) -> String {
        format!(
            "{}.{}",
            self.assigned_at.timestamp_micros(),
            self.desktop.version()
        )
    }
}

impl fmt::Debug for Assignment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Assignment")
            .field("email", &self.email)
            .field("crd_command", &self.crd_command)
            .field("pin", &self.pin)
            .field("assigned_at", &self.assigned_at)
            .field("desktop", &self.desktop)
            .finish()
    }
}

/// Something that happens to a VM. Payloads are applied to the record by
/// [`VmRecord::apply`](crate::VmRecord::apply); [`transition`] looks only at the kind.
#[derive(Debug, Clone, PartialEq)]
pub enum VmEvent {
    /// The provider created the machine.
    Provisioned {
        /// The provider's id for it.
        instance_id: InstanceId,
        /// Its address, when the provider knows one.
        address: Option<String>,
        /// Its instance type, when the provider says.
        instance_type: Option<String>,
    },
    /// The provider could not create it.
    ProvisionFailed {
        /// Why (never a secret).
        reason: String,
    },
    /// The agent reported it is running (first boot, or back after a reboot).
    AgentReady,
    /// The agent did not report ready in time.
    BootTimedOut,
    /// The agent reported that the VM's set-up failed before it was ever ready (its start-up
    /// steps failed with `STARTUP_ON_ERROR=fail`): the VM is never handed out, and neither a
    /// reboot nor a replacement would set it up differently.
    SetupFailed {
        /// Why (never a secret).
        reason: String,
    },
    /// The provider no longer has the machine (found by reconcile).
    InstanceLost {
        /// Why (never a secret).
        reason: String,
    },
    /// A participant got this VM.
    Claim(Assignment),
    /// The participant's assignment ends; the VM is free again.
    Release,
    /// The participant's assignment ends; the VM's agent resets it before it is free again.
    Reset,
    /// A change to the current assignment's desktop; the state stays.
    Desktop(DesktopChange),
    /// Heartbeat lease expired, GPU unhealthy or agent error.
    MarkUnhealthy {
        /// Why (never a secret).
        reason: String,
    },
    /// Health returned.
    Recovered,
    /// A reboot was requested.
    Reboot,
    /// Destruction was requested.
    Destroy,
    /// The provider confirmed the machine is gone.
    Terminated,
}

impl VmEvent {
    /// Lower-case name of the event, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Provisioned { .. } => "provisioned",
            Self::ProvisionFailed { .. } => "provision failed",
            Self::AgentReady => "agent ready",
            Self::BootTimedOut => "boot timed out",
            Self::SetupFailed { .. } => "setup failed",
            Self::InstanceLost { .. } => "instance lost",
            Self::Claim(_) => "claim",
            Self::Release => "release",
            Self::Reset => "reset",
            Self::Desktop(_) => "desktop",
            Self::MarkUnhealthy { .. } => "mark unhealthy",
            Self::Recovered => "recovered",
            Self::Reboot => "reboot",
            Self::Destroy => "destroy",
            Self::Terminated => "terminated",
        }
    }
}

/// An event that is not allowed in a state. Converts into an [`Error`] of kind
/// [`ErrorKind::InvalidTransition`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTransition {
    /// The state the VM was in.
    pub from: VmState,
    /// The event's name.
    pub event: &'static str,
}

impl fmt::Display for InvalidTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot apply '{}' to a VM that is {}",
            self.event, self.from
        )
    }
}

impl std::error::Error for InvalidTransition {}

impl From<InvalidTransition> for Error {
    fn from(e: InvalidTransition) -> Self {
        Error::new(ErrorKind::InvalidTransition, e.to_string())
    }
}

/// The state after `event` happens in `from`, or why it cannot happen.
///
/// Idempotent repeats (`AgentReady` on a ready VM, `MarkUnhealthy` on an unhealthy one,
/// `Reboot` on a rebooting one, `Destroy` on a terminating one) return the same state; a store
/// writes nothing for them.
pub fn transition(from: &VmState, event: &VmEvent) -> Result<VmState, InvalidTransition> {
    use VmEvent as E;
    use VmState as S;
    let from = *from;
    let to = match (from, event) {
        (S::Terminated, _) => None,
        (S::Requested, E::Provisioned { .. }) => Some(S::Booting),
        (S::Requested, E::ProvisionFailed { .. }) => Some(S::Failed),
        (S::Booting | S::Resetting, E::AgentReady) => Some(S::Available),
        (S::Available | S::Assigned, E::AgentReady) => Some(from),
        (S::Rebooting { resume }, E::AgentReady) => Some(match resume {
            Phase::Booting => S::Available,
            other => other.state(),
        }),
        (S::Booting | S::Resetting, E::BootTimedOut) => Some(S::Failed),
        (
            S::Booting
            | S::Resetting
            | S::Unhealthy {
                resume: Phase::Booting,
            }
            | S::Rebooting {
                resume: Phase::Booting,
            },
            E::SetupFailed { .. },
        ) => Some(S::Failed),
        (
            S::Booting
            | S::Available
            | S::Assigned
            | S::Resetting
            | S::Unhealthy { .. }
            | S::Rebooting { .. },
            E::InstanceLost { .. },
        ) => Some(S::Failed),
        (S::Available, E::Claim(_)) => Some(S::Assigned),
        (S::Assigned, E::Release) => Some(S::Available),
        (S::Assigned, E::Reset) => Some(S::Resetting),
        // A paused VM is reset like a booting one: free only once its agent runs again.
        (
            S::Unhealthy {
                resume: Phase::Assigned,
            },
            E::Reset,
        ) => Some(S::Unhealthy {
            resume: Phase::Booting,
        }),
        (
            S::Rebooting {
                resume: Phase::Assigned,
            },
            E::Reset,
        ) => Some(S::Rebooting {
            resume: Phase::Booting,
        }),
        (_, E::Desktop(_)) if from.is_owned() => Some(from),
        (
            S::Unhealthy {
                resume: Phase::Assigned,
            },
            E::Release,
        ) => Some(S::Unhealthy {
            resume: Phase::Available,
        }),
        (
            S::Rebooting {
                resume: Phase::Assigned,
            },
            E::Release,
        ) => Some(S::Rebooting {
            resume: Phase::Available,
        }),
        (S::Booting | S::Available | S::Assigned | S::Resetting, E::MarkUnhealthy { .. }) => {
            Some(S::Unhealthy {
                resume: from.phase().expect("live states have a phase"),
            })
        }
        (S::Rebooting { resume }, E::MarkUnhealthy { .. }) => Some(S::Unhealthy { resume }),
        (S::Unhealthy { .. }, E::MarkUnhealthy { .. }) => Some(from),
        (S::Unhealthy { resume }, E::Recovered) => Some(resume.state()),
        (S::Booting | S::Available | S::Assigned | S::Resetting, E::Reboot) => Some(S::Rebooting {
            resume: from.phase().expect("live states have a phase"),
        }),
        (S::Unhealthy { resume }, E::Reboot) => Some(S::Rebooting { resume }),
        (S::Rebooting { .. }, E::Reboot) => Some(from),
        (S::Terminating, E::Destroy) => Some(from),
        (_, E::Destroy) => Some(S::Terminating),
        (S::Terminating, E::Terminated) => Some(S::Terminated),
        _ => None,
    };
    to.ok_or(InvalidTransition {
        from,
        event: event.name(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_states() -> Vec<VmState> {
        let phases = [Phase::Booting, Phase::Available, Phase::Assigned];
        let mut v = vec![
            VmState::Requested,
            VmState::Booting,
            VmState::Available,
            VmState::Assigned,
            VmState::Resetting,
            VmState::Failed,
            VmState::Terminating,
            VmState::Terminated,
        ];
        for resume in phases {
            v.push(VmState::Unhealthy { resume });
            v.push(VmState::Rebooting { resume });
        }
        v
    }

    #[test]
    fn the_happy_path_reaches_assigned_and_back() {
        let id: InstanceId = "i-1".parse().unwrap();
        let mut s = VmState::Requested;
        for (event, want) in [
            (
                VmEvent::Provisioned {
                    instance_id: id,
                    address: None,
                    instance_type: None,
                },
                VmState::Booting,
            ),
            (VmEvent::AgentReady, VmState::Available),
            (
                VmEvent::Reboot,
                VmState::Rebooting {
                    resume: Phase::Available,
                },
            ),
            (VmEvent::AgentReady, VmState::Available),
            (VmEvent::Release, VmState::Available),
        ] {
            match transition(&s, &event) {
                Ok(next) => {
                    assert_eq!(next, want, "{s} + {}", event.name());
                    s = next;
                }
                Err(e) => assert_eq!(event, VmEvent::Release, "{e}"),
            }
        }
    }

    #[test]
    fn terminated_accepts_nothing_and_destroy_reaches_it_from_everywhere() {
        for s in all_states() {
            if s.is_terminal() {
                assert!(transition(&s, &VmEvent::Destroy).is_err());
                continue;
            }
            let t = transition(&s, &VmEvent::Destroy).unwrap();
            assert_eq!(t, VmState::Terminating);
            assert_eq!(
                transition(&t, &VmEvent::Terminated).unwrap(),
                VmState::Terminated
            );
        }
    }

    #[test]
    fn unhealthy_and_rebooting_remember_the_owner() {
        let s = transition(
            &VmState::Assigned,
            &VmEvent::MarkUnhealthy {
                reason: "lease".into(),
            },
        )
        .unwrap();
        assert!(s.is_owned() && !s.is_assignable());
        let s = transition(&s, &VmEvent::Reboot).unwrap();
        assert_eq!(
            s,
            VmState::Rebooting {
                resume: Phase::Assigned
            }
        );
        assert_eq!(
            transition(&s, &VmEvent::AgentReady).unwrap(),
            VmState::Assigned
        );
    }

    #[test]
    fn illegal_events_name_state_and_event() {
        let err = transition(&VmState::Booting, &VmEvent::Release).unwrap_err();
        assert_eq!(
            Error::from(err).to_string(),
            "cannot apply 'release' to a VM that is booting"
        );
        assert!(transition(&VmState::Failed, &VmEvent::AgentReady).is_err());
        assert!(transition(&VmState::Requested, &VmEvent::AgentReady).is_err());
    }

    #[test]
    fn a_lost_instance_fails_every_live_state_and_nothing_else() {
        let lost = VmEvent::InstanceLost {
            reason: "gone".into(),
        };
        for s in all_states() {
            let result = transition(&s, &lost);
            if s.phase().is_some() {
                assert_eq!(result, Ok(VmState::Failed), "{s}");
            } else {
                assert!(result.is_err(), "{s} accepted instance lost");
            }
        }
    }

    #[test]
    fn parts_round_trip() {
        for s in all_states() {
            assert_eq!(VmState::from_parts(s.as_str(), s.resume()).unwrap(), s);
        }
        assert!(VmState::from_parts("unhealthy", None).is_err());
        assert!(VmState::from_parts("sleeping", None).is_err());
    }
}
