//! PostgreSQL restarted in the middle of a workshop rush. This test starts its own cluster
//! (it needs `initdb` and `pg_ctl`: `LABLINK_PG_BIN` / `PG_BIN`, else the newest
//! `/usr/lib/postgresql/*/bin`), so restarting it disturbs no other test.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use lablink_core::{Allocator, ErrorKind, LabLinkBuilder, Notifier, VmStore};
use lablink_postgres::{PgNotifier, PgVmStore};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use common::{request, seed_available, who};

/// A throwaway PostgreSQL cluster owned by this test.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `program` run as the `postgres` user when we are root (PostgreSQL refuses root).
fn as_pg(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pg_bin() -> PathBuf {
    for var in ["LABLINK_PG_BIN", "PG_BIN"] {
        if let Ok(dir) = std::env::var(var) {
            return PathBuf::from(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    found.pop().expect(
        "this test starts its own PostgreSQL and needs initdb/pg_ctl: set LABLINK_PG_BIN \
         (or PG_BIN) to their directory, or install PostgreSQL under /usr/lib/postgresql",
    )
}

impl Cluster {
    fn start() -> Self {
        let bin = pg_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres").arg(dir.path());
                    c
                },
                "chown",
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut initdb = as_pg(&bin.join("initdb"));
        initdb
            .args(["--auth=trust", "--username=postgres", "-D"])
            .arg(dir.path().join("data"));
        run(initdb, "initdb");
        let cluster = Self { dir, bin, port };
        cluster.pg_ctl_start();
        cluster
    }

    fn pg_ctl(&self) -> Command {
        let mut c = as_pg(&self.bin.join("pg_ctl"));
        c.arg("-D").arg(self.dir.path().join("data"));
        c
    }

    fn pg_ctl_start(&self) {
        let mut c = self.pg_ctl();
        c.arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                self.port,
                self.dir.path().display()
            ))
            .arg("start");
        run(c, "pg_ctl start");
    }

    fn stop(&self) {
        let mut c = self.pg_ctl();
        c.args(["-m", "fast", "-w", "stop"]);
        run(c, "pg_ctl stop");
    }

    fn options(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .database("postgres")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl().args(["-m", "immediate", "stop"]).output();
    }
}

/// 400 participants over 300 VMs while the server goes down for two seconds: the store
/// answers retryable `Unavailable` errors meanwhile, then recovers; in the end every VM has
/// exactly one owner, nobody has two, and every waiting agent got its assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_loses_and_duplicates_no_assignment() {
    let cluster = Cluster::start();
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(cluster.options())
        .await
        .expect("connect to the test cluster");
    lablink_postgres::setup(&pool).await.expect("migrations");
    let store = Arc::new(PgVmStore::new(pool.clone()));
    let hosts = seed_available(store.as_ref(), 300).await;
    let notifier = PgNotifier::connect(pool.clone()).await.unwrap();
    let lablink = LabLinkBuilder::new()
        .with_store(store.clone())
        .with_notifier(Arc::new(notifier.clone()) as Arc<dyn Notifier>)
        .build()
        .unwrap();

    // Agents wait; an agent whose wait fails (database down) simply asks again.
    let waiters: Vec<_> = hosts
        .iter()
        .map(|h| {
            let (lablink, h) = (lablink.clone(), h.clone());
            tokio::spawn(async move {
                loop {
                    match lablink
                        .wait_for_assignment(&h, Duration::from_secs(120))
                        .await
                    {
                        Ok(Some(a)) => return (h, a),
                        Ok(None) => panic!("{h}: not woken within the wait"),
                        Err(e) if e.is_retryable() => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        Err(e) => panic!("{h}: {e}"),
                    }
                }
            })
        })
        .collect();
    while notifier.subscribed_hostnames() < hosts.len() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Participants keep asking until they get a VM or hear there is none; every other
    // error must be retryable.
    let granted_so_far = Arc::new(AtomicUsize::new(0));
    let retryable_errors = Arc::new(AtomicUsize::new(0));
    let participants = {
        let (lablink, granted, errors) = (
            lablink.clone(),
            granted_so_far.clone(),
            retryable_errors.clone(),
        );
        tokio::spawn(async move {
            stream::iter(0..400)
                .map(|i| {
                    let (lablink, granted, errors) =
                        (lablink.clone(), granted.clone(), errors.clone());
                    async move {
                        loop {
                            match lablink.request_vm(&request(i)).await {
                                Ok(g) => {
                                    granted.fetch_add(1, Ordering::Relaxed);
                                    return (i, Some(g));
                                }
                                Err(e) if e.kind() == ErrorKind::NoCapacity => return (i, None),
                                Err(e) => {
                                    assert!(e.is_retryable(), "{}: not retryable: {e}", who(i));
                                    errors.fetch_add(1, Ordering::Relaxed);
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                    }
                })
                .buffer_unordered(8)
                .collect::<Vec<_>>()
                .await
        })
    };

    while granted_so_far.load(Ordering::Relaxed) < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut stop = cluster.pg_ctl();
    stop.args(["-m", "fast", "-w", "stop"]);
    tokio::task::spawn_blocking(move || run(stop, "pg_ctl stop"))
        .await
        .unwrap();
    // While it is down the store says so, clearly and retryably.
    let err = store.get(&hosts[0]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.is_retryable(), "{err}");
    // Down for twice the pool's acquire timeout, so requests waiting for a connection give
    // up with a retryable error rather than simply finishing once the server is back.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let granted_while_down = granted_so_far.load(Ordering::Relaxed);
    cluster.pg_ctl_start();

    let results = participants.await.expect("participants");
    assert!(
        granted_while_down < 300,
        "the restart happened after the rush was over"
    );
    assert!(
        retryable_errors.load(Ordering::Relaxed) > 0,
        "no request noticed the restart"
    );
    let granted: HashMap<usize, lablink_core::Granted> = results
        .into_iter()
        .filter_map(|(i, g)| g.map(|g| (i, g)))
        .collect();
    let vms: HashSet<_> = granted.values().map(|g| g.hostname.clone()).collect();
    assert_eq!(granted.len(), 300, "every VM went to someone");
    assert_eq!(vms.len(), 300, "a VM went to two participants");
    for (i, g) in &granted {
        let owner = store.get(&g.hostname).await.unwrap();
        let a = owner.assignment.expect("assigned");
        assert_eq!(a.email.as_str(), format!("{}@example.org", who(*i)));
        assert_eq!(a.pin, g.pin, "{}: the PIN changed", who(*i));
    }
    assert_eq!(store.counts().await.unwrap().assigned, 300);

    for waiter in waiters {
        let (h, a) = waiter.await.expect("waiter");
        assert_eq!(store.get(&h).await.unwrap().assignment, Some(a));
    }
    assert!(notifier.reconnects() >= 1, "the notifier never reconnected");
    cluster.stop();
}
