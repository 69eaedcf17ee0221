//! End-to-end collections: real `lablink-agent` processes find participants' files and
//! upload them to a real allocator server, which stores them and hands the admin one zip.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lablink::collect::{CollectSettings, Collector};
use lablink::{
    AllocatorConfig, ArtifactStore, LabLink, LabLinkBuilder, LocalDirArtifactStore,
    LocalProcessProvisioner, OperationKind, SupervisorConfig,
};
use lablink_testkit::{
    agent_process, crd_command, free_addr, wait_until, Rig, Workdir, ADMIN_PASSWORD as PASSWORD,
    ADMIN_USER as ADMIN,
};
use reqwest::header::ACCEPT;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Bytes that differ per VM and per file.
fn content(hostname: &str, name: &str, len: usize) -> Vec<u8> {
    let seed = format!("{hostname}/{name}");
    (0..len)
        .map(|i| seed.as_bytes()[i % seed.len()].wrapping_add((i / seed.len()) as u8))
        .collect()
}

/// Where the files of `hostname` live: `<work>/vms/<hostname>`.
fn vm_dir(work: &Workdir, hostname: &str) -> PathBuf {
    work.path("vms").join(hostname)
}

/// Settings whose root is `<work>/vms/{hostname}/work`.
fn settings(work: &Workdir, max_vm_bytes: u64) -> CollectSettings {
    CollectSettings {
        roots: vec![format!(
            "{}/vms/{{hostname}}/work",
            work.dir.path().display()
        )],
        patterns: vec!["**/*.slp".into()],
        max_vm_bytes,
        max_total_bytes: 1 << 30,
        ..CollectSettings::default()
    }
}

/// A server whose collector collects before every destroy, waiting up to `wait_seconds`
/// for the uploads, with local agent processes as its VMs.
struct CollectFirst {
    work: Workdir,
    url: String,
    local: LocalProcessProvisioner,
    rig: Rig,
}

async fn collect_first(wait_seconds: u64, builder: LabLinkBuilder) -> CollectFirst {
    let work = Workdir::new();
    let addr = free_addr().await;
    let url = format!("http://{addr}");
    let local = work.provisioner(&url, &[]);
    let mut settings = settings(&work, 10_000);
    settings.destroy_collects_first = true;
    settings.destroy_wait_seconds = wait_seconds;
    let collector = Arc::new(Collector::new(
        Arc::new(LocalDirArtifactStore::new(work.path("artifacts"))),
        settings,
    ));
    let rig = Rig::start_with_collector(addr, builder, &local, collector).await;
    CollectFirst {
        work,
        url,
        local,
        rig,
    }
}

/// Writes a VM's files: matching ones in nested folders (returned: path in the VM's
/// folder → content), non-matching ones, a symlink to a file outside the root, a symlink to
/// a directory outside the root, and one matching file over `limit`.
fn populate(work: &Workdir, hostname: &str, limit: usize) -> BTreeMap<String, Vec<u8>> {
    let base = vm_dir(work, hostname);
    let root = base.join("work");
    let mut expected = BTreeMap::new();
    for (name, len) in [
        ("top.slp", 3000),
        ("a/b/c/deep.slp", 2000),
        ("a/empty.slp", 0),
    ] {
        let bytes = content(hostname, name, len);
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        expected.insert(name.to_owned(), bytes);
    }
    std::fs::write(root.join("a/notes.txt"), b"not collected").unwrap();
    std::fs::write(root.join("a/b/labels.slp.bak"), b"not collected").unwrap();
    std::fs::create_dir_all(root.join("big")).unwrap();
    std::fs::write(root.join("big/huge.slp"), vec![1u8; limit + 1]).unwrap();
    std::fs::write(base.join("secret.slp"), b"outside the root").unwrap();
    std::os::unix::fs::symlink(base.join("secret.slp"), root.join("a/link.slp")).unwrap();
    std::fs::create_dir_all(base.join("elsewhere")).unwrap();
    std::fs::write(base.join("elsewhere/hidden.slp"), b"outside the root").unwrap();
    std::os::unix::fs::symlink(base.join("elsewhere"), root.join("dirlink")).unwrap();
    expected
}

