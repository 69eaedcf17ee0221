//! The [`Notifier`] trait (wake whoever waits on a hostname) and [`MemoryNotifier`].

use std::collections::HashMap;
use std::fmt::{self, Debug};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::sync::broadcast;

use crate::{Hostname, Result};

/// What a subscriber is told. Both mean "read the store again"; neither carries data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Something about this hostname changed.
    Changed,
    /// Notifications may have been lost (reconnect, lag): re-read.
    Resync,
}

/// A stream of [`Wake`]s for one hostname. Dropping it unsubscribes.
pub struct Subscription {
    inner: BoxStream<'static, Wake>,
}

impl Subscription {
    /// Wraps a backend's stream.
    pub fn new(stream: impl Stream<Item = Wake> + Send + 'static) -> Self {
        Self {
            inner: stream.boxed(),
        }
    }

    /// The next wake-up; `None` when the notifier is gone.
    pub async fn next(&mut self) -> Option<Wake> {
        self.inner.next().await
    }
}

impl Stream for Subscription {
    type Item = Wake;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Wake>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Subscription")
    }
}

/// Wakes whoever waits on a hostname.
///
/// # Contract
///
/// The conformance suite [`testing::notifier`](crate::testing) checks every point.
///
/// - Notifications are hints, not data. A waiter subscribes *first*, then reads the store,
///   then waits; after a [`Wake::Resync`] it reads again. So a lost notification costs
///   latency, never an assignment.
/// - After `subscribe(h)` returns, every later `publish(h)` wakes that subscription at least
///   once (or it receives `Resync`), and every subscriber of `h` is woken, in this process and
///   (for shared notifiers) in every other process.
/// - A subscription is never woken for another hostname's publish unless it is a `Resync`.
/// - `publish` with no subscriber succeeds and costs nothing lasting; dropping a subscription
///   frees what it held.
/// - Payloads carry the hostname only, never a secret.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Notifier: Send + Sync + Debug {
    /// Starts listening on `hostname`.
    async fn subscribe(&self, hostname: &Hostname) -> Result<Subscription>;

    /// Wakes every subscriber of `hostname`.
    async fn publish(&self, hostname: &Hostname) -> Result<()>;
}

/// Capacity of a per-hostname channel; a subscriber that lags behind gets `Resync`.
const CHANNEL_CAPACITY: usize = 8;

type Channels = Arc<Mutex<HashMap<Hostname, broadcast::Sender<Wake>>>>;

/// In-process [`Notifier`]: one broadcast channel per hostname with subscribers, removed when
/// its last subscription is dropped. `Clone` shares the channels.
#[derive(Debug, Clone, Default)]
pub struct MemoryNotifier {
    channels: Channels,
}

impl MemoryNotifier {
    /// A notifier with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hostnames with at least one live subscription (for tests and metrics).
    pub fn subscribed_hostnames(&self) -> usize {
        lock(&self.channels).len()
    }

    /// Subscribes without an `async` context.
    pub fn subscribe_now(&self, hostname: &Hostname) -> Subscription {
        let receiver = lock(&self.channels)
            .entry(hostname.clone())
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .subscribe();
        let subscriber = Subscriber {
            receiver: Some(receiver),
            channels: self.channels.clone(),
            hostname: hostname.clone(),
        };
        Subscription::new(futures::stream::unfold(
            subscriber,
            |mut subscriber| async move {
                let receiver = subscriber.receiver.as_mut()?;
                let wake = match receiver.recv().await {
                    Ok(wake) => wake,
                    Err(broadcast::error::RecvError::Lagged(_)) => Wake::Resync,
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                Some((wake, subscriber))
            },
        ))
    }

    /// Publishes without an `async` context.
    pub fn publish_now(&self, hostname: &Hostname) {
        if let Some(sender) = lock(&self.channels).get(hostname) {
            // An error only means every receiver was dropped in the meantime.
            let _ = sender.send(Wake::Changed);
        }
    }

    /// Sends `Resync` to every subscriber (what a shared notifier does after a reconnect).
    pub fn resync_all(&self) {
        for sender in lock(&self.channels).values() {
            let _ = sender.send(Wake::Resync);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One subscription's receiver; removes the hostname's channel when the last one is dropped.
struct Subscriber {
    receiver: Option<broadcast::Receiver<Wake>>,
    channels: Channels,
    hostname: Hostname,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let mut channels = lock(&self.channels);
        drop(self.receiver.take());
        if channels
            .get(&self.hostname)
            .is_some_and(|s| s.receiver_count() == 0)
        {
            channels.remove(&self.hostname);
        }
    }
}

#[async_trait]
impl Notifier for MemoryNotifier {
    async fn subscribe(&self, hostname: &Hostname) -> Result<Subscription> {
        Ok(self.subscribe_now(hostname))
    }

    async fn publish(&self, hostname: &Hostname) -> Result<()> {
        self.publish_now(hostname);
        Ok(())
    }
}
