//! [`Rig`]: the allocator's HTTP layer on 127.0.0.1 whose VMs are real agent processes
//! started by the `LocalProcessProvisioner`, with recording stand-ins for Chrome Remote
//! Desktop's `start-host` and for `nvidia-smi` ([`Workdir`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lablink::collect::Collector;
use lablink::http::HttpState;
use lablink::{Allocator, AllocatorExt, LabLink, LabLinkBuilder, LocalProcessProvisioner};
use reqwest::header::ACCEPT;
use reqwest::{Client, StatusCode};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{admin_options, ADMIN_PASSWORD, ADMIN_USER};

/// The agent program the local VMs run: `LABLINK_AGENT_BIN` if set, else this crate's
/// `testkit-agent` (the agent's own `main.rs`, which cargo builds for this crate's tests) or
/// a `lablink-agent`, in the target directory the running test or example was built in.
pub fn agent_program() -> PathBuf {
    if let Some(path) = std::env::var_os("LABLINK_AGENT_BIN") {
        return path.into();
    }
    // A test runs as target/<profile>/deps/<name>-<hash>, an example as
    // target/<profile>/examples/<name>: the binaries are in target/<profile>.
    let exe = std::env::current_exe().expect("the running executable");
    let dirs = exe.ancestors().skip(1).take(2);
    let candidates: Vec<PathBuf> = dirs
        .flat_map(|d| [d.join("testkit-agent"), d.join("lablink-agent")])
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no agent program in {candidates:?}: build it (cargo build -p lablink-testkit --bin testkit-agent) or set LABLINK_AGENT_BIN"
            )
        })
}

/// Writes an executable shell script.
pub fn script(path: &Path, body: &str) {
    let source = path.with_extension("source");
    std::fs::write(&source, format!("#!/bin/sh\n{body}\n")).unwrap();
    install_executable(&source, path);
}

/// Copies `source` to an executable `target` in a child process: a write descriptor held here
/// could leak into an agent another test forks meanwhile, and exec'ing `target` would then fail
/// with "Text file busy".
pub fn install_executable(source: &Path, target: &Path) {
    let status = std::process::Command::new("install")
        .arg("-m")
        .arg("0755")
        .arg(source)
        .arg(target)
        .status()
        .unwrap();
    assert!(status.success(), "install {} failed", target.display());
}

/// The agents' files: the recording `start-host`, the fake `nvidia-smi`, agent output.
#[derive(Debug)]
pub struct Workdir {
    pub dir: TempDir,
}

impl Default for Workdir {
    fn default() -> Self {
        Self::new()
    }
}

