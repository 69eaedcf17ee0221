//! The [`Provisioner`] trait: creates, lists, reboots and removes machines.

use std::fmt::{self, Debug};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{AgentToken, Hostname, InstanceId, Result};

/// One machine to create: its hostname and the token its agent will present.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSpec {
    /// The hostname the VM will have (and report as `VM_NAME`).
    pub hostname: Hostname,
    /// Its agent token, to deliver to the VM (user data, environment). A secret.
    pub token: AgentToken,
}

type ProgressSink = Arc<dyn Fn(&str) + Send + Sync>;

/// A sink for human-readable progress lines (provider output), recorded on the operation.
#[derive(Clone, Default)]
pub struct Progress(Option<ProgressSink>);

impl Progress {
    /// Progress lines go to `sink`.
    pub fn new(sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(sink)))
    }

    /// Reports one line (no-op without a sink). Never pass a secret.
    pub fn report(&self, line: &str) {
        if let Some(sink) = &self.0 {
            sink(line);
        }
    }
}

impl Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Progress(sink)"
        } else {
            "Progress(none)"
        })
    }
}

/// What [`Provisioner::launch`] creates. `Default` creates nothing.
#[derive(Debug, Clone, Default)]
pub struct LaunchRequest {
    /// The machines, already recorded as `Requested` by the allocator.
    pub vms: Vec<VmSpec>,
    /// Where provider output goes.
    pub progress: Progress,
}

/// A machine as the provider knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProvisionedVm {
    /// Its hostname.
    pub hostname: Hostname,
    /// The provider's id.
    pub instance_id: InstanceId,
    /// Its address, when known.
    pub address: Option<String>,
    /// Its instance type (a price table's key), when the provider says.
    pub instance_type: Option<String>,
}

/// What a provisioner can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// `launch` creates machines (false for machines that join by registering).
    pub launch: bool,
    /// `reboot` works.
    pub reboot: bool,
    /// `list` reports the provider's own inventory (needed by reconcile).
    pub list: bool,
    /// Largest batch one `launch` accepts, if limited.
    pub max_batch: Option<usize>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            launch: true,
            reboot: true,
            list: true,
            max_batch: None,
        }
    }
}

/// Creates and removes machines.
///
/// # Contract
///
/// The conformance suite [`testing::provisioner`](crate::testing) checks every point.
///
/// - When `capabilities().launch` is false, `launch` of any machine is
///   [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) and creates nothing.
/// - `launch` creates one machine per spec and returns one [`ProvisionedVm`] per machine it
///   created, with the spec's hostname and a distinct instance id. A spec it could not create
///   is missing from the result (the allocator marks it failed); a failure of the whole call is
///   an `Err` classified by kind and retry status. An empty request creates nothing.
/// - Launching a hostname that already exists does not create a second machine for it.
/// - `list` returns every machine of this deployment the provider has, including ones created
///   by an earlier process (the inventory for reconcile).
/// - `destroy` removes exactly the given machines and is idempotent: a machine already gone is
///   not an error. Other machines are untouched.
/// - `reboot` of an unknown machine is [`ErrorKind::NotFound`](crate::ErrorKind::NotFound);
///   when `capabilities().reboot` is false it is
///   [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig).
/// - Agent tokens are delivered to their VM only and never logged.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Provisioner: Send + Sync + Debug {
    /// What this provisioner can do.
    fn capabilities(&self) -> Capabilities;

    /// Creates the requested machines.
    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<ProvisionedVm>>;

    /// Removes the given machines.
    async fn destroy(&self, vms: &[ProvisionedVm]) -> Result<()>;

    /// The provider's inventory for this deployment.
    async fn list(&self) -> Result<Vec<ProvisionedVm>>;

    /// Reboots one machine.
    async fn reboot(&self, vm: &ProvisionedVm) -> Result<()>;
}
