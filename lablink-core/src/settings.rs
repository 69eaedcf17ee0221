//! [`WorkshopSettings`]: what an admin changes while a deployment runs — the warm pool and
//! the destruction schedule — kept in the store so every replica's supervisor, whichever
//! leads, acts on the same values.
//!
//! The config file ([`SupervisorConfig`]) gives the initial values
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

use crate::clock::span_of;
use crate::supervisor::{PoolConfig, SupervisorConfig};
use crate::{Error, Result, VmStore};

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

/// The warm pool's runtime part ([`PoolConfig`] keeps the rest: windows, prewarm, demand).
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

fn problem(field: &'static str, message: impl Into<String>) -> SettingsProblem {
    SettingsProblem {
        field,
        message: message.into(),
    }
}

/// `d` cut to whole seconds.
fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

impl WorkshopSettings {
    /// The initial settings of a deployment: its config's pool and destruction time, at
    /// revision 0.
    pub fn from_config(config: &SupervisorConfig) -> Self {
        Self {
            pool: PoolSettings {
                enabled: config.pool.enabled,
                min_available: config.pool.min_available,
                max_total: config.pool.max_total,
                idle_ttl: config.pool.idle_ttl,
            },
            destruction: ScheduleSettings {
                times: config.destruction.at.into_iter().collect(),
                warning: config.destruction.warning,
            },
            revision: 0,
            updated_at: None,
            updated_by: None,
        }
    }

    /// `config` with this pool in place of its own (windows, prewarm and demand stay). The
    /// schedule is not a config value: the supervisor takes it from these settings.
    pub fn apply_to(&self, config: &SupervisorConfig) -> SupervisorConfig {
        let mut c = config.clone();
        c.pool.enabled = self.pool.enabled;
        c.pool.min_available = self.pool.min_available;
        c.pool.max_total = self.pool.max_total;
        c.pool.idle_ttl = self.pool.idle_ttl;
        c
    }

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
    /// pool's rules of [`SupervisorConfig::problems`] and bounds ([`MAX_POOL`],
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

    /// [`problems`](Self::problems) and the deployment's own rules: `max_total` holds every
    /// configured pool window's minimum, and a time in the past must be one `current`
    /// already holds (a new one would destroy VMs at once). `InvalidInput` listing every
    /// problem, each naming its field.
    pub fn check(
        &self,
        config: &SupervisorConfig,
        current: &WorkshopSettings,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let mut p = self.problems();
        if let Some(w) = config
            .pool
            .windows
            .iter()
            .find(|w| w.min_available > self.pool.max_total)
        {
            p.push(problem(
                "pool.max_total",
                format!(
                    "must be at least {}, the minimum of the pool window from {}",
                    w.min_available,
                    w.start.to_rfc3339()
                ),
            ));
        }
        if let Some(t) = self.destruction.times.iter().find(|t| {
            **t <= now
                && !current
                    .destruction
                    .times
                    .iter()
                    .any(|c| c.trunc_subsecs(0) == **t)
        }) {
            p.push(problem(
                "destruction.times",
                format!(
                    "{} has passed; a new time must be in the future",
                    t.format("%Y-%m-%d %H:%M:%S UTC")
                ),
            ));
        }
        if p.is_empty() {
            return Ok(());
        }
        let message = p.iter().map(ToString::to_string).collect::<Vec<_>>();
        Err(Error::invalid_input(message.join("; ")).with_context("field", p[0].field))
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
        now >= at - span_of(self.warning)
    }

    /// Whether the warm pool must launch nothing at `now`: a time has passed, and no pool
    /// window that starts after the latest passed one is on (counting its prewarm).
    pub fn pauses_pool(&self, pool: &PoolConfig, now: DateTime<Utc>) -> bool {
        let Some(last) = self.last_passed(now) else {
            return false;
        };
        !pool
            .windows
            .iter()
            .any(|w| w.start > last && w.is_on(pool.prewarm, now))
    }
}

/// The settings in force: the stored ones, or `config`'s when none were saved.
pub(crate) async fn current(
    store: &dyn VmStore,
    config: &SupervisorConfig,
) -> Result<WorkshopSettings> {
    Ok(store
        .workshop_settings()
        .await?
        .unwrap_or_else(|| WorkshopSettings::from_config(config)))
}

