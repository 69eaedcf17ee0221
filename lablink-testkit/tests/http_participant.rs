//! The participant's desktop over HTTP, with the agent's side spoken by the test: the live
//! status stream follows the agent's reports, a fresh command after a failed start makes a
//! new attempt the agent's held assignment wait answers at once, a stale report changes
//! nothing, the participant releases the VM, and only the browser that got the VM gets any
//! of it. No answer holds the code or the PIN.

use lablink_testkit::{crd_command, expect_error, json_of, StatusEvents, TestServer};
use reqwest::header::ACCEPT;
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};

async fn report(server: &TestServer, h: &str, desktop: Value) {
    let r = server
        .vm_post(
            h,
            &format!("/api/v1/vms/{h}/telemetry"),
            json!({ "desktop": desktop }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
}

async fn new_command(server: &TestServer, code: &str) -> Response {
    server
        .browser
        .post(server.url("/api/participant/command"))
        .header(ACCEPT, "application/json")
        .json(&json!({ "crd_command": crd_command(code) }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_status_follows_the_agent_and_a_fresh_command_after_a_failure_is_a_new_attempt() {
    let server = TestServer::start().await;
    let h = server.launch_ready(1).await.remove(0);
    let (status, granted) = json_of(server.request_vm("ada@lab.org", "4/first-code").await).await;
    assert_eq!(status, StatusCode::OK, "{granted}");
    let pin = granted["pin"].as_str().unwrap().to_owned();
    let mut events = StatusEvents::open(&server.browser, &server.url("")).await;
    let s = events.status().await;
    assert_eq!(
        (s["stage"].as_str(), s["attempt"].as_u64()),
        (Some("assigned"), Some(1))
    );
    assert_eq!(s["hostname"], h.as_str());

    // The agent holds its wait on the version it has; a fresh command answers it.
    let token = server.token(&h);
    let assignment = |seen: Option<String>| {
        let mut query = vec![("timeout", "20".to_owned())];
        query.extend(seen.map(|v| ("seen", v)));
        server
            .client
            .get(server.url(&format!("/api/v1/vms/{h}/assignment")))
            .bearer_auth(&token)
            .query(&query)
            .send()
    };
    let (_, first) = json_of(assignment(None).await.unwrap()).await;
    assert_eq!(
        (first["attempt"].as_u64(), first["mode"].as_str()),
        (Some(1), Some("crd"))
    );
    report(&server, &h, json!({"attempt": 1, "stage": "received"})).await;
    assert_eq!(events.status().await["stage"], "received");
    let (_, received) = json_of(assignment(None).await.unwrap()).await;
    let held = tokio::spawn(assignment(Some(
        received["version"].as_str().unwrap().to_owned(),
    )));
    let busy = expect_error(new_command(&server, "4/too-soon").await, 409).await;
    assert!(busy.contains("being started"), "{busy}");
    report(
        &server,
        &h,
        json!({"attempt": 1, "stage": "failed", "failure": "code_rejected", "exit_status": 1}),
    )
    .await;
    let s = events.status().await;
    assert_eq!(
        (s["stage"].as_str(), s["failure"].as_str()),
        (Some("failed"), Some("code_rejected"))
    );
    assert_eq!(s["needs_command"], true);
    assert!(s["message"].as_str().unwrap().contains("expired"), "{s}");
    // The held wait answered the failure report; it is the same attempt.
    let (_, woke) = json_of(held.await.unwrap().unwrap()).await;
    assert_eq!(woke["attempt"], 1);

    let bad = expect_error(
        server
            .browser
            .post(server.url("/api/participant/command"))
            .header(ACCEPT, "application/json")
            .json(&json!({"crd_command": "start-host --code=$(reboot)"}))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(
        bad.contains("Invalid Chrome Remote Desktop command"),
        "{bad}"
    );
    let (status, body) = json_of(new_command(&server, "4/second-code").await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["attempt"].as_u64(), body["stage"].as_str()),
        (Some(2), Some("assigned"))
    );
    let s = events.status().await;
    assert_eq!(
        (s["attempt"].as_u64(), s["needs_command"].as_bool()),
        (Some(2), Some(false))
    );
    let (_, second) = json_of(assignment(None).await.unwrap()).await;
    assert_eq!(second["attempt"], 2);
    assert_eq!(second["code"], "4/second-code");

    // A late report of attempt 1 changes nothing; attempt 2's success ends it.
    report(&server, &h, json!({"attempt": 1, "stage": "ready"})).await;
    report(
        &server,
        &h,
        json!({"attempt": 2, "stage": "ready", "exit_status": 0}),
    )
    .await;
    let s = events.status().await;
    assert_eq!(
        (s["stage"].as_str(), s["attempt"].as_u64()),
        (Some("ready"), Some(2))
    );
    assert_eq!(s["link"], "https://remotedesktop.google.com/access");
    let running = expect_error(new_command(&server, "4/third-code").await, 409).await;
    assert!(running.contains("already running"), "{running}");
    let bad_report = server
        .vm_post(
            &h,
            &format!("/api/v1/vms/{h}/telemetry"),
            json!({"desktop": {"attempt": 2, "stage": "exploded"}}),
        )
        .send()
        .await
        .unwrap();
    let said = expect_error(bad_report, 400).await;
    assert!(said.starts_with("desktop:"), "{said}");

    // Only this browser: another one learns nothing and changes nothing.
    let stranger = reqwest::Client::new();
    for (method, path) in [
        (reqwest::Method::GET, "/api/participant/status"),
        (reqwest::Method::POST, "/api/participant/command"),
        (reqwest::Method::POST, "/api/participant/release"),
    ] {
        let r = stranger
            .request(method, server.url(path))
            .json(&json!({"crd_command": crd_command("4/x")}))
            .send()
            .await
            .unwrap();
        expect_error(r, 401).await;
    }

    // The participant is done: the stream says so and ends; the VM is free again.
    let r = server
        .browser
        .post(server.url("/api/participant/release"))
        .header(ACCEPT, "application/json")
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(r).await;
    assert_eq!(
        (status, body["released"].as_str()),
        (StatusCode::OK, Some(h.as_str()))
    );
    let (name, _) = events.next().await;
    assert_eq!(name, "released");
    let record = server.record(&h).await;
    assert_eq!(record.state, lablink::VmState::Available);
    assert_eq!(
        record.history.assignments.len(),
        1,
        "the assignment is in the VM's history"
    );
    for secret in ["4/first-code", "4/second-code", pin.as_str()] {
        assert!(!events.raw.contains(secret) && !body.to_string().contains(secret));
    }
}
