//! The participant's live status and what they can do about it, each authenticated by the
//! participant cookie (signed for the current assignment, see [`participant_vm`]):
//!
//! - `GET /api/participant/status`: server-sent `status` events, one whenever starting the
//!   desktop moves on (assigned, the agent got it, ready, or failed and why), and `released`
//!   once the VM is no longer this browser's.
//! - `POST /api/participant/command`: a fresh Chrome Remote Desktop command after a failed
//!   start (an expired or used code); the same VM's agent tries again with it.
//! - `POST /api/participant/release`: the participant is done; the VM is released (and reset
//!   or replaced, as `[allocator] reuse` says).
//! - `GET /vm`: the page of this browser's VM (the one the request's answer shows), to come
//!   back to; a browser without a VM goes to `/`.
//!
//! No answer but `/vm` (the PIN, to the browser that got it) holds a code or a PIN.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream};
use lablink_core::{
    Allocator as _, Assignment, DesktopChange, DesktopFailure, DesktopStage, Hostname,
};
use lablink_protocol::ErrorBody;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::extract::FormOrJson;
use super::public::participant_vm;
use super::HttpState;

/// The participant status routes.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/vm", get(my_vm))
        .route("/api/participant/status", get(status))
        .route("/api/participant/command", post(new_command))
        .route("/api/participant/release", post(release))
}

/// Where the participant's desktop stands, as their page shows it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct StatusView {
    /// The VM.
    pub hostname: String,
    /// `crd` or `browser`.
    pub mode: &'static str,
    /// `assigned`, `received`, `ready` or `failed`.
    pub stage: &'static str,
    /// 1, then one more for each fresh command.
    pub attempt: u32,
    /// Why it failed (`stage` is `failed`): `code_rejected`, `invalid_command`,
    /// `host_failed`, `timed_out` or `desktop_unavailable`.
    pub failure: Option<&'static str>,
    /// What the page says, in words a participant understands.
    pub message: String,
    /// Whether the page should ask for a fresh command.
    pub needs_command: bool,
    /// Where the desktop opens: Chrome Remote Desktop once ready; the browser desktop
    /// (`/desktop`) as soon as the VM has the session, since its first frame there is what
    /// makes it ready.
    pub link: Option<&'static str>,
}

/// A fresh command (the body of `POST /api/participant/command`).
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandBody {
    /// The Debian Linux command from Chrome Remote Desktop's "Set up via SSH".
    pub crd_command: String,
}

/// Chrome Remote Desktop's list of the participant's machines.
const CRD_ACCESS: &str = "https://remotedesktop.google.com/access";

impl StatusView {
    fn of(hostname: &Hostname, a: &Assignment) -> Self {
        let browser = a.crd_command.is_none();
        let d = &a.desktop;
        let message = match (d.stage, d.failure) {
            (DesktopStage::Assigned, _) => {
                "Your VM is assigned; waiting for it to pick up your session…".to_owned()
            }
            (DesktopStage::Received, _) if browser => {
                "Your VM has your session: open your desktop.".into()
            }
            (DesktopStage::Received, _) => {
                "Your VM got your command and is starting Chrome Remote Desktop…".into()
            }
            (DesktopStage::Ready, _) if browser => "Your desktop is ready.".into(),
            (DesktopStage::Ready, _) => format!(
                "Your desktop is ready: open Chrome Remote Desktop, choose {hostname} and connect with your PIN."
            ),
            (DesktopStage::Failed, failure) => failure.unwrap_or_default().message().to_owned(),
        };
        Self {
            hostname: hostname.to_string(),
            mode: if browser { "browser" } else { "crd" },
            stage: d.stage.as_str(),
            attempt: d.attempt,
            failure: d.failure.map(DesktopFailure::as_str),
            message,
            needs_command: !browser && d.stage == DesktopStage::Failed,
            link: match (d.stage, browser) {
                (DesktopStage::Ready, false) => Some(CRD_ACCESS),
                (DesktopStage::Received | DesktopStage::Ready, true) => Some("/desktop"),
                _ => None,
            },
        }
    }
}

/// `GET /vm`: this browser's VM, as the answer to its request showed it.
async fn my_vm(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    let record = match participant_vm(&state, &headers).await {
        Ok(record) => record,
        Err(e) if e.status() == StatusCode::UNAUTHORIZED => {
            return Redirect::to("/").into_response()
        }
        Err(e) => return e.into_response(),
    };
    let Some(a) = record.assignment.as_ref() else {
        return Redirect::to("/").into_response();
    };
    state.inner.templates.page(
        StatusCode::OK,
        "result.html",
        serde_json::json!({
            "title": "Your VM", "message": "This is your VM.", "kind": "success",
            "outcome": "assigned", "hostname": record.hostname, "pin": a.pin.expose(),
            "browser": a.crd_command.is_none(),
        }),
    )
}

/// How long one wait for a change is held before the stream looks again.
const STATUS_POLL: Duration = Duration::from_secs(25);

