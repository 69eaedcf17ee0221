//! The supervisor: background loops that keep a deployment healthy without an admin
//! watching — heartbeat leases, the recovery ladder, reconcile, the warm pool, scheduled
//! destruction and idle release.
//!
//! One task per [`Supervisor`] runs the loops in turn every [`SupervisorConfig::tick`], on
//! the allocator's [`Clock`](crate::Clock) and tokio's timer (so paused-time tests drive it).
//! Across replicas sharing a store only the holder of the store's leader lease
//! ([`VmStore::try_lead`](crate::VmStore::try_lead)) acts; the others keep trying to take the
//! lease and take over within [`SupervisorConfig::leader_lease`] of the leader's death.
//!
//! The warm pool and the destruction schedule are the store's
//! [`WorkshopSettings`](crate::WorkshopSettings) (the config gives their initial values),
//! read by the leader at every tick, so an admin's change through any replica is acted on
//! within a tick. Before the destruction of a participant's VM, and before idle release, the
//! leader records a [warning](crate::warning) for the participant in the store.
//!
//! The task holds only a weak reference to the allocator: dropping every [`LabLink`] clone
//! ends it, and so does dropping (abort) or [`stop`](Supervisor::stop)ping (graceful,
//! resigns the lease) its handle.

mod config;
mod health;
mod pool;
pub(crate) mod settings;
mod warnings;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;
use uuid::Uuid;

pub use crate::before_destroy::BeforeDestroy;
use crate::clock::span_of;
pub use crate::supervision::{FlagKind, SupervisorCounters, SupervisorStatus, VmFlag};
pub use config::{
    DestructionConfig, IdleReleaseConfig, LadderConfig, LeaseConfig, PoolConfig, PoolWindow,
    ReconcileConfig, SupervisorConfig,
};

use crate::lablink::WeakLabLink;
use crate::supervision::Shared;
use crate::{Clock, VmStore};
use crate::{
    Email, Error, Hostname, LabLink, ReconcileReport, Result, VmFilter, VmRecord, VmState,
};

/// The handle of a running supervisor. Dropping it aborts the loops at once (as a crash
/// would: its leader lease then expires); [`stop`](Self::stop) ends them gracefully and
/// gives the lease up so another replica takes over immediately.
#[derive(Debug)]
pub struct Supervisor {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// What it is doing.
    pub fn status(&self) -> SupervisorStatus {
        self.shared.snapshot()
    }

    /// Stops the loops after the current step, resigns the leader lease and waits.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            self.shared.status().running = false;
        }
    }
}

/// What the leader remembers between ticks. Lost on a change of leader: budgets then start
/// full, which errs on the side of repairing.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    /// When this replica became leader.
    leader_since: Option<DateTime<Utc>>,
    /// When reconcile last ran.
    last_reconcile: Option<DateTime<Utc>>,
    /// Per VM: the ladder's budget and history.
    ladder: HashMap<Hostname, Rung>,
    /// When the ladder replaced VMs (the deployment-wide budget window).
    replacements: VecDeque<DateTime<Utc>>,
    /// Replacement VMs still to launch (pool off).
    pending_launches: usize,
    /// Per VM: restarts seen.
    restarts: HashMap<Hostname, u32>,
    /// Per assigned VM and owner: since when it has been seen not in use.
    idle_since: HashMap<(Hostname, Email), DateTime<Utc>>,
    /// VMs an automatic destroy keeps because the before-destroy step failed, with why.
    kept: HashMap<Hostname, String>,
}

/// The ladder's record of one VM.
#[derive(Debug, Default)]
pub(crate) struct Rung {
    reboots: u32,
    last_action: Option<DateTime<Utc>>,
    healthy_since: Option<DateTime<Utc>>,
}

impl LabLink {
    /// Starts the supervisor with the settings in [`AllocatorConfig::supervisor`](crate::AllocatorConfig::supervisor).
    /// Fails with `Conflict` when this allocator already runs one.
    pub fn start_supervisor(&self) -> Result<Supervisor> {
        let mut slot = self
            .inner
            .supervision
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|s| s.status().running) {
            return Err(Error::conflict("this allocator already runs a supervisor")
                .with_operation("start supervisor"));
        }
        let id = format!("supervisor-{}", Uuid::new_v4().simple());
        let shared = Arc::new(Shared {
            status: Mutex::new(SupervisorStatus {
                id: id.clone(),
                running: true,
                ..Default::default()
            }),
        });
        *slot = Some(shared.clone());
        let (stop, stopped) = watch::channel(false);
        let span = tracing::info_span!("supervisor", id = %id);
        let task = tokio::spawn(run(self.downgrade(), shared.clone(), stopped).instrument(span));
        Ok(Supervisor {
            shared,
            stop,
            task: Some(task),
        })
    }

    /// What this allocator's supervisor is doing, if it runs one.
    pub fn supervision(&self) -> Option<SupervisorStatus> {
        self.inner
            .supervision
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.snapshot())
    }
}

