//! Measures the browser desktop (a benchmark, not a test): the time from 200 participants
//! pressing "get a VM" at once to the first framebuffer update each one's RFB client gets
//! through the allocator's relay, and the relay's throughput against a direct loopback
//! connection to the same VNC server. Results: BENCHMARKS.md, "Browser desktop".
//!
//! ```text
//! cargo run --release -p lablink-testkit --example desktop_bench
//! ```
//!
//! The setup, all on this machine:
//! - one real TigerVNC `Xvnc` (Debian's `tigervnc-standalone-server`), 1280x800, painted with
//!   `xsetroot`, VNC authentication with one password. It stands in for the 200 VMs' VNC
//!   servers: every VM's tunnel ends at it, so the per-assignment PIN passwords cannot be
//!   used (every client answers the challenge with the one password; the relay passes the
//!   same handshake either way), and its per-address blacklist is turned off (all tunnels
//!   come from 127.0.0.1);
//! - the allocator in-process in browser mode (`[desktop] mode = "browser"`) on the fake
//!   provisioner, listening on 127.0.0.1 as `lablink serve` does, with 200 VMs running;
//! - one in-process "agent" per VM: the agent's own [`AllocatorClient`] long-polling its
//!   assignment with `seen`, and for each new tunnel id the agent's own
//!   [`tunnel::relay`] to the VNC port, with the VM's token. During the burst that port is
//!   a [`Gate`] in front of Xvnc, standing in for the VMs' own listeners (Xvnc's backlog of
//!   5 cannot take 200 connections in a second; `DESKTOP_BENCH_NO_GATE=1` shows what
//!   happens without it);
//! - 200 participants, each with a cookie-keeping client: `POST /api/request_vm`, then the
//!   WebSocket `/desktop/websockify` with the participant cookie and a same-site `Origin`,
//!   then RFB 3.8 (VNC authentication, shared ClientInit, SetEncodings raw, or ZRLE with
//!   `DESKTOP_BENCH_ENCODING=zrle`, one full non-incremental FramebufferUpdateRequest). A
//!   participant's time runs from submitting the request to the header of the first
//!   FramebufferUpdate; each then reads the whole frame and keeps its session open until
//!   all 200 are done;
//! - then one session reads whole raw frames for 5 s through the relay (its tunnel straight
//!   to Xvnc) and the same client reads them from Xvnc's port directly, twice each.
//!
//! Every step is bounded; Xvnc is killed when the benchmark ends (or fails, or is
//! interrupted).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use lablink::{DesktopMode, DesktopStage, LabLink};
use lablink_agent::client::AllocatorClient;
use lablink_agent::{tunnel, AgentConfig};
use lablink_testkit::{admin_options, TestServer, TokenProvisioner};
use reqwest::cookie::CookieStore as _;
use reqwest::Url;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Barrier};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;

/// Participants (and VMs) at once.
const PARTICIPANTS: usize = 200;
/// The desktop's size.
const WIDTH: u16 = 1280;
const HEIGHT: u16 = 800;
/// The root window's colour.
const COLOUR: &str = "#3366cc";
/// The one VNC password of the shared Xvnc (8 characters, as a PIN's first 8).
const PASSWORD: &str = "48151623";
/// How long each throughput measurement reads frames.
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(5);
/// Longest any single network step (connect, one read) may take.
const STEP: Duration = Duration::from_secs(20);
/// Longest one participant may take from its request to its whole first frame.
const PARTICIPANT_DEADLINE: Duration = Duration::from_secs(60);
/// Longest the whole benchmark may take.
const OVERALL: Duration = Duration::from_secs(170);
/// RFB encodings: raw, and ZRLE (zlib-compressed tiles, which noVNC also speaks).
const RAW: i32 = 0;
const ZRLE: i32 = 16;
/// The agents' long-poll hold.
const HOLD: Duration = Duration::from_secs(30);

type Failure = String;

fn find_binary(name: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "desktop_bench needs {name} on PATH (Debian package {package}: \
                 apt-get install -y {package}, or bash scripts/components.sh)"
            )
        })
}

/// A display whose VNC port (5900 + n) is free and that no X server holds.
fn free_display() -> u16 {
    (60..200)
        .find(|d| {
            !Path::new(&format!("/tmp/.X{d}-lock")).exists()
                && !Path::new(&format!("/tmp/.X11-unix/X{d}")).exists()
                && std::net::TcpListener::bind(("127.0.0.1", 5900 + d)).is_ok()
        })
        .expect("a free X display between :60 and :199")
}

