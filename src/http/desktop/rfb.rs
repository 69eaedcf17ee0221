//! Just enough of the RFB protocol (RFC 6143) to watch a session pass through the relay:
//! where the handshake ends, which client messages may pass a view-only session, and when
//! the first framebuffer update arrives.
//!
//! The server drives the handshake, so one [`RfbWatch`] sees both directions: the server's
//! bytes ([`RfbWatch::server_bytes`]) tell which protocol version and security type were
//! agreed, and so how many handshake bytes the client sends before its first message. The
//! client cannot answer what it has not received, and the relay passes server bytes through
//! the watch before forwarding them, so the client's direction never runs ahead.

/// Client-to-server message types (RFC 6143, 7.5, and the extensions noVNC speaks).
mod client {
    pub const SET_PIXEL_FORMAT: u8 = 0;
    pub const SET_ENCODINGS: u8 = 2;
    pub const FRAMEBUFFER_UPDATE_REQUEST: u8 = 3;
    pub const KEY_EVENT: u8 = 4;
    pub const POINTER_EVENT: u8 = 5;
    pub const CLIENT_CUT_TEXT: u8 = 6;
    pub const ENABLE_CONTINUOUS_UPDATES: u8 = 150;
    pub const CLIENT_FENCE: u8 = 248;
    pub const XVP: u8 = 250;
    pub const SET_DESKTOP_SIZE: u8 = 251;
    pub const QEMU: u8 = 255;
}

/// Server-to-client message types (RFC 6143, 7.6, and extensions).
mod server {
    pub const FRAMEBUFFER_UPDATE: u8 = 0;
    pub const SET_COLOUR_MAP_ENTRIES: u8 = 1;
    pub const BELL: u8 = 2;
    pub const SERVER_CUT_TEXT: u8 = 3;
    pub const END_OF_CONTINUOUS_UPDATES: u8 = 150;
    pub const SERVER_FENCE: u8 = 248;
}

/// Security types the watch can follow (any other ends a view-only session).
const SECURITY_NONE: u8 = 1;
const SECURITY_VNC_AUTH: u8 = 2;

/// The stream cannot be followed (an unknown message or security type): a view-only
/// session must end, since what follows cannot be told apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfollowable(pub String);

impl std::fmt::Display for Unfollowable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the VNC stream cannot be followed: {}", self.0)
    }
}

/// What the client's direction of a session does with its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Everything passes.
    Control,
    /// Only what asks for pictures passes: key and pointer events, clipboard text and
    /// desktop resizes are dropped.
    ViewOnly,
}

/// How far the server's side of the handshake got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerStage {
    /// 12 bytes `RFB 003.008\n`.
    Version,
    /// 3.3: the u32 security type the server chose.
    SecurityType33,
    /// 3.7 and later: a count, then that many types.
    SecurityTypes,
    /// Waiting for the client's choice (3.7+).
    AwaitChoice,
    /// 16 bytes of VNC authentication challenge.
    Challenge,
    /// The u32 security result.
    SecurityResult,
    /// ServerInit: 24 bytes, then the name.
    ServerInit,
    /// Normal messages, until the first framebuffer update.
    Messages,
    /// Seen the first frame (or gave up looking); nothing more to parse.
    Done,
}

/// How far the client's side of the handshake got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientStage {
    Version,
    /// Waiting to learn from the server what comes next.
    Waiting,
    /// 3.7+: one byte, the chosen security type.
    Choice,
    /// 16 bytes of VNC authentication response.
    AuthResponse,
    /// ClientInit: one byte (shared flag).
    ClientInit,
    Messages,
}

/// Follows one RFB session in both directions.
#[derive(Debug)]
pub struct RfbWatch {
    access: Access,
    /// Minor protocol version (3, 7 or 8) the server offered.
    minor: u8,
    server: ServerStage,
    server_buf: Vec<u8>,
    client: ClientStage,
    client_buf: Vec<u8>,
    /// The security type in use (known once chosen).
    security: Option<u8>,
    first_frame: bool,
    /// Client messages dropped (view-only).
    dropped: u64,
}

