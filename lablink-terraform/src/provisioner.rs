//! [`TerraformProvisioner`]: a [`Provisioner`] that applies a Terraform module whose `vms`
//! variable maps hostnames to tokens.
//!
//! Every change is computed from Terraform's own state (`terraform output -json`), never from
//! the allocator's store: launch applies *state ∪ request*, destroy applies *state − named*.
//! Existing machines keep the token they were created with, so their user data does not
//! change and they are not replaced.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use lablink_core::{
    Capabilities, Error, ErrorKind, Hostname, LaunchRequest, Progress, ProvisionedVm, Provisioner,
    Result,
};
use serde_json::{Map, Value};

use crate::error::{classify, TfFailure};
use crate::outputs::{self, Inventory};
use crate::runner::{Invocation, Runner};
use crate::vars::{self, Desired, VmEntry};

/// Drives the `terraform` binary in one working directory per deployment. Build it with
/// [`TerraformProvisionerBuilder`](crate::TerraformProvisionerBuilder).
///
/// Only one Terraform run happens at a time per working directory in this process (a mutex
/// shared by every provisioner of that directory); across processes, Terraform's state lock
/// keeps runs apart, and a run that finds it held fails with a temporary
/// [`ErrorKind::Conflict`].
pub struct TerraformProvisioner {
    runner: Runner,
    deployment: String,
    variables: Map<String, Value>,
    backend_args: Vec<String>,
    lock_timeout: Duration,
    dir_lock: Arc<tokio::sync::Mutex<()>>,
    initialized: AtomicBool,
}

impl fmt::Debug for TerraformProvisioner {
    /// Variable values may be secrets: only their names are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TerraformProvisioner")
            .field("working_dir", &self.runner.dir)
            .field("binary", &self.runner.binary)
            .field("deployment", &self.deployment)
            .field("variables", &self.variables.keys().collect::<Vec<_>>())
            .field("timeout", &self.runner.timeout)
            .finish_non_exhaustive()
    }
}

/// The in-process lock of each working directory.
fn dir_lock(dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Weak<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let key = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    locks.retain(|_, lock| lock.strong_count() > 0);
    if let Some(lock) = locks.get(&key).and_then(Weak::upgrade) {
        return lock;
    }
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    locks.insert(key, Arc::downgrade(&lock));
    lock
}

impl TerraformProvisioner {
    pub(crate) fn new(
        runner: Runner,
        deployment: String,
        variables: Map<String, Value>,
        backend_args: Vec<String>,
        lock_timeout: Duration,
    ) -> Self {
        Self {
            dir_lock: dir_lock(&runner.dir),
            runner,
            deployment,
            variables,
            backend_args,
            lock_timeout,
            initialized: AtomicBool::new(false),
        }
    }

    /// The working directory (module copy, `terraform.tfvars.json`, local state).
    pub fn working_dir(&self) -> &Path {
        self.runner.dir()
    }

    /// Destroys everything the module created for this deployment (`terraform destroy`),
    /// including shared resources such as the security group and key pair.
    pub async fn destroy_all(&self, progress: &Progress) -> Result<()> {
        let _guard = self.dir_lock.lock().await;
        self.ensure_init(progress).await?;
        let before = self
            .inventory()
            .await
            .map_err(|f| classify(f, "terraform output"))?;
        let desired = self
            .current(&before)
            .map_err(|f| classify(f, "terraform destroy"))?;
        let secrets = secrets(&desired);
        let args = self
            .runner
            .args("destroy", &["-auto-approve", &self.lock_arg()]);
        self.runner
            .run(Invocation {
                command: "destroy",
                args,
                progress: Some(progress),
                secrets: &secrets,
            })
            .await
            .map_err(|f| classify(f, "terraform destroy"))?;
        self.write_vars(&Desired::new())
            .map_err(|f| classify(f, "terraform destroy"))
    }

    fn lock_arg(&self) -> String {
        format!("-lock-timeout={}s", self.lock_timeout.as_secs())
    }

