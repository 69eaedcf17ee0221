//! Prometheus metrics: request and claim counters, the waiter gauge, and at scrape time the
//! VM states, provisioning / start-up durations and the supervisor's state read from the
//! allocator.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use lablink_core::Allocator as _;
use lablink_core::{SupervisorStatus, VmFilter, VmRecord};

use super::error::{ApiError, ApiResult};
use super::HttpState;
use lablink_core::supervisor::FlagKind;

/// Upper bounds (seconds) of the duration histogram buckets.
const DURATION_BUCKETS: [f64; 10] = [
    5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0,
];

/// Counters and gauges the HTTP layer keeps. Cheap to update from any handler.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, &'static str, u16), u64>>,
    claims_assigned: AtomicU64,
    claims_rejoined: AtomicU64,
    claims_no_capacity: AtomicU64,
    claims_rejected: AtomicU64,
    claims_rate_limited: AtomicU64,
    claims_refused: AtomicU64,
    claims_unproven: AtomicU64,
    claims_failed: AtomicU64,
    sign_ins_rate_limited: AtomicU64,
    registrations: Mutex<BTreeMap<&'static str, u64>>,
    waiters: AtomicI64,
    waits_answered: AtomicU64,
    waits_timed_out: AtomicU64,
}

/// How a participant's request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// A VM was newly assigned.
    Assigned,
    /// The email already held a VM.
    Rejoined,
    /// No VM was free.
    NoCapacity,
    /// The request was invalid.
    Rejected,
    /// The client's address sent too many requests (429).
    RateLimited,
    /// Wrong or missing access code, or an email not on the list (403).
    Refused,
    /// A repeat for an email that holds a VM, from a browser that cannot show it is the
    /// one that got it (409, nothing revealed).
    Unproven,
    /// The allocator could not answer (its store is unavailable, for instance).
    Failed,
}

