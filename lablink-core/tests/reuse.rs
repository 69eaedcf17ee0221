//! What ends an assignment does to the VM (`AllocatorConfig::reuse`), and the desktop of an
//! assignment through the allocator: a fresh command after a failure wakes the agent's
//! watch, and a browser desktop's claim holds no command and proves nothing by it.

use std::time::Duration;

use lablink_core::testing::store::{command, email};
use lablink_core::{
    AgentStatus, Allocator, AllocatorConfig, AllocatorExt, DesktopChange, DesktopFailure,
    DesktopMode, DesktopReport, DesktopStage, Hostname, LabLink, OperationStatus, Reuse, Telemetry,
    VmRequest, VmState,
};

const LONG: Duration = Duration::from_secs(60);

fn status(s: AgentStatus) -> Telemetry {
    Telemetry {
        status: Some(s),
        ..Default::default()
    }
}

fn request(who: &str) -> VmRequest {
    VmRequest {
        email: email(who),
        crd_command: Some(command(who)),
    }
}

/// One launched VM whose agent runs, under `config`.
async fn one_vm(config: AllocatorConfig) -> (LabLink, Hostname) {
    let lablink = LabLink::builder().with_config(config).build().unwrap();
    let op = lablink.launch_and_wait(1, LONG).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{:?}", op.message);
    let h = op.hostnames[0].clone();
    lablink
        .report(&h, status(AgentStatus::Running))
        .await
        .unwrap();
    (lablink, h)
}

fn reusing(reuse: Reuse) -> AllocatorConfig {
    AllocatorConfig {
        reuse,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_reset_vm_goes_to_the_next_participant_only_after_its_agent_reset_it() {
    let (lablink, h) = one_vm(reusing(Reuse::Reset)).await;
    lablink.request_vm(&request("ada")).await.unwrap();
    let released = lablink.release(&h).await.unwrap();
    assert_eq!(released.state, VmState::Resetting);
    assert!(released.reset_requested());
    let refused = lablink.request_vm(&request("bob")).await.unwrap_err();
    assert!(
        refused.kind() == lablink_core::ErrorKind::NoCapacity,
        "{refused}"
    );
    // The agent says it resets, then that it runs again.
    let r = lablink
        .report(&h, status(AgentStatus::Initializing))
        .await
        .unwrap();
    assert!(
        !r.reset_requested(),
        "the reset is asked for until the agent reports"
    );
    let r = lablink
        .report(&h, status(AgentStatus::Running))
        .await
        .unwrap();
    assert_eq!(r.state, VmState::Available);
    let bob = lablink.request_vm(&request("bob")).await.unwrap();
    assert_eq!(bob.hostname, h);
}

#[tokio::test]
async fn a_failed_reset_keeps_the_vm_out_of_the_pool() {
    let (lablink, h) = one_vm(reusing(Reuse::Reset)).await;
    lablink.request_vm(&request("ada")).await.unwrap();
    lablink.release(&h).await.unwrap();
    let r = lablink
        .report(&h, status(AgentStatus::Error))
        .await
        .unwrap();
    assert_eq!(r.state, VmState::Failed);
    assert_eq!(lablink.counts().await.unwrap().assignable, 0);
}

#[tokio::test]
async fn a_replaced_vm_is_destroyed_and_keep_frees_it_as_it_is() {
    let (lablink, h) = one_vm(reusing(Reuse::Replace)).await;
    lablink.request_vm(&request("ada")).await.unwrap();
    let r = lablink.release(&h).await.unwrap();
    assert!(
        matches!(r.state, VmState::Terminating | VmState::Terminated),
        "{}",
        r.state
    );
    let (lablink, h) = one_vm(reusing(Reuse::Keep)).await;
    lablink.request_vm(&request("ada")).await.unwrap();
    assert_eq!(lablink.release(&h).await.unwrap().state, VmState::Available);
}

#[tokio::test]
async fn a_fresh_command_after_a_failure_wakes_the_agents_watch() {
    let (lablink, h) = one_vm(AllocatorConfig::default()).await;
    lablink.request_vm(&request("ada")).await.unwrap();
    let first = lablink
        .wait_for_assignment(&h, LONG)
        .await
        .unwrap()
        .unwrap();
    let failed = DesktopChange::Report(DesktopReport {
        attempt: 1,
        stage: DesktopStage::Failed,
        failure: Some(DesktopFailure::CodeRejected),
        exit_status: Some(1),
    });
    lablink.change_desktop(&h, &failed).await.unwrap();
    let seen = lablink.vm(&h).await.unwrap().assignment.unwrap().version();
    assert_ne!(seen, first.version(), "a report is a change the page sees");
    let watch = {
        let lablink = lablink.clone();
        let (h, seen) = (h.clone(), seen.clone());
        tokio::spawn(async move { lablink.watch_assignment(&h, &seen, LONG).await })
    };
    let fresh = DesktopChange::NewCommand(command("ada-again"));
    lablink.change_desktop(&h, &fresh).await.unwrap();
    let woke = watch.await.unwrap().unwrap().expect("still assigned");
    assert_eq!(woke.desktop.attempt, 2);
    assert_eq!(woke.crd_command, Some(command("ada-again")));
    // While the new attempt runs, another command is refused.
    let received = DesktopChange::Report(DesktopReport {
        attempt: 2,
        stage: DesktopStage::Received,
        failure: None,
        exit_status: None,
    });
    lablink.change_desktop(&h, &received).await.unwrap();
    let again = DesktopChange::NewCommand(command("ada-third"));
    let err = lablink.change_desktop(&h, &again).await.unwrap_err();
    assert!(err.is_conflict(), "{err}");
    // Released: the watch answers at once with no assignment.
    lablink.release(&h).await.unwrap();
    assert!(lablink
        .watch_assignment(&h, &seen, LONG)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_browser_desktop_claim_holds_no_command_and_a_repeat_proves_nothing() {
    let config = AllocatorConfig {
        desktop_mode: DesktopMode::Browser,
        ..Default::default()
    };
    let (lablink, h) = one_vm(config).await;
    let bare = VmRequest {
        email: email("ada"),
        crd_command: None,
    };
    let got = lablink.request_vm(&bare).await.unwrap();
    assert_eq!(got.hostname, h);
    let a = lablink.vm(&h).await.unwrap().assignment.unwrap();
    assert_eq!(a.crd_command, None);
    let repeat = lablink.request_vm(&bare).await.unwrap();
    assert!(!repeat.newly_assigned && !repeat.same_code);
    // In Chrome Remote Desktop mode a request without a command is refused.
    let (crd, _) = one_vm(AllocatorConfig::default()).await;
    let err = crd.request_vm(&bare).await.unwrap_err();
    assert_eq!(err.kind(), lablink_core::ErrorKind::InvalidInput, "{err}");
}
