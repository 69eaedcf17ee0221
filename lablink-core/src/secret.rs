//! Secrets: [`CrdCommand`], [`Pin`], [`AgentToken`] and the stored [`TokenDigest`].
//!
//! Their `Debug` and `Display` never show the value, so a secret that reaches a log line, an
//! error message or a `{:?}` prints as `***`. Code that really needs the value calls
//! `expose()`, which makes every use easy to find.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

macro_rules! redacted {
    ($name:ident) => {
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(***)"))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("***")
            }
        }

        impl $name {
            /// The secret value. Every call site is a place where the secret leaves LabLink's
            /// care: keep it out of logs and error messages.
            pub fn expose(&self) -> &str {
                &self.0
            }
        }
    };
}

/// The Chrome Remote Desktop command a participant pastes: a credential (it carries a one-time
/// `--code`), delivered only to the assigned VM's agent.
///
/// Valid commands contain `--code=<value>` (quoted or not) whose value is 1–512 characters of
/// `[A-Za-z0-9/_.~+-]`. The agent never runs the command itself: it takes [`CrdCommand::code`]
/// and builds its own argument vector, so nothing else in the command can reach a shell.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CrdCommand(Arc<str>);
redacted!(CrdCommand);

const MAX_COMMAND: usize = 4096;
const MAX_CODE: usize = 512;

impl CrdCommand {
    /// The value of `--code`, validated when the command was parsed.
    pub fn code(&self) -> &str {
        extract_code(&self.0).unwrap_or_default()
    }
}

fn extract_code(command: &str) -> Result<&str> {
    let start = command
        .find("--code")
        .ok_or_else(|| Error::invalid_input("the Chrome Remote Desktop command has no --code"))?;
    let rest = &command[start + "--code".len()..];
    let rest = rest
        .strip_prefix('=')
        .or_else(|| rest.strip_prefix(' '))
        .ok_or_else(|| Error::invalid_input("--code must be followed by '=' and a value"))?;
    let (rest, quote) = match rest.chars().next() {
        Some(q @ ('"' | '\'')) => (&rest[1..], Some(q)),
        _ => (rest, None),
    };
    let end = match quote {
        Some(q) => rest
            .find(q)
            .ok_or_else(|| Error::invalid_input("the --code value has no closing quote"))?,
        None => rest.find(char::is_whitespace).unwrap_or(rest.len()),
    };
    let code = &rest[..end];
    if code.is_empty() {
        return Err(Error::invalid_input("the --code value is empty"));
    }
    if code.len() > MAX_CODE {
        return Err(Error::invalid_input("the --code value is too long"));
    }
    if !code
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '.' | '~' | '+' | '-'))
    {
        return Err(Error::invalid_input(
            "the --code value may only contain letters, digits and / _ . ~ + -",
        ));
    }
    Ok(code)
}

impl FromStr for CrdCommand {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.len() > MAX_COMMAND {
            return Err(Error::invalid_input(format!(
                "the Chrome Remote Desktop command is longer than {MAX_COMMAND} characters"
            )));
        }
        extract_code(s)?;
        Ok(Self(s.into()))
    }
}

impl TryFrom<String> for CrdCommand {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<CrdCommand> for String {
    fn from(c: CrdCommand) -> String {
        c.0.to_string()
    }
}

/// The PIN that unlocks a participant's remote desktop; generated per assignment.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Pin(String);
redacted!(Pin);

impl Pin {
    /// Shortest PIN Chrome Remote Desktop accepts.
    pub const MIN_LEN: usize = 6;
    /// Longest PIN LabLink generates or accepts.
    pub const MAX_LEN: usize = 32;

