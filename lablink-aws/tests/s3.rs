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

/// A file of `len` bytes that no two parts have alike (so a part out of order shows).
fn big_file(name: &str, len: usize) -> (std::path::PathBuf, Vec<u8>) {
    let bytes: Vec<u8> = (0..len as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let path = std::env::temp_dir().join(common::deployment(name));
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

async fn multipart_uploads(store: &lablink_aws::S3ArtifactStore) -> usize {
    let listed = store
        .client()
        .list_multipart_uploads()
        .bucket(store.bucket())
        .send()
        .await
        .unwrap();
    listed.uploads().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_larger_than_a_part_goes_up_in_parts_encrypted_and_byte_identical() {
    const PART: u64 = 5 * 1024 * 1024;
    let bucket = common::deployment("multipart").to_lowercase();
    store_in(&bucket, true).await; // creates the bucket
    let config = common::sdk_config(&common::endpoint()).await;
    let store = S3ArtifactStoreBuilder::new(&bucket)
        .with_sdk_config(config)
        .with_prefix("workshop/")
        .with_part_size(PART)
        .build()
        .await
        .unwrap();
    let (path, bytes) = big_file("multipart", 2 * PART as usize + 12_345);
    store
        .put_file("collections/vm-1/archive.tar", &path)
        .await
        .unwrap();

    let head = store
        .client()
        .head_object()
        .bucket(&bucket)
        .key("workshop/collections/vm-1/archive.tar")
        .send()
        .await
        .unwrap();
    let etag = head.e_tag().unwrap_or_default();
    assert!(etag.ends_with("-3\""), "not a 3-part upload: {etag}");
    assert_eq!(
        head.server_side_encryption(),
        Some(&aws_sdk_s3::types::ServerSideEncryption::Aes256)
    );
    let back = path.with_extension("back");
    store
        .get_file("collections/vm-1/archive.tar", &back)
        .await
        .unwrap();
    assert!(
        std::fs::read(&back).unwrap() == bytes,
        "the parts came back altered"
    );
    assert_eq!(multipart_uploads(&store).await, 0);

    // A file of exactly one part is one PutObject.
    let (small, _) = big_file("one-part", PART as usize);
    store.put_file("one.bin", &small).await.unwrap();
    let head = store
        .client()
        .head_object()
        .bucket(&bucket)
        .key("workshop/one.bin")
        .send()
        .await
        .unwrap();
    assert!(!head.e_tag().unwrap_or_default().contains('-'));
    for p in [path, back, small] {
        std::fs::remove_file(p).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_part_aborts_the_upload_and_leaves_no_object() {
    const PART: u64 = 5 * 1024 * 1024;
    let bucket = common::deployment("multipart-fail").to_lowercase();
    let direct = store_in(&bucket, true).await;
    let proxy = common::FaultProxy::start(&common::endpoint()).await;
    proxy.fail(&["partNumber=2"], 400, "InvalidRequest");
    let store = S3ArtifactStoreBuilder::new(&bucket)
        .with_sdk_config(common::sdk_config(&proxy.url).await)
        .with_prefix("workshop/")
        .with_part_size(PART)
        .build()
        .await
        .unwrap();
    let (path, _) = big_file("multipart-fail", 2 * PART as usize + 1);
    let err = store
        .put_file("collections/vm-1/archive.tar", &path)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UploadPart"), "{err}");
    assert_eq!(
        multipart_uploads(&direct).await,
        0,
        "parts were left behind"
    );
    let missing = direct
        .get("collections/vm-1/archive.tar")
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
    std::fs::remove_file(path).unwrap();
}

#[tokio::test]
async fn a_part_size_outside_s3s_limits_is_a_config_error() {
    for bytes in [0, 5 * 1024 * 1024 - 1, 5 * 1024 * 1024 * 1024 + 1] {
        let err = S3ArtifactStoreBuilder::new("bucket")
            .with_region("us-east-1")
            .with_part_size(bytes)
            .build()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
        assert!(err.to_string().contains("part size"), "{err}");
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
