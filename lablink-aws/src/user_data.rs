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

const TEMPLATE: &str = include_str!("user_data.sh");

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
        TEMPLATE
            .replace("@@PAD_TAG@@", PAD_TAG)
            .replace("@@ALLOCATOR_URL_B64@@", &B64.encode(&self.allocator_url))
            .replace("@@AGENT_URL_B64@@", &B64.encode(&self.agent_download_url))
            .replace("@@AGENT_SHA256@@", &self.agent_sha256)
            .replace("@@EXTRA_ENV@@", &env)
            .replace("@@ROWS@@", rows)
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
}
