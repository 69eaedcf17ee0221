//! The allocator's own host (`deploy/aws`) deployed for real: the `terraform` binary, the
//! `hashicorp/aws` provider from the machine's filesystem mirror, and the AWS API emulator
//! (`moto_server`, reached through `LABLINK_AWS_TEST_ENDPOINT`, as `scripts/with-moto.sh`
//! sets it). What the emulator holds afterwards is read with boto3 (installed with moto),
//! not through Terraform. Each test works on a copy of the module in a temporary directory.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

const RELEASE_URL: &str =
    "https://downloads.example.org/lablink-0.9.0-x86_64-unknown-linux-gnu.tar.gz";
const RELEASE_SHA256: &str = "5f2b7c0e3d1a9e8b4c6d0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e";
const DB_PASSWORD: &str = "Pw-only-in-ssm-7731";
const CONFIG_SECRET: &str = "Cookie-only-in-ssm-5519";
/// A presigned-looking release URL: its user info and query must never be logged.
const SIGNED_RELEASE_URL: &str = "https://dl-user:pw-sentinel-41@downloads.example.org/lablink-0.9.0-x86_64-unknown-linux-gnu.tar.gz?X-Amz-Credential=AKIDEXAMPLE&X-Amz-Signature=sig-sentinel-93";

/// A working copy of `deploy/aws` (its .tf files and template) in a fresh temporary
/// directory, with a Terraform CLI configuration installing providers from the mirror only.
struct Deployment {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    cli_config: PathBuf,
}

impl Deployment {
    fn new(variables: Value) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("allocator");
        std::fs::create_dir(&dir).unwrap();
        let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/aws");
        let mut copied = 0;
        for entry in std::fs::read_dir(&module)
            .unwrap_or_else(|e| panic!("the deploy module {} is missing: {e}", module.display()))
        {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if name.ends_with(".tf") || name.ends_with(".tftpl") {
                std::fs::copy(&path, dir.join(&name)).unwrap();
                copied += 1;
            }
        }
        assert!(copied >= 3, "no module files in {}", module.display());
        std::fs::write(
            dir.join("terraform.tfvars.json"),
            serde_json::to_string_pretty(&variables).unwrap(),
        )
        .unwrap();

        let cli_config = common::mirror_cli_config(tmp.path());
        Self {
            _tmp: tmp,
            dir,
            cli_config,
        }
    }

    /// `terraform <args>` in the working copy against the emulator; its output.
    fn try_run(&self, args: &[&str]) -> std::process::Output {
        Command::new(common::terraform())
            .args(args)
            .current_dir(&self.dir)
            .env("TF_CLI_CONFIG_FILE", &self.cli_config)
            .env("TF_IN_AUTOMATION", "1")
            .env("AWS_ENDPOINT_URL", common::emulator_endpoint())
            .env("AWS_ACCESS_KEY_ID", "lablink-test")
            .env("AWS_SECRET_ACCESS_KEY", "lablink-test")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .output()
            .unwrap()
    }

    /// `terraform <args>`, which must succeed; its standard output.
    fn run(&self, args: &[&str]) -> String {
        let out = self.try_run(args);
        assert!(
            out.status.success(),
            "terraform {} failed:\n{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn init(&self) {
        self.run(&["init", "-input=false", "-no-color"]);
    }

    /// Plans into `plan.out`; the plan as JSON.
    fn plan(&self) -> Value {
        self.run(&["plan", "-input=false", "-no-color", "-out=plan.out"]);
        serde_json::from_str(&self.run(&["show", "-json", "-no-color", "plan.out"])).unwrap()
    }
}

/// An AMI the emulator knows and the default VPC's first subnet.
fn ami_and_subnet() -> (String, String) {
    let found = common::emulator(
        "img = ec2.describe_images(Owners=['amazon'])['Images'][0]['ImageId']\n\
         sub = ec2.describe_subnets(Filters=[{'Name': 'default-for-az', 'Values': ['true']}])['Subnets'][0]['SubnetId']\n\
         print(json.dumps([img, sub]))",
        "",
    );
    (
        found[0].as_str().unwrap().to_owned(),
        found[1].as_str().unwrap().to_owned(),
    )
}

/// Decodes `user_data_base64` (gzip) with python3, as the instance would.
fn gunzip_base64(encoded: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import base64, gzip, sys; sys.stdout.write(gzip.decompress(base64.b64decode(sys.argv[1])).decode())",
            encoded,
        ])
        .output()
        .expect("python3 is needed to decode the user data");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn b64(text: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import base64, sys; sys.stdout.write(base64.b64encode(sys.argv[1].encode()).decode())",
            text,
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Every action of every statement of a policy document.
fn actions(policy: &Value) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for statement in policy["Statement"].as_array().unwrap() {
        assert_eq!(statement["Effect"], "Allow", "{statement:#}");
        match &statement["Action"] {
            Value::String(a) => {
                all.insert(a.clone());
            }
            Value::Array(list) => all.extend(list.iter().map(|a| a.as_str().unwrap().to_owned())),
            other => panic!("unexpected Action {other}"),
        }
    }
    all
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// What the SSM parameter of `lablink_toml` holds for a deployment named `name`.
fn stored_config(name: &str, toml: &str) -> String {
    format!("# Written at boot by deploy/aws from the SSM parameter /{name}/allocator/lablink-toml.\n{toml}")
}

/// Every statement that allows an action on any resource without a condition only reads,
/// launches or creates: whatever changes or deletes is bound to the client deployment's tags.
fn assert_unconditional_statements_only_read_or_create(policy: &Value) {
    for s in policy["Statement"].as_array().unwrap() {
        if s["Resource"] != "*" || !s["Condition"].is_null() {
            continue;
        }
        for action in actions(&json!({"Statement": [s]})) {
            let name = action.strip_prefix("ec2:").unwrap_or(&action);
            assert!(
                name.starts_with("Describe")
                    || ["RunInstances", "CreateSecurityGroup", "ImportKeyPair"].contains(&name),
                "{action} is allowed on every resource without a condition: {s:#}"
            );
        }
    }
}

/// The ManagedBy value the provisioner's own source tags with (the policy must match it).
fn assert_source_tags_managed_by(file: &str, line: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let source = std::fs::read_to_string(&path).unwrap();
    assert!(
        source.contains(line),
        "{} no longer holds {line:?}: update deploy/aws/iam.tf and this test",
        path.display()
    );
}

/// The statement with `sid`.
fn statement<'a>(policy: &'a Value, sid: &str) -> &'a Value {
    policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == sid)
        .unwrap_or_else(|| panic!("no statement {sid} in {policy:#}"))
}

