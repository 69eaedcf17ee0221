//! A participant's status stream (`GET /api/participant/status`, server-sent events), read
//! event by event.

use std::time::Duration;

use reqwest::{Client, Response, StatusCode};
use serde_json::Value;

/// How long one event is waited for.
const PATIENCE: Duration = Duration::from_secs(60);

/// The status events of one participant's browser.
#[derive(Debug)]
pub struct StatusEvents {
    response: Response,
    buffer: String,
    /// Everything the stream said so far (to scan for secrets).
    pub raw: String,
}

impl StatusEvents {
    /// Opens the stream of the browser `client` (its participant cookie) on `base`.
    pub async fn open(client: &Client, base: &str) -> Self {
        let response = client
            .get(format!("{base}/api/participant/status"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "the status stream");
        Self {
            response,
            buffer: String::new(),
            raw: String::new(),
        }
    }

    /// The next event's name and data (keep-alive comments skipped).
    pub async fn next(&mut self) -> (String, String) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !data.is_empty() {
                    return (name, data);
                }
                continue;
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .expect("no event in time")
                .unwrap()
                .expect("the status stream ended");
            let text = String::from_utf8_lossy(&chunk);
            self.raw.push_str(&text);
            self.buffer.push_str(&text);
        }
    }

    /// The next `status` event's data (a `released` event fails the test).
    pub async fn status(&mut self) -> Value {
        let (name, data) = self.next().await;
        assert_eq!(name, "status", "the stream said {name}: {data}");
        serde_json::from_str(&data).unwrap()
    }

    /// Status events up to (and with) the first in `stage`.
    pub async fn until(&mut self, stage: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let status = self.status().await;
            let done = status["stage"] == stage;
            seen.push(status);
            if done {
                return seen;
            }
        }
    }
}
