//! [`LocalProcessProvisioner`]: "VMs" that are agent processes on this machine. The embedded
//! default of the allocator server, so a demo needs no cloud: launch starts one agent per VM
//! with its own hostname and token, destroy stops it, reboot restarts it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lablink_core::{
    AgentToken, Capabilities, Error, ErrorKind, Hostname, InstanceId, LaunchRequest, ProvisionedVm,
    Provisioner, Result,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

/// How long a stopped agent gets to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(5);

/// The only variables agents inherit from this process.
const INHERITED: [&str; 8] = [
    "PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR", "RUST_LOG",
];

/// Runs each VM as a local process of `program` (normally `lablink-agent`), with the
/// environment a real VM's agent gets: `ALLOCATOR_URL`, `VM_NAME`, `API_TOKEN`, plus a fresh
/// `LABLINK_BOOT_ID` per start (so a reboot is seen as one) and any extra variables. Of this
/// process's environment only `PATH`, `HOME`, `USER`, `LANG`, `LC_ALL`, `TZ`, `TMPDIR` and
/// `RUST_LOG` are passed on: the rest configures the server and may hold its secrets.
///
/// Processes are killed when the provisioner is dropped; [`shutdown`](Self::shutdown) stops
/// them gracefully. `list` reports the processes still running: an agent that exited is a VM
/// that is gone. Machines of an earlier server process are not inherited (they died with it).
#[derive(Clone)]
pub struct LocalProcessProvisioner {
    inner: Arc<Inner>,
}

struct Inner {
    settings: LocalProcessBuilder,
    machines: Mutex<BTreeMap<Hostname, Machine>>,
}

struct Machine {
    instance_id: InstanceId,
    token: AgentToken,
    child: Child,
}

impl fmt::Debug for LocalProcessProvisioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalProcessProvisioner")
            .field("program", &self.inner.settings.program)
            .field("allocator_url", &self.inner.settings.allocator_url)
            .finish_non_exhaustive()
    }
}

/// `[provisioner] kind = "local"` of the allocator's configuration (the embedded default):
/// VMs as agent processes on the allocator's machine.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalConfig {
    /// The agent program (none: this program, run as `<program> agent`).
    pub agent_program: Option<PathBuf>,
    /// What the agents run to start a desktop: `dry-run` (log only) or a `start-host` path.
    pub start_host: String,
    /// Each agent's output goes to `<log_dir>/<hostname>.log` (none: discarded).
    pub log_dir: Option<PathBuf>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            agent_program: None,
            start_host: "dry-run".into(),
            log_dir: None,
        }
    }
}

impl LocalConfig {
    /// The provisioner, its agents calling `allocator_url` (the log directory is created
    /// when missing).
    pub fn build(&self, allocator_url: impl Into<String>) -> Result<LocalProcessProvisioner> {
        let url = allocator_url.into();
        let mut builder = match &self.agent_program {
            Some(program) => LocalProcessProvisioner::builder(program, url),
            None => {
                let me = std::env::current_exe().map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidConfig,
                        format!("cannot find this program: {e}"),
                    )
                })?;
                LocalProcessProvisioner::builder(me, url).arg("agent")
            }
        };
        builder = builder.env("LABLINK_START_HOST", &self.start_host);
        if let Some(dir) = &self.log_dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::new(
                    ErrorKind::InvalidConfig,
                    format!(
                        "cannot create the agents' log directory {}: {e}",
                        dir.display()
                    ),
                )
            })?;
            builder = builder.log_dir(dir);
        }
        Ok(builder.build())
    }

    /// Every problem with these settings, one message each (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        if self.start_host.trim().is_empty() {
            vec!["[provisioner] start_host must be dry-run or a start-host path".into()]
        } else {
            Vec::new()
        }
    }
}

/// Builds a [`LocalProcessProvisioner`].
#[derive(Debug)]
pub struct LocalProcessBuilder {
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    allocator_url: String,
    log_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
}

impl LocalProcessBuilder {
    /// Passes `arg` to every agent process (before nothing else: agents take no arguments).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Sets an environment variable of every agent process (e.g. `LABLINK_START_HOST`).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Appends each agent's stdout and stderr to `<dir>/<hostname>.log` (default: discarded).
    pub fn log_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.log_dir = Some(dir.into());
        self
    }

    /// Gives each agent `<dir>/<hostname>` as its `LABLINK_STATE_DIR`, so a rebooted agent
    /// remembers its handled assignment and how far its logs were shipped (default: none).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// The provisioner.
    pub fn build(self) -> LocalProcessProvisioner {
        LocalProcessProvisioner {
            inner: Arc::new(Inner {
                settings: self,
                machines: Mutex::default(),
            }),
        }
    }
}

impl LocalProcessProvisioner {
    /// Agents run `program`, and talk to the allocator at `allocator_url`.
    pub fn builder(
        program: impl Into<PathBuf>,
        allocator_url: impl Into<String>,
    ) -> LocalProcessBuilder {
        LocalProcessBuilder {
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
            allocator_url: allocator_url.into(),
            log_dir: None,
            state_dir: None,
        }
    }

    /// Stops every agent (SIGTERM, then SIGKILL after a grace period).
    pub async fn shutdown(&self) {
        let machines = std::mem::take(&mut *self.inner.machines.lock().await);
        futures::future::join_all(machines.into_values().map(|m| stop(m.child))).await;
    }

