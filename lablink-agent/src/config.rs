//! The agent's settings: from the environment (`ALLOCATOR_URL`, `VM_NAME`, `API_TOKEN`, as
//! existing VM images provide, plus `LABLINK_*` options) and an optional file of the same
//! `KEY=value` lines (`LABLINK_AGENT_CONFIG`; `lablink-agent register` writes one, with
//! `LABLINK_REGISTERED=1`). The environment wins over the file.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use lablink_core::{Hostname, LogStream};
use reqwest::Url;

use crate::bootstrap::{BootstrapConfig, OnError};

/// Where Google's Chrome Remote Desktop package installs `start-host`.
pub const DEFAULT_START_HOST: &str = "/opt/google/chrome-remote-desktop/start-host";
/// The redirect URL of Chrome Remote Desktop's headless set-up.
pub const DEFAULT_REDIRECT_URL: &str = "https://remotedesktop.google.com/_/oauthredirect";
/// What the agent runs when the allocator asks a registered machine to reboot.
pub const DEFAULT_REBOOT_COMMAND: &str = "systemctl reboot";

/// A setting is missing or invalid. The message is one line and never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// The agent's bearer token (`API_TOKEN`). Debug prints `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl ApiToken {
    /// The token itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// What the agent runs when its VM is assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartHost {
    /// Run this `start-host` executable (no shell) with `--code`, `--redirect-url` and
    /// `--name`, feeding the PIN on stdin twice.
    Program(PathBuf),
    /// Local demos: log that the host would start, run nothing (`LABLINK_START_HOST=dry-run`).
    DryRun,
}

/// One log file to ship, and the stream its lines go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    /// The allocator's stream (`cloud_init`, `container` or `agent`).
    pub stream: LogStream,
    /// The file to follow (it may not exist yet).
    pub path: PathBuf,
}

