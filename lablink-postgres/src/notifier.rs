//! [`PgNotifier`]: a [`Notifier`] over PostgreSQL `LISTEN`/`NOTIFY` with one listening
//! connection per process, fanned out in memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lablink_core::{Error, ErrorKind, Hostname, MemoryNotifier, Notifier, Result};
use rand::Rng;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::classify;
use lablink_core::notifier::Subscription;

/// The channel LabLink notifies on unless told otherwise.
pub const DEFAULT_CHANNEL: &str = "lablink_vm";

/// First delay before reconnecting the listening connection.
const RECONNECT_MIN: Duration = Duration::from_millis(50);
/// Longest delay between reconnection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Most hostnames notified in one statement.
const MAX_PUBLISH_BATCH: usize = 1024;

/// Settings of a [`PgNotifier`] ([`Default`]: [`DEFAULT_CHANNEL`], keepalive every 30 s with
/// a 10 s deadline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgNotifierOptions {
    /// The channel to listen and publish on: 1–63 characters of `[a-z0-9_]`, starting with a
    /// letter or `_` (separate deployments in one database).
    pub channel: String,
    /// After this long without traffic on the listening connection, the notifier sends it a
    /// query (`LISTEN` again, a no-op); a connection that died without closing (a half-open TCP connection, a
    /// frozen server) is noticed this way instead of never.
    pub keepalive_interval: Duration,
    /// How long the keepalive query may take before the connection counts as lost (then it
    /// is replaced and every subscriber resyncs).
    pub keepalive_timeout: Duration,
}

impl Default for PgNotifierOptions {
    fn default() -> Self {
        Self {
            channel: DEFAULT_CHANNEL.to_owned(),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// A [`Notifier`] shared by every process on one PostgreSQL database.
///
/// - One background task per `PgNotifier` (clones share it) holds one [`PgListener`]
///   connection, `LISTEN`ing on one channel. It is opened with the pool's connect options
///   but outside the pool (so a connection that hangs can be abandoned without holding a
///   pool slot): the pool serves publishing only. Incoming notifications carry only the
///   hostname and are fanned out in memory (per-hostname broadcast channels, as in
///   [`MemoryNotifier`]) to any number of subscribers: ten thousand waiting agents cost one
///   connection.
/// - [`publish`](Notifier::publish) queues the hostname; one task sends everything queued in
///   one statement (`SELECT pg_notify(channel, h) FROM unnest(...)`) through the pool, so
///   every process listening on the database (this one included) wakes its subscribers of
///   those hostnames, and a burst of assignments costs a few round trips, not one each.
///   `publish` returns once its notification is committed.
/// - When the listening connection drops, or does not answer a keepalive query in time (see
///   [`PgNotifierOptions`]), the task reconnects with jittered exponential backoff (50 ms up
///   to 5 s) and, once `LISTEN` is in place again, sends
///   [`Wake::Resync`](lablink_core::notifier::Wake::Resync) to every subscriber: notifications sent
///   while it was down may be lost, so waiters re-read the store.
///
/// Dropping the last clone stops the task, closes the listening connection, and ends every
/// subscription (their streams return `None`, so waiters stop with an error instead of
/// waiting for wake-ups that can no longer come).
#[derive(Debug, Clone)]
pub struct PgNotifier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    channel: String,
    fanout: MemoryNotifier,
    reconnects: Arc<AtomicU64>,
    publisher: Arc<Publisher>,
    task: JoinHandle<()>,
    /// Never sent on; dropping it (with the last clone) ends every subscription.
    _closing: watch::Sender<()>,
    closed: watch::Receiver<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PgNotifier {
    /// Connects the listening connection on [`DEFAULT_CHANNEL`] and starts fanning out.
    /// Fails with [`ErrorKind::Unavailable`] if the database cannot be reached now.
    pub async fn connect(pool: PgPool) -> Result<Self> {
        Self::connect_with(pool, PgNotifierOptions::default()).await
    }

    /// Like [`connect`](Self::connect), on another channel: 1–63 characters of
    /// `[a-z0-9_]`, starting with a letter or `_` (separate deployments in one database).
    pub async fn connect_on(pool: PgPool, channel: &str) -> Result<Self> {
        Self::connect_with(
            pool,
            PgNotifierOptions {
                channel: channel.to_owned(),
                ..PgNotifierOptions::default()
            },
        )
        .await
    }

    /// Like [`connect`](Self::connect), with every setting given.
    pub async fn connect_with(pool: PgPool, options: PgNotifierOptions) -> Result<Self> {
        validate_channel(&options.channel)?;
        if options.keepalive_interval.is_zero() || options.keepalive_timeout.is_zero() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "the notifier's keepalive interval and timeout must be longer than zero",
            ));
        }
        let channel = options.channel.clone();
        let listener = listen(&pool, &channel)
            .await
            .map_err(|e| classify("listen", e))?;
        let fanout = MemoryNotifier::new();
        let reconnects = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(
            listener,
            pool.clone(),
            options,
            fanout.clone(),
            reconnects.clone(),
        ));
        let (closing, closed) = watch::channel(());
        Ok(Self {
            inner: Arc::new(Inner {
                publisher: Arc::new(Publisher::new(pool, channel.clone())),
                channel,
                fanout,
                reconnects,
                task,
                _closing: closing,
                closed,
            }),
        })
    }

    /// The channel it listens and publishes on.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// How many times the listening connection was re-established (for metrics and tests).
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Hostnames with at least one live subscription in this process.
    pub fn subscribed_hostnames(&self) -> usize {
        self.inner.fanout.subscribed_hostnames()
    }
}

