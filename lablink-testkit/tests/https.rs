//! HTTPS served by the allocator itself (`HttpState::serve_tls`): a participant gets a VM over
//! TLS with `Secure` cookies, a renewed certificate is served without a restart, a broken one
//! is refused while the previous one stays, and bad files fail loudly at start, naming the
//! file and never quoting the key.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lablink::http::{ReloadingCertResolver, TlsConfig, TlsError};
use lablink_testkit::{captured_logs, json_of, TestServer};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{self, RootCertStore};
use tokio_rustls::TlsConnector;

/// How long a poll waits for the server to do what the test expects before failing; a bound
/// on a failing test, not a timing the test measures.
const PATIENCE: Duration = Duration::from_secs(60);

/// A test certificate authority; the clients trust only it.
struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A server certificate and its key, as PEM (what the files hold) and DER (what is served).
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl TestCa {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "LabLink test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    fn der(&self) -> &[u8] {
        self.cert.der()
    }

    /// A new certificate (new key) for 127.0.0.1 and localhost.
    fn issue(&self) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "lablink test server");
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// `cert.pem` and `key.pem` in a temporary directory.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn with(leaf: &Leaf) -> Self {
        let files = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        files.install(leaf);
        files
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// Writes `leaf`'s key, then its certificate, in place (as a renewal tool does).
    fn install(&self, leaf: &Leaf) {
        std::fs::write(self.key(), &leaf.key_pem).unwrap();
        std::fs::write(self.cert(), &leaf.cert_pem).unwrap();
    }

    fn config(&self, reload_seconds: u64) -> TlsConfig {
        TlsConfig {
            cert_file: self.cert(),
            key_file: self.key(),
            reload_seconds,
        }
    }
}

fn addr_of(server: &TestServer) -> SocketAddr {
    server
        .base
        .strip_prefix("https://")
        .expect("an HTTPS server")
        .parse()
        .unwrap()
}

/// What a TLS handshake with the server shows: the certificate it presents (DER) and the
/// protocol it chose when offered HTTP/2 and HTTP/1.1.
async fn handshake(addr: SocketAddr, ca: &TestCa) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().to_vec().into()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()), tcp)
        .await
        .expect("TLS handshake with the server");
    let (_, connection) = stream.get_ref();
    let served = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presents a certificate")
        .to_vec();
    (served, connection.alpn_protocol().map(<[u8]>::to_vec))
}

