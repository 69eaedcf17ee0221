//! `/metrics` with Prometheus semantics, scraped from real servers over loopback (in-memory
//! store, fake provisioner behind a `MeteredProvisioner`, agents calling the HTTP routes):
//!
//! - counters and histograms never decrease, even when every VM is destroyed;
//! - a participant's request and the agent it wakes are each observed once;
//! - two replicas on one store export the fleet's gauges once between them, and their
//!   per-replica gauges sum;
//! - the Grafana dashboard and the alert rules query only series the server exports.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use lablink::http::{AgentAuthMode, HttpOptions, HttpState, Metrics};
use lablink::metered::{MeteredNotifier, MeteredProvisioner};
use lablink::{
    Allocator, AllocatorConfig, AllocatorExt, DestroyTarget, FakeProvisioner, LabLink,
    LabLinkBuilder, MemoryNotifier, MemoryVmStore, SupervisorConfig, VmFilter,
};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

const USER: &str = "admin";
const PASSWORD: &str = "correct horse battery staple";
/// How long a step may take before the test gives up (a hang fails instead of blocking).
const PATIENCE: Duration = Duration::from_secs(30);

/// One allocator replica served over loopback, its metrics shared with its metered
/// provisioner and notifier (as `lablink::server` wires them).
struct Replica {
    lablink: LabLink,
    state: HttpState,
    base: String,
    client: Client,
}

impl Replica {
    /// A replica of `builder` launching through `fake`; agents need no token (the routes
    /// are the same, the test need not carry each VM's token).
    async fn start(builder: LabLinkBuilder, fake: FakeProvisioner) -> Self {
        let metrics = Arc::new(Metrics::default());
        let provisioner = MeteredProvisioner::new(Arc::new(fake), "fake", metrics.clone());
        let notifier = MeteredNotifier::new(Arc::new(MemoryNotifier::default()), metrics.clone());
        Self::serve(
            builder
                .with_provisioner(Arc::new(provisioner))
                .with_notifier(Arc::new(notifier)),
            metrics,
        )
        .await
    }

    async fn serve(builder: LabLinkBuilder, metrics: Arc<Metrics>) -> Self {
        let lablink = builder.build().unwrap();
        let mut options = HttpOptions::with_admin_password(USER, PASSWORD).unwrap();
        options.agent_auth = AgentAuthMode::Open;
        let state =
            HttpState::with_metrics(Arc::new(lablink.clone()), options, Arc::default(), metrics);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let serving = state.clone();
        tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
        Self {
            lablink,
            state,
            base,
            client: Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Launches `n` VMs and has each agent report ready over HTTP.
    async fn launch_ready(&self, n: usize) -> Vec<String> {
        let op = self.lablink.launch_and_wait(n, PATIENCE).await.unwrap();
        let hosts: Vec<String> = op.hostnames.iter().map(ToString::to_string).collect();
        assert_eq!(hosts.len(), n, "{op:?}");
        for h in &hosts {
            let r = self
                .client
                .post(self.url(&format!("/api/v1/vms/{h}/ready")))
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{h} could not report ready");
        }
        hosts
    }

    /// A participant's request on `path` (`/api/request_vm` or `/api/v1/requests`).
    async fn request_vm(&self, path: &str, who: &str) -> Value {
        let command = format!(
            "DISPLAY= /opt/google/chrome-remote-desktop/start-host --code=\"4/{who}\" \
             --redirect-url=\"https://remotedesktop.google.com/_/oauthredirect\" --name=$(hostname)"
        );
        let r = self
            .client
            .post(self.url(path))
            .header(ACCEPT, "application/json")
            .json(&json!({"email": format!("{who}@lab.org"), "crd_command": command}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path} for {who}");
        r.json().await.unwrap()
    }

    /// The `/metrics` text.
    async fn scrape(&self) -> String {
        let r = self.client.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        r.text().await.unwrap()
    }

    /// Waits until `n` agents wait on this replica.
    async fn until_waiters(&self, n: i64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.state.metrics().waiters() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} waiters, not {n}",
                self.state.metrics().waiters()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Every sample of a Prometheus text answer, `name{labels}` → value (the value is the last
/// field: the server writes no timestamps).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
            let value = value.parse().unwrap_or_else(|_| panic!("bad value in {l}"));
            (series.to_owned(), value)
        })
        .collect()
}

/// The value of `series` (0 when absent).
fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

/// Every series name the answer exports (a histogram's `_bucket`, `_sum` and `_count`).
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(declared) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = declared.split_once(' ').unwrap();
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        } else {
            names.insert(name.to_owned());
        }
    }
    names
}

