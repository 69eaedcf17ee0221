//! Bring-your-own machines end to end: a real `lablink-agent` registers with a registration
//! token the admin created, becomes available, serves a participant, is collected from,
//! registers again as the same record, and unregisters; refused registrations (another
//! machine under the same name, a used-up or revoked token, bad input, a flood) record
//! nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use lablink::collect::{CollectSettings, Collector};
use lablink::{LabLink, LocalDirArtifactStore};
use lablink_testkit::{
    agent_program, crd_command, expect_error, free_addr, json_of, wait_until, Rig, TestServer,
    Workdir, ADMIN_PASSWORD, ADMIN_USER,
};
use reqwest::header::{ACCEPT, COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A machine on this host: its name, identity file (the secret that tells it apart) and
/// agent's config file.
struct Machine {
    name: String,
    id_file: PathBuf,
    config: PathBuf,
}

impl Machine {
    fn new(work: &Workdir, name: &str, identity: &str) -> Self {
        let id_file = work.path(&format!("{name}.identity"));
        std::fs::write(&id_file, format!("{identity}\n")).unwrap();
        Self {
            name: name.to_owned(),
            id_file,
            config: work.path(&format!("{name}.env")),
        }
    }

    /// Runs `lablink-agent <args>` as this machine (no service manager).
    fn agent(&self, args: &[&str]) -> Output {
        Command::new(agent_program())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .arg("--no-service")
            .env("LABLINK_IDENTITY_FILE", &self.id_file)
            .output()
            .unwrap()
    }

    fn register(&self, url: &str, token: &str, name: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "register",
            "--allocator-url",
            url,
            "--token",
            token,
            "--name",
            name,
        ];
        args.extend(extra);
        self.agent(&args)
    }

    /// The agent run from its config file, as the service runs it (`VM_NAME` is set only
    /// for the recording scripts, which name their files by it), logging to `log`.
    fn command(&self, work: &Workdir, log: &Path) -> Command {
        let log = std::fs::File::create(log).unwrap();
        let mut command = Command::new(agent_program());
        command
            .envs(work.agent_env())
            .env("LABLINK_AGENT_CONFIG", &self.config)
            .env("VM_NAME", &self.name)
            // Stop at the first refusal of its token (the default waits a minute).
            .env("LABLINK_UNREGISTERED_AFTER_SECS", "0")
            .stdout(Stdio::null())
            .stderr(log);
        command
    }

    /// Starts the agent (see [`command`](Self::command)).
    fn start(&self, work: &Workdir, log: &Path) -> Running {
        Running(self.command(work, log).spawn().unwrap())
    }
}

/// An agent process, killed when the test lets go of it (one that already stopped is only
/// reaped).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn admin(rig: &Rig, method: Method, path: &str, body: Option<Value>) -> reqwest::Response {
    let request = rig
        .client
        .request(method, rig.url(path))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .header(ACCEPT, "application/json");
    match body {
        Some(body) => request.json(&body),
        None => request,
    }
    .send()
    .await
    .unwrap()
}

/// Creates a registration token as the admin: `(id, token)`.
async fn new_token(rig: &Rig, body: Value) -> (String, String) {
    let (status, created) =
        json_of(admin(rig, Method::POST, "/api/v1/registration-tokens", Some(body)).await).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(
        created["command"]
            .as_str()
            .unwrap()
            .contains(&format!("--allocator-url {} --token {token}", rig.url(""))),
        "{created}"
    );
    (created["id"].as_str().unwrap().to_owned(), token)
}