/// Polls the certificate the server presents until it is `expected`.
async fn wait_until_served(addr: SocketAddr, ca: &TestCa, expected: &Leaf) {
    let start = Instant::now();
    loop {
        if handshake(addr, ca).await.0 == expected.der {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the renewed certificate was not served within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the captured logs until a line holds every one of `parts`; returns that line.
async fn wait_for_log_line(parts: &[&str]) -> String {
    let logs = captured_logs();
    let start = Instant::now();
    loop {
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        if let Some(line) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_owned();
        }
        assert!(
            start.elapsed() < PATIENCE,
            "no log line with {parts:?} within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The base64 lines of a PEM key: none may ever reach a log or an error.
fn secret_lines(key_pem: &str) -> Vec<String> {
    key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn assert_no_key_material(text: &str, keys: &[&Leaf]) {
    for key in keys {
        for line in secret_lines(&key.key_pem) {
            assert!(!text.contains(&line), "key material leaked: {text}");
        }
    }
}

async fn start(files: &Files, ca: &TestCa, reload_seconds: u64) -> TestServer {
    let certificates = ReloadingCertResolver::load(&files.config(reload_seconds)).unwrap();
    TestServer::start_https(Arc::new(certificates), ca.der()).await
}

#[tokio::test]
async fn a_participant_gets_a_vm_over_https_with_a_secure_cookie() {
    let ca = TestCa::new();
    let leaf = ca.issue();
    let files = Files::with(&leaf);
    let server = start(&files, &ca, 10).await;
    let (served, protocol) = handshake(addr_of(&server), &ca).await;
    assert_eq!(served, leaf.der, "the configured certificate is served");
    assert_eq!(protocol.as_deref(), Some(&b"http/1.1"[..]), "HTTP/1.1 only");

    let hostnames = server.launch_ready(1).await;
    let response = server.request_vm("ada@example.org", "4/0AbCd").await;
    let cookies: Vec<String> = response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["hostname"], hostnames[0].as_str(), "{body}");
    assert!(!cookies.is_empty(), "the participant gets a cookie");
    for cookie in &cookies {
        assert!(
            cookie.contains("; Secure"),
            "a cookie set over HTTPS lacks Secure: {cookie}"
        );
    }
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_restart_and_a_broken_one_is_refused() {
    captured_logs();
    let ca = TestCa::new();
    let first = ca.issue();
    let renewed = ca.issue();
    assert_ne!(first.der, renewed.der);
    let files = Files::with(&first);
    let server = start(&files, &ca, 1).await;
    let addr = addr_of(&server);
    assert_eq!(handshake(addr, &ca).await.0, first.der);

    files.install(&renewed);
    wait_until_served(addr, &ca, &renewed).await;
    wait_for_log_line(&[
        "TLS certificate reloaded",
        &files.cert().display().to_string(),
    ])
    .await;
    let healthz = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        healthz.status(),
        StatusCode::OK,
        "the server answers after a reload"
    );

    std::fs::write(
        files.cert(),
        "-----BEGIN CERTIFICATE-----\nthis is not base64 !!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let warning = wait_for_log_line(&[
        "WARN",
        "still serving the previous one",
        &files.cert().display().to_string(),
        "not valid base64",
    ])
    .await;
    assert_eq!(
        handshake(addr, &ca).await.0,
        renewed.der,
        "after {warning}, the renewed certificate is still served"
    );
    let healthz = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), StatusCode::OK, "the server still answers");

    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    assert_no_key_material(&logs, &[&first, &renewed]);
}

#[tokio::test]
async fn a_failed_handshake_closes_only_that_connection() {
    let ca = TestCa::new();
    let leaf = ca.issue();
    let files = Files::with(&leaf);
    let server = start(&files, &ca, 10).await;

    let mut plain = tokio::net::TcpStream::connect(addr_of(&server))
        .await
        .unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    // The server closes the connection (possibly after a TLS alert); it never answers HTTP.
    let _ = plain.read_to_end(&mut answer).await;
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP answered on TLS");

    let healthz = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_missing_key_file_at_start_is_an_error_naming_the_file() {
    let ca = TestCa::new();
    let leaf = ca.issue();
    let files = Files::with(&leaf);
    std::fs::remove_file(files.key()).unwrap();

    let error = ReloadingCertResolver::load(&files.config(10)).unwrap_err();
    assert!(matches!(error, TlsError::Unreadable { .. }), "{error:?}");
    assert_eq!(error.file(), files.key());
    let message = error.to_string();
    assert!(
        message.contains(&files.key().display().to_string()),
        "the error names the key file: {message}"
    );
}

#[tokio::test]
async fn bad_files_at_start_are_errors_that_name_the_file_and_never_quote_the_key() {
    let ca = TestCa::new();
    let leaf = ca.issue();
    let other = ca.issue();
    let files = Files::with(&leaf);
    let config = files.config(10);

    // The key of another certificate.
    std::fs::write(files.key(), &other.key_pem).unwrap();
    let error = ReloadingCertResolver::load(&config).unwrap_err();
    assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&path_text(&files.key())), "{message}");
    assert!(message.contains(&path_text(&files.cert())), "{message}");

    // A key file holding the certificate instead of a key.
    std::fs::write(files.key(), &leaf.cert_pem).unwrap();
    let error = ReloadingCertResolver::load(&config).unwrap_err();
    assert!(matches!(error, TlsError::NoKey { .. }), "{error:?}");
    assert!(error.to_string().contains(&path_text(&files.key())));

    // A certificate file holding only the key.
    std::fs::write(files.key(), &leaf.key_pem).unwrap();
    std::fs::write(files.cert(), &leaf.key_pem).unwrap();
    let error = ReloadingCertResolver::load(&config).unwrap_err();
    assert!(matches!(error, TlsError::NoCertificate { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&path_text(&files.cert())), "{message}");
    assert_no_key_material(&message, &[&leaf, &other]);

    // A key file whose base64 is broken in the middle of the key.
    let mut broken = leaf.key_pem.clone();
    let at = broken.find('\n').unwrap() + 5;
    broken.insert_str(at, "!!");
    std::fs::write(files.cert(), &leaf.cert_pem).unwrap();
    std::fs::write(files.key(), &broken).unwrap();
    let error = ReloadingCertResolver::load(&config).unwrap_err();
    assert!(matches!(error, TlsError::Invalid { .. }), "{error:?}");
    let message = format!("{error} {error:?}");
    assert!(message.contains(&path_text(&files.key())), "{message}");
    assert_no_key_material(&message, &[&leaf, &other]);
}

#[test]
fn problems_lists_every_tls_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = TlsConfig {
        cert_file: dir.path().join("missing-cert.pem"),
        key_file: dir.path().join("missing-key.pem"),
        reload_seconds: 0,
    };
    let problems = config.problems();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems.iter().all(|p| p.starts_with("[server.tls] ")));
    assert!(problems[0].contains("missing-cert.pem"), "{problems:#?}");
    assert!(problems[1].contains("missing-key.pem"), "{problems:#?}");
    assert!(problems[2].contains("reload_seconds"), "{problems:#?}");

    let unset = TlsConfig::default().problems();
    assert_eq!(unset.len(), 2, "{unset:#?}");
    assert!(unset[0].contains("cert_file must be set"), "{unset:#?}");
    assert!(unset[1].contains("key_file must be set"), "{unset:#?}");

    let ca = TestCa::new();
    let leaf = ca.issue();
    let files = Files::with(&leaf);
    assert_eq!(files.config(10).problems(), Vec::<String>::new());
    std::fs::write(files.key(), ca.issue().key_pem).unwrap();
    let mismatch = files.config(10).problems();
    assert_eq!(mismatch.len(), 1, "{mismatch:#?}");
    assert!(mismatch[0].contains("is not the key of"), "{mismatch:#?}");
}

fn path_text(path: &Path) -> String {
    path.display().to_string()
}
