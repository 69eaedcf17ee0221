//! The admin dashboard at workshop scale: with 4,000 VMs and 20 live viewers, a change to
//! one VM sends every viewer that one row (bytes counted per event), the page is split into
//! pages and filtered, confirmations name the VM and who holds it, and a replica refuses
//! live views beyond its cap instead of slowing down.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use lablink::{GpuHealth, LabLink, MemoryVmStore, Telemetry, VmRecord, VmStore};
use lablink_testkit::TestServer;
use reqwest::StatusCode;
use serde_json::Value;

const VMS: usize = 4_000;
const VIEWERS: usize = 20;

/// A server whose store already holds `n` VMs (`lablink-vm-1`…), refreshing the live view
/// every 50 ms.
async fn server_with(n: usize) -> TestServer {
    let store = MemoryVmStore::new();
    let now = Utc::now();
    let records: Vec<VmRecord> = (1..=n)
        .map(|i| VmRecord::new(format!("lablink-vm-{i}").parse().unwrap(), None, now))
        .collect();
    store.insert(&records).await.unwrap();
    TestServer::start_with(LabLink::builder().with_store(Arc::new(store)), |o| {
        o.admin_refresh = Duration::from_millis(50);
    })
    .await
}

/// One server-sent event: its name, data and size on the wire.
#[derive(Debug)]
struct Sse {
    event: String,
    data: String,
    bytes: usize,
}

/// A live admin view reading `/admin/events` event by event.
struct Viewer {
    stream: futures::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buffer: Vec<u8>,
}

impl Viewer {
    async fn open(s: &TestServer, since: Option<&str>) -> reqwest::Response {
        let path = match since {
            Some(v) => format!("/admin/events?since={v}"),
            None => "/admin/events".to_owned(),
        };
        s.admin(reqwest::Method::GET, &path).send().await.unwrap()
    }

    async fn connect(s: &TestServer) -> Self {
        let response = Self::open(s, None).await;
        assert_eq!(response.status(), StatusCode::OK);
        Self {
            stream: response
                .bytes_stream()
                .map(|r| r.map(|b| b.to_vec()))
                .boxed(),
            buffer: Vec::new(),
        }
    }

    /// The next event (keep-alive comments skipped).
    async fn next(&mut self) -> Sse {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8(raw).unwrap();
                let (mut event, mut data) = (String::new(), Vec::new());
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim_start().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    }
                }
                if event.is_empty() && data.is_empty() {
                    continue;
                }
                return Sse {
                    event,
                    data: data.join("\n"),
                    bytes: text.len(),
                };
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.stream.next())
                .await
                .expect("no event within 30 s")
                .expect("the event stream ended")
                .unwrap();
            self.buffer.extend_from_slice(&chunk);
        }
    }

    /// The next row sent and its size on the wire, skipping the other fragments (the usage
    /// panel's hours grow as time passes); a removed row in between fails.
    async fn next_row(&mut self) -> (String, usize) {
        loop {
            let event = self.next().await;
            if event.event == "vm" {
                let row: Value = serde_json::from_str(&event.data).unwrap();
                return (row["hostname"].as_str().unwrap().to_owned(), event.bytes);
            }
            assert_ne!(
                event.event, "vm-removed",
                "only the row was to change: {event:?}"
            );
        }
    }
}

