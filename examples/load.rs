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
//!
//! # W1 over HTTP and over HTTPS in one run, and their ratio (not part of the default set):
//! target/release/examples/load w1-tls
//!
//! # The admin dashboard at scale (not part of the default set); LABLINK_LOAD_PROGRAM
//! # names another `lablink` program to measure (an older build, for a before/after):
//! target/release/examples/load admin
//! ```
//!
//! - W1: 1,000 concurrent `POST /api/request_vm` against 1,000 ready VMs: throughput,
//!   p50/p99, and correctness afterwards (every participant got a distinct VM, none free).
//! - W2: 10,000 agents hold `/vm_startup`, then all are assigned: assignment→response
//!   latency (from the participant's answer to the waiter's answer) and server RSS.
//! - W3: telemetry posts (`/api/update_inuse_status`, `/api/gpu_health`, `POST
//!   /api/vm-status` in turn) at full rate for 20 s over 64 keep-alive connections: requests
//!   per second.
//! - W1-TLS: W1 on fresh identical servers, one plain and one serving HTTPS with a
//!   self-signed certificate made for the run, eleven rounds in alternating order, with two
//!   clients: a new connection (and full TLS handshake) per request, as 1,000 separate
//!   browsers make, and a keep-alive pool opened before the burst. Per run also the new
//!   connections the client opened, the server's CPU time and the machine's listen-queue
//!   overflows; then medians and the HTTPS/HTTP ratios (taken per round, then their median).
//! - Admin: 4,000 VMs, 20 live admin views (`/admin/events`), one VM changing every second
//!   for 30 s: the server's CPU use, `/healthz` latency sampled every 100 ms meanwhile, and
//!   the bytes each view received per second.
//!
//! The same workloads at scale, with two replicas, a soak and faults: `lablink-proof` (`scripts/proof.sh`).

// The workloads are the proof harness's (`lablink-proof`), which uses more of it.
use lablink_proof as common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Error, SelfSigned, Server, W1};
use futures::stream::{self, StreamExt};
use reqwest::Client;
use serde_json::json;

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

/// W1-TLS: W1 over HTTP and over HTTPS, `ROUNDS` rounds each in alternating order, for
/// each kind of client; prints every run, then the medians and the ratios.
async fn w1_tls() -> Result<(), Error> {
    const ROUNDS: usize = 11;
    let tls = SelfSigned::generate()?;
    for pooled in [false, true] {
        // runs[0] over HTTP, runs[1] over HTTPS.
        let mut runs: [Vec<TlsRun>; 2] = Default::default();
        for round in 0..ROUNDS {
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for https in order {
                runs[usize::from(https)].push(w1_tls_run(&tls, https, pooled).await?);
            }
        }
        let client = if pooled {
            "keep-alive pool opened before the burst"
        } else {
            "a new connection per request"
        };
        println!("W1 over HTTP and HTTPS, {ROUNDS} rounds, client: {client}");
        for (name, runs) in [("HTTP ", &runs[0]), ("HTTPS", &runs[1])] {
            let each =
                |f: fn(&TlsRun) -> String| runs.iter().map(f).collect::<Vec<_>>().join(" / ");
            println!(
                "  {name}: median {:.0} req/s, p50 {:.1} ms, p99 {:.1} ms, CPU server {:.0} ms, generator {:.0} ms (per run: {} req/s; {} new connections; {} listen overflows)",
                median(runs.iter().map(|r| r.w1.throughput)),
                median(runs.iter().map(|r| r.w1.p50.as_secs_f64() * 1e3)),
                median(runs.iter().map(|r| r.w1.p99.as_secs_f64() * 1e3)),
                median(runs.iter().map(|r| r.server_cpu * 1e3)),
                median(runs.iter().map(|r| r.client_cpu * 1e3)),
                each(|r| format!("{:.0}", r.w1.throughput)),
                each(|r| r.connects.to_string()),
                each(|r| r.overflows.to_string()),
            );
        }
        let rounds = || runs[0].iter().zip(&runs[1]);
        let ratios: Vec<f64> = rounds()
            .map(|(h, s)| s.w1.throughput / h.w1.throughput)
            .collect();
        let each: Vec<String> = ratios
            .iter()
            .map(|r| format!("{:.0}%", r * 100.0))
            .collect();
        println!(
            "  HTTPS/HTTP throughput: median {:.0}% (per round {}); p50 x{:.2}, p99 x{:.2}, server CPU x{:.2} (medians of the per-round ratios)",
            median(ratios.iter().copied()) * 100.0,
            each.join(" / "),
            median(rounds().map(|(h, s)| s.w1.p50.as_secs_f64() / h.w1.p50.as_secs_f64())),
            median(rounds().map(|(h, s)| s.w1.p99.as_secs_f64() / h.w1.p99.as_secs_f64())),
            median(rounds().map(|(h, s)| s.server_cpu / h.server_cpu)),
        );
    }
    Ok(())
}

/// What one W1 of W1-TLS measured, from the burst's start to the end of its checks.
struct TlsRun {
    w1: W1,
    /// New connections the participants' client opened.
    connects: usize,
    /// CPU time the server used, seconds.
    server_cpu: f64,
    /// CPU time this generator used (its side of the handshakes included), seconds.
    client_cpu: f64,
    /// Listen-queue overflows on this machine.
    overflows: u64,
}