#[test]
fn the_allocator_host_gets_least_privilege_its_secrets_only_from_ssm_and_destroys_cleanly() {
    let (ami, subnet) = ami_and_subnet();
    let name = format!("llk{}", std::process::id());
    let domain = format!("{name}.lablink-test.example.org");
    let zone = common::emulator(
        "z = r53.create_hosted_zone(Name='lablink-test.example.org', CallerReference=arg)['HostedZone']['Id']\n\
         print(json.dumps(z.split('/')[-1]))",
        &name,
    );
    let client_role = "arn:aws:iam::123456789012:role/workshop-lablink-client-vm-role";
    let toml = format!(
        "[server]\nmetrics_token = \"t\"\ncookie_secret = \"{CONFIG_SECRET}\"\n\n[provisioner]\nkind = \"aws\"\n"
    );
    let deployment = Deployment::new(json!({
        "name": name,
        "region": "us-east-1",
        "ami": ami,
        "subnet_id": subnet,
        "provisioner": "aws",
        "client_role_arn": client_role,
        "artifact_bucket": "lablink-test-results",
        "artifact_prefix": "workshop/",
        "release_url": RELEASE_URL,
        "release_sha256": RELEASE_SHA256,
        "lablink_toml": toml,
        "database_url": format!("postgres://lablink:{DB_PASSWORD}@db.internal:5432/lablink"),
        "tls": "caddy",
        "domain_name": domain,
        "zone_id": zone,
    }));
    deployment.init();
    deployment.run(&["validate", "-no-color"]);
    // (The plan, like the state, holds the sensitive variables: only the user data is checked.)
    deployment.plan();
    deployment.run(&["apply", "-input=false", "-no-color", "plan.out"]);
    let outputs: Value =
        serde_json::from_str(&deployment.run(&["output", "-json", "-no-color"])).unwrap();
    let out = |key: &str| outputs[key]["value"].as_str().unwrap().to_owned();
    let instance_id = out("instance_id");
    let public_ip = out("public_ip");
    assert_eq!(out("url"), format!("https://{domain}"));
    assert_eq!(out("role_name"), format!("{name}-allocator"));

    let live = common::emulator(
        &format!(
            "i = ec2.describe_instances(InstanceIds=[{instance_id:?}])['Reservations'][0]['Instances'][0]\n\
             ud = ec2.describe_instance_attribute(InstanceId=i['InstanceId'], Attribute='userData')\n\
             raw = base64.b64decode(ud['UserData']['Value'])\n\
             sg = ec2.describe_security_groups(GroupIds=[{sg:?}])['SecurityGroups'][0]\n\
             addr = ec2.describe_addresses(PublicIps=[{public_ip:?}])['Addresses'][0]\n\
             role = arg + '-allocator'\n\
             inline = {{p: iam.get_role_policy(RoleName=role, PolicyName=p)['PolicyDocument'] for p in iam.list_role_policies(RoleName=role)['PolicyNames']}}\n\
             attached = iam.list_attached_role_policies(RoleName=role)['AttachedPolicies']\n\
             profile = i.get('IamInstanceProfile', {{}}).get('Arn', '')\n\
             records = r53.list_resource_record_sets(HostedZoneId={zone})['ResourceRecordSets']\n\
             a = [r for r in records if r['Type'] == 'A']\n\
             param = ssm.get_parameter(Name='/' + arg + '/allocator/database-url', WithDecryption=True)['Parameter']\n\
             config = ssm.get_parameter(Name='/' + arg + '/allocator/lablink-toml', WithDecryption=True)['Parameter']\n\
             print(json.dumps(dict(state=i['State']['Name'], type=i['InstanceType'],\n\
                 tags={{t['Key']: t['Value'] for t in i.get('Tags', [])}},\n\
                 groups=[g['GroupId'] for g in i['SecurityGroups']], profile=profile,\n\
                 tokens=i['MetadataOptions']['HttpTokens'],\n\
                 user_data=gzip.decompress(raw).decode(), ingress=sg['IpPermissions'],\n\
                 egress=sg['IpPermissionsEgress'], eip_instance=addr.get('InstanceId'),\n\
                 inline=inline, attached=attached, a=a,\n\
                 param=dict(type=param['Type'], value=param['Value']),\n\
                 config=dict(type=config['Type'], value=config['Value']))))",
            sg = out("security_group_id"),
        ),
        &name,
    );

    // The instance: its type, its tags, its role, IMDSv2 only.
    assert_eq!(live["state"], "running", "{live:#}");
    assert_eq!(live["type"], "t3.small");
    assert_eq!(live["tags"]["Name"], format!("{name}-allocator").as_str());
    assert_eq!(live["tags"]["deployment"], name.as_str());
    assert_eq!(live["tags"]["ManagedBy"], "lablink-deploy");
    assert_eq!(live["groups"], json!([out("security_group_id")]));
    assert!(
        live["profile"]
            .as_str()
            .unwrap()
            .ends_with(&format!("instance-profile/{name}-allocator")),
        "{live:#}"
    );
    assert_eq!(live["tokens"], "required");

    // The security group: 443 and 80 open, 22 closed (no ssh_cidr_blocks), all egress.
    let mut ports: Vec<(i64, Vec<String>)> = live["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rule| {
            assert_eq!(rule["IpProtocol"], "tcp", "{rule:#}");
            assert_eq!(rule["FromPort"], rule["ToPort"], "{rule:#}");
            let cidrs = rule["IpRanges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["CidrIp"].as_str().unwrap().to_owned())
                .collect();
            (rule["FromPort"].as_i64().unwrap(), cidrs)
        })
        .collect();
    ports.sort();
    let anywhere = vec!["0.0.0.0/0".to_owned()];
    assert_eq!(
        ports,
        vec![(80, anywhere.clone()), (443, anywhere)],
        "{live:#}"
    );
    assert_eq!(live["egress"][0]["IpProtocol"], "-1", "{live:#}");

    // The Elastic IP is the instance's, and the A record points at it.
    assert_eq!(live["eip_instance"], instance_id.as_str(), "{live:#}");
    let a = &live["a"];
    assert_eq!(a.as_array().unwrap().len(), 1, "{a:#}");
    assert_eq!(a[0]["Name"], format!("{domain}."), "{a:#}");
    assert_eq!(a[0]["ResourceRecords"][0]["Value"], public_ip.as_str());

    // The role holds one inline policy with exactly what the EC2 provisioner, the S3 artifact
    // store and the two parameters need; iam:PassRole only on the client role; reboots,
    // terminations and tags after launch only on the client deployment's instances.
    assert_eq!(live["attached"], json!([]), "{live:#}");
    let inline = live["inline"].as_object().unwrap();
    assert_eq!(inline.len(), 1, "{live:#}");
    let policy = inline.values().next().unwrap();
    assert_eq!(
        actions(policy),
        set(&[
            "ec2:CreateTags",
            "ec2:DescribeImages",
            "ec2:DescribeInstanceStatus",
            "ec2:DescribeInstances",
            "ec2:DescribeSecurityGroups",
            "ec2:DescribeSubnets",
            "ec2:RebootInstances",
            "ec2:RunInstances",
            "ec2:TerminateInstances",
            "iam:PassRole",
            "s3:AbortMultipartUpload",
            "s3:DeleteObject",
            "s3:GetObject",
            "s3:ListBucket",
            "s3:ListMultipartUploadParts",
            "s3:PutObject",
            "ssm:GetParameter",
        ]),
        "{policy:#}"
    );
    assert_eq!(statement(policy, "PassClientRole")["Resource"], client_role);
    let own = statement(policy, "Ec2OwnInstances");
    assert_eq!(
        actions(&json!({"Statement": [own]})),
        set(&[
            "ec2:CreateTags",
            "ec2:RebootInstances",
            "ec2:TerminateInstances"
        ])
    );
    // client_deployment defaults to name; lablink-aws tags ManagedBy = "lablink-aws".
    assert_eq!(
        own["Condition"],
        json!({"StringEquals": {
            "aws:ResourceTag/deployment": name,
            "aws:ResourceTag/ManagedBy": "lablink-aws",
        }}),
        "{own:#}"
    );
    assert_source_tags_managed_by(
        "../lablink-aws/src/provisioner.rs",
        "const MANAGED_BY: &str = \"lablink-aws\";",
    );
    let on_launch = statement(policy, "Ec2TagOnLaunch");
    assert_eq!(on_launch["Action"], "ec2:CreateTags");
    assert_eq!(
        on_launch["Condition"],
        json!({"StringEquals": {"ec2:CreateAction": ["RunInstances"]}})
    );
    assert_unconditional_statements_only_read_or_create(policy);
    assert!(statement(policy, "ConfigParameter")["Resource"]
        .as_str()
        .unwrap()
        .ends_with(&format!(":parameter/{name}/allocator/lablink-toml")));
    assert_eq!(
        statement(policy, "ArtifactObjects")["Resource"],
        "arn:aws:s3:::lablink-test-results/workshop/*"
    );
    assert_eq!(
        statement(policy, "ArtifactBucket")["Resource"],
        "arn:aws:s3:::lablink-test-results"
    );
    assert!(statement(policy, "DatabaseUrlParameter")["Resource"]
        .as_str()
        .unwrap()
        .ends_with(&format!(":parameter/{name}/allocator/database-url")));
    let output_policy: Value = serde_json::from_str(&out("allocator_policy_json")).unwrap();
    assert_eq!(&output_policy, policy, "the output is the attached policy");

    // The configuration and the database URL are in SSM only; the user data holds the
    // release and its checksum.
    assert_eq!(live["config"]["type"], "SecureString");
    assert_eq!(
        live["config"]["value"],
        stored_config(&name, &toml).as_str()
    );
    assert_eq!(live["param"]["type"], "SecureString");
    assert!(live["param"]["value"]
        .as_str()
        .unwrap()
        .contains(DB_PASSWORD));
    let user_data = live["user_data"].as_str().unwrap();
    assert!(user_data.starts_with("#!/bin/bash\n"), "{user_data}");
    assert!(user_data.contains(&b64(RELEASE_URL)), "{user_data}");
    assert!(
        user_data.contains(&format!("release_sha256='{RELEASE_SHA256}'")),
        "{user_data}"
    );
    assert!(user_data.contains("database='ssm'"), "{user_data}");
    assert!(user_data.contains("tls='caddy'"), "{user_data}");
    assert!(user_data.contains(&b64(&domain)), "{user_data}");
    for secret in [DB_PASSWORD.to_owned(), b64(DB_PASSWORD), b64("postgres://")] {
        assert!(
            !user_data.contains(&secret),
            "the user data holds the database URL ({secret})"
        );
    }
    for secret in [
        CONFIG_SECRET.to_owned(),
        b64(&toml),
        b64(&stored_config(&name, &toml)),
        "metrics_token".to_owned(),
    ] {
        assert!(
            !user_data.contains(&secret),
            "the user data holds lablink_toml ({secret})"
        );
    }
    assert!(
        Command::new("bash")
            .args(["-n", "-c", user_data])
            .status()
            .unwrap()
            .success(),
        "the user data is not valid bash"
    );

    // Destroy: nothing left (the instance terminated, the rest deleted).
    deployment.run(&["destroy", "-auto-approve", "-input=false", "-no-color"]);
    let left = common::emulator(
        &format!(
            "i = ec2.describe_instances(InstanceIds=[{instance_id:?}])['Reservations'][0]['Instances'][0]['State']['Name']\n\
             g = ec2.describe_security_groups(Filters=[{{'Name': 'group-name', 'Values': [arg + '-allocator-sg']}}])['SecurityGroups']\n\
             roles = [r['RoleName'] for r in iam.list_roles()['Roles'] if r['RoleName'].startswith(arg)]\n\
             profiles = [p['InstanceProfileName'] for p in iam.list_instance_profiles()['InstanceProfiles'] if p['InstanceProfileName'].startswith(arg)]\n\
             eips = [a['PublicIp'] for a in ec2.describe_addresses()['Addresses'] if a['PublicIp'] == {public_ip:?}]\n\
             params = ssm.describe_parameters(ParameterFilters=[{{'Key': 'Name', 'Option': 'BeginsWith', 'Values': ['/' + arg + '/']}}])['Parameters']\n\
             a = [r for r in r53.list_resource_record_sets(HostedZoneId={zone})['ResourceRecordSets'] if r['Type'] == 'A']\n\
             print(json.dumps(dict(instance=i, groups=len(g), roles=roles, profiles=profiles, eips=eips, params=len(params), a=len(a))))"
        ),
        &name,
    );
    assert_eq!(
        left,
        json!({"instance": "terminated", "groups": 0, "roles": [], "profiles": [], "eips": [], "params": 0, "a": 0}),
        "{left:#}"
    );
}

