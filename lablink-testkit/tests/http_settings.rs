//! Runtime settings and warnings over HTTP, on replicas sharing one store: the warm pool and
//! the destruction schedule changed through one replica's API are what another replica's
//! supervisor, as leader, acts on; before the destruction the participant's page route
//! shows the warning and the VM's task poll carries it once, whichever replica the agent
//! asks and across a restart of the leader. The settings page saves with its CSRF token and
//! names a bad field.

use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Timelike, Utc};
use lablink::http::{CookieKey, HttpState};
use lablink::postgres::PgVmStore;
use lablink::{
    Allocator, AllocatorConfig, AllocatorExt, LabLink, MemoryVmStore, Provisioner,
    SupervisorConfig, VmStore,
};
use lablink_testkit::{
    admin_options, browser, crd_command, expect_error, form_csrf, json_of, wait_until,
    TestDatabase, TestServer, TokenProvisioner, ADMIN_PASSWORD, ADMIN_USER,
};
use reqwest::header::{ACCEPT, COOKIE};
use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::{json, Value};

const PATIENCE: Duration = Duration::from_secs(30);

/// One allocator process: its allocator (for its supervisor) and its HTTP layer on loopback.
struct Replica {
    base: String,
    lablink: LabLink,
    client: Client,
}

/// Supervisors that tick every 100 ms; nothing but the pool and the schedule acts.
fn supervisor() -> SupervisorConfig {
    let mut c = SupervisorConfig {
        tick: Duration::from_millis(100),
        leader_lease: Duration::from_secs(2),
        ..Default::default()
    };
    c.ladder.enabled = false;
    c.reconcile.enabled = false;
    c
}

