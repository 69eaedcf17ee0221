//! Machines that join by registering: the registration call (`POST /api/v1/registrations`,
//! the registration token as bearer), the agent's `DELETE .../registration`, the admin's
//! registration tokens (`/api/v1/registration-tokens`) and the admin page `/admin/machines`
//! with the onboarding command to copy.

use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use lablink_core::secret::RegistrationSecret;
use lablink_core::{
    Allocator as _, AuditAction, DestroyTarget, MachineRegistration, RegistrationToken,
    RegistrationTokenOptions, VmFilter,
};
use lablink_protocol::{ErrorBody, RegisteredBody, RegistrationBody};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::admin_auth::{Admin, AdminForm};
use super::agent_auth::{bearer, Agent};
use super::audit::{self, What};
use super::client::ClientAddr;
use super::error::{ApiError, ApiResult};
use super::extract::{typed, wants_json, ApiJson, PathText};
use super::views::{OperationView, VmView};
use super::HttpState;

/// The routes that answer at once (the agent's unregistration is a held route: it may wait
/// for a collection of the participant's work).
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/v1/registrations", post(register))
        .route(
            "/api/v1/registration-tokens",
            get(list_tokens).post(create_token),
        )
        .route("/api/v1/registration-tokens/{id}", delete(revoke_token))
        .route("/admin/machines", get(page).post(create_from_page))
        .route("/admin/machines/revoke", post(revoke_from_page))
}

/// A machine joins the pool: 201 with its agent token, 200 when it was registered already
/// (same name, same identity; the previous agent token stops working). Failed attempts are
/// limited per client address (429).
#[utoipa::path(post, path = "/api/v1/registrations", tag = "agent",
    request_body = RegistrationBody,
    responses((status = 201, body = RegisteredBody), (status = 200, description = "Registered again", body = RegisteredBody),
        (status = 400, body = ErrorBody), (status = 401, description = "Registration token unknown, expired, revoked or used up", body = ErrorBody),
        (status = 409, description = "The name is another machine's (or a VM's), or this machine is registered under another name", body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("registration_token" = [])))]
pub async fn register(
    State(state): State<HttpState>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RegistrationBody>,
) -> ApiResult<Response> {
    state.inner.registrations.take(addr).map_err(|wait| {
        state.metrics().registration(StatusCode::TOO_MANY_REQUESTS);
        ApiError::too_many_requests(
            "too many failed registrations from your address; wait and try again",
            wait,
        )
    })?;
    let outcome = async {
        let secret = bearer(&headers)
            .map(RegistrationSecret::from)
            .ok_or_else(|| {
                ApiError::unauthorized("send the registration token as the bearer token")
            })?;
        let request = MachineRegistration {
            hostname: body
                .hostname
                .parse()
                .map_err(|e: lablink_core::Error| ApiError::bad_request(e.message().to_owned()))?,
            machine_identity: body.machine_identity,
            allow_reboot: body.allow_reboot,
            address: body.address,
        };
        Ok::<_, ApiError>(
            state
                .allocator()
                .register_machine(&secret, &request)
                .await?,
        )
    }
    .await;
    let (registered, token) = outcome.inspect_err(|e| {
        state.metrics().registration(e.status());
        tracing::warn!(%addr, status = %e.status(), error = e.message(), "registration refused");
    })?;
    state.inner.registrations.give_back(addr);
    state.metrics().registration(StatusCode::OK);
    let status = match registered.again {
        true => StatusCode::OK,
        false => StatusCode::CREATED,
    };
    let body = RegisteredBody {
        hostname: registered.record.hostname.to_string(),
        token: token.expose().to_owned(),
        again: registered.again,
    };
    Ok((status, Json(body)).into_response())
}

/// The machine leaves the pool (after its participant's work is collected, when collection
/// is on): 202 with the destroy operation; the machine itself is not touched, and its agent
/// token stops working once its record is gone.
#[utoipa::path(delete, path = "/api/v1/vms/{hostname}/registration", tag = "agent",
    params(("hostname" = String, Path, description = "The machine")),
    responses((status = 202, body = OperationView), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "Not a registered machine, or its collection failed", body = ErrorBody)),
    security(("agent_token" = [])))]
pub async fn unregister(
    State(state): State<HttpState>,
    headers: HeaderMap,
    PathText(name): PathText,
) -> ApiResult<Response> {
    // The machine's own token, whatever the agent auth mode: an open-mode deployment must
    // not let anyone take another's machine out of the pool.
    let hostname = Agent::authenticated(&headers, &state).await?.own(&name)?;
    if !state.allocator().vm(&hostname).await?.is_registered() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this VM was launched by the allocator; only a registered machine unregisters itself",
        ));
    }
    let operation = state
        .allocator()
        .destroy(&DestroyTarget::Hostnames(vec![hostname]))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(OperationView::from(&operation))).into_response())
}

/// Body of `POST /api/v1/registration-tokens`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewTokenBody {
    /// What the token is for (who gets it).
    #[serde(default)]
    pub label: String,
    /// How long it stays valid, in hours (default 24; at most a year).
    pub valid_hours: Option<f64>,
    /// How many machines it may register (default: any number).
    pub max_uses: Option<u32>,
}

