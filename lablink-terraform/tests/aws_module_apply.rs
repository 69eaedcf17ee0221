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
    let mut config = TerraformConfig {
        working_dir: work.clone(),
        binary: common::terraform(),
        deployment: deployment.clone(),
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
            common::mirror_cli_config(dir.path()).display().to_string(),
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
