//! What the fleet was used for and what it cost (`GET /api/v1/usage`, the admin page's cost
//! panel), and the export of a workshop (`GET /api/v1/export?format=csv|json`): per VM, the
//! current ones and those already removed, who had it and when, how it started, its health
//! changes, its time by kind and estimated cost, and its collection; the audit trail too.
//! Never a token, a Chrome Remote Desktop command, a code or a PIN: the rows are built from
//! named fields only, none of which holds one.

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use lablink_core::audit::AuditQuery;
use lablink_core::record::{HealthChange, PastAssignment};
use lablink_core::usage::Seconds;
use lablink_core::Allocator as _;
use lablink_core::{Prices, RemovedVm, UsageKind, VmFilter, VmRecord};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use lablink_core::audit::AuditAction;
use utoipa::IntoParams;

use super::admin_auth::Admin;
use super::audit::{self, Caller, What};
use super::client::ClientAddr;
use super::error::{ApiError, ApiResult};
use super::extract::ApiQuery;
use super::HttpState;
use lablink_protocol::ErrorBody;

/// Most audit entries an export carries (the newest).
const EXPORT_AUDIT_ENTRIES: usize = 100_000;

/// The fleet's usage and estimated cost now, for the API, the admin page and `/metrics`:
/// hours by kind, overall and per instance type, with each type's price and cost.
pub async fn usage_view(state: &HttpState) -> ApiResult<Value> {
    let usage = state.allocator().usage().await?;
    let prices = &state.options().prices;
    let (cost, unpriced) = usage.cost(prices);
    let by_type: serde_json::Map<String, Value> = usage
        .by_instance_type
        .iter()
        .map(|(instance_type, seconds)| {
            let price = prices.hourly(Some(instance_type));
            let hours = hours_of(seconds);
            let cost = price.map(|p| round(seconds.total() / 3600.0 * p));
            (
                instance_type.clone(),
                json!({ "hours": hours, "hourly_price": price, "cost": cost }),
            )
        })
        .collect();
    Ok(json!({
        "hours": hours_of(&usage.seconds()),
        "cost": round(cost),
        "currency": prices.currency,
        "unpriced_instance_types": unpriced,
        "by_instance_type": by_type,
    }))
}

