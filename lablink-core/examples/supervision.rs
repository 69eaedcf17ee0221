//! The warm pool under a scripted arrival curve, against two ways of running without it.
//!
//! 100 participants arrive evenly over 10 minutes; a VM takes 10 s to provision and 3 min
//! to boot; each participant keeps the VM for the rest of the hour. Measured over the hour
//! from 5 minutes before the first arrival, on paused tokio time (so the hour takes
//! seconds) with the fake provisioner and simulated agents:
//!
//! - **on demand**: no pool; each participant who finds no free VM triggers a launch of one.
//! - **all up front**: no pool; the admin launches 100 VMs 5 minutes before the start.
//! - **warm pool**: K = 2, raised to 40 (or 25) for the arrival window (applied 4 minutes
//!   early), at most 150 VMs, idle TTL 5 minutes.
//!
//! Idle VM-hours count VMs that exist but nobody holds (requested, booting or available).
//!
//! Run: `cargo run --release -p lablink-core --example supervision`

use std::sync::Arc;
use std::time::Duration;

use lablink_core::supervisor::PoolWindow;
use lablink_core::testing::fleet::{Fleet, Workshop, WorkshopOutcome};
use lablink_core::{
    AllocatorConfig, AllocatorExt, Clock, FakeProvisioner, LabLink, SupervisorConfig, TokioClock,
};

const SEC: Duration = Duration::from_secs(1);
const BOOT: Duration = Duration::from_secs(180);
const LEAD: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    OnDemand,
    AllUpFront,
    WarmPool(usize),
}

async fn scenario(mode: Mode) -> WorkshopOutcome {
    let clock = TokioClock::new();
    let first_arrival = clock.now() + chrono::Duration::from_std(LEAD).unwrap();
    let mut supervisor = SupervisorConfig {
        tick: 5 * SEC,
        leader_lease: 15 * SEC,
        ..Default::default()
    };
    if let Mode::WarmPool(k) = mode {
        supervisor.pool.enabled = true;
        supervisor.pool.min_available = 2;
        supervisor.pool.max_total = 150;
        supervisor.pool.idle_ttl = 300 * SEC;
        supervisor.pool.prewarm = 240 * SEC;
        supervisor.pool.windows = vec![PoolWindow {
            start: first_arrival,
            end: first_arrival + chrono::Duration::minutes(10),
            min_available: k,
        }];
    }
    let lablink = LabLink::builder()
        .with_clock(Arc::new(clock))
        .with_provisioner(Arc::new(FakeProvisioner::new().with_latency(10 * SEC)))
        .with_config(AllocatorConfig {
            supervisor,
            ..Default::default()
        })
        .build()
        .expect("allocator");
    let _fleet = Fleet::start(&lablink, BOOT, 10 * SEC);
    let _supervisor = lablink.start_supervisor().expect("supervisor");
    if mode == Mode::AllUpFront {
        lablink
            .launch_and_wait(100, 60 * SEC)
            .await
            .expect("launch");
    }
    let workshop = Workshop {
        delay: LEAD,
        participants: 100,
        arrivals: 600 * SEC,
        retry: 5 * SEC,
        horizon: 3600 * SEC,
        launch_on_demand: mode == Mode::OnDemand,
    };
    workshop.run(&lablink).await
}

fn main() {
    println!("100 participants over 10 min, 10 s provisioning + 3 min boot, measured for 1 h");
    println!(
        "{:<16} {:>8} {:>8} {:>8} {:>10} {:>8}",
        "mode", "p50 (s)", "p99 (s)", "max (s)", "idle VM-h", "VM-h"
    );
    for (name, mode) in [
        ("on demand", Mode::OnDemand),
        ("all up front", Mode::AllUpFront),
        ("warm pool K=40", Mode::WarmPool(40)),
        ("warm pool K=25", Mode::WarmPool(25)),
    ] {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let outcome = runtime.block_on(scenario(mode));
        let served = outcome.waits.iter().flatten().count();
        assert_eq!(served, 100, "{name}: only {served} participants got a VM");
        println!(
            "{:<16} {:>8.0} {:>8.0} {:>8.0} {:>10.2} {:>8.2}",
            name,
            outcome.wait_quantile(0.5),
            outcome.wait_quantile(0.99),
            outcome.max_wait(),
            outcome.idle_vm_hours,
            outcome.vm_hours
        );
    }
}
