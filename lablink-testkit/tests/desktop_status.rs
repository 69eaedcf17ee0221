//! End-to-end, with real `lablink-agent` processes and the real allocator server: the
//! participant's live desktop status follows what the agent reports; a code Chrome Remote
//! Desktop refused is fixed with a fresh command (the agent runs start-host again, as a new
//! attempt); and with `reuse = "reset"` a released VM is collected, reset by its agent and
//! handed to the next participant clean, or kept out of the pool when its reset failed.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lablink::collect::{CollectSettings, Collector};
use lablink::{AllocatorConfig, LabLink, LocalDirArtifactStore, Reuse};
use lablink_testkit::{
    crd_command, free_addr, script, wait_until, Rig, StatusEvents, Workdir, ADMIN_PASSWORD,
    ADMIN_USER,
};
use reqwest::header::ACCEPT;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

const PATIENCE: Duration = Duration::from_secs(60);

/// A participant's browser: keeps the participant cookie the allocator sets.
struct Participant {
    client: Client,
    email: String,
}

impl Participant {
    fn new(email: &str) -> Self {
        Self {
            client: Client::builder().cookie_store(true).build().unwrap(),
            email: email.to_owned(),
        }
    }

    /// Asks for a VM through the page's form (as JSON): `(status, body)`.
    async fn request_vm(&self, rig: &Rig, code: &str) -> (StatusCode, Value) {
        let r = self
            .client
            .post(rig.url("/api/request_vm"))
            .header(ACCEPT, "application/json")
            .form(&[
                ("email", self.email.as_str()),
                ("crd_command", &crd_command(code)),
            ])
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Like [`request_vm`](Self::request_vm), when it must be granted: `(hostname, pin)`.
    async fn get_vm(&self, rig: &Rig, code: &str) -> (String, String) {
        let (status, body) = self.request_vm(rig, code).await;
        assert_eq!(status, StatusCode::OK, "{}: {body}", self.email);
        (
            body["hostname"].as_str().unwrap().to_owned(),
            body["pin"].as_str().unwrap().to_owned(),
        )
    }

    async fn status_stream(&self, rig: &Rig) -> StatusEvents {
        StatusEvents::open(&self.client, &rig.url("")).await
    }
}

/// An allocator whose one VM is a real agent (`extra`: more agent settings), with
/// `config`; collecting from `collect_root` (a VM's home) before a release when given.
async fn one_vm(
    work: &Workdir,
    config: AllocatorConfig,
    extra: &[(&str, &str)],
    collect_root: Option<&Path>,
) -> (Rig, String) {
    let addr = free_addr().await;
    let local = work.provisioner(&format!("http://{addr}"), extra);
    let builder = LabLink::builder().with_config(config);
    let rig = match collect_root {
        Some(root) => {
            let settings = CollectSettings {
                roots: vec![root.display().to_string()],
                patterns: vec!["**/*.slp".into()],
                max_vm_bytes: 1 << 20,
                max_total_bytes: 1 << 30,
                destroy_collects_first: true,
                destroy_wait_seconds: 60,
                ..CollectSettings::default()
            };
            let collector = Arc::new(Collector::new(
                Arc::new(LocalDirArtifactStore::new(work.path("artifacts"))),
                settings,
            ));
            Rig::start_with_collector(addr, builder, &local, collector).await
        }
        None => Rig::start(addr, builder, &local).await,
    };
    let hostname = rig.launch(1).await.remove(0);
    rig.wait_for_vms("the agent to register", 1, |vm| vm["state"] == "available")
        .await;
    (rig, hostname)
}

/// A git repository at `dir` with one commit of `file`.
fn git_repo(dir: &Path, file: &str, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(file), text).unwrap();
    for args in [
        &["init", "-q"][..],
        &["add", "."],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "-m",
            "tutorial",
        ],
    ] {
        let ok = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .status()
            .expect("git runs")
            .success();
        assert!(ok, "git {args:?} failed");
    }
}

