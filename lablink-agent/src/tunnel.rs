//! The agent's side of the browser desktop: for each tunnel the allocator asks for (in the
//! assignment poll), dial the allocator's WebSocket with the VM's token, connect to the VNC
//! server on 127.0.0.1, and copy bytes both ways (as binary WebSocket messages) until either
//! side ends. The VM opens no inbound port: the allocator relays the participant's browser
//! to this connection.

use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use reqwest::Url;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::header::{HeaderValue, AUTHORIZATION, USER_AGENT};
use tokio_tungstenite::tungstenite::Message;

use crate::config::ApiToken;

/// How long dialing the allocator may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the VNC server may take to greet (an RFB server speaks first) before the tunnel
/// is given up: a server that accepts and then hangs must not hold the browser forever.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the VNC server per message.
const CHUNK: usize = 256 * 1024;

/// Why a tunnel did not open. Never holds the token.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The tunnel's URL is not one the agent dials.
    #[error("the tunnel URL {0:?} is not a ws(s)/http(s) URL or a path")]
    BadUrl(String),
    /// The VNC server on 127.0.0.1 did not accept the connection.
    #[error("the VNC server on 127.0.0.1:{port} is not reachable: {source}")]
    Vnc {
        /// Its port.
        port: u16,
        /// Why.
        source: std::io::Error,
    },
    /// The allocator's WebSocket could not be opened.
    #[error("cannot open the tunnel to the allocator: {0}")]
    Dial(String),
}

/// The WebSocket URL of a tunnel: `url` as given when it is absolute (`http(s)` made
/// `ws(s)`), else the path `url` on the allocator (under its base path).
pub fn resolve(allocator: &Url, url: &str) -> Result<Url, TunnelError> {
    let bad = || TunnelError::BadUrl(url.to_owned());
    let mut resolved = if url.starts_with('/') {
        let mut base = allocator.clone();
        let path = format!("{}{url}", base.path().trim_end_matches('/'));
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (path, None),
        };
        base.set_path(&path);
        base.set_query(query.as_deref());
        base
    } else {
        Url::parse(url).map_err(|_| bad())?
    };
    let scheme = match resolved.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        _ => return Err(bad()),
    };
    resolved.set_scheme(scheme).map_err(|()| bad())?;
    if resolved.host().is_none() {
        return Err(bad());
    }
    Ok(resolved)
}

