//! The admin UI: sign-in, the VM table with live updates (server-sent events), a VM's logs,
//! launch, destroy (with confirmation), reboot, release and operation progress. Every page
//! also answers JSON to `Accept: application/json`.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{AppendHeaders, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use lablink_core::Allocator as _;
use lablink_core::{DestroyTarget, Hostname, SupervisorStatus, VmFilter};
use serde::Deserialize;
use serde_json::{json, Value};

use super::admin_auth::{
    cookie, cookie_value, random_token, Admin, AdminForm, LOGIN_COOKIE, SESSION_COOKIE,
};
// The launch form posts what the Python client's /api/launch takes, answered the same way.
use super::compat_admin::{answer, form_hostname, launch, started};
use super::error::{ApiError, ApiResult};
use super::extract::{wants_json, ApiQuery, FormOrJson, PathHostname};
use super::views::{LogsView, OperationView, VmView};
use super::HttpState;

/// How many operations the dashboard shows.
const DASHBOARD_OPERATIONS: usize = 10;

/// The admin UI routes (`/admin/events` is routed as a held request).
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/admin", get(dashboard))
        .route("/admin/login", get(login_page).post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/vms/{hostname}", get(vm_page))
        .route("/admin/launch", post(launch))
        .route("/admin/reboot", post(reboot))
        .route("/admin/release", post(release))
        .route("/admin/collect", post(collect))
}

/// How many recent supervisor events the dashboard shows.
const DASHBOARD_SUPERVISOR_EVENTS: usize = 10;

/// The dashboard data: VMs (with the supervisor's flags), counts, recent operations, and
/// the supervisor's state (`null` when none runs).
async fn dashboard_data(state: &HttpState) -> ApiResult<Value> {
    let allocator = state.allocator();
    let supervision = allocator.supervision();
    let vms_records = allocator.vms(&VmFilter::default()).await?;
    let vms: Vec<Value> = vms_records
        .iter()
        .map(|record| {
            let mut vm = json!(VmView::from(record));
            let flags: Vec<&str> = supervision
                .iter()
                .flat_map(|s| &s.flags)
                .filter(|f| f.hostname == record.hostname)
                .map(|f| f.message.as_str())
                .collect();
            vm["flags"] = json!(flags);
            vm
        })
        .collect();
    let counts = allocator.counts().await?;
    let operations: Vec<OperationView> = allocator
        .operations(DASHBOARD_OPERATIONS)
        .await?
        .iter()
        .map(OperationView::from)
        .collect();
    let hostnames: Vec<Hostname> = vms_records.iter().map(|r| r.hostname.clone()).collect();
    let mut collections = Vec::new();
    for hostname in &hostnames {
        if let Some(c) = state.collector().status(hostname.as_str()).await? {
            collections.push(json!({
                "hostname": c.hostname,
                "state": c.state,
                "attempts": c.attempts,
                "files": c.files,
                "bytes": c.bytes,
                "skipped": c.skipped,
                "updated_at": c.updated_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
                "error": c.error,
            }));
        }
    }
    Ok(json!({
        "vms": vms,
        "collections": collections,
        "counts": counts,
        "operations": operations,
        "supervisor": supervision.map(supervisor_view),
    }))
}

/// The supervisor's state for the dashboard: times as text, newest events first.
fn supervisor_view(status: SupervisorStatus) -> Value {
    let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
    };
    let recent: Vec<Value> = status
        .recent
        .iter()
        .rev()
        .take(DASHBOARD_SUPERVISOR_EVENTS)
        .map(|(at, what)| json!({ "at": when(Some(*at)), "what": what }))
        .collect();
    json!({
        "id": status.id,
        "running": status.running,
        "leader": status.leader,
        "leader_holder": status.leader_holder,
        "leader_until": when(status.leader_until),
        "last_tick": when(status.last_tick),
        "pool_target": status.pool_target,
        "pool_free": status.pool_free,
        "destruction_at": when(status.destruction_at),
        "destruction_warning": status.destruction_warning,
        "last_reconcile_at": when(status.last_reconcile_at),
        "last_reconcile": status.last_reconcile,
        "counters": status.counters,
        "flags": status.flags,
        "recent": recent,
        "last_error": status.last_error,
    })
}

