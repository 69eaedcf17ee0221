//! Bad input over real HTTP: random and malformed bodies, wrong types, huge payloads and odd
//! hostnames on every route, and random paths and methods. No answer may be a 5xx, every
//! error is JSON, and the server stays up.
//!
//! `every_route_gets_its_share_of_random_inputs` runs `LABLINK_FUZZ_PER_ROUTE` inputs (default
//! 100) on each route and prints how many were tried; `scripts/proof.sh full` runs it with
//! more (RELIABILITY.md has the counts).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use lablink::http::AgentAuthMode;
use lablink_testkit::{TestServer, ADMIN_PASSWORD};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::Method;
use serde_json::{json, Value};

/// Every route, `{h}` standing for a hostname. `GET /admin/events` is an endless event
/// stream: [`send`] reads only its first event.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/vm_startup"),
    ("POST", "/api/gpu_health"),
    ("POST", "/api/update_inuse_status"),
    ("POST", "/api/vm-status"),
    ("GET", "/api/vm-status"),
    ("GET", "/api/vm-status/{h}"),
    ("POST", "/api/vm-metrics/{h}"),
    ("POST", "/api/vm-logs"),
    ("GET", "/api/vm-logs/{h}"),
    ("GET", "/"),
    ("POST", "/api/request_vm"),
    ("GET", "/api/unassigned_vms_count"),
    ("POST", "/api/launch"),
    ("POST", "/destroy"),
    ("POST", "/api/reboot-vm"),
    ("GET", "/admin"),
    ("GET", "/admin/login"),
    ("POST", "/admin/login"),
    ("POST", "/admin/logout"),
    ("GET", "/admin/vms/{h}"),
    ("POST", "/admin/launch"),
    ("GET", "/admin/destroy"),
    ("POST", "/admin/destroy"),
    ("POST", "/admin/reboot"),
    ("POST", "/admin/release"),
    ("GET", "/admin/events"),
    ("GET", "/api/v1/openapi.json"),
    ("POST", "/api/v1/vms/{h}/ready"),
    ("GET", "/api/v1/vms/{h}/assignment"),
    ("POST", "/api/v1/vms/{h}/heartbeat"),
    ("POST", "/api/v1/vms/{h}/telemetry"),
    ("POST", "/api/v1/requests"),
    ("GET", "/api/v1/vms"),
    ("GET", "/api/v1/vms/{h}"),
    ("GET", "/api/v1/vms/{h}/logs"),
    ("POST", "/api/v1/vms/{h}/reboot"),
    ("POST", "/api/v1/vms/{h}/release"),
    ("POST", "/api/v1/launch"),
    ("POST", "/api/v1/destroy"),
    ("GET", "/api/v1/operations"),
    ("GET", "/api/v1/operations/{h}"),
    ("GET", "/api/v1/pool"),
    ("GET", "/api/v1/vms/{h}/tasks"),
    ("PUT", "/api/v1/vms/{h}/collections/{h}"),
    ("GET", "/api/v1/collections"),
    ("POST", "/api/v1/collections"),
    ("GET", "/api/v1/collections/{h}"),
    ("GET", "/api/v1/collections.zip"),
    ("GET", "/api/scp-client"),
    ("POST", "/admin/collect"),
    ("GET", "/api/v1/roster"),
    ("PUT", "/api/v1/roster"),
    ("GET", "/admin/participants"),
    ("POST", "/admin/participants"),
    ("POST", "/api/v1/registrations"),
    ("DELETE", "/api/v1/vms/{h}/registration"),
    ("GET", "/api/v1/registration-tokens"),
    ("POST", "/api/v1/registration-tokens"),
    ("DELETE", "/api/v1/registration-tokens/{h}"),
    ("GET", "/admin/machines"),
    ("POST", "/admin/machines"),
    ("POST", "/admin/machines/revoke"),
    ("GET", "/admin/audit"),
    ("GET", "/api/v1/audit"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/api/participant/status"),
    ("POST", "/api/participant/command"),
    ("POST", "/api/participant/release"),
];