#[utoipa::path(get, path = "/api/participant/status", tag = "participant",
    responses((status = 200, description = "Server-sent events: `status` (a StatusView as JSON) now and at every change; `released` at the end", body = StatusView, content_type = "text/event-stream"),
        (status = 401, description = "This browser has no VM (no participant cookie, or one for an earlier assignment)", body = ErrorBody)))]
/// `GET /api/participant/status`: the status now, then again at every change; `released`
/// (and the end of the stream) once the VM is no longer this browser's. 401 without a
/// participant cookie for the current assignment.
pub async fn status(
    State(state): State<HttpState>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let record = participant_vm(&state, &headers).await?;
    let hostname = record.hostname.clone();
    let Some(first) = record.assignment else {
        return Err(ApiError::unauthorized(
            "This browser has no VM (or no longer has it).",
        ));
    };
    let seed = Watch {
        state,
        assigned_at: first.assigned_at,
        seen: first.version(),
        pending: Some(first),
        done: false,
    };
    let updates = stream::unfold(seed, move |mut w| {
        let hostname = hostname.clone();
        async move {
            if w.done {
                return None;
            }
            if let Some(a) = w.pending.take() {
                return Some((status_event(&hostname, &a), w));
            }
            let next = tokio::select! {
                next = w.state.allocator().watch_assignment(&hostname, &w.seen, STATUS_POLL) => next,
                () = w.state.shutting_down() => return None,
            };
            match next {
                Ok(Some(a)) if a.assigned_at == w.assigned_at => {
                    let version = a.version();
                    if version == w.seen {
                        // Nothing new within the hold: a comment keeps the stream going.
                        return Some((Ok(Event::default().comment("")), w));
                    }
                    w.seen = version;
                    Some((status_event(&hostname, &a), w))
                }
                // Released, or another assignment: this browser's session is over.
                Ok(_) => {
                    w.done = true;
                    let event = Event::default()
                        .event("released")
                        .data("Your VM was released.");
                    Some((Ok(event), w))
                }
                Err(e) => {
                    tracing::warn!(hostname = %hostname, error = e.message(), "participant status stream ended");
                    None
                }
            }
        }
    });
    Ok(Sse::new(updates).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// What a status stream has sent so far.
struct Watch {
    state: HttpState,
    /// The assignment the stream is about.
    assigned_at: chrono::DateTime<chrono::Utc>,
    /// The version of it last sent.
    seen: String,
    /// The first event, still to send.
    pending: Option<Assignment>,
    /// `released` was sent.
    done: bool,
}

fn status_event(hostname: &Hostname, a: &Assignment) -> Result<Event, Infallible> {
    let view = StatusView::of(hostname, a);
    Ok(Event::default()
        .event("status")
        .data(serde_json::to_string(&view).unwrap_or_default()))
}

#[utoipa::path(post, path = "/api/participant/command", tag = "participant",
    request_body(content = CommandBody, description = "Form or JSON"),
    responses((status = 200, body = StatusView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "The last attempt is under way, or the desktop runs", body = ErrorBody)))]
/// `POST /api/participant/command` (`crd_command`, form or JSON): the participant's fresh
/// command after a failed start. 400 for a command that is not one, 409 while the last one
/// is still being tried or once the desktop runs; the new status otherwise.
pub async fn new_command(
    State(state): State<HttpState>,
    headers: HeaderMap,
    form: FormOrJson,
) -> ApiResult<Json<StatusView>> {
    let record = participant_vm(&state, &headers).await?;
    let command = form
        .text("crd_command")
        .ok_or_else(|| ApiError::bad_request("Please paste the new Chrome Remote Desktop command."))
        .and_then(super::public::crd_command)?;
    let change = DesktopChange::NewCommand(command);
    let record = state
        .allocator()
        .change_desktop(&record.hostname, &change)
        .await?;
    let a = record
        .assignment
        .as_ref()
        .ok_or_else(|| ApiError::unauthorized("This browser has no VM (or no longer has it)."))?;
    tracing::info!(hostname = %record.hostname, attempt = a.desktop.attempt, "participant gave a fresh command");
    Ok(Json(StatusView::of(&record.hostname, a)))
}

#[utoipa::path(post, path = "/api/participant/release", tag = "participant",
    responses((status = 200, description = "`{\"released\": <hostname>, \"message\"}`"), (status = 401, body = ErrorBody),
        (status = 409, description = "The participant's work could not be collected; the VM stays assigned", body = ErrorBody)))]
/// `POST /api/participant/release`: the participant is done with their VM.
pub async fn release(
    State(state): State<HttpState>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    let record = participant_vm(&state, &headers).await?;
    state.allocator().release(&record.hostname).await?;
    tracing::info!(hostname = %record.hostname, "participant released their VM");
    Ok(Json(serde_json::json!({
        "released": record.hostname,
        "message": "Your VM was released. Thank you!",
    })))
}
