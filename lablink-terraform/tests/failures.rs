//! Failures of the real terraform binary are clear, classified errors, and the records of the
//! VMs concerned show them (state `Failed` with `last_error`, through LabLink).

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use lablink_core::error::ErrorStatus;
use lablink_core::{
    Allocator, AllocatorExt, ErrorKind, MemoryVmStore, OperationStatus, Provisioner, VmState,
};
use serde_json::json;

const PATIENCE: Duration = Duration::from_secs(120);

/// Launches 2 VMs through LabLink and checks that the operation failed and both records are
/// `Failed` with a last error containing `expected`.
async fn assert_launch_fails_on_the_records(p: Arc<dyn Provisioner>, expected: &str) {
    let store = MemoryVmStore::default();
    let lablink = lablink(&store, p);
    let op = lablink.launch_and_wait(2, PATIENCE).await.unwrap();
    assert_eq!(op.status, OperationStatus::Failed, "{op:?}");
    assert!(
        op.message.as_deref().unwrap_or("").contains(expected),
        "{op:?}"
    );
    for name in ["lablink-vm-1", "lablink-vm-2"] {
        let record = lablink.vm(&name.parse().unwrap()).await.unwrap();
        assert_eq!(record.state, VmState::Failed, "{name}");
        let last_error = record.last_error.unwrap_or_default();
        assert!(last_error.contains(expected), "{name}: {last_error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_apply_is_a_permanent_provider_error_with_terraforms_message() {
    let dir = tempfile::tempdir().unwrap();
    let build = || {
        builder(dir.path())
            .with_variables(vars(&[("fail_message", json!("boom: AccessDenied"))]))
            .build()
            .unwrap()
    };
    let err = build().launch(&request(&["vm-a"])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Provider, "{err}");
    assert_eq!(err.status(), ErrorStatus::Permanent, "{err}");
    let text = err.to_string();
    assert!(text.contains("local-exec provisioner error"), "{text}");
    assert!(text.contains("boom: AccessDenied"), "{text}");
    assert!(
        build().list().await.unwrap().is_empty(),
        "nothing was created"
    );

    assert_launch_fails_on_the_records(Arc::new(build()), "boom: AccessDenied").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_apply_is_a_temporary_provider_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = builder(dir.path())
        .with_variables(vars(&[(
            "fail_message",
            json!("RequestLimitExceeded: Request limit exceeded."),
        )]))
        .build()
        .unwrap();
    let err = p.launch(&request(&["vm-a"])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Provider, "{err}");
    assert!(err.is_retryable(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_apply_times_out_is_stopped_and_releases_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let hung = builder(dir.path())
        .with_variables(vars(&[("apply_delay_seconds", json!(600))]))
        .with_timeout(Duration::from_secs(3))
        .with_shutdown_grace(Duration::from_secs(2))
        .build()
        .unwrap();
    let err = hung.launch(&request(&["vm-a"])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains("did not finish within 3s"),
        "{err}"
    );
    drop(hung);

    // Terraform was stopped cleanly: the state is unlocked and usable at once.
    let p = builder(dir.path()).build().unwrap();
    let vms = p.launch(&request(&["vm-b"])).await.unwrap();
    assert_eq!(ids(&vms).len(), 1);
    assert_eq!(
        ids(&p.list().await.unwrap()),
        ids(&vms),
        "vm-a was not created"
    );
    // ... and no `sleep` of the fixture is left running.
    let leftover = Command::new("pgrep")
        .args(["-f", "^sleep 600$"])
        .output()
        .unwrap();
    assert!(
        !leftover.status.success(),
        "the hung local-exec is still running"
    );

    let slow = builder(dir.path())
        .with_variables(vars(&[("apply_delay_seconds", json!(600))]))
        .with_timeout(Duration::from_secs(3))
        .with_shutdown_grace(Duration::from_secs(2))
        .build()
        .unwrap();
    assert_launch_fails_on_the_records(Arc::new(slow), "did not finish within 3s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_binary_is_unavailable_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let build = || {
        builder(dir.path())
            .with_terraform_binary("/nonexistent/bin/terraform")
            .build()
            .unwrap()
    };
    let err = build().launch(&request(&["vm-a"])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        !err.is_retryable(),
        "retrying does not install terraform: {err}"
    );
    assert!(
        err.to_string().contains("/nonexistent/bin/terraform"),
        "{err}"
    );
    assert_eq!(
        build().list().await.unwrap_err().kind(),
        ErrorKind::Unavailable
    );

    assert_launch_fails_on_the_records(Arc::new(build()), "/nonexistent/bin/terraform").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_variables_are_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let p = builder(dir.path())
        .with_variables(vars(&[("apply_delay_seconds", json!("soon"))]))
        .build()
        .unwrap();
    let err = p.launch(&request(&["vm-a"])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("apply_delay_seconds"), "{err}");

    for reserved in ["vms", "deployment"] {
        let err = builder(dir.path())
            .with_variables(vars(&[(reserved, json!({}))]))
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
        assert!(err.to_string().contains(reserved), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_lock_held_by_another_terraform_is_a_temporary_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let p = builder(dir.path()).build().unwrap();
    p.launch(&request(&["vm-a"])).await.unwrap();

    // Another process (not this provisioner) runs a long apply in the same directory.
    let mut other = Command::new(terraform())
        .args(["apply", "-auto-approve", "-input=false", "-no-color"])
        .args(["-var", "apply_delay_seconds=30"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock_file = dir.path().join(".terraform.tfstate.lock.info");
    while !lock_file.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let err = p.launch(&request(&["vm-b"])).await.unwrap_err();
    other.kill().unwrap();
    other.wait().unwrap();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("state lock"), "{err}");
    assert!(
        err.context().iter().any(|(k, _)| *k == "lock_id"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_messages_and_progress_never_contain_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(&["vm-a"]);
    let token = req.vms[0].token.expose().to_owned();
    let lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    req.progress = lablink_core::Progress::new(move |l| sink.lock().unwrap().push(l.to_owned()));
    // The failing command prints the token itself: Terraform repeats it in its error.
    let p = builder(dir.path())
        .with_variables(vars(&[("fail_message", json!(format!("leaked {token}")))]))
        .build()
        .unwrap();
    let err = p.launch(&req).await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(text.contains("***"), "{text}");
    assert!(!text.contains(&token), "{text}");
    let lines = lines.lock().unwrap();
    assert!(lines.iter().any(|l| l.contains("***")), "{lines:#?}");
    assert!(lines.iter().all(|l| !l.contains(&token)), "{lines:#?}");
}
