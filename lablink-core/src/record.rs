//! [`VmRecord`], what a store keeps about one VM, and the agent's [`Telemetry`].

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::secret::TokenDigest;
use crate::state::{transition, Assignment, VmEvent, VmState};
use crate::usage::Usage;
use crate::{Email, Error, Hostname, InstanceId, LogAppend, Result};

use crate::wire::wire_enum;

wire_enum!(
    /// GPU health as the agent reports it (`Default`: `Unknown`).
    GpuHealth {
        /// `nvidia-smi` works and reports the GPU.
        Healthy = "Healthy",
        /// `nvidia-smi` fails.
        Unhealthy = "Unhealthy",
        /// No `nvidia-smi` on the machine.
        NotAvailable = "N/A",
        /// Nothing reported yet.
        #[default]
        Unknown = "unknown",
    }
);

wire_enum!(
    /// The status the agent reports about itself (docs/protocol.md, `/api/vm-status`;
    /// `Default`: `Unknown`).
    AgentStatus {
        /// Booting, installing, starting the container.
        Initializing = "initializing",
        /// Up and waiting or serving.
        Running = "running",
        /// Something failed inside the VM.
        Error = "error",
        /// The VM is rebooting.
        Rebooting = "rebooting",
        /// The agent does not know.
        #[default]
        Unknown = "unknown",
    }
);

/// Start-up timings of a VM: provisioning (from the provisioner) and cloud-init / container
/// (from the VM). Every field is optional; a report overwrites only the fields it carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StartupTimings {
    /// When the provisioner was asked for the machine.
    pub provision_start: Option<DateTime<Utc>>,
    /// When the provisioner returned it.
    pub provision_end: Option<DateTime<Utc>>,
    /// cloud-init start on the VM.
    pub cloud_init_start: Option<DateTime<Utc>>,
    /// cloud-init end on the VM.
    pub cloud_init_end: Option<DateTime<Utc>>,
    /// Research-software container start.
    pub container_start: Option<DateTime<Utc>>,
    /// Research-software container ready.
    pub container_end: Option<DateTime<Utc>>,
    /// cloud-init duration as measured on the VM.
    pub cloud_init_duration_seconds: Option<f64>,
    /// Container start-up duration as measured on the VM.
    pub container_startup_duration_seconds: Option<f64>,
}

impl StartupTimings {
    /// Overwrites every field that `other` carries; returns whether anything changed.
    pub fn merge(&mut self, other: &StartupTimings) -> bool {
        let before = self.clone();
        macro_rules! take {
            ($($field:ident),*) => { $( if other.$field.is_some() { self.$field = other.$field; } )* };
        }
        take!(
            provision_start,
            provision_end,
            cloud_init_start,
            cloud_init_end,
            container_start,
            container_end,
            cloud_init_duration_seconds,
            container_startup_duration_seconds
        );
        *self != before
    }

    /// These timings without the times and durations a VM could not plausibly have
    /// measured: times before 2000 or more than a day after `now` (clocks drift, years do
    /// not), durations below 0 or above 30 days. Returns the names of the fields dropped.
    pub fn plausible(&self, now: DateTime<Utc>) -> (StartupTimings, Vec<&'static str>) {
        const MAX_DURATION: f64 = 30.0 * 86_400.0;
        let earliest = DateTime::<Utc>::from_timestamp(946_684_800, 0).unwrap_or_default();
        let latest = now + chrono::Duration::days(1);
        let mut kept = self.clone();
        let mut dropped = Vec::new();
        for (name, at) in [
            ("cloud_init_start", &mut kept.cloud_init_start),
            ("cloud_init_end", &mut kept.cloud_init_end),
            ("container_start", &mut kept.container_start),
            ("container_end", &mut kept.container_end),
        ] {
            if at.is_some_and(|at| at < earliest || at > latest) {
                *at = None;
                dropped.push(name);
            }
        }
        for (name, seconds) in [
            (
                "cloud_init_duration_seconds",
                &mut kept.cloud_init_duration_seconds,
            ),
            (
                "container_startup_duration_seconds",
                &mut kept.container_startup_duration_seconds,
            ),
        ] {
            if seconds.is_some_and(|s| !(0.0..=MAX_DURATION).contains(&s)) {
                *seconds = None;
                dropped.push(name);
            }
        }
        (kept, dropped)
    }

    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming the first field
    /// [`plausible`](Self::plausible) would drop.
    pub fn check_reported(&self, now: DateTime<Utc>) -> Result<()> {
        match self.plausible(now).1.first() {
            None => Ok(()),
            Some(name) => Err(Error::invalid_input(format!(
                "{name} is not plausible (times between 2000 and a day from now, durations from 0 to 30 days)"
            ))),
        }
    }

