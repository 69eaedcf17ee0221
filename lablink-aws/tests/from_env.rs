//! `from_env` builders: LabLink settings from `LABLINK_AWS_*`, region, endpoint and
//! credentials from the standard AWS chain (here: the variables scripts/with-moto.sh
//! exports, pointed at the emulator). One test per binary: it changes the environment.

mod common;

use lablink_aws::{Ec2ProvisionerBuilder, S3ArtifactStoreBuilder};
use lablink_core::testing::provisioner::request;
use lablink_core::{ErrorKind, Provisioner};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builders_read_the_environment_and_the_standard_aws_chain() {
    let endpoint = common::endpoint();
    let ami = common::ami(&common::ec2_client(&endpoint, &Default::default()).await).await;
    let deployment = common::deployment("from-env");
    // Never a real AWS endpoint: the emulator's, whatever the developer's shell says.
    std::env::set_var("AWS_ENDPOINT_URL", &endpoint);
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ACCESS_KEY_ID", "lablink-test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "lablink-test");

    // Missing and malformed settings are named.
    std::env::remove_var("LABLINK_AWS_AMI");
    std::env::set_var("LABLINK_AWS_DEPLOYMENT", &deployment);
    let err = Ec2ProvisionerBuilder::from_env().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("LABLINK_AWS_AMI"), "{err}");
    std::env::set_var("LABLINK_AWS_AMI", &ami);
    std::env::set_var("LABLINK_AWS_SPOT", "maybe");
    let err = Ec2ProvisionerBuilder::from_env().unwrap_err();
    assert!(err.to_string().contains("LABLINK_AWS_SPOT"), "{err}");
    std::env::set_var("LABLINK_AWS_SPOT", "false");
    std::env::set_var("LABLINK_AWS_INSTANCE_TYPES", "m5.large, t3.large");
    std::env::set_var("LABLINK_AWS_OWNER", "env-owner");
    std::env::set_var("LABLINK_AWS_ALLOCATOR_URL", "http://allocator.test");

    let p = Ec2ProvisionerBuilder::from_env()
        .unwrap()
        .build()
        .await
        .unwrap();
    assert_eq!(p.deployment(), deployment);
    let vms = p.launch(&request(&["env-a"])).await.unwrap();
    let out = p
        .client()
        .describe_instances()
        .instance_ids(vms[0].instance_id.as_str())
        .send()
        .await
        .unwrap();
    let instance = &out.reservations()[0].instances()[0];
    assert_eq!(instance.instance_type().unwrap().as_str(), "m5.large");
    assert!(instance
        .tags()
        .iter()
        .any(|t| t.key() == Some("owner") && t.value() == Some("env-owner")));
    p.destroy(&vms).await.unwrap();
    assert!(p.list().await.unwrap().is_empty());

    let bucket = common::deployment("env-bucket").to_lowercase();
    std::env::set_var("LABLINK_AWS_ARTIFACT_BUCKET", &bucket);
    std::env::set_var("LABLINK_AWS_ARTIFACT_PREFIX", "exports/");
    let store = S3ArtifactStoreBuilder::from_env()
        .unwrap()
        .build()
        .await
        .unwrap();
    store
        .client()
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    store.put("a.csv", b"x".to_vec()).await.unwrap();
    let listed = store.list("").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, "a.csv");
    assert!(store
        .client()
        .head_object()
        .bucket(&bucket)
        .key("exports/a.csv")
        .send()
        .await
        .is_ok());
}
