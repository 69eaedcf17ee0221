//! The admin dashboard's live view, rendered once for every viewer.
//!
//! While anyone watches, one task per replica reads the fleet every `admin_refresh`, renders
//! each VM's table row and the other dashboard fragments, and keeps them with the version at
//! which each last changed. A viewer's event stream sends what changed since the version it
//! last saw (the page it loaded says which; a reconnecting browser sends `Last-Event-ID`),
//! so a change to one VM costs every viewer that one row, not the table. Pages are rendered
//! from the same rows.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream, StreamExt};
use lablink_core::Allocator as _;
use lablink_core::{SupervisorStatus, VmFilter, VmRecord};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::admin_auth::Admin;
use super::error::{ApiError, ApiResult};
use super::extract::ApiQuery;
use super::views::{OperationView, VmView};
use super::HttpState;

/// Live admin views one replica serves at once; more are refused (503) rather than
/// slowing the allocator for participants.
pub const MAX_LIVE_VIEWS: usize = 64;

/// How many removed VMs the view remembers, so a viewer that was away learns of them.
const REMEMBERED_REMOVALS: usize = 4096;

/// How many recent operations the dashboard shows.
const DASHBOARD_OPERATIONS: usize = 10;

/// How many recent supervisor events the dashboard shows.
const DASHBOARD_SUPERVISOR_EVENTS: usize = 10;

/// The dashboard fragments other than the VM rows, in the order they are sent.
const FRAGMENTS: [&str; 5] = [
    "operations",
    "supervisor",
    "collections",
    "usage",
    "summary",
];

/// The shared live view of one replica.
#[derive(Debug)]
pub struct LiveView {
    snapshot: Mutex<Snapshot>,
    /// One refresh at a time (a page load and the publisher may both want one).
    refreshing: tokio::sync::Mutex<()>,
    /// The newest version; viewers wait on it.
    version: watch::Sender<u64>,
    /// Tells this replica's versions from another's (and from before a restart).
    epoch: u32,
    streams: AtomicUsize,
}

#[derive(Debug, Default)]
struct Snapshot {
    version: u64,
    refreshed: Option<Instant>,
    /// Whether the publishing task runs.
    publishing: bool,
    /// VM rows in the fleet's order, by hostname.
    order: Vec<String>,
    rows: BTreeMap<String, Row>,
    removed: VecDeque<(u64, String)>,
    /// Versions below this are too old to catch up from (removals were forgotten).
    horizon: u64,
    fragments: [(u64, String); 5],
}

#[derive(Debug)]
struct Row {
    version: u64,
    /// The VM's view as last seen, to skip rendering rows that did not change.
    view: String,
    html: String,
}

