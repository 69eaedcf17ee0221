//! `/api/v1` agent routes: ready, wait for the assignment, heartbeat, batched telemetry. The
//! path hostname must be the one the bearer token belongs to (403 otherwise).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use lablink_core::Allocator as _;
use lablink_core::{
    AgentStatus, GpuHealth, Hostname, LogAppend, LogStream, StartupTimings, Telemetry,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ErrorBody;
use crate::http::agent_auth::Agent;
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{ApiJson, ApiQuery, PathText};
use crate::http::views::VmView;
use crate::http::HttpState;

/// Default hold of a wait without `timeout`.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// The path hostname, after checking the caller may act for it.
fn own_hostname(agent: &Agent, name: &str) -> ApiResult<Hostname> {
    agent.authorize_text(name)?;
    name.parse()
        .map_err(|_| ApiError::not_found("VM not found."))
}

async fn report(
    state: &HttpState,
    hostname: &Hostname,
    telemetry: Telemetry,
) -> ApiResult<Json<VmView>> {
    let record = state.allocator().report(hostname, telemetry).await?;
    Ok(Json(VmView::from(&record)))
}

/// Body of `ready`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ReadyBody {
    /// The agent's status; default `running` (which makes the VM assignable).
    #[schema(example = "running")]
    pub status: Option<String>,
    /// The boot id, counted as a heartbeat.
    pub boot_id: Option<String>,
}

/// The agent registers itself as up (status `running` unless told otherwise).
#[utoipa::path(post, path = "/api/v1/vms/{hostname}/ready", tag = "agent",
    params(("hostname" = String, Path, description = "The VM")),
    request_body = ReadyBody,
    responses((status = 200, body = VmView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("agent_token" = [])))]
pub async fn ready(
    State(state): State<HttpState>,
    agent: Agent,
    PathText(name): PathText,
    ApiJson(body): ApiJson<ReadyBody>,
) -> ApiResult<Json<VmView>> {
    let hostname = own_hostname(&agent, &name)?;
    let status = match body.status.as_deref() {
        None => AgentStatus::Running,
        Some(s) => s
            .parse()
            .map_err(|e: lablink_core::Error| ApiError::bad_request(e.message().to_owned()))?,
    };
    let telemetry = Telemetry {
        status: Some(status),
        heartbeat: body.boot_id,
        ..Default::default()
    };
    report(&state, &hostname, telemetry).await
}

/// Query of the wait.
#[derive(Debug, Deserialize, IntoParams)]
pub struct WaitQuery {
    /// Longest to hold the request, in seconds (capped by the server's maximum; default 30).
    pub timeout: Option<f64>,
}

/// The VM's assignment, for the agent.
#[derive(Debug, Serialize, ToSchema)]
pub struct AssignmentBody {
    /// The VM.
    pub hostname: String,
    /// The `start-host` command LabLink built from the validated code (never the text the
    /// participant pasted).
    pub command: String,
    /// Its `--code` value, validated (build the `start-host` invocation from this).
    pub code: String,
    /// The PIN, as a string of digits.
    pub pin: String,
    /// When it was assigned.
    pub assigned_at: DateTime<Utc>,
}

/// Long-poll: answers 200 with the assignment as soon as the VM is assigned, 204 when
/// `timeout` passes first.
#[utoipa::path(get, path = "/api/v1/vms/{hostname}/assignment", tag = "agent",
    params(("hostname" = String, Path, description = "The VM"), WaitQuery),
    responses((status = 200, body = AssignmentBody), (status = 204, description = "Not assigned within the timeout; ask again"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("agent_token" = [])))]
