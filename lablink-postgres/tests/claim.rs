//! The one-statement claim (`sql/vm_claim.sql`) against the core state machine: the row it
//! writes is exactly the record `VmRecord::apply(Claim)` makes, and the same as
//! `MemoryVmStore::claim` makes from the same record; the picking rules (state, GPU health,
//! same email → same VM, locked rows) hold.

mod common;

use std::time::Duration;

use chrono::{DateTime, SubsecRound, TimeZone, Utc};
use futures::stream::{self, StreamExt};
use lablink_core::testing::store::{claim_request, host};
use lablink_core::{
    AgentStatus, AgentToken, Assignment, DesktopSession, ErrorKind, GpuHealth, MemoryVmStore,
    Phase, StartupTimings, VmEvent, VmFilter, VmRecord, VmState, VmStore,
};
use lablink_postgres::PgVmStore;
use sqlx::PgPool;

/// A time with nanoseconds, so the microsecond cut is exercised.
fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_760_000_000 + secs, 123_456_789)
        .unwrap()
}

/// An `Available` VM with every field set to something other than its default.
fn busy_available(name: &str) -> VmRecord {
    let mut r = VmRecord::new(host(name), Some(AgentToken::generate().digest()), t(0));
    r.state = VmState::Available;
    r.instance_id = Some("i-0123456789abcdef0".parse().unwrap());
    r.address = Some("10.0.0.7".into());
    r.gpu_health = GpuHealth::Healthy;
    r.in_use = true;
    r.agent_status = Some(AgentStatus::Running);
    r.last_heartbeat = Some(t(5));
    r.boot_id = Some("boot-2".into());
    r.restarts = 2;
    r.timings = StartupTimings {
        provision_start: Some(t(1)),
        provision_end: Some(t(2)),
        cloud_init_start: Some(t(3)),
        cloud_init_end: Some(t(4)),
        container_start: Some(t(4)),
        container_end: Some(t(5)),
        cloud_init_duration_seconds: Some(1.5),
        container_startup_duration_seconds: Some(0.25),
    };
    r.last_error = Some("recovered from an earlier hiccup".into());
    r.generation = 7;
    r.state_changed_at = t(3);
    r.updated_at = t(5);
    r
}

fn in_state(name: &str, state: VmState) -> VmRecord {
    let mut r = VmRecord::new(host(name), Some(AgentToken::generate().digest()), t(0));
    r.state = state;
    r
}

#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn claim_writes_what_the_state_machine_computes(pool: PgPool) {
    let store = PgVmStore::new(pool);
    let before = store.insert(&[busy_available("vm-a")]).await.unwrap()[0].clone();
    assert_eq!(store.get(&host("vm-a")).await.unwrap(), before);

    let now = t(60);
    let request = claim_request("ada");
    let claimed = store.claim(&request, now).await.unwrap();
    assert!(claimed.newly_assigned);

    // The state machine's result, timestamps cut to PostgreSQL's microseconds.
    let mut expected = before.clone();
    let cut = now.trunc_subsecs(6);
    let changed = expected
        .apply(
            &VmEvent::Claim(Assignment {
                email: request.email.clone(),
                crd_command: request.crd_command.clone(),
                pin: request.pin.clone(),
                assigned_at: cut,
                desktop: DesktopSession::new(cut),
            }),
            cut,
        )
        .unwrap();
    assert!(changed);
    assert_eq!(claimed.record, expected, "claim returned");
    assert_eq!(
        store.get(&host("vm-a")).await.unwrap(),
        expected,
        "claim stored"
    );
    assert_eq!(claimed.record.generation, before.generation + 1);
    assert!(!claimed.record.in_use);
    assert_eq!(
        claimed.record.last_error, before.last_error,
        "untouched fields stay"
    );

    // The in-memory store, given the same record and request, makes the same record.
    let memory = MemoryVmStore::new();
    memory.insert(&[before]).await.unwrap();
    let in_memory = memory.claim(&request, cut).await.unwrap();
    assert!(in_memory.newly_assigned);
    assert_eq!(claimed.record, in_memory.record, "same as MemoryVmStore");

    // Asking again: the same VM, unchanged, not newly assigned (another CRD command and PIN
    // do not replace the first).
    let mut again = claim_request("ada");
    again.crd_command = Some(lablink_core::testing::store::command("other"));
    again.pin = "999999".parse().unwrap();
    let second = store.claim(&again, t(120)).await.unwrap();
    assert!(!second.newly_assigned);
    assert_eq!(second.record, expected);
    let in_memory_again = memory.claim(&again, t(120)).await.unwrap();
    assert_eq!(second.record, in_memory_again.record);
}

