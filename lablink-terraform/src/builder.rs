//! [`TerraformProvisionerBuilder`]: where the working directory is, which binary and module
//! to use, extra module variables, the state backend and the time limits.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use lablink_core::{Error, Result};
use serde_json::{Map, Value};

use crate::error::{classify, TfFailure};
use crate::module::ModuleSource;
use crate::provisioner::TerraformProvisioner;
use crate::runner::Runner;
use crate::vars::{DEPLOYMENT_VARIABLE, VMS_VARIABLE};

/// Default limit of one `terraform` run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Default time Terraform gets to exit after SIGINT (and again after SIGTERM).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// Builds a [`TerraformProvisioner`].
///
/// ```no_run
/// # fn main() -> lablink_core::Result<()> {
/// use lablink_terraform::TerraformProvisionerBuilder;
/// let mut vars = serde_json::Map::new();
/// vars.insert("allocator_url".into(), "https://lablink.example.org".into());
/// vars.insert("machine_type".into(), "g4dn.xlarge".into());
/// let provisioner = TerraformProvisionerBuilder::new("/var/lib/lablink/terraform/workshop")
///     .with_deployment("workshop")
///     .with_variables(vars)
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TerraformProvisionerBuilder {
    working_dir: PathBuf,
    binary: PathBuf,
    module: ModuleSource,
    deployment: String,
    variables: Map<String, Value>,
    backend: Option<(String, BTreeMap<String, String>)>,
    env: Vec<(String, String)>,
    timeout: Duration,
    shutdown_grace: Duration,
    lock_timeout: Duration,
    stale_lock_after: Option<Duration>,
}

impl fmt::Debug for TerraformProvisionerBuilder {
    /// Shows variable, backend and environment *names* only: their values may be secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TerraformProvisionerBuilder")
            .field("working_dir", &self.working_dir)
            .field("binary", &self.binary)
            .field("module", &self.module)
            .field("deployment", &self.deployment)
            .field("variables", &self.variables.keys().collect::<Vec<_>>())
            .field(
                "backend",
                &self
                    .backend
                    .as_ref()
                    .map(|(kind, config)| (kind, config.keys().collect::<Vec<_>>())),
            )
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("lock_timeout", &self.lock_timeout)
            .field("stale_lock_after", &self.stale_lock_after)
            .finish()
    }
}

impl TerraformProvisionerBuilder {
    /// A provisioner whose working directory (module copy, variables, local state) is
    /// `working_dir`, one per deployment. Defaults: `terraform` from `PATH`, the shipped AWS
    /// module, deployment `lablink`, local state, a 30-minute timeout.
    pub fn new(working_dir: impl Into<PathBuf>) -> Self {
        Self {
            working_dir: working_dir.into(),
            binary: PathBuf::from("terraform"),
            module: ModuleSource::Aws,
            deployment: "lablink".into(),
            variables: Map::new(),
            backend: None,
            env: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            lock_timeout: Duration::ZERO,
            stale_lock_after: None,
        }
    }

