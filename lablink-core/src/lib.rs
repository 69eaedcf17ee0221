#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

// The modules are public: each holds its concern whole (`store`, `state`, `supervisor`...).
// The items most code needs are also re-exported here.
pub mod allocator;
pub mod archive;
pub mod artifact;
pub mod audit;
mod before_destroy;
pub mod clock;
mod demand;
pub mod desktop;
pub mod error;
pub mod fake;
pub mod ids;
mod lablink;
pub mod logs;
pub mod manual;
pub mod notifier;
pub mod operation;
pub mod provisioner;
pub mod reconcile;
pub mod record;
pub mod registration;
pub mod retry;
mod roster;
pub mod secret;
pub mod settings;
pub mod state;
pub mod store;
mod supervision;
pub mod supervisor;
pub mod usage;
pub mod warning;
mod wire;

#[cfg(feature = "testing")]
pub mod testing;

pub use allocator::{
    Allocator, AllocatorExt, DestroyTarget, Granted, LaunchOptions, RegistrationTokenOptions,
    VmRequest,
};
pub use archive::RemovedVm;
pub use artifact::{ArtifactStore, LocalDirArtifactStore, MemoryArtifactStore};
pub use audit::{AuditAction, AuditEntry, AuditQuery};
pub use before_destroy::BeforeDestroy;
pub use clock::{Clock, SystemClock, TokioClock};
pub use desktop::{
    DesktopChange, DesktopFailure, DesktopMode, DesktopReport, DesktopSession, DesktopStage, Reuse,
    TunnelRequest,
};
pub use error::{Error, ErrorKind, Result};
pub use fake::{FakeConfig, FakeProvisioner};
pub use ids::{Email, Hostname, InstanceId};
pub use lablink::{AllocatorConfig, LabLink, LabLinkBuilder};
pub use logs::{LogAppend, LogStream, VmLogs};
pub use manual::{ManualProvisioner, MixedProvisioner, NoProvisioner};
pub use notifier::{MemoryNotifier, Notifier};
pub use operation::{Operation, OperationKind, OperationStatus};
pub use provisioner::{Capabilities, LaunchRequest, Progress, ProvisionedVm, Provisioner, VmSpec};
pub use reconcile::{OrphanPolicy, ReconcileReport};
pub use record::{AgentStatus, GpuHealth, History, StartupTimings, Telemetry, VmRecord};
pub use registration::{MachineRegistration, RegistrationToken};
pub use retry::{RetryPolicy, RetryProvisioner};
pub use secret::{redacted, AgentToken, CrdCommand};
pub use settings::WorkshopSettings;
pub use state::{Assignment, Phase, VmEvent, VmState};
pub use store::{MemoryVmStore, VmCounts, VmFilter, VmStore};
pub use supervisor::{Supervisor, SupervisorConfig, SupervisorStatus};
pub use usage::{FleetUsage, Prices, UsageKind};
pub use warning::{VmWarning, WarningKind};

#[cfg(feature = "mock")]
pub use allocator::MockAllocator;
#[cfg(feature = "mock")]
pub use notifier::MockNotifier;
#[cfg(feature = "mock")]
pub use provisioner::MockProvisioner;
#[cfg(feature = "mock")]
pub use store::MockVmStore;
