//! The allocator server's one typed configuration: a TOML or YAML file plus `LABLINK_*`
//! environment variables, checked as a whole so every problem is reported at once.
//!
//! Environment variables name a setting by its path with `__` between levels:
//! `LABLINK_SERVER__LISTEN=0.0.0.0:8080`, `LABLINK_ADMIN__PASSWORD_HASH=$argon2id$...`,
//! `LABLINK_ALLOCATOR__MAX_WAIT=60`, `LABLINK_DATABASE__URL=postgres://...`. A value is read
//! with the type of the setting it names. Every setting lives in a section, so only names
//! with a `__` are read (and an unknown one is a problem); other `LABLINK_*` names belong to
//! other programs (the agent, backend builders, test scripts) and are left alone. Without any file or variable, [`Config::default`]
//! is the embedded default: in-memory store and notifier, local agent processes as VMs, a generated
//! admin password.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use lablink_core::AllocatorConfig;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::http::{AgentAuthMode, HttpOptions};

/// Prefix of the environment variables read.
pub const ENV_PREFIX: &str = "LABLINK_";

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where and how the HTTP server listens.
    pub server: ServerConfig,
    /// The admin account.
    pub admin: AdminConfig,
    /// How agents authenticate.
    pub agents: AgentsConfig,
    /// The allocator's own settings.
    pub allocator: AllocatorConfig,
    /// PostgreSQL (store + notifier) instead of memory.
    pub database: DatabaseConfig,
    /// What creates machines.
    pub provisioner: ProvisionerConfig,
    /// Log output.
    pub log: LogConfig,
    /// Collecting participants' work off the VMs.
    pub collect: CollectConfig,
    /// Who may take a VM, and how fast one address may ask.
    pub participants: ParticipantsConfig,
}

/// `[collect]`: which files are collected from the VMs, the limits, where collections are
/// stored, and whether destroy collects first (see [`crate::collect`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectConfig {
    /// Where collections are stored: `local` (default: the directory `dir`), `s3` (feature
    /// `aws`: `s3_bucket`) or `memory` (lost at restart; tests and demos).
    pub store: String,
    /// `local`: the directory of the artifact store.
    pub dir: String,
    /// `s3`: the bucket (it must exist). Credentials come from the standard AWS chain.
    pub s3_bucket: String,
    /// `s3`: a prefix for every key, e.g. `workshop-2026/`.
    pub s3_prefix: String,
    /// `s3`: the region (empty: the standard chain's).
    pub s3_region: String,
    /// `s3`: an endpoint override, e.g. an emulator (empty: AWS).
    pub s3_endpoint_url: String,
    /// Directories searched on each VM (`~` = the agent's home, `{hostname}` = the VM).
    pub roots: Vec<String>,
    /// Glob patterns relative to a root, e.g. `**/*.slp`.
    pub patterns: Vec<String>,
    /// Most bytes collected from one VM (files that do not fit are skipped and reported).
    pub max_vm_bytes: u64,
    /// Most bytes of all collections together.
    pub max_total_bytes: u64,
    /// Destroy collects first and keeps VMs whose collection failed unless forced.
    pub destroy_collects_first: bool,
    /// How long destroy waits for collections, seconds.
    pub destroy_wait_seconds: u64,
    /// Failed checks of an upload before its collection counts as failed.
    pub max_attempts: u32,
}

impl Default for CollectConfig {
    fn default() -> Self {
        let s = crate::collect::CollectSettings::default();
        Self {
            store: "local".into(),
            dir: "lablink-artifacts".into(),
            s3_bucket: String::new(),
            s3_prefix: String::new(),
            s3_region: String::new(),
            s3_endpoint_url: String::new(),
            roots: s.roots,
            patterns: s.patterns,
            max_vm_bytes: s.max_vm_bytes,
            max_total_bytes: s.max_total_bytes,
            destroy_collects_first: s.destroy_collects_first,
            destroy_wait_seconds: s.destroy_wait_seconds,
            max_attempts: s.max_attempts,
        }
    }
}

impl CollectConfig {
    /// The collector's settings.
    pub fn settings(&self) -> crate::collect::CollectSettings {
        crate::collect::CollectSettings {
            roots: self.roots.clone(),
            patterns: self.patterns.clone(),
            max_vm_bytes: self.max_vm_bytes,
            max_total_bytes: self.max_total_bytes,
            destroy_collects_first: self.destroy_collects_first,
            destroy_wait_seconds: self.destroy_wait_seconds,
            max_attempts: self.max_attempts,
        }
    }

