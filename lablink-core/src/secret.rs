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

/// The Chrome Remote Desktop code a participant pastes: a credential, delivered only to the
/// assigned VM's agent.
///
/// The pasted command is parsed once and only the validated code is kept: the command must
/// be plain ASCII text, hold exactly one `--code` option spelled in full (`--code=<value>`
/// or `--code <value>`, the value optionally quoted), and no other option that Python's
/// argparse would read as `--code` (an abbreviation such as `--cod=`, a repeat, or a `--`
/// that ends the options). The value is 1–512 characters of `[A-Za-z0-9/_-]`, the characters
/// Google's codes use. VMs are never sent the participant's text: they get
/// [`start_host_command`](Self::start_host_command), which LabLink builds itself, and the
/// agent runs `start-host` from an argument vector, not a shell.
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CrdCommand(Arc<str>);
redacted!(CrdCommand);

impl PartialEq for CrdCommand {
    /// Compared in constant time (for codes of equal length): the code is a credential.
    fn eq(&self, other: &Self) -> bool {
        constant_time_eq(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl Eq for CrdCommand {}

/// Whether `a` and `b` are equal, looking at every byte when their lengths match.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const MAX_COMMAND: usize = 4096;
const MAX_CODE: usize = 512;

/// Where Chrome Remote Desktop's `start-host` sends the browser after authorising.
pub const CRD_REDIRECT_URL: &str = "https://remotedesktop.google.com/_/oauthredirect";

impl CrdCommand {
    /// The validated `--code` value.
    pub fn code(&self) -> &str {
        &self.0
    }

    /// The command a VM is given: `start-host --code=<code> --redirect-url=<Google's URL>
    /// --name=<hostname>`, built from the validated code only.
    pub fn start_host_command(&self, hostname: &crate::Hostname) -> String {
        format!(
            "start-host --code={} --redirect-url={CRD_REDIRECT_URL} --name={hostname}",
            self.0
        )
    }

    /// A code read back from a store: the bare code LabLink stores, or a whole command
    /// stored by an earlier version (which kept the pasted text). An earlier version took the
    /// first `--code` of a command this version refuses; its value was validated then, so
    /// it is taken again, and the VM still gets only the rebuilt command.
    pub fn from_stored(stored: &str) -> Result<Self> {
        if valid_code(stored) {
            return Ok(Self(stored.into()));
        }
        stored
            .parse()
            .or_else(|e| legacy_code(stored).map(|code| Self(code.into())).ok_or(e))
    }
}

/// The code an earlier version kept from a pasted command: the value of the first
/// `--code` (`=` or a space, optionally quoted), of `[A-Za-z0-9/_.~+-]` (its rule; none of
/// these characters means anything to a shell inside a word). Used only for stored records.
fn legacy_code(command: &str) -> Option<&str> {
    let rest = &command[command.find("--code")? + "--code".len()..];
    let rest = rest.strip_prefix('=').or_else(|| rest.strip_prefix(' '))?;
    let (rest, quote) = match rest.chars().next() {
        Some(q @ ('"' | '\'')) => (&rest[1..], Some(q)),
        _ => (rest, None),
    };
    let end = match quote {
        Some(q) => rest.find(q)?,
        None => rest.find(char::is_whitespace).unwrap_or(rest.len()),
    };
    let code = &rest[..end];
    ((1..=MAX_CODE).contains(&code.len())
        && code.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'.' | b'~' | b'+' | b'-')
        }))
    .then_some(code)
}

fn valid_code(code: &str) -> bool {
    (1..=MAX_CODE).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'))
}

/// `value` without one pair of matching surrounding quotes.
fn unquote(value: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(q).and_then(|v| v.strip_suffix(q)) {
            return inner;
        }
    }
    value
}

/// Whether argparse, given a parser whose only long option is `--code` (and `--help`),
/// would read `token` as the `--code` option: `--code`, or a prefix of it of at least
/// `--c`, each optionally followed by `=value`.
fn reads_as_code_option(token: &str) -> bool {
    let name = token.split_once('=').map_or(token, |(name, _)| name);
    name.len() >= 3 && "--code".starts_with(name)
}

/// The validated code of a pasted command.
fn parse_code(command: &str) -> Result<&str> {
    if command.len() > MAX_COMMAND {
        return Err(Error::invalid_input(format!(
            "the command is longer than {MAX_COMMAND} characters"
        )));
    }
    if let Some(c) = command
        .chars()
        .find(|&c| !(c.is_ascii_graphic() || matches!(c, ' ' | '\t' | '\n' | '\r')))
    {
        return Err(Error::invalid_input(if c.is_ascii_control() {
            "the command contains a control character".to_owned()
        } else {
            format!(
                "the command contains {c:?}, which is not plain ASCII text (a look-alike of a letter, dash or quote?)"
            )
        }));
    }
    let tokens: Vec<&str> = command.split_ascii_whitespace().collect();
    if tokens.contains(&"--") {
        return Err(Error::invalid_input(
            "the command contains a bare `--`, which a Chrome Remote Desktop command never has",
        ));
    }
    let mut options = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| reads_as_code_option(t));
    let Some((at, option)) = options.next() else {
        return Err(Error::invalid_input("the command has no --code"));
    };
    if options.next().is_some() {
        return Err(Error::invalid_input(
            "the command has more than one --code option (or an abbreviation of it)",
        ));
    }
    let value = match option.split_once('=') {
        Some(("--code", value)) => value,
        Some(_) => {
            return Err(Error::invalid_input(
                "write --code in full, not abbreviated",
            ))
        }
        None if *option != "--code" => {
            return Err(Error::invalid_input(
                "write --code in full, not abbreviated",
            ))
        }
        None => match tokens.get(at + 1) {
            Some(next) if !next.starts_with('-') => next,
            _ => return Err(Error::invalid_input("--code has no value")),
        },
    };
    let code = unquote(value);
    if code.is_empty() {
        return Err(Error::invalid_input("the --code value is empty"));
    }
    if code.len() > MAX_CODE {
        return Err(Error::invalid_input("the --code value is too long"));
    }
    if !valid_code(code) {
        return Err(Error::invalid_input(
            "the --code value may only contain letters, digits and / _ -",
        ));
    }
    Ok(code)
}