/// One W1 of W1-TLS: a fresh server and a fresh client (no connection or TLS state carried
/// over), 1,000 VMs made ready through another client, the client's pool opened first if
/// `pooled`.
async fn w1_tls_run(tls: &SelfSigned, https: bool, pooled: bool) -> Result<TlsRun, Error> {
    const N: usize = 1_000;
    let setup = common::client_trusting(tls, true, &Arc::default())?;
    let server = if https {
        Server::start_https(&setup, tls).await?
    } else {
        Server::start_with(&setup, &[]).await?
    };
    server.ready_vms(&setup, N).await?;
    let connects = Arc::new(AtomicUsize::new(0));
    let client = common::client_trusting(tls, pooled, &connects)?;
    if pooled {
        // Open the pool's N connections about 100 at a time, so that no wave overflows the
        // server's listen queue (128): with k connections idle, k + 100 concurrent requests
        // open up to 100 more.
        for _ in 0..20 {
            let open = connects.load(Ordering::Relaxed);
            if open >= N {
                break;
            }
            let failed = stream::iter(0..(open + 100).min(N))
                .map(|_| async {
                    let response = client.get(server.url("/healthz")).send().await?;
                    response.bytes().await
                })
                .buffer_unordered(N)
                .filter(|r| std::future::ready(r.is_err()))
                .count()
                .await;
            if failed > 0 {
                return Err(format!("{failed} connections could not be opened before W1").into());
            }
        }
    }
    let what = format!(
        "{}, {}",
        if https { "HTTPS" } else { "HTTP" },
        if pooled {
            "keep-alive pool"
        } else {
            "new connection per request"
        }
    );
    let connects_before = connects.load(Ordering::Relaxed);
    let own_cpu = || common::process_cpu_seconds(std::process::id());
    let (server_cpu_before, client_cpu_before) = (server.cpu_seconds(), own_cpu());
    let overflows_before = common::listen_overflows();
    let w1 = common::w1_burst(&client, &[&server], N, &what).await?;
    let run = TlsRun {
        w1,
        connects: connects.load(Ordering::Relaxed) - connects_before,
        server_cpu: server.cpu_seconds() - server_cpu_before,
        client_cpu: own_cpu() - client_cpu_before,
        overflows: common::listen_overflows() - overflows_before,
    };
    println!(
        "  {} connections opened before the burst, then {} new ones; CPU: server {:.0} ms, generator {:.0} ms; {} listen overflows (from the burst's start to the end of its checks)",
        connects_before,
        run.connects,
        run.server_cpu * 1e3,
        run.client_cpu * 1e3,
        run.overflows
    );
    Ok(run)
}

/// The median of an odd number of values (the upper middle one of an even number).
/// The admin workload: see the module's docs.
async fn admin(http: &Client) -> Result<(), Error> {
    const VMS: usize = 4_000;
    const VIEWERS: usize = 20;
    const SECONDS: u64 = 30;
    let server = Server::start_with(http, &[]).await?;
    let hostnames = server.launch(http, VMS).await?;
    let received = Arc::new(AtomicUsize::new(0));
    let mut views = Vec::new();
    for _ in 0..VIEWERS {
        let response = http
            .get(server.url("/admin/events"))
            .basic_auth("admin", Some(common::PASSWORD))
            .send()
            .await?
            .error_for_status()?;
        let received = received.clone();
        views.push(tokio::spawn(async move {
            let mut body = response.bytes_stream();
            while let Some(Ok(chunk)) = body.next().await {
                received.fetch_add(chunk.len(), Ordering::Relaxed);
            }
        }));
    }
    // Every view has its first full picture before the measured window.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (cpu_before, bytes_before, started) = (
        server.cpu_seconds(),
        received.load(Ordering::Relaxed),
        Instant::now(),
    );
    let changes = async {
        for (second, hostname) in (0..SECONDS).zip(hostnames.iter().cycle()) {
            let health = if second % 2 == 0 {
                "Unhealthy"
            } else {
                "Healthy"
            };
            http.post(server.url("/api/gpu_health"))
                .json(&json!({"hostname": hostname, "gpu_status": health}))
                .send()
                .await?
                .error_for_status()?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok::<(), Error>(())
    };
    let probes = async {
        let mut latencies = Vec::new();
        while started.elapsed() < Duration::from_secs(SECONDS) {
            let sent = Instant::now();
            http.get(server.url("/healthz"))
                .send()
                .await?
                .error_for_status()?;
            latencies.push(sent.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok::<_, Error>(latencies)
    };
    let ((), mut latencies) = tokio::try_join!(changes, probes)?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = server.cpu_seconds() - cpu_before;
    let bytes = received.load(Ordering::Relaxed) - bytes_before;
    for view in views {
        view.abort();
    }
    latencies.sort();
    println!(
        "admin: {VMS} VMs, {VIEWERS} live views, a change per second, {wall:.1} s: server CPU {:.1}% of one core; /healthz p50 {}, p99 {}, max {} ({} probes); {:.0} bytes per view per second",
        100.0 * cpu / wall,
        common::ms(common::percentile(&latencies, 0.5)),
        common::ms(common::percentile(&latencies, 0.99)),
        common::ms(*latencies.last().ok_or("no probe")?),
        latencies.len(),
        bytes as f64 / wall / VIEWERS as f64,
    );
    Ok(())
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
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
    if args.iter().any(|a| a == "w1-tls") {
        w1_tls().await?;
    }
    if run("w2") {
        common::w2(&http, 10_000, &[], "in-memory store").await?;
    }
    if run("w3") {
        common::w3(&http, 20).await?;
    }
    if args.iter().any(|a| a == "admin") {
        admin(&http).await?;
    }
    Ok(())
}