/// Everything the agent needs. Build it with [`AgentConfig::new`] (library use) or
/// [`AgentConfig::from_env`] (the binary).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The allocator's base URL; paths are appended.
    pub allocator_url: Url,
    /// This VM's hostname.
    pub vm_name: Hostname,
    /// The bearer token; `None` sends no `Authorization` header (open-mode allocators).
    pub api_token: Option<ApiToken>,
    /// What to run on assignment.
    pub start_host: StartHost,
    /// `--redirect-url` passed to `start-host`.
    pub redirect_url: String,
    /// `--user-name` passed to `start-host` (required when the agent runs as root: the
    /// desktop belongs to this user).
    pub crd_user: Option<String>,
    /// Longest a `start-host` run may take.
    pub start_host_timeout: Duration,
    /// What shows the allocator's warnings on the desktop (`LABLINK_NOTIFY_SEND`: a program
    /// name or path; `off`: none): `notify-send`, looked up on `PATH`, run as
    /// [`crd_user`](Self::crd_user) when the agent runs as root. See [`crate::notify`].
    pub notify_send: Option<PathBuf>,
    /// The GPU check program (`nvidia-smi`, looked up on `PATH`).
    pub nvidia_smi: PathBuf,
    /// Time between GPU checks.
    pub gpu_interval: Duration,
    /// Longest one `nvidia-smi` run may take before the GPU counts as unhealthy.
    pub gpu_timeout: Duration,
    /// The research software's process name; `None` never reports in use.
    pub inuse_process: Option<String>,
    /// Time between in-use checks.
    pub inuse_interval: Duration,
    /// Log files to ship.
    pub log_files: Vec<LogFile>,
    /// Time between checks of the log files for new lines.
    pub log_poll: Duration,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// How long one long-poll for the assignment is held.
    pub wait_timeout: Duration,
    /// Time between checks for a new assignment once one was handled.
    pub recheck_interval: Duration,
    /// The longest pause between retries.
    pub backoff_max: Duration,
    /// Longest one upload of collected files may take (`LABLINK_UPLOAD_TIMEOUT_SECS`).
    pub upload_timeout: Duration,
    /// Identifies this boot; a change tells the allocator the VM restarted.
    pub boot_id: String,
    /// Where the agent remembers, across its own restarts and reboots, the assignment it
    /// handled and how far each log file was shipped. `None` keeps that in memory only.
    /// Never collected (nor is `/etc/lablink`, the agent's environment with its token).
    pub state_dir: Option<PathBuf>,
    /// What the agent sets up once before it becomes available (research-software
    /// container, tutorial, start-up script): see [`crate::bootstrap`].
    pub bootstrap: BootstrapConfig,
    /// A machine that joined by registering (`LABLINK_REGISTERED=1`, written by
    /// `lablink-agent register`): when the allocator keeps refusing its token (401, see
    /// [`unregistered_after`](Self::unregistered_after)) the machine was unregistered, and
    /// the agent stops instead of retrying (see [`crate::AgentFailed`]).
    pub registered: bool,
    /// The machine's owner allowed the allocator to reboot it (`LABLINK_ALLOW_REBOOT=1`,
    /// written by `lablink-agent register --allow-reboot`; default no). The agent reboots on
    /// the allocator's request only on a [`registered`](Self::registered) machine with this
    /// set.
    pub allow_reboot: bool,
    /// How long a registered machine's token must have been refused (every answer 401, no
    /// success in between) before the agent takes the machine as unregistered and stops
    /// (`LABLINK_UNREGISTERED_AFTER_SECS`, default 60; 0 stops at the first 401). A single
    /// 401 (a proxy, an allocator restarting) does not stop it.
    pub unregistered_after: Duration,
    /// What the agent runs when the allocator asks for a reboot (`LABLINK_REBOOT_COMMAND`,
    /// split on whitespace and run without a shell; default `systemctl reboot`).
    pub reboot_command: Vec<String>,
    /// The desktop this VM serves (`LABLINK_DESKTOP`: `crd`, the default, or `browser`).
    pub desktop: lablink_core::DesktopMode,
    /// The VNC server of the browser desktop (`VNC_PORT`, `VNC_COMMAND`,
    /// `LABLINK_VNC_PASSWORD_FILE`); its user is [`crd_user`](Self::crd_user).
    pub vnc: crate::vnc::VncConfig,
    /// How the machine is reset for the next participant when the allocator asks
    /// (`LABLINK_RESET_HOME`, `LABLINK_RESET_SKELETON`, `LABLINK_RESET_END_SESSION`); its
    /// desktop user is [`crd_user`](Self::crd_user), whose home is the bootstrap's
    /// `desktop_home` when set. See [`crate::reset`].
    pub reset: crate::reset::ResetConfig,
}

impl AgentConfig {
    /// Defaults for everything but the three settings every VM has.
    pub fn new(allocator_url: Url, vm_name: Hostname, api_token: Option<String>) -> Self {
        Self {
            allocator_url,
            vm_name,
            api_token: api_token.filter(|t| !t.is_empty()).map(ApiToken),
            start_host: StartHost::Program(DEFAULT_START_HOST.into()),
            redirect_url: DEFAULT_REDIRECT_URL.to_owned(),
            crd_user: None,
            start_host_timeout: Duration::from_secs(120),
            notify_send: Some("notify-send".into()),
            nvidia_smi: "nvidia-smi".into(),
            gpu_interval: Duration::from_secs(20),
            gpu_timeout: Duration::from_secs(10),
            inuse_process: None,
            inuse_interval: Duration::from_secs(5),
            log_files: Vec::new(),
            log_poll: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(60),
            recheck_interval: Duration::from_secs(30),
            backoff_max: Duration::from_secs(30),
            upload_timeout: Duration::from_secs(3600),
            boot_id: kernel_boot_id().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            state_dir: None,
            bootstrap: BootstrapConfig::default(),
            registered: false,
            allow_reboot: false,
            unregistered_after: Duration::from_secs(60),
            reboot_command: DEFAULT_REBOOT_COMMAND
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            desktop: lablink_core::DesktopMode::default(),
            vnc: crate::vnc::VncConfig::default(),
            reset: crate::reset::ResetConfig::default(),
        }
    }

