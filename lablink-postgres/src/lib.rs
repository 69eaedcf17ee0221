#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod audit;
mod claim;
mod error;
mod leader;
mod lock;
mod logs;
mod notifier;
mod reads;
mod row;
mod settings;
mod store;
mod usage;

pub use notifier::{PgNotifier, PgNotifierOptions, DEFAULT_CHANNEL};
pub use store::PgVmStore;

/// The migrations that create LabLink's tables (`lablink_vms`, `lablink_vm_log_streams`,
/// `lablink_vm_log_lines`, `lablink_operations`, `lablink_registration_tokens`,
/// `lablink_audit`, `lablink_settings`, `lablink_vm_warnings`...), embedded from `migrations/`.
///
/// Run them with [`setup`], or with your own tooling (`sqlx migrate run --source
/// lablink-postgres/migrations`), or hand it to `#[sqlx::test(migrator = "lablink_postgres::MIGRATOR")]`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Creates or upgrades LabLink's tables by running [`MIGRATOR`]. Constructors never do this
/// on their own; call it once at deployment start-up (it is safe to call from several
/// replicas at once: sqlx serializes migrations with an advisory lock).
pub async fn setup(pool: &sqlx::PgPool) -> lablink_core::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .map_err(|e| error::classify("setup", sqlx::Error::from(e)))
}
