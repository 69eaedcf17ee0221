//! LabLink's test kit (not published): one place for what the tests of the allocator's HTTP
//! layer and of the agent share.
//!
//! - [`TestServer`]: the allocator's HTTP layer on `127.0.0.1:0` over a fake provisioner
//!   whose agent tokens the test can read (as a VM reads its user data), with request,
//!   sign-in and HTTPS helpers.
//! - [`Rig`]: the same HTTP layer on a fixed loopback address, on a runtime of its own so it
//!   can be killed and restarted, whose VMs are real agent processes started by the
//!   `LocalProcessProvisioner` ([`Workdir`] gives them recording stand-ins for
//!   `start-host` and `nvidia-smi`).
//! - The shared helpers: the admin account ([`ADMIN_USER`], [`ADMIN_PASSWORD`],
//!   [`admin_hash`]), a participant's CRD command ([`crd_command`]), JSON answers
//!   ([`json_of`], [`expect_error`]), polling ([`wait_until`]), a throwaway PostgreSQL
//!   database ([`TestDatabase`]), captured logs ([`captured_logs`]) and a participant's
//!   status stream ([`StatusEvents`]).
//! - [`Chromium`]: a headless Chromium driven through chromedriver's WebDriver API, for the
//!   tests that run the pages in a real browser ([`find_binary`] finds a program on `PATH`
//!   or fails naming its Debian package).
//!
//! The tests that need both the allocator and the agent live in this crate's `tests/`, so
//! neither `lablink` nor `lablink-agent` dev-depends on the other.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

mod agents;
mod chromium;
mod database;
mod events;
mod server;

pub use agents::{agent_process, agent_program, install_executable, script, Rig, Workdir};
pub use chromium::{find_binary, Chromium};
pub use database::TestDatabase;
pub use events::StatusEvents;
pub use server::{browser, TestServer, TokenProvisioner};

/// The admin's user name on every test server.
pub const ADMIN_USER: &str = "admin";
/// The admin's password on every test server.
pub const ADMIN_PASSWORD: &str = "correct horse battery staple";
/// The redirect URL of a CRD command.
pub const REDIRECT: &str = "https://remotedesktop.google.com/_/oauthredirect";

/// The hash of [`ADMIN_PASSWORD`], computed once per test binary (argon2 is slow
/// unoptimised).
pub fn admin_hash() -> String {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| lablink::http::hash_password(ADMIN_PASSWORD).unwrap())
        .clone()
}

/// The HTTP layer's options with the test admin account.
pub fn admin_options() -> lablink::http::HttpOptions {
    lablink::http::HttpOptions::new(ADMIN_USER, admin_hash())
}

/// A CRD command as a participant pastes it.
pub fn crd_command(code: &str) -> String {
    format!(
        "DISPLAY= /opt/google/chrome-remote-desktop/start-host --code=\"{code}\" \
         --redirect-url=\"{REDIRECT}\" --name=$(hostname)"
    )
}

/// The command a VM is given for `code`: built by LabLink, never the pasted text.
pub fn start_host(code: &str, hostname: &str) -> String {
    format!("start-host --code={code} --redirect-url={REDIRECT} --name={hostname}")
}

/// The value of the first `csrf` form field of a page.
pub fn form_csrf(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap_or_else(|| panic!("no csrf field in {html}"))
        .split('"')
        .next()
        .unwrap()
        .to_owned()
}

/// Status and JSON body of a response.
pub async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.unwrap();
    let value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text:?}"));
    (status, value)
}

/// Asserts a JSON error answer with `status`, returning its message.
pub async fn expect_error(response: reqwest::Response, status: u16) -> String {
    let (got, body) = json_of(response).await;
    assert_eq!(got.as_u16(), status, "body: {body}");
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {body}"))
        .to_owned()
}

/// A free loopback address.
pub async fn free_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Polls `check` every 100 ms until it gives a value, or panics after `patience`.
pub async fn wait_until<T, F, Fut>(what: &str, patience: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every tracing line of this test binary at DEBUG level and above (one global subscriber,
/// since the server's tasks log from whatever thread runs them).
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber per binary");
        buffer
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
