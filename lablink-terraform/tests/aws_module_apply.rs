//! The shipped AWS client-VM module applied for real: the `terraform` binary, the
//! `hashicorp/aws` provider from the machine's filesystem mirror, and the AWS API emulator
//! (`moto_server`, reached through `LABLINK_AWS_TEST_ENDPOINT`, as `scripts/with-moto.sh`
//! sets it). Under the allocator, a launch creates instances that carry the tags and the
//! user data the provisioner's contract promises (each its own hostname and token); a
//! destroy of one terminates that one only, a destroy of all leaves nothing. What the
//! emulator holds is read with boto3 (installed with moto), not through Terraform.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::lablink;
use lablink_core::{
    Allocator, AllocatorExt, DestroyTarget, Hostname, MemoryVmStore, OperationStatus, VmFilter,
};
use lablink_terraform::TerraformConfig;
use serde_json::{json, Value};

const PATIENCE: Duration = Duration::from_secs(300);

/// The deployment's instances: hostname => state, type, tags, decoded user data.
fn instances(deployment: &str) -> Value {
    common::emulator(
        "out = {}\n\
         pages = ec2.describe_instances(Filters=[{'Name': 'tag:deployment', 'Values': [arg]}])\n\
         for r in pages['Reservations']:\n\
         \x20   for i in r['Instances']:\n\
         \x20       tags = {t['Key']: t['Value'] for t in i.get('Tags', [])}\n\
         \x20       ud = ec2.describe_instance_attribute(InstanceId=i['InstanceId'], Attribute='userData')\n\
         \x20       raw = base64.b64decode(ud.get('UserData', {}).get('Value', ''))\n\
         \x20       text = gzip.decompress(raw).decode() if raw[:2] == b'\\x1f\\x8b' else raw.decode()\n\
         \x20       out.setdefault(tags.get('Name', '?'), []).append(dict(id=i['InstanceId'], state=i['State']['Name'],\n\
         \x20           type=i['InstanceType'], tags=tags, user_data=text,\n\
         \x20           groups=[g['GroupId'] for g in i.get('SecurityGroups', [])],\n\
         \x20           profile=i.get('IamInstanceProfile', {}).get('Arn', '')))\n\
         print(json.dumps(out))",
        deployment,
    )
}

fn ami() -> String {
    common::emulator(
        "print(json.dumps(ec2.describe_images(Owners=['amazon'])['Images'][0]['ImageId']))",
        "",
    )
    .as_str()
    .unwrap()
    .to_owned()
}

