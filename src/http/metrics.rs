//! Prometheus metrics (`GET /metrics`), kept with `prometheus-client` so counters and
//! histograms only ever grow: requests, claims, waits and wake-ups, registrations,
//! collection uploads, provisioner calls (through [`MeteredProvisioner`]), notifier resyncs
//! (through [`MeteredNotifier`]) and VM boot times are observed as they happen. At scrape
//! time come this replica's supervisor and — from one replica only, see [`scrape::fleet_exporter`] —
//! the fleet's gauges. docs/metrics.md lists every series and how to sum them over replicas.
//!
//! [`MeteredProvisioner`]: crate::metered::MeteredProvisioner
//! [`MeteredNotifier`]: crate::metered::MeteredNotifier

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use lablink_core::Allocator as _;
use lablink_core::{
    Assignment, Hostname, Phase, SupervisorStatus, Telemetry, VmFilter, VmRecord, VmState,
};
use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::error::{ApiError, ApiResult};
use super::HttpState;

mod scrape;

/// Bucket bounds (seconds) of quick answers: requests and claims.
const REQUEST_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Bucket bounds (seconds) from an assignment to its agent's wake-up.
const WAKE_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Bucket bounds (seconds) of provider calls and boots: seconds to an hour.
const SLOW_BUCKETS: [f64; 13] = [
    0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0,
];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every series the HTTP layer and the metered wrappers keep; cheap to update from any
/// handler. Share one between [`HttpState::with_metrics`] and the
/// [`MeteredProvisioner`](crate::metered::MeteredProvisioner) /
/// [`MeteredNotifier`](crate::metered::MeteredNotifier) the allocator was built with.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: HistogramFamily<RequestClassLabels>,
    claims: Family<OutcomeLabels, Counter>,
    claim_seconds: HistogramFamily<OutcomeLabels>,
    sign_ins_rate_limited: Counter,
    registrations: Family<OutcomeLabels, Counter>,
    waiters: Gauge,
    waits: Family<OutcomeLabels, Counter>,
    wake_seconds: Histogram,
    boot_seconds: Histogram,
    collection_uploads: Family<OutcomeLabels, Counter>,
    provisioner_seconds: HistogramFamily<ProvisionerLabels>,
    provisioner_errors: Family<ProvisionerErrorLabels, Counter>,
    provisioner_shortfall: Family<ProvisionerNameLabels, Counter>,
    notifier_resyncs: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestClassLabels {
    route: String,
    method: &'static str,
    status_class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProvisionerLabels {
    provisioner: &'static str,
    operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProvisionerErrorLabels {
    provisioner: &'static str,
    operation: &'static str,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProvisionerNameLabels {
    provisioner: &'static str,
}

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}

fn slow_histogram() -> Histogram {
    Histogram::new(SLOW_BUCKETS)
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

impl ClaimOutcome {
    const ALL: [ClaimOutcome; 8] = [
        Self::Assigned,
        Self::Rejoined,
        Self::NoCapacity,
        Self::Rejected,
        Self::RateLimited,
        Self::Refused,
        Self::Unproven,
        Self::Failed,
    ];

    /// The `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Assigned => "assigned",
            Self::Rejoined => "rejoined",
            Self::NoCapacity => "no_capacity",
            Self::Rejected => "rejected",
            Self::RateLimited => "rate_limited",
            Self::Refused => "refused",
            Self::Unproven => "unproven",
            Self::Failed => "failed",
        }
    }
}

/// Counts one waiting agent while alive (the handler future holds it; dropping the future on
/// disconnect drops the guard).
#[derive(Debug)]
pub struct WaiterGuard(Gauge);

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Self {
            registry: Registry::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(request_histogram),
            claims: Family::default(),
            claim_seconds: Family::new_with_constructor(request_histogram),
            sign_ins_rate_limited: Counter::default(),
            registrations: Family::default(),
            waiters: Gauge::default(),
            waits: Family::default(),
            wake_seconds: Histogram::new(WAKE_BUCKETS),
            boot_seconds: slow_histogram(),
            collection_uploads: Family::default(),
            provisioner_seconds: Family::new_with_constructor(slow_histogram),
            provisioner_errors: Family::default(),
            provisioner_shortfall: Family::default(),
            notifier_resyncs: Counter::default(),
        };
        // Outcomes that exist from the start show as 0, so `rate()` sees their first one.
        for outcome in ClaimOutcome::ALL {
            let _ = metrics.claims.get_or_create(&label(outcome.as_str()));
        }
        for outcome in ["assigned", "timed_out"] {
            let _ = metrics.waits.get_or_create(&label(outcome));
        }
        metrics.register()
    }
}

fn label(outcome: &'static str) -> OutcomeLabels {
    OutcomeLabels { outcome }
}

