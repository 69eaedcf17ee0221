//! [`FakeProvisioner`]: an in-memory provider with configurable latency and a seeded failure
//! rate, for tests, benchmarks and demos.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{
    Capabilities, Error, ErrorKind, Hostname, LaunchRequest, ProvisionedVm, Provisioner, Result,
};

/// The instance type every fake machine reports (a price table can name it).
pub const FAKE_INSTANCE_TYPE: &str = "fake";

/// `[provisioner] kind = "fake"` of the allocator's configuration: a [`FakeProvisioner`]'s
/// settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FakeConfig {
    /// How long each call waits, seconds.
    pub latency_seconds: f64,
    /// Probability that one VM of a launch fails (0..=1).
    pub failure_rate: f64,
    /// Machines kept as files in this directory, shared by every process using it (see
    /// [`FakeProvisioner::with_inventory_dir`]); none: in memory.
    pub inventory_dir: Option<PathBuf>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            latency_seconds: 0.5,
            failure_rate: 0.0,
            inventory_dir: None,
        }
    }
}

impl FakeConfig {
    /// The provisioner (the inventory directory is created when missing).
    pub fn build(&self) -> Result<FakeProvisioner> {
        let mut fake = FakeProvisioner::new()
            .with_latency(Duration::from_secs_f64(
                self.latency_seconds.clamp(0.0, 3600.0),
            ))
            .with_failure_rate(self.failure_rate);
        if let Some(dir) = &self.inventory_dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::new(
                    ErrorKind::InvalidConfig,
                    format!(
                        "cannot create the inventory directory {}: {e}",
                        dir.display()
                    ),
                )
            })?;
            fake = fake.with_inventory_dir(dir);
        }
        Ok(fake)
    }

    /// Every problem with these settings, one message each (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(0.0..=1.0).contains(&self.failure_rate) {
            problems.push("[provisioner] failure_rate must be between 0 and 1".into());
        }
        if !(0.0..=3600.0).contains(&self.latency_seconds) {
            problems.push("[provisioner] latency_seconds must be between 0 and 3600".into());
        }
        problems
    }
}

/// An in-memory [`Provisioner`]. `Clone` shares the inventory.
///
/// Each launch waits `latency` (on tokio's clock, so paused-time tests do not wait), then
/// each VM fails independently with probability `failure_rate` (a seeded RNG makes runs
/// reproducible). Failed VMs are missing from the result; when all fail, `launch` returns a
/// temporary [`ErrorKind::NoCapacity`] error.
///
/// With an [inventory directory](Self::with_inventory_dir) the machines are files there
/// instead, so several allocator processes (replicas) share one "cloud" that outlives them.
#[derive(Debug, Clone)]
pub struct FakeProvisioner {
    latency: Duration,
    failure_rate: f64,
    dir: Option<PathBuf>,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    rng: StdRng,
    next_id: u64,
    machines: BTreeMap<Hostname, ProvisionedVm>,
    reboots: BTreeMap<Hostname, u32>,
    launch_calls: u64,
}

impl Default for FakeProvisioner {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeProvisioner {
    /// No latency, no failures, seed 0.
    pub fn new() -> Self {
        Self {
            latency: Duration::ZERO,
            failure_rate: 0.0,
            dir: None,
            inner: Arc::new(Mutex::new(Inner {
                rng: StdRng::seed_from_u64(0),
                next_id: 1,
                machines: BTreeMap::new(),
                reboots: BTreeMap::new(),
                launch_calls: 0,
            })),
        }
    }

    /// Each call waits this long.
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Each VM of a launch fails with this probability (clamped to 0..=1).
    pub fn with_failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = rate.clamp(0.0, 1.0);
        self
    }

    /// Keeps the machines as files in `dir` (one file per hostname, holding its instance id
    /// and address) instead of in memory: every provisioner on the same directory, in any
    /// process, sees the same inventory, and it survives the process (a testing aid for
    /// replica and crash runs). While a file [`FAILURE_RATE_FILE`] exists in `dir`, the rate
    /// it holds (a number in 0..=1) replaces [`with_failure_rate`](Self::with_failure_rate)'s,
    /// so a test can inject launch failures into running processes.
    pub fn with_inventory_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Seeds the failure RNG.
    pub fn with_seed(self, seed: u64) -> Self {
        self.lock().rng = StdRng::seed_from_u64(seed);
        self
    }