fn b64(text: &str) -> String {
    let out = Command::new("base64")
        .args(["-w0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_module_creates_tags_and_destroys_real_instances() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let deployment = format!("tfapply{}", std::process::id());
    let config = aws_config(dir.path(), &work, &deployment);
    assert_eq!(config.host_problems(), Vec::<String>::new());
    let store = MemoryVmStore::default();
    let lablink = lablink(&store, Arc::new(config.builder().build().unwrap()));

    let op = lablink.launch_and_wait(3, PATIENCE).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    let records = lablink.vms(&VmFilter::default()).await.unwrap();
    let created = instances(&deployment);
    assert_eq!(created.as_object().unwrap().len(), 3, "{created:#}");
    for record in &records {
        let name = record.hostname.as_str();
        let instance = &created[name][0];
        assert_eq!(instance["state"], "running", "{instance:#}");
        assert_eq!(instance["type"], "t3.medium");
        assert_eq!(
            Some(instance["id"].as_str().unwrap()),
            record.instance_id.as_ref().map(|id| id.as_str()),
            "the allocator's record names the instance"
        );
        let tags = &instance["tags"];
        assert_eq!(tags["hostname"], name);
        assert_eq!(tags["deployment"], deployment.as_str());
        assert_eq!(tags["ManagedBy"], "lablink-terraform");
        assert!(
            tags["LaunchRequestedAt"].as_str().unwrap().ends_with('Z'),
            "{tags}"
        );
        assert!(
            instance["profile"]
                .as_str()
                .unwrap()
                .contains("instance-profile"),
            "{instance:#}"
        );
        assert_eq!(
            instance["groups"].as_array().unwrap().len(),
            1,
            "{instance:#}"
        );
        // Its own row (hostname and token, base64-encoded), and the allocator's URL.
        let user_data = instance["user_data"].as_str().unwrap();
        let own = token(&work, &record.hostname);
        assert!(
            user_data.contains(&format!("\n0 {name} {}\n", b64(&own))),
            "{name}'s row is not in its user data"
        );
        assert!(user_data.contains(&b64("https://lablink.example.org")));
        for other in records.iter().filter(|r| r.hostname != record.hostname) {
            let theirs = token(&work, &other.hostname);
            assert!(
                !user_data.contains(&b64(&theirs)),
                "{name} holds another VM's token"
            );
        }
    }
    // The shared security group lets everything out and nothing in (no SSH CIDRs given).
    let group = common::emulator(
        "g = ec2.describe_security_groups(Filters=[{'Name': 'group-name', 'Values': [arg + '-lablink-client-sg']}])['SecurityGroups']\n\
         print(json.dumps(g))",
        &deployment,
    );
    assert_eq!(group.as_array().unwrap().len(), 1, "{group:#}");
    assert_eq!(group[0]["IpPermissions"], json!([]), "{group:#}");
    assert_eq!(
        group[0]["IpPermissionsEgress"][0]["IpProtocol"], "-1",
        "{group:#}"
    );

    // Destroy one: only it terminates.
    let gone: Hostname = records[0].hostname.clone();
    let op = lablink
        .destroy(&DestroyTarget::Hostnames(vec![gone.clone()]))
        .await
        .unwrap();
    let op = lablink.wait_for_operation(op.id, PATIENCE).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    let after = instances(&deployment);
    for record in &records {
        let state = &after[record.hostname.as_str()][0]["state"];
        let expected = if record.hostname == gone {
            "terminated"
        } else {
            "running"
        };
        assert_eq!(state, expected, "{}: {after:#}", record.hostname);
    }

    // Destroy all: every instance terminated, and the shared resources are gone.
    let op = lablink.destroy(&DestroyTarget::All).await.unwrap();
    let op = lablink.wait_for_operation(op.id, PATIENCE).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    let after = instances(&deployment);
    for (name, runs) in after.as_object().unwrap() {
        for run in runs.as_array().unwrap() {
            assert_eq!(run["state"], "terminated", "{name}: {after:#}");
        }
    }
    let left = common::emulator(
        "g = ec2.describe_security_groups(Filters=[{'Name': 'group-name', 'Values': [arg + '-lablink-client-sg']}])['SecurityGroups']\n\
         p = [x['InstanceProfileName'] for x in iam.list_instance_profiles()['InstanceProfiles'] if x['InstanceProfileName'].startswith(arg)]\n\
         print(json.dumps(dict(groups=len(g), profiles=p)))",
        &deployment,
    );
    assert_eq!(left, json!({"groups": 0, "profiles": []}), "{left:#}");
}

/// The agent token the allocator gave `hostname`, from the provisioner's variables file
/// (the record of the desired VMs).
fn token(work: &Path, hostname: &Hostname) -> String {
    let text = std::fs::read_to_string(work.join("terraform.tfvars.json")).unwrap();
    let vars: Value = serde_json::from_str(&text).unwrap();
    vars["vms"][hostname.as_str()]["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token of {hostname} in {}", work.display()))
        .to_owned()
}

/// A configuration of the shipped module in `dir` (working directory `work`) against the
/// emulator: the provider from the mirror, dummy credentials.
fn aws_config(dir: &Path, work: &Path, deployment: &str) -> TerraformConfig {
    let mut config = TerraformConfig {
        working_dir: work.to_owned(),
        binary: common::terraform(),
        deployment: deployment.to_owned(),
        ..TerraformConfig::default()
    };
    for (name, value) in [
        ("allocator_url", json!("https://lablink.example.org")),
        ("region", json!("us-east-1")),
        ("client_ami_id", json!(ami())),
        ("machine_type", json!("t3.medium")),
    ] {
        config.variables.insert(name.into(), value);
    }
    for (name, value) in [
        (
            "TF_CLI_CONFIG_FILE",
            common::mirror_cli_config(dir).display().to_string(),
        ),
        ("AWS_ENDPOINT_URL", common::emulator_endpoint()),
        ("AWS_ACCESS_KEY_ID", "lablink-test".into()),
        ("AWS_SECRET_ACCESS_KEY", "lablink-test".into()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
    ] {
        config.env.insert(name.into(), value);
    }
    assert_eq!(config.host_problems(), Vec::<String>::new());
    config
}

/// Waits (in the emulator, up to `PATIENCE`) until the deployment has an instance that is not
/// terminated; the deployment's instances then (id => state).
fn first_instance(deployment: &str) -> Value {
    let script = format!(
        "import time\n\
         deadline = time.time() + {}\n\
         while True:\n\
         \x20   seen = {{}}\n\
         \x20   for r in ec2.describe_instances(Filters=[{{'Name': 'tag:deployment', 'Values': [arg]}}])['Reservations']:\n\
         \x20       for i in r['Instances']:\n\
         \x20           seen[i['InstanceId']] = i['State']['Name']\n\
         \x20   if any(s != 'terminated' for s in seen.values()) or time.time() > deadline:\n\
         \x20       break\n\
         \x20   time.sleep(0.1)\n\
         print(json.dumps(seen))",
        PATIENCE.as_secs()
    );
    common::emulator(&script, deployment)
}

/// The `terraform` processes running in `work` (their working directory), by pid.
fn terraform_processes(work: &Path) -> Vec<i32> {
    let work = work.canonicalize().unwrap();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let cwd = std::fs::read_link(entry.path().join("cwd"));
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if cwd.is_ok_and(|c| c == work) && comm.trim() == "terraform" {
            pids.push(pid);
        }
    }
    pids
}

/// hostname => [(instance id, state)] of the deployment's instances in the emulator.
fn states(deployment: &str) -> std::collections::BTreeMap<String, Vec<(String, String)>> {
    instances(deployment)
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, runs)| {
            let runs = runs.as_array().unwrap().iter().map(|run| {
                let field = |k: &str| run[k].as_str().unwrap().to_owned();
                (field("id"), field("state"))
            });
            (name.clone(), runs.collect())
        })
        .collect()
}

