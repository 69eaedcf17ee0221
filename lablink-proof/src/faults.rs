//! The faults the soak injects, each with its effect and recovery time measured: kill -9 of
//! a replica, the LISTEN connection terminated, PostgreSQL restarted, an agent paused past
//! its lease, 20% of launches failing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::Client;
use serde_json::Value;

#[allow(unused_imports)]
use crate::*;

/// One fault's outcome.
pub struct Fault {
    pub name: &'static str,
    pub effect: String,
    pub recovery: Duration,
    pub ok: bool,
}

/// Polls `probe` every 50 ms until it is true, for at most `limit`; the time it took.
pub async fn until<F, Fut>(limit: Duration, mut probe: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if probe().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Whether `base` answers a request that needs the store.
pub async fn store_answers(http: &Client, base: &str) -> bool {
    matches!(
        http.get(format!("{base}/api/unassigned_vms_count"))
            .timeout(Duration::from_secs(5))
            .send()
            .await,
        Ok(r) if r.status().is_success()
    )
}

pub async fn vm_state(http: &Client, base: &str, hostname: &str) -> Option<Value> {
    let r = http
        .get(format!("{base}/api/v1/vms/{hostname}"))
        .basic_auth("admin", Some(PASSWORD))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

pub async fn listen_backends(db: &crate::Database) -> Result<Vec<i32>, Error> {
    let mut conn = db.connect().await?;
    let pids: Vec<(i32,)> = sqlx::query_as(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query ILIKE 'listen%' ORDER BY pid",
    )
    .bind(&db.name)
    .fetch_all(&mut conn)
    .await?;
    Ok(pids.into_iter().map(|(p,)| p).collect())
}

pub fn effect_window(record: &Record, from: Instant, to: Instant) -> String {
    format!(
        "{} participant calls and {} agent calls failed (all retried)",
        count_in(&record.participant_errors, from, to),
        count_in(&record.agent_errors, from, to)
    )
}

/// kill -9 of replica B; restarted after 1 s (as a process supervisor would).
pub async fn fault_kill(http: &Client, servers: &mut [Server], record: &Record) -> Fault {
    let t0 = Instant::now();
    servers[1].kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let respawned = servers[1].respawn();
    let up = match respawned {
        Ok(()) => servers[1].wait_up(http).await.is_ok(),
        Err(_) => false,
    };
    let base = servers[1].base().to_owned();
    let serving = up
        && until(Duration::from_secs(60), || store_answers(http, &base))
            .await
            .is_some();
    let recovery = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    Fault {
        name: "kill -9 one replica (restarted after 1 s)",
        effect: effect_window(record, t0, t0 + recovery + Duration::from_secs(1)),
        recovery,
        ok: serving,
    }
}

/// `pg_terminate_backend` on every backend running LISTEN (one per replica).
pub async fn fault_listen(db: &crate::Database, record: &Record) -> Fault {
    let before = listen_backends(db).await.unwrap_or_default();
    let t0 = Instant::now();
    let terminated = async {
        let mut conn = db.connect().await?;
        for pid in &before {
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .execute(&mut conn)
                .await?;
        }
        Ok::<(), Error>(())
    }
    .await;
    let back = until(Duration::from_secs(60), || async {
        let now = listen_backends(db).await.unwrap_or_default();
        now.len() >= before.len() && now.iter().all(|p| !before.contains(p))
    })
    .await;
    let recovery = back.unwrap_or(t0.elapsed());
    Fault {
        name: "LISTEN connection terminated (pg_terminate_backend)",
        effect: format!(
            "{} LISTEN backends terminated; {}",
            before.len(),
            effect_window(record, t0, t0 + recovery + Duration::from_secs(1))
        ),
        recovery,
        ok: terminated.is_ok() && back.is_some() && before.len() == 2,
    }
}

/// `pg_ctl restart -m fast` on the throwaway cluster.
pub async fn fault_pg_restart(
    http: &Client,
    bases: &[String],
    db: &crate::Database,
    record: &Record,
) -> Fault {
    let (Ok(data), Ok(bin)) = (
        std::env::var("LABLINK_PG_DATA"),
        std::env::var("LABLINK_PG_BIN"),
    ) else {
        return Fault {
            name: "PostgreSQL restarted",
            effect: "not run: LABLINK_PG_DATA / LABLINK_PG_BIN are not set (run under scripts/with-postgres.sh without DATABASE_URL)".into(),
            recovery: Duration::ZERO,
            ok: false,
        };
    };
    let before = listen_backends(db).await.unwrap_or_default().len();
    let pg_ctl = format!("{bin}/pg_ctl");
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &pg_ctl]);
        c
    } else {
        Command::new(&pg_ctl)
    };
    command
        .args(["-D", &data, "-m", "fast", "-w", "-t", "60", "restart"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let restarted = tokio::task::spawn_blocking(move || command.status())
        .await
        .ok()
        .and_then(Result::ok)
        .is_some_and(|s| s.success());
    let pg_down = t0.elapsed();
    let serving = until(Duration::from_secs(90), || async {
        for base in bases {
            if !store_answers(http, base).await {
                return false;
            }
        }
        listen_backends(db).await.unwrap_or_default().len() >= before
    })
    .await;
    let recovery = serving.map_or(t0.elapsed(), |_| t0.elapsed());
    Fault {
        name: "PostgreSQL restarted (pg_ctl restart -m fast)",
        effect: format!(
            "restart took {:.1} s; {}",
            pg_down.as_secs_f64(),
            effect_window(record, t0, t0 + recovery + Duration::from_secs(1))
        ),
        recovery,
        ok: restarted && serving.is_some(),
    }
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

pub fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// The agent paused by [`fault_pause`], and when.
#[derive(Clone)]
pub struct Pause {
    pub hostname: String,
    /// SIGSTOP.
    pub stopped: Instant,
    /// When the generator saw the VM unhealthy (none: never).
    pub unhealthy: Option<Instant>,
    /// SIGCONT.
    pub resumed: Instant,
}

/// SIGSTOP one real agent whose VM is free, past its lease; then SIGCONT. The supervisor
/// must mark the VM unhealthy, and the agent's next report must bring it back. (That no
/// participant was answered with the VM while it was unhealthy is checked at the end.)
pub async fn fault_pause(
    http: &Client,
    base: &str,
    cloud: &Cloud,
    heartbeat: u64,
    paused: &Mutex<Option<Pause>>,
) -> Fault {
    let name = "agent paused (SIGSTOP) past its lease, then SIGCONT";
    let mut chosen = None;
    for h in cloud.real_hostnames() {
        if let Some(vm) = vm_state(http, base, &h).await {
            if vm["state"] == "available" {
                chosen = Some(h);
                break;
            }
        }
    }
    let Some(hostname) = chosen else {
        return Fault {
            name,
            effect: "no real agent with a free VM to pause".into(),
            recovery: Duration::ZERO,
            ok: false,
        };
    };
    let Some(pid) = cloud.real_pid(&hostname) else {
        return Fault {
            name,
            effect: "the agent process is gone".into(),
            recovery: Duration::ZERO,
            ok: false,
        };
    };
    let lease = Duration::from_secs(3 * heartbeat);
    let t0 = Instant::now();
    signal(pid, "-STOP");
    let detected = until(lease + Duration::from_secs(30), || async {
        vm_state(http, base, &hostname)
            .await
            .is_some_and(|vm| vm["state"] == "unhealthy")
    })
    .await;
    let unhealthy = detected.map(|_| Instant::now());
    // Paused for at least the lease plus two intervals.
    let resume_at = t0 + lease + Duration::from_secs(2 * heartbeat);
    tokio::time::sleep_until(resume_at.into()).await;
    let t1 = Instant::now();
    signal(pid, "-CONT");
    *paused.lock().unwrap() = Some(Pause {
        hostname: hostname.clone(),
        stopped: t0,
        unhealthy,
        resumed: t1,
    });
    let recovered = until(Duration::from_secs(60), || async {
        vm_state(http, base, &hostname)
            .await
            .is_some_and(|vm| vm["state"] == "available" || vm["state"] == "assigned")
    })
    .await;
    Fault {
        name,
        effect: format!(
            "{hostname} marked unhealthy {} after the pause (lease {} s), paused {:.1} s",
            detected.map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
            lease.as_secs(),
            (t1 - t0).as_secs_f64()
        ),
        recovery: recovered.unwrap_or(t1.elapsed()),
        ok: detected.is_some() && recovered.is_some(),
    }
}

/// 20% of launches fail: `count` VMs launched in batches of 5 while the override file says
/// 0.2; then the shortfall is launched again with the fault cleared, and recovery is the
/// time until those VMs are free (their agents booted and reported).
pub async fn fault_provisioner(
    http: &Client,
    server: &Server,
    dir: &Path,
    count: usize,
    failed_vms: &Mutex<Vec<String>>,
) -> Fault {
    let name = "provisioner fails 20% of launches";
    let file = dir.join(lablink_core::fake::FAILURE_RATE_FILE);
    if std::fs::write(&file, "0.2").is_err() {
        return Fault {
            name,
            effect: "cannot write the failure-rate file".into(),
            recovery: Duration::ZERO,
            ok: false,
        };
    }
    let mut launched = Vec::new();
    let mut asked = 0;
    let mut launch_errors = 0;
    while asked < count {
        let n = 5.min(count - asked);
        asked += n;
        match server.launch(http, n).await {
            Ok(hostnames) => launched.extend(hostnames),
            Err(_) => launch_errors += 1,
        }
    }
    let _ = std::fs::remove_file(&file);
    let t1 = Instant::now();
    // The VMs whose launch failed, as the allocator records them.
    let mut failed = Vec::new();
    for h in &launched {
        if vm_state(http, server.base(), h)
            .await
            .is_some_and(|vm| vm["state"] == "failed")
        {
            failed.push(h.clone());
        }
    }
    failed_vms.lock().unwrap().extend(failed.iter().cloned());
    // Without a failed launch the fault was not injected (at 20% of 50 launches, all 50
    // succeed with probability 0.8^50, about 1 in 70,000).
    let created = launched.len() - failed.len();
    let shortfall = count - created;
    let replaced = if shortfall > 0 {
        server.launch(http, shortfall).await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let ready = until(Duration::from_secs(120), || async {
        let mut all = true;
        for h in &replaced {
            let state = vm_state(http, server.base(), h).await;
            all &= state.is_some_and(|vm| vm["state"] != "booting" && vm["state"] != "requested");
        }
        all
    })
    .await;
    Fault {
        name,
        effect: format!(
            "{} of {count} VM launches failed ({:.0}%; {launch_errors} launch calls failed outright), each recorded as failed and never assigned (checked at the end); the shortfall relaunched once the fault cleared",
            count - created,
            (count - created) as f64 * 100.0 / count as f64,
        ),
        recovery: ready.map_or(t1.elapsed(), |_| t1.elapsed()),
        ok: !failed.is_empty() && ready.is_some() && replaced.len() == shortfall,
    }
}
