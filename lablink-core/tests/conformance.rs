//! The conformance suites against the in-memory backends and the fake provisioner (also
//! wrapped in the retry wrapper, which must not change behaviour).

use std::sync::Arc;

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