/// Counts one waiting agent while alive (the handler future holds it; dropping the future on
/// disconnect drops the guard).
#[derive(Debug)]
pub struct WaiterGuard(Arc<Metrics>);

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Records one answered request.
    pub fn request(&self, route: &str, method: &'static str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&(route.to_owned(), method, status)) {
            *n += 1;
        } else {
            map.insert((route.to_owned(), method, status), 1);
        }
    }

    /// Records one participant request.
    pub fn claim(&self, outcome: ClaimOutcome) {
        let counter = match outcome {
            ClaimOutcome::Assigned => &self.claims_assigned,
            ClaimOutcome::Rejoined => &self.claims_rejoined,
            ClaimOutcome::NoCapacity => &self.claims_no_capacity,
            ClaimOutcome::Rejected => &self.claims_rejected,
            ClaimOutcome::RateLimited => &self.claims_rate_limited,
            ClaimOutcome::Refused => &self.claims_refused,
            ClaimOutcome::Unproven => &self.claims_unproven,
            ClaimOutcome::Failed => &self.claims_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one admin sign-in refused by the per-address limit.
    pub fn sign_in_rate_limited(&self) {
        self.sign_ins_rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one machine registration, by its answer.
    pub fn registration(&self, status: StatusCode) {
        let outcome = super::registration::outcome_label(status);
        let mut map = self.registrations.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(outcome).or_default() += 1;
    }

    /// Counts a waiter until the guard drops.
    pub fn waiter(self: &Arc<Self>) -> WaiterGuard {
        self.waiters.fetch_add(1, Ordering::Relaxed);
        WaiterGuard(self.clone())
    }

    /// Records how a wait ended.
    pub fn wait_ended(&self, assigned: bool) {
        if assigned {
            self.waits_answered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.waits_timed_out.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Agents waiting right now.
    pub fn waiters(&self) -> i64 {
        self.waiters.load(Ordering::Relaxed)
    }

    fn render(&self, vms: &[VmRecord], supervision: Option<&SupervisorStatus>) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP lablink_http_requests_total HTTP requests answered, by route, method and status.\n# TYPE lablink_http_requests_total counter\n");
        for ((route, method, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "lablink_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {n}",
                escape_label(route)
            );
        }
        out.push_str("# HELP lablink_claims_total Participant VM requests, by outcome.\n# TYPE lablink_claims_total counter\n");
        for (outcome, counter) in [
            ("assigned", &self.claims_assigned),
            ("rejoined", &self.claims_rejoined),
            ("no_capacity", &self.claims_no_capacity),
            ("rejected", &self.claims_rejected),
            ("rate_limited", &self.claims_rate_limited),
            ("refused", &self.claims_refused),
            ("unproven", &self.claims_unproven),
            ("failed", &self.claims_failed),
        ] {
            let _ = writeln!(
                out,
                "lablink_claims_total{{outcome=\"{outcome}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP lablink_sign_ins_rate_limited_total Admin sign-ins refused (429) by the per-address limit.\n# TYPE lablink_sign_ins_rate_limited_total counter\nlablink_sign_ins_rate_limited_total {}", self.sign_ins_rate_limited.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP lablink_registrations_total Machine registrations, by outcome (registered, bad_token, conflict, bad_input, rate_limited, error).\n# TYPE lablink_registrations_total counter");
        for (outcome, n) in self
            .registrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "lablink_registrations_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP lablink_waiters Agents holding a wait-for-assignment request.\n# TYPE lablink_waiters gauge\nlablink_waiters {}", self.waiters());
        let _ = writeln!(out, "# HELP lablink_waits_total Finished waits, by outcome.\n# TYPE lablink_waits_total counter\nlablink_waits_total{{outcome=\"assigned\"}} {}\nlablink_waits_total{{outcome=\"timed_out\"}} {}",
            self.waits_answered.load(Ordering::Relaxed), self.waits_timed_out.load(Ordering::Relaxed));
        let mut states: BTreeMap<&'static str, usize> = lablink_core::VmState::NAMES
            .iter()
            .map(|n| (*n, 0))
            .collect();
        for vm in vms {
            *states.entry(vm.state.as_str()).or_default() += 1;
        }
        out.push_str("# HELP lablink_vms VMs by state.\n# TYPE lablink_vms gauge\n");
        for (state, n) in states {
            let _ = writeln!(out, "lablink_vms{{state=\"{state}\"}} {n}");
        }
        let assignable = vms.iter().filter(|v| v.is_assignable()).count();
        let _ = writeln!(out, "# HELP lablink_vms_assignable VMs a participant can get right now.\n# TYPE lablink_vms_assignable gauge\nlablink_vms_assignable {assignable}");
        histogram(
            &mut out,
            "lablink_vm_provision_seconds",
            "Provisioning time of current VMs.",
            vms.iter().filter_map(|v| v.timings.provision_seconds()),
        );
        histogram(
            &mut out,
            "lablink_vm_startup_seconds",
            "Total start-up time (provisioning request to software ready) of current VMs.",
            vms.iter().filter_map(|v| v.timings.total_startup_seconds()),
        );
        if let Some(status) = supervision {
            supervisor_metrics(&mut out, status);
        }
        out
    }
}

/// The supervisor's state: running/leader, what it did, flags, the pool and the schedule.
fn supervisor_metrics(out: &mut String, s: &SupervisorStatus) {
    let flag = |b: bool| u8::from(b);
    let _ = writeln!(
        out,
        "# HELP lablink_supervisor_running Whether this replica's supervisor runs.
# TYPE lablink_supervisor_running gauge
lablink_supervisor_running {}",
        flag(s.running)
    );
    let _ = writeln!(out, "# HELP lablink_supervisor_leader Whether this replica's supervisor holds the leader lease (only the leader acts).
# TYPE lablink_supervisor_leader gauge
lablink_supervisor_leader {}", flag(s.leader));
    let c = &s.counters;
    out.push_str(
        "# HELP lablink_supervisor_actions_total What the supervisor did, by action.
# TYPE lablink_supervisor_actions_total counter
",
    );
    for (action, n) in [
        ("lease_expired", c.leases_expired),
        ("restart_seen", c.restarts_seen),
        ("ladder_reboot", c.ladder_reboots),
        ("ladder_replacement", c.ladder_replacements),
        ("pool_launch", c.pool_launched),
        ("pool_release", c.pool_released),
        ("idle_release", c.idle_released),
        ("reconcile", c.reconciles),
        ("became_leader", c.became_leader),
        ("error", c.errors),
    ] {
        let _ = writeln!(
            out,
            "lablink_supervisor_actions_total{{action=\"{action}\"}} {n}"
        );
    }
    out.push_str(
        "# HELP lablink_supervisor_flags VMs the supervisor wants an admin to look at, by reason.
# TYPE lablink_supervisor_flags gauge
",
    );
    for kind in [
        FlagKind::NeedsAdmin,
        FlagKind::LadderExhausted,
        FlagKind::IdleWarning,
        FlagKind::DestroyHeld,
    ] {
        let n = s.flags.iter().filter(|f| f.kind == kind).count();
        let _ = writeln!(
            out,
            "lablink_supervisor_flags{{kind=\"{}\"}} {n}",
            kind.as_str()
        );
    }
    if let Some(target) = s.pool_target {
        let _ = writeln!(
            out,
            "# HELP lablink_pool_target Free VMs the warm pool keeps right now (K).
# TYPE lablink_pool_target gauge
lablink_pool_target {target}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP lablink_pool_free VMs free or on their way (available, booting, requested).
# TYPE lablink_pool_free gauge
lablink_pool_free {}",
        s.pool_free
    );
    if let Some(at) = s.destruction_at {
        let _ = writeln!(out, "# HELP lablink_scheduled_destruction_timestamp_seconds When every VM will be destroyed.
# TYPE lablink_scheduled_destruction_timestamp_seconds gauge
lablink_scheduled_destruction_timestamp_seconds {}", at.timestamp());
    }
    let _ = writeln!(out, "# HELP lablink_scheduled_destruction_warning Whether the scheduled destruction is near (its warning shows).
# TYPE lablink_scheduled_destruction_warning gauge
lablink_scheduled_destruction_warning {}", flag(s.destruction_warning));
    if let Some(at) = s.last_reconcile_at {
        let _ = writeln!(
            out,
            "# HELP lablink_reconcile_last_timestamp_seconds When reconcile last ran.
# TYPE lablink_reconcile_last_timestamp_seconds gauge
lablink_reconcile_last_timestamp_seconds {}",
            at.timestamp()
        );
    }
}

fn histogram(out: &mut String, name: &str, help: &str, values: impl Iterator<Item = f64>) {
    let values: Vec<f64> = values.collect();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for bound in DURATION_BUCKETS {
        let n = values.iter().filter(|v| **v <= bound).count();
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", values.len());
    let _ = writeln!(out, "{name}_sum {}", values.iter().sum::<f64>());
    let _ = writeln!(out, "{name}_count {}", values.len());
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Middleware counting every request by its route template (never the raw path, so
/// hostnames do not explode the label set).
pub async fn count_requests(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = match *req.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::HEAD => "HEAD",
        _ => "OTHER",
    };
    let response = next.run(req).await;
    state
        .inner
        .metrics
        .request(&route, method, response.status().as_u16());
    response
}

/// `GET /metrics`: Prometheus text format; with a `metrics_token` configured, only for
/// `Authorization: Bearer <token>`.
pub async fn metrics(State(state): State<HttpState>, headers: HeaderMap) -> ApiResult<Response> {
    if let Some(token) = &state.options().metrics_token {
        let sent = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !sent.is_some_and(|s| super::admin_auth::same(s.trim(), token)) {
            return Err(ApiError::unauthorized(
                "/metrics needs Authorization: Bearer with the metrics token",
            ));
        }
    }
    let vms = state.allocator().vms(&VmFilter::default()).await?;
    let supervision = state.allocator().supervision();
    let body = state.inner.metrics.render(&vms, supervision.as_ref());
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response())
}
