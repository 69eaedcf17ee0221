//! The workshop settings page `/admin/settings`: the warm pool and the destruction schedule,
//! changed while the deployment runs (see [`lablink_core::settings`]). Saved in the store,
//! so the supervisor leader acts on them whichever replica served the form. `GET`/`PUT
//! /api/v1/settings` (in `v1::settings`) save through [`save`] too.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, NaiveDateTime, Timelike, Utc};
use lablink_core::settings::{PoolSettings, ScheduleSettings};
use lablink_core::{Allocator as _, AuditAction, WorkshopSettings};
use serde::Serialize;
use serde_json::json;

use super::admin_auth::{Admin, AdminForm};
use super::audit::{self, Caller, What};
use super::error::{ApiError, ApiResult};
use super::extract::{wants_json, FormOrJson};
use super::HttpState;

/// The settings page.
pub fn routes() -> Router<HttpState> {
    Router::new().route("/admin/settings", get(page).post(submit))
}

/// Saves `parsed` (settings made from their `revision`) as `caller`, recording the change
/// in the audit trail: 400 naming the bad field, 409 when someone saved since.
pub async fn save(
    state: &HttpState,
    caller: &Caller,
    parsed: ApiResult<WorkshopSettings>,
) -> ApiResult<WorkshopSettings> {
    let outcome = async {
        let mut settings = parsed?;
        settings.updated_by = Some(caller.actor().to_owned());
        let revision = settings.revision;
        let saved = state
            .allocator()
            .set_workshop_settings(&settings, revision)
            .await?;
        Ok::<_, ApiError>(saved)
    }
    .await;
    let what = What::settings(outcome.as_ref().ok().map(summary));
    audit::record(state, caller, AuditAction::SettingsChanged, what, &outcome).await;
    outcome
}

/// `d` in minutes, as the form shows it (`30`, `2.5`).
fn minutes(d: std::time::Duration) -> String {
    let m = d.as_secs_f64() / 60.0;
    if m.fract() == 0.0 {
        format!("{m:.0}")
    } else {
        format!("{}", (m * 100.0).round() / 100.0)
    }
}

/// `t` as the form shows it: `2026-12-06 17:00` (with seconds when it has some), UTC.
fn shown(t: &DateTime<Utc>) -> String {
    if t.second() == 0 {
        t.format("%Y-%m-%d %H:%M").to_string()
    } else {
        t.format("%Y-%m-%d %H:%M:%S").to_string()
    }
}

/// What the audit trail says of saved settings.
fn summary(s: &WorkshopSettings) -> String {
    let pool = match s.pool.enabled {
        true => format!(
            "pool on, K {}, M {}, idle TTL {} min",
            s.pool.min_available,
            s.pool.max_total,
            minutes(s.pool.idle_ttl)
        ),
        false => "pool off".to_owned(),
    };
    let times = &s.destruction.times;
    let schedule = match times.as_slice() {
        [] => "no destruction scheduled".to_owned(),
        [t] => format!("destruction at {} UTC", shown(t)),
        [t, rest @ ..] => format!("destruction at {} UTC and {} more", shown(t), rest.len()),
    };
    format!(
        "revision {}: {pool}; {schedule}, warning {} min",
        s.revision,
        minutes(s.destruction.warning)
    )
}

/// The form's fields, as text (what was submitted, when it is shown again with an error).
#[derive(Debug, Clone, Default, Serialize)]
struct FormView {
    revision: String,
    pool_enabled: bool,
    min_available: String,
    max_total: String,
    idle_ttl_minutes: String,
    destruction_times: String,
    warning_minutes: String,
}

impl From<&WorkshopSettings> for FormView {
    fn from(s: &WorkshopSettings) -> Self {
        Self {
            revision: s.revision.to_string(),
            pool_enabled: s.pool.enabled,
            min_available: s.pool.min_available.to_string(),
            max_total: s.pool.max_total.to_string(),
            idle_ttl_minutes: minutes(s.pool.idle_ttl),
            destruction_times: s
                .destruction
                .times
                .iter()
                .map(shown)
                .collect::<Vec<_>>()
                .join("\n"),
            warning_minutes: minutes(s.destruction.warning),
        }
    }
}

impl FormView {
    fn of(form: &FormOrJson) -> Self {
        let text = |name: &str| form.text(name).unwrap_or_default().to_owned();
        Self {
            revision: text("revision"),
            pool_enabled: form
                .text("pool_enabled")
                .is_some_and(|v| matches!(v, "on" | "true" | "1" | "yes")),
            min_available: text("min_available"),
            max_total: text("max_total"),
            idle_ttl_minutes: text("idle_ttl_minutes"),
            destruction_times: text("destruction_times"),
            warning_minutes: text("warning_minutes"),
        }
    }

    /// The settings the form means; 400 naming the first bad field.
    fn parse(&self) -> ApiResult<WorkshopSettings> {
        let count = |field: &str, text: &str| {
            text.parse::<usize>().map_err(|_| {
                ApiError::bad_request(format!("{field}: {text:?} is not a whole number"))
            })
        };
        let duration = |field: &str, text: &str| {
            text.parse::<f64>()
                .ok()
                .filter(|m| m.is_finite() && *m >= 0.0 && *m <= 1e7)
                .map(|m| std::time::Duration::from_secs_f64(m * 60.0))
                .ok_or_else(|| {
                    ApiError::bad_request(format!("{field}: {text:?} is not a number of minutes"))
                })
        };
        let revision = self.revision.parse::<u64>().map_err(|_| {
            ApiError::bad_request("revision: missing; reload the page and make your change again")
        })?;
        Ok(WorkshopSettings {
            pool: PoolSettings {
                enabled: self.pool_enabled,
                min_available: count("pool.min_available", &self.min_available)?,
                max_total: count("pool.max_total", &self.max_total)?,
                idle_ttl: duration("pool.idle_ttl", &self.idle_ttl_minutes)?,
            },
            destruction: ScheduleSettings {
                times: times(&self.destruction_times)?,
                warning: duration("destruction.warning", &self.warning_minutes)?,
            },
            revision,
            updated_at: None,
            updated_by: None,
        })
    }
}

