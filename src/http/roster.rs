//! The registered participants: `GET`/`PUT /api/v1/roster` and the admin page
//! `/admin/participants`, where the organisers upload a CSV of the emails that may take a VM.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use lablink_core::Allocator as _;
use lablink_core::{AuditAction, Email};
use serde_json::{json, Value};

use super::admin_auth::{Admin, AdminForm};
use super::audit::{self, What};
use super::error::{ApiError, ApiResult};
use super::extract::wants_json;
use super::HttpState;

/// Most emails one list may hold.
pub const MAX_ROSTER: usize = 100_000;

/// The roster routes.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/v1/roster", get(get_roster).put(put_roster))
        .route("/admin/participants", get(page).post(upload))
}

/// The emails of a CSV (or any text with one participant per line): on each line the first
/// cell holding an `@` is the email; lines without one (a header, blank lines) are skipped.
/// A cell that holds an `@` but is not an email is a 400 naming its line.
pub fn emails_from_csv(text: &str) -> Result<Vec<Email>, ApiError> {
    let mut emails = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let cell = line
            .split([',', ';', '\t'])
            .map(|c| c.trim().trim_matches('"').trim())
            .find(|c| c.contains('@'));
        if let Some(cell) = cell {
            let email = cell.parse().map_err(|e: lablink_core::Error| {
                ApiError::bad_request(format!("line {}: {}", i + 1, e.message()))
            })?;
            emails.push(email);
        }
        if emails.len() > MAX_ROSTER {
            return Err(ApiError::bad_request(format!(
                "a list may hold at most {MAX_ROSTER} emails"
            )));
        }
    }
    Ok(emails)
}

/// The emails of a request body: JSON `{"emails": [...]}`, a `csv` field holding at least
/// one email, or `clear` (true) to remove the list. A CSV without any email is refused
/// rather than taken as "anyone may take a VM".
fn emails_from(form: &super::extract::FormOrJson) -> Result<Vec<Email>, ApiError> {
    if matches!(form.get("clear"), Some(Value::Bool(true))) || form.text("clear") == Some("true") {
        return Ok(Vec::new());
    }
    if let (None, Some(Value::String(csv))) = (form.get("emails"), form.get("csv")) {
        let emails = emails_from_csv(csv)?;
        if emails.is_empty() {
            return Err(ApiError::bad_request(
                "the CSV holds no email (a cell with an @); to let anyone take a VM, remove the list instead",
            ));
        }
        return Ok(emails);
    }
    match (form.get("emails"), form.get("csv")) {
        (Some(Value::Array(items)), None) => {
            if items.len() > MAX_ROSTER {
                return Err(ApiError::bad_request(format!(
                    "a list may hold at most {MAX_ROSTER} emails"
                )));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    item.as_str()
                        .ok_or_else(|| {
                            ApiError::bad_request(format!("emails[{i}] is not a string"))
                        })?
                        .parse()
                        .map_err(|e: lablink_core::Error| {
                            ApiError::bad_request(format!("emails[{i}]: {}", e.message()))
                        })
                })
                .collect()
        }
        _ => Err(ApiError::bad_request(
            "send \"emails\" (a list), \"csv\" (text with one participant per line) or \"clear\": true",
        )),
    }
}

/// Body of `PUT /api/v1/roster`: one of the two fields.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct RosterBody {
    /// The emails.
    pub emails: Option<Vec<String>>,
    /// Or a CSV: on each line the first cell with an `@` is the email; other lines are skipped.
    pub csv: Option<String>,
    /// Or `true`: remove the list (anyone may take a VM).
    pub clear: Option<bool>,
}

/// The registered participants.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct RosterView {
    /// How many.
    pub count: usize,
    /// The emails, in order (empty: anyone may take a VM).
    pub emails: Vec<String>,
}

