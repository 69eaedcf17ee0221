//! `lablink-agent register` and `lablink-agent unregister`: a lab's own machine joins an
//! allocator's pool, and leaves it.
//!
//! ```text
//! lablink-agent register --allocator-url URL --token TOKEN [--name NAME] [--allow-reboot]
//!                        [--address ADDR] [--config PATH] [--no-service]
//! lablink-agent unregister [--config PATH] [--no-service]
//! ```
//!
//! `register` calls `POST {URL}/api/v1/registrations` with the registration token as its
//! bearer token and a [`RegistrationBody`]: the machine's name (`--name`, default its hostname
//! made valid, see [`sanitize_name`]) and its identity. The identity is a secret only root can
//! read: 256 random bits as 64 lowercase hex characters, kept in the identity file
//! `machine-identity` next to the settings file (`/etc/lablink/machine-identity` by default;
//! `LABLINK_IDENTITY_FILE` names another), created on the first registration with mode 0600
//! ([`load_or_create_identity`]) and sent again at every later one. The allocator keeps only
//! its digest, so whoever registers the same name again must prove they are the same machine
//! by holding the file. (It is not derived from `/etc/machine-id`, which every local user can
//! read.) With the agent token of the answer `register` writes the agent's settings file
//! (`/etc/lablink/agent.env`, mode 0600 from the start, other lines kept: [`write_config`]),
//! with `LABLINK_REGISTERED=1` and `LABLINK_ALLOW_REBOOT=1` (`--allow-reboot`) or `0`: the
//! agent reboots the machine on the allocator's request only with the owner's local consent.
//! Unless `--no-service`, it installs and (re)starts the `lablink-agent` systemd service
//! ([`unit_text`]). The token can come from `LABLINK_REGISTRATION_TOKEN` instead of the
//! command line; neither token, nor the identity, is ever printed.
//!
//! `unregister` calls `DELETE {URL}/api/v1/vms/{name}/registration` with the agent token,
//! then stops, disables and removes the service and removes the settings file. It keeps the
//! identity file: registering the machine again later keeps its identity (and so its name).
//!
//! Exit status: 0 done, 1 failed (the allocator's message is printed), 2 bad arguments.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lablink_core::Hostname;
use lablink_protocol::{ErrorBody, RegisteredBody, RegistrationBody};
use reqwest::{Method, StatusCode, Url};

/// The agent's settings file that `register` writes by default.
pub const DEFAULT_CONFIG: &str = "/etc/lablink/agent.env";
/// The systemd unit `register` installs.
pub const UNIT_PATH: &str = "/etc/systemd/system/lablink-agent.service";
/// The service's name for `systemctl`.
pub const SERVICE: &str = "lablink-agent";
/// The identity file's name, in the directory of the settings file (`--config`).
pub const IDENTITY_FILE_NAME: &str = "machine-identity";
/// The identity file by default (next to [`DEFAULT_CONFIG`]).
pub const DEFAULT_IDENTITY_FILE: &str = "/etc/lablink/machine-identity";
/// Names the identity file instead (tests simulate several machines on one host).
pub const IDENTITY_FILE_VAR: &str = "LABLINK_IDENTITY_FILE";
/// The registration token, instead of `--token` (which the process list shows).
pub const TOKEN_VAR: &str = "LABLINK_REGISTRATION_TOKEN";

const USAGE_REGISTER: &str = "usage: lablink-agent register --allocator-url URL --token TOKEN \
[--name NAME] [--allow-reboot] [--address ADDR] [--config PATH] [--no-service]";
const USAGE_UNREGISTER: &str = "usage: lablink-agent unregister [--config PATH] [--no-service]";

/// The short usage, printed (to stderr) with every argument error.
pub const USAGE: &str = "\
usage: lablink-agent
       lablink-agent register --allocator-url URL --token TOKEN [--name NAME] [--allow-reboot]
                              [--address ADDR] [--config PATH] [--no-service]
       lablink-agent unregister [--config PATH] [--no-service]
       lablink-agent --help";

/// `lablink-agent --help`.
pub const HELP: &str = "\
usage: lablink-agent
       lablink-agent register --allocator-url URL --token TOKEN [--name NAME] [--allow-reboot]
                              [--address ADDR] [--config PATH] [--no-service]
       lablink-agent unregister [--config PATH] [--no-service]

Without arguments, runs the agent. Its settings come from the environment (ALLOCATOR_URL,
VM_NAME, API_TOKEN, LABLINK_*) and the KEY=value file named by LABLINK_AGENT_CONFIG.

register      join this machine to a LabLink allocator's pool
  --allocator-url URL  the allocator (http or https)
  --token TOKEN        the registration token from the allocator's admin; or set
                       LABLINK_REGISTRATION_TOKEN (keeps it out of the process list)
  --name NAME          the name to serve under (default: this machine's hostname,
                       lower-cased, other characters than a-z 0-9 . _ - made '-')
  --allow-reboot       let the allocator reboot this machine (LABLINK_REBOOT_COMMAND,
                       default `systemctl reboot`); without it the settings say
                       LABLINK_ALLOW_REBOOT=0 and the agent refuses reboot requests
  --address ADDR       this machine's address, shown to the allocator's admins
  --config PATH        the agent's settings file to write (default /etc/lablink/agent.env;
                       mode 0600, other lines kept)
  --no-service         do not install the lablink-agent systemd service; print the command
                       that runs the agent instead
  The machine proves who it is with a secret identity (256 random bits) kept in the file
  machine-identity next to the settings file (default /etc/lablink/machine-identity, mode
  0600; LABLINK_IDENTITY_FILE names another), created at the first registration. Keep it:
  only a machine that holds it can register this name again.
unregister    take this machine out of the pool: tell the allocator, stop, disable and remove
              the lablink-agent service (unless --no-service), remove the settings file
              (the identity file is kept, for registering again later)
  --config PATH        the settings file register wrote (default /etc/lablink/agent.env)

Exit status: 0 done, 1 failed, 2 bad arguments. The agent itself exits 3 once the allocator
has refused its token for LABLINK_UNREGISTERED_AFTER_SECS (default 60) without a success in
between: the machine is no longer registered (its service is then not restarted).
";

/// A registration token (`--token` or `LABLINK_REGISTRATION_TOKEN`). `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistrationToken(String);

impl RegistrationToken {
    /// A token: trimmed, not empty, printable ASCII without spaces (it travels in a header).
    pub fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.is_empty() {
            return Err("the registration token is empty".into());
        }
        if !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err("the registration token must be printable ASCII without spaces".into());
        }
        Ok(Self(token.to_owned()))
    }

    /// The token itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RegistrationToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A command line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `--help`.
    Help,
    /// `register ...`.
    Register(RegisterArgs),
    /// `unregister ...`.
    Unregister(UnregisterArgs),
}

/// The options of `register`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterArgs {
    /// `--allocator-url`.
    pub allocator_url: Url,
    /// `--token`, else `LABLINK_REGISTRATION_TOKEN`.
    pub token: RegistrationToken,
    /// `--name`; `None`: the machine's hostname, sanitised.
    pub name: Option<Hostname>,
    /// `--allow-reboot`.
    pub allow_reboot: bool,
    /// `--address`.
    pub address: Option<String>,
    /// `--config`, made absolute (the unit names it).
    pub config: PathBuf,
    /// `--no-service`.
    pub no_service: bool,
}

/// The options of `unregister`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnregisterArgs {
    /// `--config`, made absolute.
    pub config: PathBuf,
    /// `--no-service`.
    pub no_service: bool,
}

/// Bad arguments: the message and the usage line to print with it (exit status 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct UsageError {
    /// What is wrong, one line.
    pub message: String,
    /// The usage of the command concerned.
    pub usage: &'static str,
}

fn usage(message: impl Into<String>, usage: &'static str) -> UsageError {
    UsageError {
        message: message.into(),
        usage,
    }
}

