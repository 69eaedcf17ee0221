//! [`TestServer`]: the allocator's HTTP layer on 127.0.0.1:0 over a fake provisioner whose
//! agent tokens the test can read (as a VM would from its user data), and request helpers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lablink::http::{HttpOptions, HttpState, ReloadingCertResolver};
use lablink::{
    AgentToken, Allocator, AllocatorExt, Capabilities, FakeProvisioner, Hostname, LabLink,
    LaunchRequest, ProvisionedVm, Provisioner, Result,
};
use reqwest::header::{ACCEPT, COOKIE, SET_COOKIE};
use reqwest::{Client, RequestBuilder, StatusCode};
use serde_json::{json, Value};

use crate::{admin_options, crd_command, form_csrf, json_of, ADMIN_PASSWORD, ADMIN_USER};

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
        Self::start_serving(builder, fake, tune, None).await
    }

    /// A server on the default allocator serving HTTPS with `certificates`; its clients
    /// trust only `root` (a CA certificate, DER) and reach it as `https://127.0.0.1:port`.
    pub async fn start_https(certificates: Arc<ReloadingCertResolver>, root: &[u8]) -> Self {
        let root = reqwest::Certificate::from_der(root).unwrap();
        Self::start_serving(
            LabLink::builder(),
            FakeProvisioner::new(),
            |_| {},
            Some((certificates, root)),
        )
        .await
    }

    async fn start_serving(
        builder: lablink::LabLinkBuilder,
        fake: FakeProvisioner,
        tune: impl FnOnce(&mut HttpOptions),
        tls: Option<(Arc<ReloadingCertResolver>, reqwest::Certificate)>,
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
        let mut options = admin_options();
        tune(&mut options);
        let state = HttpState::new(allocator.clone(), options);
        // As `lablink serve` binds (a backlog of 4096): a burst of connects is not dropped.
        let listener = lablink::server::bind(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = state.clone();
        let root = tls.as_ref().map(|(_, root)| root.clone());
        tokio::spawn(async move {
            match tls {
                None => serving.serve(listener, std::future::pending()).await,
                Some((certificates, _)) => {
                    serving
                        .serve_tls(listener, certificates, std::future::pending())
                        .await
                }
            }
            .unwrap();
        });
        // No pooled connections: the server closes a connection after refusing a request
        // whose body it did not read (401/403/413), and reusing it would fail the next one.
        let client = trusting(
            Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(0),
            root.clone(),
        )
        .build()
        .unwrap();
        let browser = trusting(browser_builder(), root.clone()).build().unwrap();
        let scheme = if root.is_some() { "https" } else { "http" };
        Self {
            base: format!("{scheme}://{addr}"),
            state,
            allocator,
            provisioner,
            client,
            browser,
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

    /// The HTML of `path` as the signed-in browser with `session` (`name=value`) gets it.
    pub async fn page_as(&self, session: &str, path: &str) -> String {
        self.client
            .get(self.url(path))
            .header(COOKIE, session)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Posts the sign-out form with a session cookie and its CSRF token.
    pub async fn sign_out(&self, session: &str, csrf: &str) -> reqwest::Response {
        self.client
            .post(self.url("/admin/logout"))
            .header(COOKIE, session)
            .form(&[("csrf", csrf)])
            .send()
            .await
            .unwrap()
    }

    /// Signs in through the form as a browser does (the form's own cookie and token);
    /// returns the session cookie (`name=value`) and the CSRF token the admin page shows.
    pub async fn sign_in(
        &self,
        password: &str,
    ) -> std::result::Result<(String, String), StatusCode> {
        let page = self
            .client
            .get(self.url("/admin/login"))
            .send()
            .await
            .unwrap();
        let login_cookie = page.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let csrf = form_csrf(&page.text().await.unwrap());
        let r = self
            .client
            .post(self.url("/admin/login"))
            .header(COOKIE, &login_cookie)
            .form(&[
                ("csrf", csrf.as_str()),
                ("username", ADMIN_USER),
                ("password", password),
            ])
            .send()
            .await
            .unwrap();
        if r.status() != StatusCode::SEE_OTHER {
            return Err(r.status());
        }
        let session = r
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .find(|v| v.starts_with("lablink_admin="))
            .unwrap();
        assert!(
            session.contains("HttpOnly") && session.contains("SameSite=Strict"),
            "{session}"
        );
        let session = session.split(';').next().unwrap().to_owned();
        let csrf = self.admin_page_csrf(&session).await;
        Ok((session, csrf))
    }

    /// The CSRF token the admin page shows to the browser sending `session` (a cookie).
    pub async fn admin_page_csrf(&self, session: &str) -> String {
        let page = self
            .client
            .get(self.url("/admin"))
            .header(COOKIE, session)
            .send()
            .await
            .unwrap();
        assert_eq!(
            page.status(),
            StatusCode::OK,
            "the admin page for {session}"
        );
        form_csrf(&page.text().await.unwrap())
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
    browser_builder().build().unwrap()
}

fn browser_builder() -> reqwest::ClientBuilder {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .cookie_store(true)
}

/// `builder` trusting only `root` when there is one (the system's roots otherwise).
fn trusting(
    builder: reqwest::ClientBuilder,
    root: Option<reqwest::Certificate>,
) -> reqwest::ClientBuilder {
    match root {
        Some(root) => builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(root),
        None => builder,
    }
}