#[test]
fn the_terraform_provisioner_may_use_its_state_and_only_pass_client_roles() {
    let (ami, subnet) = ami_and_subnet();
    let deployment = Deployment::new(json!({
        "name": "llkplan",
        "region": "us-east-1",
        "ami": ami,
        "subnet_id": subnet,
        "provisioner": "terraform",
        "client_deployment": "workshop",
        "state_bucket": "lablink-test-state",
        "state_key": "lablink/workshop.tfstate",
        "release_url": SIGNED_RELEASE_URL,
        "release_sha256": RELEASE_SHA256,
        "lablink_toml": "[provisioner]\nkind = \"terraform\"\n",
        "tls": "builtin",
    }));
    deployment.init();
    let plan = deployment.plan();
    let policy: Value = serde_json::from_str(
        plan["planned_values"]["outputs"]["allocator_policy_json"]["value"]
            .as_str()
            .unwrap_or_else(|| panic!("the policy is not known at plan time: {plan:#}")),
    )
    .unwrap();

    let state = statement(&policy, "TerraformState");
    assert_eq!(
        actions(&json!({"Statement": [state]})),
        set(&["s3:DeleteObject", "s3:GetObject", "s3:PutObject"])
    );
    assert_eq!(
        state["Resource"],
        json!([
            "arn:aws:s3:::lablink-test-state/lablink/workshop.tfstate",
            "arn:aws:s3:::lablink-test-state/lablink/workshop.tfstate.tflock",
        ])
    );
    let bucket = statement(&policy, "TerraformStateBucket");
    assert_eq!(bucket["Action"], "s3:ListBucket");
    assert_eq!(bucket["Resource"], "arn:aws:s3:::lablink-test-state");

    // iam:* only on the client module's names of client_deployment; PassRole only to EC2.
    let pass = statement(&policy, "PassClientRole");
    assert_eq!(pass["Action"], "iam:PassRole");
    assert_eq!(
        pass["Resource"],
        "arn:aws:iam::123456789012:role/workshop-lablink-client-*"
    );
    assert_eq!(
        statement(&policy, "ClientModuleIam")["Resource"],
        json!([
            "arn:aws:iam::123456789012:role/workshop-lablink-client-*",
            "arn:aws:iam::123456789012:instance-profile/workshop-lablink-client-*",
        ])
    );
    assert_eq!(
        pass["Condition"]["StringEquals"]["iam:PassedToService"],
        "ec2.amazonaws.com"
    );
    for s in policy["Statement"].as_array().unwrap() {
        let acts = actions(&json!({"Statement": [s]}));
        if acts.iter().any(|a| a.starts_with("iam:")) {
            let resources: Vec<&str> = match &s["Resource"] {
                Value::String(r) => vec![r.as_str()],
                Value::Array(rs) => rs.iter().map(|r| r.as_str().unwrap()).collect(),
                other => panic!("{other}"),
            };
            for r in resources {
                assert!(r.ends_with("/workshop-lablink-client-*"), "{s:#}");
            }
        }
    }
    let all = actions(&policy);
    for needed in [
        "ec2:RunInstances",
        "ec2:CreateSecurityGroup",
        "ec2:ImportKeyPair",
    ] {
        assert!(all.contains(needed), "{needed} missing: {policy:#}");
    }
    assert!(
        !all.contains("s3:AbortMultipartUpload"),
        "artifact rights granted: {policy:#}"
    );

    // Changing and deleting EC2 resources: only those of the client deployment that the
    // shipped module made (ManagedBy = "lablink-terraform"), never the allocator's host.
    let own = statement(&policy, "ClientModuleOwnResources");
    let own_actions = actions(&json!({"Statement": [own]}));
    for destructive in [
        "ec2:CreateTags",
        "ec2:DeleteKeyPair",
        "ec2:DeleteSecurityGroup",
        "ec2:ModifyInstanceAttribute",
        "ec2:RebootInstances",
        "ec2:TerminateInstances",
    ] {
        assert!(own_actions.contains(destructive), "{destructive}: {own:#}");
    }
    assert_eq!(
        own["Condition"],
        json!({"StringEquals": {
            "aws:ResourceTag/deployment": "workshop",
            "aws:ResourceTag/ManagedBy": "lablink-terraform",
        }}),
        "{own:#}"
    );
    assert_source_tags_managed_by(
        "terraform/aws/main.tf",
        "ManagedBy  = \"lablink-terraform\"",
    );
    assert_eq!(
        statement(&policy, "ClientModuleTagOnCreate")["Condition"],
        json!({"StringEquals": {"ec2:CreateAction": ["CreateSecurityGroup", "ImportKeyPair", "RunInstances"]}})
    );
    assert_unconditional_statements_only_read_or_create(&policy);

    // ssm:GetParameter on the configuration's parameter only (no database_url given).
    let ssm: Vec<&Value> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| actions(&json!({"Statement": [s]})).contains("ssm:GetParameter"))
        .collect();
    assert_eq!(ssm.len(), 1, "{policy:#}");
    assert_eq!(ssm[0]["Sid"], "ConfigParameter");
    assert_eq!(
        ssm[0]["Resource"],
        "arn:aws:ssm:us-east-1:123456789012:parameter/llkplan/allocator/lablink-toml"
    );

    // No database URL: PostgreSQL on the host; the allocator serves TLS itself. The one
    // parameter holds lablink_toml as given (no [server.tls] table added to it).
    let resources = plan["planned_values"]["root_module"]["resources"]
        .as_array()
        .unwrap();
    assert!(
        !resources.iter().any(|r| r["type"] == "aws_route53_record"),
        "{resources:#?}"
    );
    let parameters: Vec<&Value> = resources
        .iter()
        .filter(|r| r["type"] == "aws_ssm_parameter")
        .collect();
    assert_eq!(parameters.len(), 1, "{parameters:#?}");
    let parameter = &parameters[0]["values"];
    assert_eq!(parameter["name"], "/llkplan/allocator/lablink-toml");
    assert_eq!(parameter["type"], "SecureString");
    assert_eq!(parameter["tier"], "Standard");
    assert_eq!(
        parameter["value"],
        stored_config("llkplan", "[provisioner]\nkind = \"terraform\"\n").as_str()
    );
    let instance = resources
        .iter()
        .find(|r| r["address"] == "aws_instance.allocator")
        .unwrap();
    let user_data = gunzip_base64(instance["values"]["user_data_base64"].as_str().unwrap());
    assert!(user_data.contains("database='local'"), "{user_data}");
    assert!(user_data.contains("tls='builtin'"), "{user_data}");
    // [server.tls] from LABLINK_SERVER__TLS__* variables in deploy.env, not in the file.
    assert!(
        !user_data
            .lines()
            .any(|l| l.contains("decode") && l.contains("lablink.toml")),
        "the user data writes lablink.toml itself: {user_data}"
    );
    for (variable, path) in [
        ("CERT_FILE=$tls_cert_file", "/etc/lablink/tls/fullchain.pem"),
        ("KEY_FILE=$tls_key_file", "/etc/lablink/tls/privkey.pem"),
    ] {
        assert!(
            user_data.contains(&format!("echo \"LABLINK_SERVER__TLS__{variable}\""))
                && user_data.contains(&b64(path)),
            "{user_data}"
        );
    }
    // The settings (the database URL) reach `lablink validate` through the environment,
    // never its command line.
    let validate = user_data
        .lines()
        .find(|l| l.contains("lablink validate"))
        .unwrap_or_else(|| panic!("no lablink validate in {user_data}"));
    assert!(
        validate.contains("runuser -u lablink -- /usr/local/bin/lablink validate")
            && !validate.contains("env ")
            && !validate.contains('$'),
        "{validate}"
    );

    // A download that is not the release stops the script before anything is installed,
    // with a clear line (apt-get and curl stubbed: this machine is not touched).
    let stubs = tempfile::tempdir().unwrap();
    let script = stubs.path().join("user_data.sh");
    std::fs::write(&script, &user_data).unwrap();
    for (name, body) in [
        ("apt-get", "exit 0"),
        (
            "curl",
            "while [ $# -gt 0 ]; do if [ \"$1\" = -o ]; then printf 'not the release' >\"$2\"; fi; shift; done",
        ),
    ] {
        let stub = stubs.path().join(name);
        std::fs::write(&stub, format!("#!/bin/sh\n{body}\n")).unwrap();
        Command::new("chmod").arg("+x").arg(&stub).status().unwrap();
    }
    let path = format!(
        "{}:{}",
        stubs.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = Command::new("bash")
        .arg(&script)
        .env("PATH", path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "lablink-deploy: FAILED: sha256 mismatch for {RELEASE_URL}: expected {RELEASE_SHA256}, got "
        )) && stderr.contains("nothing was installed"),
        "{stdout}{stderr}"
    );
    assert!(!stdout.contains("sha256 OK"), "{stdout}");
    // The log names the release as scheme://host/path: no user info, no signature.
    assert!(
        stdout.contains(&format!("lablink-deploy: downloading {RELEASE_URL}\n")),
        "{stdout}"
    );
    for secret in [
        "pw-sentinel-41",
        "dl-user",
        "sig-sentinel-93",
        "X-Amz-Credential",
    ] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "the log shows the release URL's {secret}: {stdout}{stderr}"
        );
    }
}

