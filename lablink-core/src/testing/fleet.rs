//! Simulated agents and a scripted workshop, for supervisor tests and the supervision
//! benchmark. Everything runs on tokio's clock, so under `tokio::time::pause()` an hour of
//! workshop takes a moment.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::store::{command, email};
use crate::{
    AgentStatus, Allocator, ErrorKind, Hostname, LabLink, Telemetry, VmFilter, VmRequest, VmState,
};

/// How an agent misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Silent until its VM is rebooted, then back (with a new boot id).
    UntilReboot,
    /// Silent for good.
    Dead,
}

#[derive(Debug, Default)]
struct FleetState {
    faults: HashMap<Hostname, Fault>,
    boots: HashMap<Hostname, u32>,
    /// Rebooting VMs seen, with when their reboot started (their state change).
    reboot_seen: HashSet<(Hostname, i64)>,
}

/// The agents of every VM of one allocator: each comes up `boot_time` after its machine was
/// provisioned (or its reboot started), reports `running`, and heartbeats every
/// `heartbeat` with its boot id. Dropping the fleet stops every agent.
#[derive(Debug)]
pub struct Fleet {
    state: Arc<Mutex<FleetState>>,
    task: JoinHandle<()>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fleet {
    /// Starts the agents of `lablink`'s VMs.
    pub fn start(lablink: &LabLink, boot_time: Duration, heartbeat: Duration) -> Self {
        let state = Arc::new(Mutex::new(FleetState::default()));
        let task = tokio::spawn(agents(lablink.clone(), state.clone(), boot_time, heartbeat));
        Self { state, task }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FleetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `hostname`'s agent fall silent.
    pub fn fail(&self, hostname: &Hostname, fault: Fault) {
        self.lock().faults.insert(hostname.clone(), fault);
    }

    /// Brings `hostname`'s agent back (same boot).
    pub fn heal(&self, hostname: &Hostname) {
        self.lock().faults.remove(hostname);
    }

    /// Restarts `hostname`'s agent: its next heartbeat carries a new boot id.
    pub fn restart(&self, hostname: &Hostname) {
        *self.lock().boots.entry(hostname.clone()).or_default() += 1;
    }
}

async fn agents(
    lablink: LabLink,
    state: Arc<Mutex<FleetState>>,
    boot_time: Duration,
    heartbeat: Duration,
) {
    let boot = chrono::Duration::from_std(boot_time).unwrap_or_default();
    let step = Duration::from_secs(1).min(heartbeat);
    let mut last_beat: HashMap<Hostname, chrono::DateTime<chrono::Utc>> = HashMap::new();
    loop {
        let now = lablink.clock().now();
        let records = lablink.vms(&VmFilter::default()).await.unwrap_or_default();
        for r in records {
            let report = {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                if let VmState::Rebooting { .. } = r.state {
                    let key = (r.hostname.clone(), r.state_changed_at.timestamp_millis());
                    if s.reboot_seen.insert(key) {
                        *s.boots.entry(r.hostname.clone()).or_default() += 1;
                        if s.faults.get(&r.hostname) == Some(&Fault::UntilReboot) {
                            s.faults.remove(&r.hostname);
                        }
                    }
                }
                let up_since = match r.state {
                    VmState::Booting => r.timings.provision_end.unwrap_or(r.state_changed_at),
                    VmState::Rebooting { .. } => r.state_changed_at,
                    VmState::Available | VmState::Assigned | VmState::Unhealthy { .. } => {
                        r.state_changed_at - boot
                    }
                    _ => continue,
                };
                let silent = s.faults.contains_key(&r.hostname);
                let due = last_beat.get(&r.hostname).is_none_or(|t| {
                    now - *t >= chrono::Duration::from_std(heartbeat).unwrap_or_default()
                });
                (!silent && now - up_since >= boot && due)
                    .then(|| s.boots.get(&r.hostname).copied().unwrap_or(0))
            };
            let Some(boot_no) = report else { continue };
            let telemetry = Telemetry {
                status: Some(AgentStatus::Running),
                heartbeat: Some(format!("boot-{boot_no}")),
                ..Default::default()
            };
            if lablink.report(&r.hostname, telemetry).await.is_ok() {
                last_beat.insert(r.hostname.clone(), now);
            }
        }
        tokio::time::sleep(step).await;
    }
}

/// A scripted workshop: `participants` arrive evenly over `arrivals`, each asks for a VM
/// (again every `retry` while none is free) and keeps it.
#[derive(Debug, Clone)]
pub struct Workshop {
    /// How long after the start of the run the first participant arrives.
    pub delay: Duration,
    /// How many people come.
    pub participants: usize,
    /// Over how long they arrive.
    pub arrivals: Duration,
    /// How often a participant without a VM asks again.
    pub retry: Duration,
    /// How long the run is measured (from its start, not from the first arrival).
    pub horizon: Duration,
    /// Launch VMs on demand (no pool): whenever more participants wait than VMs are on
    /// their way, launch the difference.
    pub launch_on_demand: bool,
}

/// What a [`Workshop`] measured.
#[derive(Debug, Clone, Default)]
pub struct WorkshopOutcome {
    /// Each participant's wait from arrival to VM, in arrival order (`None`: never got one).
    pub waits: Vec<Option<Duration>>,
    /// Free VM time (booting or available, unassigned), in VM-hours.
    pub idle_vm_hours: f64,
    /// All VM time (anything not failed or gone), in VM-hours.
    pub vm_hours: f64,
    /// VMs alive at the end.
    pub vms_at_end: usize,
    /// Free VMs at the end.
    pub free_at_end: usize,
}

impl WorkshopOutcome {
    /// The `q` quantile (0–1) of the waits of those who got a VM, in seconds.
    pub fn wait_quantile(&self, q: f64) -> f64 {
        let mut w: Vec<f64> = self
            .waits
            .iter()
            .flatten()
            .map(Duration::as_secs_f64)
            .collect();
        if w.is_empty() {
            return f64::NAN;
        }
        w.sort_by(f64::total_cmp);
        let i = ((w.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        w[i]
    }

    /// The longest wait, in seconds.
    pub fn max_wait(&self) -> f64 {
        self.wait_quantile(1.0)
    }
}

impl Workshop {
    /// Runs the workshop against `lablink` (whose supervisor, if any, runs on its own).
    /// Samples the fleet every second of tokio time.
    pub async fn run(&self, lablink: &LabLink) -> WorkshopOutcome {
        let start = tokio::time::Instant::now();
        let gap = self.arrivals / self.participants.max(1) as u32;
        let mut waits: Vec<Option<Duration>> = vec![None; self.participants];
        let arrival = |i: usize| self.delay + gap * i as u32;
        let mut next_try: Vec<Duration> = (0..self.participants).map(arrival).collect();
        let mut outcome = WorkshopOutcome::default();
        let second = Duration::from_secs(1);
        while start.elapsed() < self.horizon {
            let t = start.elapsed();
            for i in 0..self.participants {
                if waits[i].is_some() || next_try[i] > t {
                    continue;
                }
                let who = format!("participant-{i:04}");
                let request = VmRequest {
                    email: email(&who),
                    crd_command: Some(command(&who)),
                };
                match lablink.request_vm(&request).await {
                    Ok(_) => waits[i] = Some(t - arrival(i)),
                    Err(e) if e.kind() == ErrorKind::NoCapacity => next_try[i] = t + self.retry,
                    Err(e) => panic!("participant {i}: {e}"),
                }
            }
            let records = lablink.vms(&VmFilter::default()).await.unwrap_or_default();
            if self.launch_on_demand {
                let waiting = (0..self.participants)
                    .filter(|i| waits[*i].is_none() && arrival(*i) <= t)
                    .count();
                let coming = records
                    .iter()
                    .filter(|r| matches!(r.state, VmState::Requested | VmState::Booting))
                    .count();
                if waiting > coming {
                    let launch = crate::LaunchOptions {
                        count: waiting - coming,
                    };
                    // A launch already running: the next second tries again.
                    let _ = lablink.launch(&launch).await;
                }
            }
            let alive = records
                .iter()
                .filter(|r| {
                    !matches!(
                        r.state,
                        VmState::Failed | VmState::Terminating | VmState::Terminated
                    )
                })
                .count();
            let free = records
                .iter()
                .filter(|r| {
                    matches!(
                        r.state,
                        VmState::Requested | VmState::Booting | VmState::Available
                    )
                })
                .count();
            outcome.vm_hours += alive as f64 / 3600.0;
            outcome.idle_vm_hours += free as f64 / 3600.0;
            outcome.vms_at_end = alive;
            outcome.free_at_end = free;
            tokio::time::sleep(second).await;
        }
        outcome.waits = waits;
        outcome
    }
}