/// What a viewer is sent.
#[derive(Debug, PartialEq)]
enum Change {
    Row {
        hostname: String,
        html: String,
    },
    Removed(String),
    Fragment(&'static str, String),
    /// The viewer is too far behind: reload the page.
    Reload,
}

/// The rows one page shows.
#[derive(Debug)]
pub struct Page {
    /// Rendered rows of this page.
    pub rows: Vec<String>,
    /// The version the page shows, as its event stream takes it (`?since=`).
    pub version: String,
    /// Rows matching the filter, over all pages.
    pub matching: usize,
    /// The other fragments, by name.
    pub fragments: BTreeMap<&'static str, String>,
}

impl Default for LiveView {
    fn default() -> Self {
        Self {
            snapshot: Mutex::default(),
            refreshing: tokio::sync::Mutex::new(()),
            version: watch::channel(0).0,
            epoch: rand::random(),
            streams: AtomicUsize::new(0),
        }
    }
}

impl LiveView {
    fn snapshot(&self) -> MutexGuard<'_, Snapshot> {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the fleet and records what changed, unless another refresh happened within
    /// `fresh`.
    async fn refresh(self: &Arc<Self>, state: &HttpState, fresh: Duration) -> ApiResult<()> {
        let _one = self.refreshing.lock().await;
        if self
            .snapshot()
            .refreshed
            .is_some_and(|at| at.elapsed() < fresh)
        {
            return Ok(());
        }
        let data = read(state).await?;
        // Building thousands of views and rows is CPU work: off the threads that serve
        // requests.
        let (live, state) = (self.clone(), state.clone());
        tokio::task::spawn_blocking(move || live.apply(&state, data))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "the admin live view's refresh failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the admin page could not be rendered",
                )
            })?
    }

    /// Records what changed between the snapshot and `data`.
    fn apply(&self, state: &HttpState, data: Read) -> ApiResult<()> {
        let templates = &state.inner.templates;
        let fragments = [
            render(templates, "operations.html", &data.context)?,
            render(templates, "supervisor.html", &data.context)?,
            render(templates, "collections.html", &data.context)?,
            render(templates, "usage.html", &data.context)?,
            data.summary,
        ];
        // What each row shows; only a row whose shown fields changed is rendered again.
        let views: Vec<(String, Value)> = data
            .records
            .iter()
            .map(|r| {
                (
                    r.hostname.to_string(),
                    row_view(r, data.supervision.as_ref()),
                )
            })
            .collect();
        let keys: Vec<String> = views.iter().map(|(_, v)| v.to_string()).collect();
        let stale: Vec<bool> = {
            let snap = self.snapshot();
            views
                .iter()
                .zip(&keys)
                .map(|((h, _), key)| snap.rows.get(h).is_none_or(|row| row.view != *key))
                .collect()
        };
        // Rendered without the lock (viewers keep reading), and nothing changes unless
        // every row rendered.
        let mut rendered = Vec::with_capacity(views.len());
        for ((hostname, vm), stale) in views.into_iter().zip(stale) {
            let html = match stale {
                true => Some(render(templates, "vm_row.html", &json!({ "vm": vm }))?),
                false => None,
            };
            rendered.push((hostname, html));
        }
        // Refreshes run one at a time, so the rows are as they were when compared.
        let mut snap = self.snapshot();
        let version = snap.version + 1;
        let mut changed = false;
        let mut order = Vec::with_capacity(rendered.len());
        let mut rows = BTreeMap::new();
        for ((hostname, html), view) in rendered.into_iter().zip(keys) {
            let old = snap.rows.remove(&hostname);
            let row = match (old, html) {
                (Some(old), None) => old,
                (Some(old), Some(html)) if old.html == html => Row { view, ..old },
                (_, html) => {
                    changed = true;
                    Row {
                        version,
                        view,
                        html: html.unwrap_or_default(),
                    }
                }
            };
            order.push(hostname.clone());
            rows.insert(hostname, row);
        }
        for gone in std::mem::replace(&mut snap.rows, rows).into_keys() {
            changed = true;
            snap.removed.push_back((version, gone));
        }
        while snap.removed.len() > REMEMBERED_REMOVALS {
            if let Some((v, _)) = snap.removed.pop_front() {
                snap.horizon = v;
            }
        }
        snap.order = order;
        for (slot, html) in snap.fragments.iter_mut().zip(fragments) {
            if slot.1 != html {
                *slot = (version, html);
                changed = true;
            }
        }
        snap.refreshed = Some(Instant::now());
        if changed {
            snap.version = version;
            drop(snap);
            self.version.send_replace(version);
        }
        Ok(())
    }

    /// Everything that changed after version `since` (all of it for 0), with the version
    /// it brings the viewer to.
    fn changes_since(&self, since: u64) -> (Vec<Change>, u64) {
        let snap = self.snapshot();
        if since > 0 && since < snap.horizon || since > snap.version {
            return (vec![Change::Reload], snap.version);
        }
        let mut changes: Vec<Change> = snap
            .removed
            .iter()
            .filter(|(v, _)| *v > since)
            .map(|(_, h)| Change::Removed(h.clone()))
            .collect();
        changes.extend(snap.order.iter().filter_map(|h| {
            let row = snap.rows.get(h)?;
            (row.version > since).then(|| Change::Row {
                hostname: h.clone(),
                html: row.html.clone(),
            })
        }));
        changes.extend(
            FRAGMENTS
                .iter()
                .zip(&snap.fragments)
                .filter(|(_, (v, _))| *v > since)
                .map(|(name, (_, html))| Change::Fragment(name, html.clone())),
        );
        (changes, snap.version)
    }

    /// The rows of page `page` (from 0) of `size` rows that contain `filter` (any case),
    /// refreshed first if older than `fresh`.
    pub async fn page(
        self: &Arc<Self>,
        state: &HttpState,
        fresh: Duration,
        filter: &str,
        page: usize,
        size: usize,
    ) -> ApiResult<Page> {
        self.refresh(state, fresh).await?;
        let snap = self.snapshot();
        let filter = filter.to_lowercase();
        let matching: Vec<&Row> = snap
            .order
            .iter()
            .filter_map(|h| snap.rows.get(h))
            .filter(|row| filter.is_empty() || text_of(&row.html).contains(&filter))
            .collect();
        Ok(Page {
            rows: matching
                .iter()
                .skip(page.saturating_mul(size))
                .take(size)
                .map(|row| row.html.clone())
                .collect(),
            version: self.event_id(snap.version),
            matching: matching.len(),
            fragments: FRAGMENTS
                .iter()
                .zip(&snap.fragments)
                .map(|(name, (_, html))| (*name, html.clone()))
                .collect(),
        })
    }

    /// A version as viewers see it: this replica's epoch and the number.
    fn event_id(&self, version: u64) -> String {
        format!("{}.{version}", self.epoch)
    }

    /// The version an event id names: 0 (everything) for another replica's or a
    /// restarted one's.
    fn version_of(&self, id: &str) -> u64 {
        match id.split_once('.') {
            Some((epoch, version)) if epoch == self.epoch.to_string() => {
                version.parse().unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// Starts the publishing task unless it runs; it stops once no viewer is left.
    fn publish(self: &Arc<Self>, state: &HttpState) {
        let mut snap = self.snapshot();
        if snap.publishing {
            return;
        }
        snap.publishing = true;
        let (live, state) = (self.clone(), state.clone());
        tokio::spawn(async move {
            let every = state.options().admin_refresh;
            loop {
                if let Err(e) = live.refresh(&state, every / 2).await {
                    tracing::warn!(
                        error = e.message(),
                        "the admin live view could not read the fleet"
                    );
                }
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = state.shutting_down() => {}
                }
                let mut snap = live.snapshot();
                if live.streams.load(Ordering::SeqCst) == 0 || state.is_shutting_down() {
                    snap.publishing = false;
                    return;
                }
            }
        });
    }
}

/// Holds one of the [`MAX_LIVE_VIEWS`] places while a viewer's stream lives.
#[derive(Debug)]
struct StreamPlace(Arc<LiveView>);

impl Drop for StreamPlace {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The text a filter looks in: the row without its tags, lower case.
fn text_of(html: &str) -> String {
    let mut text = String::with_capacity(html.len() / 2);
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.extend(c.to_lowercase()),
            _ => {}
        }
    }
    text
}

