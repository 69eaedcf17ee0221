#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod builder;
mod calls;
mod config;
mod error;
mod provisioner;
mod s3;
mod sdk;
pub mod user_data;

pub use builder::{
    Ec2ProvisionerBuilder, DEFAULT_INSTANCE_TYPE, DEFAULT_OWNER, DEFAULT_TERMINATE_TIMEOUT,
};
pub use calls::CallCounter;
pub use config::{Ec2Config, S3Config, CLOUD_INIT_LOG};
pub use provisioner::{Ec2Provisioner, DEPLOYMENT_TAG, HOSTNAME_TAG, MANAGED_BY_TAG, OWNER_TAG};
pub use s3::{ArtifactInfo, S3ArtifactStore, S3ArtifactStoreBuilder};
pub use sdk::https_client;

/// The AWS SDK crates this one is built on, for callers that inject clients or
/// configurations (`with_ec2_client`, `with_sdk_config`).
pub mod sdk_crates {
    pub use aws_config;
    pub use aws_sdk_ec2;
    pub use aws_sdk_s3;
}
