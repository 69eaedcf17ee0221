#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod allocator;
mod artifact;
mod before_destroy;
mod clock;
mod demand;
mod error;
mod fake;
mod ids;
mod lablink;
mod logs;
mod notifier;
mod operation;
mod provisioner;
mod reconcile;
mod record;
mod retry;
mod roster;
mod secret;
mod state;
mod store;
mod supervision;
mod supervisor;

#[cfg(feature = "testing")]
pub mod testing;

pub use allocator::{Allocator, AllocatorExt, DestroyTarget, Granted, LaunchOptions, VmRequest};
pub use artifact::{
    collected_path_problem, validate_artifact_key, ArtifactInfo, ArtifactStore,
    LocalDirArtifactStore, MemoryArtifactStore, MAX_COLLECTED_PATH,
};
pub use before_destroy::BeforeDestroy;
pub use clock::{Clock, SystemClock, TokioClock};
pub use error::{Error, ErrorKind, ErrorStatus, Result};
pub use fake::{FakeConfig, FakeProvisioner, FAILURE_RATE_FILE};
pub use ids::{Email, Hostname, InstanceId};
pub use lablink::{AllocatorConfig, LabLink, LabLinkBuilder};
pub use logs::{clean_lines, fit_lines, BoundedLog, LogAppend, LogStream, VmLogs};
pub use notifier::{MemoryNotifier, Notifier, Subscription, Wake};
pub use operation::{Operation, OperationKind, OperationStatus, MAX_PROGRESS_LINES};
pub use provisioner::{Capabilities, LaunchRequest, Progress, ProvisionedVm, Provisioner, VmSpec};
pub use reconcile::{OrphanPolicy, ReconcileReport};
pub use record::{
    AgentStatus, GpuHealth, StartupTimings, Telemetry, VmRecord, DEFAULT_LOG_CAP_BYTES, MAX_BOOT_ID,
};
pub use retry::{RetryPolicy, RetryProvisioner};
pub use secret::{redacted, AgentToken, CrdCommand, Pin, TokenDigest, CRD_REDIRECT_URL};
pub use state::{transition, Assignment, InvalidTransition, Phase, VmEvent, VmState};
pub use store::{
    ClaimRequest, Claimed, LeaderLease, MemoryVmStore, ProvisioningLock, VmCounts, VmFilter,
    VmStore,
};
pub use supervision::{FlagKind, SupervisorCounters, SupervisorStatus, VmFlag};
pub use supervisor::{
    DestructionConfig, IdleReleaseConfig, LadderConfig, LeaseConfig, PoolConfig, PoolWindow,
    ReconcileConfig, Supervisor, SupervisorConfig,
};

#[cfg(feature = "mock")]
pub use allocator::MockAllocator;
#[cfg(feature = "mock")]
pub use notifier::MockNotifier;
#[cfg(feature = "mock")]
pub use provisioner::MockProvisioner;
#[cfg(feature = "mock")]
pub use store::MockVmStore;