/// Opens one tunnel: connects to the VNC server on 127.0.0.1:`vnc_port`, dials `url` with
/// `token`, and relays until either side ends. `Ok` once the session ended normally.
pub async fn relay(url: &Url, token: Option<&ApiToken>, vnc_port: u16) -> Result<(), TunnelError> {
    // The VNC server first: when it is down, the browser hears so (no tunnel) at once.
    let vnc_error = |source| TunnelError::Vnc {
        port: vnc_port,
        source,
    };
    let vnc = TcpStream::connect(("127.0.0.1", vnc_port))
        .await
        .map_err(vnc_error)?;
    tokio::time::timeout(GREETING_TIMEOUT, vnc.readable())
        .await
        .map_err(|_| {
            let waited = GREETING_TIMEOUT.as_secs();
            vnc_error(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("it accepted the connection but sent no greeting within {waited} s"),
            ))
        })?
        .map_err(vnc_error)?;
    let _ = vnc.set_nodelay(true);
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| TunnelError::Dial(e.to_string()))?;
    let headers = request.headers_mut();
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("lablink-agent/", env!("CARGO_PKG_VERSION"))),
    );
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| TunnelError::Dial("the token is not a valid header value".into()))?;
        headers.insert(AUTHORIZATION, value);
    }
    let (socket, _) = tokio::time::timeout(DIAL_TIMEOUT, tokio_tungstenite::connect_async(request))
        .await
        .map_err(|_| TunnelError::Dial("timed out".into()))?
        .map_err(|e| TunnelError::Dial(e.to_string()))?;
    let (mut to_allocator, mut from_allocator) = socket.split();
    let (mut from_vnc, mut to_vnc) = vnc.into_split();
    let up = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            // What the VNC server has at hand goes out together: the socket is flushed only
            // when the next read would wait.
            let read = match from_vnc.try_read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if to_allocator.flush().await.is_err() {
                        break;
                    }
                    from_vnc.read(&mut buf).await
                }
                read => read,
            };
            match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let message = Message::Binary(buf[..n].to_vec().into());
                    if to_allocator.feed(message).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_allocator.send(Message::Close(None)).await;
    };
    let down = async {
        while let Some(Ok(message)) = from_allocator.next().await {
            match message {
                Message::Binary(bytes) if to_vnc.write_all(&bytes).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = to_vnc.shutdown().await;
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_on_the_allocator_and_http_becomes_ws() {
        let base = Url::parse("https://lablink.example.org/lab/").unwrap();
        assert_eq!(
            resolve(&base, "/api/v1/vms/vm-1/tunnel/ab")
                .unwrap()
                .as_str(),
            "wss://lablink.example.org/lab/api/v1/vms/vm-1/tunnel/ab"
        );
        let plain = Url::parse("http://10.0.0.1:8080").unwrap();
        assert_eq!(
            resolve(&plain, "/api/v1/vms/vm-1/tunnel/ab")
                .unwrap()
                .as_str(),
            "ws://10.0.0.1:8080/api/v1/vms/vm-1/tunnel/ab"
        );
        assert_eq!(
            resolve(
                &plain,
                "https://replica-2.example.org/api/v1/vms/vm-1/tunnel/ab"
            )
            .unwrap()
            .as_str(),
            "wss://replica-2.example.org/api/v1/vms/vm-1/tunnel/ab"
        );
        assert!(resolve(&plain, "ftp://x/y").is_err());
        assert!(resolve(&plain, "api/v1").is_err());
    }

    #[tokio::test]
    async fn a_tunnel_carries_bytes_both_ways_and_sends_the_token() {
        use tokio::net::TcpListener;
        // The "VNC server": greets, then echoes what it gets, upper-cased.
        let vnc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let vnc_port = vnc.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = vnc.accept().await.unwrap();
            s.write_all(b"RFB 003.008\n").await.unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(&buf[..n].to_ascii_uppercase()).await.unwrap();
        });
        // The "allocator": checks the token, then speaks to the VNC server through the tunnel.
        let allocator = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = allocator.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = allocator.accept().await.unwrap();
            let mut auth = None;
            // The callback's signature is tungstenite's (a large error type).
            #[allow(clippy::result_large_err)]
            let mut ws = tokio_tungstenite::accept_hdr_async(
                s,
                |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                    auth = req.headers().get(AUTHORIZATION).cloned();
                    Ok(resp)
                },
            )
            .await
            .unwrap();
            let greeting = ws.next().await.unwrap().unwrap();
            ws.send(Message::Binary(b"hello".to_vec().into()))
                .await
                .unwrap();
            let echo = ws.next().await.unwrap().unwrap();
            (auth, greeting.into_data(), echo.into_data())
        });
        let url = resolve(
            &Url::parse(&format!("http://{addr}")).unwrap(),
            "/api/v1/vms/vm-1/tunnel/x",
        )
        .unwrap();
        let config = crate::AgentConfig::new(
            Url::parse("http://x").unwrap(),
            "vm-1".parse().unwrap(),
            Some("s3cret".into()),
        );
        let token = config.api_token.unwrap();
        relay(&url, Some(&token), vnc_port).await.unwrap();
        let (auth, greeting, echo) = server.await.unwrap();
        assert_eq!(auth.unwrap(), "Bearer s3cret");
        assert_eq!(&greeting[..], b"RFB 003.008\n");
        assert_eq!(&echo[..], b"HELLO");
    }

    #[tokio::test(start_paused = true)]
    async fn a_vnc_server_that_never_greets_is_given_up_before_dialing() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let held = tokio::spawn(async move { silent.accept().await.unwrap() });
        let url = Url::parse("ws://127.0.0.1:9/never").unwrap();
        let e = relay(&url, None, port).await.unwrap_err();
        assert!(
            matches!(&e, TunnelError::Vnc { source, .. } if source.kind() == std::io::ErrorKind::TimedOut),
            "{e}"
        );
        drop(held);
    }

    #[tokio::test]
    async fn a_vnc_server_that_is_down_is_said_before_dialing() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = Url::parse("ws://127.0.0.1:9/never").unwrap();
        let e = relay(&url, None, port).await.unwrap_err();
        assert!(matches!(e, TunnelError::Vnc { .. }), "{e}");
    }
}