async fn change(s: &TestServer, hostname: &str, health: GpuHealth) {
    s.allocator
        .report(
            &hostname.parse().unwrap(),
            Telemetry {
                gpu_health: Some(health),
                ..Telemetry::default()
            },
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_to_one_vm_sends_every_viewer_that_row_only() {
    let s = server_with(VMS).await;
    let mut viewers = Vec::new();
    let mut full_table = 0;
    for _ in 0..VIEWERS {
        let mut viewer = Viewer::connect(&s).await;
        // A viewer without a version is sent the whole table first, then the fragments.
        let mut rows = 0;
        let mut bytes = 0;
        while rows < VMS {
            let event = viewer.next().await;
            bytes += event.bytes;
            rows += usize::from(event.event == "vm");
        }
        full_table = bytes;
        viewers.push(viewer);
    }
    // Then the other fragments, the summary last (an empty one, such as the supervisor's
    // with none running, is not sent).
    for viewer in &mut viewers {
        while viewer.next().await.event != "summary" {}
    }

    change(&s, "lablink-vm-1234", GpuHealth::Unhealthy).await;
    let mut row_bytes = Vec::new();
    for viewer in &mut viewers {
        let (hostname, bytes) = viewer.next_row().await;
        assert_eq!(hostname, "lablink-vm-1234");
        row_bytes.push(bytes);
    }
    // A second change: the next row each viewer gets is that VM's, so nothing else was
    // sent between the two.
    change(&s, "lablink-vm-77", GpuHealth::Healthy).await;
    for viewer in &mut viewers {
        assert_eq!(viewer.next_row().await.0, "lablink-vm-77");
    }
    let row = row_bytes[0];
    assert!(row_bytes.iter().all(|b| *b == row), "{row_bytes:?}");
    assert!(
        row * VMS / 2 < full_table,
        "one row's event ({row} bytes) is not a row of the {full_table}-byte table"
    );
}

#[tokio::test]
async fn the_dashboard_is_paged_and_filtered_and_a_viewer_catches_up_from_its_page() {
    let s = server_with(450).await;
    let page = |q: &str| {
        let url = s.url(&format!("/admin{q}"));
        let client = s.client.clone();
        async move {
            let r = client
                .get(url)
                .basic_auth(
                    lablink_testkit::ADMIN_USER,
                    Some(lablink_testkit::ADMIN_PASSWORD),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.text().await.unwrap()
        }
    };
    let rows = |html: &str| html.matches("<tr data-hostname=").count();
    let first = page("").await;
    assert_eq!(rows(&first), 200);
    assert!(first.contains("450 VMs, page 1 of 3"), "{first}");
    let last = page("?page=3").await;
    assert_eq!(rows(&last), 50);
    assert!(last.contains(r#"data-last-page="true""#));
    // Filtering reads the row's text: lablink-vm-42 and lablink-vm-420…429.
    let filtered = page("?q=LABLINK-VM-42").await;
    assert_eq!(rows(&filtered), 11, "{filtered}");
    assert!(page("?q=nobody")
        .await
        .contains("No VM matches the filter."));

    // A viewer that says which version its page shows is sent only what changed since.
    let version = first
        .split(r#"data-version=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    change(&s, "lablink-vm-3", GpuHealth::Unhealthy).await;
    let response = Viewer::open(&s, Some(&version)).await;
    let mut viewer = Viewer {
        stream: response
            .bytes_stream()
            .map(|r| r.map(|b| b.to_vec()))
            .boxed(),
        buffer: Vec::new(),
    };
    let (hostname, _) = viewer.next_row().await;
    assert_eq!(hostname, "lablink-vm-3");
    // Another replica's (or a restarted one's) version means the whole table.
    let response = Viewer::open(&s, Some("1.1")).await;
    let mut viewer = Viewer {
        stream: response
            .bytes_stream()
            .map(|r| r.map(|b| b.to_vec()))
            .boxed(),
        buffer: Vec::new(),
    };
    assert_eq!(viewer.next_row().await.0, "lablink-vm-1");
}

#[tokio::test]
async fn confirmations_name_the_vm_and_who_holds_it() {
    let s = TestServer::start().await;
    let hostnames = s.launch_ready(2).await;
    let response = s.request_vm("ada@example.org", "4/0AbCdEf").await;
    assert_eq!(response.status(), StatusCode::OK);
    let held = s
        .allocator
        .vms(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.assignment.is_some())
        .unwrap()
        .hostname
        .to_string();
    let free = hostnames.iter().find(|h| **h != held).unwrap();
    let confirm = |action: &str, hostname: &str| {
        s.client
            .get(s.url(&format!(
                "/admin/confirm?action={action}&hostname={hostname}"
            )))
            .basic_auth(
                lablink_testkit::ADMIN_USER,
                Some(lablink_testkit::ADMIN_PASSWORD),
            )
            .send()
    };
    for action in ["reboot", "release", "destroy"] {
        let page = confirm(action, &held).await.unwrap().text().await.unwrap();
        assert!(page.contains(&format!("{held}?")), "{page}");
        assert!(page.contains("ada@example.org holds"), "{page}");
        assert!(
            page.contains(&format!(r#"action="/admin/{action}""#)),
            "{page}"
        );
    }
    let page = confirm("reboot", free).await.unwrap().text().await.unwrap();
    assert!(
        page.contains(&format!("No participant holds {free}")),
        "{page}"
    );
    let wrong = confirm("explode", free).await.unwrap();
    lablink_testkit::expect_error(wrong, 400).await;

    // The VM page shows the instance and its address.
    let vm = s
        .client
        .get(s.url(&format!("/admin/vms/{held}")))
        .basic_auth(
            lablink_testkit::ADMIN_USER,
            Some(lablink_testkit::ADMIN_PASSWORD),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let record = s.record(&held).await;
    let instance = record.instance_id.unwrap().to_string();
    assert!(
        vm.contains(&format!(r#"<td id="vm-instance-id">{instance}</td>"#)),
        "{vm}"
    );
    assert!(
        vm.contains(r#"<td id="vm-instance-type">fake</td>"#),
        "{vm}"
    );
}

#[tokio::test]
async fn a_replica_refuses_live_views_beyond_its_cap() {
    let s = TestServer::start().await;
    let mut open = Vec::new();
    for _ in 0..lablink::http::MAX_LIVE_VIEWS {
        let response = Viewer::open(&s, None).await;
        assert_eq!(response.status(), StatusCode::OK);
        open.push(response);
    }
    lablink_testkit::expect_error(Viewer::open(&s, None).await, 503).await;
    // A closed view frees its place.
    drop(open.pop());
    let mut reopened = None;
    for _ in 0..100 {
        let response = Viewer::open(&s, None).await;
        if response.status() == StatusCode::OK {
            reopened = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reopened.is_some(), "a closed view's place was not freed");
}
