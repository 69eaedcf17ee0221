//! Proof at scale: the allocator under load, with two replicas on one PostgreSQL, a soak
//! with real and simulated agents, and faults injected while it runs. Loopback only; every
//! loop is bounded in count and time. Run it with `scripts/proof.sh [ci|full]`, which builds
//! what it needs and starts PostgreSQL; by hand:
//!
//! ```text
//! cargo build --release --features postgres --bin lablink --example proof
//! cargo build --release -p lablink-agent
//! scripts/with-postgres.sh target/release/examples/proof ci      # or full
//! scripts/with-postgres.sh target/release/examples/proof full soak   # only some parts
//! ```
//!
//! Parts (all by default): `workloads` (W1 and W2 with PostgreSQL, W1 on two replicas, W3),
//! `soak` (the soak with its faults and invariant checks). Each workload's target is
//! reported as "target met" or "target MISSED" but does not fail the run (the machine is
//! shared); correctness checks do.
//!
//! The soak. Two replicas of the real server binary share one database and one fake "cloud":
//! a directory of machine files (`provisioner.inventory_dir` of the fake provisioner), so both see the same
//! inventory and it outlives a killed replica. The generator plays the cloud's machines: it
//! watches that directory and boots an agent for every machine that appears (and stops it
//! when the machine is destroyed). The first machines get real `lablink-agent` processes
//! (agent auth `open`; each talks to one replica, alternating; `start-host` is a recording
//! script), the rest simulated agents (a task each: `ready`, heartbeats, long-polls for the
//! assignment, round-robin over the replicas). Participants arrive, hold a VM, release it
//! (admin API) and ask again, round-robin over the replicas. Faults are injected at fixed
//! points of the soak (kill -9 of a replica, the LISTEN connection terminated, PostgreSQL
//! restarted, an agent paused past its lease, 20% of launches failing), each with its
//! effect and recovery time measured. Afterwards the invariants are checked through the API
//! and in the database. The exit status is non-zero if any check fails.

#[allow(dead_code)] // shared with the load example, which uses less of it
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ms, percentile, Error, Server, PASSWORD};
use rand::Rng;
use reqwest::header::ACCEPT;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

/// The sizes of a run.
#[derive(Debug, Clone)]
struct Profile {
    name: &'static str,
    /// Participants of W1 (one VM each).
    w1: usize,
    /// Waiters of W2.
    w2: usize,
    /// Seconds of W3.
    w3_seconds: u64,
    /// Simulated agents in the soak.
    sim_agents: usize,
    /// Real `lablink-agent` processes in the soak.
    real_agents: usize,
    /// Participants in the soak (fewer than VMs, so some are free to churn).
    participants: usize,
    /// How long the soak runs.
    soak: Duration,
    /// How long a participant holds a VM, seconds (uniform).
    hold: (u64, u64),
    /// The agents' heartbeat interval, seconds (the lease is 3 of them).
    heartbeat: u64,
    /// VMs launched while the provisioner fails 20% of launches.
    fault_launches: usize,
}

const CI: Profile = Profile {
    name: "ci",
    w1: 1_000,
    w2: 2_000,
    w3_seconds: 5,
    sim_agents: 200,
    real_agents: 20,
    participants: 160,
    soak: Duration::from_secs(100),
    hold: (6, 15),
    heartbeat: 2,
    fault_launches: 50,
};

const FULL: Profile = Profile {
    name: "full",
    w1: 1_000,
    w2: 10_000,
    w3_seconds: 20,
    sim_agents: 1_000,
    real_agents: 200,
    participants: 1_000,
    soak: Duration::from_secs(600),
    hold: (20, 60),
    heartbeat: 5,
    fault_launches: 50,
};

/// Agents re-check their assignment this often once they have one (seconds).
const RECHECK: u64 = 2;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            println!("\nPROOF FAILED: see the checks above");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            println!("\nPROOF ERROR: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<bool, Error> {
    let mut args = std::env::args().skip(1);
    const USAGE: &str = "usage: proof ci|full [workloads] [soak]";
    let profile = match args.next().as_deref() {
        Some("ci") => CI,
        Some("full") => FULL,
        _ => return Err(USAGE.into()),
    };
    let parts: Vec<String> = args.collect();
    if let Some(unknown) = parts
        .iter()
        .find(|p| !["workloads", "soak"].contains(&p.as_str()))
    {
        return Err(format!("unknown part {unknown:?}; {USAGE}").into());
    }
    let part = |p: &str| parts.is_empty() || parts.iter().any(|a| a == p);
    let http = common::client()?;
    println!("proof, profile {}", profile.name);
    println!("{}", common::machine());
    let mut ok = true;
    if part("workloads") {
        workloads(&http, &profile).await?;
    }
    if part("soak") {
        ok &= soak(&http, &profile).await?;
    }
    Ok(ok)
}