/// Only `Available` VMs whose GPU is not `Unhealthy` are taken, in hostname order; nothing
/// else is touched, and when none is left the claim fails with a temporary `NoCapacity`.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn claim_takes_only_assignable_vms(pool: PgPool) {
    let store = PgVmStore::new(pool);
    let mut sick_gpu = in_state("vm-a", VmState::Available);
    sick_gpu.gpu_health = GpuHealth::Unhealthy;
    let mut owned = in_state("vm-b", VmState::Assigned);
    owned.assignment = Some(Assignment {
        email: "owner@example.org".parse().unwrap(),
        crd_command: Some(lablink_core::testing::store::command("owner")),
        pin: "111111".parse().unwrap(),
        assigned_at: t(1),
        desktop: DesktopSession::new(t(1)),
    });
    let others = vec![
        sick_gpu,
        owned,
        in_state("vm-c", VmState::Booting),
        in_state(
            "vm-d",
            VmState::Unhealthy {
                resume: Phase::Available,
            },
        ),
        in_state(
            "vm-e",
            VmState::Rebooting {
                resume: Phase::Available,
            },
        ),
        in_state("vm-f", VmState::Requested),
        in_state("vm-g", VmState::Failed),
        in_state("vm-h", VmState::Terminating),
    ];
    let mut all = others.clone();
    all.push(in_state("vm-y", VmState::Available));
    all.push(in_state("vm-z", VmState::Available));
    store.insert(&all).await.unwrap();
    let untouched = store.list(&VmFilter::default()).await.unwrap();
    let untouched: Vec<_> = untouched
        .into_iter()
        .filter(|r| r.state != VmState::Available || r.gpu_health == GpuHealth::Unhealthy)
        .collect();
    assert_eq!(untouched.len(), others.len());

    let first = store.claim(&claim_request("p1"), t(10)).await.unwrap();
    let second = store.claim(&claim_request("p2"), t(11)).await.unwrap();
    assert_eq!(first.record.hostname, host("vm-y"), "hostname order");
    assert_eq!(second.record.hostname, host("vm-z"));
    let err = store.claim(&claim_request("p3"), t(12)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoCapacity);
    assert!(err.is_retryable());
    // The owner of vm-b asking gets vm-b back, whatever its state.
    let owner = store.claim(&claim_request("owner"), t(13)).await.unwrap();
    assert_eq!(owner.record.hostname, host("vm-b"));
    assert!(!owner.newly_assigned);

    for before in untouched {
        assert_eq!(store.get(&before.hostname).await.unwrap(), before);
    }
}

