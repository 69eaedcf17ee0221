//! Admin authentication: argon2 password, sessions with an HttpOnly SameSite cookie and a
//! CSRF token, HTTP Basic for scripts, and a per-address limit on failed sign-ins.
//!
//! A session lives in its cookie, not in this process: the cookie carries a random session
//! id and its expiry, signed (HMAC-SHA256, [`CookieKey`]) with the session key, and the
//! session's CSRF token is derived from the id with the same key. So any replica holding the
//! key accepts the session. The key is [`HttpOptions::session_key`] when configured, else a
//! secret kept in the allocator's store, made by whichever replica needs it first. Signing
//! out marks the id ended in the store until the cookie expires, which every replica checks
//! (one lookup per session request).
//!
//! Every admin handler takes [`Admin`] (reads) or [`AdminForm`] (writes: checks the CSRF
//! token of a session, or that a Basic caller is a script, not a browser form).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordVerifier};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use lablink_core::Allocator;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};

use super::audit::{Caller, Via, What};
use super::client::{RateLimit, RateLimiter};
use super::error::ApiError;
use super::extract::{content_type_is, wants_json, FormOrJson};
use super::signed::CookieKey;
use super::{HttpOptions, HttpState};

/// Name of the admin session cookie.
pub const SESSION_COOKIE: &str = "lablink_admin";
/// Name of the cookie holding the sign-in form's CSRF token.
pub const LOGIN_COOKIE: &str = "lablink_login";
/// How long a successful Basic credential is remembered (so argon2 runs once, not per call).
const BASIC_CACHE_TTL: Duration = Duration::from_secs(600);
/// Concurrent argon2 verifications; more wait, so sign-ins cannot burn every core.
const VERIFY_PERMITS: usize = 2;
/// Name of the session key among the store's shared secrets.
const SESSION_SECRET: &str = "admin_session_key";
/// [`CookieKey`] purpose of session cookies.
const SESSION_PURPOSE: &str = "admin session";
/// [`CookieKey`] purpose of the CSRF token derived from a session id.
const CSRF_PURPOSE: &str = "admin csrf";

/// Hashes a human password with argon2id (PHC string).
pub fn hash_password(password: &str) -> lablink_core::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| lablink_core::Error::internal(format!("could not hash the password: {e}")))
}

/// A random URL-safe token of 256 bits.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Constant-time string comparison, of SHA-256 digests so that not even the length of the
/// secret shows in the time taken.
pub(crate) fn same(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The admin credential, the session key and the sign-in limits.
///
/// Sign-ins are limited per client address before the password is checked: each address
/// has a bucket of `sign_in_failures_per_minute` attempts, refilled at that rate; an attempt
/// takes one before argon2 runs and a correct one gives it back, so only failures use the
/// budget and an address that failed before is refused only until its next attempt is due
/// (`Retry-After`), never for a fixed lock-out. One verification per address runs at a time
/// (more get 429 at once), and at most [`VERIFY_PERMITS`] in all, so an attack from one
/// address cannot slow down a sign-in from another.
#[derive(Debug)]
pub struct AdminAuth {
    user: String,
    hash: String,
    ttl: Duration,
    /// The session key: configured, or fetched from the store on first use.
    key: OnceCell<CookieKey>,
    attempts: RateLimiter,
    verifying: Mutex<HashSet<IpAddr>>,
    basic_ok: Mutex<HashMap<[u8; 32], Instant>>,
    verify_gate: Semaphore,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks an address as having a verification in flight until dropped.
struct Verifying<'a> {
    set: &'a Mutex<HashSet<IpAddr>>,
    addr: IpAddr,
}

impl Drop for Verifying<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.addr);
    }
}

