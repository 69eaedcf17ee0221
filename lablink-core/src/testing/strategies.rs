//! proptest strategies for LabLink's inputs, for downstream property suites.

use proptest::prelude::*;

use crate::secret::Pin;
use crate::{
    AgentStatus, Assignment, CrdCommand, Email, GpuHealth, Hostname, Phase, VmEvent, VmState,
};

/// Valid hostnames.
pub fn hostname() -> impl Strategy<Value = Hostname> {
    "[a-z0-9][a-z0-9._-]{0,20}".prop_map(|s| s.parse().expect("valid by construction"))
}

/// Valid emails from a small pool of names (so repeats happen).
pub fn email() -> impl Strategy<Value = Email> {
    (0..30u32).prop_map(|i| format!("p{i}@example.org").parse().expect("valid"))
}

/// Valid CRD commands.
pub fn crd_command() -> impl Strategy<Value = CrdCommand> {
    "[A-Za-z0-9_-]{1,40}".prop_map(|code| {
        format!("start-host --code=\"4/{code}\" --redirect-url=\"https://remotedesktop.google.com/_/oauthredirect\"")
            .parse()
            .expect("valid")
    })
}

/// Valid PINs.
pub fn pin() -> impl Strategy<Value = Pin> {
    "[0-9]{6,12}".prop_map(|s| s.parse().expect("valid"))
}

/// Any assignment.
pub fn assignment() -> impl Strategy<Value = Assignment> {
    (email(), crd_command(), pin()).prop_map(|(email, crd_command, pin)| Assignment {
        email,
        crd_command: Some(crd_command),
        pin,
        assigned_at: super::store::t0(),
        desktop: crate::DesktopSession::new(super::store::t0()),
    })
}

/// Any live phase.
pub fn phase() -> impl Strategy<Value = Phase> {
    prop_oneof![
        Just(Phase::Booting),
        Just(Phase::Available),
        Just(Phase::Assigned)
    ]
}

/// Any state.
pub fn vm_state() -> impl Strategy<Value = VmState> {
    prop_oneof![
        Just(VmState::Requested),
        Just(VmState::Booting),
        Just(VmState::Available),
        Just(VmState::Assigned),
        phase().prop_map(|resume| VmState::Unhealthy { resume }),
        phase().prop_map(|resume| VmState::Rebooting { resume }),
        Just(VmState::Failed),
        Just(VmState::Terminating),
        Just(VmState::Terminated),
    ]
}

/// Any event, with payloads.
pub fn vm_event() -> impl Strategy<Value = VmEvent> {
    prop_oneof![
        "[0-9a-f]{8}".prop_map(|id| VmEvent::Provisioned {
            instance_id: format!("i-{id}").parse().expect("valid"),
            address: None,
            instance_type: None,
        }),
        Just(VmEvent::ProvisionFailed {
            reason: "no capacity".into()
        }),
        Just(VmEvent::AgentReady),
        Just(VmEvent::BootTimedOut),
        Just(VmEvent::SetupFailed {
            reason: "the start-up script failed".into()
        }),
        Just(VmEvent::InstanceLost {
            reason: "the provider has no such machine".into()
        }),
        assignment().prop_map(VmEvent::Claim),
        Just(VmEvent::Release),
        Just(VmEvent::MarkUnhealthy {
            reason: "lease expired".into()
        }),
        Just(VmEvent::Recovered),
        Just(VmEvent::Reboot),
        Just(VmEvent::Destroy),
        Just(VmEvent::Terminated),
    ]
}

/// Any GPU health report.
pub fn gpu_health() -> impl Strategy<Value = GpuHealth> {
    prop_oneof![
        Just(GpuHealth::Healthy),
        Just(GpuHealth::Unhealthy),
        Just(GpuHealth::NotAvailable),
    ]
}

/// Any agent status report.
pub fn agent_status() -> impl Strategy<Value = AgentStatus> {
    prop_oneof![
        Just(AgentStatus::Initializing),
        Just(AgentStatus::Running),
        Just(AgentStatus::Error),
        Just(AgentStatus::Rebooting),
        Just(AgentStatus::Unknown),
    ]
}

/// One step a participant, agent or admin takes against an allocator with VMs `0..vms`.
#[derive(Debug, Clone)]
pub enum Step {
    /// Launch this many VMs.
    Launch(usize),
    /// Participant `who` requests a VM.
    Request(u32),
    /// VM `vm` (by launch order) reports `running`.
    Ready(usize),
    /// VM `vm` reports GPU health.
    Gpu(usize, GpuHealth),
    /// VM `vm`'s assignment is released.
    Release(usize),
    /// VM `vm` is destroyed.
    Destroy(usize),
}

/// Random steps for model-based tests of an [`Allocator`](crate::Allocator).
pub fn step(max_vms: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => (1..4usize).prop_map(Step::Launch),
        4 => (0..30u32).prop_map(Step::Request),
        3 => (0..max_vms).prop_map(Step::Ready),
        1 => ((0..max_vms), gpu_health()).prop_map(|(v, h)| Step::Gpu(v, h)),
        2 => (0..max_vms).prop_map(Step::Release),
        1 => (0..max_vms).prop_map(Step::Destroy),
    ]
}