/// One supervisor at work: the allocator whose VMs it keeps (for its launch, destroy,
/// reboot and reconcile flows), and the parts it reads, taken from it at each tick.
struct Supervising {
    lablink: LabLink,
    store: Arc<dyn VmStore>,
    clock: Arc<dyn Clock>,
}

impl Supervising {
    fn of(lablink: LabLink) -> Self {
        Self {
            store: lablink.store().clone(),
            clock: lablink.clock().clone(),
            lablink,
        }
    }

    /// One tick: take or keep the lease, then (as leader) run every enabled loop.
    async fn supervise_once(&self, shared: &Shared, memory: &mut Memory) {
        let config = self.lablink.config().supervisor.clone();
        let now = self.clock.now();
        let id = shared.status().id.clone();
        let until = now + chrono::Duration::from_std(config.leader_lease).unwrap_or_default();
        let lease = match self.store.try_lead(&id, now, until).await {
            Ok(lease) => lease,
            Err(e) => {
                // Without a confirmed lease this replica must not act.
                shared.error("leader lease", &e);
                shared.status().leader = false;
                return;
            }
        };
        let leader = lease.holder == id;
        {
            let mut s = shared.status();
            s.counters.ticks += 1;
            s.last_tick = Some(now);
            s.leader = leader;
            s.leader_holder = Some(lease.holder.clone());
            s.leader_until = Some(lease.expires_at);
        }
        if !leader {
            if memory.leader_since.is_some() {
                shared.event(now, format!("lost the leader lease to {}", lease.holder));
            }
            *memory = Memory::default();
            return;
        }
        if memory.leader_since.is_none() {
            memory.leader_since = Some(now);
            shared.status().counters.became_leader += 1;
            shared.event(now, "became leader".into());
        }

        let reconcile_due = memory.last_reconcile.is_none_or(|last| {
            now - last >= chrono::Duration::from_std(config.reconcile.interval).unwrap_or_default()
        });
        if config.reconcile.enabled && reconcile_due {
            match self.lablink.reconcile().await {
                Ok(report) => {
                    memory.last_reconcile = Some(now);
                    if report.changed_anything() {
                        shared.event(now, format!("reconcile: {}", summary(&report)));
                    }
                    let mut s = shared.status();
                    s.counters.reconciles += 1;
                    s.last_reconcile_at = Some(now);
                    s.last_reconcile = Some(report);
                }
                // A launch is running: try again next tick.
                Err(e) if e.is_conflict() => {}
                Err(e) => shared.error("reconcile", &e),
            }
        }

        // What an admin set at run time, through whichever replica: it replaces the
        // config's pool and destruction time. Unreadable, nothing is done this tick (acting
        // on the config's values could destroy VMs an admin rescheduled).
        let settings = match settings::current(&*self.store, &config).await {
            Ok(settings) => settings,
            Err(e) => return shared.error("read settings", &e),
        };
        let config = settings.apply_to(&config);
        let schedule = settings.destruction;
        let records = match self.store.list(&VmFilter::default()).await {
            Ok(records) => records,
            Err(e) => return shared.error("list VMs", &e),
        };
        let warned = match self.store.all_warnings().await {
            Ok(warned) => warned,
            Err(e) => return shared.error("read warnings", &e),
        };
        let mut flags = Vec::new();
        if config.leases.enabled {
            self.check_leases(&config.leases, &records, now, shared)
                .await;
        }
        self.note_restarts(&records, now, shared, memory);
        if config.ladder.enabled {
            self.climb_ladder(&config, &records, now, shared, memory, &mut flags)
                .await;
        }
        self.launch_pending(shared, memory).await;
        memory.kept.retain(|h, _| {
            records.iter().any(|r| {
                &r.hostname == h && !matches!(r.state, VmState::Terminating | VmState::Terminated)
            })
        });
        let mut wanted = warnings::destruction_warnings(&schedule, &records, now);
        self.scheduled_destruction(&config, &schedule, &records, now, shared, memory)
            .await;
        self.keep_pool(&config, &schedule, &records, now, shared, &mut flags)
            .await;
        if config.idle_release.enabled {
            warnings::resume_idle_clocks(&warned, &config.idle_release, memory);
            let idle = self
                .release_idle(
                    &config.idle_release,
                    &records,
                    now,
                    shared,
                    memory,
                    &mut flags,
                )
                .await;
            wanted.extend(idle);
        }
        self.sync_warnings(&warned, &wanted, now, shared).await;
        flags.extend(memory.kept.iter().map(|(hostname, why)| VmFlag {
            hostname: hostname.clone(),
            kind: FlagKind::DestroyHeld,
            message: format!(
                "kept, not destroyed: {why}; collect again and destroy it, or destroy it with force, from the admin page"
            ),
        }));
        shared.status().flags = flags;
    }