    /// How many times `reboot` was called for `hostname`.
    pub fn reboots(&self, hostname: &Hostname) -> u32 {
        self.lock().reboots.get(hostname).copied().unwrap_or(0)
    }

    /// How many times `launch` was called.
    pub fn launch_calls(&self) -> u64 {
        self.lock().launch_calls
    }

    /// Adds a machine the store does not know (an orphan from a crashed launch).
    pub fn insert_orphan(&self, hostname: Hostname) -> ProvisionedVm {
        let mut inner = self.lock();
        let vm = inner.new_vm(hostname);
        inner.machines.insert(vm.hostname.clone(), vm.clone());
        vm
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn wait(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

/// In an [inventory directory](FakeProvisioner::with_inventory_dir): the file whose number
/// overrides the failure rate while it exists.
pub const FAILURE_RATE_FILE: &str = ".failure-rate";

fn io_error(operation: &'static str, path: &Path, e: std::io::Error) -> Error {
    Error::new(ErrorKind::Unavailable, format!("fake inventory: {e}"))
        .with_operation(operation)
        .with_context("path", path.display())
        .temporary()
}

/// The machine recorded in `path` (`instance_id address`), if the file exists.
fn read_machine(dir: &Path, hostname: &Hostname) -> Result<Option<ProvisionedVm>> {
    let path = dir.join(hostname.as_str());
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("fake inventory read", &path, e)),
    };
    let mut words = text.split_whitespace();
    let instance_id = words.next().and_then(|w| w.parse().ok()).ok_or_else(|| {
        io_error(
            "fake inventory read",
            &path,
            std::io::ErrorKind::InvalidData.into(),
        )
    })?;
    Ok(Some(ProvisionedVm {
        hostname: hostname.clone(),
        instance_id,
        address: words.next().map(str::to_owned),
        instance_type: Some(FAKE_INSTANCE_TYPE.to_owned()),
    }))
}

impl FakeProvisioner {
    /// The failure rate now: the override file's, else the configured one.
    fn current_failure_rate(&self) -> f64 {
        self.dir
            .as_ref()
            .and_then(|dir| std::fs::read_to_string(dir.join(FAILURE_RATE_FILE)).ok())
            .and_then(|text| text.trim().parse::<f64>().ok())
            .map_or(self.failure_rate, |rate| rate.clamp(0.0, 1.0))
    }

    /// `launch` on an inventory directory: a machine is created by writing its file
    /// (atomically, by rename), so a crash leaves it either there or not.
    fn launch_in_dir(&self, dir: &Path, request: &LaunchRequest) -> Result<Vec<ProvisionedVm>> {
        let rate = self.current_failure_rate();
        let mut inner = self.lock();
        inner.launch_calls += 1;
        let mut created = Vec::with_capacity(request.vms.len());
        for spec in &request.vms {
            if let Some(existing) = read_machine(dir, &spec.hostname)? {
                created.push(existing);
                continue;
            }
            if rate > 0.0 && inner.rng.gen_bool(rate) {
                request
                    .progress
                    .report(&format!("{}: no capacity (injected)", spec.hostname));
                continue;
            }
            // Ids unique across processes sharing the directory: from the hostname.
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            spec.hostname.as_str().hash(&mut hasher);
            let id = hasher.finish() & 0xffff_ffff_ffff;
            let vm = ProvisionedVm {
                hostname: spec.hostname.clone(),
                instance_id: format!("i-fake{id:012x}")
                    .parse()
                    .expect("valid instance id"),
                address: Some(format!(
                    "10.{}.{}.{}",
                    (id >> 16) & 0xff,
                    (id >> 8) & 0xff,
                    id & 0xff
                )),
                instance_type: Some(FAKE_INSTANCE_TYPE.to_owned()),
            };
            let path = dir.join(spec.hostname.as_str());
            let tmp = dir.join(format!(".{}.{}", spec.hostname, std::process::id()));
            std::fs::write(
                &tmp,
                format!(
                    "{} {}\n",
                    vm.instance_id,
                    vm.address.as_deref().unwrap_or("")
                ),
            )
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| io_error("fake launch", &path, e))?;
            request
                .progress
                .report(&format!("{}: created {}", vm.hostname, vm.instance_id));
            created.push(vm);
        }
        Ok(created)
    }

