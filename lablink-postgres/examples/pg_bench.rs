//! Throughput and latency of the PostgreSQL backends, next to `pgbench` on the same server.
//!
//! ```sh
//! scripts/with-postgres.sh cargo run --release -p lablink-postgres --example pg_bench
//! ```
//!
//! Needs `DATABASE_URL` (a superuser on a server it may create a database on) and `pgbench`
//! on `PATH` or in `LABLINK_PG_BIN`. Prints Markdown tables. `pg_bench claims` runs only the
//! claim comparison.
//!
//! At each concurrency the claims and pgbench take turns, [`ROUNDS`] times (4,000 claims,
//! then `pgbench -T 3`), so both see the same load on a shared machine; the ratio is taken
//! per round and the median reported.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::stream::{self, StreamExt};
use lablink_core::testing::store::claim_request;
use lablink_core::{AgentToken, Allocator, LabLinkBuilder, Notifier, VmRecord, VmState, VmStore};
use lablink_postgres::{PgNotifier, PgVmStore};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};

const CLAIMS_PER_LEVEL: usize = 4000;
const ROUNDS: usize = 3;
const PGBENCH_SECONDS: u32 = 3;
const WAITERS: usize = 10_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| {
        "DATABASE_URL is not set: run under scripts/with-postgres.sh or point it at a server"
    })?;
    let admin: PgConnectOptions = url.parse()?;
    let db = format!("lablink_bench_{}", std::process::id());
    let mut conn = admin.connect().await?;
    conn.execute(format!("CREATE DATABASE {db}").as_str())
        .await?;
    let options = admin.clone().database(&db);
    let pool = PgPoolOptions::new()
        .max_connections(70)
        .connect_with(options.clone())
        .await?;
    lablink_postgres::setup(&pool).await?;
    pool.execute(
        "CREATE TABLE bench_one (id int PRIMARY KEY, n bigint NOT NULL); \
                  INSERT INTO bench_one SELECT g, 0 FROM generate_series(1, 1000) g",
    )
    .await?;
    let store = PgVmStore::new(pool.clone());

    println!(
        "| concurrency | PgVmStore claims/s, median (rounds) | pgbench single-row UPDATE tps, median (rounds) | ratio, median (rounds) |"
    );
    println!("|---:|---:|---:|---:|");
    let mut client_cpu = Vec::new();
    for concurrency in [1, 16, 64] {
        let mut claims = Vec::with_capacity(ROUNDS);
        let mut tps = Vec::with_capacity(ROUNDS);
        let mut ratios = Vec::with_capacity(ROUNDS);
        let mut cpu = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let (c, ticks) = claims_per_second(&store, &pool, concurrency).await?;
            cpu.push(ticks);
            let t = pgbench(&url, &db, concurrency)?;
            claims.push(c);
            tps.push(t);
            ratios.push(100.0 * c / t);
        }
        let list = |v: &[f64], unit: &str| {
            v.iter()
                .map(|x| format!("{x:.0}{unit}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "| {concurrency} | {:.0} ({}) | {:.0} ({}) | **{:.0}%** ({}) |",
            median(&claims),
            list(&claims, ""),
            median(&tps),
            list(&tps, ""),
            median(&ratios),
            list(&ratios, "%"),
        );
        client_cpu.push((concurrency, cpu));
    }

    // The bench process's own CPU time while it claimed.
    for (concurrency, ticks) in client_cpu {
        let ms: Vec<String> = ticks.iter().map(|t| format!("{}", t * 10)).collect();
        println!(
            "client CPU (user+sys) at {concurrency}: {} ms per round of {CLAIMS_PER_LEVEL} claims",
            ms.join(" / ")
        );
    }

    if std::env::args().nth(1).as_deref() != Some("claims") {
        waiter_latency(&pool, &options).await?;
    }
    drop(pool);
    conn.execute(format!("DROP DATABASE {db} WITH (FORCE)").as_str())
        .await?;
    Ok(())
}

async fn reseed(
    store: &PgVmStore,
    pool: &PgPool,
    n: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    pool.execute("TRUNCATE lablink_vms CASCADE").await?;
    let now = Utc::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(2000) {
        let records: Vec<VmRecord> = chunk
            .iter()
            .map(|i| {
                let mut r = VmRecord::new(
                    format!("vm-{i:06}").parse().unwrap(),
                    Some(AgentToken::generate().digest()),
                    now,
                );
                r.state = VmState::Available;
                r
            })
            .collect();
        store.insert(&records).await?;
    }
    pool.execute("VACUUM ANALYZE lablink_vms").await?;
    Ok(())
}