    /// Provisioning time, when both ends are known.
    pub fn provision_seconds(&self) -> Option<f64> {
        seconds_between(self.provision_start, self.provision_end)
    }

    /// Total start-up time: from the provisioning request to the last thing the VM reported
    /// finishing (container, else cloud-init), when both ends are known.
    pub fn total_startup_seconds(&self) -> Option<f64> {
        let end = self.container_end.or(self.cloud_init_end)?;
        seconds_between(self.provision_start, Some(end))
    }
}

fn seconds_between(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<f64> {
    Some((b? - a?).num_milliseconds() as f64 / 1000.0)
}

/// Default cap on each log stream of a VM: 1 MiB.
pub const DEFAULT_LOG_CAP_BYTES: usize = 1024 * 1024;

/// One batch of agent reports, applied together. Every field is optional; `Default` reports
/// nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    /// GPU health, if it changed or is reported at start.
    pub gpu_health: Option<GpuHealth>,
    /// Whether the research software is in use.
    pub in_use: Option<bool>,
    /// The agent's own status.
    pub status: Option<AgentStatus>,
    /// A heartbeat carrying the boot id; a changed boot id counts as a restart.
    pub heartbeat: Option<String>,
    /// Start-up timings to merge.
    pub timings: Option<StartupTimings>,
    /// Log lines to append.
    pub logs: Vec<LogAppend>,
    /// Cap in bytes for each log stream; the oldest lines are dropped beyond it.
    pub log_cap_bytes: usize,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            gpu_health: None,
            in_use: None,
            status: None,
            heartbeat: None,
            timings: None,
            logs: Vec::new(),
            log_cap_bytes: DEFAULT_LOG_CAP_BYTES,
        }
    }
}

/// How a machine that registered itself joined (see [`crate::registration`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The machine's stable identity (see [`MachineRegistration::machine_identity`]).
    pub machine_identity: String,
    /// Whether its owner allows the allocator to reboot it.
    pub allow_reboot: bool,
}

/// Longest boot id accepted in a heartbeat.
pub const MAX_BOOT_ID: usize = 128;

/// Everything a store keeps about one VM, except its logs (see
/// [`VmStore::logs`](crate::VmStore::logs)).
#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    /// The VM's name; unique per deployment.
    pub hostname: Hostname,
    /// The provider's id, once provisioned.
    pub instance_id: Option<InstanceId>,
    /// Address (IP or DNS name), when known.
    pub address: Option<String>,
    /// Where the VM is in its life.
    pub state: VmState,
    /// The participant holding it, if any. Present exactly when `state.is_owned()`.
    pub assignment: Option<Assignment>,
    /// Last reported GPU health.
    pub gpu_health: GpuHealth,
    /// Whether the research software is in use.
    pub in_use: bool,
    /// Last status the agent reported.
    pub agent_status: Option<AgentStatus>,
    /// Last heartbeat.
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Boot id of the last heartbeat.
    pub boot_id: Option<String>,
    /// How many times the boot id changed.
    pub restarts: u32,
    /// Start-up timings.
    pub timings: StartupTimings,
    /// Why it failed or became unhealthy, when it did.
    pub last_error: Option<String>,
    /// Digest of the VM's agent token.
    pub token_digest: Option<TokenDigest>,
    /// Incremented on every change; used for optimistic checks and fencing.
    pub generation: u64,
    /// When the record was created.
    pub created_at: DateTime<Utc>,
    /// When the record last changed.
    pub updated_at: DateTime<Utc>,
    /// When `state` last changed (boot timeouts count from here, not from creation).
    pub state_changed_at: DateTime<Utc>,
    /// How the machine joined by registering itself; `None` for a machine a provisioner
    /// created.
    pub registration: Option<Registration>,
    /// The instance type the provider reported.
    pub instance_type: Option<String>,
    /// What its time was spent on (see [`crate::usage`]).
    pub usage: Usage,
    /// Who had it before and how its health changed (bounded, see [`History`]).
    pub history: History,
}