fn is_monotonic(series: &str) -> bool {
    let name = series.split('{').next().unwrap();
    ["_total", "_bucket", "_count", "_sum"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

#[tokio::test]
async fn counters_and_histograms_never_decrease_when_every_vm_is_destroyed() {
    let r = Replica::start(LabLink::builder(), FakeProvisioner::default()).await;
    let hosts = r.launch_ready(3).await;
    r.request_vm("/api/request_vm", "ada").await;
    let before_text = r.scrape().await;
    let before = samples(&before_text);
    assert_eq!(value(&before, "lablink_vms{state=\"available\"}"), 2.0);
    assert_eq!(value(&before, "lablink_vm_boot_seconds_count"), 3.0);

    let op = r.lablink.destroy(&DestroyTarget::All).await.unwrap();
    let op = r.lablink.wait_for_operation(op.id, PATIENCE).await.unwrap();
    assert_eq!(op.status, lablink::OperationStatus::Succeeded, "{op:?}");
    assert!(r
        .lablink
        .vms(&VmFilter::default())
        .await
        .unwrap()
        .is_empty());
    let after_text = r.scrape().await;
    let after = samples(&after_text);

    // The fleet shrank (gauges may fall) ...
    assert_eq!(value(&after, "lablink_vms{state=\"available\"}"), 0.0);
    assert_eq!(value(&after, "lablink_vms{state=\"assigned\"}"), 0.0);
    // ... and what happened to it is still counted: nothing monotonic went down or away.
    let mut compared = 0;
    for (series, was) in before.iter().filter(|(s, _)| is_monotonic(s)) {
        let now = after
            .get(series)
            .unwrap_or_else(|| panic!("{series} disappeared:\n{after_text}"));
        assert!(now >= was, "{series} fell from {was} to {now}");
        compared += 1;
    }
    assert!(
        compared > 50,
        "only {compared} series compared:\n{before_text}"
    );
    assert_eq!(value(&after, "lablink_vm_boot_seconds_count"), 3.0);
    let destroys =
        "lablink_provisioner_duration_seconds_count{provisioner=\"fake\",operation=\"destroy\"}";
    assert_eq!(value(&after, destroys), value(&before, destroys) + 1.0);
    assert_eq!(hosts.len(), 3);
}

#[tokio::test]
async fn each_claim_and_the_agent_it_wakes_are_observed_on_both_route_families() {
    let r = Replica::start(LabLink::builder(), FakeProvisioner::default()).await;
    let hosts = r.launch_ready(2).await;
    // One agent waits on the v1 long-poll, the other on the compatible route.
    let v1_wait = r
        .client
        .get(r.url(&format!("/api/v1/vms/{}/assignment?timeout=60", hosts[0])))
        .send();
    let compat_wait = r
        .client
        .post(r.url("/vm_startup"))
        .json(&json!({"hostname": hosts[1]}))
        .send();
    let waits = tokio::spawn(async move { tokio::join!(v1_wait, compat_wait) });
    r.until_waiters(2).await;
    let before = samples(&r.scrape().await);

    r.request_vm("/api/request_vm", "ada").await;
    r.request_vm("/api/v1/requests", "grace").await;
    let (v1, compat) = tokio::time::timeout(PATIENCE, waits)
        .await
        .expect("the agents were not woken")
        .unwrap();
    assert_eq!(v1.unwrap().status(), StatusCode::OK);
    assert_eq!(compat.unwrap().status(), StatusCode::OK);
    let after = samples(&r.scrape().await);

    for (series, gained) in [
        ("lablink_claims_total{outcome=\"assigned\"}", 2.0),
        (
            "lablink_claim_duration_seconds_count{outcome=\"assigned\"}",
            2.0,
        ),
        (
            "lablink_claim_duration_seconds_bucket{outcome=\"assigned\",le=\"+Inf\"}",
            2.0,
        ),
        ("lablink_waits_total{outcome=\"assigned\"}", 2.0),
        ("lablink_assignment_to_wake_seconds_count", 2.0),
        (
            "lablink_assignment_to_wake_seconds_bucket{le=\"+Inf\"}",
            2.0,
        ),
    ] {
        assert_eq!(
            value(&after, series) - value(&before, series),
            gained,
            "{series}"
        );
    }
    assert!(
        value(
            &after,
            "lablink_claim_duration_seconds_sum{outcome=\"assigned\"}"
        ) > 0.0
    );
    // Requests are labelled by their route template, never by the hostname in the path.
    let waited = "lablink_http_request_duration_seconds_count{route=\"/api/v1/vms/{hostname}/assignment\",method=\"GET\",status_class=\"2xx\"}";
    assert_eq!(value(&after, waited), 1.0);
    assert!(!after.keys().any(|s| s.contains(hosts[0].as_str())));
    assert_eq!(value(&after, "lablink_vm_boot_seconds_count"), 2.0);
}

/// A replica on `store` with a supervisor (leader lease renewed every 50 ms), its warm
/// pool on (keeping no VM) with `pool`.
async fn supervised_replica(
    store: &MemoryVmStore,
    notifier: &MemoryNotifier,
    fake: &FakeProvisioner,
    pool: bool,
) -> (Replica, lablink::Supervisor) {
    let mut supervisor = SupervisorConfig {
        tick: Duration::from_millis(50),
        leader_lease: Duration::from_secs(5),
        ..Default::default()
    };
    supervisor.pool.enabled = pool;
    supervisor.pool.min_available = 0;
    let metrics = Arc::new(Metrics::default());
    let builder = LabLink::builder()
        .with_config(AllocatorConfig {
            supervisor,
            ..Default::default()
        })
        .with_store(Arc::new(store.clone()))
        .with_notifier(Arc::new(notifier.clone()))
        .with_provisioner(Arc::new(MeteredProvisioner::new(
            Arc::new(fake.clone()),
            "fake",
            metrics.clone(),
        )));
    let replica = Replica::serve(builder, metrics).await;
    let running = replica.lablink.start_supervisor().unwrap();
    (replica, running)
}

/// Waits until exactly one of `replicas` leads.
async fn until_one_leads(replicas: &[&Replica]) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let leaders = replicas
            .iter()
            .filter(|r| r.lablink.supervision().is_some_and(|s| s.leader))
            .count();
        if leaders == 1 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{leaders} leaders");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn two_replicas_export_the_fleet_once_between_them_and_their_waiters_sum() {
    let (store, notifier, fake) = (
        MemoryVmStore::default(),
        MemoryNotifier::default(),
        FakeProvisioner::default(),
    );
    let (a, a_supervisor) = supervised_replica(&store, &notifier, &fake, false).await;
    let (b, b_supervisor) = supervised_replica(&store, &notifier, &fake, false).await;
    until_one_leads(&[&a, &b]).await;

    // Three VMs: two ready (one assigned), one still booting. One agent waits on each
    // replica.
    let hosts = a.launch_ready(2).await;
    a.lablink.launch_and_wait(1, PATIENCE).await.unwrap();
    b.request_vm("/api/request_vm", "ada").await;
    let assigned = b
        .lablink
        .vms(&VmFilter::default())
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.assignment.is_some())
        .unwrap()
        .hostname;
    let free = hosts.iter().find(|h| **h != assigned.as_str()).unwrap();
    let on_a = a
        .client
        .get(a.url(&format!("/api/v1/vms/{free}/assignment?timeout=60")))
        .send();
    let on_b = b
        .client
        .post(b.url("/vm_startup"))
        .json(&json!({"hostname": free}))
        .send();
    let held = tokio::spawn(async move { tokio::join!(on_a, on_b) });
    a.until_waiters(1).await;
    b.until_waiters(1).await;

    let scrapes = [samples(&a.scrape().await), samples(&b.scrape().await)];
    let sum = |series: &str| scrapes.iter().map(|s| value(s, series)).sum::<f64>();
    let exporters: Vec<f64> = scrapes
        .iter()
        .map(|s| s["lablink_fleet_exporter"])
        .collect();
    assert!(
        exporters == [1.0, 0.0] || exporters == [0.0, 1.0],
        "{exporters:?}"
    );
    assert_eq!(sum("lablink_supervisor_leader"), 1.0);
    assert_eq!(sum("lablink_supervisor_running"), 2.0);
    let follower = &scrapes[usize::from(exporters[0] == 1.0)];
    assert!(
        !follower.keys().any(|s| s.starts_with("lablink_vms")
            || s.starts_with("lablink_pool_")
            || s.starts_with("lablink_supervisor_flags")),
        "the follower exports fleet gauges: {follower:?}"
    );

    // Summed as docs/metrics.md says, the fleet's gauges count the fleet once.
    let fleet = a.lablink.vms(&VmFilter::default()).await.unwrap();
    assert_eq!(fleet.len(), 3);
    for state in lablink::VmState::NAMES {
        let n = fleet.iter().filter(|v| v.state.as_str() == state).count();
        assert_eq!(
            sum(&format!("lablink_vms{{state=\"{state}\"}}")),
            n as f64,
            "{state}"
        );
    }
    assert_eq!(sum("lablink_vms{state=\"available\"}"), 1.0);
    assert_eq!(sum("lablink_vms{state=\"booting\"}"), 1.0);
    assert_eq!(sum("lablink_vms_assignable"), 1.0);
    // Per-replica gauges are right when summed.
    assert_eq!(sum("lablink_waiters"), 2.0);

    a.state.shutdown();
    b.state.shutdown();
    let _ = tokio::time::timeout(PATIENCE, held).await;
    a_supervisor.stop().await;
    b_supervisor.stop().await;
}