    /// The configured artifact store (`s3` builds its client; nothing is sent yet).
    pub async fn artifact_store(
        &self,
    ) -> lablink_core::Result<std::sync::Arc<dyn lablink_core::ArtifactStore>> {
        match self.store.as_str() {
            "memory" => Ok(std::sync::Arc::new(
                lablink_core::MemoryArtifactStore::default(),
            )),
            #[cfg(feature = "aws")]
            "s3" => {
                let mut b = lablink_aws::S3ArtifactStoreBuilder::new(&self.s3_bucket)
                    .with_prefix(&self.s3_prefix);
                if !self.s3_region.is_empty() {
                    b = b.with_region(&self.s3_region);
                }
                if !self.s3_endpoint_url.is_empty() {
                    b = b.with_endpoint_url(&self.s3_endpoint_url);
                }
                Ok(std::sync::Arc::new(b.build().await?))
            }
            "local" => Ok(std::sync::Arc::new(
                lablink_core::LocalDirArtifactStore::new(&self.dir),
            )),
            other => Err(lablink_core::Error::new(
                lablink_core::ErrorKind::InvalidConfig,
                format!("[collect] store {other:?} is not available in this build"),
            )),
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = self.settings().problems();
        match self.store.as_str() {
            "memory" => {}
            "local" if self.dir.trim().is_empty() => {
                problems.push("[collect] dir must be set for the local store".into());
            }
            "local" => {}
            "s3" if !cfg!(feature = "aws") => {
                problems.push("[collect] store \"s3\" needs a build with the `aws` feature".into());
            }
            "s3" if self.s3_bucket.trim().is_empty() => {
                problems.push("[collect] s3_bucket must be set for the s3 store".into());
            }
            "s3" => {}
            other => problems.push(format!(
                "[collect] store {other:?} is not one of local, s3, memory"
            )),
        }
        problems
    }
}

/// Where and how the HTTP server listens. `Debug` hides the secrets.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind (`host:port`).
    pub listen: String,
    /// Longest a `/vm_startup` or v1 wait is held, seconds.
    pub max_wait_seconds: u64,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Longest an ordinary request may take, seconds.
    pub request_timeout_seconds: u64,
    /// Mark cookies `Secure` (set when behind HTTPS).
    pub secure_cookies: bool,
    /// Reverse proxies (addresses or CIDR networks) whose `X-Forwarded-For` and
    /// `X-Forwarded-Proto` are believed.
    pub trusted_proxies: Vec<String>,
    /// Bearer token `/metrics` asks for (empty: `/metrics` is open; `validate` warns when
    /// the listener is not loopback).
    pub metrics_token: String,
    /// Secret (at least 32 characters) that signs participants' cookies; replicas behind one
    /// load balancer must share it. Empty: each process makes its own.
    pub cookie_secret: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_wait_seconds: 120,
            max_body_bytes: 2 * 1024 * 1024,
            request_timeout_seconds: 30,
            secure_cookies: false,
            trusted_proxies: Vec::new(),
            metrics_token: String::new(),
            cookie_secret: String::new(),
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |s: &str| if s.is_empty() { "" } else { "***" };
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("max_wait_seconds", &self.max_wait_seconds)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("request_timeout_seconds", &self.request_timeout_seconds)
            .field("secure_cookies", &self.secure_cookies)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("metrics_token", &hidden(&self.metrics_token))
            .field("cookie_secret", &hidden(&self.cookie_secret))
            .finish()
    }
}

impl ServerConfig {
    /// The trusted proxies as networks (a bare address is a network of one); the entries
    /// that are neither are returned as problems.
    pub fn trusted_proxy_networks(&self) -> Result<Vec<ipnet::IpNet>, Vec<String>> {
        let mut nets = Vec::new();
        let mut problems = Vec::new();
        for entry in &self.trusted_proxies {
            match entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            {
                Ok(net) => nets.push(net),
                Err(_) => problems.push(format!(
                    "[server] trusted_proxies: {entry:?} is neither an address nor a network (10.0.0.0/8)"
                )),
            }
        }
        if problems.is_empty() {
            Ok(nets)
        } else {
            Err(problems)
        }
    }
}

/// `[participants]`: who may take a VM and how fast one address may ask.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParticipantsConfig {
    /// The event access code participants must type (empty: none). Compared in constant time.
    pub access_code: String,
    /// The registered participants' emails (empty: anyone may take a VM). Stored at start
    /// when the store holds no list yet; the admin UI replaces it (CSV upload).
    pub registered_emails: Vec<String>,
    /// VM requests one client address may make at once.
    pub requests_burst: u32,
    /// VM requests one client address may make per minute after the burst.
    pub requests_per_minute: u32,
}

