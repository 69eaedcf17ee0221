//! `GET`/`PUT /api/v1/settings`: the workshop settings (the warm pool and the destruction
//! schedule) that every replica's supervisor leader acts on.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use lablink_core::settings::{PoolSettings, ScheduleSettings};
use lablink_core::{Allocator as _, WorkshopSettings};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::ErrorBody;
use crate::http::admin_auth::{Admin, AdminForm};
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{shorten, FormOrJson};
use crate::http::HttpState;

/// The settings in force (revision 0: the config's, none saved yet).
#[utoipa::path(get, path = "/api/v1/settings", tag = "admin",
    responses((status = 200, body = WorkshopSettings), (status = 401, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn get_settings(
    State(state): State<HttpState>,
    _admin: Admin,
) -> ApiResult<Json<WorkshopSettings>> {
    Ok(Json(state.allocator().workshop_settings().await?))
}

/// Saves new settings: the whole body as `GET` gave it, changed, with the `revision` read.
/// Times are RFC 3339, durations seconds; times are kept sorted and to the second. The
/// supervisor leader acts on them at its next tick, whichever replica saved them.
#[utoipa::path(put, path = "/api/v1/settings", tag = "admin", request_body = WorkshopSettings,
    responses((status = 200, description = "Saved, as the next revision", body = WorkshopSettings),
        (status = 400, description = "A bad value; the message names its field (`pool.max_total: ...`)", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 409, description = "Someone saved since `revision`: read them again", body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn put_settings(
    State(state): State<HttpState>,
    req: AdminForm,
) -> ApiResult<Json<WorkshopSettings>> {
    let parsed = parse(&req.form);
    crate::http::settings::save(&state, &req.caller, parsed)
        .await
        .map(Json)
}

fn bad(message: String) -> ApiError {
    ApiError::bad_request(shorten(message))
}

/// `path.name`, or `name` at the top.
fn join(path: &str, name: &str) -> String {
    match path {
        "" => name.to_owned(),
        path => format!("{path}.{name}"),
    }
}

/// The object at `path`, which may hold only `known` fields.
fn object<'a>(value: &'a Value, path: &str, known: &[&str]) -> ApiResult<&'a Map<String, Value>> {
    let map = value
        .as_object()
        .ok_or_else(|| bad(format!("{path}: must be an object")))?;
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(bad(format!("{}: unknown field", join(path, unknown)))),
        None => Ok(map),
    }
}

/// Field `name` of the object at `path`, typed.
fn field<T: DeserializeOwned>(map: &Map<String, Value>, path: &str, name: &str) -> ApiResult<T> {
    let full = join(path, name);
    let value = map
        .get(name)
        .ok_or_else(|| bad(format!("{full}: missing")))?;
    serde_json::from_value(value.clone()).map_err(|e| bad(format!("{full}: {e}")))
}

/// A duration field, in seconds.
fn seconds(map: &Map<String, Value>, path: &str, name: &str) -> ApiResult<Duration> {
    let secs: f64 = field(map, path, name)?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| bad(format!("{}: must be a number of seconds", join(path, name))))
}

/// The settings a body sends, each bad or unknown field named (`pool.min_available: ...`).
fn parse(form: &FormOrJson) -> ApiResult<WorkshopSettings> {
    let mut fields = form.fields.clone();
    // A browser session may send its CSRF token in the body.
    fields.remove("csrf");
    let root = Value::Object(fields);
    let top = object(
        &root,
        "",
        &[
            "pool",
            "destruction",
            "revision",
            "updated_at",
            "updated_by",
        ],
    )?;
    let pool = object(
        top.get("pool").ok_or_else(|| bad("pool: missing".into()))?,
        "pool",
        &["enabled", "min_available", "max_total", "idle_ttl"],
    )?;
    let destruction = object(
        top.get("destruction")
            .ok_or_else(|| bad("destruction: missing".into()))?,
        "destruction",
        &["times", "warning"],
    )?;
    Ok(WorkshopSettings {
        pool: PoolSettings {
            enabled: field(pool, "pool", "enabled")?,
            min_available: field(pool, "pool", "min_available")?,
            max_total: field(pool, "pool", "max_total")?,
            idle_ttl: seconds(pool, "pool", "idle_ttl")?,
        },
        destruction: ScheduleSettings {
            times: field::<Vec<DateTime<Utc>>>(destruction, "destruction", "times")?,
            warning: seconds(destruction, "destruction", "warning")?,
        },
        revision: field(top, "", "revision")?,
        updated_at: None,
        updated_by: None,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body(v: Value) -> FormOrJson {
        FormOrJson {
            fields: v.as_object().unwrap().clone(),
        }
    }

    fn valid() -> Value {
        json!({
            "pool": {"enabled": true, "min_available": 2, "max_total": 10, "idle_ttl": 1800},
            "destruction": {"times": ["2026-12-06T17:00:00Z"], "warning": 900},
            "revision": 3,
            "updated_at": null,
            "updated_by": "admin (basic)",
        })
    }

    #[test]
    fn a_body_as_get_gives_it_parses() {
        let s = parse(&body(valid())).unwrap();
        assert_eq!(s.revision, 3);
        assert_eq!(s.pool.idle_ttl, Duration::from_secs(1800));
        assert_eq!(s.destruction.times.len(), 1);
        assert_eq!(s.updated_by, None, "who saved is the caller, not the body");
    }

    #[test]
    fn every_bad_field_is_named() {
        for (change, field) in [
            (
                json!({"pool": {"enabled": true, "min_available": "two", "max_total": 10, "idle_ttl": 1}}),
                "pool.min_available: ",
            ),
            (
                json!({"pool": {"enabled": true, "min_available": 2, "max_total": 10}}),
                "pool.idle_ttl: missing",
            ),
            (
                json!({"pool": {"enabled": true, "min_available": 2, "max_total": 10, "idle_ttl": -1}}),
                "pool.idle_ttl: ",
            ),
            (
                json!({"pool": {"enabled": true, "min_available": 2, "max_total": 10, "idle_ttl": 1, "k": 1}}),
                "pool.k: unknown field",
            ),
            (
                json!({"destruction": {"times": ["tomorrow"], "warning": 1}}),
                "destruction.times: ",
            ),
            (
                json!({"destruction": {"times": [], "warning": "x"}}),
                "destruction.warning: ",
            ),
            (json!({"revision": null}), "revision: "),
            (json!({"pools": {}}), "pools: unknown field"),
        ] {
            let mut v = valid();
            for (k, x) in change.as_object().unwrap() {
                v[k] = x.clone();
            }
            let e = parse(&body(v)).unwrap_err();
            assert!(e.message().starts_with(field), "{field}: {}", e.message());
        }
    }
}
