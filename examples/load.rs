//! HTTP load generator for the allocator (loopback only, bounded). It starts the `server`
//! example as a separate process (built next to this binary), in agent-auth `open` mode so
//! the load generator can act as the VMs, with the in-memory store and the fake provisioner.
//!
//! ```text
//! cargo build --release --example server --example load
//! target/release/examples/load            # all three workloads
//! target/release/examples/load w1 w3      # some of them
//!
//! # W1 with PostgreSQL behind the server (a fresh database on DATABASE_URL):
//! cargo build --release --features postgres --example server --example load
//! scripts/with-postgres.sh target/release/examples/load w1-pg
//! ```
//!
//! - W1: 1,000 concurrent `POST /api/request_vm` against 1,000 ready VMs: throughput,
//!   p50/p99, and correctness afterwards (every participant got a distinct VM, none free).
//! - W2: 10,000 agents hold `/vm_startup`, then all are assigned: assignment→response
//!   latency (from the participant's answer to the waiter's answer) and server RSS.
//! - W3: telemetry posts (`/api/update_inuse_status`, `/api/gpu_health`) at full rate for
//!   20 s over 64 keep-alive connections: requests per second.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use reqwest::header::ACCEPT;
use reqwest::Client;
use serde_json::{json, Value};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// One participant's request: how long it took and the VM (hostname, PIN) it got.
type Timed = (Duration, Result<(String, String), Error>);

const PASSWORD: &str = "load-generator-password";

