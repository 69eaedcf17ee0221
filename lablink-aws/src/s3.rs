//! [`S3ArtifactStore`]: provisioning artifacts and exports kept in one S3 bucket, under a
//! prefix, always written with server-side encryption.

use std::fmt;

use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ServerSideEncryption};
use lablink_core::{Error, ErrorKind, Result};

use crate::error::{classify, AwsFailure};
use crate::sdk::{env_var, SdkSource};

pub use lablink_core::artifact::ArtifactInfo;

/// Requests server-side encryption on a `PutObject` or `CreateMultipartUpload` call: with the
/// KMS key when one is configured, else with S3-managed keys.
macro_rules! encrypted {
    ($call:expr, $kms_key:expr) => {
        match $kms_key {
            Some(kms) => $call
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .ssekms_key_id(kms),
            None => $call.server_side_encryption(ServerSideEncryption::Aes256),
        }
    };
}

fn read_failed(path: &std::path::Path, key: &str, e: &dyn fmt::Display) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("reading {} failed: {e}", path.display()),
    )
    .with_operation("artifact put")
    .with_context("key", key)
}

/// S3's smallest part (every part of a multipart upload but the last).
const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3's largest part, and largest single `PutObject`.
const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// S3's most parts in one upload.
const MAX_PARTS: u64 = 10_000;
/// Default part size: a file up to this size is one `PutObject`, a larger one is uploaded in
/// parts of this size (so up to 640 GiB).
const DEFAULT_PART_SIZE: u64 = 64 * 1024 * 1024;

/// Builds an [`S3ArtifactStore`].
///
/// ```no_run
/// # async fn run() -> lablink_core::Result<()> {
/// use lablink_aws::S3ArtifactStoreBuilder;
/// let store = S3ArtifactStoreBuilder::new("lab-lablink-artifacts")
///     .with_prefix("workshop/")
///     .build()
///     .await?;
/// store.put("exports/vms.csv", b"hostname,state\n".to_vec()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct S3ArtifactStoreBuilder {
    sdk: SdkSource,
    client: Option<aws_sdk_s3::Client>,
    bucket: String,
    prefix: String,
    kms_key: Option<String>,
    path_style: Option<bool>,
    part_size: u64,
}

impl fmt::Debug for S3ArtifactStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3ArtifactStoreBuilder")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("kms_key", &self.kms_key)
            .field("region", &self.sdk.region)
            .field("endpoint_url", &self.sdk.endpoint_url)
            .finish_non_exhaustive()
    }
}

impl S3ArtifactStoreBuilder {
    /// A store in `bucket` (which must exist), without a prefix, encrypted with S3-managed
    /// keys (SSE-S3, `AES256`).
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            sdk: SdkSource::default(),
            client: None,
            bucket: bucket.into(),
            prefix: String::new(),
            kms_key: None,
            path_style: None,
            part_size: DEFAULT_PART_SIZE,
        }
    }

    /// A builder from `LABLINK_AWS_ARTIFACT_BUCKET` (required), `LABLINK_AWS_ARTIFACT_PREFIX`
    /// and `LABLINK_AWS_ARTIFACT_KMS_KEY`. Region, endpoint and credentials come from the
    /// standard AWS chain.
    pub fn from_env() -> Result<Self> {
        let bucket = env_var("LABLINK_AWS_ARTIFACT_BUCKET").ok_or_else(|| {
            classify(
                AwsFailure::Config("LABLINK_AWS_ARTIFACT_BUCKET (the S3 bucket) is not set".into()),
                "s3 artifact store setup",
            )
        })?;
        let mut b = Self::new(bucket);
        if let Some(prefix) = env_var("LABLINK_AWS_ARTIFACT_PREFIX") {
            b = b.with_prefix(prefix);
        }
        if let Some(key) = env_var("LABLINK_AWS_ARTIFACT_KMS_KEY") {
            b = b.with_kms_key(key);
        }
        Ok(b)
    }

    /// Every key is stored under this prefix (e.g. `"workshop/"`).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Encrypts with this KMS key (SSE-KMS) instead of S3-managed keys.
    pub fn with_kms_key(mut self, key_id: impl Into<String>) -> Self {
        self.kms_key = Some(key_id.into());
        self
    }

    /// Uses this S3 client as is.
    pub fn with_s3_client(mut self, client: aws_sdk_s3::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Builds the client from this SDK configuration instead of the standard chain.
    pub fn with_sdk_config(mut self, config: aws_config::SdkConfig) -> Self {
        self.sdk.config = Some(config);
        self
    }

    /// The AWS region (default: the standard chain's).
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.sdk.region = Some(region.into());
        self
    }

    /// Sends every call to this endpoint (an emulator, MinIO...).
    pub fn with_endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.sdk.endpoint_url = Some(url.into());
        self
    }

    /// Path-style bucket addressing (`endpoint/bucket/key`). Default: on when an endpoint
    /// override is configured (emulators rarely resolve `bucket.endpoint`), off otherwise.
    pub fn with_path_style(mut self, path_style: bool) -> Self {
        self.path_style = Some(path_style);
        self
    }

    /// Files larger than this are uploaded in parts of this size (multipart upload); smaller
    /// ones with one `PutObject`. Between 5 MiB and 5 GiB; default 64 MiB.
    pub fn with_part_size(mut self, bytes: u64) -> Self {
        self.part_size = bytes;
        self
    }

    /// Checks the settings and builds the client. Nothing is sent to AWS yet.
    pub async fn build(self) -> Result<S3ArtifactStore> {
        let setup = |m: String| classify(AwsFailure::Config(m), "s3 artifact store setup");
        if self.bucket.is_empty() {
            return Err(setup("the bucket name is empty".into()));
        }
        if self.prefix.starts_with('/') {
            return Err(setup("the prefix must not start with '/'".into()));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return Err(setup(format!(
                "the part size must be between 5 MiB and 5 GiB (S3's limits), not {} bytes",
                self.part_size
            )));
        }
        let client = match self.client {
            Some(client) => client,
            None => {
                let config = self.sdk.load().await;
                let path_style = self
                    .path_style
                    .unwrap_or_else(|| config.endpoint_url().is_some());
                let s3 = aws_sdk_s3::config::Builder::from(&config)
                    .force_path_style(path_style)
                    .build();
                aws_sdk_s3::Client::from_conf(s3)
            }
        };
        Ok(S3ArtifactStore {
            client,
            bucket: self.bucket,
            prefix: self.prefix,
            kms_key: self.kms_key,
            part_size: self.part_size,
        })
    }
}

