//! Reading the audit trail (recorded by [`audit`](super::audit)): the admin page
//! `/admin/audit` (the newest 200 entries, with a link to older ones) and
//! `GET /api/v1/audit` (JSON, a page at a time).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use lablink_core::{Allocator as _, AuditEntry, AuditQuery};
use lablink_protocol::ErrorBody;
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;
use uuid::Uuid;

use super::admin_auth::Admin;
use super::error::ApiResult;
use super::extract::{wants_json, ApiQuery};
use super::HttpState;

/// Entries on one page of `/admin/audit`.
const PAGE_ENTRIES: usize = 200;
/// Entries `GET /api/v1/audit` answers without `limit`.
const DEFAULT_LIMIT: usize = 100;
/// Most entries `GET /api/v1/audit` answers.
const MAX_LIMIT: usize = 1000;

/// The audit trail's routes.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/admin/audit", get(page))
        .route("/api/v1/audit", get(list))
}

/// Query of `GET /api/v1/audit`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct AuditParams {
    /// How many entries (newest first; default 100, at most 1000).
    pub limit: Option<usize>,
    /// Only entries older than the entry with this id (the last id of the previous page).
    pub before: Option<Uuid>,
}

/// The audit trail of admin actions (sign-ins, launches, destroys, settings changes...),
/// newest first: who, when, from which address, what, and whether it worked.
#[utoipa::path(get, path = "/api/v1/audit", tag = "admin", params(AuditParams),
    responses((status = 200, body = [AuditEntry]), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn list(
    State(state): State<HttpState>,
    _admin: Admin,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    let query = AuditQuery {
        limit: params.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT),
        before: params.before,
    };
    Ok(Json(state.allocator().audit_log(&query).await?))
}

/// Query of the page.
#[derive(Debug, Deserialize)]
struct PageQuery {
    before: Option<Uuid>,
}

/// The page: 200 entries older than `before` (the newest without it). Answers JSON (the
/// entries) to `Accept: application/json`.
async fn page(
    State(state): State<HttpState>,
    admin: Admin,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> ApiResult<Response> {
    // One more than shown tells whether there are older entries.
    let mut entries = state
        .allocator()
        .audit_log(&AuditQuery {
            limit: PAGE_ENTRIES + 1,
            before: query.before,
        })
        .await?;
    let more = entries.len() > PAGE_ENTRIES;
    entries.truncate(PAGE_ENTRIES);
    if wants_json(&headers) {
        return Ok(Json(entries).into_response());
    }
    let rows: Vec<_> = entries
        .iter()
        .map(|e| {
            json!({
                "id": e.id,
                "at": e.at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
                "actor": e.actor,
                "address": e.address,
                "action": e.action.as_str(),
                "what": e.action.as_str().replace('_', " "),
                "target": e.target,
                "detail": e.detail,
                "ok": e.ok,
            })
        })
        .collect();
    let older = entries.last().filter(|_| more).map(|e| e.id);
    Ok(state.inner.templates.page(
        StatusCode::OK,
        "audit.html",
        json!({
            "csrf": admin.csrf(),
            "entries": rows,
            "older": older,
            "paged": query.before.is_some(),
        }),
    ))
}
