//! Starting the participant's desktop for an assignment (Chrome Remote Desktop, or the
//! browser desktop's VNC server and tunnels), reporting how far it got, and resetting the
//! machine for the next participant.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use lablink_core::{DesktopFailure, DesktopStage};
use tokio::task::JoinSet;

use super::{assignment_key, Agent};
use crate::client::{AssignmentBody, DesktopReportBody, TelemetryBody};
use crate::crd::{HostInvocation, StartError, Started};

/// The report of how far starting the desktop of `attempt` got. Never a code or a PIN.
pub(super) fn desktop_report(
    attempt: u32,
    stage: DesktopStage,
    failed: Option<(DesktopFailure, Option<i32>)>,
) -> TelemetryBody {
    TelemetryBody {
        desktop: Some(DesktopReportBody {
            attempt,
            stage: stage.as_str().to_owned(),
            failure: failed.map(|(failure, _)| failure.as_str().to_owned()),
            exit_status: failed.and_then(|(_, status)| status),
        }),
        ..Default::default()
    }
}

/// The browser desktop of an assignment (browser mode): the VNC server the agent started
/// for it, if any (killed when dropped), and its tunnels (ended when dropped).
#[derive(Default)]
pub(super) struct BrowserDesktop {
    /// The assignment this is for (set once its VNC server was prepared, or failed to be).
    assigned_at: Option<DateTime<Utc>>,
    vnc: Option<tokio::process::Child>,
    /// The newest tunnel opened.
    tunnel: Option<String>,
    relays: JoinSet<()>,
}

impl Agent {
    /// Starts the desktop for `assignment`: Chrome Remote Desktop, or the browser desktop
    /// (browser mode: [`start_browser_desktop`](Self::start_browser_desktop)). The allocator
    /// hears `received` first, then `ready` or `failed` with the class of failure and
    /// start-host's exit status (the participant's page shows them), and the agent's log says
    /// what happened. A bad or expired code is the participant's problem, not the VM's: the
    /// VM's status stays `running`, and a fresh command comes as the next attempt.
    pub(super) async fn start(self: &Arc<Self>, assignment: &AssignmentBody) {
        if assignment.mode == "browser" {
            return self.start_browser_desktop(assignment).await;
        }
        let at = assignment_key(assignment);
        let attempt = assignment.attempt;
        let which = if attempt > 1 {
            format!("the assignment of {at} (attempt {attempt})")
        } else {
            format!("the assignment of {at}")
        };
        let invocation = HostInvocation::from_assignment(assignment);
        self.note(
            desktop_report(attempt, DesktopStage::Received, None),
            format!("starting Chrome Remote Desktop for {which}"),
        );
        let outcome = match invocation {
            Ok(invocation) => invocation.run(&self.config).await,
            Err(e) => Err(e),
        };
        let (report, line) = match outcome {
            Ok(Started::Program) => (
                desktop_report(attempt, DesktopStage::Ready, None),
                format!("Chrome Remote Desktop started for {which}"),
            ),
            Ok(Started::DryRun) => (
                desktop_report(attempt, DesktopStage::Ready, None),
                format!("dry run: Chrome Remote Desktop would start now for {which}"),
            ),
            Err(e) => {
                let failure = e.failure();
                let verb = match e {
                    StartError::Invalid(_) => "rejected",
                    StartError::Failed { .. } => "failed",
                };
                (
                    desktop_report(
                        attempt,
                        DesktopStage::Failed,
                        Some((failure, e.exit_status())),
                    ),
                    format!("{which} {verb}: {e} (reported as {failure})"),
                )
            }
        };
        self.note(report, line);
    }

    /// Browser mode: prepares the VM's VNC server for `assignment` (a fresh password from
    /// its PIN; a server started if none listens, see [`crate::vnc::prepare`]) and opens the
    /// tunnel a browser asked for. The allocator hears `received`, or `failed` with
    /// `desktop_unavailable` when no VNC server could be had; the desktop is `ready` once the
    /// participant's browser gets its first frame (the allocator sees that).
    async fn start_browser_desktop(self: &Arc<Self>, assignment: &AssignmentBody) {
        let at = assignment_key(assignment);
        let attempt = assignment.attempt;
        let port = self.config.vnc.port;
        self.note(
            desktop_report(attempt, DesktopStage::Received, None),
            format!("preparing the browser desktop (VNC on 127.0.0.1:{port}) for the assignment of {at}"),
        );
        // The previous assignment's server and tunnels end first.
        self.end_browser_desktop();
        let password_file = self
            .config
            .vnc
            .password_path(self.config.state_dir.as_deref());
        let prepared = crate::vnc::prepare(
            &self.config.vnc,
            &password_file,
            &crate::vnc::password_of_pin(&assignment.pin),
            self.config.crd_user.as_deref(),
        )
        .await;
        let failed = {
            let mut browser = self.browser.lock().unwrap_or_else(|e| e.into_inner());
            *browser = BrowserDesktop {
                assigned_at: Some(assignment.assigned_at),
                ..BrowserDesktop::default()
            };
            match prepared {
                Ok(started) => {
                    browser.vnc = started;
                    None
                }
                Err(e) => Some(e),
            }
        };
        match failed {
            None => self.note(
                TelemetryBody::default(),
                format!("browser desktop prepared for the assignment of {at}; waiting for the participant's browser"),
            ),
            Some(e) => self.note(
                desktop_report(
                    attempt,
                    DesktopStage::Failed,
                    Some((DesktopFailure::DesktopUnavailable, None)),
                ),
                format!("the browser desktop is unavailable for the assignment of {at}: {e}"),
            ),
        }
        self.open_tunnel(assignment);
    }