/// `POST /api/v1/vms/<hostname>/release` as the admin: the VM's view after it.
async fn admin_release(rig: &Rig, hostname: &str) -> Value {
    let r = rig
        .client
        .post(rig.url(&format!("/api/v1/vms/{hostname}/release")))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .header(ACCEPT, "application/json")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "release: {body}");
    body
}

/// The agent's log of `hostname`, as the admin reads it (`GET /api/v1/vms/<h>/logs`).
async fn agent_log(rig: &Rig, hostname: &str) -> String {
    let logs = rig.logs(hostname).await;
    logs["agent"]
        .as_str()
        .unwrap_or_else(|| panic!("no agent log in {logs}"))
        .to_owned()
}

/// Every entry under `dir` (links not followed): relative path → content, `dir` or the
/// link's target.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                into.insert(
                    rel,
                    format!("-> {}", std::fs::read_link(&path).unwrap().display()),
                );
            } else if meta.is_dir() {
                into.insert(rel, "dir".into());
                walk(root, &path, into);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                into.insert(rel, String::from_utf8_lossy(&bytes).into_owned());
            }
        }
    }
    let mut entries = BTreeMap::new();
    walk(dir, dir, &mut entries);
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_code_is_fixed_with_a_fresh_command_and_the_agent_starts_the_host_again() {
    const FIRST: &str = "4/0AbFirst-code_x";
    const SECOND: &str = "4/0AbSecond-code_y";
    let work = Workdir::new();
    // start-host records each code it is given, in order. The first is refused the way
    // Chrome Remote Desktop refuses an expired code, once the test lets it finish (so the
    // test sees the agent's `received` first); the second starts the host.
    script(
        &work.path("start-host"),
        r#"code=""
for arg in "$@"; do
  case "$arg" in --code=*) code="${arg#--code=}";; esac
done
cat > /dev/null
echo "$code" >> "$RECORD_DIR/$VM_NAME.codes"
[ -n "$API_TOKEN" ] && echo "start-host saw the VM's token" >> "$RECORD_DIR/$VM_NAME.leaks"
case "$code" in
  4/0AbFirst*)
    while [ ! -e "$RECORD_DIR/finish-first" ]; do sleep 0.05; done
    echo "OAuth error: the authorization code has expired" >&2
    exit 1;;
