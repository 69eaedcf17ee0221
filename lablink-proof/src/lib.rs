//! Proof at scale: the allocator under load, with two replicas on one PostgreSQL, a soak
//! with real and simulated agents, and faults injected while it runs. Loopback only; every
//! loop is bounded in count and time. Run it with `scripts/proof.sh [ci|full]`, which builds
//! what it needs and starts PostgreSQL; by hand:
//!
//! ```text
//! cargo build --release --features postgres --bin lablink
//! cargo build --release -p lablink-proof -p lablink-agent
//! scripts/with-postgres.sh target/release/proof ci      # or full
//! scripts/with-postgres.sh target/release/proof full soak   # only some parts
//! ```
//!
//! Parts (all by default): `workloads` (W1 and W2 with PostgreSQL, W1 on two replicas, W3),
//! `soak` (the soak with its faults and invariant checks). Each workload's target is
//! reported as "target met" or "target MISSED" but does not fail the run (the machine is
//! shared); correctness checks do.
//!
//! The soak. Two replicas of the real server binary share one database and one fake "cloud":
//! a directory of machine files (`provisioner.inventory_dir` of the fake provisioner), so both see the same
//! inventory and it outlives a killed replica. The generator plays the cloud's machines: it
//! watches that directory and boots an agent for every machine that appears (and stops it
//! when the machine is destroyed). The first machines get real `lablink-agent` processes
//! (agent auth `open`; each talks to one replica, alternating; `start-host` is a recording
//! script), the rest simulated agents (a task each: `ready`, heartbeats, long-polls for the
//! assignment, round-robin over the replicas). Participants arrive, hold a VM, release it
//! (admin API) and ask again, round-robin over the replicas. Faults are injected at fixed
//! points of the soak (kill -9 of a replica, the LISTEN connection terminated, PostgreSQL
//! restarted, an agent paused past its lease, 20% of launches failing), each with its
//! effect and recovery time measured. Afterwards the invariants are checked through the API
//! and in the database. The exit status is non-zero if any check fails.
//!
//! Modules: `workloads` (W1, W2, W3), `soak` (the cloud, the agents, the participants),
//! `faults`, `invariants`; `server` (the server as a child process), `database`,
//! `machine`. The `load` example of the root package uses the workloads too.

use std::time::Duration;

mod database;
mod faults;
mod invariants;
mod machine;
mod server;
mod soak;
mod workloads;

pub use database::*;
pub use machine::*;
pub use server::*;
pub use workloads::*;

use faults::*;
use invariants::*;
use soak::*;

/// The sizes of a run.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: &'static str,
    /// Participants of W1 (one VM each).
    pub w1: usize,
    /// Waiters of W2.
    pub w2: usize,
    /// Seconds of W3.
    pub w3_seconds: u64,
    /// Simulated agents in the soak.
    pub sim_agents: usize,
    /// Real `lablink-agent` processes in the soak.
    pub real_agents: usize,
    /// Participants in the soak (fewer than VMs, so some are free to churn).
    pub participants: usize,
    /// How long the soak runs.
    pub soak: Duration,
    /// How long a participant holds a VM, seconds (uniform).
    pub hold: (u64, u64),
    /// The agents' heartbeat interval, seconds (the lease is 3 of them).
    pub heartbeat: u64,
    /// VMs launched while the provisioner fails 20% of launches.
    pub fault_launches: usize,
}

pub const CI: Profile = Profile {
    name: "ci",
    w1: 1_000,
    w2: 2_000,
    w3_seconds: 5,
    sim_agents: 200,
    real_agents: 20,
    participants: 160,
    soak: Duration::from_secs(100),
    hold: (6, 15),
    heartbeat: 2,
    fault_launches: 50,
};

pub const FULL: Profile = Profile {
    name: "full",
    w1: 1_000,
    w2: 10_000,
    w3_seconds: 20,
    sim_agents: 1_000,
    real_agents: 200,
    participants: 1_000,
    soak: Duration::from_secs(600),
    hold: (20, 60),
    heartbeat: 5,
    fault_launches: 50,
};

/// Agents re-check their assignment this often once they have one (seconds).
pub const RECHECK: u64 = 2;

/// Runs the parts named on the command line (`ci|full [workloads] [soak]`); `Ok(false)`
/// when a check failed.
pub async fn run() -> Result<bool, Error> {
    let mut args = std::env::args().skip(1);
    const USAGE: &str = "usage: proof ci|full [workloads] [soak]";
    let profile = match args.next().as_deref() {
        Some("ci") => CI,
        Some("full") => FULL,
        _ => return Err(USAGE.into()),
    };
    let parts: Vec<String> = args.collect();
    if let Some(unknown) = parts
        .iter()
        .find(|p| !["workloads", "soak"].contains(&p.as_str()))
    {
        return Err(format!("unknown part {unknown:?}; {USAGE}").into());
    }
    let part = |p: &str| parts.is_empty() || parts.iter().any(|a| a == p);
    let http = crate::client()?;
    println!("proof, profile {}", profile.name);
    println!("{}", crate::machine());
    let mut ok = true;
    if part("workloads") {
        workloads(&http, &profile).await?;
    }
    if part("soak") {
        ok &= soak(&http, &profile).await?;
    }
    Ok(ok)
}
