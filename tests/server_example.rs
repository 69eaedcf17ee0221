//! The `lablink` program as a user runs it: built with cargo, started as its own process.
//!
//! - The README's promise: `cargo run` on a fresh machine, with no
//!   configuration, prints the admin URL and a generated password once, serves `/healthz`,
//!   the participant page and the admin UI, and the printed password signs in.
//! - Graceful shutdown: SIGTERM while agents hold `/vm_startup` and `/api/v1` waits answers
//!   every held request at once with its "not yet, ask again" status, and the process exits
//!   cleanly.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

/// Bounds on waiting for the process; a hang fails the test instead of blocking CI.
const START_PATIENCE: Duration = Duration::from_secs(120);
const PATIENCE: Duration = Duration::from_secs(30);

/// Builds the program the way `cargo run` does and returns its path.
fn build_server() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "build",
            "--bin",
            "lablink",
            // The features `scripts/test.sh` builds with, so the build is the one already made.
            "--all-features",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(out.status.success(), "cargo build --bin lablink failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "lablink")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported no lablink executable")
}

/// The server process; killed on drop if still running.
struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
    banner: Vec<String>,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts the server in an empty directory, with no `LABLINK_*` variable but `env` (and
    /// an ephemeral port, so runs on one machine do not collide), and reads its banner.
    fn start(env: &[(&str, &str)]) -> (Self, tempfile::TempDir) {
        let binary = build_server();
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(&binary);
        for (key, _) in std::env::vars() {
            if key.starts_with("LABLINK_") || key == "DATABASE_URL" {
                command.env_remove(key);
            }
        }
        command
            .current_dir(dir.path())
            .env("LABLINK_SERVER__LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Self {
            child,
            lines,
            banner: Vec::new(),
            base: String::new(),
        };
        // The banner ends with the admin user/password lines.
        let deadline = std::time::Instant::now() + START_PATIENCE;
        while !server.banner.iter().any(|l| l.contains("admin user:")) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match server.lines.recv_timeout(left) {
                Ok(line) => server.banner.push(line),
                Err(_) => {
                    let banner = std::mem::take(&mut server.banner);
                    panic!(
                        "no banner on stdout (got {banner:?}); stderr: {}",
                        server.stderr()
                    )
                }
            }
        }
        // A generated password comes on the line after the user.
        let generated = !server
            .banner
            .iter()
            .any(|l| l.contains("password from the configuration"));
        if generated {
            match server.lines.recv_timeout(PATIENCE) {
                Ok(line) => server.banner.push(line),
                Err(_) => panic!("the banner stops before the password: {:?}", server.banner),
            }
        }
        server.base = server
            .banner
            .iter()
            .find_map(|l| l.strip_prefix("LabLink allocator listening on "))
            .expect("the banner names the address")
            .trim()
            .to_owned();
        (server, dir)
    }

    fn banner_value(&self, label: &str) -> Option<String> {
        self.banner
            .iter()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|v| v.trim().to_owned())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Kills the process (if needed) and returns everything it wrote to stderr.
    fn stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut text = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut text);
        }
        text
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("cannot run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit on its own.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn client() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

fn csrf_in(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .expect("a CSRF field")
        .split('"')
        .next()
        .unwrap()
        .to_owned()
}

fn first_cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap().to_owned())
}

/// Signs in through the login form; the session cookie, or the refusal's status.
async fn sign_in(
    http: &Client,
    s: &Server,
    user: &str,
    password: &str,
) -> Result<String, StatusCode> {
    let page = http.get(s.url("/admin/login")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let login_cookie = first_cookie(&page, "lablink_login").expect("a login cookie");
    let csrf = csrf_in(&page.text().await.unwrap());
    let r = http
        .post(s.url("/admin/login"))
        .header(COOKIE, &login_cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("username", user),
            ("password", password),
        ])
        .send()
        .await
        .unwrap();
    if r.status() != StatusCode::SEE_OTHER {
        return Err(r.status());
    }
    Ok(first_cookie(&r, "lablink_admin").expect("a session cookie"))
}

