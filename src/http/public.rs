//! The participant side: the page at `/`, `POST /api/request_vm` and the free-VM count.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lablink_core::{CrdCommand, Email, ErrorKind, Granted, VmRequest};
use serde_json::json;

use super::error::ApiError;
use super::extract::{wants_json, FormOrJson};
use super::metrics::ClaimOutcome;
use super::HttpState;

/// The participant routes.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/", get(index))
        .route("/api/request_vm", post(request_vm))
        .route("/api/unassigned_vms_count", get(unassigned_count))
}

async fn index(State(state): State<HttpState>) -> Response {
    let free = state
        .allocator()
        .counts()
        .await
        .map(|c| c.assignable)
        .unwrap_or(0);
    state
        .inner
        .templates
        .page(StatusCode::OK, "index.html", json!({ "free": free }))
}

async fn unassigned_count(
    State(state): State<HttpState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let counts = state.allocator().counts().await?;
    Ok(Json(json!({ "count": counts.assignable })))
}

/// A participant request, checked: 400 with a message saying what is wrong.
pub fn parse_request(form: &FormOrJson) -> Result<VmRequest, ApiError> {
    let (Some(email), Some(command)) = (form.text("email"), form.text("crd_command")) else {
        return Err(ApiError::bad_request(
            "Please give both your email and the Chrome Remote Desktop command.",
        ));
    };
    let email: Email = email.parse().map_err(|e: lablink_core::Error| {
        ApiError::bad_request(format!("Invalid email: {}", e.message()))
    })?;
    let crd_command: CrdCommand = command.parse().map_err(|e: lablink_core::Error| {
        ApiError::bad_request(format!(
            "Invalid Chrome Remote Desktop command: {}. Copy the whole Debian Linux command, including --code.",
            e.message()
        ))
    })?;
    Ok(VmRequest { email, crd_command })
}

/// Asks the allocator for a VM, counting the outcome.
pub async fn claim(state: &HttpState, request: &VmRequest) -> Result<Granted, ApiError> {
    match state.allocator().request_vm(request).await {
        Ok(granted) => {
            state.metrics().claim(if granted.newly_assigned {
                ClaimOutcome::Assigned
            } else {
                ClaimOutcome::Rejoined
            });
            Ok(granted)
        }
        Err(e) if e.kind() == ErrorKind::NoCapacity => {
            state.metrics().claim(ClaimOutcome::NoCapacity);
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "No VM is free right now. Please try again in a few minutes or ask the organisers.",
            ))
        }
        Err(e) => {
            state.metrics().claim(ClaimOutcome::Rejected);
            Err(e.into())
        }
    }
}

async fn request_vm(
    State(state): State<HttpState>,
    headers: HeaderMap,
    form: FormOrJson,
) -> Response {
    let json = wants_json(&headers);
    let outcome = match parse_request(&form) {
        Ok(request) => claim(&state, &request).await,
        Err(e) => {
            state.metrics().claim(ClaimOutcome::Rejected);
            Err(e)
        }
    };
    let templates = &state.inner.templates;
    match (outcome, json) {
        (Ok(granted), true) => Json(json!({
            "hostname": granted.hostname,
            "pin": granted.pin.expose(),
        }))
        .into_response(),
        (Ok(granted), false) => {
            let (title, message, outcome) = if granted.newly_assigned {
                (
                    "Your VM is ready",
                    "You got a VM. It is connecting to Chrome Remote Desktop now.",
                    "assigned",
                )
            } else {
                (
                    "You already have a VM",
                    "This email already has a VM; here it is again.",
                    "already_assigned",
                )
            };
            templates.page(
                StatusCode::OK,
                "result.html",
                json!({
                    "title": title, "message": message, "kind": "success", "outcome": outcome,
                    "hostname": granted.hostname, "pin": granted.pin.expose(),
                }),
            )
        }
        (Err(e), true) => e.into_response(),
        (Err(e), false) => {
            let (title, outcome) = match e.status() {
                StatusCode::SERVICE_UNAVAILABLE => ("No VM free", "no_vm"),
                StatusCode::BAD_REQUEST => ("Please check your input", "invalid"),
                _ => ("Something went wrong", "error"),
            };
            templates.page(
                e.status(),
                "result.html",
                json!({ "title": title, "message": e.message(), "kind": "error", "outcome": outcome }),
            )
        }
    }
}