/// The times of the form's text: one per line, RFC 3339 or `YYYY-MM-DD HH:MM[:SS]` in UTC;
/// blank lines are skipped.
fn times(text: &str) -> ApiResult<Vec<DateTime<Utc>>> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i, line.trim()))
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| {
            parse_time(line).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "destruction.times, line {}: {line:?} is not a time; write 2026-12-06 17:00 (UTC) or RFC 3339 (2026-12-06T17:00:00Z)",
                    i + 1
                ))
            })
        })
        .collect()
}

/// A time as an admin writes it: RFC 3339, or a UTC `YYYY-MM-DD HH:MM[:SS]` (also with a
/// `T`, and with a `UTC` or `Z` suffix).
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    let bare = text
        .strip_suffix("UTC")
        .or_else(|| text.strip_suffix('Z'))
        .unwrap_or(text)
        .trim();
    [
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(bare, f).ok())
    .map(|t| t.and_utc())
}

async fn page(
    State(state): State<HttpState>,
    admin: Admin,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let settings = state.allocator().workshop_settings().await?;
    if wants_json(&headers) {
        return Ok(Json(settings).into_response());
    }
    Ok(render(
        &state,
        &admin,
        StatusCode::OK,
        &settings,
        None,
        None,
    ))
}

/// The page: the form (`form`, else the settings), who saved them last, and a notice.
fn render(
    state: &HttpState,
    admin: &Admin,
    status: StatusCode,
    settings: &WorkshopSettings,
    form: Option<FormView>,
    notice: Option<(&str, &str)>,
) -> Response {
    let next = state
        .allocator()
        .supervision()
        .and_then(|s| s.destruction_at)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string());
    state.inner.templates.page(
        status,
        "settings.html",
        json!({
            "csrf": admin.csrf(),
            "form": form.unwrap_or_else(|| FormView::from(settings)),
            "revision": settings.revision,
            "updated_at": settings.updated_at.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
            "updated_by": settings.updated_by,
            "next_destruction": next,
            "now": Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            "notice": notice.map(|n| n.0),
            "notice_kind": notice.map(|n| n.1),
        }),
    )
}

async fn submit(State(state): State<HttpState>, admin: Admin, req: AdminForm) -> Response {
    let submitted = FormView::of(&req.form);
    let outcome = save(&state, &req.caller, submitted.parse()).await;
    match (outcome, req.wants_json) {
        (Ok(saved), true) => Json(saved).into_response(),
        (Err(e), true) => e.into_response(),
        (Ok(saved), false) => render(
            &state,
            &admin,
            StatusCode::OK,
            &saved,
            None,
            Some((
                "Saved. The supervisor acts on the new settings at its next tick.",
                "success",
            )),
        ),
        (Err(e), false) => {
            let current = state.allocator().workshop_settings().await;
            let Ok(current) = current else {
                return e.into_response();
            };
            let (form, message) = if e.status() == StatusCode::CONFLICT {
                // Someone saved meanwhile: show theirs, to make the change again on top.
                (
                    None,
                    "Someone changed the settings since you opened this page; here they are now. Make your change again.".to_owned(),
                )
            } else {
                let keep = FormView {
                    revision: current.revision.to_string(),
                    ..submitted
                };
                (Some(keep), e.message().to_owned())
            };
            render(
                &state,
                &admin,
                e.status(),
                &current,
                form,
                Some((&message, "error")),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_in_either_form_and_bad_lines_are_named() {
        let t =
            times("2026-12-06 17:00\n\n 2026-12-07T09:30:00Z \n2026-12-08 08:00 UTC\n").unwrap();
        assert_eq!(
            t.iter().map(|t| t.to_rfc3339()).collect::<Vec<_>>(),
            [
                "2026-12-06T17:00:00+00:00",
                "2026-12-07T09:30:00+00:00",
                "2026-12-08T08:00:00+00:00"
            ]
        );
        assert_eq!(
            parse_time("2026-12-06T18:00:00+01:00").map(|t| shown(&t)),
            Some("2026-12-06 17:00".into())
        );
        let e = times("2026-12-06 17:00\ntomorrow").unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(
            e.message().starts_with("destruction.times, line 2:"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn the_form_round_trips_the_settings_and_names_a_bad_field() {
        let mut s = WorkshopSettings::from_config(&Default::default());
        s.pool.idle_ttl = std::time::Duration::from_secs(150);
        s.destruction.times = vec![parse_time("2026-12-06 17:00").unwrap()];
        let form = FormView::from(&s);
        assert_eq!(form.idle_ttl_minutes, "2.5");
        assert_eq!(form.parse().unwrap(), s);
        let bad = FormView {
            max_total: "many".into(),
            ..form
        };
        let e = bad.parse().unwrap_err();
        assert!(
            e.message().starts_with("pool.max_total: "),
            "{}",
            e.message()
        );
    }
}
