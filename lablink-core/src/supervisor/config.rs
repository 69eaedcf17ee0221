//! [`SupervisorConfig`]: what the supervisor loops do and when. Every duration is in
//! seconds in files and environment variables.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Settings of the supervisor ([`LabLink::start_supervisor`](crate::LabLink::start_supervisor)).
/// `Default` turns on leases, the recovery ladder and periodic reconcile; the warm pool,
/// scheduled destruction and idle release are off until configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorConfig {
    /// How often the loops run.
    #[serde(with = "crate::clock::seconds")]
    pub tick: Duration,
    /// How long a replica's leadership lasts unless renewed (renewed every tick; when the
    /// leader dies another replica takes over after at most this long).
    #[serde(with = "crate::clock::seconds")]
    pub leader_lease: Duration,
    /// Heartbeat leases.
    pub leases: LeaseConfig,
    /// The recovery ladder.
    pub ladder: LadderConfig,
    /// Periodic reconcile (it always runs once when a replica becomes leader).
    pub reconcile: ReconcileConfig,
    /// The warm pool.
    pub pool: PoolConfig,
    /// Scheduled destruction of the whole deployment.
    pub destruction: DestructionConfig,
    /// Idle release of assigned VMs.
    pub idle_release: IdleReleaseConfig,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(10),
            leader_lease: Duration::from_secs(30),
            leases: LeaseConfig::default(),
            ladder: LadderConfig::default(),
            reconcile: ReconcileConfig::default(),
            pool: PoolConfig::default(),
            destruction: DestructionConfig::default(),
            idle_release: IdleReleaseConfig::default(),
        }
    }
}

/// Heartbeat leases: a ready VM whose agent has heartbeated and then falls silent for
/// `missed_intervals × heartbeat_interval` becomes `Unhealthy`; it recovers on the next
/// report. VMs whose agent never heartbeats (older agents) are not leased.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    /// On or off.
    pub enabled: bool,
    /// How often agents heartbeat.
    #[serde(with = "crate::clock::seconds")]
    pub heartbeat_interval: Duration,
    /// How many intervals may pass without a heartbeat.
    pub missed_intervals: u32,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            heartbeat_interval: Duration::from_secs(30),
            missed_intervals: 3,
        }
    }
}

impl LeaseConfig {
    /// How long silence lasts before the lease expires.
    pub fn expiry(&self) -> Duration {
        self.heartbeat_interval
            .saturating_mul(self.missed_intervals.max(1))
    }
}

/// The recovery ladder: a VM unhealthy for `unhealthy_grace`, booting for longer than
/// `boot_timeout` or rebooting for longer than `reboot_timeout` is rebooted (at most
/// `max_reboots` times), then replaced by a fresh VM (at most `max_replacements` per
/// `budget_reset_after` across the deployment). A VM's reboot budget resets once it has been
/// healthy for `budget_reset_after`. Assigned VMs are never touched: they are flagged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LadderConfig {
    /// On or off.
    pub enabled: bool,
    /// How long a VM may stay unhealthy before the ladder acts (it may recover on its own).
    #[serde(with = "crate::clock::seconds")]
    pub unhealthy_grace: Duration,
    /// How long a VM may boot before the ladder acts.
    #[serde(with = "crate::clock::seconds")]
    pub boot_timeout: Duration,
    /// How long a reboot may take before it counts as failed.
    #[serde(with = "crate::clock::seconds")]
    pub reboot_timeout: Duration,
    /// Reboots per VM before it is replaced.
    pub max_reboots: u32,
    /// Replacements per `budget_reset_after` window, deployment-wide (a bad image must not
    /// launch VMs forever).
    pub max_replacements: u32,
    /// Healthy time after which a VM's reboot budget is full again; also the replacement
    /// window.
    #[serde(with = "crate::clock::seconds")]
    pub budget_reset_after: Duration,
}

impl Default for LadderConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            unhealthy_grace: Duration::from_secs(120),
            boot_timeout: Duration::from_secs(20 * 60),
            reboot_timeout: Duration::from_secs(10 * 60),
            max_reboots: 2,
            max_replacements: 10,
            budget_reset_after: Duration::from_secs(60 * 60),
        }
    }
}

/// Periodic reconcile ([`LabLink::reconcile`](crate::LabLink::reconcile)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileConfig {
    /// On or off (also the run when a replica becomes leader).
    pub enabled: bool,
    /// How often.
    #[serde(with = "crate::clock::seconds")]
    pub interval: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(5 * 60),
        }
    }
}

