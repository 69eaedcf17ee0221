#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod builder;
mod config;
mod error;
mod module;
mod outputs;
mod provisioner;
mod runner;
mod vars;

pub use builder::{TerraformProvisionerBuilder, DEFAULT_SHUTDOWN_GRACE, DEFAULT_TIMEOUT};
pub use config::{StateBackend, TerraformConfig};
pub use module::AWS_MODULE_FILES;
pub use provisioner::TerraformProvisioner;

/// The variables every module applied by [`TerraformProvisioner`] must declare: `vms`
/// (`map(object({ token = string }))`, sensitive: hostname => that VM's agent token) and
/// `deployment` (string).
pub const MODULE_VARIABLES: &[&str] = &[vars::VMS_VARIABLE, vars::DEPLOYMENT_VARIABLE];

/// The outputs every module applied by [`TerraformProvisioner`] must declare. The provisioner
/// reads `vm_instance_ids` (its inventory), `vm_public_ips` / `vm_private_ips` (addresses)
/// and `vm_tokens` (sensitive; keeps existing VMs' tokens); `vm_instance_names` and
/// `instance_terraform_apply_times` keep the upstream module's contract. It also reads
/// `vm_instance_types` (hostname → instance type, for the cost estimate) when a module
/// declares it; the shipped module does.
pub const MODULE_OUTPUTS: &[&str] = &[
    "vm_instance_names",
    outputs::INSTANCE_IDS,
    outputs::PRIVATE_IPS,
    outputs::PUBLIC_IPS,
    outputs::TOKENS,
    "instance_terraform_apply_times",
];