/// Longest history a record keeps of each kind; older entries are dropped.
pub const HISTORY_LIMIT: usize = 50;

/// What happened to a VM that its current fields no longer show.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Participants who held it and let it go, oldest first.
    #[serde(default)]
    pub assignments: Vec<PastAssignment>,
    /// Reported GPU health changes, oldest first.
    #[serde(default)]
    pub health: Vec<HealthChange>,
}

/// A participant who held the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PastAssignment {
    /// Who.
    pub email: Email,
    /// From when.
    pub assigned_at: DateTime<Utc>,
    /// Until when.
    pub ended_at: DateTime<Utc>,
}

/// A reported change of GPU health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthChange {
    /// When it was reported.
    pub at: DateTime<Utc>,
    /// The new health.
    pub health: GpuHealth,
}

fn push_bounded<T>(list: &mut Vec<T>, item: T) {
    list.push(item);
    if list.len() > HISTORY_LIMIT {
        list.remove(0);
    }
}

impl VmRecord {
    /// A fresh `Requested` record, generation 1.
    pub fn new(hostname: Hostname, token_digest: Option<TokenDigest>, now: DateTime<Utc>) -> Self {
        Self {
            hostname,
            instance_id: None,
            address: None,
            state: VmState::Requested,
            assignment: None,
            gpu_health: GpuHealth::Unknown,
            in_use: false,
            agent_status: None,
            last_heartbeat: None,
            boot_id: None,
            restarts: 0,
            timings: StartupTimings::default(),
            last_error: None,
            token_digest,
            generation: 1,
            created_at: now,
            updated_at: now,
            state_changed_at: now,
            registration: None,
            instance_type: None,
            usage: Usage::starting_at(now),
            history: History::default(),
        }
    }

    /// Whether the machine joined by registering itself (see [`crate::registration`]).
    pub fn is_registered(&self) -> bool {
        self.registration.is_some()
    }

    /// Whether this registered machine was asked to reboot (its owner allowed it) and its
    /// agent has not answered yet: the reboot cleared the agent's status, and the agent
    /// reports `rebooting` before it reboots.
    pub fn reboot_requested(&self) -> bool {
        matches!(self.state, VmState::Rebooting { .. })
            && self.agent_status.is_none()
            && self.registration.as_ref().is_some_and(|r| r.allow_reboot)
    }

    /// Whether the VM waits for its agent to reset it (`Resetting`, and the agent has not
    /// reported since the reset began).
    pub fn reset_requested(&self) -> bool {
        self.state == VmState::Resetting && self.agent_status.is_none()
    }

    /// Whether a claim may take this VM: `Available` and its GPU not reported unhealthy.
    pub fn is_assignable(&self) -> bool {
        self.state.is_assignable() && self.gpu_health != GpuHealth::Unhealthy
    }

    /// The email holding this VM, if any.
    pub fn owner(&self) -> Option<&Email> {
        self.assignment.as_ref().map(|a| &a.email)
    }