impl RfbWatch {
    /// A watch for a new session.
    pub fn new(access: Access) -> Self {
        Self {
            access,
            minor: 8,
            server: ServerStage::Version,
            server_buf: Vec::new(),
            client: ClientStage::Version,
            client_buf: Vec::new(),
            security: None,
            first_frame: false,
            dropped: 0,
        }
    }

    /// Whether the first framebuffer update has passed.
    #[cfg(test)]
    pub fn first_frame(&self) -> bool {
        self.first_frame
    }

    /// Client messages dropped so far (view-only).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Bytes from the server (all are passed on unchanged); `true` once the first
    /// framebuffer update began.
    pub fn server_bytes(&mut self, bytes: &[u8]) -> Result<bool, Unfollowable> {
        if self.server == ServerStage::Done {
            return Ok(self.first_frame);
        }
        self.server_buf.extend_from_slice(bytes);
        while self.server_step()? {}
        if self.server == ServerStage::Done {
            self.server_buf = Vec::new();
        }
        Ok(self.first_frame)
    }

    /// One step of the server's side; `false` when more bytes are needed.
    fn server_step(&mut self) -> Result<bool, Unfollowable> {
        let buf = &self.server_buf;
        let (consumed, next) = match self.server {
            ServerStage::Version => {
                if buf.len() < 12 {
                    return Ok(false);
                }
                self.minor = parse_version(&buf[..12])?;
                let next = if self.minor < 7 {
                    ServerStage::SecurityType33
                } else {
                    ServerStage::SecurityTypes
                };
                (12, next)
            }
            ServerStage::SecurityType33 => {
                let Some(t) = be_u32(buf, 0) else {
                    return Ok(false);
                };
                let t = u8::try_from(t).map_err(|_| Unfollowable(format!("security type {t}")))?;
                self.security = Some(t);
                self.client_knows_security(t)?;
                (4, self.after_security(t)?)
            }
            ServerStage::SecurityTypes => {
                let Some(&n) = buf.first() else {
                    return Ok(false);
                };
                if n == 0 {
                    // Failure with a reason: the server closes; nothing to watch.
                    self.server = ServerStage::Done;
                    return Ok(false);
                }
                if buf.len() < 1 + n as usize {
                    return Ok(false);
                }
                if self.client == ClientStage::Waiting {
                    self.client = ClientStage::Choice;
                }
                (1 + n as usize, ServerStage::AwaitChoice)
            }
            ServerStage::AwaitChoice => match self.security {
                None => return Ok(false),
                Some(t) => (0, self.after_security(t)?),
            },
            ServerStage::Challenge => {
                if buf.len() < 16 {
                    return Ok(false);
                }
                (16, ServerStage::SecurityResult)
            }
            ServerStage::SecurityResult => {
                let Some(result) = be_u32(buf, 0) else {
                    return Ok(false);
                };
                if result != 0 {
                    self.server = ServerStage::Done;
                    return Ok(false);
                }
                (4, ServerStage::ServerInit)
            }
            ServerStage::ServerInit => {
                let Some(name_len) = be_u32(buf, 20) else {
                    return Ok(false);
                };
                let total = 24 + name_len as usize;
                if buf.len() < total {
                    return Ok(false);
                }
                (total, ServerStage::Messages)
            }
            ServerStage::Messages => match server_message_len(buf) {
                ServerMessage::Incomplete => return Ok(false),
                ServerMessage::Frame | ServerMessage::Unknown => {
                    // A frame, or something only a desktop that is up sends.
                    self.first_frame = true;
                    (0, ServerStage::Done)
                }
                ServerMessage::Other(len) => (len, ServerStage::Messages),
            },
            ServerStage::Done => return Ok(false),
        };
        self.server_buf.drain(..consumed);
        self.server = next;
        Ok(next != ServerStage::Done)
    }

    /// What the server sends once security type `t` is agreed.
    fn after_security(&self, t: u8) -> Result<ServerStage, Unfollowable> {
        match t {
            SECURITY_VNC_AUTH => Ok(ServerStage::Challenge),
            // 3.8 sends a result for None too; 3.3 and 3.7 do not.
            SECURITY_NONE if self.minor >= 8 => Ok(ServerStage::SecurityResult),
            SECURITY_NONE => Ok(ServerStage::ServerInit),
            other => Err(Unfollowable(format!("security type {other}"))),
        }
    }

