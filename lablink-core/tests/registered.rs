//! Machines that registered themselves, next to VMs the fake provisioner launches, under the
//! supervisor on paused time: claims use both, the warm pool launches only cloud VMs and
//! never counts registered machines toward its maximum, a silent registered machine is
//! flagged and never rebooted or replaced, and unregistering removes it and its token.

use std::sync::Arc;
use std::time::Duration;

use lablink_core::secret::RegistrationSecret;
use lablink_core::supervisor::FlagKind;
use lablink_core::testing::fleet::{Fault, Fleet};
use lablink_core::testing::store::{command, email, machine};
use lablink_core::{
    AgentToken, Allocator, AllocatorConfig, DestroyTarget, ErrorKind, FakeProvisioner, Hostname,
    LabLink, ManualProvisioner, MemoryNotifier, MemoryVmStore, Provisioner,
    RegistrationTokenOptions, SupervisorConfig, SystemClock, TokioClock, VmFilter, VmRequest,
    VmState,
};

const SEC: Duration = Duration::from_secs(1);
const BOOT: Duration = Duration::from_secs(60);
const HEARTBEAT: Duration = Duration::from_secs(10);

fn supervisor() -> SupervisorConfig {
    let mut c = SupervisorConfig {
        tick: 5 * SEC,
        leader_lease: 15 * SEC,
        ..Default::default()
    };
    c.leases.heartbeat_interval = HEARTBEAT;
    c.leases.missed_intervals = 3;
    c.ladder.unhealthy_grace = 30 * SEC;
    c.ladder.boot_timeout = 300 * SEC;
    c.ladder.reboot_timeout = 120 * SEC;
    c.pool.enabled = true;
    c.pool.min_available = 3;
    c.pool.max_total = 3;
    c.pool.idle_ttl = 3600 * SEC;
    c
}

async fn register(lablink: &LabLink, secret: &RegistrationSecret, name: &str) -> AgentToken {
    let (registered, token) = lablink
        .register_machine(secret, &machine(name, name))
        .await
        .unwrap();
    assert!(!registered.again);
    token
}

