//! [`FakeProvisioner`]: an in-memory provider with configurable latency and a seeded failure
//! rate, for tests, benchmarks and demos.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{
    Capabilities, Error, ErrorKind, Hostname, LaunchRequest, ProvisionedVm, Provisioner, Result,
};

/// An in-memory [`Provisioner`]. `Clone` shares the inventory.
///
/// Each launch waits `latency` (on tokio's clock, so paused-time tests do not wait), then
/// each VM fails independently with probability `failure_rate` (a seeded RNG makes runs
/// reproducible). Failed VMs are missing from the result; when all fail, `launch` returns a
/// temporary [`ErrorKind::NoCapacity`] error.
#[derive(Debug, Clone)]
pub struct FakeProvisioner {
    latency: Duration,
    failure_rate: f64,
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
        let mut inner = self.lock();
        for vm in vms {
            inner.machines.remove(&vm.hostname);
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ProvisionedVm>> {
        self.wait().await;
        Ok(self.lock().machines.values().cloned().collect())
    }

    async fn reboot(&self, vm: &ProvisionedVm) -> Result<()> {
        self.wait().await;
        let mut inner = self.lock();
        if !inner.machines.contains_key(&vm.hostname) {
            return Err(Error::not_found("no such machine")
                .with_operation("fake reboot")
                .with_context("hostname", &vm.hostname));
        }
        *inner.reboots.entry(vm.hostname.clone()).or_default() += 1;
        Ok(())
    }
}
