//! Allocator benchmarks on the in-memory backends.
//!
//! - `claims/1 task` and `claims/64 tasks`: `Allocator::request_vm` per second.
//! - `wake latency`: 10,000 agents wait in `wait_for_assignment`; every VM is then assigned
//!   (paced, and in one burst) and the time from each assignment to its waiter waking is
//!   reported as p50/p99.
//!
//! Run: `cargo bench --bench allocator`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use lablink::{
    Allocator, Clock, CrdCommand, Email, Hostname, LabLink, MemoryNotifier, MemoryVmStore,
    SystemClock, VmRecord, VmRequest, VmState, VmStore,
};
use tokio::runtime::Runtime;

struct Pool {
    lablink: LabLink,
    notifier: MemoryNotifier,
    requests: Vec<VmRequest>,
    hostnames: Vec<Hostname>,
}

/// A fresh allocator whose store holds `n` available VMs, and `n` distinct requests.
fn pool(rt: &Runtime, n: usize) -> Pool {
    let store = MemoryVmStore::new();
    let notifier = MemoryNotifier::new();
    let now = SystemClock.now();
    let records: Vec<VmRecord> = (0..n)
        .map(|i| {
            let mut r = VmRecord::new(format!("vm-{i:07}").parse().unwrap(), None, now);
            r.state = VmState::Available;
            r
        })
        .collect();
    let hostnames = records.iter().map(|r| r.hostname.clone()).collect();
    rt.block_on(store.insert(&records)).unwrap();
    let lablink = LabLink::builder()
        .with_store(Arc::new(store))
        .with_notifier(Arc::new(notifier.clone()))
        .build()
        .unwrap();
    let command: CrdCommand = "start-host --code=\"4/abc\"".parse().unwrap();
    let requests = (0..n)
        .map(|i| VmRequest {
            email: format!("p{i}@example.org").parse::<Email>().unwrap(),
            crd_command: Some(command.clone()),
        })
        .collect();
    Pool {
        lablink,
        notifier,
        requests,
        hostnames,
    }
}

fn claims(c: &mut Criterion) {
    let mut group = c.benchmark_group("claims");
    group.throughput(Throughput::Elements(1));
    let single = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    group.bench_function("1 task", |b| {
        b.iter_custom(|iters| {
            let Pool {
                lablink, requests, ..
            } = pool(&single, iters as usize);
            single.block_on(async {
                let start = Instant::now();
                for r in &requests {
                    lablink.request_vm(r).await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    const TASKS: usize = 64;
    group.bench_function("64 tasks", |b| {
        b.iter_custom(|iters| {
            let Pool {
                lablink, requests, ..
            } = pool(&multi, iters as usize);
            let requests = Arc::new(requests);
            multi.block_on(async {
                let start = Instant::now();
                let tasks: Vec<_> = (0..TASKS)
                    .map(|t| {
                        let (l, rs) = (lablink.clone(), requests.clone());
                        tokio::spawn(async move {
                            for r in rs.iter().skip(t).step_by(TASKS) {
                                l.request_vm(r).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// 10,000 waiters; assign every VM; report assignment → wake-up latency.
fn wake_latency(paced: bool) {
    const WAITERS: usize = 10_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let Pool {
        lablink,
        notifier,
        requests,
        hostnames,
    } = pool(&rt, WAITERS);
    let latencies = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for h in hostnames {
            let (l, tx) = (lablink.clone(), tx.clone());
            tokio::spawn(async move {
                let a = l
                    .wait_for_assignment(&h, Duration::from_secs(60))
                    .await
                    .unwrap()
                    .expect("assigned");
                tx.send((a.email, Instant::now())).unwrap();
            });
        }
        drop(tx);
        // Let every waiter subscribe and park.
        while notifier.subscribed_hostnames() < WAITERS {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut assigned_at = std::collections::HashMap::with_capacity(WAITERS);
        for r in &requests {
            assigned_at.insert(r.email.clone(), Instant::now());
            lablink.request_vm(r).await.unwrap();
            if paced {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        let mut latencies = Vec::with_capacity(WAITERS);
        while let Some((email, woke)) = rx.recv().await {
            latencies.push(woke - assigned_at[&email]);
        }
        latencies
    });
    let mut sorted = latencies;
    sorted.sort();
    assert_eq!(sorted.len(), WAITERS, "every waiter woke");
    println!(
        "wake latency ({} assignments, {WAITERS} waiters): p50 {:?}  p99 {:?}  max {:?}",
        if paced { "paced 200 µs" } else { "burst" },
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99),
        sorted[sorted.len() - 1],
    );
}

fn main() {
    let mut criterion = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(5));
    claims(&mut criterion);
    criterion.final_summary();
    wake_latency(true);
    wake_latency(false);
}