async fn dashboard(
    State(state): State<HttpState>,
    admin: Admin,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let data = dashboard_data(&state).await?;
    if wants_json(&headers) {
        return Ok(Json(data).into_response());
    }
    let mut context = data;
    context["csrf"] = json!(admin.csrf());
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

/// `GET /admin/events`: server-sent events with re-rendered fragments of the VM table,
/// the operations and the summary, sent whenever they change. Lives only in the response
/// stream; ends on disconnect or shutdown.
pub async fn events(
    State(state): State<HttpState>,
    admin: Admin,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let every = state.options().admin_refresh;
    // The VM rows carry forms (collect one VM), which need the session's CSRF token.
    let csrf = admin.csrf().to_owned();
    let stop = {
        let state = state.clone();
        async move { state.shutting_down().await }
    };
    let updates = stream::unfold(
        (
            state,
            [
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
            true,
        ),
        move |(state, mut last, first)| {
            let csrf = csrf.clone();
            async move {
                if !first {
                    tokio::time::sleep(every).await;
                }
                let mut out = Vec::new();
                if let Ok(mut data) = dashboard_data(&state).await {
                    data["csrf"] = json!(csrf);
                    let c = &data["counts"];
                    let fragments = [
                        ("vms", state.inner.templates.render("vm_rows.html", &data)),
                        (
                            "operations",
                            state.inner.templates.render("operations.html", &data),
                        ),
                        (
                            "supervisor",
                            state.inner.templates.render("supervisor.html", &data),
                        ),
                        (
                            "collections",
                            state.inner.templates.render("collections.html", &data),
                        ),
                        (
                            "summary",
                            Ok(format!(
                                "{} total, {} free, {} assigned",
                                c["total"], c["assignable"], c["assigned"]
                            )),
                        ),
                    ];
                    for (i, (name, html)) in fragments.into_iter().enumerate() {
                        match html {
                            Ok(html) if html != last[i] => {
                                out.push(Ok(Event::default().event(name).data(html.clone())));
                                last[i] = html;
                            }
                            Ok(_) => {}
                            Err(e) => tracing::error!(error = %e, "admin fragment failed"),
                        }
                    }
                }
                Some((stream::iter(out), (state, last, false)))
            }
        },
    )
    .flatten()
    .take_until(stop);
    Sse::new(updates).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
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
    match state.verify_admin(addr, user, password).await {
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

async fn logout(State(state): State<HttpState>, headers: HeaderMap, _req: AdminForm) -> Response {
    // Signed out on every replica (kept in the store until the cookie would expire).
    if let Some(value) = cookie_value(&headers, SESSION_COOKIE) {
        if let Err(e) = state
            .inner
            .admin
            .end_session(&**state.allocator(), &value)
            .await
        {
            return e.into_response();
        }
    }
    // The cookie is cleared with the attributes it was set with (`Secure` only matters for
    // setting it; browsers accept the clearing either way).
    let clear = cookie(SESSION_COOKIE, "", Duration::ZERO, false);
    ([(header::SET_COOKIE, clear)], Redirect::to("/admin/login")).into_response()
}

/// Query of the destroy confirmation page.
#[derive(Debug, Deserialize)]
pub struct DestroyQuery {
    hostname: Option<String>,
}

/// The page confirming a destroy.
pub async fn confirm_destroy(
    State(state): State<HttpState>,
    admin: Admin,
    ApiQuery(query): ApiQuery<DestroyQuery>,
) -> ApiResult<Response> {
    let (hostname, count, assigned) = match query.hostname.filter(|h| !h.is_empty()) {
        Some(name) => {
            let hostname = form_hostname(Some(&Value::String(name)))?;
            let record = state.allocator().vm(&hostname).await?;
            (
                Some(hostname.to_string()),
                1,
                usize::from(record.assignment.is_some()),
            )
        }
        None => {
            let counts = state.allocator().counts().await?;
            (None, counts.total, counts.assigned)
        }
    };
    Ok(state.inner.templates.page(
        StatusCode::OK,
        "confirm.html",
        json!({ "csrf": admin.csrf(), "hostname": hostname, "count": count, "assigned": assigned }),
    ))
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
    answer(&state, req.wants_json, outcome)
}

async fn reboot(State(state): State<HttpState>, req: AdminForm) -> Response {
    let outcome = async {
        let hostname = form_hostname(req.form.get("hostname"))?;
        let op = state.allocator().reboot(&hostname).await?;
        Ok(started(&op))
    }
    .await;
    answer(&state, req.wants_json, outcome)
}

/// Starts a collection on every VM (`all`) or one (`hostname`).
async fn collect(State(state): State<HttpState>, req: AdminForm) -> Response {
    let outcome = async {
        let started = super::collect::start(&state, &req.form).await?;
        Ok((StatusCode::ACCEPTED, json!({ "collections": started })))
    }
    .await;
    answer(&state, req.wants_json, outcome)
}

async fn release(State(state): State<HttpState>, req: AdminForm) -> Response {
    let outcome = async {
        let hostname = form_hostname(req.form.get("hostname"))?;
        let record = state.allocator().release(&hostname).await?;
        Ok((StatusCode::OK, json!({ "vm": VmView::from(&record) })))
    }
    .await;
    answer(&state, req.wants_json, outcome)
}