/// Parses the arguments after the program name. `env_token` is `LABLINK_REGISTRATION_TOKEN`,
/// used when there is no `--token`.
pub fn parse(
    args: impl IntoIterator<Item = OsString>,
    env_token: Option<&str>,
) -> Result<Command, UsageError> {
    let mut args = args
        .into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|a| usage(format!("argument {a:?} is not UTF-8"), USAGE))
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter();
    let (subcommand, usage_line) = match args.next().as_deref() {
        None => return Err(usage("no command", USAGE)),
        Some("-h" | "--help" | "help") => return Ok(Command::Help),
        Some("register") => ("register", USAGE_REGISTER),
        Some("unregister") => ("unregister", USAGE_UNREGISTER),
        Some(other) => return Err(usage(format!("unknown command {other:?}"), USAGE)),
    };
    let takes_value: &[&str] = if subcommand == "register" {
        &[
            "--allocator-url",
            "--token",
            "--name",
            "--address",
            "--config",
        ]
    } else {
        &["--config"]
    };
    let flags: &[&str] = if subcommand == "register" {
        &["--allow-reboot", "--no-service"]
    } else {
        &["--no-service"]
    };
    let mut values: Vec<(&str, String)> = Vec::new();
    let mut set_flags: Vec<&str> = Vec::new();
    while let Some(arg) = args.next() {
        if matches!(arg.as_str(), "-h" | "--help") {
            return Ok(Command::Help);
        }
        let (option, inline) = match arg.split_once('=') {
            Some((option, value)) if option.starts_with("--") => (option, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        if let Some(&option) = takes_value.iter().find(|o| **o == option) {
            let value = match inline {
                Some(value) => value,
                None => args
                    .next()
                    .ok_or_else(|| usage(format!("{option} needs a value"), usage_line))?,
            };
            if values.iter().any(|(o, _)| *o == option) {
                return Err(usage(format!("{option} is given twice"), usage_line));
            }
            values.push((option, value));
        } else if let Some(&flag) = flags.iter().find(|f| **f == option) {
            if inline.is_some() {
                return Err(usage(format!("{flag} takes no value"), usage_line));
            }
            if set_flags.contains(&flag) {
                return Err(usage(format!("{flag} is given twice"), usage_line));
            }
            set_flags.push(flag);
        } else if option.starts_with('-') {
            return Err(usage(
                format!("unknown option {option:?} for {subcommand}"),
                usage_line,
            ));
        } else {
            return Err(usage(format!("unexpected argument {arg:?}"), usage_line));
        }
    }
    let value = |option: &str| {
        values
            .iter()
            .find(|(o, _)| *o == option)
            .map(|(_, v)| v.as_str())
    };
    let config = value("--config").unwrap_or(DEFAULT_CONFIG);
    let config = std::path::absolute(config)
        .ok()
        .filter(|_| !config.trim().is_empty())
        .ok_or_else(|| usage(format!("--config {config:?} is not a path"), usage_line))?;
    let no_service = set_flags.contains(&"--no-service");
    if subcommand == "unregister" {
        return Ok(Command::Unregister(UnregisterArgs { config, no_service }));
    }

    let url =
        value("--allocator-url").ok_or_else(|| usage("--allocator-url is required", usage_line))?;
    let allocator_url = Url::parse(url.trim())
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| {
            usage(
                format!("--allocator-url {url:?} is not an http(s) URL"),
                usage_line,
            )
        })?;
    let token = match value("--token").or(env_token.filter(|t| !t.trim().is_empty())) {
        Some(token) => RegistrationToken::new(token).map_err(|e| usage(e, usage_line))?,
        None => {
            return Err(usage(
                format!("--token (or {TOKEN_VAR}) is required"),
                usage_line,
            ))
        }
    };
    let name = value("--name")
        .map(|name| {
            name.trim().parse::<Hostname>().map_err(|e| {
                usage(
                    format!("--name {name:?} is not a valid name: {}", e.message()),
                    usage_line,
                )
            })
        })
        .transpose()?;
    let address = match value("--address").map(str::trim) {
        Some("") => return Err(usage("--address is empty", usage_line)),
        Some(address) if address.chars().any(char::is_control) => {
            return Err(usage("--address contains control characters", usage_line))
        }
        other => other.map(str::to_owned),
    };
    Ok(Command::Register(RegisterArgs {
        allocator_url,
        token,
        name,
        allow_reboot: set_flags.contains(&"--allow-reboot"),
        address,
        config,
        no_service,
    }))
}

/// A machine's hostname as a LabLink name: lower-cased, every character outside
/// `[a-z0-9._-]` replaced by `-` (leading ones that are not a letter or digit dropped, as a
/// name must start with one). `None` when nothing is left.
pub fn sanitize_name(hostname: &str) -> Option<Hostname> {
    let name: String = hostname
        .trim()
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .parse()
        .ok()
}

/// A machine identity: 256 random bits from the operating system, as 64 lowercase hex
/// characters.
pub fn new_identity() -> io::Result<String> {
    use rand::RngCore as _;

    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(io::Error::other)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `identity` is one the allocator takes: 16 to 128 of `[A-Za-z0-9_-]`.
pub fn is_identity(identity: &str) -> bool {
    (16..=128).contains(&identity.len())
        && identity
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// The identity file of a machine whose settings file is `config`: `identity_file` (set from
/// `LABLINK_IDENTITY_FILE`) when given, else [`IDENTITY_FILE_NAME`] in `config`'s directory.
pub fn identity_path(config: &Path, identity_file: Option<&Path>) -> PathBuf {
    match identity_file {
        Some(file) => file.to_owned(),
        None => parent_of(config).join(IDENTITY_FILE_NAME),
    }
}

/// The machine's identity from the file at `path` (trimmed), or, when there is no such file,
/// a [`new_identity`] written to it the way [`write_config`] writes (a temporary file created
/// with mode 0600, then renamed; its directory created, mode 0700, if missing; an existing
/// file is never replaced). Whether it was created comes with it. The error names the file,
/// never its content.
pub fn load_or_create_identity(path: &Path) -> Result<(String, bool), String> {
    let read = |path: &Path| match std::fs::read_to_string(path) {
        Ok(text) => {
            let identity = text.trim();
            if is_identity(identity) {
                Ok(Some(identity.to_owned()))
            } else {
                Err(format!(
                    "the identity file {} does not hold a machine identity (16 to 128 of \
                     A-Z a-z 0-9 _ -); restore it from a backup, or remove it to make a new \
                     identity (which cannot register this machine's name again)",
                    path.display()
                ))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "cannot read the identity file {}: {e} (run as root, or set {IDENTITY_FILE_VAR})",
            path.display()
        )),
    };
    if let Some(identity) = read(path)? {
        return Ok((identity, false));
    }
    let cannot_write = |e: io::Error| {
        format!(
            "cannot write the identity file {}: {e} (run as root, or set {IDENTITY_FILE_VAR})",
            path.display()
        )
    };
    let identity = new_identity().map_err(cannot_write)?;
    match write_new_atomic(path, format!("{identity}\n").as_bytes(), 0o600, 0o700) {
        Ok(()) => Ok((identity, true)),
        // Created meanwhile (another `register`): that one counts.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match read(path)? {
            Some(identity) => Ok((identity, false)),
            None => Err(cannot_write(e)),
        },
        Err(e) => Err(cannot_write(e)),
    }
}

/// The settings file's text with `settings` set: a line already setting one of them is
/// replaced where it is (later ones dropped), the others are appended; every other line
/// (comments, other settings) is kept as it was.
pub fn merge_config(existing: &str, settings: &[(&str, &str)]) -> String {
    let mut done = vec![false; settings.len()];
    let mut text = String::new();
    for line in existing.lines() {
        let trimmed = line.trim_start();
        let key = (!trimmed.starts_with('#'))
            .then(|| trimmed.split_once('='))
            .flatten()
            .map(|(key, _)| key.trim());
        if let Some(i) = key.and_then(|key| settings.iter().position(|(k, _)| *k == key)) {
            if !done[i] {
                done[i] = true;
                text.push_str(&format!("{}={}\n", settings[i].0, settings[i].1));
            }
            continue;
        }
        text.push_str(line);
        text.push('\n');
    }
    for ((key, value), done) in settings.iter().zip(done) {
        if !done {
            text.push_str(&format!("{key}={value}\n"));
        }
    }
    text
}

/// Sets `settings` in the `KEY=value` file at `path` ([`merge_config`]), which is replaced
/// atomically by a file created with mode 0600 (its directory is created, mode 0700, if
/// missing). A value may not hold a line break.
pub fn write_config(path: &Path, settings: &[(&str, &str)]) -> io::Result<()> {
    if let Some((key, _)) = settings
        .iter()
        .find(|(_, v)| v.contains(['\n', '\r']) || v.trim() != *v)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the value of {key} cannot be written on one line"),
        ));
    }
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    write_atomic(
        path,
        merge_config(&existing, settings).as_bytes(),
        0o600,
        0o700,
    )
}

