//! HTTPS served by the allocator itself: [`TlsConfig`] (the `[server.tls]` table), and
//! [`ReloadingCertResolver`], which serves the certificate in the configured files and picks
//! up a renewed one without a restart. [`HttpState::serve_tls`](super::HttpState::serve_tls)
//! serves the router with it.
//!
//! Renewal tools (certbot, cert-manager, acme.sh) replace the files in place; the resolver
//! checks them every [`reload_seconds`](TlsConfig::reload_seconds) and swaps the new pair in
//! for the following handshakes. A pair that does not load (half written, key of another
//! certificate, not PEM) is refused with a warning and the previous certificate stays.
//!
//! Neither log lines nor errors ever hold key material: they name the file and the reason.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_rustls::rustls;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How long a client may take to complete the TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTPS served by this process (`[server.tls]`): the certificate and key files, and how
/// often they are checked for a renewal.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// PEM private key of the certificate: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key_file: PathBuf,
    /// How often the files are checked for a change, seconds (at least 1).
    pub reload_seconds: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            reload_seconds: 10,
        }
    }
}

impl TlsConfig {
    /// Every problem of this configuration at once, each prefixed `[server.tls]`: unset,
    /// missing or unreadable files, no certificate or no key in them, a key that is not the
    /// certificate's, `reload_seconds` 0. Reads the files.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut check = |name: &str, file: &Path| {
            if file.as_os_str().is_empty() {
                problems.push(format!("[server.tls] {name} must be set"));
                return None;
            }
            match std::fs::read(file) {
                Ok(bytes) => Some(bytes),
                Err(source) => {
                    let e = TlsError::Unreadable {
                        file: file.to_owned(),
                        source,
                    };
                    problems.push(format!("[server.tls] {e}"));
                    None
                }
            }
        };
        let cert_pem = check("cert_file", &self.cert_file);
        let key_pem = check("key_file", &self.key_file);
        let certs = cert_pem.map(|pem| parse_certs(&self.cert_file, &pem));
        let key = key_pem.map(|pem| parse_key(&self.key_file, &pem));
        let certs = certs.and_then(|r| {
            r.map_err(|e| problems.push(format!("[server.tls] {e}")))
                .ok()
        });
        let key = key.and_then(|r| {
            r.map_err(|e| problems.push(format!("[server.tls] {e}")))
                .ok()
        });
        if let (Some(certs), Some(key)) = (certs, key) {
            if let Err(e) = certify(self, certs, key) {
                problems.push(format!("[server.tls] {e}"));
            }
        }
        if self.reload_seconds == 0 {
            problems.push(
                "[server.tls] reload_seconds must be at least 1 (how often the files are checked)"
                    .into(),
            );
        }
        problems
    }
}

/// Why a certificate or key file could not be used. The message names the file and the
/// reason, never the file's content.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read (missing, permissions, ...).
    Unreadable {
        /// The file.
        file: PathBuf,
        /// What reading it failed with.
        source: std::io::Error,
    },
    /// The file is not valid PEM, or holds something rustls cannot use.
    Invalid {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate file holds no certificate.
    NoCertificate {
        /// The file.
        file: PathBuf,
    },
    /// The key file holds no private key.
    NoKey {
        /// The file.
        file: PathBuf,
    },
    /// The private key is not the one the certificate was issued for.
    KeyMismatch {
        /// The certificate file.
        cert_file: PathBuf,
        /// The key file.
        key_file: PathBuf,
    },
}