impl Workdir {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let w = Self { dir };
        // start-host records its arguments and stdin per VM, and counts its runs.
        script(
            &w.path("start-host"),
            r#"out="$RECORD_DIR/$VM_NAME"
printf '%s\n' "$@" > "$out.argv.tmp"
cat > "$out.stdin.tmp"
mv "$out.argv.tmp" "$out.argv"
mv "$out.stdin.tmp" "$out.stdin"
echo run >> "$out.runs""#,
        );
        // nvidia-smi exits with the code in gpu-<VM_NAME> (default 0).
        script(
            &w.path("nvidia-smi"),
            r#"code=$(cat "$RECORD_DIR/gpu-$VM_NAME" 2>/dev/null || echo 0)
exit "$code""#,
        );
        std::fs::create_dir(w.path("agents")).unwrap();
        w
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.path(name)).ok()
    }

    /// Fails if any agent's own output mentions one of `secrets`.
    pub fn assert_agent_output_lacks(&self, secrets: &[&str]) {
        for entry in std::fs::read_dir(self.path("agents")).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            for secret in secrets {
                assert!(
                    !text.contains(secret),
                    "{} mentions a secret",
                    path.display()
                );
            }
        }
    }

    /// The environment of a real agent of this workdir: the fake `nvidia-smi` found on
    /// `PATH` (as the real one is), the recording `start-host`, fast intervals.
    pub fn agent_env(&self) -> Vec<(&'static str, String)> {
        let path = format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let dir = self.dir.path().display().to_string();
        let start_host = self.path("start-host").display().to_string();
        [
            ("PATH", path.as_str()),
            ("RECORD_DIR", dir.as_str()),
            ("LABLINK_START_HOST", start_host.as_str()),
            ("LABLINK_GPU_INTERVAL_SECS", "0.5"),
            ("LABLINK_INUSE_INTERVAL_SECS", "0.5"),
            ("LABLINK_HEARTBEAT_SECS", "2"),
            ("LABLINK_WAIT_SECS", "5"),
            ("LABLINK_RECHECK_SECS", "0.5"),
            ("LABLINK_BACKOFF_MAX_SECS", "1"),
            ("LABLINK_LOG_POLL_SECS", "0.2"),
            ("RUST_LOG", "lablink_agent=debug,info"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect()
    }

    /// A local provisioner of real agents talking to `url`, fast intervals, plus `extra`.
    pub fn provisioner(&self, url: &str, extra: &[(&str, &str)]) -> LocalProcessProvisioner {
        let mut b = LocalProcessProvisioner::builder(agent_program(), url)
            .log_dir(self.path("agents"))
            .state_dir(self.path("state"));
        for (k, v) in self.agent_env() {
            b = b.env(k, v);
        }
        for (k, v) in extra {
            b = b.env(k, v);
        }
        b.build()
    }
}

/// A server on a fixed loopback address, which can be stopped and started again.
/// The server runs on a runtime of its own, so [`kill`](Rig::kill) can drop it the way a
/// killed process disappears: every connection reset, no request answered.
#[derive(Debug)]
pub struct Rig {
    pub addr: SocketAddr,
    /// The allocator (to start its supervisor); the same as `allocator`.
    pub lablink: LabLink,
    pub allocator: Arc<dyn Allocator>,
    pub state: HttpState,
    pub client: Client,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Rig {
    /// Serves `builder` (with `provisioner`) at `addr`.
    pub async fn start(
        addr: SocketAddr,
        builder: LabLinkBuilder,
        provisioner: &LocalProcessProvisioner,
    ) -> Self {
        Self::start_with_collector(addr, builder, provisioner, Arc::default()).await
    }

    /// Like [`start`](Self::start), collecting participants' work with `collector`.
    pub async fn start_with_collector(
        addr: SocketAddr,
        builder: LabLinkBuilder,
        provisioner: &LocalProcessProvisioner,
        collector: Arc<Collector>,
    ) -> Self {
        // The supervisor collects before its own destroys, as the server sets it up.
        let lablink = builder
            .with_provisioner(Arc::new(provisioner.clone()))
            .with_before_destroy(collector.clone())
            .build()
            .unwrap();
        let allocator: Arc<dyn Allocator> = Arc::new(lablink.clone());
        let mut rig = Self {
            addr,
            lablink,
            state: HttpState::with_collector(allocator.clone(), admin_options(), collector),
            allocator,
            client: Client::builder().pool_max_idle_per_host(0).build().unwrap(),
            runtime: None,
            stop: None,
            task: None,
        };
        rig.serve().await;
        rig
    }

    async fn serve(&mut self) {
        // The port was just released by an earlier server of this test: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot bind {}: {e}", self.addr),
            }
        };
        listener.set_nonblocking(true).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = oneshot::channel();
        let state = self.state.clone();
        self.task = Some(runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            state
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        }));
        self.runtime = Some(runtime);
        self.stop = Some(tx);
    }

    /// Kills the server: its runtime is dropped with every task and connection in it, as a
    /// killed process would be; held requests get no answer.
    pub async fn kill(&mut self) {
        self.task = None;
        self.stop = None;
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Stops the server gracefully (held requests are answered "ask again").
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Serves again at the same address, with the same allocator.
    pub async fn restart(&mut self) {
        self.serve().await;
    }

    /// Serves again at the same address with the same allocator but a new HTTP state and
    /// `collector`, as a restarted server process would (everything the collector knows
    /// must come from its artifact store).
    pub async fn restart_with_collector(&mut self, collector: Arc<Collector>) {
        self.lablink.set_before_destroy(Some(collector.clone()));
        self.state = HttpState::with_collector(self.allocator.clone(), admin_options(), collector);
        self.serve().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Launches `n` VMs and waits for the operation.
    pub async fn launch(&self, n: usize) -> Vec<String> {
        let op = self
            .allocator
            .launch_and_wait(n, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(op.hostnames.len(), n, "{op:?}");
        op.hostnames.iter().map(ToString::to_string).collect()
    }

    /// `GET path` as the admin (HTTP Basic, JSON); the body, after checking the 200.
    pub async fn admin_get(&self, path: &str) -> Value {
        let r = self
            .client
            .get(self.url(path))
            .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
            .header(ACCEPT, "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r.json().await.unwrap()
    }

    /// The admin's view of every VM (`GET /api/v1/vms`).
    pub async fn vms(&self) -> Vec<Value> {
        self.admin_get("/api/v1/vms")
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    /// The admin's view of one VM's logs (`GET /api/v1/vms/<h>/logs`).
    pub async fn logs(&self, hostname: &str) -> Value {
        self.admin_get(&format!("/api/v1/vms/{hostname}/logs"))
            .await
    }

    /// Requests a VM as a participant; `(status, body)`.
    pub async fn request_vm(&self, email: &str, command: &str) -> (StatusCode, Value) {
        let r = self
            .client
            .post(self.url("/api/request_vm"))
            .header(ACCEPT, "application/json")
            .form(&[("email", email), ("crd_command", command)])
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Waits until every VM of the admin view satisfies `ready`, or panics naming `what`.
    pub async fn wait_for_vms(
        &self,
        what: &str,
        n: usize,
        ready: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let vms = self.vms().await;
            if vms.len() == n && vms.iter().all(&ready) {
                return vms;
            }
            if Instant::now() > deadline {
                let pending: Vec<_> = vms.iter().filter(|vm| !ready(vm)).collect();
                panic!(
                    "timed out waiting for {what}; {} VMs, not ready: {pending:#?}",
                    vms.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The pid and `API_TOKEN` of the running agent process of `hostname` that talks to
/// `allocator_url` (read from `/proc/<pid>/environ`). Only a process running the
/// [`agent_program`] counts: the agent's children (a VNC server it started, which may
/// outlive a killed agent) inherit its environment.
pub fn agent_process(hostname: &str, allocator_url: &str) -> Option<(u32, String)> {
    let want_vm = format!("VM_NAME={hostname}");
    let want_url = format!("ALLOCATOR_URL={allocator_url}");
    let program = std::fs::canonicalize(agent_program()).ok()?;
    for entry in std::fs::read_dir("/proc").ok()? {
        let entry = entry.ok()?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<String> = environ
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        let runs_agent = std::fs::read_link(entry.path().join("exe")).is_ok_and(|exe| {
            // A program rebuilt while it runs shows as "<path> (deleted)".
            let exe = exe.to_string_lossy();
            Path::new(exe.trim_end_matches(" (deleted)")) == program
        });
        if runs_agent && vars.contains(&want_vm) && vars.contains(&want_url) {
            let token = vars
                .iter()
                .find_map(|v| v.strip_prefix("API_TOKEN="))
                .unwrap_or_default()
                .to_owned();
            return Some((pid, token));
        }
    }
    None
}
