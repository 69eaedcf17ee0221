//! Claims: one statement each, and the concurrent claims of one process grouped into one
//! statement (group commit), so a rush of participants costs a few round trips, not one
//! transaction each.
//!
//! A claim is queued; up to [`MAX_WORKERS`] worker tasks take the queue in batches of up to
//! [`MAX_BATCH`] and run `sql/vm_claim_batch.sql` (or `sql/vm_claim.sql` for a batch of
//! one). Each claim gets exactly the answer it would get alone: the email's VM if it holds
//! one, else a free VM moved to `Assigned` as `VmRecord::apply(Claim)` does it. Claims the
//! batch leaves without a row (no free VM, free VMs locked by someone, a race on an email
//! with another process) are retried one by one on the single-claim path, which waits for
//! locked VMs and reports `NoCapacity`.
//!
//! Workers are spawned tasks, so a caller that stops waiting (a participant's request that
//! is cancelled) never stalls the others; its claim still completes, and asking again
//! returns the same VM.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use lablink_core::{CrdCommand, Email, Error, ErrorKind, Result, VmState};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::{oneshot, Notify};

use crate::error::{classify, PgError};
use crate::row::{vm_row, Column, VmRow};
use lablink_core::store::{ClaimRequest, Claimed};

/// How often a claim starts over after losing a race on the email's uniqueness.
const CLAIM_ATTEMPTS: usize = 4;
/// Most claims in one statement.
pub(crate) const MAX_BATCH: usize = 64;
/// Most claim statements in flight at once (each holds one pooled connection).
pub(crate) const MAX_WORKERS: usize = 2;
/// How long a worker whose queue ran dry waits for the next claim before it hands its
/// connection back: callers it just answered usually ask again at once, and a new worker
/// would pay for a task and a pooled connection (a ping round trip) first.
const LINGER: Duration = Duration::from_millis(2);

/// The pooled connection a worker keeps for as long as it has claims to run. Taking a
/// connection from the pool costs a round trip of its own (the pool pings an idle connection
/// before handing it out, unless `test_before_acquire` is off), as much as the claim itself;
/// a worker under load pays it once, not once per statement.
#[derive(Default)]
struct Held(Option<PoolConnection<Postgres>>);

impl Held {
    /// The held connection, taken from `pool` first if there is none.
    async fn get(&mut self, pool: &PgPool) -> Result<&mut PgConnection, PgError> {
        let conn = match self.0.take() {
            Some(conn) => conn,
            None => pool.acquire().await?,
        };
        Ok(&mut **self.0.insert(conn))
    }

    /// Lets go of the connection after `result` if it may be broken: an error the server
    /// reported leaves it usable, anything else (I/O, protocol) hands it back to the pool,
    /// which checks it before anyone reuses it.
    fn check<T>(&mut self, result: &Result<T, PgError>) {
        if matches!(result, Err(e) if !matches!(e, PgError::Sqlx(sqlx::Error::Database(_)))) {
            self.0 = None;
        }
    }
}

/// The claim path of one [`PgVmStore`](crate::PgVmStore) (shared by its clones).
pub(crate) struct Claims {
    pool: PgPool,
    queue: Mutex<Queue>,
    /// Wakes a lingering worker when a claim is queued.
    arrived: Notify,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    workers: usize,
}

struct Pending {
    request: ClaimRequest,
    now: DateTime<Utc>,
    reply: oneshot::Sender<Result<Claimed>>,
}

impl fmt::Debug for Claims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let queue = lock(&self.queue);
        f.debug_struct("Claims")
            .field("queued", &queue.pending.len())
            .field("workers", &queue.workers)
            .finish()
    }
}