    /// Reads the process environment (and the file named by `LABLINK_AGENT_CONFIG`).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars_os())
    }

    /// Like [`from_env`](Self::from_env), from the given variables.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Self, ConfigError> {
        let mut env = HashMap::new();
        for (k, v) in vars {
            let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
                continue;
            };
            env.insert(k.to_owned(), v.to_owned());
        }
        let mut settings = match env.get("LABLINK_AGENT_CONFIG") {
            Some(path) => read_file(path)?,
            None => HashMap::new(),
        };
        settings.extend(env);
        Settings(settings).build()
    }
}

/// `/proc/sys/kernel/random/boot_id`, when the kernel offers it.
fn kernel_boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// `KEY=value` lines; blank lines and `#` comments are skipped, values may be quoted.
pub(crate) fn read_file(path: &str) -> Result<HashMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(format!("LABLINK_AGENT_CONFIG {path:?} cannot be read: {e}"))
    })?;
    let mut settings = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| ConfigError::new(format!("{path}:{}: expected KEY=value", n + 1)))?;
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        settings.insert(key.trim().to_owned(), value.to_owned());
    }
    Ok(settings)
}

struct Settings(HashMap<String, String>);

impl Settings {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    fn required(&self, key: &str) -> Result<&str, ConfigError> {
        self.get(key)
            .ok_or_else(|| ConfigError::new(format!("{key} is not set")))
    }