#[test]
fn bad_values_are_refused_before_anything_is_created() {
    let (ami, subnet) = ami_and_subnet();
    let base = json!({
        "name": "llkbad",
        "region": "us-east-1",
        "ami": ami,
        "subnet_id": subnet,
        "release_url": RELEASE_URL,
        "release_sha256": RELEASE_SHA256,
        "lablink_toml": "",
        "tls": "none",
    });
    for (change, complaint) in [
        (
            json!({"release_sha256": "abc"}),
            "release_sha256: 64 hexadecimal digits",
        ),
        (json!({"tls": "caddy"}), "tls = \"caddy\" needs domain_name"),
        (
            json!({"database_url": "postgres://u:p w@h/db"}),
            "database_url: a postgres:// URL",
        ),
        (
            json!({"domain_name": "x.org\n}"}),
            "domain_name: a lowercase DNS name",
        ),
        (
            json!({"tls_cert_file": "/etc/x\"\n[admin]"}),
            "tls_cert_file: an absolute path",
        ),
        (
            json!({"client_deployment": "*"}),
            "client_deployment: 1 to 64 letters",
        ),
        (
            json!({"lablink_toml": "#".repeat(8001)}),
            "lablink_toml: at most 8,000 bytes",
        ),
    ] {
        let mut vars = base.clone();
        for (k, v) in change.as_object().unwrap() {
            vars[k] = v.clone();
        }
        let deployment = Deployment::new(vars);
        deployment.init();
        let out = deployment.try_run(&["plan", "-input=false", "-no-color"]);
        let stderr = String::from_utf8_lossy(&out.stderr).replace('\n', " ");
        let stderr = stderr.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(!out.status.success(), "{change} was accepted");
        assert!(stderr.contains(complaint), "{change}: {stderr}");
    }
}

