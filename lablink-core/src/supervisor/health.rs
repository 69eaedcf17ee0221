//! Heartbeat leases, restart detection and the recovery ladder.

use chrono::{DateTime, Utc};

use super::{span_of, Memory, Supervising, SupervisorConfig};
use crate::supervision::Shared;

use crate::supervisor::{FlagKind, LeaseConfig, VmFlag};
use crate::{Hostname, LaunchOptions, Phase, VmEvent, VmRecord, VmState};

/// Whether `record`'s heartbeat lease has run out at `now`: a ready VM whose agent has
/// heartbeated before and not within `expiry`.
fn lease_expired(record: &VmRecord, lease: &LeaseConfig, now: DateTime<Utc>) -> bool {
    matches!(record.state, VmState::Available | VmState::Assigned)
        && record
            .last_heartbeat
            .is_some_and(|beat| now - beat > span_of(lease.expiry()))
}

/// What the ladder would do next to a VM in trouble.
enum Action {
    Reboot,
    Replace,
}

impl Supervising {
    /// Marks VMs whose heartbeats stopped `Unhealthy`. They recover on their next report
    /// (see `reaction` in `lablink.rs`), so a late heartbeat never wedges a VM.
    pub(super) async fn check_leases(
        &self,
        lease: &LeaseConfig,
        records: &[VmRecord],
        now: DateTime<Utc>,
        shared: &Shared,
    ) {
        for record in records.iter().filter(|r| lease_expired(r, lease, now)) {
            let silent = record
                .last_heartbeat
                .map(|beat| (now - beat).num_seconds())
                .unwrap_or_default();
            let reason = format!("no heartbeat for {silent} s (lease expired)");
            // Decided again on the current record: a heartbeat that just arrived wins.
            let result = self
                .lablink
                .apply_if(&record.hostname, |r| {
                    let now = self.clock.now();
                    lease_expired(r, lease, now).then(|| VmEvent::MarkUnhealthy {
                        reason: reason.clone(),
                    })
                })
                .await;
            match result {
                Ok(r) if matches!(r.state, VmState::Unhealthy { .. }) => {
                    shared.status().counters.leases_expired += 1;
                    shared.event(now, format!("{}: {reason}", record.hostname));
                }
                Ok(_) => {}
                Err(e) => shared.error("lease", &e),
            }
        }
    }

    /// Records agent restarts (boot id changes counted by the store) as events.
    pub(super) fn note_restarts(
        &self,
        records: &[VmRecord],
        now: DateTime<Utc>,
        shared: &Shared,
        memory: &mut Memory,
    ) {
        for record in records {
            let seen = memory
                .restarts
                .insert(record.hostname.clone(), record.restarts);
            if let Some(seen) = seen.filter(|seen| record.restarts > *seen) {
                let n = record.restarts - seen;
                shared.status().counters.restarts_seen += u64::from(n);
                shared.event(
                    now,
                    format!(
                        "{}: agent restarted (boot id changed; {} restarts in all)",
                        record.hostname, record.restarts
                    ),
                );
            }
        }
        memory
            .restarts
            .retain(|h, _| records.iter().any(|r| &r.hostname == h));
    }