impl Metrics {
    fn register(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "lablink_http_requests",
            "HTTP requests answered, by route template, method and status",
            self.requests.clone(),
        );
        r.register(
            "lablink_http_request_duration_seconds",
            "Time to answer an HTTP request (to its headers), by route template, method and status class",
            self.request_seconds.clone(),
        );
        r.register(
            "lablink_claims",
            "Participant VM requests, by outcome",
            self.claims.clone(),
        );
        r.register(
            "lablink_claim_duration_seconds",
            "Time to answer a participant's VM request, by outcome",
            self.claim_seconds.clone(),
        );
        r.register(
            "lablink_sign_ins_rate_limited",
            "Admin sign-ins refused (429) by the per-address limit",
            self.sign_ins_rate_limited.clone(),
        );
        r.register(
            "lablink_registrations",
            "Machine registrations, by outcome (registered, bad_token, conflict, bad_input, rate_limited, error)",
            self.registrations.clone(),
        );
        r.register(
            "lablink_waiters",
            "Agents holding a wait-for-assignment request on this replica",
            self.waiters.clone(),
        );
        r.register(
            "lablink_waits",
            "Finished waits for an assignment, by outcome",
            self.waits.clone(),
        );
        r.register(
            "lablink_assignment_to_wake_seconds",
            "From a VM's assignment to its agent's wait answering with it",
            self.wake_seconds.clone(),
        );
        r.register(
            "lablink_vm_boot_seconds",
            "From a VM's launch request to its agent making it available, once per VM",
            self.boot_seconds.clone(),
        );
        r.register(
            "lablink_collection_uploads",
            "Collection uploads answered, by outcome (stored, refused)",
            self.collection_uploads.clone(),
        );
        r.register(
            "lablink_provisioner_duration_seconds",
            "Time of provisioner launch and destroy calls (retries included), by provisioner and operation",
            self.provisioner_seconds.clone(),
        );
        r.register(
            "lablink_provisioner_errors",
            "Failed provisioner calls, by provisioner, operation and error kind",
            self.provisioner_errors.clone(),
        );
        r.register(
            "lablink_provisioner_vms_not_created",
            "VMs a launch was asked for and did not return (the allocator marks them failed), by provisioner",
            self.provisioner_shortfall.clone(),
        );
        r.register(
            "lablink_notifier_resyncs",
            "Resync wake-ups delivered to this replica's waiters (notifications may have been lost: a reconnect, a lagging waiter)",
            self.notifier_resyncs.clone(),
        );
        self
    }

    /// Records one answered request, which took `took` to its headers.
    pub fn request(&self, route: &str, method: &'static str, status: StatusCode, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                method,
                status: status.as_u16(),
            })
            .inc();
        self.request_seconds
            .get_or_create(&RequestClassLabels {
                route: route.to_owned(),
                method,
                status_class: status_class(status),
            })
            .observe(took.as_secs_f64());
    }

    /// Records one participant request, answered after `took`.
    pub fn claim(&self, outcome: ClaimOutcome, took: Duration) {
        let labels = label(outcome.as_str());
        self.claims.get_or_create(&labels).inc();
        self.claim_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Records one admin sign-in refused by the per-address limit.
    pub fn sign_in_rate_limited(&self) {
        self.sign_ins_rate_limited.inc();
    }

    /// Records one machine registration, by its answer.
    pub fn registration(&self, status: StatusCode) {
        let outcome = super::registration::outcome_label(status);
        self.registrations.get_or_create(&label(outcome)).inc();
    }

    /// Counts a waiter until the guard drops.
    pub fn waiter(&self) -> WaiterGuard {
        self.waiters.inc();
        WaiterGuard(self.waiters.clone())
    }

    /// Records how a wait ended: with the assignment (observing the time from the
    /// assignment to now, the agent's wake-up) or without.
    pub fn wait_ended(&self, assignment: Option<&Assignment>) {
        let outcome = if assignment.is_some() {
            "assigned"
        } else {
            "timed_out"
        };
        self.waits.get_or_create(&label(outcome)).inc();
        if let Some(assignment) = assignment {
            self.wake_seconds
                .observe(seconds_between(assignment.assigned_at, Utc::now()));
        }
    }

    /// Agents waiting right now.
    pub fn waiters(&self) -> i64 {
        self.waiters.get()
    }

    /// Observes the launch-to-available time of a VM that just became available for the
    /// first time (from its launch request, or its registration for a machine that
    /// registered itself).
    pub fn vm_available(&self, record: &VmRecord) {
        let launched = record.timings.provision_start.unwrap_or(record.created_at);
        self.boot_seconds
            .observe(seconds_between(launched, record.state_changed_at));
    }

    /// Records one answered collection upload.
    pub fn collection_upload(&self, stored: bool) {
        let outcome = if stored { "stored" } else { "refused" };
        self.collection_uploads.get_or_create(&label(outcome)).inc();
    }

    /// Records one call of `provisioner`'s `operation`: its time (launch and destroy) and
    /// its error kind when it failed.
    pub fn provisioner_call(
        &self,
        provisioner: &'static str,
        operation: &'static str,
        took: Option<Duration>,
        error: Option<&lablink_core::Error>,
    ) {
        if let Some(took) = took {
            self.provisioner_seconds
                .get_or_create(&ProvisionerLabels {
                    provisioner,
                    operation,
                })
                .observe(took.as_secs_f64());
        }
        if let Some(error) = error {
            self.provisioner_errors
                .get_or_create(&ProvisionerErrorLabels {
                    provisioner,
                    operation,
                    kind: error_kind_label(error.kind()),
                })
                .inc();
        }
    }

    /// Records VMs a launch of `provisioner` did not create.
    pub fn vms_not_created(&self, provisioner: &'static str, count: usize) {
        self.provisioner_shortfall
            .get_or_create(&ProvisionerNameLabels { provisioner })
            .inc_by(count as u64);
    }

    /// Records one resync wake-up delivered to a waiter.
    pub fn notifier_resync(&self) {
        self.notifier_resyncs.inc();
    }

    /// The Prometheus text: what was observed, this replica's supervisor, and the fleet's
    /// gauges when `fleet` holds them.
    fn encode(
        &self,
        supervision: Option<&SupervisorStatus>,
        fleet: Option<scrape::Fleet>,
        desktop: &scrape::Desktop,
    ) -> Result<String, std::fmt::Error> {
        let scraped = scrape::registry(supervision, fleet, desktop);
        let mut out = String::with_capacity(16 * 1024);
        prometheus_text::encode(&mut out, &self.registry)?;
        prometheus_text::encode(&mut out, &scraped)?;
        Ok(out)
    }
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    // Clocks of two replicas may disagree a little: never a negative observation.
    ((to - from).num_milliseconds() as f64 / 1000.0).max(0.0)
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// An [`ErrorKind`](lablink_core::ErrorKind)'s name as a label value (`no capacity` →
/// `no_capacity`).
fn error_kind_label(kind: lablink_core::ErrorKind) -> &'static str {
    use lablink_core::ErrorKind as K;
    match kind {
        K::InvalidInput => "invalid_input",
        K::InvalidConfig => "invalid_config",
        K::NotFound => "not_found",
        K::Conflict => "conflict",
        K::InvalidTransition => "invalid_transition",
        K::NoCapacity => "no_capacity",
        K::Unauthenticated => "unauthenticated",
        K::PermissionDenied => "permission_denied",
        K::Timeout => "timeout",
        K::Unavailable => "unavailable",
        K::Provider => "provider",
        K::Internal => "internal",
        _ => "other",
    }
}