    /// A builder from `LABLINK_TERRAFORM_DIR` (required), `LABLINK_TERRAFORM_BINARY`,
    /// `LABLINK_TERRAFORM_MODULE_DIR`, `LABLINK_TERRAFORM_DEPLOYMENT` and
    /// `LABLINK_TERRAFORM_TIMEOUT_SECS`.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let dir = var("LABLINK_TERRAFORM_DIR").ok_or_else(|| {
            Error::new(
                lablink_core::ErrorKind::InvalidConfig,
                "LABLINK_TERRAFORM_DIR (the Terraform working directory) is not set",
            )
        })?;
        let mut builder = Self::new(dir);
        if let Some(binary) = var("LABLINK_TERRAFORM_BINARY") {
            builder = builder.with_terraform_binary(binary);
        }
        if let Some(module) = var("LABLINK_TERRAFORM_MODULE_DIR") {
            builder = builder.with_module_dir(module);
        }
        if let Some(deployment) = var("LABLINK_TERRAFORM_DEPLOYMENT") {
            builder = builder.with_deployment(deployment);
        }
        if let Some(secs) = var("LABLINK_TERRAFORM_TIMEOUT_SECS") {
            let secs: u64 = secs.parse().map_err(|_| {
                Error::new(
                    lablink_core::ErrorKind::InvalidConfig,
                    format!("LABLINK_TERRAFORM_TIMEOUT_SECS must be whole seconds, not {secs:?}"),
                )
            })?;
            builder = builder.with_timeout(Duration::from_secs(secs));
        }
        Ok(builder)
    }

    /// The `terraform` (or OpenTofu `tofu`) binary: a path, or a name looked up on `PATH`.
    pub fn with_terraform_binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = binary.into();
        self
    }

    /// Applies the module in `dir` instead of the shipped AWS module. It must keep the module
    /// contract: variables [`MODULE_VARIABLES`](crate::MODULE_VARIABLES), outputs
    /// [`MODULE_OUTPUTS`](crate::MODULE_OUTPUTS).
    pub fn with_module_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.module = ModuleSource::Dir(dir.into());
        self
    }

    /// The deployment name, passed as the `deployment` variable (a tag on every resource).
    pub fn with_deployment(mut self, deployment: impl Into<String>) -> Self {
        self.deployment = deployment.into();
        self
    }

    /// Extra module variables (`allocator_url`, `client_ami_id`, `machine_type`...), written
    /// to the JSON variables file exactly as given. `vms` and `deployment` are reserved.
    pub fn with_variables(mut self, variables: Map<String, Value>) -> Self {
        self.variables.extend(variables);
        self
    }

    /// Keeps state in a backend instead of the working directory: writes
    /// `terraform { backend "<kind>" {} }` and passes each pair as `-backend-config` to
    /// `terraform init` (credentials belong in the environment, see [`Self::with_env`]).
    pub fn with_backend(
        mut self,
        kind: impl Into<String>,
        config: BTreeMap<String, String>,
    ) -> Self {
        self.backend = Some((kind.into(), config));
        self
    }

    /// An environment variable for every `terraform` run (e.g. `AWS_PROFILE`).
    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// The longest one `terraform` run may take before it is stopped (default 30 minutes).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long a timed-out Terraform gets to exit after SIGINT, and then after SIGTERM,
    /// before it is killed (default 60 s).
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// How long Terraform waits for a state lock held by another run (default: not at all,
    /// the run fails at once with a temporary `Conflict`).
    pub fn with_lock_timeout(mut self, lock_timeout: Duration) -> Self {
        self.lock_timeout = lock_timeout;
        self
    }

    /// A state lock older than this is reported as stale, with the `force-unlock` command
    /// that releases it (default: twice the timeout plus the grace periods).
    pub fn with_stale_lock_after(mut self, age: Duration) -> Self {
        self.stale_lock_after = Some(age);
        self
    }

    /// Checks the settings, creates the working directory (mode 0700: it holds tokens and
    /// state) and copies the module into it. Terraform itself first runs on the first call.
    pub fn build(self) -> Result<TerraformProvisioner> {
        self.build_inner()
            .map_err(|failure| classify(failure, "terraform provisioner setup"))
    }

    fn build_inner(self) -> Result<TerraformProvisioner, TfFailure> {
        let config = |m: String| TfFailure::Config(m);
        if self.working_dir.as_os_str().is_empty() {
            return Err(config("the working directory is empty".into()));
        }
        for reserved in [VMS_VARIABLE, DEPLOYMENT_VARIABLE] {
            if self.variables.contains_key(reserved) {
                return Err(config(format!(
                    "the module variable `{reserved}` is set by the provisioner; remove it from with_variables"
                )));
            }
        }
        if self.deployment.is_empty()
            || !self
                .deployment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(config(format!(
                "the deployment name {:?} must be letters, digits, '-', '_' or '.'",
                self.deployment
            )));
        }
        if self.timeout.is_zero() {
            return Err(config("the timeout must be positive".into()));
        }
        if let Some((kind, _)) = &self.backend {
            if kind.is_empty() || !kind.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                return Err(config(format!("{kind:?} is not a Terraform backend name")));
            }
        }
        let dir = &self.working_dir;
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|source| TfFailure::Files {
                what: "could not create the working directory",
                path: dir.clone(),
                source,
            })?;
        self.module.install(dir)?;
        let backend_file = dir.join("lablink_backend.tf");
        let backend_args = match &self.backend {
            Some((kind, config)) => {
                let hcl = format!("terraform {{\n  backend \"{kind}\" {{}}\n}}\n");
                std::fs::write(&backend_file, hcl).map_err(|source| TfFailure::Files {
                    what: "could not write the backend file",
                    path: backend_file.clone(),
                    source,
                })?;
                config
                    .iter()
                    .map(|(k, v)| format!("-backend-config={k}={v}"))
                    .collect()
            }
            None => {
                let _ = std::fs::remove_file(&backend_file);
                Vec::new()
            }
        };
        let stale_lock_after = self
            .stale_lock_after
            .unwrap_or(self.timeout * 2 + self.shutdown_grace * 2);
        let runner = Runner {
            binary: self.binary,
            dir: self.working_dir,
            env: self.env,
            timeout: self.timeout,
            shutdown_grace: self.shutdown_grace,
            stale_lock_after,
        };
        Ok(TerraformProvisioner::new(
            runner,
            self.deployment,
            self.variables,
            backend_args,
            self.lock_timeout,
        ))
    }
}