    /// Applies `event` through [`transition`] and its payload to the fields. Returns whether
    /// anything changed (idempotent repeats change nothing); on change `generation` is
    /// incremented. An illegal event returns an error and leaves the record untouched.
    pub fn apply(&mut self, event: &VmEvent, now: DateTime<Utc>) -> Result<bool> {
        let to = transition(&self.state, event).map_err(|e| {
            Error::from(e)
                .with_operation("apply")
                .with_context("hostname", &self.hostname)
        })?;
        if let (VmEvent::Desktop(change), Some(a)) = (event, self.assignment.as_mut()) {
            let changed = a.desktop.apply(change, &mut a.crd_command, now)?;
            if changed {
                self.touch(now);
            }
            return Ok(changed);
        }
        if to == self.state {
            return Ok(false);
        }
        self.account(now);
        match event {
            VmEvent::Provisioned {
                instance_id,
                address,
                instance_type,
            } => {
                self.instance_id = Some(instance_id.clone());
                self.address.clone_from(address);
                self.instance_type.clone_from(instance_type);
            }
            VmEvent::ProvisionFailed { reason }
            | VmEvent::SetupFailed { reason }
            | VmEvent::MarkUnhealthy { reason }
            | VmEvent::InstanceLost { reason } => {
                self.last_error = Some(reason.clone());
            }
            VmEvent::Claim(assignment) => {
                self.assignment = Some(assignment.clone());
                self.in_use = false;
            }
            VmEvent::Recovered => self.last_error = None,
            // What the agent said before the reboot (or reset) no longer describes the VM:
            // only a report from the rebooted (reset) agent makes it ready (or failed) again.
            VmEvent::Reboot | VmEvent::Reset => self.agent_status = None,
            _ => {}
        }
        if !to.is_owned() {
            if let Some(ended) = self.assignment.take() {
                push_bounded(
                    &mut self.history.assignments,
                    PastAssignment {
                        email: ended.email,
                        assigned_at: ended.assigned_at,
                        ended_at: now,
                    },
                );
            }
        }
        tracing::info!(hostname = %self.hostname, from = %self.state, to = %to, event = event.name(), "vm state changed");
        self.state = to;
        self.state_changed_at = now;
        self.touch(now);
        Ok(true)
    }

    /// Applies the non-log fields of `telemetry`. Returns whether anything changed; on change
    /// `generation` is incremented. Rejects an oversized boot id before changing anything.
    pub fn apply_telemetry(&mut self, telemetry: &Telemetry, now: DateTime<Utc>) -> Result<bool> {
        if let Some(boot_id) = &telemetry.heartbeat {
            if boot_id.is_empty() || boot_id.len() > MAX_BOOT_ID {
                return Err(Error::invalid_input(format!(
                    "boot id must be 1–{MAX_BOOT_ID} characters"
                )));
            }
        }
        let mut changed = false;
        if let Some(h) = telemetry.gpu_health {
            if self.gpu_health != h {
                self.gpu_health = h;
                push_bounded(
                    &mut self.history.health,
                    HealthChange { at: now, health: h },
                );
                changed = true;
            }
        }
        if let Some(u) = telemetry.in_use {
            if self.in_use != u {
                // The time so far was in use or idle as the VM was until now.
                self.account(now);
                self.in_use = u;
                changed = true;
            }
        }
        if let Some(s) = telemetry.status {
            changed |= self.agent_status.replace(s) != Some(s);
        }
        if let Some(boot_id) = &telemetry.heartbeat {
            if self.boot_id.as_ref().is_some_and(|old| old != boot_id) {
                self.restarts += 1;
            }
            self.boot_id = Some(boot_id.clone());
            self.last_heartbeat = Some(now);
            changed = true;
        }
        if let Some(t) = &telemetry.timings {
            changed |= self.timings.merge(t);
        }
        if changed {
            self.touch(now);
        }
        Ok(changed)
    }

    /// What this VM's time was spent on so far (see [`crate::usage`]).
    pub fn usage_at(&self, now: DateTime<Utc>) -> crate::usage::Seconds {
        self.usage
            .at(crate::usage::UsageKind::of(&self.state, self.in_use), now)
    }

    /// Accounts the time since the last change to the kind the VM is in, before it changes.
    fn account(&mut self, now: DateTime<Utc>) {
        if now > self.usage.since {
            self.usage.seconds = self.usage_at(now);
            self.usage.since = now;
        }
    }

    fn touch(&mut self, now: DateTime<Utc>) {
        self.generation += 1;
        self.updated_at = now;
    }
}