#[tokio::test(start_paused = true)]
async fn a_mixed_pool_uses_both_launches_cloud_vms_only_and_flags_a_silent_registered_machine() {
    let fake = FakeProvisioner::new();
    let lablink = LabLink::builder()
        .with_clock(Arc::new(TokioClock::new()))
        .with_provisioner(Arc::new(fake.clone()))
        .with_config(AllocatorConfig {
            supervisor: supervisor(),
            ..Default::default()
        })
        .build()
        .unwrap();
    let (_, secret) = lablink
        .create_registration_token(&RegistrationTokenOptions {
            label: "lab".into(),
            max_uses: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    let ws1: Hostname = "lab-ws-1".parse().unwrap();
    let ws2: Hostname = "lab-ws-2".parse().unwrap();
    let token1 = register(&lablink, &secret, "lab-ws-1").await;
    register(&lablink, &secret, "lab-ws-2").await;
    let fleet = Fleet::start(&lablink, BOOT, HEARTBEAT);
    // A registered machine counts toward K only once it is free (nothing replaces one
    // stuck booting): the pool starts once both are.
    tokio::time::sleep(BOOT + 5 * SEC).await;
    let supervisor = lablink.start_supervisor().unwrap();
    tokio::time::sleep(BOOT + 30 * SEC).await;

    // K = 3 with two registered machines free: one cloud VM was launched.
    let machines = fake.list().await.unwrap();
    assert_eq!(machines.len(), 1, "{machines:?}");
    let vms = lablink.vms(&VmFilter::default()).await.unwrap();
    assert_eq!(vms.len(), 3);
    assert!(vms.iter().all(|r| r.state == VmState::Available), "{vms:?}");

    // Three participants: they get both registered machines and the cloud VM.
    let mut got = Vec::new();
    for who in ["ada", "grace", "alan"] {
        let granted = lablink
            .request_vm(&VmRequest {
                email: email(who),
                crd_command: Some(command(who)),
            })
            .await
            .unwrap();
        got.push(granted.hostname);
    }
    assert!(got.contains(&ws1) && got.contains(&ws2), "{got:?}");
    assert!(got.contains(&machines[0].hostname), "{got:?}");

    // The pool refills with cloud VMs only, up to M = 3 cloud VMs: registered machines do
    // not count toward M.
    tokio::time::sleep(BOOT + 30 * SEC).await;
    let launched = fake.list().await.unwrap();
    assert_eq!(launched.len(), 3, "{launched:?}");
    assert!(launched
        .iter()
        .all(|m| !ManualProvisioner::owns(m) && m.hostname != ws1 && m.hostname != ws2));
    let status = supervisor.status();
    assert_eq!(status.counters.pool_launched, 3);

    // Registered machine 1 falls silent while its participant holds it, then is released:
    // it is flagged, never rebooted or replaced, and stays in the pool.
    fleet.fail(&ws1, Fault::Dead);
    lablink.release(&ws1).await.unwrap();
    tokio::time::sleep(120 * SEC).await;
    let record = lablink.vm(&ws1).await.unwrap();
    assert!(
        matches!(record.state, VmState::Unhealthy { .. }),
        "{}",
        record.state
    );
    let status = supervisor.status();
    assert!(
        status
            .flags
            .iter()
            .any(|f| f.hostname == ws1 && f.kind == FlagKind::Registered),
        "{:?}",
        status.flags
    );
    assert_eq!(status.counters.ladder_reboots, 0);
    assert_eq!(status.counters.ladder_replacements, 0);
    assert_eq!(
        fake.list().await.unwrap().len(),
        3,
        "nothing launched for it"
    );
    assert_eq!(lablink.authenticate_agent(&token1).await.unwrap(), ws1);

    // It comes back on its own: healthy again, nothing was done to it.
    fleet.heal(&ws1);
    tokio::time::sleep(30 * SEC).await;
    assert_eq!(lablink.vm(&ws1).await.unwrap().state, VmState::Available);

    // Unregistering (a destroy) removes it without touching any cloud machine, and its
    // token stops working.
    lablink
        .destroy(&DestroyTarget::Hostnames(vec![ws1.clone()]))
        .await
        .unwrap();
    tokio::time::sleep(5 * SEC).await;
    assert!(lablink.vm(&ws1).await.unwrap_err().is_not_found());
    assert_eq!(
        lablink
            .authenticate_agent(&token1)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Unauthenticated
    );
    assert_eq!(fake.list().await.unwrap().len(), 3);
    drop(fleet);
}

#[tokio::test]
async fn registered_machines_follow_the_provisioner_contract_where_they_can() {
    let store = Arc::new(MemoryVmStore::new());
    let manual = ManualProvisioner::new(
        store.clone(),
        Arc::new(MemoryNotifier::default()),
        Arc::new(SystemClock),
    );
    // It cannot launch, and says so with a typed error; an empty launch is fine.
    assert!(!manual.capabilities().launch);
    lablink_core::testing::provisioner::an_empty_launch_creates_nothing(&manual).await;
    let refused = manual
        .launch(&lablink_core::testing::provisioner::request(&["pv-a"]))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::InvalidConfig, "{refused}");

    // Registered machines are its inventory; destroy unregisters only those named, and
    // again is not an error.
    let lablink = LabLink::builder()
        .with_store(store.clone())
        .build()
        .unwrap();
    let (_, secret) = lablink
        .create_registration_token(&RegistrationTokenOptions::default())
        .await
        .unwrap();
    for name in ["ws-a", "ws-b"] {
        register(&lablink, &secret, name).await;
    }
    let mut listed = manual.list().await.unwrap();
    listed.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(ManualProvisioner::owns));
    manual.destroy(&listed[..1]).await.unwrap();
    manual.destroy(&listed[..1]).await.unwrap();
    let left = manual.list().await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].hostname.as_str(), "ws-b");

    // Reboot: only where the owner allowed it; an unknown machine is not found.
    let reboot = manual.reboot(&left[0]).await.unwrap_err();
    assert_eq!(reboot.kind(), ErrorKind::PermissionDenied, "{reboot}");
    let mut willing = machine("ws-c", "ws-c");
    willing.allow_reboot = true;
    lablink.register_machine(&secret, &willing).await.unwrap();
    let c = manual
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.hostname.as_str() == "ws-c")
        .unwrap();
    manual.reboot(&c).await.unwrap();
    let mut ghost = c.clone();
    ghost.hostname = "ws-ghost".parse().unwrap();
    ghost.instance_id = "registered:ws-ghost".parse().unwrap();
    assert_eq!(
        manual.reboot(&ghost).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // Through the allocator, a machine whose owner did not allow reboots is refused before
    // anything changes.
    let refused = lablink.reboot(&left[0].hostname).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::PermissionDenied);
    assert_eq!(
        lablink.vm(&left[0].hostname).await.unwrap().state,
        VmState::Booting
    );
}