/// What every stand-in does first: one line `name [arg] [arg]...` in `$STUB_LOG/argv`.
const RECORD: &str =
    "{ printf '%s' \"${0##*/}\"; [ $# -eq 0 ] || printf ' [%s]' \"$@\"; printf '\\n'; } >>\"$STUB_LOG/argv\"";

/// The programs the first-boot script runs that would change this machine or reach the
/// network, as recording stand-ins (first on PATH). Everything else (tar, sha256sum, python3,
/// mv...) is the real thing.
const STANDINS: &[(&str, &str)] = &[
    (
        "apt-get",
        // A package's files the script then writes to.
        r#"case " $* " in *" caddy "*) mkdir -p "$LABLINK_ROOT/etc/caddy" ;; esac"#,
    ),
    (
        // The release, the instance metadata service (IMDSv2) and SSM GetParameter. The first
        // GetParameter is refused, as IAM does for a role just made.
        "curl",
        r#"out= url= data= config=
while [ $# -gt 0 ]; do
  case $1 in
    -o) out=$2; shift ;;
    -K) if [ "$2" = - ]; then config=$(cat); fi; shift ;;
    -d) data=$2; shift ;;
    -X | -H | --retry | --aws-sigv4) shift ;;
    -*) ;;
    *) url=$1 ;;
  esac
  shift
