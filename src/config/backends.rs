//! `[provisioner]` and `[collect]`: what creates machines and where collections are kept.
//! Each backend owns its settings (a serde struct exported by the crate that implements it);
//! the configuration only names them, tagged by `kind`, so a new backend is one variant.

use std::path::PathBuf;
use std::sync::Arc;

use lablink_core::{ArtifactStore, Error, ErrorKind, FakeConfig, Provisioner};
use serde::{Deserialize, Serialize};

use crate::collect::CollectSettings;
use crate::{LocalConfig, LocalProcessProvisioner};

/// `[provisioner]`: what creates machines, chosen by `kind`; the other keys are the chosen
/// backend's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ProvisionerConfig {
    /// Agent processes on this machine (the embedded default: a demo needs no cloud).
    Local(LocalConfig),
    /// An in-memory cloud with latency and failures, for tests and load runs.
    Fake(FakeConfig),
    /// Nothing is launched: the pool is the machines that register themselves (every kind
    /// accepts those beside its own VMs).
    Manual(ManualConfig),
    /// EC2 instances through the AWS API (feature `aws`).
    #[cfg(feature = "aws")]
    Aws(Box<lablink_aws::Ec2Config>),
    /// A Terraform module applied by the `terraform` program (feature `terraform`).
    #[cfg(feature = "terraform")]
    Terraform(Box<lablink_terraform::TerraformConfig>),
}

impl Default for ProvisionerConfig {
    fn default() -> Self {
        Self::Local(LocalConfig::default())
    }
}

/// Every kind, and the build feature it needs.
const PROVISIONER_KINDS: [(&str, bool); 5] = [
    ("local", true),
    ("fake", true),
    ("manual", true),
    ("aws", cfg!(feature = "aws")),
    ("terraform", cfg!(feature = "terraform")),
];

impl ProvisionerConfig {
    /// The kind's name, as in the file.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Local(_) => "local",
            Self::Fake(_) => "fake",
            Self::Manual(_) => "manual",
            #[cfg(feature = "aws")]
            Self::Aws(_) => "aws",
            #[cfg(feature = "terraform")]
            Self::Terraform(_) => "terraform",
        }
    }

    /// The default settings of `kind`, or why there are none.
    pub fn default_of(kind: &str) -> Result<Self, String> {
        Ok(match kind {
            "local" => Self::Local(LocalConfig::default()),
            "fake" => Self::Fake(FakeConfig::default()),
            "manual" => Self::Manual(ManualConfig::default()),
            #[cfg(feature = "aws")]
            "aws" => Self::Aws(Box::default()),
            #[cfg(feature = "terraform")]
            "terraform" => Self::Terraform(Box::default()),
            other => return Err(unknown_kind("[provisioner]", other, &PROVISIONER_KINDS)),
        })
    }

    /// Every problem with these settings alone.
    pub fn problems(&self) -> Vec<String> {
        match self {
            Self::Local(c) => c.problems(),
            Self::Fake(c) => c.problems(),
            Self::Manual(_) => Vec::new(),
            #[cfg(feature = "aws")]
            Self::Aws(c) => c.problems(),
            #[cfg(feature = "terraform")]
            Self::Terraform(c) => c.problems(),
        }
    }

    /// What only this machine can tell (the terraform program, the module's variables and
    /// outputs).
    pub fn host_problems(&self) -> Vec<String> {
        match self {
            #[cfg(feature = "terraform")]
            Self::Terraform(c) => c.host_problems(),
            _ => Vec::new(),
        }
    }

    /// The provisioner; local agents call `allocator_url`. EC2 calls are retried with
    /// backoff on capacity and throttling errors. The local provisioner is returned again
    /// so that its processes can be stopped at exit.
    pub async fn build(
        &self,
        allocator_url: &str,
    ) -> lablink_core::Result<(Arc<dyn Provisioner>, Option<LocalProcessProvisioner>)> {
        Ok(match self {
            Self::Local(c) => {
                let local = c.build(allocator_url)?;
                (Arc::new(local.clone()), Some(local))
            }
            Self::Fake(c) => (Arc::new(c.build()?), None),
            Self::Manual(_) => (Arc::new(lablink_core::NoProvisioner), None),
            #[cfg(feature = "aws")]
            Self::Aws(c) => {
                let ec2 = Arc::new(c.builder().build().await?);
                let policy = lablink_core::RetryPolicy::default();
                (
                    Arc::new(lablink_core::RetryProvisioner::new(ec2, policy)),
                    None,
                )
            }
            #[cfg(feature = "terraform")]
            Self::Terraform(c) => (Arc::new(c.builder().build()?), None),
        })
    }
}

