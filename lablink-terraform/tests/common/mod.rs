//! Helpers shared by the integration tests: finding the real `terraform` binary (failing
//! loudly when it is missing), building provisioners on the fixture module in temporary
//! directories, and reading Terraform's outputs directly.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lablink_core::{
    AgentToken, Capabilities, LabLink, LaunchRequest, MemoryVmStore, ProvisionedVm, Provisioner,
    Result, VmFilter, VmSpec,
};
use lablink_terraform::{TerraformProvisioner, TerraformProvisionerBuilder};
use serde_json::{Map, Value};
use tempfile::TempDir;

/// The terraform binary: `LABLINK_TERRAFORM_BINARY`, else `terraform` on `PATH`. Panics with
/// a message naming the binary when it cannot run: these tests need the real thing.
pub fn terraform() -> PathBuf {
    let binary = std::env::var_os("LABLINK_TERRAFORM_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("terraform"));
    match Command::new(&binary).arg("version").output() {
        Ok(out) if out.status.success() => binary,
        Ok(out) => panic!(
            "the terraform binary {binary:?} does not work ({}): these tests need Terraform >= 1.6 \
             (set LABLINK_TERRAFORM_BINARY to its path)",
            out.status
        ),
        Err(e) => panic!(
            "the terraform binary {binary:?} was not found ({e}): these tests need Terraform >= 1.6 \
             on PATH or at LABLINK_TERRAFORM_BINARY"
        ),
    }
}

/// The fixture module: the AWS module's contract on `terraform_data` only.
pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/module")
}

/// A builder on the fixture module in `dir`, with short stop grace periods.
pub fn builder(dir: &Path) -> TerraformProvisionerBuilder {
    TerraformProvisionerBuilder::new(dir)
        .with_terraform_binary(terraform())
        .with_module_dir(fixture())
        .with_deployment("test")
        .with_shutdown_grace(Duration::from_secs(3))
}

/// One variable, as `with_variables` takes them.
pub fn vars(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// A launch request for `names` with fresh tokens.
pub fn request(names: &[&str]) -> LaunchRequest {
    LaunchRequest {
        vms: names
            .iter()
            .map(|n| VmSpec {
                hostname: n.parse().unwrap(),
                token: AgentToken::generate(),
            })
            .collect(),
        ..Default::default()
    }
}

/// A LabLink on a memory store and `provisioner`.
pub fn lablink(store: &MemoryVmStore, provisioner: Arc<dyn Provisioner>) -> LabLink {
    LabLink::builder()
        .with_store(Arc::new(store.clone()))
        .with_provisioner(provisioner)
        .build()
        .unwrap()
}

/// `terraform output -json`, run directly in `dir` (not through the provisioner).
pub fn outputs(dir: &Path) -> Map<String, Value> {
    let out = Command::new(terraform())
        .args(["output", "-json", "-no-color"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "terraform output failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// hostname => instance id, from the state (directly).
pub fn state_ids(dir: &Path) -> BTreeMap<String, String> {
    let outputs = outputs(dir);
    let Some(ids) = outputs.get("vm_instance_ids") else {
        return BTreeMap::new();
    };
    ids["value"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect()
}

/// hostname => instance id, from a machine list.
pub fn ids(vms: &[ProvisionedVm]) -> BTreeMap<String, String> {
    vms.iter()
        .map(|vm| (vm.hostname.to_string(), vm.instance_id.to_string()))
        .collect()
}

/// hostname => instance id of the live records in a store.
pub async fn store_ids(store: &MemoryVmStore) -> BTreeMap<String, String> {
    use lablink_core::VmStore;
    store
        .list(&VmFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let id = r.instance_id.map(|i| i.to_string()).unwrap_or_default();
            (r.hostname.to_string(), id)
        })
        .collect()
}

/// A provisioner that owns its temporary working directory (for the conformance suite).
#[derive(Debug)]
pub struct InTempDir {
    pub dir: TempDir,
    pub inner: TerraformProvisioner,
}

impl InTempDir {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let inner = builder(dir.path()).build().unwrap();
        Self { dir, inner }
    }
}

#[async_trait]
impl Provisioner for InTempDir {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<ProvisionedVm>> {
        self.inner.launch(request).await
    }
    async fn destroy(&self, vms: &[ProvisionedVm]) -> Result<()> {
        self.inner.destroy(vms).await
    }
    async fn list(&self) -> Result<Vec<ProvisionedVm>> {
        self.inner.list().await
    }
    async fn reboot(&self, vm: &ProvisionedVm) -> Result<()> {
        self.inner.reboot(vm).await
    }
}

/// Where the AWS emulator listens (`scripts/with-moto.sh` sets it); the test fails, naming
/// what to run, without it.
pub fn emulator_endpoint() -> String {
    std::env::var("LABLINK_AWS_TEST_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "LABLINK_AWS_TEST_ENDPOINT is not set: this test needs the AWS emulator; run it \
             through scripts/with-moto.sh (the README's test command does)"
        )
    })
}

/// A Terraform CLI configuration in `dir` installing providers from the filesystem mirror
/// only (`LABLINK_TF_PLUGIN_MIRROR`, default `/opt/tf-plugins`), which must hold
/// `hashicorp/aws`.
pub fn mirror_cli_config(dir: &Path) -> PathBuf {
    let mirror =
        std::env::var("LABLINK_TF_PLUGIN_MIRROR").unwrap_or_else(|_| "/opt/tf-plugins".into());
    let aws = Path::new(&mirror).join("registry.terraform.io/hashicorp/aws");
    assert!(
        aws.is_dir(),
        "the hashicorp/aws provider is not in the filesystem mirror {mirror} (expected {}); \
         set LABLINK_TF_PLUGIN_MIRROR to a mirror holding it",
        aws.display()
    );
    let file = dir.join("terraform.rc");
    std::fs::write(
        &file,
        format!(
            "provider_installation {{\n  filesystem_mirror {{\n    path = {mirror:?}\n  }}\n}}\n"
        ),
    )
    .unwrap();
    file
}

/// Runs a boto3 script against the emulator; its JSON output. `script` reads the clients
/// `ec2`, `iam`, `r53` and `ssm` and the string `arg`, and prints JSON.
pub fn emulator(script: &str, arg: &str) -> Value {
    let program = format!(
        "import base64, gzip, json, sys, boto3\n\
         kw = dict(endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                   aws_access_key_id='lablink-test', aws_secret_access_key='lablink-test')\n\
         ec2 = boto3.client('ec2', **kw)\n\
         iam = boto3.client('iam', **kw)\n\
         r53 = boto3.client('route53', **kw)\n\
         ssm = boto3.client('ssm', **kw)\n\
         arg = sys.argv[2]\n{script}"
    );
    let out = Command::new("python3")
        .args(["-c", &program, &emulator_endpoint(), arg])
        .output()
        .expect("python3 (with boto3, which moto[server] installs) is needed to read the emulator");
    assert!(
        out.status.success(),
        "boto3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
