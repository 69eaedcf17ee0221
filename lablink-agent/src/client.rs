//! The allocator's `/api/v1` agent routes (docs/protocol.md, part B), and the retry pacing every
//! caller shares.

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use lablink_protocol::{
    AssignmentBody, DesktopReportBody, LogBody, TelemetryBody, TimingsBody, TunnelBody,
};
use lablink_protocol::{
    CollectionStatus, CollectionTask, ErrorBody, ReadyBody, TasksBody, WaitQuery,
};
use rand::Rng;
use reqwest::{Client, Method, RequestBuilder, StatusCode, Url};

use crate::config::AgentConfig;

/// Why a call to the allocator failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The allocator could not be reached, or answered 5xx / 429 / 401 / 404: worth retrying
    /// (it may be restarting, overloaded, or not know this VM yet).
    #[error("the allocator is unavailable: {0}")]
    Unavailable(String),
    /// The allocator refused the request itself (400, 413, ...): retrying it cannot help.
    #[error("the allocator refused the request ({status}): {message}")]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The allocator's `error` message.
        message: String,
    },
}

impl ClientError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Pending reports folded into one: the agent keeps at most one [`TelemetryBody`] waiting, so
/// a retry always carries the latest state.
pub trait Coalesce {
    /// Whether there is nothing to send.
    fn is_empty(&self) -> bool;
    /// Folds a newer report into this one: newer values win, log lines are appended.
    fn merge(&mut self, newer: TelemetryBody);
}

impl Coalesce for TelemetryBody {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn merge(&mut self, newer: TelemetryBody) {
        let TelemetryBody {
            gpu_health,
            in_use,
            status,
            boot_id,
            timings,
            logs,
            desktop,
        } = newer;
        self.desktop = desktop.or(self.desktop.take());
        self.gpu_health = gpu_health.or(self.gpu_health.take());
        self.in_use = in_use.or(self.in_use);
        self.status = status.or(self.status.take());
        self.boot_id = boot_id.or(self.boot_id.take());
        self.timings = timings.or(self.timings.take());
        for batch in logs {
            match self.logs.iter_mut().find(|b| b.stream == batch.stream) {
                Some(b) => b.lines.extend(batch.lines),
                None => self.logs.push(batch),
            }
        }
    }
}

/// A client of one allocator, for one VM.
#[derive(Debug, Clone)]
pub struct AllocatorClient {
    http: Client,
    base: Url,
    vm: String,
    token: Option<crate::config::ApiToken>,
    /// The allocator's 401 answers since its last success (shared by the clones).
    refusals: Arc<tokio::sync::watch::Sender<Refusals>>,
}

/// The 401 answers (token refused) since the last successful answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Refusals {
    /// The first 401 since the last success; `None` after a success (or before any answer).
    first: Option<Instant>,
    /// The latest 401.
    latest: Option<Instant>,
}

impl Refusals {
    /// Whether every answer has been a refusal for at least `duration`.
    fn lasted(&self, duration: Duration) -> bool {
        match (self.first, self.latest) {
            (Some(first), Some(latest)) => latest.saturating_duration_since(first) >= duration,
            _ => false,
        }
    }
}

impl AllocatorClient {
    /// A client for the VM and allocator of `config`.
    pub fn new(config: &AgentConfig) -> Self {
        let http = Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(50))
            .user_agent(concat!("lablink-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a reqwest client without custom TLS roots always builds");
        Self {
            http,
            base: config.allocator_url.clone(),
            vm: config.vm_name.to_string(),
            token: config.api_token.clone(),
            refusals: Arc::new(tokio::sync::watch::Sender::new(Refusals::default())),
        }
    }

    /// Completes once the allocator has refused the token (401) to the calls of this client
    /// and its clones for at least `duration`: a 401 answer came `duration` or more after the
    /// first 401 since the last successful (2xx) answer. With [`Duration::ZERO`], the first
    /// 401 does. Other failures (unreachable, 5xx, ...) neither count nor reset. The calls
    /// themselves still count 401 as retryable ([`ClientError::Unavailable`]); what a refused
    /// token means is the caller's business (a registered machine stops: it was
    /// unregistered).
    pub async fn token_refused(&self, duration: Duration) {
        let mut refusals = self.refusals.subscribe();
        // The sender lives as long as `self`, so this only ends once the refusals lasted.
        let _ = refusals.wait_for(|r| r.lasted(duration)).await;
    }

    /// Notes an answer's status for [`token_refused`](Self::token_refused).
    fn note_answer(&self, status: StatusCode) {
        if status.is_success() {
            self.refusals.send_if_modified(|r| {
                let refused = r.first.is_some();
                *r = Refusals::default();
                refused
            });
        } else if status == StatusCode::UNAUTHORIZED {
            let now = Instant::now();
            self.refusals.send_modify(|r| {
                r.first.get_or_insert(now);
                r.latest = Some(now);
            });
        }
    }

