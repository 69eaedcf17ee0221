//! Shared helpers of the `http_*` tests: a real server on 127.0.0.1:0 with the default
//! allocator, a fake provisioner whose agent tokens the test can read (as a VM would from
//! its user data), and request helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use lablink::http::{HttpOptions, HttpState};
use lablink::{
    AgentToken, Allocator, AllocatorExt, Capabilities, FakeProvisioner, Hostname, LabLink,
    LaunchRequest, ProvisionedVm, Provisioner, Result,
};
use reqwest::header::ACCEPT;
use reqwest::{Client, RequestBuilder, StatusCode};
use serde_json::{json, Value};

pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASSWORD: &str = "correct horse battery staple";

/// The admin password hash, computed once per test binary (argon2 is slow unoptimised).
pub fn admin_hash() -> String {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| lablink::http::hash_password(ADMIN_PASSWORD).unwrap())
        .clone()
}

/// A fake provisioner that remembers the token of every VM it launched, the way a real VM
/// receives it in its user data.
#[derive(Debug, Clone, Default)]
pub struct TokenProvisioner {
    pub inner: FakeProvisioner,
    pub tokens: Arc<Mutex<HashMap<String, AgentToken>>>,
}

#[async_trait]
impl Provisioner for TokenProvisioner {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<ProvisionedVm>> {
        {
            let mut tokens = self.tokens.lock().unwrap();
            for spec in &request.vms {
                tokens.insert(spec.hostname.to_string(), spec.token.clone());
            }
        }
        self.inner.launch(request).await
    }
    async fn destroy(&self, vms: &[ProvisionedVm]) -> Result<()> {
        self.inner.destroy(vms).await
    }
    async fn list(&self) -> Result<Vec<ProvisionedVm>> {
        self.inner.list().await
    }
    async fn reboot(&self, vm: &ProvisionedVm) -> Result<()> {
        self.inner.reboot(vm).await
    }
}

/// A running server.
#[derive(Debug)]
pub struct TestServer {
    pub base: String,
    pub state: HttpState,
    pub allocator: Arc<dyn Allocator>,
    pub provisioner: TokenProvisioner,
    pub client: Client,
    /// A participant's browser: keeps cookies (the participant cookie a repeat must show).
    pub browser: Client,
}

impl TestServer {
    /// A server on the default allocator with default options.
    pub async fn start() -> Self {
        Self::start_with(LabLink::builder(), |_| {}).await
    }

    /// A server on `builder` (its provisioner is replaced) with options changed by `tune`.
    pub async fn start_with(
        builder: lablink::LabLinkBuilder,
        tune: impl FnOnce(&mut HttpOptions),
    ) -> Self {
        Self::start_full(builder, FakeProvisioner::new(), tune).await
    }

    /// Like [`start_with`](Self::start_with), launching through `fake`.
    pub async fn start_full(
        builder: lablink::LabLinkBuilder,
        fake: FakeProvisioner,
        tune: impl FnOnce(&mut HttpOptions),
    ) -> Self {
        let provisioner = TokenProvisioner {
            inner: fake,
            tokens: Arc::default(),
        };
        let allocator: Arc<dyn Allocator> = Arc::new(
            builder
                .with_provisioner(Arc::new(provisioner.clone()))
                .build()
                .unwrap(),
        );
        let mut options = HttpOptions::new(ADMIN_USER, admin_hash());
        tune(&mut options);
        let state = HttpState::new(allocator.clone(), options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = state.clone();
        tokio::spawn(async move {
            serving
                .serve(listener, std::future::pending())
                .await
                .unwrap();
        });
        // No pooled connections: the server closes a connection after refusing a request
        // whose body it did not read (401/403/413), and reusing it would fail the next one.
        let client = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        Self {
            base: format!("http://{addr}"),
            state,
            allocator,
            provisioner,
            client,
            browser: browser(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The token of a launched VM.
    pub fn token(&self, hostname: &str) -> String {
        self.provisioner.tokens.lock().unwrap()[hostname]
            .expose()
            .to_owned()
    }

    /// A request as a script admin: HTTP Basic + `Accept: application/json`.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
            .header(ACCEPT, "application/json")
    }

    /// A POST as the VM `hostname`, with its token.
    pub fn vm_post(&self, hostname: &str, path: &str, body: Value) -> RequestBuilder {
        self.client
            .post(self.url(path))
            .bearer_auth(self.token(hostname))
            .json(&body)
    }

    /// Launches `n` VMs over HTTP and waits until the operation finished; returns hostnames.
    pub async fn launch(&self, n: usize) -> Vec<String> {
        let response = self
            .admin(reqwest::Method::POST, "/api/launch")
            .form(&[("num_vms", n.to_string())])
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(response).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let id = body["job_id"].as_str().unwrap().parse().unwrap();
        let op = self
            .allocator
            .wait_for_operation(id, Duration::from_secs(30))
            .await
            .unwrap();
        op.hostnames.iter().map(ToString::to_string).collect()
    }

    /// Launches `n` VMs and has each report `running` over HTTP, so all are assignable.
    pub async fn launch_ready(&self, n: usize) -> Vec<String> {
        let hostnames = self.launch(n).await;
        for h in &hostnames {
            let r = self
                .vm_post(
                    h,
                    "/api/vm-status",
                    json!({"hostname": h, "status": "running"}),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{h} could not report running");
        }
        hostnames
    }

    /// Requests a VM as a participant (JSON), from [`browser`](Self::browser).
    pub async fn request_vm(&self, email: &str, code: &str) -> reqwest::Response {
        self.browser
            .post(self.url("/api/request_vm"))
            .header(ACCEPT, "application/json")
            .form(&[
                ("email", email.to_owned()),
                ("crd_command", crd_command(code)),
            ])
            .send()
            .await
            .unwrap()
    }

    /// The `/metrics` text (without a token).
    pub async fn metrics(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    pub async fn record(&self, hostname: &str) -> lablink::VmRecord {
        self.allocator
            .vm(&hostname.parse::<Hostname>().unwrap())
            .await
            .unwrap()
    }
}

/// A client that keeps cookies, as a participant's browser does.
pub fn browser() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .cookie_store(true)
        .build()
        .unwrap()
}

/// The command a VM is given for `code`: built by LabLink, never the pasted text.
pub fn start_host(code: &str, hostname: &str) -> String {
    format!(
        "start-host --code={code} --redirect-url=https://remotedesktop.google.com/_/oauthredirect \
         --name={hostname}"
    )
}

/// A CRD command as a participant pastes it.
pub fn crd_command(code: &str) -> String {
    format!(
        "DISPLAY= /opt/google/chrome-remote-desktop/start-host --code=\"{code}\" \
         --redirect-url=\"https://remotedesktop.google.com/_/oauthredirect\" --name=$(hostname)"
    )
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