fn validate_channel(channel: &str) -> Result<()> {
    let mut chars = channel.chars();
    let valid = (1..=63).contains(&channel.len())
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("notification channel {channel:?} must be 1–63 characters of [a-z0-9_], starting with a letter or '_'"),
        ))
    }
}

/// Opens a listening connection: its own one-connection pool with `pool`'s connect options,
/// so a dead connection is abandoned with its pool instead of occupying one of `pool`'s
/// slots (dropping a `PgListener` runs `UNLISTEN *` on its connection, which never returns
/// on a connection that hangs).
async fn listen(pool: &PgPool, channel: &str) -> std::result::Result<PgListener, sqlx::Error> {
    let own = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(pool.options().get_acquire_timeout())
        .connect_lazy_with((*pool.connect_options()).clone());
    let mut listener = PgListener::connect_with(&own).await?;
    // We reconnect ourselves, so we know when LISTEN is back in place and can resync.
    listener.eager_reconnect(false);
    listener.listen(channel).await?;
    Ok(listener)
}

/// What became of the listening connection while waiting for the next notification.
enum Next {
    Notification(sqlx::postgres::PgNotification),
    Lost(&'static str),
    Alive,
}

/// Waits for the next notification; after `keepalive_interval` of silence, checks the
/// connection with a query that must answer within `keepalive_timeout`.
async fn next(listener: &mut PgListener, options: &PgNotifierOptions) -> Next {
    match tokio::time::timeout(options.keepalive_interval, listener.try_recv()).await {
        Ok(Ok(Some(notification))) => Next::Notification(notification),
        Ok(Ok(None) | Err(_)) => Next::Lost("the LISTEN connection was lost"),
        // `try_recv` is cancel-safe: a partly read message stays buffered.
        Err(_idle) => {
            // The check re-issues this connection's LISTEN (a no-op that needs a round trip),
            // so the connection keeps showing as the LISTEN connection in pg_stat_activity.
            let sql = format!(r#"LISTEN "{}""#, options.channel);
            let ping = sqlx::Executor::execute(&mut *listener, sql.as_str());
            match tokio::time::timeout(options.keepalive_timeout, ping).await {
                Ok(Ok(_)) => Next::Alive,
                Ok(Err(_)) => Next::Lost("the LISTEN connection failed its keepalive"),
                Err(_) => Next::Lost("the LISTEN connection did not answer its keepalive"),
            }
        }
    }
}

/// The listening loop: fan notifications out; on a lost connection reconnect and resync.
/// Ends when `pool` is closed.
async fn run(
    mut listener: PgListener,
    pool: PgPool,
    options: PgNotifierOptions,
    fanout: MemoryNotifier,
    reconnects: Arc<AtomicU64>,
) {
    let channel = options.channel.clone();
    let work = async {
        loop {
            match next(&mut listener, &options).await {
                Next::Notification(notification) => {
                    match notification.payload().parse::<Hostname>() {
                        Ok(hostname) => fanout.publish_now(&hostname),
                        Err(e) => {
                            tracing::warn!(channel = %channel, error = %e, "ignoring a notification that is not a hostname")
                        }
                    }
                }
                Next::Alive => {}
                Next::Lost(why) => {
                    tracing::warn!(channel = %channel, "{why}; reconnecting");
                    listener = reconnect(&pool, &channel).await;
                    reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(channel = %channel, "LISTEN connection re-established; resyncing waiters");
                    fanout.resync_all();
                }
            }
        }
    };
    tokio::select! {
        _ = pool.close_event() => tracing::info!(channel = %channel, "pool closed; notifier stops"),
        () = work => {}
    }
}

/// Connects and listens again, retrying with jittered exponential backoff until it works.
async fn reconnect(pool: &PgPool, channel: &str) -> PgListener {
    let mut delay = RECONNECT_MIN;
    loop {
        match listen(pool, channel).await {
            Ok(listener) => return listener,
            Err(e) => {
                let e = classify("listen", e);
                let jittered = delay.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
                tracing::warn!(channel = %channel, error = %e, retry_in_ms = jittered.as_millis() as u64, "cannot LISTEN yet");
                tokio::time::sleep(jittered).await;
                delay = (delay * 2).min(RECONNECT_MAX);
            }
        }
    }
}

/// Sends queued notifications in batches, one statement (one transaction) per batch, from
/// one task at a time, on one connection of the pool that it keeps between batches (so a
/// process publishes over exactly one connection: a connection handed back to the pool
/// becomes idle only after a moment, and acquiring again right away would open a second
/// one). A connection that fails is dropped and the next batch takes another.
#[derive(Debug)]
struct Publisher {
    pool: PgPool,
    channel: String,
    queue: Mutex<PublishQueue>,
    /// The publishing connection; only the one publishing task locks it.
    conn: tokio::sync::Mutex<Option<PoolConnection<Postgres>>>,
}

/// What a publishing task tells each publisher: sent, or the error's kind and whether it is
/// retryable (`Error` is not `Clone`; each publisher builds its own).
type PublishOutcome = std::result::Result<(), (ErrorKind, bool)>;

#[derive(Debug, Default)]
struct PublishQueue {
    pending: Vec<(Hostname, oneshot::Sender<PublishOutcome>)>,
    working: bool,
}

impl Publisher {
    fn new(pool: PgPool, channel: String) -> Self {
        Self {
            pool,
            channel,
            queue: Mutex::new(PublishQueue::default()),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// Sends one notification per hostname in one statement. The held connection may have
    /// gone stale since its last use (the server restarted, say): a failure on it is retried
    /// once on a fresh connection, or the notification would be lost until waiters time out.
    /// (A notification sent twice only makes its waiters re-read.)
    async fn send(&self, hostnames: &[&str]) -> std::result::Result<(), sqlx::Error> {
        let mut held = self.conn.lock().await;
        let reused = held.is_some();
        match self.send_on(&mut held, hostnames).await {
            Err(_) if reused => self.send_on(&mut held, hostnames).await,
            sent => sent,
        }
    }

    /// [`send`](Self::send) on the held connection, taken from the pool first if there is
    /// none; a connection that failed is let go.
    async fn send_on(
        &self,
        held: &mut Option<PoolConnection<Postgres>>,
        hostnames: &[&str],
    ) -> std::result::Result<(), sqlx::Error> {
        let conn = match held {
            Some(conn) => conn,
            None => held.insert(self.pool.acquire().await?),
        };
        let sent = sqlx::query!(
            "SELECT pg_notify($1, h) FROM unnest($2::text[]) AS t (h)",
            self.channel,
            hostnames as &[&str],
        )
        .execute(&mut **conn)
        .await;
        if sent.is_err() {
            // Possibly broken: back to the pool, which checks it before reuse.
            *held = None;
        }
        sent.map(|_| ())
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, PublishQueue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn publish(self: &Arc<Self>, hostname: &Hostname) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = self.queue();
            queue.pending.push((hostname.clone(), reply));
            !std::mem::replace(&mut queue.working, true)
        };
        if start {
            tokio::spawn(self.clone().work());
        }
        let failed = |kind: ErrorKind, retryable: bool| {
            let e = Error::new(kind, "cannot send the notification")
                .with_operation("publish")
                .with_context("hostname", hostname);
            if retryable {
                e.temporary()
            } else {
                e
            }
        };
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err((kind, retryable))) => Err(failed(kind, retryable)),
            Err(_) => Err(failed(ErrorKind::Unavailable, true)),
        }
    }

    async fn work(self: Arc<Self>) {
        let mut guard = PublishGuard {
            publisher: self.clone(),
            armed: true,
        };
        loop {
            let batch: Vec<_> = {
                let mut queue = self.queue();
                if queue.pending.is_empty() {
                    queue.working = false;
                    guard.armed = false;
                    return;
                }
                let n = queue.pending.len().min(MAX_PUBLISH_BATCH);
                queue.pending.drain(..n).collect()
            };
            let mut hostnames: Vec<&str> = batch.iter().map(|(h, _)| h.as_str()).collect();
            hostnames.sort_unstable();
            hostnames.dedup();
            let sent = self.send(&hostnames).await.map_err(|e| {
                let e = classify("publish", e);
                tracing::warn!(channel = %self.channel, error = %e, "cannot send notifications");
                (e.kind(), e.is_retryable())
            });
            for (_, reply) in batch {
                let _ = reply.send(sent);
            }
        }
    }
}

/// Lets a new publishing task take over if one ends early (runtime shutting down).
struct PublishGuard {
    publisher: Arc<Publisher>,
    armed: bool,
}

impl Drop for PublishGuard {
    fn drop(&mut self) {
        if self.armed {
            self.publisher.queue().working = false;
        }
    }
}

#[async_trait]
impl Notifier for PgNotifier {
    async fn subscribe(&self, hostname: &Hostname) -> Result<Subscription> {
        let wakes = self.inner.fanout.subscribe_now(hostname);
        let mut closed = self.inner.closed.clone();
        // Ends the stream when the last clone of this notifier is dropped.
        let notifier_dropped = async move { while closed.changed().await.is_ok() {} };
        Ok(Subscription::new(wakes.take_until(notifier_dropped)))
    }

    async fn publish(&self, hostname: &Hostname) -> Result<()> {
        self.inner.publisher.publish(hostname).await
    }
}
