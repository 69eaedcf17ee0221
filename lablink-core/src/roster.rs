//! [`Roster`]: who may take a VM when the organisers registered their participants.
//!
//! The list lives in the [`VmStore`] (so every replica sees the same one); each allocator
//! keeps a copy that it reads again at most every [`Roster::MAX_AGE`], so a burst of
//! participants costs the store one read, not one per request.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::{Email, Result, VmStore};

/// The allocator's copy of the store's roster.
#[derive(Debug, Default)]
pub(crate) struct Roster {
    copy: Mutex<Option<(Instant, Arc<HashSet<Email>>)>>,
    /// One reader of the store at a time; the others wait for its copy.
    reading: tokio::sync::Mutex<()>,
}

impl Roster {
    /// How stale the copy may be: a list uploaded on one replica applies on the others
    /// within this time.
    pub(crate) const MAX_AGE: Duration = Duration::from_secs(2);

    fn fresh(&self) -> Option<Arc<HashSet<Email>>> {
        let copy = self.copy.lock().unwrap_or_else(|p| p.into_inner());
        copy.as_ref()
            .filter(|(read_at, _)| read_at.elapsed() < Self::MAX_AGE)
            .map(|(_, set)| set.clone())
    }

    fn keep(&self, emails: impl IntoIterator<Item = Email>) -> Arc<HashSet<Email>> {
        let set = Arc::new(emails.into_iter().collect::<HashSet<_>>());
        *self.copy.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), set.clone()));
        set
    }

    /// Whether `email` may take a VM: there is no list, or it is on it.
    pub(crate) async fn admits(&self, store: &dyn VmStore, email: &Email) -> Result<bool> {
        let set = match self.fresh() {
            Some(set) => set,
            None => {
                let _reading = self.reading.lock().await;
                match self.fresh() {
                    Some(set) => set,
                    None => self.keep(store.roster().await?),
                }
            }
        };
        Ok(set.is_empty() || set.contains(email))
    }

    /// Stores a new list and uses it at once.
    pub(crate) async fn replace(&self, store: &dyn VmStore, emails: &[Email]) -> Result<()> {
        let _reading = self.reading.lock().await;
        store.replace_roster(emails).await?;
        self.keep(emails.iter().cloned());
        Ok(())
    }
}