impl FromStr for CrdCommand {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        parse_code(s.trim()).map(|code| Self(code.into()))
    }
}

impl TryFrom<String> for CrdCommand {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::from_stored(&s)
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
        Self(random_token("llt_"))
    }

    /// The SHA-256 digest to store instead of the token.
    pub fn digest(&self) -> TokenDigest {
        TokenDigest::of(&self.0)
    }
}

/// `prefix` followed by 256 random bits in hex.
fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex(&bytes))
}

/// A registration token: what an admin hands to the owner of a machine so that it can join
/// the pool (`lablink-agent register`). 256 random bits, shown once, stored only as a
/// [`TokenDigest`]; it is exchanged for the machine's own [`AgentToken`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub struct RegistrationSecret(String);
redacted!(RegistrationSecret);

impl RegistrationSecret {
    /// A fresh random token (`llr_` followed by 64 hex digits).
    pub fn generate() -> Self {
        Self(random_token("llr_"))
    }

    /// The SHA-256 digest to store instead of the token.
    pub fn digest(&self) -> TokenDigest {
        TokenDigest::of(&self.0)
    }
}

impl From<String> for RegistrationSecret {
    /// Any string can be presented; it is only trusted if its digest is stored.
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<RegistrationSecret> for String {
    fn from(t: RegistrationSecret) -> String {
        t.0
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
    /// The SHA-256 digest of `secret`.
    fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

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

/// How a secret setting shows in `Debug`: `***` when it is set, empty when not; never its
/// value.
pub fn redacted(secret: &str) -> &'static str {
    if secret.is_empty() {
        ""
    } else {
        "***"
    }
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
        for (ok, code) in [
            ("start-host --code=abc", "abc"),
            ("start-host --code 'abc'", "abc"),
            ("  --code=\"4/0A-b_c\" --name=x\n", "4/0A-b_c"),
            ("--redirect-url=x --code=a --name=--cx", "a"),
        ] {
            assert_eq!(ok.parse::<CrdCommand>().unwrap().code(), code, "{ok:?}");
        }
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
            "--code=a.b",
            "--code",
            "--code --name=x",
            "--code=\"4/0Aok\" --code=$(touch${IFS}/tmp/x)",
            "--code=\"4/0Aok\" --cod=$(touch${IFS}/tmp/x)",
            "--code=ok --c=evil",
            "--cod=ok",
            "--co ok",
            "--code=ok -- --code=evil",
            "--code=ok\u{0}",
            "\u{2014}code=ok",
            "--code=\u{0430}bc",
            "--code=ok --name=\u{ff04}(id)",
        ] {
            assert!(bad.parse::<CrdCommand>().is_err(), "{bad:?} accepted");
        }
        assert!(format!("--code={}", "a".repeat(MAX_CODE + 1))
            .parse::<CrdCommand>()
            .is_err());
        assert!(format!("--code=a {}", "x".repeat(MAX_COMMAND))
            .parse::<CrdCommand>()
            .is_err());
    }

    #[test]
    fn vms_get_a_command_built_from_the_code_only() {
        let cmd: CrdCommand = CMD.parse().unwrap();
        let vm: crate::Hostname = "lablink-vm-1".parse().unwrap();
        assert_eq!(
            cmd.start_host_command(&vm),
            "start-host --code=4/0AanRRrtSECRET-code_x \
             --redirect-url=https://remotedesktop.google.com/_/oauthredirect --name=lablink-vm-1"
        );
        // What stores hold: the bare code; and what earlier versions stored: the pasted text,
        // even one this version refuses (its first code was validated then).
        assert_eq!(CrdCommand::from_stored("4/abc").unwrap().code(), "4/abc");
        assert_eq!(CrdCommand::from_stored(CMD).unwrap(), cmd);
        let legacy = "start-host --code=\"4/ok\" --code=$(touch${IFS}/tmp/x)";
        assert_eq!(CrdCommand::from_stored(legacy).unwrap().code(), "4/ok");
        assert!(CrdCommand::from_stored("--code=$(id)").is_err());
        // An earlier version's rule allowed . ~ + and `--code 'x'`: its records still read.
        assert_eq!(
            CrdCommand::from_stored("start-host --code '4/a.b~c+d'")
                .unwrap()
                .code(),
            "4/a.b~c+d"
        );
        assert_eq!(String::from(cmd.clone()), "4/0AanRRrtSECRET-code_x");
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
