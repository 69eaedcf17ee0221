//! Behaviour of the default allocator over the in-memory backends: exactly-once claims under
//! concurrency, waiting, the launch flow (records before the provisioner), destroy, reboot,
//! agent auth, and typed errors for bad input.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lablink_core::notifier::Subscription;
use lablink_core::testing::store::{command, email};
use lablink_core::{
    AgentStatus, AgentToken, Allocator, AllocatorExt, DestroyTarget, ErrorKind, FakeProvisioner,
    GpuHealth, Hostname, LabLink, LaunchOptions, MemoryNotifier, Notifier, OperationStatus,
    Telemetry, VmFilter, VmRequest, VmState,
};

const LONG: Duration = Duration::from_secs(60);

fn running() -> Telemetry {
    Telemetry {
        status: Some(AgentStatus::Running),
        ..Default::default()
    }
}

fn request(who: &str) -> VmRequest {
    VmRequest {
        email: email(who),
        crd_command: Some(command(who)),
    }
}

/// An allocator with `n` launched VMs whose agents reported `running`.
async fn ready_pool(n: usize) -> (LabLink, Vec<Hostname>) {
    let lablink = LabLink::builder().build().unwrap();
    let op = lablink.launch_and_wait(n, LONG).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{:?}", op.message);
    for h in &op.hostnames {
        lablink.report(h, running()).await.unwrap();
    }
    assert_eq!(lablink.counts().await.unwrap().assignable, n);
    (lablink, op.hostnames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_participants_over_five_hundred_vms_get_exactly_five_hundred() {
    let (lablink, hosts) = ready_pool(500).await;
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let l = lablink.clone();
            tokio::spawn(async move { (i, l.request_vm(&request(&format!("p{i}"))).await) })
        })
        .collect();
    let mut granted = HashMap::new();
    let mut no_capacity = 0;
    for t in tasks {
        let (i, result) = t.await.unwrap();
        match result {
            Ok(g) => {
                assert!(g.newly_assigned);
                granted.insert(i, g.hostname);
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::NoCapacity, "{e}");
                no_capacity += 1;
            }
        }
    }
    assert_eq!(granted.len(), 500);
    assert_eq!(no_capacity, 500);
    let distinct: HashSet<_> = granted.values().collect();
    assert_eq!(distinct.len(), 500, "a VM went to two participants");
    assert_eq!(
        distinct,
        hosts.iter().collect(),
        "an unknown VM was handed out"
    );
    for (i, h) in granted.iter().take(50) {
        let again = lablink
            .request_vm(&request(&format!("p{i}")))
            .await
            .unwrap();
        assert_eq!(&again.hostname, h, "a repeated email got another VM");
        assert!(!again.newly_assigned);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waiters_each_receive_their_own_assignment() {
    let (lablink, hosts) = ready_pool(1000).await;
    let waiters: Vec<_> = hosts
        .iter()
        .map(|h| {
            let (l, h) = (lablink.clone(), h.clone());
            tokio::spawn(async move { (h.clone(), l.wait_for_assignment(&h, LONG).await) })
        })
        .collect();
    let mut owner_of = HashMap::new();
    for i in 0..1000 {
        let g = lablink
            .request_vm(&request(&format!("p{i}")))
            .await
            .unwrap();
        owner_of.insert(g.hostname, (email(&format!("p{i}")), g.pin));
    }
    for w in waiters {
        let (h, got) = w.await.unwrap();
        let got = got.unwrap().expect("the waiter timed out");
        let (want_email, want_pin) = &owner_of[&h];
        assert_eq!(&got.email, want_email, "{h} got someone else's assignment");
        assert_eq!(&got.pin, want_pin);
        assert_eq!(
            got.crd_command,
            Some(command(got.email.as_str().trim_end_matches("@example.org")))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_wait_answers_at_once_when_assigned_and_ends_at_its_timeout_otherwise() {
    let (lablink, hosts) = ready_pool(2).await;
    let g = lablink.request_vm(&request("ada")).await.unwrap();
    let start = tokio::time::Instant::now();
    let got = lablink
        .wait_for_assignment(&g.hostname, LONG)
        .await
        .unwrap();
    assert_eq!(got.unwrap().email, email("ada"));
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "an assigned VM made the agent wait"
    );

    let free = hosts.iter().find(|h| **h != g.hostname).unwrap();
    let start = tokio::time::Instant::now();
    let got = lablink
        .wait_for_assignment(free, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(got.is_none());
    assert_eq!(start.elapsed(), Duration::from_secs(30));

    // The server-side maximum caps what an agent asks for.
    let start = tokio::time::Instant::now();
    lablink
        .wait_for_assignment(free, Duration::from_secs(86_400))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), lablink.config().max_wait);
}

/// A notifier whose next `failures` publishes fail, as a dropped connection would make them.
#[derive(Debug, Default)]
struct DroppingNotifier {
    inner: MemoryNotifier,
    failures: AtomicUsize,
}

#[async_trait]
impl Notifier for DroppingNotifier {
    async fn subscribe(&self, hostname: &Hostname) -> lablink_core::Result<Subscription> {
        self.inner.subscribe(hostname).await
    }
    async fn publish(&self, hostname: &Hostname) -> lablink_core::Result<()> {
        let dropped = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if dropped {
            return Err(lablink_core::Error::new(
                ErrorKind::Unavailable,
                "connection reset",
            ));
        }
        self.inner.publish(hostname).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_repeated_request_wakes_an_agent_whose_notification_was_lost() {
    let notifier = Arc::new(DroppingNotifier::default());
    let lablink = LabLink::builder()
        .with_notifier(notifier.clone())
        .build()
        .unwrap();
    let op = lablink.launch_and_wait(1, LONG).await.unwrap();
    let vm = op.hostnames[0].clone();
    lablink.report(&vm, running()).await.unwrap();
    let start = tokio::time::Instant::now();
    let mut waiter = tokio::spawn({
        let (l, vm) = (lablink.clone(), vm.clone());
        async move { l.wait_for_assignment(&vm, LONG).await }
    });
    while notifier.inner.subscribed_hostnames() == 0 {
        tokio::task::yield_now().await;
    }

    notifier.failures.store(1, Ordering::SeqCst);
    let first = lablink.request_vm(&request("ada")).await.unwrap();
    assert!(first.newly_assigned);
    let still_waiting = tokio::time::timeout(Duration::from_secs(1), &mut waiter).await;
    assert!(
        still_waiting.is_err(),
        "the lost notification woke the agent"
    );

    let again = lablink.request_vm(&request("ada")).await.unwrap();
    assert!(!again.newly_assigned);
    assert_eq!((&again.hostname, &again.pin), (&first.hostname, &first.pin));
    let got = waiter.await.unwrap().unwrap();
    assert_eq!(
        got.expect("the agent waited out its long-poll").email,
        email("ada")
    );
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "the retry did not wake the agent"
    );
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_registers_during_its_launch_finds_its_record() {
    // Upstream answered 404 to every VM that called in before its launch finished.
    let provisioner = FakeProvisioner::new().with_latency(Duration::from_secs(90));
    let lablink = LabLink::builder()
        .with_provisioner(Arc::new(provisioner.clone()))
        .with_clock(Arc::new(lablink_core::TokioClock::new()))
        .build()
        .unwrap();
    let op = lablink.launch(&LaunchOptions { count: 3 }).await.unwrap();
    assert_eq!(op.status, OperationStatus::Running);
    assert_eq!(provisioner.launch_calls(), 0, "the records must come first");
    for h in &op.hostnames {
        assert_eq!(lablink.vm(h).await.unwrap().state, VmState::Requested);
        let r = lablink
            .report(h, running())
            .await
            .expect("the agent was told 'not found'");
        assert_eq!(r.agent_status, Some(AgentStatus::Running));
        let wait = lablink.wait_for_assignment(h, Duration::from_secs(1)).await;
        assert!(wait.unwrap().is_none());
    }
    let again = lablink
        .launch(&LaunchOptions { count: 1 })
        .await
        .unwrap_err();
    assert_eq!(
        again.kind(),
        ErrorKind::Conflict,
        "two launches ran at once"
    );

    let done = lablink
        .wait_for_operation(op.id, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(done.status, OperationStatus::Succeeded);
    for h in &op.hostnames {
        let r = lablink.vm(h).await.unwrap();
        assert_eq!(
            r.state,
            VmState::Available,
            "ready agent not made available"
        );
        assert!(r.instance_id.is_some());
        assert!(r.timings.provision_seconds().unwrap() >= 90.0);
    }
}

#[tokio::test]
async fn a_failed_launch_marks_its_vms_failed_and_says_why() {
    let lablink = LabLink::builder()
        .with_provisioner(Arc::new(FakeProvisioner::new().with_failure_rate(1.0)))
        .build()
        .unwrap();
    let op = lablink.launch_and_wait(4, LONG).await.unwrap();
    assert_eq!(op.status, OperationStatus::Failed);
    assert!(
        op.message.as_deref().unwrap().contains("failed every VM"),
        "{:?}",
        op.message
    );
    for h in &op.hostnames {
        let r = lablink.vm(h).await.unwrap();
        assert_eq!(r.state, VmState::Failed);
        assert!(r.last_error.as_deref().unwrap().contains("failed every VM"));
    }
    assert!(
        op.progress.iter().any(|l| l.contains("no capacity")),
        "{:?}",
        op.progress
    );
}

#[tokio::test]
async fn partial_launch_failures_fail_only_the_missing_vms() {
    let lablink = LabLink::builder()
        .with_provisioner(Arc::new(
            FakeProvisioner::new().with_failure_rate(0.5).with_seed(11),
        ))
        .build()
        .unwrap();
    let op = lablink.launch_and_wait(40, LONG).await.unwrap();
    let vms = lablink.vms(&VmFilter::default()).await.unwrap();
    let failed = vms.iter().filter(|r| r.state == VmState::Failed).count();
    let booting = vms.iter().filter(|r| r.state == VmState::Booting).count();
    assert_eq!(failed + booting, 40);
    assert!(
        failed > 0 && booting > 0,
        "seed 11 should fail some, not all"
    );
    assert_eq!(op.status, OperationStatus::Failed);
    assert_eq!(
        op.message.unwrap(),
        format!("{failed} of 40 VMs could not be created")
    );
}

#[tokio::test]
async fn hostnames_continue_after_the_highest_existing_one() {
    let lablink = LabLink::builder().build().unwrap();
    let a = lablink.launch_and_wait(2, LONG).await.unwrap();
    let b = lablink.launch_and_wait(2, LONG).await.unwrap();
    let names: Vec<_> = a
        .hostnames
        .iter()
        .chain(&b.hostnames)
        .map(|h| h.to_string())
        .collect();
    assert_eq!(
        names,
        [
            "lablink-vm-1",
            "lablink-vm-2",
            "lablink-vm-3",
            "lablink-vm-4"
        ]
    );
    let gone = lablink
        .destroy(&DestroyTarget::Hostnames(b.hostnames.clone()))
        .await
        .unwrap();
    lablink.wait_for_operation(gone.id, LONG).await.unwrap();
    let c = lablink.launch_and_wait(1, LONG).await.unwrap();
    assert_eq!(
        c.hostnames[0].as_str(),
        "lablink-vm-5",
        "a destroyed VM's name was reused"
    );
}

#[tokio::test]
async fn a_wiped_store_does_not_reuse_names_of_running_machines() {
    let provisioner = FakeProvisioner::new();
    let first = LabLink::builder()
        .with_provisioner(Arc::new(provisioner.clone()))
        .build()
        .unwrap();
    first.launch_and_wait(3, LONG).await.unwrap();
    // A new allocator with an empty store, same cloud account.
    let second = LabLink::builder()
        .with_provisioner(Arc::new(provisioner.clone()))
        .build()
        .unwrap();
    let op = second.launch_and_wait(1, LONG).await.unwrap();
    assert_eq!(op.hostnames[0].as_str(), "lablink-vm-4");
}

#[tokio::test]
async fn destroy_one_some_or_all_removes_records_and_machines() {
    let provisioner = FakeProvisioner::new();
    let lablink = LabLink::builder()
        .with_provisioner(Arc::new(provisioner.clone()))
        .build()
        .unwrap();
    let op = lablink.launch_and_wait(5, LONG).await.unwrap();
    let hosts = op.hostnames;
    let g = {
        for h in &hosts {
            lablink.report(h, running()).await.unwrap();
        }
        lablink.request_vm(&request("ada")).await.unwrap()
    };
    let one = lablink
        .destroy(&DestroyTarget::Hostnames(vec![g.hostname.clone()]))
        .await
        .unwrap();
    let one = lablink.wait_for_operation(one.id, LONG).await.unwrap();
    assert_eq!(one.status, OperationStatus::Succeeded);
    assert!(lablink.vm(&g.hostname).await.unwrap_err().is_not_found());
    assert_eq!(
        lablink
            .vms(&VmFilter {
                email: Some(email("ada")),
                ..Default::default()
            })
            .await
            .unwrap()
            .len(),
        0
    );
    use lablink_core::Provisioner;
    assert_eq!(provisioner.list().await.unwrap().len(), 4);

    let all = lablink.destroy(&DestroyTarget::All).await.unwrap();
    lablink.wait_for_operation(all.id, LONG).await.unwrap();
    assert_eq!(lablink.counts().await.unwrap().total, 0);
    assert!(provisioner.list().await.unwrap().is_empty());

    let unknown = lablink
        .destroy(&DestroyTarget::Hostnames(vec!["nope".parse().unwrap()]))
        .await
        .unwrap_err();
    assert!(unknown.is_not_found());
}

#[tokio::test]
async fn a_waiting_agent_learns_when_its_vm_is_destroyed() {
    let (lablink, hosts) = ready_pool(1).await;
    let l = lablink.clone();
    let h = hosts[0].clone();
    let waiter = tokio::spawn(async move { l.wait_for_assignment(&h, LONG).await });
    tokio::task::yield_now().await;
    let op = lablink.destroy(&DestroyTarget::All).await.unwrap();
    lablink.wait_for_operation(op.id, LONG).await.unwrap();
    let err = waiter.await.unwrap().unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

#[tokio::test]
async fn reboot_keeps_the_owner_and_the_vm_returns_when_its_agent_is_back() {
    let provisioner = FakeProvisioner::new();
    let lablink = LabLink::builder()
        .with_provisioner(Arc::new(provisioner.clone()))
        .build()
        .unwrap();
    let op = lablink.launch_and_wait(1, LONG).await.unwrap();
    let h = op.hostnames[0].clone();
    lablink.report(&h, running()).await.unwrap();
    lablink.request_vm(&request("ada")).await.unwrap();
    let reboot = lablink.reboot(&h).await.unwrap();
    let reboot = lablink.wait_for_operation(reboot.id, LONG).await.unwrap();
    assert_eq!(reboot.status, OperationStatus::Succeeded);
    assert_eq!(provisioner.reboots(&h), 1);
    let r = lablink.vm(&h).await.unwrap();
    assert!(matches!(r.state, VmState::Rebooting { .. }));
    assert_eq!(r.owner(), Some(&email("ada")));
    let r = lablink.report(&h, running()).await.unwrap();
    assert_eq!(r.state, VmState::Assigned);
}

#[tokio::test]
async fn gpu_health_reports_take_a_vm_out_of_the_pool_and_back() {
    let (lablink, hosts) = ready_pool(1).await;
    let gpu = |h| Telemetry {
        gpu_health: Some(h),
        ..Default::default()
    };
    let r = lablink
        .report(&hosts[0], gpu(GpuHealth::Unhealthy))
        .await
        .unwrap();
    assert!(matches!(r.state, VmState::Unhealthy { .. }));
    assert_eq!(lablink.counts().await.unwrap().assignable, 0);
    let err = lablink.request_vm(&request("ada")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoCapacity);
    let r = lablink
        .report(&hosts[0], gpu(GpuHealth::Healthy))
        .await
        .unwrap();
    assert_eq!(r.state, VmState::Available);
    lablink.request_vm(&request("ada")).await.unwrap();
}

#[tokio::test]
async fn agent_tokens_identify_their_vm_and_nothing_else() {
    let lablink = LabLink::builder().build().unwrap();
    let op = lablink.launch_and_wait(2, LONG).await.unwrap();
    let err = lablink
        .authenticate_agent(&AgentToken::generate())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthenticated);
    assert_eq!(err.to_string(), "invalid token");
    // Tokens are shown only to the provisioner; the store has digests.
    let r = lablink.vm(&op.hostnames[0]).await.unwrap();
    assert!(r.token_digest.is_some());
}

#[tokio::test]
async fn bad_input_gets_typed_errors_and_changes_nothing() {
    let (lablink, hosts) = ready_pool(2).await;
    let before = lablink.vms(&VmFilter::default()).await.unwrap();

    for count in [0, 1001] {
        let err = lablink.launch(&LaunchOptions { count }).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.to_string().contains("between 1 and 1000"), "{err}");
    }
    let err = lablink.release(&hosts[0]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTransition);
    assert!(
        err.to_string()
            .contains("cannot apply 'release' to a VM that is available"),
        "{err}"
    );
    let ghost: Hostname = "ghost".parse().unwrap();
    assert!(lablink
        .report(&ghost, running())
        .await
        .unwrap_err()
        .is_not_found());
    assert!(lablink.reboot(&ghost).await.unwrap_err().is_not_found());
    assert!(lablink.logs(&ghost).await.unwrap_err().is_not_found());
    let huge_boot_id = Telemetry {
        heartbeat: Some("b".repeat(10_000)),
        in_use: Some(true),
        ..Default::default()
    };
    let err = lablink.report(&hosts[0], huge_boot_id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(
        lablink.vms(&VmFilter::default()).await.unwrap(),
        before,
        "bad input changed state"
    );

    for bad in ["", "no-at-sign", "a@b@c", "two words@x.org"] {
        assert_eq!(
            bad.parse::<lablink_core::Email>().unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
    for bad in [
        "start-host",
        "--code=$(reboot)",
        "--code=`id`",
        "--code=a;b",
    ] {
        let err = bad.parse::<lablink_core::CrdCommand>().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(
            !err.to_string().contains("reboot"),
            "the error echoes the command"
        );
    }
}

#[tokio::test]
async fn logs_are_cleaned_and_capped_by_the_allocator() {
    let config = lablink_core::AllocatorConfig {
        log_cap_bytes: 4096,
        ..Default::default()
    };
    let lablink = LabLink::builder().with_config(config).build().unwrap();
    let op = lablink.launch_and_wait(1, LONG).await.unwrap();
    let h = &op.hostnames[0];
    for batch in 0..20 {
        let t = Telemetry {
            logs: vec![lablink_core::LogAppend {
                stream: lablink_core::LogStream::CloudInit,
                lines: (0..40)
                    .map(|i| format!("\u{1b}[32mbatch {batch:02} line {i:02}\u{1b}[0m\n\n"))
                    .collect(),
            }],
            ..Default::default()
        };
        lablink.report(h, t).await.unwrap();
    }
    let logs = lablink.logs(h).await.unwrap();
    assert!(logs.cloud_init.len() <= 4096);
    assert!(logs.cloud_init.ends_with("batch 19 line 39"));
    assert!(!logs.cloud_init.contains('\u{1b}'));
    assert!(!logs.cloud_init.contains("\n\n"));
}

#[test]
fn invalid_config_lists_every_problem() {
    let config = lablink_core::AllocatorConfig {
        hostname_prefix: ".bad".into(),
        pin_length: 2,
        max_launch: 0,
        ..Default::default()
    };
    let err = LabLink::builder().with_config(config).build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    let msg = err.to_string();
    for needle in ["hostname_prefix", "pin_length", "max_launch"] {
        assert!(msg.contains(needle), "{msg}");
    }
}
