//! The participant side: the page at `/`, `POST /api/request_vm` and the free-VM count.

use std::time::{Duration, Instant};

use axum::extract::{FromRequest, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lablink_core::secret::Pin;
use lablink_core::Allocator as _;
use lablink_core::{
    CrdCommand, DesktopMode, Email, ErrorKind, Granted, Hostname, VmFilter, VmRecord, VmRequest,
};
use serde_json::json;

use super::admin_auth::{cookie, cookie_value};
use super::error::ApiError;
use super::extract::{wants_json, FormOrJson};
use super::metrics::ClaimOutcome;
use super::signed::CookieKey;
use super::HttpState;

/// The participant routes.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/", get(index))
        .route("/api/request_vm", post(request_vm))
        .route("/api/unassigned_vms_count", get(unassigned_count))
}

async fn index(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    let free = state
        .allocator()
        .counts()
        .await
        .map(|c| c.assignable)
        .unwrap_or(0);
    state.inner.templates.page(
        StatusCode::OK,
        "index.html",
        json!({
            "free": free,
            "access_code": state.options().access_code.is_some(),
            "browser": state.options().desktop.mode == DesktopMode::Browser,
            // A browser that got a VM sees its warnings here too.
            "participant": cookie_value(&headers, PARTICIPANT_COOKIE).is_some(),
        }),
    )
}

async fn unassigned_count(
    State(state): State<HttpState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let counts = state.allocator().counts().await?;
    Ok(Json(json!({ "count": counts.assignable })))
}

/// A participant request, checked: 400 with a message saying what is wrong.
/// A browser desktop takes only the email; a `crd_command` sent anyway is ignored.
pub fn parse_request(form: &FormOrJson, mode: DesktopMode) -> Result<VmRequest, ApiError> {
    let browser = mode == DesktopMode::Browser;
    let (email, command) = (form.text("email"), form.text("crd_command"));
    let Some(email) = email.filter(|_| browser || command.is_some()) else {
        return Err(ApiError::bad_request(if browser {
            "Please give your email."
        } else {
            "Please give both your email and the Chrome Remote Desktop command."
        }));
    };
    // Plain ASCII only at the door (stored records from earlier versions may hold other
    // emails): a look-alike letter from another alphabet would make a second participant who
    // looks like the first one in every list.
    if !email.is_ascii() {
        return Err(ApiError::bad_request(
            "Invalid email: write it in plain ASCII letters, digits and punctuation.",
        ));
    }
    let email: Email = email.parse().map_err(|e: lablink_core::Error| {
        ApiError::bad_request(format!("Invalid email: {}", e.message()))
    })?;
    if browser {
        return Ok(VmRequest {
            email,
            crd_command: None,
        });
    }
    let crd_command = command.map(crd_command).transpose()?;
    Ok(VmRequest { email, crd_command })
}

/// A pasted Chrome Remote Desktop command, checked (400 saying what to do otherwise).
pub fn crd_command(pasted: &str) -> Result<CrdCommand, ApiError> {
    pasted.parse().map_err(|e: lablink_core::Error| {
        ApiError::bad_request(format!(
            "Invalid Chrome Remote Desktop command: {}. Copy the whole Debian Linux command again, exactly as shown.",
            e.message()
        ))
    })
}

/// The name of the cookie by which a participant's browser shows it is the one that got the
/// VM of an email.
pub const PARTICIPANT_COOKIE: &str = "lablink_participant";
/// How long that cookie lasts.
const PARTICIPANT_COOKIE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// What the participant cookie's signature is for.
const PARTICIPANT_PURPOSE: &str = "participant";

/// What the participant cookie is signed for: one assignment (VM and PIN; the PIN never
/// leaves the signature).
fn participant_purpose(hostname: &Hostname, pin: &Pin) -> String {
    format!("{PARTICIPANT_PURPOSE}\0{hostname}\0{}", pin.expose())
}

