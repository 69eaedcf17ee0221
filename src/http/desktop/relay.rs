//! The relay's moving parts: the rendezvous where a browser's connection waits for the
//! agent's tunnel ([`Rendezvous`]), and the copy between the two ([`pump`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures::{FutureExt as _, SinkExt as _, StreamExt as _};
use lablink_core::Hostname;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::rfb::{Access, RfbWatch};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why an agent's tunnel was not matched to a waiting browser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No browser waits for this id (it never did, gave up, or was already matched).
    Unknown,
    /// A browser waits for this id, for another VM.
    OtherVm,
}

/// Browsers waiting for their VM's tunnel, by session id, and the bound on live sessions.
/// `S` is the agent's socket (a WebSocket in the server; anything in tests).
#[derive(Debug)]
pub struct Rendezvous<S> {
    slots: Mutex<HashMap<Uuid, Slot<S>>>,
    registered: Notify,
    sessions: Arc<Semaphore>,
    max_sessions: usize,
}

#[derive(Debug)]
struct Slot<S> {
    hostname: Hostname,
    tx: oneshot::Sender<S>,
}

/// A browser's place at the rendezvous; dropping it gives the place up.
#[derive(Debug)]
pub struct Waiting<S> {
    rendezvous: Arc<Rendezvous<S>>,
    id: Uuid,
    rx: Option<oneshot::Receiver<S>>,
}

impl<S> Drop for Waiting<S> {
    fn drop(&mut self) {
        lock(&self.rendezvous.slots).remove(&self.id);
    }
}

impl<S> Waiting<S> {
    /// The session id the agent's tunnel must name.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The agent's socket, once it arrives within `timeout`.
    pub async fn arrival(mut self, timeout: Duration) -> Option<S> {
        let rx = self.rx.take()?;
        tokio::time::timeout(timeout, rx).await.ok()?.ok()
    }
}

impl<S> Rendezvous<S> {
    /// A rendezvous for at most `max_sessions` live sessions (waiting or relaying).
    pub fn new(max_sessions: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: Mutex::default(),
            registered: Notify::new(),
            sessions: Arc::new(Semaphore::new(max_sessions)),
            max_sessions,
        })
    }

    /// A place for one more live session, if the bound allows (held until dropped).
    pub fn session(&self) -> Option<OwnedSemaphorePermit> {
        self.sessions.clone().try_acquire_owned().ok()
    }

    /// Live sessions now.
    pub fn live(&self) -> usize {
        self.max_sessions - self.sessions.available_permits()
    }

    /// Browsers waiting now.
    pub fn waiting(&self) -> usize {
        lock(&self.slots).len()
    }

    /// A browser of `hostname` waits for a tunnel under a fresh id.
    pub fn expect(self: &Arc<Self>, hostname: Hostname) -> Waiting<S> {
        let id = Uuid::new_v4();
        let (tx, rx) = oneshot::channel();
        lock(&self.slots).insert(id, Slot { hostname, tx });
        self.registered.notify_waiters();
        Waiting {
            rendezvous: self.clone(),
            id,
            rx: Some(rx),
        }
    }

    /// An agent of `hostname` arrives for `id`: where to hand its socket. An agent may come
    /// a moment before the browser's place is made (it learns the id from the store, which
    /// another replica may have written), so an unknown id is waited for up to `grace`.
    pub async fn arrive(
        &self,
        id: Uuid,
        hostname: &Hostname,
        grace: Duration,
    ) -> Result<oneshot::Sender<S>, Refusal> {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.registered.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut slots = lock(&self.slots);
                match slots.get(&id) {
                    Some(slot) if slot.hostname != *hostname => return Err(Refusal::OtherVm),
                    Some(_) => {
                        let slot = slots.remove(&id).expect("just seen");
                        return Ok(slot.tx);
                    }
                    None => {}
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Refusal::Unknown);
            }
        }
    }
}

/// What the relay has moved, for `/metrics`-style counts and the tests.
#[derive(Debug, Default)]
pub struct Counters {
    /// Sessions that reached the relaying stage.
    pub sessions: AtomicU64,
    /// Bytes from VMs to browsers.
    pub to_browsers: AtomicU64,
    /// Bytes from browsers to VMs.
    pub to_vms: AtomicU64,
    /// Client messages a view-only session dropped.
    pub dropped: AtomicU64,
}

