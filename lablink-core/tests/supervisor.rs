//! The supervisor on paused tokio time with the fake provisioner and simulated agents:
//! leases and restarts, the recovery ladder, the warm pool under a scripted arrival curve,
//! scheduled destruction, idle release, and stopping.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use lablink_core::supervisor::{FlagKind, PoolWindow};
use lablink_core::testing::fleet::{Fault, Fleet, Workshop};
use lablink_core::testing::store::{command, email};
use lablink_core::{
    Allocator, AllocatorConfig, AllocatorExt, BeforeDestroy, FakeProvisioner, Hostname, LabLink,
    LabLinkBuilder, MemoryVmStore, Reuse, SupervisorConfig, Telemetry, TokioClock, VmFilter,
    VmRecord, VmRequest, VmState,
};

const SEC: Duration = Duration::from_secs(1);
const BOOT: Duration = Duration::from_secs(180);
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Supervisor settings for tests: a 5 s tick, 30 s leases, a quick ladder, no pool.
fn config() -> SupervisorConfig {
    let mut c = SupervisorConfig {
        tick: 5 * SEC,
        leader_lease: 15 * SEC,
        ..Default::default()
    };
    c.leases.heartbeat_interval = HEARTBEAT;
    c.leases.missed_intervals = 3;
    c.ladder.unhealthy_grace = 60 * SEC;
    c.ladder.boot_timeout = 600 * SEC;
    c.ladder.reboot_timeout = 300 * SEC;
    c.ladder.max_reboots = 2;
    c.ladder.max_replacements = 5;
    c.ladder.budget_reset_after = 1800 * SEC;
    c
}

