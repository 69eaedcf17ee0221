//! The core Provisioner conformance suite against the real terraform binary and the
//! fixture module (`terraform_data` only, offline).

mod common;

lablink_core::provisioner_conformance!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provisioner() -> common::InTempDir {
        common::InTempDir::new()
    }
);
