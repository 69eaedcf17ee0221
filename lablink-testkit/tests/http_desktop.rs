//! The browser desktop end to end, with real components: a real `Xvnc` (Debian's
//! tigervnc-standalone-server) showing a known picture, a real `lablink-agent` process that
//! sets its password and opens the tunnel, the allocator's relay, and headless Chromium
//! running the noVNC page; an admin's view-only session spoken by an RFB client here.
//!
//! Needs `Xvnc`, `xsetroot`, `xdotool`, `chromium`, `chromedriver` and noVNC in
//! `desktop/node_modules` (`bash scripts/components.sh` installs them all); a missing one
//! fails the test, naming it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use lablink::http::{HttpOptions, HttpState};
use lablink::{Allocator, AllocatorExt as _, LabLink};
use lablink_testkit::agents::Workdir;
use lablink_testkit::{admin_options, ADMIN_PASSWORD, ADMIN_USER};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;

/// The display and port of the VMs' desktop (one Xvnc serves the test's VMs).
const DISPLAY: u16 = 47;
const VNC_PORT: u16 = 5900 + DISPLAY;
/// The picture the desktop shows: the X root window in magenta.
const COLOUR: &str = "#ff00ff";

fn find_binary(name: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("the desktop test needs {name} on PATH (Debian: apt-get install -y {package}; or bash scripts/components.sh)")
        })
}

fn novnc_dir() -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../desktop/node_modules/@novnc/novnc");
    assert!(
        dir.join("core/rfb.js").is_file(),
        "the desktop test needs noVNC in {} (npm ci --prefix desktop; or bash scripts/components.sh)",
        dir.display()
    );
    dir
}

/// A killed-on-drop child.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A browser-mode allocator whose VMs are real agents sharing the test's Xvnc.
struct Desk {
    url: String,
    allocator: Arc<dyn Allocator>,
    state: HttpState,
    _work: Workdir,
    _xvnc: Process,
}