    /// A fresh random PIN of `len` decimal digits (`len` is clamped to
    /// [`MIN_LEN`](Self::MIN_LEN)..=[`MAX_LEN`](Self::MAX_LEN)).
    pub fn generate(len: usize, rng: &mut impl Rng) -> Self {
        let len = len.clamp(Self::MIN_LEN, Self::MAX_LEN);
        Self(
            (0..len)
                .map(|_| char::from(b'0' + rng.gen_range(0..10u8)))
                .collect(),
        )
    }
}

impl FromStr for Pin {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if !(Self::MIN_LEN..=Self::MAX_LEN).contains(&s.len())
            || !s.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(Error::invalid_input(format!(
                "a PIN is {}–{} digits",
                Self::MIN_LEN,
                Self::MAX_LEN
            )));
        }
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for Pin {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Pin> for String {
    fn from(p: Pin) -> String {
        p.0
    }
}

/// A VM's bearer token: 256 random bits, issued at launch, shown to the VM once and stored
/// only as a [`TokenDigest`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub struct AgentToken(String);
redacted!(AgentToken);

impl AgentToken {
    /// A fresh random token (`llt_` followed by 64 hex digits).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self(format!("llt_{}", hex(&bytes)))
    }

    /// The SHA-256 digest to store instead of the token.
    pub fn digest(&self) -> TokenDigest {
        TokenDigest(Sha256::digest(self.0.as_bytes()).into())
    }
}

impl From<String> for AgentToken {
    /// Any string can be presented as a token; it is only trusted if its digest matches.
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<AgentToken> for String {
    fn from(t: AgentToken) -> String {
        t.0
    }
}

/// The SHA-256 digest of an [`AgentToken`], the only form in which a token is stored.
///
/// Checking a token costs one SHA-256 and a constant-time comparison: microseconds, no
/// memory. (Slow password hashes are for human passwords.)
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    /// Wraps raw digest bytes (as read from a store).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes (to write to a store).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `token` hashes to this digest, compared in constant time.
    pub fn verify(&self, token: &AgentToken) -> bool {
        let other = token.digest();
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenDigest({}…)", &hex(&self.0)[..8])
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const CMD: &str = "DISPLAY= /opt/google/chrome-remote-desktop/start-host \
        --code=\"4/0AanRRrtSECRET-code_x\" --redirect-url=\"https://remotedesktop.google.com/_/oauthredirect\" \
        --name=$(hostname)";

    #[test]
    fn secrets_never_print_their_value() {
        let cmd: CrdCommand = CMD.parse().unwrap();
        let pin = Pin::generate(6, &mut rand::rngs::StdRng::seed_from_u64(1));
        let token = AgentToken::generate();
        for shown in [
            format!("{cmd:?} {cmd} {pin:?} {pin} {token:?} {token}"),
            format!("{:?}", token.digest()),
        ] {
            assert!(!shown.contains("SECRET"), "{shown}");
            assert!(!shown.contains(pin.expose()), "{shown}");
            assert!(!shown.contains(&token.expose()[4..12]), "{shown}");
        }
    }

    #[test]
    fn crd_command_keeps_only_a_valid_code() {
        let cmd: CrdCommand = CMD.parse().unwrap();
        assert_eq!(cmd.code(), "4/0AanRRrtSECRET-code_x");
        assert_eq!(
            "start-host --code=abc"
                .parse::<CrdCommand>()
                .unwrap()
                .code(),
            "abc"
        );
        assert_eq!(
            "start-host --code 'abc'"
                .parse::<CrdCommand>()
                .unwrap()
                .code(),
            "abc"
        );
        for bad in [
            "start-host",
            "--code=",
            "--code=\"\"",
            "--code=\"abc",
            "--code=a;rm",
            "--code=$(reboot)",
            "--code=`id`",
            "--code=\"a\nb\"",
            "--code='a b'",
        ] {
            assert!(bad.parse::<CrdCommand>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn pins_are_random_digits_of_the_configured_length() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let a = Pin::generate(8, &mut rng);
        let b = Pin::generate(8, &mut rng);
        assert_eq!(a.expose().len(), 8);
        assert!(a.expose().bytes().all(|b| b.is_ascii_digit()));
        assert_ne!(a, b);
        assert_eq!(Pin::generate(2, &mut rng).expose().len(), Pin::MIN_LEN);
        assert!("12a456".parse::<Pin>().is_err());
    }

    #[test]
    fn token_digest_verifies_only_its_token() {
        let token = AgentToken::generate();
        let digest = token.digest();
        assert!(digest.verify(&token));
        assert!(!digest.verify(&AgentToken::generate()));
        assert!(!digest.verify(&AgentToken::from(String::new())));
        assert_eq!(token.expose().len(), 4 + 64);
    }
}
