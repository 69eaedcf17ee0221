//! Collections over HTTP (see [`crate::collect`]): the agent's task long-poll and upload,
//! the admin's start/progress/download routes, `GET /api/scp-client` (the Python LabLink's
//! download route, same zip), and the answer to a destroy with collect-first.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use lablink_core::{Allocator as _, AuditAction, Hostname, Operation, VmFilter, VmRecord, VmState};
use lablink_protocol::{TasksBody, WaitQuery};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::admin_auth::{Admin, AdminForm};
use super::agent_auth::Agent;
use super::error::{status_for, ApiError, ApiResult};
use super::extract::{ApiQuery, PathHostname, PathText};
use super::views::OperationView;
use super::HttpState;
use crate::collect::{may_hold_work, CollectedFile, CollectionStatus, Destroyed, SkippedFile};
use lablink_protocol::ErrorBody;

/// Default hold of a task long-poll without `timeout`.
const DEFAULT_HOLD: Duration = Duration::from_secs(30);

/// Long-poll: answers 200 with the VM's pending collection as soon as there is one, 204 when
/// `timeout` passes first. Warnings the agent has not shown yet (see
/// [`warnings`](super::warnings)) are answered at once, with a collection if one is pending.
#[utoipa::path(get, path = "/api/v1/vms/{hostname}/tasks", tag = "agent",
    params(("hostname" = String, Path, description = "The VM"), WaitQuery),
    responses((status = 200, body = TasksBody), (status = 204, description = "Nothing to do within the timeout; ask again"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("agent_token" = [])))]
pub async fn tasks(
    State(state): State<HttpState>,
    agent: Agent,
    PathText(name): PathText,
    ApiQuery(query): ApiQuery<WaitQuery>,
) -> ApiResult<Response> {
    let hostname = agent.own(&name)?;
    // Warnings unreadable now are sent on a later poll; collections and reboots go on.
    let warnings = super::warnings::for_agent(&state, &hostname)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(hostname = %hostname, error = e.message(), "warnings for the agent could not be read");
            Vec::new()
        });
    let vm = state.allocator().vm(&hostname).await?;
    if vm.reboot_requested() || vm.reset_requested() {
        return Ok(Json(TasksBody {
            reboot: vm.reboot_requested(),
            reset: vm.reset_requested(),
            warnings,
            ..TasksBody::default()
        })
        .into_response());
    }
    let hold = match query.timeout {
        None => DEFAULT_HOLD,
        Some(t) if t.is_finite() && t >= 0.0 => Duration::from_secs_f64(t.min(86_400.0)),
        Some(_) => {
            return Err(ApiError::bad_request(
                "timeout must be a non-negative number of seconds",
            ))
        }
    }
    .min(state.options().max_wait);
    let hold = if warnings.is_empty() {
        hold
    } else {
        Duration::ZERO
    };
    // The end of the assignment ends the hold too: the agent asks again at once and finds
    // the reset waiting.
    let ended = async {
        let Some(a) = &vm.assignment else {
            return std::future::pending().await;
        };
        let mut seen = a.version();
        loop {
            match state
                .allocator()
                .watch_assignment(&hostname, &seen, hold)
                .await
            {
                Ok(Some(now)) if now.assigned_at == a.assigned_at => {
                    if now.version() == seen {
                        // The hold ended; so does the task wait.
                        return std::future::pending().await;
                    }
                    seen = now.version();
                }
                _ => return,
            }
        }
    };
    let task = tokio::select! {
        task = state.collector().wait_task(hostname.as_str(), hold, state.shutting_down()) => task?,
        () = ended => None,
    };
    Ok(match (task, warnings.is_empty()) {
        (None, true) => StatusCode::NO_CONTENT.into_response(),
        (collection, _) => Json(TasksBody {
            collection,
            warnings,
            ..TasksBody::default()
        })
        .into_response(),
    })
}

