//! The provisioner conformance suite for `LocalProcessProvisioner`, with real agent processes
//! (pointed at an allocator that is not there: they keep retrying, as agents must).

use lablink::LocalProcessProvisioner;

lablink_core::provisioner_conformance! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_agents() -> LocalProcessProvisioner {
        LocalProcessProvisioner::builder(env!("CARGO_BIN_EXE_testkit-agent"), "http://127.0.0.1:9")
            .env("LABLINK_START_HOST", "dry-run")
            .build()
    }
}

#[tokio::test]
async fn a_missing_agent_program_is_a_configuration_error() {
    use lablink::{ErrorKind, Provisioner};
    let p = LocalProcessProvisioner::builder("/nonexistent/lablink-agent", "http://127.0.0.1:9")
        .build();
    let e = p
        .launch(&lablink_core::testing::provisioner::request(&["vm-a"]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    assert!(e.to_string().contains("/nonexistent/lablink-agent"), "{e}");
    assert!(p.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_agent_that_exits_is_a_vm_that_is_gone() {
    use lablink::Provisioner;
    // `false` exits at once: a VM that died.
    let p = LocalProcessProvisioner::builder("false", "http://127.0.0.1:9").build();
    p.launch(&lablink_core::testing::provisioner::request(&["vm-a"]))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !p.list().await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead agent is still listed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