/// Settings of a replica on `db` (and the shared inventory `dir`, if any).
fn replica_env(db: &str, dir: Option<&Path>, heartbeat: u64) -> Vec<(String, String)> {
    let mut env = vec![
        ("LABLINK_DATABASE__URL", db.to_owned()),
        ("LABLINK_DATABASE__MAX_CONNECTIONS", "20".to_owned()),
        ("LABLINK_ALLOCATOR__MAX_WAIT", "10".to_owned()),
        ("LABLINK_ALLOCATOR__SUPERVISOR__TICK", "1".to_owned()),
        (
            "LABLINK_ALLOCATOR__SUPERVISOR__LEADER_LEASE",
            "5".to_owned(),
        ),
        (
            "LABLINK_ALLOCATOR__SUPERVISOR__LEASES__HEARTBEAT_INTERVAL",
            heartbeat.to_string(),
        ),
        (
            "LABLINK_ALLOCATOR__SUPERVISOR__LEASES__MISSED_INTERVALS",
            "3".to_owned(),
        ),
        (
            "LABLINK_ALLOCATOR__SUPERVISOR__LADDER__UNHEALTHY_GRACE",
            "300".to_owned(),
        ),
        (
            "LABLINK_ALLOCATOR__SUPERVISOR__RECONCILE__INTERVAL",
            "30".to_owned(),
        ),
    ];
    if let Some(dir) = dir {
        env.push((
            "LABLINK_PROVISIONER__INVENTORY_DIR",
            dir.display().to_string(),
        ));
    }
    env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

async fn start_replica(
    http: &Client,
    env: &[(String, String)],
    log: Option<&Path>,
) -> Result<Server, Error> {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start_logged(http, &env, log).await
}

/// W1 with PostgreSQL (one replica, then two), W2 with PostgreSQL, W3; each target's verdict.
async fn workloads(http: &Client, profile: &Profile) -> Result<(), Error> {
    println!("\n== workloads ==");
    let mut w1 = Vec::new();
    for replicas in [1, 2] {
        let db = common::create_database("lablink_proof_w1").await?;
        let result = async {
            let env = replica_env(&db.url, None, 30);
            let mut servers = Vec::new();
            for _ in 0..replicas {
                servers.push(start_replica(http, &env, None).await?);
            }
            let refs: Vec<&Server> = servers.iter().collect();
            let what = if replicas == 1 {
                "PostgreSQL, one replica".to_owned()
            } else {
                format!("PostgreSQL, {replicas} replicas on one database, round-robin")
            };
            let measured = common::w1_on(http, &refs, profile.w1, &what).await?;
            let mut conn = db.connect().await?;
            let (assigned, emails): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(DISTINCT email) FROM lablink_vms WHERE state = 'assigned'",
            )
            .fetch_one(&mut conn)
            .await?;
            println!("  in PostgreSQL: {assigned} VMs assigned, to {emails} distinct emails");
            if (assigned, emails) != (profile.w1 as i64, profile.w1 as i64) {
                return Err(Error::from(
                    "W1: the database does not hold one distinct assignment per participant",
                ));
            }
            Ok::<_, Error>(measured)
        }
        .await;
        db.drop_database().await?;
        w1.push(result?);
    }
    // W2 on its own database, with the server's defaults otherwise (waits up to 600 s).
    let db = common::create_database("lablink_proof_w2").await?;
    let w2 = common::w2(
        http,
        profile.w2,
        &[
            ("LABLINK_DATABASE__URL", db.url.as_str()),
            ("LABLINK_DATABASE__MAX_CONNECTIONS", "20"),
        ],
        "PostgreSQL store and notifier",
    )
    .await;
    db.drop_database().await?;
    let w2 = w2?;
    let w3 = common::w3(http, profile.w3_seconds).await?;

    println!("\n  targets (reported, not enforced: the machine is shared):");
    for (replicas, w) in ["one replica", "two replicas"].iter().zip(&w1) {
        common::verdict(
            &format!("W1 >= 2,000 req/s ({replicas}, PostgreSQL)"),
            &format!("{:.0} req/s", w.throughput),
            w.throughput >= 2_000.0,
        );
    }
    common::verdict(
        "W2 assignment->answer p99 <= 50 ms",
        &ms(w2.p99),
        w2.p99 <= Duration::from_millis(50),
    );
    common::verdict(
        &format!("W2 server RSS <= 200 MB with {} waiters", profile.w2),
        &format!("{:.1} MiB", w2.rss_held_mib),
        w2.rss_held_mib * 1024.0 * 1024.0 <= 200e6,
    );
    common::verdict(
        "W3 >= 10,000 req/s",
        &format!("{w3:.0} req/s"),
        w3 >= 10_000.0,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The soak
// ---------------------------------------------------------------------------------------

/// An assignment a participant was answered with.
#[derive(Clone)]
struct Answer {
    hostname: String,
    code: String,
    /// When the request that was answered was sent (its last attempt).
    sent: Instant,
    /// When the answer arrived.
    at: Instant,
}

/// What everyone in the soak records.
#[derive(Default)]
struct Record {
    /// Every assignment a participant was answered with.
    answers: Mutex<Vec<Answer>>,
    /// When the release of an assignment (by code) was answered.
    released: Mutex<HashMap<String, Instant>>,
    /// Who holds which VM right now, as the participants see it.
    holders: Mutex<HashMap<String, String>>,
    /// What each participant holds at the end: email → (hostname, code).
    holding: Mutex<BTreeMap<String, (String, String)>>,
    /// Assignments simulated agents saw: code → (hostname, when).
    seen: Mutex<HashMap<String, (String, Instant)>>,
    /// A VM answered to a participant while another participant held it.
    two_owners: AtomicUsize,
    /// Latencies of the attempts answered with a VM (from that attempt's send).
    latencies: Mutex<Vec<Duration>>,
    /// Time to a VM from the participant's first ask, failed attempts and retries included.
    waits: Mutex<Vec<Duration>>,
    /// When a participant's call failed (transport error or 5xx).
    participant_errors: Mutex<Vec<Instant>>,
    /// When an agent's call failed (transport error or 5xx).
    agent_errors: Mutex<Vec<Instant>>,
    /// "No VM free" answers.
    no_vm: AtomicU64,
    /// Repeats refused because the browser could not show it got the email's VM (its
    /// answer was lost); the organisers released the VM.
    unproven: AtomicU64,
    /// Releases done.
    releases: AtomicU64,
    /// Requests sent, in total.
    requests: AtomicU64,
}

fn count_in(list: &Mutex<Vec<Instant>>, from: Instant, to: Instant) -> usize {
    list.lock()
        .unwrap()
        .iter()
        .filter(|t| **t >= from && **t <= to)
        .count()
}

/// A round-robin over the replicas' base URLs.
struct Replicas {
    bases: Vec<String>,
    next: AtomicUsize,
}

impl Replicas {
    fn pick(&self) -> &str {
        &self.bases[self.next.fetch_add(1, Ordering::Relaxed) % self.bases.len()]
    }
}

/// An agent the generator runs for a machine of the fake cloud.
enum Agent {
    Real(Child),
    Simulated(Arc<AtomicBool>),
}

/// The fake cloud's machines: the generator boots an agent for each machine file that
/// appears in the inventory directory and stops it when the file goes.
struct Cloud {
    dir: PathBuf,
    agent_bin: PathBuf,
    recorder: PathBuf,
    real_wanted: usize,
    heartbeat: u64,
    agents: Mutex<HashMap<String, Agent>>,
    real_started: AtomicUsize,
    log_dir: PathBuf,
}

impl Cloud {
    /// One pass: boot agents for new machines, stop those of vanished ones.
    fn sync(&self, http: &Client, replicas: &Arc<Replicas>, record: &Arc<Record>) {
        let mut present = HashSet::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') {
                    present.insert(name);
                }
            }
        }
        let mut agents = self.agents.lock().unwrap();
        agents.retain(|hostname, agent| {
            if present.contains(hostname) {
                return true;
            }
            stop_agent(agent);
            false
        });
        for hostname in present {
            if agents.contains_key(&hostname) {
                continue;
            }
            let n = self.real_started.load(Ordering::Relaxed);
            let agent = if n < self.real_wanted {
                match self.spawn_real(&hostname, &replicas.bases[n % replicas.bases.len()]) {
                    Ok(child) => {
                        self.real_started.fetch_add(1, Ordering::Relaxed);
                        Agent::Real(child)
                    }
                    Err(e) => {
                        println!("  cannot start {}: {e}", self.agent_bin.display());
                        continue;
                    }
                }
            } else {
                let stop = Arc::new(AtomicBool::new(false));
                tokio::spawn(simulated_agent(
                    http.clone(),
                    replicas.clone(),
                    record.clone(),
                    hostname.clone(),
                    self.heartbeat,
                    stop.clone(),
                ));
                Agent::Simulated(stop)
            };
            agents.insert(hostname, agent);
        }
    }

    fn spawn_real(&self, hostname: &str, base: &str) -> std::io::Result<Child> {
        let log = std::fs::File::create(self.log_dir.join(format!("{hostname}.log")))?;
        Command::new(&self.agent_bin)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("ALLOCATOR_URL", base)
            .env("VM_NAME", hostname)
            .env("API_TOKEN", "")
            .env("LABLINK_START_HOST", &self.recorder)
            .env("LABLINK_HEARTBEAT_SECS", self.heartbeat.to_string())
            .env("LABLINK_RECHECK_SECS", RECHECK.to_string())
            .env("LABLINK_WAIT_SECS", "20")
            .env("LABLINK_BACKOFF_MAX_SECS", "2")
            .env("LABLINK_GPU_INTERVAL_SECS", "300")
            .env("LABLINK_NVIDIA_SMI", "/nonexistent/nvidia-smi")
            .env("LABLINK_BOOT_ID", uuid::Uuid::new_v4().to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
    }

    /// The process id of a real agent whose VM is `hostname`.
    fn real_pid(&self, hostname: &str) -> Option<u32> {
        match self.agents.lock().unwrap().get(hostname) {
            Some(Agent::Real(child)) => Some(child.id()),
            _ => None,
        }
    }

    fn real_hostnames(&self) -> Vec<String> {
        self.agents
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, a)| matches!(a, Agent::Real(_)))
            .map(|(h, _)| h.clone())
            .collect()
    }

    fn stop_all(&self) {
        for (_, mut agent) in self.agents.lock().unwrap().drain() {
            stop_agent(&mut agent);
        }
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn stop_agent(agent: &mut Agent) {
    match agent {
        Agent::Real(child) => {
            let _ = child.kill();
            let _ = child.wait();
        }
        Agent::Simulated(stop) => stop.store(true, Ordering::Relaxed),
    }
}

/// Whether a call's outcome is a server-side failure (no answer or 5xx).
fn failed<T>(r: &Result<reqwest::Response, T>) -> bool {
    match r {
        Ok(r) => r.status().is_server_error(),
        Err(_) => true,
    }
}

/// A lightweight agent: reports ready, heartbeats, long-polls for its assignment and
/// records what it saw. Every call goes to the next replica; failures back off.
async fn simulated_agent(
    http: Client,
    replicas: Arc<Replicas>,
    record: Arc<Record>,
    hostname: String,
    heartbeat: u64,
    stop: Arc<AtomicBool>,
) {
    let boot_id = uuid::Uuid::new_v4().to_string();
    let mut backoff = Duration::from_millis(200);
    // Ready (the VM may not be `booting` yet while its launch finishes: then retry).
    while !stop.load(Ordering::Relaxed) {
        let r = http
            .post(format!("{}/api/v1/vms/{hostname}/ready", replicas.pick()))
            .json(&json!({"status": "running", "boot_id": boot_id}))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if failed(&r) {
            record.agent_errors.lock().unwrap().push(Instant::now());
        }
        if matches!(&r, Ok(r) if r.status().is_success()) {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    let mut next_heartbeat = Instant::now() + Duration::from_secs(heartbeat);
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_heartbeat {
            let r = http
                .post(format!(
                    "{}/api/v1/vms/{hostname}/heartbeat",
                    replicas.pick()
                ))
                .json(&json!({"boot_id": boot_id}))
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            if failed(&r) {
                record.agent_errors.lock().unwrap().push(Instant::now());
            } else {
                next_heartbeat = Instant::now() + Duration::from_secs(heartbeat);
            }
        }
        let r = http
            .get(format!(
                "{}/api/v1/vms/{hostname}/assignment?timeout={heartbeat}",
                replicas.pick()
            ))
            .timeout(Duration::from_secs(heartbeat + 10))
            .send()
            .await;
        if failed(&r) {
            record.agent_errors.lock().unwrap().push(Instant::now());
            tokio::time::sleep(jitter(200, 1000)).await;
            continue;
        }
        let Ok(r) = r else { continue };
        match r.status() {
            StatusCode::OK => {
                if let Ok(body) = r.json::<Value>().await {
                    if let Some(code) = body["code"].as_str() {
                        record
                            .seen
                            .lock()
                            .unwrap()
                            .entry(code.to_owned())
                            .or_insert_with(|| (hostname.clone(), Instant::now()));
                    }
                }
                tokio::time::sleep(Duration::from_secs(RECHECK)).await;
            }
            StatusCode::NO_CONTENT => {}
            // 404 (destroyed), 409... : the machine is going away or not ready; wait.
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// A participant: asks for a VM, holds it, releases it, asks again, until `end`. A request
/// whose answer was lost is asked again with the same code and the participant cookie of
/// its browser; if the lost answer had assigned a VM (which only that answer's cookie would
/// show), the organisers release it and the participant asks with a fresh code, so each
/// code names one assignment.
async fn participant(
    http: Client,
    replicas: Arc<Replicas>,
    record: Arc<Record>,
    i: usize,
    hold: (u64, u64),
    end: Instant,
) {
    let email = format!("p{i}@proof.test");
    // Arrivals spread over the first 10 seconds.
    tokio::time::sleep(jitter(0, 10_000)).await;
    let mut round = 0u32;
    // The participant cookie of this participant's browser: a repeat for the email shows
    // the VM only with it.
    let mut cookie: Option<String> = None;
    while Instant::now() < end {
        round += 1;
        let mut code = format!("4/proof-{i}-{round}");
        // Ask until answered or told there is no VM (bounded: 60 s of failures).
        let asked = Instant::now();
        let mut sent;
        let answer = loop {
            record.requests.fetch_add(1, Ordering::Relaxed);
            sent = Instant::now();
            let mut request = http
                .post(format!("{}/api/request_vm", replicas.pick()))
                .header(ACCEPT, "application/json")
                .form(&[
                    ("email", email.clone()),
                    ("crd_command", format!("start-host --code={code}")),
                ])
                .timeout(Duration::from_secs(30));
            if let Some(cookie) = &cookie {
                request = request.header(reqwest::header::COOKIE, cookie);
            }
            let r = request.send().await;
            if failed(&r) {
                record
                    .participant_errors
                    .lock()
                    .unwrap()
                    .push(Instant::now());
                if asked.elapsed() > Duration::from_secs(60) {
                    break None;
                }
                tokio::time::sleep(jitter(200, 1000)).await;
                continue;
            }
            let Ok(r) = r else { continue };
            let status = r.status();
            if status == StatusCode::CONFLICT {
                // The email holds a VM this browser never heard of: an earlier answer was
                // lost (a replica killed mid-request). As the page says, the organisers
                // release it; then the participant asks again, with a fresh code.
                record.unproven.fetch_add(1, Ordering::Relaxed);
                release_email(&http, &replicas, &record, &email).await;
                code = format!("{code}-again");
                continue;
            }
            if let Some(c) = common::participant_cookie(&r) {
                cookie = Some(c);
            }
            let body: Value = r.json().await.unwrap_or(Value::Null);
            match (body["hostname"].as_str(), status.is_success()) {
                (Some(h), true) => {
                    record.latencies.lock().unwrap().push(sent.elapsed());
                    record.waits.lock().unwrap().push(asked.elapsed());
                    break Some(h.to_owned());
                }
                _ => {
                    record.no_vm.fetch_add(1, Ordering::Relaxed);
                    break None;
                }
            }
        };
        let Some(hostname) = answer else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        {
            let mut holders = record.holders.lock().unwrap();
            if let Some(other) = holders.insert(hostname.clone(), email.clone()) {
                if other != email {
                    record.two_owners.fetch_add(1, Ordering::Relaxed);
                    println!("  TWO OWNERS: {hostname} answered to {email} while {other} holds it");
                }
            }
        }
        record.answers.lock().unwrap().push(Answer {
            hostname: hostname.clone(),
            code: code.clone(),
            sent,
            at: Instant::now(),
        });
        record
            .holding
            .lock()
            .unwrap()
            .insert(email.clone(), (hostname.clone(), code.clone()));
        let secs = jitter(hold.0 * 1000, hold.1 * 1000 + 1).as_secs();
        let until = (Instant::now() + Duration::from_secs(secs)).min(end);
        tokio::time::sleep_until(until.into()).await;
        if Instant::now() >= end {
            return; // keeps its VM: checked at the end
        }
        // Release: no longer ours from here on (so the next owner is not a second one).
        record.holders.lock().unwrap().remove(&hostname);
        let released = release(&http, &replicas, &record, &hostname).await;
        if released {
            record
                .released
                .lock()
                .unwrap()
                .insert(code.clone(), Instant::now());
            record.holding.lock().unwrap().remove(&email);
            record.releases.fetch_add(1, Ordering::Relaxed);
        } else {
            record
                .holders
                .lock()
                .unwrap()
                .insert(hostname.clone(), email.clone());
            return; // still holds it: checked at the end
        }
        tokio::time::sleep(jitter(500, 3000)).await;
    }
}

/// A random duration in `[lo, hi)` milliseconds.
fn jitter(lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(lo..hi))
}

/// An admin API call to some replica, retried on failures (counted) for at most 60 s; the
/// first answer that is not a failure, if any.
async fn admin_call(
    replicas: &Replicas,
    record: &Record,
    request: impl Fn(&str) -> reqwest::RequestBuilder,
) -> Option<reqwest::Response> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let r = request(replicas.pick())
            .basic_auth("admin", Some(PASSWORD))
            .header(ACCEPT, "application/json")
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        if failed(&r) {
            record
                .participant_errors
                .lock()
                .unwrap()
                .push(Instant::now());
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        if let Ok(r) = r {
            return Some(r);
        }
    }
    None
}

/// Releases `hostname` (admin API). A 409 means it was already released (a retry of a
/// release whose answer was lost).
async fn release(http: &Client, replicas: &Replicas, record: &Record, hostname: &str) -> bool {
    let Some(r) = admin_call(replicas, record, |base| {
        http.post(format!("{base}/api/v1/vms/{hostname}/release"))
    })
    .await
    else {
        return false;
    };
    if r.status().is_success() || r.status() == StatusCode::CONFLICT {
        return true;
    }
    println!("  release of {hostname}: {}", r.status());
    false
}

/// Releases the VM `email` holds, as an organiser helping a participant does: finds it by
/// email (admin API), then releases it.
async fn release_email(http: &Client, replicas: &Replicas, record: &Record, email: &str) {
    let Some(r) = admin_call(replicas, record, |base| {
        http.get(format!("{base}/api/v1/vms"))
            .query(&[("email", email)])
    })
    .await
    else {
        return;
    };
    let vms: Value = r.json().await.unwrap_or(Value::Null);
    for vm in vms.as_array().into_iter().flatten() {
        if let Some(hostname) = vm["hostname"].as_str() {
            release(http, replicas, record, hostname).await;
        }
    }
}

/// One fault's outcome.
struct Fault {
    name: &'static str,
    effect: String,
    recovery: Duration,
    ok: bool,
}

/// Polls `probe` every 50 ms until it is true, for at most `limit`; the time it took.
async fn until<F, Fut>(limit: Duration, mut probe: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if probe().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Whether `base` answers a request that needs the store.
async fn store_answers(http: &Client, base: &str) -> bool {
    matches!(
        http.get(format!("{base}/api/unassigned_vms_count"))
            .timeout(Duration::from_secs(5))
            .send()
            .await,
        Ok(r) if r.status().is_success()
    )
}

async fn vm_state(http: &Client, base: &str, hostname: &str) -> Option<Value> {
    let r = http
        .get(format!("{base}/api/v1/vms/{hostname}"))
        .basic_auth("admin", Some(PASSWORD))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

async fn listen_backends(db: &common::Database) -> Result<Vec<i32>, Error> {
    let mut conn = db.connect().await?;
    let pids: Vec<(i32,)> = sqlx::query_as(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query ILIKE 'listen%' ORDER BY pid",
    )
    .bind(&db.name)
    .fetch_all(&mut conn)
    .await?;
    Ok(pids.into_iter().map(|(p,)| p).collect())
}

fn effect_window(record: &Record, from: Instant, to: Instant) -> String {
    format!(
        "{} participant calls and {} agent calls failed (all retried)",
        count_in(&record.participant_errors, from, to),
        count_in(&record.agent_errors, from, to)
    )
}

/// kill -9 of replica B; restarted after 1 s (as a process supervisor would).
async fn fault_kill(http: &Client, servers: &mut [Server], record: &Record) -> Fault {
    let t0 = Instant::now();
    servers[1].kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let respawned = servers[1].respawn();
    let up = match respawned {
        Ok(()) => servers[1].wait_up(http).await.is_ok(),
        Err(_) => false,
    };
    let base = servers[1].base().to_owned();
    let serving = up
        && until(Duration::from_secs(60), || store_answers(http, &base))
            .await
            .is_some();
    let recovery = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    Fault {
        name: "kill -9 one replica (restarted after 1 s)",
        effect: effect_window(record, t0, t0 + recovery + Duration::from_secs(1)),
        recovery,
        ok: serving,
    }
}

/// `pg_terminate_backend` on every backend running LISTEN (one per replica).
async fn fault_listen(db: &common::Database, record: &Record) -> Fault {
    let before = listen_backends(db).await.unwrap_or_default();
    let t0 = Instant::now();
    let terminated = async {
        let mut conn = db.connect().await?;
        for pid in &before {
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .execute(&mut conn)
                .await?;
        }
        Ok::<(), Error>(())
    }
    .await;
    let back = until(Duration::from_secs(60), || async {
        let now = listen_backends(db).await.unwrap_or_default();
        now.len() >= before.len() && now.iter().all(|p| !before.contains(p))
    })
    .await;
    let recovery = back.unwrap_or(t0.elapsed());
    Fault {
        name: "LISTEN connection terminated (pg_terminate_backend)",
        effect: format!(
            "{} LISTEN backends terminated; {}",
            before.len(),
            effect_window(record, t0, t0 + recovery + Duration::from_secs(1))
        ),
        recovery,
        ok: terminated.is_ok() && back.is_some() && before.len() == 2,
    }
}

/// `pg_ctl restart -m fast` on the throwaway cluster.
async fn fault_pg_restart(
    http: &Client,
    bases: &[String],
    db: &common::Database,
    record: &Record,
) -> Fault {
    let (Ok(data), Ok(bin)) = (
        std::env::var("LABLINK_PG_DATA"),
        std::env::var("LABLINK_PG_BIN"),
    ) else {
        return Fault {
            name: "PostgreSQL restarted",
            effect: "not run: LABLINK_PG_DATA / LABLINK_PG_BIN are not set (run under scripts/with-postgres.sh without DATABASE_URL)".into(),
            recovery: Duration::ZERO,
            ok: false,
        };
    };
    let before = listen_backends(db).await.unwrap_or_default().len();
    let pg_ctl = format!("{bin}/pg_ctl");
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &pg_ctl]);
        c
    } else {
        Command::new(&pg_ctl)
    };
    command
        .args(["-D", &data, "-m", "fast", "-w", "-t", "60", "restart"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let restarted = tokio::task::spawn_blocking(move || command.status())
        .await
        .ok()
        .and_then(Result::ok)
        .is_some_and(|s| s.success());
    let pg_down = t0.elapsed();
    let serving = until(Duration::from_secs(90), || async {
        for base in bases {
            if !store_answers(http, base).await {
                return false;
            }
        }
        listen_backends(db).await.unwrap_or_default().len() >= before
    })
    .await;
    let recovery = serving.map_or(t0.elapsed(), |_| t0.elapsed());
    Fault {
        name: "PostgreSQL restarted (pg_ctl restart -m fast)",
        effect: format!(
            "restart took {:.1} s; {}",
            pg_down.as_secs_f64(),
            effect_window(record, t0, t0 + recovery + Duration::from_secs(1))
        ),
        recovery,
        ok: restarted && serving.is_some(),
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// The agent paused by [`fault_pause`], and when.
#[derive(Clone)]
struct Pause {
    hostname: String,
    /// SIGSTOP.
    stopped: Instant,
    /// When the generator saw the VM unhealthy (none: never).
    unhealthy: Option<Instant>,
    /// SIGCONT.
    resumed: Instant,
}

/// SIGSTOP one real agent whose VM is free, past its lease; then SIGCONT. The supervisor
/// must mark the VM unhealthy, and the agent's next report must bring it back. (That no
/// participant was answered with the VM while it was unhealthy is checked at the end.)
async fn fault_pause(
    http: &Client,
    base: &str,
    cloud: &Cloud,
    heartbeat: u64,
    paused: &Mutex<Option<Pause>>,
) -> Fault {
    let name = "agent paused (SIGSTOP) past its lease, then SIGCONT";
    let mut chosen = None;
    for h in cloud.real_hostnames() {
        if let Some(vm) = vm_state(http, base, &h).await {
            if vm["state"] == "available" {
                chosen = Some(h);
                break;
            }
        }
    }
    let Some(hostname) = chosen else {
        return Fault {
            name,
            effect: "no real agent with a free VM to pause".into(),
            recovery: Duration::ZERO,
            ok: false,
        };
    };
    let Some(pid) = cloud.real_pid(&hostname) else {
        return Fault {
            name,
            effect: "the agent process is gone".into(),
            recovery: Duration::ZERO,
            ok: false,
        };
    };
    let lease = Duration::from_secs(3 * heartbeat);
    let t0 = Instant::now();
    signal(pid, "-STOP");
    let detected = until(lease + Duration::from_secs(30), || async {
        vm_state(http, base, &hostname)
            .await
            .is_some_and(|vm| vm["state"] == "unhealthy")
    })
    .await;
    let unhealthy = detected.map(|_| Instant::now());
    // Paused for at least the lease plus two intervals.
    let resume_at = t0 + lease + Duration::from_secs(2 * heartbeat);
    tokio::time::sleep_until(resume_at.into()).await;
    let t1 = Instant::now();
    signal(pid, "-CONT");
    *paused.lock().unwrap() = Some(Pause {
        hostname: hostname.clone(),
        stopped: t0,
        unhealthy,
        resumed: t1,
    });
    let recovered = until(Duration::from_secs(60), || async {
        vm_state(http, base, &hostname)
            .await
            .is_some_and(|vm| vm["state"] == "available" || vm["state"] == "assigned")
    })
    .await;
    Fault {
        name,
        effect: format!(
            "{hostname} marked unhealthy {} after the pause (lease {} s), paused {:.1} s",
            detected.map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
            lease.as_secs(),
            (t1 - t0).as_secs_f64()
        ),
        recovery: recovered.unwrap_or(t1.elapsed()),
        ok: detected.is_some() && recovered.is_some(),
    }
}

/// 20% of launches fail: `count` VMs launched in batches of 5 while the override file says
/// 0.2; then the shortfall is launched again with the fault cleared, and recovery is the
/// time until those VMs are free (their agents booted and reported).
async fn fault_provisioner(
    http: &Client,
    server: &Server,
    dir: &Path,
    count: usize,
    failed_vms: &Mutex<Vec<String>>,
) -> Fault {
    let name = "provisioner fails 20% of launches";
    let file = dir.join(lablink::FAILURE_RATE_FILE);
    if std::fs::write(&file, "0.2").is_err() {
        return Fault {
            name,
            effect: "cannot write the failure-rate file".into(),
            recovery: Duration::ZERO,
            ok: false,
        };
    }
    let mut launched = Vec::new();
    let mut asked = 0;
    let mut launch_errors = 0;
    while asked < count {
        let n = 5.min(count - asked);
        asked += n;
        match server.launch(http, n).await {
            Ok(hostnames) => launched.extend(hostnames),
            Err(_) => launch_errors += 1,
        }
    }
    let _ = std::fs::remove_file(&file);
    let t1 = Instant::now();
    // The VMs whose launch failed, as the allocator records them.
    let mut failed = Vec::new();
    for h in &launched {
        if vm_state(http, server.base(), h)
            .await
            .is_some_and(|vm| vm["state"] == "failed")
        {
            failed.push(h.clone());
        }
    }
    failed_vms.lock().unwrap().extend(failed.iter().cloned());
    // Without a failed launch the fault was not injected (at 20% of 50 launches, all 50
    // succeed with probability 0.8^50, about 1 in 70,000).
    let created = launched.len() - failed.len();
    let shortfall = count - created;
    let replaced = if shortfall > 0 {
        server.launch(http, shortfall).await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let ready = until(Duration::from_secs(120), || async {
        let mut all = true;
        for h in &replaced {
            let state = vm_state(http, server.base(), h).await;
            all &= state.is_some_and(|vm| vm["state"] != "booting" && vm["state"] != "requested");
        }
        all
    })
    .await;
    Fault {
        name,
        effect: format!(
            "{} of {count} VM launches failed ({:.0}%; {launch_errors} launch calls failed outright), each recorded as failed and never assigned (checked at the end); the shortfall relaunched once the fault cleared",
            count - created,
            (count - created) as f64 * 100.0 / count as f64,
        ),
        recovery: ready.map_or(t1.elapsed(), |_| t1.elapsed()),
        ok: !failed.is_empty() && ready.is_some() && replaced.len() == shortfall,
    }
}

async fn soak(http: &Client, profile: &Profile) -> Result<bool, Error> {
    println!(
        "\n== soak: {} simulated + {} real agents, {} participants, {} s, two replicas ==",
        profile.sim_agents,
        profile.real_agents,
        profile.participants,
        profile.soak.as_secs()
    );
    let db = common::create_database("lablink_proof_soak").await?;
    let tmp = tempfile::tempdir()?;
    let result = soak_on(http, profile, &db, tmp.path()).await;
    db.drop_database().await?;
    result
}

async fn soak_on(
    http: &Client,
    profile: &Profile,
    db: &common::Database,
    tmp: &Path,
) -> Result<bool, Error> {
    let dir = tmp.join("cloud");
    // Logs of the replicas and real agents: kept in PROOF_LOG_DIR if set.
    let log_dir = std::env::var_os("PROOF_LOG_DIR").map_or_else(|| tmp.join("logs"), PathBuf::from);
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(&log_dir)?;
    // What real agents run on assignment: records `--code=… --name=…` (and reads the PIN).
    let starts = tmp.join("starts.log");
    let recorder = tmp.join("start-host");
    std::fs::write(
        &recorder,
        format!(
            "#!/bin/sh\ncat >/dev/null\necho \"$*\" >> '{}'\n",
            starts.display()
        ),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&recorder, std::fs::Permissions::from_mode(0o755))?;
    }
    let agent_bin = agent_binary()?;
    let env = replica_env(&db.url, Some(&dir), profile.heartbeat);
    let mut servers = vec![
        start_replica(http, &env, Some(&log_dir.join("replica-a.log"))).await?,
        start_replica(http, &env, Some(&log_dir.join("replica-b.log"))).await?,
    ];
    let replicas = Arc::new(Replicas {
        bases: servers.iter().map(|s| s.base().to_owned()).collect(),
        next: AtomicUsize::new(0),
    });
    let record = Arc::new(Record::default());
    let cloud = Arc::new(Cloud {
        dir: dir.clone(),
        agent_bin,
        recorder,
        real_wanted: profile.real_agents,
        heartbeat: profile.heartbeat,
        agents: Mutex::default(),
        real_started: AtomicUsize::new(0),
        log_dir: log_dir.clone(),
    });
    let cloud_stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (cloud, http, replicas, record, stop) = (
            cloud.clone(),
            http.clone(),
            replicas.clone(),
            record.clone(),
            cloud_stop.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                cloud.sync(&http, &replicas, &record);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let outcome = soak_run(
        http,
        profile,
        db,
        &dir,
        &mut servers,
        &replicas,
        &record,
        &cloud,
        &starts,
    )
    .await;
    cloud_stop.store(true, Ordering::Relaxed);
    let _ = watcher.await;
    cloud.stop_all();
    outcome
}

/// Where the real agent binary is: `PROOF_AGENT_BIN`, else `lablink-agent` in the target
/// directory this example was built in.
fn agent_binary() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os("PROOF_AGENT_BIN") {
        return Ok(path.into());
    }
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("lablink-agent"))
        .ok_or("no target directory")?;
    if !path.exists() {
        return Err(format!(
            "the real agent {} is missing: build it with `cargo build -p lablink-agent` (same profile) or set PROOF_AGENT_BIN",
            path.display()
        )
        .into());
    }
    Ok(path)
}

#[allow(clippy::too_many_arguments)]
async fn soak_run(
    http: &Client,
    profile: &Profile,
    db: &common::Database,
    dir: &Path,
    servers: &mut [Server],
    replicas: &Arc<Replicas>,
    record: &Arc<Record>,
    cloud: &Arc<Cloud>,
    starts: &Path,
) -> Result<bool, Error> {
    // The machines: launched through replica A; the cloud boots their agents.
    let total = profile.sim_agents + profile.real_agents;
    let t = Instant::now();
    let mut launched = 0;
    while launched < total {
        let n = 200.min(total - launched);
        launched += servers[0].launch(http, n).await?.len();
    }
    let base = servers[0].base().to_owned();
    let all_free = until(Duration::from_secs(300), || async {
        match http
            .get(format!("{base}/api/unassigned_vms_count"))
            .send()
            .await
        {
            Ok(r) => r
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["count"].as_u64())
                .is_some_and(|c| c as usize >= total),
            Err(_) => false,
        }
    })
    .await;
    let real = cloud.real_started.load(Ordering::Relaxed);
    println!(
        "  {total} VMs launched and their agents ready in {:.1} s ({real} real agent processes)",
        t.elapsed().as_secs_f64(),
    );
    if all_free.is_none() {
        return Err("the agents did not all report ready within 300 s".into());
    }
    if real != profile.real_agents {
        return Err(format!(
            "{real} real agent processes started, {} asked for",
            profile.real_agents
        )
        .into());
    }

    // Participants.
    let start = Instant::now();
    let end = start + profile.soak;
    let participants: Vec<_> = (0..profile.participants)
        .map(|i| {
            tokio::spawn(participant(
                http.clone(),
                replicas.clone(),
                record.clone(),
                i,
                profile.hold,
                end,
            ))
        })
        .collect();

    // Faults, at fixed points of the soak.
    let at = |f: f64| start + profile.soak.mul_f64(f);
    let mut faults = Vec::new();
    let paused = Mutex::new(None);
    let failed_vms = Mutex::new(Vec::new());
    tokio::time::sleep_until(at(0.10).into()).await;
    faults.push(fault_kill(http, servers, record).await);
    tokio::time::sleep_until(at(0.25).into()).await;
    faults.push(fault_listen(db, record).await);
    tokio::time::sleep_until(at(0.40).into()).await;
    faults.push(fault_pg_restart(http, &replicas.bases, db, record).await);
    tokio::time::sleep_until(at(0.55).into()).await;
    faults.push(fault_pause(http, servers[0].base(), cloud, profile.heartbeat, &paused).await);
    tokio::time::sleep_until(at(0.72).into()).await;
    faults
        .push(fault_provisioner(http, &servers[0], dir, profile.fault_launches, &failed_vms).await);

    // A participant still running (or one that panicked) is a failure; it is stopped first,
    // so it cannot change what participants hold while the invariants are checked.
    let mut unfinished = 0;
    let give_up = tokio::time::Instant::from_std(end + Duration::from_secs(120));
    for mut p in participants {
        if !matches!(tokio::time::timeout_at(give_up, &mut p).await, Ok(Ok(()))) {
            p.abort();
            let _ = p.await;
            unfinished += 1;
        }
    }
    let wall = start.elapsed();
    // Let agents see the last assignments (they re-check every RECHECK seconds).
    tokio::time::sleep(Duration::from_secs(RECHECK * 3)).await;

    // Figures.
    let answers = record.answers.lock().unwrap().clone();
    let mut latencies = record.latencies.lock().unwrap().clone();
    latencies.sort();
    let mut waits = record.waits.lock().unwrap().clone();
    waits.sort();
    println!(
        "  {:.0} s: {} requests, {} answered with a VM, {} \"no VM free\", {} releases, {} repeats without the first answer's cookie (VM released by the organisers)",
        wall.as_secs_f64(),
        record.requests.load(Ordering::Relaxed),
        answers.len(),
        record.no_vm.load(Ordering::Relaxed),
        record.releases.load(Ordering::Relaxed),
        record.unproven.load(Ordering::Relaxed),
    );
    println!(
        "  time to a VM from the participant's first ask (retries included): p50 {}, p99 {}, max {}; per answered attempt: p50 {}, p99 {}",
        ms(percentile(&waits, 0.5)),
        ms(percentile(&waits, 0.99)),
        ms(percentile(&waits, 1.0)),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
    );
    println!(
        "  failed calls over the whole soak (all retried): {} by participants, {} by agents",
        record.participant_errors.lock().unwrap().len(),
        record.agent_errors.lock().unwrap().len()
    );
    let mut ok = true;
    if unfinished > 0 {
        println!(
            "  {unfinished} participants did not finish within 120 s of the end: stopped [FAILED]"
        );
        ok = false;
    }
    println!("\n  faults:");
    for f in &faults {
        println!(
            "  - {}: {}; recovered in {:.2} s [{}]",
            f.name,
            f.effect,
            f.recovery.as_secs_f64(),
            if f.ok { "ok" } else { "FAILED" }
        );
        ok &= f.ok;
    }

    ok &= check_invariants(
        http,
        db,
        dir,
        replicas,
        record,
        starts,
        &answers,
        &paused,
        &failed_vms,
    )
    .await?;
    Ok(ok)
}

/// A VM in the database: hostname, state, resume, email, CRD command.
type VmRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

#[allow(clippy::too_many_arguments)]
async fn check_invariants(
    http: &Client,
    db: &common::Database,
    dir: &Path,
    replicas: &Replicas,
    record: &Record,
    starts: &Path,
    answers: &[Answer],
    paused: &Mutex<Option<Pause>>,
    failed_vms: &Mutex<Vec<String>>,
) -> Result<bool, Error> {
    println!("\n  invariants:");
    let mut ok = true;
    let mut check = |name: &str, good: bool, detail: String| {
        println!(
            "  - {name}: {detail} [{}]",
            if good { "ok" } else { "FAILED" }
        );
        ok &= good;
    };
    let mut conn = db.connect().await?;
    let rows: Vec<VmRow> = sqlx::query_as(
        "SELECT hostname, state, resume, email, crd_command FROM lablink_vms ORDER BY hostname",
    )
    .fetch_all(&mut conn)
    .await?;

    // No VM with two owners (over the whole run, as the participants saw it).
    let two = record.two_owners.load(Ordering::Relaxed);
    check(
        "no VM with two owners",
        two == 0,
        format!(
            "{} answers; {two} answered a VM another participant held",
            answers.len()
        ),
    );

    // No email with two VMs (in the database).
    let mut by_email: HashMap<&str, usize> = HashMap::new();
    for (_, _, _, email, _) in &rows {
        if let Some(e) = email {
            *by_email.entry(e.as_str()).or_default() += 1;
        }
    }
    let doubled = by_email.values().filter(|n| **n > 1).count();
    check(
        "no email with two VMs",
        doubled == 0,
        format!(
            "{} emails hold a VM in the database; {doubled} hold more than one",
            by_email.len()
        ),
    );

    // No lost assignment: the database holds exactly what the participants hold.
    let holding = record.holding.lock().unwrap().clone();
    let db_assigned: HashMap<&str, (&str, &str)> = rows
        .iter()
        .filter_map(|(h, _, _, email, cmd)| {
            Some((
                email.as_deref()?,
                (h.as_str(), cmd.as_deref().unwrap_or("")),
            ))
        })
        .collect();
    let lost = holding
        .iter()
        .filter(|(email, (h, code))| {
            db_assigned
                .get(email.as_str())
                .is_none_or(|(dh, stored)| dh != h || stored != code)
        })
        .count();
    let unknown = db_assigned
        .keys()
        .filter(|email| !holding.contains_key(**email))
        .count();
    check(
        "no lost assignment (database)",
        lost == 0 && unknown == 0,
        format!(
            "{} participants hold a VM at the end; {lost} of them not so in the database; {unknown} assignments in the database nobody was answered",
            holding.len()
        ),
    );

    // The API of each replica says the same.
    for base in &replicas.bases {
        let vms: Vec<Value> = http
            .get(format!("{base}/api/v1/vms"))
            .basic_auth("admin", Some(PASSWORD))
            .send()
            .await?
            .json()
            .await?;
        let api: HashMap<String, String> = vms
            .iter()
            .filter_map(|vm| {
                Some((
                    vm["assigned_to"].as_str()?.to_owned(),
                    vm["hostname"].as_str()?.to_owned(),
                ))
            })
            .collect();
        let differ = holding
            .iter()
            .filter(|(email, (h, _))| api.get(email.as_str()) != Some(h))
            .count()
            + api.keys().filter(|e| !holding.contains_key(*e)).count();
        check(
            &format!("no lost assignment (API of {base})"),
            differ == 0,
            format!(
                "{} VMs assigned; {differ} differ from what participants hold",
                api.len()
            ),
        );
    }

    // Every agent that was assigned saw it: simulated agents recorded the code, real ones ran
    // start-host with it.
    let mut seen: HashMap<String, String> = record
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(code, (h, _))| (code.clone(), h.clone()))
        .collect();
    let started = std::fs::read_to_string(starts).unwrap_or_default();
    let mut real_runs = 0;
    for line in started.lines() {
        let arg = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_owned)
        };
        if let (Some(code), Some(name)) = (arg("--code="), arg("--name=")) {
            real_runs += 1;
            seen.insert(code, name);
        }
    }
    let paused = paused.lock().unwrap().clone();
    let released = record.released.lock().unwrap().clone();
    let mut missed = 0;
    let mut excused = 0;
    for a in answers {
        if seen.get(&a.code) == Some(&a.hostname) {
            continue;
        }
        // Assigned to the paused agent before its lease ran out, and released before the
        // agent could look again (it resumes at SIGCONT and re-checks within RECHECK s):
        // nobody can see that. An assignment it could have seen is not excused.
        let unseeable = paused.as_ref().is_some_and(|p| {
            p.hostname == a.hostname
                && a.at >= p.stopped
                && p.unhealthy.is_some_and(|u| a.sent < u)
                && released
                    .get(&a.code)
                    .is_some_and(|r| *r <= p.resumed + Duration::from_secs(RECHECK))
        });
        if unseeable {
            excused += 1;
            continue;
        }
        missed += 1;
        if missed <= 5 {
            println!("    not seen by its agent: {} code {}", a.hostname, a.code);
        }
    }
    check(
        "every assigned agent saw its assignment",
        missed == 0,
        format!(
            "{} assignments; {real_runs} start-host runs by real agents; {missed} never seen{}",
            answers.len(),
            if excused > 0 {
                format!(" ({excused} to the paused agent before its lease ran out, released before it resumed)")
            } else {
                String::new()
            }
        ),
    );

    // The paused agent's VM was offered to nobody while it was unhealthy: no request sent
    // after the generator saw it unhealthy and answered before SIGCONT named it.
    match &paused {
        Some(Pause {
            hostname,
            unhealthy: Some(unhealthy),
            resumed,
            ..
        }) => {
            let offered = answers
                .iter()
                .filter(|a| &a.hostname == hostname && a.sent >= *unhealthy && a.at <= *resumed)
                .count();
            check(
                "the paused agent's VM was offered to nobody while unhealthy",
                offered == 0,
                format!(
                    "unhealthy for {:.1} s before SIGCONT; {offered} answers named {hostname} meanwhile",
                    (*resumed - *unhealthy).as_secs_f64()
                ),
            );
        }
        _ => check(
            "the paused agent's VM was offered to nobody while unhealthy",
            false,
            "the pause fault did not run or its VM never became unhealthy".into(),
        ),
    }

    // No orphaned VM: every machine in the cloud has a live record, and every live record a
    // machine.
    let machines: HashSet<String> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    let live =
        |state: &str| !matches!(state, "failed" | "terminated" | "terminating" | "requested");
    let recorded: HashSet<&str> = rows
        .iter()
        .filter(|(_, state, _, _, _)| live(state))
        .map(|(h, _, _, _, _)| h.as_str())
        .collect();
    let orphans = machines
        .iter()
        .filter(|m| !recorded.contains(m.as_str()))
        .count();
    let lost_machines = recorded.iter().filter(|h| !machines.contains(**h)).count();
    check(
        "no orphaned VM in the provisioner's inventory",
        orphans == 0 && lost_machines == 0,
        format!(
            "{} machines, {} live records; {orphans} machines without a record, {lost_machines} records without a machine",
            machines.len(),
            recorded.len()
        ),
    );

    // VMs whose launch failed were never handed out.
    let failed_vms = failed_vms.lock().unwrap().clone();
    let handed = answers
        .iter()
        .filter(|a| failed_vms.contains(&a.hostname))
        .count();
    check(
        "no failed VM assigned",
        handed == 0,
        format!(
            "{} failed VMs; {handed} answers named one",
            failed_vms.len()
        ),
    );
    let states: BTreeMap<String, usize> = rows.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(match &r.2 {
            Some(resume) => format!("{}({resume})", r.1),
            None => r.1.clone(),
        })
        .or_default() += 1;
        m
    });
    println!("  VM states at the end: {states:?}");
    Ok(ok)
}
