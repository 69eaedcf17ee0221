//! The browser desktop (docs/protocol.md, "The browser desktop"): the allocator serves a
//! noVNC page and bridges its WebSocket to the VM's VNC server through a WebSocket the VM's
//! agent dials out to the allocator, so the VM needs no inbound port.
//!
//! A participant's browser (its participant cookie names the VM) opens
//! `GET /desktop/websockify`; the relay makes a place at its [`Rendezvous`](relay::Rendezvous)
//! under a fresh session id, records a [`TunnelRequest`] for the VM (which wakes its agent's
//! assignment poll), waits a bounded time for the agent's `GET
//! /api/v1/vms/{hostname}/tunnel/{id}` with that id and the VM's token, and then copies
//! frames both ways ([`relay::pump`]). A tunnel that drops closes the browser's socket; the
//! page reconnects and a new tunnel is asked for. Admins open any VM's desktop at
//! `/admin/vms/{hostname}/desktop`: view-only unless `?control=1`, with the client's input
//! dropped by [`rfb::RfbWatch`]. The first framebuffer update of a participant's session
//! marks the desktop ready.
//!
//! Every refusal before a WebSocket is accepted is a JSON error; nothing here logs or
//! answers a token. The page hands noVNC the VNC password (the first 8 characters of the
//! assignment's PIN) because only the browser holding the participant cookie, or an admin,
//! gets the page.

mod relay;
mod rfb;

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use lablink_core::Allocator as _;
use lablink_core::{
    DesktopChange, DesktopMode, DesktopReport, DesktopStage, Hostname, TunnelRequest, VmRecord,
};
use serde::Deserialize;
use uuid::Uuid;

use self::relay::{Counters, Refusal, Rendezvous};
use self::rfb::Access;
use super::admin_auth::Admin;
use super::agent_auth::Agent;
use super::error::{ApiError, ApiResult};
use super::extract::{vm_hostname, PathText};
use super::public::participant_vm;
use super::HttpState;

/// Settings of the browser desktop (`[desktop]` in the server's configuration).
#[derive(Debug, Clone)]
pub struct DesktopOptions {
    /// Chrome Remote Desktop or the browser desktop (the allocator's `desktop_mode`).
    pub mode: lablink_core::DesktopMode,
    /// The installed `@novnc/novnc` package (the directory holding `core/rfb.js`), served at
    /// `/novnc/`. `None`: the desktop page says noVNC is not installed.
    pub novnc_dir: Option<PathBuf>,
    /// The base URL (`https://…` or `wss://…`) agents dial to reach this replica, when it
    /// is not the allocator URL they were configured with (replicas behind one load
    /// balancer each need their own). `None`: agents dial their configured allocator URL.
    pub relay_url: Option<String>,
    /// Most desktop sessions (waiting or relaying) at once; more get 503.
    pub max_sessions: usize,
    /// Longest a browser waits for its VM's agent to open the tunnel; then 504.
    pub agent_wait: Duration,
}

impl Default for DesktopOptions {
    fn default() -> Self {
        Self {
            mode: lablink_core::DesktopMode::default(),
            novnc_dir: None,
            relay_url: None,
            max_sessions: 1000,
            agent_wait: Duration::from_secs(20),
        }
    }
}

/// How long an agent whose tunnel id is not known yet waits for the browser's place under
/// it (the id reached the agent through the store a moment before the place was made).
const AGENT_GRACE: Duration = Duration::from_secs(5);

/// The relay of one HTTP state: the rendezvous, and what it moved.
#[derive(Debug, Clone)]
pub struct Relay {
    rendezvous: Arc<Rendezvous<WebSocket>>,
    counters: Arc<Counters>,
}

impl Relay {
    /// A relay with the bounds of `options`.
    pub fn new(options: &DesktopOptions) -> Self {
        Self {
            rendezvous: Rendezvous::new(options.max_sessions.max(1)),
            counters: Arc::default(),
        }
    }

    /// What the relay moved so far: `(sessions, bytes to browsers, bytes to VMs, client
    /// messages dropped by view-only sessions)`.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let c = &self.counters;
        (
            c.sessions.load(Ordering::Relaxed),
            c.to_browsers.load(Ordering::Relaxed),
            c.to_vms.load(Ordering::Relaxed),
            c.dropped.load(Ordering::Relaxed),
        )
    }

    /// Desktop sessions waiting or relaying now.
    pub fn live(&self) -> usize {
        self.rendezvous.live()
    }

    /// Browsers waiting for their VM's tunnel now.
    pub fn waiting(&self) -> usize {
        self.rendezvous.waiting()
    }
}

