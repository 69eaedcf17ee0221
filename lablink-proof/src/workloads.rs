//! The workloads: W1 (assignment burst), W2 (held waiters), W3 (telemetry), and the
//! proof's `workloads` part (W1 and W2 with PostgreSQL, W1 on two replicas, W3).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use reqwest::Client;
use serde_json::{json, Value};

#[allow(unused_imports)]
use crate::*;

/// The `p`-quantile of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Milliseconds, two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// What a W1 run measured.
#[derive(Debug)]
pub struct W1 {
    /// Requests per second.
    pub throughput: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

/// W1: `n` ready VMs, then `n` concurrent participants, spread round-robin over `servers`
/// (replicas on one database); afterwards every participant must hold a distinct VM, none
/// may be free, and a participant asking again must get its own VM back.
pub async fn w1_on(http: &Client, servers: &[&Server], n: usize, what: &str) -> Result<W1, Error> {
    servers[0].ready_vms(http, n).await?;
    w1_burst(http, servers, n, what).await
}

/// W1 without its set-up: the burst and its checks, once `n` VMs are ready.
pub async fn w1_burst(
    http: &Client,
    servers: &[&Server],
    n: usize,
    what: &str,
) -> Result<W1, Error> {
    let start = Instant::now();
    let mut results: Vec<Timed> = stream::iter(0..n)
        .map(|i| async move {
            let t = Instant::now();
            let r = servers[i % servers.len()].request_vm(http, i, None).await;
            (i, t.elapsed(), r)
        })
        .buffer_unordered(n)
        .collect()
        .await;
    let wall = start.elapsed();
    results.sort_by_key(|(i, _, _)| *i);
    let mut latencies: Vec<Duration> = results.iter().map(|(_, d, _)| *d).collect();
    latencies.sort();
    let hostnames: HashSet<String> = results
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().ok().map(|g| g.hostname.clone()))
        .collect();
    let failures = results.iter().filter(|(_, _, r)| r.is_err()).count();
    let mut free = Vec::new();
    for s in servers {
        let count: Value = http
            .get(s.url("/api/unassigned_vms_count"))
            .send()
            .await?
            .json()
            .await?;
        free.push(count["count"].as_u64());
    }
    // One participant asks again, through the last server: it must get its own VM back.
    let repeat = 7.min(n - 1);
    let first = results[repeat].2.as_ref().ok();
    let own = first.map(|g| g.hostname.clone());
    let cookie = first.and_then(|g| g.cookie.as_deref());
    let again = servers[servers.len() - 1]
        .request_vm(http, repeat, cookie)
        .await?
        .hostname;
    let rejoined = own.as_deref() == Some(again.as_str());
    let result = W1 {
        throughput: n as f64 / wall.as_secs_f64(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
    };
    println!("W1 assignment burst ({what}): {n} concurrent POST /api/request_vm");
    println!(
        "  wall {:.3} s, throughput {:.0} req/s, p50 {}, p99 {}, max {}",
        wall.as_secs_f64(),
        result.throughput,
        ms(result.p50),
        ms(result.p99),
        ms(percentile(&latencies, 1.0))
    );
    println!(
        "  correctness: {} ok, {failures} failed, {} distinct VMs, free as seen by each server {free:?}, participant {repeat} asked again and got {again} (its own: {})",
        n - failures,
        hostnames.len(),
        own.as_deref().unwrap_or("none"),
    );
    if failures != 0 || hostnames.len() != n || free.iter().any(|f| *f != Some(0)) {
        return Err("W1 correctness: not every participant got a distinct VM".into());
    }
    if !rejoined {
        return Err(format!(
            "W1 correctness: participant {repeat} asked again and got {again}, not its own VM"
        )
        .into());
    }
    Ok(result)
}

/// What a W2 run measured.
#[derive(Debug)]
pub struct W2 {
    /// Assignment → waiter's answer, 99th percentile.
    pub p99: Duration,
    /// Server RSS with every waiter held, MiB.
    pub rss_held_mib: f64,
}

/// W2: `n` agents hold `/vm_startup`, then all are assigned: assignment→response latency
/// and server RSS. The server runs with `env` (none: the in-memory store), described as
/// `what`.
pub async fn w2(http: &Client, n: usize, env: &[(&str, &str)], what: &str) -> Result<W2, Error> {
    let server = Server::start_with(http, env).await?;
    let hostnames = server.ready_vms(http, n).await?;
    let rss_idle = server.rss_mib();
    let waiters: Vec<_> = hostnames
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let req = http
                .post(server.url("/vm_startup"))
                .json(&json!({"hostname": h}))
                .timeout(Duration::from_secs(900));
            let h = h.clone();
            tokio::spawn(async move {
                // Stagger connects so the listen backlog is not flooded.
                tokio::time::sleep(Duration::from_millis((i / 250) as u64 * 20)).await;
                let r = req.send().await;
                let at = Instant::now();
                let ok = match r {
                    Ok(r) if r.status().is_success() => r
                        .json::<Value>()
                        .await
                        .map(|b| b["status"] == "success")
                        .unwrap_or(false),
                    _ => false,
                };
                (h, at, ok)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let text = http
            .get(server.url("/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let held = text
            .lines()
            .find_map(|l| l.strip_prefix("lablink_waiters "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if held >= n {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("W2: only {held} of {n} waiters held after 300 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_held = server.rss_mib();
    let assigned_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let start = Instant::now();
    let unserved = stream::iter(0..n)
        .map(|i| {
            let (server, assigned_at) = (&server, assigned_at.clone());
            async move {
                match server.request_vm(http, i, None).await {
                    Ok(granted) => {
                        assigned_at
                            .lock()
                            .unwrap()
                            .insert(granted.hostname, Instant::now());
                        0
                    }
                    Err(_) => 1,
                }
            }
        })
        .buffer_unordered(256)
        .fold(0, |a, b| async move { a + b })
        .await;
    let assign_wall = start.elapsed();
    let mut latencies = Vec::with_capacity(n);
    let mut failed = 0;
    for w in waiters {
        let (h, at, ok) = w.await?;
        failed += usize::from(!ok);
        if let Some(assigned) = assigned_at.lock().unwrap().get(&h) {
            latencies.push(at.saturating_duration_since(*assigned));
        }
    }
    latencies.sort();
    println!(
        "W2 {n} waiters on /vm_startup, then all assigned (256 participants at a time; {what})"
    );
    println!("  server RSS: {rss_idle:.1} MiB with {n} ready VMs, {rss_held:.1} MiB with {n} waiters held ({:.1} KiB per waiter)", (rss_held - rss_idle) * 1024.0 / n as f64);
    println!("  assigning all took {:.3} s; assignment→response p50 {}, p99 {}, max {}; {failed} waiters failed, {unserved} participants unserved", assign_wall.as_secs_f64(), ms(percentile(&latencies, 0.5)), ms(percentile(&latencies, 0.99)), ms(percentile(&latencies, 1.0)));
    if failed != 0 || unserved != 0 {
        return Err("W2: not every waiter got its assignment".into());
    }
    Ok(W2 {
        p99: percentile(&latencies, 0.99),
        rss_held_mib: rss_held,
    })
}

/// W3: telemetry posts at full rate for `seconds` over 64 keep-alive connections, each
/// connection rotating over `/api/update_inuse_status`, `/api/gpu_health` and
/// `/api/vm-status`; returns the requests per second.
pub async fn w3(http: &Client, seconds: u64) -> Result<f64, Error> {
    const VMS: usize = 64;
    let server = Server::start_with(http, &[]).await?;
    let hostnames = Arc::new(server.ready_vms(http, VMS).await?);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let tasks: Vec<_> = (0..VMS)
        .map(|i| {
            let (http, in_use, gpu, status, h) = (
                http.clone(),
                server.url("/api/update_inuse_status"),
                server.url("/api/gpu_health"),
                server.url("/api/vm-status"),
                hostnames[i].clone(),
            );
            tokio::spawn(async move {
                let (mut ok, mut bad, mut n) = (0u64, 0u64, 0u64);
                while Instant::now() < deadline {
                    n += 1;
                    let req = match n % 3 {
                        0 => http
                            .post(&in_use)
                            .json(&json!({"hostname": h, "status": n % 2 == 0})),
                        1 => http
                            .post(&gpu)
                            .json(&json!({"hostname": h, "gpu_status": "Healthy"})),
                        _ => http
                            .post(&status)
                            .json(&json!({"hostname": h, "status": "running"})),
                    };
                    let r = req.send().await;
                    match r {
                        Ok(r) if r.status().is_success() => ok += 1,
                        _ => bad += 1,
                    }
                }
                (ok, bad)
            })
        })
        .collect();
    let (mut ok, mut bad) = (0, 0);
    for t in tasks {
        let (o, b) = t.await?;
        ok += o;
        bad += b;
    }
    let wall = start.elapsed().as_secs_f64();
    let rate = ok as f64 / wall;
    println!(
        "W3 telemetry posts (in-use, GPU health, VM status in turn) for {seconds} s over {VMS} keep-alive connections (in-memory store)"
    );
    println!(
        "  {ok} ok, {bad} failed: {rate:.0} req/s; server RSS {:.1} MiB",
        server.rss_mib()
    );
    if bad != 0 {
        return Err(format!("W3: {bad} telemetry posts failed").into());
    }
    Ok(rate)
}

/// Settings of a replica on `db` (and the shared inventory `dir`, if any).
pub fn replica_env(db: &str, dir: Option<&Path>, heartbeat: u64) -> Vec<(String, String)> {
    let mut env = vec![
        ("LABLINK_DATABASE__URL", db.to_owned()),
        ("LABLINK_DATABASE__MAX_CONNECTIONS", "20".to_owned()),
        ("LABLINK_ALLOCATOR__MAX_WAIT", "10".to_owned()),
        ("LABLINK_ALLOCATOR__SUPERVISOR__TICK", "1".to_owned()),
        (
            "LABLINK_ALLOCATOR__SUPERVISOR__LEADER_LEASE",
            "5".to_owned(),
        ),
        (
            "LABLINK_ALLOCATOR__SUPERVISOR__LEASES__HEARTBEAT_INTERVAL",
            heartbeat.to_string(),
        ),
        (
            "LABLINK_ALLOCATOR__SUPERVISOR__LEASES__MISSED_INTERVALS",
            "3".to_owned(),
        ),
        (
            "LABLINK_ALLOCATOR__SUPERVISOR__LADDER__UNHEALTHY_GRACE",
            "300".to_owned(),
        ),
        (
            "LABLINK_ALLOCATOR__SUPERVISOR__RECONCILE__INTERVAL",
            "30".to_owned(),
        ),
    ];
    if let Some(dir) = dir {
        env.push((
            "LABLINK_PROVISIONER__INVENTORY_DIR",
            dir.display().to_string(),
        ));
    }
    env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

pub async fn start_replica(
    http: &Client,
    env: &[(String, String)],
    log: Option<&Path>,
) -> Result<Server, Error> {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start_logged(http, &env, log).await
}

/// W1 with PostgreSQL (one replica, then two), W2 with PostgreSQL, W3; each target's verdict.
pub async fn workloads(http: &Client, profile: &Profile) -> Result<(), Error> {
    println!("\n== workloads ==");
    let mut w1 = Vec::new();
    for replicas in [1, 2] {
        let db = crate::create_database("lablink_proof_w1").await?;
        let result = async {
            let env = replica_env(&db.url, None, 30);
            let mut servers = Vec::new();
            for _ in 0..replicas {
                servers.push(start_replica(http, &env, None).await?);
            }
            let refs: Vec<&Server> = servers.iter().collect();
            let what = if replicas == 1 {
                "PostgreSQL, one replica".to_owned()
            } else {
                format!("PostgreSQL, {replicas} replicas on one database, round-robin")
            };
            let measured = crate::w1_on(http, &refs, profile.w1, &what).await?;
            let mut conn = db.connect().await?;
            let (assigned, emails): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(DISTINCT email) FROM lablink_vms WHERE state = 'assigned'",
            )
            .fetch_one(&mut conn)
            .await?;
            println!("  in PostgreSQL: {assigned} VMs assigned, to {emails} distinct emails");
            if (assigned, emails) != (profile.w1 as i64, profile.w1 as i64) {
                return Err(Error::from(
                    "W1: the database does not hold one distinct assignment per participant",
                ));
            }
            Ok::<_, Error>(measured)
        }
        .await;
        db.drop_database().await?;
        w1.push(result?);
    }
    // W2 on its own database, with the server's defaults otherwise (waits up to 600 s).
    let db = crate::create_database("lablink_proof_w2").await?;
    let w2 = crate::w2(
        http,
        profile.w2,
        &[
            ("LABLINK_DATABASE__URL", db.url.as_str()),
            ("LABLINK_DATABASE__MAX_CONNECTIONS", "20"),
        ],
        "PostgreSQL store and notifier",
    )
    .await;
    db.drop_database().await?;
    let w2 = w2?;
    let w3 = crate::w3(http, profile.w3_seconds).await?;

    println!("\n  targets (reported, not enforced: the machine is shared):");
    for (replicas, w) in ["one replica", "two replicas"].iter().zip(&w1) {
        crate::verdict(
            &format!("W1 >= 2,000 req/s ({replicas}, PostgreSQL)"),
            &format!("{:.0} req/s", w.throughput),
            w.throughput >= 2_000.0,
        );
    }
    crate::verdict(
        "W2 assignment->answer p99 <= 50 ms",
        &ms(w2.p99),
        w2.p99 <= Duration::from_millis(50),
    );
    crate::verdict(
        &format!("W2 server RSS <= 200 MB with {} waiters", profile.w2),
        &format!("{:.1} MiB", w2.rss_held_mib),
        w2.rss_held_mib * 1024.0 * 1024.0 <= 200e6,
    );
    crate::verdict(
        "W3 >= 10,000 req/s",
        &format!("{w3:.0} req/s"),
        w3 >= 10_000.0,
    );
    Ok(())
}