/// A registration token as an admin sees it (never the token itself, except once, at
/// creation).
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenView {
    /// The token as stored.
    #[serde(flatten)]
    pub token: RegistrationToken,
    /// Whether it can register a new machine now.
    pub usable: bool,
}

impl TokenView {
    fn new(token: RegistrationToken, now: DateTime<Utc>) -> Self {
        Self {
            usable: token.is_usable(now),
            token,
        }
    }
}

/// Answer of `POST /api/v1/registration-tokens`: the token, shown this once, and the
/// command that registers a machine with it. Its `Debug` hides both.
#[derive(Serialize, ToSchema)]
pub struct CreatedTokenView {
    /// The token as stored.
    #[serde(flatten)]
    pub view: TokenView,
    /// The token itself: shown once, never again.
    pub token: String,
    /// The command to run (as root) on a machine to register it.
    pub command: String,
}

impl std::fmt::Debug for CreatedTokenView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedTokenView")
            .field("view", &self.view)
            .field("token", &"***")
            .field("command", &"***")
            .finish()
    }
}

fn options(body: NewTokenBody) -> ApiResult<RegistrationTokenOptions> {
    let hours = body.valid_hours.unwrap_or(24.0);
    if !hours.is_finite() || hours <= 0.0 {
        return Err(ApiError::bad_request(
            "valid_hours must be a positive number",
        ));
    }
    Ok(RegistrationTokenOptions {
        label: body.label,
        valid_for: std::time::Duration::from_secs_f64((hours * 3600.0).min(1e9)),
        max_uses: body.max_uses,
    })
}

/// The onboarding command for a machine, with `token` in it, for the allocator at `url`.
fn command(url: &str, token: &str) -> String {
    format!("sudo lablink-agent register --allocator-url {url} --token {token}")
}