fn builder(supervisor: SupervisorConfig, fake: &FakeProvisioner) -> LabLinkBuilder {
    LabLink::builder()
        .with_clock(Arc::new(TokioClock::new()))
        .with_provisioner(Arc::new(fake.clone()))
        .with_config(AllocatorConfig {
            supervisor,
            ..Default::default()
        })
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

async fn state(lablink: &LabLink, h: &Hostname) -> VmState {
    lablink.vm(h).await.unwrap().state
}

/// Launches `n` VMs and lets the fleet bring them up.
async fn ready(lablink: &LabLink, n: usize) -> Vec<Hostname> {
    let op = lablink.launch_and_wait(n, 60 * SEC).await.unwrap();
    wait(BOOT + 5 * SEC).await;
    for h in &op.hostnames {
        assert_eq!(state(lablink, h).await, VmState::Available, "{h}");
    }
    op.hostnames
}

#[tokio::test(start_paused = true)]
async fn a_silent_vm_becomes_unhealthy_recovers_when_heartbeats_return_and_restarts_are_seen() {
    let fake = FakeProvisioner::new();
    let mut c = config();
    c.ladder.enabled = false;
    let lablink = builder(c, &fake).build().unwrap();
    let fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
    let hosts = ready(&lablink, 2).await;
    let supervisor = lablink.start_supervisor().unwrap();
    let (sick, fine) = (&hosts[0], &hosts[1]);

    // Two missed intervals are tolerated; the third expires the lease.
    fleet.fail(sick, Fault::Dead);
    wait(20 * SEC).await;
    assert_eq!(state(&lablink, sick).await, VmState::Available);
    wait(30 * SEC).await;
    let record = lablink.vm(sick).await.unwrap();
    assert!(
        matches!(record.state, VmState::Unhealthy { .. }),
        "{}",
        record.state
    );
    assert!(record.last_error.unwrap().contains("heartbeat"));
    assert_eq!(state(&lablink, fine).await, VmState::Available);
    assert!(!record.state.is_assignable());

    // Heartbeats return: health returns, and the VM is assignable again.
    fleet.heal(sick);
    wait(15 * SEC).await;
    assert_eq!(state(&lablink, sick).await, VmState::Available);

    // It can happen again and recover again: a late heartbeat never wedges a VM.
    for _ in 0..2 {
        fleet.fail(sick, Fault::Dead);
        wait(50 * SEC).await;
        assert!(matches!(
            state(&lablink, sick).await,
            VmState::Unhealthy { .. }
        ));
        fleet.heal(sick);
        wait(15 * SEC).await;
        assert_eq!(state(&lablink, sick).await, VmState::Available);
    }
    assert_eq!(supervisor.status().counters.leases_expired, 3);

    // A new boot id is a restart: counted by the store, reported by the supervisor.
    fleet.restart(fine);
    wait(20 * SEC).await;
    assert_eq!(lablink.vm(fine).await.unwrap().restarts, 1);
    let status = supervisor.status();
    assert_eq!(status.counters.restarts_seen, 1);
    assert!(status
        .recent
        .iter()
        .any(|(_, e)| e.contains(fine.as_str()) && e.contains("restarted")));
    supervisor.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_ladder_reboots_then_replaces_and_leaves_assigned_vms_flagged() {
    let fake = FakeProvisioner::new();
    let lablink = builder(config(), &fake).build().unwrap();
    let fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
    let hosts = ready(&lablink, 3).await;
    let granted = lablink.request_vm(&request("ada")).await.unwrap();
    let owned = granted.hostname.clone();
    let free: Vec<&Hostname> = hosts.iter().filter(|h| **h != owned).collect();
    let (fixable, broken) = (free[0], free[1]);
    let supervisor = lablink.start_supervisor().unwrap();

    fleet.fail(fixable, Fault::UntilReboot);
    fleet.fail(broken, Fault::Dead);
    fleet.fail(&owned, Fault::Dead);
    // Lease (30 s) + grace (60 s) + a tick or two: the first rung.
    wait(100 * SEC).await;
    assert_eq!(fake.reboots(fixable), 1);
    assert_eq!(fake.reboots(broken), 1);
    assert_eq!(fake.reboots(&owned), 0, "an assigned VM was rebooted");

    // The fixable one is back after its reboot; the broken one is rebooted once more, then
    // replaced by a fresh VM.
    wait(BOOT + 10 * SEC).await;
    assert_eq!(state(&lablink, fixable).await, VmState::Available);
    wait(300 * SEC).await;
    assert_eq!(fake.reboots(broken), 2);
    wait(300 * SEC + 10 * SEC).await;
    assert!(
        lablink.vm(broken).await.unwrap_err().is_not_found(),
        "the broken VM was not replaced"
    );
    let names: Vec<Hostname> = lablink
        .vms(&VmFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.hostname)
        .collect();
    assert_eq!(names.len(), 3, "a replacement was not launched: {names:?}");
    let replacement = names.iter().find(|h| !hosts.contains(h)).unwrap();
    wait(BOOT + 10 * SEC).await;
    assert_eq!(state(&lablink, replacement).await, VmState::Available);

    // The assigned VM: untouched through all of it, flagged for the admin.
    assert!(matches!(
        state(&lablink, &owned).await,
        VmState::Unhealthy { .. }
    ));
    assert_eq!(fake.reboots(&owned), 0);
    let status = supervisor.status();
    let flag = status.flags.iter().find(|f| f.hostname == owned).unwrap();
    assert_eq!(flag.kind, FlagKind::NeedsAdmin);
    assert!(flag.message.contains("assigned"), "{}", flag.message);
    assert_eq!(status.counters.ladder_replacements, 1);
    assert_eq!(status.counters.ladder_reboots, 3);
    // The admin's own reboot is still allowed, and the agent comes back.
    fleet.heal(&owned);
    wait(15 * SEC).await;
    assert_eq!(state(&lablink, &owned).await, VmState::Assigned);
    wait(10 * SEC).await;
    assert!(supervisor.status().flags.is_empty());
    supervisor.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_reboot_budget_resets_after_a_healthy_period() {
    let fake = FakeProvisioner::new();
    let mut c = config();
    c.ladder.max_reboots = 1;
    c.ladder.budget_reset_after = 600 * SEC;
    let lablink = builder(c, &fake).build().unwrap();
    let fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
    let host = ready(&lablink, 1).await.remove(0);
    let supervisor = lablink.start_supervisor().unwrap();

    // Three failures, each fixed by one reboot, spaced by healthy periods longer than the
    // reset: with a budget of one reboot, only a reset budget keeps the VM (upstream's
    // never-resetting budget would have retired it at the second failure).
    for round in 1..=3 {
        fleet.fail(&host, Fault::UntilReboot);
        wait(100 * SEC + BOOT).await;
        assert_eq!(fake.reboots(&host), round, "round {round}");
        assert_eq!(
            state(&lablink, &host).await,
            VmState::Available,
            "round {round}"
        );
        wait(620 * SEC).await;
    }
    let status = supervisor.status();
    assert_eq!(status.counters.ladder_replacements, 0);
    assert!(status
        .recent
        .iter()
        .any(|(_, e)| e.contains("budget reset")));

    // Without the healthy period the budget is spent: the next failure replaces the VM.
    fleet.fail(&host, Fault::UntilReboot);
    wait(100 * SEC + BOOT).await;
    fleet.fail(&host, Fault::Dead);
    wait(400 * SEC).await;
    assert_eq!(fake.reboots(&host), 4);
    assert_eq!(supervisor.status().counters.ladder_replacements, 1);
    assert!(lablink.vm(&host).await.unwrap_err().is_not_found());
    supervisor.stop().await;
}

/// Boot 3 min; 100 participants over 10 minutes; K = 40 from 3 minutes before the first
/// arrival until the arrivals end, then K = 2 with a 5-minute idle TTL.
pub fn workshop_pool(start: chrono::DateTime<Utc>) -> SupervisorConfig {
    let mut c = config();
    c.pool.enabled = true;
    c.pool.min_available = 2;
    c.pool.max_total = 150;
    c.pool.idle_ttl = 300 * SEC;
    c.pool.prewarm = 240 * SEC;
    c.pool.windows = vec![PoolWindow {
        start,
        end: start + chrono::Duration::minutes(10),
        min_available: 40,
    }];
    c
}

#[tokio::test(start_paused = true)]
async fn the_warm_pool_serves_an_arrival_curve_without_waits_and_releases_the_excess() {
    let fake = FakeProvisioner::new().with_latency(10 * SEC);
    let clock = TokioClock::new();
    let start = clock_now(&clock) + chrono::Duration::minutes(5);
    let lablink = builder(workshop_pool(start), &fake)
        .with_clock(Arc::new(clock))
        .build()
        .unwrap();
    let _fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
    let supervisor = lablink.start_supervisor().unwrap();
    // Before the window's prewarm only base K is kept.
    wait(30 * SEC).await;
    assert_eq!(supervisor.status().pool_target, Some(2));
    wait(270 * SEC).await;
    assert_eq!(supervisor.status().pool_target, Some(40));

    let workshop = Workshop {
        delay: Duration::ZERO,
        participants: 100,
        arrivals: 600 * SEC,
        retry: 5 * SEC,
        horizon: 1800 * SEC,
        launch_on_demand: false,
    };
    let outcome = workshop.run(&lablink).await;
    assert!(
        outcome.waits.iter().all(Option::is_some),
        "someone got no VM"
    );
    assert!(
        outcome.max_wait() <= BOOT.as_secs_f64(),
        "a participant waited {} s, longer than a boot",
        outcome.max_wait()
    );
    // After the window: free VMs beyond K = 2 are destroyed once idle for the TTL.
    let counts = lablink.counts().await.unwrap();
    assert_eq!(counts.assigned, 100);
    assert_eq!(counts.available, 2, "{counts:?}");
    let status = supervisor.status();
    assert!(status.counters.pool_released > 0);
    assert!(status.counters.pool_launched >= 100);
    assert!(status.counters.pool_launched as usize <= 150);
    supervisor.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_vm_whose_set_up_failed_is_neither_rebooted_nor_replaced_and_holds_the_pool() {
    let fake = FakeProvisioner::new();
    let mut c = config();
    c.pool.enabled = true;
    c.pool.min_available = 1;
    let lablink = builder(c, &fake).build().unwrap();
    let supervisor = lablink.start_supervisor().unwrap();
    wait(30 * SEC).await;
    let vms = lablink.vms(&VmFilter::default()).await.unwrap();
    assert_eq!(vms.len(), 1, "the pool launched its one VM");
    let broken = vms[0].hostname.clone();
    assert_eq!(vms[0].state, VmState::Booting);

    // Its agent's start-up steps failed with STARTUP_ON_ERROR=fail.
    let error = Telemetry {
        status: Some(lablink_core::AgentStatus::Error),
        ..Default::default()
    };
    let record = lablink.report(&broken, error).await.unwrap();
    assert_eq!(record.state, VmState::Failed);
    assert!(
        record
            .last_error
            .as_deref()
            .unwrap()
            .contains("set-up failed"),
        "{record:?}"
    );

    // Long past every ladder timeout: no reboot, no replacement, no new launch, one flag.
    wait(3600 * SEC).await;
    let status = supervisor.status();
    assert_eq!(status.counters.ladder_reboots, 0);
    assert_eq!(status.counters.ladder_replacements, 0);
    assert_eq!(status.counters.pool_launched, 1);
    assert_eq!(lablink.vms(&VmFilter::default()).await.unwrap().len(), 1);
    assert_eq!(state(&lablink, &broken).await, VmState::Failed);
    let flags: Vec<_> = status
        .flags
        .iter()
        .filter(|f| f.kind == FlagKind::SetupFailed)
        .collect();
    assert_eq!(flags.len(), 1, "{:?}", status.flags);
    assert_eq!(flags[0].hostname, broken);

    // The admin fixed the image and destroys it: the pool launches again.
    let op = lablink
        .destroy(&lablink_core::DestroyTarget::Hostnames(vec![broken]))
        .await
        .unwrap();
    lablink.wait_for_operation(op.id, 60 * SEC).await.unwrap();
    wait(30 * SEC).await;
    assert_eq!(supervisor.status().counters.pool_launched, 2);
    assert!(supervisor
        .status()
        .flags
        .iter()
        .all(|f| f.kind != FlagKind::SetupFailed));
    supervisor.stop().await;
}

fn clock_now(clock: &TokioClock) -> chrono::DateTime<Utc> {
    use lablink_core::Clock;
    clock.now()
}

#[tokio::test(start_paused = true)]
async fn the_pool_launches_for_participants_it_turned_away() {
    for window in [Duration::ZERO, 600 * SEC] {
        let fake = FakeProvisioner::new();
        let mut c = config();
        c.pool.enabled = true;
        c.pool.min_available = 0;
        c.pool.turned_away_window = window;
        let lablink = builder(c, &fake).build().unwrap();
        let _fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
        let supervisor = lablink.start_supervisor().unwrap();
        for who in ["ada", "bob"] {
            let err = lablink.request_vm(&request(who)).await.unwrap_err();
            assert_eq!(err.kind(), lablink_core::ErrorKind::NoCapacity);
        }
        // Asking again does not count twice.
        lablink.request_vm(&request("ada")).await.unwrap_err();
        wait(BOOT + 20 * SEC).await;
        let launched = supervisor.status().counters.pool_launched;
        if window.is_zero() {
            assert_eq!(launched, 0, "turned-away demand counted while off");
            continue;
        }
        assert_eq!(launched, 2);
        for who in ["ada", "bob"] {
            lablink.request_vm(&request(who)).await.unwrap();
        }
        // Served participants are no longer demand: nothing more is launched.
        wait(60 * SEC).await;
        assert_eq!(supervisor.status().counters.pool_launched, 2);
    }
}

#[tokio::test(start_paused = true)]
async fn free_vms_beyond_k_are_released_only_after_the_idle_ttl() {
    let fake = FakeProvisioner::new();
    let mut c = config();
    c.pool.enabled = true;
    c.pool.min_available = 1;
    c.pool.idle_ttl = 600 * SEC;
    let lablink = builder(c, &fake).build().unwrap();
    let _fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
    ready(&lablink, 4).await;
    let supervisor = lablink.start_supervisor().unwrap();
    wait(300 * SEC).await;
    assert_eq!(
        lablink.counts().await.unwrap().available,
        4,
        "released before the TTL"
    );
    wait(400 * SEC).await;
    assert_eq!(lablink.counts().await.unwrap().total, 1);
    assert_eq!(supervisor.status().counters.pool_released, 3);
    supervisor.stop().await;
}

#[tokio::test(start_paused = true)]
async fn scheduled_destruction_warns_then_destroys_everything_and_the_pool_stops() {
    let fake = FakeProvisioner::new();
    let clock = TokioClock::new();
    let mut c = config();
    c.pool.enabled = true;
    c.pool.min_available = 2;
    c.destruction.at = Some(clock_now(&clock) + chrono::Duration::minutes(60));
    c.destruction.warning = 1800 * SEC;
    let lablink = builder(c, &fake)
        .with_clock(Arc::new(clock))
        .build()
        .unwrap();
    let _fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
    let supervisor = lablink.start_supervisor().unwrap();
    wait(600 * SEC).await;
    lablink.request_vm(&request("ada")).await.unwrap();
    let status = supervisor.status();
    assert!(status.destruction_at.is_some() && !status.destruction_warning);
    wait(1500 * SEC).await;
    assert!(supervisor.status().destruction_warning);
    assert!(lablink.counts().await.unwrap().total >= 3);
    wait(1600 * SEC).await;
    assert_eq!(lablink.counts().await.unwrap().total, 0);
    assert!(
        lablink_core::Provisioner::list(&fake)
            .await
            .unwrap()
            .is_empty(),
        "machines left after the destruction"
    );
    wait(600 * SEC).await;
    assert_eq!(
        lablink.counts().await.unwrap().total,
        0,
        "the pool relaunched"
    );
    supervisor.stop().await;
}

#[tokio::test(start_paused = true)]
async fn idle_release_is_off_by_default_and_warns_before_releasing() {
    let fake = FakeProvisioner::new();
    let lablink = builder(config(), &fake).build().unwrap();
    let _fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
    ready(&lablink, 2).await;
    let supervisor = lablink.start_supervisor().unwrap();
    let idle = lablink.request_vm(&request("ada")).await.unwrap().hostname;
    wait(7200 * SEC).await;
    assert_eq!(
        state(&lablink, &idle).await,
        VmState::Assigned,
        "released while off"
    );
    supervisor.stop().await;

    let fake = FakeProvisioner::new();
    let mut c = config();
    c.idle_release.enabled = true;
    c.idle_release.after = 1800 * SEC;
    c.idle_release.warning = 600 * SEC;
    let lablink = builder(c, &fake).build().unwrap();
    let _fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
    ready(&lablink, 2).await;
    let supervisor = lablink.start_supervisor().unwrap();
    let idle = lablink.request_vm(&request("ada")).await.unwrap().hostname;
    let busy = lablink.request_vm(&request("bob")).await.unwrap().hostname;
    let in_use = Telemetry {
        in_use: Some(true),
        ..Default::default()
    };
    lablink.report(&busy, in_use).await.unwrap();
    // Warned from 20 minutes on (30 minutes minus 10 of warning), released at 30.
    wait(1100 * SEC).await;
    assert!(supervisor.status().flags.is_empty());
    wait(200 * SEC).await;
    let flags = supervisor.status().flags;
    assert_eq!(flags.len(), 1, "{flags:?}");
    assert_eq!(
        (&flags[0].hostname, flags[0].kind),
        (&idle, FlagKind::IdleWarning)
    );
    assert!(flags[0].message.contains("will be released"));
    assert_eq!(state(&lablink, &idle).await, VmState::Assigned);
    wait(600 * SEC).await;
    assert!(
        lablink.vm(&idle).await.unwrap_err().is_not_found(),
        "not released"
    );
    assert_eq!(state(&lablink, &busy).await, VmState::Assigned);
    assert_eq!(supervisor.status().counters.idle_released, 1);
    supervisor.stop().await;
}

#[tokio::test(start_paused = true)]
async fn idle_release_resets_in_place_when_vms_are_reused_by_resetting() {
    let fake = FakeProvisioner::new();
    let mut c = config();
    c.idle_release.enabled = true;
    c.idle_release.after = 1800 * SEC;
    let hook = Arc::new(Hook::default());
    let lablink = LabLink::builder()
        .with_clock(Arc::new(TokioClock::new()))
        .with_provisioner(Arc::new(fake.clone()))
        .with_config(AllocatorConfig {
            supervisor: c,
            reuse: Reuse::Reset,
            ..Default::default()
        })
        .with_before_destroy(hook.clone())
        .build()
        .unwrap();
    let _fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
    ready(&lablink, 1).await;
    let supervisor = lablink.start_supervisor().unwrap();
    let idle = lablink.request_vm(&request("ada")).await.unwrap().hostname;
    wait(1900 * SEC).await;
    let vm = lablink.vm(&idle).await.unwrap();
    assert_eq!(vm.state, VmState::Resetting, "not reset in place");
    assert!(vm.assignment.is_none());
    let calls = hook.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "collected once before the reset: {calls:?}");
    assert_eq!(supervisor.status().counters.idle_released, 1);
    supervisor.stop().await;
}

/// A before-destroy step that takes `work` to run, keeps `keep`, and records each call:
/// the VMs asked about and whether any of them was already going away.
#[derive(Debug, Default)]
struct Hook {
    work: Duration,
    keep: Option<Hostname>,
    calls: std::sync::Mutex<Vec<(Vec<Hostname>, bool)>>,
}

#[async_trait::async_trait]
impl BeforeDestroy for Hook {
    async fn before_destroy(
        &self,
        vms: &[VmRecord],
    ) -> lablink_core::Result<BTreeMap<Hostname, String>> {
        tokio::time::sleep(self.work).await;
        let going = vms.iter().any(|r| r.state == VmState::Terminating);
        let names = vms.iter().map(|r| r.hostname.clone()).collect();
        self.calls.lock().unwrap().push((names, going));
        Ok(self
            .keep
            .iter()
            .filter(|k| vms.iter().any(|r| &r.hostname == *k))
            .map(|k| (k.clone(), "its collection failed".to_owned()))
            .collect())
    }
}

#[tokio::test(start_paused = true)]
async fn scheduled_destruction_and_idle_release_run_the_before_destroy_step_and_keep_what_it_keeps()
{
    let fake = FakeProvisioner::new();
    let clock = TokioClock::new();
    let mut c = config();
    c.destruction.at = Some(clock_now(&clock) + chrono::Duration::seconds(600));
    let lablink = builder(c, &fake)
        .with_clock(Arc::new(clock))
        .build()
        .unwrap();
    let _fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
    let vms = ready(&lablink, 3).await;
    // The step takes longer than the leader lease (15 s).
    let hook = Arc::new(Hook {
        work: 40 * SEC,
        keep: Some(vms[1].clone()),
        ..Default::default()
    });
    lablink.set_before_destroy(Some(hook.clone()));
    let supervisor = lablink.start_supervisor().unwrap();
    wait(600 * SEC).await;
    let calls = hook.calls.lock().unwrap().clone();
    assert_eq!(
        calls.len(),
        1,
        "asked once, not again for the kept VM: {calls:?}"
    );
    let (asked, going) = &calls[0];
    assert_eq!(asked, &vms, "asked about every VM");
    assert!(!going, "asked before any was destroyed");
    let left = lablink.vms(&VmFilter::default()).await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        (&left[0].hostname, left[0].state),
        (&vms[1], VmState::Available)
    );
    let status = supervisor.status();
    assert!(
        status.leader && status.counters.became_leader == 1,
        "{status:?}"
    );
    assert_eq!(status.flags.len(), 1, "{:?}", status.flags);
    assert_eq!(
        (&status.flags[0].hostname, status.flags[0].kind),
        (&vms[1], FlagKind::DestroyHeld)
    );
    assert!(status.flags[0].message.contains("its collection failed"));
    supervisor.stop().await;

    // Idle release asks about the assigned VM before destroying it.
    let fake = FakeProvisioner::new();
    let mut c = config();
    c.idle_release.enabled = true;
    c.idle_release.after = 1800 * SEC;
    let lablink = builder(c, &fake).build().unwrap();
    let _fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
    ready(&lablink, 2).await;
    let hook = Arc::new(Hook::default());
    lablink.set_before_destroy(Some(hook.clone()));
    let supervisor = lablink.start_supervisor().unwrap();
    let idle = lablink.request_vm(&request("ada")).await.unwrap().hostname;
    wait(1900 * SEC).await;
    assert!(lablink.vm(&idle).await.unwrap_err().is_not_found());
    let calls = hook.calls.lock().unwrap().clone();
    assert_eq!(calls, [(vec![idle], false)]);
    supervisor.stop().await;
}

/// A VM claimed by a participant while the before-destroy step runs is not destroyed with
/// the others (its work was never collected): it is asked about again on a later tick.
#[tokio::test(start_paused = true)]
async fn a_vm_claimed_during_the_before_destroy_step_is_asked_about_again() {
    let fake = FakeProvisioner::new();
    let clock = TokioClock::new();
    let mut c = config();
    let at = clock_now(&clock) + chrono::Duration::seconds(600);
    c.destruction.at = Some(at);
    let lablink = builder(c, &fake)
        .with_clock(Arc::new(clock))
        .build()
        .unwrap();
    let _fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
    ready(&lablink, 3).await;
    let hook = Arc::new(Hook {
        work: 40 * SEC,
        ..Default::default()
    });
    lablink.set_before_destroy(Some(hook.clone()));
    let supervisor = lablink.start_supervisor().unwrap();
    // In the middle of the step that asks about all three (due at `at`, one tick at most
    // later, and 40 s long).
    let to_due = (at - clock_now(&clock)).to_std().unwrap();
    wait(to_due + 20 * SEC).await;
    assert!(
        hook.calls.lock().unwrap().is_empty(),
        "the step ended early"
    );
    let claimed = lablink.request_vm(&request("ada")).await.unwrap().hostname;
    wait(300 * SEC).await;
    let calls = hook.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].0.len(), 3, "{calls:?}");
    assert_eq!(calls[1].0, [claimed], "{calls:?}");
    assert!(lablink.vms(&VmFilter::default()).await.unwrap().is_empty());
    supervisor.stop().await;
}

