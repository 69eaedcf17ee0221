//! [`Ec2ProvisionerBuilder`]: where the SDK configuration comes from and what the VMs look
//! like (AMI, instance types, subnets, security groups, instance profile, key pair, root
//! volume, Spot, what the agent is told).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use lablink_core::Result;

use crate::error::{classify, AwsFailure};
use crate::provisioner::{Ec2Provisioner, Settings};
use crate::sdk::{env_var, SdkSource};
use crate::user_data::AgentSettings;

/// Default instance type when none is configured.
pub const DEFAULT_INSTANCE_TYPE: &str = "t3.large";
/// Default owner tag.
pub const DEFAULT_OWNER: &str = "lablink";
/// Default time a destroy waits for EC2 to confirm the termination.
pub const DEFAULT_TERMINATE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Builds an [`Ec2Provisioner`].
///
/// Credentials come from the standard AWS chain (environment, shared files, SSO, instance or
/// task roles) or from a client / [`SdkConfig`](aws_config::SdkConfig) given here; LabLink
/// never takes credentials from anywhere else and never logs them.
///
/// ```no_run
/// # async fn run() -> lablink_core::Result<()> {
/// use lablink_aws::Ec2ProvisionerBuilder;
/// let provisioner = Ec2ProvisionerBuilder::new("workshop", "ami-0abcdef1234567890")
///     .with_instance_types(["g4dn.xlarge", "g5.xlarge"])
///     .with_subnets(["subnet-aaaa", "subnet-bbbb"])
///     .with_security_groups(["sg-1234"])
///     .with_gpu_image(true)
///     .with_allocator_url("https://lablink.example.org")
///     .build()
///     .await?;
/// # let _ = provisioner; Ok(()) }
/// ```
#[derive(Clone)]
pub struct Ec2ProvisionerBuilder {
    pub(crate) sdk: SdkSource,
    pub(crate) client: Option<aws_sdk_ec2::Client>,
    pub(crate) deployment: String,
    pub(crate) owner: String,
    pub(crate) ami: String,
    pub(crate) instance_types: Vec<String>,
    pub(crate) subnets: Vec<String>,
    pub(crate) security_groups: Vec<String>,
    pub(crate) instance_profile: Option<String>,
    pub(crate) key_name: Option<String>,
    pub(crate) root_volume_gb: Option<i32>,
    pub(crate) gpu_image: bool,
    pub(crate) spot: bool,
    pub(crate) agent: AgentSettings,
    pub(crate) terminate_timeout: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) tag_concurrency: usize,
}

impl fmt::Debug for Ec2ProvisionerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ec2ProvisionerBuilder")
            .field("deployment", &self.deployment)
            .field("owner", &self.owner)
            .field("ami", &self.ami)
            .field("instance_types", &self.instance_types)
            .field("subnets", &self.subnets)
            .field("security_groups", &self.security_groups)
            .field("instance_profile", &self.instance_profile)
            .field("key_name", &self.key_name)
            .field("root_volume_gb", &self.root_volume_gb)
            .field("gpu_image", &self.gpu_image)
            .field("spot", &self.spot)
            .field("agent", &self.agent)
            .field("region", &self.sdk.region)
            .field("endpoint_url", &self.sdk.endpoint_url)
            .finish_non_exhaustive()
    }
}

impl Ec2ProvisionerBuilder {
    /// A provisioner for `deployment` (the `deployment` tag of every instance and volume;
    /// `list` and reconcile see only this deployment) launching `ami`. Defaults: instance
    /// type [`DEFAULT_INSTANCE_TYPE`], the default subnet and security group, on-demand, the
    /// AMI's own root volume size (encrypted gp3), owner [`DEFAULT_OWNER`].
    pub fn new(deployment: impl Into<String>, ami: impl Into<String>) -> Self {
        Self {
            sdk: SdkSource::default(),
            client: None,
            deployment: deployment.into(),
            owner: DEFAULT_OWNER.into(),
            ami: ami.into(),
            instance_types: Vec::new(),
            subnets: Vec::new(),
            security_groups: Vec::new(),
            instance_profile: None,
            key_name: None,
            root_volume_gb: None,
            gpu_image: false,
            spot: false,
            agent: AgentSettings::default(),
            terminate_timeout: DEFAULT_TERMINATE_TIMEOUT,
            poll_interval: Duration::from_secs(2),
            tag_concurrency: 16,
        }
    }

