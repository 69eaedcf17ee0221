//! [`WorkshopSettings`]: what an admin changes while a deployment runs — the warm pool and
//! the destruction schedule — kept in the store so every replica's supervisor, whichever
//! leads, acts on the same values.
//!
//! The config file ([`SupervisorConfig`](crate::SupervisorConfig)) gives the initial values
//! ([`WorkshopSettings::from_config`]); once an admin saved settings
//! ([`Allocator::set_workshop_settings`](crate::Allocator::set_workshop_settings)), the stored
//! ones win ([`VmStore::workshop_settings`](crate::VmStore::workshop_settings)). Every save
//! is optimistic: it names the [`revision`](WorkshopSettings::revision) it was made from and
//! fails with [`ErrorKind::Conflict`](crate::ErrorKind::Conflict) when someone saved since.
//!
//! The supervisor leader reads them at every tick and overlays them on its config
//! ([`WorkshopSettings::apply_to`]); the schedule's times drive the scheduled destruction
//! ([`ScheduleSettings`]).

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Most VMs a pool setting (`min_available`, `max_total`) may name.
pub const MAX_POOL: usize = 10_000;
/// Longest a free VM beyond the minimum may stay idle before the pool destroys it.
pub const MAX_IDLE_TTL: Duration = Duration::from_secs(7 * 86_400);
/// Most destruction times a schedule holds.
pub const MAX_TIMES: usize = 100;
/// Longest warning before a destruction.
pub const MAX_WARNING: Duration = Duration::from_secs(24 * 3600);

/// The runtime settings of a workshop: the warm pool and the destruction schedule, with the
/// revision they were saved as and by whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkshopSettings {
    /// The warm pool.
    pub pool: PoolSettings,
    /// When every VM is destroyed.
    pub destruction: ScheduleSettings,
    /// Incremented by every save; 0 while none was saved (the config's values). A save
    /// names the revision it was made from.
    pub revision: u64,
    /// When they were last saved.
    #[serde(default)]
    pub updated_at: Option<DateTime<Utc>>,
    /// Who saved them last (an admin's name and how they signed in).
    #[serde(default)]
    pub updated_by: Option<String>,
}

/// The warm pool's runtime part ([`PoolConfig`](crate::supervisor::PoolConfig) keeps the
/// rest: windows, prewarm, demand).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolSettings {
    /// On or off.
    pub enabled: bool,
    /// K: free VMs (available, booting or requested) to keep.
    pub min_available: usize,
    /// M: most VMs in total.
    pub max_total: usize,
    /// How long a free VM beyond K may sit idle before it is destroyed, in seconds.
    #[serde(with = "crate::clock::seconds")]
    #[cfg_attr(feature = "openapi", schema(value_type = f64))]
    pub idle_ttl: Duration,
}

/// When the deployment's VMs are destroyed: at each time `T` of `times`, every VM created
/// before `T` (and not destroyed yet) is destroyed; from `T - warning` its participant is
/// warned. The warm pool launches nothing from the latest passed time on, unless a pool
/// window that starts after it is on (a second day).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleSettings {
    /// The times (RFC 3339), ascending, without repeats; empty: never.
    pub times: Vec<DateTime<Utc>>,
    /// How long before each time the warnings start, in seconds (0: no warning).
    #[serde(with = "crate::clock::seconds")]
    #[cfg_attr(feature = "openapi", schema(value_type = f64))]
    pub warning: Duration,
}