    fn list_dir(dir: &Path) -> Result<Vec<ProvisionedVm>> {
        let entries = std::fs::read_dir(dir).map_err(|e| io_error("fake list", dir, e))?;
        let mut machines = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error("fake list", dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(hostname) = name.parse::<Hostname>() else {
                continue; // dot files: the failure-rate override, files being written
            };
            // Destroyed between the listing and the read: gone.
            if let Some(vm) = read_machine(dir, &hostname)? {
                machines.push(vm);
            }
        }
        machines.sort_by(|a, b| a.hostname.as_str().cmp(b.hostname.as_str()));
        Ok(machines)
    }
}

impl Inner {
    fn new_vm(&mut self, hostname: Hostname) -> ProvisionedVm {
        let id = self.next_id;
        self.next_id += 1;
        ProvisionedVm {
            hostname,
            instance_id: format!("i-fake{id:012x}")
                .parse()
                .expect("valid instance id"),
            address: Some(format!("10.0.{}.{}", (id >> 8) & 0xff, id & 0xff)),
            instance_type: Some(FAKE_INSTANCE_TYPE.to_owned()),
        }
    }
}

#[async_trait]
impl Provisioner for FakeProvisioner {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<ProvisionedVm>> {
        self.wait().await;
        let created = match &self.dir {
            Some(dir) => self.launch_in_dir(dir, request)?,
            None => self.launch_in_memory(request),
        };
        if created.is_empty() && !request.vms.is_empty() {
            return Err(Error::new(
                ErrorKind::NoCapacity,
                "the fake provider failed every VM of the launch",
            )
            .with_operation("fake launch")
            .temporary());
        }
        Ok(created)
    }

    async fn destroy(&self, vms: &[ProvisionedVm]) -> Result<()> {
        self.wait().await;
        if let Some(dir) = &self.dir {
            for vm in vms {
                let path = dir.join(vm.hostname.as_str());
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error("fake destroy", &path, e)),
                }
            }
            return Ok(());
        }
        let mut inner = self.lock();
        for vm in vms {
            inner.machines.remove(&vm.hostname);
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ProvisionedVm>> {
        self.wait().await;
        if let Some(dir) = &self.dir {
            return Self::list_dir(dir);
        }
        Ok(self.lock().machines.values().cloned().collect())
    }

    async fn reboot(&self, vm: &ProvisionedVm) -> Result<()> {
        self.wait().await;
        let exists = match &self.dir {
            Some(dir) => read_machine(dir, &vm.hostname)?.is_some(),
            None => self.lock().machines.contains_key(&vm.hostname),
        };
        if !exists {
            return Err(Error::not_found("no such machine")
                .with_operation("fake reboot")
                .with_context("hostname", &vm.hostname));
        }
        *self.lock().reboots.entry(vm.hostname.clone()).or_default() += 1;
        Ok(())
    }
}

impl FakeProvisioner {
    fn launch_in_memory(&self, request: &LaunchRequest) -> Vec<ProvisionedVm> {
        let mut inner = self.lock();
        inner.launch_calls += 1;
        let mut created = Vec::with_capacity(request.vms.len());
        for spec in &request.vms {
            if let Some(existing) = inner.machines.get(&spec.hostname) {
                created.push(existing.clone());
                continue;
            }
            if self.failure_rate > 0.0 && inner.rng.gen_bool(self.failure_rate) {
                request
                    .progress
                    .report(&format!("{}: no capacity (injected)", spec.hostname));
                continue;
            }
            let vm = inner.new_vm(spec.hostname.clone());
            request
                .progress
                .report(&format!("{}: created {}", vm.hostname, vm.instance_id));
            inner.machines.insert(vm.hostname.clone(), vm.clone());
            created.push(vm);
        }
        created
    }
}
