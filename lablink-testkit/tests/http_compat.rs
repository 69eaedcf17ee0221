//! docs/protocol.md, part A over real HTTP: every route's documented success and error answers.

use std::time::Duration;

use lablink::http::AgentAuthMode;
use lablink::{FakeProvisioner, LabLink, VmState};
use lablink_testkit::{crd_command, expect_error, json_of, start_host, TestServer};
use reqwest::header::ACCEPT;
use reqwest::{Method, StatusCode};
use serde_json::json;

async fn open_server() -> TestServer {
    TestServer::start_with(LabLink::builder(), |o| o.agent_auth = AgentAuthMode::Open).await
}

#[tokio::test]
async fn vm_startup_answers_at_once_when_assigned_with_command_and_string_pin() {
    let s = TestServer::start().await;
    let h = &s.launch_ready(1).await[0];
    let (status, granted) = json_of(s.request_vm("ada@lab.org", "4/abc_DEF-1").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(granted["hostname"], h.as_str());
    let (status, body) = json_of(
        s.vm_post(h, "/vm_startup", json!({"hostname": h}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "success");
    assert_eq!(body["command"], start_host("4/abc_DEF-1", h));
    assert!(body["pin"].is_string(), "{body}");
    assert_eq!(body["pin"], granted["pin"]);
}

#[tokio::test]
async fn vm_startup_holds_until_the_vm_is_assigned() {
    let s = TestServer::start().await;
    let h = s.launch_ready(1).await[0].clone();
    let waiter = s.vm_post(&h, "/vm_startup", json!({"hostname": h})).send();
    let waiter = tokio::spawn(waiter);
    while s.state.metrics().waiters() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        s.request_vm("bo@lab.org", "4/held").await.status(),
        StatusCode::OK
    );
    let (status, body) = json_of(waiter.await.unwrap().unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "success");
    assert_eq!(body["command"], start_host("4/held", &h));
}

#[tokio::test]
async fn vm_startup_answers_409_not_assigned_yet_when_the_hold_passes() {
    let s = TestServer::start_with(LabLink::builder(), |o| {
        o.max_wait = Duration::from_millis(200)
    })
    .await;
    let h = &s.launch_ready(1).await[0];
    let response = s
        .vm_post(h, "/vm_startup", json!({"hostname": h}))
        .send()
        .await
        .unwrap();
    assert_eq!(expect_error(response, 409).await, "not assigned yet");
    assert_eq!(s.state.metrics().waiters(), 0);
}

#[tokio::test]
async fn vm_startup_rejects_missing_or_empty_hostname_and_unknown_vms() {
    let s = open_server().await;
    for body in [
        json!({}),
        json!({"hostname": ""}),
        json!({"hostname": 7}),
        json!({"name": "x"}),
    ] {
        let r = s
            .client
            .post(s.url("/vm_startup"))
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_error(r, 400).await;
    }
    let r = s
        .client
        .post(s.url("/vm_startup"))
        .body("not json")
        .send()
        .await
        .unwrap();
    expect_error(r, 400).await;
    let r = s
        .client
        .post(s.url("/vm_startup"))
        .json(&json!({"hostname": "ghost-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(expect_error(r, 404).await, "VM not found.");
}

#[tokio::test]
async fn a_waiter_that_disconnects_is_freed_at_once() {
    let s = TestServer::start().await;
    let h = s.launch_ready(1).await[0].clone();
    let short = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = short
        .post(s.url("/vm_startup"))
        .bearer_auth(s.token(&h))
        .json(&json!({"hostname": h}))
        .send()
        .await;
    assert!(
        r.is_err(),
        "the request should have been abandoned by the client"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.state.metrics().waiters() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the waiter was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn vm_routes_need_the_vms_own_token() {
    let s = TestServer::start().await;
    let hosts = s.launch(2).await;
    let (a, b) = (&hosts[0], &hosts[1]);
    let cases = [
        ("/vm_startup", json!({"hostname": b})),
        (
            "/api/gpu_health",
            json!({"hostname": b, "gpu_status": "Healthy"}),
        ),
        (
            "/api/update_inuse_status",
            json!({"hostname": b, "status": true}),
        ),
        (
            "/api/vm-status",
            json!({"hostname": b, "status": "running"}),
        ),
        (
            "/api/vm-logs",
            json!({"log_group": "g", "log_stream": b, "messages": ["x"]}),
        ),
    ];
    for (path, body) in &cases {
        let none = s.client.post(s.url(path)).json(body).send().await.unwrap();
        expect_error(none, 401).await;
        let bad = s
            .client
            .post(s.url(path))
            .bearer_auth("llt_forged")
            .json(body)
            .send()
            .await
            .unwrap();
        expect_error(bad, 401).await;
        let other = s.vm_post(a, path, body.clone()).send().await.unwrap();
        assert_eq!(
            expect_error(other, 403).await,
            "this token belongs to another VM",
            "{path}"
        );
    }
    let path = format!("/api/vm-metrics/{b}");
    let body = json!({"hostname": a, "cloud_init_start": 1});
    expect_error(s.vm_post(a, &path, body).send().await.unwrap(), 403).await;
    for path in [format!("/api/vm-status/{b}"), format!("/api/vm-logs/{b}")] {
        let r = s
            .client
            .get(s.url(&path))
            .bearer_auth(s.token(a))
            .send()
            .await
            .unwrap();
        expect_error(r, 403).await;
        let own = path.replace(b.as_str(), a);
        let r = s
            .client
            .get(s.url(&own))
            .bearer_auth(s.token(a))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{own}");
    }
    assert_eq!(
        s.record(b).await.agent_status,
        None,
        "nothing was written for {b}"
    );
}

#[tokio::test]
async fn gpu_health_in_use_and_status_reports_are_stored() {
    let s = TestServer::start().await;
    let h = &s.launch(1).await[0];
    let (st, body) = json_of(
        s.vm_post(
            h,
            "/api/gpu_health",
            json!({"hostname": h, "gpu_status": "N/A"}),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!((st.as_u16(), body["message"].is_string()), (200, true));
    let (st, _) = json_of(
        s.vm_post(
            h,
            "/api/update_inuse_status",
            json!({"hostname": h, "status": true}),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = json_of(
        s.vm_post(
            h,
            "/api/vm-status",
            json!({"hostname": h, "status": "running"}),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let record = s.record(h).await;
    assert_eq!(record.gpu_health.as_str(), "N/A");
    assert!(record.in_use);
    assert_eq!(record.state, VmState::Available);

    for body in [
        json!({"hostname": h}),
        json!({"gpu_status": "Healthy"}),
        json!({"hostname": h, "gpu_status": "Great"}),
    ] {
        expect_error(
            s.vm_post(h, "/api/gpu_health", body).send().await.unwrap(),
            400,
        )
        .await;
    }
    for body in [
        json!({"status": true}),
        json!({"hostname": h, "status": "true"}),
        json!({"hostname": h}),
    ] {
        expect_error(
            s.vm_post(h, "/api/update_inuse_status", body)
                .send()
                .await
                .unwrap(),
            400,
        )
        .await;
    }
    for body in [
        json!({"hostname": h}),
        json!({"status": "running"}),
        json!({"hostname": h, "status": "sleeping"}),
    ] {
        expect_error(
            s.vm_post(h, "/api/vm-status", body).send().await.unwrap(),
            400,
        )
        .await;
    }
}

#[tokio::test]
async fn vm_metrics_are_stored_unknown_keys_ignored_and_unknown_vms_404() {
    let s = open_server().await;
    let h = &s.launch(1).await[0];
    let body = json!({"cloud_init_start": 1_700_000_000, "cloud_init_end": 1_700_000_060.5,
        "container_start": 1_700_000_061, "container_end": 1_700_000_090,
        "cloud_init_duration_seconds": 60.5, "container_startup_duration_seconds": 29, "surprise": "ignored"});
    let r = s
        .client
        .post(s.url(&format!("/api/vm-metrics/{h}")))
        .json(&body)
        .send()
        .await
        .unwrap();
    let (st, reply) = json_of(r).await;
    assert_eq!(st, StatusCode::OK, "{reply}");
    let t = s.record(h).await.timings;
    assert_eq!(t.cloud_init_start.unwrap().timestamp(), 1_700_000_000);
    assert_eq!(t.container_startup_duration_seconds, Some(29.0));
    let r = s
        .client
        .post(s.url("/api/vm-metrics/ghost-1"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(expect_error(r, 404).await, "VM not found.");
    let r = s
        .client
        .post(s.url(&format!("/api/vm-metrics/{h}")))
        .json(&json!({"cloud_init_start": "soon"}))
        .send()
        .await
        .unwrap();
    expect_error(r, 400).await;
}

#[tokio::test]
async fn vm_logs_are_cleaned_routed_by_group_and_read_back() {
    let s = TestServer::start().await;
    let h = &s.launch(1).await[0];
    let post = |group: &str, lines: Vec<&str>| {
        s.vm_post(
            h,
            "/api/vm-logs",
            json!({"log_group": group, "log_stream": h, "messages": lines}),
        )
    };
    assert_eq!(
        post(
            "lablink-cloud-init",
            vec!["\u{1b}[32mboot ok\u{1b}[0m", "", "  "]
        )
        .send()
        .await
        .unwrap()
        .status(),
        200
    );
    assert_eq!(
        post("lablink-docker", vec!["container up"])
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = s
        .admin(Method::GET, &format!("/api/vm-logs/{h}"))
        .send()
        .await
        .unwrap();
    let (st, body) = json_of(r).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body["hostname"], h.as_str());
    assert_eq!(body["cloud_init_logs"], "boot ok");
    assert_eq!(body["docker_logs"], "container up");
    assert_eq!(body["logs"], "boot ok\ncontainer up");

    for bad in [
        json!({"log_stream": h, "messages": ["x"]}),
        json!({"log_group": "g", "log_stream": h}),
        json!({"log_group": "g", "log_stream": h, "messages": []}),
        json!({"log_group": "", "log_stream": h, "messages": ["x"]}),
        json!({"log_group": "g", "log_stream": h, "messages": [1]}),
    ] {
        expect_error(s.vm_post(h, "/api/vm-logs", bad).send().await.unwrap(), 400).await;
    }
    let open = open_server().await;
    let r = open
        .client
        .post(open.url("/api/vm-logs"))
        .json(&json!({"log_group": "g", "log_stream": "ghost-1", "messages": ["x"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(expect_error(r, 404).await, "VM not found.");
    let r = s
        .admin(Method::GET, "/api/vm-logs/ghost-1")
        .send()
        .await
        .unwrap();
    expect_error(r, 404).await;
}

#[tokio::test]
async fn participants_get_a_vm_the_same_vm_again_or_a_clear_refusal() {
    let s = TestServer::start().await;
    let (_, count) = json_of(
        s.client
            .get(s.url("/api/unassigned_vms_count"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(count, json!({"count": 0}));
    let r = s.request_vm("ada@lab.org", "4/x").await;
    assert!(expect_error(r, 503).await.contains("No VM is free"));
    s.launch_ready(2).await;
    let (_, count) = json_of(
        s.client
            .get(s.url("/api/unassigned_vms_count"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(count, json!({"count": 2}));
    let (st, first) = json_of(s.request_vm("ada@lab.org", "4/x").await).await;
    assert_eq!(st, StatusCode::OK);
    assert!(first["pin"].is_string() && first["hostname"].is_string());
    let (_, again) = json_of(s.request_vm("ADA@lab.org", "4/y").await).await;
    assert_eq!(again, first, "same email, same VM and PIN");
    let page = s
        .browser
        .post(s.url("/api/request_vm"))
        .form(&[
            ("email", "bo@lab.org"),
            ("crd_command", &crd_command("4/z")),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    let (_, granted) = json_of(s.request_vm("bo@lab.org", "4/z").await).await;
    assert!(
        html.contains(granted["hostname"].as_str().unwrap()),
        "{html}"
    );
    assert!(html.contains(granted["pin"].as_str().unwrap()));

    for form in [
        vec![("email", "c@lab.org")],
        vec![("crd_command", "start-host --code=abc")],
        vec![
            ("email", "c@lab.org"),
            ("crd_command", "start-host --name=x"),
        ],
        vec![("email", "not-an-email"), ("crd_command", "--code=abc")],
    ] {
        let r = s
            .client
            .post(s.url("/api/request_vm"))
            .header(ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .unwrap();
        expect_error(r, 400).await;
        let page = s
            .client
            .post(s.url("/api/request_vm"))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), StatusCode::BAD_REQUEST);
        assert!(page
            .text()
            .await
            .unwrap()
            .contains("data-outcome=\"invalid\""));
    }
    let r = s
        .client
        .post(s.url("/api/request_vm"))
        .form(&[("email", "d@lab.org"), ("crd_command", &crd_command("4/d"))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.text().await.unwrap().contains("data-outcome=\"no_vm\""));
}

#[tokio::test]
async fn admin_reads_vm_status_maps_and_single_vms() {
    let s = TestServer::start().await;
    let hosts = s.launch_ready(2).await;
    let (st, map) = json_of(s.admin(Method::GET, "/api/vm-status").send().await.unwrap()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        map,
        json!({hosts[0].clone(): "running", hosts[1].clone(): "running"})
    );
    let (st, one) = json_of(
        s.admin(Method::GET, &format!("/api/vm-status/{}", hosts[0]))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(one, json!({"hostname": hosts[0], "status": "running"}));
    expect_error(
        s.admin(Method::GET, "/api/vm-status/ghost-1")
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    expect_error(
        s.client.get(s.url("/api/vm-status")).send().await.unwrap(),
        401,
    )
    .await;
}

#[tokio::test]
async fn launch_validates_counts_and_refuses_a_second_running_operation() {
    let slow = FakeProvisioner::new().with_latency(Duration::from_secs(3));
    let s = TestServer::start_full(LabLink::builder(), slow, |_| {}).await;
    for bad in ["0", "-1", "abc", ""] {
        let r = s
            .admin(Method::POST, "/api/launch")
            .form(&[("num_vms", bad)])
            .send()
            .await
            .unwrap();
        expect_error(r, 400).await;
    }
    expect_error(
        s.admin(Method::POST, "/api/launch")
            .json(&json!({"num_vms": 0}))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    let r = s
        .admin(Method::POST, "/api/launch")
        .json(&json!({"num_vms": 2}))
        .send()
        .await
        .unwrap();
    let (st, body) = json_of(r).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert!(body["job_id"].is_string());
    let r = s
        .admin(Method::POST, "/api/launch")
        .form(&[("num_vms", "1")])
        .send()
        .await
        .unwrap();
    expect_error(r, 409).await;
}

#[tokio::test]
async fn destroy_removes_every_vm_and_reboot_answers_200_or_404() {
    let s = TestServer::start().await;
    let hosts = s.launch_ready(2).await;
    let (st, body) = json_of(
        s.admin(Method::POST, "/api/reboot-vm")
            .json(&json!({"hostname": hosts[0]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    expect_error(
        s.admin(Method::POST, "/api/reboot-vm")
            .json(&json!({"hostname": "ghost-1"}))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    expect_error(
        s.admin(Method::POST, "/api/reboot-vm")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    lablink::AllocatorExt::wait_for_operation(
        &*s.allocator,
        body["job_id"].as_str().unwrap().parse().unwrap(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let (st, body) = json_of(s.admin(Method::POST, "/destroy").send().await.unwrap()).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}");
    let op = lablink::AllocatorExt::wait_for_operation(
        &*s.allocator,
        body["job_id"].as_str().unwrap().parse().unwrap(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(op.status.as_str(), "succeeded");
    let (_, map) = json_of(s.admin(Method::GET, "/api/vm-status").send().await.unwrap()).await;
    assert_eq!(map, json!({}));
}