#[tokio::test]
async fn the_readme_run_command_works_with_no_configuration() {
    let (mut server, _dir) = Server::start(&[]);
    let http = client();

    let user = server
        .banner_value("admin user:")
        .expect("the banner names the admin user");
    let password = server
        .banner_value("admin password:")
        .expect("with no configuration the banner prints a generated password");
    assert!(password.len() >= 16, "a real password: {password:?}");
    for (label, path) in [
        ("participant page:", "/"),
        ("admin UI:", "/admin"),
        ("API document:", "/api/v1/openapi.json"),
    ] {
        assert_eq!(
            server.banner_value(label),
            Some(server.url(path)),
            "{label}"
        );
    }

    let health = http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    // The participant page: the request form.
    let page = http.get(server.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("name=\"email\""), "{html}");
    assert!(html.contains("name=\"crd_command\""), "{html}");

    // The admin UI: anonymous visitors go to the sign-in page; the printed password works,
    // another does not.
    let anonymous = http.get(server.url("/admin")).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::SEE_OTHER);
    assert_eq!(anonymous.headers()[LOCATION], "/admin/login");
    assert!(sign_in(&http, &server, &user, "not the password")
        .await
        .is_err());
    let session = sign_in(&http, &server, &user, &password)
        .await
        .expect("the printed password signs in");
    let admin = http
        .get(server.url("/admin"))
        .header(COOKIE, &session)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), StatusCode::OK);
    let html = admin.text().await.unwrap();
    assert!(html.contains("Launch"), "{html}");
    assert!(html.contains("/admin/logout"), "{html}");

    // Printed once, on stdout only: never in the logs.
    let logs = server.stderr();
    assert!(!logs.contains(&password), "the password reached the logs");
}

#[tokio::test]
async fn sigterm_answers_held_waiters_and_exits_cleanly() {
    const WAITERS: usize = 20;
    let admin_password = "graceful-shutdown-test";
    let (mut server, _dir) = Server::start(&[
        ("LABLINK_ADMIN__PASSWORD", admin_password),
        ("LABLINK_AGENTS__AUTH", "open"),
        ("LABLINK_PROVISIONER__KIND", "fake"),
        ("LABLINK_PROVISIONER__FAKE_LATENCY_SECONDS", "0"),
        ("LABLINK_SERVER__MAX_WAIT_SECONDS", "600"),
        ("LABLINK_ALLOCATOR__MAX_WAIT", "600"),
    ]);
    let http = client();
    let long = Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();

    // VMs to wait on.
    let op: Value = http
        .post(server.url("/api/v1/launch"))
        .basic_auth("admin", Some(admin_password))
        .json(&json!({ "count": WAITERS }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = op["id"].as_str().expect("a launch operation").to_owned();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let hostnames: Vec<String> = loop {
        let op: Value = http
            .get(server.url(&format!("/api/v1/operations/{id}")))
            .basic_auth("admin", Some(admin_password))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if op["status"] == "succeeded" {
            break serde_json::from_value(op["hostnames"].clone()).unwrap();
        }
        assert_ne!(op["status"], "failed", "{op}");
        assert!(tokio::time::Instant::now() < deadline, "launch hung: {op}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(hostnames.len(), WAITERS);

    // Each VM holds one compatibility wait and one v1 wait.
    let held: Vec<_> = hostnames
        .iter()
        .flat_map(|h| {
            let startup = long
                .post(server.url("/vm_startup"))
                .json(&json!({ "hostname": h }));
            let v1 = long.get(server.url(&format!("/api/v1/vms/{h}/assignment?timeout=600")));
            [("vm_startup", startup), ("v1 wait", v1)]
        })
        .map(|(what, request)| tokio::spawn(async move { (what, request.send().await) }))
        .collect();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let metrics = http
            .get(server.url("/metrics"))
            .basic_auth("admin", Some(admin_password))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let waiters = metrics
            .lines()
            .find_map(|l| l.strip_prefix("lablink_waiters "))
            .and_then(|v| v.trim().parse::<usize>().ok());
        if waiters == Some(2 * WAITERS) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waiters never all held: {waiters:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held.iter().all(|t| !t.is_finished()), "a wait ended early");

    server.terminate();
    let answers: Vec<_> = stream::iter(held)
        .then(|task| async move {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("a held request was not answered after SIGTERM")
                .unwrap()
        })
        .collect()
        .await;
    for (what, response) in answers {
        let response = response.unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        let status = response.status();
        match what {
            "vm_startup" => {
                assert_eq!(status, StatusCode::CONFLICT, "{what}");
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["error"], "not assigned yet", "{what}: {body}");
            }
            _ => assert_eq!(status, StatusCode::NO_CONTENT, "{what}"),
        }
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = server.wait_exit();
        (status, server.stderr())
    })
    .await
    .unwrap();
    assert!(
        status.0.success(),
        "the server exited with {}; stderr: {}",
        status.0,
        status.1
    );
}