/// The shared VNC server: a real Xvnc, killed on drop.
struct Xvnc {
    child: Child,
    display: u16,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Xvnc {
    fn drop(&mut self) {
        // SIGTERM first, so that Xvnc removes its display's lock file and socket.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Xvnc {
    async fn start() -> Self {
        let xvnc = find_binary("Xvnc", "tigervnc-standalone-server");
        let xsetroot = find_binary("xsetroot", "x11-xserver-utils");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let password_file = dir.path().join("vnc-passwd");
        lablink_agent::vnc::write_password_file(&password_file, PASSWORD, None)
            .expect("the VNC password file is written");
        let display = free_display();
        let port = 5900 + display;
        let log = std::fs::File::create(dir.path().join("Xvnc.log")).expect("Xvnc's log");
        let child = Command::new(&xvnc)
            .arg(format!(":{display}"))
            .args(["-localhost", "-rfbport", &port.to_string(), "-rfbauth"])
            .arg(&password_file)
            .args(["-SecurityTypes", "VncAuth", "-geometry"])
            .arg(format!("{WIDTH}x{HEIGHT}"))
            // TigerVNC counts each connection not authenticated yet against its address and
            // refuses the address from the 5th on (BlacklistThreshold): every tunnel comes
            // from 127.0.0.1 here, where each VM's server sees only its own agent's.
            .args(["-BlacklistThreshold", "1000000"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{} does not start: {e}", xvnc.display()));
        let server = Self {
            child,
            display,
            port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !lablink_agent::vnc::listening(port).await {
            assert!(
                Instant::now() < deadline,
                "Xvnc :{display} did not listen on 127.0.0.1:{port} within 15 s (its log: {})",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Paint the root window (the X socket may come a moment after the RFB port).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = Command::new(&xsetroot)
                .env("DISPLAY", format!(":{display}"))
                .args(["-solid", COLOUR])
                .stderr(Stdio::null())
                .status()
                .expect("xsetroot runs");
            if status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "xsetroot could not paint :{display}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("Xvnc.log")).unwrap_or_default()
    }
}

/// An RFB connection: over the relay's WebSocket (binary messages) or plain TCP.
enum Link {
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>>),
    Tcp(TcpStream),
}

/// A headless RFB 3.8 client that reads what it needs and discards pixel data.
struct Rfb {
    link: Link,
    buf: Vec<u8>,
    pos: usize,
    size: (u16, u16),
    bytes_per_pixel: usize,
    /// Bytes received so far (RFB payload).
    received: u64,
}

impl Rfb {
    fn new(link: Link) -> Self {
        Self {
            link,
            buf: Vec::with_capacity(128 * 1024),
            pos: 0,
            size: (0, 0),
            bytes_per_pixel: 4,
            received: 0,
        }
    }

    /// Appends the next piece of the stream to the buffer.
    async fn fill(&mut self) -> Result<(), Failure> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let before = self.buf.len();
        match &mut self.link {
            Link::Ws(ws) => loop {
                match tokio::time::timeout(STEP, ws.next()).await {
                    Err(_) => return Err("no data from the relay for 20 s".into()),
                    Ok(Some(Ok(Message::Binary(b)))) => {
                        self.buf.extend_from_slice(&b);
                        break;
                    }
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        return Err(format!("the relay closed the session: {frame:?}"))
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => return Err(format!("WebSocket: {e}")),
                    Ok(None) => return Err("the relay's WebSocket ended".into()),
                }
            },
            Link::Tcp(tcp) => {
                self.buf.reserve(64 * 1024);
                match tokio::time::timeout(STEP, tcp.read_buf(&mut self.buf)).await {
                    Err(_) => return Err("no data from Xvnc for 20 s".into()),
                    Ok(Ok(0)) => return Err("Xvnc closed the connection".into()),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(format!("reading from Xvnc: {e}")),
                }
            }
        }
        self.received += (self.buf.len() - before) as u64;
        Ok(())
    }

    async fn take(&mut self, n: usize) -> Result<Vec<u8>, Failure> {
        while self.buf.len() - self.pos < n {
            self.fill().await?;
        }
        let out = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(out)
    }

    /// Consumes `n` bytes without keeping them.
    async fn skip(&mut self, mut n: usize) -> Result<(), Failure> {
        loop {
            let k = n.min(self.buf.len() - self.pos);
            self.pos += k;
            n -= k;
            if n == 0 {
                return Ok(());
            }
            self.buf.clear();
            self.pos = 0;
            self.fill().await?;
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        let sent = match &mut self.link {
            Link::Ws(ws) => {
                tokio::time::timeout(STEP, ws.send(Message::Binary(bytes.to_vec().into())))
                    .await
                    .map(|r| r.map_err(|e| e.to_string()))
            }
            Link::Tcp(tcp) => tokio::time::timeout(STEP, tcp.write_all(bytes))
                .await
                .map(|r| r.map_err(|e| e.to_string())),
        };
        sent.map_err(|_| "sending took over 20 s".to_owned())?
            .map_err(|e| format!("sending: {e}"))
    }

    /// ProtocolVersion, VNC authentication with `password`, shared ClientInit, ServerInit.
    async fn handshake(&mut self, password: &str) -> Result<(), Failure> {
        let version = self.take(12).await?;
        if !version.starts_with(b"RFB ") {
            return Err(format!("not an RFB server: {version:?}"));
        }
        self.send(b"RFB 003.008\n").await?;
        let n = self.take(1).await?[0] as usize;
        if n == 0 {
            let len = u32::from_be_bytes(self.take(4).await?.try_into().unwrap()) as usize;
            let reason = self.take(len.min(1024)).await?;
            return Err(format!(
                "the VNC server refused: {}",
                String::from_utf8_lossy(&reason)
            ));
        }
        let types = self.take(n).await?;
        if !types.contains(&2) {
            return Err(format!("no VNC authentication offered: {types:?}"));
        }
        self.send(&[2]).await?;
        let challenge: [u8; 16] = self.take(16).await?.try_into().unwrap();
        self.send(&lablink_agent::vnc::challenge_response(
            password, &challenge,
        ))
        .await?;
        let result = self.take(4).await?;
        if result != [0, 0, 0, 0] {
            return Err("VNC authentication failed".into());
        }
        self.send(&[1]).await?; // ClientInit: shared
        let init = self.take(24).await?;
        self.size = (
            u16::from_be_bytes([init[0], init[1]]),
            u16::from_be_bytes([init[2], init[3]]),
        );
        self.bytes_per_pixel = (init[4] as usize).div_ceil(8).max(1);
        let name_len = u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize;
        self.skip(name_len).await
    }

    /// SetEncodings: raw only.
    async fn raw_only(&mut self) -> Result<(), Failure> {
        self.encodings(&[RAW]).await
    }

    /// SetEncodings: `encodings`, preferred first.
    async fn encodings(&mut self, encodings: &[i32]) -> Result<(), Failure> {
        let mut message = vec![2, 0];
        message.extend_from_slice(&(encodings.len() as u16).to_be_bytes());
        for e in encodings {
            message.extend_from_slice(&e.to_be_bytes());
        }
        self.send(&message).await
    }

    /// A non-incremental FramebufferUpdateRequest for the whole screen.
    async fn request_full(&mut self) -> Result<(), Failure> {
        let (w, h) = self.size;
        let mut request = vec![3, 0, 0, 0, 0, 0];
        request.extend_from_slice(&w.to_be_bytes());
        request.extend_from_slice(&h.to_be_bytes());
        self.send(&request).await
    }

    /// Reads up to the next FramebufferUpdate's header; its number of rectangles.
    async fn update_header(&mut self) -> Result<u16, Failure> {
        loop {
            let kind = self.take(1).await?[0];
            match kind {
                0 => {
                    let rest = self.take(3).await?;
                    return Ok(u16::from_be_bytes([rest[1], rest[2]]));
                }
                2 => {} // Bell
                3 => {
                    // ServerCutText
                    let head = self.take(7).await?;
                    let len = u32::from_be_bytes(head[3..7].try_into().unwrap());
                    self.skip((len as i32).unsigned_abs() as usize).await?;
                }
                other => return Err(format!("unexpected server message type {other}")),
            }
        }
    }

    /// Reads (and discards) the rectangles of an update whose header was read.
    async fn update_body(&mut self, rects: u16) -> Result<(), Failure> {
        for _ in 0..rects {
            let head = self.take(12).await?;
            let w = u16::from_be_bytes([head[4], head[5]]) as usize;
            let h = u16::from_be_bytes([head[6], head[7]]) as usize;
            match i32::from_be_bytes(head[8..12].try_into().unwrap()) {
                RAW => self.skip(w * h * self.bytes_per_pixel).await?,
                ZRLE => {
                    let len = self.take(4).await?;
                    self.skip(u32::from_be_bytes(len.try_into().unwrap()) as usize)
                        .await?;
                }
                -224 => break, // LastRect
                -223 => {}     // DesktopSize
                other => return Err(format!("unexpected encoding {other}")),
            }
        }
        Ok(())
    }

    async fn close(self) {
        match self.link {
            Link::Ws(mut ws) => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio_tungstenite::WebSocketStream::close(&mut *ws, None),
                )
                .await;
            }
            Link::Tcp(mut tcp) => {
                let _ = tcp.shutdown().await;
            }
        }
    }
}

/// The relay's WebSocket for the participant whose cookie header is `cookie`, as a
/// browser opens it (same-site `Origin`, noVNC's `binary` subprotocol).
async fn open_desktop(base: &str, cookie: &str) -> Result<Rfb, Failure> {
    let url = format!(
        "{}/desktop/websockify",
        base.replacen("http://", "ws://", 1)
    );
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let headers = request.headers_mut();
    headers.insert("cookie", cookie.parse().map_err(|_| "a bad cookie header")?);
    headers.insert("origin", base.parse().map_err(|_| "a bad origin")?);
    headers.insert("sec-websocket-protocol", "binary".parse().unwrap());
    let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(request))
        .await
        .map_err(|_| "the desktop WebSocket did not open within 20 s".to_owned())?
        .map_err(|e| format!("the desktop WebSocket: {e}"))?;
    Ok(Rfb::new(Link::Ws(Box::new(ws))))
}

/// One participant's times, from submitting the VM request.
#[derive(Debug, Clone, Copy)]
struct Times {
    /// The `request_vm` answer.
    claimed: Duration,
    /// The relay's WebSocket open (its VM's agent dialed in).
    opened: Duration,
    /// ServerInit read (VNC handshake done through the relay).
    initialised: Duration,
    /// The first FramebufferUpdate's header.
    first_update: Duration,
    /// The whole first frame read.
    whole_frame: Duration,
}

/// One of the [`Times`].
type Stage = fn(&Times) -> Duration;

/// A participant: requests a VM, opens its desktop, reads the first frame; keeps the
/// session open until `release`. Sends its times (and cookie) to `done`.
async fn participant(
    i: usize,
    base: String,
    first_frame_encodings: &'static [i32],
    start: Arc<Barrier>,
    done: mpsc::Sender<Result<(Times, String), Failure>>,
    mut release: watch::Receiver<bool>,
) {
    let jar = Arc::new(reqwest::cookie::Jar::default());
    let client = reqwest::Client::builder()
        .cookie_provider(jar.clone())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(STEP)
        .build()
        .expect("a reqwest client");
    let base_url: Url = base.parse().expect("the server's URL");
    start.wait().await;
    let t0 = Instant::now();
    let session = async {
        let response = client
            .post(format!("{base}/api/request_vm"))
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&[("email", format!("p{i}@bench.org"))])
            .send()
            .await
            .map_err(|e| format!("request_vm: {e}"))?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            let body = response.text().await.unwrap_or_default();
            return Err(format!("request_vm answered {status}: {body}"));
        }
        let claimed = t0.elapsed();
        let cookie = jar
            .cookies(&base_url)
            .ok_or("no participant cookie was set")?
            .to_str()
            .map_err(|e| e.to_string())?
            .to_owned();
        let mut rfb = open_desktop(&base, &cookie).await?;
        let opened = t0.elapsed();
        rfb.handshake(PASSWORD)
            .await
            .map_err(|e| format!("in the VNC handshake: {e}"))?;
        let initialised = t0.elapsed();
        rfb.encodings(first_frame_encodings).await?;
        rfb.request_full().await?;
        let rects = rfb
            .update_header()
            .await
            .map_err(|e| format!("waiting for the first update: {e}"))?;
        let first_update = t0.elapsed();
        rfb.update_body(rects)
            .await
            .map_err(|e| format!("reading the first frame: {e}"))?;
        let whole_frame = t0.elapsed();
        let times = Times {
            claimed,
            opened,
            initialised,
            first_update,
            whole_frame,
        };
        Ok::<_, Failure>((times, cookie, rfb))
    };
    match tokio::time::timeout(PARTICIPANT_DEADLINE, session).await {
        Ok(Ok((times, cookie, rfb))) => {
            let _ = done.send(Ok((times, cookie))).await;
            // Stay connected, as a participant does, until everyone has a frame.
            let _ = tokio::time::timeout(OVERALL, release.wait_for(|r| *r)).await;
            rfb.close().await;
        }
        Ok(Err(e)) => {
            let _ = done.send(Err(format!("p{i}: {e}"))).await;
        }
        Err(_) => {
            let _ = done
                .send(Err(format!("p{i}: no whole first frame within 60 s")))
                .await;
        }
    }
}

/// What the 200 participants at once got.
struct Burst {
    times: Vec<Times>,
    failures: Vec<Failure>,
    /// The cookie of a participant with a VM.
    cookie: Option<String>,
    /// From the start to the last participant's whole first frame.
    wall: Duration,
    /// Ends the participants' sessions (they stay open until then).
    release: watch::Sender<bool>,
    participants: tokio::task::JoinSet<()>,
}

impl Burst {
    /// [`PARTICIPANTS`] participants starting at one instant, until each has its whole
    /// first frame (or failed).
    async fn run(base: &str, first_frame_encodings: &'static [i32]) -> Self {
        let start = Arc::new(Barrier::new(PARTICIPANTS + 1));
        let (done_tx, mut done_rx) = mpsc::channel(PARTICIPANTS);
        let (release, release_rx) = watch::channel(false);
        let mut participants = tokio::task::JoinSet::new();
        for i in 0..PARTICIPANTS {
            participants.spawn(participant(
                i,
                base.to_owned(),
                first_frame_encodings,
                start.clone(),
                done_tx.clone(),
                release_rx.clone(),
            ));
        }
        drop(done_tx);
        start.wait().await;
        let t0 = Instant::now();
        let (mut times, mut failures, mut cookie) = (Vec::new(), Vec::new(), None);
        let deadline = tokio::time::Instant::now() + PARTICIPANT_DEADLINE + Duration::from_secs(5);
        while times.len() + failures.len() < PARTICIPANTS {
            match tokio::time::timeout_at(deadline, done_rx.recv()).await {
                Ok(Some(Ok((t, c)))) => {
                    times.push(t);
                    cookie.get_or_insert(c);
                }
                Ok(Some(Err(e))) => failures.push(e),
                Ok(None) => break,
                Err(_) => {
                    failures.push("some participants never finished".into());
                    break;
                }
            }
        }
        Self {
            times,
            failures,
            cookie,
            wall: t0.elapsed(),
            release,
            participants,
        }
    }
}

/// A VM's agent, in-process: the agent's client long-polls the assignment with `seen` and
/// each new tunnel id opens a tunnel ([`tunnel::relay`]) to the VNC port `vnc_port` holds
/// at that moment, as `lablink-agent` does.
async fn agent(
    config: AgentConfig,
    client: AllocatorClient,
    vnc_port: Arc<AtomicU16>,
    tunnels: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
) {
    let mut seen: Option<String> = None;
    let mut last_tunnel: Option<String> = None;
    loop {
        match client.wait_assignment(HOLD, seen.as_deref()).await {
            Ok(Some(body)) => {
                if let Some(t) = body.tunnel.filter(|t| last_tunnel.as_ref() != Some(&t.id)) {
                    last_tunnel = Some(t.id.clone());
                    let token = config.api_token.clone();
                    let (tunnels, failures) = (tunnels.clone(), failures.clone());
                    let url = tunnel::resolve(&config.allocator_url, &t.url);
                    let port = vnc_port.load(Ordering::Relaxed);
                    tokio::spawn(async move {
                        tunnels.fetch_add(1, Ordering::Relaxed);
                        let opened = match url {
                            Ok(url) => tunnel::relay(&url, token.as_ref(), port).await,
                            Err(e) => Err(e),
                        };
                        if let Err(e) = opened {
                            failures.fetch_add(1, Ordering::Relaxed);
                            eprintln!("a tunnel failed: {e}");
                        }
                    });
                }
                seen = Some(body.version);
            }
            Ok(None) => seen = None,
            Err(e) => {
                eprintln!("{}: the assignment poll failed: {e}", config.vm_name);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Connections the gate lets wait for Xvnc's accept at once: fewer than its listen backlog
/// (5), so that none overflows it.
const GATE_CONNECTS: usize = 4;

/// Stands in for the VMs' own VNC listeners during the burst. Xvnc listens with a backlog
/// of 5 and accepts in its one thread: 200 agents connecting to it within a second overflow
/// it, and a connection whose final ACK the kernel dropped looks open to the agent while
/// Xvnc accepts it only once the agent gives up (the session hangs until the browser does).
/// On a VM each server gets one connection, its own agent's. The gate accepts the agents'
/// connections at once (backlog 4096) and connects each to Xvnc with at most
/// [`GATE_CONNECTS`] waiting for its greeting, then copies both ways.
struct Gate {
    port: u16,
    /// How long each connection waited for Xvnc's greeting.
    waits: Arc<std::sync::Mutex<Vec<Duration>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gate {
    async fn start(xvnc_port: u16) -> Self {
        let listener =
            lablink::server::bind("127.0.0.1:0".parse().unwrap()).expect("the gate listens");
        let port = listener.local_addr().unwrap().port();
        let waits = Arc::new(std::sync::Mutex::new(Vec::new()));
        let connecting = Arc::new(tokio::sync::Semaphore::new(GATE_CONNECTS));
        let task = tokio::spawn({
            let waits = waits.clone();
            async move {
                let mut sessions = tokio::task::JoinSet::new();
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    while sessions.try_join_next().is_some() {}
                    sessions.spawn(gate_session(
                        inbound,
                        xvnc_port,
                        connecting.clone(),
                        waits.clone(),
                    ));
                }
            }
        });
        Self { port, waits, task }
    }
}

async fn gate_session(
    mut inbound: TcpStream,
    xvnc_port: u16,
    connecting: Arc<tokio::sync::Semaphore>,
    waits: Arc<std::sync::Mutex<Vec<Duration>>>,
) {
    let started = Instant::now();
    let upstream = async {
        let _permit = connecting.acquire().await.ok()?;
        let mut upstream = TcpStream::connect(("127.0.0.1", xvnc_port)).await.ok()?;
        let mut greeting = [0u8; 12];
        upstream.read_exact(&mut greeting).await.ok()?;
        Some((upstream, greeting))
    };
    let Ok(Some((mut upstream, greeting))) = tokio::time::timeout(STEP, upstream).await else {
        eprintln!("the gate could not reach Xvnc within 20 s");
        return;
    };
    waits.lock().unwrap().push(started.elapsed());
    let _ = inbound.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if inbound.write_all(&greeting).await.is_ok() {
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn summary(name: &str, values: impl Iterator<Item = Duration>) -> String {
    let mut ms: Vec<f64> = values.map(|d| d.as_secs_f64() * 1000.0).collect();
    if ms.is_empty() {
        return format!("{name:<34} (no samples)");
    }
    ms.sort_by(f64::total_cmp);
    format!(
        "{name:<34} p50 {:>7.1} ms  p95 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
        percentile(&ms, 0.50),
        percentile(&ms, 0.95),
        percentile(&ms, 0.99),
        ms[ms.len() - 1]
    )
}

/// `TcpExt: ListenOverflows ListenDrops` of this network namespace (every listener's).
fn listen_overflows() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let (Some(names), Some(values)) = (lines.first(), lines.get(1)) else {
        return (0, 0);
    };
    let field = |name: &str| {
        names
            .split_whitespace()
            .position(|n| n == name)
            .and_then(|i| values.split_whitespace().nth(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("ListenOverflows"), field("ListenDrops"))
}

/// Reads whole non-incremental raw frames for `window`: `(bytes, seconds, frames)`.
async fn frames_for(rfb: &mut Rfb, window: Duration) -> Result<(u64, f64, u64), Failure> {
    rfb.raw_only().await?;
    let before = rfb.received;
    let start = Instant::now();
    let mut frames = 0;
    while start.elapsed() < window {
        rfb.request_full().await?;
        let rects = rfb.update_header().await?;
        rfb.update_body(rects).await?;
        frames += 1;
    }
    Ok((rfb.received - before, start.elapsed().as_secs_f64(), frames))
}

async fn direct(port: u16) -> Result<Rfb, Failure> {
    let tcp = tokio::time::timeout(STEP, TcpStream::connect(("127.0.0.1", port)))
        .await
        .map_err(|_| "connecting to Xvnc took over 20 s".to_owned())?
        .map_err(|e| format!("connecting to Xvnc: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut rfb = Rfb::new(Link::Tcp(tcp));
    rfb.handshake(PASSWORD).await?;
    Ok(rfb)
}

async fn relayed(base: &str, cookie: &str) -> Result<Rfb, Failure> {
    let mut rfb = open_desktop(base, cookie).await?;
    rfb.handshake(PASSWORD).await?;
    Ok(rfb)
}

/// One session reading whole raw frames, through the relay (as the participant whose cookie
/// is `cookie`) and from Xvnc's port directly, in ABBA order: prints the rates and ratio.
async fn throughput(base: &str, cookie: &str, xvnc_port: u16) {
    println!();
    println!(
        "Throughput: one session reading full non-incremental raw frames, {} s per run:",
        THROUGHPUT_WINDOW.as_secs()
    );
    // (bytes, seconds, frames) of [relay, direct].
    let mut totals = [(0u64, 0f64, 0u64); 2];
    for (round, via_relay) in [false, true, true, false].into_iter().enumerate() {
        let rfb = if via_relay {
            relayed(base, cookie).await
        } else {
            direct(xvnc_port).await
        };
        let measured = match rfb {
            Ok(mut rfb) => {
                let measured = frames_for(&mut rfb, THROUGHPUT_WINDOW).await;
                rfb.close().await;
                measured
            }
            Err(e) => Err(e),
        };
        let name = if via_relay { "relay " } else { "direct" };
        match measured {
            Ok((bytes, secs, frames)) => {
                println!(
                    "  run {}: {name} {:>7.1} MB/s ({frames} frames, {:.1} MB in {secs:.2} s)",
                    round + 1,
                    bytes as f64 / secs / 1e6,
                    bytes as f64 / 1e6
                );
                let total = &mut totals[usize::from(!via_relay)];
                total.0 += bytes;
                total.1 += secs;
                total.2 += frames;
            }
            Err(e) => println!("  run {}: {name} FAILED: {e}", round + 1),
        }
    }
    let per_second = |n: f64, secs: f64| if secs > 0.0 { n / secs } else { 0.0 };
    let [relay, direct] = totals.map(|(bytes, secs, frames)| {
        (
            per_second(bytes as f64 / 1e6, secs),
            per_second(frames as f64, secs),
        )
    });
    println!(
        "  relay {:.1} MB/s ({:.1} frames/s), direct loopback {:.1} MB/s ({:.1} frames/s): \
         relay/direct = {:.2}",
        relay.0,
        relay.1,
        direct.0,
        direct.1,
        per_second(relay.0, direct.0)
    );
}

/// The allocator in browser mode on the fake provisioner, as [`TestServer`] starts it but
/// listening as `lablink serve` does ([`lablink::server::bind`]: a backlog of 4096, where
/// tokio's default of 128 would drop part of a room's simultaneous connections for a
/// one-second retry).
async fn start_server() -> TestServer {
    let provisioner = TokenProvisioner::default();
    let config = lablink::AllocatorConfig {
        desktop_mode: DesktopMode::Browser,
        ..Default::default()
    };
    let allocator: Arc<dyn lablink::Allocator> = Arc::new(
        LabLink::builder()
            .with_config(config)
            .with_provisioner(Arc::new(provisioner.clone()))
            .build()
            .expect("the allocator builds"),
    );
    let mut options = admin_options();
    options.desktop.mode = DesktopMode::Browser;
    let state = lablink::http::HttpState::new(allocator.clone(), options);
    let listener =
        lablink::server::bind("127.0.0.1:0".parse().unwrap()).expect("the server listens");
    let addr = listener.local_addr().unwrap();
    let serving = state.clone();
    tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
    TestServer {
        base: format!("http://{addr}"),
        state,
        allocator,
        provisioner,
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .build()
            .unwrap(),
        browser: lablink_testkit::browser(),
    }
}

/// The benchmark; whether every participant got its first frame.
async fn run() -> bool {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "desktop_bench: {PARTICIPANTS} participants, {WIDTH}x{HEIGHT}; {cores} cores, load average {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let first_frame_encodings: &'static [i32] =
        match std::env::var("DESKTOP_BENCH_ENCODING").as_deref() {
            Ok("zrle") => &[ZRLE, RAW],
            Ok("raw") | Err(_) => &[RAW],
            Ok(other) => panic!("DESKTOP_BENCH_ENCODING is raw or zrle, not {other:?}"),
        };
    println!(
        "first frames in {} (DESKTOP_BENCH_ENCODING=raw|zrle)",
        if first_frame_encodings[0] == ZRLE {
            "ZRLE"
        } else {
            "raw encoding"
        }
    );
    let xvnc = Xvnc::start().await;
    println!(
        "Xvnc :{} on 127.0.0.1:{} (VncAuth, one password), painted {COLOUR}",
        xvnc.display, xvnc.port
    );

    let server = start_server().await;
    let started = Instant::now();
    let hostnames = server.launch_ready(PARTICIPANTS).await;
    assert_eq!(hostnames.len(), PARTICIPANTS, "VMs launched");
    println!(
        "{} VMs launched and running in {:.1} s",
        hostnames.len(),
        started.elapsed().as_secs_f64()
    );

    // The VMs' agents: their clients built first (each loads the TLS roots), then their
    // first polls made, as they would be long before a workshop starts.
    let gate = if std::env::var_os("DESKTOP_BENCH_NO_GATE").is_some() {
        println!("no gate: the agents connect to Xvnc directly (DESKTOP_BENCH_NO_GATE)");
        None
    } else {
        Some(Gate::start(xvnc.port).await)
    };
    let vnc_port = Arc::new(AtomicU16::new(gate.as_ref().map_or(xvnc.port, |g| g.port)));
    let base_url: Url = server.base.parse().unwrap();
    let tunnels = Arc::new(AtomicU64::new(0));
    let tunnel_failures = Arc::new(AtomicU64::new(0));
    let mut agents = tokio::task::JoinSet::new();
    for h in &hostnames {
        let config = AgentConfig::new(
            base_url.clone(),
            h.parse().expect("a hostname"),
            Some(server.token(h)),
        );
        let client = AllocatorClient::new(&config);
        agents.spawn(agent(
            config,
            client,
            vnc_port.clone(),
            tunnels.clone(),
            tunnel_failures.clone(),
        ));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let overflows_before = listen_overflows();
    let burst = Burst::run(&server.base, first_frame_encodings).await;
    let overflows_after = listen_overflows();
    let Burst {
        times,
        failures,
        cookie,
        wall,
        release,
        mut participants,
    } = burst;
    let (sessions, to_browsers, to_vms, _) = server.state.desktop_relay().counts();
    let live = server.state.desktop_relay().live();
    // The relay marks each participant's desktop ready at its first frame.
    let mut ready = 0;
    let ready_deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < ready_deadline {
        let vms = server.allocator.vms(&Default::default()).await.unwrap();
        ready = vms
            .iter()
            .filter(|v| {
                v.assignment
                    .as_ref()
                    .is_some_and(|a| a.desktop.stage == DesktopStage::Ready)
            })
            .count();
        if ready >= times.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gate_waits = gate.as_ref().map(|g| g.waits.lock().unwrap().clone());
    // The throughput session's tunnel goes to Xvnc directly, as the direct client does.
    vnc_port.store(xvnc.port, Ordering::Relaxed);
    let _ = release.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while participants.join_next().await.is_some() {}
    })
    .await;
    participants.abort_all();

    println!();
    println!(
        "Time to first frame, {PARTICIPANTS} participants at once (from submitting request_vm):"
    );
    println!(
        "  succeeded {} / {PARTICIPANTS}, failed {}; all done {:.2} s after the start",
        times.len(),
        failures.len(),
        wall.as_secs_f64()
    );
    for f in failures.iter().take(10) {
        println!("  failure: {f}");
    }
    let stages: [(&str, Stage); 5] = [
        ("first FramebufferUpdate header", |t| t.first_update),
        ("  request_vm answered", |t| t.claimed),
        ("  WebSocket open (tunnel in)", |t| t.opened),
        ("  ServerInit read (auth done)", |t| t.initialised),
        ("whole first frame", |t| t.whole_frame),
    ];
    for (name, stage) in stages {
        println!("  {}", summary(name, times.iter().map(stage)));
    }
    println!(
        "  relay: {sessions} sessions ({live} live before release), {:.1} MB to browsers, {:.1} kB to VMs; \
         {} tunnels opened, {} failed; {ready} desktops marked ready",
        to_browsers as f64 / 1e6,
        to_vms as f64 / 1e3,
        tunnels.load(Ordering::Relaxed),
        tunnel_failures.load(Ordering::Relaxed),
    );
    if let Some(waits) = gate_waits {
        println!(
            "  {}",
            summary("gate: wait for Xvnc's greeting", waits.into_iter())
        );
    }
    println!(
        "  TCP listen overflows/drops on this host during the burst: {} / {} (Xvnc listens with a backlog of 5)",
        overflows_after.0 - overflows_before.0,
        overflows_after.1 - overflows_before.1
    );

    throughput(
        &server.base,
        &cookie.expect("a participant got a VM"),
        xvnc.port,
    )
    .await;
    agents.abort_all();
    if !failures.is_empty() {
        let log = xvnc.log();
        let _ = std::fs::write(std::env::temp_dir().join("desktop_bench-Xvnc.log"), &log);
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        println!("\nXvnc's log, last lines:");
        for line in tail.iter().rev() {
            println!("  {line}");
        }
    }
    drop(gate);
    drop(xvnc);
    failures.is_empty()
}

fn main() {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let finished = runtime.block_on(async {
        tokio::select! {
            finished = tokio::time::timeout(OVERALL, run()) => finished.ok(),
            _ = tokio::signal::ctrl_c() => {
                eprintln!("interrupted");
                Some(false)
            }
        }
    });
    // The run's future (and with it Xvnc's guard) is dropped by now.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match finished {
        Some(true) => {}
        Some(false) => std::process::exit(1),
        None => {
            eprintln!(
                "desktop_bench did not finish within {} s",
                OVERALL.as_secs()
            );
            std::process::exit(1);
        }
    }
}