    /// A builder from `LABLINK_AWS_*` variables: `LABLINK_AWS_DEPLOYMENT` and
    /// `LABLINK_AWS_AMI` (required), `LABLINK_AWS_INSTANCE_TYPES`, `LABLINK_AWS_SUBNETS`,
    /// `LABLINK_AWS_SECURITY_GROUPS` (comma-separated, in order of preference),
    /// `LABLINK_AWS_INSTANCE_PROFILE`, `LABLINK_AWS_KEY_NAME`, `LABLINK_AWS_ROOT_VOLUME_GB`,
    /// `LABLINK_AWS_OWNER`, `LABLINK_AWS_GPU` and `LABLINK_AWS_SPOT` (`true`/`false`),
    /// `LABLINK_AWS_ALLOCATOR_URL`, `LABLINK_AWS_AGENT_URL`, `LABLINK_AWS_AGENT_SHA256`.
    /// Region, endpoint and credentials come from the standard AWS variables and files
    /// (`AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_PROFILE`...), read by the SDK at `build`.
    pub fn from_env() -> Result<Self> {
        let required = |name: &str, what: &str| {
            env_var(name).ok_or_else(|| {
                classify(
                    AwsFailure::Config(format!("{name} ({what}) is not set")),
                    "ec2 provisioner setup",
                )
            })
        };
        let mut b = Self::new(
            required("LABLINK_AWS_DEPLOYMENT", "the deployment name")?,
            required("LABLINK_AWS_AMI", "the AMI id of the VMs")?,
        );
        let list = |name: &str| -> Vec<String> {
            env_var(name)
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        let flag = |name: &str| -> Result<bool> {
            match env_var(name).as_deref().map(str::trim) {
                None | Some("false") | Some("0") => Ok(false),
                Some("true") | Some("1") => Ok(true),
                Some(other) => Err(classify(
                    AwsFailure::Config(format!("{name} must be true or false, not {other:?}")),
                    "ec2 provisioner setup",
                )),
            }
        };
        b.instance_types = list("LABLINK_AWS_INSTANCE_TYPES");
        b.subnets = list("LABLINK_AWS_SUBNETS");
        b.security_groups = list("LABLINK_AWS_SECURITY_GROUPS");
        b.instance_profile = env_var("LABLINK_AWS_INSTANCE_PROFILE");
        b.key_name = env_var("LABLINK_AWS_KEY_NAME");
        if let Some(gb) = env_var("LABLINK_AWS_ROOT_VOLUME_GB") {
            let gb = gb.trim().parse().map_err(|_| {
                classify(
                    AwsFailure::Config(format!(
                        "LABLINK_AWS_ROOT_VOLUME_GB must be whole gibibytes, not {gb:?}"
                    )),
                    "ec2 provisioner setup",
                )
            })?;
            b.root_volume_gb = Some(gb);
        }
        if let Some(owner) = env_var("LABLINK_AWS_OWNER") {
            b.owner = owner;
        }
        b.gpu_image = flag("LABLINK_AWS_GPU")?;
        b.spot = flag("LABLINK_AWS_SPOT")?;
        b.agent.allocator_url = env_var("LABLINK_AWS_ALLOCATOR_URL").unwrap_or_default();
        b.agent.agent_download_url = env_var("LABLINK_AWS_AGENT_URL").unwrap_or_default();
        b.agent.agent_sha256 = env_var("LABLINK_AWS_AGENT_SHA256").unwrap_or_default();
        Ok(b)
    }

    /// Uses this EC2 client as is (its credentials, region, endpoint, retry and
    /// interceptors). Region and endpoint settings of this builder are then ignored.
    pub fn with_ec2_client(mut self, client: aws_sdk_ec2::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Builds the client from this SDK configuration instead of the standard chain.
    pub fn with_sdk_config(mut self, config: aws_config::SdkConfig) -> Self {
        self.sdk.config = Some(config);
        self
    }

    /// The AWS region (default: the standard chain's, e.g. `AWS_REGION`).
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.sdk.region = Some(region.into());
        self
    }

    /// Sends every call to this endpoint (an emulator such as `moto_server`, a VPC endpoint).
    pub fn with_endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.sdk.endpoint_url = Some(url.into());
        self
    }