/// The warm pool: keep at least `min_available` VMs free or on their way (plus one for each
/// participant recently turned away), never more than `max_total` VMs, and destroy free VMs
/// beyond the minimum once idle for `idle_ttl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// On or off.
    pub enabled: bool,
    /// K: free VMs (available, booting or requested) to keep.
    pub min_available: usize,
    /// M: most VMs in total (anything not failed, terminating or terminated).
    pub max_total: usize,
    /// How long a free VM beyond K may sit idle before it is destroyed.
    #[serde(with = "crate::clock::seconds")]
    pub idle_ttl: Duration,
    /// Windows that raise K (a workshop at 14:00).
    pub windows: Vec<PoolWindow>,
    /// How long before a window starts its K applies (about one boot time, so the VMs are
    /// ready when people arrive).
    #[serde(with = "crate::clock::seconds")]
    pub prewarm: Duration,
    /// Also launch for participants refused a VM within this long and not served since (on
    /// top of K); zero: only K counts. The refusals are those this allocator process
    /// answered.
    #[serde(with = "crate::clock::seconds")]
    pub turned_away_window: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            min_available: 0,
            max_total: 100,
            idle_ttl: Duration::from_secs(30 * 60),
            windows: Vec::new(),
            prewarm: Duration::from_secs(10 * 60),
            turned_away_window: Duration::from_secs(10 * 60),
        }
    }
}

/// A time window with its own K.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolWindow {
    /// When it starts (RFC 3339).
    pub start: DateTime<Utc>,
    /// When it ends.
    pub end: DateTime<Utc>,
    /// K during the window.
    pub min_available: usize,
}

impl PoolWindow {
    /// Whether the window is on at `now`, counting `prewarm` before its start.
    pub fn is_on(&self, prewarm: Duration, now: DateTime<Utc>) -> bool {
        let prewarm = chrono::Duration::from_std(prewarm).unwrap_or(chrono::Duration::MAX);
        self.start.checked_sub_signed(prewarm).unwrap_or(self.start) <= now && now < self.end
    }
}

impl PoolConfig {
    /// K at `now`: the largest of the base K and every window that is on (counting its
    /// prewarm).
    pub fn min_available_at(&self, now: DateTime<Utc>) -> usize {
        self.windows
            .iter()
            .filter(|w| w.is_on(self.prewarm, now))
            .map(|w| w.min_available)
            .fold(self.min_available, usize::max)
    }
}

/// Scheduled destruction: every VM is destroyed at `at`; from `at - warning` the admin UI
/// and `/metrics` show the coming destruction and participants are warned. The pool launches
/// nothing from `at` on. These are the initial values: admins change the schedule (to
/// several times) at run time ([`WorkshopSettings`](crate::settings::WorkshopSettings)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DestructionConfig {
    /// When (RFC 3339); none: never.
    pub at: Option<DateTime<Utc>>,
    /// How long before it the warning shows.
    #[serde(with = "crate::clock::seconds")]
    pub warning: Duration,
}

impl Default for DestructionConfig {
    fn default() -> Self {
        Self {
            at: None,
            warning: Duration::from_secs(30 * 60),
        }
    }
}

/// Idle release: an assigned VM whose agent reports "not in use" for longer than `after` is
/// destroyed (its participant's session is over; the pool replaces capacity with a clean
/// VM). It is flagged with a warning from `after - warning` on. Off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdleReleaseConfig {
    /// On or off.
    pub enabled: bool,
    /// How long "not in use" lasts before release.
    #[serde(with = "crate::clock::seconds")]
    pub after: Duration,
    /// How long before release the warning shows.
    #[serde(with = "crate::clock::seconds")]
    pub warning: Duration,
}

impl Default for IdleReleaseConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            after: Duration::from_secs(60 * 60),
            warning: Duration::from_secs(15 * 60),
        }
    }
}

impl SupervisorConfig {
    /// Every problem with these settings, one message each (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.tick.is_zero() {
            p.push("supervisor.tick must be positive".into());
        }
        if self.leader_lease <= self.tick {
            p.push("supervisor.leader_lease must be longer than supervisor.tick".into());
        }
        if self.leases.heartbeat_interval.is_zero() || self.leases.missed_intervals == 0 {
            p.push(
                "supervisor.leases needs a positive heartbeat_interval and missed_intervals".into(),
            );
        }
        if self.reconcile.interval.is_zero() {
            p.push("supervisor.reconcile.interval must be positive".into());
        }
        if self.pool.max_total < self.pool.min_available
            || self
                .pool
                .windows
                .iter()
                .any(|w| w.min_available > self.pool.max_total)
        {
            p.push(
                "supervisor.pool: min_available (and every window's) must not exceed max_total"
                    .into(),
            );
        }
        if self.pool.windows.iter().any(|w| w.end <= w.start) {
            p.push("supervisor.pool.windows: each window must end after it starts".into());
        }
        if self.idle_release.after.is_zero() || self.idle_release.warning > self.idle_release.after
        {
            p.push("supervisor.idle_release: after must be positive and at least warning".into());
        }
        p
    }
}