/// Writes `path` through a temporary file of mode `mode` in the same directory (created with
/// `dir_mode` if missing), renamed over it.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32, dir_mode: u32) -> io::Result<()> {
    write_through_temp(path, bytes, mode, dir_mode, false)
}

/// Like [`write_atomic`], but fails with [`io::ErrorKind::AlreadyExists`] instead of
/// replacing a file that exists (the temporary file is linked to `path`, which never
/// replaces; renamed where the file system has no hard links).
fn write_new_atomic(path: &Path, bytes: &[u8], mode: u32, dir_mode: u32) -> io::Result<()> {
    write_through_temp(path, bytes, mode, dir_mode, true)
}

fn write_through_temp(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    dir_mode: u32,
    no_replace: bool,
) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

    let dir = parent_of(path);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(dir_mode)
        .create(dir)?;
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let temp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        // The umask may have taken bits away; never added any.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        if !no_replace {
            return std::fs::rename(&temp, path);
        }
        match std::fs::hard_link(&temp, path) {
            Ok(()) => std::fs::remove_file(&temp),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
            Err(_) if path.exists() => Err(io::ErrorKind::AlreadyExists.into()),
            // No hard links on this file system: renamed (a race is then possible, unlikely).
            Err(_) => std::fs::rename(&temp, path),
        }
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Whether a file can be written at `path` (its directory is created if missing): checked
/// before the registration, so a one-time token is not spent on a machine that cannot keep
/// its agent token.
fn check_writable(path: &Path, dir_mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;

    let dir = parent_of(path);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(dir_mode)
        .create(dir)?;
    let probe = dir.join(format!(
        ".lablink-agent.{}.probe",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

/// The systemd unit that runs the agent of a registered machine: `executable` with the
/// settings file `config`, restarted always except after exit status 3 (the machine is no
/// longer registered).
pub fn unit_text(executable: &Path, config: &Path) -> Result<String, String> {
    let executable = systemd_word(&executable.display().to_string())?;
    let environment = systemd_word(&format!("LABLINK_AGENT_CONFIG={}", config.display()))?;
    Ok(format!(
        "\
# Written by `lablink-agent register`; `lablink-agent unregister` removes it.
# Exit status 3: the allocator no longer knows this machine, so it is not restarted then.
[Unit]
Description=LabLink agent (this machine in a LabLink allocator's pool)
Wants=network-online.target
After=network-online.target

[Service]
Environment={environment}
ExecStart={executable}
Restart=always
RestartSec=5
RestartPreventExitStatus={}

[Install]
WantedBy=multi-user.target
",
        crate::EXIT_UNREGISTERED
    ))
}

/// One word of a unit file's `ExecStart=` or `Environment=`: `%` doubled, quoted when it
/// holds blanks, quotes or backslashes.
fn systemd_word(word: &str) -> Result<String, String> {
    if word.chars().any(char::is_control) {
        return Err(format!("{word:?} cannot go into a systemd unit"));
    }
    let word = word.replace('%', "%%");
    if word.contains(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';')) {
        Ok(format!(
            "\"{}\"",
            word.replace('\\', "\\\\").replace('"', "\\\"")
        ))
    } else {
        Ok(word)
    }
}

/// A word for a shell command line that is printed: quoted when it needs to be.
fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '=' | ':' | ',')
        })
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// What `register` and `unregister` touch on this machine: the real system's files and
/// programs ([`System::from_env`]), or a test's.
#[derive(Debug, Clone)]
pub struct System {
    /// The identity file (`LABLINK_IDENTITY_FILE`); `None`: [`IDENTITY_FILE_NAME`] next to the
    /// settings file (see [`identity_path`]).
    pub identity_file: Option<PathBuf>,
    /// The machine's hostname, as the kernel has it.
    pub hostname: Option<String>,
    /// This program, for the unit's `ExecStart=`.
    pub executable: Option<PathBuf>,
    /// The unit file to write (its file name, less `.service`, is the service's name).
    pub unit_path: PathBuf,
    /// The `systemctl` to run.
    pub systemctl: PathBuf,
    /// `LABLINK_REGISTRATION_TOKEN`, as set (checked when it is used).
    pub registration_token: Option<RegistrationToken>,
}

impl System {
    /// This machine: `LABLINK_IDENTITY_FILE` (if set), the kernel's hostname, this program,
    /// [`UNIT_PATH`], `systemctl` on `PATH`, and `LABLINK_REGISTRATION_TOKEN`.
    pub fn from_env() -> Self {
        let identity_file = std::env::var_os(IDENTITY_FILE_VAR)
            .filter(|file| !file.is_empty())
            .map(|file| std::path::absolute(&file).unwrap_or_else(|_| file.into()));
        let hostname = ["/proc/sys/kernel/hostname", "/etc/hostname"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .map(|h| h.trim().to_owned())
            .find(|h| !h.is_empty());
        Self {
            identity_file,
            hostname,
            executable: std::env::current_exe().ok(),
            unit_path: UNIT_PATH.into(),
            systemctl: "systemctl".into(),
            // As set: `parse` checks it (and says so when it is not a token).
            registration_token: std::env::var(TOKEN_VAR).ok().map(RegistrationToken),
        }
    }

    fn service(&self) -> String {
        self.unit_path
            .file_stem()
            .map_or_else(|| SERVICE.to_owned(), |s| s.to_string_lossy().into_owned())
    }

    /// This program's path, for the unit or the printed command.
    fn executable(&self) -> Result<&Path, Failed> {
        self.executable
            .as_deref()
            .filter(|p| p.is_absolute() && p.exists())
            .ok_or_else(|| {
                Failed("cannot tell where this program is (for the service's ExecStart)".into())
            })
    }

    /// Runs `systemctl args...`: whether it exited 0, and what it said.
    async fn run_systemctl(&self, args: &[&str]) -> Result<(bool, String), Failed> {
        let output = tokio::process::Command::new(&self.systemctl)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| {
                Failed(format!(
                    "`{}` could not be run: {e} (without systemd, use --no-service)",
                    self.systemctl.display()
                ))
            })?;
        let said = String::from_utf8_lossy(&output.stderr);
        Ok((
            output.status.success(),
            said.split_whitespace().collect::<Vec<_>>().join(" "),
        ))
    }

    /// Runs `systemctl args...`, which must succeed.
    async fn systemctl(&self, args: &[&str]) -> Result<(), Failed> {
        match self.run_systemctl(args).await? {
            (true, _) => Ok(()),
            (false, said) => Err(Failed(format!(
                "`systemctl {}` failed{}",
                args.join(" "),
                if said.is_empty() {
                    String::new()
                } else {
                    format!(": {said}")
                }
            ))),
        }
    }
}

/// A command that failed: one line for stderr (exit status 1).
#[derive(Debug)]
struct Failed(String);

