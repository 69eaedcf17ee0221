//! Warnings to participants: the leader works out at every tick which warnings should exist
//! (the scheduled destruction's, idle release's), makes the missing ones in the store and
//! removes those that no longer hold. Kept in the store, so a new leader or a restarted
//! replica neither loses nor repeats one: it finds them there, and finds an idle VM's release
//! time in its warning.

use chrono::{DateTime, SubsecRound, Utc};

use super::{Memory, Supervising};
use crate::settings::ScheduleSettings;
use crate::supervision::Shared;
use crate::supervisor::IdleReleaseConfig;
use crate::{Email, Hostname, VmRecord, VmState, VmWarning, WarningKind};

/// A warning the leader wants to exist: its VM, kind, participant and due time (to the
/// second, as stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Wanted {
    hostname: Hostname,
    kind: WarningKind,
    email: Email,
    due_at: DateTime<Utc>,
}

impl Wanted {
    pub(super) fn new(
        hostname: &Hostname,
        kind: WarningKind,
        email: &Email,
        due_at: DateTime<Utc>,
    ) -> Self {
        Self {
            hostname: hostname.clone(),
            kind,
            email: email.clone(),
            due_at: due_at.trunc_subsecs(0),
        }
    }

    fn is(&self, w: &VmWarning) -> bool {
        self.hostname == w.hostname
            && self.kind == w.kind
            && self.email == w.email
            && self.due_at == w.due_at
    }
}

/// The destruction warnings due at `now`: for every VM a participant holds, the time that
/// destroys it (the first after its creation), from `warning` before it until it is gone.
pub(super) fn destruction_warnings(
    schedule: &ScheduleSettings,
    records: &[VmRecord],
    now: DateTime<Utc>,
) -> Vec<Wanted> {
    if schedule.warning.is_zero() {
        return Vec::new();
    }
    records
        .iter()
        .filter(|r| !matches!(r.state, VmState::Terminating | VmState::Terminated))
        .filter_map(|r| {
            let email = r.owner()?;
            let at = schedule.destroying(r.created_at)?;
            schedule
                .warns(at, now)
                .then(|| Wanted::new(&r.hostname, WarningKind::Destruction, email, at))
        })
        .collect()
}

/// Picks up the idle clocks of a previous leader from its stored idle warnings: a VM warned
/// to be released at `T` has been idle since `T - after`, so the release stays at `T`.
pub(super) fn resume_idle_clocks(
    stored: &[VmWarning],
    config: &IdleReleaseConfig,
    memory: &mut Memory,
) {
    for w in stored.iter().filter(|w| w.kind == WarningKind::IdleRelease) {
        memory
            .idle_since
            .entry((w.hostname.clone(), w.email.clone()))
            .or_insert(crate::clock::before(w.due_at, config.after));
    }
}

impl Supervising {
    /// Makes the `wanted` warnings that `stored` lacks and removes the stored ones no
    /// longer wanted (the schedule changed, the VM is in use again or has another
    /// participant). A failure is retried next tick.
    pub(super) async fn sync_warnings(
        &self,
        stored: &[VmWarning],
        wanted: &[Wanted],
        now: DateTime<Utc>,
        shared: &Shared,
    ) {
        let stale: Vec<_> = stored
            .iter()
            .filter(|w| !wanted.iter().any(|x| x.is(w)))
            .collect();
        if !stale.is_empty() {
            let ids: Vec<_> = stale.iter().map(|w| w.id).collect();
            match self.store.remove_warnings(&ids).await {
                Ok(_) => {
                    for w in stale {
                        shared.event(
                            now,
                            format!(
                                "{}: {} warning for {} withdrawn",
                                w.hostname,
                                w.kind,
                                w.due_at.format("%Y-%m-%d %H:%M:%S UTC")
                            ),
                        );
                    }
                }
                Err(e) => shared.error("withdraw warnings", &e),
            }
        }
        let mut made = 0;
        for x in wanted.iter().filter(|x| !stored.iter().any(|w| x.is(w))) {
            let warning =
                VmWarning::new(x.hostname.clone(), x.kind, x.email.clone(), x.due_at, now);
            match self.store.put_warning(&warning).await {
                Ok(_) => {
                    made += 1;
                    tracing::info!(hostname = %x.hostname, kind = %x.kind, due_at = %x.due_at, "participant warned");
                    shared.event(
                        now,
                        format!(
                            "{}: participant warned ({} at {})",
                            x.hostname,
                            x.kind,
                            x.due_at.format("%Y-%m-%d %H:%M:%S UTC")
                        ),
                    );
                }
                // The VM went meanwhile.
                Err(e) if e.is_not_found() => {}
                Err(e) => shared.error("warn participants", &e),
            }
        }
        shared.status().counters.warnings_made += made;
    }
}
