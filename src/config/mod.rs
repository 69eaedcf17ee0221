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

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use lablink_core::AllocatorConfig;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::http::HttpOptions;

mod backends;
mod load;
mod server;

pub use backends::{ArtifactStoreConfig, CollectConfig, ProvisionerConfig};
use load::{overlay, read_file, section};
pub use server::{
    AdminConfig, AgentsConfig, DatabaseConfig, DesktopConfig, LogConfig, ParticipantsConfig,
    ServerConfig,
};

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
    /// Hourly prices by instance type, for the estimated cost.
    pub cost: lablink_core::Prices,
    /// The participant's desktop: Chrome Remote Desktop or the browser desktop.
    pub desktop: DesktopConfig,
}

impl Config {
    /// Loads the file at `path` (if any) and then the `LABLINK_*` variables of `env`.
    /// Returns every problem found, including those of [`Config::host_problems`].
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
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
            .collect();
        vars.sort();
        // The kinds chosen (by the file, then the variables) decide which settings exist.
        let mut defaults = Config::default();
        let chosen = |path: &[&str]| {
            let var = format!("{ENV_PREFIX}{}__KIND", path.join("__").to_uppercase());
            let from_env = vars.iter().find(|(k, _)| *k == var).map(|(_, v)| v.clone());
            let from_file = path
                .iter()
                .try_fold(&tree, |node, key| node.get(key))
                .and_then(|table| table.get("kind"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            from_env.or(from_file)
        };
        let mut known_kinds = true;
        if let Some(kind) = chosen(&["provisioner"]) {
            match ProvisionerConfig::default_of(&kind) {
                Ok(p) => defaults.provisioner = p,
                Err(e) => {
                    problems.push(e);
                    known_kinds = false;
                }
            }
        }
        if let Some(kind) = chosen(&["collect", "store"]) {
            match ArtifactStoreConfig::default_of(&kind) {
                Ok(s) => defaults.collect.store = s,
                Err(e) => {
                    problems.push(e);
                    known_kinds = false;
                }
            }
        }
        // Optional tables exist for the variables that name their settings.
        defaults.server.tls.get_or_insert_with(Default::default);
        let defaults = serde_json::to_value(defaults).unwrap_or_default();
        for (var, raw) in vars {
            let path: Vec<&str> = var[ENV_PREFIX.len()..].split("__").collect();
            if let Err(e) = overlay(&mut tree, &defaults, &var, &path, &raw) {
                problems.push(e);
            }
        }
        // A backend's table without `kind` is the default kind's.
        for table in ["/provisioner", "/collect/store"] {
            if let Some(Value::Object(map)) = tree.pointer_mut(table) {
                map.entry("kind").or_insert_with(|| "local".into());
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
            "cost",
            "desktop",
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
            // An unknown kind is reported once, not again by serde.
            provisioner: if known_kinds {
                section(&tree, "provisioner", &mut problems)
            } else {
                ProvisionerConfig::default()
            },
            log: section(&tree, "log", &mut problems),
            collect: if known_kinds {
                section(&tree, "collect", &mut problems)
            } else {
                CollectConfig::default()
            },
            participants: section(&tree, "participants", &mut problems),
            cost: section(&tree, "cost", &mut problems),
            desktop: section(&tree, "desktop", &mut problems),
        };
        // `[desktop] mode` is the allocator's (it decides what a claim needs).
        let mut config = config;
        config.allocator.desktop_mode = config.desktop.mode;
        problems.extend(config.host_problems());
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
        problems.extend(self.server.problems());
        problems.extend(self.admin.problems());
        problems.extend(self.database.problems());
        problems.extend(self.provisioner.problems());
        problems.extend(self.log.problems());
        problems.extend(self.collect.problems());
        problems.extend(self.participants.problems());
        problems.extend(self.cost.problems());
        problems
    }

    /// [`problems`](Self::problems) plus what only this machine can tell, such as a missing
    /// terraform program, a module without the variables the provisioner sets, or
    /// certificate files that cannot be read:
    /// `lablink validate` and `lablink serve` check these too.
    pub fn host_problems(&self) -> Vec<String> {
        let mut problems = self.problems();
        if let Some(tls) = &self.server.tls {
            problems.extend(tls.problems());
        }
        problems.extend(self.provisioner.host_problems());
        problems.extend(self.desktop.problems());
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
        if !loopback && self.server.tls.is_none() && self.server.trusted_proxies.is_empty() {
            warnings.push(format!(
                "[server] listen {} is reachable from other machines over plain HTTP: serve [server.tls], or put a TLS proxy in front and list it in trusted_proxies, or admins sign in in clear text",
                self.server.listen
            ));
        }
        if self.server.tls.is_some() && self.provisioner.kind() == "local" {
            warnings.push(
                "[server.tls] with the local provisioner: its agents call https://127.0.0.1, so the certificate must be valid for 127.0.0.1 and trusted on this machine"
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
        options.max_wait = self.allocator.max_wait;
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
        if !self.admin.session_secret.is_empty() {
            options.session_key = Some(crate::http::CookieKey::from_secret(
                &self.admin.session_secret,
            ));
        }
        options.access_code = some(&self.participants.access_code);
        options.prices = self.cost.clone();
        options.desktop.mode = self.desktop.mode;
        options.desktop.novnc_dir = self.desktop.novnc_dir.clone();
        options.desktop.relay_url = self.desktop.relay_url.clone();
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
    use crate::http::AgentAuthMode;

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
             [admin]\nsession_secret = \"another secret, of forty characters....\"\n\
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
        assert!(options.session_key.is_some());
        for secret in ["blue-heron-42", "thirty-two", "Ada@Lab", "forty characters"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        // Reachable from other machines without a metrics token: a warning, not a problem.
        assert_eq!(config.warnings().len(), 1, "{:?}", config.warnings());
        assert!(Config::default().warnings().is_empty(), "loopback is fine");

        std::fs::write(
            &path,
            "[server]\ntrusted_proxies = [\"10.0.0.0/33\", \"proxy\"]\ncookie_secret = \"short\"\n\
             metrics_token = \"change-me-to-a-long-random-token\"\n\
             [participants]\nregistered_emails = [\"ok@lab.org\", \"not an email\"]\nrequests_burst = 0\n",
        )
        .unwrap();
        let problems = Config::load(Some(&path), env(&[])).unwrap_err();
        for expected in [
            "\"10.0.0.0/33\"",
            "\"proxy\"",
            "cookie_secret",
            "registered_emails[1]",
            "metrics_token is still the sample's placeholder",
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
    fn a_pool_of_registered_machines_only_is_kind_manual() {
        let config = Config::load(None, env(&[("LABLINK_PROVISIONER__KIND", "manual")])).unwrap();
        assert_eq!(
            config.provisioner,
            ProvisionerConfig::Manual(Default::default())
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lablink.toml");
        std::fs::write(
            &path,
            "[provisioner]\nkind = \"manual\"\nami = \"ami-0abc\"\n",
        )
        .unwrap();
        let error = Config::load(Some(&path), env(&[])).unwrap_err().join("; ");
        assert!(error.contains("ami"), "{error}");
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
                ("LABLINK_ALLOCATOR__MAX_WAIT", "600"),
                ("LABLINK_SERVER__SECURE_COOKIES", "true"),
                ("LABLINK_SERVER__TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.7"),
                ("LABLINK_ADMIN__USER", "12345"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.listen, "0.0.0.0:9000");
        // One setting caps the agents' long poll, for the allocator and the HTTP layer.
        assert_eq!(config.allocator.max_wait, Duration::from_secs(600));
        assert_eq!(
            config.http_options(String::new()).max_wait,
            Duration::from_secs(600)
        );
        assert_eq!(config.server.trusted_proxies, ["10.0.0.0/8", "192.0.2.7"]);
        assert_eq!(config.server.tls, None, "no variable named it");

        // `[server.tls]` from variables alone: the files are read (and missing here).
        let problems = Config::load(
            None,
            env(&[
                ("LABLINK_SERVER__TLS__CERT_FILE", "/nonexistent/cert.pem"),
                ("LABLINK_SERVER__TLS__KEY_FILE", "/nonexistent/key.pem"),
            ]),
        )
        .unwrap_err()
        .join("\n");
        assert!(problems.contains("/nonexistent/cert.pem"), "{problems}");
        assert!(!problems.contains("no setting"), "{problems}");
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
            "[provisioner]\nkind = \"aws\"\nami = \"ami-0abc\"\n\
             instance_types = [\"g4dn.xlarge\", \"g5.xlarge\"]\ngpu = true\n",
        )
        .unwrap();
        let vars = env(&[
            (
                "LABLINK_PROVISIONER__ALLOCATOR_URL",
                "https://lablink.example.org",
            ),
            (
                "LABLINK_PROVISIONER__AGENT_URL",
                "https://bucket.s3/agent?X-Amz-Signature=s",
            ),
            ("LABLINK_PROVISIONER__SUBNETS", "subnet-1,subnet-2"),
        ]);
        let config = Config::load(Some(&path), vars).unwrap();
        let ProvisionerConfig::Aws(aws) = &config.provisioner else {
            panic!("{config:?}")
        };
        assert_eq!(aws.ami, "ami-0abc");
        assert!(aws.gpu);
        assert_eq!(aws.subnets, ["subnet-1", "subnet-2"]);
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
    #[cfg(feature = "terraform")]
    fn the_terraform_provisioner_is_selectable_and_its_module_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lablink.toml");
        let terraform = dir.path().join("terraform");
        std::fs::write(&terraform, "").unwrap();
        std::fs::write(
            &path,
            format!(
                "[provisioner]\nkind = \"terraform\"\nbinary = {terraform:?}\nworking_dir = \"tf\"\n\
                 [provisioner.variables]\nregion = \"eu-west-1\"\n\
                 [provisioner.state]\nkind = \"s3\"\nbucket = \"b\"\nkey = \"lablink.tfstate\"\nregion = \"eu-west-1\"\n"
            ),
        )
        .unwrap();
        let vars = env(&[(
            "LABLINK_PROVISIONER__VARIABLES__allocator_url",
            "https://lablink.example.org",
        )]);
        let config = Config::load(Some(&path), vars).unwrap();
        assert_eq!(config.provisioner.kind(), "terraform");
        let shown = format!("{config:?}");
        assert!(!shown.contains("lablink.example.org"), "{shown}");

        // The shipped module needs `allocator_url`; a missing program and a variable the
        // module lacks are reported with it.
        std::fs::write(
            &path,
            "[provisioner]\nkind = \"terraform\"\nbinary = \"/nonexistent/terraform\"\n\
             [provisioner.variables]\nregoin = \"eu-west-1\"\n",
        )
        .unwrap();
        let problems = Config::load(Some(&path), env(&[])).unwrap_err().join("\n");
        for expected in [
            "/nonexistent/terraform",
            "regoin",
            "allocator_url must be set",
        ] {
            assert!(
                problems.contains(expected),
                "{expected} missing from:\n{problems}"
            );
        }
    }

    #[test]
    fn an_unknown_kind_is_named_once_with_the_known_ones() {
        let problems =
            Config::load(None, env(&[("LABLINK_PROVISIONER__KIND", "openstack")])).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("\"openstack\" is not one of local, fake"),
            "{problems:?}"
        );
        let problems =
            Config::load(None, env(&[("LABLINK_COLLECT__STORE__KIND", "ftp")])).unwrap_err();
        assert!(
            problems[0].contains("[collect.store] kind \"ftp\""),
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
                ("LABLINK_COLLECT__STORE__KIND", "memory"),
            ]),
        )
        .unwrap();
        let settings = &config.collect.settings;
        assert_eq!(settings.roots, ["/home/{hostname}", "~/work"]);
        assert_eq!(settings.max_vm_bytes, 1000);
        assert!(settings.destroy_collects_first);
        assert_eq!(config.collect.store, ArtifactStoreConfig::Memory);

        std::fs::write(
            &path,
            "[collect]\nroots = [\"relative\"]\npatterns = [\"a[\"]\nmax_vm_bytes = 0\n\
             [collect.store]\ndir = \"\"\n",
        )
        .unwrap();
        let problems = Config::load(Some(&path), env(&[])).unwrap_err().join("\n");
        for expected in [
            "root \"relative\"",
            "pattern \"a[\"",
            "max_vm_bytes",
            "dir must be set",
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
                ("LABLINK_ALLOCATOR__MAX_WAIT", "soon"),
                ("LABLINK_NOPE__X", "1"),
                // Not a setting (no section): another program's variable, left alone.
                ("LABLINK_AWS_TEST_ENDPOINT", "http://127.0.0.1:1"),
                ("LABLINK_ADMIN__PASSWORD_HASH", "plain"),
                // A setting of the fake provisioner, on the (default) local one.
                ("LABLINK_PROVISIONER__INVENTORY_DIR", "/tmp/cloud"),
            ]),
        )
        .unwrap_err();
        let all = problems.join("\n");
        for expected in [
            "provisioner.inventory_dir",
            "bogus",
            "pin_length",
            "nonsense",
            "LABLINK_ALLOCATOR__MAX_WAIT",
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
