//! The EC2 provisioner's and the S3 artifact store's settings as they appear in the
//! allocator's configuration file (`[provisioner] kind = "aws"`, `[collect.store] kind =
//! "s3"`): serde structs with defaults, a `problems()` check and a `Debug` that hides the
//! agent's download URL (it may carry a pre-signed query).

use std::collections::BTreeMap;
use std::fmt;

use lablink_core::redacted;
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
    /// The research software's container image, run by the agent before the VM becomes
    /// available (`SUBJECT_IMAGE`; empty: none).
    pub subject_image: String,
    /// A tutorial repository cloned into the desktop user's home (`TUTORIAL_REPO_TO_CLONE`;
    /// empty: none).
    pub tutorial_repo: String,
    /// A start-up script (a path on the image, or the script itself) the agent runs with
    /// retries (`LABLINK_STARTUP_SCRIPT`; empty: none).
    pub startup_script: String,
    /// What a failed start-up step does: `continue` (the VM becomes available anyway) or
    /// `fail` (the VM reports an error and is never handed out) (`STARTUP_ON_ERROR`).
    pub startup_on_error: String,
    /// The desktop user: Chrome Remote Desktop's `--user-name`, whose home the container
    /// mounts and the tutorial is cloned into (`LABLINK_CRD_USER`).
    pub desktop_user: String,
    /// The research software's process name, which tells whether the VM is in use
    /// (`LABLINK_INUSE_PROCESS`; empty: never reported in use).
    pub inuse_process: String,
    /// Log files the agent ships, as `stream=path` (`LABLINK_LOG_FILES`; stream
    /// `cloud_init`, `container` or `agent`).
    pub log_files: Vec<String>,
}

/// Where cloud-init writes the output of the user data.
pub const CLOUD_INIT_LOG: &str = "cloud_init=/var/log/cloud-init-output.log";

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
            subject_image: String::new(),
            tutorial_repo: String::new(),
            startup_script: String::new(),
            startup_on_error: "continue".into(),
            desktop_user: "ubuntu".into(),
            inuse_process: String::new(),
            log_files: vec![CLOUD_INIT_LOG.into()],
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
            .field("agent_url", &redacted(&self.agent_url))
            .field("agent_sha256", &self.agent_sha256)
            .field("subject_image", &self.subject_image)
            .field("tutorial_repo", &redacted(&self.tutorial_repo))
            .field("startup_script", &redacted(&self.startup_script))
            .field("startup_on_error", &self.startup_on_error)
            .field("desktop_user", &self.desktop_user)
            .field("inuse_process", &self.inuse_process)
            .field("log_files", &self.log_files)
            .finish()
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
            .with_agent_download(&self.agent_url, &self.agent_sha256)
            .with_agent_env(self.agent_env());
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

    /// The agent environment these settings give every VM, under the names the agent
    /// reads (empty settings are left out).
    pub fn agent_env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let mut set = |name: &str, value: &str| {
            if !value.trim().is_empty() {
                env.insert(name.to_owned(), value.to_owned());
            }
        };
        set("SUBJECT_IMAGE", &self.subject_image);
        set("TUTORIAL_REPO_TO_CLONE", &self.tutorial_repo);
        set("LABLINK_STARTUP_SCRIPT", &self.startup_script);
        set("STARTUP_ON_ERROR", &self.startup_on_error);
        set("LABLINK_CRD_USER", &self.desktop_user);
        set("LABLINK_INUSE_PROCESS", &self.inuse_process);
        set("LABLINK_LOG_FILES", &self.log_files.join(","));
        if self.gpu {
            set("GPU_SUPPORT", "true");
        }
        env
    }

    /// Every problem with these settings, one message each (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !matches!(self.startup_on_error.as_str(), "continue" | "fail") {
            problems.push(format!(
                "[provisioner] startup_on_error must be \"continue\" or \"fail\", not {:?}",
                self.startup_on_error
            ));
        }
        let user = &self.desktop_user;
        let valid_user = user.len() <= 32
            && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && user
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'));
        if !valid_user {
            problems.push(format!(
                "[provisioner] desktop_user {user:?} is not a user name"
            ));
        }
        for file in &self.log_files {
            let valid = file.split_once('=').is_some_and(|(stream, path)| {
                matches!(stream, "cloud_init" | "container" | "agent")
                    && path.starts_with('/')
                    && !path.contains(',')
            });
            if !valid {
                problems.push(format!(
                    "[provisioner] log_files entry {file:?} must be stream=/absolute/path with \
                     stream cloud_init, container or agent"
                ));
            }
        }
        if self.ami.trim().is_empty() {
            problems.push("[provisioner] ami must be set".into());
        }
        if self.deployment.trim().is_empty() {
            problems.push("[provisioner] deployment must not be empty".into());
        }
        if self.allocator_url.trim().is_empty() {
            problems.push("[provisioner] allocator_url (what the agents call) must be set".into());
        }
        let sha = &self.agent_sha256;
        if !sha.is_empty() && (sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit())) {
            problems.push("[provisioner] agent_sha256 must be 64 hexadecimal digits".into());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_settings_become_the_agents_environment() {
        let config = Ec2Config {
            ami: "ami-1".into(),
            allocator_url: "http://10.0.0.1".into(),
            subject_image: "ghcr.io/talmolab/sleap:1".into(),
            tutorial_repo: "https://github.com/talmolab/tutorial.git".into(),
            startup_script: "/opt/setup.sh".into(),
            startup_on_error: "fail".into(),
            inuse_process: "sleap-label".into(),
            gpu: true,
            ..Default::default()
        };
        assert!(config.problems().is_empty(), "{:?}", config.problems());
        let env = config.agent_env();
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("SUBJECT_IMAGE"), Some("ghcr.io/talmolab/sleap:1"));
        assert_eq!(
            get("TUTORIAL_REPO_TO_CLONE"),
            Some("https://github.com/talmolab/tutorial.git")
        );
        assert_eq!(get("LABLINK_STARTUP_SCRIPT"), Some("/opt/setup.sh"));
        assert_eq!(get("STARTUP_ON_ERROR"), Some("fail"));
        assert_eq!(get("LABLINK_CRD_USER"), Some("ubuntu"));
        assert_eq!(get("LABLINK_INUSE_PROCESS"), Some("sleap-label"));
        assert_eq!(get("LABLINK_LOG_FILES"), Some(CLOUD_INIT_LOG));
        assert_eq!(get("GPU_SUPPORT"), Some("true"));
        let plain = Ec2Config::default().agent_env();
        assert!(!plain.contains_key("SUBJECT_IMAGE") && !plain.contains_key("GPU_SUPPORT"));
    }

    #[test]
    fn bad_typed_settings_are_problems() {
        let config = Ec2Config {
            ami: "ami-1".into(),
            allocator_url: "http://10.0.0.1".into(),
            startup_on_error: "ignore".into(),
            desktop_user: "Bad User".into(),
            log_files: vec!["syslog=/var/log/syslog".into(), "agent=relative.log".into()],
            ..Default::default()
        };
        let problems = config.problems();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("startup_on_error"));
        assert!(problems[1].contains("desktop_user"));
        assert!(problems[2].contains("syslog=/var/log/syslog"));
        assert!(problems[3].contains("agent=relative.log"));
    }
}
