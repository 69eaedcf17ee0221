//! `/api/v1` agent routes: ready, wait for the assignment, heartbeat, batched telemetry. The
//! path hostname must be the one the bearer token belongs to (403 otherwise).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lablink_core::Allocator as _;
use lablink_core::{
    AgentStatus, Assignment, DesktopChange, DesktopReport, DesktopStage, GpuHealth, Hostname,
    LogAppend, LogStream, Telemetry,
};
use lablink_protocol::{
    AssignmentBody, DesktopReportBody, HeartbeatBody, ReadyBody, TelemetryBody, TunnelBody,
    WaitQuery,
};

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
    let allocator = state.allocator();
    let outcome = tokio::select! {
        outcome = async {
            match &query.seen {
                Some(seen) => allocator.watch_assignment(&hostname, seen, timeout).await,
                None => allocator.wait_for_assignment(&hostname, timeout).await,
            }
        } => outcome?,
        () = state.shutting_down() => None,
    };
    state.metrics().wait_ended(outcome.as_ref());
    Ok(match outcome {
        Some(a) => Json(assignment_body(&hostname, &a)).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// What the agent gets of an assignment.
fn assignment_body(hostname: &Hostname, a: &Assignment) -> AssignmentBody {
    let command = a.crd_command.as_ref();
    AssignmentBody {
        hostname: hostname.to_string(),
        command: command.map_or_else(String::new, |c| c.start_host_command(hostname)),
        code: command.map_or_else(String::new, |c| c.code().to_owned()),
        pin: a.pin.expose().to_owned(),
        assigned_at: a.assigned_at,
        mode: if command.is_some() { "crd" } else { "browser" }.to_owned(),
        attempt: a.desktop.attempt,
        version: a.version(),
        tunnel: a.desktop.tunnel.as_ref().map(|t| TunnelBody {
            id: t.id.to_string(),
            url: t.url.clone(),
        }),
    }
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
    let desktop = body.desktop.map(desktop_report).transpose()?;
    let telemetry = Telemetry {
        gpu_health,
        in_use: body.in_use,
        status,
        heartbeat: body.boot_id,
        timings,
        logs,
        ..Default::default()
    };
    let view = report(&state, &hostname, telemetry).await?;
    match desktop {
        None => Ok(view),
        Some(report) => {
            let change = DesktopChange::Report(report);
            match state.allocator().change_desktop(&hostname, &change).await {
                Ok(record) => Ok(Json(VmView::from(&record))),
                // The assignment ended meanwhile: nothing to report on.
                Err(e) if e.is_not_found() => Ok(view),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// A desktop report as the agent sent it, checked (400 naming what is wrong).
fn desktop_report(body: DesktopReportBody) -> ApiResult<DesktopReport> {
    let bad = |e: lablink_core::Error| ApiError::bad_request(format!("desktop: {}", e.message()));
    let stage: DesktopStage = body.stage.parse().map_err(bad)?;
    if stage == DesktopStage::Assigned {
        return Err(ApiError::bad_request(
            "desktop.stage must be received, ready or failed",
        ));
    }
    Ok(DesktopReport {
        attempt: body.attempt,
        stage,
        failure: body
            .failure
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(bad)?,
        exit_status: body.exit_status,
    })
}