    /// Reboots, then replaces, VMs in trouble, within budgets; flags what it may not touch.
    pub(super) async fn climb_ladder(
        &self,
        config: &SupervisorConfig,
        records: &[VmRecord],
        now: DateTime<Utc>,
        shared: &Shared,
        memory: &mut Memory,
        flags: &mut Vec<VmFlag>,
    ) {
        let ladder = &config.ladder;
        let window = span_of(ladder.budget_reset_after);
        while memory
            .replacements
            .front()
            .is_some_and(|t| now - *t >= window)
        {
            memory.replacements.pop_front();
        }
        memory
            .ladder
            .retain(|h, _| records.iter().any(|r| &r.hostname == h));
        let can_reboot = self.lablink.provisioner().capabilities().reboot;

        for record in records {
            let age = now - record.state_changed_at;
            let trouble = match record.state {
                VmState::Unhealthy { .. } if age >= span_of(ladder.unhealthy_grace) => {
                    Some(format!(
                        "unhealthy: {}",
                        record.last_error.as_deref().unwrap_or("no reason given")
                    ))
                }
                VmState::Booting if age >= span_of(ladder.boot_timeout) => {
                    Some(format!("still booting after {} s", age.num_seconds()))
                }
                // An agent that cannot reset (an older client) never reports back.
                VmState::Resetting if age >= span_of(ladder.boot_timeout) => {
                    Some(format!("still resetting after {} s", age.num_seconds()))
                }
                VmState::Rebooting { .. } if age >= span_of(ladder.reboot_timeout) => {
                    Some(format!("reboot unfinished after {} s", age.num_seconds()))
                }
                _ => None,
            };
            let rung = memory.ladder.entry(record.hostname.clone()).or_default();
            let Some(trouble) = trouble else {
                // Healthy (or not yet in trouble long enough): budgets refill over time.
                if matches!(record.state, VmState::Available | VmState::Assigned) {
                    let since = *rung.healthy_since.get_or_insert(now);
                    if rung.reboots > 0 && now - since >= window {
                        rung.reboots = 0;
                        shared.event(
                            now,
                            format!("{}: healthy again; reboot budget reset", record.hostname),
                        );
                    }
                } else {
                    rung.healthy_since = None;
                }
                continue;
            };
            rung.healthy_since = None;
            if record.is_registered() {
                flags.push(VmFlag {
                    hostname: record.hostname.clone(),
                    kind: FlagKind::Registered,
                    message: format!(
                        "{trouble}; a registered machine is never rebooted or replaced by automation: check the machine, then reboot or unregister it from the admin page"
                    ),
                });
                continue;
            }
            // A reboot would bring a stuck reset back as it is: replace it.
            let action = if record.state != VmState::Resetting
                && rung.reboots < ladder.max_reboots
                && can_reboot
                && record.instance_id.is_some()
            {
                Action::Reboot
            } else {
                Action::Replace
            };
            if record.state.is_owned() {
                let would = match action {
                    Action::Reboot => "reboot",
                    Action::Replace => "replace",
                };
                flags.push(VmFlag {
                    hostname: record.hostname.clone(),
                    kind: FlagKind::NeedsAdmin,
                    message: format!(
                        "{trouble}; assigned to a participant, so automation will not {would} it: reboot or destroy it from the admin page"
                    ),
                });
                continue;
            }
            // Give the previous action time to work.
            if rung
                .last_action
                .is_some_and(|t| now - t < span_of(ladder.reboot_timeout))
            {
                continue;
            }
            match action {
                Action::Reboot => match self.lablink.start_reboot(&record.hostname).await {
                    Ok(_) => {
                        rung.reboots += 1;
                        rung.last_action = Some(now);
                        shared.status().counters.ladder_reboots += 1;
                        shared.event(
                            now,
                            format!(
                                "{}: {trouble}; rebooting ({} of {})",
                                record.hostname, rung.reboots, ladder.max_reboots
                            ),
                        );
                    }
                    Err(e) => shared.error("ladder reboot", &e),
                },
                Action::Replace if memory.replacements.len() < ladder.max_replacements as usize => {
                    let pool_refills = config.pool.enabled;
                    match self.replace(&record.hostname).await {
                        Ok(true) => {
                            rung.last_action = Some(now);
                            memory.replacements.push_back(now);
                            if !pool_refills {
                                memory.pending_launches += 1;
                            }
                            shared.status().counters.ladder_replacements += 1;
                            shared.event(
                                now,
                                format!("{}: {trouble}; replacing it", record.hostname),
                            );
                        }
                        Ok(false) => {}
                        // A launch or destroy is running: next tick.
                        Err(e) if e.is_conflict() => {}
                        Err(e) => shared.error("ladder replace", &e),
                    }
                }
                Action::Replace => flags.push(VmFlag {
                    hostname: record.hostname.clone(),
                    kind: FlagKind::LadderExhausted,
                    message: format!(
                        "{trouble}; the replacement budget ({} per {} s) is used up",
                        ladder.max_replacements,
                        ladder.budget_reset_after.as_secs()
                    ),
                }),
            }
        }
    }

    /// Destroys a VM in trouble unless someone got it in the meantime. `Ok(false)` when it
    /// was no longer replaceable. Only VMs no participant holds are replaced, so no
    /// `BeforeDestroy` step runs.
    async fn replace(&self, hostname: &Hostname) -> crate::Result<bool> {
        let taken = self
            .lablink
            .destroy_where(std::slice::from_ref(hostname), |r| {
                !r.state.is_owned()
                    && matches!(
                        r.state,
                        VmState::Booting
                            | VmState::Resetting
                            | VmState::Unhealthy { .. }
                            | VmState::Rebooting { .. }
                            | VmState::Failed
                    )
                    && r.state.phase() != Some(Phase::Assigned)
            })
            .await?;
        Ok(!taken.is_empty())
    }

    /// Launches the replacements the ladder owes (when the pool is off; the pool refills
    /// otherwise).
    pub(super) async fn launch_pending(&self, shared: &Shared, memory: &mut Memory) {
        if memory.pending_launches == 0 {
            return;
        }
        let count = memory
            .pending_launches
            .min(self.lablink.config().max_launch);
        match self.lablink.start_launch(&LaunchOptions { count }).await {
            Ok(op) => {
                memory.pending_launches -= count;
                shared.status().counters.pool_launched += count as u64;
                shared.event(op.started_at, format!("launched {count} replacement VM(s)"));
            }
            Err(e) if e.is_conflict() => {}
            Err(e) => shared.error("launch replacements", &e),
        }
    }
}
