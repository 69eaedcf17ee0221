//! End-to-end: a real `lablink-agent` shows the allocator's warning (the coming destruction
//! of its VM) as a desktop notification with `notify-send`, once, and acknowledges it; an
//! agent on an image without `notify-send` says so once and acknowledges it too.

use std::time::Duration;

use chrono::{SecondsFormat, Timelike, Utc};
use lablink::{AllocatorConfig, Hostname, LabLink, SupervisorConfig};
use lablink_testkit::{
    crd_command, free_addr, json_of, script, wait_until, Rig, Workdir, ADMIN_PASSWORD, ADMIN_USER,
};
use reqwest::header::ACCEPT;
use reqwest::StatusCode;
use serde_json::json;

const PATIENCE: Duration = Duration::from_secs(60);

/// A server with a supervisor that ticks every 200 ms, whose VMs are real agents that ask
/// for tasks every second (`extra`: more agent settings).
async fn rig(work: &Workdir, extra: &[(&str, &str)]) -> Rig {
    let addr = free_addr().await;
    let mut env = vec![("LABLINK_WAIT_SECS", "1")];
    env.extend_from_slice(extra);
    let local = work.provisioner(&format!("http://{addr}"), &env);
    let mut supervisor = SupervisorConfig {
        tick: Duration::from_millis(200),
        leader_lease: Duration::from_secs(5),
        ..Default::default()
    };
    supervisor.ladder.enabled = false;
    supervisor.reconcile.enabled = false;
    let builder = LabLink::builder().with_config(AllocatorConfig {
        supervisor,
        ..Default::default()
    });
    Rig::start(addr, builder, &local).await
}

/// Two agents up, the first held by a participant; then a destruction in an hour, with a
/// two-hour warning, saved through the API. The held VM's name.
async fn warned(rig: &Rig) -> String {
    rig.launch(2).await;
    rig.wait_for_vms("agents to register", 2, |vm| vm["state"] == "available")
        .await;
    let (status, body) = rig
        .request_vm("ada@example.org", &crd_command("4/0AbNotify-xyz"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let vm = body["hostname"].as_str().unwrap().to_owned();
    let at = (Utc::now() + chrono::Duration::hours(1))
        .with_nanosecond(0)
        .unwrap();
    let mut settings = rig.admin_get("/api/v1/settings").await;
    settings["destruction"] = json!({
        "times": [at.to_rfc3339_opts(SecondsFormat::Secs, true)],
        "warning": 7200,
    });
    let (status, body) = json_of(
        rig.client
            .put(rig.url("/api/v1/settings"))
            .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
            .header(ACCEPT, "application/json")
            .json(&settings)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    vm
}

/// Waits until the allocator knows the agent of `vm` acknowledged its warning.
async fn acknowledged(rig: &Rig, vm: &str) {
    let hostname: Hostname = vm.parse().unwrap();
    wait_until("the agent to acknowledge the warning", PATIENCE, || async {
        let warnings = rig.allocator.vm_warnings(&hostname).await.unwrap();
        (warnings.len() == 1 && warnings[0].acknowledged_at.is_some()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_shows_a_warning_once_with_notify_send_and_acknowledges_it() {
    let work = Workdir::new();
    // notify-send records its arguments and counts its runs, per VM.
    script(
        &work.path("notify-send"),
        r#"printf '%s\n' "$@" > "$RECORD_DIR/$VM_NAME.notify"
echo run >> "$RECORD_DIR/$VM_NAME.notifications""#,
    );
    let rig = rig(&work, &[]).await;
    let supervisor = rig.lablink.start_supervisor().unwrap();
    let vm = warned(&rig).await;
    acknowledged(&rig, &vm).await;
    let argv = work.read(&format!("{vm}.notify")).expect("no notification");
    let argv: Vec<&str> = argv.lines().collect();
    assert_eq!(
        argv[..4],
        [
            "--urgency=critical",
            "--app-name=LabLink",
            "--",
            "LabLink: this VM will be destroyed"
        ],
        "{argv:?}"
    );
    assert!(
        argv[4].starts_with("This VM will be destroyed at "),
        "{argv:?}"
    );
    // Several task polls later (one a second), it was still shown once; the free VM, which
    // no participant holds, showed nothing.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let runs = work.read(&format!("{vm}.notifications")).unwrap();
    assert_eq!(runs.lines().count(), 1, "shown more than once");
    let shown: Vec<_> = std::fs::read_dir(work.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".notifications"))
        .collect();
    assert_eq!(shown.len(), 1, "another VM showed a notification");
    // The agent's log says so, to the admin.
    let hostname: Hostname = vm.parse().unwrap();
    let logs = rig.allocator.logs(&hostname).await.unwrap();
    assert!(
        logs.agent.contains("warning shown on the desktop"),
        "{}",
        logs.agent
    );
    supervisor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_notify_send_says_so_once_and_acknowledges_the_warning() {
    let work = Workdir::new();
    let missing = work.path("no-such-notify-send").display().to_string();
    let rig = rig(&work, &[("LABLINK_NOTIFY_SEND", &missing)]).await;
    let supervisor = rig.lablink.start_supervisor().unwrap();
    let vm = warned(&rig).await;
    acknowledged(&rig, &vm).await;
    let hostname: Hostname = vm.parse().unwrap();
    let said = wait_until("the agent's log line", PATIENCE, || async {
        let agent = rig.allocator.logs(&hostname).await.unwrap().agent;
        agent.contains("no notify-send").then_some(agent)
    })
    .await;
    assert_eq!(said.matches("no notify-send").count(), 1, "{said}");
    supervisor.stop().await;
}
