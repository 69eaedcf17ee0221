//! The shipped AWS module keeps the contract the provisioner relies on: its declarations are
//! checked, its formatting with the real `terraform fmt`, and its user data (the template the
//! EC2 provisioner shares) rendered by the real `terraform console` in the module initialised
//! from the provider mirror, then run with bash in a scratch root.

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
        instance.contains("user_data_base64 = base64gzip(local.user_data[each.key])"),
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

/// The module's own user data of the VM `vm-7` with agent token `token`, for the module
/// variables `variables` (`allocator_url` defaults to a plain URL): `local.user_data`,
/// evaluated by the real `terraform console` in the module initialised from the provider
/// mirror, so the test runs exactly what `main.tf` hands the instance.
fn render_user_data(token: &str, variables: &[(&str, serde_json::Value)]) -> String {
    static MODULE: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let module = MODULE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in AWS_MODULE_FILES {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let out = Command::new(terraform())
            .args(["init", "-input=false", "-no-color"])
            .env("TF_CLI_CONFIG_FILE", mirror_cli_config(dir.path()))
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "terraform init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    });
    let mut vars = serde_json::Map::new();
    vars.insert("vms".into(), serde_json::json!({"vm-7": {"token": token}}));
    vars.insert("allocator_url".into(), "http://10.0.0.1:5000".into());
    for (name, value) in variables {
        vars.insert((*name).into(), value.clone());
    }
    let var_file = tempfile::Builder::new()
        .suffix(".tfvars.json")
        .tempfile_in(module.path())
        .unwrap();
    std::fs::write(var_file.path(), serde_json::Value::Object(vars).to_string()).unwrap();
    // The console locks the module's (empty) state: one at a time.
    static CONSOLE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = CONSOLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut console = Command::new(terraform())
        .args(["console", "-no-color"])
        .arg(format!("-var-file={}", var_file.path().display()))
        .env("TF_CLI_CONFIG_FILE", mirror_cli_config(module.path()))
        .current_dir(module.path())
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
        .write_all(b"jsonencode(nonsensitive(local.user_data[\"vm-7\"]))\n")
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
    serde_json::from_str(&json).unwrap()
}

#[test]
fn the_user_data_gives_the_agent_every_value_unchanged() {
    // Hostile values through the real module, then the script's value section run with bash.
    let url = "https://x.org/?a='b'&c=\"$(touch /tmp/pwned)\"`id`${HOME}\\";
    let token = "llt_'\"$(id)";
    let script = render_user_data(token, &[("allocator_url", url.into())]);
    assert!(
        !script.contains("pwned"),
        "values are encoded, never pasted in"
    );

    let values_end = script.find("\n# 2. The agent binary").unwrap();
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
    assert_eq!(printed, format!("{url}\n{token}\nvm-7\n"));
    let syntax = Command::new("bash")
        .arg("-n")
        .arg("-c")
        .arg(&script)
        .status()
        .unwrap();
    assert!(syntax.success(), "the rendered user data is valid bash");
}

/// A scratch machine for the rendered user data: `LABLINK_ROOT` and recording stand-ins,
/// first on `PATH`, for `curl` (serves `agent` for any download), `systemctl` and
/// `systemd-cat`.
struct Machine {
    dir: tempfile::TempDir,
}

impl Machine {
    fn new(agent: &[u8]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["bin", "rec", "root"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        std::fs::write(dir.path().join("fake-agent"), agent).unwrap();
        let m = Self { dir };
        m.stand_in(
            "curl",
            r#"printf '%s\n' "$*" >> "$REC/curl"
out='' url=''
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-X|-H|--retry|--retry-delay) [ "$1" = -o ] && out=$2; shift 2 ;;
    -*) shift ;;
    *) url=$1; shift ;;
  esac
done
printf '%s\n' "$url" >> "$REC/downloads"
cat "$FAKE_AGENT" > "$out""#,
        );
        m.stand_in("systemctl", r#"printf '%s\n' "$*" >> "$REC/systemctl""#);
        m.stand_in("systemd-cat", r#"cat >> "$REC/journal""#);
        m
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Installed by a child process: no write descriptor of ours leaks into a process
    /// another test forks ("Text file busy").
    fn stand_in(&self, name: &str, body: &str) {
        let source = self.path(&format!("{name}.src"));
        std::fs::write(&source, format!("#!/bin/bash\n{body}\n")).unwrap();
        let ok = Command::new("install")
            .args(["-m", "0755"])
            .arg(&source)
            .arg(self.path("bin").join(name))
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn sha256(&self) -> String {
        let out = Command::new("sha256sum")
            .arg(self.path("fake-agent"))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_owned()
    }

    /// Runs `script` with bash; its status and everything it printed.
    fn run(&self, script: &str) -> (std::process::ExitStatus, String) {
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(script)
            .env("PATH", path)
            .env("LABLINK_ROOT", self.path("root"))
            .env("REC", self.path("rec"))
            .env("FAKE_AGENT", self.path("fake-agent"))
            .output()
            .unwrap();
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, printed)
    }

    fn recorded(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.path("rec").join(name)).ok()
    }
}

#[test]
fn the_rendered_user_data_installs_the_checked_agent_its_private_settings_and_the_service() {
    use std::os::unix::fs::PermissionsExt;

    let machine = Machine::new(b"#!/bin/sh\necho fake agent\n");
    let token = "llt_s3cret-agent-token";
    let startup = "echo 'set up'\nnvidia-smi || true";
    let script = render_user_data(
        token,
        &[
            (
                "agent_download_url",
                "https://downloads.example.org/lablink-agent".into(),
            ),
            ("agent_sha256", machine.sha256().to_uppercase().into()),
            ("image_name", "ghcr.io/talmolab/sleap:1".into()),
            (
                "repository",
                "https://github.com/talmolab/tutorial.git".into(),
            ),
            ("startup_on_error", "fail".into()),
            ("gpu_support", true.into()),
            ("desktop_user", "researcher".into()),
            ("inuse_process", "sleap-label".into()),
            (
                "log_files",
                serde_json::json!([
                    "cloud_init=/var/log/cloud-init-output.log",
                    "container=/var/log/app.log"
                ]),
            ),
            ("startup_script", startup.into()),
        ],
    );
    let (status, printed) = machine.run(&script);
    assert!(status.success(), "{printed}");
    let root = machine.path("root");

    assert_eq!(
        machine.recorded("downloads").unwrap(),
        "https://downloads.example.org/lablink-agent\n"
    );
    let installed = root.join("usr/local/bin/lablink-agent");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(machine.path("fake-agent")).unwrap()
    );
    let mode = std::fs::metadata(&installed).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);

    let env_file = root.join("etc/lablink/agent.env");
    let mode = std::fs::metadata(&env_file).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the agent's environment is root's only"
    );
    let expected = [
        ("ALLOCATOR_URL", "http://10.0.0.1:5000"),
        ("VM_NAME", "vm-7"),
        ("API_TOKEN", token),
        ("SUBJECT_IMAGE", "ghcr.io/talmolab/sleap:1"),
        (
            "TUTORIAL_REPO_TO_CLONE",
            "https://github.com/talmolab/tutorial.git",
        ),
        ("STARTUP_ON_ERROR", "fail"),
        ("GPU_SUPPORT", "true"),
        ("LABLINK_CRD_USER", "researcher"),
        ("LABLINK_INUSE_PROCESS", "sleap-label"),
        (
            "LABLINK_LOG_FILES",
            "cloud_init=/var/log/cloud-init-output.log,container=/var/log/app.log",
        ),
        ("LABLINK_STARTUP_SCRIPT", startup),
    ];
    // Read back the way the unit reads it: sourced by bash.
    let names: Vec<&str> = expected.iter().map(|(k, _)| *k).collect();
    let probe = format!(
        "set -a; . \"$1\"; set +a; for n in {}; do printf '%s\\0' \"${{!n}}\"; done",
        names.join(" ")
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&probe)
        .arg("bash")
        .arg(&env_file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let values: Vec<&str> = text.split_terminator('\0').collect();
    for ((name, want), got) in expected.iter().zip(&values) {
        assert_eq!(got, want, "{name}");
    }
    assert_eq!(values.len(), expected.len());

    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/lablink-agent.service")).unwrap();
    assert!(unit.contains("/etc/lablink/agent.env"), "{unit}");
    assert_eq!(
        machine.recorded("systemctl").unwrap(),
        "daemon-reload\nenable --now lablink-agent.service\n"
    );
    let journal = machine.recorded("journal").unwrap();
    assert!(journal.contains("agent started for vm-7"), "{journal}");
    assert!(
        !printed.contains(token) && !journal.contains(token),
        "the token was printed"
    );
}

#[test]
fn a_download_with_the_wrong_sha256_stops_the_rendered_user_data_and_installs_nothing() {
    let machine = Machine::new(b"a tampered agent");
    let wrong = "0".repeat(64);
    let script = render_user_data(
        "llt_token",
        &[
            (
                "agent_download_url",
                "https://downloads.example.org/lablink-agent".into(),
            ),
            ("agent_sha256", wrong.as_str().into()),
        ],
    );
    let (status, printed) = machine.run(&script);
    assert!(!status.success(), "{printed}");
    assert!(
        printed.contains(&format!(
            "SHA-256 is {}, not the expected {wrong}: not installed",
            machine.sha256()
        )),
        "the log says why: {printed}"
    );
    let root = machine.path("root");
    assert!(!root.join("usr/local/bin/lablink-agent").exists());
    assert!(!root.join("usr/local/bin/lablink-agent.download").exists());
    assert!(!root.join("etc/lablink/agent.env").exists());
    assert_eq!(machine.recorded("systemctl"), None, "nothing started");
    assert!(!printed.contains("llt_token"));
}
