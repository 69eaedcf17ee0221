//! What the fleet was used for, and what it cost: VM time by kind (starting, free, in use,
//! assigned but idle, other), accumulated on each VM's record as it changes state, and kept
//! for removed VMs by the store, so every replica and a restart agree. A price table turns
//! the hours into an estimated cost.
//!
//! Each record carries its [`Usage`]: seconds per [`UsageKind`] up to `since`, the last
//! time it was accounted. Every change of the record accounts the time since then to the
//! kind the VM was in ([`VmRecord::account`]); a reader adds the time from `since` to now
//! to the kind it is in ([`Usage::at`]). A removed VM's usage is added to the store's
//! totals ([`VmStore::usage`](crate::VmStore::usage)).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::VmState;

/// What a VM's time was spent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageKind {
    /// Requested or booting: not usable yet, paid for once the machine exists.
    Starting,
    /// Ready and free.
    Free,
    /// Assigned and in use.
    InUse,
    /// Assigned, not in use.
    Idle,
    /// Unhealthy, rebooting, failed or being destroyed.
    Other,
}

impl UsageKind {
    /// Every kind, in the order tables show them.
    pub const ALL: [UsageKind; 5] = [
        UsageKind::Starting,
        UsageKind::Free,
        UsageKind::InUse,
        UsageKind::Idle,
        UsageKind::Other,
    ];

    /// Its name in metrics, exports and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageKind::Starting => "starting",
            UsageKind::Free => "free",
            UsageKind::InUse => "in_use",
            UsageKind::Idle => "idle",
            UsageKind::Other => "other",
        }
    }

    /// The kind of a VM in `state`, in use or not; `None` once it is gone.
    pub fn of(state: &VmState, in_use: bool) -> Option<UsageKind> {
        Some(match state {
            VmState::Requested | VmState::Booting | VmState::Resetting => UsageKind::Starting,
            VmState::Available => UsageKind::Free,
            VmState::Assigned if in_use => UsageKind::InUse,
            VmState::Assigned => UsageKind::Idle,
            VmState::Unhealthy { .. }
            | VmState::Rebooting { .. }
            | VmState::Failed
            | VmState::Terminating => UsageKind::Other,
            VmState::Terminated => return None,
        })
    }
}

/// Seconds of VM time by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Seconds {
    /// Requested or booting.
    pub starting: f64,
    /// Ready and free.
    pub free: f64,
    /// Assigned and in use.
    pub in_use: f64,
    /// Assigned, not in use.
    pub idle: f64,
    /// Unhealthy, rebooting, failed or being destroyed.
    pub other: f64,
}

impl Seconds {
    /// The seconds of `kind`.
    pub fn get(&self, kind: UsageKind) -> f64 {
        match kind {
            UsageKind::Starting => self.starting,
            UsageKind::Free => self.free,
            UsageKind::InUse => self.in_use,
            UsageKind::Idle => self.idle,
            UsageKind::Other => self.other,
        }
    }

    fn slot(&mut self, kind: UsageKind) -> &mut f64 {
        match kind {
            UsageKind::Starting => &mut self.starting,
            UsageKind::Free => &mut self.free,
            UsageKind::InUse => &mut self.in_use,
            UsageKind::Idle => &mut self.idle,
            UsageKind::Other => &mut self.other,
        }
    }

    /// Adds `seconds` to `kind`.
    pub fn add(&mut self, kind: UsageKind, seconds: f64) {
        *self.slot(kind) += seconds;
    }

    /// Adds every kind of `other`.
    pub fn add_all(&mut self, other: &Seconds) {
        for kind in UsageKind::ALL {
            self.add(kind, other.get(kind));
        }
    }

    /// Every kind together.
    pub fn total(&self) -> f64 {
        UsageKind::ALL.iter().map(|k| self.get(*k)).sum()
    }
}

/// A VM's time by kind, accounted up to `since`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Seconds up to `since`.
    pub seconds: Seconds,
    /// When it was last accounted.
    pub since: DateTime<Utc>,
}

impl Usage {
    /// Nothing used yet, counting from `now`.
    pub fn starting_at(now: DateTime<Utc>) -> Self {
        Self {
            seconds: Seconds::default(),
            since: now,
        }
    }

    /// The seconds up to `now` of a VM that has been of `kind` since `since` (a clock that
    /// went back adds nothing).
    pub fn at(&self, kind: Option<UsageKind>, now: DateTime<Utc>) -> Seconds {
        let mut seconds = self.seconds;
        if let Some(kind) = kind {
            seconds.add(kind, elapsed(self.since, now));
        }
        seconds
    }
}

/// Seconds from `from` to `to` (none when `to` is earlier), to the microsecond as
/// PostgreSQL keeps time.
fn elapsed(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    let micros = (to - from).num_microseconds().unwrap_or(i64::MAX).max(0);
    micros as f64 / 1e6
}

/// The fleet's usage at a moment: seconds by kind per instance type (`""` for machines of
/// no known type, such as registered ones), current and removed VMs together.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetUsage {
    /// Seconds by kind, per instance type.
    pub by_instance_type: BTreeMap<String, Seconds>,
}

