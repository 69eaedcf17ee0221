//! Runtime settings and warnings on paused tokio time, with the fake provisioner and
//! simulated agents: settings saved through one allocator are what the supervisor leader of
//! another (on the same store) acts on; a schedule of several destruction times; warnings
//! made once, withdrawn when they no longer hold, and kept across a change of leader.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use lablink_core::settings::WorkshopSettings;
use lablink_core::supervisor::PoolWindow;
use lablink_core::testing::fleet::Fleet;
use lablink_core::testing::store::{command, email};
use lablink_core::{
    Allocator, AllocatorConfig, AllocatorExt, Clock, ErrorKind, FakeProvisioner, Hostname, LabLink,
    MemoryVmStore, SupervisorConfig, Telemetry, TokioClock, VmFilter, VmRequest, VmState,
    WarningKind,
};

const SEC: Duration = Duration::from_secs(1);
const BOOT: Duration = Duration::from_secs(120);
const HEARTBEAT: Duration = Duration::from_secs(10);

/// A 5 s tick, 15 s leases, no pool.
fn config() -> SupervisorConfig {
    let mut c = SupervisorConfig {
        tick: 5 * SEC,
        leader_lease: 15 * SEC,
        ..Default::default()
    };
    c.leases.heartbeat_interval = HEARTBEAT;
    c
}

/// Two allocators ("replicas") on one store, one fake cloud and `clock`.
fn replicas(c: SupervisorConfig, clock: TokioClock) -> (LabLink, LabLink) {
    let store = MemoryVmStore::new();
    let fake = FakeProvisioner::new();
    let build = || {
        LabLink::builder()
            .with_store(Arc::new(store.clone()))
            .with_provisioner(Arc::new(fake.clone()))
            .with_clock(Arc::new(clock))
            .with_config(AllocatorConfig {
                supervisor: c.clone(),
                ..Default::default()
            })
            .build()
            .unwrap()
    };
    (build(), build())
}

fn request(who: &str) -> VmRequest {
    VmRequest {
        email: email(who),
        crd_command: Some(command(who)),
    }
}

async fn wait(d: Duration) {
    tokio::time::sleep(d).await;
}

async fn live(lablink: &LabLink) -> Vec<Hostname> {
    lablink
        .vms(&VmFilter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|r| !matches!(r.state, VmState::Terminating | VmState::Terminated))
        .map(|r| r.hostname)
        .collect()
}

/// `m` minutes from now, to the second (as settings keep times).
fn minutes(clock: &TokioClock, m: i64) -> DateTime<Utc> {
    (clock.now() + chrono::Duration::minutes(m)).trunc_subsecs(0)
}

/// Saves `change` of the settings in force through `lablink`.
async fn change(lablink: &LabLink, change: impl FnOnce(&mut WorkshopSettings)) -> WorkshopSettings {
    let mut s = lablink.workshop_settings().await.unwrap();
    let revision = s.revision;
    change(&mut s);
    lablink.set_workshop_settings(&s, revision).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn settings_saved_through_one_replica_drive_the_pool_of_the_others_leader() {
    let mut c = config();
    c.pool.enabled = true;
    c.pool.min_available = 1;
    let (a, b) = replicas(c, TokioClock::new());
    let _fleet = Fleet::start(&b, BOOT, HEARTBEAT);
    let supervisor = b.start_supervisor().unwrap();
    wait(30 * SEC).await;
    assert_eq!(live(&b).await.len(), 1, "the config's K");
    let initial = a.workshop_settings().await.unwrap();
    assert_eq!((initial.revision, initial.pool.min_available), (0, 1));

    let saved = change(&a, |s| s.pool.min_available = 4).await;
    assert_eq!(saved.revision, 1);
    wait(30 * SEC).await;
    assert_eq!(live(&b).await.len(), 4, "A's K, acted on by B");
    assert_eq!(supervisor.status().pool_target, Some(4));

    // A save made from revision 0 now is stale; a bad value names its field.
    let mut stale = initial.clone();
    stale.pool.min_available = 9;
    let e = b.set_workshop_settings(&stale, 0).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let mut bad = saved.clone();
    bad.pool.max_total = 2;
    let e = b.set_workshop_settings(&bad, 1).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.message().starts_with("pool.max_total: "), "{e}");

    // Off: nothing more is launched when VMs go.
    change(&b, |s| s.pool.enabled = false).await;
    wait(10 * SEC).await;
    a.destroy(&lablink_core::DestroyTarget::All).await.unwrap();
    wait(60 * SEC).await;
    assert!(live(&b).await.is_empty(), "{:?}", live(&b).await);
    assert_eq!(supervisor.status().pool_target, None);
    supervisor.stop().await;
}