/// The server process, killed on drop.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start(http: &Client) -> Result<Self, Error> {
        Self::start_with(http, &[]).await
    }

    /// Like [`start`](Self::start), with more environment for the server.
    async fn start_with(http: &Client, env: &[(&str, &str)]) -> Result<Self, Error> {
        let exe = std::env::current_exe()?;
        let server = exe.with_file_name("server");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = Command::new(&server);
        // Only the settings below: an inherited LABLINK_* variable (scripts/with-postgres.sh
        // exports LABLINK_PG_BIN, for instance) would be an unknown setting to the server.
        for (key, _) in std::env::vars() {
            if key.starts_with("LABLINK_") {
                command.env_remove(key);
            }
        }
        let child = command
            .env("LABLINK_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("LABLINK_SERVER__MAX_WAIT_SECONDS", "600")
            .env("LABLINK_AGENTS__AUTH", "open")
            .env("LABLINK_ADMIN__PASSWORD", PASSWORD)
            .env("LABLINK_ALLOCATOR__MAX_LAUNCH", "20000")
            .env("LABLINK_ALLOCATOR__MAX_WAIT", "600")
            .env("LABLINK_PROVISIONER__KIND", "fake")
            .env("LABLINK_PROVISIONER__FAKE_LATENCY_SECONDS", "0")
            .env("LABLINK_LOG__FILTER", "error")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {}: {e} (build it with --example server)",
                    server.display()
                )
            })?;
        let server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        for _ in 0..200 {
            if http.get(server.url("/healthz")).send().await.is_ok() {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the server did not come up".into())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    }

    /// Launches `n` VMs and reports each `running`, so all are assignable.
    async fn ready_vms(&self, http: &Client, n: usize) -> Result<Vec<String>, Error> {
        let op: Value = http
            .post(self.url("/api/v1/launch"))
            .basic_auth("admin", Some(PASSWORD))
            .json(&json!({"count": n}))
            .send()
            .await?
            .json()
            .await?;
        let id = op["id"].as_str().ok_or("launch failed")?.to_owned();
        let hostnames: Vec<String> = loop {
            let op: Value = http
                .get(self.url(&format!("/api/v1/operations/{id}")))
                .basic_auth("admin", Some(PASSWORD))
                .send()
                .await?
                .json()
                .await?;
            if op["status"] != "running" {
                break serde_json::from_value(op["hostnames"].clone())?;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        stream::iter(hostnames.clone())
            .map(|h| {
                let req = http
                    .post(self.url("/api/vm-status"))
                    .json(&json!({"hostname": h, "status": "running"}));
                async move { req.send().await.map(|r| r.status().is_success()) }
            })
            .buffer_unordered(64)
            .for_each(|ok| async move {
                assert!(matches!(ok, Ok(true)), "a VM could not report running")
            })
            .await;
        Ok(hostnames)
    }

    async fn request_vm(&self, http: &Client, i: usize) -> Result<(String, String), Error> {
        let body: Value = http
            .post(self.url("/api/request_vm"))
            .header(ACCEPT, "application/json")
            .form(&[
                ("email", format!("p{i}@load.test")),
                ("crd_command", format!("start-host --code=4/load-{i}")),
            ])
            .send()
            .await?
            .json()
            .await?;
        match (body["hostname"].as_str(), body["pin"].as_str()) {
            (Some(h), Some(p)) => Ok((h.to_owned(), p.to_owned())),
            _ => Err(format!("no VM: {body}").into()),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn w1(http: &Client) -> Result<(), Error> {
    let server = Server::start(http).await?;
    w1_on(http, &server, "in-memory store").await
}

/// W1 with PostgreSQL behind the server: a fresh database on `DATABASE_URL` (the server
/// example must be built with `--features postgres`); afterwards the database itself is
/// checked (1,000 VMs assigned, to 1,000 distinct emails).
async fn w1_pg(http: &Client) -> Result<(), Error> {
    use sqlx::postgres::PgConnectOptions;
    use sqlx::{ConnectOptions, Executor};
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "w1-pg needs DATABASE_URL (run under scripts/with-postgres.sh)")?;
    let admin: PgConnectOptions = url.parse()?;
    let db = format!("lablink_load_{}", std::process::id());
    let mut conn = admin.connect().await?;
    conn.execute(format!("CREATE DATABASE {db}").as_str())
        .await?;
    let db_url = url
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{db}"))
        .ok_or("DATABASE_URL has no database part")?;
    let result = async {
        let server = Server::start_with(
            http,
            &[
                ("LABLINK_DATABASE__URL", db_url.as_str()),
                ("LABLINK_DATABASE__MAX_CONNECTIONS", "20"),
            ],
        )
        .await?;
        w1_on(http, &server, "PostgreSQL store and notifier").await?;
        let mut check = admin.clone().database(&db).connect().await?;
        let (assigned, emails): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT email) FROM lablink_vms WHERE state = 'assigned'",
        )
        .fetch_one(&mut check)
        .await?;
        println!("  in PostgreSQL: {assigned} VMs assigned, to {emails} distinct emails");
        if (assigned, emails) != (1_000, 1_000) {
            return Err(Error::from("the database does not hold 1,000 distinct assignments (was the server built with --features postgres?)"));
        }
        Ok::<(), Error>(())
    }
    .await;
    conn.execute(format!("DROP DATABASE {db} WITH (FORCE)").as_str())
        .await?;
    result
}

async fn w1_on(http: &Client, server: &Server, store: &str) -> Result<(), Error> {
    const N: usize = 1_000;
    server.ready_vms(http, N).await?;
    let start = Instant::now();
    let results: Vec<Timed> = stream::iter(0..N)
        .map(|i| async move {
            let t = Instant::now();
            let r = server.request_vm(http, i).await;
            (t.elapsed(), r)
        })
        .buffer_unordered(N)
        .collect()
        .await;
    let wall = start.elapsed();
    let mut latencies: Vec<Duration> = results.iter().map(|(d, _)| *d).collect();
    latencies.sort();
    let hostnames: HashSet<String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(|(h, _)| h.clone()))
        .collect();
    let failures = results.iter().filter(|(_, r)| r.is_err()).count();
    let count: Value = http
        .get(server.url("/api/unassigned_vms_count"))
        .send()
        .await?
        .json()
        .await?;
    let again = server.request_vm(http, 7).await?;
    println!("W1 assignment burst ({store}): {N} concurrent POST /api/request_vm");
    println!(
        "  wall {:.3} s, throughput {:.0} req/s, p50 {}, p99 {}, max {}",
        wall.as_secs_f64(),
        N as f64 / wall.as_secs_f64(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&latencies, 1.0))
    );
    println!("  correctness: {} ok, {failures} failed, {} distinct VMs, {} still free, rejoin same VM: {}", N - failures, hostnames.len(), count["count"], hostnames.contains(&again.0));
    assert_eq!(
        (failures, hostnames.len(), count["count"].as_u64()),
        (0, N, Some(0)),
        "W1 correctness"
    );
    Ok(())
}

async fn w2(http: &Client) -> Result<(), Error> {
    const N: usize = 10_000;
    let server = Server::start(http).await?;
    let hostnames = server.ready_vms(http, N).await?;
    let rss_idle = server.rss_mib();
    let waiters: Vec<_> = hostnames
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let req = http
                .post(server.url("/vm_startup"))
                .json(&json!({"hostname": h}))
                .timeout(Duration::from_secs(900));
            let h = h.clone();
            tokio::spawn(async move {
                // Stagger connects so the listen backlog is not flooded.
                tokio::time::sleep(Duration::from_millis((i / 250) as u64 * 20)).await;
                let r = req.send().await;
                let at = Instant::now();
                let ok = match r {
                    Ok(r) if r.status().is_success() => r
                        .json::<Value>()
                        .await
                        .map(|b| b["status"] == "success")
                        .unwrap_or(false),
                    _ => false,
                };
                (h, at, ok)
            })
        })
        .collect();
    loop {
        let text = http
            .get(server.url("/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let held = text
            .lines()
            .find_map(|l| l.strip_prefix("lablink_waiters "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if held >= N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_held = server.rss_mib();
    let assigned_at: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> =
        Arc::default();
    let start = Instant::now();
    stream::iter(0..N)
        .map(|i| {
            let (server, assigned_at) = (&server, assigned_at.clone());
            async move {
                let (h, _) = server
                    .request_vm(http, i)
                    .await
                    .expect("a VM for every participant");
                assigned_at.lock().unwrap().insert(h, Instant::now());
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<()>>()
        .await;
    let assign_wall = start.elapsed();
    let mut latencies = Vec::with_capacity(N);
    let mut failed = 0;
    for w in waiters {
        let (h, at, ok) = w.await?;
        failed += usize::from(!ok);
        let assigned = assigned_at.lock().unwrap()[&h];
        latencies.push(at.saturating_duration_since(assigned));
    }
    latencies.sort();
    println!("W2 {N} waiters on /vm_startup, then all assigned (256 participants at a time)");
    println!("  server RSS: {rss_idle:.1} MiB with {N} ready VMs, {rss_held:.1} MiB with {N} waiters held ({:.1} KiB per waiter)", (rss_held - rss_idle) * 1024.0 / N as f64);
    println!("  assigning all took {:.3} s; assignment→response p50 {}, p99 {}, max {}; {failed} waiters failed", assign_wall.as_secs_f64(), ms(percentile(&latencies, 0.5)), ms(percentile(&latencies, 0.99)), ms(percentile(&latencies, 1.0)));
    assert_eq!(failed, 0, "W2: every waiter gets its assignment");
    Ok(())
}

async fn w3(http: &Client) -> Result<(), Error> {
    const VMS: usize = 64;
    const SECONDS: u64 = 20;
    let server = Server::start(http).await?;
    let hostnames = Arc::new(server.ready_vms(http, VMS).await?);
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let start = Instant::now();
    let tasks: Vec<_> = (0..VMS)
        .map(|i| {
            let (http, url_a, url_b, h) = (
                http.clone(),
                server.url("/api/update_inuse_status"),
                server.url("/api/gpu_health"),
                hostnames[i].clone(),
            );
            tokio::spawn(async move {
                let (mut ok, mut bad, mut n) = (0u64, 0u64, 0u64);
                while Instant::now() < deadline {
                    n += 1;
                    let r = if n % 2 == 0 {
                        http.post(&url_a)
                            .json(&json!({"hostname": h, "status": n % 4 == 0}))
                            .send()
                            .await
                    } else {
                        http.post(&url_b)
                            .json(&json!({"hostname": h, "gpu_status": "Healthy"}))
                            .send()
                            .await
                    };
                    match r {
                        Ok(r) if r.status().is_success() => ok += 1,
                        _ => bad += 1,
                    }
                }
                (ok, bad)
            })
        })
        .collect();
    let (mut ok, mut bad) = (0, 0);
    for t in tasks {
        let (o, b) = t.await?;
        ok += o;
        bad += b;
    }
    let wall = start.elapsed().as_secs_f64();
    println!(
        "W3 telemetry posts for {SECONDS} s over {VMS} keep-alive connections (in-memory store)"
    );
    println!(
        "  {ok} ok, {bad} failed: {:.0} req/s; server RSS {:.1} MiB",
        ok as f64 / wall,
        server.rss_mib()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = |w: &str| args.is_empty() || args.iter().any(|a| a == w);
    let http = Client::builder().pool_max_idle_per_host(20_000).build()?;
    println!(
        "machine: {} CPUs ({}), {:.1} GiB RAM",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        mem_gib()
    );
    if run("w1") {
        w1(&http).await?;
    }
    if args.iter().any(|a| a == "w1-pg") {
        w1_pg(&http).await?;
    }
    if run("w2") {
        w2(&http).await?;
    }
    if run("w3") {
        w3(&http).await?;
    }
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn mem_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0)
}