impl Default for ParticipantsConfig {
    fn default() -> Self {
        let limit = HttpOptions::DEFAULT_PARTICIPANT_LIMIT;
        Self {
            access_code: String::new(),
            registered_emails: Vec::new(),
            requests_burst: limit.burst,
            requests_per_minute: limit.per_minute,
        }
    }
}

impl fmt::Debug for ParticipantsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParticipantsConfig")
            .field(
                "access_code",
                &if self.access_code.is_empty() {
                    ""
                } else {
                    "***"
                },
            )
            .field("registered_emails", &self.registered_emails.len())
            .field("requests_burst", &self.requests_burst)
            .field("requests_per_minute", &self.requests_per_minute)
            .finish()
    }
}

impl ParticipantsConfig {
    /// The registered emails, parsed; the ones that are not emails are returned as problems.
    pub fn emails(&self) -> Result<Vec<lablink_core::Email>, Vec<String>> {
        let mut emails = Vec::new();
        let mut problems = Vec::new();
        for (i, raw) in self.registered_emails.iter().enumerate() {
            match raw.parse() {
                Ok(email) => emails.push(email),
                Err(e) => problems.push(format!(
                    "[participants] registered_emails[{i}]: {}",
                    lablink_core::Error::message(&e)
                )),
            }
        }
        if problems.is_empty() {
            Ok(emails)
        } else {
            Err(problems)
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = self.emails().err().unwrap_or_default();
        if self.requests_burst == 0 {
            problems.push("[participants] requests_burst must be at least 1".into());
        }
        if self.requests_per_minute == 0 {
            problems.push(
                "[participants] requests_per_minute must be at least 1 (0 would lock an address out for good)"
                    .into(),
            );
        }
        if !self.access_code.is_empty() && self.access_code.trim() != self.access_code {
            problems.push("[participants] access_code must not start or end with spaces".into());
        }
        problems
    }
}

/// The admin account. Give `password_hash` (argon2 PHC string, see `server hash-password`);
/// with neither it nor `password`, a password is generated and printed once at start.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// User name.
    pub user: String,
    /// argon2 hash of the password.
    pub password_hash: String,
    /// The password in plain text (hashed at start; prefer `password_hash`).
    pub password: String,
    /// Failed sign-ins allowed per client address per minute.
    pub sign_in_failures_per_minute: u32,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            user: "admin".into(),
            password_hash: String::new(),
            password: String::new(),
            sign_in_failures_per_minute: 5,
        }
    }
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("user", &self.user)
            .field("password_hash", &"***")
            .field("password", &"***")
            .field(
                "sign_in_failures_per_minute",
                &self.sign_in_failures_per_minute,
            )
            .finish()
    }
}

/// How agents authenticate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentsConfig {
    /// `tokens` (default) or `open` (local demos only).
    pub auth: AgentAuthMode,
}

/// PostgreSQL settings; empty `url` means the in-memory store.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host/db`.
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            max_connections: 10,
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &if self.url.is_empty() { "" } else { "***" })
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// What creates machines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvisionerConfig {
    /// `local` (default: each VM is an agent process on this machine), `fake` (in-memory
    /// machines without agents; something else must act as the VMs, e.g. a load generator)
    /// or `aws` (EC2 instances, feature `aws`, see `[provisioner.aws]`).
    pub kind: String,
    /// `local`: the agent program; empty runs this server's own executable as `<exe> agent`.
    pub local_agent_program: String,
    /// `local`: what agents run on assignment: `dry-run` (default: log only, run nothing) or
    /// the path of a Chrome Remote Desktop `start-host`.
    pub local_start_host: String,
    /// `local`: a directory for each agent's output (`<hostname>.log`); empty discards it.
    pub local_log_dir: String,
    /// Latency of each fake launch, seconds.
    pub fake_latency_seconds: f64,
    /// Probability that a fake VM fails to launch.
    pub fake_failure_rate: f64,
    /// Testing aid (`fake` only): keep the fake machines as files in this directory, shared
    /// by every replica using it and surviving restarts; a file `.failure-rate` there
    /// overrides `fake_failure_rate` while it exists (fault injection in a running system).
    /// Empty (default): in memory.
    pub fake_inventory_dir: String,
    /// The EC2 provisioner (`kind = "aws"`).
    pub aws: AwsProvisionerConfig,
}

impl Default for ProvisionerConfig {
    fn default() -> Self {
        Self {
            kind: "local".into(),
            local_agent_program: String::new(),
            local_start_host: "dry-run".into(),
            local_log_dir: String::new(),
            fake_latency_seconds: 0.5,
            fake_failure_rate: 0.0,
            fake_inventory_dir: String::new(),
            aws: AwsProvisionerConfig::default(),
        }
    }
}

