//! The S3 artifact store against moto_server.

mod common;

use lablink_aws::sdk_crates::aws_sdk_s3;
use lablink_aws::S3ArtifactStoreBuilder;
use lablink_core::ErrorKind;

async fn store_in(bucket: &str, create: bool) -> lablink_aws::S3ArtifactStore {
    let config = common::sdk_config(&common::endpoint()).await;
    let store = S3ArtifactStoreBuilder::new(bucket)
        .with_sdk_config(config)
        .with_prefix("workshop/")
        .build()
        .await
        .unwrap();
    if create {
        store
            .client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
    }
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_round_trips_encrypted_and_lists_by_prefix() {
    let bucket = common::deployment("artifacts").to_lowercase();
    let store = store_in(&bucket, true).await;
    let plan = (0..=255u8).cycle().take(300_000).collect::<Vec<u8>>();
    store.put("plans/launch-1.bin", plan.clone()).await.unwrap();
    store
        .put("plans/launch-2.bin", b"second".to_vec())
        .await
        .unwrap();
    store
        .put("exports/vms.csv", b"hostname,state\n".to_vec())
        .await
        .unwrap();
    assert_eq!(store.get("plans/launch-1.bin").await.unwrap(), plan);

    let listed = store.list("plans/").await.unwrap();
    let keys: Vec<_> = listed.iter().map(|a| a.key.as_str()).collect();
    assert_eq!(keys, ["plans/launch-1.bin", "plans/launch-2.bin"]);
    assert_eq!(listed[0].size, 300_000);
    assert_eq!(store.list("").await.unwrap().len(), 3);

    // Stored under the prefix, with server-side encryption.
    let head = store
        .client()
        .head_object()
        .bucket(&bucket)
        .key("workshop/exports/vms.csv")
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.server_side_encryption(),
        Some(&aws_sdk_s3::types::ServerSideEncryption::Aes256)
    );

    let missing = store.get("plans/nope.bin").await.unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
    let bad = store.get("").await.unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidInput, "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_a_clear_config_error() {
    let bucket = common::deployment("no-such-bucket").to_lowercase();
    let store = store_in(&bucket, false).await;
    for err in [
        store.put("a.txt", b"x".to_vec()).await.unwrap_err(),
        store.get("a.txt").await.unwrap_err(),
        store.list("").await.map(drop).unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("the S3 bucket {bucket:?} does not exist")),
            "{text}"
        );
        assert!(text.contains("NoSuchBucket"), "{text}");
    }
}

mod conformance {
    use super::common;
    use lablink_aws::S3ArtifactStoreBuilder;

    /// One bucket for the suite; each suite function works under its own random prefix.
    async fn suite_store() -> lablink_aws::S3ArtifactStore {
        let config = common::sdk_config(&common::endpoint()).await;
        let store = S3ArtifactStoreBuilder::new("lablink-artifact-suite")
            .with_sdk_config(config)
            .with_prefix("suite/")
            .build()
            .await
            .unwrap();
        // Created by whichever test comes first; "already exists" is fine.
        let _ = store
            .client()
            .create_bucket()
            .bucket("lablink-artifact-suite")
            .send()
            .await;
        store
    }

    lablink_core::artifact_store_conformance!(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn store() -> lablink_aws::S3ArtifactStore {
            suite_store().await
        }
    );
}