    /// A number of seconds in `[min, 86400]`: the floors keep every loop from spinning.
    fn seconds(&self, key: &str, min: f64, into: &mut Duration) -> Result<(), ConfigError> {
        if let Some(v) = self.get(key) {
            *into = v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && (min..=86_400.0).contains(s))
                .map(Duration::from_secs_f64)
                .ok_or_else(|| {
                    ConfigError::new(format!(
                        "{key} must be a number of seconds between {min} and 86400, not {v:?}"
                    ))
                })?;
        }
        Ok(())
    }

    /// `1`/`true` or `0`/`false`; unset is false.
    fn flag(&self, key: &str) -> Result<bool, ConfigError> {
        match self.get(key).map(str::trim) {
            None | Some("0" | "false") => Ok(false),
            Some("1" | "true") => Ok(true),
            Some(other) => Err(ConfigError::new(format!(
                "{key} must be 1 or 0, not {other:?}"
            ))),
        }
    }

    fn build(self) -> Result<AgentConfig, ConfigError> {
        let url = self.required("ALLOCATOR_URL")?;
        let allocator_url = Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                ConfigError::new(format!("ALLOCATOR_URL {url:?} is not an http(s) URL"))
            })?;
        let name = self.required("VM_NAME")?;
        let vm_name: Hostname = name.parse().map_err(|e: lablink_core::Error| {
            ConfigError::new(format!(
                "VM_NAME {name:?} is not a valid hostname: {}",
                e.message()
            ))
        })?;
        let mut c = AgentConfig::new(
            allocator_url,
            vm_name,
            self.get("API_TOKEN").map(|t| t.trim().to_owned()),
        );
        match self.get("LABLINK_START_HOST") {
            Some("dry-run") => c.start_host = StartHost::DryRun,
            Some(path) => c.start_host = StartHost::Program(path.into()),
            None => {}
        }
        if let Some(url) = self.get("LABLINK_CRD_REDIRECT_URL") {
            Url::parse(url).map_err(|_| {
                ConfigError::new(format!("LABLINK_CRD_REDIRECT_URL {url:?} is not a URL"))
            })?;
            c.redirect_url = url.to_owned();
        }
        match self.get("LABLINK_NOTIFY_SEND").map(str::trim) {
            Some("off") => c.notify_send = None,
            Some("") | None => {}
            Some(program) => c.notify_send = Some(program.into()),
        }
        if let Some(path) = self.get("LABLINK_NVIDIA_SMI") {
            c.nvidia_smi = path.into();
        }
        c.inuse_process = self
            .get("LABLINK_INUSE_PROCESS")
            .map(|p| p.trim().to_owned());
        if let Some(list) = self.get("LABLINK_LOG_FILES") {
            c.log_files = parse_log_files(list)?;
        }
        if let Some(id) = self.get("LABLINK_BOOT_ID") {
            c.boot_id = id.trim().to_owned();
        }
        if let Some(user) = self.get("LABLINK_CRD_USER") {
            let user = user.trim();
            let valid = user.len() <= 32
                && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && user.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-')
                });
            if !valid {
                return Err(ConfigError::new(format!(
                    "LABLINK_CRD_USER {user:?} is not a user name"
                )));
            }
            c.crd_user = Some(user.to_owned());
        }
        c.state_dir = self.get("LABLINK_STATE_DIR").map(|d| d.trim().into());
        c.registered = self.flag("LABLINK_REGISTERED")?;
        c.allow_reboot = self.flag("LABLINK_ALLOW_REBOOT")?;
        if c.registered && c.api_token.is_none() {
            return Err(ConfigError::new(
                "LABLINK_REGISTERED=1 needs API_TOKEN (register the machine again)",
            ));
        }
        if let Some(command) = self.get("LABLINK_REBOOT_COMMAND") {
            c.reboot_command = command.split_whitespace().map(str::to_owned).collect();
        }
        self.bootstrap(&mut c.bootstrap)?;
        self.desktop(&mut c)?;
        self.reset(&mut c.reset);
        self.seconds(
            "LABLINK_START_HOST_TIMEOUT_SECS",
            1.0,
            &mut c.start_host_timeout,
        )?;
        self.seconds("LABLINK_GPU_INTERVAL_SECS", 0.1, &mut c.gpu_interval)?;
        self.seconds("LABLINK_GPU_TIMEOUT_SECS", 0.1, &mut c.gpu_timeout)?;
        self.seconds("LABLINK_INUSE_INTERVAL_SECS", 0.1, &mut c.inuse_interval)?;
        self.seconds("LABLINK_LOG_POLL_SECS", 0.1, &mut c.log_poll)?;
        self.seconds("LABLINK_HEARTBEAT_SECS", 1.0, &mut c.heartbeat_interval)?;
        self.seconds("LABLINK_WAIT_SECS", 1.0, &mut c.wait_timeout)?;
        self.seconds("LABLINK_RECHECK_SECS", 0.1, &mut c.recheck_interval)?;
        self.seconds("LABLINK_BACKOFF_MAX_SECS", 0.1, &mut c.backoff_max)?;
        self.seconds("LABLINK_UPLOAD_TIMEOUT_SECS", 1.0, &mut c.upload_timeout)?;
        self.seconds(
            "LABLINK_UNREGISTERED_AFTER_SECS",
            0.0,
            &mut c.unregistered_after,
        )?;
        Ok(c)
    }
}

impl Settings {
    /// The browser desktop's settings: `LABLINK_DESKTOP`, `VNC_PORT`, `VNC_COMMAND`,
    /// `LABLINK_VNC_PASSWORD_FILE`.
    fn desktop(&self, c: &mut AgentConfig) -> Result<(), ConfigError> {
        if let Some(mode) = self.get("LABLINK_DESKTOP") {
            c.desktop = mode.trim().parse().map_err(|_| {
                ConfigError::new(format!(
                    "LABLINK_DESKTOP must be crd or browser, not {mode:?}"
                ))
            })?;
        }
        if let Some(port) = self.get("VNC_PORT") {
            c.vnc.port = port
                .trim()
                .parse()
                .ok()
                .filter(|p| (5900..=65535).contains(p))
                .ok_or_else(|| {
                    ConfigError::new(format!(
                        "VNC_PORT must be a port from 5900 (display :0) to 65535, not {port:?}"
                    ))
                })?;
        }
        c.vnc.command = self
            .get("VNC_COMMAND")
            .map(|command| command.split_whitespace().map(str::to_owned).collect());
        c.vnc.password_file = self
            .get("LABLINK_VNC_PASSWORD_FILE")
            .map(|p| p.trim().into());
        Ok(())
    }

