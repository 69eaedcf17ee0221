//! The user data of a launch batch: one start-up script for every VM of one `RunInstances`
//! call, with one row per VM (launch index, hostname, sealed token).
//!
//! A VM's agent token is split in two: the row holds `token XOR pad`, the pad (random, as long
//! as the token) becomes the tag [`PAD_TAG`] of that instance only. Each VM reads its own tags
//! through the instance metadata service, so it can open its own token and no other. Neither
//! half alone says anything about the token.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use lablink_core::{AgentToken, Hostname};
use rand::RngCore;

use crate::error::AwsFailure;

/// The instance tag that carries a VM's token pad.
pub const PAD_TAG: &str = "lablink-token-pad";

/// EC2's limit on user data, before base64.
pub(crate) const MAX_USER_DATA: usize = 16 * 1024;

/// The longest token whose pad fits in a tag value (256 characters of base64).
const MAX_TOKEN_BYTES: usize = 192;

/// The client VMs' start-up script, shared with the Terraform module (which renders it with
/// `templatefile()`), in Terraform's template syntax.
const TEMPLATE: &str = include_str!("../../lablink-terraform/terraform/aws/user_data.sh.tftpl");

/// What every VM's agent is told besides its name and token.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct AgentSettings {
    pub allocator_url: String,
    pub agent_download_url: String,
    pub agent_sha256: String,
    pub env: BTreeMap<String, String>,
}

/// A token split into the row's half and the tag's half (both base64).
#[derive(Clone)]
pub(crate) struct SealedToken {
    pub sealed: String,
    pub pad: String,
}

/// Splits `token` with a fresh random pad.
pub(crate) fn seal(token: &AgentToken) -> Result<SealedToken, AwsFailure> {
    let bytes = token.expose().as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_TOKEN_BYTES {
        return Err(AwsFailure::Input(format!(
            "an agent token must be 1 to {MAX_TOKEN_BYTES} bytes long to fit in an EC2 tag"
        )));
    }
    let mut pad = vec![0u8; bytes.len()];
    rand::thread_rng().fill_bytes(&mut pad);
    let sealed: Vec<u8> = bytes.iter().zip(&pad).map(|(b, p)| b ^ p).collect();
    Ok(SealedToken {
        sealed: B64.encode(sealed),
        pad: B64.encode(pad),
    })
}

/// Joins the two halves again (what the VM's script does).
pub fn open_token(sealed: &str, pad: &str) -> Option<AgentToken> {
    let sealed = B64.decode(sealed).ok()?;
    let pad = B64.decode(pad).ok()?;
    if sealed.len() != pad.len() {
        return None;
    }
    let bytes: Vec<u8> = sealed.iter().zip(&pad).map(|(s, p)| s ^ p).collect();
    String::from_utf8(bytes).ok().map(AgentToken::from)
}

/// One VM's row: its launch index within the call, hostname and sealed token.
pub(crate) fn row(index: usize, hostname: &Hostname, sealed: &SealedToken) -> String {
    format!("{index} {hostname} {}\n", sealed.sealed)
}

impl AgentSettings {
    /// The script with no rows yet; its length plus the rows' must stay within
    /// [`MAX_USER_DATA`].
    pub(crate) fn render(&self, rows: &str) -> String {
        let env: String = self
            .env
            .iter()
            .map(|(k, v)| format!("{k} {}\n", B64.encode(v)))
            .collect();
        render_template(
            TEMPLATE,
            &[
                ("pad_tag", PAD_TAG),
                ("allocator_url_b64", &B64.encode(&self.allocator_url)),
                (
                    "agent_download_url_b64",
                    &B64.encode(&self.agent_download_url),
                ),
                ("agent_sha256", &self.agent_sha256.to_ascii_lowercase()),
                ("agent_env", &env),
                ("rows", rows),
            ],
        )
    }

    /// Checks the values that end up in the script verbatim.
    pub(crate) fn validate(&self) -> Result<(), AwsFailure> {
        let bad = |m: String| Err(AwsFailure::Config(m));
        if !self.agent_sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return bad("the agent SHA-256 must be hexadecimal".into());
        }
        for name in self.env.keys() {
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_uppercase() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                return bad(format!(
                    "the agent environment variable name {name:?} must be upper-case letters, digits and '_'"
                ));
            }
            if matches!(name.as_str(), "ALLOCATOR_URL" | "VM_NAME" | "API_TOKEN") {
                return bad(format!(
                    "the agent environment variable {name} is set by the provisioner"
                ));
            }
        }
        if self.render("").len() + 600 > MAX_USER_DATA {
            return bad(
                "the agent settings leave no room for VMs in the 16 KiB of user data".into(),
            );
        }
        Ok(())
    }
}

