//! Operational plumbing: `/healthz`, the request timeout, the per-request tracing span and
//! the panic guard.

use std::any::Any;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::HttpState;

/// `GET /healthz`: 200 when the store answers, 503 otherwise.
pub async fn healthz(State(state): State<HttpState>) -> Response {
    match state.allocator().counts().await {
        Ok(counts) => Json(json!({
            "status": "ok",
            "vms": counts.total,
            "assignable": counts.assignable,
            "waiters": state.metrics().waiters(),
        }))
        .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "error": "the store does not answer"})),
            )
                .into_response()
        }
    }
}

/// Bounds an ordinary request by `request_timeout` (held requests are routed around this).
pub async fn timeout(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(state.options().request_timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!("request timed out");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the request took too long; try again",
            )
            .into_response()
        }
    }
}

/// The span of one request: method, route path and the request id (never headers or body,
/// which may carry tokens and CRD commands).
pub fn make_span(req: &Request<Body>) -> tracing::Span {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = %request_id,
    )
}

/// Turns a panic in a handler into a JSON 500 (the server stays up).
pub fn panic_response(_panic: Box<dyn Any + Send + 'static>) -> Response {
    tracing::error!("a handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; the server log has the details",
    )
    .into_response()
}
