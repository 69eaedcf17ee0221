//! The browser desktop end to end, with real components: real `lablink-agent` processes in
//! browser mode, each starting its own TigerVNC `Xvnc` (Debian's tigervnc-standalone-server)
//! on a display of its own, painted a known colour with `xsetroot`; the allocator's relay;
//! headless Chromium running the participant's pages and noVNC; and an admin's sessions
//! spoken by an RFB client here, observed on the X server with `xdotool` and `xset`.
//!
//! Needs `Xvnc`, `xsetroot`, `xset`, `xdotool`, `chromium`, `chromedriver` and noVNC in
//! `desktop/node_modules` (`bash scripts/components.sh` installs them all); a missing one
//! fails the test, naming it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use lablink::http::{HttpOptions, HttpState};
use lablink::{
    Allocator, AllocatorExt as _, DesktopMode, LabLink, LocalProcessProvisioner, ProvisionedVm,
    Provisioner as _,
};
use lablink_testkit::{
    admin_options, agent_process, agent_program, find_binary, script, wait_until, Chromium,
    Workdir, ADMIN_PASSWORD, ADMIN_USER,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderName;
use tokio_tungstenite::tungstenite::Message;

/// The colours the VMs' desktops show: the first VM's magenta, the second's cyan.
const MAGENTA: [u8; 3] = [255, 0, 255];
const CYAN: [u8; 3] = [0, 255, 255];

/// How long a step may take before the test fails naming it (a bound, not an expectation).
const PATIENCE: Duration = Duration::from_secs(30);

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

fn hex(colour: [u8; 3]) -> String {
    format!("#{:02x}{:02x}{:02x}", colour[0], colour[1], colour[2])
}

/// An X display no one uses (no lock file, no socket, its VNC port 5900 + n free), away
/// from the low numbers desktops and other tests take; never the same twice in this binary.
fn free_display() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 400 + (std::process::id() % 100) as u16 * 20;
    loop {
        let n = base + NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < 5000, "no free X display");
        let used = std::path::Path::new(&format!("/tmp/.X{n}-lock")).exists()
            || std::path::Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
            || std::net::TcpListener::bind(("127.0.0.1", 5900 + n)).is_err();
        if !used {
            return n;
        }
    }
}

/// Pids of the processes whose command line mentions `needle`.
fn pids_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(needle)
                .then_some(pid)
        })
        .collect()
}

fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// One VM of a [`Desk`]: its agent's VNC server (display, port, password file) and the
/// colour the test paints it.
#[derive(Debug, Clone)]
struct Vnc {
    hostname: String,
    display: u16,
    port: u16,
    password_file: PathBuf,
    colour: [u8; 3],
}

/// A browser-mode allocator whose VMs are real agent processes, each with a VNC server of
/// its own (`VNC_PORT` per VM: the agent program is a wrapper that sets it from a file).
struct Desk {
    url: String,
    allocator: Arc<dyn Allocator>,
    state: HttpState,
    provisioner: LocalProcessProvisioner,
    vncs: Vec<Vnc>,
    work: Workdir,
}

impl Drop for Desk {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the agents said, to debug the failure.
            if let Ok(entries) = std::fs::read_dir(self.work.path("agents")) {
                for entry in entries.flatten() {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    eprintln!("--- {} (last lines)", entry.path().display());
                    for line in tail.into_iter().rev() {
                        eprintln!("{line}");
                    }
                }
            }
        }
        // The agents first (so none starts a VNC server again), then the VNC servers they
        // started, which outlive a killed agent as they would on a VM.
        for vnc in &self.vncs {
            if let Some((pid, _)) = agent_process(&vnc.hostname, &self.url) {
                signal(pid, "KILL");
            }
        }
        for vnc in &self.vncs {
            for pid in pids_mentioning(&vnc.password_file.display().to_string()) {
                signal(pid, "TERM");
            }
        }
    }
}

