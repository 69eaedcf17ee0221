//! The shipped AWS module keeps the contract the provisioner relies on. The AWS provider
//! cannot be downloaded here, so the module is checked statically, formatted with the real
//! `terraform fmt`, and its user-data template rendered with `terraform console`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use lablink_terraform::{AWS_MODULE_FILES, MODULE_OUTPUTS, MODULE_VARIABLES};

fn aws_module() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("terraform/aws")
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap()
}

/// The names declared as `<kind> "<name>" {` in the module's .tf files.
fn declared(dir: &Path, kind: &str) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "tf") {
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                if let Some(rest) = line.strip_prefix(&format!("{kind} \"")) {
                    names.push(rest.split('"').next().unwrap().to_owned());
                }
            }
        }
    }
    names
}

/// The body of `<kind> "<name>" {` ... up to the closing brace at the start of a line.
fn block(dir: &Path, file: &str, header: &str) -> String {
    let text = read(dir, file);
    let start = text
        .find(header)
        .unwrap_or_else(|| panic!("{header} not in {file}"));
    let end = text[start..].find("\n}").unwrap();
    text[start..start + end].to_owned()
}

#[test]
fn the_aws_module_and_the_fixture_declare_every_variable_and_output_the_provisioner_relies_on() {
    for dir in [aws_module(), fixture()] {
        let variables = declared(&dir, "variable");
        let outputs = declared(&dir, "output");
        for name in MODULE_VARIABLES {
            assert!(
                variables.iter().any(|v| v == name),
                "{dir:?} lacks variable {name}"
            );
        }
        for name in MODULE_OUTPUTS {
            assert!(
                outputs.iter().any(|o| o == name),
                "{dir:?} lacks output {name}"
            );
        }
        let vms = block(&dir, "variables.tf", "variable \"vms\"");
        assert!(
            vms.contains("map(object({"),
            "{dir:?}: vms is a map of objects"
        );
        assert!(
            vms.contains("token = string"),
            "{dir:?}: each VM has a token"
        );
        assert!(
            vms.contains("sensitive = true"),
            "{dir:?}: vms holds tokens"
        );
        let tokens = block(&dir, "outputs.tf", "output \"vm_tokens\"");
        assert!(
            tokens.contains("sensitive   = true"),
            "{dir:?}: vm_tokens is sensitive"
        );
        let ids = block(&dir, "outputs.tf", "output \"vm_instance_ids\"");
        assert!(
            ids.contains("h => vm.id"),
            "{dir:?}: ids are keyed by hostname"
        );
    }
}

#[test]
fn the_aws_module_creates_one_tagged_instance_per_vm_with_its_own_token() {
    let dir = aws_module();
    let instance = block(&dir, "main.tf", "resource \"aws_instance\" \"vm\"");
    assert!(
        instance.contains("for_each = local.hostnames"),
        "{instance}"
    );
    assert!(
        instance.contains("Name              = each.key"),
        "{instance}"
    );
    assert!(
        instance.contains("hostname          = each.key"),
        "{instance}"
    );
    assert!(
        instance.contains("base64encode(var.vms[each.key].token)"),
        "{instance}"
    );
    assert!(instance.contains("iam_instance_profile"), "{instance}");
    assert!(instance.contains("key_name"), "{instance}");
    assert!(instance.contains("vpc_security_group_ids"), "{instance}");
    assert!(
        instance.contains("ignore_changes = [ami, user_data_base64"),
        "existing VMs must not be replaced or restarted by later applies"
    );
    let main = read(&dir, "main.tf");
    assert!(
        main.contains("deployment = var.deployment"),
        "deployment tag"
    );
    assert!(main.contains("resource \"aws_security_group\""));
    assert!(main.contains("resource \"aws_key_pair\""));
    assert!(main.contains("resource \"aws_iam_instance_profile\""));
    assert!(main.contains("data \"aws_ami\" \"gpu\""), "GPU AMI lookup");
    let versions = read(&dir, "versions.tf");
    assert!(
        versions.contains("default_tags"),
        "every resource is tagged"
    );
    let user_data = read(&dir, "user_data.sh.tftpl");
    for var in ["ALLOCATOR_URL", "VM_NAME", "API_TOKEN"] {
        assert!(
            user_data.contains(&format!("{var}=%q")),
            "user data sets {var}"
        );
    }
    assert!(user_data.contains("systemctl enable --now lablink-agent.service"));
    assert!(read(&dir, "outputs.tf")
        .contains("apply_seconds = { for h, e in local.epoch_seconds : h => e.end - e.start }"));
}

#[test]
fn the_embedded_module_is_the_one_on_disk() {
    let dir = aws_module();
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut embedded: Vec<String> = AWS_MODULE_FILES
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    embedded.sort();
    assert_eq!(embedded, on_disk);
    for (name, text) in AWS_MODULE_FILES {
        assert_eq!(&read(&dir, name), text, "{name}");
    }
}

#[test]
fn the_shipped_modules_are_terraform_fmt_clean() {
    for dir in [aws_module(), fixture()] {
        let out = Command::new(terraform())
            .args(["fmt", "-check", "-recursive", "-diff", "-no-color"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "terraform fmt -check {dir:?}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn the_user_data_gives_the_agent_every_value_unchanged() {
    // Render the template with hostile values through the real templatefile(), then run the
    // script's value section with bash and read the values back.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        aws_module().join("user_data.sh.tftpl"),
        dir.path().join("user_data.sh.tftpl"),
    )
    .unwrap();
    let url = "https://x.org/?a='b'&c=\"$(touch /tmp/pwned)\"`id`${HOME}\\";
    let token = "llt_'\"$(id)";
    let expr = format!(
        "jsonencode(templatefile(\"user_data.sh.tftpl\", {{ hostname = \"vm-1\", \
         allocator_url_b64 = base64encode({url}), api_token_b64 = base64encode({token}), \
         agent_download_url_b64 = base64encode(\"\"), agent_sha256 = \"\", \
         image_name_b64 = base64encode(\"\"), repository_b64 = base64encode(\"\"), \
         subject_software_b64 = base64encode(\"sleap\"), startup_on_error = \"continue\", \
         gpu_support = false }}))\n",
        url = serde_json::to_string(url).unwrap().replace("${", "$${"),
        token = serde_json::to_string(token).unwrap(),
    );
    let mut console = Command::new(terraform())
        .args(["console", "-no-color"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    console
        .stdin
        .take()
        .unwrap()
        .write_all(expr.as_bytes())
        .unwrap();
    let out = console.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The console prints the JSON string as an HCL string literal: decode both layers.
    let hcl = String::from_utf8(out.stdout).unwrap();
    let json: String = serde_json::from_str(hcl.trim()).unwrap();
    let script: String = serde_json::from_str(&json).unwrap();
    assert!(
        !script.contains("pwned"),
        "values are encoded, never pasted in"
    );

    let values_end = script.find("AGENT=/usr/local/bin").unwrap();
    let probe = format!(
        "{}\nprintf '%s\\n' \"$ALLOCATOR_URL\" \"$API_TOKEN\" \"$VM_NAME\"\n",
        &script[..values_end]
    );
    let out = Command::new("bash").arg("-c").arg(&probe).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(printed, format!("{url}\n{token}\nvm-1\n"));
    let syntax = Command::new("bash")
        .arg("-n")
        .arg("-c")
        .arg(&script)
        .status()
        .unwrap();
    assert!(syntax.success(), "the rendered user data is valid bash");
}