/// The upload's answer: the collection's status.
#[utoipa::path(put, path = "/api/v1/vms/{hostname}/collections/{id}", tag = "agent",
    params(("hostname" = String, Path, description = "The VM"), ("id" = String, Path, description = "The collection")),
    request_body(content = Vec<u8>, content_type = "application/x-tar", description = "`files/<path>` entries, then `manifest.json` with each file's size and SHA-256"),
    responses((status = 200, body = CollectionStatus), (status = 400, description = "Cut, damaged or mismatching archive; too large", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Not the current collection, already failed, or another upload in progress", body = ErrorBody)),
    security(("agent_token" = [])))]
pub async fn upload(
    State(state): State<HttpState>,
    agent: Agent,
    PathText((name, id)): PathText<(String, String)>,
    request: Request,
) -> ApiResult<Json<CollectionStatus>> {
    let hostname = agent.own(&name)?;
    state.allocator().vm(&hostname).await?;
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::not_found("no such collection"));
    }
    let body = request.into_body().into_data_stream();
    let received = state
        .collector()
        .receive(hostname.as_str(), &id, body)
        .await;
    state.metrics().collection_upload(received.is_ok());
    received
        .map(Json)
        .map_err(|e| ApiError::new(status_for(e.kind), e.message))
}

/// A VM's collections, for admins.
#[derive(Debug, Serialize, ToSchema)]
pub struct CollectionView {
    /// The VM.
    pub hostname: String,
    /// The collection asked for last, with its progress.
    pub current: Option<CollectionStatus>,
    /// The last complete collection (what a download holds).
    pub collected: Option<CollectedView>,
}

/// A stored collection.
#[derive(Debug, Serialize, ToSchema)]
pub struct CollectedView {
    /// Its id.
    pub id: String,
    /// When it was stored.
    pub completed_at: chrono::DateTime<Utc>,
    /// Bytes of files.
    pub bytes: u64,
    /// The files.
    pub files: Vec<CollectedFile>,
    /// Matching files left out, and why.
    pub skipped: Vec<SkippedFile>,
}

async fn live_hostnames(state: &HttpState) -> ApiResult<Vec<VmRecord>> {
    let vms = state.allocator().vms(&VmFilter::default()).await?;
    Ok(vms
        .into_iter()
        .filter(|vm| !matches!(vm.state, VmState::Terminating | VmState::Terminated))
        .collect())
}

/// Every VM's collections.
pub async fn overview(state: &HttpState) -> ApiResult<Vec<CollectionView>> {
    let hostnames: Vec<Hostname> = live_hostnames(state)
        .await?
        .into_iter()
        .map(|vm| vm.hostname)
        .collect();
    let all = state.collector().overview(&hostnames).await?;
    Ok(all
        .into_iter()
        .map(|(hostname, current, manifest)| CollectionView {
            hostname,
            current,
            collected: manifest.map(|m| CollectedView {
                bytes: m.bytes(),
                id: m.id,
                completed_at: m.completed_at,
                files: m.files,
                skipped: m.skipped,
            }),
        })
        .collect())
}

/// Every VM's collections.
#[utoipa::path(get, path = "/api/v1/collections", tag = "admin",
    responses((status = 200, body = [CollectionView]), (status = 401, body = ErrorBody)), security(("admin_basic" = [])))]
pub async fn list(
    State(state): State<HttpState>,
    _admin: Admin,
) -> ApiResult<Json<Vec<CollectionView>>> {
    Ok(Json(overview(&state).await?))
}