/// Waits for an agent process to end; its exit code.
async fn exit_code(agent: &mut Running) -> Option<i32> {
    wait_until("the agent to stop", Duration::from_secs(30), || {
        let status = agent.0.try_wait().unwrap();
        async move { status.map(|s| s.code()) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_machine_registers_serves_is_collected_registers_again_and_unregisters() {
    let work = Workdir::new();
    let addr = free_addr().await;
    let url = format!("http://{addr}");
    let local = work.provisioner(&url, &[]);
    let settings = CollectSettings {
        roots: vec![format!("{}/vms/{{hostname}}", work.dir.path().display())],
        patterns: vec!["**/*.slp".into()],
        ..CollectSettings::default()
    };
    let collector = Arc::new(Collector::new(
        Arc::new(LocalDirArtifactStore::new(work.path("artifacts"))),
        settings,
    ));
    let rig = Rig::start_with_collector(addr, LabLink::builder(), &local, collector).await;
    let (_, token) = new_token(&rig, json!({"label": "room 3", "max_uses": 1})).await;

    // Register: the agent's config file gets the machine's own token, readable by its
    // owner only; nothing secret is printed.
    let ws = Machine::new(&work, "ws-1", "0123456789abcdef0123456789abcdef");
    let out = ws.register(&url, &token, "ws-1", &[]);
    assert!(out.status.success(), "{}", text(&out));
    let config = std::fs::read_to_string(&ws.config).unwrap();
    let agent_token = config
        .lines()
        .find_map(|l| l.strip_prefix("API_TOKEN="))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    assert!(agent_token.starts_with("llt_"), "{config}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&ws.config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    for secret in [&token, &agent_token] {
        assert!(!text(&out).contains(secret.as_str()), "{}", text(&out));
    }

    // It runs, becomes available, and shows where it comes from.
    let mut agent = ws.start(&work, &work.path("ws-1.log"));
    let vms = rig
        .wait_for_vms("the registered machine to be available", 1, |vm| {
            vm["state"] == "available"
        })
        .await;
    assert_eq!(vms[0]["hostname"], "ws-1");
    assert_eq!(vms[0]["origin"], "registered");
    assert_eq!(vms[0]["instance_id"], "registered:ws-1");

    // A participant gets it and its desktop is started.
    let (status, body) = rig
        .request_vm("ada@example.org", &crd_command("4/ada"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["hostname"], "ws-1");
    wait_until("start-host to run", Duration::from_secs(30), || async {
        work.read("ws-1.runs")
    })
    .await;

    // The participant's work is collected from it.
    let file = work.path("vms/ws-1/session/labels.slp");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"the participant's labels").unwrap();
    let r = admin(
        &rig,
        Method::POST,
        "/api/v1/collections",
        Some(json!({"hostnames": ["ws-1"]})),
    )
    .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    wait_until("the collection", Duration::from_secs(60), || async {
        let list = rig.admin_get("/api/v1/collections").await;
        let vm = list.as_array().unwrap()[0].clone();
        assert_ne!(vm["current"]["state"], "failed", "{vm:#}");
        (vm["current"]["state"] == "complete" && vm["current"]["files"] == 1).then_some(())
    })
    .await;

    // Registering again (the token is used up, but this machine is already registered):
    // the same record, a new agent token; the running agent, refused, stops for good.
    let created_at = rig.vms().await[0]["created_at"].clone();
    let out = ws.register(&url, &token, "ws-1", &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("again"), "{}", text(&out));
    let vm = rig.admin_get("/api/v1/vms/ws-1").await;
    assert_eq!(vm["created_at"], created_at);
    assert_eq!(
        vm["assigned_to"], "ada@example.org",
        "the participant keeps it"
    );
    assert_eq!(exit_code(&mut agent).await, Some(3));
    let mut agent = ws.start(&work, &work.path("ws-1.again.log"));
    rig.wait_for_vms("the machine to serve again", 1, |vm| {
        vm["state"] == "assigned" && vm["status"] == "running"
    })
    .await;

    // Another machine cannot take its name; the used-up token registers no new machine.
    let other = Machine::new(&work, "ws-2", "fedcba9876543210fedcba9876543210");
    let out = other.register(&url, &token, "ws-1", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("registered by another machine"),
        "{}",
        text(&out)
    );
    let out = other.register(&url, &token, "ws-2", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("used up"), "{}", text(&out));

    // A revoked token registers nothing either.
    let (id, revoked) = new_token(&rig, json!({"label": "revoked"})).await;
    let r = admin(
        &rig,
        Method::DELETE,
        &format!("/api/v1/registration-tokens/{id}"),
        None,
    )
    .await;
    let (status, view) = json_of(r).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert!(view["revoked_at"].is_string());
    let out = other.register(&url, &revoked, "ws-2", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("revoked"), "{}", text(&out));

    // Nor does an expired one (stored as it stands an hour after it was created: tokens
    // live at least a minute, longer than a test should wait).
    let (mut expired, secret) = lablink_core::testing::store::registration_token(None);
    let now = chrono::Utc::now();
    (expired.created_at, expired.expires_at) = (now - chrono::Duration::hours(1), now);
    let store = rig.lablink.store();
    store.create_registration_token(&expired).await.unwrap();
    let out = other.register(&url, secret.expose(), "ws-2", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("expired"), "{}", text(&out));
    assert_eq!(rig.vms().await.len(), 1, "nothing recorded");

    // Unregister: it leaves the pool, its token stops working, its agent stops.
    let agent_token = std::fs::read_to_string(&ws.config)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("API_TOKEN="))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let out = ws.agent(&["unregister"]);
    assert!(out.status.success(), "{}", text(&out));
    rig.wait_for_vms("the machine to leave", 0, |_| true).await;
    let r = rig
        .client
        .get(rig.url("/api/v1/vms/ws-1/tasks?timeout=0"))
        .bearer_auth(&agent_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(!ws.config.exists(), "its config file is removed");
    assert_eq!(exit_code(&mut agent).await, Some(3));
    work.assert_agent_output_lacks(&[&token, &agent_token]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_reboots_a_registered_machine_only_where_its_owner_allowed_it() {
    let work = Workdir::new();
    lablink_testkit::script(
        &work.path("reboot"),
        r#"echo reboot >> "$RECORD_DIR/$VM_NAME.reboots""#,
    );
    let addr = free_addr().await;
    let url = format!("http://{addr}");
    let local = work.provisioner(&url, &[]);
    let rig = Rig::start(addr, LabLink::builder(), &local).await;
    let (_, token) = new_token(&rig, json!({"label": "lab"})).await;
    let willing = Machine::new(&work, "ws-r", "11111111111111111111111111111111");
    let unwilling = Machine::new(&work, "ws-n", "22222222222222222222222222222222");
    let out = willing.register(&url, &token, "ws-r", &["--allow-reboot"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = unwilling.register(&url, &token, "ws-n", &[]);
    assert!(out.status.success(), "{}", text(&out));
    let reboot = work.path("reboot").display().to_string();
    let start = |machine: &Machine, log: &str| {
        let mut command = machine.command(&work, &work.path(log));
        command.env("LABLINK_REBOOT_COMMAND", &reboot);
        Running(command.spawn().unwrap())
    };
    let agent = start(&willing, "ws-r.log");
    let _other = start(&unwilling, "ws-n.log");
    rig.wait_for_vms("both machines", 2, |vm| vm["state"] == "available")
        .await;

    // Its owner did not allow it: refused, and nothing changes.
    let r = admin(
        &rig,
        Method::POST,
        "/api/v1/vms/ws-n/reboot",
        Some(json!({})),
    )
    .await;
    let message = expect_error(r, 403).await;
    assert!(message.contains("did not allow reboots"), "{message}");
    assert_eq!(
        rig.admin_get("/api/v1/vms/ws-n").await["state"],
        "available"
    );

    // Allowed: the agent is asked on its task poll, says so, and runs the reboot command.
    let r = admin(
        &rig,
        Method::POST,
        "/api/v1/vms/ws-r/reboot",
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    wait_until("the reboot command", Duration::from_secs(30), || async {
        work.read("ws-r.reboots")
    })
    .await;
    let vm = rig.admin_get("/api/v1/vms/ws-r").await;
    assert_eq!(vm["state"], "rebooting");
    assert_eq!(vm["status"], "rebooting");
    // Asked once: the agent's answer is on record, so it is not asked again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(work.read("ws-r.reboots").unwrap().lines().count(), 1);

    // The machine comes back (its agent starts again): ready for the next participant.
    drop(agent);
    let _agent = start(&willing, "ws-r.again.log");
    rig.wait_for_vms("the machine back", 2, |vm| vm["state"] == "available")
        .await;
}

#[tokio::test]
async fn refused_registrations_are_clear_4xx_answers_that_record_nothing() {
    let work = Workdir::new();
    let addr = free_addr().await;
    let local = work.provisioner(&format!("http://{addr}"), &[]);
    let rig = Rig::start(addr, LabLink::builder(), &local).await;
    let (_, token) = new_token(&rig, json!({"max_uses": 5})).await;
    let register = |bearer: Option<&str>, body: Value| {
        let request = rig
            .client
            .post(rig.url("/api/v1/registrations"))
            .json(&body);
        match bearer {
            Some(b) => request.bearer_auth(b),
            None => request,
        }
        .send()
    };
    let good = json!({"hostname": "ws-9", "machine_identity": "0123456789abcdef0123456789abcdef"});
    let message = expect_error(register(None, good.clone()).await.unwrap(), 401).await;
    assert!(message.contains("registration token"), "{message}");
    expect_error(register(Some("llr_nope"), good.clone()).await.unwrap(), 401).await;
    for (body, needle) in [
        (
            json!({"hostname": "-bad", "machine_identity": "0123456789abcdef0123"}),
            "hostname",
        ),
        (
            json!({"hostname": "ws-9", "machine_identity": "short"}),
            "machine_identity",
        ),
        (
            json!({"hostname": "ws-9", "machine_identity": "0123456789abcdef0123", "address": "a b"}),
            "address",
        ),
        (json!({"hostname": "ws-9"}), "machine_identity"),
        (
            json!({"hostname": "lablink-vm-7", "machine_identity": "0123456789abcdef0123"}),
            "launches",
        ),
    ] {
        let message = expect_error(register(Some(&token), body).await.unwrap(), 400).await;
        assert!(message.contains(needle), "{message}");
    }
    // Bad token parameters are refused too.
    for body in [
        json!({"max_uses": 0}),
        json!({"valid_hours": -1}),
        json!({"valid_hours": 10000}),
    ] {
        let r = admin(
            &rig,
            Method::POST,
            "/api/v1/registration-tokens",
            Some(body),
        )
        .await;
        expect_error(r, 400).await;
    }
    let r = admin(
        &rig,
        Method::DELETE,
        "/api/v1/registration-tokens/not-an-id",
        None,
    )
    .await;
    expect_error(r, 400).await;
    // A flood of bad tokens from one address runs into the limit (429), and nothing was
    // recorded by any of it.
    let mut limited = false;
    for _ in 0..40 {
        let r = register(Some("llr_flood"), good.clone()).await.unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = true;
            break;
        }
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    assert!(limited, "no 429 after 40 failed registrations");
    assert!(rig.vms().await.is_empty());
    let tokens = rig.admin_get("/api/v1/registration-tokens").await;
    assert_eq!(tokens[0]["uses"], 0);
    let metrics = rig
        .client
        .get(rig.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for outcome in ["bad_token", "bad_input", "rate_limited"] {
        let line = format!("lablink_registrations_total{{outcome=\"{outcome}\"}}");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn the_admin_page_creates_a_token_shown_once_with_its_command_and_revokes_it() {
    let s = TestServer::start().await;
    let (session, csrf) = s.sign_in(ADMIN_PASSWORD).await.unwrap();
    let post = |path: &'static str, form: Vec<(&'static str, String)>| {
        s.client
            .post(s.url(path))
            .header(COOKIE, &session)
            .form(&form)
            .send()
    };
    let page = post(
        "/admin/machines",
        vec![
            ("csrf", csrf.clone()),
            ("label", "room 3 <workstations>".into()),
            ("valid_hours", "2".into()),
            ("max_uses", "".into()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    // As a browser shows it (the templates escape `/`).
    let html = page.text().await.unwrap().replace("&#x2f;", "/");
    let token = html
        .split("--token ")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .unwrap_or_else(|| panic!("no command with a token in {html}"))
        .trim()
        .to_owned();
    assert!(token.starts_with("llr_"), "{token}");
    assert!(
        html.contains("room 3 &lt;workstations&gt;"),
        "the label is escaped"
    );
    assert!(html.contains(&format!("--allocator-url {} --token", s.url(""))));

    // Shown once: the page and the API never show it again.
    let again = s
        .client
        .get(s.url("/admin/machines"))
        .header(COOKIE, &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!again.contains(&token));
    assert!(again.contains("--token &lt;TOKEN&gt;"), "{again}");
    let listed = s
        .admin(Method::GET, "/api/v1/registration-tokens")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!listed.contains(&token), "{listed}");
    let id = serde_json::from_str::<Value>(&listed).unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // A form without its CSRF token does nothing; with it, the token is revoked.
    let refused = post("/admin/machines/revoke", vec![("id", id.clone())])
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let page = post("/admin/machines/revoke", vec![("csrf", csrf), ("id", id)])
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("revoked"));
    let r = s
        .client
        .post(s.url("/api/v1/registrations"))
        .bearer_auth(&token)
        .json(&json!({"hostname": "ws-1", "machine_identity": "0123456789abcdef0123"}))
        .send()
        .await
        .unwrap();
    let message = expect_error(r, 401).await;
    assert!(message.contains("revoked"), "{message}");
}
