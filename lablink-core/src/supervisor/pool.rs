//! The warm pool, scheduled destruction and idle release.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::warnings::Wanted;
use super::{span_of, Memory, Supervising, SupervisorConfig};
use crate::settings::ScheduleSettings;
use crate::supervision::Shared;
use crate::supervisor::{FlagKind, IdleReleaseConfig, VmFlag};
use crate::{
    AgentStatus, Email, Hostname, LaunchOptions, Phase, Reuse, VmEvent, VmRecord, VmState,
    WarningKind,
};

/// A VM that is free or will be: it counts toward K. A registered machine counts only
/// while free (nothing replaces one that is stuck).
fn is_free_or_coming(r: &VmRecord) -> bool {
    if r.is_registered() {
        return r.is_assignable();
    }
    match r.state {
        VmState::Requested | VmState::Booting | VmState::Resetting => true,
        VmState::Available => r.is_assignable(),
        VmState::Rebooting { resume } => resume != Phase::Assigned,
        _ => false,
    }
}

/// A VM that costs money and counts toward M (a registered machine costs the deployment
/// nothing: it counts toward K while free, never toward M).
fn counts_toward_total(r: &VmRecord) -> bool {
    !r.is_registered()
        && !matches!(
            r.state,
            VmState::Failed | VmState::Terminating | VmState::Terminated
        )
}

/// A free VM the pool may destroy when there are more than K: never a registered machine.
fn releasable(r: &VmRecord) -> bool {
    r.is_assignable() && !r.is_registered()
}

/// A launched VM whose set-up failed (its agent's error took it from booting to failed).
/// A registered machine's set-up says nothing about the VMs the pool would launch.
fn failed_setup(r: &VmRecord) -> bool {
    r.state == VmState::Failed && r.agent_status == Some(AgentStatus::Error) && !r.is_registered()
}

/// Whether the scheduled destruction has come for `r` at `now`: it was created before a
/// time that passed; or the last time passed and no pool window after it is on (the
/// workshop is over: every VM goes, as a single destruction time always did).
pub(super) fn destruction_due(
    schedule: &ScheduleSettings,
    config: &SupervisorConfig,
    r: &VmRecord,
    now: DateTime<Utc>,
) -> bool {
    let Some(last) = schedule.last_passed(now) else {
        return false;
    };
    r.created_at < last
        || (schedule.next(Some(now)).is_none() && schedule.pauses_pool(&config.pool, now))
}