async fn claims_per_second(
    store: &PgVmStore,
    pool: &PgPool,
    concurrency: usize,
) -> Result<(f64, u64), Box<dyn std::error::Error>> {
    reseed(store, pool, CLAIMS_PER_LEVEL).await?;
    let ticks = cpu_ticks();
    let started = Instant::now();
    let results: Vec<_> = stream::iter(0..CLAIMS_PER_LEVEL)
        .map(|i| async move {
            store
                .claim(&claim_request(&format!("p{i}")), Utc::now())
                .await
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let ticks = cpu_ticks().saturating_sub(ticks);
    for r in results {
        r?;
    }
    Ok((CLAIMS_PER_LEVEL as f64 / elapsed.as_secs_f64(), ticks))
}

/// utime + stime of this process, in clock ticks (1/100 s).
fn cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which is in parentheses).
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn pgbench(url: &str, db: &str, concurrency: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let script = std::env::temp_dir().join(format!("lablink-pgbench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "\\set id random(1, 1000)\nUPDATE bench_one SET n = n + 1 WHERE id = :id;\n",
    )?;
    let bin = std::env::var("LABLINK_PG_BIN")
        .map(|d| PathBuf::from(d).join("pgbench"))
        .unwrap_or_else(|_| PathBuf::from("pgbench"));
    let target = url
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{db}"))
        .unwrap();
    let out = Command::new(&bin)
        .args(["-n", "-j", "2", "-T"])
        .arg(PGBENCH_SECONDS.to_string())
        .arg(format!("-c{concurrency}"))
        .arg("-f")
        .arg(&script)
        .arg(&target)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| {
            format!(
                "no tps in pgbench output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok(tps)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn waiter_latency(
    pool: &PgPool,
    options: &PgConnectOptions,
) -> Result<(), Box<dyn std::error::Error>> {
    let store = PgVmStore::new(pool.clone());
    reseed(&store, pool, WAITERS).await?;
    let notifier_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.clone())
        .await?;
    let notifier = PgNotifier::connect(notifier_pool).await?;
    let lablink = LabLinkBuilder::new()
        .with_store(Arc::new(store))
        .with_notifier(Arc::new(notifier.clone()) as Arc<dyn Notifier>)
        .build()?;
    let rss_before = rss_kib();
    let mut waiters = Vec::with_capacity(WAITERS);
    for i in 0..WAITERS {
        let h: lablink_core::Hostname = format!("vm-{i:06}").parse()?;
        let lablink = lablink.clone();
        waiters.push(tokio::spawn(async move {
            let a = lablink
                .wait_for_assignment(&h, Duration::from_secs(120))
                .await;
            (Instant::now(), a)
        }));
    }
    while notifier.subscribed_hostnames() < WAITERS {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_waiting = rss_kib();

    // Assign every VM (16 at a time) the way `LabLink::request_vm` does (claim, then
    // publish), remembering when each claim started and when it had committed (the claim is
    // one auto-committed statement, so its return is the commit).
    let store = PgVmStore::new(pool.clone());
    let timed: Vec<(lablink_core::Hostname, Instant, Instant)> = stream::iter(0..WAITERS)
        .map(|i| {
            let (store, notifier) = (&store, &notifier);
            async move {
                let c = claim_request(&format!("w{i}"));
                let started = Instant::now();
                let claimed = store.claim(&c, Utc::now()).await.expect("a VM");
                let committed = Instant::now();
                assert!(claimed.newly_assigned);
                notifier
                    .publish(&claimed.record.hostname)
                    .await
                    .expect("publish");
                (claimed.record.hostname, started, committed)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let timed: std::collections::HashMap<_, _> = timed
        .into_iter()
        .map(|(h, started, committed)| (h, (started, committed)))
        .collect();
    let mut latencies = Vec::with_capacity(WAITERS);
    let mut from_start = Vec::with_capacity(WAITERS);
    for (i, w) in waiters.into_iter().enumerate() {
        let (woken, a) = w.await?;
        a?.ok_or("a waiter was not woken")?;
        let h: lablink_core::Hostname = format!("vm-{i:06}").parse()?;
        let (started, committed) = timed[&h];
        latencies.push(woken.saturating_duration_since(committed));
        from_start.push(woken.saturating_duration_since(started));
    }
    from_start.sort();
    latencies.sort();
    println!();
    println!("| {WAITERS} waiters | value |");
    println!("|---|---:|");
    for (what, sorted) in [
        ("claim committed → waiter woken", &latencies),
        ("claim started → waiter woken", &from_start),
    ] {
        for p in [0.5, 0.99] {
            println!(
                "| {what}, p{:.0} | {:.2} ms |",
                p * 100.0,
                percentile(sorted, p).as_secs_f64() * 1e3
            );
        }
        println!(
            "| {what}, max | {:.2} ms |",
            sorted.last().unwrap().as_secs_f64() * 1e3
        );
    }
    println!("| RSS before waiters | {} MiB |", rss_before / 1024);
    println!(
        "| RSS holding {WAITERS} waiters | {} MiB |",
        rss_waiting / 1024
    );
    println!(
        "| RSS per waiter | {:.1} KiB |",
        (rss_waiting.saturating_sub(rss_before)) as f64 / WAITERS as f64
    );
    Ok(())
}
