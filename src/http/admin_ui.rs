//! The admin UI: sign-in, the VM table with live updates (server-sent events), a VM's logs,
//! launch, destroy (with confirmation), reboot, release and operation progress. Every page
//! also answers JSON to `Accept: application/json`.

use std::time::Duration;

use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{AppendHeaders, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lablink_core::Allocator as _;
use lablink_core::{AuditAction, DestroyTarget};
use serde::Deserialize;
use serde_json::{json, Value};

use super::admin_auth::{
    cookie, cookie_value, random_token, Admin, AdminForm, LOGIN_COOKIE, SESSION_COOKIE,
};
use super::audit::{self, Answered, Via, What};
// The launch form posts what the Python client's /api/launch takes, answered the same way.
use super::compat_admin::{answer, form_hostname, launch, started};
use super::error::{ApiError, ApiResult};
use super::extract::{wants_json, ApiQuery, FormOrJson, PathHostname};
use super::live::dashboard_data;
use super::views::{LogsView, VmView};
use super::HttpState;

/// The admin UI routes (`/admin/events` is routed as a held request).
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/admin", get(dashboard))
        .route("/admin/login", get(login_page).post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/vms/{hostname}", get(vm_page))
        .route("/admin/confirm", get(confirm))
        .route("/admin/launch", post(launch))
        .route("/admin/reboot", post(reboot))
        .route("/admin/release", post(release))
        .route("/admin/collect", post(collect))
}

/// Query of the dashboard: a filter and a page of the VM table.
#[derive(Debug, Deserialize)]
struct DashboardQuery {
    #[serde(default)]
    q: String,
    #[serde(default = "first_page")]
    page: usize,
}

fn first_page() -> usize {
    1
}

/// VM rows on one page of the dashboard.
const PAGE_ROWS: usize = 200;

async fn dashboard(
    State(state): State<HttpState>,
    admin: Admin,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<DashboardQuery>,
) -> ApiResult<Response> {
    if wants_json(&headers) {
        return Ok(Json(dashboard_data(&state).await?).into_response());
    }
    let page = query.page.max(1);
    let live = state
        .inner
        .live
        .page(
            &state,
            state.options().admin_refresh / 2,
            query.q.trim(),
            page - 1,
            PAGE_ROWS,
        )
        .await?;
    let pages = live.matching.div_ceil(PAGE_ROWS).max(1);
    let link = |page: usize| {
        let query =
            serde_urlencoded::to_string([("q", query.q.trim()), ("page", &page.to_string())])
                .unwrap_or_default();
        format!("/admin?{query}")
    };
    let counts = state.allocator().counts().await?;
    let context = json!({
        "csrf": admin.csrf(),
        "rows": live.rows,
        "version": live.version,
        "fragments": live.fragments,
        "counts": counts,
        "q": query.q.trim(),
        "page": page,
        "pages": pages,
        "matching": live.matching,
        "previous": (page > 1).then(|| link(page - 1)),
        "next": (page < pages).then(|| link(page + 1)),
    });
    Ok(state
        .inner
        .templates
        .page(StatusCode::OK, "admin.html", context))
}

async fn vm_page(
    State(state): State<HttpState>,
    admin: Admin,
    headers: HeaderMap,
    PathHostname(hostname): PathHostname,
) -> ApiResult<Response> {
    let record = state.allocator().vm(&hostname).await?;
    let logs = state.allocator().logs(&hostname).await?;
    let data = json!({
        "vm": VmView::from(&record),
        "logs": LogsView {
            hostname: hostname.to_string(),
            cloud_init: logs.cloud_init,
            container: logs.container,
            agent: logs.agent,
        },
    });
    if wants_json(&headers) {
        return Ok(Json(data).into_response());
    }
    let mut context = data;
    context["csrf"] = json!(admin.csrf());
    Ok(state
        .inner
        .templates
        .page(StatusCode::OK, "vm.html", context))
}

async fn login_page(State(state): State<HttpState>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    if matches!(
        Admin::identify(&parts, &state).await,
        Ok(Some(Admin::Session { .. }))
    ) {
        return Redirect::to("/admin").into_response();
    }
    login_form(&state, state.is_https(&parts), StatusCode::OK, None)
}

fn login_form(
    state: &HttpState,
    secure: bool,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    let csrf = random_token();
    let cookie = cookie(LOGIN_COOKIE, &csrf, Duration::from_secs(3600), secure);
    let page = state.inner.templates.page(
        status,
        "login.html",
        json!({ "csrf": csrf, "error": error }),
    );
    ([(header::SET_COOKIE, cookie)], page).into_response()
}

async fn login(State(state): State<HttpState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let addr = state.client_addr(&parts);
    let secure = state.is_https(&parts);
    let req = Request::from_parts(parts, body);
    let sent_cookie = cookie_value(req.headers(), LOGIN_COOKIE);
    let form = match <FormOrJson as FromRequest<HttpState>>::from_request(req, &state).await {
        Ok(form) => form,
        Err(e) => return e.into_response(),
    };
    let csrf_ok =
        matches!((sent_cookie.as_deref(), form.text("csrf")), (Some(a), Some(b)) if a == b);
    if !csrf_ok {
        return login_form(
            &state,
            secure,
            StatusCode::FORBIDDEN,
            Some("The sign-in form expired; please try again."),
        );
    }
    let (user, password) = (
        form.text("username").unwrap_or(""),
        form.text("password").unwrap_or(""),
    );
    let verified = state.verify_admin(addr, user, password).await;
    audit::sign_in(&state, user, Via::Session, addr, What::nothing(), &verified).await;
    match verified {
        Ok(()) => {
            let session = match state.inner.admin.start_session(&**state.allocator()).await {
                Ok(session) => session,
                Err(e) => return e.into_response(),
            };
            tracing::info!(client = %addr, "admin signed in");
            let clear = cookie(LOGIN_COOKIE, "", Duration::ZERO, secure);
            (
                AppendHeaders([
                    (
                        header::SET_COOKIE,
                        state.inner.admin.session_cookie(&session, secure),
                    ),
                    (header::SET_COOKIE, clear),
                ]),
                Redirect::to("/admin"),
            )
                .into_response()
        }
        Err(e) => e.retry_after(login_form(&state, secure, e.status(), Some(e.message()))),
    }
}

async fn logout(State(state): State<HttpState>, headers: HeaderMap, req: AdminForm) -> Response {
    // Signed out on every replica (kept in the store until the cookie would expire).
    if let Some(value) = cookie_value(&headers, SESSION_COOKIE) {
        let ended = state
            .inner
            .admin
            .end_session(&**state.allocator(), &value)
            .await;
        let (action, what) = (AuditAction::SignOut, What::nothing());
        audit::record(&state, &req.caller, action, what, &ended).await;
        if let Err(e) = ended {
            return e.into_response();
        }
    }
    // The cookie is cleared with the attributes it was set with (`Secure` only matters for
    // setting it; browsers accept the clearing either way).
    let clear = cookie(SESSION_COOKIE, "", Duration::ZERO, false);
    ([(header::SET_COOKIE, clear)], Redirect::to("/admin/login")).into_response()
}

/// Query of a confirmation page.
#[derive(Debug, Deserialize)]
pub struct ConfirmQuery {
    hostname: Option<String>,
    action: Option<String>,
}

/// The page confirming a destroy (`GET /admin/destroy`): one VM or all.
pub async fn confirm_destroy(
    State(state): State<HttpState>,
    admin: Admin,
    ApiQuery(query): ApiQuery<ConfirmQuery>,
) -> ApiResult<Response> {
    confirm_page(&state, &admin, "destroy", query.hostname).await
}

/// The page confirming a reboot, release or destroy of one VM (`GET /admin/confirm`).
async fn confirm(
    State(state): State<HttpState>,
    admin: Admin,
    ApiQuery(query): ApiQuery<ConfirmQuery>,
) -> ApiResult<Response> {
    let action = match query.action.as_deref() {
        Some(a @ ("reboot" | "release" | "destroy")) => a,
        _ => {
            return Err(ApiError::bad_request(
                "action must be reboot, release or destroy",
            ))
        }
    };
    if query.hostname.as_deref().is_none_or(str::is_empty) {
        return Err(ApiError::bad_request("hostname is required"));
    }
    confirm_page(&state, &admin, action, query.hostname).await
}

/// Names the VM (or how many, for all) and who holds it before the admin says yes.
async fn confirm_page(
    state: &HttpState,
    admin: &Admin,
    action: &str,
    hostname: Option<String>,
) -> ApiResult<Response> {
    let context = match hostname.filter(|h| !h.is_empty()) {
        Some(name) => {
            let hostname = form_hostname(Some(&Value::String(name)))?;
            let record = state.allocator().vm(&hostname).await?;
            json!({
                "hostname": hostname.to_string(),
                "participant": record.owner().map(|e| e.to_string()),
                "count": 1,
                "assigned": usize::from(record.assignment.is_some()),
            })
        }
        None => {
            let counts = state.allocator().counts().await?;
            json!({ "hostname": null, "count": counts.total, "assigned": counts.assigned })
        }
    };
    let mut context = context;
    context["action"] = json!(action);
    context["csrf"] = json!(admin.csrf());
    Ok(state
        .inner
        .templates
        .page(StatusCode::OK, "confirm.html", context))
}

/// Destroys one VM or all (collecting first when configured).
pub async fn destroy(State(state): State<HttpState>, req: AdminForm) -> Response {
    let outcome = async {
        if req.form.text("confirm") != Some("yes") {
            return Err(ApiError::bad_request("destroying needs confirm=yes"));
        }
        let target = match req.form.text("hostname") {
            Some(_) => DestroyTarget::Hostnames(vec![form_hostname(req.form.get("hostname"))?]),
            None => DestroyTarget::All,
        };
        let force = super::collect::force_field(&req.form)?;
        let destroyed = state.allocator().destroy_collecting(&target, force).await?;
        super::compat_admin::destroyed_answer(&destroyed, req.wants_json)
    }
    .await;
    let what = What::vm_or_all(req.form.text("hostname"));
    let answered = Answered(&outcome);
    audit::record(&state, &req.caller, AuditAction::Destroy, what, &answered).await;
    answer(&state, req.wants_json, outcome)
}

async fn reboot(State(state): State<HttpState>, req: AdminForm) -> Response {
    let outcome = async {
        let hostname = form_hostname(req.form.get("hostname"))?;
        let op = state.allocator().reboot(&hostname).await?;
        Ok(started(&op))
    }
    .await;
    let what = What::vm(req.form.text("hostname"));
    audit::record(&state, &req.caller, AuditAction::Reboot, what, &outcome).await;
    answer(&state, req.wants_json, outcome)
}

/// Starts a collection on every VM (`all`) or one (`hostname`).
async fn collect(State(state): State<HttpState>, req: AdminForm) -> Response {
    let outcome = async {
        let started = super::collect::start(&state, &req.form).await?;
        Ok((StatusCode::ACCEPTED, json!({ "collections": started })))
    }
    .await;
    let what = What::chosen(&req.form);
    audit::record(&state, &req.caller, AuditAction::Collect, what, &outcome).await;
    answer(&state, req.wants_json, outcome)
}

async fn release(State(state): State<HttpState>, req: AdminForm) -> Response {
    let outcome = async {
        let hostname = form_hostname(req.form.get("hostname"))?;
        let record = state.allocator().release(&hostname).await?;
        Ok((StatusCode::OK, json!({ "vm": VmView::from(&record) })))
    }
    .await;
    let what = What::vm(req.form.text("hostname"));
    audit::record(&state, &req.caller, AuditAction::Release, what, &outcome).await;
    answer(&state, req.wants_json, outcome)
}