/// How long an event stream's first event is waited for.
const EVENT_READ: Duration = Duration::from_secs(1);

/// One server and runtime shared by the random cases (VMs `lablink-vm-1..3` exist, one
/// assigned; a random case may destroy them).
fn server() -> &'static (tokio::runtime::Runtime, TestServer) {
    static SERVER: OnceLock<(tokio::runtime::Runtime, TestServer)> = OnceLock::new();
    SERVER.get_or_init(start_server)
}

/// A server and its runtime, with VMs `lablink-vm-1..3`, one assigned.
fn start_server() -> (tokio::runtime::Runtime, TestServer) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(async {
        let s = TestServer::start_with(lablink::LabLink::builder(), |o| {
            o.max_wait = Duration::from_millis(50);
            o.max_body_bytes = 64 * 1024;
            o.sign_in_failures_per_minute = 1_000_000;
        })
        .await;
        s.launch_ready(3).await;
        s.request_vm("ada@lab.org", "4/fuzz").await;
        s
    });
    (runtime, server)
}

fn odd_hostname() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("lablink-vm-1".to_owned()),
        Just("lablink-vm-2".to_owned()),
        Just("ghost-9".to_owned()),
        Just("..%2F..%2Fetc%2Fpasswd".to_owned()),
        Just("%FF%FE".to_owned()),
        Just("%00".to_owned()),
        Just(".hidden".to_owned()),
        Just("a".repeat(300)),
        Just("vm;rm -rf".to_owned()),
        Just("%E2%98%83".to_owned()),
        "[a-zA-Z0-9._%-]{1,40}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        Just(json!("lablink-vm-1")),
        Just(json!("running")),
        Just(json!("start-host --code=4/abc")),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("hostname".to_owned()),
                    Just("status".to_owned()),
                    Just("gpu_status".to_owned()),
                    Just("log_group".to_owned()),
                    Just("log_stream".to_owned()),
                    Just("messages".to_owned()),
                    Just("num_vms".to_owned()),
                    Just("count".to_owned()),
                    Just("email".to_owned()),
                    Just("crd_command".to_owned()),
                    Just("csrf".to_owned()),
                    Just("confirm".to_owned()),
                    Just("cloud_init_start".to_owned()),
                    Just("logs".to_owned()),
                    Just("timings".to_owned()),
                    Just("hostnames".to_owned()),
                    Just("all".to_owned()),
                    Just("boot_id".to_owned()),
                    Just("machine_identity".to_owned()),
                    Just("max_uses".to_owned()),
                    Just("valid_hours".to_owned()),
                    Just("label".to_owned()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..8,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
enum Body {
    Json(Value),
    Bytes(Vec<u8>),
    Form(Vec<(String, String)>),
    Huge(usize),
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        4 => json_value().prop_map(Body::Json),
        2 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Body::Bytes),
        2 => prop::collection::vec(("[a-z_]{1,10}", ".{0,30}"), 0..5).prop_map(Body::Form),
        1 => (64 * 1024usize..300 * 1024).prop_map(Body::Huge),
    ]
}

#[derive(Debug, Clone, Copy)]
enum Auth {
    None,
    OwnToken,
    Garbage,
    Basic,
}

fn auth() -> impl Strategy<Value = Auth> {
    prop_oneof![
        Just(Auth::None),
        Just(Auth::OwnToken),
        Just(Auth::Garbage),
        Just(Auth::Basic)
    ]
}

/// A client that opens a fresh connection per request: a server that answers before
/// reading a body it will not accept closes that connection, which must not fail the next
/// request.
fn fresh_client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .unwrap()
    })
}

