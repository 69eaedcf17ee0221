//! docs/protocol.md, part A admin routes: launch, destroy, reboot and the status map. Each answers
//! JSON to `Accept: application/json` and otherwise sends the browser back to the admin page.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::post;
use axum::{Json, Router};
use lablink_core::Allocator as _;
use lablink_core::{AuditAction, DestroyTarget, Hostname, LaunchOptions, Operation, VmFilter};
use serde_json::{json, Value};

use super::admin_auth::{Admin, AdminForm};
use super::audit::{self, Answered, What};
use super::error::{ApiError, ApiResult};
use super::views::{status_text, OperationView};
use super::HttpState;

/// The admin compatibility routes (`GET /api/vm-status` is routed with its POST sibling).
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/launch", post(launch))
        .route("/api/reboot-vm", post(reboot))
}

/// The answer to an admin write: JSON for scripts, the admin page (or an error page) for
/// browsers.
pub fn answer(
    state: &HttpState,
    wants_json: bool,
    outcome: ApiResult<(StatusCode, Value)>,
) -> Response {
    match (outcome, wants_json) {
        (Ok((status, body)), true) => (status, Json(body)).into_response(),
        (Ok(_), false) => Redirect::to("/admin").into_response(),
        (Err(e), true) => e.into_response(),
        (Err(e), false) => state.inner.templates.page(
            e.status(),
            "message.html",
            json!({ "title": "Could not do that", "message": e.message(), "kind": "error" }),
        ),
    }
}

/// The JSON of a started operation (`job_id` as the Python allocator answered).
pub fn started(op: &Operation) -> (StatusCode, Value) {
    (
        StatusCode::ACCEPTED,
        json!({
            "job_id": op.id,
            "status": op.status.as_str(),
            "operation": OperationView::from(op),
        }),
    )
}

/// `num_vms` as a count > 0 (form text or JSON number/text).
pub fn parse_count(value: Option<&Value>) -> ApiResult<usize> {
    let count = match value {
        Some(Value::Number(n)) => n.as_u64().and_then(|n| usize::try_from(n).ok()),
        Some(Value::String(s)) => s.trim().parse::<usize>().ok(),
        _ => None,
    };
    match count {
        Some(n) if n > 0 => Ok(n),
        _ => Err(ApiError::bad_request(
            "num_vms must be a whole number greater than 0",
        )),
    }
}

/// A hostname field of an admin form (400 when missing or malformed).
pub fn form_hostname(value: Option<&Value>) -> ApiResult<Hostname> {
    match value {
        Some(Value::String(s)) if !s.trim().is_empty() => s
            .trim()
            .parse()
            .map_err(|e: lablink_core::Error| ApiError::bad_request(e.message().to_owned())),
        _ => Err(ApiError::bad_request("hostname is required")),
    }
}

pub async fn launch(State(state): State<HttpState>, req: AdminForm) -> Response {
    let outcome = async {
        let count = parse_count(req.form.get("num_vms"))?;
        let op = state.allocator().launch(&LaunchOptions { count }).await?;
        Ok(started(&op))
    }
    .await;
    let what = What::launch(parse_count(req.form.get("num_vms")).ok());
    audit::record(&state, &req.caller, AuditAction::Launch, what, &outcome).await;
    answer(&state, req.wants_json, outcome)
}

/// `POST /destroy`: destroys every VM (collecting first when configured; `force` destroys
/// at once, without collecting).
pub async fn destroy_all(State(state): State<HttpState>, req: AdminForm) -> Response {
    let outcome = async {
        let force = super::collect::force_field(&req.form)?;
        let destroyed = state
            .allocator()
            .destroy_collecting(&DestroyTarget::All, force)
            .await?;
        destroyed_answer(&destroyed, req.wants_json)
    }
    .await;
    let (what, answered) = (What::vm_or_all(None), Answered(&outcome));
    audit::record(&state, &req.caller, AuditAction::Destroy, what, &answered).await;
    answer(&state, req.wants_json, outcome)
}

/// The answer to a destroy: the started operation, or (VMs blocked by failed collections)
/// 409 naming them: as JSON for scripts, as an error page for browsers.
pub fn destroyed_answer(
    destroyed: &crate::collect::Destroyed,
    wants_json: bool,
) -> ApiResult<(StatusCode, Value)> {
    let (status, body) = super::collect::destroyed_json(destroyed, |op| started(op).1);
    if status == StatusCode::CONFLICT && !wants_json {
        return Err(ApiError::new(StatusCode::CONFLICT, destroyed.message()));
    }
    Ok((status, body))
}

async fn reboot(State(state): State<HttpState>, req: AdminForm) -> Response {
    let outcome = async {
        let hostname = form_hostname(req.form.get("hostname"))?;
        let op = state.allocator().reboot(&hostname).await.map_err(|e| {
            if e.is_not_found() {
                ApiError::not_found("VM not found.")
            } else {
                e.into()
            }
        })?;
        let (_, body) = started(&op);
        Ok((StatusCode::OK, body))
    }
    .await;
    let what = What::vm(req.form.text("hostname"));
    audit::record(&state, &req.caller, AuditAction::Reboot, what, &outcome).await;
    answer(&state, req.wants_json, outcome)
}

/// `GET /api/vm-status`: `{"<hostname>": "<status>", ...}`.
pub async fn all_vm_status(
    State(state): State<HttpState>,
    _admin: Admin,
) -> ApiResult<Json<BTreeMap<String, String>>> {
    let vms = state.allocator().vms(&VmFilter::default()).await?;
    Ok(Json(
        vms.iter()
            .map(|r| (r.hostname.to_string(), status_text(r).to_owned()))
            .collect(),
    ))
}
