//! What `/metrics` reads when it is scraped: this replica's supervisor, and the fleet's
//! gauges from the one replica that exports them ([`fleet_exporter`]).

use lablink_core::supervisor::FlagKind;
use std::sync::atomic::AtomicU64;

use lablink_core::{FleetUsage, GpuHealth, Prices, SupervisorStatus, UsageKind, VmRecord, VmState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

/// Whether this replica exports the fleet's gauges (VMs by state, the pool, the flags, the
/// schedule): only the one whose supervisor holds the leader lease, or one that runs no
/// supervisor at all (a single process). Summed over replicas they count the fleet once.
pub fn fleet_exporter(supervision: Option<&SupervisorStatus>) -> bool {
    supervision.is_none_or(|s| s.leader)
}

/// What the fleet's series are read from: the VMs, and their usage with the prices.
pub(super) struct Fleet<'a> {
    pub vms: &'a [VmRecord],
    pub usage: &'a FleetUsage,
    pub prices: &'a Prices,
}

/// What this replica's browser-desktop relay moved (counted since it started).
pub(super) struct Desktop {
    /// Sessions that reached the relaying stage.
    pub sessions: u64,
    /// Bytes from VMs to browsers.
    pub to_browsers: u64,
    /// Bytes from browsers to VMs.
    pub to_vms: u64,
    /// Client messages view-only sessions dropped.
    pub dropped: u64,
    /// Sessions waiting for their tunnel or relaying now.
    pub live: usize,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

fn register_desktop(r: &mut Registry, d: &Desktop) {
    let counter = |value: u64| {
        let c = Counter::<u64, AtomicU64>::default();
        c.inc_by(value);
        c
    };
    r.register(
        "lablink_desktop_sessions",
        "Browser-desktop sessions this replica relayed (participants' and admins')",
        counter(d.sessions),
    );
    let bytes = Family::<DirectionLabels, Counter<u64, AtomicU64>>::default();
    bytes
        .get_or_create(&DirectionLabels {
            direction: "to_browser",
        })
        .inc_by(d.to_browsers);
    bytes
        .get_or_create(&DirectionLabels { direction: "to_vm" })
        .inc_by(d.to_vms);
    r.register(
        "lablink_desktop_relayed_bytes",
        "Bytes this replica relayed between browsers and VMs' desktops, by direction",
        bytes,
    );
    r.register(
        "lablink_desktop_input_dropped",
        "Keyboard, pointer and clipboard messages view-only admin sessions dropped",
        counter(d.dropped),
    );
    gauge(
        r,
        "lablink_desktop_sessions_live",
        "Browser-desktop sessions on this replica now (waiting for their tunnel or relaying)",
        i64::try_from(d.live).unwrap_or(i64::MAX),
    );
}

/// The series read at scrape time: `lablink_fleet_exporter`, the fleet's gauges when this
/// replica exports them (`fleet` holds the VMs then), this replica's supervisor and its
/// browser-desktop relay.
pub(super) fn registry(
    supervision: Option<&SupervisorStatus>,
    fleet: Option<Fleet>,
    desktop: &Desktop,
) -> Registry {
    let mut r = Registry::default();
    register_desktop(&mut r, desktop);
    gauge(
        &mut r,
        "lablink_fleet_exporter",
        "Whether this replica exports the fleet's gauges (it runs the leading supervisor, or no supervisor at all)",
        i64::from(fleet.is_some()),
    );
    if let Some(fleet) = fleet {
        register_usage(&mut r, &fleet);
        register_fleet(&mut r, fleet.vms, supervision);
    }
    if let Some(status) = supervision {
        register_supervisor(&mut r, status);
    }
    r
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let gauge = Gauge::<i64>::default();
    gauge.set(value);
    registry.register(name, help, gauge);
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UsageLabels {
    kind: &'static str,
    instance_type: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CurrencyLabels {
    currency: String,
}

/// The fleet's VM time by kind and instance type (kept in the store, so it only grows, and
/// every replica would read the same) and the estimated cost.
fn register_usage(r: &mut Registry, fleet: &Fleet) {
    let seconds = Family::<UsageLabels, Counter<f64, AtomicU64>>::default();
    for (instance_type, by_kind) in &fleet.usage.by_instance_type {
        for kind in UsageKind::ALL {
            seconds
                .get_or_create(&UsageLabels {
                    kind: kind.as_str(),
                    instance_type: instance_type.clone(),
                })
                .inc_by(by_kind.get(kind));
        }
    }
    r.register(
        "lablink_vm_seconds",
        "VM time since the deployment began, by kind (starting, free, in_use, idle, other) and instance type (empty: none known), destroyed VMs included",
        seconds,
    );
    let cost = Family::<CurrencyLabels, Gauge<f64, AtomicU64>>::default();
    cost.get_or_create(&CurrencyLabels {
        currency: fleet.prices.currency.clone(),
    })
    .set(fleet.usage.cost(fleet.prices).0);
    r.register(
        "lablink_estimated_cost",
        "Estimated cost of the fleet so far: VM-hours times [cost.hourly] prices",
        cost,
    );
}

/// The fleet's gauges: VMs by state, assignable and GPU-unhealthy VMs, and what the leading
/// supervisor knows of the fleet (pool, flags, schedule, reconcile).
fn register_fleet(r: &mut Registry, vms: &[VmRecord], supervision: Option<&SupervisorStatus>) {
    let states = Family::<StateLabels, Gauge>::default();
    for name in VmState::NAMES {
        let _ = states.get_or_create(&StateLabels { state: name });
    }
    for vm in vms {
        states
            .get_or_create(&StateLabels {
                state: vm.state.as_str(),
            })
            .inc();
    }
    r.register("lablink_vms", "VMs by state", states);
    let count = |keep: fn(&VmRecord) -> bool| vms.iter().filter(|v| keep(v)).count() as i64;
    gauge(
        r,
        "lablink_vms_assignable",
        "VMs a participant can get right now",
        count(VmRecord::is_assignable),
    );
    gauge(
        r,
        "lablink_vms_gpu_unhealthy",
        "VMs not being destroyed whose agent reports their GPU unhealthy",
        count(|v| {
            v.gpu_health == GpuHealth::Unhealthy
                && !matches!(v.state, VmState::Terminating | VmState::Terminated)
        }),
    );
    let Some(s) = supervision else {
        return;
    };
    let flags = Family::<KindLabels, Gauge>::default();
    for kind in [
        FlagKind::NeedsAdmin,
        FlagKind::LadderExhausted,
        FlagKind::IdleWarning,
        FlagKind::DestroyHeld,
    ] {
        let n = s.flags.iter().filter(|f| f.kind == kind).count();
        flags
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
            .set(n as i64);
    }
    r.register(
        "lablink_supervisor_flags",
        "VMs the supervisor wants an admin to look at, by reason",
        flags,
    );
    if let Some(target) = s.pool_target {
        gauge(
            r,
            "lablink_pool_target",
            "Free VMs the warm pool keeps right now (K)",
            target as i64,
        );
    }
    gauge(
        r,
        "lablink_pool_free",
        "VMs free or on their way (available, booting, requested)",
        s.pool_free as i64,
    );
    if let Some(at) = s.destruction_at {
        gauge(
            r,
            "lablink_scheduled_destruction_timestamp_seconds",
            "When every VM will be destroyed",
            at.timestamp(),
        );
    }
    gauge(
        r,
        "lablink_scheduled_destruction_warning",
        "Whether the scheduled destruction is near (its warning shows)",
        i64::from(s.destruction_warning),
    );
    if let Some(at) = s.last_reconcile_at {
        gauge(
            r,
            "lablink_reconcile_last_timestamp_seconds",
            "When reconcile last ran",
            at.timestamp(),
        );
    }
}

/// This replica's supervisor: running, leader, and what it did since it started.
fn register_supervisor(r: &mut Registry, s: &SupervisorStatus) {
    gauge(
        r,
        "lablink_supervisor_running",
        "Whether this replica's supervisor runs",
        i64::from(s.running),
    );
    gauge(
        r,
        "lablink_supervisor_leader",
        "Whether this replica's supervisor holds the leader lease (only the leader acts)",
        i64::from(s.leader),
    );
    let c = &s.counters;
    let actions = Family::<ActionLabels, Counter>::default();
    for (action, n) in [
        ("lease_expired", c.leases_expired),
        ("restart_seen", c.restarts_seen),
        ("ladder_reboot", c.ladder_reboots),
        ("ladder_replacement", c.ladder_replacements),
        ("pool_launch", c.pool_launched),
        ("pool_release", c.pool_released),
        ("idle_release", c.idle_released),
        ("reconcile", c.reconciles),
        ("became_leader", c.became_leader),
        ("error", c.errors),
    ] {
        actions.get_or_create(&ActionLabels { action }).inc_by(n);
    }
    r.register(
        "lablink_supervisor_actions",
        "What this replica's supervisor did since it started, by action",
        actions,
    );
}
