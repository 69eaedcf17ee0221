//! The agent sets up its VM's research software before it becomes available: real agent
//! processes against a real allocator, with recording `docker` and `git` stand-ins first on
//! `PATH` and real `bash` running the start-up script.

use std::time::Duration;

use lablink::{AllocatorExt, Hostname, LabLink};
use lablink_testkit::{free_addr, script, wait_until, Rig, Workdir};

const IMAGE: &str = "ghcr.io/talmolab/lablink-client:0.1";
const REPO: &str = "https://github.com/talmolab/sleap-tutorial.git";

/// `docker` records its arguments per VM; `container inspect` finds nothing, and the first
/// pull fails (a registry hiccup). `git` records its arguments and makes the clone's directory.
/// Both record whether they saw the agent's token.
fn stand_ins(work: &Workdir) {
    script(
        &work.path("docker"),
        r#"printf '%s\n' "$*" >> "$RECORD_DIR/$VM_NAME.docker"
[ -z "${API_TOKEN:-}" ] || echo leaked >> "$RECORD_DIR/$VM_NAME.token"
case "$1" in
  container) exit 1 ;;
  pull)
    n=$(cat "$RECORD_DIR/$VM_NAME.pulls" 2>/dev/null || echo 0)
    echo $((n + 1)) > "$RECORD_DIR/$VM_NAME.pulls"
    [ "$n" -ge 1 ] ;;
  *) exit 0 ;;
esac"#,
    );
    script(
        &work.path("git"),
        r#"printf '%s\n' "$*" >> "$RECORD_DIR/$VM_NAME.git"
[ -z "${API_TOKEN:-}" ] || echo leaked >> "$RECORD_DIR/$VM_NAME.token"
mkdir -p "$4""#,
    );
}

/// A start-up script that fails on its first two runs, counting them.
const FLAKY: &str = r#"n=$(cat "$RECORD_DIR/$VM_NAME.tries" 2>/dev/null || echo 0)
echo $((n + 1)) > "$RECORD_DIR/$VM_NAME.tries"
[ "$n" -ge 2 ]"#;