    /// 3.3: the server chose; the client's next bytes follow from it.
    fn client_knows_security(&mut self, t: u8) -> Result<(), Unfollowable> {
        self.client = match t {
            SECURITY_VNC_AUTH => ClientStage::AuthResponse,
            SECURITY_NONE => ClientStage::ClientInit,
            // 0: connection failed; the server sends a reason and closes.
            0 => ClientStage::Waiting,
            other => return Err(Unfollowable(format!("security type {other}"))),
        };
        Ok(())
    }

    /// Bytes from the client: what may reach the server (all of them with control; view-only
    /// drops input events and ends at anything it cannot follow).
    pub fn client_bytes(&mut self, bytes: &[u8]) -> Result<Vec<u8>, Unfollowable> {
        if self.access == Access::Control {
            if self.client != ClientStage::Messages {
                // The server's side needs the client's security choice; control never refuses.
                let _ = self.follow_client(bytes);
                if self.client == ClientStage::Messages {
                    self.client_buf = Vec::new();
                }
            }
            return Ok(bytes.to_vec());
        }
        self.follow_client(bytes)
    }

    /// Parses the client's bytes: what passes.
    fn follow_client(&mut self, bytes: &[u8]) -> Result<Vec<u8>, Unfollowable> {
        self.client_buf.extend_from_slice(bytes);
        let mut out = Vec::with_capacity(bytes.len());
        loop {
            let buf = &self.client_buf;
            let (len, pass, next) = match self.client {
                ClientStage::Version => (12, true, ClientStage::Waiting),
                ClientStage::Waiting => {
                    if buf.is_empty() {
                        break;
                    }
                    return Err(Unfollowable(
                        "the client sent before the server asked".into(),
                    ));
                }
                ClientStage::Choice => {
                    let Some(&t) = buf.first() else { break };
                    if t != SECURITY_NONE && t != SECURITY_VNC_AUTH {
                        return Err(Unfollowable(format!("security type {t}")));
                    }
                    self.security = Some(t);
                    let next = if t == SECURITY_VNC_AUTH {
                        ClientStage::AuthResponse
                    } else {
                        ClientStage::ClientInit
                    };
                    (1, true, next)
                }
                ClientStage::AuthResponse => (16, true, ClientStage::ClientInit),
                ClientStage::ClientInit => (1, true, ClientStage::Messages),
                ClientStage::Messages => {
                    let Some(&kind) = buf.first() else { break };
                    let Some(len) = client_message_len(buf)? else {
                        break;
                    };
                    let pass = self.access == Access::Control || view_only_passes(kind);
                    (len, pass, ClientStage::Messages)
                }
            };
            if buf.len() < len {
                break;
            }
            if pass {
                out.extend_from_slice(&buf[..len]);
            } else {
                self.dropped += 1;
            }
            self.client_buf.drain(..len);
            self.client = next;
        }
        Ok(out)
    }
}

/// Whether a client message of type `kind` may reach the server of a view-only session.
fn view_only_passes(kind: u8) -> bool {
    matches!(
        kind,
        client::SET_PIXEL_FORMAT
            | client::SET_ENCODINGS
            | client::FRAMEBUFFER_UPDATE_REQUEST
            | client::ENABLE_CONTINUOUS_UPDATES
            | client::CLIENT_FENCE
    )
}

/// The length of the client message at the start of `buf`, `None` while incomplete.
fn client_message_len(buf: &[u8]) -> Result<Option<usize>, Unfollowable> {
    let need = |n: usize| Ok((buf.len() >= n).then_some(n));
    match buf[0] {
        client::SET_PIXEL_FORMAT => need(20),
        client::SET_ENCODINGS => match be_u16(buf, 2) {
            Some(n) => need(4 + 4 * n as usize),
            None => Ok(None),
        },
        client::FRAMEBUFFER_UPDATE_REQUEST => need(10),
        client::KEY_EVENT => need(8),
        client::POINTER_EVENT => need(6),
        client::CLIENT_CUT_TEXT => match be_u32(buf, 4) {
            // Extended clipboard: a negative length is the length of its payload.
            Some(n) => need(8 + (n as i32).unsigned_abs() as usize),
            None => Ok(None),
        },
        client::ENABLE_CONTINUOUS_UPDATES => need(10),
        client::CLIENT_FENCE => match buf.get(8) {
            Some(&n) => need(9 + n as usize),
            None => Ok(None),
        },
        client::XVP => need(4),
        client::SET_DESKTOP_SIZE => match buf.get(6) {
            Some(&n) => need(8 + 16 * n as usize),
            None => Ok(None),
        },
        // QEMU extended key event (subtype 0): 12 bytes.
        client::QEMU if buf.get(1).is_some_and(|&s| s == 0) => need(12),
        other => Err(Unfollowable(format!("client message type {other}"))),
    }
}