#[tokio::test(start_paused = true)]
async fn each_destruction_time_destroys_the_vms_created_before_it_and_a_later_window_relaunches() {
    let mut c = config();
    c.pool.enabled = true;
    c.pool.min_available = 2;
    c.pool.prewarm = 600 * SEC;
    let clock = TokioClock::new();
    // The second day: a window from 4 h to 6 h.
    c.pool.windows = vec![PoolWindow {
        start: minutes(&clock, 240),
        end: minutes(&clock, 360),
        min_available: 2,
    }];
    let (a, b) = replicas(c, clock);
    let (t1, t2) = (minutes(&clock, 60), minutes(&clock, 300));
    change(&a, |s| {
        s.destruction.times = vec![t2, t1];
        s.destruction.warning = 1800 * SEC;
    })
    .await;
    let _fleet = Fleet::start(&b, BOOT, HEARTBEAT);
    let supervisor = b.start_supervisor().unwrap();
    wait(600 * SEC).await;
    let ada = a.request_vm(&request("ada")).await.unwrap().hostname;
    wait(60 * SEC).await;
    let day_one = live(&b).await;
    assert_eq!(day_one.len(), 3, "K = 2 free beside ada's");
    let status = supervisor.status();
    assert_eq!(status.destruction_at, Some(t1), "the next time");
    assert!(!status.destruction_warning);
    assert!(b.store().all_warnings().await.unwrap().is_empty());

    // From 30 minutes before the first time, ada (the only participant) is warned.
    wait(1500 * SEC).await;
    assert!(supervisor.status().destruction_warning);
    let warned = b.store().all_warnings().await.unwrap();
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(
        (&warned[0].hostname, warned[0].kind, warned[0].due_at),
        (&ada, WarningKind::Destruction, t1)
    );

    // The first time destroys every VM of day one, and the pool launches nothing after it.
    wait(2400 * SEC).await;
    assert!(live(&b).await.is_empty(), "{:?}", live(&b).await);
    assert_eq!(supervisor.status().destruction_at, Some(t2));
    assert!(b.store().all_warnings().await.unwrap().is_empty());
    wait(3600 * SEC).await;
    assert!(
        live(&b).await.is_empty(),
        "the pool launched after the first time"
    );

    // The window after it (with its prewarm) launches day two's VMs, which the first time
    // does not touch; the second time destroys them, and the pool stays stopped although
    // the window is still on.
    wait(6840 * SEC).await;
    let day_two = live(&b).await;
    assert_eq!(day_two.len(), 2, "{day_two:?}");
    assert!(day_two.iter().all(|h| !day_one.contains(h)));
    wait(3600 * SEC).await;
    assert!(live(&b).await.is_empty(), "{:?}", live(&b).await);
    wait(1800 * SEC).await;
    assert!(
        live(&b).await.is_empty(),
        "the pool launched after the last time"
    );
    assert_eq!(supervisor.status().destruction_at, Some(t2), "the last one");
    supervisor.stop().await;
}

#[tokio::test(start_paused = true)]
async fn warnings_are_made_once_withdrawn_when_they_no_longer_hold_and_kept_by_a_new_leader() {
    let mut c = config();
    c.idle_release.enabled = true;
    c.idle_release.after = 1800 * SEC;
    c.idle_release.warning = 600 * SEC;
    let clock = TokioClock::new();
    let (a, b) = replicas(c, clock);
    let _fleet = Fleet::start(&a, BOOT, HEARTBEAT);
    a.launch_and_wait(2, 60 * SEC).await.unwrap();
    wait(BOOT + 5 * SEC).await;
    let leader = a.start_supervisor().unwrap();
    let start = clock.now();
    let ada = a.request_vm(&request("ada")).await.unwrap().hostname;
    let bob = a.request_vm(&request("bob")).await.unwrap().hostname;

    // Idle for 20 minutes: both are warned, once, of their release at 30.
    wait(1230 * SEC).await;
    let warned = a.store().all_warnings().await.unwrap();
    assert_eq!(warned.len(), 2, "{warned:?}");
    assert!(warned.iter().all(|w| w.kind == WarningKind::IdleRelease));
    let ada_warning = warned.iter().find(|w| w.hostname == ada).unwrap().clone();
    assert_eq!(ada_warning.email, email("ada"));
    let release = ada_warning.due_at;
    assert!(
        (1799..=1800).contains(&(release - start).num_seconds()),
        "{release} for an assignment at {start}"
    );
    assert!(ada_warning.message.contains("will be released"));
    // Ada's agent showed it.
    a.acknowledge_warning(&ada, ada_warning.id).await.unwrap();

    // Bob uses his VM: his warning is withdrawn.
    let in_use = Telemetry {
        in_use: Some(true),
        ..Default::default()
    };
    a.report(&bob, in_use).await.unwrap();
    wait(10 * SEC).await;
    assert!(a.store().warnings(&bob).await.unwrap().is_empty());

    // The leader dies; B leads. Ada's warning is neither made again nor moved, and her VM is
    // released when the warning said.
    drop(leader);
    let follower = b.start_supervisor().unwrap();
    wait(60 * SEC).await;
    assert!(follower.status().leader);
    let kept = b.store().warnings(&ada).await.unwrap();
    assert_eq!(kept.len(), 1, "withdrawn by the new leader: {kept:?}");
    assert_eq!(kept[0].id, ada_warning.id, "made again");
    assert!(
        kept[0].acknowledged_at.is_some(),
        "forgot the acknowledgement"
    );
    assert_eq!(follower.status().counters.warnings_made, 0);
    let to_release = (release - clock.now()).to_std().unwrap();
    wait(to_release + 10 * SEC).await;
    assert!(b.vm(&ada).await.unwrap_err().is_not_found(), "not released");
    assert_eq!(b.vm(&bob).await.unwrap().state, VmState::Assigned);

    // A destruction time: bob is warned; moved, his warning moves with it.
    let t = minutes(&clock, 60);
    change(&a, |s| {
        s.destruction.times = vec![t];
        s.destruction.warning = 7200 * SEC;
    })
    .await;
    wait(10 * SEC).await;
    let first = b.store().warnings(&bob).await.unwrap();
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(
        (first[0].kind, first[0].due_at),
        (WarningKind::Destruction, t)
    );
    let later = minutes(&clock, 90);
    change(&b, |s| s.destruction.times = vec![later]).await;
    wait(10 * SEC).await;
    let moved = b.store().warnings(&bob).await.unwrap();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0].due_at, later);
    assert_ne!(moved[0].id, first[0].id);
    // Removed: no warning left.
    change(&a, |s| s.destruction.times.clear()).await;
    wait(10 * SEC).await;
    assert!(b.store().all_warnings().await.unwrap().is_empty());
    follower.stop().await;
}
