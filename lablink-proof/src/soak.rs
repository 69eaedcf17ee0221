//! The soak: two replicas of the real server on one database and one fake "cloud", real and
//! simulated agents, participants arriving, holding, releasing and asking again, while the
//! faults (`faults`) are injected; then the invariants (`invariants`) are checked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::header::ACCEPT;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

#[allow(unused_imports)]
use crate::*;

/// An assignment a participant was answered with.
#[derive(Clone)]
pub struct Answer {
    pub hostname: String,
    pub code: String,
    /// When the request that was answered was sent (its last attempt).
    pub sent: Instant,
    /// When the answer arrived.
    pub at: Instant,
}

/// What everyone in the soak records.
#[derive(Default)]
pub struct Record {
    /// Every assignment a participant was answered with.
    pub answers: Mutex<Vec<Answer>>,
    /// When the release of an assignment (by code) was answered.
    pub released: Mutex<HashMap<String, Instant>>,
    /// Who holds which VM right now, as the participants see it.
    pub holders: Mutex<HashMap<String, String>>,
    /// What each participant holds at the end: email → (hostname, code).
    pub holding: Mutex<BTreeMap<String, (String, String)>>,
    /// Assignments simulated agents saw: code → (hostname, when).
    pub seen: Mutex<HashMap<String, (String, Instant)>>,
    /// A VM answered to a participant while another participant held it.
    pub two_owners: AtomicUsize,
    /// Latencies of the attempts answered with a VM (from that attempt's send).
    pub latencies: Mutex<Vec<Duration>>,
    /// Time to a VM from the participant's first ask, failed attempts and retries included.
    pub waits: Mutex<Vec<Duration>>,
    /// When a participant's call failed (transport error or 5xx).
    pub participant_errors: Mutex<Vec<Instant>>,
    /// When an agent's call failed (transport error or 5xx).
    pub agent_errors: Mutex<Vec<Instant>>,
    /// "No VM free" answers.
    pub no_vm: AtomicU64,
    /// Repeats refused because the browser could not show it got the email's VM (its
    /// answer was lost); the organisers released the VM.
    pub unproven: AtomicU64,
    /// Releases done.
    pub releases: AtomicU64,
    /// Requests sent, in total.
    pub requests: AtomicU64,
}

pub fn count_in(list: &Mutex<Vec<Instant>>, from: Instant, to: Instant) -> usize {
    list.lock()
        .unwrap()
        .iter()
        .filter(|t| **t >= from && **t <= to)
        .count()
}

/// A round-robin over the replicas' base URLs.
pub struct Replicas {
    pub bases: Vec<String>,
    pub next: AtomicUsize,
}

impl Replicas {
    pub fn pick(&self) -> &str {
        &self.bases[self.next.fetch_add(1, Ordering::Relaxed) % self.bases.len()]
    }
}

/// An agent the generator runs for a machine of the fake cloud.
pub enum Agent {
    Real(Child),
    Simulated(Arc<AtomicBool>),
}

/// The fake cloud's machines: the generator boots an agent for each machine file that
/// appears in the inventory directory and stops it when the file goes.
pub struct Cloud {
    pub dir: PathBuf,
    pub agent_bin: PathBuf,
    pub recorder: PathBuf,
    pub real_wanted: usize,
    pub heartbeat: u64,
    pub agents: Mutex<HashMap<String, Agent>>,
    pub real_started: AtomicUsize,
    pub log_dir: PathBuf,
}

impl Cloud {
    /// One pass: boot agents for new machines, stop those of vanished ones.
    pub fn sync(&self, http: &Client, replicas: &Arc<Replicas>, record: &Arc<Record>) {
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

    pub fn spawn_real(&self, hostname: &str, base: &str) -> std::io::Result<Child> {
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
    pub fn real_pid(&self, hostname: &str) -> Option<u32> {
        match self.agents.lock().unwrap().get(hostname) {
            Some(Agent::Real(child)) => Some(child.id()),
            _ => None,
        }
    }

    pub fn real_hostnames(&self) -> Vec<String> {
        self.agents
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, a)| matches!(a, Agent::Real(_)))
            .map(|(h, _)| h.clone())
            .collect()
    }

    pub fn stop_all(&self) {
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

pub fn stop_agent(agent: &mut Agent) {
    match agent {
        Agent::Real(child) => {
            let _ = child.kill();
            let _ = child.wait();
        }
        Agent::Simulated(stop) => stop.store(true, Ordering::Relaxed),
    }
}

/// Whether a call's outcome is a server-side failure (no answer or 5xx).
pub fn failed<T>(r: &Result<reqwest::Response, T>) -> bool {
    match r {
        Ok(r) => r.status().is_server_error(),
        Err(_) => true,
    }
}

/// A lightweight agent: reports ready, heartbeats, long-polls for its assignment and
/// records what it saw. Every call goes to the next replica; failures back off.
pub async fn simulated_agent(
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
pub async fn participant(
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
            if let Some(c) = crate::participant_cookie(&r) {
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
pub fn jitter(lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rand::thread_rng().gen_range(lo..hi))
}

/// An admin API call to some replica, retried on failures (counted) for at most 60 s; the
/// first answer that is not a failure, if any.
pub async fn admin_call(
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
pub async fn release(http: &Client, replicas: &Replicas, record: &Record, hostname: &str) -> bool {
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
pub async fn release_email(http: &Client, replicas: &Replicas, record: &Record, email: &str) {
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

pub async fn soak(http: &Client, profile: &Profile) -> Result<bool, Error> {
    println!(
        "\n== soak: {} simulated + {} real agents, {} participants, {} s, two replicas ==",
        profile.sim_agents,
        profile.real_agents,
        profile.participants,
        profile.soak.as_secs()
    );
    let db = crate::create_database("lablink_proof_soak").await?;
    let tmp = tempfile::tempdir()?;
    let result = soak_on(http, profile, &db, tmp.path()).await;
    db.drop_database().await?;
    result
}

pub async fn soak_on(
    http: &Client,
    profile: &Profile,
    db: &crate::Database,
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
/// directory this program was built in.
pub fn agent_binary() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os("PROOF_AGENT_BIN") {
        return Ok(path.into());
    }
    let path = crate::in_target_dir("lablink-agent")?;
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
pub async fn soak_run(
    http: &Client,
    profile: &Profile,
    db: &crate::Database,
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
