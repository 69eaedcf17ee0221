//! `[server]`, `[admin]`, `[agents]`, `[participants]`, `[database]` and `[log]`: who
//! talks to the allocator and how.

use std::fmt;

use lablink_core::redacted;
use serde::{Deserialize, Serialize};

use crate::http::{AgentAuthMode, HttpOptions};

/// Where and how the HTTP server listens. `Debug` hides the secrets.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind (`host:port`).
    pub listen: String,
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
    /// `[server.tls]`: serve HTTPS with this certificate and key (PEM), picked up again
    /// when the files change. None: plain HTTP (behind a TLS proxy, or on loopback).
    pub tls: Option<crate::http::TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 2 * 1024 * 1024,
            request_timeout_seconds: 30,
            secure_cookies: false,
            trusted_proxies: Vec::new(),
            metrics_token: String::new(),
            cookie_secret: String::new(),
            tls: None,
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("request_timeout_seconds", &self.request_timeout_seconds)
            .field("secure_cookies", &self.secure_cookies)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("metrics_token", &redacted(&self.metrics_token))
            .field("cookie_secret", &redacted(&self.cookie_secret))
            .field("tls", &self.tls)
            .finish()
    }
}

impl ServerConfig {
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "[server] listen {:?} is not host:port",
                self.listen
            ));
        }
        if self.request_timeout_seconds == 0 {
            problems.push("[server] request_timeout_seconds must be positive".into());
        }
        if self.max_body_bytes < 1024 {
            problems.push("[server] max_body_bytes must be at least 1024".into());
        }
        problems.extend(self.trusted_proxy_networks().err().unwrap_or_default());
        if !self.cookie_secret.is_empty() && self.cookie_secret.len() < 32 {
            problems.push("[server] cookie_secret must be at least 32 characters".into());
        }
        for (name, value) in [
            ("cookie_secret", &self.cookie_secret),
            ("metrics_token", &self.metrics_token),
        ] {
            if is_placeholder(value) {
                problems.push(format!(
                    "[server] {name} is still the sample's placeholder: make a random one"
                ));
            }
        }
        problems
    }

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
            .field("access_code", &redacted(&self.access_code))
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

    pub(super) fn problems(&self) -> Vec<String> {
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
    /// Secret (at least 32 characters) that signs admin session cookies. Empty: a key made
    /// once and kept in the store, so replicas on one PostgreSQL share it without setting
    /// anything.
    pub session_secret: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            user: "admin".into(),
            password_hash: String::new(),
            password: String::new(),
            sign_in_failures_per_minute: 5,
            session_secret: String::new(),
        }
    }
}

impl AdminConfig {
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.user.trim().is_empty() {
            problems.push("[admin] user must not be empty".into());
        }
        if !self.password_hash.is_empty() && !self.password.is_empty() {
            problems.push("[admin] give password_hash or password, not both".into());
        }
        if !self.password_hash.is_empty() && argon2::PasswordHash::new(&self.password_hash).is_err()
        {
            problems
                .push("[admin] password_hash is not an argon2 PHC string ($argon2id$...)".into());
        }
        if !self.password.is_empty() && self.password.len() < 12 {
            problems.push("[admin] password must be at least 12 characters".into());
        }
        if !self.session_secret.is_empty() && self.session_secret.len() < 32 {
            problems.push("[admin] session_secret must be at least 32 characters".into());
        }
        if is_placeholder(&self.session_secret) {
            problems
                .push("[admin] session_secret is still a placeholder: make a random one".into());
        }
        problems
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
            .field("session_secret", &redacted(&self.session_secret))
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

impl DatabaseConfig {
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.url.is_empty() && !self.url.starts_with("postgres") {
            problems.push("[database] url must start with postgres:// or postgresql://".into());
        }
        if !self.url.is_empty() && !cfg!(feature = "postgres") {
            problems.push("[database] url is set but this build has no `postgres` feature".into());
        }
        problems
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redacted(&self.url))
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// The participant's desktop (`[desktop]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DesktopConfig {
    /// `crd` (Chrome Remote Desktop, the default) or `browser` (noVNC served by the
    /// allocator, bridged to the VM's VNC server through a tunnel its agent opens).
    pub mode: lablink_core::DesktopMode,
    /// Browser mode: the installed `@novnc/novnc` package (`npm ci --prefix desktop` puts it
    /// in `desktop/node_modules/@novnc/novnc`; the release tarball carries it in `novnc/`).
    pub novnc_dir: Option<std::path::PathBuf>,
    /// Browser mode: the URL agents dial to reach this replica (`https://replica-1.example.org`),
    /// when replicas sit behind one address. Unset: agents dial their allocator URL.
    pub relay_url: Option<String>,
}

impl DesktopConfig {
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(url) = &self.relay_url {
            let scheme_ok = ["http://", "https://", "ws://", "wss://"]
                .iter()
                .any(|s| url.starts_with(s) && url.len() > s.len());
            if !scheme_ok {
                problems.push(format!(
                    "[desktop] relay_url {url:?} must be an http(s):// or ws(s):// URL"
                ));
            }
        }
        if let Some(dir) = &self.novnc_dir {
            if !dir.join("core/rfb.js").is_file() {
                problems.push(format!(
                    "[desktop] novnc_dir {} holds no core/rfb.js (install noVNC: npm ci --prefix desktop)",
                    dir.display()
                ));
            }
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

impl LogConfig {
    pub(super) fn problems(&self) -> Vec<String> {
        if matches!(self.format.as_str(), "text" | "json") {
            Vec::new()
        } else {
            vec!["[log] format must be text or json".into()]
        }
    }
}

/// Whether a secret is a documentation placeholder (`change-me...`) left in a copied file.
fn is_placeholder(secret: &str) -> bool {
    secret.to_ascii_lowercase().contains("change-me")
}