/// Copies one session both ways until either side ends: the VM's bytes pass unchanged (and
/// `first_frame` runs once the first framebuffer update passed), the browser's pass through
/// the view-only filter when `access` says so. A view-only session whose stream cannot be
/// followed ends.
pub async fn pump(
    browser: WebSocket,
    agent: WebSocket,
    access: Access,
    first_frame: impl FnOnce() + Send,
    counters: &Counters,
) {
    counters.sessions.fetch_add(1, Ordering::Relaxed);
    let watch = Mutex::new(RfbWatch::new(access));
    let (mut to_browser, mut from_browser) = browser.split();
    let (mut to_agent, mut from_agent) = agent.split();
    let down = async {
        let mut first_frame = Some(first_frame);
        let mut watching = true;
        // Messages that arrive back to back are written together: the browser's socket is
        // flushed only when the agent has nothing more at hand.
        loop {
            let next = match from_agent.next().now_or_never() {
                Some(next) => next,
                None => {
                    if to_browser.flush().await.is_err() {
                        break;
                    }
                    from_agent.next().await
                }
            };
            let Some(Ok(message)) = next else {
                break;
            };
            let Message::Binary(bytes) = message else {
                if matches!(message, Message::Close(_)) {
                    break;
                }
                continue;
            };
            if watching {
                match lock(&watch).server_bytes(&bytes) {
                    Ok(true) => {
                        watching = false;
                        if let Some(hook) = first_frame.take() {
                            hook();
                        }
                    }
                    Ok(false) => {}
                    Err(e) if access == Access::ViewOnly => {
                        tracing::warn!(error = %e, "ending a view-only desktop session");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "not following the desktop session");
                        watching = false;
                    }
                }
            }
            counters
                .to_browsers
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if to_browser.feed(Message::Binary(bytes)).await.is_err() {
                break;
            }
        }
    };
    let up = async {
        while let Some(Ok(message)) = from_browser.next().await {
            let Message::Binary(bytes) = message else {
                if matches!(message, Message::Close(_)) {
                    break;
                }
                continue;
            };
            let passed = {
                let mut watch = lock(&watch);
                let before = watch.dropped();
                let passed = watch.client_bytes(&bytes);
                counters
                    .dropped
                    .fetch_add(watch.dropped() - before, Ordering::Relaxed);
                passed
            };
            let passed = match passed {
                Ok(passed) => passed,
                Err(e) => {
                    tracing::warn!(error = %e, "ending a view-only desktop session");
                    break;
                }
            };
            if passed.is_empty() {
                continue;
            }
            counters
                .to_vms
                .fetch_add(passed.len() as u64, Ordering::Relaxed);
            if to_agent.send(Message::Binary(passed.into())).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = down => {}
        () = up => {}
    }
    // Either side ended: end the other (a browser reconnects and asks for a new tunnel).
    let _ = to_browser.send(Message::Close(None)).await;
    let _ = to_agent.send(Message::Close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> Hostname {
        name.parse().unwrap()
    }

    #[tokio::test]
    async fn an_agent_meets_the_browser_waiting_for_its_id() {
        let r = Rendezvous::<&'static str>::new(4);
        let waiting = r.expect(vm("vm-1"));
        let id = waiting.id();
        let tx = r
            .arrive(id, &vm("vm-1"), Duration::from_secs(1))
            .await
            .unwrap();
        tx.send("socket").unwrap();
        assert_eq!(
            waiting.arrival(Duration::from_secs(1)).await,
            Some("socket")
        );
        assert_eq!(r.waiting(), 0);
        assert_eq!(
            r.arrive(id, &vm("vm-1"), Duration::ZERO).await.unwrap_err(),
            Refusal::Unknown,
            "an id is matched once"
        );
    }

    #[tokio::test]
    async fn another_vms_agent_and_unknown_ids_are_refused() {
        let r = Rendezvous::<()>::new(4);
        let waiting = r.expect(vm("vm-1"));
        assert_eq!(
            r.arrive(waiting.id(), &vm("vm-2"), Duration::ZERO)
                .await
                .unwrap_err(),
            Refusal::OtherVm
        );
        assert_eq!(r.waiting(), 1, "the browser still waits for its own VM");
        assert_eq!(
            r.arrive(Uuid::new_v4(), &vm("vm-1"), Duration::ZERO)
                .await
                .unwrap_err(),
            Refusal::Unknown
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_browser_that_gives_up_frees_its_place() {
        let r = Rendezvous::<u8>::new(4);
        let waiting = r.expect(vm("vm-1"));
        let id = waiting.id();
        assert_eq!(
            waiting.arrival(Duration::from_secs(20)).await,
            None,
            "timed out"
        );
        assert_eq!(r.waiting(), 0, "the place is given up");
        assert_eq!(
            r.arrive(id, &vm("vm-1"), Duration::from_secs(5))
                .await
                .unwrap_err(),
            Refusal::Unknown
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_a_moment_early_is_matched() {
        let r = Rendezvous::<u8>::new(4);
        // An id the agent learnt before the browser's place under it exists.
        let waiting = r.expect(vm("vm-1"));
        let id = waiting.id();
        drop(waiting);
        let early = tokio::spawn({
            let r = r.clone();
            async move { r.arrive(id, &vm("vm-1"), Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (tx, rx) = oneshot::channel();
        lock(&r.slots).insert(
            id,
            Slot {
                hostname: vm("vm-1"),
                tx,
            },
        );
        r.registered.notify_waiters();
        early.await.unwrap().unwrap().send(1).unwrap();
        assert_eq!(rx.await.unwrap(), 1);
    }

    #[test]
    fn live_sessions_are_bounded() {
        let r = Rendezvous::<()>::new(2);
        let a = r.session().unwrap();
        let _b = r.session().unwrap();
        assert!(r.session().is_none());
        assert_eq!(r.live(), 2);
        drop(a);
        assert!(r.session().is_some());
    }
}
