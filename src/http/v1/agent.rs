//! `/api/v1` agent routes: ready, wait for the assignment, heartbeat, batched telemetry. The
//! path hostname must be the one the bearer token belongs to (403 otherwise).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lablink_core::Allocator as _;
use lablink_core::{AgentStatus, GpuHealth, Hostname, LogAppend, LogStream, Telemetry};
use lablink_protocol::{AssignmentBody, HeartbeatBody, ReadyBody, TelemetryBody, WaitQuery};

use super::ErrorBody;
use crate::http::agent_auth::Agent;
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{ApiJson, ApiQuery, PathText};
use crate::http::views::VmView;
use crate::http::HttpState;

/// Default hold of a wait without `timeout`.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

async fn report(
    state: &HttpState,
    hostname: &Hostname,
    telemetry: Telemetry,
) -> ApiResult<Json<VmView>> {
    let record = crate::http::metrics::report(state, hostname, telemetry).await?;
    Ok(Json(VmView::from(&record)))
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
    let hostname = agent.own(&name)?;
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
    let hostname = agent.own(&name)?;
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
    state.metrics().wait_ended(outcome.as_ref());
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
    let hostname = agent.own(&name)?;
    let telemetry = Telemetry {
        heartbeat: Some(body.boot_id),
        ..Default::default()
    };
    report(&state, &hostname, telemetry).await
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
    let hostname = agent.own(&name)?;
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
    let timings = body.timings.map(Into::into);
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