impl Desk {
    async fn start(colours: &[[u8; 3]]) -> Self {
        find_binary(&["Xvnc"], "tigervnc-standalone-server");
        find_binary(&["xsetroot"], "x11-xserver-utils");
        let work = Workdir::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let url = format!("http://{addr}");
        // The allocator names its VMs lablink-vm-1, -2, ...: each gets a display of its own.
        let vncs: Vec<Vnc> = colours
            .iter()
            .enumerate()
            .map(|(i, &colour)| {
                let display = free_display();
                let hostname = format!("lablink-vm-{}", i + 1);
                let vnc = Vnc {
                    password_file: work.path(&format!("vnc-{hostname}.passwd")),
                    hostname,
                    display,
                    port: 5900 + display,
                    colour,
                };
                std::fs::write(
                    work.path(&format!("vnc-{}.env", vnc.hostname)),
                    format!(
                        "VNC_PORT={}\nLABLINK_VNC_PASSWORD_FILE={}\n",
                        vnc.port,
                        vnc.password_file.display()
                    ),
                )
                .unwrap();
                vnc
            })
            .collect();
        let wrapper = work.path("vm-agent");
        script(
            &wrapper,
            &format!(
                r#"env="$RECORD_DIR/vnc-$VM_NAME.env"
[ -f "$env" ] || {{ echo "the test gave $VM_NAME no VNC display" >&2; exit 1; }}
. "$env"
export VNC_PORT LABLINK_VNC_PASSWORD_FILE
exec "{}""#,
                agent_program().display()
            ),
        );
        let mut builder = LocalProcessProvisioner::builder(&wrapper, &url)
            .log_dir(work.path("agents"))
            .state_dir(work.path("state"));
        for (k, v) in work.agent_env() {
            builder = builder.env(k, v);
        }
        let provisioner = builder.env("LABLINK_DESKTOP", "browser").build();
        let config = lablink::AllocatorConfig {
            desktop_mode: DesktopMode::Browser,
            ..Default::default()
        };
        let lablink = LabLink::builder()
            .with_config(config)
            .with_provisioner(Arc::new(provisioner.clone()))
            .build()
            .unwrap();
        let allocator: Arc<dyn Allocator> = Arc::new(lablink);
        let mut options: HttpOptions = admin_options();
        options.desktop.mode = DesktopMode::Browser;
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
        let desk = Self {
            url,
            allocator,
            state,
            provisioner,
            vncs,
            work,
        };
        let op = desk
            .allocator
            .launch_and_wait(colours.len(), Duration::from_secs(60))
            .await
            .unwrap();
        let mut launched: Vec<String> = op.hostnames.iter().map(ToString::to_string).collect();
        launched.sort();
        let expected: Vec<String> = desk.vncs.iter().map(|v| v.hostname.clone()).collect();
        assert_eq!(
            launched, expected,
            "the VMs' names, which pick their displays"
        );
        wait_until(
            "the VMs to be assignable",
            Duration::from_secs(60),
            || async {
                let counts = desk.allocator.counts().await.unwrap();
                (counts.assignable >= colours.len()).then_some(())
            },
        )
        .await;
        desk
    }

    fn vnc(&self, hostname: &str) -> &Vnc {
        self.vncs
            .iter()
            .find(|v| v.hostname == hostname)
            .unwrap_or_else(|| panic!("no VM {hostname}"))
    }

    /// Waits until the VNC server `hostname`'s agent started listens, and paints its root
    /// window the VM's colour.
    async fn paint(&self, hostname: &str) -> Vnc {
        let vnc = self.vnc(hostname).clone();
        let xsetroot = find_binary(&["xsetroot"], "x11-xserver-utils");
        wait_until(
            &format!("the agent of {hostname} to start Xvnc on port {}", vnc.port),
            PATIENCE,
            || async move { lablink_agent::vnc::listening(vnc.port).await.then_some(()) },
        )
        .await;
        wait_until(
            &format!("xsetroot to paint display :{}", vnc.display),
            PATIENCE,
            || {
                let ok = Command::new(&xsetroot)
                    .args([
                        "-display",
                        &format!(":{}", vnc.display),
                        "-solid",
                        &hex(vnc.colour),
                    ])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                async move { ok.then_some(()) }
            },
        )
        .await;
        vnc
    }

