//! The conformance suites against the in-memory backends and the fake provisioner (also
//! wrapped in the retry wrapper, which must not change behaviour).

use std::sync::Arc;

use lablink_core::fake::FAILURE_RATE_FILE;
use lablink_core::{FakeProvisioner, MemoryNotifier, MemoryVmStore, RetryPolicy, RetryProvisioner};

mod memory_store {
    use super::*;
    lablink_core::vm_store_conformance!(
        #[tokio::test]
        async fn store() -> MemoryVmStore {
            MemoryVmStore::new()
        }
    );
}

mod memory_notifier {
    use super::*;
    lablink_core::notifier_conformance!(
        #[tokio::test]
        async fn notifier() -> MemoryNotifier {
            MemoryNotifier::new()
        }
    );

    #[tokio::test]
    async fn dropping_the_last_subscription_frees_the_channel() {
        let n = MemoryNotifier::new();
        let h = "vm-1".parse().unwrap();
        let a = n.subscribe_now(&h);
        let b = n.subscribe_now(&h);
        assert_eq!(n.subscribed_hostnames(), 1);
        drop(a);
        assert_eq!(n.subscribed_hostnames(), 1);
        drop(b);
        assert_eq!(n.subscribed_hostnames(), 0);
    }
}

mod fake_provisioner {
    use super::*;
    lablink_core::provisioner_conformance!(
        #[tokio::test]
        async fn provisioner() -> FakeProvisioner {
            FakeProvisioner::new()
        }
    );
}

mod retry_provisioner {
    use super::*;
    lablink_core::provisioner_conformance!(
        #[tokio::test]
        async fn provisioner() -> RetryProvisioner {
            RetryProvisioner::new(Arc::new(FakeProvisioner::new()), RetryPolicy::default())
        }
    );
}

/// A fresh directory under cargo's temporary directory for integration tests.
fn inventory_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "fake-inventory-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

mod fake_provisioner_on_a_directory {
    use super::*;
    use lablink_core::testing::provisioner::request;
    use lablink_core::Provisioner;

    lablink_core::provisioner_conformance!(
        #[tokio::test]
        async fn provisioner() -> FakeProvisioner {
            FakeProvisioner::new().with_inventory_dir(inventory_dir())
        }
    );

    #[tokio::test]
    async fn two_provisioners_on_one_directory_share_the_inventory() {
        let dir = inventory_dir();
        let a = FakeProvisioner::new().with_inventory_dir(&dir);
        let b = FakeProvisioner::new().with_inventory_dir(&dir);
        let made = a.launch(&request(&["vm-1", "vm-2"])).await.unwrap();
        assert_eq!(b.list().await.unwrap(), made);
        // The same hostname launched again by the other one is the same machine.
        assert_eq!(b.launch(&request(&["vm-1"])).await.unwrap(), made[..1]);
        b.destroy(&made[..1]).await.unwrap();
        assert_eq!(a.list().await.unwrap(), made[1..]);
        // A new provisioner (a restarted process) finds what is left.
        let c = FakeProvisioner::new().with_inventory_dir(&dir);
        assert_eq!(c.list().await.unwrap(), made[1..]);
    }

    #[tokio::test]
    async fn the_failure_rate_file_overrides_the_rate_while_it_exists() {
        let dir = inventory_dir();
        let p = FakeProvisioner::new().with_inventory_dir(&dir);
        std::fs::write(dir.join(FAILURE_RATE_FILE), "1\n").unwrap();
        let err = p.launch(&request(&["vm-1", "vm-2"])).await.unwrap_err();
        assert!(err.is_no_capacity(), "{err}");
        assert!(p.list().await.unwrap().is_empty());
        std::fs::remove_file(dir.join(FAILURE_RATE_FILE)).unwrap();
        assert_eq!(
            p.launch(&request(&["vm-1", "vm-2"])).await.unwrap().len(),
            2
        );
        assert_eq!(
            p.list().await.unwrap().len(),
            2,
            "the override file is not a machine"
        );
    }
}