    /// The settings of [`crate::reset`]: `LABLINK_RESET_HOME`, `LABLINK_RESET_SKELETON`,
    /// `LABLINK_RESET_END_SESSION` (split on whitespace, no shell).
    fn reset(&self, r: &mut crate::reset::ResetConfig) {
        if let Some(home) = self.get("LABLINK_RESET_HOME") {
            r.home = Some(home.trim().into());
        }
        if let Some(skeleton) = self.get("LABLINK_RESET_SKELETON") {
            r.skeleton = skeleton.trim().into();
        }
        if let Some(command) = self.get("LABLINK_RESET_END_SESSION") {
            r.end_session = Some(command.split_whitespace().map(str::to_owned).collect());
        }
    }

    /// The settings of [`crate::bootstrap`].
    fn bootstrap(&self, b: &mut BootstrapConfig) -> Result<(), ConfigError> {
        let text = |key| self.get(key).map(|v| v.trim().to_owned());
        b.subject_image = text("SUBJECT_IMAGE");
        b.tutorial_repo = text("TUTORIAL_REPO_TO_CLONE");
        // An inline script keeps its own layout.
        b.startup_script = self.get("LABLINK_STARTUP_SCRIPT").map(str::to_owned);
        b.desktop_home = self.get("LABLINK_DESKTOP_HOME").map(|d| d.trim().into());
        if let Some(n) = self.get("LABLINK_STARTUP_RETRIES") {
            b.startup_attempts = n
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| {
                    ConfigError::new(format!(
                        "LABLINK_STARTUP_RETRIES must be a number of attempts from 1 to 100, not {n:?}"
                    ))
                })?;
        }
        b.on_error = match self.get("STARTUP_ON_ERROR").map(str::trim) {
            None | Some("continue") => OnError::Continue,
            Some("fail") => OnError::Fail,
            Some(other) => {
                return Err(ConfigError::new(format!(
                    "STARTUP_ON_ERROR must be continue or fail, not {other:?}"
                )))
            }
        };
        b.gpu_support = match self.get("GPU_SUPPORT").map(str::trim) {
            None | Some("false" | "0") => false,
            Some("true" | "1") => true,
            Some(other) => {
                return Err(ConfigError::new(format!(
                    "GPU_SUPPORT must be true or false, not {other:?}"
                )))
            }
        };
        self.seconds("LABLINK_BOOTSTRAP_RETRY_SECS", 0.0, &mut b.retry_delay)?;
        self.seconds("LABLINK_BOOTSTRAP_TIMEOUT_SECS", 1.0, &mut b.timeout)
    }
}