/// One VM's collections.
#[utoipa::path(get, path = "/api/v1/collections/{hostname}", tag = "admin",
    params(("hostname" = String, Path, description = "The VM")),
    responses((status = 200, body = CollectionView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn one(
    State(state): State<HttpState>,
    _admin: Admin,
    PathHostname(hostname): PathHostname,
) -> ApiResult<Json<CollectionView>> {
    overview(&state)
        .await?
        .into_iter()
        .find(|v| v.hostname == hostname.as_str())
        .map(Json)
        .ok_or_else(|| ApiError::not_found("no collection of this VM"))
}

/// Body of a collection request: `all: true` or a list of hostnames (the schema of what
/// [`start`] reads).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct CollectBody {
    /// Every live VM.
    #[serde(default)]
    pub all: bool,
    /// These VMs.
    #[serde(default)]
    pub hostnames: Vec<String>,
}

/// Starts collections on the chosen VMs (as form fields or JSON: `all`, or `hostname`).
pub async fn start(
    state: &HttpState,
    form: &super::extract::FormOrJson,
) -> ApiResult<Vec<CollectionStatus>> {
    let all = match form.get("all") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => matches!(s.trim(), "true" | "1" | "yes" | "on"),
        None => false,
        Some(_) => return Err(ApiError::bad_request("all must be true or false")),
    };
    let mut names: Vec<String> = match form.get("hostnames") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::bad_request("hostnames must be a list of strings"))
            })
            .collect::<ApiResult<_>>()?,
        None => Vec::new(),
        Some(_) => return Err(ApiError::bad_request("hostnames must be a list of strings")),
    };
    if let Some(one) = form.text("hostname") {
        names.push(one.to_owned());
    }
    let hostnames: Vec<Hostname> = match (all, names.is_empty()) {
        (true, true) => live_hostnames(state)
            .await?
            .into_iter()
            .filter(may_hold_work)
            .map(|vm| vm.hostname)
            .collect(),
        (false, false) => {
            let mut hostnames = Vec::new();
            for name in names {
                let hostname: Hostname = name.parse().map_err(|e: lablink_core::Error| {
                    ApiError::bad_request(e.message().to_owned())
                })?;
                state.allocator().vm(&hostname).await?;
                hostnames.push(hostname);
            }
            hostnames
        }
        _ => {
            return Err(ApiError::bad_request(
                "give either \"all\": true or a non-empty \"hostnames\" list",
            ))
        }
    };
    Ok(state.collector().request(&hostnames).await?)
}

/// Starts collections: `{"all": true}` or `{"hostnames": [...]}`.
#[utoipa::path(post, path = "/api/v1/collections", tag = "admin", request_body = CollectBody,
    responses((status = 202, body = [CollectionStatus]), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn request(
    State(state): State<HttpState>,
    req: AdminForm,
) -> ApiResult<(StatusCode, Json<Vec<CollectionStatus>>)> {
    let outcome = start(&state, &req.form).await;
    let what = super::audit::What::chosen(&req.form);
    super::audit::record(&state, &req.caller, AuditAction::Collect, what, &outcome).await;
    Ok((StatusCode::ACCEPTED, Json(outcome?)))
}

/// One zip of every VM's last complete collection: a folder per VM and
/// `_collection_report.json` (each VM's state, files and skipped files with the reason).
#[utoipa::path(get, path = "/api/v1/collections.zip", tag = "admin",
    responses((status = 200, description = "lablink_data_<timestamp>.zip", content_type = "application/zip"), (status = 401, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn download(State(state): State<HttpState>, _admin: Admin) -> ApiResult<Response> {
    let hostnames: Vec<Hostname> = live_hostnames(&state)
        .await?
        .into_iter()
        .map(|vm| vm.hostname)
        .collect();
    let file = state.collector().zip(&hostnames).await?;
    let name = format!("lablink_data_{}.zip", Utc::now().format("%Y%m%d_%H%M%S"));
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/zip".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The JSON answer to a destroy with collect-first: 202 with the operation, or 409 naming
/// the VMs kept because their collection failed.
pub fn destroyed_json(
    destroyed: &Destroyed,
    body: impl FnOnce(&Operation) -> Value,
) -> (StatusCode, Value) {
    if destroyed.blocked.is_empty() {
        if let Some(op) = &destroyed.operation {
            return (StatusCode::ACCEPTED, body(op));
        }
    }
    (
        StatusCode::CONFLICT,
        json!({
            "error": destroyed.message(),
            "blocked": destroyed.blocked,
            "operation": destroyed.operation.as_ref().map(OperationView::from),
        }),
    )
}

/// Whether a form asks to `force` (JSON `true` or form text `true`/`1`/`yes`/`on`).
pub fn force_field(form: &super::extract::FormOrJson) -> ApiResult<bool> {
    match form.get("force") {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => Ok(matches!(s.trim(), "true" | "1" | "yes" | "on")),
        Some(_) => Err(ApiError::bad_request("force must be true or false")),
    }
}
