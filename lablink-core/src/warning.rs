//! [`VmWarning`]: telling a participant, before it happens, that their VM will be destroyed
//! (the scheduled destruction) or released (idle release).
//!
//! The supervisor leader creates a warning in the store when its time comes
//! ([`VmStore::put_warning`](crate::VmStore::put_warning): at most one per VM, kind and due
//! time, whichever replica leads) and removes it when it no longer holds (the schedule
//! changed, the VM is in use again, another participant got it). The participant's page
//! shows the VM's warnings as a banner ([`VmWarning::banner`]); the VM's agent learns of
//! them through its task poll, shows a desktop notification, and acknowledges each one
//! ([`VmStore::acknowledge_warning`](crate::VmStore::acknowledge_warning)) so it is shown
//! once, across restarts of the agent, of any replica, and changes of leader. A warning
//! holds no secret.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Email, Error, Hostname};

/// What will happen to the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum WarningKind {
    /// The scheduled destruction.
    Destruction,
    /// Idle release: the VM is destroyed unless it is used.
    IdleRelease,
}

impl WarningKind {
    /// Every kind.
    pub const ALL: [Self; 2] = [Self::Destruction, Self::IdleRelease];

    /// Lower-case name, as stored and sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Destruction => "destruction",
            Self::IdleRelease => "idle_release",
        }
    }
}

impl fmt::Display for WarningKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WarningKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| Error::invalid_input(format!("unknown warning kind {s:?}")))
    }
}

/// A warning to the participant of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmWarning {
    /// Its id (the agent acknowledges it by this).
    pub id: Uuid,
    /// The VM.
    pub hostname: Hostname,
    /// What will happen.
    pub kind: WarningKind,
    /// The participant warned: the VM's owner when it was made.
    pub email: Email,
    /// When it will happen (to the second).
    pub due_at: DateTime<Utc>,
    /// What the VM's desktop notification says.
    pub message: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When the VM's agent showed it (then it is not sent to the agent again).
    pub acknowledged_at: Option<DateTime<Utc>>,
}

/// `at` as a participant reads it: `17:00 UTC`, with the date when it is not `now`'s day.
fn clock_time(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    if at.date_naive() == now.date_naive() {
        at.format("%H:%M UTC").to_string()
    } else {
        at.format("%H:%M UTC on %Y-%m-%d").to_string()
    }
}

/// The time from `now` to `at` in words: `in 14 minutes`, `in 2 hours 5 minutes`, `in less
/// than a minute`, `now`.
pub fn time_left(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (at - now).num_seconds();
    if seconds <= 0 {
        return "now".into();
    }
    if seconds < 60 {
        return "in less than a minute".into();
    }
    // Rounded up: "in 14 minutes" never means less than 14.
    let minutes = (seconds + 59) / 60;
    let plural = |n: i64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    match minutes {
        m if m < 60 => format!("in {}", plural(m, "minute")),
        m if m % 60 == 0 => format!("in {}", plural(m / 60, "hour")),
        m => format!("in {} {}", plural(m / 60, "hour"), plural(m % 60, "minute")),
    }
}

impl VmWarning {
    /// A new warning for `email`, the owner of `hostname`, that `kind` happens at `due_at`
    /// (cut to the second), made at `now`.
    pub fn new(
        hostname: Hostname,
        kind: WarningKind,
        email: Email,
        due_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Self {
        let due_at = due_at.trunc_subsecs(0);
        let when = clock_time(due_at, now);
        let message = match kind {
            WarningKind::Destruction => format!(
                "This VM will be destroyed at {when}. Save your work and copy what you need off it before then."
            ),
            WarningKind::IdleRelease => format!(
                "This VM has not been in use for a while and will be released (destroyed) at {when} unless you use it. Save your work."
            ),
        };
        Self {
            id: Uuid::new_v4(),
            hostname,
            kind,
            email,
            due_at,
            message,
            created_at: now,
            acknowledged_at: None,
        }
    }

    /// The notification's title.
    pub fn title(&self) -> &'static str {
        match self.kind {
            WarningKind::Destruction => "LabLink: this VM will be destroyed",
            WarningKind::IdleRelease => "LabLink: this VM will be released",
        }
    }

    /// What the participant's page says at `now`: `Your VM will be destroyed at 17:00 UTC,
    /// in 14 minutes — save your work.`
    pub fn banner(&self, now: DateTime<Utc>) -> String {
        let when = clock_time(self.due_at, now);
        let left = time_left(self.due_at, now);
        match (self.kind, left.as_str()) {
            (WarningKind::Destruction, "now") => {
                "Your VM is being destroyed now — save what you can.".into()
            }
            (WarningKind::Destruction, _) => {
                format!("Your VM will be destroyed at {when}, {left} — save your work.")
            }
            (WarningKind::IdleRelease, "now") => {
                "Your VM was not in use and is being released now.".into()
            }
            (WarningKind::IdleRelease, _) => format!(
                "Your VM has not been in use and will be released at {when}, {left}, unless you use it — save your work."
            ),
        }
    }
}