fn render(
    templates: &super::templates::Templates,
    name: &str,
    context: &Value,
) -> ApiResult<String> {
    templates.render(name, context).map_err(|e| {
        tracing::error!(template = name, error = %e, "admin fragment failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the admin page could not be rendered",
        )
    })
}

/// What one refresh reads.
struct Read {
    records: Vec<VmRecord>,
    supervision: Option<SupervisorStatus>,
    /// The context of the other fragments.
    context: Value,
    summary: String,
}

async fn read(state: &HttpState) -> ApiResult<Read> {
    let (records, supervision, mut context) = dashboard_parts(state).await?;
    let c = &context["counts"];
    let summary = format!(
        "{} total, {} free, {} assigned",
        c["total"], c["assignable"], c["assigned"]
    );
    context["usage"] = super::export::usage_view(state).await?;
    Ok(Read {
        records,
        supervision,
        context,
        summary,
    })
}

/// The dashboard data: VMs (with the supervisor's flags), counts, recent operations,
/// collections, and the supervisor's state (`null` when none runs).
pub async fn dashboard_data(state: &HttpState) -> ApiResult<Value> {
    let (records, supervision, mut data) = dashboard_parts(state).await?;
    data["vms"] = records
        .iter()
        .map(|record| vm_view(record, supervision.as_ref()))
        .collect();
    Ok(data)
}