/// The VM whose participant this browser is: the one assigned to the email its participant
/// cookie carries, if the cookie was signed for that very assignment (401 otherwise, also
/// once the VM was released or went to someone else).
pub async fn participant_vm(state: &HttpState, headers: &HeaderMap) -> Result<VmRecord, ApiError> {
    let unknown = || ApiError::unauthorized("This browser has no VM (or no longer has it).");
    let value = cookie_value(headers, PARTICIPANT_COOKIE).ok_or_else(unknown)?;
    let email: Email = CookieKey::claimed_payload(&value)
        .and_then(|e| e.parse().ok())
        .ok_or_else(unknown)?;
    let filter = VmFilter {
        email: Some(email.clone()),
        ..VmFilter::default()
    };
    let record = state
        .allocator()
        .vms(&filter)
        .await?
        .into_iter()
        .next()
        .ok_or_else(unknown)?;
    let assignment = record.assignment.as_ref().ok_or_else(unknown)?;
    let purpose = participant_purpose(&record.hostname, &assignment.pin);
    let now = chrono::Utc::now().timestamp();
    let signed = state.options().cookie_key.verify(&purpose, &value, now);
    if signed.as_deref() != Some(email.as_str()) {
        return Err(unknown());
    }
    Ok(record)
}

/// A VM given to a participant, and the cookie that lets the same browser see it again.
#[derive(Debug)]
pub struct Taken {
    /// The VM and its PIN.
    pub granted: Granted,
    /// `Set-Cookie` for the participant cookie.
    pub cookie: String,
}

/// Serves a participant's request for a VM, in this order: the per-address rate limit
/// (429), the event access code when one is set (403), the request's fields (400), the
/// allocator's claim (403 for an email missing from the registered list, 503 without a free
/// VM). A repeat for an email that already holds a VM shows that VM only to whoever proves
/// being the one who got it: the browser that got it (its participant cookie, signed for that
/// assignment) or a request with the same one-time Chrome Remote Desktop code (a double
/// click, a retry whose first answer was lost). Anyone else gets 409 and learns neither the
/// hostname nor the PIN. Every outcome is counted.
pub async fn take_vm(
    state: &HttpState,
    parts: &Parts,
    form: &FormOrJson,
) -> Result<Taken, ApiError> {
    let started = Instant::now();
    let counted = |outcome: ClaimOutcome, e: ApiError| {
        state.metrics().claim(outcome, started.elapsed());
        e
    };
    let addr = state.client_addr(parts);
    state
        .inner
        .participants
        .take(addr)
        .map_err(|wait| {
            counted(
                ClaimOutcome::RateLimited,
                ApiError::too_many_requests(
                    "Too many requests from your network right now. Please wait a moment and try again.",
                    wait,
                ),
            )
        })?;
    if let Some(expected) = &state.options().access_code {
        let given = form.text("access_code").unwrap_or("");
        if !super::admin_auth::same(given.trim(), expected) {
            let message = if given.is_empty() {
                "Please enter the access code the organisers announced."
            } else {
                "That access code is not right. Please check what the organisers announced."
            };
            return Err(counted(ClaimOutcome::Refused, ApiError::forbidden(message)));
        }
    }
    let request = parse_request(form, state.options().desktop.mode)
        .map_err(|e| counted(ClaimOutcome::Rejected, e))?;
    let granted = claim(state, &request, started).await?;
    let key = &state.options().cookie_key;
    let now = chrono::Utc::now().timestamp();
    // The cookie is signed for this assignment (VM and PIN, which never leaves the
    // signature), so a cookie from an earlier assignment of the email proves nothing once
    // the VM was released and the email got another.
    let purpose = participant_purpose(&granted.hostname, &granted.pin);
    if !granted.newly_assigned && !granted.same_code {
        let proven = cookie_value(&parts.headers, PARTICIPANT_COOKIE)
            .and_then(|value| key.verify(&purpose, &value, now))
            .is_some_and(|email| email == request.email.as_str());
        if !proven {
            return Err(counted(
                ClaimOutcome::Unproven,
                ApiError::new(
                    StatusCode::CONFLICT,
                    "This email already has a VM. Open this page in the browser you first used, or ask the organisers: they can release the VM so you can ask again.",
                ),
            ));
        }
    }
    let outcome = if granted.newly_assigned {
        ClaimOutcome::Assigned
    } else {
        ClaimOutcome::Rejoined
    };
    state.metrics().claim(outcome, started.elapsed());
    let expires = now + PARTICIPANT_COOKIE_TTL.as_secs() as i64;
    let value = key.sign(&purpose, request.email.as_str(), expires);
    Ok(Taken {
        granted,
        cookie: cookie(
            PARTICIPANT_COOKIE,
            &value,
            PARTICIPANT_COOKIE_TTL,
            state.is_https(parts),
        ),
    })
}