    /// Runs `terraform init` once per provisioner (the caller holds the directory lock).
    async fn ensure_init(&self, progress: &Progress) -> Result<()> {
        if self.initialized.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut extra: Vec<&str> = Vec::new();
        extra.extend(self.backend_args.iter().map(String::as_str));
        let args = self.runner.args("init", &extra);
        self.runner
            .run(Invocation {
                command: "init",
                args,
                progress: Some(progress),
                secrets: &[],
            })
            .await
            .map_err(|f| classify(f, "terraform init"))?;
        self.initialized.store(true, Ordering::Release);
        Ok(())
    }

    /// The machines in Terraform's state. Stale outputs (left by a failed apply) are
    /// recomputed from the state first.
    async fn inventory(&self) -> Result<Inventory, TfFailure> {
        if let Some(inventory) = self.read_outputs().await? {
            return Ok(inventory);
        }
        self.refresh(&Progress::default(), &[]).await?;
        self.read_outputs().await?.ok_or_else(|| {
            TfFailure::Outputs(format!(
                "the module has no `{}` output (hostname => instance id)",
                outputs::INSTANCE_IDS
            ))
        })
    }

    async fn read_outputs(&self) -> Result<Option<Inventory>, TfFailure> {
        let args = self.runner.args("output", &["-json"]);
        let out = self
            .runner
            .run(Invocation {
                command: "output",
                args,
                progress: None,
                secrets: &[],
            })
            .await?;
        outputs::parse(&out.stdout)
    }

    /// Recomputes the outputs from the state (`apply -refresh-only`): after a failed apply,
    /// outputs may name machines that were planned but never created.
    async fn refresh(&self, progress: &Progress, secrets: &[String]) -> Result<(), TfFailure> {
        let args = self.runner.args(
            "apply",
            &["-refresh-only", "-auto-approve", &self.lock_arg()],
        );
        self.runner
            .run(Invocation {
                command: "apply -refresh-only",
                args,
                progress: Some(progress),
                secrets,
            })
            .await
            .map(drop)
    }

    /// The `vms` map that keeps exactly the machines in `inventory`, each with its own token
    /// (from state, else from the variables file).
    fn current(&self, inventory: &Inventory) -> Result<Desired, TfFailure> {
        let mut file = None;
        let mut desired = Desired::new();
        for (hostname, machine) in inventory {
            let token = match &machine.token {
                Some(token) => token.clone(),
                None => {
                    let file = match &mut file {
                        Some(file) => file,
                        None => file.insert(vars::read_vms(self.runner.dir())?),
                    };
                    match file.get(hostname) {
                        Some(entry) => entry.token.clone(),
                        None => {
                            return Err(TfFailure::Outputs(format!(
                                "the token of the existing VM {hostname} is neither in the \
                                 `vm_tokens` output nor in the variables file; applying would \
                                 replace that VM"
                            )))
                        }
                    }
                }
            };
            desired.insert(hostname.clone(), VmEntry { token });
        }
        Ok(desired)
    }

    fn write_vars(&self, desired: &Desired) -> Result<(), TfFailure> {
        vars::write(
            self.runner.dir(),
            &self.variables,
            &self.deployment,
            desired,
        )
    }

    /// Writes the variables for `desired`, applies them, and reads the state back. The
    /// variables file is then made to match the state, whatever the outcome, so that the
    /// next run starts from what exists.
    async fn apply(
        &self,
        desired: &Desired,
        progress: &Progress,
    ) -> Result<(Inventory, Option<TfFailure>)> {
        self.write_vars(desired)
            .map_err(|f| classify(f, "terraform apply"))?;
        let secrets = secrets(desired);
        let args = self
            .runner
            .args("apply", &["-auto-approve", &self.lock_arg()]);
        let outcome = self
            .runner
            .run(Invocation {
                command: "apply",
                args,
                progress: Some(progress),
                secrets: &secrets,
            })
            .await
            .err();
        if let Some(failure) = &outcome {
            progress.report(&format!("{failure}; reading back what exists"));
            if let Err(e) = self.refresh(progress, &secrets).await {
                tracing::warn!(error = %e, "could not refresh the outputs after a failed apply");
            }
        }
        let after = match self.inventory().await {
            Ok(after) => after,
            Err(read) => {
                return Err(classify(outcome.unwrap_or(read), "terraform apply"));
            }
        };
        let kept: Desired = desired
            .iter()
            .filter(|(h, _)| after.contains_key(*h))
            .map(|(h, e)| (h.clone(), e.clone()))
            .collect();
        if &kept != desired {
            self.write_vars(&kept)
                .map_err(|f| classify(f, "terraform apply"))?;
        }
        Ok((after, outcome))
    }
}