    fn request(&self, method: Method, route: &str, timeout: Duration) -> RequestBuilder {
        let mut url = self.base.clone();
        let path = format!(
            "{}/api/v1/vms/{}/{route}",
            url.path().trim_end_matches('/'),
            self.vm
        );
        url.set_path(&path);
        let request = self.http.request(method, url).timeout(timeout);
        match &self.token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        }
    }

    async fn send(&self, request: RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let response = request
            .send()
            .await
            .map_err(|e| ClientError::Unavailable(e.without_url().to_string()))?;
        let status = response.status();
        self.note_answer(status);
        if status.is_success() {
            return Ok(response);
        }
        let message = response
            .json::<ErrorBody>()
            .await
            .map_or_else(|_| status.to_string(), |body| body.error);
        if status.is_server_error()
            || matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::UNAUTHORIZED | StatusCode::NOT_FOUND
            )
        {
            Err(ClientError::Unavailable(format!("{status}: {message}")))
        } else {
            Err(ClientError::Refused { status, message })
        }
    }

    /// `POST ready`: the agent is up with `status` (`running` makes the VM assignable).
    pub async fn ready(&self, status: &str, boot_id: &str) -> Result<(), ClientError> {
        let body = ReadyBody {
            status: Some(status.to_owned()),
            boot_id: Some(boot_id.to_owned()),
        };
        self.send(
            self.request(Method::POST, "ready", Duration::from_secs(30))
                .json(&body),
        )
        .await
        .map(drop)
    }

    /// `POST telemetry` with one batched report.
    pub async fn report(&self, report: &TelemetryBody) -> Result<(), ClientError> {
        self.send(
            self.request(Method::POST, "telemetry", Duration::from_secs(30))
                .json(report),
        )
        .await
        .map(drop)
    }

    /// `GET assignment?timeout=`: the assignment, or `None` when `hold` passed first.
    ///
    /// With `seen` (the [`version`](AssignmentBody::version) of the assignment the agent
    /// has), `&seen=` too: the allocator holds the request while the assignment is still
    /// that version, then answers it (changed, or the same once the hold ended), or `None`
    /// when there is no assignment (released).
    pub async fn wait_assignment(
        &self,
        hold: Duration,
        seen: Option<&str>,
    ) -> Result<Option<AssignmentBody>, ClientError> {
        let request = self
            .request(Method::GET, "assignment", hold + Duration::from_secs(15))
            .query(&WaitQuery {
                timeout: Some(hold.as_secs_f64()),
                seen: seen.map(str::to_owned),
            });
        let response = self.send(request).await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        // A decoding error could quote the PIN or the command: say only that it failed.
        response
            .json::<AssignmentBody>()
            .await
            .map(Some)
            .map_err(|_| ClientError::Unavailable("the assignment is not readable JSON".into()))
    }
}

impl AllocatorClient {
    /// `GET tasks?timeout=`: a collection to do, or `None` when `hold` passed first (or
    /// the allocator asked for something else: see [`tasks`](Self::tasks)).
    pub async fn collection_task(
        &self,
        hold: Duration,
    ) -> Result<Option<CollectionTask>, ClientError> {
        Ok(self.tasks(hold).await?.and_then(|tasks| tasks.collection))
    }

    /// `GET tasks?timeout=`: the work the allocator asks for (a collection, a reboot), or
    /// `None` when `hold` passed first.
    pub async fn tasks(&self, hold: Duration) -> Result<Option<TasksBody>, ClientError> {
        let request = self
            .request(Method::GET, "tasks", hold + Duration::from_secs(15))
            .query(&WaitQuery {
                timeout: Some(hold.as_secs_f64()),
                seen: None,
            });
        let response = self.send(request).await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let tasks: TasksBody = response
            .json()
            .await
            .map_err(|e| ClientError::Unavailable(format!("unreadable tasks: {e}")))?;
        Ok(Some(tasks))
    }

    /// `POST warnings/<id>/ack`: the warning `id` was shown (it is not sent again).
    pub async fn acknowledge_warning(&self, id: &str) -> Result<(), ClientError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Err(ClientError::Refused {
                status: StatusCode::BAD_REQUEST,
                message: format!("{id:?} is not a warning id"),
            });
        }
        let route = format!("warnings/{id}/ack");
        self.send(self.request(Method::POST, &route, Duration::from_secs(30)))
            .await
            .map(drop)
    }

    /// `PUT collections/<id>` with the archive streamed from `body`; the allocator answers with
    /// the collection's status (`complete` once it stored the collection).
    pub async fn upload_collection(
        &self,
        id: &str,
        body: reqwest::Body,
        timeout: Duration,
    ) -> Result<CollectionStatus, ClientError> {
        let request = self
            .request(Method::PUT, &format!("collections/{id}"), timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .body(body);
        let response = self.send(request).await?;
        response
            .json()
            .await
            .map_err(|e| ClientError::Unavailable(format!("unreadable upload answer: {e}")))
    }
}

/// Full-jitter exponential backoff: 0.2 s doubling up to a cap, never below 0.1 s, reset after
/// a success. Used by every loop that talks to the allocator, so none of them can spin.
#[derive(Debug, Clone)]
pub struct Backoff {
    max: Duration,
    attempt: u32,
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(200);
    const FLOOR: Duration = Duration::from_millis(100);