impl Supervising {
    /// Keeps K free VMs (launching ahead of demand), never more than M in all, and destroys
    /// free VMs beyond K once idle for the TTL. While a VM whose set-up failed is left, it
    /// launches nothing: each new VM would fail the same way, and launch after launch.
    pub(super) async fn keep_pool(
        &self,
        config: &SupervisorConfig,
        schedule: &ScheduleSettings,
        records: &[VmRecord],
        now: DateTime<Utc>,
        shared: &Shared,
        flags: &mut Vec<VmFlag>,
    ) {
        let pool = &config.pool;
        let free = records.iter().filter(|r| is_free_or_coming(r)).count();
        {
            let mut s = shared.status();
            s.pool_free = free;
            s.pool_target = pool.enabled.then(|| pool.min_available_at(now));
        }
        if !pool.enabled || schedule.pauses_pool(pool, now) {
            return;
        }
        let k = pool.min_available_at(now);
        let turned_away = match pool.turned_away_window.is_zero() {
            true => 0,
            false => self
                .lablink
                .turned_away()
                .since(crate::clock::before(now, pool.turned_away_window)),
        };
        let total = records.iter().filter(|r| counts_toward_total(r)).count();
        let count = (k + turned_away)
            .saturating_sub(free)
            .min(pool.max_total.saturating_sub(total))
            .min(self.lablink.config().max_launch);
        let failed: Vec<&VmRecord> = records.iter().filter(|r| failed_setup(r)).collect();
        for record in &failed {
            flags.push(VmFlag {
                hostname: record.hostname.clone(),
                kind: FlagKind::SetupFailed,
                message: format!(
                    "{}; the pool launches no VM while one like it is left: fix the image or the start-up settings, then destroy it",
                    record.last_error.as_deref().unwrap_or("its set-up failed")
                ),
            });
        }
        // Registered machines are fixed capacity: only a provisioner that launches adds VMs.
        let launches = self.lablink.provisioner().capabilities().launch;
        if count > 0 && failed.is_empty() && launches {
            match self.lablink.start_launch(&LaunchOptions { count }).await {
                Ok(_) => {
                    shared.status().counters.pool_launched += count as u64;
                    shared.event(
                        now,
                        format!(
                            "pool: {free} free or coming, K = {k}, {turned_away} turned away; launching {count}"
                        ),
                    );
                }
                // Another launch or destroy runs: next tick.
                Err(e) if e.is_conflict() => {}
                Err(e) => shared.error("pool launch", &e),
            }
            return;
        }

        // Scale down: free, ready VMs beyond K that sat idle for the TTL, longest idle first.
        // No participant holds them (`Available`), so no `BeforeDestroy` step runs.
        let excess = free.saturating_sub(k + turned_away);
        if excess == 0 {
            return;
        }
        let ttl = span_of(pool.idle_ttl);
        let mut idle: Vec<&VmRecord> = records
            .iter()
            .filter(|r| releasable(r) && now - r.state_changed_at >= ttl)
            .collect();
        idle.sort_by_key(|r| r.state_changed_at);
        let doomed: Vec<Hostname> = idle
            .into_iter()
            .take(excess)
            .map(|r| r.hostname.clone())
            .collect();
        if doomed.is_empty() {
            return;
        }
        let release_at = now;
        let result = self
            .lablink
            .destroy_where(&doomed, |r| {
                releasable(r) && release_at - r.state_changed_at >= ttl
            })
            .await;
        match result {
            Ok(taken) if !taken.is_empty() => {
                shared.status().counters.pool_released += taken.len() as u64;
                shared.event(
                    now,
                    format!(
                        "pool: {} idle beyond K = {k}; destroyed {}",
                        taken.len(),
                        join(&taken)
                    ),
                );
            }
            Ok(_) => {}
            Err(e) if e.is_conflict() => {}
            Err(e) => shared.error("pool release", &e),
        }
    }

    /// Shows the coming destruction, and destroys every VM whose destruction has come (see
    /// [`destruction_due`]; again on later ticks, until none is left).
    pub(super) async fn scheduled_destruction(
        &self,
        config: &SupervisorConfig,
        schedule: &ScheduleSettings,
        records: &[VmRecord],
        now: DateTime<Utc>,
        shared: &Shared,
        memory: &mut Memory,
    ) {
        {
            let shown = schedule.shown(now);
            let mut s = shared.status();
            s.destruction_at = shown;
            s.destruction_warning = shown.is_some_and(|at| schedule.warns(at, now));
        }
        let left: Vec<&VmRecord> = records
            .iter()
            .filter(|r| !matches!(r.state, VmState::Terminating | VmState::Terminated))
            .filter(|r| destruction_due(schedule, config, r, now))
            .collect();
        if left.is_empty() {
            return;
        }
        // Only these VMs, once cleared: a VM launched meanwhile waits for the next tick.
        let Some(left) = self.cleared_for_destroy(&left, now, shared, memory).await else {
            return;
        };
        if left.is_empty() {
            return;
        }
        // Who held each VM when the step looked at it: one claimed by a participant during
        // the step (its work was not collected) waits for the next tick.
        let owners: HashMap<&Hostname, Option<&Email>> = records
            .iter()
            .map(|r| (&r.hostname, r.assignment.as_ref().map(|a| &a.email)))
            .collect();
        let unchanged = |r: &VmRecord| {
            owners.get(&r.hostname).copied().flatten() == r.assignment.as_ref().map(|a| &a.email)
        };
        match self.lablink.destroy_where(&left, unchanged).await {
            Ok(taken) if !taken.is_empty() => shared.event(
                now,
                format!("scheduled destruction: destroying {} VM(s)", taken.len()),
            ),
            Ok(_) => {}
            Err(e) if e.is_conflict() => {}
            Err(e) => shared.error("scheduled destruction", &e),
        }
    }

