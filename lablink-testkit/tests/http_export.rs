//! What the fleet was used for and cost, and the export of a workshop, on a real PostgreSQL:
//! VM-hours by kind and the estimated cost advance with the (test's) clock as VMs change
//! state, two replicas on one database agree, a replica started afterwards reads the same,
//! destroyed VMs stay in the totals and in the export with who had them, and no export
//! carries a token, a Chrome Remote Desktop command or code, a PIN or a password.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use lablink::AllocatorExt as _;
use lablink_testkit::{crd_command, TestDatabase, TestServer, ADMIN_PASSWORD};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A clock the test moves by hand, shared by every replica.
#[derive(Debug, Clone)]
struct TestClock(Arc<Mutex<DateTime<Utc>>>);

impl lablink::Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

impl TestClock {
    fn advance(&self, minutes: i64) {
        *self.0.lock().unwrap() += chrono::Duration::minutes(minutes);
    }
}

/// A replica on `db` with the shared clock; fake machines cost 2.0 an hour.
async fn replica(db: &TestDatabase, clock: &TestClock) -> TestServer {
    let builder = db.builder().await.with_clock(Arc::new(clock.clone()));
    TestServer::start_with(builder, |o| {
        o.prices = lablink::Prices {
            currency: "EUR".into(),
            hourly: BTreeMap::from([(lablink::fake::FAKE_INSTANCE_TYPE.to_owned(), 2.0)]),
        };
    })
    .await
}

async fn get(s: &TestServer, path: &str) -> (StatusCode, String) {
    let r = s.admin(Method::GET, path).send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

async fn usage(s: &TestServer) -> Value {
    let (status, body) = get(s, "/api/v1/usage").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hours_and_cost_follow_the_vms_agree_across_replicas_and_outlive_them() {
    let db = TestDatabase::create().await;
    let clock = TestClock(Arc::new(Mutex::new(Utc::now())));
    let a = replica(&db, &clock).await;
    let b = replica(&db, &clock).await;
    let hosts = a.launch_ready(2).await;

    clock.advance(60);
    let first = usage(&a).await;
    assert_eq!(first["hours"]["free"], json!(2.0), "{first}");
    assert_eq!(first["cost"], json!(4.0), "{first}");
    assert_eq!(first["currency"], json!("EUR"));
    assert_eq!(usage(&b).await, first, "two replicas disagree");

    // A participant gets a VM through B; half an hour idle, then half an hour in use.
    let granted = b.request_vm("ada@example.org", "4/0AbCdEfGhIj").await;
    assert_eq!(granted.status(), StatusCode::OK);
    let granted: Value = granted.json().await.unwrap();
    let pin = granted["pin"].as_str().unwrap().to_owned();
    let held = granted["hostname"].as_str().unwrap().to_owned();
    clock.advance(30);
    let r = a
        .vm_post(
            &held,
            "/api/update_inuse_status",
            json!({"hostname": held, "status": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    clock.advance(30);
    let now = usage(&b).await;
    let hours = &now["hours"];
    assert_eq!(
        (
            hours["free"].clone(),
            hours["idle"].clone(),
            hours["in_use"].clone()
        ),
        (json!(3.0), json!(0.5), json!(0.5)),
        "{now}"
    );
    assert_eq!(hours["total"], json!(4.0));
    assert_eq!(now["cost"], json!(8.0));
    assert_eq!(usage(&a).await, now, "two replicas disagree");

    // A replica started now, with nothing in memory, reads the same.
    let c = replica(&db, &clock).await;
    assert_eq!(usage(&c).await, now, "a restarted replica disagrees");
    let metrics = c.metrics().await;
    for series in [
        r#"lablink_vm_seconds_total{kind="in_use",instance_type="fake"} 1800"#,
        r#"lablink_vm_seconds_total{kind="free",instance_type="fake"} 10800"#,
        r#"lablink_estimated_cost{currency="EUR"} 8"#,
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(series)),
            "no {series} in {metrics}"
        );
    }

    // Destroyed and removed, the VMs stay in the totals and in the export.
    let registration = c
        .admin(Method::POST, "/api/v1/registration-tokens")
        .json(&json!({"label": "lab machines"}))
        .send()
        .await
        .unwrap();
    assert_eq!(registration.status(), StatusCode::CREATED);
    let registration: Value = registration.json().await.unwrap();
    let registration_token = registration["token"].as_str().unwrap().to_owned();
    let destroy = a
        .admin(Method::POST, "/api/v1/destroy")
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(destroy.status(), StatusCode::ACCEPTED);
    let op: Value = destroy.json().await.unwrap();
    a.allocator
        .wait_for_operation(
            op["id"].as_str().unwrap().parse().unwrap(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(c
        .allocator
        .vms(&Default::default())
        .await
        .unwrap()
        .is_empty());
    clock.advance(60);
    let after = usage(&c).await;
    assert_eq!(after, now, "removing VMs changed what they used");

    let (status, csv) = get(&c, "/api/v1/export?format=csv").await;
    assert_eq!(status, StatusCode::OK);
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for column in [
        "hostname",
        "instance_type",
        "participant",
        "past_participants",
        "startup_seconds",
        "health_changes",
        "in_use_hours",
        "idle_hours",
        "estimated_cost",
        "collection",
    ] {
        assert!(header.contains(&column), "no {column} column: {header:?}");
    }
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{csv}");
    let held_row = rows.iter().find(|r| r.starts_with(&held)).unwrap();
    assert!(held_row.contains(",removed,"), "{held_row}");
    assert!(held_row.contains("ada@example.org"), "{held_row}");
    assert!(held_row.contains(",fake,"), "{held_row}");
    let (status, json_export) = get(&c, "/api/v1/export?format=json").await;
    assert_eq!(status, StatusCode::OK);
    let parsed: Value = serde_json::from_str(&json_export).unwrap();
    assert_eq!(parsed["vms"].as_array().unwrap().len(), 2);
    assert_eq!(parsed["usage"]["cost"], json!(8.0));
    let actions: Vec<&str> = parsed["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"destroy"), "{actions:?}");
    assert!(
        actions.contains(&"export"),
        "the CSV download is not in the audit trail: {actions:?}"
    );
    let (status, audit_csv) = get(&c, "/api/v1/export?format=csv&table=audit").await;
    assert_eq!(status, StatusCode::OK);
    assert!(audit_csv.starts_with("at,actor,address,action,target,detail,ok\n"));
    assert!(audit_csv.contains(",destroy,"), "{audit_csv}");

    // No secret anywhere.
    let command = crd_command("4/0AbCdEfGhIj");
    let mut secrets = vec![
        ADMIN_PASSWORD.to_owned(),
        registration_token,
        pin,
        "4/0AbCdEfGhIj".to_owned(),
        command,
    ];
    secrets.extend(hosts.iter().map(|h| a.token(h)));
    for (what, text) in [
        ("the VM export", &csv),
        ("the JSON export", &json_export),
        ("the audit export", &audit_csv),
    ] {
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "{what} holds a secret");
        }
    }
    for (what, bad) in [
        ("an unknown format", "/api/v1/export?format=xml"),
        ("an unknown table", "/api/v1/export?format=csv&table=tokens"),
    ] {
        let r = c.admin(Method::GET, bad).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{what}");
    }
    let anonymous = c
        .client
        .get(c.url("/api/v1/export?format=json"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    drop((a, b, c));
    db.drop_database().await;
}
