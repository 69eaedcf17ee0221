#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

/// The domain, the traits, the default allocator and the in-memory backends.
pub use lablink_core as core;
pub use lablink_core::*;

/// PostgreSQL store and notifier.
#[cfg(feature = "postgres")]
pub use lablink_postgres as postgres;

/// Terraform provisioner.
#[cfg(feature = "terraform")]
pub use lablink_terraform as terraform;

/// EC2 provisioner and S3 artifact store.
#[cfg(feature = "aws")]
pub use lablink_aws as aws;

/// VMs as local agent processes: the embedded default provisioner of the server.
#[cfg(feature = "local")]
pub mod local;
#[cfg(feature = "local")]
pub use local::{LocalConfig, LocalProcessProvisioner};

/// The allocator's HTTP layer: an axum router with the compatibility routes, `/api/v1`, the
/// participant page and the admin UI.
#[cfg(feature = "server")]
pub mod http;

/// The allocator server's configuration (file + `LABLINK_*` environment variables).
#[cfg(feature = "server")]
pub mod config;

/// Collecting participants' work off the VMs (through their agents) into an artifact store.
#[cfg(feature = "server")]
pub mod collect;

/// Wrappers counting what the provisioner and the notifier do into the server's metrics.
#[cfg(feature = "server")]
pub mod metered;

/// A whole allocator built from a [`config::Config`] and run until a shutdown signal.
#[cfg(feature = "server")]
pub mod server;