/// The warnings of an in-process store ([`MemoryVmStore`](crate::MemoryVmStore)): few
/// (at most a couple per VM), so kept by id and scanned.
#[derive(Debug, Default)]
pub(crate) struct WarningBook {
    by_id: BTreeMap<Uuid, VmWarning>,
}

impl WarningBook {
    /// Stores `warning` unless its VM has one of its kind and due time; the stored one.
    pub(crate) fn put(&mut self, warning: &VmWarning) -> VmWarning {
        let same = |w: &&VmWarning| {
            w.hostname == warning.hostname && w.kind == warning.kind && w.due_at == warning.due_at
        };
        if let Some(stored) = self.by_id.values().find(same) {
            return stored.clone();
        }
        self.by_id.insert(warning.id, warning.clone());
        warning.clone()
    }

    /// The warnings of `hostname` (`None`: all), by hostname, due time and kind.
    pub(crate) fn list(&self, hostname: Option<&Hostname>) -> Vec<VmWarning> {
        let mut list: Vec<VmWarning> = self
            .by_id
            .values()
            .filter(|w| hostname.is_none_or(|h| &w.hostname == h))
            .cloned()
            .collect();
        list.sort_by(|a, b| {
            (&a.hostname, a.due_at, a.kind.as_str()).cmp(&(&b.hostname, b.due_at, b.kind.as_str()))
        });
        list
    }

    /// Records that `hostname`'s agent showed warning `id` at `now` (a repeat keeps the
    /// first time).
    pub(crate) fn acknowledge(
        &mut self,
        hostname: &Hostname,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> crate::Result<VmWarning> {
        let warning = self
            .by_id
            .get_mut(&id)
            .filter(|w| &w.hostname == hostname)
            .ok_or_else(|| {
                Error::not_found("no such warning for this VM").with_context("hostname", hostname)
            })?;
        warning.acknowledged_at.get_or_insert(now);
        Ok(warning.clone())
    }

    /// Removes warnings by id; how many went.
    pub(crate) fn remove(&mut self, ids: &[Uuid]) -> usize {
        ids.iter()
            .filter(|id| self.by_id.remove(id).is_some())
            .count()
    }

    /// Removes every warning of `hostname`.
    pub(crate) fn forget(&mut self, hostname: &Hostname) {
        self.by_id.retain(|_, w| &w.hostname != hostname);
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 6, h, m, s).unwrap()
    }

    #[test]
    fn time_left_is_said_in_words_rounded_up() {
        let due = at(17, 0, 0);
        for (now, words) in [
            (at(16, 46, 0), "in 14 minutes"),
            (at(16, 46, 30), "in 14 minutes"),
            (at(16, 59, 0), "in 1 minute"),
            (at(16, 59, 30), "in less than a minute"),
            (at(17, 0, 0), "now"),
            (at(18, 0, 0), "now"),
            (at(15, 0, 0), "in 2 hours"),
            (at(14, 55, 0), "in 2 hours 5 minutes"),
            (at(15, 59, 0), "in 1 hour 1 minute"),
        ] {
            assert_eq!(time_left(due, now), words, "at {now}");
        }
    }

    #[test]
    fn the_banner_and_the_message_say_what_happens_and_when() {
        let host: Hostname = "vm-1".parse().unwrap();
        let email: Email = "ada@example.org".parse().unwrap();
        let w = VmWarning::new(
            host,
            WarningKind::Destruction,
            email,
            at(17, 0, 0) + chrono::Duration::milliseconds(300),
            at(16, 30, 0),
        );
        assert_eq!(w.due_at, at(17, 0, 0));
        assert!(
            w.message.contains("destroyed at 17:00 UTC"),
            "{}",
            w.message
        );
        assert_eq!(
            w.banner(at(16, 46, 0)),
            "Your VM will be destroyed at 17:00 UTC, in 14 minutes — save your work."
        );
        let next_day = at(16, 46, 0) - chrono::Duration::days(1);
        assert!(w.banner(next_day).contains("17:00 UTC on 2026-12-06"));
        let idle = VmWarning {
            kind: WarningKind::IdleRelease,
            ..w
        };
        assert!(idle.banner(at(16, 46, 0)).contains("released at 17:00 UTC"));
        for kind in WarningKind::ALL {
            assert_eq!(kind.as_str().parse::<WarningKind>().unwrap(), kind);
        }
    }
}
