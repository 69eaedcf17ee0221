//! HTTP load generator for the allocator (loopback only, bounded). It starts the `server`
//! example as a separate process (built next to this binary), in agent-auth `open` mode so
//! the load generator can act as the VMs, with the in-memory store and the fake provisioner.
//!
//! ```text
//! cargo build --release --bin lablink --example load
//! target/release/examples/load            # all three workloads
//! target/release/examples/load w1 w3      # some of them
//!
//! # W1 with PostgreSQL behind the server (a fresh database on DATABASE_URL):
//! cargo build --release --features postgres --bin lablink --example load
//! scripts/with-postgres.sh target/release/examples/load w1-pg
//! ```
//!
//! - W1: 1,000 concurrent `POST /api/request_vm` against 1,000 ready VMs: throughput,
//!   p50/p99, and correctness afterwards (every participant got a distinct VM, none free).
//! - W2: 10,000 agents hold `/vm_startup`, then all are assigned: assignment→response
//!   latency (from the participant's answer to the waiter's answer) and server RSS.
//! - W3: telemetry posts (`/api/update_inuse_status`, `/api/gpu_health`, `POST
//!   /api/vm-status` in turn) at full rate for 20 s over 64 keep-alive connections: requests
//!   per second.
//!
//! The same workloads at scale, with two replicas, a soak and faults: `examples/proof.rs`.

#[allow(dead_code)] // shared with the proof example, which uses more of it
mod common;

use common::{Error, Server};
use reqwest::Client;

async fn w1(http: &Client) -> Result<(), Error> {
    let server = Server::start_with(http, &[]).await?;
    common::w1_on(http, &[&server], 1_000, "in-memory store").await?;
    Ok(())
}

/// W1 with PostgreSQL behind the server: a fresh database on `DATABASE_URL` (the server
/// example must be built with `--features postgres`); afterwards the database itself is
/// checked (1,000 VMs assigned, to 1,000 distinct emails).
async fn w1_pg(http: &Client) -> Result<(), Error> {
    let db = common::create_database("lablink_load").await?;
    let result = async {
        let server = Server::start_with(
            http,
            &[
                ("LABLINK_DATABASE__URL", db.url.as_str()),
                ("LABLINK_DATABASE__MAX_CONNECTIONS", "20"),
            ],
        )
        .await?;
        common::w1_on(http, &[&server], 1_000, "PostgreSQL store and notifier").await?;
        let mut check = db.connect().await?;
        let (assigned, emails): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT email) FROM lablink_vms WHERE state = 'assigned'",
        )
        .fetch_one(&mut check)
        .await?;
        println!("  in PostgreSQL: {assigned} VMs assigned, to {emails} distinct emails");
        if (assigned, emails) != (1_000, 1_000) {
            return Err(Error::from("the database does not hold 1,000 distinct assignments (was the server built with --features postgres?)"));
        }
        Ok::<(), Error>(())
    }
    .await;
    db.drop_database().await?;
    result
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = |w: &str| args.is_empty() || args.iter().any(|a| a == w);
    let http = common::client()?;
    println!("{}", common::machine());
    if run("w1") {
        w1(&http).await?;
    }
    if args.iter().any(|a| a == "w1-pg") {
        w1_pg(&http).await?;
    }
    if run("w2") {
        common::w2(&http, 10_000, &[], "in-memory store").await?;
    }
    if run("w3") {
        common::w3(&http, 20).await?;
    }
    Ok(())
}