/// Runs a command line (the arguments after the program name) and returns its exit status:
/// 0 done, 1 failed, 2 bad arguments. Results go to `out`, errors to `err`.
pub async fn main(
    args: impl IntoIterator<Item = OsString>,
    system: &System,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let env_token = system.registration_token.as_ref().map(|t| t.expose());
    let command = match parse(args, env_token) {
        Ok(command) => command,
        Err(e) => {
            let _ = writeln!(err, "lablink-agent: {}\n{}", e.message, e.usage);
            return 2;
        }
    };
    let done = match command {
        Command::Help => {
            let _ = out.write_all(HELP.as_bytes());
            return 0;
        }
        Command::Register(args) => register(&args, system, out).await,
        Command::Unregister(args) => unregister(&args, system, out).await,
    };
    let _ = out.flush();
    match done {
        Ok(()) => 0,
        Err(Failed(message)) => {
            let _ = writeln!(err, "lablink-agent: {message}");
            1
        }
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .user_agent(concat!("lablink-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a reqwest client without custom TLS roots always builds")
}

/// `{base}/api/v1/{route}`, keeping the base's own path.
fn api_url(base: &Url, route: &str) -> Url {
    let mut url = base.clone();
    let path = format!("{}/api/v1/{route}", base.path().trim_end_matches('/'));
    url.set_path(&path);
    url.set_query(None);
    url.set_fragment(None);
    url
}

/// The `error` of an error answer, else the status's reason.
async fn error_message(response: reqwest::Response) -> String {
    let status = response.status();
    response
        .json::<ErrorBody>()
        .await
        .map_or_else(|_| status.to_string(), |body| body.error)
}

async fn register(args: &RegisterArgs, system: &System, out: &mut dyn Write) -> Result<(), Failed> {
    // Everything that can fail here is checked before the token is spent.
    let name = match &args.name {
        Some(name) => name.clone(),
        None => system
            .hostname
            .as_deref()
            .and_then(sanitize_name)
            .ok_or_else(|| {
                Failed("cannot make a name of this machine's hostname; pass --name".into())
            })?,
    };
    let config = &args.config;
    check_writable(config, 0o700).map_err(|e| {
        Failed(format!(
            "cannot write the settings file {}: {e} (run as root, or choose it with --config)",
            config.display()
        ))
    })?;
    // Never printed: whoever has it can register this machine's name.
    let identity_file = identity_path(config, system.identity_file.as_deref());
    let (machine_identity, _) = load_or_create_identity(&identity_file).map_err(Failed)?;
    let executable = if args.no_service {
        system.executable().ok()
    } else {
        let executable = system.executable()?;
        check_writable(&system.unit_path, 0o755).map_err(|e| {
            Failed(format!(
                "cannot write the unit {}: {e} (run as root, or use --no-service)",
                system.unit_path.display()
            ))
        })?;
        Some(executable)
    };
    let unit = executable
        .filter(|_| !args.no_service)
        .map(|exe| unit_text(exe, config))
        .transpose()
        .map_err(Failed)?;

    let body = RegistrationBody {
        hostname: name.to_string(),
        machine_identity,
        allow_reboot: args.allow_reboot,
        address: args.address.clone(),
    };
    let response = http_client()
        .post(api_url(&args.allocator_url, "registrations"))
        .bearer_auth(args.token.expose())
        .json(&body)
        .send()
        .await
        .map_err(|e| Failed(format!("cannot reach the allocator: {}", e.without_url())))?;
    let status = response.status();
    if !status.is_success() {
        let message = error_message(response).await;
        return Err(Failed(format!(
            "the allocator refused the registration ({status}): {message}"
        )));
    }
    // A decoding error could quote the token: say only that it failed.
    let registered: RegisteredBody = response.json().await.map_err(|_| {
        Failed(format!(
            "the allocator's answer ({status}) is not a registration"
        ))
    })?;
    let hostname: Hostname = registered.hostname.parse().map_err(|_| {
        Failed(format!(
            "the allocator answered the name {:?}, which is not valid",
            registered.hostname
        ))
    })?;
    let token = registered.token.as_str();
    if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic() && c != '"') {
        return Err(Failed(
            "the allocator answered an agent token that cannot be stored".into(),
        ));
    }
    let again = registered.again || status == StatusCode::OK;
    let what = if again {
        "registered again"
    } else {
        "registered"
    };

    write_config(
        config,
        &[
            ("ALLOCATOR_URL", args.allocator_url.as_str()),
            ("VM_NAME", hostname.as_str()),
            ("API_TOKEN", token),
            ("LABLINK_REGISTERED", "1"),
            (
                "LABLINK_ALLOW_REBOOT",
                if args.allow_reboot { "1" } else { "0" },
            ),
        ],
    )
    .map_err(|e| {
        Failed(format!(
            "{what} as {hostname}, but the settings file {} could not be written: {e}; \
             register again",
            config.display()
        ))
    })?;

    let by_hand = format!(
        "LABLINK_AGENT_CONFIG={} {}",
        shell_word(&config.display().to_string()),
        shell_word(&executable.map_or_else(|| "lablink-agent".into(), |e| e.display().to_string()))
    );
    let Some(unit) = unit else {
        let _ = writeln!(
            out,
            "{what} as {hostname} (settings in {})",
            config.display()
        );
        let _ = writeln!(out, "run the agent: {by_hand}");
        return Ok(());
    };
    let service = system.service();
    let installed = async {
        write_atomic(&system.unit_path, unit.as_bytes(), 0o644, 0o755).map_err(|e| {
            Failed(format!(
                "{} could not be written: {e}",
                system.unit_path.display()
            ))
        })?;
        system.systemctl(&["daemon-reload"]).await?;
        let (running, _) = system
            .run_systemctl(&["is-active", "--quiet", &service])
            .await?;
        system.systemctl(&["enable", "--now", &service]).await?;
        if running {
            // It still has the previous token.
            system.systemctl(&["restart", &service]).await?;
        }
        Ok::<_, Failed>(())
    };
    match installed.await {
        Ok(()) => {
            let _ = writeln!(
                out,
                "{what} as {hostname}; the {service} service runs its agent (settings in {})",
                config.display()
            );
            Ok(())
        }
        Err(Failed(e)) => Err(Failed(format!(
            "{what} as {hostname} (settings in {}), but the {service} service could not be \
             started: {e}; run the agent: {by_hand}",
            config.display()
        ))),
    }
}

async fn unregister(
    args: &UnregisterArgs,
    system: &System,
    out: &mut dyn Write,
) -> Result<(), Failed> {
    let config = &args.config;
    if !config.exists() {
        return Err(Failed(format!(
            "{} does not exist: this machine does not seem registered (or pass --config)",
            config.display()
        )));
    }
    let settings = crate::config::read_file(&config.display().to_string())
        .map_err(|e| Failed(e.to_string()))?;
    let setting = |key: &str| {
        settings
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    if !matches!(setting("LABLINK_REGISTERED"), Some("1" | "true")) {
        return Err(Failed(format!(
            "{} is not the settings of a registered machine (no LABLINK_REGISTERED=1); \
             nothing was done",
            config.display()
        )));
    }
    let missing = |key: &str| Failed(format!("{} has no {key}", config.display()));
    let url = setting("ALLOCATOR_URL").ok_or_else(|| missing("ALLOCATOR_URL"))?;
    let url = Url::parse(url).map_err(|_| {
        Failed(format!(
            "ALLOCATOR_URL in {} is not a URL",
            config.display()
        ))
    })?;
    let name: Hostname = setting("VM_NAME")
        .ok_or_else(|| missing("VM_NAME"))?
        .parse()
        .map_err(|_| Failed(format!("VM_NAME in {} is not valid", config.display())))?;
    let token = setting("API_TOKEN").ok_or_else(|| missing("API_TOKEN"))?;

    let response = http_client()
        .request(
            Method::DELETE,
            api_url(&url, &format!("vms/{name}/registration")),
        )
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| {
            Failed(format!(
                "cannot reach the allocator: {}; nothing was removed (try again)",
                e.without_url()
            ))
        })?;
    let status = response.status();
    if status.is_success() {
        let _ = writeln!(
            out,
            "unregistered {name}: the allocator takes it out of its pool"
        );
    } else if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::NOT_FOUND) {
        let _ = writeln!(
            out,
            "{name} was already unregistered (the allocator answered {status})"
        );
    } else {
        let message = error_message(response).await;
        return Err(Failed(format!(
            "the allocator refused to unregister {name} ({status}): {message}; nothing was \
             removed"
        )));
    }

    // From here on every step is tried; what failed is reported at the end.
    let mut failures = Vec::new();
    if !args.no_service {
        let service = system.service();
        if system.unit_path.exists() {
            match system.systemctl(&["disable", "--now", &service]).await {
                Ok(()) => {
                    let _ = writeln!(out, "stopped and disabled the {service} service");
                }
                Err(Failed(e)) => failures.push(e),
            }
            match std::fs::remove_file(&system.unit_path) {
                Ok(()) => {
                    let _ = writeln!(out, "removed {}", system.unit_path.display());
                }
                Err(e) => failures.push(format!(
                    "{} could not be removed: {e}",
                    system.unit_path.display()
                )),
            }
            if let Err(Failed(e)) = system.systemctl(&["daemon-reload"]).await {
                failures.push(e);
            }
        } else {
            let _ = writeln!(
                out,
                "no {service} service to remove ({} does not exist)",
                system.unit_path.display()
            );
        }
    }
    match std::fs::remove_file(config) {
        Ok(()) => {
            let _ = writeln!(out, "removed {}", config.display());
        }
        Err(e) => failures.push(format!("{} could not be removed: {e}", config.display())),
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Failed(failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::test_http::{Reply, Request, TestServer};

    const REGISTRATION_TOKEN: &str = "reg-s3cret-token";
    const AGENT_TOKEN: &str = "agent-s3cret-token";

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn parse_register(list: &[&str], env: Option<&str>) -> Result<RegisterArgs, UsageError> {
        let mut all = vec!["register"];
        all.extend_from_slice(list);
        match parse(args(&all), env)? {
            Command::Register(a) => Ok(a),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn register_arguments_parse_in_both_forms() {
        let a = parse_register(
            &[
                "--allocator-url",
                "https://lablink.example.org/base",
                "--token=t0k",
                "--name",
                "lab-ws-07",
                "--allow-reboot",
                "--address=10.1.2.3",
                "--config",
                "/tmp/x/agent.env",
                "--no-service",
            ],
            None,
        )
        .unwrap();
        assert_eq!(a.allocator_url.as_str(), "https://lablink.example.org/base");
        assert_eq!(a.token.expose(), "t0k");
        assert_eq!(a.name.unwrap().as_str(), "lab-ws-07");
        assert!(a.allow_reboot && a.no_service);
        assert_eq!(a.address.as_deref(), Some("10.1.2.3"));
        assert_eq!(a.config, Path::new("/tmp/x/agent.env"));

        // Defaults; the token from the environment; a relative config made absolute.
        let a = parse_register(
            &[
                "--allocator-url=http://10.0.0.1:5000",
                "--config",
                "agent.env",
            ],
            Some("from-env"),
        )
        .unwrap();
        assert_eq!(a.token.expose(), "from-env");
        assert!(a.name.is_none() && a.address.is_none());
        assert!(!a.allow_reboot && !a.no_service);
        assert!(a.config.is_absolute() && a.config.ends_with("agent.env"));
        let a = parse_register(
            &["--allocator-url=http://h", "--token", "flag"],
            Some("env"),
        )
        .unwrap();
        assert_eq!(a.token.expose(), "flag", "the flag wins");
        assert_eq!(a.config, Path::new(DEFAULT_CONFIG));

        assert_eq!(
            parse(args(&["unregister"]), None).unwrap(),
            Command::Unregister(UnregisterArgs {
                config: DEFAULT_CONFIG.into(),
                no_service: false
            })
        );
        assert_eq!(
            parse(
                args(&["unregister", "--config=/e/a.env", "--no-service"]),
                None
            )
            .unwrap(),
            Command::Unregister(UnregisterArgs {
                config: "/e/a.env".into(),
                no_service: true
            })
        );
        for help in [
            &["--help"][..],
            &["-h"],
            &["register", "--help"],
            &["unregister", "-h"],
        ] {
            assert_eq!(parse(args(help), None).unwrap(), Command::Help);
        }
    }

    #[test]
    fn bad_arguments_say_what_is_wrong_with_a_usage_line() {
        let url = "--allocator-url=http://10.0.0.1:5000";
        for (list, env, expected) in [
            (vec!["register", url], Some("a b"), "printable ASCII"),
            (vec![], None, "no command"),
            (vec!["regster"], None, "unknown command \"regster\""),
            (
                vec!["register", "--token=t"],
                None,
                "--allocator-url is required",
            ),
            (
                vec!["register", url],
                None,
                "--token (or LABLINK_REGISTRATION_TOKEN)",
            ),
            (vec!["register", url], Some("  "), "--token (or"),
            (vec!["register", url, "--token="], None, "token is empty"),
            (
                vec!["register", url, "--token", "a b"],
                None,
                "printable ASCII",
            ),
            (
                vec!["register", url, "--token"],
                None,
                "--token needs a value",
            ),
            (
                vec!["register", "--allocator-url", "ftp://x", "--token=t"],
                None,
                "not an http(s) URL",
            ),
            (
                vec!["register", url, "--token=t", "--name", "bad name;"],
                None,
                "--name \"bad name;\"",
            ),
            (
                vec!["register", url, "--token=t", "--name=a", "--name=b"],
                None,
                "--name is given twice",
            ),
            (
                vec!["register", url, "--token=t", "--allow-reboot=yes"],
                None,
                "takes no value",
            ),
            (
                vec!["register", url, "--token=t", "--force"],
                None,
                "unknown option \"--force\"",
            ),
            (
                vec!["register", url, "--token=t", "extra"],
                None,
                "unexpected argument \"extra\"",
            ),
            (
                vec!["register", url, "--token=t", "--address="],
                None,
                "--address is empty",
            ),
            (
                vec!["register", url, "--token=t", "--config="],
                None,
                "--config \"\"",
            ),
            (
                vec!["unregister", "--allow-reboot"],
                None,
                "unknown option \"--allow-reboot\"",
            ),
        ] {
            let e = parse(args(&list), env).unwrap_err();
            assert!(e.message.contains(expected), "{list:?}: {e:?}");
            assert!(e.usage.starts_with("usage: lablink-agent"), "{e:?}");
            assert!(!e.message.contains('\n'));
        }
        let e = parse(args(&["unregister", "--bogus"]), None).unwrap_err();
        assert_eq!(e.usage, USAGE_UNREGISTER);
    }

    #[test]
    fn names_are_sanitised_hostnames() {
        for (hostname, expected) in [
            ("lab-ws-07", Some("lab-ws-07")),
            ("Lab-WS_07.Example.ORG\n", Some("lab-ws_07.example.org")),
            ("My Machine (2)", Some("my-machine--2-")),
            ("École-ws", Some("cole-ws")),
            ("-x", Some("x")),
            ("", None),
            ("---", None),
        ] {
            assert_eq!(
                sanitize_name(hostname).as_ref().map(Hostname::as_str),
                expected,
                "{hostname:?}"
            );
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn is_hex_identity(identity: &str) -> bool {
        identity.len() == 64
            && identity
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    }

    #[test]
    fn the_identity_file_is_next_to_the_settings_unless_named() {
        assert_eq!(
            identity_path(Path::new("/tmp/x/ws.env"), None),
            Path::new("/tmp/x/machine-identity")
        );
        assert_eq!(
            identity_path(Path::new(DEFAULT_CONFIG), None),
            Path::new(DEFAULT_IDENTITY_FILE)
        );
        assert_eq!(
            identity_path(Path::new("/tmp/x/ws.env"), Some(Path::new("/srv/id"))),
            Path::new("/srv/id")
        );
    }

    #[test]
    fn the_identity_is_a_private_random_secret_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("new/dir/machine-identity");
        let (identity, created) = load_or_create_identity(&file).unwrap();
        assert!(created);
        assert!(is_hex_identity(&identity), "{identity}");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            format!("{identity}\n")
        );
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().unwrap()), 0o700);
        let leftovers: Vec<_> = std::fs::read_dir(file.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["machine-identity"], "no temporary file is left");

        // Kept: the same identity every time.
        assert_eq!(
            load_or_create_identity(&file).unwrap(),
            (identity.clone(), false)
        );
        // Another machine, another identity.
        let (other, _) = load_or_create_identity(&dir.path().join("other")).unwrap();
        assert!(is_hex_identity(&other) && other != identity);
        // An existing file is never replaced.
        let e = write_new_atomic(&file, b"x", 0o600, 0o700).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            format!("{identity}\n")
        );

        // One the admin wrote (or restored) is used as it is, trimmed.
        let own = dir.path().join("own");
        std::fs::write(&own, "  My_Own-identity-0123 \n").unwrap();
        assert_eq!(
            load_or_create_identity(&own).unwrap(),
            ("My_Own-identity-0123".to_owned(), false)
        );
    }

    #[test]
    fn a_bad_identity_file_is_named_but_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("machine-identity");
        for bad in [
            String::new(),
            "too-short-1234".to_owned(),
            "secret identity with spaces".to_owned(),
            "secret/identity/0123456789".to_owned(),
            "a".repeat(129),
        ] {
            std::fs::write(&file, &bad).unwrap();
            let e = load_or_create_identity(&file).unwrap_err();
            assert!(
                e.contains(&file.display().to_string())
                    && e.contains("does not hold a machine identity"),
                "{e}"
            );
            assert!(bad.is_empty() || !e.contains(&bad), "{e}");
            assert!(!e.contains('\n'));
            assert_eq!(
                std::fs::read_to_string(&file).unwrap(),
                bad,
                "left as it was"
            );
        }
        for good in ["a".repeat(16), "Z-_9".repeat(32)] {
            assert!(is_identity(&good), "{good}");
        }
        let e = load_or_create_identity(dir.path()).unwrap_err();
        assert!(e.contains("cannot read the identity file"), "{e}");
        let blocked = dir.path().join("machine-identity/under-a-file");
        let e = load_or_create_identity(&blocked).unwrap_err();
        assert!(
            e.contains(&blocked.display().to_string()) && e.contains(IDENTITY_FILE_VAR),
            "{e}"
        );
    }

    #[test]
    fn the_settings_are_merged_into_the_other_lines() {
        let existing = "# my settings\nLABLINK_START_HOST=dry-run\nAPI_TOKEN=old\n\n\
                        # API_TOKEN=commented\nVM_NAME = old-name\nAPI_TOKEN=older\nnot a setting\n";
        let merged = merge_config(
            existing,
            &[
                ("ALLOCATOR_URL", "http://h/"),
                ("VM_NAME", "ws-1"),
                ("API_TOKEN", "new"),
                ("LABLINK_REGISTERED", "1"),
            ],
        );
        assert_eq!(
            merged,
            "# my settings\nLABLINK_START_HOST=dry-run\nAPI_TOKEN=new\n\n\
             # API_TOKEN=commented\nVM_NAME=ws-1\nnot a setting\nALLOCATOR_URL=http://h/\n\
             LABLINK_REGISTERED=1\n"
        );
        assert_eq!(merge_config("", &[("A", "1")]), "A=1\n");
    }

    #[test]
    fn the_settings_file_is_private_from_the_start_and_keeps_other_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("new/dir/agent.env");
        let settings = [
            ("ALLOCATOR_URL", "http://10.0.0.1:5000/"),
            ("VM_NAME", "ws-1"),
            ("API_TOKEN", AGENT_TOKEN),
            ("LABLINK_REGISTERED", "1"),
        ];
        write_config(&file, &settings).unwrap();
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().unwrap()), 0o700);

        // An existing, readable file: replaced by a private one, its lines kept.
        std::fs::write(&file, "LABLINK_START_HOST=dry-run\nAPI_TOKEN=old\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_config(&file, &settings).unwrap();
        assert_eq!(mode(&file), 0o600);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("LABLINK_START_HOST=dry-run\nAPI_TOKEN=agent-s3cret-token\n"));
        let leftovers: Vec<_> = std::fs::read_dir(file.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["agent.env"], "no temporary file is left");

        // The agent reads it.
        let c = crate::AgentConfig::from_vars([(
            "LABLINK_AGENT_CONFIG".into(),
            file.clone().into_os_string(),
        )])
        .unwrap();
        assert!(c.registered);
        assert_eq!(c.vm_name.as_str(), "ws-1");
        assert_eq!(c.api_token.as_ref().unwrap().expose(), AGENT_TOKEN);
        assert_eq!(c.start_host, crate::StartHost::DryRun);

        let e = write_config(&file, &[("API_TOKEN", "a\nb")]).unwrap_err();
        assert!(e.to_string().contains("API_TOKEN"));
    }

    #[test]
    fn the_unit_runs_this_program_with_its_settings() {
        let unit = unit_text(
            Path::new("/usr/local/bin/lablink-agent"),
            Path::new("/etc/lablink/agent.env"),
        )
        .unwrap();
        for line in [
            "ExecStart=/usr/local/bin/lablink-agent\n",
            "Environment=LABLINK_AGENT_CONFIG=/etc/lablink/agent.env\n",
            "Restart=always\n",
            "RestartPreventExitStatus=3\n",
            "WantedBy=multi-user.target\n",
        ] {
            assert!(unit.contains(line), "{line:?} missing from\n{unit}");
        }
        let unit = unit_text(Path::new("/opt/my tools/agent"), Path::new("/e/100%.env")).unwrap();
        assert!(
            unit.contains("ExecStart=\"/opt/my tools/agent\"\n"),
            "{unit}"
        );
        assert!(
            unit.contains("Environment=LABLINK_AGENT_CONFIG=/e/100%%.env\n"),
            "{unit}"
        );
        assert!(unit_text(Path::new("/a\nb"), Path::new("/c")).is_err());
    }

    #[test]
    fn debug_output_never_shows_a_token() {
        let a = parse_register(
            &["--allocator-url=http://h", "--token", REGISTRATION_TOKEN],
            None,
        )
        .unwrap();
        let system = System {
            registration_token: Some(RegistrationToken::new(REGISTRATION_TOKEN).unwrap()),
            ..System::from_env()
        };
        let registered = RegisteredBody {
            hostname: "ws-1".into(),
            token: AGENT_TOKEN.into(),
            again: false,
        };
        for shown in [
            format!("{a:?}"),
            format!("{:?}", Command::Register(a.clone())),
            format!("{system:?}"),
            format!("{registered:?}"),
        ] {
            assert!(
                !shown.contains(REGISTRATION_TOKEN) && !shown.contains(AGENT_TOKEN),
                "{shown}"
            );
        }
    }

    /// A scratch machine: this "program", a unit directory and a `systemctl` that records
    /// its arguments (`is-active` exits `active_status`); its identity file is made next to
    /// the settings file, [`Machine::config`].
    struct Machine {
        dir: tempfile::TempDir,
        system: System,
    }

    impl Machine {
        fn new(active_status: u8, fail_enable: bool) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let exe = dir.path().join("bin/lablink-agent");
            std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
            std::fs::write(&exe, "").unwrap();
            let script = dir.path().join("systemctl.sh");
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\necho \"$*\" >> '{}'\ncase \"$1\" in\n  is-active) exit {active_status};;\n  \
                     enable) [ {fail_enable} = true ] && {{ echo 'Failed to enable unit' >&2; exit 1; }};;\nesac\nexit 0\n",
                    dir.path().join("systemctl.log").display()
                ),
            )
            .unwrap();
            let systemctl = dir.path().join("systemctl");
            // Installed by another process: no "text file busy" when it runs at once.
            let status = std::process::Command::new("install")
                .args(["-m", "0755"])
                .arg(&script)
                .arg(&systemctl)
                .status()
                .unwrap();
            assert!(status.success());
            let system = System {
                identity_file: None,
                hostname: Some("Lab-WS-07".into()),
                executable: Some(exe),
                unit_path: dir.path().join("systemd/lablink-agent.service"),
                systemctl,
                registration_token: None,
            };
            Self { dir, system }
        }

        fn config(&self) -> PathBuf {
            self.dir.path().join("etc/agent.env")
        }

        /// The identity file `register` uses.
        fn identity_file(&self) -> PathBuf {
            identity_path(&self.config(), self.system.identity_file.as_deref())
        }

        fn identity(&self) -> String {
            std::fs::read_to_string(self.identity_file())
                .unwrap()
                .trim()
                .to_owned()
        }

        fn systemctl_calls(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("systemctl.log")).unwrap_or_default()
        }

        async fn run(&self, list: &[&str]) -> (u8, String, String) {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let code = main(args(list), &self.system, &mut out, &mut err).await;
            let (out, err) = (
                String::from_utf8(out).unwrap(),
                String::from_utf8(err).unwrap(),
            );
            let identity = std::fs::read_to_string(self.identity_file()).unwrap_or_default();
            let identity = identity.trim();
            for text in [&out, &err] {
                assert!(
                    !text.contains(REGISTRATION_TOKEN) && !text.contains(AGENT_TOKEN),
                    "a token was printed: {text}"
                );
                assert!(
                    identity.is_empty() || !text.contains(identity),
                    "the identity was printed: {text}"
                );
            }
            (code, out, err)
        }
    }

    /// An allocator's registration routes: the right registration token registers (201, or
    /// 200 for `again`), any other is refused; DELETE answers `delete_status`.
    async fn allocator(again: bool, delete_status: u16) -> TestServer {
        TestServer::start(move |r: &Request| match (r.method.as_str(), r.path()) {
            ("POST", "/base/api/v1/registrations") => {
                if r.header("authorization") != Some(&format!("Bearer {REGISTRATION_TOKEN}")) {
                    return Reply::json(
                        401,
                        serde_json::json!({"error": "the registration token is unknown or expired"}),
                    );
                }
                Reply::json(
                    if again { 200 } else { 201 },
                    serde_json::json!({
                        "hostname": r.json()["hostname"],
                        "token": AGENT_TOKEN,
                        "again": again,
                    }),
                )
            }
            ("DELETE", "/base/api/v1/vms/lab-ws-07/registration") => {
                if r.header("authorization") != Some(&format!("Bearer {AGENT_TOKEN}")) {
                    return Reply::json(401, serde_json::json!({"error": "unknown token"}));
                }
                Reply::json(delete_status, serde_json::json!({"error": "as configured"}))
            }
            _ => Reply::json(404, serde_json::json!({"error": "no such route"})),
        })
        .await
    }

    #[tokio::test]
    async fn register_sends_the_name_and_identity_and_writes_the_settings() {
        let server = allocator(false, 202).await;
        let m = Machine::new(3, false);
        let url = format!("{}/base/", server.url);
        let config = m.config();
        let (code, out, err) = m
            .run(&[
                "register",
                "--allocator-url",
                &url,
                "--token",
                REGISTRATION_TOKEN,
                "--allow-reboot",
                "--address",
                "10.1.2.3",
                "--config",
                config.to_str().unwrap(),
                "--no-service",
            ])
            .await;
        assert_eq!(code, 0, "{err}");
        let exe = m.system.executable.as_ref().unwrap().display().to_string();
        assert_eq!(
            out,
            format!(
                "registered as lab-ws-07 (settings in {0})\nrun the agent: LABLINK_AGENT_CONFIG={0} {exe}\n",
                config.display()
            )
        );

        // The identity: made at the first registration, next to the settings, private.
        let identity_file = config.parent().unwrap().join("machine-identity");
        assert_eq!(m.identity_file(), identity_file);
        let identity = m.identity();
        assert!(is_hex_identity(&identity), "{identity}");
        assert_eq!(mode(&identity_file), 0o600);
        let requests = server.requests();
        assert_eq!(requests.len(), 1);
        let body = requests[0].json();
        assert_eq!(
            body,
            serde_json::json!({
                "hostname": "lab-ws-07",
                "machine_identity": identity,
                "allow_reboot": true,
                "address": "10.1.2.3",
            })
        );

        let text = std::fs::read_to_string(&config).unwrap();
        assert_eq!(
            text,
            format!(
                "ALLOCATOR_URL={url}\nVM_NAME=lab-ws-07\nAPI_TOKEN={AGENT_TOKEN}\nLABLINK_REGISTERED=1\n\
                 LABLINK_ALLOW_REBOOT=1\n"
            )
        );
        assert!(
            !text.contains(&identity),
            "the identity is only in its own file"
        );
        assert_eq!(mode(&config), 0o600);
        assert_eq!(m.systemctl_calls(), "", "--no-service runs no systemctl");
        assert!(!m.system.unit_path.exists());

        // Registered again: the same identity; without --allow-reboot, reboots are off.
        let (code, _, err) = m
            .run(&[
                "register",
                &format!("--allocator-url={url}"),
                &format!("--token={REGISTRATION_TOKEN}"),
                &format!("--config={}", config.display()),
                "--no-service",
            ])
            .await;
        assert_eq!(code, 0, "{err}");
        let requests = server.requests();
        assert_eq!(requests[1].json()["machine_identity"], identity.as_str());
        assert_eq!(requests[1].json()["allow_reboot"], false);
        assert_eq!(m.identity(), identity);
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(
            text.ends_with("LABLINK_REGISTERED=1\nLABLINK_ALLOW_REBOOT=0\n"),
            "{text}"
        );
        let agent = crate::AgentConfig::from_vars([(
            "LABLINK_AGENT_CONFIG".into(),
            config.clone().into_os_string(),
        )])
        .unwrap();
        assert!(agent.registered && !agent.allow_reboot);
    }

    #[tokio::test]
    async fn the_identity_file_can_be_named() {
        let server = allocator(false, 202).await;
        let mut m = Machine::new(3, false);
        let named = m.dir.path().join("secrets/id");
        m.system.identity_file = Some(named.clone());
        let (code, _, err) = m
            .run(&[
                "register",
                &format!("--allocator-url={}/base", server.url),
                &format!("--token={REGISTRATION_TOKEN}"),
                &format!("--config={}", m.config().display()),
                "--no-service",
            ])
            .await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(m.identity_file(), named);
        assert!(!m
            .config()
            .parent()
            .unwrap()
            .join("machine-identity")
            .exists());
        assert_eq!(
            server.requests()[0].json()["machine_identity"],
            m.identity().as_str()
        );
        assert_eq!(mode(&named), 0o600);
    }

    #[tokio::test]
    async fn a_registration_again_says_so() {
        let server = allocator(true, 202).await;
        let m = Machine::new(3, false);
        let config = m.config();
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::write(
            &config,
            "LABLINK_START_HOST=dry-run\nLABLINK_ALLOW_REBOOT=1\nAPI_TOKEN=previous\n",
        )
        .unwrap();
        let mut system = m.system.clone();
        system.registration_token = Some(RegistrationToken::new(REGISTRATION_TOKEN).unwrap());
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = main(
            args(&[
                "register",
                &format!("--allocator-url={}/base", server.url),
                "--name=Lab-WS-07",
                &format!("--config={}", config.display()),
                "--no-service",
            ]),
            &system,
            &mut out,
            &mut err,
        )
        .await;
        let out = String::from_utf8(out).unwrap();
        assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
        assert!(out.starts_with("registered again as Lab-WS-07 "), "{out}");
        assert!(!out.contains(AGENT_TOKEN) && !out.contains(REGISTRATION_TOKEN));
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(
            text.starts_with(&format!(
                "LABLINK_START_HOST=dry-run\nLABLINK_ALLOW_REBOOT=0\nAPI_TOKEN={AGENT_TOKEN}\n"
            )),
            "{text}"
        );
        assert_eq!(text.matches("LABLINK_ALLOW_REBOOT").count(), 1, "{text}");
    }

    #[tokio::test]
    async fn a_refused_registration_prints_the_allocators_message_and_writes_nothing() {
        let server = allocator(false, 202).await;
        let m = Machine::new(3, false);
        let config = m.config();
        let (code, out, err) = m
            .run(&[
                "register",
                &format!("--allocator-url={}/base", server.url),
                "--token=wrong-token",
                &format!("--config={}", config.display()),
            ])
            .await;
        assert_eq!(code, 1);
        assert_eq!(out, "");
        assert!(
            err.contains("the registration token is unknown or expired"),
            "{err}"
        );
        assert!(err.contains("401"), "{err}");
        assert!(!err.contains("wrong-token"), "{err}");
        assert!(!config.exists());
        assert!(!m.system.unit_path.exists());
        assert_eq!(m.systemctl_calls(), "");
    }

    #[tokio::test]
    async fn register_checks_the_machine_before_it_spends_the_token() {
        let server = allocator(false, 202).await;
        let m = Machine::new(3, false);
        let identity_file = m.identity_file();
        std::fs::create_dir_all(identity_file.parent().unwrap()).unwrap();
        std::fs::write(&identity_file, "not an identity\n").unwrap();
        let (code, _, err) = m
            .run(&[
                "register",
                &format!("--allocator-url={}/base", server.url),
                &format!("--token={REGISTRATION_TOKEN}"),
                &format!("--config={}", m.config().display()),
            ])
            .await;
        assert_eq!(code, 1);
        assert!(
            err.contains(&format!(
                "the identity file {} does not hold a machine identity",
                identity_file.display()
            )),
            "{err}"
        );
        assert!(!err.contains("not an identity"), "{err}");
        assert!(!m.config().exists());

        let m = Machine::new(3, false);
        let blocked = m.dir.path().join("file");
        std::fs::write(&blocked, "").unwrap();
        let (code, _, err) = m
            .run(&[
                "register",
                &format!("--allocator-url={}/base", server.url),
                &format!("--token={REGISTRATION_TOKEN}"),
                &format!("--config={}/agent.env", blocked.display()),
            ])
            .await;
        assert_eq!(code, 1);
        assert!(err.contains("cannot write the settings file"), "{err}");
        assert!(
            server.requests().is_empty(),
            "no registration was attempted"
        );
    }

    #[tokio::test]
    async fn register_installs_enables_and_restarts_the_service() {
        let server = allocator(false, 202).await;
        let m = Machine::new(3, false);
        let config = m.config();
        let register = [
            "register".to_owned(),
            format!("--allocator-url={}/base", server.url),
            format!("--token={REGISTRATION_TOKEN}"),
            format!("--config={}", config.display()),
        ];
        let register: Vec<&str> = register.iter().map(String::as_str).collect();
        let (code, out, err) = m.run(&register).await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out,
            format!(
                "registered as lab-ws-07; the lablink-agent service runs its agent (settings in {})\n",
                config.display()
            )
        );
        assert_eq!(
            m.systemctl_calls(),
            "daemon-reload\nis-active --quiet lablink-agent\nenable --now lablink-agent\n"
        );
        let unit = std::fs::read_to_string(&m.system.unit_path).unwrap();
        let exe = m.system.executable.as_ref().unwrap();
        assert!(
            unit.contains(&format!("\nExecStart={}\n", exe.display())),
            "{unit}"
        );
        assert!(
            unit.contains(&format!(
                "\nEnvironment=LABLINK_AGENT_CONFIG={}\n",
                config.display()
            )),
            "{unit}"
        );
        assert!(unit.contains("\nRestartPreventExitStatus=3\n"), "{unit}");

        // Running already (with the previous token): restarted.
        let m = Machine::new(0, false);
        let (code, _, err) = m.run(&register).await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            m.systemctl_calls(),
            "daemon-reload\nis-active --quiet lablink-agent\nenable --now lablink-agent\nrestart lablink-agent\n"
        );

        // A service that cannot be enabled: the registration stands, the way to run it by
        // hand is printed.
        let m = Machine::new(3, true);
        let (code, out, err) = m.run(&register).await;
        assert_eq!(code, 1);
        assert_eq!(out, "");
        assert!(err.contains("registered as lab-ws-07"), "{err}");
        assert!(
            err.contains("`systemctl enable --now lablink-agent` failed: Failed to enable unit"),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "run the agent: LABLINK_AGENT_CONFIG={}",
                config.display()
            )),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unregister_tells_the_allocator_and_removes_the_service_and_settings() {
        for (status, said) in [
            (
                202,
                "unregistered lab-ws-07: the allocator takes it out of its pool",
            ),
            (
                404,
                "lab-ws-07 was already unregistered (the allocator answered 404 Not Found)",
            ),
        ] {
            let server = allocator(false, status).await;
            let m = Machine::new(0, false);
            let config = m.config();
            write_config(
                &config,
                &[
                    ("ALLOCATOR_URL", &format!("{}/base", server.url)),
                    ("VM_NAME", "lab-ws-07"),
                    ("API_TOKEN", AGENT_TOKEN),
                    ("LABLINK_REGISTERED", "1"),
                ],
            )
            .unwrap();
            let (identity, _) = load_or_create_identity(&m.identity_file()).unwrap();
            std::fs::create_dir_all(m.system.unit_path.parent().unwrap()).unwrap();
            std::fs::write(&m.system.unit_path, "[Unit]\n").unwrap();
            let (code, out, err) = m
                .run(&["unregister", &format!("--config={}", config.display())])
                .await;
            assert_eq!(code, 0, "{err}");
            assert_eq!(
                out,
                format!(
                    "{said}\nstopped and disabled the lablink-agent service\nremoved {}\nremoved {}\n",
                    m.system.unit_path.display(),
                    config.display()
                )
            );
            assert_eq!(
                m.systemctl_calls(),
                "disable --now lablink-agent\ndaemon-reload\n"
            );
            assert!(!config.exists() && !m.system.unit_path.exists());
            assert_eq!(
                m.identity(),
                identity,
                "the identity is kept, for next time"
            );
            let requests = server.requests();
            assert_eq!(requests.len(), 1);
            assert_eq!(requests[0].method, "DELETE");
        }
    }

    #[tokio::test]
    async fn unregister_keeps_everything_when_the_allocator_refuses() {
        let server = allocator(false, 500).await;
        let m = Machine::new(0, false);
        let config = m.config();
        let mut settings = vec![
            ("ALLOCATOR_URL", format!("{}/base", server.url)),
            ("VM_NAME", "lab-ws-07".to_owned()),
            ("API_TOKEN", AGENT_TOKEN.to_owned()),
        ];
        let write = |settings: &[(&str, String)]| {
            let pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
            std::fs::remove_file(&config).ok();
            write_config(&config, &pairs).unwrap();
        };
        // Not a registered machine's settings: nothing is done.
        write(&settings);
        let unregister = [
            "unregister".to_owned(),
            format!("--config={}", config.display()),
        ];
        let unregister: Vec<&str> = unregister.iter().map(String::as_str).collect();
        let (code, _, err) = m.run(&unregister).await;
        assert_eq!(code, 1);
        assert!(err.contains("no LABLINK_REGISTERED=1"), "{err}");
        assert!(server.requests().is_empty());

        settings.push(("LABLINK_REGISTERED", "1".to_owned()));
        write(&settings);
        let (code, out, err) = m.run(&unregister).await;
        assert_eq!(code, 1);
        assert_eq!(out, "");
        assert!(
            err.contains("500")
                && err.contains("as configured")
                && err.contains("nothing was removed"),
            "{err}"
        );
        assert!(config.exists());
        assert_eq!(m.systemctl_calls(), "");

        std::fs::remove_file(&config).unwrap();
        let (code, _, err) = m.run(&unregister).await;
        assert_eq!(code, 1);
        assert!(err.contains("does not seem registered"), "{err}");
    }

    #[tokio::test]
    async fn help_and_bad_arguments() {
        let m = Machine::new(3, false);
        let (code, out, _) = m.run(&["--help"]).await;
        assert_eq!(code, 0);
        assert!(out.starts_with("usage: lablink-agent\n") && out.contains("--allow-reboot"));
        let (code, out, err) = m.run(&["register", "--bogus"]).await;
        assert_eq!((code, out.as_str()), (2, ""));
        assert_eq!(
            err,
            format!("lablink-agent: unknown option \"--bogus\" for register\n{USAGE_REGISTER}\n")
        );
    }
}