/// Renders a template the way Terraform's `templatefile()` does for the syntax the user data
/// uses: `${name}` is the value of `name`, `$${` is a literal `${`. A name `vars` lacks is left
/// as it stands (a test renders the template with Terraform too and compares).
fn render_template(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    for (i, piece) in template.split("$${").enumerate() {
        if i > 0 {
            out.push_str("${");
        }
        let mut rest = piece;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let value = after.find('}').and_then(|end| {
                let name = &after[..end];
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v, end))
            });
            match value {
                Some((value, end)) => {
                    out.push_str(value);
                    rest = &after[end + 1..];
                }
                None => {
                    out.push_str("${");
                    rest = after;
                }
            }
        }
        out.push_str(rest);
    }
    out
}

impl std::fmt::Debug for AgentSettings {
    /// Environment values may be secrets, and so may a download URL (a presigned URL carries
    /// a signature): only names and whether the URL is set are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSettings")
            .field("allocator_url", &self.allocator_url)
            .field(
                "agent_download_url_set",
                &!self.agent_download_url.is_empty(),
            )
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_token_opens_with_its_own_pad_only() {
        let token = AgentToken::generate();
        let a = seal(&token).unwrap();
        let b = seal(&token).unwrap();
        assert_ne!(a.sealed, b.sealed, "every seal takes a fresh pad");
        assert_eq!(open_token(&a.sealed, &a.pad).unwrap(), token);
        assert_ne!(open_token(&a.sealed, &b.pad), Some(token.clone()));
        assert!(!a.sealed.contains(token.expose()) && !a.pad.contains(token.expose()));
    }

    #[test]
    fn tokens_that_do_not_fit_a_tag_are_refused() {
        assert!(seal(&AgentToken::from("x".repeat(MAX_TOKEN_BYTES + 1))).is_err());
        assert!(seal(&AgentToken::from(String::new())).is_err());
    }

    /// The script's own bash helpers open the token the same way.
    #[test]
    fn the_scripts_bash_opens_the_token() {
        let token = AgentToken::generate();
        let sealed = seal(&token).unwrap();
        let script = AgentSettings::default().render("");
        let start = script.find("# --- helpers ---").unwrap();
        let end = script.find("# --- end helpers ---").unwrap();
        let helpers = &script[start..end];
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "set -euo pipefail\n{helpers}\nopen_token \"$1\" \"$2\""
            ))
            .arg("bash")
            .arg(&sealed.sealed)
            .arg(&sealed.pad)
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8(out.stdout).unwrap(), token.expose());
    }

    #[test]
    fn values_are_base64_in_the_script() {
        let settings = AgentSettings {
            allocator_url: "https://x.org/'; rm -rf / #".into(),
            env: [("SUBJECT_IMAGE".to_string(), "$(reboot)".to_string())].into(),
            ..Default::default()
        };
        settings.validate().unwrap();
        let script = settings.render("0 vm-a c2VhbGVk\n");
        assert!(!script.contains("rm -rf"));
        assert!(!script.contains("$(reboot)"));
        assert!(script.contains("\n0 vm-a c2VhbGVk\n'"));
        let bad = AgentSettings {
            env: [("API_TOKEN".to_string(), "x".to_string())].into(),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    /// The EC2 provisioner renders the shared template exactly as Terraform's `templatefile()`
    /// does (with `terraform console`, which needs no provider).
    #[test]
    fn the_template_renders_as_terraform_renders_it() {
        let settings = AgentSettings {
            allocator_url: "https://x.org/?a='b'&c=\"$(id)\"`id`${HOME}\\".into(),
            agent_download_url: "https://downloads.example.org/lablink-agent".into(),
            agent_sha256: "AB".repeat(32),
            env: crate::Ec2Config {
                subject_image: "ghcr.io/talmolab/sleap:1".into(),
                gpu: true,
                ..Default::default()
            }
            .agent_env(),
        };
        let token = AgentToken::generate();
        let rows = row(3, &"vm-d".parse().unwrap(), &seal(&token).unwrap());
        let ours = settings.render(&rows);
        assert!(!ours.contains("${pad_tag}") && ours.contains("${LABLINK_ROOT:-}"));

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("user_data.sh.tftpl"), TEMPLATE).unwrap();
        // The values the provisioner gives, as HCL strings (all of them are base64, hex or
        // names, so JSON quoting is HCL quoting).
        let env: String = settings
            .env
            .iter()
            .map(|(k, v)| format!("{k} {}\n", B64.encode(v)))
            .collect();
        let vars = [
            ("pad_tag", PAD_TAG.to_owned()),
            ("allocator_url_b64", B64.encode(&settings.allocator_url)),
            (
                "agent_download_url_b64",
                B64.encode(&settings.agent_download_url),
            ),
            ("agent_sha256", settings.agent_sha256.to_ascii_lowercase()),
            ("agent_env", env),
            ("rows", rows),
        ];
        let map: Vec<String> = vars
            .iter()
            .map(|(k, v)| format!("{k} = {}", serde_json::to_string(v).unwrap()))
            .collect();
        let expr = format!(
            "jsonencode(templatefile(\"user_data.sh.tftpl\", {{ {} }}))\n",
            map.join(", ")
        );
        let mut console = std::process::Command::new("terraform")
            .args(["console", "-no-color"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the terraform binary is on PATH (scripts/components.sh installs it)");
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
        let terraforms: String = serde_json::from_str(&json).unwrap();
        assert_eq!(ours, terraforms);
    }

    /// Runs the rendered user data with real bash in a scratch root (`LABLINK_ROOT`), with
    /// stand-ins first on `PATH` for `curl` (IMDS and the download), `systemctl` and
    /// `systemd-cat` (and `sleep`, returning at once). Returns the scratch dir, the script's exit status and its output.
    fn run_user_data(
        script: &str,
        pad: &str,
        agent_bytes: &[u8],
    ) -> (tempfile::TempDir, std::process::ExitStatus, String) {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let rec = dir.path().join("rec");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&rec).unwrap();
        std::fs::write(dir.path().join("fake-agent"), agent_bytes).unwrap();
        let stand_in = |name: &str, body: &str| {
            let source = dir.path().join(format!("{name}.src"));
            std::fs::write(&source, format!("#!/bin/bash\n{body}\n")).unwrap();
            // A copy made by a child process: no write descriptor of ours leaks into a
            // process another test forks ("Text file busy").
            let ok = std::process::Command::new("install")
                .args(["-m", "0755"])
                .arg(&source)
                .arg(bin.join(name))
                .status()
                .unwrap();
            assert!(ok.success());
        };
        stand_in(
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
case "$url" in
  */api/token) printf 'imds-session' ;;
  */meta-data/ami-launch-index) printf '1' ;;
  */meta-data/tags/instance/lablink-token-pad) printf '%s' "$STAND_IN_PAD" ;;
  *) printf '%s\n' "$url" >> "$REC/downloads"; cat "$FAKE_AGENT" > "$out" ;;
