//! The `lablink-agent` program's commands and exit statuses, against a tiny allocator.

mod support {
    pub mod http;
}

use std::path::Path;
use std::process::Output;

use support::http::{Reply, Request, TestServer};

const REGISTRATION_TOKEN: &str = "reg-s3cret-token";
const AGENT_TOKEN: &str = "agent-s3cret-token";

/// Runs the program with `args` and `env` (and none of the caller's LabLink variables).
async fn lablink_agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_lablink-agent"));
    command.args(args).stdin(std::process::Stdio::null());
    for (name, _) in std::env::vars() {
        if name.starts_with("LABLINK_")
            || matches!(name.as_str(), "ALLOCATOR_URL" | "VM_NAME" | "API_TOKEN")
        {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    let output = tokio::time::timeout(std::time::Duration::from_secs(20), command.output())
        .await
        .expect("lablink-agent finished")
        .unwrap();
    for text in [&output.stdout, &output.stderr] {
        let text = String::from_utf8_lossy(text);
        assert!(
            !text.contains(REGISTRATION_TOKEN) && !text.contains(AGENT_TOKEN),
            "a token was printed: {text}"
        );
    }
    output
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Registers any machine that brings the registration token; anything else is unknown.
async fn allocator() -> TestServer {
    TestServer::start(|r: &Request| {
        match (r.method.as_str(), r.path()) {
            ("POST", "/api/v1/registrations")
                if r.header("authorization") == Some(&format!("Bearer {REGISTRATION_TOKEN}")) =>
            {
                Reply::json(
                    201,
                    serde_json::json!({"hostname": r.json()["hostname"], "token": AGENT_TOKEN, "again": false}),
                )
            }
            _ => Reply::json(401, serde_json::json!({"error": "registration token unknown"})),
        }
    })
    .await
}

fn machine_id(dir: &Path, name: &str, id: &str) -> String {
    let file = dir.join(name);
    std::fs::write(&file, format!("{id}\n")).unwrap();
    file.display().to_string()
}

#[tokio::test]
async fn register_two_machines_then_a_refused_token() {
    let server = allocator().await;
    let dir = tempfile::tempdir().unwrap();
    let one = machine_id(dir.path(), "id-1", "11111111111111111111111111111111");
    let two = machine_id(dir.path(), "id-2", "22222222222222222222222222222222");
    for (name, id_file) in [("ws-1", &one), ("ws-2", &two)] {
        let config = dir.path().join(format!("{name}.env"));
        let output = lablink_agent(
            &[
                "register",
                "--allocator-url",
                &server.url,
                "--name",
                name,
                "--config",
                config.to_str().unwrap(),
                "--no-service",
            ],
            &[
                ("LABLINK_REGISTRATION_TOKEN", REGISTRATION_TOKEN),
                ("LABLINK_MACHINE_ID_FILE", id_file),
            ],
        )
        .await;
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        let stdout = text(&output.stdout);
        assert!(
            stdout.starts_with(&format!("registered as {name} ")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("LABLINK_AGENT_CONFIG={} ", config.display())),
            "{stdout}"
        );
        let settings = std::fs::read_to_string(&config).unwrap();
        assert!(
            settings.contains(&format!("API_TOKEN={AGENT_TOKEN}\n")),
            "{settings}"
        );
    }
    let identities: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.json()["machine_identity"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(identities.len(), 2);
    assert_ne!(identities[0], identities[1], "two machines, two identities");

    let output = lablink_agent(
        &[
            "register",
            "--allocator-url",
            &server.url,
            "--token=expired-token",
            "--config",
            dir.path().join("ws-3.env").to_str().unwrap(),
            "--no-service",
        ],
        &[("LABLINK_MACHINE_ID_FILE", &one)],
    )
    .await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("registration token unknown"), "{stderr}");
    assert!(!dir.path().join("ws-3.env").exists());
}

#[tokio::test]
async fn bad_arguments_exit_2_with_a_usage_line() {
    let output = lablink_agent(&["register", "--allocator-url", "http://h"], &[]).await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("--token (or LABLINK_REGISTRATION_TOKEN) is required"),
        "{stderr}"
    );
    assert!(
        stderr.contains("usage: lablink-agent register --allocator-url URL"),
        "{stderr}"
    );
    let output = lablink_agent(&["--help"], &[]).await;
    assert_eq!(output.status.code(), Some(0));
    assert!(text(&output.stdout).contains("lablink-agent unregister [--config PATH]"));
}

#[tokio::test]
async fn a_registered_agent_whose_token_is_refused_exits_3() {
    let server = allocator().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.env");
    std::fs::write(
        &config,
        format!(
            "ALLOCATOR_URL={}\nVM_NAME=ws-1\nAPI_TOKEN={AGENT_TOKEN}\nLABLINK_REGISTERED=1\n\
             LABLINK_START_HOST=dry-run\nLABLINK_NVIDIA_SMI=/nonexistent/nvidia-smi\n\
             LABLINK_BACKOFF_MAX_SECS=0.1\n",
            server.url
        ),
    )
    .unwrap();
    let output = lablink_agent(&[], &[("LABLINK_AGENT_CONFIG", config.to_str().unwrap())]).await;
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains("this machine is no longer registered"),
        "{}",
        text(&output.stderr)
    );
}