/// One thing wrong with settings: the field (`pool.max_total`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsProblem {
    /// The field's path, as in the JSON body (`destruction.times`).
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for SettingsProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl SettingsProblem {
    /// `message` about `field`.
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

fn problem(field: &'static str, message: impl Into<String>) -> SettingsProblem {
    SettingsProblem::new(field, message)
}

/// `d` cut to whole seconds.
fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

impl WorkshopSettings {
    /// The same settings as an admin means them: times ascending, without repeats, to the
    /// second; durations to the second.
    pub fn normalized(mut self) -> Self {
        self.pool.idle_ttl = whole_seconds(self.pool.idle_ttl);
        self.destruction.warning = whole_seconds(self.destruction.warning);
        for t in &mut self.destruction.times {
            *t = t.trunc_subsecs(0);
        }
        self.destruction.times.sort();
        self.destruction.times.dedup();
        self
    }

    /// Every problem with these settings, one per field and rule (empty when valid): the
    /// pool's rules of [`SupervisorConfig::problems`](crate::SupervisorConfig::problems) and
    /// bounds ([`MAX_POOL`],
    /// [`MAX_IDLE_TTL`]); times ascending without repeats, at most [`MAX_TIMES`] of them,
    /// in the years 2000–2199; a warning of at most [`MAX_WARNING`].
    pub fn problems(&self) -> Vec<SettingsProblem> {
        let mut p = Vec::new();
        let pool = &self.pool;
        if pool.min_available > MAX_POOL {
            p.push(problem(
                "pool.min_available",
                format!("must be at most {MAX_POOL}"),
            ));
        }
        if pool.max_total > MAX_POOL {
            p.push(problem(
                "pool.max_total",
                format!("must be at most {MAX_POOL}"),
            ));
        }
        if pool.max_total < pool.min_available {
            p.push(problem(
                "pool.max_total",
                format!(
                    "must be at least pool.min_available ({})",
                    pool.min_available
                ),
            ));
        }
        if pool.idle_ttl > MAX_IDLE_TTL {
            p.push(problem("pool.idle_ttl", "must be at most 7 days"));
        }
        let times = &self.destruction.times;
        if times.len() > MAX_TIMES {
            p.push(problem(
                "destruction.times",
                format!("at most {MAX_TIMES} times"),
            ));
        }
        if times.windows(2).any(|w| w[0] >= w[1]) {
            p.push(problem(
                "destruction.times",
                "must be in ascending order, without repeats",
            ));
        }
        let earliest = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap();
        let latest = Utc.with_ymd_and_hms(2200, 1, 1, 0, 0, 0).unwrap();
        if let Some(t) = times.iter().find(|t| !(earliest..latest).contains(*t)) {
            p.push(problem(
                "destruction.times",
                format!("{} is not a plausible time", t.to_rfc3339()),
            ));
        }
        if self.destruction.warning > MAX_WARNING {
            p.push(problem("destruction.warning", "must be at most 24 hours"));
        }
        p
    }
}

impl ScheduleSettings {
    /// The first time after `now` (`None`: the first time of all).
    pub fn next(&self, now: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
        self.times
            .iter()
            .copied()
            .find(|t| now.is_none_or(|now| *t > now))
    }

    /// The latest time at or before `now`.
    pub fn last_passed(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.times.iter().copied().filter(|t| *t <= now).max()
    }

    /// The time that destroys a VM created at `created_at`: the first one after it.
    pub fn destroying(&self, created_at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.next(Some(created_at))
    }

    /// The destruction to show at `now`: the next one, or the last one once all passed.
    pub fn shown(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.next(Some(now)).or_else(|| self.last_passed(now))
    }

    /// Whether the warning before `at` is on at `now` (also once `at` passed).
    pub fn warns(&self, at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        now >= crate::clock::before(at, self.warning)
    }
}

/// What an in-process store does on
/// [`put_workshop_settings`](crate::VmStore::put_workshop_settings): `slot` holds the stored
/// settings.
pub(crate) fn put(
    slot: &mut Option<WorkshopSettings>,
    settings: &WorkshopSettings,
    expected_revision: u64,
) -> Result<WorkshopSettings> {
    let stored = slot.as_ref().map_or(0, |s| s.revision);
    if stored != expected_revision {
        return Err(conflict(expected_revision, stored));
    }
    let saved = WorkshopSettings {
        revision: expected_revision + 1,
        ..settings.clone()
    };
    *slot = Some(saved.clone());
    Ok(saved)
}

/// The error of a save made from `expected` when revision `stored` is stored.
pub fn conflict(expected: u64, stored: u64) -> Error {
    Error::conflict(format!(
        "the settings were changed since revision {expected} (they are at revision {stored} now): read them again and make your change on those"
    ))
    .with_operation("put workshop settings")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SupervisorConfig;

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 6, h, m, 0).unwrap()
    }

    fn settings() -> WorkshopSettings {
        WorkshopSettings::from_config(&SupervisorConfig::default())
    }

    fn fields(s: &WorkshopSettings) -> Vec<&'static str> {
        s.problems().iter().map(|p| p.field).collect()
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut s = settings();
        s.pool.min_available = 5;
        s.pool.max_total = 4;
        assert_eq!(fields(&s), ["pool.max_total"]);
        s.pool.max_total = MAX_POOL + 1;
        s.pool.min_available = MAX_POOL + 1;
        assert_eq!(fields(&s), ["pool.min_available", "pool.max_total"]);
        let mut s = settings();
        s.pool.idle_ttl = MAX_IDLE_TTL + Duration::from_secs(1);
        s.destruction.warning = MAX_WARNING + Duration::from_secs(1);
        s.destruction.times = vec![at(17, 0), at(9, 0)];
        assert_eq!(
            fields(&s),
            ["pool.idle_ttl", "destruction.times", "destruction.warning"]
        );
        s = settings();
        s.destruction.times = vec![Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap()];
        assert_eq!(fields(&s), ["destruction.times"]);
        s.destruction.times = (0..=MAX_TIMES as i64)
            .map(|i| at(0, 0) + chrono::Duration::minutes(i))
            .collect();
        assert_eq!(fields(&s), ["destruction.times"]);
    }

    #[test]
    fn normalizing_sorts_and_deduplicates_times_to_the_second() {
        let mut s = settings();
        s.destruction.times = vec![
            at(17, 0) + chrono::Duration::milliseconds(400),
            at(9, 0),
            at(17, 0),
        ];
        s.destruction.warning = Duration::from_millis(90_500);
        let s = s.normalized();
        assert_eq!(s.destruction.times, [at(9, 0), at(17, 0)]);
        assert_eq!(s.destruction.warning, Duration::from_secs(90));
        assert!(s.problems().is_empty());
    }
}
