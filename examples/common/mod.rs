//! Shared by the `load` and `proof` examples: the allocator server as a child process, the
//! participant's request, the W1/W2/W3 workloads, a throwaway database and the machine facts.
//! (A directory without `main.rs`, so cargo does not take it for an example.)

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use reqwest::header::ACCEPT;
use reqwest::Client;
use serde_json::{json, Value};

/// Any error of a run.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Participant `i`'s request: `i`, how long it took and the VM (hostname, PIN) it got.
pub type Timed = (usize, Duration, Result<Granted, Error>);

/// The admin password every server of a run is given.
pub const PASSWORD: &str = "load-generator-password";

/// The generator's HTTP client: many idle connections per host, a 120 s bound on every
/// request (the W2 waiters set their own), and no proxy, so an `HTTP_PROXY` in the
/// environment cannot send the load off loopback.
pub fn client() -> Result<Client, Error> {
    Ok(Client::builder()
        .pool_max_idle_per_host(20_000)
        .timeout(Duration::from_secs(120))
        .no_proxy()
        .build()?)
}

/// A self-signed certificate for 127.0.0.1 (ECDSA P-256, made at run time) and its key, as
/// PEM files in a temporary directory with a configuration file naming them: a server
/// started with [`Server::start_https`] serves HTTPS with it, and clients of
/// [`client_trusting`] trust it.
pub struct SelfSigned {
    dir: tempfile::TempDir,
    der: Vec<u8>,
}

impl SelfSigned {
    /// Makes the certificate and writes `cert.pem`, `key.pem` and `tls.toml`.
    pub fn generate() -> Result<Self, Error> {
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])?;
        let dir = tempfile::tempdir()?;
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, made.cert.pem())?;
        std::fs::write(&key, made.key_pair.serialize_pem())?;
        // A file (named by LABLINK_CONFIG); LABLINK_SERVER__TLS__CERT_FILE and
        // LABLINK_SERVER__TLS__KEY_FILE would set `[server.tls]` as well.
        let config = format!("[server.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n");
        std::fs::write(dir.path().join("tls.toml"), config)?;
        Ok(Self {
            dir,
            der: made.cert.der().to_vec(),
        })
    }
}

/// A client with the settings of [`client`] that also trusts `tls`'s certificate and never
/// resumes a TLS session (every new connection is a full handshake, as from a separate
/// browser). With `pooled: false` it keeps no idle connection, so every request opens a
/// new one. Each new connection (plain or TLS) counts one in `connects`.
pub fn client_trusting(
    tls: &SelfSigned,
    pooled: bool,
    connects: &Arc<AtomicUsize>,
) -> Result<Client, Error> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(tls.der.clone().into())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    let connects = connects.clone();
    Ok(Client::builder()
        .pool_max_idle_per_host(if pooled { 20_000 } else { 0 })
        .timeout(Duration::from_secs(120))
        .no_proxy()
        .use_preconfigured_tls(config)
        .connector_layer(tower::util::MapRequestLayer::new(move |target| {
            connects.fetch_add(1, Ordering::Relaxed);
            target
        }))
        .build()?)
}

/// Prints whether a measured figure met its target. Targets are reported, not enforced:
/// on a shared machine a slow run is noise, not a defect (correctness checks do fail).
pub fn verdict(target: &str, measured: &str, met: bool) {
    println!(
        "  target {target}: {measured}, {}",
        if met { "target met" } else { "target MISSED" }
    );
}

/// The `server` example as a child process, killed on drop. It can be killed with SIGKILL
/// and started again on the same port with the same settings.
pub struct Server {
    child: Child,
    port: u16,
    env: Vec<(String, String)>,
    log: Option<std::path::PathBuf>,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts the server (next to this executable) in agent-auth `open` mode with the fake
    /// provisioner and the in-memory store, plus `env`.
    pub async fn start_with(http: &Client, env: &[(&str, &str)]) -> Result<Self, Error> {
        Self::start_logged(http, env, None).await
    }

