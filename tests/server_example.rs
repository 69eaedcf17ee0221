//! The `lablink` program as a user runs it: built with cargo, started as its own process.
//!
//! - The README's promise: `cargo run` on a fresh machine, with no
//!   configuration, prints the admin URL and a generated password once, serves `/healthz`,
//!   the participant page and the admin UI, and the printed password signs in.
//! - Graceful shutdown: SIGTERM while agents hold `/vm_startup` and `/api/v1` waits answers
//!   every held request at once with its "not yet, ask again" status, and the process exits
//!   cleanly.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
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
        let dir = tempfile::tempdir().unwrap();
        let server = Self::start_in(&build_server(), dir.path(), &[], env);
        (server, dir)
    }

    /// Starts `binary` with `args` in `dir`, as [`start`](Self::start) does.
    fn start_in(binary: &Path, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary);
        for (key, _) in std::env::vars() {
            if key.starts_with("LABLINK_") || key == "DATABASE_URL" {
                command.env_remove(key);
            }
        }
        command
            .args(args)
            .current_dir(dir)
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
        server
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
        ("LABLINK_PROVISIONER__LATENCY_SECONDS", "0"),
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

/// Copies the program to `<root>/bin/lablink`, where `cargo install --root <root>` puts it:
/// what the tests below run is the installed file, not cargo's build output.
fn install(root: &Path) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let installed = bin.join("lablink");
    std::fs::copy(build_server(), &installed).unwrap();
    installed
}

const ADMIN_PASSWORD: &str = "every-kind-admin-password";

/// How long one launch or destroy may take (Terraform initialises its working directory on
/// the first one).
const OPERATION_PATIENCE: Duration = Duration::from_secs(180);

/// An admin API call that must succeed; its JSON answer.
async fn admin_call(request: reqwest::RequestBuilder) -> Value {
    let r = request
        .basic_auth("admin", Some(ADMIN_PASSWORD))
        .timeout(OPERATION_PATIENCE)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    body
}

