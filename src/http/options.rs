//! [`HttpOptions`]: the settings of the HTTP layer.

use std::fmt;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::client::RateLimit;
use super::signed::CookieKey;

/// How VM routes authenticate agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentAuthMode {
    /// Every VM route needs the VM's own bearer token (the default).
    #[default]
    Tokens,
    /// VM routes accept requests without a token. Only for local demos; logs a warning.
    Open,
}

/// Settings of the HTTP layer. `Debug` hides the password hash.
#[derive(Clone)]
pub struct HttpOptions {
    /// How agents authenticate.
    pub agent_auth: AgentAuthMode,
    /// The admin's user name.
    pub admin_user: String,
    /// The admin's password as an argon2 PHC string (see [`hash_password`](super::hash_password)).
    pub admin_password_hash: String,
    /// Longest a `/vm_startup` or v1 wait is held before "not assigned yet".
    pub max_wait: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Longest an ordinary (not held) request may take.
    pub request_timeout: Duration,
    /// Longest a client of a held route may take to send its request body (held routes are
    /// not bounded by `request_timeout`).
    pub body_read_timeout: Duration,
    /// Mark cookies `Secure` (set when served over HTTPS).
    pub secure_cookies: bool,
    /// How long an admin session lasts.
    pub session_ttl: Duration,
    /// Signs admin session cookies, so every replica holding it accepts them. `None` (the
    /// default): a key kept in the allocator's store
    /// ([`Allocator::shared_secret`](lablink_core::Allocator::shared_secret)), made by the
    /// first replica that needs it, so replicas on one PostgreSQL share it unconfigured.
    pub session_key: Option<CookieKey>,
    /// Failed admin sign-ins allowed per client address per minute.
    pub sign_in_failures_per_minute: u32,
    /// How often the admin event stream looks for changes.
    pub admin_refresh: Duration,
    /// Proxies (addresses or networks) whose `X-Forwarded-For` and `X-Forwarded-Proto` are
    /// believed; everyone else's are ignored.
    pub trusted_proxies: Vec<IpNet>,
    /// How many VM requests one client address may make (participant routes). The default
    /// lets a whole room behind one NAT address press the button at once.
    pub participant_limit: RateLimit,
    /// The event access code participants must type, if any (compared in constant time).
    pub access_code: Option<String>,
    /// The bearer token `/metrics` asks for, if any.
    pub metrics_token: Option<String>,
    /// Signs the cookies that prove a participant's browser (replicas must share it).
    pub cookie_key: CookieKey,
    /// Hourly prices by instance type, for the estimated cost in the admin UI, `/metrics`
    /// and exports.
    pub prices: lablink_core::Prices,
    /// The browser desktop: where noVNC is installed, the URL agents dial for tunnels.
    pub desktop: super::DesktopOptions,
}

impl fmt::Debug for HttpOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpOptions")
            .field("agent_auth", &self.agent_auth)
            .field("admin_user", &self.admin_user)
            .field("admin_password_hash", &"***")
            .field("max_wait", &self.max_wait)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("body_read_timeout", &self.body_read_timeout)
            .field("secure_cookies", &self.secure_cookies)
            .field("session_ttl", &self.session_ttl)
            .field("session_key", &self.session_key)
            .field(
                "sign_in_failures_per_minute",
                &self.sign_in_failures_per_minute,
            )
            .field("admin_refresh", &self.admin_refresh)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("participant_limit", &self.participant_limit)
            .field("access_code", &self.access_code.as_ref().map(|_| "***"))
            .field("metrics_token", &self.metrics_token.as_ref().map(|_| "***"))
            .field("cookie_key", &self.cookie_key)
            .field("prices", &self.prices)
            .field("desktop", &self.desktop)
            .finish()
    }
}

impl HttpOptions {
    /// 400 requests at once from one address, then 200 a minute: a room of 300 behind one
    /// NAT address pressing "get a VM" together (and some pressing twice) is served; a
    /// script cannot claim a large pool in a second. An access code or a list of registered
    /// emails is what keeps strangers out.
    pub const DEFAULT_PARTICIPANT_LIMIT: RateLimit = RateLimit {
        burst: 400,
        per_minute: 200,
    };

    /// Default settings with the admin `user` whose argon2 hash is `password_hash`.
    pub fn new(user: impl Into<String>, password_hash: impl Into<String>) -> Self {
        Self {
            agent_auth: AgentAuthMode::Tokens,
            admin_user: user.into(),
            admin_password_hash: password_hash.into(),
            max_wait: Duration::from_secs(120),
            max_body_bytes: 2 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(15),
            secure_cookies: false,
            session_ttl: Duration::from_secs(12 * 3600),
            session_key: None,
            sign_in_failures_per_minute: 5,
            admin_refresh: Duration::from_secs(1),
            trusted_proxies: Vec::new(),
            participant_limit: Self::DEFAULT_PARTICIPANT_LIMIT,
            access_code: None,
            metrics_token: None,
            cookie_key: CookieKey::generate(),
            prices: lablink_core::Prices::default(),
            desktop: super::DesktopOptions::default(),
        }
    }

    /// Default settings with the admin `user` and a plain `password`, hashed here with argon2.
    pub fn with_admin_password(
        user: impl Into<String>,
        password: &str,
    ) -> lablink_core::Result<Self> {
        Ok(Self::new(user, super::hash_password(password)?))
    }
}