impl TlsError {
    /// The file at fault (the key file for a mismatch).
    pub fn file(&self) -> &Path {
        match self {
            Self::Unreadable { file, .. }
            | Self::Invalid { file, .. }
            | Self::NoCertificate { file }
            | Self::NoKey { file } => file,
            Self::KeyMismatch { key_file, .. } => key_file,
        }
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable { file, source } => {
                write!(f, "cannot read {}: {source}", file.display())
            }
            Self::Invalid { file, reason } => write!(f, "{}: {reason}", file.display()),
            Self::NoCertificate { file } => write!(
                f,
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                file.display()
            ),
            Self::NoKey { file } => write!(
                f,
                "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                file.display()
            ),
            Self::KeyMismatch {
                cert_file,
                key_file,
            } => write!(
                f,
                "the private key in {} is not the key of the certificate in {}",
                key_file.display(),
                cert_file.display()
            ),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unreadable { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Inserted into the extensions of every request that arrived over TLS terminated by this
/// process; the router then treats the request as HTTPS (its cookies get `Secure`). A host
/// app that terminates TLS itself and mounts [`HttpState::router`](super::HttpState::router)
/// can insert it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServedOverTls;

/// The certificate in [`TlsConfig`]'s files, reloaded when the files change. Serves the
/// current pair to every handshake ([`ResolvesServerCert`]); [`keep_reloading`](Self::keep_reloading)
/// checks the files.
pub struct ReloadingCertResolver {
    config: TlsConfig,
    current: RwLock<Arc<CertifiedKey>>,
    /// Hash of the files' contents last loaded or refused, so a refused pair is reported
    /// once and retried only when a file changes again.
    seen: Mutex<[u8; 32]>,
}

impl fmt::Debug for ReloadingCertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCertResolver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ReloadingCertResolver {
    /// Loads the certificate chain and key of `config`; fails naming the file and the
    /// reason when one is missing, unreadable, holds nothing usable or the key is not the
    /// certificate's.
    pub fn load(config: &TlsConfig) -> Result<Self, TlsError> {
        let cert_pem = std::fs::read(&config.cert_file).map_err(|source| TlsError::Unreadable {
            file: config.cert_file.clone(),
            source,
        })?;
        let key_pem = std::fs::read(&config.key_file).map_err(|source| TlsError::Unreadable {
            file: config.key_file.clone(),
            source,
        })?;
        let key = load_pair(config, &cert_pem, &key_pem)?;
        Ok(Self {
            config: config.clone(),
            current: RwLock::new(Arc::new(key)),
            seen: Mutex::new(digest(&cert_pem, &key_pem)),
        })
    }

    /// The configuration the files come from.
    pub fn config(&self) -> &TlsConfig {
        &self.config
    }

    /// The certificate chain and key served now.
    pub fn certificate(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the files and, when they changed since the last load or refusal, loads the new
    /// pair. `Ok(true)`: a new certificate is served; `Ok(false)`: nothing changed; an
    /// error: the previous certificate stays.
    pub async fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let cert_pem = read(&self.config.cert_file).await?;
        let key_pem = read(&self.config.key_file).await?;
        let digest = digest(&cert_pem, &key_pem);
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == digest {
                return Ok(false);
            }
            *seen = digest;
        }
        let key = load_pair(&self.config, &cert_pem, &key_pem)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
        Ok(true)
    }

    /// Checks the files every [`reload_seconds`](TlsConfig::reload_seconds) (at least 1)
    /// and loads a changed pair; logs a reload at info and a refused pair at warn (once per
    /// distinct problem). Never returns: run it beside the server and drop it at shutdown.
    pub async fn keep_reloading(&self) {
        let period = Duration::from_secs(self.config.reload_seconds.max(1));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_warning: Option<String> = None;
        loop {
            ticks.tick().await;
            match self.reload_if_changed().await {
                Ok(true) => {
                    last_warning = None;
                    tracing::info!(
                        cert_file = %self.config.cert_file.display(),
                        "TLS certificate reloaded"
                    );
                }
                Ok(false) => {}
                Err(e) => {
                    let warning = e.to_string();
                    if last_warning.as_ref() != Some(&warning) {
                        tracing::warn!(
                            error = %warning,
                            "TLS certificate not reloaded; still serving the previous one"
                        );
                    }
                    last_warning = Some(warning);
                }
            }
        }
    }

    /// A rustls server configuration serving this resolver's certificate, HTTP/1.1 only
    /// (ALPN `http/1.1`), on the `ring` provider.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// [`ReloadingCertResolver::keep_reloading`] as a task of its own, aborted when dropped.
#[derive(Debug)]
pub(crate) struct Reloading(tokio::task::AbortHandle);

impl Reloading {
    pub(crate) fn spawn(certificates: Arc<ReloadingCertResolver>) -> Self {
        let task = tokio::spawn(async move { certificates.keep_reloading().await });
        Self(task.abort_handle())
    }
}

impl Drop for Reloading {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ResolvesServerCert for ReloadingCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certificate())
    }
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

async fn read(file: &Path) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(file)
        .await
        .map_err(|source| TlsError::Unreadable {
            file: file.to_owned(),
            source,
        })
}

/// Both files' contents in one hash (each length-prefixed, so bytes cannot move between them).
fn digest(cert_pem: &[u8], key_pem: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in [cert_pem, key_pem] {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

fn load_pair(
    config: &TlsConfig,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let certs = parse_certs(&config.cert_file, cert_pem);
    let key = parse_key(&config.key_file, key_pem);
    certify(config, certs?, key?)
}

fn parse_certs(file: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid_pem(file, &e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            file: file.to_owned(),
        });
    }
    Ok(certs)
}

fn parse_key(file: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            file: file.to_owned(),
        },
        e => invalid_pem(file, &e),
    })
}

/// A PEM error in words that never quote the file (a key file's lines are secret).
fn invalid_pem(file: &Path, e: &pem::Error) -> TlsError {
    let reason = match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line",
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64",
        pem::Error::SectionTooLarge => "a PEM section is too large",
        _ => "not valid PEM",
    };
    TlsError::Invalid {
        file: file.to_owned(),
        reason: reason.into(),
    }
}

/// The chain with its key, checked to belong together.
fn certify(
    config: &TlsConfig,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, TlsError> {
    let signing_key =
        provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Invalid {
                file: config.key_file.clone(),
                reason: format!("unusable private key ({e})"),
            })?;
    let certified = CertifiedKey::new(certs, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
        }),
        Err(e) => Err(TlsError::Invalid {
            file: config.cert_file.clone(),
            reason: format!("unusable certificate ({e})"),
        }),
    }
}