    /// Like [`start_with`](Self::start_with), appending the server's standard error to `log`
    /// (instead of this process's).
    pub async fn start_logged(
        http: &Client,
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Result<Self, Error> {
        Self::start_scheme(http, env, log, "http").await
    }

    /// Like [`start_with`](Self::start_with) with no other settings, serving HTTPS with
    /// `tls`'s certificate (`http` must trust it: [`client_trusting`]).
    pub async fn start_https(http: &Client, tls: &SelfSigned) -> Result<Self, Error> {
        let config = tls.dir.path().join("tls.toml").display().to_string();
        Self::start_scheme(http, &[("LABLINK_CONFIG", &config)], None, "https").await
    }

    async fn start_scheme(
        http: &Client,
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
        scheme: &str,
    ) -> Result<Self, Error> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let log = log.map(std::path::Path::to_path_buf);
        let mut server = Self {
            child: spawn_server(port, &env, log.as_deref())?,
            port,
            env,
            log,
            base: format!("{scheme}://127.0.0.1:{port}"),
        };
        server.wait_up(http).await?;
        Ok(server)
    }

    /// Waits (at most 30 s) until `/healthz` answers.
    pub async fn wait_up(&mut self, http: &Client) -> Result<(), Error> {
        for _ in 0..600 {
            if http.get(self.url("/healthz")).send().await.is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("the server exited: {status}").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the server did not come up within 30 s".into())
    }

    /// SIGKILL, as a crash: no graceful shutdown.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the process again (same port and settings) after [`kill9`](Self::kill9).
    pub fn respawn(&mut self) -> Result<(), Error> {
        self.child = spawn_server(self.port, &self.env, self.log.as_deref())?;
        Ok(())
    }

    /// The base URL, `http://127.0.0.1:<port>`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The process's resident memory.
    pub fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    }

