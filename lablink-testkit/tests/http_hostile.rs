//! Hostile participants and a busy proxy, tried against the real server: pasted commands
//! meant to run a shell on VMs built for the Python client, strangers taking VMs or other
//! people's PINs, floods, parallel password guessing, forged request ids, slow bodies,
//! absurd timings and oversized request heads.

use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use lablink::http::AgentAuthMode;
use lablink::LabLink;
use lablink_testkit::{
    browser, captured_logs, crd_command, expect_error, json_of, TestServer, ADMIN_PASSWORD,
    ADMIN_USER,
};
use reqwest::header::{ACCEPT, RETRY_AFTER};
use reqwest::{Client, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the Python client 0.1.2 does with the command `/vm_startup` gives it: splits it on
/// whitespace and lets argparse (one `--code` option, abbreviations allowed, the last one
/// wins) pick the code it passes to `start-host` through `/bin/sh`. Run by the real Python
/// interpreter, for every command at once; `None` where argparse gives no code.
fn python_client_codes(commands: &[String]) -> Vec<Option<String>> {
    const SCRIPT: &str = r#"
import argparse, json, sys
out = []
for command in json.load(sys.stdin):
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--code")
    try:
        args, _ = parser.parse_known_args(command.split())
        out.append(args.code)
    except BaseException:
        out.append(None)
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is needed to run the 0.1.2 client's own argparse; install it");
    serde_json::to_writer(child.stdin.take().unwrap(), commands).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python3 failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Commands a hostile participant pastes, or a clumsy one.
fn hostile_commands() -> Vec<String> {
    let mut commands: Vec<String> = [
        // The two attacks seen on VMs running the 0.1.2 client.
        "DISPLAY= /opt/google/chrome-remote-desktop/start-host --code=\"4/0Aok\" --code=$(touch${IFS}/tmp/x) --redirect-url=\"https://remotedesktop.google.com/_/oauthredirect\" --name=$(hostname)",
        "DISPLAY= /opt/google/chrome-remote-desktop/start-host --code=\"4/0Aok\" --cod=$(touch${IFS}/tmp/x) --name=$(hostname)",
        "--co=$(id) --code=4/ok",
        "--c $(id) --code=4/ok",
        "--code=4/ok --code 4/other",
        "--code 4/ok --c=4/other",
        "--cod=4/ok",
        "--code=4/ok -- --code=$(id)",
        "--code=4/ok --code",
        "\u{2014}code=4/ok",
        "--code=4/\u{043e}k",
        "\u{ff0d}\u{ff0d}code=4/ok",
        "--code=4/ok\u{a0}--code=$(id)",
        "--code=4/ok\u{1c}--code=$(id)",
        "--code=4/ok\u{0}",
        "--code=4/ok\r--code=$(id)",
        "--code=4/ok\x0b--code=$(id)",
        "--code='4/ok' --name='$(id)'",
        "start-host --code=\"4/ok\"",
        "start-host --code 4/ok --name=x",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for meta in [
        ";", "|", "&", "$", "`", "(", ")", "<", ">", "\\", "'", "\"", "*", "?", "[", "]", "{", "}",
        "~", "#", "!", "=", "%", "\n", "\t", " ",
    ] {
        commands.push(format!("--code=4/a{meta}b"));
        commands.push(format!("--code=\"4/a{meta}id\""));
    }
    commands.push(format!("--code={}", "A".repeat(600)));
    commands.push(format!("--code=4/ok {}", "x".repeat(5000)));
    commands
}

fn only_code_characters(code: &str) -> bool {
    !code.is_empty()
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'))
}

#[tokio::test]
async fn hostile_commands_are_refused_or_reach_the_vm_as_exactly_the_validated_code() {
    let commands = hostile_commands();
    let s =
        TestServer::start_with(LabLink::builder(), |o| o.agent_auth = AgentAuthMode::Open).await;
    let hosts = s.launch_ready(commands.len() * 3).await;
    let mut delivered = Vec::new();
    let mut verdicts = Vec::new();
    for (i, command) in commands.iter().enumerate() {
        // Through the HTML form, the JSON form and the v1 route: the same verdict.
        let email = |way: &str| format!("p{i}-{way}@lab.org");
        let html = s
            .client
            .post(s.url("/api/request_vm"))
            .form(&[("email", email("html")), ("crd_command", command.clone())])
            .send()
            .await
            .unwrap();
        let json = s
            .client
            .post(s.url("/api/request_vm"))
            .header(ACCEPT, "application/json")
            .json(&json!({"email": email("json"), "crd_command": command}))
            .send()
            .await
            .unwrap();
        let v1 = s
            .client
            .post(s.url("/api/v1/requests"))
            .json(&json!({"email": email("v1"), "crd_command": command}))
            .send()
            .await
            .unwrap();
        let statuses = [html.status(), json.status(), v1.status()];
        assert!(
            statuses.iter().all(|st| *st == statuses[0]),
            "{command:?}: {statuses:?}"
        );
        verdicts.push(statuses[0]);
        match statuses[0] {
            StatusCode::BAD_REQUEST => {
                let message = expect_error(json, 400).await;
                assert!(
                    !message.contains("$("),
                    "the command is not echoed: {message}"
                );
                assert!(html
                    .text()
                    .await
                    .unwrap()
                    .contains("Chrome Remote Desktop command"));
            }
            StatusCode::OK => {
                for answer in [json, v1] {
                    let (_, body) = json_of(answer).await;
                    let h = body["hostname"].as_str().unwrap().to_owned();
                    let (st, startup) = json_of(
                        s.client
                            .post(s.url("/vm_startup"))
                            .json(&json!({"hostname": h}))
                            .send()
                            .await
                            .unwrap(),
                    )
                    .await;
                    assert_eq!(st, StatusCode::OK, "{startup}");
                    let stored = s.record(&h).await.assignment.unwrap().crd_command.unwrap();
                    delivered.push((
                        command.clone(),
                        stored.code().to_owned(),
                        startup["command"].as_str().unwrap().to_owned(),
                    ));
                }
            }
            other => panic!("{command:?}: {other}"),
        }
    }
    // The two attacks seen on 0.1.2 VMs (the repeated and the abbreviated --code) are
    // refused; the plain pasted forms are accepted.
    assert_eq!(verdicts[0], StatusCode::BAD_REQUEST);
    assert_eq!(verdicts[1], StatusCode::BAD_REQUEST);
    let accepted = verdicts.iter().filter(|v| **v == StatusCode::OK).count();
    assert!(
        accepted >= 3,
        "the well-formed commands are accepted: {verdicts:?}"
    );
    let codes = python_client_codes(
        &delivered
            .iter()
            .map(|(_, _, command)| command.clone())
            .collect::<Vec<_>>(),
    );
    for ((pasted, stored, command), client_code) in delivered.iter().zip(codes) {
        assert!(only_code_characters(stored), "{pasted:?} stored {stored:?}");
        assert_eq!(
            client_code.as_deref(),
            Some(stored.as_str()),
            "{pasted:?}: the 0.1.2 client would run another code from {command:?}"
        );
    }
    assert_eq!(delivered.len(), 2 * accepted);
    assert!(hosts.len() >= 3 * verdicts.len());
}

#[tokio::test]
async fn hostile_emails_are_refused_or_stored_as_plain_ascii() {
    let s = TestServer::start().await;
    s.launch_ready(4).await;
    let long = format!("{}@lab.org", "a".repeat(300));
    for email in [
        "\u{0430}da@lab.org",
        "ada@lab.org\u{0}",
        "ada\u{1b}[31m@lab.org",
        "a b@lab.org",
        "ada@lab.org\nBcc: x@y.org",
        "<script>@lab.org",
        long.as_str(),
        "ada@\u{ff4c}ab.org",
    ] {
        let r = s
            .client
            .post(s.url("/api/request_vm"))
            .header(ACCEPT, "application/json")
            .json(&json!({"email": email, "crd_command": crd_command("4/ok")}))
            .send()
            .await
            .unwrap();
        match r.status() {
            StatusCode::BAD_REQUEST => {}
            StatusCode::OK => {
                let (_, body) = json_of(r).await;
                let record = s.record(body["hostname"].as_str().unwrap()).await;
                let stored = record.assignment.unwrap().email.to_string();
                assert!(
                    stored.bytes().all(|b| b.is_ascii_graphic()),
                    "{email:?} stored as {stored:?}"
                );
            }
            other => panic!("{email:?}: {other}"),
        }
    }
}

#[tokio::test]
async fn an_access_code_and_a_registered_list_decide_who_gets_a_vm() {
    let s = TestServer::start_with(LabLink::builder(), |o| {
        o.access_code = Some("blue-heron-42".into())
    })
    .await;
    s.launch_ready(3).await;
    let ask = |email: &str, code: Option<&str>| {
        let mut body = json!({"email": email, "crd_command": crd_command("4/ok")});
        if let Some(code) = code {
            body["access_code"] = json!(code);
        }
        s.client.post(s.url("/api/v1/requests")).json(&body).send()
    };
    let page = s.client.get(s.url("/")).send().await.unwrap();
    assert!(page.text().await.unwrap().contains("name=\"access_code\""));
    assert!(expect_error(ask("a@lab.org", None).await.unwrap(), 403)
        .await
        .contains("access code"));
    assert!(
        expect_error(ask("a@lab.org", Some("blue-heron-41")).await.unwrap(), 403)
            .await
            .contains("not right")
    );
    assert_eq!(
        s.allocator.counts().await.unwrap().assignable,
        3,
        "no VM went to a refused request"
    );
    let (st, _) = json_of(ask("a@lab.org", Some("blue-heron-42")).await.unwrap()).await;
    assert_eq!(st, StatusCode::OK);

    // A list of registered emails, uploaded as CSV: only they get a VM.
    let (st, roster) = json_of(
        s.admin(reqwest::Method::PUT, "/api/v1/roster")
            .json(&json!({"csv": "name,email\nBo,BO@lab.org\nCy,cy@lab.org\n"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{roster}");
    assert_eq!(roster["emails"], json!(["bo@lab.org", "cy@lab.org"]));
    let message = expect_error(
        ask("mallory@lab.org", Some("blue-heron-42")).await.unwrap(),
        403,
    )
    .await;
    assert!(message.contains("registered"), "{message}");
    let (st, _) = json_of(ask("bo@lab.org", Some("blue-heron-42")).await.unwrap()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(s.allocator.counts().await.unwrap().assignable, 1);
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("lablink_claims_total{outcome=\"refused\"} 3"),
        "{metrics}"
    );
    // The admin page takes the same CSV (here as a script would post it) and shows the list.
    let (st, roster) = json_of(
        s.admin(reqwest::Method::POST, "/admin/participants")
            .form(&[("csv", "bo@lab.org\ncy@lab.org\ndi@lab.org\n")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{roster}");
    assert_eq!(roster["count"], 3);
    let page = s
        .client
        .get(s.url("/admin/participants"))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap();
    let html = page.text().await.unwrap();
    assert!(
        html.contains("3 registered") && html.contains("di@lab.org"),
        "{html}"
    );
    // A bad line names itself and changes nothing.
    let message = expect_error(
        s.admin(reqwest::Method::PUT, "/api/v1/roster")
            .json(&json!({"csv": "ok@lab.org\nnot@an@email\n"}))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(message.contains("line 2"), "{message}");
    assert_eq!(s.allocator.roster().await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_room_behind_one_address_is_served_and_a_flood_gets_429_with_retry_after() {
    const ROOM: usize = 300;
    let s = TestServer::start().await;
    s.launch_ready(ROOM + 150).await;
    // A room of 300 behind one NAT address presses the button within a second.
    let emails: Vec<String> = (0..ROOM).map(|i| format!("room{i}@lab.org")).collect();
    let room = join_all(emails.iter().map(|e| s.request_vm(e, "4/ok"))).await;
    let served = room.iter().filter(|r| r.status() == StatusCode::OK).count();
    assert_eq!(served, ROOM, "everyone in the room gets a VM");
    // Then a script from the same address keeps going.
    let mut limited = None;
    for i in 0..150 {
        let r = s.request_vm(&format!("script{i}@lab.org"), "4/ok").await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("the flood is limited");
    let retry: u64 = r.headers()[RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    expect_error(r, 429).await;
    let assigned = s.allocator.counts().await.unwrap().assigned;
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("lablink_claims_total{outcome=\"rate_limited\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "lablink_claims_total{{outcome=\"assigned\"}} {assigned}"
    )));
}

#[tokio::test]
async fn a_repeat_for_someone_elses_email_reveals_neither_vm_nor_pin() {
    let s = TestServer::start().await;
    s.launch_ready(2).await;
    let (st, first) = json_of(s.request_vm("ada@lab.org", "4/ada").await).await;
    assert_eq!(st, StatusCode::OK);
    let (hostname, pin) = (
        first["hostname"].as_str().unwrap(),
        first["pin"].as_str().unwrap(),
    );
    let stranger = browser();
    for email in ["ada@lab.org", " ADA@Lab.org "] {
        let answers = [
            stranger
                .post(s.url("/api/request_vm"))
                .form(&[("email", email), ("crd_command", &crd_command("4/evil"))])
                .send()
                .await
                .unwrap(),
            stranger
                .post(s.url("/api/request_vm"))
                .header(ACCEPT, "application/json")
                .json(&json!({"email": email, "crd_command": crd_command("4/evil")}))
                .send()
                .await
                .unwrap(),
            stranger
                .post(s.url("/api/v1/requests"))
                .json(&json!({"email": email, "crd_command": crd_command("4/evil")}))
                .send()
                .await
                .unwrap(),
        ];
        for answer in answers {
            assert_eq!(answer.status(), StatusCode::CONFLICT);
            let text = answer.text().await.unwrap();
            assert!(!text.contains(hostname) && !text.contains(pin), "{text}");
            assert!(text.contains("already has a VM"), "{text}");
        }
    }
    // The first browser sees its VM again, and the stranger's attempts changed nothing.
    let (st, again) = json_of(s.request_vm("ADA@lab.org", "4/ada").await).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(again, first);
    let record = s.record(hostname).await;
    assert_eq!(
        record.assignment.unwrap().crd_command.unwrap().code(),
        "4/ada"
    );
}

/// A client whose requests come from `addr` (any 127.x.y.z reaches the server).
fn client_from(addr: &str) -> Client {
    Client::builder()
        .local_address(addr.parse::<IpAddr>().unwrap())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_wrong_passwords_are_limited_before_argon2_runs() {
    let s = Arc::new(TestServer::start().await);
    let basic = |client: &Client, password: &str| {
        client
            .get(s.url("/api/v1/vms"))
            .basic_auth(ADMIN_USER, Some(password.to_owned()))
            .header(ACCEPT, "application/json")
            .send()
    };
    // One verification on its own, for scale.
    let t = Instant::now();
    assert_eq!(
        basic(&client_from("127.0.0.3"), "wrong")
            .await
            .unwrap()
            .status(),
        401
    );
    let one = t.elapsed();

    let attacker = client_from("127.0.0.1");
    let attack = join_all((0..60).map(|_| basic(&attacker, "guess")));
    let admin = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        let status = basic(&client_from("127.0.0.2"), ADMIN_PASSWORD)
            .await
            .unwrap()
            .status();
        (status, t.elapsed())
    };
    let (answers, (admin_status, admin_took)) = tokio::join!(attack, admin);
    let statuses: Vec<u16> = answers
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    let verified = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(verified + limited, 60, "{statuses:?}");
    assert!(
        verified <= 5,
        "at most the configured 5 verified: {statuses:?}"
    );
    assert_eq!(admin_status, StatusCode::OK);
    // Measured in this run: the admin from another address waits for at most a couple of
    // verifications (one permit may be busy), not for the attacker's sixty.
    let ratio = admin_took.as_secs_f64() / one.as_secs_f64();
    assert!(
        ratio < 10.0,
        "correct sign-in took {admin_took:?}, one verification {one:?}"
    );
    let metrics = s.metrics().await;
    assert!(metrics.contains(&format!("lablink_sign_ins_rate_limited_total {limited}")));
}

#[tokio::test]
async fn metrics_with_a_token_refuse_everyone_else() {
    let s = TestServer::start_with(LabLink::builder(), |o| {
        o.metrics_token = Some("scrape-me-please".into())
    })
    .await;
    expect_error(s.client.get(s.url("/metrics")).send().await.unwrap(), 401).await;
    expect_error(
        s.client
            .get(s.url("/metrics"))
            .bearer_auth("scrape-me")
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    let r = s
        .client
        .get(s.url("/metrics"))
        .bearer_auth("scrape-me-please")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("lablink_claims_total"));
}

#[tokio::test]
async fn every_answer_has_the_headers_and_the_log_has_no_forged_lines() {
    let log = captured_logs();
    let s = TestServer::start().await;
    let forged = "x\"} FORGED-LOG-LINE {\"";
    let valid = "6f1c3c1e-9f55-4c1e-8c4a-2f8f7a1f0b2d";
    let mut pages = Vec::new();
    for path in [
        "/",
        "/admin/login",
        "/no/such/route",
        "/api/unassigned_vms_count",
    ] {
        pages.push(
            s.client
                .get(s.url(path))
                .header("x-request-id", forged)
                .send()
                .await
                .unwrap(),
        );
    }
    // Nobody gets a VM: twenty answers of "no VM free".
    for i in 0..20 {
        pages.push(
            s.client
                .post(s.url("/api/request_vm"))
                .header("x-request-id", forged)
                .form(&[
                    ("email", format!("p{i}@lab.org")),
                    ("crd_command", crd_command("4/ok")),
                ])
                .send()
                .await
                .unwrap(),
        );
    }
    pages.push(
        s.client
            .get(s.url("/healthz"))
            .header("x-request-id", valid)
            .send()
            .await
            .unwrap(),
    );
    for page in &pages {
        let h = page.headers();
        assert_eq!(h["cache-control"], "no-store", "{}", page.url());
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["content-security-policy"], "frame-ancestors 'none'");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "no-referrer");
    }
    for page in &pages[..pages.len() - 1] {
        let id = page.headers()["x-request-id"].to_str().unwrap();
        assert_ne!(id, forged);
        assert!(uuid::Uuid::try_parse(id).is_ok(), "{id}");
    }
    assert_eq!(pages.last().unwrap().headers()["x-request-id"], valid);
    assert_eq!(pages[5].status(), StatusCode::SERVICE_UNAVAILABLE);
    let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    assert!(text.contains("request"), "the log was captured: {text}");
    assert!(!text.contains("FORGED-LOG-LINE"), "{text}");
    assert!(
        text.contains(valid),
        "a client's real UUID is kept for tracing"
    );
    assert!(
        !text.contains("ERROR"),
        "\"no VM free\" is not an error: {text}"
    );
}

#[tokio::test]
async fn a_held_route_stops_waiting_for_a_slow_body() {
    let s = TestServer::start_with(LabLink::builder(), |o| {
        o.agent_auth = AgentAuthMode::Open;
        o.body_read_timeout = Duration::from_millis(300);
    })
    .await;
    let addr = s.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /vm_startup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"hostnam",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    // The server answers and closes; the 10 s bound only keeps a broken server from hanging
    // the test.
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the server stopped waiting for the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive in time"), "{answer}");
}

#[tokio::test]
async fn implausible_timings_are_refused_and_nothing_is_stored() {
    let s = TestServer::start().await;
    let h = &s.launch_ready(1).await[0];
    for body in [
        json!({"cloud_init_start": 99_999_999_999.0_f64}),
        json!({"cloud_init_start": 1_700_000_000, "cloud_init_duration_seconds": 1e308}),
        json!({"container_start": 100}),
        json!({"container_startup_duration_seconds": 40.0 * 86_400.0}),
    ] {
        let r = s
            .vm_post(h, &format!("/api/vm-metrics/{h}"), body.clone())
            .send()
            .await
            .unwrap();
        let message = expect_error(r, 400).await;
        assert!(
            message.contains("plausible") || message.contains("range"),
            "{body}: {message}"
        );
    }
    let timings = s.record(h).await.timings;
    assert_eq!(timings.cloud_init_start, None);
    assert_eq!(timings.cloud_init_duration_seconds, None);
    let ok = s
        .vm_post(
            h,
            &format!("/api/vm-metrics/{h}"),
            json!({"cloud_init_duration_seconds": 42.5}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_batch_with_an_implausible_timing_still_makes_the_vm_ready() {
    let s = TestServer::start().await;
    let h = &s.launch(1).await[0];
    let batch = json!({"status": "running", "boot_id": "boot-1",
        "timings": {"cloud_init_start": "5138-11-16T09:46:39Z", "cloud_init_duration_seconds": 42.0,
                    "container_startup_duration_seconds": -3.0}});
    let r = s
        .vm_post(h, &format!("/api/v1/vms/{h}/telemetry"), batch)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let record = s.record(h).await;
    assert_eq!(
        record.state,
        lablink::VmState::Available,
        "the status was applied"
    );
    assert_eq!(record.timings.cloud_init_start, None);
    assert_eq!(record.timings.container_startup_duration_seconds, None);
    assert_eq!(record.timings.cloud_init_duration_seconds, Some(42.0));
}

#[tokio::test]
async fn oversized_heads_get_json_errors() {
    let s = TestServer::start().await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    let raw = |head: String| {
        let addr = addr.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
                .await;
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(10_000)
    );
    let answer = raw(long_uri).await;
    assert!(answer.starts_with("HTTP/1.1 414"), "{answer}");
    assert!(answer.contains("{\"error\":"), "{answer}");
    let headers: String = (0..150).map(|i| format!("X-Pad-{i}: x\r\n")).collect();
    let answer = raw(format!(
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n"
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(answer.contains("{\"error\":"), "{answer}");
}

#[tokio::test]
async fn a_participant_cookie_signed_with_another_key_proves_nothing() {
    let s = TestServer::start().await;
    s.launch_ready(1).await;
    let (st, _) = json_of(s.request_vm("ada@lab.org", "4/a").await).await;
    assert_eq!(st, StatusCode::OK);
    let forged = lablink::http::CookieKey::generate().sign("participant", "ada@lab.org", i64::MAX);
    let r = s
        .client
        .post(s.url("/api/request_vm"))
        .header(ACCEPT, "application/json")
        .header(
            reqwest::header::COOKIE,
            format!("lablink_participant={forged}"),
        )
        .form(&[
            ("email", "ada@lab.org"),
            ("crd_command", &crd_command("4/other")),
        ])
        .send()
        .await
        .unwrap();
    assert!(expect_error(r, 409).await.contains("already has a VM"));
}

#[tokio::test]
async fn the_same_code_proves_a_retry_and_an_old_cookie_proves_nothing_after_a_release() {
    let s = TestServer::start().await;
    s.launch_ready(2).await;
    let (st, first) = json_of(s.request_vm("ada@lab.org", "4/ada-1").await).await;
    assert_eq!(st, StatusCode::OK);
    // A retry whose first answer was lost (no cookie), with the same one-time code: the VM.
    let retry = s
        .client
        .post(s.url("/api/v1/requests"))
        .json(&json!({"email": "ada@lab.org", "crd_command": crd_command("4/ada-1")}))
        .send()
        .await
        .unwrap();
    let (st, again) = json_of(retry).await;
    assert_eq!(st, StatusCode::OK, "{again}");
    assert_eq!(again["pin"], first["pin"]);
    // Someone got ada's VM first; the organisers release it and ada gets another one. The
    // squatter's cookie was signed for the first assignment: it shows nothing now.
    let hostname = first["hostname"].as_str().unwrap();
    let release = s
        .admin(
            reqwest::Method::POST,
            &format!("/api/v1/vms/{hostname}/release"),
        )
        .send()
        .await
        .unwrap();
    assert!(release.status().is_success());
    let ada = browser();
    let (st, second) = json_of(
        ada.post(s.url("/api/v1/requests"))
            .json(&json!({"email": "ada@lab.org", "crd_command": crd_command("4/ada-2")}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let squatter = s.request_vm("ada@lab.org", "4/guess").await;
    assert_eq!(squatter.status(), StatusCode::CONFLICT);
    let text = squatter.text().await.unwrap();
    assert!(!text.contains(second["pin"].as_str().unwrap()), "{text}");
}

/// Sign-in failures sent through a trusted proxy count against the client the proxy names:
/// that client is locked out, another client behind the same proxy is not. From an address
/// that is not a trusted proxy, `X-Forwarded-For` is ignored: the failures count against the
/// sender itself, whatever client it names.
#[tokio::test]
async fn sign_in_failures_through_a_trusted_proxy_lock_out_that_client_only() {
    let s = TestServer::start_with(LabLink::builder(), |o| {
        o.trusted_proxies = vec!["127.0.0.10/32".parse().unwrap()];
    })
    .await;
    let sign_in = |from: &str, client: &str, password: &str| {
        client_from(from)
            .get(s.url("/api/v1/vms"))
            .basic_auth(ADMIN_USER, Some(password.to_owned()))
            .header(ACCEPT, "application/json")
            .header("X-Forwarded-For", client)
            .send()
    };
    let proxy = "127.0.0.10";
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(
            sign_in(proxy, "198.51.100.7", "guess")
                .await
                .unwrap()
                .status(),
        );
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    let locked = sign_in(proxy, "198.51.100.7", ADMIN_PASSWORD)
        .await
        .unwrap();
    assert_eq!(
        locked.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the guesser stays locked out"
    );
    let other = sign_in(proxy, "198.51.100.8", ADMIN_PASSWORD)
        .await
        .unwrap();
    assert_eq!(
        other.status(),
        StatusCode::OK,
        "another client behind the proxy signs in"
    );

    // An untrusted sender naming a fresh client each time is still one client.
    let mut statuses = Vec::new();
    for i in 0..8 {
        let named = format!("203.0.113.{i}");
        statuses.push(
            sign_in("127.0.0.11", &named, "guess")
                .await
                .unwrap()
                .status(),
        );
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    // A guess: the right password is cached since the other client's sign-in.
    let spoofed = sign_in("127.0.0.11", "203.0.113.200", "guess")
        .await
        .unwrap();
    assert_eq!(
        spoofed.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the header chose nothing"
    );
}
