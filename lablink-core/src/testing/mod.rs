//! Conformance suites and proptest strategies (feature `testing`).
//!
//! Every backend runs the whole suite of its trait. Each behaviour is one `pub async fn`
//! taking the backend as a trait object; the macros [`vm_store_conformance!`],
//! [`notifier_conformance!`] and [`provisioner_conformance!`] stamp them out as named tests
//! with whatever test attribute the backend needs (`#[tokio::test]`, `#[sqlx::test]`...):
//!
//! ```no_run
//! lablink_core::vm_store_conformance!(
//!     #[tokio::test]
//!     async fn store() -> lablink_core::MemoryVmStore {
//!         lablink_core::MemoryVmStore::new()
//!     }
//! );
//! ```
//!
//! The setup function may take the arguments the test attribute supplies (for example
//! `async fn store(pool: PgPool) -> PgVmStore` under `#[sqlx::test]`). Suite functions
//! panic with a message when the backend breaks the contract.
//!
//! [`vm_store_conformance!`]: crate::vm_store_conformance
//! [`notifier_conformance!`]: crate::notifier_conformance
//! [`provisioner_conformance!`]: crate::provisioner_conformance

pub mod artifact;
pub mod audit;
pub mod desktop;
pub mod fleet;
pub mod notifier;
pub mod provisioner;
pub mod settings;
pub mod store;
pub mod strategies;
pub mod usage;

/// Stamps one test per suite function. Internal to the conformance macros.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($suite:ident [$attr:meta] $setup:ident $params:tt $args:tt ; $name:ident $(, $rest:ident)* $(,)?) => {
        #[$attr]
        async fn $name $params {
            let subject = $setup $args.await;
            $crate::testing::$suite::$name(&subject).await;
        }
        $crate::__conformance_tests!($suite [$attr] $setup $params $args ; $($rest),*);
    };
    ($suite:ident [$attr:meta] $setup:ident $params:tt $args:tt ; $(,)?) => {};
}

/// Stamps the whole [`VmStore`](crate::VmStore) suite as named tests.
#[macro_export]
macro_rules! vm_store_conformance {
    (#[$attr:meta] async fn $setup:ident($($arg:ident : $ty:ty),* $(,)?) -> $subject:ty $body:block) => {
        async fn $setup($($arg: $ty),*) -> $subject $body
        $crate::__conformance_tests!(store [$attr] $setup ($($arg: $ty),*) ($($arg),*);
            insert_is_idempotent_by_hostname,
            unknown_hostnames_are_not_found,
            apply_follows_the_state_machine,
            illegal_events_change_nothing,
            stale_generation_is_a_conflict_and_changes_nothing,
            generation_increases_on_every_change_and_only_then,
            claim_takes_only_assignable_vms,
            claim_returns_the_same_vm_for_the_same_email,
            claim_without_capacity_is_no_capacity,
            concurrent_claims_are_exactly_once,
            one_email_racing_for_the_last_vm_gets_it_every_time,
            release_frees_the_vm_and_the_email,
            an_email_never_owns_two_vms,
            telemetry_updates_fields_and_counts_restarts,
            logs_are_capped_and_drop_the_oldest_lines,
            list_filters_by_state_and_email,
            counts_group_by_state,
            token_digest_finds_its_vm,
            remove_deletes_records_and_frees_emails,
            operations_round_trip_newest_first,
            provisioning_lock_is_exclusive,
            leadership_is_exclusive_until_the_lease_ends,
            roster_is_replaced_as_a_whole,
            a_shared_secret_is_stored_once_and_agreed_on,
            an_ended_session_stays_ended_until_it_expires,
            registration_follows_its_token,
            a_token_never_registers_more_machines_than_allowed,
        );
        $crate::__conformance_tests!(audit [$attr] $setup ($($arg: $ty),*) ($($arg),*);
            audit_entries_read_back_newest_first,
            audit_entries_page_with_limit_and_before,
        );
        $crate::__conformance_tests!(settings [$attr] $setup ($($arg: $ty),*) ($($arg),*);
            workshop_settings_are_saved_only_from_the_stored_revision,
            concurrent_settings_saves_store_exactly_one,
            warnings_are_kept_once_per_vm_kind_and_due_time,
            warnings_are_acknowledged_once_and_go_with_their_vm,
        );
        $crate::__conformance_tests!(usage [$attr] $setup ($($arg: $ty),*) ($($arg),*);
            usage_accumulates_by_kind_and_outlives_the_vm,
        );
        $crate::__conformance_tests!(desktop [$attr] $setup ($($arg: $ty),*) ($($arg),*);
            desktop_sessions_are_kept_with_their_assignment,
            a_browser_assignment_has_no_command,
            a_reset_vm_is_free_only_once_its_agent_runs,
        );
    };
}

/// Stamps the whole [`Notifier`](crate::Notifier) suite as named tests.
#[macro_export]
macro_rules! notifier_conformance {
    (#[$attr:meta] async fn $setup:ident($($arg:ident : $ty:ty),* $(,)?) -> $subject:ty $body:block) => {
        async fn $setup($($arg: $ty),*) -> $subject $body
        $crate::__conformance_tests!(notifier [$attr] $setup ($($arg: $ty),*) ($($arg),*);
            a_subscriber_is_woken_by_publish,
            every_subscriber_of_a_hostname_is_woken,
            other_hostnames_do_not_wake_a_subscriber,
            publish_without_subscribers_succeeds,
            resubscribing_after_drop_works,
            many_hostnames_each_get_their_own_wake,
        );
    };
}

/// Stamps the whole [`Provisioner`](crate::Provisioner) suite as named tests.
#[macro_export]
macro_rules! provisioner_conformance {
    (#[$attr:meta] async fn $setup:ident($($arg:ident : $ty:ty),* $(,)?) -> $subject:ty $body:block) => {
        async fn $setup($($arg: $ty),*) -> $subject $body
        $crate::__conformance_tests!(provisioner [$attr] $setup ($($arg: $ty),*) ($($arg),*);
            launch_creates_one_machine_per_spec,
            an_empty_launch_creates_nothing,
            list_shows_launched_machines,
            destroy_removes_only_the_named_machines,
            destroy_is_idempotent,
            relaunching_a_hostname_does_not_duplicate_it,
            reboot_reaches_known_machines_only,
        );
    };
}

/// How long a suite waits for something that should happen (a wake-up, a delivery) before
/// it declares the contract broken. Generous: machines are shared and slow.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Stamps the whole [`ArtifactStore`](crate::ArtifactStore) suite as named tests.
#[macro_export]
macro_rules! artifact_store_conformance {
    (#[$attr:meta] async fn $setup:ident($($arg:ident : $ty:ty),* $(,)?) -> $subject:ty $body:block) => {
        async fn $setup($($arg: $ty),*) -> $subject $body
        $crate::__conformance_tests!(artifact [$attr] $setup ($($arg: $ty),*) ($($arg),*);
            put_then_get_round_trips_and_replaces,
            missing_keys_are_not_found_and_delete_is_idempotent,
            list_gives_the_keys_under_a_prefix_in_order_with_sizes,
            invalid_keys_are_rejected,
            files_round_trip,
        );
    };
}
