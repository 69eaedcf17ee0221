//! The whole workshop over real HTTP: launch (fake provisioner) → VMs report `running` →
//! 200 agents wait on `/vm_startup` → 200 participants ask → every waiter gets its own
//! command and a string PIN → telemetry shows up in the admin JSON, pages and metrics.

use std::collections::{HashMap, HashSet};

use futures::future::join_all;
use lablink_testkit::{json_of, start_host, TestServer};
use reqwest::header::ACCEPT;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const N: usize = 200;

async fn whole_workshop(s: TestServer) {
    let hosts = s.launch_ready(N).await;
    assert_eq!(hosts.len(), N);
    let (_, count) = json_of(
        s.client
            .get(s.url("/api/unassigned_vms_count"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(count["count"], N);

    // 200 agents wait.
    let waiters: Vec<_> = hosts
        .iter()
        .map(|h| tokio::spawn(s.vm_post(h, "/vm_startup", json!({"hostname": h})).send()))
        .collect();
    while s.state.metrics().waiters() < N as i64 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // 200 participants ask at once.
    let requests = (0..N).map(|i| {
        let s = &s;
        async move {
            let code = format!("4/code-{i}");
            let (status, body) = json_of(s.request_vm(&format!("p{i}@lab.org"), &code).await).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            (
                body["hostname"].as_str().unwrap().to_owned(),
                (code, body["pin"].as_str().unwrap().to_owned()),
            )
        }
    });
    let granted: HashMap<String, (String, String)> = join_all(requests).await.into_iter().collect();
    assert_eq!(granted.len(), N, "no VM went to two participants");

    // Every waiter gets its own participant's command and PIN.
    for (h, waiter) in hosts.iter().zip(waiters) {
        let (status, body) = json_of(waiter.await.unwrap().unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "success");
        let (code, pin) = &granted[h];
        assert_eq!(body["command"], start_host(code, h));
        assert!(body["pin"].is_string());
        assert_eq!(body["pin"], pin.as_str());
    }
    let pins: HashSet<_> = granted.values().map(|(_, p)| p.clone()).collect();
    assert!(pins.len() > 1, "PINs are generated per assignment");

    // Telemetry from the first VM.
    let h = &hosts[0];
    for (path, body) in [
        (
            "/api/gpu_health",
            json!({"hostname": h, "gpu_status": "Healthy"}),
        ),
        (
            "/api/update_inuse_status",
            json!({"hostname": h, "status": true}),
        ),
        (
            "/api/vm-logs",
            json!({"log_group": "lablink-cloud-init", "log_stream": h, "messages": ["cloud-init finished"]}),
        ),
        (
            "/api/vm-logs",
            json!({"log_group": "lablink-docker", "log_stream": h, "messages": ["sleap ready"]}),
        ),
    ] {
        assert_eq!(
            s.vm_post(h, path, body).send().await.unwrap().status(),
            StatusCode::OK,
            "{path}"
        );
    }
    let now = chrono::Utc::now().timestamp();
    let metrics = json!({"cloud_init_start": now - 90, "cloud_init_end": now - 30, "container_start": now - 30, "container_end": now});
    assert_eq!(
        s.vm_post(h, &format!("/api/vm-metrics/{h}"), metrics)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    // The admin JSON.
    let (status, admin) = json_of(s.admin(Method::GET, "/admin").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(admin["counts"]["assigned"], N);
    let vm: &Value = admin["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["hostname"] == h.as_str())
        .unwrap();
    assert_eq!(vm["state"], "assigned");
    assert_eq!(vm["gpu_health"], "Healthy");
    assert_eq!(vm["in_use"], true);
    assert_eq!(vm["status"], "running");
    assert!(vm["assigned_to"].as_str().unwrap().ends_with("@lab.org"));
    assert!(vm["timings"]["provision_seconds"].is_number());
    assert!(vm["timings"]["total_startup_seconds"].is_number());
    assert_eq!(
        vm["timings"]["cloud_init_start"],
        json!(chrono::DateTime::from_timestamp(now - 90, 0).unwrap())
    );
    let (_, detail) = json_of(
        s.admin(Method::GET, &format!("/admin/vms/{h}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(detail["logs"]["cloud_init"], "cloud-init finished");
    assert_eq!(detail["logs"]["container"], "sleap ready");

    // The admin pages (HTML, via Basic) show the same.
    let page = s
        .client
        .get(s.url(&format!("/admin/vms/{h}")))
        .basic_auth("admin", Some(lablink_testkit::ADMIN_PASSWORD))
        .header(ACCEPT, "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    for shown in ["sleap ready", "cloud-init finished", "Healthy", "assigned"] {
        assert!(html.contains(shown), "{shown} missing from the VM page");
    }
    let dashboard = s
        .client
        .get(s.url("/admin"))
        .basic_auth("admin", Some(lablink_testkit::ADMIN_PASSWORD))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(dashboard.contains(&format!("data-hostname=\"{h}\"")));

    // Metrics and health.
    let text = s.metrics().await;
    for line in [
        format!("lablink_claims_total{{outcome=\"assigned\"}} {N}"),
        format!("lablink_vms{{state=\"assigned\"}} {N}"),
        format!("lablink_waits_total{{outcome=\"assigned\"}} {N}"),
        "lablink_waiters 0".to_owned(),
        // Each VM's launch-to-available time, observed when its agent reported running.
        format!("lablink_vm_boot_seconds_count {N}"),
        "lablink_http_requests_total{route=\"/vm_startup\",method=\"POST\",status=\"200\"}"
            .to_owned(),
    ] {
        assert!(text.contains(&line), "{line} missing from:\n{text}");
    }
    let (status, health) = json_of(s.client.get(s.url("/healthz")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["vms"], N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_waiters_each_get_their_own_participant_in_memory() {
    whole_workshop(TestServer::start().await).await;
}

/// The same workshop with PostgreSQL behind the allocator (store and LISTEN/NOTIFY), in a
/// fresh database created on the server `DATABASE_URL` points at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_waiters_each_get_their_own_participant_on_postgres() {
    use std::sync::Arc;

    let db = lablink_testkit::TestDatabase::create().await;
    let pool = db.pool(20).await;
    let notifier = lablink::postgres::PgNotifier::connect(pool.clone())
        .await
        .unwrap();
    let builder = lablink::LabLink::builder()
        .with_store(Arc::new(lablink::postgres::PgVmStore::new(pool)))
        .with_notifier(Arc::new(notifier));
    whole_workshop(TestServer::start_with(builder, |_| {}).await).await;
    db.drop_database().await;
}
