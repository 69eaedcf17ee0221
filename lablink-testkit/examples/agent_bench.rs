//! Measures the agent: binary size, idle RSS and CPU while waiting (default intervals), and
//! the time from a participant's `request_vm` response to the agent starting `start-host`
//! (p50/p99 over 100 agents), against a real allocator server on 127.0.0.1.
//!
//! ```text
//! cargo build --release -p lablink-agent
//! LABLINK_AGENT_BIN=target/release/lablink-agent \
//!     cargo run --release -p lablink-testkit --example agent_bench
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lablink::LabLink;
use lablink_testkit::{agent_program, crd_command, free_addr, script, Rig, Workdir};

const AGENTS: usize = 100;
const IDLE_AGENTS: usize = 10;
/// Longer than the 60 s long-poll, so each agent re-asks at least once in the window.
const IDLE_WINDOW: Duration = Duration::from_secs(120);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Pids of running `program` processes whose environment has `marker`.
fn agent_pids(program: &Path, marker: &str) -> Vec<u32> {
    let program = program.canonicalize().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let dir = PathBuf::from(format!("/proc/{pid}"));
            std::fs::read_link(dir.join("exe")).is_ok_and(|exe| exe == program)
                && std::fs::read(dir.join("environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == marker.as_bytes()))
        })
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// utime + stime, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let program = agent_program();
    let size = std::fs::metadata(&program).unwrap().len();
    let stripped =
        std::env::temp_dir().join(format!("lablink-agent-stripped-{}", std::process::id()));
    std::fs::copy(&program, &stripped).unwrap();
    let strip_ok = std::process::Command::new("strip")
        .arg(&stripped)
        .status()
        .is_ok_and(|s| s.success());
    let stripped_size = std::fs::metadata(&stripped).unwrap().len();
    let _ = std::fs::remove_file(&stripped);
    println!("agent binary: {} ({size} bytes)", program.display());
    if strip_ok {
        println!(
            "  stripped: {stripped_size} bytes ({:.2} MiB)",
            stripped_size as f64 / 1048576.0
        );
    }

    // The start-host stand-in records when it started.
    let work = Workdir::new();
    script(
        &work.path("start-host"),
        r#"date +%s.%N > "$RECORD_DIR/$VM_NAME.started""#,
    );
    let addr = free_addr().await;
    let local = work.provisioner(&format!("http://{addr}"), &[("RUST_LOG", "warn")]);
    let rig = Rig::start(addr, LabLink::builder(), &local).await;
    rig.launch(AGENTS).await;
    rig.wait_for_vms("the agents", AGENTS, |vm| vm["state"] == "available")
        .await;
    // Let every agent settle into its long-poll.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut answered = Vec::new();
    for i in 0..AGENTS {
        let (status, body) = rig
            .request_vm(
                &format!("p{i}@bench.org"),
                &crd_command(&format!("4/bench-{i}")),
            )
            .await;
        assert!(status.is_success(), "{body}");
        answered.push((body["hostname"].as_str().unwrap().to_owned(), unix_now()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut delays = Vec::new();
    for (hostname, at) in &answered {
        let file = work.path(&format!("{hostname}.started"));
        let started =
            lablink_testkit::wait_until("start-host to run", Duration::from_secs(30), || async {
                std::fs::read_to_string(&file)
                    .ok()?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .await;
        delays.push((started - at) * 1000.0);
    }
    delays.sort_by(f64::total_cmp);
    println!(
        "request_vm response -> start-host running, {AGENTS} agents, one request every 20 ms: \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&delays, 0.5),
        percentile(&delays, 0.99),
        delays[delays.len() - 1]
    );
    local.shutdown().await;

    // Idle: agents with the default intervals, waiting for an assignment.
    let marker = "LABLINK_BENCH=idle";
    let addr = free_addr().await;
    let idle = work.provisioner(
        &format!("http://{addr}"),
        &[
            ("RUST_LOG", "warn"),
            ("LABLINK_BENCH", "idle"),
            ("LABLINK_GPU_INTERVAL_SECS", "20"),
            ("LABLINK_INUSE_INTERVAL_SECS", "5"),
            ("LABLINK_HEARTBEAT_SECS", "30"),
            ("LABLINK_WAIT_SECS", "60"),
            ("LABLINK_RECHECK_SECS", "30"),
            ("LABLINK_LOG_POLL_SECS", "1"),
            ("LABLINK_INUSE_PROCESS", "sleap-label"),
        ],
    );
    let rig = Rig::start(addr, LabLink::builder(), &idle).await;
    rig.launch(IDLE_AGENTS).await;
    rig.wait_for_vms("the idle agents", IDLE_AGENTS, |vm| {
        vm["state"] == "available"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pids = agent_pids(&program, marker);
    assert_eq!(pids.len(), IDLE_AGENTS, "idle agents found by /proc scan");
    let before: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    tokio::time::sleep(IDLE_WINDOW).await;
    let after: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    let rss: Vec<u64> = pids.iter().map(|&p| rss_kib(p)).collect();
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let cpu_percent =
        (after - before) as f64 / ticks_per_sec / IDLE_WINDOW.as_secs_f64() / pids.len() as f64
            * 100.0;
    println!(
        "idle agents (default intervals, in-use watch on, a stand-in nvidia-smi), {IDLE_AGENTS} agents over {}s: \
         RSS min {} KiB, max {} KiB; CPU {cpu_percent:.3}% of a core each ({} ticks in all)",
        IDLE_WINDOW.as_secs(),
        rss.iter().min().unwrap(),
        rss.iter().max().unwrap(),
        after - before
    );
    idle.shutdown().await;
}