    /// Runs the [`BeforeDestroy`] step, if one is installed, on `vms` (leaving out those it
    /// already kept); the hostnames that may be destroyed now, or `None` when the step
    /// failed or the leader lease was lost meanwhile (nothing is destroyed; asked again next
    /// tick, as leader). The VMs it keeps are logged, recorded as events and flagged until
    /// they are gone. The leader lease is renewed every tick while the step runs, since a
    /// collection may take minutes, and checked once more when it ends.
    pub(super) async fn cleared_for_destroy(
        &self,
        vms: &[&VmRecord],
        now: DateTime<Utc>,
        shared: &Shared,
        memory: &mut Memory,
    ) -> Option<Vec<Hostname>> {
        let vms: Vec<VmRecord> = vms
            .iter()
            .filter(|r| !memory.kept.contains_key(&r.hostname))
            .map(|r| (*r).clone())
            .collect();
        let hook = match self.lablink.before_destroy() {
            Some(hook) if !vms.is_empty() => hook,
            _ => return Some(vms.into_iter().map(|r| r.hostname).collect()),
        };
        let config = &self.lablink.config().supervisor;
        let id = shared.status().id.clone();
        // Whether the lease is still this replica's; once it was not, the step's answer is
        // not acted on (another replica may lead, and collect, by now).
        let renew = || async {
            let at = self.clock.now();
            let until = at + span_of(config.leader_lease);
            match self.store.try_lead(&id, at, until).await {
                Ok(lease) => lease.holder == id,
                Err(e) => {
                    shared.error("leader lease", &e);
                    false
                }
            }
        };
        let mut held = true;
        let answer = {
            let asked = hook.before_destroy(&vms);
            tokio::pin!(asked);
            loop {
                tokio::select! {
                    answer = &mut asked => break answer,
                    () = tokio::time::sleep(config.tick) => held &= renew().await,
                }
            }
        };
        if !(held && renew().await) {
            shared.event(
                now,
                "lost the leader lease while preparing VMs for destruction; destroyed none".into(),
            );
            return None;
        }
        let kept = match answer {
            Ok(kept) => kept,
            Err(e) => {
                shared.error("before destroy", &e);
                return None;
            }
        };
        for (hostname, why) in &kept {
            tracing::warn!(hostname = %hostname, reason = %why, "not destroyed: the step before destroying it failed");
            shared.event(now, format!("{hostname}: kept, not destroyed: {why}"));
        }
        let go = vms
            .into_iter()
            .map(|r| r.hostname)
            .filter(|h| !kept.contains_key(h))
            .collect();
        memory.kept.extend(kept);
        Some(go)
    }
}

/// The loop of one supervisor. It holds its allocator weakly: dropping every [`LabLink`]
/// clone ends it.
async fn run(allocator: WeakLabLink, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut memory = Memory::default();
    loop {
        let tick = {
            let Some(lablink) = allocator.upgrade() else {
                break;
            };
            let tick = lablink.config().supervisor.tick;
            Supervising::of(lablink)
                .supervise_once(&shared, &mut memory)
                .await;
            tick
        };
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(tick) => {}
        }
    }
    if let Some(lablink) = allocator.upgrade() {
        let id = shared.status().id.clone();
        if let Err(e) = lablink.store().resign(&id).await {
            tracing::warn!(error = %e, "could not resign the leader lease; it will expire");
        }
    }
    let mut s = shared.status();
    s.running = false;
    s.leader = false;
}

/// A reconcile report in a few words.
fn summary(r: &ReconcileReport) -> String {
    format!(
        "{} attached, {} adopted, {} terminated, {} failed, {} removed, {} errors",
        r.attached.len(),
        r.adopted.len(),
        r.terminated.len(),
        r.failed.len(),
        r.removed.len(),
        r.errors.len()
    )
}
