//! The EC2 provisioner's and the S3 artifact store's settings as they appear in the
//! allocator's configuration file (`[provisioner] kind = "aws"`, `[collect.store] kind =
//! "s3"`): serde structs with defaults, a `problems()` check and a `Debug` that hides the
//! agent's download URL (it may carry a pre-signed query).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Ec2ProvisionerBuilder, S3ArtifactStoreBuilder};

/// `[provisioner] kind = "aws"`: client VMs as EC2 instances.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ec2Config {
    /// Tags every instance, so one account can hold several deployments.
    pub deployment: String,
    /// The region (empty: the standard AWS chain's).
    pub region: String,
    /// An endpoint override, e.g. an emulator (empty: AWS).
    pub endpoint_url: String,
    /// The client VMs' image.
    pub ami: String,
    /// Instance types, tried in order when one has no capacity (empty: the default type).
    pub instance_types: Vec<String>,
    /// Subnets, tried in order (empty: the default VPC's).
    pub subnets: Vec<String>,
    /// Security group ids (empty: the subnet's default).
    pub security_groups: Vec<String>,
    /// The instance profile the VMs run with (empty: none).
    pub instance_profile: String,
    /// An EC2 key pair for SSH (empty: none).
    pub key_name: String,
    /// Size of the root volume, GB (0: the image's).
    pub root_volume_gb: u32,
    /// The image has NVIDIA drivers: the agent checks the GPU.
    pub gpu: bool,
    /// Spot instances instead of on-demand.
    pub spot: bool,
    /// What the agents call: the allocator's URL as the VMs reach it.
    pub allocator_url: String,
    /// Where the VM downloads the agent binary (empty: the image has it).
    pub agent_url: String,
    /// SHA-256 of the agent binary at `agent_url`.
    pub agent_sha256: String,
}

impl Default for Ec2Config {
    fn default() -> Self {
        Self {
            deployment: "lablink".into(),
            region: String::new(),
            endpoint_url: String::new(),
            ami: String::new(),
            instance_types: Vec::new(),
            subnets: Vec::new(),
            security_groups: Vec::new(),
            instance_profile: String::new(),
            key_name: String::new(),
            root_volume_gb: 0,
            gpu: false,
            spot: false,
            allocator_url: String::new(),
            agent_url: String::new(),
            agent_sha256: String::new(),
        }
    }
}

impl fmt::Debug for Ec2Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ec2Config")
            .field("deployment", &self.deployment)
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("ami", &self.ami)
            .field("instance_types", &self.instance_types)
            .field("subnets", &self.subnets)
            .field("security_groups", &self.security_groups)
            .field("instance_profile", &self.instance_profile)
            .field("key_name", &self.key_name)
            .field("root_volume_gb", &self.root_volume_gb)
            .field("gpu", &self.gpu)
            .field("spot", &self.spot)
            .field("allocator_url", &self.allocator_url)
            .field("agent_url", &hidden(&self.agent_url))
            .field("agent_sha256", &self.agent_sha256)
            .finish()
    }
}

fn hidden(s: &str) -> &'static str {
    if s.is_empty() {
        ""
    } else {
        "***"
    }
}

fn some(s: &str) -> Option<&str> {
    (!s.trim().is_empty()).then_some(s)
}

impl Ec2Config {
    /// The provisioner's builder with these settings (nothing is sent yet).
    pub fn builder(&self) -> Ec2ProvisionerBuilder {
        let mut b = Ec2ProvisionerBuilder::new(&self.deployment, &self.ami)
            .with_instance_types(self.instance_types.clone())
            .with_subnets(self.subnets.clone())
            .with_security_groups(self.security_groups.clone())
            .with_gpu_image(self.gpu)
            .with_spot(self.spot)
            .with_allocator_url(&self.allocator_url)
            .with_agent_download(&self.agent_url, &self.agent_sha256);
        if let Some(region) = some(&self.region) {
            b = b.with_region(region);
        }
        if let Some(url) = some(&self.endpoint_url) {
            b = b.with_endpoint_url(url);
        }
        if let Some(profile) = some(&self.instance_profile) {
            b = b.with_instance_profile(profile);
        }
        if let Some(key) = some(&self.key_name) {
            b = b.with_key_name(key);
        }
        if self.root_volume_gb > 0 {
            b = b.with_root_volume_gb(i32::try_from(self.root_volume_gb).unwrap_or(i32::MAX));
        }
        b
    }

    /// Every problem with these settings, one message each (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.ami.trim().is_empty() {
            problems.push("[provisioner] ami must be set".into());
        }
        if self.deployment.trim().is_empty() {
            problems.push("[provisioner] deployment must not be empty".into());
        }
        if self.allocator_url.trim().is_empty() {
            problems.push("[provisioner] allocator_url (what the agents call) must be set".into());
        }
        if self.agent_url.is_empty() && !self.agent_sha256.is_empty() {
            problems.push("[provisioner] agent_sha256 is set without agent_url".into());
        }
        if i32::try_from(self.root_volume_gb).is_err() {
            problems.push("[provisioner] root_volume_gb is too large".into());
        }
        problems
    }
}

/// `[collect.store] kind = "s3"`: collections in an S3 bucket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// The bucket (it must exist). Credentials come from the standard AWS chain.
    pub bucket: String,
    /// A prefix for every key, e.g. `workshop-2026/`.
    pub prefix: String,
    /// The region (empty: the standard chain's).
    pub region: String,
    /// An endpoint override, e.g. an emulator (empty: AWS).
    pub endpoint_url: String,
}

impl S3Config {
    /// The store's builder with these settings (nothing is sent yet).
    pub fn builder(&self) -> S3ArtifactStoreBuilder {
        let mut b = S3ArtifactStoreBuilder::new(&self.bucket).with_prefix(&self.prefix);
        if let Some(region) = some(&self.region) {
            b = b.with_region(region);
        }
        if let Some(url) = some(&self.endpoint_url) {
            b = b.with_endpoint_url(url);
        }
        b
    }

    /// Every problem with these settings, one message each (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        if self.bucket.trim().is_empty() {
            vec!["[collect.store] bucket must be set for the s3 store".into()]
        } else {
            Vec::new()
        }
    }
}
