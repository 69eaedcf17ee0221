//! docs/protocol.md, part A: the routes VMs built for the Python client (release 0.1.2) call, with
//! the same paths, fields, JSON types and status codes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use lablink_core::Allocator as _;
use lablink_core::{
    AgentStatus, GpuHealth, Hostname, LogAppend, LogStream, StartupTimings, Telemetry,
};
use serde_json::{json, Value};

use super::agent_auth::{AdminOrAgent, Agent};
use super::error::{ApiError, ApiResult};
use super::extract::{JsonObject, PathText};
use super::HttpState;

/// The compatibility routes that answer at once (`/vm_startup` is routed as a held request).
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/gpu_health", post(gpu_health))
        .route("/api/update_inuse_status", post(update_inuse_status))
        .route(
            "/api/vm-status",
            post(post_vm_status).get(super::compat_admin::all_vm_status),
        )
        .route("/api/vm-status/{hostname}", get(get_vm_status))
        .route("/api/vm-metrics/{hostname}", post(post_vm_metrics))
        .route("/api/vm-logs", post(post_vm_logs))
        .route("/api/vm-logs/{hostname}", get(get_vm_logs))
}

fn message(text: &str) -> Json<Value> {
    Json(json!({ "message": text }))
}

/// Parses a present hostname field (400 when malformed).
fn hostname(text: &str) -> ApiResult<Hostname> {
    text.parse::<Hostname>()
        .map_err(|e| ApiError::bad_request(e.message().to_owned()))
}

/// NotFound from the allocator, in the words the Python client's server used.
fn vm_error(e: lablink_core::Error) -> ApiError {
    if e.is_not_found() {
        ApiError::not_found("VM not found.")
    } else {
        e.into()
    }
}

async fn report(state: &HttpState, hostname: &Hostname, telemetry: Telemetry) -> ApiResult<()> {
    super::metrics::report(state, hostname, telemetry)
        .await
        .map(drop)
        .map_err(vm_error)
}

/// `POST /vm_startup`: the VM's command and PIN once it is assigned; held until then, at
/// most `max_wait`, then 409 "not assigned yet" (the client asks again). Never a 200 without
/// `"status":"success"`.
pub async fn vm_startup(
    State(state): State<HttpState>,
    agent: Agent,
    body: JsonObject,
) -> ApiResult<Response> {
    let name = body
        .non_empty_str("hostname")
        .ok_or_else(|| ApiError::bad_request("Hostname is required."))?;
    let hostname = hostname(name)?;
    agent.authorize(&hostname)?;
    // Held for minutes by thousands of agents: keep nothing the wait does not need.
    drop(body);
    let _waiter = state.metrics().waiter();
    let wait = state
        .allocator()
        .wait_for_assignment(&hostname, state.options().max_wait);
    let outcome = tokio::select! {
        outcome = wait => outcome.map_err(vm_error)?,
        () = state.shutting_down() => None,
    };
    state.metrics().wait_ended(outcome.as_ref());
    match outcome {
        Some(assignment) => Ok(Json(json!({
            "status": "success",
            // A browser desktop has no command (such a VM needs lablink-agent).
            "command": assignment
                .crd_command
                .map_or_else(String::new, |c| c.start_host_command(&hostname)),
            "pin": assignment.pin.expose(),
        }))
        .into_response()),
        None => Ok(ApiError::new(StatusCode::CONFLICT, "not assigned yet").into_response()),
    }
}

async fn gpu_health(
    State(state): State<HttpState>,
    agent: Agent,
    body: JsonObject,
) -> ApiResult<Json<Value>> {
    let (Some(name), Some(status)) = (
        body.non_empty_str("hostname"),
        body.non_empty_str("gpu_status"),
    ) else {
        return Err(ApiError::bad_request(
            "GPU status and hostname are required.",
        ));
    };
    let hostname = hostname(name)?;
    let health: GpuHealth = status
        .parse()
        .map_err(|_| ApiError::bad_request("gpu_status must be Healthy, Unhealthy or N/A"))?;
    agent.authorize(&hostname)?;
    let telemetry = Telemetry {
        gpu_health: Some(health),
        ..Default::default()
    };
    report(&state, &hostname, telemetry).await?;
    Ok(message("GPU health status updated successfully."))
}

async fn update_inuse_status(
    State(state): State<HttpState>,
    agent: Agent,
    body: JsonObject,
) -> ApiResult<Json<Value>> {
    let name = body
        .non_empty_str("hostname")
        .ok_or_else(|| ApiError::bad_request("Hostname is required."))?;
    let hostname = hostname(name)?;
    let Some(Value::Bool(in_use)) = body.get("status") else {
        return Err(ApiError::bad_request("status must be a boolean"));
    };
    agent.authorize(&hostname)?;
    let telemetry = Telemetry {
        in_use: Some(*in_use),
        ..Default::default()
    };
    report(&state, &hostname, telemetry).await?;
    Ok(message("In-use status updated successfully."))
}