/// Sends an agent's report to the allocator; when it moves the VM to `available` for the
/// first time (from its booting phase), observes the VM's boot time. Only a report carrying
/// a status or a GPU health can make a booting VM ready, so only those read the record first
/// (an agent sends them when they change, not with every heartbeat). A VM whose agent
/// reported ready before its launch call returned becomes available when the launch records
/// it, not by a report, and is not observed.
pub(crate) async fn report(
    state: &HttpState,
    hostname: &Hostname,
    telemetry: Telemetry,
) -> lablink_core::Result<VmRecord> {
    let booting = if telemetry.status.is_some() || telemetry.gpu_health.is_some() {
        state
            .allocator()
            .vm(hostname)
            .await
            .is_ok_and(|r| r.state.phase() == Some(Phase::Booting))
    } else {
        false
    };
    let record = state.allocator().report(hostname, telemetry).await?;
    if booting && record.state == VmState::Available {
        state.metrics().vm_available(&record);
    }
    Ok(record)
}

/// Middleware counting and timing every request by its route template (never the raw
/// path, so hostnames do not explode the label set).
pub async fn count_requests(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
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
        .request(&route, method, response.status(), started.elapsed());
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
    let supervision = state.allocator().supervision();
    let fleet = if scrape::fleet_exporter(supervision.as_ref()) {
        Some((
            state.allocator().vms(&VmFilter::default()).await?,
            state.allocator().usage().await?,
        ))
    } else {
        None
    };
    let relay = state.desktop_relay();
    let (sessions, to_browsers, to_vms, dropped) = relay.counts();
    let desktop = scrape::Desktop {
        sessions,
        to_browsers,
        to_vms,
        dropped,
        live: relay.live(),
    };
    let body = state
        .inner
        .metrics
        .encode(
            supervision.as_ref(),
            fleet.as_ref().map(|(vms, usage)| scrape::Fleet {
                vms,
                usage,
                prices: &state.options().prices,
            }),
            &desktop,
        )
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the metrics could not be encoded",
            )
        })?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        body,
    )
        .into_response())
}