    /// Pauses of at most `max`.
    pub fn new(max: Duration) -> Self {
        Self { max, attempt: 0 }
    }

    /// The pause before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = Self::BASE
            .saturating_mul(1 << self.attempt.min(20))
            .min(self.max)
            .max(Self::FLOOR);
        self.attempt = self.attempt.saturating_add(1);
        rand::thread_rng().gen_range(Self::FLOOR..=ceiling)
    }

    /// Back to the shortest pause, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(2));
        for _ in 0..50 {
            let d = b.next_delay();
            assert!(d >= Backoff::FLOOR && d <= Duration::from_secs(2), "{d:?}");
        }
        let late: Duration = (0..200).map(|_| b.next_delay()).sum();
        b.reset();
        let early: Duration = (0..200)
            .map(|_| {
                let d = b.next_delay();
                b.reset();
                d
            })
            .sum();
        assert!(late > early * 3, "late {late:?} early {early:?}");
    }

    #[test]
    fn merging_keeps_the_newest_values_and_every_line() {
        let mut r = TelemetryBody {
            gpu_health: Some("Healthy".into()),
            in_use: Some(true),
            logs: vec![LogBody {
                stream: "agent".into(),
                lines: vec!["a".into()],
            }],
            ..Default::default()
        };
        r.merge(TelemetryBody {
            gpu_health: Some("Unhealthy".into()),
            logs: vec![LogBody {
                stream: "agent".into(),
                lines: vec!["b".into()],
            }],
            ..Default::default()
        });
        assert_eq!(r.gpu_health.as_deref(), Some("Unhealthy"));
        assert_eq!(r.in_use, Some(true));
        assert_eq!(r.logs[0].lines, ["a", "b"]);
    }

    #[test]
    fn merging_keeps_the_newest_desktop_report() {
        let report = |attempt, stage: &str| TelemetryBody {
            desktop: Some(lablink_protocol::DesktopReportBody {
                attempt,
                stage: stage.into(),
                failure: None,
                exit_status: None,
            }),
            ..Default::default()
        };
        let mut r = report(1, "received");
        r.merge(TelemetryBody {
            in_use: Some(false),
            ..Default::default()
        });
        assert_eq!(r.desktop.as_ref().unwrap().stage, "received", "kept");
        r.merge(report(2, "ready"));
        let desktop = r.desktop.unwrap();
        assert_eq!((desktop.attempt, desktop.stage.as_str()), (2, "ready"));
    }

    fn client() -> AllocatorClient {
        AllocatorClient::new(&AgentConfig::new(
            "http://127.0.0.1:9".parse().unwrap(),
            "ws-1".parse().unwrap(),
            Some("t".into()),
        ))
    }

    /// Whether `token_refused(duration)` has completed (without waiting).
    async fn refused(client: &AllocatorClient, duration: Duration) -> bool {
        tokio::time::timeout(Duration::from_millis(10), client.token_refused(duration))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_refused_token_counts_only_once_the_refusals_lasted() {
        let client = client();
        let clone = client.clone();
        assert!(!refused(&client, Duration::ZERO).await);
        clone.note_answer(StatusCode::UNAUTHORIZED);
        assert!(refused(&client, Duration::ZERO).await, "0: the first 401");
        assert!(!refused(&client, Duration::from_millis(50)).await);

        // Other failures neither count nor reset; a later 401 does count.
        tokio::time::sleep(Duration::from_millis(60)).await;
        client.note_answer(StatusCode::SERVICE_UNAVAILABLE);
        assert!(!refused(&client, Duration::from_millis(50)).await);
        let waiting = tokio::spawn({
            let client = client.clone();
            async move { client.token_refused(Duration::from_millis(50)).await }
        });
        client.note_answer(StatusCode::UNAUTHORIZED);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a waiter is woken")
            .unwrap();

        // A success starts again from the next 401.
        client.note_answer(StatusCode::NO_CONTENT);
        assert!(!refused(&client, Duration::ZERO).await);
        client.note_answer(StatusCode::UNAUTHORIZED);
        tokio::time::sleep(Duration::from_millis(30)).await;
        client.note_answer(StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(30)).await;
        client.note_answer(StatusCode::UNAUTHORIZED);
        assert!(
            !refused(&client, Duration::from_millis(50)).await,
            "a success in between"
        );
        assert!(refused(&client, Duration::ZERO).await);
    }

    #[test]
    fn an_assignment_never_prints_its_secrets() {
        let a = AssignmentBody {
            hostname: "vm-1".into(),
            command: "start-host --code=4/secret".into(),
            code: "4/secret".into(),
            pin: "123456".into(),
            assigned_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            mode: "crd".into(),
            attempt: 1,
            version: "1767225600000000.1-assigned".into(),
            tunnel: None,
        };
        let shown = format!("{a:?}");
        assert!(
            !shown.contains("secret") && !shown.contains("123456"),
            "{shown}"
        );
    }
}
