//! Security over real HTTP: admin routes refuse anonymous callers, sessions need CSRF tokens,
//! failed sign-ins are rate-limited, VM tokens act only for their own VM, and CRD commands,
//! PINs, tokens and passwords never reach a log line or an error body.

use lablink_testkit::{
    captured_logs, crd_command, expect_error, json_of, TestServer, ADMIN_PASSWORD, ADMIN_USER,
};
use reqwest::header::{ACCEPT, COOKIE, LOCATION};
use reqwest::{Method, StatusCode};
use serde_json::json;

const ADMIN_ROUTES: &[(&str, &str)] = &[
    ("GET", "/admin"),
    ("GET", "/admin/vms/lablink-vm-1"),
    ("GET", "/admin/events"),
    ("POST", "/admin/launch"),
    ("GET", "/admin/destroy"),
    ("POST", "/admin/destroy"),
    ("POST", "/admin/reboot"),
    ("POST", "/admin/release"),
    ("POST", "/admin/logout"),
    ("GET", "/api/vm-status"),
    ("GET", "/api/vm-status/lablink-vm-1"),
    ("GET", "/api/vm-logs/lablink-vm-1"),
    ("POST", "/api/launch"),
    ("POST", "/destroy"),
    ("POST", "/api/reboot-vm"),
    ("GET", "/api/v1/vms"),
    ("GET", "/api/v1/vms/lablink-vm-1"),
    ("GET", "/api/v1/vms/lablink-vm-1/logs"),
    ("POST", "/api/v1/launch"),
    ("POST", "/api/v1/destroy"),
    ("POST", "/api/v1/vms/lablink-vm-1/reboot"),
    ("POST", "/api/v1/vms/lablink-vm-1/release"),
    ("GET", "/api/v1/operations"),
    (
        "GET",
        "/api/v1/operations/00000000-0000-0000-0000-000000000000",
    ),
    ("GET", "/api/v1/pool"),
    ("GET", "/api/v1/audit"),
    ("GET", "/admin/audit"),
];

#[tokio::test]
async fn every_admin_route_refuses_anonymous_and_wrong_credentials() {
    let s = TestServer::start_with(lablink::LabLink::builder(), |o| {
        o.sign_in_failures_per_minute = 1000
    })
    .await;
    s.launch(1).await;
    for (method, path) in ADMIN_ROUTES {
        let method: Method = method.parse().unwrap();
        let body = json!({"num_vms": 1, "count": 1, "all": true, "hostname": "lablink-vm-1", "confirm": "yes"});
        let anonymous = s
            .client
            .request(method.clone(), s.url(path))
            .header(ACCEPT, "application/json")
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_error(anonymous, 401).await;
        let wrong = s
            .client
            .request(method.clone(), s.url(path))
            .basic_auth(ADMIN_USER, Some("guess"))
            .header(ACCEPT, "application/json")
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_error(wrong, 401).await;
        if !path.contains("lablink-vm-1") || path.starts_with("/admin") || method == Method::POST {
            let vm = s
                .client
                .request(method.clone(), s.url(path))
                .bearer_auth(s.token("lablink-vm-1"))
                .header(ACCEPT, "application/json")
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(
                vm.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} accepted a VM token"
            );
        }
        if method == Method::GET && path.starts_with("/admin") {
            let browser = s
                .client
                .get(s.url(path))
                .header(ACCEPT, "text/html")
                .send()
                .await
                .unwrap();
            assert_eq!(browser.status(), StatusCode::SEE_OTHER, "{path}");
            assert_eq!(browser.headers()[LOCATION], "/admin/login");
        }
    }
    assert_eq!(
        s.allocator.counts().await.unwrap().total,
        1,
        "nothing was launched or destroyed"
    );
}

