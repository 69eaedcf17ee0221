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

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn register_two_machines_then_a_refused_token() {
    let server = allocator().await;
    let dir = tempfile::tempdir().unwrap();
    // ws-1 keeps its identity next to its settings (the default), ws-2 where
    // LABLINK_IDENTITY_FILE says.
    let ws1_config = dir.path().join("ws-1/agent.env");
    let ws2_config = dir.path().join("ws-2.env");
    let ws2_identity = dir.path().join("ids/ws-2.identity");
    let machines = [
        (
            "ws-1",
            &ws1_config,
            dir.path().join("ws-1/machine-identity"),
            None,
        ),
        (
            "ws-2",
            &ws2_config,
            ws2_identity.clone(),
            Some(&ws2_identity),
        ),
    ];
    let mut identities = Vec::new();
    for (name, config, identity_file, named) in &machines {
        let mut env = vec![("LABLINK_REGISTRATION_TOKEN", REGISTRATION_TOKEN.to_owned())];
        if let Some(file) = named {
            env.push(("LABLINK_IDENTITY_FILE", file.display().to_string()));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
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
            &env,
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
        let settings = std::fs::read_to_string(config).unwrap();
        assert!(
            settings.contains(&format!("API_TOKEN={AGENT_TOKEN}\n"))
                && settings.contains("LABLINK_ALLOW_REBOOT=0\n"),
            "{settings}"
        );
        let identity = std::fs::read_to_string(identity_file).unwrap();
        let identity = identity.trim().to_owned();
        assert_eq!(identity.len(), 64, "256 bits in hex");
        assert_eq!(mode(identity_file), 0o600);
        for printed in [&output.stdout, &output.stderr] {
            assert!(
                !text(printed).contains(&identity),
                "the identity was printed"
            );
        }
        identities.push(identity);
    }
    let sent: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.json()["machine_identity"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sent, identities, "each machine sends its own identity");
    assert_ne!(identities[0], identities[1], "two machines, two identities");

    // Unregistered (the allocator no longer knows it): the identity stays for next time.
    let output = lablink_agent(
        &[
            "unregister",
            "--config",
            ws1_config.to_str().unwrap(),
            "--no-service",
        ],
        &[],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(!ws1_config.exists());
    assert_eq!(
        std::fs::read_to_string(&machines[0].2).unwrap().trim(),
        identities[0]
    );

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
        &[],
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
    // 0: the first 401 stops it; 1: only once every answer was 401 for a second.
    for after in [0, 1] {
        std::fs::write(
            &config,
            format!(
                "ALLOCATOR_URL={}\nVM_NAME=ws-1\nAPI_TOKEN={AGENT_TOKEN}\nLABLINK_REGISTERED=1\n\
                 LABLINK_START_HOST=dry-run\nLABLINK_NVIDIA_SMI=/nonexistent/nvidia-smi\n\
                 LABLINK_BACKOFF_MAX_SECS=0.1\nLABLINK_UNREGISTERED_AFTER_SECS={after}\n",
                server.url
            ),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let output =
            lablink_agent(&[], &[("LABLINK_AGENT_CONFIG", config.to_str().unwrap())]).await;
        assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
        assert!(
            text(&output.stderr).contains("this machine is no longer registered"),
            "{}",
            text(&output.stderr)
        );
        assert!(started.elapsed() >= std::time::Duration::from_secs(after));
    }
}