esac"#,
        );
        stand_in("systemctl", r#"printf '%s\n' "$*" >> "$REC/systemctl""#);
        stand_in("systemd-cat", r#"cat >> "$REC/journal""#);
        // The wait for the pad tag must not slow a failing test down.
        stand_in("sleep", r#"printf '%s\n' "$*" >> "$REC/sleep""#);
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .env("PATH", path)
            .env("LABLINK_ROOT", dir.path().join("root"))
            .env("REC", &rec)
            .env("STAND_IN_PAD", pad)
            .env("FAKE_AGENT", dir.path().join("fake-agent"))
            .output()
            .expect("bash runs");
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, out.status, output)
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn the_user_data_installs_the_checked_agent_its_private_environment_and_the_service() {
        use std::os::unix::fs::PermissionsExt;

        let agent = b"#!/bin/sh\necho fake agent\n";
        let config = crate::Ec2Config {
            subject_image: "ghcr.io/talmolab/sleap:1".into(),
            tutorial_repo: "https://github.com/talmolab/tutorial.git".into(),
            startup_script: "echo 'set up'\nnvidia-smi || true".into(),
            startup_on_error: "fail".into(),
            inuse_process: "sleap-label".into(),
            gpu: true,
            ..Default::default()
        };
        let settings = AgentSettings {
            allocator_url: "http://10.0.0.1:5000".into(),
            agent_download_url: "https://downloads.example.org/lablink-agent?sig=abc".into(),
            agent_sha256: sha256_hex(agent).to_ascii_uppercase(),
            env: config.agent_env(),
        };
        settings.validate().unwrap();
        let (mine, other) = (AgentToken::generate(), AgentToken::generate());
        let (sealed, other_sealed) = (seal(&mine).unwrap(), seal(&other).unwrap());
        let rows = format!(
            "{}{}",
            row(0, &"vm-a".parse().unwrap(), &other_sealed),
            row(1, &"vm-b".parse().unwrap(), &sealed)
        );
        let (dir, status, output) = run_user_data(&settings.render(&rows), &sealed.pad, agent);
        assert!(status.success(), "{output}");
        let root = dir.path().join("root");
        let rec = |name: &str| std::fs::read_to_string(dir.path().join("rec").join(name));

        // The agent came from the configured URL and is the checked file.
        assert_eq!(
            rec("downloads").unwrap(),
            "https://downloads.example.org/lablink-agent?sig=abc\n"
        );
        let installed = root.join("usr/local/bin/lablink-agent");
        assert_eq!(std::fs::read(&installed).unwrap(), agent);
        let mode = std::fs::metadata(&installed).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);

        // The environment: root's only, with this VM's own row and every typed setting.
        let env_file = root.join("etc/lablink/agent.env");
        let mode = std::fs::metadata(&env_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names = [
            "ALLOCATOR_URL",
            "VM_NAME",
            "API_TOKEN",
            "SUBJECT_IMAGE",
            "TUTORIAL_REPO_TO_CLONE",
            "LABLINK_STARTUP_SCRIPT",
            "STARTUP_ON_ERROR",
            "LABLINK_CRD_USER",
            "LABLINK_INUSE_PROCESS",
            "LABLINK_LOG_FILES",
            "GPU_SUPPORT",
        ];
        // Read back the way the unit reads it: sourced by bash.
        let probe = format!(
            "set -a; . \"$1\"; set +a; for n in {}; do printf '%s=%s\\0' \"$n\" \"${{!n}}\"; done",
            names.join(" ")
        );
        let read = std::process::Command::new("bash")
            .arg("-c")
            .arg(&probe)
            .arg("bash")
            .arg(&env_file)
            .output()
            .unwrap();
        assert!(read.status.success());
        let values: BTreeMap<String, String> = String::from_utf8(read.stdout)
            .unwrap()
            .split_terminator('\0')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        let value = |k: &str| values.get(k).map(String::as_str).unwrap_or_default();
        assert_eq!(value("VM_NAME"), "vm-b");
        assert_eq!(value("API_TOKEN"), mine.expose());
        assert_eq!(value("ALLOCATOR_URL"), "http://10.0.0.1:5000");
        assert_eq!(value("SUBJECT_IMAGE"), "ghcr.io/talmolab/sleap:1");
        assert_eq!(
            value("TUTORIAL_REPO_TO_CLONE"),
            "https://github.com/talmolab/tutorial.git"
        );
        assert_eq!(
            value("LABLINK_STARTUP_SCRIPT"),
            "echo 'set up'\nnvidia-smi || true"
        );
        assert_eq!(value("STARTUP_ON_ERROR"), "fail");
        assert_eq!(value("LABLINK_CRD_USER"), "ubuntu");
        assert_eq!(value("LABLINK_INUSE_PROCESS"), "sleap-label");
        assert_eq!(
            value("LABLINK_LOG_FILES"),
            "cloud_init=/var/log/cloud-init-output.log"
        );
        assert_eq!(value("GPU_SUPPORT"), "true");

        // The service is installed, enabled and started.
        let unit =
            std::fs::read_to_string(root.join("etc/systemd/system/lablink-agent.service")).unwrap();
        assert!(unit.contains("/etc/lablink/agent.env"), "{unit}");
        assert_eq!(
            rec("systemctl").unwrap(),
            "daemon-reload\nenable --now lablink-agent.service\n"
        );

        // Nothing secret was printed or logged.
        let journal = rec("journal").unwrap();
        for text in [&output, &journal] {
            assert!(!text.contains(mine.expose()), "the token was printed");
            assert!(!text.contains(&sealed.pad), "the pad was printed");
        }
        assert!(journal.contains("agent started for vm-b"), "{journal}");
    }

    #[test]
    fn an_agent_download_with_the_wrong_sha256_stops_the_user_data_and_installs_nothing() {
        let settings = AgentSettings {
            allocator_url: "http://10.0.0.1:5000".into(),
            agent_download_url: "https://downloads.example.org/lablink-agent".into(),
            agent_sha256: sha256_hex(b"the real agent"),
            env: BTreeMap::new(),
        };
        let token = AgentToken::generate();
        let sealed = seal(&token).unwrap();
        let rows = row(1, &"vm-b".parse().unwrap(), &sealed);
        let (dir, status, output) =
            run_user_data(&settings.render(&rows), &sealed.pad, b"a tampered agent");
        assert!(!status.success(), "{output}");
        assert!(
            output.contains("SHA-256 is")
                && output.contains(&format!("not the expected {}", settings.agent_sha256)),
            "the log says why: {output}"
        );
        let root = dir.path().join("root");
        assert!(!root.join("usr/local/bin/lablink-agent").exists());
        assert!(!root.join("usr/local/bin/lablink-agent.download").exists());
        assert!(!root.join("etc/lablink/agent.env").exists());
        assert!(
            !dir.path().join("rec/systemctl").exists(),
            "nothing started"
        );
        assert!(!output.contains(token.expose()));
    }
}
