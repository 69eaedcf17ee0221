//! [`ApiError`]: every error the HTTP layer answers, as `{"error": "<human message>"}` with a
//! status code chosen in one place ([`status_for`]).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lablink_core::{Error, ErrorKind};

/// The HTTP status for a LabLink error kind. This is the only place that decides it.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict | ErrorKind::InvalidTransition => StatusCode::CONFLICT,
        ErrorKind::NoCapacity | ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error answer: a status and a human message safe to show (never a secret, never the
/// internals of a 500).
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: Option<std::time::Duration>,
}

/// `Result` whose error answers as JSON.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    /// An answer with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 429 with `message`, telling the client (`Retry-After`) when to try again.
    pub fn too_many_requests(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, message)
        }
    }

    /// 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 401 with `message`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 403 with `message`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    /// 404 with `message`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// `response` (an answer rendered for this error, e.g. an HTML page) with this error's
    /// `Retry-After` header, if it has one (whole seconds, rounded up, at least 1).
    pub fn retry_after(&self, mut response: Response) -> Response {
        if let Some(wait) = self.retry_after {
            let seconds = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = status_for(e.kind());
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            // The details go to the log (core errors never carry secrets), not to the caller.
            tracing::error!(error = %e, kind = %e.kind(), "request failed");
            let message = match e.kind() {
                ErrorKind::Timeout => "the operation timed out; try again",
                _ => "internal error; the server log has the details",
            };
            return Self::new(status, message);
        }
        if status.is_server_error() {
            tracing::warn!(error = %e, kind = %e.kind(), "request could not be served");
        }
        Self::new(status, e.message().to_owned())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let response = (
            self.status,
            Json(serde_json::json!({ "error": &self.message })),
        )
            .into_response();
        self.retry_after(response)
    }
}

/// Answers unknown paths with a JSON 404.
pub async fn not_found_fallback() -> ApiError {
    ApiError::not_found("no such route")
}

/// Answers a known path called with the wrong method with a JSON 405.
pub async fn method_not_allowed_fallback() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_its_status() {
        let table = [
            (ErrorKind::InvalidInput, 400),
            (ErrorKind::NotFound, 404),
            (ErrorKind::Conflict, 409),
            (ErrorKind::InvalidTransition, 409),
            (ErrorKind::NoCapacity, 503),
            (ErrorKind::Unauthenticated, 401),
            (ErrorKind::PermissionDenied, 403),
            (ErrorKind::Timeout, 504),
            (ErrorKind::Unavailable, 503),
            (ErrorKind::Provider, 500),
            (ErrorKind::Internal, 500),
            (ErrorKind::InvalidConfig, 500),
        ];
        for (kind, code) in table {
            assert_eq!(status_for(kind).as_u16(), code, "{kind}");
        }
    }

    #[test]
    fn internal_errors_get_a_generic_message() {
        let e = ApiError::from(Error::internal("db row 42 corrupt"));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.message().contains("42"));
        let e = ApiError::from(Error::not_found("VM not found."));
        assert_eq!(e.message(), "VM not found.");
    }
}