impl FleetUsage {
    /// Adds `seconds` of a VM of `instance_type`.
    pub fn add(&mut self, instance_type: Option<&str>, seconds: &Seconds) {
        self.by_instance_type
            .entry(instance_type.unwrap_or_default().to_owned())
            .or_default()
            .add_all(seconds);
    }

    /// Seconds by kind over every instance type.
    pub fn seconds(&self) -> Seconds {
        let mut all = Seconds::default();
        for seconds in self.by_instance_type.values() {
            all.add_all(seconds);
        }
        all
    }

    /// The estimated cost: each instance type's hours times its hourly price in `prices`
    /// (a type without a price costs nothing), with the instance types that had no price.
    pub fn cost(&self, prices: &Prices) -> (f64, Vec<String>) {
        let mut cost = 0.0;
        let mut unpriced = Vec::new();
        for (instance_type, seconds) in &self.by_instance_type {
            match prices.hourly.get(instance_type) {
                Some(price) => cost += seconds.total() / 3600.0 * price,
                None if instance_type.is_empty() => {}
                None => unpriced.push(instance_type.clone()),
            }
        }
        (cost, unpriced)
    }
}

/// Hourly prices by instance type, to estimate what the fleet cost (`[cost]` in the server's
/// config). A machine of a type without a price, or of none (a registered machine), costs
/// nothing in the estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Prices {
    /// What the prices are in (shown beside the cost).
    pub currency: String,
    /// Price of one hour of each instance type.
    pub hourly: BTreeMap<String, f64>,
}

impl Default for Prices {
    fn default() -> Self {
        Self {
            currency: "USD".into(),
            hourly: BTreeMap::new(),
        }
    }
}

impl Prices {
    /// The price of one hour of `instance_type`, if it has one.
    pub fn hourly(&self, instance_type: Option<&str>) -> Option<f64> {
        self.hourly.get(instance_type?).copied()
    }

    /// Every problem with these prices (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.currency.trim().is_empty() {
            p.push("cost.currency must not be empty".into());
        }
        for (instance_type, price) in &self.hourly {
            if !price.is_finite() || *price < 0.0 {
                p.push(format!(
                    "cost.hourly.{instance_type} must be a price of zero or more"
                ));
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Assignment, Email, VmEvent, VmRecord};

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn a_vm_accounts_each_stretch_of_time_to_the_kind_it_was_in() {
        let mut vm = VmRecord::new("vm-1".parse().unwrap(), None, at(0));
        vm.apply(
            &VmEvent::Provisioned {
                instance_id: "i-1".parse().unwrap(),
                address: None,
                instance_type: Some("g4dn.xlarge".into()),
            },
            at(60),
        )
        .unwrap();
        vm.apply(&VmEvent::AgentReady, at(300)).unwrap();
        let assignment = Assignment {
            email: "ada@example.org".parse::<Email>().unwrap(),
            crd_command: Some("/opt/google/chrome-remote-desktop/start-host --code=\"4/a1\" --redirect-url=\"https://remotedesktop.google.com/_/oauthredirect\" --name=$(hostname)".parse().unwrap()),
            pin: "123456".parse().unwrap(),
            assigned_at: at(900),
            desktop: crate::DesktopSession::new(at(900)),
        };
        vm.apply(&VmEvent::Claim(assignment), at(900)).unwrap();
        let in_use = crate::Telemetry {
            in_use: Some(true),
            ..Default::default()
        };
        vm.apply_telemetry(&in_use, at(1000)).unwrap();
        let seconds = vm.usage_at(at(1600));
        assert_eq!(seconds.starting, 300.0);
        assert_eq!(seconds.free, 600.0);
        assert_eq!(seconds.idle, 100.0);
        assert_eq!(seconds.in_use, 600.0);
        assert_eq!(seconds.total(), 1600.0);
        assert_eq!(vm.instance_type.as_deref(), Some("g4dn.xlarge"));
    }

    #[test]
    fn cost_is_hours_times_the_price_of_each_instance_type() {
        let mut fleet = FleetUsage::default();
        let hour = Seconds {
            free: 1800.0,
            in_use: 1800.0,
            ..Default::default()
        };
        fleet.add(Some("g4dn.xlarge"), &hour);
        fleet.add(Some("g4dn.xlarge"), &hour);
        fleet.add(Some("p3.2xlarge"), &hour);
        fleet.add(None, &hour);
        let prices = Prices {
            hourly: BTreeMap::from([("g4dn.xlarge".to_owned(), 0.5)]),
            ..Prices::default()
        };
        let (cost, unpriced) = fleet.cost(&prices);
        assert!((cost - 1.0).abs() < 1e-9, "{cost}");
        assert_eq!(unpriced, vec!["p3.2xlarge".to_owned()]);
        assert_eq!(fleet.seconds().total(), 4.0 * 3600.0);
        let bad = Prices {
            hourly: BTreeMap::from([("x".to_owned(), -1.0)]),
            ..Prices::default()
        };
        assert_eq!(bad.problems().len(), 1);
    }
}