/// `[provisioner] kind = "manual"`: no settings (machines join with registration tokens the
/// admin creates).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManualConfig {}

fn unknown_kind(section: &str, kind: &str, kinds: &[(&str, bool)]) -> String {
    if kinds.iter().any(|(k, built)| *k == kind && !built) {
        return format!("{section} kind {kind:?} needs a build with the `{kind}` feature");
    }
    let known: Vec<&str> = kinds
        .iter()
        .filter(|(_, built)| *built)
        .map(|(k, _)| *k)
        .collect();
    format!("{section} kind {kind:?} is not one of {}", known.join(", "))
}

/// `[collect.store]`: where collections are kept, chosen by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ArtifactStoreConfig {
    /// A directory on the allocator's machine (the default).
    Local {
        /// The directory (relative paths are from the working directory).
        #[serde(default = "default_artifact_dir")]
        dir: PathBuf,
    },
    /// Memory: lost at restart (tests and demos).
    Memory,
    /// An S3 bucket (feature `aws`).
    #[cfg(feature = "aws")]
    S3(lablink_aws::S3Config),
}

fn default_artifact_dir() -> PathBuf {
    PathBuf::from("lablink-artifacts")
}

impl Default for ArtifactStoreConfig {
    fn default() -> Self {
        Self::Local {
            dir: default_artifact_dir(),
        }
    }
}

const STORE_KINDS: [(&str, bool); 3] = [
    ("local", true),
    ("memory", true),
    ("s3", cfg!(feature = "aws")),
];

impl ArtifactStoreConfig {
    /// The default settings of `kind`, or why there are none.
    pub fn default_of(kind: &str) -> Result<Self, String> {
        Ok(match kind {
            "local" => Self::default(),
            "memory" => Self::Memory,
            #[cfg(feature = "aws")]
            "s3" => Self::S3(lablink_aws::S3Config::default()),
            other => return Err(unknown_kind("[collect.store]", other, &STORE_KINDS)),
        })
    }

    /// The store (`s3` builds its client; nothing is sent yet).
    pub async fn build(&self) -> lablink_core::Result<Arc<dyn ArtifactStore>> {
        Ok(match self {
            Self::Memory => Arc::new(lablink_core::MemoryArtifactStore::default()),
            Self::Local { dir } => Arc::new(lablink_core::LocalDirArtifactStore::new(dir)),
            #[cfg(feature = "aws")]
            Self::S3(c) => Arc::new(c.builder().build().await?),
        })
    }

    fn problems(&self) -> Vec<String> {
        match self {
            Self::Local { dir } if dir.as_os_str().is_empty() => {
                vec!["[collect.store] dir must be set for the local store".into()]
            }
            #[cfg(feature = "aws")]
            Self::S3(c) => c.problems(),
            _ => Vec::new(),
        }
    }
}

/// `[collect]`: which files are collected from the VMs, the limits, whether destroy
/// collects first (see [`crate::collect`]), and `[collect.store]`, where collections are
/// stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CollectConfig {
    /// Where collections are stored.
    pub store: ArtifactStoreConfig,
    /// What is collected and how.
    #[serde(flatten)]
    pub settings: CollectSettings,
}

/// The table's `store` goes to the store, the other keys to the settings, each refusing
/// keys it does not know (serde's `flatten` would let unknown keys through).
impl<'de> Deserialize<'de> for CollectConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut table = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let store = match table.remove("store") {
            None => ArtifactStoreConfig::default(),
            Some(v) => {
                serde_json::from_value(v).map_err(|e| D::Error::custom(format!("store: {e}")))?
            }
        };
        let settings =
            serde_json::from_value(serde_json::Value::Object(table)).map_err(D::Error::custom)?;
        Ok(Self { store, settings })
    }
}

impl CollectConfig {
    /// The configured artifact store.
    pub async fn artifact_store(&self) -> lablink_core::Result<Arc<dyn ArtifactStore>> {
        self.store.build().await.map_err(|e| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!("[collect.store] {}", e.message()),
            )
        })
    }

    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = self.settings.problems();
        problems.extend(self.store.problems());
        problems
    }
}
