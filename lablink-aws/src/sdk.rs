//! Loading the AWS SDK configuration: the standard credential and region chain, an optional
//! endpoint override (an emulator such as `moto_server`), and the HTTPS client.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

/// Where the SDK configuration comes from.
#[derive(Debug, Clone, Default)]
pub(crate) struct SdkSource {
    /// A configuration the caller built (its credentials, region, endpoint are used as is).
    pub config: Option<SdkConfig>,
    /// Overrides the region of the standard chain.
    pub region: Option<String>,
    /// Overrides the endpoint of every service (e.g. `http://127.0.0.1:5000` for moto).
    pub endpoint_url: Option<String>,
}

impl SdkSource {
    /// The caller's configuration, or the standard chain (environment, shared config and
    /// credentials files, SSO, web identity, ECS and EC2 instance roles). Retries of the SDK
    /// are off: LabLink retries in one wrapper
    /// ([`RetryProvisioner`](lablink_core::RetryProvisioner)), and a call count stays a
    /// call count.
    pub(crate) async fn load(&self) -> SdkConfig {
        let config = match &self.config {
            Some(config) => config.clone(),
            None => {
                aws_config::defaults(BehaviorVersion::latest())
                    .http_client(https_client())
                    .load()
                    .await
            }
        };
        let mut builder = config.to_builder();
        if config.http_client().is_none() {
            builder.set_http_client(Some(https_client()));
        }
        if let Some(region) = &self.region {
            builder.set_region(Some(Region::new(region.clone())));
        }
        if let Some(url) = &self.endpoint_url {
            builder.set_endpoint_url(Some(url.clone()));
        }
        builder.set_retry_config(Some(RetryConfig::disabled()));
        builder.build()
    }
}

/// The HTTP(S) client this crate gives every SDK client it builds: hyper and rustls on ring
/// (the SDK's own default client is not compiled in). Pass it to
/// `aws_config::ConfigLoader::http_client` when you build an `SdkConfig` or client yourself.
pub fn https_client() -> aws_sdk_ec2::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// Reads an environment variable, treating an empty value as unset.
pub(crate) fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}
