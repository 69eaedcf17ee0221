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

use lablink_core::{Error, ErrorKind, Hostname, Result, VmRecord};
use sqlx::PgPool;
use tokio::sync::oneshot;

use crate::error::{classify, PgError};
use crate::row::{vm_row, VmRow};
use lablink_core::error::ErrorStatus;

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
    pending: Vec<(Hostname, Reply)>,
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
            let reads = self.clone();
            tokio::spawn(async move { reads.work().await });
        }
        answer.await.map_err(|_| {
            Error::new(ErrorKind::Unavailable, "the read worker stopped").with_operation("get")
        })?
    }

    /// A worker: answers batches until the queue is empty.
    async fn work(self: Arc<Self>) {
        let mut guard = WorkerGuard(Some(self.clone()));
        loop {
            // Hostname → every read waiting for it (two reads of one VM can share a batch).
            let mut batch: HashMap<String, Vec<Reply>> = HashMap::new();
            {
                let mut queue = self.lock();
                if queue.pending.is_empty() {
                    // Under the lock `get` queues under: a read queued after this sees one
                    // worker fewer and starts one.
                    queue.workers -= 1;
                    guard.0 = None;
                    return;
                }
                let n = queue.pending.len().min(MAX_BATCH);
                for (hostname, reply) in queue.pending.drain(..n) {
                    batch
                        .entry(hostname.as_str().to_owned())
                        .or_default()
                        .push(reply);
                }
            }
            let hostnames: Vec<&str> = batch.keys().map(String::as_str).collect();
            match self.fetch(&hostnames).await {
                Ok(mut found) => {
                    for (hostname, replies) in batch {
                        answer_all(replies, found.remove(&hostname).transpose());
                    }
                }
                Err(e) => {
                    let e = classify("get", e);
                    for replies in batch.into_values() {
                        answer_all(replies, Err(same_error(&e)));
                    }
                }
            }
        }
    }

    /// The rows of `hostnames` that exist, each turned back into its record (or the reason
    /// it cannot be).
    async fn fetch(
        &self,
        hostnames: &[&str],
    ) -> Result<HashMap<String, Result<VmRecord>>, PgError> {
        let rows = sqlx::query_file!("sql/vm_get_many.sql", hostnames as &[&str])
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

type Reply = oneshot::Sender<Result<Option<VmRecord>>>;

/// Sends `answer` to every read in `replies` (the last gets the original, with its source).
fn answer_all(mut replies: Vec<Reply>, answer: Result<Option<VmRecord>>) {
    let Some(last) = replies.pop() else {
        return;
    };
    for reply in replies {
        let copy = match &answer {
            Ok(record) => Ok(record.clone()),
            Err(e) => Err(same_error(e)),
        };
        let _ = reply.send(copy);
    }
    let _ = last.send(answer);
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

/// Keeps the worker count right if a worker ends early (a panic, its runtime shutting
/// down): the reads it had taken get an `Unavailable` answer as their reply channels drop;
/// if it was the last worker, so do the queued ones (nothing would run them; the next `get`
/// starts a worker again).
struct WorkerGuard(Option<Arc<Reads>>);

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        if let Some(reads) = self.0.take() {
            let mut queue = reads.lock();
            queue.workers -= 1;
            if queue.workers == 0 {
                queue.pending.clear();
            }
        }
    }
}
