//! Extractors whose every rejection is a JSON 4xx ([`ApiError`]), so axum's plain-text
//! rejections never reach a client.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use lablink_core::Hostname;

use super::error::{ApiError, ApiResult};

/// The longest serde message echoed back to a caller.
const MAX_ERROR_DETAIL: usize = 200;

pub(crate) fn shorten(mut message: String) -> String {
    if message.len() > MAX_ERROR_DETAIL {
        let mut end = MAX_ERROR_DETAIL;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// Reads the whole body within the router's limit: 413 when it is too large, 400 otherwise.
async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is too large",
            )
        } else {
            ApiError::bad_request("the request body could not be read")
        }
    })
}

/// A body that must be a JSON object, whatever its `Content-Type` (the Python client always
/// sends JSON). Fields are then checked one by one so each missing or mistyped field gets
/// its own message.
#[derive(Debug, Clone, Default)]
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(ApiError::bad_request(
                "the request body must be a JSON object",
            )),
            Err(e) => Err(ApiError::bad_request(shorten(format!(
                "the request body is not valid JSON: {e}"
            )))),
        }
    }
}

impl JsonObject {
    /// A non-empty string field, or `None` when it is missing, `null`, not a string or empty.
    pub fn non_empty_str(&self, name: &str) -> Option<&str> {
        match self.0.get(name) {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.as_str()),
            _ => None,
        }
    }

    /// A field, if present and not `null`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }
}

/// A typed JSON body; a malformed body or a field of the wrong type is a 400 naming the
/// problem.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(bytes)
            .map(Self)
            .map_err(|e| ApiError::bad_request(shorten(format!("invalid request body: {e}"))))
    }
}

/// Fields of a body sent either as an HTML form (`application/x-www-form-urlencoded`) or as
/// a JSON object (`application/json`). Values are kept as JSON values.
#[derive(Debug, Clone, Default)]
pub struct FormOrJson {
    /// The fields.
    pub fields: Map<String, Value>,
}

impl<S: Send + Sync> FromRequest<S> for FormOrJson {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = content_type_is(req.headers(), "application/json");
        let bytes = body_bytes(req, state).await?;
        if is_json {
            let JsonObject(fields) =
                JsonObject::from_request(Request::new(axum::body::Body::from(bytes)), &()).await?;
            return Ok(Self { fields });
        }
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
            .map_err(|_| ApiError::bad_request("the form body is malformed"))?;
        let fields = pairs
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        Ok(Self { fields })
    }
}

impl FormOrJson {
    /// A string field (trimmed), or `None` when missing, empty or not a string.
    pub fn text(&self, name: &str) -> Option<&str> {
        match self.fields.get(name) {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim()),
            _ => None,
        }
    }

    /// A field, if present.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.get(name)
    }
}

/// Query parameters; a malformed query is a 400.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query)
            .map(Self)
            .map_err(|e| ApiError::bad_request(shorten(format!("invalid query: {e}"))))
    }
}

/// The path's segments (one `String` by default, or a tuple of them); a segment that does not
/// decode is a 400.
#[derive(Debug, Clone)]
pub struct PathText<T = String>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathText<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|_| ApiError::bad_request("the path is malformed"))
    }
}

/// A VM's name from a path: one that cannot be valid names no VM (404, as an unknown VM).
pub fn vm_hostname(text: &str) -> ApiResult<Hostname> {
    text.parse()
        .map_err(|_| ApiError::not_found("VM not found."))
}

/// The `{hostname}` segment of a VM route, parsed with [`vm_hostname`]. Routes an agent may
/// call check the caller first (`Agent::own`), so they take the text ([`PathText`]).
#[derive(Debug, Clone)]
pub struct PathHostname(pub Hostname);

impl<S: Send + Sync> FromRequestParts<S> for PathHostname {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let PathText(name) = PathText::<String>::from_request_parts(parts, state).await?;
        vm_hostname(&name).map(Self)
    }
}

/// Whether `Content-Type` is `mime` (parameters ignored).
pub fn content_type_is(headers: &HeaderMap, mime: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(mime))
}

/// Whether the caller asked for JSON (`Accept: application/json`).
pub fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        })
}

/// A typed body from form-or-JSON fields (400 naming the problem).
pub(crate) fn typed<T: DeserializeOwned>(form: FormOrJson) -> Result<T, ApiError> {
    serde_json::from_value(Value::Object(form.fields))
        .map_err(|e| ApiError::bad_request(shorten(format!("invalid request body: {e}"))))
}