async fn send(
    s: &TestServer,
    method: &str,
    path: &str,
    body: &Body,
    auth: Auth,
    json_accept: bool,
) -> (u16, String) {
    let mut req = fresh_client()
        .request(method.parse::<Method>().unwrap(), s.url(path))
        .timeout(Duration::from_secs(20));
    req = match auth {
        Auth::None => req,
        Auth::OwnToken => req.bearer_auth(s.token("lablink-vm-1")),
        Auth::Garbage => req.header(
            "authorization",
            reqwest::header::HeaderValue::from_bytes(b"Bearer \xffgarbage").unwrap(),
        ),
        Auth::Basic => req.basic_auth("admin", Some(ADMIN_PASSWORD)),
    };
    if json_accept {
        req = req.header(ACCEPT, "application/json");
    }
    req = match body {
        Body::Json(v) => req.json(v),
        Body::Bytes(b) => req.header(CONTENT_TYPE, "application/json").body(b.clone()),
        Body::Form(pairs) => req.form(pairs),
        Body::Huge(n) => req
            .header(CONTENT_TYPE, "application/json")
            .body(vec![b'['; *n]),
    };
    let mut response = match req.send().await {
        Ok(response) => response,
        // Refused before the upload finished (413/401 sent early, connection closed).
        Err(e) if matches!(body, Body::Huge(_)) && !e.is_timeout() => return (413, String::new()),
        Err(e) => panic!("{method} {path}: no answer: {e}"),
    };
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = if content_type.starts_with("text/event-stream") {
        // An open event stream never ends: its first event (sent at once), or nothing
        // within a second, then the connection is dropped.
        match tokio::time::timeout(EVENT_READ, response.chunk()).await {
            Ok(Ok(Some(chunk))) => String::from_utf8_lossy(&chunk).into_owned(),
            _ => String::new(),
        }
    } else {
        response.text().await.unwrap_or_default()
    };
    if status >= 400 && !content_type.starts_with("text/html") {
        let parsed: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path} → {status} not JSON: {text:?}"));
        assert!(
            parsed["error"].is_string(),
            "{method} {path} → {status}: {text}"
        );
    }
    (status, text)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_input_makes_a_5xx(route in 0..ROUTES.len(), host in odd_hostname(), body in body(), auth in auth(), json_accept in any::<bool>()) {
        let (runtime, s) = server();
        let (method, template) = ROUTES[route];
        let path = template.replace("{h}", &host);
        let (status, text) = runtime.block_on(send(s, method, &path, &body, auth, json_accept));
        prop_assert!(status < 500, "{} {} → {}: {}", method, path, status, text);
        let health = runtime.block_on(async { fresh_client().get(s.url("/healthz")).send().await.unwrap().status() });
        prop_assert_eq!(health.as_u16(), 200);
    }
}

#[test]
fn a_body_over_the_limit_is_a_json_413_on_every_post_route() {
    // Its own server: the random cases may destroy the VMs whose tokens it uses.
    let (runtime, s) = &start_server();
    for (method, template) in ROUTES.iter().filter(|(m, _)| *m == "POST") {
        let path = template.replace("{h}", "lablink-vm-1");
        for auth in [Auth::None, Auth::OwnToken, Auth::Basic] {
            let (status, text) = runtime.block_on(send(
                s,
                method,
                &path,
                &Body::Huge(2 * 1024 * 1024),
                auth,
                true,
            ));
            assert!(
                status == 413 || status == 401 || status == 403,
                "{method} {path} → {status}: {text}"
            );
        }
    }
    for (path, auth) in [
        ("/vm_startup", Auth::OwnToken),
        ("/api/request_vm", Auth::None),
        ("/api/launch", Auth::Basic),
        ("/api/v1/vms/lablink-vm-1/telemetry", Auth::OwnToken),
    ] {
        let (status, text) = runtime.block_on(send(
            s,
            "POST",
            path,
            &Body::Huge(2 * 1024 * 1024),
            auth,
            true,
        ));
        assert_eq!(status, 413, "{path}: {text}");
    }
}