    /// The `owner` tag of every instance and volume (default [`DEFAULT_OWNER`]).
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }

    /// Instance types in order of preference: when EC2 has no capacity for one, the next is
    /// tried (default: [`DEFAULT_INSTANCE_TYPE`]).
    pub fn with_instance_types<S: Into<String>>(
        mut self,
        types: impl IntoIterator<Item = S>,
    ) -> Self {
        self.instance_types = types.into_iter().map(Into::into).collect();
        self
    }

    /// Subnets in order of preference, tried for each instance type when EC2 has no capacity
    /// (default: the default subnet that EC2 picks).
    pub fn with_subnets<S: Into<String>>(mut self, subnets: impl IntoIterator<Item = S>) -> Self {
        self.subnets = subnets.into_iter().map(Into::into).collect();
        self
    }

    /// Security group ids of every VM (default: the VPC's default group).
    pub fn with_security_groups<S: Into<String>>(
        mut self,
        groups: impl IntoIterator<Item = S>,
    ) -> Self {
        self.security_groups = groups.into_iter().map(Into::into).collect();
        self
    }

    /// The instance profile, by name or ARN.
    pub fn with_instance_profile(mut self, profile: impl Into<String>) -> Self {
        self.instance_profile = Some(profile.into());
        self
    }

    /// The EC2 key pair for SSH.
    pub fn with_key_name(mut self, key_name: impl Into<String>) -> Self {
        self.key_name = Some(key_name.into());
        self
    }

    /// The root volume size in GiB (default: the AMI's). The root volume is always an
    /// encrypted gp3 volume deleted with the instance.
    pub fn with_root_volume_gb(mut self, gb: i32) -> Self {
        self.root_volume_gb = Some(gb);
        self
    }

    /// The AMI needs a GPU: before the first launch, the instance types are checked with
    /// `DescribeInstanceTypes` and those without a GPU are dropped (none left is an
    /// `InvalidConfig` error).
    pub fn with_gpu_image(mut self, gpu: bool) -> Self {
        self.gpu_image = gpu;
        self
    }

    /// Asks for Spot instances first, falling back to on-demand (for each instance type and
    /// subnet) when Spot has no capacity.
    pub fn with_spot(mut self, spot: bool) -> Self {
        self.spot = spot;
        self
    }

    /// The allocator URL the agents call (`ALLOCATOR_URL`).
    pub fn with_allocator_url(mut self, url: impl Into<String>) -> Self {
        self.agent.allocator_url = url.into();
        self
    }

    /// Where the VM downloads the agent binary from, and its SHA-256 (hex, may be empty).
    /// Without a URL the image must already have `/usr/local/bin/lablink-agent`.
    pub fn with_agent_download(
        mut self,
        url: impl Into<String>,
        sha256: impl Into<String>,
    ) -> Self {
        self.agent.agent_download_url = url.into();
        self.agent.agent_sha256 = sha256.into();
        self
    }

    /// Extra environment of every agent (`SUBJECT_IMAGE`, `TUTORIAL_REPO_TO_CLONE`...).
    /// `ALLOCATOR_URL`, `VM_NAME` and `API_TOKEN` are set by the provisioner.
    pub fn with_agent_env(mut self, env: BTreeMap<String, String>) -> Self {
        self.agent.env.extend(env);
        self
    }

    /// How long `destroy` waits for EC2 to report the instances as shutting down (default
    /// [`DEFAULT_TERMINATE_TIMEOUT`]), and how often it asks.
    pub fn with_terminate_timeout(mut self, timeout: Duration, poll_interval: Duration) -> Self {
        self.terminate_timeout = timeout;
        self.poll_interval = poll_interval;
        self
    }

    /// How many `CreateTags` calls (one per new VM) run at once (default 16).
    pub fn with_tag_concurrency(mut self, concurrency: usize) -> Self {
        self.tag_concurrency = concurrency;
        self
    }

    /// Checks the settings and builds the client (loading the standard AWS configuration
    /// unless a client or configuration was given). Nothing is sent to AWS yet.
    pub async fn build(self) -> Result<Ec2Provisioner> {
        self.check()
            .map_err(|f| classify(f, "ec2 provisioner setup"))?;
        let client = match self.client.clone() {
            Some(client) => client,
            None => aws_sdk_ec2::Client::new(&self.sdk.load().await),
        };
        let mut types = self.instance_types;
        if types.is_empty() {
            types.push(DEFAULT_INSTANCE_TYPE.into());
        }
        Ok(Ec2Provisioner::new(
            client,
            Settings {
                deployment: self.deployment,
                owner: self.owner,
                ami: self.ami,
                instance_types: types,
                subnets: self.subnets,
                security_groups: self.security_groups,
                instance_profile: self.instance_profile,
                key_name: self.key_name,
                root_volume_gb: self.root_volume_gb,
                gpu_image: self.gpu_image,
                spot: self.spot,
                agent: self.agent,
                terminate_timeout: self.terminate_timeout,
                poll_interval: self.poll_interval,
                tag_concurrency: self.tag_concurrency,
            },
        ))
    }

    fn check(&self) -> Result<(), AwsFailure> {
        let bad = |m: String| Err(AwsFailure::Config(m));
        let tag_value_ok = |v: &str| !v.is_empty() && v.len() <= 256;
        if !tag_value_ok(&self.deployment)
            || !self
                .deployment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return bad(format!(
                "the deployment name {:?} must be 1 to 256 letters, digits, '-', '_' or '.'",
                self.deployment
            ));
        }
        if !tag_value_ok(&self.owner) {
            return bad("the owner tag must be 1 to 256 characters".into());
        }
        if self.ami.is_empty() {
            return bad("no AMI is configured".into());
        }
        if self.root_volume_gb.is_some_and(|gb| gb < 1) {
            return bad("the root volume must be at least 1 GiB".into());
        }
        if self.tag_concurrency == 0 {
            return bad("the tag concurrency must be at least 1".into());
        }
        if self.poll_interval.is_zero() {
            return bad("the terminate poll interval must be positive".into());
        }
        self.agent.validate()
    }
}