    /// A participant's claim through the API: `(hostname, pin)`.
    async fn claim(&self, email: &str) -> (String, String) {
        let r = reqwest::Client::new()
            .post(format!("{}/api/v1/requests", self.url))
            .json(&json!({"email": email}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "claim for {email}");
        let body: Value = r.json().await.unwrap();
        (
            body["hostname"].as_str().unwrap().to_owned(),
            body["pin"].as_str().unwrap().to_owned(),
        )
    }

    fn ws_url(&self, path: &str) -> String {
        format!("{}{path}", self.url.replacen("http://", "ws://", 1))
    }

    /// The tunnel requests the allocator holds, VM by VM.
    async fn tunnels(&self) -> Vec<Option<uuid::Uuid>> {
        let mut out = Vec::new();
        for vnc in &self.vncs {
            let record = self
                .allocator
                .vm(&vnc.hostname.parse().unwrap())
                .await
                .unwrap();
            out.push(
                record
                    .assignment
                    .and_then(|a| a.desktop.tunnel)
                    .map(|t| t.id),
            );
        }
        out
    }

    /// `(sessions relayed, bytes to VMs, client messages dropped)`.
    fn relayed(&self) -> (u64, u64, u64) {
        let (sessions, _, to_vms, dropped) = self.state.desktop_relay().counts();
        (sessions, to_vms, dropped)
    }
}

/// The HTTP status a WebSocket handshake was refused with (panics if it was accepted).
async fn refused(url: &str, headers: &[(&str, String)]) -> StatusCode {
    match ws_connect(url, headers).await {
        Ok(_) => panic!("{url} accepted a WebSocket with {headers:?}"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status(),
        Err(e) => panic!("{url}: not an HTTP refusal: {e}"),
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(
    url: &str,
    headers: &[(&str, String)],
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

/// A picture the VM sent: RGB pixels.
struct Frame {
    pixels: Vec<[u8; 3]>,
}

impl Frame {
    /// The share of pixels of `colour` (a pointer the server draws in is a few others).
    fn share_of(&self, colour: [u8; 3]) -> f64 {
        let n = self.pixels.iter().filter(|p| **p == colour).count();
        n as f64 / self.pixels.len().max(1) as f64
    }
}

/// An RFB client over the relay's WebSocket (VNC authentication, raw encoding, 32-bit
/// little-endian true colour).
struct Rfb {
    ws: Socket,
    buf: Vec<u8>,
    size: (u16, u16),
}

impl Rfb {
    async fn connect(url: &str, headers: &[(&str, String)], password: &str) -> Self {
        let ws = ws_connect(url, headers)
            .await
            .unwrap_or_else(|e| panic!("WebSocket {url}: {e}"));
        let mut rfb = Self {
            ws,
            buf: Vec::new(),
            size: (0, 0),
        };
        let version = rfb.read(12).await;
        assert_eq!(&version[..8], b"RFB 003.", "{version:?}");
        rfb.send(b"RFB 003.008\n").await;
        let n = rfb.read(1).await[0] as usize;
        assert!(n > 0, "the VNC server refused the connection");
        assert!(rfb.read(n).await.contains(&2), "VNC authentication offered");
        rfb.send(&[2]).await;
        let challenge: [u8; 16] = rfb.read(16).await.try_into().unwrap();
        rfb.send(&lablink_agent::vnc::challenge_response(
            password, &challenge,
        ))
        .await;
        assert_eq!(rfb.read(4).await, [0, 0, 0, 0], "VNC authentication failed");
        rfb.send(&[1]).await; // ClientInit: shared
        let init = rfb.read(24).await;
        rfb.size = (
            u16::from_be_bytes([init[0], init[1]]),
            u16::from_be_bytes([init[2], init[3]]),
        );
        let name_len = u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize;
        rfb.read(name_len).await;
        // SetPixelFormat: 32 bpp, depth 24, little-endian, true colour, 8 bits a channel.
        rfb.send(&[
            0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ])
        .await;
        rfb.send(&[2, 0, 0, 1, 0, 0, 0, 0]).await; // SetEncodings: raw only
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
            match tokio::time::timeout(PATIENCE, self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => self.buf.extend_from_slice(&b),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                other => panic!("the RFB stream ended: {other:?}"),
            }
        }
        self.buf.drain(..n).collect()
    }

    /// Asks for the whole screen and reads the answer. The VM's server handles a client's
    /// messages in order, so whatever was sent before has been handled once this returns.
    async fn frame(&mut self) -> Frame {
        let (w, h) = self.size;
        let mut request = vec![3, 0, 0, 0, 0, 0];
        request.extend_from_slice(&w.to_be_bytes());
        request.extend_from_slice(&h.to_be_bytes());
        self.send(&request).await;
        let mut pixels = vec![[0u8; 3]; usize::from(w) * usize::from(h)];
        loop {
            match self.read(1).await[0] {
                0 => break,
                1 => {
                    let head = self.read(5).await;
                    let n = u16::from_be_bytes([head[3], head[4]]) as usize;
                    self.read(6 * n).await;
                }
                2 => {}
                3 => {
                    let head = self.read(7).await;
                    let n = u32::from_be_bytes(head[3..7].try_into().unwrap()) as usize;
                    self.read(n).await;
                }
                other => panic!("unexpected server message {other}"),
            }
        }
        let head = self.read(3).await;
        let rects = u16::from_be_bytes([head[1], head[2]]);
        for _ in 0..rects {
            let r = self.read(12).await;
            let field = |i: usize| usize::from(u16::from_be_bytes([r[i], r[i + 1]]));
            let (x, y, rw, rh) = (field(0), field(2), field(4), field(6));
            let encoding = i32::from_be_bytes(r[8..12].try_into().unwrap());
            assert_eq!(encoding, 0, "only raw was asked for");
            let data = self.read(rw * rh * 4).await;
            for row in 0..rh {
                for col in 0..rw {
                    let p = &data[(row * rw + col) * 4..];
                    pixels[(y + row) * usize::from(w) + x + col] = [p[2], p[1], p[0]];
                }
            }
        }
        Frame { pixels }
    }

    /// A pointer event (no button) at `(x, y)`, a Caps Lock press and release.
    async fn input(&mut self, x: u16, y: u16) {
        let mut pointer = vec![5, 0];
        pointer.extend_from_slice(&x.to_be_bytes());
        pointer.extend_from_slice(&y.to_be_bytes());
        self.send(&pointer).await;
        self.send(&[4, 1, 0, 0, 0, 0, 0xff, 0xe5]).await;
        self.send(&[4, 0, 0, 0, 0, 0, 0xff, 0xe5]).await;
    }
}

/// The X pointer's position on `display` (`xdotool getmouselocation`).
fn pointer(display: u16) -> (u16, u16) {
    let out = Command::new(find_binary(&["xdotool"], "xdotool"))
        .arg("getmouselocation")
        .env("DISPLAY", format!(":{display}"))
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

/// Whether Caps Lock is on on `display` (`xset q`).
fn caps_lock(display: u16) -> bool {
    let out = Command::new(find_binary(&["xset"], "x11-xserver-utils"))
        .args(["-display", &format!(":{display}"), "q"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let state = text
        .split("Caps Lock:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("xset said {text:?}"));
    state == "on"
}

/// The local addresses something listens on at TCP `port` (from `/proc/net/tcp{,6}`).
fn listening_addresses(port: u16) -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(&"0A")) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            let (addr, p) = local.split_once(':').unwrap();
            if u16::from_str_radix(p, 16).unwrap() != port {
                continue;
            }
            // The kernel prints each 32-bit word in host (little-endian) byte order.
            let bytes: Vec<u8> = (0..addr.len() / 8)
                .flat_map(|w| {
                    u32::from_str_radix(&addr[w * 8..w * 8 + 8], 16)
                        .unwrap()
                        .to_le_bytes()
                })
                .collect();
            out.push(if v6 {
                std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).unwrap())
            } else {
                std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).unwrap())
            });
        }
    }
    out
}