/// The registered participants (empty: anyone may take a VM).
#[utoipa::path(get, path = "/api/v1/roster", tag = "admin",
    responses((status = 200, body = RosterView), (status = 401, body = lablink_protocol::ErrorBody)), security(("admin_basic" = [])))]
pub async fn get_roster(State(state): State<HttpState>, _admin: Admin) -> ApiResult<Json<Value>> {
    Ok(view(&state.allocator().roster().await?))
}

fn view(emails: &[Email]) -> Json<Value> {
    Json(json!({ "count": emails.len(), "emails": emails }))
}

/// Replaces the registered participants: from then on only they may take a VM (every
/// replica within 2 s); an empty list lets anyone in.
#[utoipa::path(put, path = "/api/v1/roster", tag = "admin", request_body = RosterBody,
    responses((status = 200, body = RosterView), (status = 400, description = "A line or entry that is not an email, named", body = lablink_protocol::ErrorBody), (status = 401, body = lablink_protocol::ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn put_roster(State(state): State<HttpState>, req: AdminForm) -> ApiResult<Json<Value>> {
    let outcome = replace(&state, &req).await;
    Ok(view(&outcome?))
}

/// Replaces the roster with the emails `req` sends (recorded in the audit trail); the
/// roster as it now stands.
async fn replace(state: &HttpState, req: &AdminForm) -> ApiResult<Vec<Email>> {
    let outcome = async {
        let emails = emails_from(&req.form)?;
        state.allocator().set_roster(&emails).await?;
        Ok::<_, ApiError>(state.allocator().roster().await?)
    }
    .await;
    let what = What::roster(outcome.as_ref().ok().map(Vec::len));
    let action = AuditAction::RosterChanged;
    audit::record(state, &req.caller, action, what, &outcome).await;
    outcome
}

async fn page(
    State(state): State<HttpState>,
    admin: Admin,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let emails = state.allocator().roster().await?;
    if wants_json(&headers) {
        return Ok(view(&emails).into_response());
    }
    Ok(render(&state, &admin, StatusCode::OK, &emails, None))
}

fn render(
    state: &HttpState,
    admin: &Admin,
    status: StatusCode,
    emails: &[Email],
    notice: Option<(&str, &str)>,
) -> Response {
    state.inner.templates.page(
        status,
        "participants.html",
        json!({
            "csrf": admin.csrf(),
            "emails": emails,
            "access_code": state.options().access_code.is_some(),
            "notice": notice.map(|n| n.0),
            "notice_kind": notice.map(|n| n.1),
        }),
    )
}

async fn upload(State(state): State<HttpState>, admin: Admin, req: AdminForm) -> Response {
    let outcome = replace(&state, &req).await;
    match (outcome, req.wants_json) {
        (Ok(emails), true) => {
            Json(json!({ "count": emails.len(), "emails": emails })).into_response()
        }
        (Err(e), true) => e.into_response(),
        (Ok(emails), false) => {
            let notice = if emails.is_empty() {
                "The list is empty: anyone may take a VM.".to_owned()
            } else {
                format!(
                    "{} registered participants: only they may take a VM.",
                    emails.len()
                )
            };
            render(
                &state,
                &admin,
                StatusCode::OK,
                &emails,
                Some((&notice, "success")),
            )
        }
        (Err(e), false) => {
            let emails = state.allocator().roster().await.unwrap_or_default();
            render(
                &state,
                &admin,
                e.status(),
                &emails,
                Some((e.message(), "error")),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csv_gives_the_first_email_of_each_line() {
        let csv = "name,email\n\"Ada\",\"Ada@Lab.org\"\n\nBob;bob@lab.org;x\n\tcy@lab.org\n";
        let emails: Vec<String> = emails_from_csv(csv)
            .unwrap()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(emails, ["ada@lab.org", "bob@lab.org", "cy@lab.org"]);
        let e = emails_from_csv("ok@lab.org\nbad@@lab.org\n").unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(e.message().starts_with("line 2:"), "{}", e.message());
    }
}