impl AdminAuth {
    /// The auth state for `options`.
    pub fn new(options: &HttpOptions) -> Self {
        if PasswordHash::new(&options.admin_password_hash).is_err() {
            tracing::error!(
                "the admin password hash is not a valid PHC string; no admin can sign in"
            );
        }
        let per_minute = options.sign_in_failures_per_minute.max(1);
        Self {
            user: options.admin_user.clone(),
            hash: options.admin_password_hash.clone(),
            ttl: options.session_ttl,
            key: OnceCell::new_with(options.session_key.clone()),
            attempts: RateLimiter::new(RateLimit {
                burst: per_minute,
                per_minute,
            }),
            verifying: Mutex::default(),
            basic_ok: Mutex::default(),
            verify_gate: Semaphore::new(VERIFY_PERMITS),
        }
    }

    /// Reserves a verification for `addr`: 429 when one is already running for it or its
    /// attempts are used up.
    fn reserve(&self, addr: IpAddr) -> Result<Verifying<'_>, ApiError> {
        let addr = super::client::limit_key(addr);
        if !lock(&self.verifying).insert(addr) {
            return Err(ApiError::too_many_requests(
                "a sign-in from your address is being checked; try again in a moment",
                Duration::from_secs(1),
            ));
        }
        let verifying = Verifying {
            set: &self.verifying,
            addr,
        };
        self.attempts.take(addr).map_err(|wait| {
            ApiError::too_many_requests(
                "too many failed sign-ins from your address; wait and try again",
                wait,
            )
        })?;
        Ok(verifying)
    }

    /// Checks a user name and password (limited per address before argon2 runs; argon2 off
    /// the runtime). A credential that was right within the last minutes is not checked again.
    pub async fn verify(&self, addr: IpAddr, user: &str, password: &str) -> Result<(), ApiError> {
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .finalize()
            .into();
        if lock(&self.basic_ok)
            .get(&key)
            .is_some_and(|t| t.elapsed() < BASIC_CACHE_TTL)
        {
            return Ok(());
        }
        let _verifying = self.reserve(addr)?;
        let ok = {
            let _permit = self
                .verify_gate
                .acquire()
                .await
                .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
            let hash = self.hash.clone();
            let password = password.to_owned();
            let user_ok = same(user, &self.user);
            tokio::task::spawn_blocking(move || {
                let Ok(parsed) = PasswordHash::new(&hash) else {
                    return false;
                };
                let password_ok = Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok();
                user_ok && password_ok
            })
            .await
            .unwrap_or(false)
        };
        if ok {
            self.attempts.give_back(addr);
            let mut cache = lock(&self.basic_ok);
            cache.retain(|_, t| t.elapsed() < BASIC_CACHE_TTL);
            cache.insert(key, Instant::now());
            Ok(())
        } else {
            tracing::warn!(client = %addr, "failed admin sign-in");
            Err(ApiError::unauthorized("wrong user name or password"))
        }
    }

    /// The session key: the configured one, or the store's shared secret (stored by the
    /// first replica asking; an error leaves it to be asked again).
    async fn key(&self, allocator: &dyn Allocator) -> Result<&CookieKey, ApiError> {
        self.key
            .get_or_try_init(|| async {
                let mut candidate = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut candidate);
                let secret = allocator.shared_secret(SESSION_SECRET, &candidate).await?;
                Ok::<_, ApiError>(CookieKey::from_bytes(&secret))
            })
            .await
    }

    /// Starts a session; returns its cookie value (the signed session id and expiry).
    pub async fn start_session(&self, allocator: &dyn Allocator) -> Result<String, ApiError> {
        let key = self.key(allocator).await?;
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let expires = Utc::now().timestamp().saturating_add(ttl);
        Ok(key.sign(SESSION_PURPOSE, &random_token(), expires))
    }

    /// The session id and expiry a cookie value proves: signed with the session key and
    /// not expired. Says nothing about sign-out.
    async fn open(
        &self,
        allocator: &dyn Allocator,
        cookie: &str,
    ) -> Result<Option<(String, i64)>, ApiError> {
        let key = self.key(allocator).await?;
        Ok(key.verify_until(SESSION_PURPOSE, cookie, Utc::now().timestamp()))
    }

    /// Signs the session of a cookie value out on every replica, until it would expire.
    pub async fn end_session(
        &self,
        allocator: &dyn Allocator,
        cookie: &str,
    ) -> Result<(), ApiError> {
        if let Some((id, expires)) = self.open(allocator, cookie).await? {
            let until = DateTime::from_timestamp(expires, 0).unwrap_or(DateTime::<Utc>::MAX_UTC);
            allocator.end_admin_session(&id, until).await?;
        }
        Ok(())
    }

    /// The CSRF token of the session of a cookie value, if the session is live: signed,
    /// not expired, not signed out.
    async fn session_csrf(
        &self,
        allocator: &dyn Allocator,
        cookie: &str,
    ) -> Result<Option<String>, ApiError> {
        let Some((id, _)) = self.open(allocator, cookie).await? else {
            return Ok(None);
        };
        if allocator.admin_session_ended(&id).await? {
            return Ok(None);
        }
        let key = self.key(allocator).await?;
        Ok(Some(key.token(CSRF_PURPOSE, &id)))
    }

    /// `Set-Cookie` for a new session (the value [`start_session`](Self::start_session) gave).
    pub fn session_cookie(&self, value: &str, secure: bool) -> String {
        cookie(SESSION_COOKIE, value, self.ttl, secure)
    }
}