/// Waits for operation `op` to succeed.
async fn finish(http: &Client, server: &Server, op: Value) -> Value {
    let id = op["id"].as_str().expect("an operation").to_owned();
    let deadline = tokio::time::Instant::now() + OPERATION_PATIENCE;
    loop {
        let op = admin_call(http.get(server.url(&format!("/api/v1/operations/{id}")))).await;
        if op["status"] == "succeeded" {
            break op;
        }
        assert_ne!(op["status"], "failed", "{op}");
        assert!(tokio::time::Instant::now() < deadline, "hung: {op}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `lablink serve --config <file holding config>` from the installed program in an
/// empty directory, launches two VMs through the admin API, checks the allocator's records,
/// runs `while_up` on them, destroys every VM and sees the records go. Returns the records
/// as they were listed.
async fn launch_and_destroy_through<F, Fut>(
    config: &str,
    env: &[(&str, &str)],
    while_up: F,
) -> Vec<Value>
where
    F: FnOnce(Vec<Value>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let program = install(&dir.path().join("root"));
    let file = dir.path().join("lablink.toml");
    std::fs::write(&file, config).unwrap();
    let mut env = env.to_vec();
    env.push(("LABLINK_ADMIN__PASSWORD", ADMIN_PASSWORD));
    let server = Server::start_in(
        &program,
        dir.path(),
        &["serve", "--config", file.to_str().unwrap()],
        &env,
    );
    let http = client();
    let launched = finish(
        &http,
        &server,
        admin_call(
            http.post(server.url("/api/v1/launch"))
                .json(&json!({"count": 2})),
        )
        .await,
    )
    .await;
    let vms = admin_call(http.get(server.url("/api/v1/vms"))).await;
    let vms = vms.as_array().expect("a list of VMs").clone();
    let mut listed: Vec<&str> = vms
        .iter()
        .filter_map(|vm| vm["hostname"].as_str())
        .collect();
    listed.sort_unstable();
    assert_eq!(json!(listed), launched["hostnames"], "{vms:?}");
    for vm in &vms {
        assert!(vm["instance_id"].is_string(), "no instance: {vm}");
    }
    while_up(vms.clone()).await;
    finish(
        &http,
        &server,
        admin_call(
            http.post(server.url("/api/v1/destroy"))
                .json(&json!({"all": true})),
        )
        .await,
    )
    .await;
    let deadline = tokio::time::Instant::now() + OPERATION_PATIENCE;
    loop {
        let left = admin_call(http.get(server.url("/api/v1/vms"))).await;
        if left.as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not destroyed: {left}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    vms
}

#[tokio::test]
async fn the_installed_program_serves_with_local_agent_processes() {
    // The local agents are the installed program itself, run as `lablink agent`.
    let vms =
        launch_and_destroy_through("[provisioner]\nkind = \"local\"\n", &[], |_| async {}).await;
    assert!(
        vms.iter()
            .all(|vm| vm["instance_id"].as_str().unwrap().starts_with("local-")),
        "{vms:?}"
    );
}

#[tokio::test]
async fn the_installed_program_serves_with_the_fake_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[provisioner]\nkind = \"fake\"\nlatency_seconds = 0\ninventory_dir = {:?}\n",
        dir.path().join("cloud")
    );
    launch_and_destroy_through(&config, &[], |_| async {}).await;
    // The machines were files in the inventory, and are gone with the VMs.
    let left = std::fs::read_dir(dir.path().join("cloud")).unwrap().count();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn the_installed_program_serves_with_terraform_on_a_module() {
    let module =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("lablink-terraform/tests/fixtures/module");
    let work = tempfile::tempdir().unwrap();
    let config = format!(
        "[provisioner]\nkind = \"terraform\"\nmodule_dir = {module:?}\nworking_dir = {:?}\ndeployment = \"kinds\"\n\
         [provisioner.variables]\nallocator_url = \"http://127.0.0.1:1\"\n",
        work.path().join("tf")
    );
    launch_and_destroy_through(&config, &[], |_| async {}).await;
    // Terraform's own state records the apply and the destroy.
    let state = std::fs::read_to_string(work.path().join("tf/terraform.tfstate"))
        .expect("terraform kept its state in the working directory");
    assert!(state.contains("\"serial\""), "{state}");
}

/// Where the AWS emulator listens; the test fails, naming what to run, without it.
fn emulator() -> String {
    std::env::var("LABLINK_AWS_TEST_ENDPOINT").expect(
        "LABLINK_AWS_TEST_ENDPOINT is not set: this test needs the AWS emulator; run it \
         through scripts/with-moto.sh (the README's test command does)",
    )
}

/// One EC2 query to the emulator (which does not check signatures); its XML answer.
async fn emulator_query(endpoint: &str, params: &[(&str, &str)]) -> String {
    let mut form = vec![("Version", "2016-11-15")];
    form.extend_from_slice(params);
    Client::new()
        .post(endpoint)
        .header(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=lablink-test/20260101/us-east-1/ec2/aws4_request, \
             SignedHeaders=host, Signature=0",
        )
        .form(&form)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// An image the emulator knows (it validates AMIs).
async fn emulator_ami(endpoint: &str) -> String {
    let images = emulator_query(
        endpoint,
        &[("Action", "DescribeImages"), ("Owner.1", "amazon")],
    )
    .await;
    images
        .split("<imageId>")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .unwrap_or_else(|| panic!("the emulator listed no image: {images}"))
        .to_owned()
}

/// The instances of `deployment` the emulator has running, sorted.
async fn running_instances(endpoint: &str, deployment: &str) -> Vec<String> {
    let answer = emulator_query(
        endpoint,
        &[
            ("Action", "DescribeInstances"),
            ("Filter.1.Name", "tag:deployment"),
            ("Filter.1.Value.1", deployment),
            ("Filter.2.Name", "instance-state-name"),
            ("Filter.2.Value.1", "running"),
        ],
    )
    .await;
    let mut ids: Vec<String> = answer
        .split("<instanceId>")
        .skip(1)
        .filter_map(|rest| rest.split('<').next())
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn the_installed_program_serves_with_terraform_on_the_shipped_module_and_the_emulator() {
    let endpoint = emulator();
    let ami = emulator_ami(&endpoint).await;
    let work = tempfile::tempdir().unwrap();
    let mirror = std::env::var("LABLINK_TF_PLUGIN_MIRROR").unwrap_or("/opt/tf-plugins".into());
    let cli_config = work.path().join("terraform.rc");
    std::fs::write(
        &cli_config,
        format!(
            "provider_installation {{\n  filesystem_mirror {{\n    path = {mirror:?}\n  }}\n}}\n"
        ),
    )
    .unwrap();
    let deployment = format!("served{}", std::process::id());
    // The shipped module (no module_dir), its provider from the mirror, talking to the emulator.
    let config = format!(
        "[provisioner]\nkind = \"terraform\"\nworking_dir = {:?}\ndeployment = {deployment:?}\n\
         [provisioner.variables]\nallocator_url = \"http://127.0.0.1:1\"\nregion = \"us-east-1\"\n\
         client_ami_id = {ami:?}\nmachine_type = \"t3.micro\"\n\
         [provisioner.env]\nTF_CLI_CONFIG_FILE = {cli_config:?}\nAWS_ENDPOINT_URL = {endpoint:?}\n\
         AWS_ACCESS_KEY_ID = \"lablink-test\"\nAWS_SECRET_ACCESS_KEY = \"lablink-test\"\n\
         AWS_CONFIG_FILE = \"/dev/null\"\nAWS_SHARED_CREDENTIALS_FILE = \"/dev/null\"\n",
        work.path().join("tf"),
    );
    // The records name the instances the emulator runs; after the destroy none runs.
    let (at, of) = (&endpoint, &deployment);
    launch_and_destroy_through(&config, &[], |vms| async move {
        let mut ids: Vec<String> = vms
            .iter()
            .map(|vm| vm["instance_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        assert_eq!(running_instances(at, of).await, ids);
    })
    .await;
    assert_eq!(
        running_instances(&endpoint, &deployment).await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn the_installed_program_serves_with_ec2_on_the_emulator() {
    let endpoint = emulator();
    let ami = emulator_ami(&endpoint).await;
    let config = format!(
        "[provisioner]\nkind = \"aws\"\nregion = \"us-east-1\"\nendpoint_url = {endpoint:?}\nami = {ami:?}\n\
         deployment = \"kinds-{}\"\nallocator_url = \"http://127.0.0.1:1\"\n",
        std::process::id()
    );
    let credentials: Vec<(String, String)> = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
        .iter()
        .map(|k| {
            (
                k.to_string(),
                std::env::var(k).unwrap_or_else(|_| "lablink-test".into()),
            )
        })
        .collect();
    let env: Vec<(&str, &str)> = credentials
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let vms = launch_and_destroy_through(&config, &env, |_| async {}).await;
    assert!(
        vms.iter()
            .all(|vm| vm["instance_id"].as_str().unwrap().starts_with("i-")),
        "{vms:?}"
    );
}

#[test]
fn validate_lists_every_problem_of_a_broken_config_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let program = install(&dir.path().join("root"));
    let file = dir.path().join("broken.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"everywhere\"\n[allocator]\npin_length = 2\n\
         [provisioner]\nkind = \"terraform\"\nbinary = \"/opt/none/terraform\"\n\
         [provisioner.variables]\nregoin = \"eu-west-1\"\n\
         [collect.store]\nkind = \"local\"\ndir = \"\"\n",
    )
    .unwrap();
    let out = Command::new(&program)
        .args(["validate", "--config", file.to_str().unwrap()])
        .env_remove("LABLINK_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for expected in [
        "listen \"everywhere\"",
        "pin_length",
        "/opt/none/terraform",
        "regoin",
        "allocator_url must be set",
        "dir must be set",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected} missing from:\n{stderr}"
        );
    }
    assert!(stderr.contains("6 problem(s)"), "{stderr}");

    // The same file, fixed, passes.
    std::fs::write(&file, "[provisioner]\nkind = \"fake\"\n").unwrap();
    let out = Command::new(&program)
        .args(["validate", "--config", file.to_str().unwrap()])
        .env_remove("LABLINK_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_sample_configuration_in_the_docs_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let program = install(&dir.path().join("root"));
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&samples).unwrap() {
        let path = entry.unwrap().path();
        let out = Command::new(&program)
            .args(["validate", "--config", path.to_str().unwrap()])
            .env_remove("LABLINK_CONFIG")
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 4, "samples in {}", samples.display());
}
