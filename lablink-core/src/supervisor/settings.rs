//! The [`WorkshopSettings`] the supervisor acts on: built from its config for their initial
//! values, checked against the deployment's config, read from (and saved to) the store, and
//! overlaid on the config at every tick.

use chrono::{DateTime, SubsecRound, Utc};

use super::config::{PoolConfig, SupervisorConfig};
use crate::settings::{PoolSettings, ScheduleSettings, SettingsProblem, WorkshopSettings};
use crate::{Error, Result, VmStore};

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
            p.push(SettingsProblem::new(
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
            p.push(SettingsProblem::new(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::PoolWindow;
    use chrono::TimeZone;
    use std::time::Duration;

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 6, h, m, 0).unwrap()
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