/// The leader keeps its lease while a before-destroy step outlasts it: a second replica on
/// the same store never takes over (and acts) in the middle of the step.
#[tokio::test(start_paused = true)]
async fn a_long_before_destroy_step_keeps_the_leader_lease() {
    let fake = FakeProvisioner::new();
    let store = MemoryVmStore::new();
    let mut c = config();
    c.destruction.at = Some(chrono::Utc::now() + chrono::Duration::seconds(600));
    let a = builder(c.clone(), &fake)
        .with_store(Arc::new(store.clone()))
        .build()
        .unwrap();
    let b = builder(c, &fake)
        .with_store(Arc::new(store.clone()))
        .build()
        .unwrap();
    let _fleet = Fleet::start(&a, BOOT, HEARTBEAT);
    let vms = ready(&a, 2).await;
    // Four leases long.
    let hook = Arc::new(Hook {
        work: 60 * SEC,
        ..Default::default()
    });
    a.set_before_destroy(Some(hook.clone()));
    let sa = a.start_supervisor().unwrap();
    wait(SEC).await;
    let sb = b.start_supervisor().unwrap();
    wait(900 * SEC).await;
    assert_eq!(hook.calls.lock().unwrap().len(), 1);
    let (ta, tb) = (sa.status(), sb.status());
    assert!(ta.leader && ta.counters.became_leader == 1, "{ta:?}");
    assert_eq!(
        tb.counters.became_leader, 0,
        "the follower took over: {tb:?}"
    );
    for h in &vms {
        assert!(a.vm(h).await.unwrap_err().is_not_found(), "{h} left");
    }
    sa.stop().await;
    sb.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_supervisor_stops_with_its_handle_or_its_allocator() {
    let fake = FakeProvisioner::new();
    let store = MemoryVmStore::new();
    let lablink = builder(config(), &fake)
        .with_store(Arc::new(store.clone()))
        .build()
        .unwrap();
    let supervisor = lablink.start_supervisor().unwrap();
    wait(10 * SEC).await;
    assert!(supervisor.status().leader);
    let err = lablink.start_supervisor().unwrap_err();
    assert!(err.is_conflict(), "{err}");
    // A graceful stop resigns: a second allocator on the store leads at its first tick.
    supervisor.stop().await;
    assert!(!lablink.supervision().unwrap().running);
    let other = builder(config(), &fake)
        .with_store(Arc::new(store.clone()))
        .build()
        .unwrap();
    let second = other.start_supervisor().unwrap();
    wait(SEC).await;
    assert!(second.status().leader);

    // Dropping every allocator clone ends the loop even while the handle lives.
    let ticks = second.status().counters.ticks;
    drop(other);
    wait(60 * SEC).await;
    let status = second.status();
    assert!(!status.running);
    assert!(status.counters.ticks <= ticks + 1);
}

#[tokio::test(start_paused = true)]
async fn only_the_leader_acts_and_a_follower_takes_over_when_it_dies() {
    let fake = FakeProvisioner::new();
    let store = MemoryVmStore::new();
    let mut c = config();
    c.pool.enabled = true;
    c.pool.min_available = 2;
    let a = builder(c.clone(), &fake)
        .with_store(Arc::new(store.clone()))
        .build()
        .unwrap();
    let b = builder(c, &fake)
        .with_store(Arc::new(store.clone()))
        .build()
        .unwrap();
    let sa = a.start_supervisor().unwrap();
    wait(SEC).await;
    let sb = b.start_supervisor().unwrap();
    wait(60 * SEC).await;
    let (ta, tb) = (sa.status(), sb.status());
    assert!(ta.leader && !tb.leader);
    assert_eq!(tb.leader_holder.as_deref(), Some(ta.id.as_str()));
    assert_eq!(ta.counters.pool_launched, 2);
    assert_eq!(tb.counters.pool_launched, 0, "a follower acted");
    assert_eq!(a.counts().await.unwrap().total, 2);

    // A dies (no resign); after its lease runs out, B leads and acts.
    drop(sa);
    wait(30 * SEC).await;
    let tb = sb.status();
    assert!(tb.leader, "{tb:?}");
    assert_eq!(tb.counters.became_leader, 1);
    // The admin destroys everything; the new leader's pool refills.
    let op = b.destroy(&lablink_core::DestroyTarget::All).await.unwrap();
    b.wait_for_operation(op.id, 60 * SEC).await.unwrap();
    wait(30 * SEC).await;
    assert_eq!(sb.status().counters.pool_launched, 2, "{:?}", sb.status());
    assert_eq!(b.counts().await.unwrap().total, 2);
}