async fn admin_post(rig: &Rig, path: &str, body: Value) -> (StatusCode, Value) {
    let r = rig
        .client
        .post(rig.url(path))
        .basic_auth(ADMIN, Some(PASSWORD))
        .header(ACCEPT, "application/json")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until every collection in the admin's list is `complete` (panics on `failed`).
async fn wait_complete(rig: &Rig, hostnames: &[String]) -> Vec<Value> {
    wait_until(
        "every collection to complete",
        Duration::from_secs(60),
        || async {
            let list = rig.admin_get("/api/v1/collections").await;
            let list = list.as_array().unwrap().clone();
            for vm in &list {
                assert_ne!(vm["current"]["state"], "failed", "{vm:#}");
            }
            let done = hostnames.iter().all(|h| {
                list.iter()
                    .any(|vm| vm["hostname"] == h.as_str() && vm["current"]["state"] == "complete")
            });
            done.then_some(list)
        },
    )
    .await
}

/// Downloads `path` as the admin: the file name and the zip's entries by name.
async fn download(rig: &Rig, path: &str) -> (String, BTreeMap<String, Vec<u8>>) {
    let r = rig
        .client
        .get(rig.url(path))
        .basic_auth(ADMIN, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "GET {path}");
    assert_eq!(r.headers()["content-type"], "application/zip");
    let disposition = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    let bytes = r.bytes().await.unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    let mut entries = BTreeMap::new();
    for i in 0..zip.len() {
        let mut file = zip.by_index(i).unwrap();
        let mut data = Vec::new();
        file.read_to_end(&mut data).unwrap();
        assert!(
            entries.insert(file.name().to_owned(), data).is_none(),
            "duplicate entry {}",
            file.name()
        );
    }
    (disposition, entries)
}

/// The zip holds exactly `expected` per VM (byte-identical) plus the report.
fn assert_zip_holds(
    entries: &BTreeMap<String, Vec<u8>>,
    expected: &BTreeMap<String, BTreeMap<String, Vec<u8>>>,
) {
    let mut want: Vec<String> = expected
        .iter()
        .flat_map(|(h, files)| files.keys().map(move |f| format!("{h}/{f}")))
        .collect();
    want.push("_collection_report.json".into());
    want.sort();
    let got: Vec<String> = entries.keys().cloned().collect();
    assert_eq!(got, want, "the zip holds exactly the matching files");
    for (hostname, files) in expected {
        for (name, bytes) in files {
            let got = &entries[&format!("{hostname}/{name}")];
            assert_eq!(sha(got), sha(bytes), "{hostname}/{name} is byte-identical");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zip_holds_exactly_the_matching_files_per_vm_and_reports_what_was_skipped() {
    let work = Workdir::new();
    let addr = free_addr().await;
    let local = work.provisioner(&format!("http://{addr}"), &[]);
    let limit = 10_000;
    let collector = Arc::new(Collector::new(
        Arc::new(LocalDirArtifactStore::new(work.path("artifacts"))),
        settings(&work, limit),
    ));
    let rig = Rig::start_with_collector(addr, LabLink::builder(), &local, collector).await;
    let hostnames = rig.launch(2).await;
    let mut expected = BTreeMap::new();
    for h in &hostnames {
        expected.insert(h.clone(), populate(&work, h, limit as usize));
    }
    rig.wait_for_vms("agents to register", 2, |vm| vm["state"] == "available")
        .await;

    let (status, body) = admin_post(&rig, "/api/v1/collections", json!({"all": true})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body.as_array().unwrap().len(), 2);
    let list = wait_complete(&rig, &hostnames).await;
    for vm in &list {
        assert_eq!(vm["current"]["files"], 3, "{vm:#}");
        assert_eq!(vm["current"]["skipped"], 2, "{vm:#}");
    }

    let (disposition, entries) = download(&rig, "/api/v1/collections.zip").await;
    assert!(
        disposition.starts_with("attachment; filename=\"lablink_data_")
            && disposition.ends_with(".zip\""),
        "{disposition}"
    );
    assert_zip_holds(&entries, &expected);
    let report: Value = serde_json::from_slice(&entries["_collection_report.json"]).unwrap();
    for vm in report["vms"].as_array().unwrap() {
        let skipped: BTreeMap<String, String> = vm["collected"]["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let path = s["path"].as_str().unwrap();
                let name = Path::new(path).file_name().unwrap().to_str().unwrap();
                (name.to_owned(), s["reason"].as_str().unwrap().to_owned())
            })
            .collect();
        assert_eq!(skipped.len(), 2, "{vm:#}");
        assert!(skipped["link.slp"].contains("symbolic link"), "{skipped:?}");
        assert!(
            skipped["huge.slp"].contains("over the size limit"),
            "{skipped:?}"
        );
    }

    // The Python LabLink's route gives the same zip.
    let (_, old) = download(&rig, "/api/scp-client").await;
    assert_zip_holds(&old, &expected);
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auth_or_with_another_vms_token_nobody_uploads_or_downloads_a_vms_data() {
    let work = Workdir::new();
    let addr = free_addr().await;
    let url = format!("http://{addr}");
    let local = work.provisioner(&url, &[]);
    let collector = Arc::new(Collector::new(
        Arc::new(LocalDirArtifactStore::new(work.path("artifacts"))),
        settings(&work, 10_000),
    ));
    let rig = Rig::start_with_collector(addr, LabLink::builder(), &local, collector.clone()).await;
    let hostnames = rig.launch(2).await;
    let mut expected = BTreeMap::new();
    for h in &hostnames {
        expected.insert(h.clone(), populate(&work, h, 10_000));
    }
    rig.wait_for_vms("agents to register", 2, |vm| vm["state"] == "available")
        .await;
    let (vm1, vm2) = (&hostnames[0], &hostnames[1]);
    let (_, token2) = agent_process(vm2, &url).expect("the agent process of the second VM");
    assert!(!token2.is_empty());
    // A pending collection of vm1, so its id is real.
    let (status, body) = admin_post(&rig, "/api/v1/collections", json!({"hostnames": [vm1]})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body[0]["id"].as_str().unwrap().to_owned();
    let c = &rig.client;
    let tasks = rig.url(&format!("/api/v1/vms/{vm1}/tasks?timeout=0"));
    let upload = rig.url(&format!("/api/v1/vms/{vm1}/collections/{id}"));

    let r = c.get(&tasks).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c.get(&tasks).bearer_auth(&token2).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = c.put(&upload).body("junk").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c
        .put(&upload)
        .bearer_auth(&token2)
        .body("junk")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
    let r = c
        .put(&upload)
        .bearer_auth("not-a-token")
        .body("junk")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // vm2's token on its own URL with vm1's collection id: not vm2's collection.
    let r = c
        .put(rig.url(&format!("/api/v1/vms/{vm2}/collections/{id}")))
        .bearer_auth(&token2)
        .body("junk")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // The real agent still completes it: nothing above was stored. vm1's stored collection
    // is its agent's files, byte for byte, and vm2 has none.
    wait_complete(&rig, std::slice::from_ref(vm1)).await;
    let manifest = collector
        .manifest(vm1)
        .await
        .unwrap()
        .expect("vm1's manifest");
    assert_eq!(manifest.id, id);
    let stored: BTreeMap<String, String> = manifest
        .files
        .iter()
        .map(|f| (f.path.clone(), f.sha256.clone()))
        .collect();
    let real: BTreeMap<String, String> = expected[vm1]
        .iter()
        .map(|(path, bytes)| (path.clone(), sha(bytes)))
        .collect();
    assert_eq!(stored, real);
    let (_, entries) = download(&rig, "/api/v1/collections.zip").await;
    assert_zip_holds(
        &entries,
        &BTreeMap::from([(vm1.clone(), expected[vm1].clone())]),
    );
    let keys = collector.store().list("collections/").await.unwrap();
    assert!(
        keys.iter()
            .all(|a| !a.key.starts_with(&format!("collections/{vm2}/"))),
        "{keys:?}"
    );

    // Downloads and status are for admins only: no auth, an agent token, a wrong password.
    for path in [
        "/api/v1/collections.zip",
        "/api/scp-client",
        "/api/v1/collections",
        &format!("/api/v1/collections/{vm1}"),
    ] {
        let r = c
            .get(rig.url(path))
            .header(ACCEPT, "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "GET {path} without auth"
        );
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].is_string(), "{body}");
        let r = c
            .get(rig.url(path))
            .header(ACCEPT, "application/json")
            .bearer_auth(&token2)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "GET {path} with a VM token"
        );
        let r = c
            .get(rig.url(path))
            .header(ACCEPT, "application/json")
            .basic_auth(ADMIN, Some("wrong password"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "GET {path} with a wrong password"
        );
    }
    // Starting collections is for admins too; bad input is a 4xx.
    let r = c
        .post(rig.url("/api/v1/collections"))
        .bearer_auth(&token2)
        .header(ACCEPT, "application/json")
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for bad in [
        json!({}),
        json!({"all": 3}),
        json!({"hostnames": ["no such vm"]}),
        json!({"hostnames": ["ghost-vm"]}),
    ] {
        let (status, body) = admin_post(&rig, "/api/v1/collections", bad.clone()).await;
        assert!(status.is_client_error(), "{bad} → {status}");
        assert!(body["error"].is_string(), "{body}");
    }
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_collects_first_and_a_failed_collection_keeps_the_vm_unless_forced() {
    let CollectFirst {
        work,
        url,
        local,
        rig,
    } = collect_first(6, LabLink::builder()).await;
    let hostnames = rig.launch(2).await;
    let mut expected = BTreeMap::new();
    for h in &hostnames {
        expected.insert(h.clone(), populate(&work, h, 10_000));
    }
    rig.wait_for_vms("agents to register", 2, |vm| vm["state"] == "available")
        .await;
    let (alive, dead) = (&hostnames[0], &hostnames[1]);
    // The second VM's agent dies: its collection cannot succeed.
    let (pid, _) = agent_process(dead, &url).expect("the agent process of the second VM");
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let (status, body) = admin_post(&rig, "/api/v1/destroy", json!({"all": true})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains(dead.as_str()),
        "{body}"
    );
    assert_eq!(body["blocked"].as_object().unwrap().len(), 1, "{body}");
    assert!(body["blocked"][dead.as_str()].is_string(), "{body}");
    assert!(
        body["operation"]["id"].is_string(),
        "the live VM is destroyed: {body}"
    );

    // The live VM was collected before it was destroyed (and destroyed VMs leave the list);
    // the dead one is kept.
    let vms = rig
        .wait_for_vms("the collected VM to be destroyed", 1, |vm| {
            vm["hostname"] == dead.as_str()
        })
        .await;
    assert_ne!(vms[0]["state"], "terminating", "{:#}", vms[0]);
    let (_, entries) = download(&rig, "/api/v1/collections.zip").await;
    let only_alive: BTreeMap<_, _> = expected
        .iter()
        .filter(|(h, _)| *h == alive)
        .map(|(h, f)| (h.clone(), f.clone()))
        .collect();
    assert_zip_holds(&entries, &only_alive);
    let report: Value = serde_json::from_slice(&entries["_collection_report.json"]).unwrap();
    let failed = report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["hostname"] == dead.as_str())
        .unwrap();
    assert_eq!(failed["current"]["state"], "failed", "{failed:#}");

    // Forced, the failed VM is destroyed too, at once: no new collection is started for its
    // dead agent (one would hold the request for destroy_wait_seconds).
    let (status, body) = admin_post(
        &rig,
        "/api/v1/destroy",
        json!({"hostnames": [dead], "force": true}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    rig.wait_for_vms("every VM to be destroyed", 0, |_| true)
        .await;
    let (_, entries) = download(&rig, "/api/v1/collections.zip").await;
    let report: Value = serde_json::from_slice(&entries["_collection_report.json"]).unwrap();
    let after = report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["hostname"] == dead.as_str())
        .expect("the dead VM's collection is still reported");
    assert_eq!(
        after["current"], failed["current"],
        "a forced destroy started another collection"
    );
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroying_all_leaves_a_vm_launched_while_it_collects() {
    // The destroy's wait must outlast the steps below on a loaded machine: were it to run
    // out, the destroy would go ahead and destroy the other VM itself. The paused agent is
    // resumed at the end, so a long wait costs nothing.
    let CollectFirst {
        work,
        url,
        local,
        rig,
    } = collect_first(600, LabLink::builder()).await;
    let vms = rig.launch(2).await;
    let (old, gone) = (&vms[0], &vms[1]);
    for h in &vms {
        populate(&work, h, 10_000);
    }
    rig.wait_for_vms("the agents to register", 2, |vm| vm["state"] == "available")
        .await;
    // The first agent is paused, so the destroy waits for its collection; meanwhile the
    // second VM is destroyed by someone else and a new VM is launched.
    let (pid, _) = agent_process(old, &url).expect("the agent process");
    let signal = |name: &str| {
        let sent = std::process::Command::new("kill")
            .args([name, &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {name}");
    };
    signal("-STOP");
    wait_until("the agent to stop", Duration::from_secs(10), || async {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains("stopped"))
            .then_some(())
    })
    .await;
    let destroy = admin_post(&rig, "/api/v1/destroy", json!({"all": true}));
    let meanwhile = async {
        // The destroy has listed the VMs once it asked for their collections.
        wait_until(
            "the destroy to ask for a collection",
            Duration::from_secs(60),
            || async {
                let list = rig.admin_get("/api/v1/collections").await;
                list.as_array()
                    .unwrap()
                    .iter()
                    .any(|vm| vm["hostname"] == old.as_str() && vm["current"]["state"].is_string())
                    .then_some(())
            },
        )
        .await;
        let (status, body) = admin_post(
            &rig,
            "/api/v1/destroy",
            json!({"hostnames": [gone], "force": true}),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        rig.wait_for_vms("the other VM to be gone", 1, |vm| {
            vm["hostname"] == old.as_str()
        })
        .await;
        let new = rig.launch(1).await.remove(0);
        signal("-CONT");
        new
    };
    let ((status, body), new) = tokio::join!(destroy, meanwhile);
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["hostnames"], json!([old]), "{body}");
    let vms = rig
        .wait_for_vms("the collected VM to be destroyed", 1, |vm| {
            vm["hostname"] == new.as_str()
        })
        .await;
    assert_ne!(vms[0]["state"], "terminating", "{:#}", vms[0]);
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_destruction_collects_every_vm_before_destroying_it() {
    // The end of the workshop is already due; the supervisor starts once the VMs are up.
    let mut supervisor = SupervisorConfig {
        tick: Duration::from_millis(200),
        leader_lease: Duration::from_secs(5),
        ..SupervisorConfig::default()
    };
    supervisor.destruction.at = Some(chrono::Utc::now());
    let builder = LabLink::builder().with_config(AllocatorConfig {
        supervisor,
        ..AllocatorConfig::default()
    });
    let CollectFirst {
        work, local, rig, ..
    } = collect_first(60, builder).await;
    let hostnames = rig.launch(2).await;
    let mut expected = BTreeMap::new();
    for h in &hostnames {
        expected.insert(h.clone(), populate(&work, h, 10_000));
    }
    rig.wait_for_vms("agents to register", 2, |vm| vm["state"] == "available")
        .await;
    // One VM belongs to a participant.
    let (status, body) = rig
        .request_vm("ada@example.org", &crd_command("4/0AbCdEf"))
        .await;
    assert!(status.is_success(), "{body}");

    let running = rig.lablink.start_supervisor().unwrap();
    rig.wait_for_vms("the scheduled destruction", 0, |_| true)
        .await;
    running.stop().await;
    let (_, entries) = download(&rig, "/api/v1/collections.zip").await;
    assert_zip_holds(&entries, &expected);
    // Each VM's collection was stored before the destroy started.
    let destroys: Vec<_> = rig
        .allocator
        .operations(10)
        .await
        .unwrap()
        .into_iter()
        .filter(|op| op.kind == OperationKind::Destroy)
        .collect();
    assert!(!destroys.is_empty());
    let list = rig.admin_get("/api/v1/collections").await;
    for vm in list.as_array().unwrap() {
        let collected: chrono::DateTime<chrono::Utc> =
            serde_json::from_value(vm["collected"]["completed_at"].clone()).unwrap();
        let destroyed = destroys
            .iter()
            .filter(|op| op.hostnames.iter().any(|h| h.as_str() == vm["hostname"]))
            .map(|op| op.started_at)
            .min()
            .expect("a destroy of every VM");
        assert!(collected <= destroyed, "{vm:#}");
    }
    local.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_survives_an_allocator_restart_in_the_middle_of_its_upload() {
    let work = Workdir::new();
    let addr = free_addr().await;
    let local = work.provisioner(&format!("http://{addr}"), &[]);
    let big = 24 << 20;
    let store = || Arc::new(LocalDirArtifactStore::new(work.path("artifacts")));
    let collector = Arc::new(Collector::new(store(), settings(&work, 2 * big as u64)));
    let mut rig =
        Rig::start_with_collector(addr, LabLink::builder(), &local, collector.clone()).await;
    let hostnames = rig.launch(1).await;
    let h = hostnames[0].clone();
    let mut files = populate(&work, &h, 2 * big);
    // Large enough that the upload takes a while.
    let bytes = content(&h, "large.slp", big);
    std::fs::write(vm_dir(&work, &h).join("work/large.slp"), &bytes).unwrap();
    files.insert("large.slp".into(), bytes);
    rig.wait_for_vms("the agent to register", 1, |vm| vm["state"] == "available")
        .await;

    let (status, body) = admin_post(&rig, "/api/v1/collections", json!({"all": true})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // Kill the allocator while the upload is arriving.
    let mut caught = false;
    for _ in 0..10_000 {
        let now = collector.status(&h).await.unwrap().unwrap();
        assert_ne!(
            now.state,
            lablink::collect::CollectionState::Complete,
            "the upload finished before the allocator could be killed"
        );
        if now.state == lablink::collect::CollectionState::Uploading {
            tokio::time::sleep(Duration::from_millis(20)).await;
            rig.kill().await;
            caught = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(caught, "the upload never started");
    // Nothing partial was committed: no archive, no manifest.
    let store_now = store();
    let keys: Vec<String> = store_now
        .list("collections/")
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.key)
        .collect();
    assert_eq!(
        keys,
        [format!("collections/{h}/status.json")],
        "only the status is stored"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A new server process: it knows the collection only from the artifact store.
    let restarted = Arc::new(Collector::new(store(), settings(&work, 2 * big as u64)));
    rig.restart_with_collector(restarted.clone()).await;
    let list = wait_complete(&rig, &hostnames).await;
    assert!(
        list[0]["current"]["attempts"].as_u64().unwrap() >= 2,
        "{:#}",
        list[0]
    );
    let (_, entries) = download(&rig, "/api/v1/collections.zip").await;
    assert_zip_holds(&entries, &BTreeMap::from([(h.clone(), files)]));
    let tars: Vec<_> = restarted
        .store()
        .list(&format!("collections/{h}/"))
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.key.ends_with(".tar"))
        .collect();
    assert_eq!(tars.len(), 1, "one archive: {tars:?}");
    local.shutdown().await;
}