/// `stream=path` pairs separated by commas, e.g.
/// `cloud_init=/var/log/cloud-init-output.log,container=/var/log/app.log`.
fn parse_log_files(list: &str) -> Result<Vec<LogFile>, ConfigError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (stream, path) = item.split_once('=').ok_or_else(|| {
                ConfigError::new(format!(
                    "LABLINK_LOG_FILES entry {item:?} is not stream=path"
                ))
            })?;
            let stream = LogStream::ALL
                .into_iter()
                .find(|s| s.as_str() == stream.trim())
                .ok_or_else(|| {
                    ConfigError::new(format!(
                        "LABLINK_LOG_FILES stream {stream:?} is not cloud_init, container or agent"
                    ))
                })?;
            Ok(LogFile {
                stream,
                path: path.trim().into(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_vars(pairs.iter().map(|(k, v)| (k.into(), v.into())))
    }

    const BASE: [(&str, &str); 2] = [
        ("ALLOCATOR_URL", "http://10.0.0.1:5000"),
        ("VM_NAME", "vm-1"),
    ];

    #[test]
    fn the_three_vm_settings_are_enough() {
        let c = config(&BASE).unwrap();
        assert_eq!(c.vm_name.as_str(), "vm-1");
        assert!(c.api_token.is_none());
        assert_eq!(c.start_host, StartHost::Program(DEFAULT_START_HOST.into()));
        let c = config(&[BASE[0], BASE[1], ("API_TOKEN", "s3cret")]).unwrap();
        assert_eq!(c.api_token.as_ref().unwrap().expose(), "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn bad_settings_name_the_setting_in_one_line() {
        for (pairs, expected) in [
            (vec![BASE[1]], "ALLOCATOR_URL is not set"),
            (vec![BASE[0]], "VM_NAME is not set"),
            (
                vec![("ALLOCATOR_URL", "ftp://x"), BASE[1]],
                "ALLOCATOR_URL \"ftp://x\"",
            ),
            (
                vec![BASE[0], ("VM_NAME", "bad name;")],
                "VM_NAME \"bad name;\"",
            ),
            (
                vec![BASE[0], BASE[1], ("LABLINK_WAIT_SECS", "-1")],
                "LABLINK_WAIT_SECS",
            ),
            (
                vec![BASE[0], BASE[1], ("LABLINK_UPLOAD_TIMEOUT_SECS", "0.5")],
                "LABLINK_UPLOAD_TIMEOUT_SECS",
            ),
            (
                vec![BASE[0], BASE[1], ("LABLINK_LOG_FILES", "syslog=/x")],
                "LABLINK_LOG_FILES",
            ),
            (
                vec![BASE[0], BASE[1], ("STARTUP_ON_ERROR", "ignore")],
                "STARTUP_ON_ERROR",
            ),
            (
                vec![BASE[0], BASE[1], ("LABLINK_STARTUP_RETRIES", "0")],
                "LABLINK_STARTUP_RETRIES",
            ),
            (
                vec![BASE[0], BASE[1], ("GPU_SUPPORT", "maybe")],
                "GPU_SUPPORT",
            ),
            (
                vec![BASE[0], BASE[1], ("LABLINK_AGENT_CONFIG", "/nonexistent")],
                "LABLINK_AGENT_CONFIG",
            ),
        ] {
            let e = config(&pairs).unwrap_err().to_string();
            assert!(e.contains(expected), "{e:?} lacks {expected:?}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn registered_machines_and_the_reboot_command() {
        let c = config(&BASE).unwrap();
        assert!(!c.registered && !c.allow_reboot);
        assert_eq!(c.reboot_command, ["systemctl", "reboot"]);
        assert_eq!(c.unregistered_after, Duration::from_secs(60));
        let c = config(&[
            BASE[0],
            BASE[1],
            ("API_TOKEN", "t"),
            ("LABLINK_REGISTERED", "1"),
            ("LABLINK_REBOOT_COMMAND", " /sbin/shutdown  -r now "),
            ("LABLINK_UNREGISTERED_AFTER_SECS", "0"),
        ])
        .unwrap();
        assert!(c.registered && !c.allow_reboot);
        assert_eq!(c.reboot_command, ["/sbin/shutdown", "-r", "now"]);
        assert_eq!(c.unregistered_after, Duration::ZERO);
        let c = config(&[
            BASE[0],
            BASE[1],
            ("API_TOKEN", "t"),
            ("LABLINK_REGISTERED", "1"),
            ("LABLINK_ALLOW_REBOOT", "1"),
            ("LABLINK_UNREGISTERED_AFTER_SECS", "90.5"),
        ])
        .unwrap();
        assert!(c.registered && c.allow_reboot);
        assert_eq!(c.unregistered_after, Duration::from_secs_f64(90.5));
        assert!(
            !config(&[BASE[0], BASE[1], ("LABLINK_ALLOW_REBOOT", "0")])
                .unwrap()
                .allow_reboot
        );
        assert!(
            !config(&[BASE[0], BASE[1], ("LABLINK_REGISTERED", "0")])
                .unwrap()
                .registered
        );
        for (pairs, expected) in [
            (
                vec![BASE[0], BASE[1], ("LABLINK_REGISTERED", "1")],
                "LABLINK_REGISTERED=1 needs API_TOKEN",
            ),
            (
                vec![BASE[0], BASE[1], ("LABLINK_REGISTERED", "yes")],
                "LABLINK_REGISTERED must be 1 or 0",
            ),
            (
                vec![BASE[0], BASE[1], ("LABLINK_ALLOW_REBOOT", "yes")],
                "LABLINK_ALLOW_REBOOT must be 1 or 0",
            ),
            (
                vec![BASE[0], BASE[1], ("LABLINK_UNREGISTERED_AFTER_SECS", "-1")],
                "LABLINK_UNREGISTERED_AFTER_SECS",
            ),
        ] {
            let e = config(&pairs).unwrap_err().to_string();
            assert!(e.contains(expected), "{e:?} lacks {expected:?}");
        }
    }

    #[test]
    fn the_browser_desktop_settings() {
        let c = config(&BASE).unwrap();
        assert_eq!(c.desktop, lablink_core::DesktopMode::Crd);
        assert_eq!((c.vnc.port, c.vnc.display()), (5901, Some(1)));
        let c = config(&[
            BASE[0],
            BASE[1],
            ("LABLINK_DESKTOP", "browser"),
            ("VNC_PORT", "5902"),
            ("VNC_COMMAND", "/usr/bin/x0vncserver -rfbport 5902"),
        ])
        .unwrap();
        assert_eq!(c.desktop, lablink_core::DesktopMode::Browser);
        assert_eq!(c.vnc.port, 5902);
        assert_eq!(
            c.vnc.command.unwrap(),
            ["/usr/bin/x0vncserver", "-rfbport", "5902"]
        );
        for (key, value) in [("LABLINK_DESKTOP", "vnc"), ("VNC_PORT", "80")] {
            let e = config(&[BASE[0], BASE[1], (key, value)]).unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
    }

    #[test]
    fn the_reset_settings() {
        let c = config(&BASE).unwrap();
        assert_eq!(c.reset, crate::reset::ResetConfig::default());
        let c = config(&[
            BASE[0],
            BASE[1],
            ("LABLINK_RESET_HOME", "/srv/participant"),
            ("LABLINK_RESET_SKELETON", "/etc/lablink/skel"),
            (
                "LABLINK_RESET_END_SESSION",
                " loginctl terminate-user  participant ",
            ),
        ])
        .unwrap();
        assert_eq!(
            c.reset.home.as_deref(),
            Some(std::path::Path::new("/srv/participant"))
        );
        assert_eq!(c.reset.skeleton, std::path::Path::new("/etc/lablink/skel"));
        assert_eq!(
            c.reset.end_session.unwrap(),
            ["loginctl", "terminate-user", "participant"]
        );
    }

    #[test]
    fn the_file_is_read_and_the_environment_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.env");
        std::fs::write(
            &file,
            "# agent\nALLOCATOR_URL=\"http://file:1\"\nVM_NAME=vm-file\nLABLINK_START_HOST=dry-run\n\
             LABLINK_LOG_FILES=cloud_init=/var/log/cloud-init-output.log, container=/tmp/c.log\n",
        )
        .unwrap();
        let c = config(&[
            ("LABLINK_AGENT_CONFIG", file.to_str().unwrap()),
            ("VM_NAME", "vm-env"),
        ])
        .unwrap();
        assert_eq!(c.allocator_url.as_str(), "http://file:1/");
        assert_eq!(c.vm_name.as_str(), "vm-env");
        assert_eq!(c.start_host, StartHost::DryRun);
        assert_eq!(c.log_files.len(), 2);
        assert_eq!(c.log_files[1].stream, LogStream::Container);
    }
}
