//! Agent authentication: a VM's bearer token names the only hostname it may act for.
//!
//! Wrong or missing token → 401; a valid token used for another hostname (body or path) →
//! 403. In [`AgentAuthMode::Open`] no token is needed.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use lablink_core::Allocator as _;
use lablink_core::{AgentToken, ErrorKind, Hostname};

use super::admin_auth::Admin;
use super::error::ApiError;
use super::extract::vm_hostname;
use super::{AgentAuthMode, HttpState};

/// The bearer token of a request, if it has one.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// Resolves the token of a request to its hostname (401 when missing or unknown).
async fn authenticate(headers: &HeaderMap, state: &HttpState) -> Result<Hostname, ApiError> {
    let token = bearer(headers)
        .map(AgentToken::from)
        .ok_or_else(|| ApiError::unauthorized("missing or invalid Authorization header"))?;
    match state.allocator().authenticate_agent(&token).await {
        Ok(hostname) => Ok(hostname),
        Err(e) if e.kind() == ErrorKind::Unauthenticated => {
            Err(ApiError::unauthorized("invalid token"))
        }
        Err(e) => Err(e.into()),
    }
}

/// The VM a request speaks for: `None` in open mode, else the token's hostname.
#[derive(Debug, Clone)]
pub struct Agent(Option<Hostname>);

impl Agent {
    /// The VM whose token the request carries, in any agent auth mode (401 without one).
    pub async fn authenticated(headers: &HeaderMap, state: &HttpState) -> Result<Self, ApiError> {
        Ok(Self(Some(authenticate(headers, state).await?)))
    }

    /// 403 unless the caller may act for `hostname`.
    pub fn authorize(&self, hostname: &Hostname) -> Result<(), ApiError> {
        match &self.0 {
            Some(own) if own != hostname => {
                Err(ApiError::forbidden("this token belongs to another VM"))
            }
            _ => Ok(()),
        }
    }

    /// 403 unless the caller may act for the VM named by `text` (which need not be a valid
    /// hostname: an invalid one is simply not the caller's).
    pub fn authorize_text(&self, text: &str) -> Result<(), ApiError> {
        match &self.0 {
            Some(own) if own.as_str() != text => {
                Err(ApiError::forbidden("this token belongs to another VM"))
            }
            _ => Ok(()),
        }
    }

    /// The VM a path names, once the caller may act for it (403 before 404).
    pub fn own(&self, name: &str) -> Result<Hostname, ApiError> {
        self.authorize_text(name)?;
        vm_hostname(name)
    }
}

impl FromRequestParts<HttpState> for Agent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        match state.options().agent_auth {
            AgentAuthMode::Open => Ok(Self(None)),
            AgentAuthMode::Tokens => Ok(Self(Some(authenticate(&parts.headers, state).await?))),
        }
    }
}

/// Either a signed-in admin (may read any VM) or a VM (may read only itself).
#[derive(Debug, Clone)]
pub enum AdminOrAgent {
    /// An admin.
    Admin,
    /// A VM agent.
    Agent(Agent),
}

impl AdminOrAgent {
    /// 403 unless the caller may read the VM named `text`.
    pub fn authorize_text(&self, text: &str) -> Result<(), ApiError> {
        match self {
            Self::Admin => Ok(()),
            Self::Agent(agent) => agent.authorize_text(text),
        }
    }

    /// The VM a path names, once the caller may act for it (403 before 404).
    pub fn own(&self, name: &str) -> Result<Hostname, ApiError> {
        self.authorize_text(name)?;
        vm_hostname(name)
    }
}

impl FromRequestParts<HttpState> for AdminOrAgent {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, Response> {
        if bearer(&parts.headers).is_some() {
            return authenticate(&parts.headers, state)
                .await
                .map(|h| Self::Agent(Agent(Some(h))))
                .map_err(IntoResponse::into_response);
        }
        match Admin::identify(parts, state).await {
            Ok(Some(_)) => Ok(Self::Admin),
            Ok(None) if state.options().agent_auth == AgentAuthMode::Open => {
                Ok(Self::Agent(Agent(None)))
            }
            Ok(None) => Err(
                ApiError::unauthorized("admin sign-in or the VM's token required").into_response(),
            ),
            Err(e) => Err(e.into_response()),
        }
    }
}