enum ServerMessage {
    Incomplete,
    Frame,
    Unknown,
    Other(usize),
}

/// The server message at the start of `buf` (before the first frame).
fn server_message_len(buf: &[u8]) -> ServerMessage {
    let Some(&kind) = buf.first() else {
        return ServerMessage::Incomplete;
    };
    let sized = |n: Option<usize>| match n {
        Some(n) if buf.len() >= n => ServerMessage::Other(n),
        _ => ServerMessage::Incomplete,
    };
    match kind {
        server::FRAMEBUFFER_UPDATE => ServerMessage::Frame,
        server::SET_COLOUR_MAP_ENTRIES => sized(be_u16(buf, 4).map(|n| 6 + 6 * n as usize)),
        server::BELL => ServerMessage::Other(1),
        server::SERVER_CUT_TEXT => {
            sized(be_u32(buf, 4).map(|n| 8 + (n as i32).unsigned_abs() as usize))
        }
        server::END_OF_CONTINUOUS_UPDATES => ServerMessage::Other(1),
        server::SERVER_FENCE => sized(buf.get(8).map(|&n| 9 + n as usize)),
        _ => ServerMessage::Unknown,
    }
}

/// The minor version of a `RFB 003.00x\n` greeting.
fn parse_version(greeting: &[u8]) -> Result<u8, Unfollowable> {
    let text = std::str::from_utf8(greeting).unwrap_or("");
    let minor = text
        .strip_prefix("RFB 003.")
        .and_then(|rest| rest.strip_suffix('\n'))
        .and_then(|m| m.parse::<u16>().ok())
        .ok_or_else(|| Unfollowable(format!("protocol version {greeting:?}")))?;
    Ok(match minor {
        0..=6 => 3,
        7 => 7,
        // 3.889 (Apple) and anything newer speak 3.8's handshake.
        _ => 8,
    })
}