/// The VNC server on `port` accepts connections on loopback only. On one machine this
/// proves what the VM's network sees: nothing listens on its other addresses, so only a
/// process on the VM itself (the agent, whose tunnel the allocator reaches) gets in.
async fn assert_loopback_only(port: u16) {
    let addresses = listening_addresses(port);
    assert!(!addresses.is_empty(), "nothing listens on {port}");
    assert!(
        addresses.iter().all(|a| a.is_loopback()),
        "the VNC server listens beyond loopback: {addresses:?}"
    );
    // And a connection to this machine's other addresses is refused.
    let others = Command::new("hostname").arg("-I").output();
    let others = others
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for addr in others
        .split_whitespace()
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
    {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((addr, port)),
        )
        .await;
        assert!(
            matches!(r, Ok(Err(_))),
            "the VNC port answered on {addr}: {r:?}"
        );
    }
}

/// The VNC server the agent started for `vnc` runs without the VM's token in its
/// environment (it runs as the desktop user, who can read it).
fn assert_vnc_server_lacks_token(vnc: &Vnc) {
    let pids = pids_mentioning(&vnc.password_file.display().to_string());
    assert_eq!(
        pids.len(),
        1,
        "one VNC server for {}: {pids:?}",
        vnc.hostname
    );
    let environ = std::fs::read(format!("/proc/{}/environ", pids[0])).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains(&format!("VM_NAME={}", vnc.hostname)),
        "the agent started it"
    );
    assert!(
        !environ.split('\0').any(|v| v.starts_with("API_TOKEN=")),
        "the VNC server of {} holds the VM's token",
        vnc.hostname
    );
}