/// The desktop routes.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/desktop", get(participant_page))
        .route("/desktop.js", get(script))
        .route("/desktop/websockify", get(participant_socket))
        .route("/novnc/{*path}", get(novnc_file))
        .route("/api/v1/vms/{hostname}/tunnel/{id}", get(agent_tunnel))
        .route("/admin/vms/{hostname}/desktop", get(admin_page))
        .route(
            "/admin/vms/{hostname}/desktop/websockify",
            get(admin_socket),
        )
}

/// The VNC password of an assignment: the first 8 characters of its PIN (VNC passwords are
/// at most 8 bytes; the agent sets the same).
fn vnc_password(record: &VmRecord) -> Option<String> {
    let pin = record.assignment.as_ref()?.pin.expose();
    Some(pin.chars().take(8).collect())
}

fn page(state: &HttpState, record: &VmRecord, socket: &str, view_only: bool) -> Response {
    let context = minijinja::context! {
        hostname => record.hostname.as_str(),
        socket => socket,
        password => vnc_password(record).unwrap_or_default(),
        view_only => view_only,
        novnc => state.options().desktop.novnc_dir.is_some(),
    };
    state
        .inner
        .templates
        .page(StatusCode::OK, "desktop.html", context)
}

/// 404 unless the deployment serves browser desktops (`[desktop] mode = "browser"`).
fn browser_mode(state: &HttpState) -> ApiResult<()> {
    if state.options().desktop.mode == DesktopMode::Browser {
        Ok(())
    } else {
        Err(ApiError::not_found(
            "this deployment's desktops open with Chrome Remote Desktop, not in the browser",
        ))
    }
}

/// `GET /desktop`: the participant's desktop page; a browser without a VM goes to `/`.
async fn participant_page(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err(e) = browser_mode(&state) {
        return e.into_response();
    }
    match participant_vm(&state, &headers).await {
        Ok(record) => page(&state, &record, "/desktop/websockify", false),
        Err(e) if e.status() == StatusCode::UNAUTHORIZED => Redirect::to("/").into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /desktop.js`: the page's script (a file, not inline, for strict CSPs).
async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../templates/desktop.js"),
    )
        .into_response()
}

/// `GET /novnc/{path}`: a file of the installed noVNC package.
async fn novnc_file(
    State(state): State<HttpState>,
    PathText(path): PathText<String>,
) -> ApiResult<Response> {
    let missing = || ApiError::not_found("no such file");
    let root = state
        .options()
        .desktop
        .novnc_dir
        .as_ref()
        .ok_or_else(missing)?;
    let relative = Path::new(&path);
    if !relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(missing());
    }
    let file = root.join(relative);
    // No symbolic link out of the package.
    let real = tokio::fs::canonicalize(&file)
        .await
        .map_err(|_| missing())?;
    let real_root = tokio::fs::canonicalize(root).await.map_err(|_| missing())?;
    if !real.starts_with(&real_root) {
        return Err(missing());
    }
    let bytes = tokio::fs::read(&real).await.map_err(|_| missing())?;
    let content_type = match real.extension().and_then(|e| e.to_str()) {
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("html") => "text/html; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("woff2") => "font/woff2",
        Some("txt" | "md") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        bytes,
    )
        .into_response())
}

/// 400 for a plain HTTP request to a WebSocket route.
fn not_websocket(rejection: WebSocketUpgradeRejection) -> ApiError {
    ApiError::bad_request(format!(
        "this route speaks WebSocket only ({})",
        rejection.body_text()
    ))
}

/// 403 for a browser WebSocket opened by a page of another site (its `Origin` is not this
/// host): cookies go along with cross-site WebSockets, so they prove nothing alone.
fn same_origin(headers: &HeaderMap) -> ApiResult<()> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, host)| host.trim_end_matches('/'));
    let hosts = [headers.get(header::HOST), headers.get("x-forwarded-host")];
    let matches = hosts
        .into_iter()
        .flatten()
        .filter_map(|h| h.to_str().ok())
        .any(|h| Some(h) == origin_host);
    if matches {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "a desktop connection must come from this site's own page",
        ))
    }
}

/// The URL the agent dials for session `id` of `hostname`: under the configured relay URL
/// (made `ws(s)://`), else the bare path, which the agent resolves against its allocator URL.
fn tunnel_url(relay_url: Option<&str>, hostname: &Hostname, id: Uuid) -> String {
    let path = format!("/api/v1/vms/{hostname}/tunnel/{}", id.simple());
    match relay_url {
        None => path,
        Some(base) => {
            let base = base.trim_end_matches('/');
            let base = if let Some(rest) = base.strip_prefix("https://") {
                format!("wss://{rest}")
            } else if let Some(rest) = base.strip_prefix("http://") {
                format!("ws://{rest}")
            } else {
                base.to_owned()
            };
            format!("{base}{path}")
        }
    }
}

/// A live session's place, the agent's socket for it: asks `hostname`'s agent for a tunnel
/// and waits for it (503 when too many sessions are live, 504 when the agent does not come).
async fn reach_vm(
    state: &HttpState,
    hostname: &Hostname,
) -> ApiResult<(tokio::sync::OwnedSemaphorePermit, WebSocket)> {
    let relay = &state.inner.desktop;
    let permit = relay.rendezvous.session().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many desktops are open right now. Please try again in a moment.",
        )
    })?;
    let waiting = relay.rendezvous.expect(hostname.clone());
    let options = &state.options().desktop;
    let request = TunnelRequest {
        id: waiting.id(),
        url: tunnel_url(options.relay_url.as_deref(), hostname, waiting.id()),
        at: chrono::Utc::now(),
    };
    state
        .allocator()
        .change_desktop(hostname, &DesktopChange::Tunnel(request))
        .await?;
    let agent = waiting.arrival(options.agent_wait).await.ok_or_else(|| {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "The desktop of your VM did not answer. The page tries again by itself; if it keeps failing, ask the organisers.",
        )
    })?;
    Ok((permit, agent))
}

