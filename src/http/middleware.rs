//! Operational plumbing: `/healthz`, the request timeout, the body-read timeout of held
//! routes, the limits on a request's head, the headers every answer carries, request ids,
//! the per-request tracing span and the panic guard.

use std::any::Any;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::HttpState;
use lablink_core::Allocator as _;

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

/// Reads the whole body of a held request (whose answer may take minutes) within
/// `body_read_timeout` and the body limit before the handler runs: 408 when it does not
/// arrive in time. Held routes are not bounded by the request timeout, and a client
/// trickling its body would otherwise keep its connection as long as it likes.
pub async fn read_body_in_time(
    State(state): State<HttpState>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let options = state.options();
    let read = axum::body::to_bytes(body, options.max_body_bytes);
    match tokio::time::timeout(options.body_read_timeout, read).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is too large or was cut off",
        )
        .into_response(),
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
        )
        .into_response(),
    }
}

/// Longest request target (path and query) accepted.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Most header fields in one request.
pub const MAX_HEADERS: usize = 100;
/// Most bytes of header names and values in one request.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Refuses an over-long request target (414) or too many or too large headers (431) with
/// the JSON error body every other answer has. (Heads beyond what the HTTP parser itself
/// accepts, see `serve`, never reach the router and get its empty answer.)
pub async fn limit_head(req: Request, next: Next) -> Response {
    let uri_bytes = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_bytes > MAX_URI_BYTES {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            format!("the request target is longer than {MAX_URI_BYTES} bytes"),
        )
        .into_response();
    }
    let headers = req.headers();
    let header_bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if headers.len() > MAX_HEADERS || header_bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request has more than {MAX_HEADERS} headers or {MAX_HEADER_BYTES} bytes of them"
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// Headers every answer carries unless it set its own: nothing is cached (pages show PINs),
/// nothing is framed by another site, content types are not guessed, no referrer leaves.
pub async fn security_headers(req: Request, next: Next) -> Response {
    const HEADERS: [(HeaderName, &str); 5] = [
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    for (name, value) in HEADERS {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    response
}

/// Keeps a client's `X-Request-Id` only when it is a UUID in its usual form; anything else
/// is dropped so that a fresh one is made, and a client cannot write text into the log.
pub async fn check_request_id(mut req: Request, next: Next) -> Response {
    let acceptable = |v: &HeaderValue| {
        v.to_str()
            .is_ok_and(|s| s.len() == 36 && uuid::Uuid::try_parse(s).is_ok())
    };
    if req
        .headers()
        .get("x-request-id")
        .is_some_and(|v| !acceptable(v))
    {
        req.headers_mut().remove("x-request-id");
    }
    next.run(req).await
}
