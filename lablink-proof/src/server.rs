//! The allocator server as a child process (the real `lablink` program, killed with
//! SIGKILL and started again on the same port), its HTTPS variant, and a participant's
//! request.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use reqwest::header::ACCEPT;
use reqwest::Client;
use serde_json::{json, Value};

use crate::process_cpu_seconds;

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
#[derive(Debug)]
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

/// The `lablink` program as a child process, killed on drop. It can be killed with SIGKILL
/// and started again on the same port with the same settings.
#[derive(Debug)]
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
    // The `lablink` program of the same profile: target/<profile>/lablink, unless
    // LABLINK_LOAD_PROGRAM names another (an older build, to compare).
    let server = match std::env::var_os("LABLINK_LOAD_PROGRAM") {
        Some(program) => program.into(),
        None => in_target_dir("lablink")?,
    };
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

/// `name` in the target directory this program was built in, `target/<profile>/`: beside
/// it (the `proof` binary) or one level up (an example, in `target/<profile>/examples/`).
/// The first that exists; else where it should be.
pub fn in_target_dir(name: &str) -> Result<std::path::PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or("no target directory")?;
    let candidates = [Some(dir), dir.parent()];
    if let Some(found) = candidates
        .iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.exists())
    {
        return Ok(found);
    }
    let profile_dir = if dir.file_name().is_some_and(|n| n == "examples") {
        dir.parent().ok_or("no target directory")?
    } else {
        dir
    };
    Ok(profile_dir.join(name))
}