done
imds=http://169.254.169.254/latest
case $url in
  "$STUB_RELEASE_URL") cp "$STUB_DIR/release.tar.gz" "$out" ;;
  "$imds/api/token") printf '%s' "$STUB_IMDS_TOKEN" ;;
  "$imds/meta-data/iam/security-credentials/") printf 'llk-allocator-role' ;;
  "$imds/meta-data/iam/security-credentials/llk-allocator-role") cat "$STUB_DIR/credentials.json" ;;
  "https://ssm.$STUB_REGION.amazonaws.com/")
    printf '%s\n' "$config" >>"$STUB_LOG/curl-config"
    if [ ! -e "$STUB_LOG/ssm-refused-once" ]; then
      touch "$STUB_LOG/ssm-refused-once"
      echo 'curl: (22) The requested URL returned error: 400' >&2
      exit 22
    fi
    [ "$data" = "{\"Name\": \"$STUB_SSM_NAME\", \"WithDecryption\": true}" ] || exit 22
    cat "$STUB_DIR/ssm-answer.json" ;;
  *) echo "curl stand-in: unexpected URL $url" >&2; exit 7 ;;
esac"#,
    ),
    ("systemctl", ""),
    ("sleep", ""),
    (
        // The user lablink exists once the release's install.sh has run.
        "getent",
        r#"if [ "$*" = "group lablink" ] && [ -e "$STUB_LOG/installed" ]; then echo 'lablink:x:998:'; exit 0; fi
exit 2"#,
    ),
    (
        // psql and createdb are the stand-ins; an absolute path is the program as installed
        // under LABLINK_ROOT.
        "runuser",
        r#"[ "$1" = -u ] && [ "$3" = -- ] || { echo "runuser stand-in: unexpected $*" >&2; exit 2; }
shift 3
case $1 in
  psql | createdb) exec "$STUB_DIR/$@" ;;
  /*) exec "$LABLINK_ROOT$@" ;;
  *) echo "runuser stand-in: unexpected $1" >&2; exit 2 ;;
esac"#,
    ),
    (
        // A first boot: no role, no database yet. What psql reads is kept.
        "psql",
        r#"if [ "$1" = -tAc ]; then exit 0; fi
cat >>"$STUB_LOG/psql-stdin""#,
    ),
    ("createdb", ""),
    (
        // Owners and groups of this machine are not the host's (no group lablink here).
        "install",
        r#"args=()
while [ $# -gt 0 ]; do
  case $1 in
    -o | -g) shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
exec /usr/bin/install "${args[@]}""#,
    ),
];

/// The release tarball's files: install.sh puts `lablink` in place and marks the user made;
/// `lablink` (run as `lablink validate`) records its arguments and LABLINK_* environment.
const RELEASE_FILES: &[(&str, &str)] = &[
    (
        "install.sh",
        r#"set -eu
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$LABLINK_ROOT/usr/local/bin"
cp "$here/lablink" "$LABLINK_ROOT/usr/local/bin/lablink"
touch "$STUB_LOG/installed""#,
    ),
    (
        "lablink",
        r#"printenv | grep '^LABLINK_' | grep -v '^LABLINK_ROOT=' | sort >"$STUB_LOG/validate-env"
[ "$1 $2" = "validate --config" ] && [ -r "$LABLINK_ROOT$3" ]"#,
    ),
];

fn write_executable(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/bash\n{RECORD}\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A release tarball (`lablink/install.sh`, `lablink/lablink`) in `dir`; its sha256.
fn fake_release(dir: &Path) -> String {
    let tree = dir.join("tree/lablink");
    std::fs::create_dir_all(&tree).unwrap();
    for (name, body) in RELEASE_FILES {
        write_executable(&tree.join(name), body);
    }
    let tarball = dir.join("release.tar.gz");
    let status = Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(dir.join("tree"))
        .arg("lablink")
        .status()
        .unwrap();
    assert!(status.success());
    let out = Command::new("sha256sum").arg(&tarball).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// The first-boot script's run under a scratch root.
struct Boot {
    root: PathBuf,
    log: PathBuf,
    stdout: String,
    stderr: String,
    /// Every stand-in's command line, one a line.
    argv: String,
}

/// Runs `user_data` with the stand-ins first on PATH and LABLINK_ROOT a scratch directory
/// in `dir` (which holds release.tar.gz). SSM answers `ssm_value` for `ssm_name`.
fn first_boot(dir: &Path, user_data: &str, ssm_name: &str, ssm_value: &str) -> Boot {
    let stubs = dir.join("stubs");
    let root = dir.join("root");
    let log = dir.join("log");
    let tmp = dir.join("tmp");
    for d in [&stubs, &root, &log, &tmp] {
        std::fs::create_dir_all(d).unwrap();
    }
    for (name, body) in STANDINS {
        write_executable(&stubs.join(name), body);
    }
    std::fs::copy(dir.join("release.tar.gz"), stubs.join("release.tar.gz")).unwrap();
    std::fs::write(
        stubs.join("credentials.json"),
        json!({
            "Code": "Success",
            "Type": "AWS-HMAC",
            "AccessKeyId": IMDS_KEY_ID,
            "SecretAccessKey": IMDS_SECRET_KEY,
            "Token": IMDS_SESSION_TOKEN,
            "Expiration": "2030-01-01T00:00:00Z",
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        stubs.join("ssm-answer.json"),
        json!({"Parameter": {"Name": ssm_name, "Type": "SecureString", "Value": ssm_value, "Version": 1}})
            .to_string(),
    )
    .unwrap();
    let script = dir.join("user_data.sh");
    std::fs::write(&script, user_data).unwrap();

    let run = Command::new("bash")
        .arg(&script)
        .env_clear()
        .env(
            "PATH",
            format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", stubs.display()),
        )
        .env("HOME", dir)
        .env("TMPDIR", &tmp)
        .env("LABLINK_ROOT", &root)
        .env("STUB_DIR", &stubs)
        .env("STUB_LOG", &log)
        .env("STUB_RELEASE_URL", SIGNED_RELEASE_URL)
        .env("STUB_REGION", "us-east-1")
        .env("STUB_SSM_NAME", ssm_name)
        .env("STUB_IMDS_TOKEN", IMDS_TOKEN)
        .current_dir(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8(run.stdout).unwrap();
    let stderr = String::from_utf8(run.stderr).unwrap();
    assert!(
        run.status.success(),
        "the first boot failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    assert!(
        std::fs::read_dir(&tmp).unwrap().next().is_none(),
        "the script left its work directory"
    );
    let argv = read(&log.join("argv"));
    Boot {
        root,
        log,
        stdout,
        stderr,
        argv,
    }
}

const IMDS_TOKEN: &str = "imds-token-sentinel-2218";
const IMDS_KEY_ID: &str = "ASIAKEYIDSENTINEL8842";
const IMDS_SECRET_KEY: &str = "secret/key+sentinel-6613";
const IMDS_SESSION_TOKEN: &str = "session-token-sentinel-4471";

#[test]
fn the_first_boot_script_installs_the_release_configures_it_and_starts_it() {
    let (ami, subnet) = ami_and_subnet();
    let toml = format!(
        "[server]\nmetrics_token = \"t\"\ncookie_secret = \"{CONFIG_SECRET}\"\n\n[provisioner]\nkind = \"none\"\n"
    );
    for tls in ["builtin", "caddy"] {
        let started = std::time::Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let sha256 = fake_release(dir.path());
        let name = format!("llkboot{}", &tls[..1]);
        let domain = format!("{name}.lablink-test.example.org");
        let mut vars = json!({
            "name": name,
            "region": "us-east-1",
            "ami": ami,
            "subnet_id": subnet,
            "provisioner": "none",
            "release_url": SIGNED_RELEASE_URL,
            "release_sha256": sha256,
            "lablink_toml": toml,
            "tls": tls,
        });
        if tls == "caddy" {
            vars["domain_name"] = json!(domain);
        }
        let deployment = Deployment::new(vars);
        deployment.init();
        let plan = deployment.plan();
        let resources = plan["planned_values"]["root_module"]["resources"]
            .as_array()
            .unwrap();
        let find = |address: &str| {
            resources
                .iter()
                .find(|r| r["address"] == address)
                .unwrap_or_else(|| panic!("no {address} in {resources:#?}"))
        };
        let user_data = gunzip_base64(
            find("aws_instance.allocator")["values"]["user_data_base64"]
                .as_str()
                .unwrap(),
        );
        let parameter = &find("aws_ssm_parameter.lablink_toml")["values"];
        let ssm_name = parameter["name"].as_str().unwrap();
        let ssm_value = parameter["value"].as_str().unwrap();
        assert_eq!(ssm_name, format!("/{name}/allocator/lablink-toml"));

        let boot = first_boot(dir.path(), &user_data, ssm_name, ssm_value);
        let (root, argv) = (&boot.root, &boot.argv);
        let context = format!(
            "tls = {tls}\n--- stdout\n{}--- stderr\n{}--- calls\n{argv}",
            boot.stdout, boot.stderr
        );
        let calls: Vec<&str> = argv.lines().collect();
        let called = |line: &str| calls.contains(&line);
        let position = |line: &str| {
            calls
                .iter()
                .position(|c| *c == line)
                .unwrap_or_else(|| panic!("{line} was not called\n{context}"))
        };

        // The release: downloaded from its URL (signature and all), checked, its install.sh run.
        assert!(
            calls.iter().any(|c| c
                .starts_with("curl [-fsSL] [--retry] [5] [--retry-connrefused] [-o] [")
                && c.ends_with(&format!("/lablink.tar.gz] [{SIGNED_RELEASE_URL}]"))),
            "{context}"
        );
        assert!(
            boot.stdout
                .contains(&format!("lablink-deploy: sha256 OK ({sha256})\n")),
            "{context}"
        );
        assert!(boot.log.join("installed").exists(), "{context}");
        assert!(
            position("getent [group] [lablink]") > position("install.sh"),
            "{context}"
        );

        // lablink.toml: the SSM parameter's value exactly, root:lablink 0640 in a 0750 directory,
        // read with the role's credentials given to curl on stdin (after one refusal).
        let config = root.join("etc/lablink/lablink.toml");
        assert_eq!(read(&config), ssm_value, "{context}");
        assert!(ssm_value.contains(CONFIG_SECRET));
        assert_eq!(mode(&config), 0o640);
        assert_eq!(mode(&root.join("etc/lablink")), 0o750);
        assert!(
            called(&format!(
                "install [-d] [-m] [0750] [-o] [root] [-g] [lablink] [{}/etc/lablink]",
                root.display()
            )) && called(&format!(
                "install [-m] [0640] [-o] [root] [-g] [lablink] [/dev/null] [{}/etc/lablink/lablink.toml.new]",
                root.display()
            )),
            "{context}"
        );
        assert_eq!(
            read(&boot.log.join("curl-config")),
            format!(
                "user = \"{IMDS_KEY_ID}:{IMDS_SECRET_KEY}\"\nheader = \"x-amz-security-token: {IMDS_SESSION_TOKEN}\"\n"
            )
            .repeat(2),
            "{context}"
        );
        assert_eq!(
            calls
                .iter()
                .filter(
                    |c| c.starts_with("curl [-fsS] [-K] [-] [--aws-sigv4] [aws:amz:us-east-1:ssm]")
                )
                .count(),
            2,
            "{context}"
        );
        assert_eq!(
            calls.iter().filter(|c| c.starts_with("sleep")).count(),
            1,
            "{context}"
        );

        // The local database: the user and the database made through runuser; the password
        // made here reaches psql on its standard input only.
        let env_file = root.join("etc/lablink/deploy.env");
        let env = read(&env_file);
        let password = env
            .lines()
            .find_map(|l| l.strip_prefix("LABLINK_DATABASE__URL=postgres://lablink:"))
            .and_then(|rest| rest.strip_suffix("@127.0.0.1:5432/lablink"))
            .unwrap_or_else(|| panic!("no local database URL in deploy.env: {env}\n{context}"));
        assert!(
            password.len() == 48 && password.chars().all(|c| c.is_ascii_hexdigit()),
            "{password}"
        );
        assert!(called(
            "apt-get [install] [-y] [-q] [--no-install-recommends] [postgresql]"
        ));
        assert!(
            called("systemctl [enable] [--now] [postgresql]"),
            "{context}"
        );
        let roles = "[psql] [-tAc] [SELECT 1 FROM pg_roles WHERE rolname = 'lablink']";
        let databases = "[psql] [-tAc] [SELECT 1 FROM pg_database WHERE datname = 'lablink']";
        let steps = [
            format!("runuser [-u] [postgres] [--] {roles}"),
            "runuser [-u] [postgres] [--] [psql] [-q] [-v] [ON_ERROR_STOP=1]".to_owned(),
            format!("runuser [-u] [postgres] [--] {databases}"),
            "runuser [-u] [postgres] [--] [createdb] [-O] [lablink] [lablink]".to_owned(),
            "createdb [-O] [lablink] [lablink]".to_owned(),
        ];
        let at: Vec<usize> = steps.iter().map(|s| position(s)).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{context}");
        assert_eq!(
            read(&boot.log.join("psql-stdin")),
            format!("CREATE ROLE lablink LOGIN PASSWORD '{password}';\n"),
            "{context}"
        );

        // deploy.env: root only, the database URL and where to listen; the drop-in loads it.
        assert_eq!(mode(&env_file), 0o600);
        let (listen, extra): (&str, &[String]) = match tls {
            "caddy" => (
                "127.0.0.1:8080",
                &["LABLINK_SERVER__TRUSTED_PROXIES=127.0.0.1".to_owned()],
            ),
            _ => (
                "0.0.0.0:443",
                &[
                    "LABLINK_SERVER__TLS__CERT_FILE=/etc/lablink/tls/fullchain.pem".to_owned(),
                    "LABLINK_SERVER__TLS__KEY_FILE=/etc/lablink/tls/privkey.pem".to_owned(),
                ],
            ),
        };
        let mut expected = vec![
            format!("LABLINK_DATABASE__URL=postgres://lablink:{password}@127.0.0.1:5432/lablink"),
            format!("LABLINK_SERVER__LISTEN={listen}"),
        ];
        expected.extend(extra.iter().cloned());
        assert_eq!(env.lines().collect::<Vec<_>>(), expected, "{context}");
        let drop_in = read(&root.join("etc/systemd/system/lablink.service.d/10-deploy.conf"));
        assert!(
            drop_in.contains("[Service]\nEnvironmentFile=/etc/lablink/deploy.env\n"),
            "{drop_in}"
        );
        assert_eq!(
            drop_in.contains("AmbientCapabilities=CAP_NET_BIND_SERVICE"),
            tls != "caddy",
            "{drop_in}"
        );
        if tls == "caddy" {
            assert_eq!(
                read(&root.join("etc/caddy/Caddyfile")),
                format!("{domain} {{\n\treverse_proxy 127.0.0.1:8080\n}}\n")
            );
            assert!(
                position("systemctl [enable] [caddy]") < position("systemctl [restart] [caddy]"),
                "{context}"
            );
        } else {
            assert!(!root.join("etc/caddy").exists());
            assert!(!argv.contains("caddy"), "{context}");
        }

        // Checked as the user lablink with the settings in its environment, then started.
        let validate = position(
            "runuser [-u] [lablink] [--] [/usr/local/bin/lablink] [validate] [--config] [/etc/lablink/lablink.toml]",
        );
        assert!(
            position("lablink [validate] [--config] [/etc/lablink/lablink.toml]") > validate,
            "{context}"
        );
        let mut sorted = expected.clone();
        sorted.sort();
        assert_eq!(
            read(&boot.log.join("validate-env"))
                .lines()
                .collect::<Vec<_>>(),
            sorted,
            "{context}"
        );
        let reload = position("systemctl [daemon-reload]");
        let start = position("systemctl [enable] [--now] [lablink]");
        assert!(validate < reload && reload < start, "{context}");
        assert!(
            !boot.stdout.contains("validate found problems"),
            "{context}"
        );
        assert!(
            boot.stdout
                .lines()
                .last()
                .is_some_and(|l| l.starts_with("lablink-deploy: done")),
            "{context}"
        );

        // No secret on any command line, nor in the log.
        for secret in [
            password,
            CONFIG_SECRET,
            IMDS_KEY_ID,
            IMDS_SECRET_KEY,
            IMDS_SESSION_TOKEN,
        ] {
            assert!(
                !argv.contains(secret),
                "{secret} on a command line\n{context}"
            );
        }
        for secret in [
            password,
            CONFIG_SECRET,
            "metrics_token",
            IMDS_KEY_ID,
            IMDS_SECRET_KEY,
            IMDS_SESSION_TOKEN,
            IMDS_TOKEN,
            "pw-sentinel-41",
            "sig-sentinel-93",
        ] {
            assert!(
                !boot.stdout.contains(secret) && !boot.stderr.contains(secret),
                "{secret} in the log\n{context}"
            );
        }
        eprintln!("first boot, tls = {tls}: {:.1?}", started.elapsed());
    }
}