esac
exit 0"#,
    );
    let (rig, hostname) = one_vm(&work, AllocatorConfig::default(), &[], None).await;
    let ada = Participant::new("ada@example.org");
    let (granted, pin) = ada.get_vm(&rig, FIRST).await;
    assert_eq!(granted, hostname);
    let mut events = ada.status_stream(&rig).await;

    // The agent got it and runs start-host: `received` (after `assigned`, if the stream
    // opened before the agent's report).
    let before = events.until("received").await;
    for status in &before {
        assert_eq!(status["attempt"], 1, "{status}");
        assert!(
            status["stage"] == "assigned" || status["stage"] == "received",
            "{status}"
        );
        assert_eq!(status["needs_command"], false, "{status}");
    }
    std::fs::write(work.path("finish-first"), "").unwrap();
    let failed = events.until("failed").await.pop().unwrap();
    assert_eq!(failed["attempt"], 1, "{failed}");
    assert_eq!(failed["failure"], "code_rejected", "{failed}");
    assert_eq!(failed["needs_command"], true, "{failed}");
    assert_eq!(failed["link"], Value::Null, "{failed}");

    // A fresh command: attempt 2, which the agent runs at once.
    let r = ada
        .client
        .post(rig.url("/api/participant/command"))
        .header(ACCEPT, "application/json")
        .json(&json!({"crd_command": crd_command(SECOND)}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let answer = r.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["attempt"], 2, "{answer}");
    let after = events.until("ready").await;
    for status in &after {
        assert_eq!(status["attempt"], 2, "{status}");
        assert_ne!(status["stage"], "failed", "{status}");
    }
    let ready = after.last().unwrap();
    assert!(
        ready["link"].as_str().unwrap().starts_with("https://"),
        "{ready}"
    );
    assert_eq!(ready["needs_command"], false, "{ready}");

    // start-host ran once per attempt, with each attempt's code, in order.
    let codes = work.read(&format!("{hostname}.codes")).unwrap();
    assert_eq!(codes.lines().collect::<Vec<_>>(), [FIRST, SECOND]);
    assert_eq!(
        work.read(&format!("{hostname}.leaks")),
        None,
        "start-host (which leaves the host running as the desktop user) got the VM's token"
    );

    // The admin's log of the VM tells each attempt, without the codes or the PIN.
    let log = wait_until("the agent's log of attempt 2", PATIENCE, || async {
        let log = agent_log(&rig, &hostname).await;
        log.contains("Chrome Remote Desktop started for the assignment of")
            .then_some(log)
    })
    .await;
    assert!(
        log.contains("failed: ")
            && log.contains("authorization code has expired (reported as code_rejected)"),
        "{log}"
    );
    assert!(log.contains("(attempt 2)"), "{log}");
    let everything = format!(
        "{log}\n{}\n{}\n{answer}",
        rig.logs(&hostname).await,
        events.raw
    );
    for secret in [FIRST, SECOND, pin.as_str()] {
        assert!(
            !everything.contains(secret),
            "{secret:?} leaked: {everything}"
        );
    }
    work.assert_agent_output_lacks(&[FIRST, SECOND, &pin]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_vm_is_collected_reset_to_the_skeleton_and_handed_out_clean() {
    let work = Workdir::new();
    let (home, skel) = (work.path("home"), work.path("skel"));
    std::fs::create_dir_all(home.join(".config/chrome-remote-desktop")).unwrap();
    std::fs::write(home.join(".config/chrome-remote-desktop/host#1.json"), "{}").unwrap();
    std::fs::create_dir_all(skel.join(".config")).unwrap();
    std::fs::write(skel.join(".bashrc"), "# the image's bashrc\n").unwrap();
    std::fs::write(skel.join(".config/user-dirs.conf"), "enabled=False\n").unwrap();
    // The set-up clones a tutorial into the home; a reset puts it back.
    let tutorial = work.path("tutorial");
    git_repo(&tutorial, "README.md", "the tutorial\n");
    let config = AllocatorConfig {
        reuse: Reuse::Reset,
        ..AllocatorConfig::default()
    };
    let (rig, hostname) = one_vm(
        &work,
        config,
        &[
            ("LABLINK_RESET_HOME", home.to_str().unwrap()),
            ("LABLINK_RESET_SKELETON", skel.to_str().unwrap()),
            ("LABLINK_RESET_END_SESSION", "true"),
            ("LABLINK_DESKTOP_HOME", home.to_str().unwrap()),
            ("TUTORIAL_REPO_TO_CLONE", tutorial.to_str().unwrap()),
        ],
        Some(&home),
    )
    .await;
    assert!(
        home.join("tutorial/README.md").is_file(),
        "the set-up cloned the tutorial"
    );

    // The first participant works: their file lands in the home.
    let ada = Participant::new("ada@example.org");
    let (granted, _) = ada.get_vm(&rig, "4/0AbAda-code_1").await;
    assert_eq!(granted, hostname);
    ada.status_stream(&rig).await.until("ready").await;
    std::fs::create_dir_all(home.join("work/nested")).unwrap();
    std::fs::write(home.join("work/nested/labels.slp"), "ada's labels").unwrap();
    std::fs::write(home.join(".bash_history"), "ada's commands").unwrap();

    // Released: collected first, then `resetting` until its agent reset it.
    let view = admin_release(&rig, &hostname).await;
    assert_eq!(view["state"], "resetting", "{view}");
    rig.wait_for_vms("the VM to be available again", 1, |vm| {
        vm["state"] == "available"
    })
    .await;
    let mut fresh = tree(&home);
    let cloned: Vec<String> = fresh
        .keys()
        .filter(|k| *k == "tutorial" || k.starts_with("tutorial/"))
        .cloned()
        .collect();
    assert_eq!(
        fresh.get("tutorial/README.md").map(String::as_str),
        Some("the tutorial\n"),
        "the tutorial was cloned again"
    );
    for k in cloned {
        fresh.remove(&k);
    }
    assert_eq!(
        fresh,
        tree(&skel),
        "the home holds exactly the skeleton and the tutorial"
    );
    let collections = rig.admin_get("/api/v1/collections").await;
    let ours = collections
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["hostname"] == hostname.as_str())
        .unwrap_or_else(|| panic!("no collection of {hostname}: {collections}"));
    assert_eq!(ours["current"]["state"], "complete", "{ours}");
    let r = rig
        .client
        .get(rig.url("/api/v1/collections.zip"))
        .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let bytes = r.bytes().await.unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    let mut collected = String::new();
    zip.by_name(&format!("{hostname}/work/nested/labels.slp"))
        .expect("the participant's file was collected before the reset")
        .read_to_string(&mut collected)
        .unwrap();
    assert_eq!(collected, "ada's labels");
    let log = agent_log(&rig, &hostname).await;
    for line in [
        "the allocator asked for a reset",
        "desktop session ended (`true`)",
        "restored from",
        "reset done; waiting for an assignment",
    ] {
        assert!(log.contains(line), "{line:?} not in {log}");
    }

    // The next participant gets the same VM (the only one), as a fresh assignment.
    let grace = Participant::new("grace@example.org");
    let (again, _) = grace.get_vm(&rig, "4/0AbGrace-code_2").await;
    assert_eq!(again, hostname);
    let statuses = grace.status_stream(&rig).await.until("ready").await;
    for status in &statuses {
        assert_eq!(status["attempt"], 1, "{status}");
        assert_ne!(status["stage"], "failed", "{status}");
    }
    let runs = wait_until(
        "start-host for the second participant",
        PATIENCE,
        || async {
            let runs = work.read(&format!("{hostname}.runs")).unwrap_or_default();
            (runs.lines().count() == 2).then_some(runs)
        },
    )
    .await;
    assert_eq!(runs.lines().count(), 2);
    let argv = work.read(&format!("{hostname}.argv")).unwrap();
    assert!(argv.contains("--code=4/0AbGrace-code_2"), "{argv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_reset_failed_is_never_handed_out_again() {
    let work = Workdir::new();
    let (home, skel) = (work.path("home"), work.path("skel"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&skel).unwrap();
    std::fs::write(skel.join(".bashrc"), "# bashrc\n").unwrap();
    let end_session = work.path("end-session");
    script(&end_session, "echo 'cannot end the session' >&2\nexit 2");
    let config = AllocatorConfig {
        reuse: Reuse::Reset,
        ..AllocatorConfig::default()
    };
    let (rig, hostname) = one_vm(
        &work,
        config,
        &[
            ("LABLINK_RESET_HOME", home.to_str().unwrap()),
            ("LABLINK_RESET_SKELETON", skel.to_str().unwrap()),
            ("LABLINK_RESET_END_SESSION", end_session.to_str().unwrap()),
        ],
        None,
    )
    .await;
    let ada = Participant::new("ada@example.org");
    ada.get_vm(&rig, "4/0AbAda-code_1").await;
    std::fs::write(home.join("labels.slp"), "ada's labels").unwrap();
    let view = admin_release(&rig, &hostname).await;
    assert_eq!(view["state"], "resetting", "{view}");
    rig.wait_for_vms("the VM to fail its reset", 1, |vm| vm["state"] == "failed")
        .await;
    let log = agent_log(&rig, &hostname).await;
    assert!(
        log.contains("reset failed: ending the desktop session failed")
            && log.contains("exited with status 2: cannot end the session"),
        "{log}"
    );
    assert!(
        home.join("labels.slp").exists(),
        "a reset that failed before the home left it as it was"
    );
    let grace = Participant::new("grace@example.org");
    let (status, body) = grace.request_vm(&rig, "4/0AbGrace-code_2").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}