/// The allocator's address as the admin's browser reached it (machines on the same network
/// reach it there too; the admin edits the command otherwise).
fn allocator_url(state: &HttpState, parts: &Parts) -> String {
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("ALLOCATOR-ADDRESS");
    let scheme = if state.is_https(parts) {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{host}")
}

async fn create(
    state: &HttpState,
    parts: &Parts,
    body: NewTokenBody,
) -> ApiResult<CreatedTokenView> {
    let options = options(body)?;
    let (token, secret) = state
        .allocator()
        .create_registration_token(&options)
        .await?;
    Ok(CreatedTokenView {
        view: TokenView::new(token, Utc::now()),
        command: command(&allocator_url(state, parts), secret.expose()),
        token: secret.expose().to_owned(),
    })
}

/// Creates a registration token (shown once in the answer).
#[utoipa::path(post, path = "/api/v1/registration-tokens", tag = "admin", request_body = NewTokenBody,
    responses((status = 201, body = CreatedTokenView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn create_token(
    State(state): State<HttpState>,
    parts: Parts,
    req: AdminForm,
) -> ApiResult<Response> {
    let AdminForm { form, caller, .. } = req;
    let label = form.text("label").map(str::to_owned);
    let outcome = async { create(&state, &parts, typed(form)?).await }.await;
    let what = created(outcome.as_ref().ok(), label.as_deref());
    let action = AuditAction::RegistrationTokenCreated;
    audit::record(&state, &caller, action, what, &outcome).await;
    Ok((StatusCode::CREATED, Json(outcome?)).into_response())
}

/// What creating a token labelled `label` did (`created`, when it worked): the token's id
/// and label, never the token.
fn created(created: Option<&CreatedTokenView>, label: Option<&str>) -> What {
    match created {
        Some(created) => {
            let token = &created.view.token;
            What::token(Some(token.id.to_string()), Some(&token.label))
        }
        None => What::token(None, label),
    }
}

/// Every registration token, newest first.
#[utoipa::path(get, path = "/api/v1/registration-tokens", tag = "admin",
    responses((status = 200, body = Vec<TokenView>), (status = 401, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn list_tokens(
    State(state): State<HttpState>,
    _admin: Admin,
) -> ApiResult<Json<Vec<TokenView>>> {
    let now = Utc::now();
    let tokens = state.allocator().registration_tokens().await?;
    Ok(Json(
        tokens.into_iter().map(|t| TokenView::new(t, now)).collect(),
    ))
}

/// Revokes a registration token: it registers no machine from now on (the machines it
/// registered stay).
#[utoipa::path(delete, path = "/api/v1/registration-tokens/{id}", tag = "admin",
    params(("id" = Uuid, Path, description = "The token's id")),
    responses((status = 200, body = TokenView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn revoke_token(
    State(state): State<HttpState>,
    PathText(id): PathText,
    req: AdminForm,
) -> ApiResult<Json<TokenView>> {
    revoke(&state, &req, &id).await.map(Json)
}

/// Revokes token `id` (recorded in the audit trail).
async fn revoke(state: &HttpState, req: &AdminForm, id: &str) -> ApiResult<TokenView> {
    let outcome = async {
        let id: Uuid = id
            .trim()
            .parse()
            .map_err(|_| ApiError::bad_request("not a registration token id"))?;
        let token = state.allocator().revoke_registration_token(id).await?;
        Ok(TokenView::new(token, Utc::now()))
    }
    .await;
    let label = outcome.as_ref().ok().map(|t| t.token.label.as_str());
    let what = What::token(Some(id.trim().to_owned()), label);
    let action = AuditAction::RegistrationTokenRevoked;
    audit::record(state, &req.caller, action, what, &outcome).await;
    outcome
}

/// The admin page: registration tokens, registered machines, the onboarding command.
async fn page(State(state): State<HttpState>, admin: Admin, parts: Parts) -> ApiResult<Response> {
    if wants_json(&parts.headers) {
        return Err(ApiError::bad_request(
            "use /api/v1/registration-tokens and /api/v1/vms",
        ));
    }
    render(&state, &parts, &admin, StatusCode::OK, None, None).await
}

async fn render(
    state: &HttpState,
    parts: &Parts,
    admin: &Admin,
    status: StatusCode,
    created: Option<&CreatedTokenView>,
    notice: Option<(&str, &str)>,
) -> ApiResult<Response> {
    let now = Utc::now();
    let tokens: Vec<TokenView> = state
        .allocator()
        .registration_tokens()
        .await?
        .into_iter()
        .map(|t| TokenView::new(t, now))
        .collect();
    let machines: Vec<VmView> = state
        .allocator()
        .vms(&VmFilter::default())
        .await?
        .iter()
        .filter(|r| r.is_registered())
        .map(VmView::from)
        .collect();
    Ok(state.inner.templates.page(
        status,
        "machines.html",
        json!({
            "csrf": admin.csrf(),
            "tokens": tokens,
            "machines": machines,
            "created": created,
            "command": command(&allocator_url(state, parts), "<TOKEN>"),
            "notice": notice.map(|n| n.0),
            "notice_kind": notice.map(|n| n.1),
        }),
    ))
}

/// The page's answer to a form: the page again, with a notice (or the error in it).
async fn answer(
    state: &HttpState,
    parts: &Parts,
    admin: &Admin,
    outcome: ApiResult<(Option<CreatedTokenView>, String)>,
) -> Response {
    let page = match &outcome {
        Ok((created, notice)) => {
            let notice = Some((notice.as_str(), "success"));
            render(
                state,
                parts,
                admin,
                StatusCode::OK,
                created.as_ref(),
                notice,
            )
            .await
        }
        Err(e) => {
            let notice = Some((e.message(), "error"));
            render(state, parts, admin, e.status(), None, notice).await
        }
    };
    page.unwrap_or_else(IntoResponse::into_response)
}

async fn create_from_page(
    State(state): State<HttpState>,
    admin: Admin,
    parts: Parts,
    req: AdminForm,
) -> Response {
    let AdminForm {
        form,
        wants_json,
        caller,
    } = req;
    let label = form.text("label").map(str::to_owned);
    let outcome = async {
        let mut form = form;
        // An HTML form sends every field as text; empty means "not given".
        for field in ["valid_hours", "max_uses"] {
            match form
                .fields
                .get(field)
                .and_then(|v| v.as_str())
                .map(str::trim)
            {
                Some("") => {
                    form.fields.remove(field);
                }
                Some(text) => {
                    let number: serde_json::Number = text
                        .parse()
                        .map_err(|_| ApiError::bad_request(format!("{field} must be a number")))?;
                    form.fields.insert(field.into(), number.into());
                }
                None => {}
            }
        }
        let created = create(&state, &parts, typed(form)?).await?;
        Ok::<_, ApiError>((
            Some(created),
            "Registration token created. Copy it now: it is not shown again.".to_owned(),
        ))
    }
    .await;
    let token = outcome
        .as_ref()
        .ok()
        .and_then(|(created, _)| created.as_ref());
    let what = created(token, label.as_deref());
    let action = AuditAction::RegistrationTokenCreated;
    audit::record(&state, &caller, action, what, &outcome).await;
    if wants_json {
        return match outcome {
            Ok((created, _)) => (StatusCode::CREATED, Json(created)).into_response(),
            Err(e) => e.into_response(),
        };
    }
    answer(&state, &parts, &admin, outcome).await
}

async fn revoke_from_page(
    State(state): State<HttpState>,
    admin: Admin,
    parts: Parts,
    req: AdminForm,
) -> Response {
    let id = req.form.text("id").unwrap_or_default().to_owned();
    let outcome = revoke(&state, &req, &id).await.map(|t| {
        (
            None,
            format!("Registration token {:?} revoked.", t.token.label),
        )
    });
    answer(&state, &parts, &admin, outcome).await
}

/// Registrations refused because of what was sent (for `/metrics`), by answer.
pub(crate) fn outcome_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "registered",
        401 => "bad_token",
        409 => "conflict",
        429 => "rate_limited",
        400..=499 => "bad_input",
        _ => "error",
    }
}