#[tokio::test]
async fn the_dashboard_and_the_alert_rules_query_only_exported_series() {
    let store = MemoryVmStore::default();
    let (r, supervisor) = supervised_replica(
        &store,
        &MemoryNotifier::default(),
        &FakeProvisioner::default(),
        true,
    )
    .await;
    until_one_leads(&[&r]).await;
    // Labelled series appear with their first observation: a launch, a boot, a claim and an
    // agent woken by it, requests, and failed provisioner calls.
    let hosts = r.launch_ready(1).await;
    let wait = r
        .client
        .get(r.url(&format!("/api/v1/vms/{}/assignment?timeout=60", hosts[0])))
        .send();
    let waited = tokio::spawn(wait);
    r.until_waiters(1).await;
    r.request_vm("/api/request_vm", "ada").await;
    assert_eq!(waited.await.unwrap().unwrap().status(), StatusCode::OK);
    // A launch through a cloud without capacity, counted into the same metrics.
    let failing = LabLink::builder()
        .with_provisioner(Arc::new(MeteredProvisioner::new(
            Arc::new(FakeProvisioner::new().with_failure_rate(1.0)),
            "fake",
            r.state.metrics().clone(),
        )))
        .build()
        .unwrap();
    let op = failing.launch_and_wait(1, PATIENCE).await.unwrap();
    assert_eq!(op.status, lablink::OperationStatus::Failed, "{op:?}");
    r.scrape().await;
    let exported = exported_names(&r.scrape().await);
    supervisor.stop().await;

    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana/lablink-dashboard.json"))
            .expect("deploy/grafana/lablink-dashboard.json"),
    )
    .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    collect_exprs(&dashboard, &mut queries);
    assert!(queries.len() >= 8, "{queries:?}");
    let alerts = std::fs::read_to_string(format!("{root}/deploy/prometheus/lablink-alerts.yml"))
        .expect("deploy/prometheus/lablink-alerts.yml");
    queries.push(alerts);

    let mut used = BTreeSet::new();
    for query in &queries {
        used.extend(metric_names(query));
    }
    for must in [
        "lablink_http_request_duration_seconds_bucket",
        "lablink_claims_total",
        "lablink_assignment_to_wake_seconds_bucket",
        "lablink_vms",
        "lablink_waiters",
        "lablink_provisioner_errors_total",
        "lablink_vm_boot_seconds_bucket",
        "lablink_vms_assignable",
        "lablink_vms_gpu_unhealthy",
    ] {
        assert!(used.contains(must), "{must} is not used");
    }
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "queried but not exported: {unknown:?}\nexported: {exported:?}"
    );
}

/// Every `expr` of a Grafana dashboard's targets.
fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Every `lablink_...` series name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("lablink_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}
