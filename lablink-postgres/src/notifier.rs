//! [`PgNotifier`]: a [`Notifier`] over PostgreSQL `LISTEN`/`NOTIFY` with one listening
//! connection per process, fanned out in memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lablink_core::{Error, ErrorKind, Hostname, MemoryNotifier, Notifier, Result, Subscription};
use rand::Rng;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::task::JoinHandle;

use crate::error::classify;

/// The channel LabLink notifies on unless told otherwise.
pub const DEFAULT_CHANNEL: &str = "lablink_vm";

/// First delay before reconnecting the listening connection.
const RECONNECT_MIN: Duration = Duration::from_millis(50);
/// Longest delay between reconnection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// A [`Notifier`] shared by every process on one PostgreSQL database.
///
/// - One background task per `PgNotifier` (clones share it) holds one
///   [`PgListener`] connection from the pool, `LISTEN`ing on one channel. Incoming
///   notifications carry only the hostname and are fanned out in memory (per-hostname
///   broadcast channels, as in [`MemoryNotifier`]) to any number of subscribers: ten thousand
///   waiting agents cost one connection.
/// - [`publish`](Notifier::publish) runs `SELECT pg_notify(channel, hostname)` through the
///   pool, so every process listening on the database (this one included) wakes its
///   subscribers of that hostname.
/// - When the listening connection drops, the task reconnects with jittered exponential
///   backoff (50 ms up to 5 s) and, once `LISTEN` is in place again, sends
///   [`Wake::Resync`](lablink_core::Wake::Resync) to every subscriber: notifications sent
///   while it was down may be lost, so waiters re-read the store.
///
/// Dropping the last clone stops the task and returns the connection to the pool.
#[derive(Debug, Clone)]
pub struct PgNotifier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    channel: String,
    fanout: MemoryNotifier,
    reconnects: Arc<AtomicU64>,
    task: JoinHandle<()>,
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
        Self::connect_on(pool, DEFAULT_CHANNEL).await
    }

    /// Like [`connect`](Self::connect), on another channel: 1–63 characters of
    /// `[a-z0-9_]`, starting with a letter or `_` (separate deployments in one database).
    pub async fn connect_on(pool: PgPool, channel: &str) -> Result<Self> {
        validate_channel(channel)?;
        let listener = listen(&pool, channel)
            .await
            .map_err(|e| classify("listen", e))?;
        let fanout = MemoryNotifier::new();
        let reconnects = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(
            listener,
            pool.clone(),
            channel.to_owned(),
            fanout.clone(),
            reconnects.clone(),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                channel: channel.to_owned(),
                fanout,
                reconnects,
                task,
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

async fn listen(pool: &PgPool, channel: &str) -> std::result::Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // We reconnect ourselves, so we know when LISTEN is back in place and can resync.
    listener.eager_reconnect(false);
    listener.listen(channel).await?;
    Ok(listener)
}

/// The listening loop: fan notifications out; on a lost connection reconnect and resync.
async fn run(
    mut listener: PgListener,
    pool: PgPool,
    channel: String,
    fanout: MemoryNotifier,
    reconnects: Arc<AtomicU64>,
) {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => match notification.payload().parse::<Hostname>() {
                Ok(hostname) => fanout.publish_now(&hostname),
                Err(e) => {
                    tracing::warn!(channel = %channel, error = %e, "ignoring a notification that is not a hostname")
                }
            },
            Ok(None) | Err(_) if pool.is_closed() => {
                tracing::info!(channel = %channel, "pool closed; notifier stops");
                return;
            }
            Ok(None) | Err(_) => {
                tracing::warn!(channel = %channel, "the LISTEN connection was lost; reconnecting");
                drop(listener);
                listener = reconnect(&pool, &channel).await;
                reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(channel = %channel, "LISTEN connection re-established; resyncing waiters");
                fanout.resync_all();
            }
        }
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

#[async_trait]
impl Notifier for PgNotifier {
    async fn subscribe(&self, hostname: &Hostname) -> Result<Subscription> {
        Ok(self.inner.fanout.subscribe_now(hostname))
    }

    async fn publish(&self, hostname: &Hostname) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&self.inner.channel)
            .bind(hostname.as_str())
            .execute(&self.inner.pool)
            .await
            .map_err(|e| classify("publish", e).with_context("hostname", hostname))?;
        Ok(())
    }
}