/// `Set-Cookie` value for `name=value`: HttpOnly, SameSite=Strict, `Secure` when the
/// client's request was HTTPS.
pub fn cookie(name: &str, value: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

impl HttpState {
    /// [`AdminAuth::verify`], counting refusals by the limit in `/metrics`.
    pub(crate) async fn verify_admin(
        &self,
        addr: IpAddr,
        user: &str,
        password: &str,
    ) -> Result<(), ApiError> {
        let verified = self.inner.admin.verify(addr, user, password).await;
        if matches!(&verified, Err(e) if e.status() == StatusCode::TOO_MANY_REQUESTS) {
            self.metrics().sign_in_rate_limited();
        }
        verified
    }
}

/// The value of cookie `name`, if sent.
pub fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// A signed-in admin.
#[derive(Debug, Clone)]
pub enum Admin {
    /// A browser session; its forms must carry this CSRF token.
    Session {
        /// The session's CSRF token.
        csrf: String,
    },
    /// HTTP Basic (scripts).
    Basic,
}

impl Admin {
    /// The CSRF token to put into forms (empty for Basic callers).
    pub fn csrf(&self) -> &str {
        match self {
            Self::Session { csrf } => csrf,
            Self::Basic => "",
        }
    }

    /// How the admin signed in.
    pub fn via(&self) -> Via {
        match self {
            Self::Session { .. } => Via::Session,
            Self::Basic => Via::Basic,
        }
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The refusal for an anonymous caller: browsers asking for a page go to the sign-in page,
/// everyone else gets a JSON 401.
fn refuse(parts: &Parts, error: ApiError) -> Response {
    let browser_page = parts.method == Method::GET
        && !wants_json(&parts.headers)
        && error.status() == StatusCode::UNAUTHORIZED
        && parts.uri.path().starts_with("/admin");
    if browser_page {
        Redirect::to("/admin/login").into_response()
    } else {
        error.into_response()
    }
}

impl Admin {
    /// The admin identity of a request, if any: a live session cookie, or Basic credentials
    /// (`Ok(None)` when the request carries neither).
    pub async fn identify(parts: &Parts, state: &HttpState) -> Result<Option<Self>, ApiError> {
        let auth = &state.inner.admin;
        if let Some(value) = cookie_value(&parts.headers, SESSION_COOKIE) {
            if let Some(csrf) = auth.session_csrf(&**state.allocator(), &value).await? {
                return Ok(Some(Self::Session { csrf }));
            }
        }
        if let Some((user, password)) = basic_credentials(&parts.headers) {
            let addr = state.client_addr(parts);
            let verified = state.verify_admin(addr, &user, &password).await;
            if verified.is_err() {
                let what = What::request(parts.method.as_str(), parts.uri.path());
                super::audit::sign_in(state, &user, Via::Basic, addr, what, &verified).await;
            }
            verified?;
            return Ok(Some(Self::Basic));
        }
        Ok(None)
    }
}

/// The admin is identified once per request: a handler that takes both `Admin` and
/// [`AdminForm`] reads the session (or checks the Basic password) once, and the second
/// extractor finds the first one's answer in the request's extensions.
impl FromRequestParts<HttpState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, Response> {
        if let Some(admin) = parts.extensions.get::<Admin>() {
            return Ok(admin.clone());
        }
        match Self::identify(parts, state).await {
            Ok(Some(admin)) => {
                parts.extensions.insert(admin.clone());
                Ok(admin)
            }
            Ok(None) => Err(refuse(
                parts,
                ApiError::unauthorized("admin sign-in required"),
            )),
            Err(e) => Err(refuse(parts, e)),
        }
    }
}

/// An admin's write request: the body fields, whether JSON was asked for, and who sent it
/// (for the audit trail).
/// A session must send its CSRF token (form field `csrf` or header `X-CSRF-Token`); a Basic
/// caller must be a script (`Accept: application/json` or a JSON body), never a browser form.
#[derive(Debug)]
pub struct AdminForm {
    /// The body.
    pub form: FormOrJson,
    /// `Accept: application/json`.
    pub wants_json: bool,
    /// The admin and the client's address.
    pub caller: Caller,
}

impl FromRequest<HttpState> for AdminForm {
    type Rejection = Response;

    async fn from_request(req: Request, state: &HttpState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let admin = Admin::from_request_parts(&mut parts, state).await?;
        let caller = Caller::admin(state, admin.via(), state.client_addr(&parts));
        let json = wants_json(&parts.headers);
        let header_csrf = parts
            .headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let json_body = content_type_is(&parts.headers, "application/json");
        let form = FormOrJson::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        match &admin {
            Admin::Session { csrf } => {
                let sent = header_csrf.as_deref().or_else(|| form.text("csrf"));
                if !sent.is_some_and(|s| same(s, csrf)) {
                    return Err(ApiError::forbidden("missing or wrong CSRF token").into_response());
                }
            }
            Admin::Basic if !(json || json_body) => {
                return Err(ApiError::forbidden(
                    "HTTP Basic callers must send Accept: application/json",
                )
                .into_response());
            }
            Admin::Basic => {}
        }
        Ok(Self {
            form,
            wants_json: json,
            caller,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use lablink_core::{FakeProvisioner, LabLink, MemoryNotifier, MemoryVmStore};

    use super::*;

    #[tokio::test]
    async fn a_request_identifies_its_admin_once() {
        let lablink = LabLink::builder()
            .with_store(Arc::new(MemoryVmStore::new()))
            .with_notifier(Arc::new(MemoryNotifier::new()))
            .with_provisioner(Arc::new(FakeProvisioner::new()))
            .build()
            .unwrap();
        let options = HttpOptions::with_admin_password("admin", "s3cret-pass").unwrap();
        let state = HttpState::new(Arc::new(lablink), options);
        let basic = base64::engine::general_purpose::STANDARD.encode("admin:s3cret-pass");
        let request = Request::builder()
            .uri("/admin/roster")
            .header(header::AUTHORIZATION, format!("Basic {basic}"))
            .body(Body::empty())
            .unwrap();
        let (mut parts, _) = request.into_parts();
        let first = Admin::from_request_parts(&mut parts, &state).await.unwrap();
        assert!(matches!(first, Admin::Basic));
        assert!(matches!(
            parts.extensions.get::<Admin>(),
            Some(Admin::Basic)
        ));
        // The second extractor of the request (AdminForm after Admin) takes the first one's
        // answer instead of checking the password again.
        parts.headers.remove(header::AUTHORIZATION);
        let second = Admin::from_request_parts(&mut parts, &state).await.unwrap();
        assert!(matches!(second, Admin::Basic));
    }
}
