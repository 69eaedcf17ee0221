//! The audit trail over real HTTP: every admin action of a browser session and of a script
//! (HTTP Basic), refused sign-ins included, is recorded in order with who did it, from which
//! address, to what and whether it worked; `GET /api/v1/audit` and the page `/admin/audit`
//! show it a page at a time, and neither shows a secret. Replicas on one PostgreSQL (and a
//! replica started later) read the same trail.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use lablink::{AllocatorExt, AuditAction, AuditEntry, LabLink};
use lablink_testkit::{form_csrf, json_of, TestServer, ADMIN_PASSWORD};
use reqwest::header::{ACCEPT, COOKIE, SET_COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Posts the sign-in form as `user` with `password`; the status (303 when signed in).
async fn sign_in_as(s: &TestServer, user: &str, password: &str) -> StatusCode {
    let page = s.client.get(s.url("/admin/login")).send().await.unwrap();
    let cookie = page.headers()[SET_COOKIE].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let csrf = form_csrf(&page.text().await.unwrap());
    s.client
        .post(s.url("/admin/login"))
        .header(COOKIE, cookie)
        .form(&[("csrf", &*csrf), ("username", user), ("password", password)])
        .send()
        .await
        .unwrap()
        .status()
}

/// The audit trail as `GET /api/v1/audit` answers it (HTTP Basic), and its text.
async fn audit_json(s: &TestServer, query: &str) -> (Vec<Value>, String) {
    let r = s
        .admin(Method::GET, &format!("/api/v1/audit{query}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    let entries: Vec<Value> = serde_json::from_str(&text).unwrap();
    (entries, text)
}

/// The page `/admin/audit` (HTTP Basic, as a browser asks for it).
async fn audit_page(s: &TestServer, query: &str) -> String {
    let r = s
        .client
        .get(s.url(&format!("/admin/audit{query}")))
        .basic_auth(lablink_testkit::ADMIN_USER, Some(ADMIN_PASSWORD))
        .header(ACCEPT, "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.text().await.unwrap()
}

/// Waits until the newest operation finished.
async fn settle(s: &TestServer) {
    let newest = s.allocator.operations(1).await.unwrap().remove(0);
    let op = s
        .allocator
        .wait_for_operation(newest.id, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(!op.is_running(), "{op:?}");
}

#[tokio::test]
async fn an_admin_session_and_a_script_leave_every_action_in_the_audit_trail_without_secrets() {
    let s = TestServer::start().await;
    const TYPED_NAME: &str = "mallory-typed-this";
    const WRONG_PASSWORD: &str = "not the password at all";

    // Refused sign-ins: the admin's name with a wrong password, another name, a script.
    assert_eq!(
        sign_in_as(&s, lablink_testkit::ADMIN_USER, WRONG_PASSWORD).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        sign_in_as(&s, TYPED_NAME, ADMIN_PASSWORD).await,
        StatusCode::UNAUTHORIZED
    );
    let refused = s
        .client
        .get(s.url("/api/v1/vms"))
        .basic_auth(lablink_testkit::ADMIN_USER, Some(WRONG_PASSWORD))
        .header(ACCEPT, "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);

    let (session, csrf) = s.sign_in(ADMIN_PASSWORD).await.unwrap();
    let admin_page = s.page_as(&session, "/admin").await;
    assert!(
        admin_page.contains("href=\"/admin/audit\""),
        "the nav links to the audit page"
    );
    // A form of the session, with its CSRF token.
    let post = |path: &'static str, fields: Vec<(&'static str, String)>| {
        let mut form = vec![("csrf", csrf.clone())];
        form.extend(fields);
        let request = s.client.post(s.url(path)).header(COOKIE, &session);
        async move { request.form(&form).send().await.unwrap() }
    };

    let r = post("/admin/launch", vec![("num_vms", "3".into())]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    settle(&s).await;
    let hostnames: Vec<String> = s.allocator.operations(1).await.unwrap()[0]
        .hostnames
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(hostnames.len(), 3);
    for h in &hostnames {
        let r = s
            .vm_post(
                h,
                "/api/vm-status",
                json!({"hostname": h, "status": "running"}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let code = "4/participant-one-time-code";
    let (status, granted) = json_of(s.request_vm("ada@example.org", code).await).await;
    assert_eq!(status, StatusCode::OK, "{granted}");
    let assigned = granted["hostname"].as_str().unwrap().to_owned();
    let mut others = hostnames.iter().filter(|h| **h != assigned).cloned();
    let (rebooted, destroyed) = (others.next().unwrap(), others.next().unwrap());

    let r = post("/admin/reboot", vec![("hostname", rebooted.clone())]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    settle(&s).await;
    let r = post("/admin/release", vec![("hostname", assigned.clone())]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = post("/admin/collect", vec![("hostname", assigned.clone())]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = post(
        "/admin/destroy",
        vec![("confirm", "yes".into()), ("hostname", destroyed.clone())],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    settle(&s).await;
    let csv = "name,email\nAda,ada@example.org\nBob,bob@example.org\n";
    let r = post("/admin/participants", vec![("csv", csv.into())]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = post(
        "/admin/machines",
        vec![
            ("label", "room 3 workstations".into()),
            ("valid_hours", "2".into()),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let html = r.text().await.unwrap().replace("&#x2f;", "/");
    let token = html
        .split("--token ")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .unwrap_or_else(|| panic!("no token shown in {html}"))
        .trim()
        .to_owned();
    let token_id = s.allocator.registration_tokens().await.unwrap()[0]
        .id
        .to_string();
    let r = post("/admin/machines/revoke", vec![("id", token_id.clone())]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = s.sign_out(&session, &csrf).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    // A script launches with HTTP Basic.
    let r = s
        .admin(Method::POST, "/api/v1/launch")
        .json(&json!({"count": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    let (newest_first, text) = audit_json(&s, "").await;
    let entries: Vec<&Value> = newest_first.iter().rev().collect();
    let (session, basic) = ("admin (session)", "admin (basic)");
    let refused = "wrong user name or password";
    let label = "label \"room 3 workstations\"";
    let entry = |action: AuditAction, actor: &str, target: Option<&str>, detail: Option<&str>| {
        let ok = action != AuditAction::SignInFailed;
        json!({"action": action.as_str(), "actor": actor, "target": target, "detail": detail, "ok": ok})
    };
    let expected = vec![
        entry(AuditAction::SignInFailed, session, None, Some(refused)),
        entry(
            AuditAction::SignInFailed,
            "unknown user (session)",
            None,
            Some(refused),
        ),
        entry(
            AuditAction::SignInFailed,
            basic,
            Some("GET /api/v1/vms"),
            Some(refused),
        ),
        entry(AuditAction::SignIn, session, None, None),
        entry(AuditAction::Launch, session, None, Some("3 VMs")),
        entry(AuditAction::Reboot, session, Some(&rebooted), None),
        entry(AuditAction::Release, session, Some(&assigned), None),
        entry(AuditAction::Collect, session, Some(&assigned), Some("1 VM")),
        entry(AuditAction::Destroy, session, Some(&destroyed), None),
        entry(AuditAction::RosterChanged, session, None, Some("2 emails")),
        entry(
            AuditAction::RegistrationTokenCreated,
            session,
            Some(&token_id),
            Some(label),
        ),
        entry(
            AuditAction::RegistrationTokenRevoked,
            session,
            Some(&token_id),
            Some(label),
        ),
        entry(AuditAction::SignOut, session, None, None),
        entry(AuditAction::Launch, basic, None, Some("1 VM")),
    ];
    // Every entry from this client; the rest compared whole (but the id and the time).
    let mut got = Vec::new();
    for e in &entries {
        assert_eq!(e["address"], "127.0.0.1", "{e}");
        let mut e = (*e).clone();
        let fields = e.as_object_mut().unwrap();
        for varying in ["id", "at", "address"] {
            fields.remove(varying);
        }
        got.push(e);
    }
    assert_eq!(got, expected, "one entry per action, in order");
    let times: Vec<&str> = entries.iter().map(|e| e["at"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort_by_key(|t| t.parse::<chrono::DateTime<Utc>>().unwrap());
    assert_eq!(times, sorted, "in the order they happened");

    let page = audit_page(&s, "").await;
    assert_eq!(page.matches("<tr data-id=").count(), expected.len());
    for shown in [
        "registration token created",
        "sign in failed",
        "unknown user (session)",
        "room 3 workstations",
        &token_id,
        &destroyed,
        "failed",
    ] {
        assert!(page.contains(shown), "the page shows {shown:?}: {page}");
    }
    for (name, secret) in [
        ("the admin password", ADMIN_PASSWORD),
        ("a mistyped password", WRONG_PASSWORD),
        ("a name typed into a refused sign-in", TYPED_NAME),
        ("the registration token", token.as_str()),
        ("the participant's code", code),
    ] {
        assert!(!text.contains(secret), "{name} is in the API's audit trail");
        assert!(!page.contains(secret), "{name} is on the audit page");
    }
}

#[tokio::test]
async fn the_audit_trail_pages_through_older_entries_on_the_page_and_the_api() {
    let s = TestServer::start().await;
    let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap();
    let entries: Vec<AuditEntry> = (0..205)
        .map(|i| {
            AuditEntry::new(
                "admin (basic)",
                AuditAction::Launch,
                t0 + chrono::Duration::seconds(i),
            )
            .with_address("192.0.2.1")
            .with_detail(Some(format!("entry {i}")))
        })
        .collect();
    for entry in &entries {
        s.allocator.record_audit(entry).await.unwrap();
    }
    let newest: Vec<String> = entries.iter().rev().map(|e| e.id.to_string()).collect();

    // The page: the newest 200, then the 5 older ones.
    let first = audit_page(&s, "").await;
    assert_eq!(first.matches("<tr data-id=").count(), 200);
    assert!(first.contains(&format!("data-id=\"{}\"", newest[0])));
    let older = first
        .split("id=\"older\" href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no link to older entries in {first}"))
        .replace("&#x2f;", "/")
        .replace("&amp;", "&");
    assert_eq!(older, format!("/admin/audit?before={}", newest[199]));
    let second = audit_page(&s, &older["/admin/audit".len()..]).await;
    assert_eq!(second.matches("<tr data-id=").count(), 5);
    assert!(second.contains(&format!("data-id=\"{}\"", newest[204])));
    assert!(!second.contains("id=\"older\""), "nothing older");

    // The API: `limit` and `before`.
    let (page, _) = audit_json(&s, "?limit=2").await;
    let ids: Vec<&str> = page.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, newest[..2]);
    let (page, _) = audit_json(&s, &format!("?limit=3&before={}", newest[1])).await;
    let ids: Vec<&str> = page.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, newest[2..5]);
    assert_eq!(page[0]["detail"], "entry 202");
    let (all, _) = audit_json(&s, "?limit=100000").await;
    assert_eq!(all.len(), 205, "a large limit is capped, not refused");
    let r = s
        .admin(Method::GET, "/api/v1/audit?before=not-an-id")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let anonymous = s.client.get(s.url("/api/v1/audit")).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
}

/// Two replicas on one real PostgreSQL: what an admin does on either is in the trail both
/// read, and a replica started afterwards (a restart) reads it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_postgres_share_the_audit_trail_across_restarts() {
    let db = lablink_testkit::TestDatabase::create().await;
    let replica = |pool: sqlx::PgPool| async move {
        let store = lablink::postgres::PgVmStore::new(pool);
        TestServer::start_with(LabLink::builder().with_store(Arc::new(store)), |_| {}).await
    };
    let a = replica(db.pool(5).await).await;
    let b = replica(db.pool(5).await).await;
    let (session, csrf) = a.sign_in(ADMIN_PASSWORD).await.unwrap();
    let r = a
        .client
        .post(a.url("/admin/launch"))
        .header(COOKIE, &session)
        .form(&[("csrf", csrf.as_str()), ("num_vms", "2")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    settle(&a).await;
    let r = b
        .admin(Method::PUT, "/api/v1/roster")
        .json(&json!({"emails": ["ada@example.org"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let actions = |entries: &[Value]| -> Vec<String> {
        entries
            .iter()
            .map(|e| {
                format!(
                    "{} by {}",
                    e["action"].as_str().unwrap(),
                    e["actor"].as_str().unwrap()
                )
            })
            .collect()
    };
    let expected = [
        "roster_changed by admin (basic)",
        "launch by admin (session)",
        "sign_in by admin (session)",
    ];
    let (on_a, _) = audit_json(&a, "").await;
    let (on_b, _) = audit_json(&b, "").await;
    assert_eq!(actions(&on_a), expected);
    assert_eq!(on_a, on_b, "both replicas read one trail");
    let later = replica(db.pool(5).await).await;
    let (after_restart, _) = audit_json(&later, "").await;
    assert_eq!(after_restart, on_a, "a replica started later reads it too");
    db.drop_database().await;
}
