//! The admin UI in a real headless Chromium, driven through chromedriver's WebDriver HTTP
//! API: sign in, launch, watch the VM table change without a reload, open a VM's logs,
//! destroy; requests without the session or the CSRF token are refused. Screenshots of each
//! page go to `docs/screenshots/` for the README.
//!
//! Needs `chromium` and `chromedriver` (`apt-get install -y chromium chromium-driver`); the
//! test fails, naming them, when they are missing.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use lablink::{FakeProvisioner, LabLink};
use lablink_testkit::{Chromium, TestServer, ADMIN_PASSWORD, ADMIN_USER};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// What these tests do with the admin pages beyond plain WebDriver.
trait AdminPages {
    /// Clicks a control that submits a form and waits until the browser has loaded the
    /// answer: a page that already matches what comes next must not pass for it.
    async fn click_and_load(&self, css: &str);
    /// Saves a screenshot of the window as `docs/screenshots/{name}.png`.
    async fn save_screenshot(&self, name: &str);
}

impl AdminPages for Chromium {
    async fn click_and_load(&self, css: &str) {
        self.script("window.lablinkOldPage = true").await;
        self.click(css).await;
        self.wait_for(
            "the answer to the submitted form",
            "return document.readyState === 'complete' && !window.lablinkOldPage",
        )
        .await;
    }