/// `[provisioner.aws]`: the EC2 provisioner. Credentials are never configured here: they come
/// from the standard AWS chain (environment, shared files, instance or task role). Lists are
/// comma-separated, in order of preference.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsProvisionerConfig {
    /// The `deployment` tag of every VM; the provisioner sees only this deployment.
    pub deployment: String,
    /// AWS region (empty: the standard chain's).
    pub region: String,
    /// Endpoint override, e.g. an emulator (empty: AWS).
    pub endpoint_url: String,
    /// AMI of the VMs.
    pub ami: String,
    /// Instance types, tried in order when EC2 has no capacity (empty: `t3.large`).
    pub instance_types: String,
    /// Subnets, tried in order (empty: the default subnet).
    pub subnets: String,
    /// Security group ids (empty: the default group).
    pub security_groups: String,
    /// Instance profile name or ARN (empty: none).
    pub instance_profile: String,
    /// EC2 key pair for SSH (empty: none).
    pub key_name: String,
    /// Root volume size in GiB (0: the AMI's).
    pub root_volume_gb: u32,
    /// The AMI needs a GPU: only instance types with one are used.
    pub gpu: bool,
    /// Ask for Spot first, then on-demand.
    pub spot: bool,
    /// The allocator URL the agents call.
    pub allocator_url: String,
    /// Where VMs download the agent (empty: it is in the image).
    pub agent_url: String,
    /// SHA-256 of the agent download (hex, may be empty).
    pub agent_sha256: String,
}

impl Default for AwsProvisionerConfig {
    fn default() -> Self {
        Self {
            deployment: "lablink".into(),
            region: String::new(),
            endpoint_url: String::new(),
            ami: String::new(),
            instance_types: String::new(),
            subnets: String::new(),
            security_groups: String::new(),
            instance_profile: String::new(),
            key_name: String::new(),
            root_volume_gb: 0,
            gpu: false,
            spot: false,
            allocator_url: String::new(),
            agent_url: String::new(),
            agent_sha256: String::new(),
        }
    }
}

impl fmt::Debug for AwsProvisionerConfig {
    /// The agent URL may be presigned (a signature is a credential): it is not shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsProvisionerConfig")
            .field("deployment", &self.deployment)
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("ami", &self.ami)
            .field("instance_types", &self.instance_types)
            .field("subnets", &self.subnets)
            .field("security_groups", &self.security_groups)
            .field("instance_profile", &self.instance_profile)
            .field("key_name", &self.key_name)
            .field("root_volume_gb", &self.root_volume_gb)
            .field("gpu", &self.gpu)
            .field("spot", &self.spot)
            .field("allocator_url", &self.allocator_url)
            .field(
                "agent_url",
                &if self.agent_url.is_empty() { "" } else { "***" },
            )
            .field("agent_sha256", &self.agent_sha256)
            .finish()
    }
}

impl AwsProvisionerConfig {
    /// The builder these settings describe (the standard AWS chain supplies credentials).
    #[cfg(feature = "aws")]
    pub fn builder(&self) -> lablink_aws::Ec2ProvisionerBuilder {
        let list = |s: &str| -> Vec<String> {
            s.split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let mut b = lablink_aws::Ec2ProvisionerBuilder::new(&self.deployment, &self.ami)
            .with_instance_types(list(&self.instance_types))
            .with_subnets(list(&self.subnets))
            .with_security_groups(list(&self.security_groups))
            .with_gpu_image(self.gpu)
            .with_spot(self.spot)
            .with_allocator_url(&self.allocator_url)
            .with_agent_download(&self.agent_url, &self.agent_sha256);
        if let Some(region) = some(&self.region) {
            b = b.with_region(region);
        }
        if let Some(url) = some(&self.endpoint_url) {
            b = b.with_endpoint_url(url);
        }
        if let Some(profile) = some(&self.instance_profile) {
            b = b.with_instance_profile(profile);
        }
        if let Some(key) = some(&self.key_name) {
            b = b.with_key_name(key);
        }
        if self.root_volume_gb > 0 {
            b = b.with_root_volume_gb(i32::try_from(self.root_volume_gb).unwrap_or(i32::MAX));
        }
        b
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !cfg!(feature = "aws") {
            problems.push("[provisioner] kind \"aws\" needs a build with the `aws` feature".into());
        }
        if self.ami.trim().is_empty() {
            problems.push("[provisioner.aws] ami must be set".into());
        }
        if self.deployment.trim().is_empty() {
            problems.push("[provisioner.aws] deployment must not be empty".into());
        }
        if self.allocator_url.trim().is_empty() {
            problems
                .push("[provisioner.aws] allocator_url (what the agents call) must be set".into());
        }
        problems
    }
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter (`info`, `lablink=debug,info`...).
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".into(),
            filter: "info".into(),
        }
    }
}