async fn post_vm_status(
    State(state): State<HttpState>,
    agent: Agent,
    body: JsonObject,
) -> ApiResult<Json<Value>> {
    let (Some(name), Some(status)) = (body.non_empty_str("hostname"), body.non_empty_str("status"))
    else {
        return Err(ApiError::bad_request("Hostname and status are required."));
    };
    let hostname = hostname(name)?;
    let status: AgentStatus = status.parse().map_err(|_| {
        ApiError::bad_request(
            "status must be one of: initializing, running, error, rebooting, unknown",
        )
    })?;
    agent.authorize(&hostname)?;
    let telemetry = Telemetry {
        status: Some(status),
        ..Default::default()
    };
    report(&state, &hostname, telemetry).await?;
    Ok(message("VM status updated successfully."))
}

async fn get_vm_status(
    State(state): State<HttpState>,
    caller: AdminOrAgent,
    PathText(name): PathText,
) -> ApiResult<Json<Value>> {
    let hostname = caller.own(&name)?;
    let record = state.allocator().vm(&hostname).await.map_err(vm_error)?;
    Ok(Json(json!({
        "hostname": record.hostname,
        "status": super::views::status_text(&record),
    })))
}

/// A Unix-seconds field (number, or numeric string) as a time; 400 when malformed.
fn unix_time(body: &JsonObject, key: &str) -> ApiResult<Option<DateTime<Utc>>> {
    let Some(secs) = seconds(body, key)? else {
        return Ok(None);
    };
    let whole = secs.floor();
    let nanos = (((secs - whole) * 1e9) as u32).min(999_999_999);
    if !(0.0..=1e11).contains(&whole) {
        return Err(ApiError::bad_request(format!("{key} is out of range")));
    }
    DateTime::from_timestamp(whole as i64, nanos)
        .map(Some)
        .ok_or_else(|| ApiError::bad_request(format!("{key} is out of range")))
}

fn seconds(body: &JsonObject, key: &str) -> ApiResult<Option<f64>> {
    let value = match body.get(key) {
        None => return Ok(None),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match value {
        Some(v) if v.is_finite() && v >= 0.0 => Ok(Some(v)),
        _ => Err(ApiError::bad_request(format!(
            "{key} must be a non-negative number of seconds"
        ))),
    }
}

async fn post_vm_metrics(
    State(state): State<HttpState>,
    agent: Agent,
    PathText(name): PathText,
    body: JsonObject,
) -> ApiResult<Json<Value>> {
    let hostname = agent.own(&name)?;
    let timings = StartupTimings {
        cloud_init_start: unix_time(&body, "cloud_init_start")?,
        cloud_init_end: unix_time(&body, "cloud_init_end")?,
        container_start: unix_time(&body, "container_start")?,
        container_end: unix_time(&body, "container_end")?,
        cloud_init_duration_seconds: seconds(&body, "cloud_init_duration_seconds")?,
        container_startup_duration_seconds: seconds(&body, "container_startup_duration_seconds")?,
        ..Default::default()
    };
    // This route carries nothing but timings: an implausible one is refused, not dropped.
    timings
        .check_reported(chrono::Utc::now())
        .map_err(ApiError::from)?;
    let telemetry = Telemetry {
        timings: Some(timings),
        ..Default::default()
    };
    report(&state, &hostname, telemetry).await?;
    Ok(message("VM metrics posted successfully."))
}

async fn post_vm_logs(
    State(state): State<HttpState>,
    agent: Agent,
    body: JsonObject,
) -> ApiResult<Json<Value>> {
    const REQUIRED: &str = "log_group, log_stream and messages are required.";
    let (Some(group), Some(stream)) = (
        body.non_empty_str("log_group"),
        body.non_empty_str("log_stream"),
    ) else {
        return Err(ApiError::bad_request(REQUIRED));
    };
    let Some(Value::Array(messages)) = body.get("messages") else {
        return Err(ApiError::bad_request(REQUIRED));
    };
    if messages.is_empty() {
        return Err(ApiError::bad_request(REQUIRED));
    }
    let lines = messages
        .iter()
        .map(|m| m.as_str().map(str::to_owned))
        .collect::<Option<Vec<String>>>()
        .ok_or_else(|| ApiError::bad_request("messages must be a list of strings"))?;
    let hostname = agent.own(stream)?;
    let telemetry = Telemetry {
        logs: vec![LogAppend {
            stream: LogStream::from_log_group(group),
            lines,
        }],
        ..Default::default()
    };
    report(&state, &hostname, telemetry).await?;
    Ok(message("VM logs posted successfully."))
}

async fn get_vm_logs(
    State(state): State<HttpState>,
    caller: AdminOrAgent,
    PathText(name): PathText,
) -> ApiResult<Json<Value>> {
    let hostname = caller.own(&name)?;
    let logs = state.allocator().logs(&hostname).await.map_err(vm_error)?;
    let all = [logs.cloud_init.as_str(), logs.container.as_str()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Json(json!({
        "hostname": hostname,
        "cloud_init_logs": logs.cloud_init,
        "docker_logs": logs.container,
        "logs": all,
    })))
}