impl Replica {
    /// A replica on `store`, launching through `cloud`, signing participant cookies with
    /// `key` (replicas behind one load balancer share it: `[server] cookie_secret`).
    async fn start(store: Arc<dyn VmStore>, cloud: &TokenProvisioner, key: &CookieKey) -> Self {
        let lablink = LabLink::builder()
            .with_store(store)
            .with_provisioner(Arc::new(cloud.clone()))
            .with_config(AllocatorConfig {
                supervisor: supervisor(),
                ..Default::default()
            })
            .build()
            .unwrap();
        let mut options = admin_options();
        options.cookie_key = key.clone();
        let state = HttpState::new(Arc::new(lablink.clone()), options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { state.serve(listener, std::future::pending()).await });
        Self {
            base,
            lablink,
            client: Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request as a script admin.
    fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
            .header(ACCEPT, "application/json")
    }

    async fn settings(&self) -> Value {
        let (status, body) = json_of(
            self.admin(Method::GET, "/api/v1/settings")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn put_settings(&self, body: &Value) -> (StatusCode, Value) {
        json_of(
            self.admin(Method::PUT, "/api/v1/settings")
                .json(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// The VM's task poll (no hold), as its agent makes it with `token`.
    async fn tasks(&self, hostname: &str, token: &str) -> (StatusCode, Value) {
        let r = self
            .client
            .get(self.url(&format!("/api/v1/vms/{hostname}/tasks?timeout=0")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        match r.status() {
            StatusCode::NO_CONTENT => (StatusCode::NO_CONTENT, Value::Null),
            _ => json_of(r).await,
        }
    }

    /// The participant's warnings, as the page asks for them from `browser`.
    async fn banner(&self, browser: &Client) -> (StatusCode, Value) {
        json_of(
            browser
                .get(self.url("/api/participant/warnings"))
                .header(ACCEPT, "application/json")
                .send()
                .await
                .unwrap(),
        )
        .await
    }
}

fn rfc3339(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_changed_through_one_replica_are_acted_on_by_the_leader_and_warnings_reach_the_participant_once(
) {
    let store = MemoryVmStore::new();
    let stores: [Arc<dyn VmStore>; 3] = std::array::from_fn(|_| Arc::new(store.clone()) as _);
    replicas_act_on_settings_and_warn_once(stores).await;
}

/// The same, with replicas on one real PostgreSQL database (a pool each, as processes have).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_settings_and_warnings_are_shared_by_the_replicas() {
    let db = TestDatabase::create().await;
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(Arc::new(PgVmStore::new(db.pool(5).await)) as Arc<dyn VmStore>);
    }
    replicas_act_on_settings_and_warn_once(stores.try_into().unwrap()).await;
    db.drop_database().await;
}

/// Replicas A and B (and later C, a replica started afresh), one store each of `stores`
/// (all on the same data); B's supervisor leads.
async fn replicas_act_on_settings_and_warn_once(stores: [Arc<dyn VmStore>; 3]) {
    let [store_a, store_b, store_c] = stores;
    let cloud = TokenProvisioner::default();
    let key = CookieKey::generate();
    let a = Replica::start(store_a, &cloud, &key).await;
    let b = Replica::start(store_b, &cloud, &key).await;
    let leader = b.lablink.start_supervisor().unwrap();

    // A participant holds the one VM there is.
    let op = a.lablink.launch_and_wait(1, PATIENCE).await.unwrap();
    let vm = op.hostnames[0].to_string();
    let token = cloud.tokens.lock().unwrap()[&vm].expose().to_owned();
    let r = a
        .client
        .post(a.url("/api/vm-status"))
        .bearer_auth(&token)
        .json(&json!({"hostname": vm, "status": "running"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let participant = browser();
    let code = "4/0AbWarned-xyz";
    let (status, granted) = json_of(
        participant
            .post(a.url("/api/request_vm"))
            .header(ACCEPT, "application/json")
            .form(&[
                ("email", "ada@example.org"),
                ("crd_command", &crd_command(code)),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{granted}");
    assert_eq!(granted["hostname"], vm.as_str());
    let pin = granted["pin"].as_str().unwrap().to_owned();
    let (status, none) = b.banner(&participant).await;
    assert_eq!(status, StatusCode::OK, "{none}");
    assert_eq!(none["warnings"], json!([]));
    expect_error(
        Client::new()
            .get(b.url("/api/participant/warnings"))
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;

    // The config's settings, as revision 0; A saves a pool and a destruction time.
    let initial = a.settings().await;
    assert_eq!(initial["revision"], 0, "{initial}");
    assert_eq!(initial["pool"]["enabled"], false);
    let far = (Utc::now() + chrono::Duration::hours(1))
        .with_nanosecond(0)
        .unwrap();
    let mut wanted = initial.clone();
    wanted["pool"] = json!({"enabled": true, "min_available": 2, "max_total": 5, "idle_ttl": 1800});
    wanted["destruction"] = json!({"times": [rfc3339(far)], "warning": 7200});
    let (status, saved) = a.put_settings(&wanted).await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    assert_eq!(saved["revision"], 1);
    assert_eq!(saved["updated_by"], "admin (basic)");
    assert_eq!(b.settings().await, saved, "B reads what A saved");
    // A stale revision is refused, and so is a bad value, naming its field.
    let (status, body) = b.put_settings(&wanted).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let mut bad = saved.clone();
    bad["pool"]["min_available"] = json!(9);
    let (status, body) = b.put_settings(&bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("pool.max_total: "),
        "{body}"
    );

    // B's supervisor leads: it keeps two free VMs beside the participant's.
    wait_until("B's supervisor to launch the pool", PATIENCE, || async {
        (b.lablink.counts().await.unwrap().total == 3).then_some(())
    })
    .await;
    assert_eq!(leader.status().pool_target, Some(2));
    assert_eq!(leader.status().destruction_at, Some(far));

    // The participant's page shows the warning, through either replica.
    let banner = wait_until("the participant's warning", PATIENCE, || async {
        let (status, body) = a.banner(&participant).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (!body["warnings"].as_array().unwrap().is_empty()).then_some(body)
    })
    .await;
    let warning = &banner["warnings"][0];
    assert_eq!(warning["kind"], "destruction", "{banner}");
    assert_eq!(warning["at"], rfc3339(far));
    let text = warning["message"].as_str().unwrap();
    assert!(
        text.starts_with(&format!(
            "Your VM will be destroyed at {}",
            far.format("%H:%M UTC")
        )),
        "{text}"
    );
    assert!(text.contains("save your work"), "{text}");
    assert_eq!(b.banner(&participant).await.1, banner);
    for secret in [pin.as_str(), code, token.as_str()] {
        assert!(!banner.to_string().contains(secret), "a secret in {banner}");
    }

    // The agent's task poll carries it (with no secret), once: acknowledged, no replica
    // sends it again; the free VMs, which no participant holds, get none.
    let (status, tasks) = b.tasks(&vm, &token).await;
    assert_eq!(status, StatusCode::OK, "{tasks}");
    let sent = tasks["warnings"].as_array().unwrap().clone();
    assert_eq!(sent.len(), 1, "{tasks}");
    assert_eq!(sent[0]["kind"], "destruction");
    assert_eq!(sent[0]["at"], rfc3339(far));
    assert!(sent[0]["message"]
        .as_str()
        .unwrap()
        .contains("will be destroyed"));
    for secret in [pin.as_str(), code, token.as_str()] {
        assert!(!tasks.to_string().contains(secret), "a secret in {tasks}");
    }
    assert_eq!(a.tasks(&vm, &token).await.1, tasks, "not acknowledged yet");
    let id = sent[0]["id"].as_str().unwrap();
    let ack = a
        .client
        .post(a.url(&format!("/api/v1/vms/{vm}/warnings/{id}/ack")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(ack.status(), StatusCode::NO_CONTENT);
    assert_eq!(a.tasks(&vm, &token).await.0, StatusCode::NO_CONTENT);
    assert_eq!(b.tasks(&vm, &token).await.0, StatusCode::NO_CONTENT);
    let others: Vec<String> = b
        .lablink
        .vms(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.hostname.to_string())
        .filter(|h| h != &vm)
        .collect();
    for h in &others {
        let t = cloud.tokens.lock().unwrap()[h].expose().to_owned();
        assert_eq!(b.tasks(h, &t).await.0, StatusCode::NO_CONTENT, "{h}");
        // One VM's token does not acknowledge another's warning.
        let r = b
            .client
            .post(b.url(&format!("/api/v1/vms/{vm}/warnings/{id}/ack")))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }

    // The leader restarts (a new supervisor, with nothing in memory) and a replica process
    // starts afresh: neither sends the warning again, nor makes it again.
    leader.stop().await;
    let restarted = b.lablink.start_supervisor().unwrap();
    let c = Replica::start(store_c, &cloud, &key).await;
    wait_until("the restarted supervisor to lead", PATIENCE, || async {
        let s = restarted.status();
        (s.leader && s.counters.ticks >= 10).then_some(())
    })
    .await;
    assert_eq!(c.tasks(&vm, &token).await.0, StatusCode::NO_CONTENT);
    assert_eq!(b.tasks(&vm, &token).await.0, StatusCode::NO_CONTENT);
    assert_eq!(restarted.status().counters.warnings_made, 0);
    let (_, still) = c.banner(&participant).await;
    assert_eq!(still["warnings"].as_array().unwrap().len(), 1, "{still}");
    assert_eq!(still["warnings"][0]["at"], rfc3339(far), "{still}");

    // The destruction moves to a few seconds from now (through C): the leader destroys
    // every VM at the new time, and the pool launches nothing after it.
    let soon = (Utc::now() + chrono::Duration::seconds(5))
        .with_nanosecond(0)
        .unwrap();
    let mut moved = c.settings().await;
    moved["destruction"]["times"] = json!([rfc3339(soon)]);
    let (status, body) = c.put_settings(&moved).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revision"], 2);
    wait_until("the destruction at the new time", PATIENCE, || async {
        (b.lablink.counts().await.unwrap().total == 0).then_some(())
    })
    .await;
    assert!(Utc::now() >= soon, "destroyed before the time");
    assert!(
        cloud.inner.list().await.unwrap().is_empty(),
        "machines left"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        b.lablink.counts().await.unwrap().total,
        0,
        "the pool relaunched"
    );
    restarted.stop().await;
}

#[tokio::test]
async fn the_settings_page_saves_with_its_csrf_token_names_a_bad_field_and_is_audited() {
    let s = TestServer::start_with(LabLink::builder(), |_| {}).await;
    let (session, csrf) = s.sign_in(ADMIN_PASSWORD).await.unwrap();
    let page = s
        .client
        .get(s.url("/admin/settings"))
        .header(COOKIE, &session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert_eq!(form_csrf(&html), csrf);
    assert!(html.contains(r#"name="revision" value="0""#), "{html}");
    let admin_page = s.page_as(&session, "/admin").await;
    assert!(
        admin_page.contains(r#"href="/admin/settings""#),
        "not in the nav"
    );

    let form = |csrf: &str, max: &str| {
        vec![
            ("csrf", csrf.to_owned()),
            ("revision", "0".to_owned()),
            ("pool_enabled", "on".to_owned()),
            ("min_available", "3".to_owned()),
            ("max_total", max.to_owned()),
            ("idle_ttl_minutes", "20".to_owned()),
            (
                "destruction_times",
                "2099-12-06 17:00\n2099-12-05 17:00".to_owned(),
            ),
            ("warning_minutes", "45".to_owned()),
        ]
    };
    let post = |fields: Vec<(&'static str, String)>| {
        s.client
            .post(s.url("/admin/settings"))
            .header(COOKIE, &session)
            .form(&fields)
            .send()
    };
    // Without its CSRF token: refused, nothing saved.
    assert_eq!(
        post(form("forged", "10")).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(s.allocator.workshop_settings().await.unwrap().revision, 0);
    // A bad field: 400, the page names it and keeps what was typed.
    let r = post(form(&csrf, "2")).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let html = r.text().await.unwrap();
    assert!(
        html.contains("pool.max_total: must be at least pool.min_available (3)"),
        "{html}"
    );
    assert!(
        html.contains("2099-12-06 17:00"),
        "the typed times are kept"
    );
    // Saved.
    let r = post(form(&csrf, "10")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let html = r.text().await.unwrap();
    assert!(html.contains("Saved."), "{html}");
    let saved = s.allocator.workshop_settings().await.unwrap();
    assert_eq!(saved.revision, 1);
    assert_eq!(
        (
            saved.pool.enabled,
            saved.pool.min_available,
            saved.pool.max_total
        ),
        (true, 3, 10)
    );
    assert_eq!(saved.pool.idle_ttl, Duration::from_secs(1200));
    assert_eq!(saved.destruction.warning, Duration::from_secs(2700));
    let times: Vec<String> = saved
        .destruction
        .times
        .iter()
        .map(|t| rfc3339(*t))
        .collect();
    assert_eq!(
        times,
        ["2099-12-05T17:00:00Z", "2099-12-06T17:00:00Z"],
        "sorted"
    );
    assert_eq!(saved.updated_by.as_deref(), Some("admin (session)"));
    // The form of an older revision: 409, the page shows the settings now.
    let r = post(form(&csrf, "10")).await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains(r#"name="revision" value="1""#));

    let (status, audit) =
        json_of(s.admin(Method::GET, "/api/v1/audit").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{audit}");
    let changes: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "settings_changed")
        .collect();
    assert_eq!(changes.len(), 3, "{audit}");
    let ok: Vec<&&Value> = changes.iter().filter(|e| e["ok"] == true).collect();
    assert_eq!(ok.len(), 1, "{changes:?}");
    assert!(
        ok[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("revision 1: pool on, K 3, M 10"),
        "{}",
        ok[0]
    );
}

#[tokio::test]
async fn the_openapi_document_describes_the_settings_and_warning_routes() {
    let s = TestServer::start().await;
    let doc: Value = s
        .client
        .get(s.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = &doc["paths"];
    assert!(paths["/api/v1/settings"]["get"].is_object());
    assert!(paths["/api/v1/settings"]["put"].is_object());
    assert!(paths["/api/participant/warnings"]["get"].is_object());
    assert!(paths["/api/v1/vms/{hostname}/warnings/{id}/ack"]["post"].is_object());
    assert!(doc["components"]["schemas"]["WorkshopSettings"].is_object());
}