/// A participant's browser: chromedriver with a headless Chromium in a 1024×768 window,
/// quit and killed on drop.
async fn participant_browser() -> Chromium {
    Chromium::start_with_window_size(1024, 768).await
}

/// What these tests do with the participant's pages beyond plain WebDriver.
trait ParticipantPages {
    /// The participant's way in: the email on `/` (browser mode: no CRD command field),
    /// then the result page. Returns the hostname the page shows.
    async fn request_vm(&self, url: &str, email: &str) -> String;
    /// Waits until the result page's status box shows `stage`; returns its text.
    async fn wait_for_stage(&self, stage: &str) -> String;
    /// Clicks the result page's "Open your desktop" and switches to the window it opens.
    async fn open_desktop(&self) -> (String, String);
    /// The noVNC page's counters: `(connects, disconnects, connected)`.
    async fn desktop_state(&self) -> (u64, u64, bool);
    /// Waits until noVNC is connected and its canvas shows `colour` in its middle, then
    /// checks a WebDriver screenshot of the canvas (what Chromium displays), decoded by
    /// Chromium's own PNG decoder: nearly all of it is `colour`.
    async fn wait_for_colour(&self, what: &str, colour: [u8; 3]);
    /// The participant cookie this browser holds.
    async fn participant_cookie(&self) -> String;
}

impl ParticipantPages for Chromium {
    async fn request_vm(&self, url: &str, email: &str) -> String {
        self.go(&format!("{url}/")).await;
        self.wait_for(
            "the request form",
            "return !!document.querySelector('#email')",
        )
        .await;
        assert_eq!(
            self.script("return !!document.querySelector('#crd_command')")
                .await,
            json!(false),
            "a browser-mode form asks for no Chrome Remote Desktop command"
        );
        self.send_keys("#email", email).await;
        self.click("form button[type=submit]").await;
        let hostname = self
            .wait_for(
                "the result page",
                "const h = document.querySelector('#hostname'); return h && h.textContent",
            )
            .await;
        assert_eq!(
            self.script("return document.querySelector('#outcome').dataset.outcome")
                .await,
            json!("assigned")
        );
        assert_eq!(
            self.script("return !!document.querySelector('#pin')").await,
            json!(false),
            "the browser desktop's page shows no PIN"
        );
        // Every stage the status box shows from now on.
        self.script(
            "const box = document.getElementById('desktop-status');
             window.stages = [box.dataset.stage];
             new MutationObserver(() => {
               const s = box.dataset.stage;
               if (window.stages[window.stages.length - 1] !== s) { window.stages.push(s); }
             }).observe(box, {attributes: true, attributeFilter: ['data-stage']});
             return null",
        )
        .await;
        hostname.as_str().unwrap().to_owned()
    }

    async fn wait_for_stage(&self, stage: &str) -> String {
        let v = self
            .wait_for(
                &format!("the status {stage}"),
                &format!(
                    "const box = document.getElementById('desktop-status');
                     return box.dataset.stage === '{stage}' && box.textContent"
                ),
            )
            .await;
        v.as_str().unwrap().to_owned()
    }

    async fn open_desktop(&self) -> (String, String) {
        let result_window = self.window().await;
        let before = self.windows().await;
        self.click("#desktop-link a").await;
        let desktop_window = wait_until("the desktop window", PATIENCE, || async {
            self.windows()
                .await
                .into_iter()
                .find(|h| !before.contains(h))
        })
        .await;
        self.switch_to_window(&desktop_window).await;
        (result_window, desktop_window)
    }

    async fn desktop_state(&self) -> (u64, u64, bool) {
        let v = self
            .script("const s = window.lablinkDesktop; return s ? [s.connects, s.disconnects, s.connected] : [0, 0, false]")
            .await;
        (
            v[0].as_u64().unwrap(),
            v[1].as_u64().unwrap(),
            v[2].as_bool().unwrap(),
        )
    }