#[test]
fn odd_paths_and_methods_get_json_errors() {
    let (runtime, s) = server();
    for (method, path) in [
        ("GET", "/nope"),
        ("DELETE", "/vm_startup"),
        ("PUT", "/api/launch"),
        ("GET", "/api/vm-logs/%FF"),
        ("PATCH", "/admin"),
    ] {
        let (status, _) = runtime.block_on(send(
            s,
            method,
            path,
            &Body::Bytes(vec![]),
            Auth::None,
            true,
        ));
        assert!((400..500).contains(&status), "{method} {path} → {status}");
    }
    // A path segment that is not UTF-8, past authentication (the rejection is JSON too).
    for (method, template) in ROUTES.iter().filter(|(_, t)| t.contains("{h}")) {
        let path = template.replace("{h}", "%FF%FE");
        for auth in [Auth::OwnToken, Auth::Basic] {
            let (status, text) =
                runtime.block_on(send(s, method, &path, &Body::Bytes(vec![]), auth, true));
            assert!(
                (400..500).contains(&status),
                "{method} {path} → {status}: {text}"
            );
        }
    }
    let open = runtime.block_on(TestServer::start_with(lablink::LabLink::builder(), |o| {
        o.agent_auth = AgentAuthMode::Open
    }));
    let (status, _) = runtime.block_on(send(
        &open,
        "POST",
        "/vm_startup",
        &Body::Json(json!({"hostname": "a".repeat(300)})),
        Auth::None,
        true,
    ));
    assert_eq!(status, 400);
}

/// Inputs per route: `LABLINK_FUZZ_PER_ROUTE`, default 100.
fn per_route() -> u32 {
    std::env::var("LABLINK_FUZZ_PER_ROUTE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

#[test]
fn every_route_gets_its_share_of_random_inputs() {
    // Its own server: the other random cases run at the same time.
    let (runtime, s) = &start_server();
    let n = per_route();
    let tried = AtomicU64::new(0);
    let started = std::time::Instant::now();
    for (method, template) in ROUTES {
        let mut runner = TestRunner::new(Config {
            cases: n,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (odd_hostname(), body(), auth(), any::<bool>());
        let result = runner.run(&strategy, |(host, body, auth, json_accept)| {
            tried.fetch_add(1, Ordering::Relaxed);
            let path = template.replace("{h}", &host);
            let (status, text) = runtime.block_on(send(s, method, &path, &body, auth, json_accept));
            prop_assert!(status < 500, "{} {} → {}: {}", method, path, status, text);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{method} {template}: {e}");
        }
    }
    // Random paths and methods, outside the routes too.
    let mut runner = TestRunner::new(Config {
        cases: n * 4,
        failure_persistence: None,
        ..Config::default()
    });
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];
    let strategy = (
        0..methods.len(),
        prop_oneof![
            "/[a-zA-Z0-9%._~!$&'()*+,;=:@-]{0,40}",
            "/api/(v1/)?[a-z_/-]{0,30}",
            "/api/v1/vms/[a-zA-Z0-9%._-]{0,20}/[a-z]{0,12}",
            "/admin/[a-z/]{0,20}",
        ],
        body(),
    );
    let result = runner.run(&strategy, |(m, path, body)| {
        tried.fetch_add(1, Ordering::Relaxed);
        let (status, text) = runtime.block_on(send(s, methods[m], &path, &body, Auth::Basic, true));
        prop_assert!(
            status < 500,
            "{} {} → {}: {}",
            methods[m],
            path,
            status,
            text
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("random paths: {e}");
    }
    let health = runtime.block_on(async {
        fresh_client()
            .get(s.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(health.as_u16(), 200);
    println!(
        "http fuzz: {} inputs ({n} on each of {} routes, {} random paths) in {:.1} s, 0 answers >= 500, server up",
        tried.load(Ordering::Relaxed),
        ROUTES.len(),
        n * 4,
        started.elapsed().as_secs_f64()
    );
}
