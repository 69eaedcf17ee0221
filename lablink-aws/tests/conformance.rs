//! The core Provisioner conformance suite against moto_server (started by
//! `scripts/with-moto.sh`), one fresh deployment per test.

mod common;

lablink_core::provisioner_conformance!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provisioner() -> lablink_aws::Ec2Provisioner {
        common::provisioner("conformance").await
    }
);