pub async fn wait_assignment(
    State(state): State<HttpState>,
    agent: Agent,
    PathText(name): PathText,
    ApiQuery(query): ApiQuery<WaitQuery>,
) -> ApiResult<Response> {
    let hostname = own_hostname(&agent, &name)?;
    let timeout = match query.timeout {
        None => DEFAULT_WAIT,
        Some(t) if t.is_finite() && t >= 0.0 => Duration::from_secs_f64(t.min(86_400.0)),
        Some(_) => {
            return Err(ApiError::bad_request(
                "timeout must be a non-negative number of seconds",
            ))
        }
    }
    .min(state.options().max_wait);
    let _waiter = state.metrics().waiter();
    let outcome = tokio::select! {
        outcome = state.allocator().wait_for_assignment(&hostname, timeout) => outcome?,
        () = state.shutting_down() => None,
    };
    state.metrics().wait_ended(outcome.is_some());
    Ok(match outcome {
        Some(a) => Json(AssignmentBody {
            hostname: hostname.to_string(),
            command: a.crd_command.start_host_command(&hostname),
            code: a.crd_command.code().to_owned(),
            pin: a.pin.expose().to_owned(),
            assigned_at: a.assigned_at,
        })
        .into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// Body of `heartbeat`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct HeartbeatBody {
    /// Changes on every boot of the VM (a change counts as a restart).
    pub boot_id: String,
}

/// A heartbeat carrying the boot id.
#[utoipa::path(post, path = "/api/v1/vms/{hostname}/heartbeat", tag = "agent",
    params(("hostname" = String, Path, description = "The VM")),
    request_body = HeartbeatBody,
    responses((status = 200, body = VmView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("agent_token" = [])))]
pub async fn heartbeat(
    State(state): State<HttpState>,
    agent: Agent,
    PathText(name): PathText,
    ApiJson(body): ApiJson<HeartbeatBody>,
) -> ApiResult<Json<VmView>> {
    let hostname = own_hostname(&agent, &name)?;
    let telemetry = Telemetry {
        heartbeat: Some(body.boot_id),
        ..Default::default()
    };
    report(&state, &hostname, telemetry).await
}

/// Start-up timings reported by the VM.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct TimingsBody {
    /// cloud-init start.
    pub cloud_init_start: Option<DateTime<Utc>>,
    /// cloud-init end.
    pub cloud_init_end: Option<DateTime<Utc>>,
    /// Container start.
    pub container_start: Option<DateTime<Utc>>,
    /// Container ready.
    pub container_end: Option<DateTime<Utc>>,
    /// cloud-init duration measured on the VM.
    pub cloud_init_duration_seconds: Option<f64>,
    /// Container start-up duration measured on the VM.
    pub container_startup_duration_seconds: Option<f64>,
}

/// Lines for one log stream.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LogBody {
    /// `cloud_init`, `container` or `agent`.
    #[schema(example = "container")]
    pub stream: String,
    /// The lines (ANSI escapes are stripped, blank lines dropped).
    pub lines: Vec<String>,
}

/// Everything an agent reports, in one call; every field optional.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct TelemetryBody {
    /// `Healthy`, `Unhealthy` or `N/A`.
    pub gpu_health: Option<String>,
    /// Whether the research software is in use.
    pub in_use: Option<bool>,
    /// `initializing`, `running`, `error`, `rebooting` or `unknown`.
    pub status: Option<String>,
    /// A heartbeat with this boot id.
    pub boot_id: Option<String>,
    /// Start-up timings.
    pub timings: Option<TimingsBody>,
    /// Log lines.
    #[serde(default)]
    pub logs: Vec<LogBody>,
}

fn stream(name: &str) -> ApiResult<LogStream> {
    LogStream::ALL
        .into_iter()
        .find(|s| s.as_str() == name)
        .ok_or_else(|| ApiError::bad_request("log stream must be cloud_init, container or agent"))
}

/// Batched telemetry: health, in-use, status, heartbeat, timings and logs in one call.
#[utoipa::path(post, path = "/api/v1/vms/{hostname}/telemetry", tag = "agent",
    params(("hostname" = String, Path, description = "The VM")),
    request_body = TelemetryBody,
    responses((status = 200, body = VmView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("agent_token" = [])))]
pub async fn telemetry(
    State(state): State<HttpState>,
    agent: Agent,
    PathText(name): PathText,
    ApiJson(body): ApiJson<TelemetryBody>,
) -> ApiResult<Json<VmView>> {
    let hostname = own_hostname(&agent, &name)?;
    let bad = |e: lablink_core::Error| ApiError::bad_request(e.message().to_owned());
    let gpu_health: Option<GpuHealth> = body
        .gpu_health
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(bad)?;
    let status: Option<AgentStatus> = body
        .status
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(bad)?;
    let logs = body
        .logs
        .into_iter()
        .map(|l| {
            Ok(LogAppend {
                stream: stream(&l.stream)?,
                lines: l.lines,
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let timings = body.timings.map(|t| StartupTimings {
        cloud_init_start: t.cloud_init_start,
        cloud_init_end: t.cloud_init_end,
        container_start: t.container_start,
        container_end: t.container_end,
        cloud_init_duration_seconds: t.cloud_init_duration_seconds,
        container_startup_duration_seconds: t.container_startup_duration_seconds,
        ..Default::default()
    });
    let telemetry = Telemetry {
        gpu_health,
        in_use: body.in_use,
        status,
        heartbeat: body.boot_id,
        timings,
        logs,
        ..Default::default()
    };
    report(&state, &hostname, telemetry).await
}
