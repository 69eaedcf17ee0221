//! Shared test support: the moto_server endpoint, unique deployments, an API call counter and
//! a fault-injecting proxy in front of the emulator.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use lablink_aws::sdk_crates::{aws_config, aws_sdk_ec2};
pub use lablink_aws::CallCounter;
use lablink_aws::{Ec2Provisioner, Ec2ProvisionerBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The emulator's URL, from `scripts/with-moto.sh`. Panics (never skips) without it.
pub fn endpoint() -> String {
    match std::env::var("LABLINK_AWS_TEST_ENDPOINT") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "LABLINK_AWS_TEST_ENDPOINT is not set: these tests need the AWS emulator \
             moto_server (pip install \"moto[server]\"); run them under scripts/with-moto.sh, \
             e.g. `scripts/with-moto.sh cargo test -p lablink-aws`"
        ),
    }
}

/// A deployment name no other test uses.
pub fn deployment(name: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{name}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Dummy credentials and region for the emulator at `url`, retries off.
pub async fn sdk_config(url: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(url)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "lablink-test",
            "lablink-test",
            None,
            None,
            "test",
        ))
        .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
        .http_client(lablink_aws::https_client())
        .load()
        .await
}

/// An AMI the emulator knows (looked up once per test binary: the list is long).
pub async fn ami(client: &aws_sdk_ec2::Client) -> String {
    static AMI: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    AMI.get_or_init(|| async {
        let images = client
            .describe_images()
            .owners("amazon")
            .send()
            .await
            .expect("DescribeImages on moto_server");
        images
            .images()
            .iter()
            .find(|i| i.root_device_name().is_some())
            .and_then(|i| i.image_id())
            .expect("moto_server has AMIs")
            .to_owned()
    })
    .await
    .clone()
}

/// An EC2 client for the emulator at `url`, counting its calls.
pub async fn ec2_client(url: &str, counter: &CallCounter) -> aws_sdk_ec2::Client {
    let config = sdk_config(url).await;
    let ec2 = aws_sdk_ec2::config::Builder::from(&config)
        .interceptor(counter.clone())
        .build();
    aws_sdk_ec2::Client::from_conf(ec2)
}

/// A provisioner builder for a fresh deployment on the emulator, with a counted client.
pub async fn builder(name: &str) -> (Ec2ProvisionerBuilder, CallCounter) {
    builder_at(&endpoint(), name).await
}

/// Like [`builder`], against `url` (the emulator or a [`FaultProxy`]).
pub async fn builder_at(url: &str, name: &str) -> (Ec2ProvisionerBuilder, CallCounter) {
    let counter = CallCounter::default();
    let client = ec2_client(url, &counter).await;
    let ami = ami(&ec2_client(&endpoint(), &CallCounter::default()).await).await;
    let builder = Ec2ProvisionerBuilder::new(deployment(name), ami)
        .with_ec2_client(client)
        .with_allocator_url("http://allocator.test:8080")
        .with_terminate_timeout(
            std::time::Duration::from_secs(30),
            std::time::Duration::from_millis(200),
        );
    (builder, counter)
}

/// A provisioner for a fresh deployment on the emulator.
pub async fn provisioner(name: &str) -> Ec2Provisioner {
    builder(name).await.0.build().await.unwrap()
}

/// Which requests a [`FaultProxy`] answers itself, with which AWS error.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Every one of these must occur in the request line or body (`Action=RunInstances`,
    /// `partNumber=2`...).
    pub when: Vec<String>,
    /// HTTP status of the answer.
    pub status: u16,
    /// AWS error code.
    pub code: String,
    /// How many more requests to answer (`None`: all).
    pub times: Option<usize>,
}

/// A proxy in front of the emulator that answers matching requests with an AWS error
/// response (the EC2 XML error format, with a request id header) and forwards the rest.
#[derive(Debug, Clone)]
pub struct FaultProxy {
    /// The proxy's URL.
    pub url: String,
    faults: Arc<Mutex<Vec<Fault>>>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let faults: Arc<Mutex<Vec<Fault>>> = Arc::default();
        let shared = faults.clone();
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let faults = shared.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let _ = serve(conn, &upstream, &faults).await;
                });
            }
        });
        Self { url, faults }
    }

    /// Answers requests containing every string of `when` with `status` and `code`.
    pub fn fail(&self, when: &[&str], status: u16, code: &str) {
        self.push(when, status, code, None);
    }

    /// Like [`Self::fail`], for the next `times` matching requests only.
    pub fn fail_times(&self, when: &[&str], status: u16, code: &str, times: usize) {
        self.push(when, status, code, Some(times));
    }

    fn push(&self, when: &[&str], status: u16, code: &str, times: Option<usize>) {
        self.faults.lock().unwrap().push(Fault {
            when: when.iter().map(|s| s.to_string()).collect(),
            status,
            code: code.into(),
            times,
        });
    }

    /// Forwards everything again.
    pub fn clear(&self) {
        self.faults.lock().unwrap().clear();
    }
}

async fn serve(
    mut conn: TcpStream,
    upstream: &str,
    faults: &Mutex<Vec<Fault>>,
) -> std::io::Result<()> {
    loop {
        // One request: the head, then Content-Length bytes of body.
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = vec![0u8; head_end + length - buf.len()];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
        let request_line = head.lines().next().unwrap_or_default();
        let matches = |w: &String| request_line.contains(w.as_str()) || body.contains(w.as_str());
        let fault = {
            let mut faults = faults.lock().unwrap();
            let hit = faults
                .iter_mut()
                .find(|f| f.times != Some(0) && f.when.iter().all(matches));
            hit.map(|f| {
                if let Some(n) = &mut f.times {
                    *n -= 1;
                }
                f.clone()
            })
        };
        let response = match fault {
            Some(fault) => {
                let xml = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
                     <Code>{}</Code><Message>injected by the test proxy</Message></Error>\
                     </Errors><RequestID>proxy-req-1</RequestID></Response>",
                    fault.code
                );
                format!(
                    "HTTP/1.1 {} Injected\r\nContent-Type: text/xml\r\nx-amzn-requestid: \
                     proxy-req-1\r\nContent-Length: {}\r\n\r\n{xml}",
                    fault.status,
                    xml.len()
                )
                .into_bytes()
            }
            None => forward(upstream, &head, &buf[head_end..head_end + length]).await?,
        };
        conn.write_all(&response).await?;
    }
}

/// Sends one request upstream on a fresh connection (`Connection: close`) and returns the
/// whole response.
async fn forward(upstream: &str, head: &str, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = TcpStream::connect(upstream).await?;
    let mut request = String::new();
    for line in head.trim_end().lines() {
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("Connection: close\r\n\r\n");
    out.write_all(request.as_bytes()).await?;
    out.write_all(body).await?;
    let mut response = Vec::new();
    out.read_to_end(&mut response).await?;
    Ok(response)
}