    async fn save_screenshot(&self, name: &str) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.screenshot().await)
            .unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), bytes).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_signs_in_launches_watches_live_updates_reads_logs_and_destroys() {
    let driver = Chromium::start().await;
    let fake = FakeProvisioner::new().with_latency(Duration::from_millis(1500));
    let s = TestServer::start_full(LabLink::builder(), fake, |o| {
        o.admin_refresh = Duration::from_millis(300)
    })
    .await;

    // The participant page.
    driver.go(&s.url("/")).await;
    driver
        .wait_for(
            "the participant form",
            "return !!document.querySelector('#crd_command')",
        )
        .await;
    driver.save_screenshot("participant").await;

    // Sign in.
    driver.go(&s.url("/admin")).await;
    assert!(
        driver.url().await.ends_with("/admin/login"),
        "anonymous browsers go to the sign-in page"
    );
    driver.type_into("#username", ADMIN_USER).await;
    driver.type_into("#password", ADMIN_PASSWORD).await;
    driver.save_screenshot("sign-in").await;
    driver.click("#sign-in").await;
    driver
        .wait_for(
            "the dashboard",
            "return location.pathname === '/admin' && !!document.querySelector('#launch')",
        )
        .await;

    // Launch 3; the table changes without a reload.
    driver
        .script("window.notReloaded = true; return true")
        .await;
    driver.type_into("#num_vms", "3").await;
    driver.click("#launch").await;
    driver
        .wait_for(
            "the launched VMs",
            "return document.querySelectorAll('#vms tr[data-hostname]').length === 3",
        )
        .await;
    driver
        .script("window.notReloaded = true; return true")
        .await;
    driver
        .wait_for(
            "booted VMs",
            "return document.querySelectorAll('#vms tr[data-state=booting]').length === 3",
        )
        .await;
    let hosts: Vec<String> = (1..=3).map(|i| format!("lablink-vm-{i}")).collect();
    for h in &hosts {
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
        // A heartbeat, as our agent sends: only VMs running it can have work collected.
        let r = s
            .vm_post(
                h,
                &format!("/api/v1/vms/{h}/heartbeat"),
                json!({"boot_id": "b1"}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let logs = json!({"log_group": "lablink-cloud-init", "log_stream": h, "messages": [format!("{h}: cloud-init done")]});
        assert_eq!(
            s.vm_post(h, "/api/vm-logs", logs)
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }
    driver
        .wait_for(
            "available VMs",
            "return document.querySelectorAll('#vms tr[data-state=available]').length === 3",
        )
        .await;
    assert_eq!(
        s.request_vm("ada@lab.org", "4/browser").await.status(),
        StatusCode::OK
    );
    let r = s
        .vm_post(
            &hosts[0],
            "/api/update_inuse_status",
            json!({"hostname": hosts[0], "status": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    driver
        .wait_for(
            "the assignment",
            "return document.querySelectorAll('#vms tr[data-state=assigned]').length === 1",
        )
        .await;
    driver
        .wait_for(
            "the operation",
            "return !!document.querySelector('#operations tr[data-status=succeeded]')",
        )
        .await;
    assert_eq!(
        driver.script("return window.notReloaded === true").await,
        json!(true),
        "the table changed without a reload"
    );
    driver.save_screenshot("admin-vms").await;

    // Without the CSRF token the browser's own session cannot launch.
    let status = driver.async_script("const done = arguments[0]; fetch('/admin/launch', {method: 'POST', headers: {'Accept': 'application/json'}, body: new URLSearchParams({num_vms: '1'})}).then(r => done(r.status));", json!([])).await;
    assert_eq!(status, json!(403));
    // Without the session nothing happens either.
    let r = s
        .client
        .post(s.url("/admin/launch"))
        .form(&[("num_vms", "1"), ("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(s.allocator.counts().await.unwrap().total, 3);

    // Collect now: every VM gets a collection, shown live (these fake VMs have no agent, so
    // theirs stay requested); one VM again from its row; Download gives the zip.
    driver.click("#collect-all").await;
    driver
        .wait_for(
            "a requested collection per VM",
            "return document.querySelectorAll('#collections tr[data-state=requested]').length === 3",
        )
        .await;
    let first = s
        .state
        .collector()
        .status("lablink-vm-2")
        .await
        .unwrap()
        .unwrap();
    driver
        .click_and_load("#vms tr[data-hostname='lablink-vm-2'] button.collect")
        .await;
    driver
        .wait_for(
            "the dashboard",
            "return location.pathname === '/admin' && !!document.querySelector('#collect-all')",
        )
        .await;
    let again = s
        .state
        .collector()
        .status("lablink-vm-2")
        .await
        .unwrap()
        .unwrap();
    assert_ne!(
        first.id, again.id,
        "the row's Collect started a new collection"
    );
    let got = driver.async_script("const done = arguments[0]; fetch(document.querySelector('#download').href).then(r => done([r.status, r.headers.get('content-type'), r.headers.get('content-disposition')]));", json!([])).await;
    assert_eq!(got[0], json!(200), "{got}");
    assert_eq!(got[1], json!("application/zip"), "{got}");
    assert!(got[2].as_str().unwrap().contains("lablink_data_"), "{got}");

    // A VM's logs.
    driver
        .click("#vms tr[data-hostname='lablink-vm-1'] a")
        .await;
    driver
        .wait_for(
            "the VM page",
            "return !!document.querySelector('#log-cloud-init')",
        )
        .await;
    let log = driver
        .script("return document.querySelector('#log-cloud-init').textContent")
        .await;
    assert_eq!(log, json!("lablink-vm-1: cloud-init done"));
    driver.save_screenshot("vm-logs").await;

    // Destroy one VM, with confirmation.
    driver.click("#destroy").await;
    driver
        .wait_for(
            "the confirmation",
            "return !!document.querySelector('#confirm-destroy')",
        )
        .await;
    driver.save_screenshot("confirm-destroy").await;
    driver.click_and_load("#confirm-destroy").await;
    driver
        .wait_for("the dashboard", "return location.pathname === '/admin'")
        .await;
    driver
        .wait_for(
            "the VM gone",
            "return document.querySelectorAll('#vms tr[data-hostname]').length === 2",
        )
        .await;
    let destroyed = s.allocator.vm(&"lablink-vm-1".parse().unwrap()).await;
    assert!(destroyed.is_err(), "lablink-vm-1 was destroyed");
    driver.call(reqwest::Method::DELETE, "", json!({})).await;
}

/// Two replicas on one PostgreSQL, as behind a round-robin load balancer: the browser signs in
/// once on A, then uses B's and A's pages in turn (cookies do not tell ports apart, so both
/// origins on 127.0.0.1 get the one session cookie), launches and uploads the participants
/// with B's CSRF-protected forms, and signs out on B; the copied cookie is then refused by A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sign_in_on_replica_a_serves_the_admin_on_replica_b_too() {
    use std::sync::Arc;

    let driver = Chromium::start().await;
    // One PostgreSQL, a pool per replica: the session key is the one kept in the database.
    let db = lablink_testkit::TestDatabase::create().await;
    let replica = |pool: sqlx::PgPool| async move {
        let store = lablink::postgres::PgVmStore::new(pool);
        TestServer::start_with(LabLink::builder().with_store(Arc::new(store)), |o| {
            o.admin_refresh = Duration::from_millis(300)
        })
        .await
    };
    let (a, b) = (
        replica(db.pool(5).await).await,
        replica(db.pool(5).await).await,
    );
    let at = |s: &TestServer, path: &str, also: &str| {
        format!(
            "return location.origin === '{}' && location.pathname === '{path}' && document.readyState === 'complete'{also}",
            s.base
        )
    };

    // Sign in once, on A.
    driver.go(&a.url("/admin")).await;
    driver
        .wait_for("A's sign-in page", &at(&a, "/admin/login", ""))
        .await;
    driver.type_into("#username", ADMIN_USER).await;
    driver.type_into("#password", ADMIN_PASSWORD).await;
    driver.click("#sign-in").await;
    driver
        .wait_for(
            "A's dashboard",
            &at(&a, "/admin", " && !!document.querySelector('#launch')"),
        )
        .await;

    // B's dashboard, without signing in there: launch 2 VMs with B's form (CSRF token).
    driver.go(&b.url("/admin")).await;
    driver
        .wait_for(
            "B's dashboard (not its sign-in page)",
            &at(&b, "/admin", " && !!document.querySelector('#launch')"),
        )
        .await;
    driver.type_into("#num_vms", "2").await;
    driver.click_and_load("#launch").await;
    driver
        .wait_for("B's dashboard after the launch", &at(&b, "/admin", ""))
        .await;
    assert_eq!(
        b.allocator.counts().await.unwrap().total,
        2,
        "B's form launched"
    );

    // A's dashboard shows them.
    driver.go(&a.url("/admin")).await;
    driver
        .wait_for(
            "the VMs launched through B, on A",
            &at(
                &a,
                "/admin",
                " && document.querySelectorAll('#vms tr[data-hostname]').length === 2",
            ),
        )
        .await;

    // B's participants page: replace the list with its form.
    driver.go(&b.url("/admin/participants")).await;
    driver
        .wait_for(
            "B's participants page",
            &at(
                &b,
                "/admin/participants",
                " && !!document.querySelector('#csv')",
            ),
        )
        .await;
    driver.type_into("#csv", "ada@lab.org\ngrace@lab.org").await;
    driver.click_and_load("#replace-roster").await;
    let roster = a.allocator.roster().await.unwrap();
    assert_eq!(roster.len(), 2, "B's form replaced the list: {roster:?}");

    // A shows the list.
    driver.go(&a.url("/admin/participants")).await;
    driver
        .wait_for(
            "the list on A",
            &at(
                &a,
                "/admin/participants",
                " && document.querySelectorAll('#roster li').length === 2",
            ),
        )
        .await;

    // Sign out on B. The browser drops the cookie; a copy of it is refused by A as well.
    let cookie = driver.cookie("lablink_admin").await;
    driver.go(&b.url("/admin")).await;
    driver
        .wait_for(
            "B's dashboard",
            &at(&b, "/admin", " && !!document.querySelector('#logout')"),
        )
        .await;
    driver.click_and_load("#logout").await;
    driver
        .wait_for("B's sign-in page", &at(&b, "/admin/login", ""))
        .await;
    driver
        .call(
            reqwest::Method::POST,
            "/cookie",
            json!({"cookie": {"name": "lablink_admin", "value": cookie["value"], "path": "/",
                              "httpOnly": true, "sameSite": "Strict"}}),
        )
        .await;
    driver.go(&a.url("/admin")).await;
    driver
        .wait_for(
            "A's sign-in page for the signed-out session",
            &at(&a, "/admin/login", ""),
        )
        .await;
    let kept = driver.cookie("lablink_admin").await;
    assert_eq!(
        kept["value"], cookie["value"],
        "the browser sent the old cookie, and A refused it"
    );
    driver.go(&b.url("/admin")).await;
    driver
        .wait_for(
            "B's sign-in page for the signed-out session",
            &at(&b, "/admin/login", ""),
        )
        .await;
    assert_eq!(b.allocator.counts().await.unwrap().total, 2);
    driver.call(reqwest::Method::DELETE, "", json!({})).await;
}

/// Running a workshop from the admin UI: in the browser the admin changes the warm pool
/// and the destruction schedule, sees the usage and cost panel, and downloads the export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_the_pool_and_schedule_sees_the_cost_and_downloads_the_export() {
    let driver = Chromium::start().await;
    let s = TestServer::start_with(LabLink::builder(), |o| {
        o.admin_refresh = Duration::from_millis(300);
        o.prices = lablink::Prices {
            currency: "EUR".into(),
            hourly: [(lablink::fake::FAKE_INSTANCE_TYPE.to_owned(), 2.0)].into(),
        };
    })
    .await;
    s.launch_ready(2).await;

    driver.go(&s.url("/admin")).await;
    driver.type_into("#username", ADMIN_USER).await;
    driver.type_into("#password", ADMIN_PASSWORD).await;
    driver.click("#sign-in").await;
    driver
        .wait_for(
            "the dashboard with the cost panel",
            "return location.pathname === '/admin' && !!document.querySelector('#usage-cost')",
        )
        .await;
    let cost = driver
        .script("return document.querySelector('#usage-cost').textContent")
        .await;
    assert!(cost.as_str().unwrap().ends_with(" EUR"), "{cost}");
    assert_eq!(
        driver
            .script("return document.querySelectorAll('#usage-table td').length")
            .await,
        json!(6),
        "hours by kind and their total"
    );
    driver.save_screenshot("usage-and-cost").await;

    // The export downloads as CSV, one row per VM, with the columns documented.
    let got = driver
        .async_script(
            "const done = arguments[0]; fetch(document.querySelector('#export-csv').href)
               .then(r => r.text().then(t => done([r.status, r.headers.get('content-type'),
                 r.headers.get('content-disposition'), t])));",
            json!([]),
        )
        .await;
    assert_eq!(got[0], json!(200), "{got}");
    assert_eq!(got[1], json!("text/csv; charset=utf-8"), "{got}");
    assert!(got[2].as_str().unwrap().starts_with("attachment;"), "{got}");
    let csv = got[3].as_str().unwrap();
    assert!(
        csv.starts_with("hostname,origin,instance_id,instance_type"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 3, "{csv}");

    // The pool and the schedule, changed in the settings page.
    driver.go(&s.url("/admin/settings")).await;
    driver
        .wait_for(
            "the settings form",
            "return !!document.querySelector('#save-settings')",
        )
        .await;
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).format("%Y-%m-%d 17:00");
    driver
        .script("document.querySelector('#pool_enabled').checked = true; return true")
        .await;
    driver.type_into("#min_available", "3").await;
    driver.type_into("#max_total", "12").await;
    driver
        .type_into("#destruction_times", &tomorrow.to_string())
        .await;
    driver.type_into("#warning_minutes", "20").await;
    driver.click_and_load("#save-settings").await;
    let notice = driver
        .script("return document.querySelector('#notice')?.className ?? ''")
        .await;
    assert!(notice.as_str().unwrap().contains("success"), "{notice}");
    driver.save_screenshot("settings").await;
    let saved: Value = s
        .admin(reqwest::Method::GET, "/api/v1/settings")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(saved["pool"]["enabled"], json!(true), "{saved}");
    assert_eq!(saved["pool"]["min_available"], json!(3), "{saved}");
    assert_eq!(saved["pool"]["max_total"], json!(12), "{saved}");
    assert_eq!(saved["destruction"]["warning"], json!(1200.0), "{saved}");
    let times = saved["destruction"]["times"].as_array().unwrap();
    assert_eq!(times.len(), 1, "{saved}");
    assert!(
        times[0].as_str().unwrap().contains(&format!(
            "{}T17:00:00",
            (chrono::Utc::now() + chrono::Duration::days(1)).format("%Y-%m-%d")
        )),
        "{saved}"
    );
}