/// Hours by kind, and their total, to the hundredth.
fn hours_of(seconds: &Seconds) -> Value {
    let mut hours = serde_json::Map::new();
    for kind in UsageKind::ALL {
        hours.insert(
            kind.as_str().into(),
            json!(round(seconds.get(kind) / 3600.0)),
        );
    }
    hours.insert("total".into(), json!(round(seconds.total() / 3600.0)));
    Value::Object(hours)
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `GET /api/v1/usage` (admin).
#[utoipa::path(get, path = "/api/v1/usage", tag = "admin",
    responses((status = 200, description = "VM-hours by kind since the deployment began (destroyed VMs included), overall and per instance type, and the estimated cost: `{hours, cost, currency, unpriced_instance_types, by_instance_type}`", content_type = "application/json"),
        (status = 401, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn usage(State(state): State<HttpState>, _admin: Admin) -> ApiResult<Json<Value>> {
    Ok(Json(usage_view(&state).await?))
}

/// Query of the export.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ExportQuery {
    /// `csv` (the default) or `json`.
    format: Option<String>,
    /// For CSV: `vms` (the default) or `audit`.
    table: Option<String>,
}

/// One VM in the export.
#[derive(Debug, Serialize)]
struct VmRow {
    hostname: String,
    /// `launched` or `registered`.
    origin: &'static str,
    instance_id: Option<String>,
    instance_type: Option<String>,
    address: Option<String>,
    /// Its state now, or `removed`.
    state: String,
    created_at: DateTime<Utc>,
    /// When a removed VM's record last changed (its termination).
    ended_at: Option<DateTime<Utc>>,
    /// Who holds it now, and since when.
    participant: Option<String>,
    assigned_at: Option<DateTime<Utc>>,
    /// Who had it before.
    past_participants: Vec<PastAssignment>,
    provision_seconds: Option<f64>,
    startup_seconds: Option<f64>,
    cloud_init_seconds: Option<f64>,
    container_seconds: Option<f64>,
    restarts: u32,
    gpu_health: String,
    health_changes: Vec<HealthChange>,
    hours: Value,
    estimated_cost: Option<f64>,
    collection: Option<String>,
    collected_files: Option<usize>,
    collected_bytes: Option<u64>,
    last_error: Option<String>,
}

impl VmRow {
    /// The CSV header, in [`csv_fields`](Self::csv_fields) order.
    const CSV_HEADER: &'static str = "hostname,origin,instance_id,instance_type,address,state,created_at,ended_at,participant,assigned_at,past_participants,provision_seconds,startup_seconds,cloud_init_seconds,container_seconds,restarts,gpu_health,health_changes,starting_hours,free_hours,in_use_hours,idle_hours,other_hours,total_hours,estimated_cost,collection,collected_files,collected_bytes,last_error";

    /// A current VM: what a removed one shows, with its state, its participant and its
    /// time up to `now`.
    fn new(state: &HttpState, record: &VmRecord, now: DateTime<Utc>) -> Self {
        let seconds = record.usage_at(now);
        let mut row = Self::removed(state, &RemovedVm::from(record));
        row.state = record.state.as_str().to_owned();
        row.ended_at = None;
        row.participant = record.owner().map(ToString::to_string);
        row.assigned_at = record.assignment.as_ref().map(|a| a.assigned_at);
        // The current participant is not a past one.
        row.past_participants
            .clone_from(&record.history.assignments);
        row.hours = hours_of(&seconds);
        row.estimated_cost = cost_of(
            &state.options().prices,
            record.instance_type.as_deref(),
            &seconds,
        );
        row
    }

    fn removed(state: &HttpState, vm: &RemovedVm) -> Self {
        let t = &vm.timings;
        Self {
            hostname: vm.hostname.to_string(),
            origin: if vm.registered {
                "registered"
            } else {
                "launched"
            },
            instance_id: vm.instance_id.as_ref().map(ToString::to_string),
            instance_type: vm.instance_type.clone(),
            address: vm.address.clone(),
            state: "removed".into(),
            created_at: vm.created_at,
            ended_at: Some(vm.ended_at),
            participant: None,
            assigned_at: None,
            past_participants: vm.history.assignments.clone(),
            provision_seconds: t.provision_seconds(),
            startup_seconds: t.total_startup_seconds(),
            cloud_init_seconds: t.cloud_init_duration_seconds,
            container_seconds: t.container_startup_duration_seconds,
            restarts: vm.restarts,
            gpu_health: vm.gpu_health.as_str().to_owned(),
            health_changes: vm.history.health.clone(),
            hours: hours_of(&vm.usage),
            estimated_cost: cost_of(
                &state.options().prices,
                vm.instance_type.as_deref(),
                &vm.usage,
            ),
            collection: None,
            collected_files: None,
            collected_bytes: None,
            last_error: vm.last_error.clone(),
        }
    }

    fn csv_fields(&self) -> Vec<String> {
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        let time = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
        let num = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        let hours = |k: &str| self.hours[k].to_string();
        vec![
            self.hostname.clone(),
            self.origin.into(),
            opt(&self.instance_id),
            opt(&self.instance_type),
            opt(&self.address),
            self.state.clone(),
            self.created_at.to_rfc3339(),
            time(self.ended_at),
            opt(&self.participant),
            time(self.assigned_at),
            self.past_participants
                .iter()
                .map(|p| {
                    format!(
                        "{} {}/{}",
                        p.email,
                        p.assigned_at.to_rfc3339(),
                        p.ended_at.to_rfc3339()
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            num(self.provision_seconds),
            num(self.startup_seconds),
            num(self.cloud_init_seconds),
            num(self.container_seconds),
            self.restarts.to_string(),
            self.gpu_health.clone(),
            self.health_changes
                .iter()
                .map(|h| format!("{} {}", h.at.to_rfc3339(), h.health.as_str()))
                .collect::<Vec<_>>()
                .join("; "),
            hours("starting"),
            hours("free"),
            hours("in_use"),
            hours("idle"),
            hours("other"),
            hours("total"),
            num(self.estimated_cost),
            opt(&self.collection),
            self.collected_files
                .map(|n| n.to_string())
                .unwrap_or_default(),
            self.collected_bytes
                .map(|n| n.to_string())
                .unwrap_or_default(),
            opt(&self.last_error),
        ]
    }
}

fn cost_of(prices: &Prices, instance_type: Option<&str>, seconds: &Seconds) -> Option<f64> {
    prices
        .hourly(instance_type)
        .map(|p| round(seconds.total() / 3600.0 * p))
}

/// One CSV field: quoted when it holds a comma, quote or line break, and made inert for
/// spreadsheets when it starts like a formula.
fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

fn csv_line(out: &mut String, fields: &[String]) {
    let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    let _ = writeln!(out, "{}", line.join(","));
}

/// Every VM, current ones first, then removed ones, with its collection.
async fn vm_rows(state: &HttpState) -> ApiResult<Vec<VmRow>> {
    let now = Utc::now();
    let allocator = state.allocator();
    let current = allocator.vms(&VmFilter::default()).await?;
    let removed = allocator.removed_vms().await?;
    let mut rows: Vec<VmRow> = current
        .iter()
        .map(|r| VmRow::new(state, r, now))
        .chain(removed.iter().map(|vm| VmRow::removed(state, vm)))
        .collect();
    for row in &mut rows {
        if let Some(c) = state.collector().status(&row.hostname).await? {
            row.collection = Some(
                serde_json::to_value(c.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            );
            row.collected_files = Some(c.files);
            row.collected_bytes = Some(c.bytes);
        }
    }
    Ok(rows)
}

/// `GET /api/v1/export?format=csv|json[&table=vms|audit]` (admin): a download, recorded in
/// the audit trail (it holds the participants' emails).
#[utoipa::path(get, path = "/api/v1/export", tag = "admin", params(ExportQuery),
    responses((status = 200, description = "CSV (one row per VM, current then destroyed, or the audit trail) or JSON `{generated_at, usage, vms, audit}`, as an attachment"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("admin_basic" = [])))]
pub async fn export(
    State(state): State<HttpState>,
    admin: Admin,
    ClientAddr(address): ClientAddr,
    ApiQuery(query): ApiQuery<ExportQuery>,
) -> ApiResult<Response> {
    let format = query.format.as_deref().unwrap_or("csv");
    let table = query.table.as_deref().unwrap_or("vms");
    let caller = Caller::admin(&state, admin.via(), address);
    let what = What::detail(format!("{format} {table}"));
    let outcome = exported(&state, format, table).await;
    // The answer's body is not `Sync`: the audit sees only whether it worked.
    let worked: ApiResult<()> = outcome.as_ref().map(|_| ()).map_err(Clone::clone);
    audit::record(&state, &caller, AuditAction::Export, what, &worked).await;
    outcome
}

/// The export's answer.
async fn exported(state: &HttpState, format: &str, table: &str) -> ApiResult<Response> {
    let stamp = Utc::now().format("%Y%m%d-%H%M%S");
    let audit = || async {
        state
            .allocator()
            .audit_log(&AuditQuery {
                limit: EXPORT_AUDIT_ENTRIES,
                before: None,
            })
            .await
    };
    let (body, content_type, name) = match (format, table) {
        ("json", _) => {
            let body = json!({
                "generated_at": Utc::now(),
                "usage": usage_view(state).await?,
                "vms": vm_rows(state).await?,
                "audit": audit().await?,
            });
            (
                serde_json::to_string_pretty(&body).unwrap_or_default(),
                "application/json",
                format!("lablink-export-{stamp}.json"),
            )
        }
        ("csv", "vms") => {
            let mut out = format!("{}\n", VmRow::CSV_HEADER);
            for row in vm_rows(state).await? {
                csv_line(&mut out, &row.csv_fields());
            }
            (
                out,
                "text/csv; charset=utf-8",
                format!("lablink-vms-{stamp}.csv"),
            )
        }
        ("csv", "audit") => {
            let mut out = String::from("at,actor,address,action,target,detail,ok\n");
            for e in audit().await? {
                csv_line(
                    &mut out,
                    &[
                        e.at.to_rfc3339(),
                        e.actor,
                        e.address.unwrap_or_default(),
                        e.action.as_str().to_owned(),
                        e.target.unwrap_or_default(),
                        e.detail.unwrap_or_default(),
                        e.ok.to_string(),
                    ],
                );
            }
            (
                out,
                "text/csv; charset=utf-8",
                format!("lablink-audit-{stamp}.csv"),
            )
        }
        ("csv", _) => return Err(ApiError::bad_request("table must be vms or audit")),
        _ => return Err(ApiError::bad_request("format must be csv or json")),
    };
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_made_inert() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("-1"), "'-1");
    }
}