    async fn wait_for_colour(&self, what: &str, colour: [u8; 3]) {
        let mut last = Value::Null;
        let seen = tokio::time::timeout(PATIENCE, async {
            loop {
                last = self
                    .script(
                        "const c = document.querySelector('#screen canvas');
                         const s = window.lablinkDesktop;
                         if (!c || !s || !s.connected || !c.width) return null;
                         const d = c.getContext('2d').getImageData(Math.floor(c.width / 2), Math.floor(c.height / 2), 1, 1).data;
                         return [d[0], d[1], d[2]];",
                    )
                    .await;
                if last == json!(colour) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        assert!(
            seen.is_ok(),
            "{what}: the canvas never showed {colour:?}; last {last}"
        );
        let png = self.element_screenshot("#screen canvas").await;
        let decoded = self
            .async_script(
                "
                    const [png, want, done] = arguments;
                    const bytes = Uint8Array.from(atob(png), c => c.charCodeAt(0));
                    createImageBitmap(new Blob([bytes], {type: 'image/png'})).then(bmp => {
                      const c = new OffscreenCanvas(bmp.width, bmp.height);
                      const g = c.getContext('2d');
                      g.drawImage(bmp, 0, 0);
                      const d = g.getImageData(0, 0, bmp.width, bmp.height).data;
                      let same = 0;
                      for (let i = 0; i < d.length; i += 4) {
                        if (d[i] === want[0] && d[i + 1] === want[1] && d[i + 2] === want[2]) { same += 1; }
                      }
                      done([bmp.width, bmp.height, same]);
                    }, e => done(String(e)));",
                json!([png, colour]),
            )
            .await;
        let (w, h, same) = (
            decoded[0].as_u64().unwrap_or_else(|| panic!("{decoded}")),
            decoded[1].as_u64().unwrap(),
            decoded[2].as_u64().unwrap(),
        );
        assert!(w > 100 && h > 100, "{what}: a {w}x{h} canvas");
        assert!(
            same as f64 >= 0.95 * (w * h) as f64,
            "{what}: only {same} of {w}x{h} screenshot pixels are {colour:?}"
        );
    }

    async fn participant_cookie(&self) -> String {
        let c = self.cookie("lablink_participant").await;
        format!("lablink_participant={}", c["value"].as_str().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_sees_their_vm_desktop_in_the_browser_across_reloads_and_tunnel_drops() {
    let desk = Desk::start(&[MAGENTA, CYAN]).await;

    // Ada asks on `/`; her page shows the status as it moves on.
    let ada = participant_browser().await;
    let hostname = ada.request_vm(&desk.url, "ada@example.org").await;
    let vnc = desk.paint(&hostname).await;
    let received = ada.wait_for_stage("received").await;
    assert!(received.contains("open your desktop"), "{received}");
    // Her VM's VNC server takes connections on loopback only.
    assert_loopback_only(vnc.port).await;
    assert_vnc_server_lacks_token(&vnc);

    // She opens her desktop: noVNC, the relay, the agent's tunnel, Xvnc.
    let (result_window, desktop_window) = ada.open_desktop().await;
    ada.wait_for_colour("the first connection", vnc.colour)
        .await;
    let title = ada.script("return document.title").await;
    assert!(title.as_str().unwrap().contains(&hostname), "{title}");
    assert_eq!(
        ada.script("return document.getElementById('status').textContent")
            .await,
        json!("Connected")
    );
    // Its first frame made the desktop ready, and her result page says so.
    ada.switch_to_window(&result_window).await;
    assert_eq!(ada.wait_for_stage("ready").await, "Your desktop is ready.");
    let stages = ada.script("return window.stages").await;
    let stages: Vec<&str> = stages
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(
        stages.ends_with(&["received", "ready"]),
        "the stages the page showed: {stages:?}"
    );
    let assigned_at = desk
        .allocator
        .vm(&hostname.parse().unwrap())
        .await
        .unwrap()
        .assignment
        .unwrap()
        .assigned_at;

    // A reload: a new connection to the same desktop.
    ada.switch_to_window(&desktop_window).await;
    let (sessions, _, _) = desk.relayed();
    ada.refresh().await;
    ada.wait_for_colour("after a reload", vnc.colour).await;
    assert!(ada
        .script("return document.title")
        .await
        .as_str()
        .unwrap()
        .contains(&hostname));
    assert!(desk.relayed().0 > sessions, "the reload was relayed anew");

    // The agent dies (SIGKILL: its tunnel's connection drops with it), and the page sees
    // the connection drop.
    let (connects, disconnects, _) = ada.desktop_state().await;
    let (pid, _) = agent_process(&hostname, &desk.url).expect("the agent runs");
    signal(pid, "KILL");
    wait_until("the page to see the tunnel drop", PATIENCE, || async {
        let (_, now, _) = ada.desktop_state().await;
        (now > disconnects).then_some(())
    })
    .await;
    // The VM comes back as a rebooted one would: the same token and state, a new process.
    let record = desk.allocator.vm(&hostname.parse().unwrap()).await.unwrap();
    desk.provisioner
        .reboot(&ProvisionedVm {
            hostname: record.hostname.clone(),
            instance_id: record.instance_id.clone().unwrap(),
            address: None,
            instance_type: None,
        })
        .await
        .unwrap();
    wait_until("the agent to run again", PATIENCE, || async {
        agent_process(&hostname, &desk.url).filter(|(new_pid, _)| *new_pid != pid)
    })
    .await;
    // The page reconnects by itself through the new agent's tunnel.
    ada.wait_for_colour("after the tunnel dropped", vnc.colour)
        .await;
    let (again, _, connected) = ada.desktop_state().await;
    assert!(connected && again > connects, "{connects} then {again}");
    // Without a new VM request: the same assignment, the only one.
    let record = desk.allocator.vm(&hostname.parse().unwrap()).await.unwrap();
    let assignment = record.assignment.expect("still assigned");
    assert_eq!(assignment.assigned_at, assigned_at, "the same assignment");
    assert_eq!(assignment.email.as_str(), "ada@example.org");
    assert_eq!(desk.allocator.counts().await.unwrap().assigned, 1);
    ada.switch_to_window(&result_window).await;
    ada.wait_for_stage("ready").await;

    // Grace, in another browser, gets the other VM and sees its desktop.
    let grace = participant_browser().await;
    let other = grace.request_vm(&desk.url, "grace@example.org").await;
    assert_ne!(other, hostname);
    let other_vnc = desk.paint(&other).await;
    grace.wait_for_stage("received").await;
    grace.open_desktop().await;
    grace
        .wait_for_colour("the second participant's desktop", other_vnc.colour)
        .await;

    // The participant socket reaches the caller's VM only.
    let socket = desk.ws_url("/desktop/websockify");
    let ada_cookie = ada.participant_cookie().await;
    let grace_cookie = grace.participant_cookie().await;
    let before = (desk.relayed().0, desk.tunnels().await);
    // No cookie: the page sends the browser to `/`, the socket is refused before any VM is
    // asked for a tunnel.
    let page = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/desktop", desk.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::SEE_OTHER);
    assert_eq!(page.headers()[reqwest::header::LOCATION], "/");
    assert_eq!(refused(&socket, &[]).await, StatusCode::UNAUTHORIZED);
    // Grace's signed cookie with Ada's email in it: refused.
    let (_, signature) = grace_cookie
        .trim_start_matches("lablink_participant=")
        .split_once('.')
        .unwrap();
    let forged = format!(
        "lablink_participant={}.{signature}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("ada@example.org")
    );
    assert_eq!(
        refused(&socket, &[("cookie", forged)]).await,
        StatusCode::UNAUTHORIZED
    );
    // Ada's own cookie from another site's page: refused.
    assert_eq!(
        refused(
            &socket,
            &[
                ("cookie", ada_cookie.clone()),
                ("origin", "http://evil.example.com".into())
            ]
        )
        .await,
        StatusCode::FORBIDDEN
    );
    // A participant cookie on the admin's socket of the other VM: refused (sent to the
    // admin's sign-in page).
    let admin_socket = refused(
        &desk.ws_url(&format!("/admin/vms/{other}/desktop/websockify?control=1")),
        &[("cookie", ada_cookie.clone())],
    )
    .await;
    assert!(
        [StatusCode::UNAUTHORIZED, StatusCode::SEE_OTHER].contains(&admin_socket),
        "{admin_socket}"
    );
    assert_eq!(
        (desk.relayed().0, desk.tunnels().await),
        before,
        "a refused socket relays nothing and asks no VM for a tunnel"
    );
    // Ada's cookie, even naming Grace's VM, reaches Ada's VM.
    let page = reqwest::Client::new()
        .get(format!("{}/desktop", desk.url))
        .header("cookie", &ada_cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let password = page
        .split("data-password=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no password on the desktop page: {page}"))
        .to_owned();
    let mut rfb = Rfb::connect(
        &desk.ws_url(&format!("/desktop/websockify?hostname={other}")),
        &[("cookie", ada_cookie)],
        &password,
    )
    .await;
    assert!(rfb.frame().await.share_of(vnc.colour) > 0.99, "Ada's VM");

    // The agent side: Ada's VM's token for an id no browser waits for, and for Grace's VM.
    let (_, token) = agent_process(&hostname, &desk.url).unwrap();
    let bearer = [("authorization", format!("Bearer {token}"))];
    let id = uuid::Uuid::new_v4().simple();
    assert_eq!(
        refused(
            &desk.ws_url(&format!("/api/v1/vms/{hostname}/tunnel/{id}")),
            &bearer
        )
        .await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        refused(
            &desk.ws_url(&format!("/api/v1/vms/{other}/tunnel/{id}")),
            &bearer
        )
        .await,
        StatusCode::FORBIDDEN
    );

    // A third participant while both VMs are taken: the page says it waits for a VM and asks
    // again by itself; once Grace is done (she releases hers), the waiting page gets it.
    let lin = participant_browser().await;
    lin.go(&format!("{}/", desk.url)).await;
    lin.send_keys("#email", "lin@example.org").await;
    lin.click("form button[type=submit]").await;
    lin.wait_for(
        "the page to say it waits for a VM",
        "const s = document.getElementById('request-status');
         return !!s && !s.hidden && s.textContent.startsWith('Waiting for a VM')",
    )
    .await;
    let done = reqwest::Client::new()
        .post(format!("{}/api/participant/release", desk.url))
        .header("cookie", &grace_cookie)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), StatusCode::OK);
    let got = lin
        .wait_for(
            "the waiting page to get the released VM",
            "const h = document.querySelector('#hostname'); return h && h.textContent",
        )
        .await;
    assert_eq!(got, json!(other.as_str()), "Lin got Grace's released VM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_view_only_session_gets_frames_but_its_input_never_reaches_the_vm() {
    find_binary(&["xdotool"], "xdotool");
    find_binary(&["xset"], "x11-xserver-utils");
    let desk = Desk::start(&[MAGENTA]).await;
    let (hostname, pin) = desk.claim("viewer@example.org").await;
    let vnc = desk.paint(&hostname).await;
    let password = lablink_agent::vnc::password_of_pin(&pin);
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{ADMIN_USER}:{ADMIN_PASSWORD}"))
    );
    let auth = [("authorization", basic.clone())];
    // The admin's page is view-only unless asked otherwise.
    let page = reqwest::Client::new()
        .get(format!("{}/admin/vms/{hostname}/desktop", desk.url))
        .header("authorization", &basic)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("(view only)") && page.contains(r#"data-view-only="true""#),
        "{page}"
    );

    // View-only: frames arrive...
    let start = pointer(vnc.display);
    assert!(!caps_lock(vnc.display), "Caps Lock starts off");
    let target = ((start.0 + 37) % 600, (start.1 + 23) % 400);
    let view = desk.ws_url(&format!("/admin/vms/{hostname}/desktop/websockify"));
    let mut rfb = Rfb::connect(&view, &auth, &password).await;
    assert!(
        rfb.frame().await.share_of(vnc.colour) > 0.99,
        "the view shows the VM"
    );
    // ... but a pointer move and a Caps Lock press do not reach the VM. The next frame is
    // the barrier: the VM's server answered it, so it handled whatever came before.
    let (_, to_vms, dropped) = desk.relayed();
    rfb.input(target.0, target.1).await;
    rfb.frame().await;
    let (_, to_vms_after, dropped_after) = desk.relayed();
    assert_eq!(
        dropped_after - dropped,
        3,
        "the relay dropped the three events"
    );
    assert_eq!(
        to_vms_after - to_vms,
        10,
        "only the frame request reached the VM"
    );
    assert_eq!(pointer(vnc.display), start, "the pointer did not move");
    assert!(!caps_lock(vnc.display), "Caps Lock stayed off");

    // With control the same events arrive: the checks above can fail.
    let control = desk.ws_url(&format!(
        "/admin/vms/{hostname}/desktop/websockify?control=1"
    ));
    let mut rfb = Rfb::connect(&control, &auth, &password).await;
    assert!(rfb.frame().await.share_of(vnc.colour) > 0.99);
    let (_, to_vms, dropped) = desk.relayed();
    rfb.input(target.0, target.1).await;
    rfb.frame().await;
    let (_, to_vms_after, dropped_after) = desk.relayed();
    assert_eq!(dropped_after, dropped, "control drops nothing");
    assert_eq!(to_vms_after - to_vms, 6 + 8 + 8 + 10);
    wait_until("the pointer to move", PATIENCE, || async {
        (pointer(vnc.display) == target).then_some(())
    })
    .await;
    wait_until("Caps Lock to go on", PATIENCE, || async {
        caps_lock(vnc.display).then_some(())
    })
    .await;
}
