//! Participants turned away for lack of a free VM: demand the warm pool cannot see in the
//! store, since a refused claim writes nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use crate::Email;

/// Emails refused with `NoCapacity` and not served since, with when they were last refused.
/// Kept per allocator process (the leader's replica sees the refusals it answered).
#[derive(Debug, Default)]
pub(crate) struct TurnedAway {
    /// Number of entries, so the claim path skips the lock while nobody waits.
    len: AtomicUsize,
    waiting: Mutex<HashMap<Email, DateTime<Utc>>>,
}

impl TurnedAway {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Email, DateTime<Utc>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `email` found no free VM at `now`.
    pub(crate) fn refused(&self, email: &Email, now: DateTime<Utc>) {
        let mut waiting = self.lock();
        waiting.insert(email.clone(), now);
        self.len.store(waiting.len(), Ordering::Relaxed);
    }

    /// `email` got a VM.
    pub(crate) fn served(&self, email: &Email) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut waiting = self.lock();
        waiting.remove(email);
        self.len.store(waiting.len(), Ordering::Relaxed);
    }

    /// How many were refused at or after `since` and not served; forgets older refusals
    /// (those people have probably left).
    pub(crate) fn since(&self, since: DateTime<Utc>) -> usize {
        let mut waiting = self.lock();
        waiting.retain(|_, at| *at >= since);
        self.len.store(waiting.len(), Ordering::Relaxed);
        waiting.len()
    }
}