    /// Browser mode, an assignment already handled: prepares its desktop again if this run
    /// of the agent did not (it was restarted), and opens a tunnel a browser asked for.
    pub(super) async fn keep_browser_desktop(self: &Arc<Self>, assignment: &AssignmentBody) {
        let prepared = self
            .browser
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .assigned_at
            == Some(assignment.assigned_at);
        if prepared {
            self.open_tunnel(assignment);
        } else {
            self.start_browser_desktop(assignment).await;
        }
    }

    /// Opens the tunnel of `assignment` to the VNC server, unless it is open already.
    fn open_tunnel(&self, assignment: &AssignmentBody) {
        let Some(tunnel) = &assignment.tunnel else {
            return;
        };
        let mut browser = self.browser.lock().unwrap_or_else(|e| e.into_inner());
        if browser.assigned_at != Some(assignment.assigned_at)
            || browser.tunnel.as_deref() == Some(tunnel.id.as_str())
        {
            return;
        }
        browser.tunnel = Some(tunnel.id.clone());
        let url = match crate::tunnel::resolve(&self.config.allocator_url, &tunnel.url) {
            Ok(url) => url,
            Err(e) => {
                drop(browser);
                self.reporter
                    .line(format!("tunnel {} not opened: {e}", tunnel.id));
                return;
            }
        };
        let (id, token, port) = (
            tunnel.id.clone(),
            self.config.api_token.clone(),
            self.config.vnc.port,
        );
        let reporter = self.reporter.clone();
        browser.relays.spawn(async move {
            tracing::info!(tunnel = %id, "opening the tunnel to the VNC server");
            match crate::tunnel::relay(&url, token.as_ref(), port).await {
                Ok(()) => tracing::info!(tunnel = %id, "tunnel closed"),
                Err(e) => reporter.line(format!("tunnel {id} failed: {e}")),
            }
        });
    }

    /// Ends the browser desktop of the assignment that ended: its tunnels, and the VNC
    /// server the agent started for it.
    pub(super) fn end_browser_desktop(&self) {
        let ended = std::mem::take(&mut *self.browser.lock().unwrap_or_else(|e| e.into_inner()));
        drop(ended);
    }

    /// The allocator asked for a reset for the next participant: reports `initializing`,
    /// ends the browser desktop, forgets the handled assignment, runs the reset's steps
    /// ([`crate::reset`]), then reports `running` (the VM is handed out again) or `error`
    /// with what failed (the VM stays out of the pool).
    pub(super) async fn reset(&self) {
        self.report_status_now(
            "initializing",
            "the allocator asked for a reset for the next participant; resetting".into(),
        )
        .await;
        self.end_browser_desktop();
        self.state.save("assignment", "");
        let outcome = match self.config.reset.plan(
            self.config.crd_user.as_deref(),
            self.config.bootstrap.desktop_home.as_deref(),
        ) {
            Ok(plan) => {
                plan.run(|line| self.note(TelemetryBody::default(), line))
                    .await
            }
            Err(e) => Err(e),
        };
        // The tutorial the set-up cloned into the home went with it: clone it again.
        let outcome = match outcome {
            Ok(()) => crate::bootstrap::refill_home(
                &self.config.bootstrap,
                self.config.crd_user.as_deref(),
                |line| self.note(TelemetryBody::default(), line),
            )
            .await
            .map_err(Into::into),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                self.report_status_now("running", "reset done; waiting for an assignment".into())
                    .await;
            }
            Err(e) => {
                self.report_status_now(
                    "error",
                    format!("reset failed: {e}; this VM stays out of the pool"),
                )
                .await;
            }
        }
    }
}