/// Artifacts (Terraform plans, exports, logs) in one S3 bucket under a prefix. Every object
/// is written with server-side encryption requested.
#[derive(Clone)]
pub struct S3ArtifactStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    kms_key: Option<String>,
    part_size: u64,
}

impl fmt::Debug for S3ArtifactStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3ArtifactStore")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("kms_key", &self.kms_key)
            .finish_non_exhaustive()
    }
}

impl S3ArtifactStore {
    /// The S3 client.
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn full_key(&self, key: &str) -> Result<String> {
        lablink_core::artifact::validate_artifact_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    /// Adds the bucket to errors, and says plainly when it does not exist.
    fn error(&self, failure: AwsFailure, operation: &'static str) -> Error {
        let missing_bucket = failure.code() == Some("NoSuchBucket");
        let error = classify(failure, operation).with_context("bucket", &self.bucket);
        if missing_bucket {
            Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "the S3 bucket {:?} does not exist; create it or configure another",
                    self.bucket
                ),
            )
            .with_operation(operation)
            .with_context("bucket", &self.bucket)
            .with_source(error)
        } else {
            error
        }
    }

    /// [`Self::error`] for a call about one key.
    fn key_error(&self, failure: AwsFailure, operation: &'static str, key: &str) -> Error {
        self.error(failure, operation).with_context("key", key)
    }

    /// Stores `bytes` under `key` (replacing what was there), encrypted at rest.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.put_body(key, ByteStream::from(bytes)).await
    }

    /// Stores the file at `path` under `key`, streamed from disk, encrypted at rest. A file
    /// larger than the part size goes up as a multipart upload, one part at a time (so memory
    /// stays flat and the 5 GB limit of one `PutObject` does not apply); a failed upload is
    /// aborted, so no parts are left behind to be billed.
    pub async fn put_file(&self, key: &str, path: &std::path::Path) -> Result<()> {
        let full = self.full_key(key)?;
        let unreadable = |e: &dyn fmt::Display| read_failed(path, key, e);
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|e| unreadable(&e))?
            .len();
        if size <= self.part_size {
            let body = ByteStream::from_path(path)
                .await
                .map_err(|e| unreadable(&e))?;
            return self.put_body(key, body).await;
        }
        if size.div_ceil(self.part_size) > MAX_PARTS {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{} is {size} bytes: more than {MAX_PARTS} parts of {} bytes",
                    path.display(),
                    self.part_size
                ),
            )
            .with_operation("artifact put")
            .with_context("key", key));
        }
        let create = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full);
        let created = encrypted!(create, &self.kms_key)
            .send()
            .await
            .map_err(|e| {
                self.key_error(
                    AwsFailure::sdk("CreateMultipartUpload", e),
                    "artifact put",
                    key,
                )
            })?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(Error::new(
                ErrorKind::Provider,
                "CreateMultipartUpload answered without an upload id",
            )
            .with_operation("artifact put")
            .with_context("key", key));
        };
        let parts = self.put_parts(key, &full, &upload_id, path, size).await;
        let completed = match parts {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(drop)
                .map_err(|e| {
                    self.key_error(
                        AwsFailure::sdk("CompleteMultipartUpload", e),
                        "artifact put",
                        key,
                    )
                }),
            Err(e) => Err(e),
        };
        if completed.is_err() {
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await;
            if let Err(e) = aborted {
                tracing::warn!(bucket = %self.bucket, key, error = %e, "aborting a failed multipart upload failed; S3 lifecycle rules must clean its parts");
            }
        }
        completed
    }

    /// Uploads the file in parts of `part_size`, in order.
    async fn put_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        path: &std::path::Path,
        size: u64,
    ) -> Result<Vec<CompletedPart>> {
        let mut parts = Vec::new();
        for (index, offset) in (0..size).step_by(self.part_size as usize).enumerate() {
            let number = i32::try_from(index + 1).unwrap_or(i32::MAX);
            let body = ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(Length::Exact(self.part_size.min(size - offset)))
                .build()
                .await
                .map_err(|e| read_failed(path, key, &e))?;
            let uploaded = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(upload_id)
                .part_number(number)
                .body(body)
                .send()
                .await
                .map_err(|e| {
                    self.key_error(AwsFailure::sdk("UploadPart", e), "artifact put", key)
                })?;
            parts.push(
                CompletedPart::builder()
                    .set_e_tag(uploaded.e_tag().map(str::to_owned))
                    .part_number(number)
                    .build(),
            );
        }
        Ok(parts)
    }

    async fn put_body(&self, key: &str, body: ByteStream) -> Result<()> {
        let full = self.full_key(key)?;
        let call = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .body(body);
        encrypted!(call, &self.kms_key)
            .send()
            .await
            .map_err(|e| self.error(AwsFailure::sdk("PutObject", e), "artifact put"))?;
        Ok(())
    }

    /// Streams the object under `key` into the (new or truncated) file at `path`;
    /// [`ErrorKind::NotFound`] when there is none.
    pub async fn get_file(&self, key: &str, path: &std::path::Path) -> Result<()> {
        let out = self.get_object(key).await?;
        let failed = |e: std::io::Error| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "copying the artifact from S3 to {} failed: {e}",
                    path.display()
                ),
            )
            .with_operation("artifact get")
            .with_context("key", key)
        };
        let mut file = tokio::fs::File::create(path).await.map_err(failed)?;
        let mut body = out.body.into_async_read();
        tokio::io::copy(&mut body, &mut file)
            .await
            .map_err(failed)?;
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(failed)
    }

    async fn get_object(
        &self,
        key: &str,
    ) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput> {
        let full = self.full_key(key)?;
        self.client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.key_error(AwsFailure::sdk("GetObject", e), "artifact get", key))
    }

    /// The bytes stored under `key`; [`ErrorKind::NotFound`] when there are none.
    pub async fn get(&self, key: &str) -> Result<Vec<u8>> {
        let out = self.get_object(key).await?;
        let body = out.body.collect().await.map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                "reading the artifact from S3 failed",
            )
            .with_operation("artifact get")
            .with_context("key", key)
            .with_source(e)
        })?;
        Ok(body.into_bytes().to_vec())
    }

    /// Removes `key`; removing a missing key succeeds.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let full = self.full_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| {
                self.key_error(AwsFailure::sdk("DeleteObject", e), "artifact delete", key)
            })?;
        Ok(())
    }

    /// The artifacts whose key starts with `prefix` (relative to the store's prefix), in
    /// key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ArtifactInfo>> {
        let full = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full)
                .set_continuation_token(next.take())
                .send()
                .await
                .map_err(|e| self.error(AwsFailure::sdk("ListObjectsV2", e), "artifact list"))?;
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                out.push(ArtifactInfo {
                    key: key.strip_prefix(&self.prefix).unwrap_or(key).to_owned(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                });
            }
            match page.next_continuation_token() {
                Some(token) if page.is_truncated() == Some(true) => next = Some(token.to_owned()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

/// The [`ArtifactStore`](lablink_core::ArtifactStore) contract over the inherent methods, so
/// the allocator can keep collections (and anything else) in S3.
#[async_trait::async_trait]
impl lablink_core::ArtifactStore for S3ArtifactStore {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        S3ArtifactStore::put(self, key, bytes).await
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>> {
        S3ArtifactStore::get(self, key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ArtifactInfo>> {
        S3ArtifactStore::list(self, prefix).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        S3ArtifactStore::delete(self, key).await
    }

    async fn put_file(&self, key: &str, path: &std::path::Path) -> Result<()> {
        S3ArtifactStore::put_file(self, key, path).await
    }

    async fn get_file(&self, key: &str, path: &std::path::Path) -> Result<()> {
        S3ArtifactStore::get_file(self, key, path).await
    }
}