fn be_u16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn be_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V38: &[u8] = b"RFB 003.008\n";

    /// A 3.8 VNC-auth handshake through `watch`, up to the first client message.
    fn handshake(watch: &mut RfbWatch) {
        assert!(!watch.server_bytes(V38).unwrap());
        assert_eq!(watch.client_bytes(V38).unwrap(), V38);
        watch.server_bytes(&[1, SECURITY_VNC_AUTH]).unwrap();
        assert_eq!(watch.client_bytes(&[2]).unwrap(), [2]);
        watch.server_bytes(&[7; 16]).unwrap();
        assert_eq!(watch.client_bytes(&[9; 16]).unwrap(), [9; 16]);
        watch.server_bytes(&[0, 0, 0, 0]).unwrap();
        assert_eq!(watch.client_bytes(&[1]).unwrap(), [1]);
        let mut init = vec![0, 4, 0, 3];
        init.extend_from_slice(&[0; 16]);
        init.extend_from_slice(&[0, 0, 0, 4]);
        init.extend_from_slice(b"name");
        assert!(!watch.server_bytes(&init).unwrap());
    }

    fn set_pixel_format() -> Vec<u8> {
        let mut m = vec![client::SET_PIXEL_FORMAT, 0, 0, 0];
        m.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
        m
    }

    fn set_encodings() -> Vec<u8> {
        vec![
            client::SET_ENCODINGS,
            0,
            0,
            2,
            0,
            0,
            0,
            0,
            0xff,
            0xff,
            0xfe,
            0xc8,
        ]
    }

    fn update_request() -> Vec<u8> {
        vec![
            client::FRAMEBUFFER_UPDATE_REQUEST,
            0,
            0,
            0,
            0,
            0,
            0,
            4,
            0,
            3,
        ]
    }

    fn key() -> Vec<u8> {
        vec![client::KEY_EVENT, 1, 0, 0, 0, 0, 0, 0x61]
    }

    fn pointer() -> Vec<u8> {
        vec![client::POINTER_EVENT, 1, 0, 10, 0, 20]
    }

    fn cut_text() -> Vec<u8> {
        let mut m = vec![client::CLIENT_CUT_TEXT, 0, 0, 0, 0, 0, 0, 5];
        m.extend_from_slice(b"hello");
        m
    }

    #[test]
    fn view_only_drops_keys_pointer_and_clipboard_but_passes_picture_requests() {
        let mut watch = RfbWatch::new(Access::ViewOnly);
        handshake(&mut watch);
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (message, passes) in [
            (set_pixel_format(), true),
            (key(), false),
            (set_encodings(), true),
            (pointer(), false),
            (update_request(), true),
            (cut_text(), false),
            (update_request(), true),
        ] {
            stream.extend_from_slice(&message);
            if passes {
                expected.extend_from_slice(&message);
            }
        }
        // Split at every byte: messages cut across WebSocket frames.
        let mut passed = Vec::new();
        for byte in &stream {
            passed.extend(watch.client_bytes(std::slice::from_ref(byte)).unwrap());
        }
        assert_eq!(passed, expected);
        assert_eq!(watch.dropped(), 3);
    }

    #[test]
    fn control_passes_everything() {
        let mut watch = RfbWatch::new(Access::Control);
        handshake(&mut watch);
        let mut stream = key();
        stream.extend(pointer());
        stream.extend(cut_text());
        assert_eq!(watch.client_bytes(&stream).unwrap(), stream);
        assert_eq!(watch.dropped(), 0);
    }

    #[test]
    fn an_unknown_client_message_ends_a_view_only_session() {
        let mut watch = RfbWatch::new(Access::ViewOnly);
        handshake(&mut watch);
        assert!(watch.client_bytes(&[77, 0, 0]).is_err());
    }

    #[test]
    fn the_first_frame_is_seen_after_server_init_and_other_messages() {
        let mut watch = RfbWatch::new(Access::Control);
        handshake(&mut watch);
        // A bell and a fence first, cut across calls.
        assert!(!watch
            .server_bytes(&[server::BELL, server::SERVER_FENCE, 0])
            .unwrap());
        assert!(!watch.server_bytes(&[0, 0, 0, 0, 0, 0, 1]).unwrap());
        assert!(!watch.server_bytes(&[42]).unwrap());
        assert!(watch
            .server_bytes(&[server::FRAMEBUFFER_UPDATE, 0, 0, 1])
            .unwrap());
        assert!(watch.first_frame());
    }

    #[test]
    fn a_3_3_server_with_no_authentication_is_followed() {
        let mut watch = RfbWatch::new(Access::ViewOnly);
        let v33 = b"RFB 003.003\n";
        watch.server_bytes(v33).unwrap();
        assert_eq!(watch.client_bytes(v33).unwrap(), v33);
        watch.server_bytes(&[0, 0, 0, SECURITY_NONE]).unwrap();
        assert_eq!(watch.client_bytes(&[1]).unwrap(), [1]);
        let mut init = vec![0; 20];
        init.extend_from_slice(&[0, 0, 0, 0]);
        watch.server_bytes(&init).unwrap();
        let mut stream = pointer();
        stream.extend(update_request());
        assert_eq!(watch.client_bytes(&stream).unwrap(), update_request());
        assert!(watch.server_bytes(&[0, 0, 0, 0]).unwrap());
    }

    #[test]
    fn an_unsupported_security_type_cannot_be_followed() {
        let mut watch = RfbWatch::new(Access::ViewOnly);
        watch.server_bytes(V38).unwrap();
        watch.client_bytes(V38).unwrap();
        watch.server_bytes(&[1, 19]).unwrap();
        assert!(watch.client_bytes(&[19]).is_err(), "VeNCrypt is refused");
        assert!(RfbWatch::new(Access::ViewOnly)
            .server_bytes(b"HTTP/1.1 200")
            .is_err());
    }
}
