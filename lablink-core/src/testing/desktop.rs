//! The desktop part of the [`VmStore`] conformance suite (stamped out with the rest by
//! [`vm_store_conformance!`](crate::vm_store_conformance)): what an assignment's desktop
//! session and a reset keep. Each function starts from an empty store.

use uuid::Uuid;

use super::store::{claim_request, command, seed_available, t0};
use crate::desktop::{DesktopChange, DesktopFailure, DesktopReport, DesktopStage, TunnelRequest};
use crate::store::ClaimRequest;
use crate::{AgentStatus, Telemetry, VmEvent, VmState, VmStore};

/// A claim starts attempt 1; the agent's reports, a fresh command after a failure and a
/// tunnel request are kept as the store read them back; a stale report changes nothing.
pub async fn desktop_sessions_are_kept_with_their_assignment(store: &dyn VmStore) {
    seed_available(store, 1).await;
    let c = store.claim(&claim_request("ada"), t0()).await.unwrap();
    let h = c.record.hostname.clone();
    let a = c.record.assignment.expect("assigned");
    assert_eq!(
        (a.desktop.attempt, a.desktop.stage),
        (1, DesktopStage::Assigned)
    );
    let report = |attempt, stage, failure| {
        VmEvent::Desktop(DesktopChange::Report(DesktopReport {
            attempt,
            stage,
            failure,
            exit_status: Some(1),
        }))
    };
    let failed = report(1, DesktopStage::Failed, Some(DesktopFailure::CodeRejected));
    store.apply(&h, &failed, None, t0()).await.unwrap();
    let fresh = VmEvent::Desktop(DesktopChange::NewCommand(command("ada-2")));
    store.apply(&h, &fresh, None, t0()).await.unwrap();
    let stale = report(1, DesktopStage::Ready, None);
    let before = store.get(&h).await.unwrap();
    let after = store.apply(&h, &stale, None, t0()).await.unwrap();
    assert_eq!(
        after.generation, before.generation,
        "a stale report changed the VM"
    );
    let tunnel = TunnelRequest {
        id: Uuid::from_u128(7),
        url: "/api/v1/vms/x/tunnel/7".into(),
        at: t0(),
    };
    let open = VmEvent::Desktop(DesktopChange::Tunnel(tunnel.clone()));
    store.apply(&h, &open, None, t0()).await.unwrap();
    let read = store.get(&h).await.unwrap();
    let a = read.assignment.expect("still assigned");
    assert_eq!(read.state, VmState::Assigned);
    assert_eq!(
        a.crd_command,
        Some(command("ada-2")),
        "the fresh command is the one kept"
    );
    assert_eq!(
        (a.desktop.attempt, a.desktop.stage),
        (2, DesktopStage::Assigned)
    );
    assert_eq!(a.desktop.tunnel, Some(tunnel));
    // The next assignment of the VM starts over.
    store
        .apply(&h, &VmEvent::Release, None, t0())
        .await
        .unwrap();
    let again = store.claim(&claim_request("bob"), t0()).await.unwrap();
    let a = again.record.assignment.expect("assigned");
    assert_eq!((a.desktop.attempt, a.desktop.tunnel), (1, None));
}

/// A browser desktop's assignment holds no command, and is stored and read back so.
pub async fn a_browser_assignment_has_no_command(store: &dyn VmStore) {
    seed_available(store, 1).await;
    let request = ClaimRequest {
        crd_command: None,
        ..claim_request("ada")
    };
    let c = store.claim(&request, t0()).await.unwrap();
    let read = store.get(&c.record.hostname).await.unwrap();
    assert_eq!(read.assignment.expect("assigned").crd_command, None);
}

/// A reset VM is `Resetting`, unowned and not assignable, until its agent reports it runs.
pub async fn a_reset_vm_is_free_only_once_its_agent_runs(store: &dyn VmStore) {
    seed_available(store, 1).await;
    let c = store.claim(&claim_request("ada"), t0()).await.unwrap();
    let h = c.record.hostname;
    let r = store.apply(&h, &VmEvent::Reset, None, t0()).await.unwrap();
    assert_eq!(r.state, VmState::Resetting);
    assert!(r.assignment.is_none() && r.reset_requested());
    let read = store.get(&h).await.unwrap();
    assert_eq!((read.state, read.agent_status), (VmState::Resetting, None));
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.assignable, counts.assigned), (0, 0));
    let err = store.claim(&claim_request("bob"), t0()).await.unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::NoCapacity, "{err}");
    let running = Telemetry {
        status: Some(AgentStatus::Running),
        ..Default::default()
    };
    store.record_telemetry(&h, &running, t0()).await.unwrap();
    let r = store
        .apply(&h, &VmEvent::AgentReady, None, t0())
        .await
        .unwrap();
    assert_eq!(r.state, VmState::Available);
    store.claim(&claim_request("bob"), t0()).await.unwrap();
}
