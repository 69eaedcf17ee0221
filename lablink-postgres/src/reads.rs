//! Reads of one record by hostname, the concurrent ones of a process grouped into one
//! statement (`sql/vm_get_many.sql`).
//!
//! When a rush of claims wakes thousands of waiting agents, each re-reads its VM to learn
//! its assignment. One statement and one pooled connection per read made those reads queue
//! for the pool behind each other and the claims; grouped, a few statements answer them all.
//! Alone, a read is still one statement (a batch of one).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use lablink_core::{Error, ErrorKind, ErrorStatus, Hostname, Result, VmRecord};
use sqlx::PgPool;
use tokio::sync::oneshot;

use crate::error::{classify, PgError};
use crate::row::{vm_row, VmRow};

/// Most reads in one statement.
const MAX_BATCH: usize = 256;
/// Most read statements in flight at once (each holds one pooled connection).
const MAX_WORKERS: usize = 4;

/// The read path of one [`PgVmStore`](crate::PgVmStore) (shared by its clones).
pub(crate) struct Reads {
    pool: PgPool,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<(Hostname, oneshot::Sender<Result<Option<VmRecord>>>)>,
    workers: usize,
}

impl fmt::Debug for Reads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let queue = self.lock();
        f.debug_struct("Reads")
            .field("queued", &queue.pending.len())
            .field("workers", &queue.workers)
            .finish()
    }
}

impl Reads {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self {
            pool,
            queue: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record of `hostname`, `None` if there is none.
    pub(crate) async fn get(self: &Arc<Self>, hostname: &Hostname) -> Result<Option<VmRecord>> {
        let (reply, answer) = oneshot::channel();
        let start_worker = {
            let mut queue = self.lock();
            queue.pending.push((hostname.clone(), reply));
            let start = queue.workers < MAX_WORKERS;
            queue.workers += usize::from(start);
            start
        };
        if start_worker {
            let guard = WorkerGuard(self.clone());
            tokio::spawn(async move { guard.0.work().await });
        }
        answer.await.map_err(|_| {
            Error::new(ErrorKind::Unavailable, "the read worker stopped").with_operation("get")
        })?
    }

    /// A worker: answers batches until the queue is empty.
    async fn work(&self) {
        loop {
            let batch: Vec<_> = {
                let mut queue = self.lock();
                let n = queue.pending.len().min(MAX_BATCH);
                queue.pending.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            let hostnames: Vec<String> = batch.iter().map(|(h, _)| h.as_str().to_owned()).collect();
            match self.fetch(&hostnames).await {
                Ok(mut found) => {
                    for (hostname, reply) in batch {
                        let _ = reply.send(found.remove(hostname.as_str()).transpose());
                    }
                }
                Err(e) => {
                    let e = classify("get", e);
                    for (_, reply) in batch {
                        let _ = reply.send(Err(same_error(&e)));
                    }
                }
            }
        }
    }

    /// The rows of `hostnames` that exist, each turned back into its record (or the reason
    /// it cannot be).
    async fn fetch(
        &self,
        hostnames: &[String],
    ) -> Result<HashMap<String, Result<VmRecord>>, PgError> {
        let rows = sqlx::query_file!("sql/vm_get_many.sql", hostnames)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let row: VmRow = vm_row!(r);
                let hostname = row.hostname.clone().unwrap_or_default();
                (hostname, row.into_record().map_err(|e| classify("get", e)))
            })
            .collect())
    }
}

/// `error` again, for another read of the batch that failed with it (the statement failed
/// once; every read of it gets the same kind, message and retry status).
fn same_error(error: &Error) -> Error {
    let copy = Error::new(error.kind(), error.message()).with_operation(error.operation());
    match error.status() {
        ErrorStatus::Temporary => copy.temporary(),
        ErrorStatus::Permanent => copy.permanent(),
        ErrorStatus::Persistent => copy.persistent(),
    }
}

/// Keeps the worker count right however a worker ends (done, panic, runtime shutting down);
/// reads it had taken get an `Unavailable` answer as their reply channels drop, and reads
/// still queued are taken over by a new worker.
struct WorkerGuard(Arc<Reads>);

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        let restart = {
            let mut queue = self.0.lock();
            let restart =
                !queue.pending.is_empty() && tokio::runtime::Handle::try_current().is_ok();
            if !restart {
                queue.workers -= 1;
            }
            restart
        };
        if restart {
            let guard = WorkerGuard(self.0.clone());
            tokio::spawn(async move { guard.0.work().await });
        }
    }
}