/// The VM records, the supervisor's state, and the dashboard data without the VMs.
async fn dashboard_parts(
    state: &HttpState,
) -> ApiResult<(Vec<VmRecord>, Option<SupervisorStatus>, Value)> {
    let allocator = state.allocator();
    let supervision = allocator.supervision();
    let records = allocator.vms(&VmFilter::default()).await?;
    let counts = allocator.counts().await?;
    let operations: Vec<OperationView> = allocator
        .operations(DASHBOARD_OPERATIONS)
        .await?
        .iter()
        .map(OperationView::from)
        .collect();
    let mut collections = Vec::new();
    for record in &records {
        if let Some(c) = state.collector().status(record.hostname.as_str()).await? {
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
    let data = json!({
        "collections": collections,
        "counts": counts,
        "operations": operations,
        "supervisor": supervision.clone().map(supervisor_view),
    });
    Ok((records, supervision, data))
}

/// What a VM's table row shows (`vm_row.html`): its view without what the row leaves out,
/// such as the last heartbeat, so that a heartbeat renders nothing again.
fn row_view(record: &VmRecord, supervision: Option<&SupervisorStatus>) -> Value {
    let mut vm = vm_view(record, supervision);
    if let Value::Object(fields) = &mut vm {
        for hidden in [
            "last_heartbeat",
            "updated_at",
            "created_at",
            "restarts",
            "assigned_at",
        ] {
            fields.remove(hidden);
        }
    }
    vm
}

/// A VM's view with the supervisor's flags on it.
pub fn vm_view(record: &VmRecord, supervision: Option<&SupervisorStatus>) -> Value {
    let mut vm = json!(VmView::from(record));
    let flags: Vec<&str> = supervision
        .iter()
        .flat_map(|s| &s.flags)
        .filter(|f| f.hostname == record.hostname)
        .map(|f| f.message.as_str())
        .collect();
    vm["flags"] = json!(flags);
    vm
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

/// Query of the event stream: the version the viewer's page shows.
#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    since: Option<String>,
}

/// `GET /admin/events`: server-sent events with what changed since the viewer's version —
/// `vm` (`{"hostname", "html"}`: a row to put in place), `vm-removed` (a hostname),
/// `operations`, `supervisor`, `collections`, `usage`, `summary` (HTML fragments), and `reload`
/// when the viewer is too far behind. Each event's id is the version it brings the viewer
/// to. Lives only in the response stream; ends on disconnect or shutdown.
pub async fn events(
    State(state): State<HttpState>,
    _admin: Admin,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let live = state.inner.live.clone();
    if live.streams.fetch_add(1, Ordering::SeqCst) >= MAX_LIVE_VIEWS {
        live.streams.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this replica already serves {MAX_LIVE_VIEWS} live admin views; close one"),
        ));
    }
    let place = StreamPlace(live.clone());
    // A reconnecting browser says where it was; a fresh page says what it shows.
    let since = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(query.since.as_deref())
        .map_or(0, |id| live.version_of(id));
    let version = live.version.subscribe();
    live.publish(&state);
    let stop = {
        let state = state.clone();
        async move { state.shutting_down().await }
    };
    let updates = stream::unfold(
        (place, version, since, true),
        |(place, mut version, since, first)| async move {
            if !first && version.changed().await.is_err() {
                return None;
            }
            // Seen before reading, so a change from now on wakes this viewer again.
            version.borrow_and_update();
            let (changes, now) = place.0.changes_since(since);
            let id = place.0.event_id(now);
            let events: Vec<Result<Event, Infallible>> = changes
                .into_iter()
                .map(|c| Ok(event(c).id(id.clone())))
                .collect();
            Some((stream::iter(events), (place, version, now, false)))
        },
    )
    .flatten()
    .take_until(stop);
    Ok(Sse::new(updates).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn event(change: Change) -> Event {
    match change {
        Change::Row { hostname, html } => Event::default()
            .event("vm")
            .data(json!({ "hostname": hostname, "html": html }).to_string()),
        Change::Removed(hostname) => Event::default().event("vm-removed").data(hostname),
        Change::Fragment(name, html) => Event::default().event(name).data(html),
        Change::Reload => Event::default().event("reload").data(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_reads_the_text_of_a_row_not_its_markup() {
        let row = r#"<tr data-state="assigned"><td><a href="/admin/vms/vm-1">VM-1</a></td><td>ada@example.org</td></tr>"#;
        let text = text_of(row);
        assert!(text.contains("vm-1"));
        assert!(text.contains("ada@example.org"));
        assert!(!text.contains("href"));
        assert!(!text.contains("data-state"));
    }

    #[test]
    fn a_viewer_behind_the_remembered_removals_is_told_to_reload() {
        let live = LiveView::default();
        {
            let mut snap = live.snapshot();
            snap.version = 10;
            snap.horizon = 5;
        }
        assert_eq!(live.changes_since(3).0, vec![Change::Reload]);
        assert_eq!(live.changes_since(11).0, vec![Change::Reload]);
        assert!(live.changes_since(7).0.is_empty());
    }
}