/// Marks the desktop of `hostname`'s current assignment ready (its first frame was relayed).
async fn first_frame(state: HttpState, hostname: Hostname) {
    let record = match state.allocator().vm(&hostname).await {
        Ok(record) => record,
        Err(e) => {
            tracing::warn!(%hostname, error = %e, "cannot mark the desktop ready");
            return;
        }
    };
    let Some(desktop) = record.assignment.map(|a| a.desktop) else {
        return;
    };
    if desktop.stage == DesktopStage::Ready {
        return;
    }
    let report = DesktopReport {
        attempt: desktop.attempt,
        stage: DesktopStage::Ready,
        failure: None,
        exit_status: None,
    };
    if let Err(e) = state
        .allocator()
        .change_desktop(&hostname, &DesktopChange::Report(report))
        .await
    {
        tracing::warn!(%hostname, error = %e, "cannot mark the desktop ready");
    }
}

/// Relays `browser` and the agent's socket once the upgrade is done.
fn relay_session(
    state: HttpState,
    upgrade: WebSocketUpgrade,
    hostname: Hostname,
    access: Access,
    mark_ready: bool,
    reached: (tokio::sync::OwnedSemaphorePermit, WebSocket),
) -> Response {
    let (permit, agent) = reached;
    upgrade
        .protocols(["binary"])
        .on_upgrade(move |browser| async move {
            let _permit = permit;
            let counters = state.inner.desktop.counters.clone();
            let ready = {
                let (state, hostname) = (state.clone(), hostname.clone());
                move || {
                    if mark_ready {
                        tokio::spawn(first_frame(state, hostname));
                    }
                }
            };
            tracing::info!(%hostname, ?access, "desktop session started");
            relay::pump(browser, agent, access, ready, &counters).await;
            tracing::info!(%hostname, "desktop session ended");
        })
}

/// `GET /desktop/websockify`: the participant's VNC connection, to the VM its cookie names.
async fn participant_socket(
    State(state): State<HttpState>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    browser_mode(&state)?;
    let record = participant_vm(&state, &headers).await?;
    connect(
        state,
        &headers,
        upgrade,
        record.hostname,
        Access::Control,
        true,
    )
    .await
}

/// Checks the socket's origin and upgrade, has the VM's agent open its tunnel, and relays
/// the session (`participant`: a participant's, whose first frame marks the desktop ready).
async fn connect(
    state: HttpState,
    headers: &HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    hostname: Hostname,
    access: Access,
    participant: bool,
) -> ApiResult<Response> {
    same_origin(headers)?;
    let upgrade = upgrade.map_err(not_websocket)?;
    let reached = reach_vm(&state, &hostname).await?;
    Ok(relay_session(
        state,
        upgrade,
        hostname,
        access,
        participant,
        reached,
    ))
}

/// `?control=1` gives an admin the keyboard and mouse.
#[derive(Debug, Default, Deserialize)]
struct AdminQuery {
    #[serde(default)]
    control: Option<String>,
}

impl AdminQuery {
    fn access(&self) -> Access {
        match self.control.as_deref() {
            Some("1" | "true") => Access::Control,
            _ => Access::ViewOnly,
        }
    }
}

