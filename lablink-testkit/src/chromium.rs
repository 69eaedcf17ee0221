//! A headless Chromium driven through chromedriver's WebDriver HTTP API, for the tests that
//! run LabLink's pages in a real browser.
//!
//! Needs `chromium` and `chromedriver` on `PATH` (Debian: `apt-get install -y chromium
//! chromium-driver`; or `bash scripts/components.sh`): [`Chromium::start`] fails, naming
//! them, when they are missing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::wait_until;

/// How long chromedriver may take to come up, and a page to show what [`Chromium::wait_for`]
/// waits for (a bound, not an expectation).
const PATIENCE: Duration = Duration::from_secs(30);

/// The key of a WebDriver element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The first of `names` on `PATH`; panics naming them and the Debian `package` that has them
/// when none is there.
pub fn find_binary(names: &[&str], package: &str) -> PathBuf {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    names
        .iter()
        .find_map(|name| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|path| path.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{} is needed on PATH (Debian: apt-get install -y {package}; or bash scripts/components.sh)",
                names.join(" or ")
            )
        })
}

/// chromedriver on a free port with one session of a headless Chromium in a fresh profile.
/// On drop the session is deleted, so Chromium quits (chromedriver's own exit would leave it
/// running), and chromedriver is killed.
///
/// Every WebDriver command asserts that it succeeded.
#[derive(Debug)]
pub struct Chromium {
    chromedriver: Child,
    /// `http://127.0.0.1:{port}`: chromedriver.
    root: String,
    /// `{root}/session/{id}`: this browser's session.
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // Quit Chromium first, from a runtime of its own: drop may run on the test's runtime,
        // which cannot be blocked on.
        let session = self.session.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    reqwest::Client::new().delete(session).send(),
                )
                .await;
            });
        })
        .join();
        let _ = self.chromedriver.kill();
        let _ = self.chromedriver.wait();
    }
}

impl Chromium {
    /// Starts chromedriver and a session whose window is 1280×900.
    pub async fn start() -> Self {
        Self::start_with_window_size(1280, 900).await
    }

    /// Starts chromedriver and a session whose window is `width`×`height`.
    pub async fn start_with_window_size(width: u32, height: u32) -> Self {
        let chromium = find_binary(
            &["chromium", "chromium-browser", "google-chrome"],
            "chromium",
        );
        let chromedriver = find_binary(&["chromedriver"], "chromium-driver");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let chromedriver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().unwrap();
        // From here on, drop kills chromedriver whatever fails.
        let mut browser = Self {
            chromedriver,
            session: String::new(),
            root,
            http,
            _profile: profile,
        };
        wait_until("chromedriver to be ready", PATIENCE, || {
            let request = browser.http.get(format!("{}/status", browser.root)).send();
            async move {
                let status: Value = request.await.ok()?.json().await.ok()?;
                (status["value"]["ready"] == true).then_some(())
            }
        })
        .await;
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                     format!("--user-data-dir={}", browser._profile.path().display()),
                     format!("--window-size={width},{height}")],
        }}}});
        let created: Value = browser
            .http
            .post(format!("{}/session", browser.root))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"));
        browser.session = format!("{}/session/{id}", browser.root);
        browser
    }

    /// A WebDriver command on this session (`path` after `/session/{id}`, `""` for the
    /// session itself); `body` is sent with every method but GET. Returns the answer's
    /// `value`, asserting it is no error.
    pub async fn call(&self, method: Method, path: &str, body: Value) -> Value {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.session));
        if method != Method::GET {
            request = request.json(&body);
        }
        let response: Value = request.send().await.unwrap().json().await.unwrap();
        assert!(
            response["value"]["error"].is_null(),
            "WebDriver {method} {path} ({}): {response}",
            self.root
        );
        response["value"].clone()
    }

    /// A GET command (see [`call`](Self::call)).
    pub async fn get(&self, path: &str) -> Value {
        self.call(Method::GET, path, Value::Null).await
    }

    /// A POST command (see [`call`](Self::call)).
    pub async fn post(&self, path: &str, body: Value) -> Value {
        self.call(Method::POST, path, body).await
    }

    /// Navigates to `url`.
    pub async fn go(&self, url: &str) {
        self.post("/url", json!({"url": url})).await;
    }

    /// The current page's URL.
    pub async fn url(&self) -> String {
        self.get("/url").await.as_str().unwrap().to_owned()
    }

    /// Reloads the current page.
    pub async fn refresh(&self) {
        self.post("/refresh", json!({})).await;
    }

    /// The WebDriver id of the first element matching the CSS selector `css`; panics if
    /// there is none.
    pub async fn find(&self, css: &str) -> String {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.post(&format!("/element/{id}/click"), json!({})).await;
    }

    /// Types `text` into the element matching `css` after what it holds.
    pub async fn send_keys(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.post(&format!("/element/{id}/value"), json!({"text": text}))
            .await;
    }

    /// Clears the element matching `css` and types `text` into it.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.post(&format!("/element/{id}/clear"), json!({})).await;
        self.post(&format!("/element/{id}/value"), json!({"text": text}))
            .await;
    }

    /// Runs `script` in the page; returns what it returns.
    pub async fn script(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": []}))
            .await
    }

    /// Runs the asynchronous `script` with `args` (its last argument is the callback it
    /// answers with); returns what it answers.
    pub async fn async_script(&self, script: &str, args: Value) -> Value {
        self.post("/execute/async", json!({"script": script, "args": args}))
            .await
    }

    /// Polls `script` every 100 ms until it returns something other than `null` or `false`,
    /// and returns that; panics naming `what` after 30 s.
    pub async fn wait_for(&self, what: &str, script: &str) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let v = self.script(script).await;
            if !v.is_null() && v != json!(false) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page never showed {what} within {PATIENCE:?}; the script last returned {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A screenshot of the window, a base64 PNG (as WebDriver gives it).
    pub async fn screenshot(&self) -> String {
        self.get("/screenshot").await.as_str().unwrap().to_owned()
    }

    /// A screenshot of the element matching `css`, a base64 PNG (as WebDriver gives it).
    pub async fn element_screenshot(&self, css: &str) -> String {
        let id = self.find(css).await;
        self.get(&format!("/element/{id}/screenshot"))
            .await
            .as_str()
            .unwrap_or_else(|| panic!("no screenshot of {css}"))
            .to_owned()
    }

    /// The handle of the current window.
    pub async fn window(&self) -> String {
        self.get("/window").await.as_str().unwrap().to_owned()
    }

    /// The handles of every window of the session.
    pub async fn windows(&self) -> Vec<String> {
        let handles = self.get("/window/handles").await;
        handles
            .as_array()
            .unwrap_or_else(|| panic!("window handles: {handles}"))
            .iter()
            .map(|h| h.as_str().unwrap().to_owned())
            .collect()
    }

    /// Switches to the window `handle`.
    pub async fn switch_to_window(&self, handle: &str) {
        self.post("/window", json!({"handle": handle})).await;
    }

    /// The cookie `name` the browser holds for the current page (WebDriver's cookie object:
    /// `name`, `value`, `path`, ...).
    pub async fn cookie(&self, name: &str) -> Value {
        self.get(&format!("/cookie/{name}")).await
    }
}