    /// Destroys assigned VMs not in use for longer than the limit, after a warning period;
    /// the warnings their participants are to see (from the warning period on, until the VM
    /// is gone).
    pub(super) async fn release_idle(
        &self,
        config: &IdleReleaseConfig,
        records: &[VmRecord],
        now: DateTime<Utc>,
        shared: &Shared,
        memory: &mut Memory,
        flags: &mut Vec<VmFlag>,
    ) -> Vec<Wanted> {
        let leader_since = memory.leader_since.unwrap_or(now);
        let mut seen = Vec::new();
        let mut wanted = Vec::new();
        for record in records {
            let Some(assignment) = record.assignment.as_ref() else {
                continue;
            };
            if record.state != VmState::Assigned || record.in_use {
                continue;
            }
            // A registered machine is not destroyed, and releasing it without a reset would
            // hand the next participant this one's desktop and files: the admin decides.
            if record.is_registered() && self.lablink.config().reuse != Reuse::Reset {
                flags.push(VmFlag {
                    hostname: record.hostname.clone(),
                    kind: FlagKind::Registered,
                    message: format!(
                        "not in use by {}; a registered machine is never released automatically (the next participant would find this one's session): release it from the admin page once it is cleaned up",
                        assignment.email
                    ),
                });
                continue;
            }
            let key = (record.hostname.clone(), assignment.email.clone());
            // Not in use since the assignment, or since this leader first looked.
            let since = *memory
                .idle_since
                .entry(key.clone())
                .or_insert_with(|| assignment.assigned_at.max(leader_since));
            seen.push(key);
            let idle = now - since;
            let release_at = since + span_of(config.after);
            if idle >= span_of(config.after) - span_of(config.warning) && !config.warning.is_zero()
            {
                wanted.push(Wanted::new(
                    &record.hostname,
                    WarningKind::IdleRelease,
                    &assignment.email,
                    release_at,
                ));
            }
            if idle >= span_of(config.after) {
                let cleared = self
                    .cleared_for_destroy(&[record], now, shared, memory)
                    .await;
                if cleared.is_none_or(|go| go.is_empty()) {
                    continue;
                }
                let email = assignment.email.clone();
                let still_idle = |r: &VmRecord| {
                    r.state == VmState::Assigned && !r.in_use && r.owner() == Some(&email)
                };
                // Reset in place when VMs are reused so; destroyed otherwise.
                let result = if self.lablink.config().reuse == Reuse::Reset {
                    self.lablink
                        .apply_if(&record.hostname, |r| {
                            still_idle(r).then_some(VmEvent::Reset)
                        })
                        .await
                        .map(|r| {
                            if r.state == VmState::Resetting {
                                vec![r.hostname]
                            } else {
                                Vec::new()
                            }
                        })
                } else {
                    self.lablink
                        .destroy_where(std::slice::from_ref(&record.hostname), still_idle)
                        .await
                };
                match result {
                    Ok(taken) if !taken.is_empty() => {
                        shared.status().counters.idle_released += 1;
                        shared.event(
                            now,
                            format!(
                                "{}: not in use for {} s; released ({})",
                                record.hostname,
                                idle.num_seconds(),
                                if self.lablink.config().reuse == Reuse::Reset {
                                    "reset for the next participant"
                                } else {
                                    "destroyed"
                                }
                            ),
                        );
                    }
                    Ok(_) => {}
                    Err(e) if e.is_conflict() => {}
                    Err(e) => shared.error("idle release", &e),
                }
            } else if idle >= span_of(config.after) - span_of(config.warning) {
                flags.push(VmFlag {
                    hostname: record.hostname.clone(),
                    kind: FlagKind::IdleWarning,
                    message: format!(
                        "not in use for {} s; will be released at {} unless used",
                        idle.num_seconds(),
                        release_at.format("%Y-%m-%d %H:%M:%S UTC")
                    ),
                });
            }
        }
        memory.idle_since.retain(|k, _| seen.contains(k));
        wanted
    }
}

fn join(hostnames: &[Hostname]) -> String {
    hostnames
        .iter()
        .map(Hostname::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}