impl Desk {
    async fn start(vms: usize) -> Self {
        find_binary("Xvnc", "tigervnc-standalone-server");
        let xsetroot = find_binary("xsetroot", "x11-xserver-utils");
        let work = Workdir::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let url = format!("http://{addr}");
        let password_file = work.path("vnc-passwd");
        // The agent keeps a server already listening and rewrites its password file, as on
        // an image that runs its own: start it here, so that the test controls the picture.
        lablink_agent::vnc::write_password_file(&password_file, "00000000", None).unwrap();
        let xvnc = Process(
            Command::new("Xvnc")
                .args([
                    &format!(":{DISPLAY}"),
                    "-localhost",
                    "-rfbport",
                    &VNC_PORT.to_string(),
                    "-rfbauth",
                    password_file.to_str().unwrap(),
                    "-SecurityTypes",
                    "VncAuth",
                    "-geometry",
                    "640x400",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("Xvnc starts"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lablink_agent::vnc::listening(VNC_PORT).await {
            assert!(
                Instant::now() < deadline,
                "Xvnc did not listen on {VNC_PORT}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status = Command::new(xsetroot)
            .args(["-display", &format!(":{DISPLAY}"), "-solid", COLOUR])
            .status()
            .unwrap();
        assert!(status.success(), "xsetroot failed");
        let provisioner = work.provisioner(
            &url,
            &[
                ("LABLINK_DESKTOP", "browser"),
                ("VNC_PORT", &VNC_PORT.to_string()),
                ("LABLINK_VNC_PASSWORD_FILE", password_file.to_str().unwrap()),
            ],
        );
        let mut config = lablink::AllocatorConfig::default();
        config.desktop_mode = lablink::DesktopMode::Browser;
        let lablink = LabLink::builder()
            .with_config(config)
            .with_provisioner(Arc::new(provisioner))
            .build()
            .unwrap();
        let allocator: Arc<dyn Allocator> = Arc::new(lablink);
        let mut options: HttpOptions = admin_options();
        options.desktop.novnc_dir = Some(novnc_dir());
        let state = HttpState::new(allocator.clone(), options);
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let served = state.clone();
        tokio::spawn(async move {
            served
                .serve(listener, std::future::pending())
                .await
                .unwrap()
        });
        let op = allocator
            .launch_and_wait(vms, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(op.hostnames.len(), vms);
        let desk = Self {
            url,
            allocator,
            state,
            _work: work,
            _xvnc: xvnc,
        };
        desk.wait_available(vms).await;
        desk
    }

    async fn wait_available(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let counts = self.allocator.counts().await.unwrap();
            if counts.assignable >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "VMs never became available: {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A participant's claim through the API: `(hostname, pin, cookie)`.
    async fn claim(&self, email: &str) -> (String, String, String) {
        let r = reqwest::Client::new()
            .post(format!("{}/api/v1/requests", self.url))
            .json(&json!({"email": email}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "claim for {email}");
        let cookie = r
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
            .find(|c| c.starts_with("lablink_participant="))
            .expect("a participant cookie");
        let body: Value = r.json().await.unwrap();
        (
            body["hostname"].as_str().unwrap().to_owned(),
            body["pin"].as_str().unwrap().to_owned(),
            cookie,
        )
    }

    fn ws_url(&self, path: &str) -> String {
        format!("{}{path}", self.url.replacen("http://", "ws://", 1))
    }
}

/// An RFB client over the relay's WebSocket: handshake with VNC authentication.
struct Rfb {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    buf: Vec<u8>,
    size: (u16, u16),
}

impl Rfb {
    async fn connect(url: &str, headers: &[(&str, String)], password: &str) -> Self {
        let mut request = url.into_client_request().unwrap();
        for (k, v) in headers {
            request.headers_mut().insert(*k, v.parse().unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .unwrap_or_else(|e| panic!("WebSocket {url}: {e}"));
        let mut rfb = Self {
            ws,
            buf: Vec::new(),
            size: (0, 0),
        };
        let version = rfb.read(12).await;
        assert_eq!(&version[..4], b"RFB ");
        rfb.send(b"RFB 003.008\n").await;
        let n = rfb.read(1).await[0] as usize;
        assert!(rfb.read(n).await.contains(&2), "VNC authentication offered");
        rfb.send(&[2]).await;
        let challenge: [u8; 16] = rfb.read(16).await.try_into().unwrap();
        rfb.send(&lablink_agent::vnc::challenge_response(
            password, &challenge,
        ))
        .await;
        assert_eq!(rfb.read(4).await, [0, 0, 0, 0], "VNC authentication failed");
        rfb.send(&[1]).await;
        let init = rfb.read(24).await;
        rfb.size = (
            u16::from_be_bytes([init[0], init[1]]),
            u16::from_be_bytes([init[2], init[3]]),
        );
        let name_len = u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize;
        rfb.read(name_len).await;
        rfb
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::Binary(bytes.to_vec().into()))
            .await
            .unwrap();
    }

    async fn read(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            match tokio::time::timeout(Duration::from_secs(20), self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => self.buf.extend_from_slice(&b),
                Ok(Some(Ok(_))) => {}
                other => panic!("the RFB stream ended: {other:?}"),
            }
        }
        self.buf.drain(..n).collect()
    }

    /// Asks for the whole screen (raw encoding) and reads the first update's header.
    async fn first_update(&mut self) -> Instant {
        self.send(&[2, 0, 0, 1, 0, 0, 0, 0]).await; // SetEncodings: raw
        let (w, h) = self.size;
        let mut request = vec![3, 0, 0, 0, 0, 0];
        request.extend_from_slice(&w.to_be_bytes());
        request.extend_from_slice(&h.to_be_bytes());
        self.send(&request).await;
        let header = self.read(4).await;
        assert_eq!(header[0], 0, "a FramebufferUpdate");
        Instant::now()
    }
}

/// The X pointer's position on the test's display (`xdotool getmouselocation`).
fn pointer() -> (i32, i32) {
    let xdotool = find_binary("xdotool", "xdotool");
    let out = Command::new(xdotool)
        .arg("getmouselocation")
        .env("DISPLAY", format!(":{DISPLAY}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("xdotool said {text:?}"))
    };
    (field("x:"), field("y:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desktop_sockets_refuse_browsers_without_the_vm_and_agents_of_other_vms() {
    let desk = Desk::start(1).await;
    // No cookie: 401 before any VM is asked for a tunnel.
    let r = reqwest::Client::new()
        .get(format!("{}/desktop/websockify", desk.url))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
    // The page sends a browser without a VM to `/`.
    let page = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/desktop", desk.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        desk.state.desktop_relay().counts().0,
        0,
        "no session was relayed"
    );
    // An agent for an id no browser waits for: 404 (after its short grace).
    let (pid_token, hostname) = {
        let vms = desk.allocator.vms(&Default::default()).await.unwrap();
        let h = vms[0].hostname.to_string();
        (
            lablink_testkit::agents::agent_process(&h, &desk.url)
                .expect("the agent runs")
                .1,
            h,
        )
    };
    let mut request = desk
        .ws_url(&format!(
            "/api/v1/vms/{hostname}/tunnel/{}",
            uuid::Uuid::new_v4().simple()
        ))
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {pid_token}").parse().unwrap(),
    );
    let refused = tokio_tungstenite::connect_async(request).await.unwrap_err();
    assert!(refused.to_string().contains("404"), "{refused}");
    // Another VM's path with this token: 403.
    let mut request = desk
        .ws_url(&format!(
            "/api/v1/vms/other-vm/tunnel/{}",
            uuid::Uuid::new_v4().simple()
        ))
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {pid_token}").parse().unwrap(),
    );
    let refused = tokio_tungstenite::connect_async(request).await.unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_view_only_session_gets_frames_but_its_input_never_reaches_the_vm() {
    let desk = Desk::start(1).await;
    let (hostname, pin, _cookie) = desk.claim("viewer@example.org").await;
    let password: String = pin.chars().take(8).collect();
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{ADMIN_USER}:{ADMIN_PASSWORD}")
        )
    );
    let auth = [("authorization", basic)];
    let start = pointer();
    let view = desk.ws_url(&format!("/admin/vms/{hostname}/desktop/websockify"));
    let mut rfb = Rfb::connect(&view, &auth, &password).await;
    rfb.first_update().await;
    // Move the pointer and type: a view-only session drops both.
    let target = (start.0 + 37).rem_euclid(600) as u16;
    let mut pointer_event = vec![5, 0];
    pointer_event.extend_from_slice(&target.to_be_bytes());
    pointer_event.extend_from_slice(&91u16.to_be_bytes());
    rfb.send(&pointer_event).await;
    rfb.send(&[4, 1, 0, 0, 0, 0, 0, 0x61]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pointer(),
        start,
        "the view-only pointer event reached the VM"
    );
    assert!(
        desk.state.desktop_relay().counts().3 >= 2,
        "dropped by the relay"
    );
    // With control the same event moves it: the check above can fail.
    let control = desk.ws_url(&format!(
        "/admin/vms/{hostname}/desktop/websockify?control=1"
    ));
    let mut rfb = Rfb::connect(&control, &auth, &password).await;
    rfb.first_update().await;
    rfb.send(&pointer_event).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while pointer() != (i32::from(target), 91) {
        assert!(
            Instant::now() < deadline,
            "control did not move the pointer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// chromedriver with a headless Chromium, killed on drop.
struct Browser {
    _driver: Process,
    base: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Self {
        let chromium = find_binary("chromium", "chromium");
        let chromedriver = find_binary("chromedriver", "chromium-driver");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Process(
            Command::new(chromedriver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if http.get(format!("{root}/status")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-dev-shm-usage", format!("--user-data-dir={}", profile.path().display()),
                     "--window-size=1024,768"],
        }}}});
        let created: Value = http
            .post(format!("{root}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"));
        Self {
            base: format!("{root}/session/{session}"),
            http,
            _driver: driver,
            _profile: profile,
        }
    }

    async fn call(&self, path: &str, body: Value) -> Value {
        let v: Value = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(v["value"]["error"].is_null(), "WebDriver {path}: {v}");
        v["value"].clone()
    }

    async fn script(&self, script: &str) -> Value {
        self.call("/execute/sync", json!({"script": script, "args": []}))
            .await
    }

    async fn go(&self, url: &str) {
        self.call("/url", json!({"url": url})).await;
    }

    /// Sets the participant cookie (on the allocator's origin).
    async fn cookie(&self, url: &str, cookie: &str) {
        self.go(&format!("{url}/healthz")).await;
        let (name, value) = cookie.split_once('=').unwrap();
        self.call(
            "/cookie",
            json!({"cookie": {"name": name, "value": value, "path": "/"}}),
        )
        .await;
    }

    /// Waits until the noVNC canvas shows `COLOUR` in its middle; panics naming `what`.
    async fn wait_for_colour(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let pixel = self
                .script(
                    "const c = document.querySelector('#screen canvas');
                     if (!c || !window.lablinkDesktop || !window.lablinkDesktop.connected) return null;
                     const d = c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data;
                     return [d[0], d[1], d[2]];",
                )
                .await;
            if pixel == json!([255, 0, 255]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the canvas shows {pixel}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_sees_the_vm_desktop_in_the_browser_across_reloads_and_tunnel_drops() {
    let desk = Desk::start(2).await;
    let (hostname, _pin, cookie) = desk.claim("ada@example.org").await;
    let browser = Browser::start().await;
    browser.cookie(&desk.url, &cookie).await;
    browser.go(&format!("{}/desktop", desk.url)).await;
    browser.wait_for_colour("the first connection").await;
    let title = browser.script("return document.title").await;
    assert!(title.as_str().unwrap().contains(&hostname), "{title}");
    // The participant's first frame marks the desktop ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let record = desk.allocator.vm(&hostname.parse().unwrap()).await.unwrap();
        let stage = record.assignment.unwrap().desktop.stage;
        if stage == lablink::DesktopStage::Ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the desktop never became ready: {stage:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A reload: the same desktop.
    browser.go(&format!("{}/desktop", desk.url)).await;
    browser.wait_for_colour("after a reload").await;
    // The agent's tunnel drops (its process is killed; it is started again by nobody, so
    // restart it as the provisioner would): the page reconnects by itself.
    let connects = browser
        .script("return window.lablinkDesktop.connects")
        .await;
    let (pid, _) = lablink_testkit::agents::agent_process(&hostname, &desk.url).unwrap();
    let _ = Command::new("kill")
        .arg("-STOP")
        .arg(pid.to_string())
        .status();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = Command::new("kill")
        .arg("-CONT")
        .arg(pid.to_string())
        .status();
    let _ = browser
        .script("window.lablinkDesktop.connected = false; return null")
        .await;
    browser.wait_for_colour("after the tunnel dropped").await;
    let again = browser
        .script("return window.lablinkDesktop.connects")
        .await;
    assert!(
        again.as_u64() >= connects.as_u64(),
        "{connects} then {again}"
    );
    // A second participant gets the other VM.
    let (other, _, _) = desk.claim("grace@example.org").await;
    assert_ne!(other, hostname);
}