/// An assigned VM for an admin's desktop view (404 unknown, 409 without an assignment: its
/// VNC password exists only for an assignment).
async fn assigned_vm(state: &HttpState, name: &str) -> ApiResult<VmRecord> {
    let hostname = vm_hostname(name)?;
    let record = state.allocator().vm(&hostname).await?;
    if record.assignment.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this VM is not assigned: its desktop opens once a participant has it",
        ));
    }
    Ok(record)
}

/// `GET /admin/vms/{hostname}/desktop[?control=1]`: an admin's view of a VM's desktop.
async fn admin_page(
    State(state): State<HttpState>,
    _admin: Admin,
    PathText(name): PathText<String>,
    Query(query): Query<AdminQuery>,
) -> ApiResult<Response> {
    browser_mode(&state)?;
    let record = assigned_vm(&state, &name).await?;
    let access = query.access();
    let socket = match access {
        Access::Control => format!(
            "/admin/vms/{}/desktop/websockify?control=1",
            record.hostname
        ),
        Access::ViewOnly => format!("/admin/vms/{}/desktop/websockify", record.hostname),
    };
    Ok(page(&state, &record, &socket, access == Access::ViewOnly))
}

/// The admin's VNC connection: view-only unless `?control=1`.
async fn admin_socket(
    State(state): State<HttpState>,
    _admin: Admin,
    headers: HeaderMap,
    PathText(name): PathText<String>,
    Query(query): Query<AdminQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    browser_mode(&state)?;
    let record = assigned_vm(&state, &name).await?;
    connect(
        state,
        &headers,
        upgrade,
        record.hostname,
        query.access(),
        false,
    )
    .await
}

/// `GET /api/v1/vms/{hostname}/tunnel/{id}`: the agent's side of session `id` (its VM
/// token; 403 for another VM's, 404 when no browser waits for this id).
async fn agent_tunnel(
    State(state): State<HttpState>,
    agent: Agent,
    PathText((name, id)): PathText<(String, String)>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let hostname = agent.own(&name)?;
    browser_mode(&state)?;
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::not_found("no browser waits for this tunnel"))?;
    let upgrade = upgrade.map_err(not_websocket)?;
    let handoff = state
        .inner
        .desktop
        .rendezvous
        .arrive(id, &hostname, AGENT_GRACE)
        .await
        .map_err(|refusal| match refusal {
            Refusal::Unknown => ApiError::not_found("no browser waits for this tunnel"),
            Refusal::OtherVm => ApiError::forbidden("this tunnel is for another VM"),
        })?;
    Ok(upgrade.on_upgrade(move |socket| async move {
        // The browser may have given up meanwhile: the socket then just closes.
        let _ = handoff.send(socket);
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_urls_follow_the_relay_url_or_stay_a_path() {
        let h: Hostname = "vm-1".parse().unwrap();
        let id = Uuid::nil();
        assert_eq!(
            tunnel_url(None, &h, id),
            "/api/v1/vms/vm-1/tunnel/00000000000000000000000000000000"
        );
        assert_eq!(
            tunnel_url(Some("https://relay-2.example.org/"), &h, id),
            "wss://relay-2.example.org/api/v1/vms/vm-1/tunnel/00000000000000000000000000000000"
        );
        assert!(
            tunnel_url(Some("http://10.0.0.2:8080"), &h, id).starts_with("ws://10.0.0.2:8080/api")
        );
    }

    #[test]
    fn a_websocket_from_another_site_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "lablink.example.org".parse().unwrap());
        assert!(same_origin(&h).is_ok(), "no Origin: not a browser");
        h.insert(
            header::ORIGIN,
            "https://lablink.example.org".parse().unwrap(),
        );
        assert!(same_origin(&h).is_ok());
        h.insert(header::ORIGIN, "https://evil.example.com".parse().unwrap());
        assert_eq!(same_origin(&h).unwrap_err().status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn the_page_template_compiles_and_escapes() {
        let render = |view_only: bool| {
            super::super::templates::Templates::new()
                .render(
                    "desktop.html",
                    minijinja::context! {
                        hostname => "vm-1", socket => "/desktop/websockify",
                        password => "12\"<34", view_only => view_only, novnc => true,
                    },
                )
                .unwrap()
        };
        let html = render(true);
        assert!(html.contains("/desktop.js"));
        assert!(!html.contains("12\"<34"), "attribute values are escaped");
        // The script compares with the text `true` (minijinja writes booleans `True`).
        assert!(html.contains(r#"data-view-only="true""#), "{html}");
        assert!(render(false).contains(r#"data-view-only="false""#));
    }
}