fn secrets(desired: &Desired) -> Vec<String> {
    desired
        .values()
        .map(|e| e.token.expose().to_owned())
        .collect()
}

#[async_trait]
impl Provisioner for TerraformProvisioner {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reboot: false,
            ..Capabilities::default()
        }
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<ProvisionedVm>> {
        if request.vms.is_empty() {
            return Ok(Vec::new());
        }
        let progress = &request.progress;
        let _guard = self.dir_lock.lock().await;
        self.ensure_init(progress).await?;
        let before = self
            .inventory()
            .await
            .map_err(|f| classify(f, "terraform output"))?;
        let mut desired = self.current(&before).map_err(|f| classify(f, "launch"))?;
        let mut new = BTreeSet::new();
        for spec in &request.vms {
            if desired.contains_key(&spec.hostname) {
                progress.report(&format!(
                    "{} already exists; keeping it and its token",
                    spec.hostname
                ));
            } else {
                desired.insert(
                    spec.hostname.clone(),
                    VmEntry {
                        token: spec.token.clone(),
                    },
                );
                new.insert(spec.hostname.clone());
            }
        }
        let requested = |inventory: &Inventory| -> Vec<ProvisionedVm> {
            request
                .vms
                .iter()
                .filter_map(|spec| inventory.get(&spec.hostname).map(|m| m.vm.clone()))
                .collect()
        };
        if new.is_empty() {
            return Ok(requested(&before));
        }
        progress.report(&format!(
            "terraform apply: {} VMs kept, {} to create",
            before.len(),
            new.len()
        ));
        let (after, failure) = self.apply(&desired, progress).await?;
        let Some(failure) = failure else {
            return Ok(requested(&after));
        };
        let created = new.iter().filter(|h| after.contains_key(*h)).count();
        let error = classify(failure, "terraform apply");
        if created == 0 {
            return Err(error);
        }
        // Some machines exist: report them (the allocator marks the others failed).
        progress.report(&format!(
            "terraform apply failed after creating {created} of {} VMs: {error}",
            new.len()
        ));
        tracing::warn!(created, requested = new.len(), error = %error, "partial terraform apply");
        Ok(requested(&after))
    }

    async fn destroy(&self, vms: &[ProvisionedVm]) -> Result<()> {
        if vms.is_empty() {
            return Ok(());
        }
        let progress = Progress::default();
        let _guard = self.dir_lock.lock().await;
        self.ensure_init(&progress).await?;
        let before = self
            .inventory()
            .await
            .map_err(|f| classify(f, "terraform output"))?;
        let doomed: BTreeSet<&Hostname> = vms
            .iter()
            .map(|vm| &vm.hostname)
            .filter(|h| before.contains_key(*h))
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        let mut desired = self.current(&before).map_err(|f| classify(f, "destroy"))?;
        desired.retain(|h, _| !doomed.contains(h));
        let (after, failure) = self.apply(&desired, &progress).await?;
        match failure {
            Some(failure) if doomed.iter().any(|h| after.contains_key(*h)) => {
                Err(classify(failure, "terraform apply"))
            }
            Some(failure) => {
                tracing::warn!(error = %classify(failure, "terraform apply"),
                    "terraform apply failed, but every named VM is gone");
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn list(&self) -> Result<Vec<ProvisionedVm>> {
        if !self.initialized.load(Ordering::Acquire) {
            let _guard = self.dir_lock.lock().await;
            self.ensure_init(&Progress::default()).await?;
        }
        let inventory = self
            .inventory()
            .await
            .map_err(|f| classify(f, "terraform output"))?;
        Ok(inventory.into_values().map(|m| m.vm).collect())
    }

    async fn reboot(&self, vm: &ProvisionedVm) -> Result<()> {
        Err(Error::new(
            ErrorKind::InvalidConfig,
            "Terraform cannot reboot a machine; reboot it through the cloud provider",
        )
        .with_operation("reboot")
        .with_context("hostname", &vm.hostname))
    }
}