fn lock(m: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// PostgreSQL keeps timestamps to the microsecond (see `store::micros`).
fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

fn is_email_race(error: &PgError) -> bool {
    matches!(error, PgError::Sqlx(sqlx::Error::Database(db))
        if db.is_unique_violation() && db.constraint() == Some("lablink_vms_email_key"))
}

/// A row of `vm_claim.sql`, `vm_claim_wait.sql` or `vm_claim_batch.sql`: the VM and whether
/// the statement assigned it.
struct ClaimRow {
    vm: VmRow,
    newly_assigned: Option<bool>,
}

/// The claim's result from a [`ClaimRow`].
fn claimed_from_row(row: ClaimRow) -> Result<Claimed> {
    let op = "claim";
    let newly_assigned =
        crate::row::required("newly_assigned", row.newly_assigned).map_err(|e| classify(op, e))?;
    let record = row.vm.into_record().map_err(|e| classify(op, e))?;
    if newly_assigned {
        // What VmRecord::apply logs for the transition the statement made.
        tracing::info!(hostname = %record.hostname, from = %VmState::Available, to = %record.state, event = "claim", "vm state changed");
    }
    Ok(Claimed {
        record,
        newly_assigned,
    })
}

impl Claims {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self {
            pool,
            queue: Mutex::new(Queue::default()),
            arrived: Notify::new(),
        }
    }

    /// Queues a claim and waits for its answer.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        request: &ClaimRequest,
        now: DateTime<Utc>,
    ) -> Result<Claimed> {
        let (reply, answer) = oneshot::channel();
        let start_worker = {
            let mut queue = lock(&self.queue);
            queue.pending.push(Pending {
                request: request.clone(),
                now,
                reply,
            });
            let start = queue.workers < MAX_WORKERS;
            if start {
                queue.workers += 1;
            }
            start
        };
        if start_worker {
            tokio::spawn(self.clone().work());
        } else {
            self.arrived.notify_one();
        }
        answer.await.map_err(|_| {
            Error::new(ErrorKind::Unavailable, "the claim worker stopped").with_operation("claim")
        })?
    }

    /// A worker: takes batches off the queue until it stays empty for [`LINGER`].
    async fn work(self: Arc<Self>) {
        let mut guard = WorkerGuard {
            claims: self.clone(),
            armed: true,
        };
        let mut held = Held::default();
        let mut lingered = false;
        loop {
            let batch = {
                let mut queue = lock(&self.queue);
                if queue.pending.is_empty() && lingered {
                    // Under the lock that `claim` queues under: a claim queued after this
                    // sees one worker fewer and starts one.
                    queue.workers -= 1;
                    guard.armed = false;
                    return;
                }
                let n = queue.pending.len().min(MAX_BATCH);
                queue.pending.drain(..n).collect::<Vec<_>>()
            };
            if batch.is_empty() {
                lingered = tokio::time::timeout(LINGER, self.arrived.notified())
                    .await
                    .is_err();
                continue;
            }
            lingered = false;
            self.run(batch, &mut held).await;
        }
    }

    /// Answers every claim of `batch`.
    async fn run(self: &Arc<Self>, mut batch: Vec<Pending>, held: &mut Held) {
        if batch.len() == 1 {
            let p = batch.pop().expect("one claim");
            let result = self.claim_one(&p.request, p.now, held).await;
            let _ = p.reply.send(result);
            return;
        }
        // One entry per distinct email; later claims for an email follow its first.
        let mut groups: Vec<Vec<Pending>> = Vec::with_capacity(batch.len());
        let mut by_email: HashMap<Email, usize> = HashMap::with_capacity(batch.len());
        for p in batch {
            match by_email.get(&p.request.email) {
                Some(&i) => groups[i].push(p),
                None => {
                    by_email.insert(p.request.email.clone(), groups.len());
                    groups.push(vec![p]);
                }
            }
        }
        let rows = self.claim_batch(&groups, held).await;
        held.check(&rows);
        let mut answered = vec![false; groups.len()];
        if let Ok(rows) = rows {
            for (n, row) in rows {
                let Some(i) = n
                    .and_then(|n| usize::try_from(n - 1).ok())
                    .filter(|&i| i < groups.len() && !answered[i])
                else {
                    continue;
                };
                let claimed = match claimed_from_row(row) {
                    Ok(claimed) => claimed,
                    // Left for the single-claim path, which reports the error on its own.
                    Err(_) => continue,
                };
                answered[i] = true;
                let mut first = true;
                for p in groups[i].drain(..) {
                    let answer = Claimed {
                        record: claimed.record.clone(),
                        newly_assigned: claimed.newly_assigned && first,
                    };
                    first = false;
                    let _ = p.reply.send(Ok(answer));
                }
            }
        }
        // The rest (or all of them, if the statement failed) one by one, in tasks of their
        // own: the single-claim path may wait for locked VMs, and the queue must not.
        for p in groups.into_iter().flatten() {
            let claims = self.clone();
            tokio::spawn(async move {
                let result = claims
                    .claim_one(&p.request, p.now, &mut Held::default())
                    .await;
                let _ = p.reply.send(result);
            });
        }
    }

    /// One statement for a batch of distinct emails (`sql/vm_claim_batch.sql`).
    /// Each row comes with `n`, the 1-based position of its group in `groups`.
    async fn claim_batch(
        &self,
        groups: &[Vec<Pending>],
        held: &mut Held,
    ) -> Result<Vec<(Option<i64>, ClaimRow)>, PgError> {
        let first = groups.iter().map(|g| &g[0]);
        let emails: Vec<&str> = first.clone().map(|p| p.request.email.as_str()).collect();
        let commands: Vec<Option<&str>> = first
            .clone()
            .map(|p| p.request.crd_command.as_ref().map(CrdCommand::expose))
            .collect();
        let pins: Vec<&str> = first.clone().map(|p| p.request.pin.expose()).collect();
        let times: Vec<DateTime<Utc>> = first.map(|p| micros(p.now)).collect();
        let rows = sqlx::query_file!(
            "sql/vm_claim_batch.sql",
            &emails[..] as &[&str],
            &commands[..] as &[Option<&str>],
            &pins[..] as &[&str],
            &times[..],
        )
        .fetch_all(held.get(&self.pool).await?)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let n = r.n.into_opt();
                let newly_assigned = r.newly_assigned.into_opt();
                (
                    n,
                    ClaimRow {
                        vm: vm_row!(r),
                        newly_assigned,
                    },
                )
            })
            .collect())
    }

    /// One claim on its own: `sql/vm_claim.sql`, started over if another transaction gave
    /// this email a VM first.
    async fn claim_one(
        &self,
        request: &ClaimRequest,
        now: DateTime<Utc>,
        held: &mut Held,
    ) -> Result<Claimed> {
        for _ in 0..CLAIM_ATTEMPTS {
            if let Some(claimed) = self.try_claim(request, now, held).await? {
                return Ok(claimed);
            }
        }
        Err(
            Error::conflict("the email's assignment kept changing; try again")
                .with_operation("claim")
                .with_context("email", &request.email)
                .temporary(),
        )
    }

    /// One claim attempt; `None` when another transaction gave this email a VM first (the
    /// caller starts over and finds it).
    async fn try_claim(
        &self,
        request: &ClaimRequest,
        now: DateTime<Utc>,
        held: &mut Held,
    ) -> Result<Option<Claimed>> {
        let op = "claim";
        let mut row = self.claim_statement(Wait::No, request, now, held).await;
        if matches!(row, Ok(None)) {
            // No row: no VM is free, or every free one is locked by someone (other claims,
            // telemetry...). Wait for the holders rather than report a capacity that may
            // exist.
            row = self
                .claim_statement(Wait::ForLocked, request, now, held)
                .await;
        }
        if matches!(row, Ok(None)) {
            // Still none. The wait may have been for a claim of this same email in another
            // process (a double click landing on two replicas at the last free VM), which
            // has committed by now: its VM is this email's answer, not `NoCapacity`. The
            // statements above read the email's VM in a snapshot taken before that commit,
            // so read it again.
            row = self.email_vm(request, held).await;
        }
        match row {
            Ok(Some(row)) => claimed_from_row(row).map(Some),
            Ok(None) => Err(Error::new(ErrorKind::NoCapacity, "no VM is free right now")
                .with_operation(op)
                .temporary()),
            Err(e) if is_email_race(&e) => Ok(None),
            Err(e) => Err(classify(op, e)),
        }
    }

    /// The VM `request.email` holds now, as a claim's answer (`newly_assigned: false`).
    async fn email_vm(
        &self,
        request: &ClaimRequest,
        held: &mut Held,
    ) -> Result<Option<ClaimRow>, PgError> {
        let no_states: [&str; 0] = [];
        let row = async {
            let conn = held.get(&self.pool).await?;
            let row = sqlx::query_file!(
                "sql/vm_list.sql",
                &no_states[..] as &[&str],
                request.email.as_str(),
                Some(1_i64)
            )
            .fetch_optional(&mut *conn)
            .await?;
            Ok(row.map(|r| ClaimRow {
                vm: vm_row!(r),
                newly_assigned: Some(false),
            }))
        }
        .await;
        held.check(&row);
        row
    }

    /// Runs one of the single-claim statements (auto-committed: one round trip).
    async fn claim_statement(
        &self,
        wait: Wait,
        request: &ClaimRequest,
        now: DateTime<Utc>,
        held: &mut Held,
    ) -> Result<Option<ClaimRow>, PgError> {
        let row = self.claim_statement_on(wait, request, now, held).await;
        held.check(&row);
        row
    }

    async fn claim_statement_on(
        &self,
        wait: Wait,
        request: &ClaimRequest,
        now: DateTime<Utc>,
        held: &mut Held,
    ) -> Result<Option<ClaimRow>, PgError> {
        let conn = held.get(&self.pool).await?;
        let email = request.email.as_str();
        let command = request.crd_command.as_ref().map(CrdCommand::expose);
        let pin = request.pin.expose();
        let now = micros(now);
        // Two statements, two row types (one per `query_file!`), the same conversion.
        macro_rules! claim_row {
            ($file:literal) => {
                sqlx::query_file!($file, email, command, pin, now)
                    .fetch_optional(&mut *conn)
                    .await?
                    .map(|r| {
                        let newly_assigned = r.newly_assigned.into_opt();
                        ClaimRow {
                            vm: vm_row!(r),
                            newly_assigned,
                        }
                    })
            };
        }
        let row = match wait {
            Wait::No => claim_row!("sql/vm_claim.sql"),
            Wait::ForLocked => claim_row!("sql/vm_claim_wait.sql"),
        };
        Ok(row)
    }
}

/// Which single-claim statement to run.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// `sql/vm_claim.sql`: skip VMs other transactions hold.
    No,
    /// `sql/vm_claim_wait.sql`: wait for them.
    ForLocked,
}

/// Keeps the worker count right if a worker ends early (panic, runtime shutting down): the
/// claims it held get an `Unavailable` answer (their reply channels drop), and if claims are
/// still queued another worker takes over.
struct WorkerGuard {
    claims: Arc<Claims>,
    armed: bool,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let restart = {
            let mut queue = lock(&self.claims.queue);
            queue.workers -= 1;
            let restart = !queue.pending.is_empty();
            if restart {
                queue.workers += 1;
            }
            restart
        };
        if restart {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(self.claims.clone().work());
                }
                Err(_) => {
                    // No runtime: nothing can run the queue; answering is dropping the
                    // reply channels.
                    let mut queue = lock(&self.claims.queue);
                    queue.workers -= 1;
                    queue.pending.clear();
                }
            }
        }
    }
}