/// Saves `settings` (normalized and checked) if they were made from `expected_revision`.
pub(crate) async fn save(
    store: &dyn VmStore,
    config: &SupervisorConfig,
    settings: &WorkshopSettings,
    expected_revision: u64,
    now: DateTime<Utc>,
) -> Result<WorkshopSettings> {
    let stored = current(store, config).await?;
    let settings = WorkshopSettings {
        revision: expected_revision,
        updated_at: Some(now),
        ..settings.clone().normalized()
    };
    settings.check(config, &stored, now)?;
    let saved = store
        .put_workshop_settings(&settings, expected_revision)
        .await?;
    tracing::info!(
        revision = saved.revision,
        by = saved.updated_by.as_deref().unwrap_or(""),
        pool_enabled = saved.pool.enabled,
        min_available = saved.pool.min_available,
        max_total = saved.pool.max_total,
        destruction_times = saved.destruction.times.len(),
        "workshop settings saved"
    );
    Ok(saved)
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
    use crate::supervisor::PoolWindow;

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
    fn the_config_gives_the_initial_settings_and_they_overlay_it_back() {
        let mut config = SupervisorConfig::default();
        config.pool.enabled = true;
        config.pool.min_available = 3;
        config.destruction.at = Some(at(17, 0));
        let s = WorkshopSettings::from_config(&config);
        assert_eq!(s.revision, 0);
        assert_eq!((s.pool.enabled, s.pool.min_available), (true, 3));
        assert_eq!(s.destruction.times, [at(17, 0)]);
        assert!(s.problems().is_empty());
        let mut changed = s.clone();
        changed.pool.min_available = 5;
        changed.pool.idle_ttl = Duration::from_secs(60);
        let overlaid = changed.apply_to(&config);
        assert_eq!(overlaid.pool.min_available, 5);
        assert_eq!(overlaid.pool.idle_ttl, Duration::from_secs(60));
        assert_eq!(overlaid.tick, config.tick, "the rest is the config's");
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

    #[test]
    fn a_new_past_time_and_a_max_below_a_window_are_refused_an_old_past_time_is_kept() {
        let mut config = SupervisorConfig::default();
        config.pool.windows = vec![PoolWindow {
            start: at(13, 0),
            end: at(18, 0),
            min_available: 20,
        }];
        let mut current = WorkshopSettings::from_config(&config);
        current.destruction.times = vec![at(9, 0)];
        let now = at(12, 0);
        let mut s = current.clone();
        s.destruction.times = vec![at(9, 0), at(17, 0)];
        assert!(s.check(&config, &current, now).is_ok(), "9:00 was there");
        s.destruction.times = vec![at(11, 0), at(17, 0)];
        let e = s.check(&config, &current, now).unwrap_err();
        assert!(e.message().starts_with("destruction.times: "), "{e}");
        s.destruction.times.clear();
        s.pool.max_total = 10;
        let e = s.check(&config, &current, now).unwrap_err();
        assert!(e.message().starts_with("pool.max_total: "), "{e}");
    }

    #[test]
    fn the_schedule_names_the_next_and_the_passed_times_and_pauses_the_pool() {
        let schedule = ScheduleSettings {
            times: vec![at(9, 0), at(17, 0)],
            warning: Duration::from_secs(1800),
        };
        assert_eq!(schedule.next(Some(at(8, 0))), Some(at(9, 0)));
        assert_eq!(schedule.next(Some(at(9, 0))), Some(at(17, 0)));
        assert_eq!(schedule.shown(at(18, 0)), Some(at(17, 0)));
        assert_eq!(schedule.last_passed(at(8, 59)), None);
        assert_eq!(schedule.destroying(at(10, 0)), Some(at(17, 0)));
        assert!(!schedule.warns(at(17, 0), at(16, 29)));
        assert!(schedule.warns(at(17, 0), at(16, 30)));
        let mut pool = PoolConfig::default();
        assert!(!schedule.pauses_pool(&pool, at(8, 0)));
        assert!(schedule.pauses_pool(&pool, at(10, 0)));
        // A second day: a window after 9:00 (with its prewarm) lets the pool launch again.
        pool.windows = vec![PoolWindow {
            start: at(13, 0),
            end: at(16, 0),
            min_available: 4,
        }];
        pool.prewarm = Duration::from_secs(600);
        assert!(schedule.pauses_pool(&pool, at(12, 49)));
        assert!(!schedule.pauses_pool(&pool, at(12, 50)));
        assert!(schedule.pauses_pool(&pool, at(16, 0)));
        assert!(schedule.pauses_pool(&pool, at(17, 30)), "17:00 passed");
    }
}