/// Reads a file as a JSON value tree (TOML by default, YAML for `.yaml`/`.yml`).
fn read_file(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let value: Value = if yaml {
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
    };
    match value {
        Value::Null => Ok(Value::Object(Map::new())),
        v @ Value::Object(_) => Ok(v),
        _ => Err(format!("{}: the top level must be a table", path.display())),
    }
}

/// Sets `path` in `tree` from an environment value, typed like the default at that path.
fn overlay(
    tree: &mut Value,
    defaults: &Value,
    var: &str,
    path: &[String],
    raw: &str,
) -> Result<(), String> {
    let mut default = defaults;
    for key in path {
        default = default
            .get(key)
            .ok_or_else(|| format!("{var}: there is no setting {}", path.join(".")))?;
    }
    let value = match default {
        Value::Bool(_) => Value::Bool(
            raw.parse()
                .map_err(|_| format!("{var}: expected true or false"))?,
        ),
        Value::Number(_) => {
            let n: f64 = raw
                .parse()
                .map_err(|_| format!("{var}: expected a number"))?;
            serde_json::from_str(raw.trim())
                .ok()
                .filter(Value::is_number)
                .unwrap_or_else(|| serde_json::json!(n))
        }
        Value::Object(_) | Value::Array(_) => {
            return Err(format!(
                "{var}: {} is a section, not a value",
                path.join(".")
            ))
        }
        _ => Value::String(raw.to_owned()),
    };
    let mut node = tree;
    for key in &path[..path.len() - 1] {
        let map = node
            .as_object_mut()
            .ok_or_else(|| format!("{var}: {key} is not a section in the file"))?;
        node = map
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    node.as_object_mut()
        .ok_or_else(|| format!("{var}: its parent is not a section in the file"))?
        .insert(path[path.len() - 1].clone(), value);
    Ok(())
}

fn section<T: DeserializeOwned + Default>(
    tree: &Value,
    name: &str,
    problems: &mut Vec<String>,
) -> T {
    match tree.get(name) {
        None => T::default(),
        Some(v) => serde_json::from_value(v.clone()).unwrap_or_else(|e| {
            problems.push(format!("[{name}] {e}"));
            T::default()
        }),
    }
}

impl Config {
    /// Loads the file at `path` (if any) and then the `LABLINK_*` variables of `env`.
    /// Returns every problem found, including those of [`Config::problems`].
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut tree = match path.map(read_file) {
            None => Value::Object(Map::new()),
            Some(Ok(tree)) => tree,
            Some(Err(e)) => {
                problems.push(e);
                Value::Object(Map::new())
            }
        };
        let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
            .collect();
        vars.sort();
        for (var, raw) in vars {
            let path: Vec<String> = var[ENV_PREFIX.len()..]
                .split("__")
                .map(str::to_lowercase)
                .collect();
            if let Err(e) = overlay(&mut tree, &defaults, &var, &path, &raw) {
                problems.push(e);
            }
        }
        let known = [
            "server",
            "admin",
            "agents",
            "allocator",
            "database",
            "provisioner",
            "log",
            "collect",
            "participants",
        ];
        if let Some(map) = tree.as_object() {
            for key in map.keys().filter(|k| !known.contains(&k.as_str())) {
                problems.push(format!(
                    "unknown section [{key}]; known: {}",
                    known.join(", ")
                ));
            }
        }
        let config = Config {
            server: section(&tree, "server", &mut problems),
            admin: section(&tree, "admin", &mut problems),
            agents: section(&tree, "agents", &mut problems),
            allocator: section(&tree, "allocator", &mut problems),
            database: section(&tree, "database", &mut problems),
            provisioner: section(&tree, "provisioner", &mut problems),
            log: section(&tree, "log", &mut problems),
            collect: section(&tree, "collect", &mut problems),
            participants: section(&tree, "participants", &mut problems),
        };
        problems.extend(config.problems());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Every semantic problem, one message each (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self
            .allocator
            .problems()
            .into_iter()
            .map(|p| format!("[allocator] {p}"))
            .collect();
        if self.server.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "[server] listen {:?} is not host:port",
                self.server.listen
            ));
        }
        if self.server.max_wait_seconds == 0 {
            problems.push("[server] max_wait_seconds must be positive".into());
        }
        if self.server.request_timeout_seconds == 0 {
            problems.push("[server] request_timeout_seconds must be positive".into());
        }
        if self.server.max_body_bytes < 1024 {
            problems.push("[server] max_body_bytes must be at least 1024".into());
        }
        if self.admin.user.trim().is_empty() {
            problems.push("[admin] user must not be empty".into());
        }
        if !self.admin.password_hash.is_empty() && !self.admin.password.is_empty() {
            problems.push("[admin] give password_hash or password, not both".into());
        }
        if !self.admin.password_hash.is_empty()
            && argon2::PasswordHash::new(&self.admin.password_hash).is_err()
        {
            problems
                .push("[admin] password_hash is not an argon2 PHC string ($argon2id$...)".into());
        }
        if !self.admin.password.is_empty() && self.admin.password.len() < 12 {
            problems.push("[admin] password must be at least 12 characters".into());
        }
        if !self.database.url.is_empty() && !self.database.url.starts_with("postgres") {
            problems.push("[database] url must start with postgres:// or postgresql://".into());
        }
        if !self.database.url.is_empty() && !cfg!(feature = "postgres") {
            problems.push("[database] url is set but this build has no `postgres` feature".into());
        }
        match self.provisioner.kind.as_str() {
            "local" | "fake" => {}
            "aws" => problems.extend(self.provisioner.aws.problems()),
            other => problems.push(format!(
                "[provisioner] kind {other:?} is not available; known: local, fake, aws"
            )),
        }
        if self.provisioner.local_start_host.trim().is_empty() {
            problems
                .push("[provisioner] local_start_host must be dry-run or a start-host path".into());
        }
        if !(0.0..=1.0).contains(&self.provisioner.fake_failure_rate) {
            problems.push("[provisioner] fake_failure_rate must be between 0 and 1".into());
        }
        if !self.provisioner.fake_inventory_dir.is_empty() && self.provisioner.kind != "fake" {
            problems.push("[provisioner] fake_inventory_dir is only for kind = \"fake\"".into());
        }
        if !(0.0..=3600.0).contains(&self.provisioner.fake_latency_seconds) {
            problems.push("[provisioner] fake_latency_seconds must be between 0 and 3600".into());
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            problems.push("[log] format must be text or json".into());
        }
        problems.extend(self.collect.problems());
        problems.extend(self.participants.problems());
        problems.extend(
            self.server
                .trusted_proxy_networks()
                .err()
                .unwrap_or_default(),
        );
        if !self.server.cookie_secret.is_empty() && self.server.cookie_secret.len() < 32 {
            problems.push("[server] cookie_secret must be at least 32 characters".into());
        }
        problems
    }

    /// What is allowed but unwise, one message each: a server reachable from other machines
    /// that serves `/metrics` to anyone.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let loopback = self
            .server
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !self.database.url.is_empty() && self.server.cookie_secret.is_empty() {
            warnings.push(
                "[server] cookie_secret is not set: each replica (and each restart) signs participant cookies with its own key, so a participant's repeat on another replica must show the same code again"
                    .into(),
            );
        }
        if !loopback && self.server.metrics_token.is_empty() {
            warnings.push(format!(
                "[server] listen {} is reachable from other machines and /metrics has no metrics_token: anyone can read it",
                self.server.listen
            ));
        }
        warnings
    }

    /// Whether an admin password or hash was configured (else one is generated).
    pub fn has_admin_password(&self) -> bool {
        !self.admin.password_hash.is_empty() || !self.admin.password.is_empty()
    }

    /// The HTTP options for this config, with the admin password hash to use.
    pub fn http_options(&self, password_hash: String) -> HttpOptions {
        let mut options = HttpOptions::new(self.admin.user.clone(), password_hash);
        options.agent_auth = self.agents.auth;
        options.max_wait = Duration::from_secs(self.server.max_wait_seconds);
        options.max_body_bytes = self.server.max_body_bytes;
        options.request_timeout = Duration::from_secs(self.server.request_timeout_seconds);
        options.secure_cookies = self.server.secure_cookies;
        options.sign_in_failures_per_minute = self.admin.sign_in_failures_per_minute;
        options.trusted_proxies = self.server.trusted_proxy_networks().unwrap_or_default();
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        options.metrics_token = some(&self.server.metrics_token);
        if !self.server.cookie_secret.is_empty() {
            options.cookie_key = crate::http::CookieKey::from_secret(&self.server.cookie_secret);
        }
        options.access_code = some(&self.participants.access_code);
        options.participant_limit = crate::http::RateLimit {
            burst: self.participants.requests_burst,
            per_minute: self.participants.requests_per_minute,
        };
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn participant_and_proxy_settings_are_checked_and_secrets_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lablink.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"0.0.0.0:8080\"\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\"]\n\
             cookie_secret = \"a secret of thirty-two characters!!\"\n\
             [participants]\naccess_code = \"blue-heron-42\"\nregistered_emails = [\"Ada@Lab.org\"]\n",
        )
        .unwrap();
        let config = Config::load(Some(&path), env(&[])).unwrap();
        let options = config.http_options("hash".into());
        assert_eq!(options.trusted_proxies.len(), 2);
        assert_eq!(options.access_code.as_deref(), Some("blue-heron-42"));
        assert_eq!(
            config.participants.emails().unwrap()[0].as_str(),
            "ada@lab.org"
        );
        let shown = format!("{config:?} {options:?}");
        for secret in ["blue-heron-42", "thirty-two", "Ada@Lab"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        // Reachable from other machines without a metrics token: a warning, not a problem.
        assert_eq!(config.warnings().len(), 1, "{:?}", config.warnings());
        assert!(Config::default().warnings().is_empty(), "loopback is fine");

        std::fs::write(
            &path,
            "[server]\ntrusted_proxies = [\"10.0.0.0/33\", \"proxy\"]\ncookie_secret = \"short\"\n\
             [participants]\nregistered_emails = [\"ok@lab.org\", \"not an email\"]\nrequests_burst = 0\n",
        )
        .unwrap();
        let problems = Config::load(Some(&path), env(&[])).unwrap_err();
        for expected in [
            "\"10.0.0.0/33\"",
            "\"proxy\"",
            "cookie_secret",
            "registered_emails[1]",
            "requests_burst",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected}: {problems:?}"
            );
        }
    }

    #[test]
    fn no_file_and_no_variables_is_the_embedded_default() {
        assert_eq!(Config::load(None, env(&[])).unwrap(), Config::default());
        assert!(!Config::default().has_admin_password());
    }

    #[test]
    fn variables_override_the_file_with_the_settings_types() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lablink.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"0.0.0.0:9000\"\n[allocator]\npin_length = 8\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&path),
            env(&[
                ("LABLINK_SERVER__MAX_WAIT_SECONDS", "30"),
                ("LABLINK_SERVER__SECURE_COOKIES", "true"),
                ("LABLINK_ADMIN__USER", "12345"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.listen, "0.0.0.0:9000");
        assert_eq!(config.server.max_wait_seconds, 30);
        assert!(config.server.secure_cookies);
        assert_eq!(config.allocator.pin_length, 8);
        assert_eq!(config.admin.user, "12345");
    }

    #[test]
    #[cfg(feature = "aws")]
    fn the_aws_provisioner_is_configured_by_file_and_variables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lablink.toml");
        std::fs::write(
            &path,
            "[provisioner]\nkind = \"aws\"\n[provisioner.aws]\nami = \"ami-0abc\"\n\
             instance_types = \"g4dn.xlarge, g5.xlarge\"\ngpu = true\n",
        )
        .unwrap();
        let vars = env(&[
            (
                "LABLINK_PROVISIONER__AWS__ALLOCATOR_URL",
                "https://lablink.example.org",
            ),
            (
                "LABLINK_PROVISIONER__AWS__AGENT_URL",
                "https://bucket.s3/agent?X-Amz-Signature=s",
            ),
        ]);
        let config = Config::load(Some(&path), vars).unwrap();
        let aws = &config.provisioner.aws;
        assert_eq!(aws.ami, "ami-0abc");
        assert!(aws.gpu);
        assert_eq!(aws.allocator_url, "https://lablink.example.org");
        assert!(!format!("{config:?}").contains("X-Amz-Signature"));
        assert!(format!("{:?}", aws.builder()).contains("g5.xlarge"));

        // Without an AMI and an allocator URL, both are reported.
        std::fs::write(&path, "[provisioner]\nkind = \"aws\"\n").unwrap();
        let problems = Config::load(Some(&path), env(&[])).unwrap_err();
        assert!(problems.iter().any(|p| p.contains("ami")), "{problems:?}");
        assert!(
            problems.iter().any(|p| p.contains("allocator_url")),
            "{problems:?}"
        );
    }

    #[test]
    fn yaml_files_work_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lablink.yaml");
        std::fs::write(
            &path,
            "agents:\n  auth: open\nallocator:\n  hostname_prefix: ws\n",
        )
        .unwrap();
        let config = Config::load(Some(&path), env(&[])).unwrap();
        assert_eq!(config.agents.auth, AgentAuthMode::Open);
        assert_eq!(config.allocator.hostname_prefix, "ws");
    }

    #[test]
    fn collect_settings_come_from_the_file_and_variables_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("collect.toml");
        std::fs::write(
            &path,
            "[collect]\nroots = [\"/home/{hostname}\", \"~/work\"]\npatterns = [\"**/*.slp\"]\nmax_vm_bytes = 1000\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&path),
            env(&[
                ("LABLINK_COLLECT__DESTROY_COLLECTS_FIRST", "true"),
                ("LABLINK_COLLECT__STORE", "memory"),
            ]),
        )
        .unwrap();
        let settings = config.collect.settings();
        assert_eq!(settings.roots, ["/home/{hostname}", "~/work"]);
        assert_eq!(settings.max_vm_bytes, 1000);
        assert!(settings.destroy_collects_first);
        assert_eq!(config.collect.store, "memory");

        std::fs::write(
            &path,
            "[collect]\nroots = [\"relative\"]\npatterns = [\"a[\"]\nmax_vm_bytes = 0\nstore = \"ftp\"\n",
        )
        .unwrap();
        let problems = Config::load(Some(&path), env(&[])).unwrap_err().join("\n");
        for expected in [
            "root \"relative\"",
            "pattern \"a[\"",
            "max_vm_bytes",
            "store \"ftp\"",
        ] {
            assert!(
                problems.contains(expected),
                "{expected} missing from:\n{problems}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"nowhere\"\nbogus = 1\n[allocator]\npin_length = 2\n[nonsense]\n",
        )
        .unwrap();
        let problems = Config::load(
            Some(&path),
            env(&[
                ("LABLINK_SERVER__MAX_WAIT_SECONDS", "soon"),
                ("LABLINK_NOPE__X", "1"),
                // Not a setting (no section): another program's variable, left alone.
                ("LABLINK_AWS_TEST_ENDPOINT", "http://127.0.0.1:1"),
                ("LABLINK_ADMIN__PASSWORD_HASH", "plain"),
                // A testing aid of the fake provisioner, on the (default) local one.
                ("LABLINK_PROVISIONER__FAKE_INVENTORY_DIR", "/tmp/cloud"),
            ]),
        )
        .unwrap_err();
        let all = problems.join("\n");
        for expected in [
            "fake_inventory_dir",
            "bogus",
            "pin_length",
            "nonsense",
            "LABLINK_SERVER__MAX_WAIT_SECONDS",
            "LABLINK_NOPE__X",
            "password_hash",
        ] {
            assert!(all.contains(expected), "{expected} missing from:\n{all}");
        }
        assert!(!all.contains("LABLINK_AWS_TEST_ENDPOINT"), "{all}");
        assert!(problems.len() >= 5, "{all}");
    }

    #[test]
    fn supervisor_settings_come_from_the_file_and_variables_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workshop.toml");
        std::fs::write(
            &path,
            "[allocator]\norphan_policy = \"terminate\"\n\
             [allocator.supervisor]\ntick = 5\n\
             [allocator.supervisor.pool]\nenabled = true\nmin_available = 2\nmax_total = 60\n\
             [[allocator.supervisor.pool.windows]]\n\
             start = \"2026-11-22T14:00:00Z\"\nend = \"2026-11-22T15:00:00Z\"\nmin_available = 40\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&path),
            env(&[
                (
                    "LABLINK_ALLOCATOR__SUPERVISOR__IDLE_RELEASE__ENABLED",
                    "true",
                ),
                (
                    "LABLINK_ALLOCATOR__SUPERVISOR__DESTRUCTION__AT",
                    "2026-11-22T18:00:00Z",
                ),
            ]),
        )
        .unwrap();
        let s = &config.allocator.supervisor;
        assert_eq!(
            config.allocator.orphan_policy,
            lablink_core::OrphanPolicy::Terminate
        );
        assert_eq!(s.tick, Duration::from_secs(5));
        assert!(s.pool.enabled && s.idle_release.enabled);
        assert_eq!((s.pool.min_available, s.pool.max_total), (2, 60));
        assert_eq!(s.pool.windows[0].min_available, 40);
        assert_eq!(
            s.destruction.at.unwrap().to_rfc3339(),
            "2026-11-22T18:00:00+00:00"
        );

        std::fs::write(
            &path,
            "[allocator.supervisor.pool]\nmin_available = 50\nmax_total = 10\nbogus = 1\n",
        )
        .unwrap();
        let problems = Config::load(Some(&path), env(&[])).unwrap_err().join("\n");
        assert!(problems.contains("bogus"), "{problems}");
        std::fs::write(
            &path,
            "[allocator.supervisor.pool]\nmin_available = 50\nmax_total = 10\n",
        )
        .unwrap();
        let problems = Config::load(Some(&path), env(&[])).unwrap_err().join("\n");
        assert!(problems.contains("max_total"), "{problems}");
    }
}