fn lines(work: &Workdir, name: &str) -> Vec<String> {
    work.read(name)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_starts_the_subject_container_with_gpus_clones_the_tutorial_and_retries_its_startup_script(
) {
    let work = Workdir::new();
    stand_ins(&work);
    let home = work.path("home/ubuntu");
    std::fs::create_dir_all(&home).unwrap();
    let cloud_init = work.path("cloud-init-output.log");
    std::fs::write(&cloud_init, "Cloud-init v. 24.1 finished at boot\n").unwrap();
    let addr = free_addr().await;
    let log_files = format!("cloud_init={}", cloud_init.display());
    let local = work.provisioner(
        &format!("http://{addr}"),
        &[
            ("SUBJECT_IMAGE", IMAGE),
            ("TUTORIAL_REPO_TO_CLONE", REPO),
            ("LABLINK_CRD_USER", "ubuntu"),
            ("LABLINK_DESKTOP_HOME", home.to_str().unwrap()),
            ("LABLINK_STARTUP_SCRIPT", FLAKY),
            ("LABLINK_STARTUP_RETRIES", "3"),
            ("STARTUP_ON_ERROR", "fail"),
            ("LABLINK_BOOTSTRAP_RETRY_SECS", "0.1"),
            ("LABLINK_LOG_FILES", &log_files),
        ],
    );
    let rig = Rig::start(addr, LabLink::builder(), &local).await;
    let hostname = rig.launch(1).await.remove(0);
    rig.wait_for_vms("the bootstrapped VM to be available", 1, |vm| {
        vm["state"] == "available"
    })
    .await;

    let h = home.display();
    let docker = [
        "container inspect lablink-subject".to_owned(),
        format!("pull {IMAGE}"),
        format!("pull {IMAGE}"),
        format!(
            "run -d --name lablink-subject --restart unless-stopped --gpus all -v {h}:{h} {IMAGE}"
        ),
    ];
    assert_eq!(lines(&work, &format!("{hostname}.docker")), docker);
    assert_eq!(
        lines(&work, &format!("{hostname}.git")),
        [format!("clone -- {REPO} {h}/sleap-tutorial")]
    );
    assert!(home.join("sleap-tutorial").is_dir());
    assert_eq!(
        work.read(&format!("{hostname}.tries")).as_deref(),
        Some("3\n"),
        "the start-up script ran until it succeeded, on its third attempt"
    );
    assert_eq!(
        work.read(&format!("{hostname}.token")),
        None,
        "token leaked"
    );

    // The cloud-init log and the bootstrap's story reach the admin's view of the VM.
    let logs = wait_until("the shipped logs", Duration::from_secs(30), || async {
        let logs = rig.logs(&hostname).await;
        let cloud = logs["cloud_init"].as_str().unwrap_or_default();
        cloud
            .contains("Cloud-init v. 24.1 finished")
            .then_some(logs)
    })
    .await
    .to_string();
    for line in [
        "the start-up script failed (attempt 1 of 3)",
        "the start-up script succeeded",
        "container lablink-subject started",
        "tutorial cloned",
    ] {
        assert!(logs.contains(line), "{line:?} not in {logs}");
    }

    // A rebooted agent (same state dir) does not set the VM up again.
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
    assert_eq!(lines(&work, &format!("{hostname}.docker")), docker);
    assert_eq!(lines(&work, &format!("{hostname}.git")).len(), 1);
    assert_eq!(
        work.read(&format!("{hostname}.tries")).as_deref(),
        Some("3\n")
    );
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_up_past_its_time_limit_is_stopped_with_its_children_and_fails_the_vm() {
    let work = Workdir::new();
    let sleeper = work.path("sleeper.pid");
    let addr = free_addr().await;
    // A start-up script that hangs in a child of its own.
    let hang = format!("sleep 600 & echo $! > {}; wait", sleeper.display());
    let local = work.provisioner(
        &format!("http://{addr}"),
        &[
            ("LABLINK_STARTUP_SCRIPT", &hang),
            ("LABLINK_STARTUP_RETRIES", "1"),
            ("STARTUP_ON_ERROR", "fail"),
            ("LABLINK_BOOTSTRAP_TIMEOUT_SECS", "2"),
        ],
    );
    let rig = Rig::start(addr, LabLink::builder(), &local).await;
    let hostname = rig.launch(1).await.remove(0);
    rig.wait_for_vms("the hung set-up to fail the VM", 1, |vm| {
        vm["state"] == "failed"
    })
    .await;
    let logs = rig.logs(&hostname).await.to_string();
    assert!(
        logs.contains("the set-up did not finish within 2 s"),
        "{logs}"
    );
    // The script's own child was killed with it (gone, or a zombie nobody reaped yet).
    let pid = std::fs::read_to_string(&sleeper).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "the start-up script's child still runs: {stat}"
    );
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_script_that_always_fails_keeps_the_vm_unavailable_with_startup_on_error_fail() {
    let work = Workdir::new();
    stand_ins(&work);
    let addr = free_addr().await;
    let local = work.provisioner(
        &format!("http://{addr}"),
        &[
            ("LABLINK_STARTUP_SCRIPT", "echo broken >&2; exit 7"),
            ("LABLINK_STARTUP_RETRIES", "2"),
            ("STARTUP_ON_ERROR", "fail"),
            ("LABLINK_BOOTSTRAP_RETRY_SECS", "0.1"),
        ],
    );
    let rig = Rig::start(addr, LabLink::builder(), &local).await;
    let hostname = rig.launch(1).await.remove(0);
    rig.wait_for_vms("the VM whose set-up failed to be failed", 1, |vm| {
        vm["status"] == "error" && vm["state"] == "failed"
    })
    .await;
    // It stays so: the agent does not go on to `running`.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let vm = &rig.vms().await[0];
    assert_eq!(vm["status"], "error", "{vm}");
    assert_eq!(vm["state"], "failed", "{vm}");
    let logs = rig.logs(&hostname).await.to_string();
    assert!(
        logs.contains("the start-up script failed (attempts: 2); this VM stays unavailable"),
        "{logs}"
    );
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_startup_on_error_continue_a_failed_script_is_logged_and_a_cpu_vm_runs_without_gpus() {
    let work = Workdir::new();
    stand_ins(&work);
    let addr = free_addr().await;
    let local = work.provisioner(
        &format!("http://{addr}"),
        &[
            ("SUBJECT_IMAGE", IMAGE),
            ("LABLINK_CRD_USER", "ubuntu"),
            // No nvidia-smi: a CPU machine, and GPU_SUPPORT is not set.
            ("LABLINK_NVIDIA_SMI", "/nonexistent/nvidia-smi"),
            ("LABLINK_STARTUP_SCRIPT", "exit 7"),
            ("LABLINK_STARTUP_RETRIES", "1"),
            ("STARTUP_ON_ERROR", "continue"),
            ("LABLINK_BOOTSTRAP_RETRY_SECS", "0.1"),
        ],
    );
    let rig = Rig::start(addr, LabLink::builder(), &local).await;
    let hostname = rig.launch(1).await.remove(0);
    rig.wait_for_vms("the VM to be available despite its script", 1, |vm| {
        vm["state"] == "available" && vm["status"] == "running"
    })
    .await;
    let docker = lines(&work, &format!("{hostname}.docker"));
    assert_eq!(
        docker.last().map(String::as_str),
        Some(
            format!(
                "run -d --name lablink-subject --restart unless-stopped \
                 -v /home/ubuntu:/home/ubuntu {IMAGE}"
            )
            .as_str()
        ),
        "no --gpus on a CPU machine; the desktop user's home mounted: {docker:?}"
    );
    let logs = rig.logs(&hostname).await.to_string();
    assert!(
        logs.contains(
            "the start-up script failed (attempts: 1); continuing (STARTUP_ON_ERROR=continue)"
        ),
        "{logs}"
    );
    local.shutdown().await;
}