#[tokio::test]
async fn session_forms_need_the_csrf_token_and_logout_ends_the_session() {
    let s = TestServer::start().await;
    let (session, csrf) = s.sign_in(ADMIN_PASSWORD).await.unwrap();
    let launch = |csrf: Option<&str>| {
        let mut form = vec![("num_vms", "1")];
        if let Some(c) = csrf {
            form.push(("csrf", c));
        }
        s.client
            .post(s.url("/admin/launch"))
            .header(COOKIE, &session)
            .form(&form)
            .send()
    };
    expect_error(launch(None).await.unwrap(), 403).await;
    expect_error(launch(Some("forged")).await.unwrap(), 403).await;
    assert_eq!(s.allocator.counts().await.unwrap().total, 0);
    assert_eq!(
        launch(Some(&csrf)).await.unwrap().status(),
        StatusCode::SEE_OTHER
    );
    assert_eq!(s.allocator.counts().await.unwrap().total, 1);
    // A login POST without the form's own token is refused too.
    let r = s
        .client
        .post(s.url("/admin/login"))
        .form(&[("username", ADMIN_USER), ("password", ADMIN_PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // HTTP Basic from a browser form (no Accept: application/json) cannot change anything.
    let r = s
        .client
        .post(s.url("/api/launch"))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .form(&[("num_vms", "1")])
        .send()
        .await
        .unwrap();
    expect_error(r, 403).await;
    let r = s.sign_out(&session, &csrf).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = s
        .client
        .get(s.url("/admin"))
        .header(COOKIE, &session)
        .header(ACCEPT, "application/json")
        .send()
        .await
        .unwrap();
    expect_error(r, 401).await;
}

#[tokio::test]
async fn failed_sign_ins_are_rate_limited_per_address() {
    let s = TestServer::start().await;
    for _ in 0..5 {
        assert_eq!(
            s.sign_in("wrong").await.unwrap_err(),
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        s.sign_in(ADMIN_PASSWORD).await.unwrap_err(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let r = s.admin(Method::GET, "/api/v1/vms").send().await.unwrap();
    expect_error(r, 429).await;
}

#[tokio::test]
async fn secrets_never_reach_logs_or_error_bodies() {
    let logs = captured_logs();
    // Long PINs, so a PIN cannot turn up by chance inside a timestamp.
    let config = lablink::AllocatorConfig {
        pin_length: 16,
        ..Default::default()
    };
    let s = TestServer::start_with(lablink::LabLink::builder().with_config(config), |_| {}).await;
    let hosts = s.launch_ready(2).await;
    let code = "4/0AsecretCODEzz9";
    let mut bodies = Vec::new();
    let (_, granted) = json_of(s.request_vm("ada@lab.org", code).await).await;
    let pin = granted["pin"].as_str().unwrap().to_owned();
    let h = granted["hostname"].as_str().unwrap().to_owned();
    let (_, startup) = json_of(
        s.vm_post(&h, "/vm_startup", json!({"hostname": h}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(startup["pin"], pin.as_str());
    // Error paths that carry secrets in the request.
    let forged = "llt_forgedTOKENvalue1234";
    for r in [
        s.client
            .post(s.url("/vm_startup"))
            .bearer_auth(forged)
            .json(&json!({"hostname": h}))
            .send()
            .await
            .unwrap(),
        s.vm_post(&hosts[0], "/vm_startup", json!({"hostname": hosts[1]}))
            .send()
            .await
            .unwrap(),
        s.client
            .post(s.url("/api/request_vm"))
            .header(ACCEPT, "application/json")
            .form(&[("email", "bad email"), ("crd_command", &crd_command(code))])
            .send()
            .await
            .unwrap(),
        s.client
            .post(s.url("/api/request_vm"))
            .header(ACCEPT, "application/json")
            .form(&[
                ("email", "x@lab.org"),
                ("crd_command", "start-host --code=4/0AsecretCODEzz9;rm"),
            ])
            .send()
            .await
            .unwrap(),
        s.client
            .post(s.url("/api/v1/requests"))
            .json(&json!({"email": 5, "crd_command": crd_command(code)}))
            .send()
            .await
            .unwrap(),
        s.client
            .get(s.url("/api/v1/vms"))
            .basic_auth(ADMIN_USER, Some("wrongPASSWORDvalue"))
            .send()
            .await
            .unwrap(),
    ] {
        assert!(r.status().is_client_error());
        bodies.push(r.text().await.unwrap());
    }
    let admin_json = s
        .admin(Method::GET, "/admin")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let vms_json = s
        .admin(Method::GET, "/api/v1/vms")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("vm state changed"), "the capture works");
    let mut secrets = vec![
        code.to_owned(),
        "secretCODE".to_owned(),
        pin.clone(),
        forged.to_owned(),
        ADMIN_PASSWORD.to_owned(),
        "wrongPASSWORDvalue".to_owned(),
    ];
    secrets.extend(hosts.iter().map(|h| s.token(h)));
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "a secret reached the log");
        for body in &bodies {
            assert!(
                !body.contains(secret.as_str()),
                "a secret reached an error body: {body}"
            );
        }
    }
    for shown in [&admin_json, &vms_json] {
        assert!(
            !shown.contains(code) && !shown.contains(&format!("\"{pin}\"")),
            "admin views never show commands or PINs"
        );
    }
}
