//! The supervisor's state in the admin UI (HTML and JSON) and in `/metrics`, served over
//! loopback by the real router.

use std::sync::Arc;
use std::time::Duration;

use lablink::http::{HttpOptions, HttpState};
use lablink::{
    AgentStatus, Allocator, AllocatorConfig, AllocatorExt, GpuHealth, LabLink, SupervisorConfig,
    Telemetry, VmRequest, VmState,
};
use lablink_core::testing::store::{command, email};
use reqwest::header::ACCEPT;

const USER: &str = "admin";
const PASSWORD: &str = "correct horse battery staple";

#[tokio::test]
async fn admin_page_and_metrics_show_the_supervisor_its_flags_and_the_coming_destruction() {
    let mut supervisor = SupervisorConfig {
        tick: Duration::from_millis(50),
        leader_lease: Duration::from_secs(5),
        ..Default::default()
    };
    supervisor.ladder.unhealthy_grace = Duration::ZERO;
    supervisor.pool.enabled = true;
    supervisor.pool.min_available = 1;
    supervisor.destruction.at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    supervisor.destruction.warning = Duration::from_secs(2 * 3600);
    let lablink = LabLink::builder()
        .with_config(AllocatorConfig {
            supervisor,
            ..Default::default()
        })
        .build()
        .unwrap();
    // One VM, ready, assigned, then its GPU fails: the supervisor must flag it, not touch it.
    let op = lablink
        .launch_and_wait(1, Duration::from_secs(30))
        .await
        .unwrap();
    let host = op.hostnames[0].clone();
    let running = Telemetry {
        status: Some(AgentStatus::Running),
        ..Default::default()
    };
    lablink.report(&host, running).await.unwrap();
    let request = VmRequest {
        email: email("ada"),
        crd_command: Some(command("ada")),
    };
    lablink.request_vm(&request).await.unwrap();
    let sick = Telemetry {
        gpu_health: Some(GpuHealth::Unhealthy),
        ..Default::default()
    };
    lablink.report(&host, sick).await.unwrap();
    let running_supervisor = lablink.start_supervisor().unwrap();

    let state = HttpState::new(
        Arc::new(lablink.clone()),
        HttpOptions::with_admin_password(USER, PASSWORD).unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let serving = state.clone();
    tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
    let client = reqwest::Client::new();

    // Wait for the supervisor's first ticks (flag computed, pool launched).
    let mut waited = Duration::ZERO;
    while running_supervisor.status().flags.is_empty()
        || running_supervisor.status().counters.pool_launched == 0
    {
        assert!(
            waited < Duration::from_secs(10),
            "the supervisor did not tick"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }

    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "lablink_supervisor_running 1",
        "lablink_supervisor_leader 1",
        "lablink_supervisor_flags{kind=\"needs_admin\"} 1",
        "lablink_supervisor_actions_total{action=\"pool_launch\"} 1",
        "lablink_pool_target 1",
        "lablink_scheduled_destruction_warning 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    assert!(metrics.contains("lablink_scheduled_destruction_timestamp_seconds "));

    let json: serde_json::Value = client
        .get(format!("{base}/admin"))
        .basic_auth(USER, Some(PASSWORD))
        .header(ACCEPT, "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let s = &json["supervisor"];
    assert_eq!(s["leader"], true, "{s}");
    assert_eq!(s["pool_target"], 1);
    assert_eq!(s["destruction_warning"], true);
    assert_eq!(s["flags"][0]["hostname"], host.as_str());
    assert_eq!(s["flags"][0]["kind"], "needs_admin");
    let row = json["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["hostname"] == host.as_str())
        .unwrap();
    assert!(
        row["flags"][0].as_str().unwrap().contains("assigned"),
        "{row}"
    );

    let html = client
        .get(format!("{base}/admin"))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "id=\"supervisor-card\"",
        ">leader<",
        "Every VM will be destroyed at",
        "Needs attention",
        "automation will not",
        "K = 1",
    ] {
        assert!(
            html.contains(needle),
            "{needle} missing from the admin page"
        );
    }
    // The assigned VM was left alone.
    assert!(matches!(
        lablink.vm(&host).await.unwrap().state,
        VmState::Unhealthy { .. }
    ));
    assert_eq!(
        lablink.provisioner().list().await.unwrap().len(),
        2,
        "one flagged VM and one pool VM"
    );
    running_supervisor.stop().await;

    // Without a supervisor the page has no card and /metrics no supervisor series.
    let plain = LabLink::builder().build().unwrap();
    assert!(Allocator::supervision(&plain).is_none());
}