    fn spawn(&self, hostname: &Hostname, token: &AgentToken) -> std::io::Result<Child> {
        let inner = &self.inner.settings;
        let (stdout, stderr) = match &inner.log_dir {
            Some(dir) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(format!("{hostname}.log")))?;
                (Stdio::from(file.try_clone()?), Stdio::from(file))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let mut command = Command::new(&inner.program);
        // The server's environment (database URL, cloud credentials, its own `LABLINK_*`
        // settings) is not the agents': they get a short allowlist and what was configured.
        command.env_clear();
        for key in INHERITED {
            if let Some(value) = std::env::var_os(key) {
                command.env(key, value);
            }
        }
        if let Some(dir) = &inner.state_dir {
            command.env("LABLINK_STATE_DIR", dir.join(hostname.as_str()));
        }
        command
            .args(&inner.args)
            .envs(inner.envs.iter().map(|(k, v)| (k, v)))
            .env("ALLOCATOR_URL", &inner.allocator_url)
            .env("VM_NAME", hostname.as_str())
            .env("API_TOKEN", token.expose())
            .env("LABLINK_BOOT_ID", uuid::Uuid::new_v4().to_string())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
    }

    fn spawn_error(&self, e: &std::io::Error) -> Error {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                ErrorKind::InvalidConfig
            }
            _ => ErrorKind::Provider,
        };
        Error::new(
            kind,
            format!(
                "cannot start the agent program {}: {e}",
                self.inner.settings.program.display()
            ),
        )
        .with_operation("launch")
    }
}

fn provisioned(hostname: &Hostname, m: &Machine) -> ProvisionedVm {
    ProvisionedVm {
        hostname: hostname.clone(),
        instance_id: m.instance_id.clone(),
        address: Some("127.0.0.1".into()),
        // A process on this machine: no instance type, no price.
        instance_type: None,
    }
}

/// SIGTERM, a grace period, then SIGKILL; always reaps the process.
async fn stop(mut child: Child) {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        if tokio::time::timeout(GRACE, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

#[async_trait]
impl Provisioner for LocalProcessProvisioner {
    fn capabilities(&self) -> Capabilities {
        // Everything: reboot, a real inventory, batches of any size.
        Capabilities::default()
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<ProvisionedVm>> {
        let mut machines = self.inner.machines.lock().await;
        let mut created = Vec::with_capacity(request.vms.len());
        let mut first_error = None;
        for spec in &request.vms {
            // A machine of this name that still runs is kept (never duplicated); one whose
            // agent exited is gone, and started anew.
            if let Some(m) = machines.get_mut(&spec.hostname) {
                if matches!(m.child.try_wait(), Ok(None)) {
                    created.push(provisioned(&spec.hostname, m));
                    continue;
                }
                machines.remove(&spec.hostname);
            }
            match self.spawn(&spec.hostname, &spec.token) {
                Ok(child) => {
                    let instance_id: InstanceId =
                        format!("local-{}", uuid::Uuid::new_v4().simple())
                            .parse()
                            .expect("a local instance id is valid");
                    let m = Machine {
                        instance_id,
                        token: spec.token.clone(),
                        child,
                    };
                    request
                        .progress
                        .report(&format!("started agent {}", spec.hostname));
                    created.push(provisioned(&spec.hostname, &m));
                    machines.insert(spec.hostname.clone(), m);
                }
                Err(e) => {
                    let error = self.spawn_error(&e);
                    request.progress.report(error.message());
                    tracing::warn!(hostname = %spec.hostname, error = %error, "agent did not start");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) if created.is_empty() => Err(error),
            _ => Ok(created),
        }
    }

    async fn destroy(&self, vms: &[ProvisionedVm]) -> Result<()> {
        let doomed: Vec<Machine> = {
            let mut machines = self.inner.machines.lock().await;
            let mut doomed = Vec::new();
            for vm in vms {
                let ours = machines
                    .get(&vm.hostname)
                    .is_some_and(|m| m.instance_id == vm.instance_id);
                doomed.extend(ours.then(|| machines.remove(&vm.hostname)).flatten());
            }
            doomed
        };
        futures::future::join_all(doomed.into_iter().map(|m| stop(m.child))).await;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ProvisionedVm>> {
        let mut machines = self.inner.machines.lock().await;
        machines.retain(|hostname, m| match m.child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                tracing::warn!(%hostname, %status, "local agent exited");
                false
            }
            Err(_) => false,
        });
        Ok(machines.iter().map(|(h, m)| provisioned(h, m)).collect())
    }

    async fn reboot(&self, vm: &ProvisionedVm) -> Result<()> {
        let mut machines = self.inner.machines.lock().await;
        let known = machines
            .get(&vm.hostname)
            .is_some_and(|m| m.instance_id == vm.instance_id);
        let Some(m) = known.then(|| machines.remove(&vm.hostname)).flatten() else {
            return Err(Error::not_found(format!("no local agent {}", vm.hostname))
                .with_operation("reboot"));
        };
        // Stop, then start, as a real reboot does: two agents of one VM never overlap. The
        // lock is held meanwhile, so `list` never misses the machine.
        stop(m.child).await;
        let child = self
            .spawn(&vm.hostname, &m.token)
            .map_err(|e| self.spawn_error(&e).with_operation("reboot"))?;
        machines.insert(vm.hostname.clone(), Machine { child, ..m });
        Ok(())
    }
}
