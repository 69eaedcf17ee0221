//! Warnings to participants over HTTP (see [`lablink_core::warning`]): the participant's page
//! polls `GET /api/participant/warnings` (authenticated by the participant cookie) and shows
//! a banner; the VM's agent finds them in its task poll ([`for_agent`]) and acknowledges each
//! one it showed (`POST /api/v1/vms/{hostname}/warnings/{id}/ack`). No answer holds a
//! token, a Chrome Remote Desktop code or a PIN.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use lablink_core::{Allocator as _, Hostname, WarningKind};
use lablink_protocol::{ErrorBody, WarningTask};
use serde::Serialize;
use utoipa::ToSchema;

use super::agent_auth::Agent;
use super::error::{ApiError, ApiResult};
use super::extract::PathText;
use super::public::participant_vm;
use super::HttpState;

/// The warning routes.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/participant/warnings", get(participant_warnings))
        .route(
            "/api/v1/vms/{hostname}/warnings/{id}/ack",
            post(acknowledge),
        )
}

/// One warning, as the participant's page shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct BannerView {
    /// What will happen.
    pub kind: WarningKind,
    /// When.
    pub at: DateTime<Utc>,
    /// Seconds from now (0 once due).
    pub seconds_left: i64,
    /// What the banner says: `Your VM will be destroyed at 17:00 UTC, in 14 minutes — save
    /// your work.`
    pub message: String,
}

/// The warnings of the browser's VM.
#[derive(Debug, Serialize, ToSchema)]
pub struct BannersView {
    /// The VM.
    pub hostname: String,
    /// Soonest first; empty when none is due.
    pub warnings: Vec<BannerView>,
}

/// The warnings for the participant whose browser this is (its participant cookie, signed
/// for the VM's current assignment), soonest first.
#[utoipa::path(get, path = "/api/participant/warnings", tag = "participant",
    responses((status = 200, body = BannersView),
        (status = 401, description = "This browser has no VM (no participant cookie, or one for an earlier assignment)", body = ErrorBody)))]
pub async fn participant_warnings(
    State(state): State<HttpState>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    let vm = participant_vm(&state, &headers).await?;
    let owner = vm.owner();
    let now = Utc::now();
    let warnings = state
        .allocator()
        .vm_warnings(&vm.hostname)
        .await?
        .into_iter()
        .filter(|w| Some(&w.email) == owner)
        .map(|w| BannerView {
            kind: w.kind,
            at: w.due_at,
            seconds_left: (w.due_at - now).num_seconds().max(0),
            message: w.banner(now),
        })
        .collect();
    let view = BannersView {
        hostname: vm.hostname.to_string(),
        warnings,
    };
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(view)))
}

/// The warnings `hostname`'s agent has not shown yet, for its task poll.
pub async fn for_agent(state: &HttpState, hostname: &Hostname) -> ApiResult<Vec<WarningTask>> {
    let warnings = state.allocator().vm_warnings(hostname).await?;
    Ok(warnings
        .into_iter()
        .filter(|w| w.acknowledged_at.is_none())
        .map(|w| WarningTask {
            id: w.id.to_string(),
            kind: w.kind.as_str().to_owned(),
            at: w.due_at,
            title: w.title().to_owned(),
            message: w.message,
        })
        .collect())
}

/// The agent showed the warning (or could not, and said so in its log): it is not sent
/// again, by any replica.
#[utoipa::path(post, path = "/api/v1/vms/{hostname}/warnings/{id}/ack", tag = "agent",
    params(("hostname" = String, Path, description = "The VM"), ("id" = String, Path, description = "The warning")),
    responses((status = 204, description = "Acknowledged (again: no change)"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, description = "The VM has no such warning (it may have been withdrawn)", body = ErrorBody)),
    security(("agent_token" = [])))]
pub async fn acknowledge(
    State(state): State<HttpState>,
    agent: Agent,
    PathText((name, id)): PathText<(String, String)>,
) -> ApiResult<StatusCode> {
    let hostname = agent.own(&name)?;
    let id = id
        .parse()
        .map_err(|_| ApiError::not_found("no such warning"))?;
    state.allocator().acknowledge_warning(&hostname, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