/// Many concurrent claims for one email over many free VMs: all get the same VM, exactly one
/// of them newly assigned, and no other VM is touched.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn concurrent_claims_for_one_email_get_one_vm(pool: PgPool) {
    let store = PgVmStore::new(pool);
    let vms: Vec<_> = (0..20)
        .map(|i| in_state(&format!("vm-{i:02}"), VmState::Available))
        .collect();
    store.insert(&vms).await.unwrap();
    let results: Vec<_> = stream::iter(0..32)
        .map(|_| {
            let store = store.clone();
            async move { store.claim(&claim_request("same"), Utc::now()).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let results: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
    let hostname = &results[0].record.hostname;
    assert!(results.iter().all(|c| &c.record.hostname == hostname));
    assert_eq!(results.iter().filter(|c| c.newly_assigned).count(), 1);
    let assigned = store
        .list(&VmFilter {
            states: vec![VmState::Assigned],
            ..VmFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(assigned.len(), 1);
}

/// Three processes (each its own store and pool, so no in-process grouping by email) claim
/// for one email at the same moment, round after round: one VM per email, assigned once; a
/// process that loses the race on the email's unique index gets that VM back, not an error.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn concurrent_claims_for_one_email_across_processes_get_one_vm(pool: PgPool) {
    let mut stores = Vec::new();
    for i in 0..3 {
        stores.push(PgVmStore::new(
            common::replica_pool(&pool, 4, &format!("replica-{i}")).await,
        ));
    }
    let rounds = 30;
    let vms: Vec<_> = (0..rounds)
        .map(|i| in_state(&format!("vm-{i:02}"), VmState::Available))
        .collect();
    stores[0].insert(&vms).await.unwrap();
    for round in 0..rounds {
        let email = format!("same-{round}");
        let request = claim_request(&email);
        let results =
            futures::future::join_all(stores.iter().map(|store| store.claim(&request, Utc::now())))
                .await;
        let results: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
        let hostname = &results[0].record.hostname;
        assert!(
            results.iter().all(|c| &c.record.hostname == hostname),
            "{email} got two VMs"
        );
        assert_eq!(results.iter().filter(|c| c.newly_assigned).count(), 1);
    }
    let assigned = stores[1]
        .list(&VmFilter {
            states: vec![VmState::Assigned],
            ..VmFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(assigned.len(), rounds);
}

/// Waits until a backend of this database is blocked on a row lock (the spawned `claim`
/// waiting for a VM another transaction holds); fails if the claim returns first or never
/// blocks within 5 s.
async fn wait_until_blocked<T: std::fmt::Debug>(pool: &PgPool, claim: &tokio::task::JoinHandle<T>) {
    for _ in 0..500 {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if n > 0 {
            return;
        }
        assert!(!claim.is_finished(), "the claim returned without waiting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the claim never waited for the locked VM");
}

/// When every free VM is locked by another transaction, the claim waits for it instead of
/// answering `NoCapacity`, then takes the VM if it is still free.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn claim_waits_for_locked_free_vms(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    store
        .insert(&[in_state("vm-a", VmState::Available)])
        .await
        .unwrap();
    let mut locker = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM lablink_vms WHERE hostname = 'vm-a' FOR UPDATE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let claim = tokio::spawn({
        let store = store.clone();
        async move { store.claim(&claim_request("patient"), Utc::now()).await }
    });
    wait_until_blocked(&pool, &claim).await;
    locker.commit().await.unwrap();
    let claimed = claim.await.unwrap().unwrap();
    assert_eq!(claimed.record.hostname, host("vm-a"));
    assert!(claimed.newly_assigned);
}

/// A double click landing on two replicas at the last free VM, made deterministic: another
/// process's claim for the same email holds the VM (its transaction not yet committed), so
/// this claim finds no free VM and waits for it; once that claim commits, this one answers
/// with the email's VM (`newly_assigned: false`), not `NoCapacity`.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn a_claim_that_waited_for_the_same_emails_claim_returns_its_vm(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    store
        .insert(&[in_state("vm-a", VmState::Available)])
        .await
        .unwrap();
    // The other replica's claim of vm-a for twice@example.org, in flight.
    let mut other = pool.begin().await.unwrap();
    sqlx::query(
        "UPDATE lablink_vms SET state = 'assigned', email = 'twice@example.org', \
         crd_command = '4/twice', pin = '123456', assigned_at = now(), in_use = false, \
         state_changed_at = now(), updated_at = now(), generation = generation + 1 \
         WHERE hostname = 'vm-a'",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    let claim = tokio::spawn({
        let store = store.clone();
        async move { store.claim(&claim_request("twice"), Utc::now()).await }
    });
    wait_until_blocked(&pool, &claim).await;
    other.commit().await.unwrap();
    let claimed = claim
        .await
        .unwrap()
        .expect("the email's own VM, not NoCapacity");
    assert_eq!(claimed.record.hostname, host("vm-a"));
    assert!(!claimed.newly_assigned);
}

/// A rush of concurrent claims (grouped into batch statements): every newly assigned record
/// is exactly what the state machine makes of the VM it took, no VM is taken twice, holders
/// get their own VM back, and the claims beyond capacity fail with `NoCapacity`.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn a_rush_of_claims_matches_the_state_machine(pool: PgPool) {
    let store = PgVmStore::new(pool);
    let vms: Vec<_> = (0..30)
        .map(|i| busy_available(&format!("vm-{i:02}")))
        .collect();
    let before: std::collections::HashMap<_, _> = store
        .insert(&vms)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.hostname.clone(), r))
        .collect();
    // Five participants already hold a VM.
    let mut held = std::collections::HashMap::new();
    for i in 0..5 {
        let c = store
            .claim(&claim_request(&format!("early{i}")), t(50))
            .await
            .unwrap();
        held.insert(format!("early{i}"), c.record);
    }
    let who: Vec<String> = (0..40)
        .map(|i| format!("rush{i}"))
        .chain((0..5).map(|i| format!("early{i}")))
        .collect();
    let results: Vec<_> = stream::iter(who.iter().enumerate())
        .map(|(i, w)| {
            let store = store.clone();
            async move {
                let request = claim_request(w);
                let now = t(100 + i as i64);
                (
                    w.clone(),
                    request.clone(),
                    now,
                    store.claim(&request, now).await,
                )
            }
        })
        .buffer_unordered(45)
        .collect()
        .await;
    let mut taken = std::collections::HashSet::new();
    let (mut newly, mut refused) = (0, 0);
    for (w, request, now, result) in results {
        match result {
            Ok(c) if c.newly_assigned => {
                newly += 1;
                assert!(taken.insert(c.record.hostname.clone()), "a VM twice");
                let cut = now.trunc_subsecs(6);
                let mut expected = before[&c.record.hostname].clone();
                expected
                    .apply(
                        &VmEvent::Claim(Assignment {
                            email: request.email.clone(),
                            crd_command: request.crd_command.clone(),
                            pin: request.pin.clone(),
                            assigned_at: cut,
                            desktop: DesktopSession::new(cut),
                        }),
                        cut,
                    )
                    .unwrap();
                assert_eq!(c.record, expected, "{w}");
                assert_eq!(store.get(&c.record.hostname).await.unwrap(), expected);
            }
            Ok(c) => assert_eq!(Some(&c.record), held.get(&w), "{w} gets its VM back"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::NoCapacity, "{w}: {e}");
                refused += 1;
            }
        }
    }
    assert_eq!(newly, 25, "every free VM assigned once");
    assert_eq!(refused, 15);
}

/// The plan PostgreSQL picks for `sql/vm_claim.sql` on 5,000 VMs (half of them assigned).
async fn claim_plan(pool: &PgPool, email: &str) -> String {
    let request = claim_request(email);
    let lines: Vec<String> =
        sqlx::query_scalar(&format!("EXPLAIN {}", include_str!("../sql/vm_claim.sql")))
            .bind(request.email.as_str())
            .bind(request.crd_command.as_ref().map(|c| c.expose()))
            .bind(request.pin.expose())
            .bind(Utc::now())
            .fetch_all(pool)
            .await
            .unwrap();
    lines.join("\n")
}

/// "This email's VM" and "the first assignable VM" are index lookups, not scans of the
/// whole table: the claim's cost does not grow with the pool.
#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]
async fn the_claim_finds_its_vm_through_indexes(pool: PgPool) {
    let store = PgVmStore::new(pool.clone());
    common::seed_available(&store, 5000).await;
    for i in 0..2500 {
        store
            .claim(&claim_request(&format!("p{i}")), Utc::now())
            .await
            .unwrap();
    }
    sqlx::query("ANALYZE lablink_vms")
        .execute(&pool)
        .await
        .unwrap();
    let plan = claim_plan(&pool, "newcomer").await;
    assert!(plan.contains("lablink_vms_email_key"), "{plan}");
    assert!(plan.contains("lablink_vms_assignable_idx"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
}