    /// CPU time the server process has used so far (user + system), seconds.
    pub fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.child.id())
    }

    /// Launches `n` VMs (admin API) and returns their hostnames once the launch finished.
    pub async fn launch(&self, http: &Client, n: usize) -> Result<Vec<String>, Error> {
        let op: Value = http
            .post(self.url("/api/v1/launch"))
            .basic_auth("admin", Some(PASSWORD))
            .json(&json!({"count": n}))
            .send()
            .await?
            .json()
            .await?;
        let id = op["id"]
            .as_str()
            .ok_or_else(|| format!("launch failed: {op}"))?
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let op: Value = http
                .get(self.url(&format!("/api/v1/operations/{id}")))
                .basic_auth("admin", Some(PASSWORD))
                .send()
                .await?
                .json()
                .await?;
            if op["status"] != "running" {
                return Ok(serde_json::from_value(op["hostnames"].clone())?);
            }
            if Instant::now() > deadline {
                return Err("a launch took over 300 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Launches `n` VMs and reports each `running`, so all are assignable.
    pub async fn ready_vms(&self, http: &Client, n: usize) -> Result<Vec<String>, Error> {
        let hostnames = self.launch(http, n).await?;
        let failed = stream::iter(hostnames.clone())
            .map(|h| {
                let req = http
                    .post(self.url("/api/vm-status"))
                    .json(&json!({"hostname": h, "status": "running"}));
                async move { req.send().await.map(|r| r.status().is_success()) }
            })
            .buffer_unordered(64)
            .filter(|ok| std::future::ready(!matches!(ok, Ok(true))))
            .count()
            .await;
        if failed > 0 {
            return Err(format!("{failed} VMs could not report running").into());
        }
        Ok(hostnames)
    }

    /// `POST /api/request_vm` for participant `i` (with its cookie, when it asks again).
    pub async fn request_vm(
        &self,
        http: &Client,
        i: usize,
        cookie: Option<&str>,
    ) -> Result<Granted, Error> {
        request_vm(
            http,
            self.base(),
            &format!("p{i}@load.test"),
            &format!("4/load-{i}"),
            cookie,
        )
        .await
    }
}

fn spawn_server(
    port: u16,
    env: &[(String, String)],
    log: Option<&std::path::Path>,
) -> Result<Child, Error> {
    // The `lablink` program of the same profile: target/<profile>/lablink beside examples/.
    let exe = std::env::current_exe()?;
    let server = exe
        .parent()
        .and_then(std::path::Path::parent)
        .map(|d| d.join("lablink"))
        .ok_or("no target directory")?;
    let mut command = Command::new(&server);
    // Only the settings below: an inherited LABLINK_* variable (scripts/with-postgres.sh
    // exports LABLINK_PG_BIN, for instance) would be an unknown setting to the server.
    for (key, _) in std::env::vars() {
        if key.starts_with("LABLINK_") {
            command.env_remove(key);
        }
    }
    command
        .env("LABLINK_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("LABLINK_AGENTS__AUTH", "open")
        .env("LABLINK_ADMIN__PASSWORD", PASSWORD)
        .env("LABLINK_ALLOCATOR__MAX_LAUNCH", "20000")
        .env("LABLINK_ALLOCATOR__MAX_WAIT", "600")
        // Every simulated participant comes from 127.0.0.1.
        .env("LABLINK_PARTICIPANTS__REQUESTS_BURST", "1000000")
        .env("LABLINK_PROVISIONER__KIND", "fake")
        .env("LABLINK_PROVISIONER__LATENCY_SECONDS", "0")
        .env("LABLINK_LOG__FILTER", "error")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null());
    if let Some(log) = log {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        command.stderr(file);
    }
    command.spawn().map_err(|e| {
        format!(
            "cannot start {}: {e} (build it with cargo build --bin lablink)",
            server.display()
        )
        .into()
    })
}

/// A participant's VM: hostname, PIN, and the participant cookie its browser keeps.
#[derive(Debug, Clone)]
pub struct Granted {
    pub hostname: String,
    pub pin: String,
    /// `name=value` of the participant cookie (sent back on a repeat for the same email).
    pub cookie: Option<String>,
}

/// `POST /api/request_vm` as the participant page's script does, with the participant
/// cookie of an earlier answer if there is one.
pub async fn request_vm(
    http: &Client,
    base: &str,
    email: &str,
    code: &str,
    cookie: Option<&str>,
) -> Result<Granted, Error> {
    let mut request = http
        .post(format!("{base}/api/request_vm"))
        .header(ACCEPT, "application/json")
        .form(&[
            ("email", email.to_owned()),
            ("crd_command", format!("start-host --code={code}")),
        ]);
    if let Some(cookie) = cookie {
        request = request.header(reqwest::header::COOKIE, cookie);
    }
    let response = request.send().await?;
    let cookie = participant_cookie(&response);
    let body: Value = response.json().await?;
    match (body["hostname"].as_str(), body["pin"].as_str()) {
        (Some(h), Some(p)) => Ok(Granted {
            hostname: h.to_owned(),
            pin: p.to_owned(),
            cookie,
        }),
        _ => Err(format!("no VM: {body}").into()),
    }
}

/// The `name=value` of the participant cookie a response sets, if any.
pub fn participant_cookie(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("lablink_participant="))
        .and_then(|v| v.split(';').next())
        .map(str::to_owned)
}

/// The `p`-quantile of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Milliseconds, two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// What a W1 run measured.
#[derive(Debug)]
pub struct W1 {
    /// Requests per second.
    pub throughput: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

/// W1: `n` ready VMs, then `n` concurrent participants, spread round-robin over `servers`
/// (replicas on one database); afterwards every participant must hold a distinct VM, none
/// may be free, and a participant asking again must get its own VM back.
pub async fn w1_on(http: &Client, servers: &[&Server], n: usize, what: &str) -> Result<W1, Error> {
    servers[0].ready_vms(http, n).await?;
    w1_burst(http, servers, n, what).await
}

/// W1 without its set-up: the burst and its checks, once `n` VMs are ready.
pub async fn w1_burst(
    http: &Client,
    servers: &[&Server],
    n: usize,
    what: &str,
) -> Result<W1, Error> {
    let start = Instant::now();
    let mut results: Vec<Timed> = stream::iter(0..n)
        .map(|i| async move {
            let t = Instant::now();
            let r = servers[i % servers.len()].request_vm(http, i, None).await;
            (i, t.elapsed(), r)
        })
        .buffer_unordered(n)
        .collect()
        .await;
    let wall = start.elapsed();
    results.sort_by_key(|(i, _, _)| *i);
    let mut latencies: Vec<Duration> = results.iter().map(|(_, d, _)| *d).collect();
    latencies.sort();
    let hostnames: HashSet<String> = results
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().ok().map(|g| g.hostname.clone()))
        .collect();
    let failures = results.iter().filter(|(_, _, r)| r.is_err()).count();
    let mut free = Vec::new();
    for s in servers {
        let count: Value = http
            .get(s.url("/api/unassigned_vms_count"))
            .send()
            .await?
            .json()
            .await?;
        free.push(count["count"].as_u64());
    }
    // One participant asks again, through the last server: it must get its own VM back.
    let repeat = 7.min(n - 1);
    let first = results[repeat].2.as_ref().ok();
    let own = first.map(|g| g.hostname.clone());
    let cookie = first.and_then(|g| g.cookie.as_deref());
    let again = servers[servers.len() - 1]
        .request_vm(http, repeat, cookie)
        .await?
        .hostname;
    let rejoined = own.as_deref() == Some(again.as_str());
    let result = W1 {
        throughput: n as f64 / wall.as_secs_f64(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
    };
    println!("W1 assignment burst ({what}): {n} concurrent POST /api/request_vm");
    println!(
        "  wall {:.3} s, throughput {:.0} req/s, p50 {}, p99 {}, max {}",
        wall.as_secs_f64(),
        result.throughput,
        ms(result.p50),
        ms(result.p99),
        ms(percentile(&latencies, 1.0))
    );
    println!(
        "  correctness: {} ok, {failures} failed, {} distinct VMs, free as seen by each server {free:?}, participant {repeat} asked again and got {again} (its own: {})",
        n - failures,
        hostnames.len(),
        own.as_deref().unwrap_or("none"),
    );
    if failures != 0 || hostnames.len() != n || free.iter().any(|f| *f != Some(0)) {
        return Err("W1 correctness: not every participant got a distinct VM".into());
    }
    if !rejoined {
        return Err(format!(
            "W1 correctness: participant {repeat} asked again and got {again}, not its own VM"
        )
        .into());
    }
    Ok(result)
}

/// What a W2 run measured.
#[derive(Debug)]
pub struct W2 {
    /// Assignment → waiter's answer, 99th percentile.
    pub p99: Duration,
    /// Server RSS with every waiter held, MiB.
    pub rss_held_mib: f64,
}

/// W2: `n` agents hold `/vm_startup`, then all are assigned: assignment→response latency
/// and server RSS. The server runs with `env` (none: the in-memory store), described as
/// `what`.
pub async fn w2(http: &Client, n: usize, env: &[(&str, &str)], what: &str) -> Result<W2, Error> {
    let server = Server::start_with(http, env).await?;
    let hostnames = server.ready_vms(http, n).await?;
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
    let deadline = Instant::now() + Duration::from_secs(300);
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
        if held >= n {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("W2: only {held} of {n} waiters held after 300 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_held = server.rss_mib();
    let assigned_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let start = Instant::now();
    let unserved = stream::iter(0..n)
        .map(|i| {
            let (server, assigned_at) = (&server, assigned_at.clone());
            async move {
                match server.request_vm(http, i, None).await {
                    Ok(granted) => {
                        assigned_at
                            .lock()
                            .unwrap()
                            .insert(granted.hostname, Instant::now());
                        0
                    }
                    Err(_) => 1,
                }
            }
        })
        .buffer_unordered(256)
        .fold(0, |a, b| async move { a + b })
        .await;
    let assign_wall = start.elapsed();
    let mut latencies = Vec::with_capacity(n);
    let mut failed = 0;
    for w in waiters {
        let (h, at, ok) = w.await?;
        failed += usize::from(!ok);
        if let Some(assigned) = assigned_at.lock().unwrap().get(&h) {
            latencies.push(at.saturating_duration_since(*assigned));
        }
    }
    latencies.sort();
    println!(
        "W2 {n} waiters on /vm_startup, then all assigned (256 participants at a time; {what})"
    );
    println!("  server RSS: {rss_idle:.1} MiB with {n} ready VMs, {rss_held:.1} MiB with {n} waiters held ({:.1} KiB per waiter)", (rss_held - rss_idle) * 1024.0 / n as f64);
    println!("  assigning all took {:.3} s; assignment→response p50 {}, p99 {}, max {}; {failed} waiters failed, {unserved} participants unserved", assign_wall.as_secs_f64(), ms(percentile(&latencies, 0.5)), ms(percentile(&latencies, 0.99)), ms(percentile(&latencies, 1.0)));
    if failed != 0 || unserved != 0 {
        return Err("W2: not every waiter got its assignment".into());
    }
    Ok(W2 {
        p99: percentile(&latencies, 0.99),
        rss_held_mib: rss_held,
    })
}

/// W3: telemetry posts at full rate for `seconds` over 64 keep-alive connections, each
/// connection rotating over `/api/update_inuse_status`, `/api/gpu_health` and
/// `/api/vm-status`; returns the requests per second.
pub async fn w3(http: &Client, seconds: u64) -> Result<f64, Error> {
    const VMS: usize = 64;
    let server = Server::start_with(http, &[]).await?;
    let hostnames = Arc::new(server.ready_vms(http, VMS).await?);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let tasks: Vec<_> = (0..VMS)
        .map(|i| {
            let (http, in_use, gpu, status, h) = (
                http.clone(),
                server.url("/api/update_inuse_status"),
                server.url("/api/gpu_health"),
                server.url("/api/vm-status"),
                hostnames[i].clone(),
            );
            tokio::spawn(async move {
                let (mut ok, mut bad, mut n) = (0u64, 0u64, 0u64);
                while Instant::now() < deadline {
                    n += 1;
                    let req = match n % 3 {
                        0 => http
                            .post(&in_use)
                            .json(&json!({"hostname": h, "status": n % 2 == 0})),
                        1 => http
                            .post(&gpu)
                            .json(&json!({"hostname": h, "gpu_status": "Healthy"})),
                        _ => http
                            .post(&status)
                            .json(&json!({"hostname": h, "status": "running"})),
                    };
                    let r = req.send().await;
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
    let rate = ok as f64 / wall;
    println!(
        "W3 telemetry posts (in-use, GPU health, VM status in turn) for {seconds} s over {VMS} keep-alive connections (in-memory store)"
    );
    println!(
        "  {ok} ok, {bad} failed: {rate:.0} req/s; server RSS {:.1} MiB",
        server.rss_mib()
    );
    if bad != 0 {
        return Err(format!("W3: {bad} telemetry posts failed").into());
    }
    Ok(rate)
}

/// A fresh database on the PostgreSQL server of `DATABASE_URL`, dropped by [`drop_database`].
pub struct Database {
    /// Connect options of the server's default database.
    pub admin: sqlx::postgres::PgConnectOptions,
    /// The new database's name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

/// Creates a database `<prefix>_<pid>` next to `DATABASE_URL`'s.
pub async fn create_database(prefix: &str) -> Result<Database, Error> {
    use sqlx::{ConnectOptions, Executor};
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "DATABASE_URL is not set (run under scripts/with-postgres.sh)")?;
    let admin: sqlx::postgres::PgConnectOptions = url.parse()?;
    let name = format!("{prefix}_{}", std::process::id());
    let mut conn = admin.connect().await?;
    conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    let url = url
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{name}"))
        .ok_or("DATABASE_URL has no database part")?;
    Ok(Database { admin, name, url })
}

impl Database {
    /// A connection to this database.
    pub async fn connect(&self) -> Result<sqlx::PgConnection, Error> {
        use sqlx::ConnectOptions;
        Ok(self.admin.clone().database(&self.name).connect().await?)
    }

    /// Drops the database (closing its connections).
    pub async fn drop_database(&self) -> Result<(), Error> {
        use sqlx::{ConnectOptions, Executor};
        let mut conn = self.admin.connect().await?;
        conn.execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
            .await?;
        Ok(())
    }
}

/// CPU time (user + system) process `pid` has used so far, seconds, in clock ticks of 10 ms.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name in parentheses: the state (field 3), ... utime and stime
    // (fields 14 and 15), in USER_HZ (100 on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or_else(Vec::new, |(_, rest)| rest.split_whitespace().collect());
    match (fields.get(11), fields.get(12)) {
        (Some(user), Some(system)) => {
            let ticks = |v: &str| v.parse::<f64>().unwrap_or(f64::NAN);
            (ticks(user) + ticks(system)) / 100.0
        }
        _ => f64::NAN,
    }
}

/// Connections the kernel refused because a listen queue was full (`TcpExt:
/// ListenOverflows`; counts every program of this network namespace). Each costs its
/// client a SYN retried after 1 s (then 3 s, 7 s...).
pub fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut tcp_ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (tcp_ext.next(), tcp_ext.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// `machine: 2 CPUs (model), 23.4 GiB RAM`.
pub fn machine() -> String {
    format!(
        "machine: {} CPUs ({}), {:.1} GiB RAM",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        mem_gib()
    )
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