/// An apply of the shipped module stopped the way the provisioner stops one at its timeout
/// (SIGINT to terraform's process group: Terraform cancels the provider's waits, saves what
/// it created and releases its lock), at the moment the emulator has instances of the launch
/// but Terraform has not finished creating them. The allocator then loses its in-memory store
/// (a restart): a fresh `LabLink` on a wiped store, on the same working directory, reconciles.
/// Every instance that runs is then recorded with its id (adopted, per the default orphan
/// policy), the state is unlocked (a launch works; the interrupted instances it replaces are
/// terminated by the next reconcile), and a destroy of all leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_after_a_kill_in_the_middle_of_an_apply_leaves_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let deployment = format!("tfkill{}", std::process::id());
    let config = aws_config(dir.path(), &work, &deployment);
    let store = MemoryVmStore::default();
    let first = lablink(&store, Arc::new(config.builder().build().unwrap()));

    // Launch 3 and stop terraform as soon as the emulator has one of their instances: the
    // provider is then still waiting for them to run (it polls after a 10 s delay), so the
    // apply has not finished.
    let watch = {
        let deployment = deployment.clone();
        tokio::task::spawn_blocking(move || first_instance(&deployment))
    };
    let op = first
        .launch(&lablink_core::LaunchOptions { count: 3 })
        .await
        .unwrap();
    let seen = watch.await.unwrap();
    let stopped = terraform_processes(&work);
    for pid in &stopped {
        let group = nix::unistd::Pid::from_raw(*pid);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT);
    }
    assert!(
        seen.as_object()
            .unwrap()
            .values()
            .any(|s| s != "terminated"),
        "no instance was created within {PATIENCE:?}: {seen:#}"
    );
    assert!(
        !stopped.is_empty(),
        "no terraform was running in {} when the instances appeared",
        work.display()
    );
    let op = first.wait_for_operation(op.id, PATIENCE).await.unwrap();
    // The apply was cut short while the instances were being created: the state holds them
    // (tainted: their creation did not finish) but not the `end` marks that follow them.
    let tfstate: Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("terraform.tfstate")).unwrap())
            .unwrap();
    let objects = |kind: &str, name: &str| -> Vec<Value> {
        tfstate["resources"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["type"] == kind && r["name"] == name)
            .flat_map(|r| r["instances"].as_array().unwrap().clone())
            .collect()
    };
    let vms = objects("aws_instance", "vm");
    assert!(
        !vms.is_empty() && objects("terraform_data", "end").len() < vms.len(),
        "the apply finished before it was stopped: {op:?}"
    );
    assert!(
        !work.join(".terraform.tfstate.lock.info").exists(),
        "the stopped terraform left its state locked"
    );
    drop(first);

    // The allocator restarts with an empty store: reconcile on the same working directory.
    let wiped = MemoryVmStore::default();
    let second = lablink(&wiped, Arc::new(config.builder().build().unwrap()));
    let report = second.reconcile().await.unwrap();
    assert_eq!(report.errors, Vec::<String>::new(), "{report:?}");
    let records = second.vms(&VmFilter::default()).await.unwrap();
    let live = states(&deployment);
    let mut running = 0;
    for (name, runs) in &live {
        for (id, state) in runs.iter().filter(|(_, s)| s != "terminated") {
            running += 1;
            let record = records.iter().find(|r| r.hostname.as_str() == name);
            assert_eq!(
                record
                    .and_then(|r| r.instance_id.as_ref())
                    .map(|i| i.as_str()),
                Some(id.as_str()),
                "{name}'s instance {id} ({state}) has no record after reconcile: {report:?}, \
                 records {records:?}"
            );
        }
    }
    assert!(running > 0, "nothing ran after the interruption: {live:?}");
    assert_eq!(report.adopted.len(), running, "{report:?}");
    // Converged: a second reconcile finds nothing to do.
    let again = second.reconcile().await.unwrap();
    assert!(
        !again.changed_anything() && again.errors.is_empty(),
        "{again:?}"
    );

    // The state is not locked: a launch works (and does not reuse a running VM's name).
    let op = second.launch_and_wait(1, PATIENCE).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    assert!(
        !live.contains_key(op.hostnames[0].as_str()),
        "{op:?} reused a name of {live:?}"
    );
    // Terraform replaces the instances whose creation the interruption cut short (it marked
    // them tainted) at this next apply. Nobody can use a machine under a failed record's
    // name, so reconcile terminates the replacements: every running instance is again one
    // the allocator knows.
    let report = second.reconcile().await.unwrap();
    assert_eq!(report.errors, Vec::<String>::new(), "{report:?}");
    let records = second.vms(&VmFilter::default()).await.unwrap();
    let grown = states(&deployment);
    for (name, runs) in &grown {
        for (id, state) in runs.iter().filter(|(_, s)| s != "terminated") {
            let record = records.iter().find(|r| r.hostname.as_str() == name);
            assert_eq!(
                record
                    .and_then(|r| r.instance_id.as_ref())
                    .map(|i| i.as_str()),
                Some(id.as_str()),
                "{name}'s instance {id} ({state}) is an orphan after the next launch: \
                 {report:?}, records {records:?}"
            );
        }
    }

    // Destroy all: nothing is left running.
    let op = second.destroy(&DestroyTarget::All).await.unwrap();
    let op = second.wait_for_operation(op.id, PATIENCE).await.unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    let after = states(&deployment);
    for (name, runs) in &after {
        for (id, state) in runs {
            assert_eq!(state, "terminated", "{name} ({id}) survived: {after:?}");
        }
    }
    assert!(after.len() > live.len(), "{after:?}");
}