/// Asks the allocator for a VM; counts the outcomes that end here (timed from `started`).
async fn claim(
    state: &HttpState,
    request: &VmRequest,
    started: Instant,
) -> Result<Granted, ApiError> {
    match state.allocator().request_vm(request).await {
        Ok(granted) => Ok(granted),
        Err(e) if e.kind() == ErrorKind::NoCapacity => {
            state
                .metrics()
                .claim(ClaimOutcome::NoCapacity, started.elapsed());
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "No VM is free right now. Please try again in a few minutes or ask the organisers.",
            ))
        }
        Err(e) => {
            let outcome = match e.kind() {
                ErrorKind::PermissionDenied => ClaimOutcome::Refused,
                ErrorKind::InvalidInput => ClaimOutcome::Rejected,
                _ => ClaimOutcome::Failed,
            };
            state.metrics().claim(outcome, started.elapsed());
            Err(e.into())
        }
    }
}

async fn request_vm(State(state): State<HttpState>, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let json = wants_json(&parts.headers);
    let outcome =
        match FormOrJson::from_request(Request::from_parts(parts.clone(), body), &state).await {
            Ok(form) => take_vm(&state, &parts, &form).await,
            Err(e) => {
                state
                    .metrics()
                    .claim(ClaimOutcome::Rejected, started.elapsed());
                Err(e)
            }
        };
    let templates = &state.inner.templates;
    match (outcome, json) {
        (Ok(taken), true) => (
            [(header::SET_COOKIE, taken.cookie)],
            Json(json!({
                "hostname": taken.granted.hostname,
                "pin": taken.granted.pin.expose(),
            })),
        )
            .into_response(),
        (Ok(Taken { granted, cookie }), false) => {
            let (title, message, outcome) = if granted.newly_assigned {
                ("Your VM", "You got a VM.", "assigned")
            } else {
                (
                    "You already have a VM",
                    "This email already has a VM; here it is again.",
                    "already_assigned",
                )
            };
            let page = templates.page(
                StatusCode::OK,
                "result.html",
                json!({
                    "title": title, "message": message, "kind": "success", "outcome": outcome,
                    "hostname": granted.hostname, "pin": granted.pin.expose(),
                    "browser": state.options().desktop.mode == DesktopMode::Browser,
                }),
            );
            ([(header::SET_COOKIE, cookie)], page).into_response()
        }
        (Err(e), true) => e.into_response(),
        (Err(e), false) => {
            let (title, outcome) = match e.status() {
                StatusCode::SERVICE_UNAVAILABLE => ("No VM free", "no_vm"),
                StatusCode::BAD_REQUEST => ("Please check your input", "invalid"),
                StatusCode::FORBIDDEN => ("Not admitted", "refused"),
                StatusCode::CONFLICT => ("This email already has a VM", "already_taken"),
                StatusCode::TOO_MANY_REQUESTS => ("Please wait a moment", "rate_limited"),
                _ => ("Something went wrong", "error"),
            };
            let page = templates.page(
                e.status(),
                "result.html",
                json!({ "title": title, "message": e.message(), "kind": "error", "outcome": outcome }),
            );
            e.retry_after(page)
        }
    }
}
