//! What the HTTP layer shows of VMs and operations: JSON/template views that never carry a
//! CRD command, PIN or token.

use chrono::{DateTime, Utc};
use lablink_core::{Operation, VmRecord};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

/// The status text of the compatibility routes: what the agent last reported.
pub fn status_text(record: &VmRecord) -> &'static str {
    record.agent_status.map_or("unknown", |s| s.as_str())
}

/// Start-up timings of a VM, with the derived durations.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TimingsView {
    /// When the provisioner was asked for the machine.
    pub provision_start: Option<DateTime<Utc>>,
    /// When the provisioner returned it.
    pub provision_end: Option<DateTime<Utc>>,
    /// cloud-init start on the VM.
    pub cloud_init_start: Option<DateTime<Utc>>,
    /// cloud-init end on the VM.
    pub cloud_init_end: Option<DateTime<Utc>>,
    /// Container start.
    pub container_start: Option<DateTime<Utc>>,
    /// Container ready.
    pub container_end: Option<DateTime<Utc>>,
    /// cloud-init duration as measured on the VM.
    pub cloud_init_duration_seconds: Option<f64>,
    /// Container start-up duration as measured on the VM.
    pub container_startup_duration_seconds: Option<f64>,
    /// Provisioning time.
    pub provision_seconds: Option<f64>,
    /// Total start-up time.
    pub total_startup_seconds: Option<f64>,
}

/// One VM as admins see it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VmView {
    /// The VM's name.
    pub hostname: String,
    /// Lifecycle state (`requested`, `booting`, `available`, `assigned`, ...).
    pub state: String,
    /// Whether a participant can get it right now.
    pub assignable: bool,
    /// Last reported GPU health (`Healthy`, `Unhealthy`, `N/A`, `unknown`).
    pub gpu_health: String,
    /// Whether the research software is in use.
    pub in_use: bool,
    /// Last status the agent reported.
    pub status: String,
    /// The participant holding it.
    pub assigned_to: Option<String>,
    /// When it was assigned.
    pub assigned_at: Option<DateTime<Utc>>,
    /// The provider's id.
    pub instance_id: Option<String>,
    /// Its address.
    pub address: Option<String>,
    /// The provider's instance type, when it said.
    pub instance_type: Option<String>,
    /// Last heartbeat.
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Agent restarts seen (boot id changes).
    pub restarts: u32,
    /// Why it failed or became unhealthy.
    pub last_error: Option<String>,
    /// Start-up timings.
    pub timings: TimingsView,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
    /// Where it comes from: `registered` (a machine that joined by registering) or
    /// `launched` (created by the provisioner).
    pub origin: &'static str,
    /// How far starting the participant's desktop got (assigned VMs only).
    pub desktop: Option<DesktopView>,
}

/// Where starting an assigned VM's desktop stands.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DesktopView {
    /// `crd` or `browser`.
    pub mode: &'static str,
    /// 1, then one more for each fresh command the participant gave after a failure.
    pub attempt: u32,
    /// `assigned`, `received`, `ready` or `failed`.
    pub stage: &'static str,
    /// Why it failed: `code_rejected`, `invalid_command`, `host_failed`, `timed_out` or
    /// `desktop_unavailable`.
    pub failure: Option<&'static str>,
    /// The desktop program's exit status, when the agent said.
    pub exit_status: Option<i32>,
    /// When the stage last changed.
    pub at: DateTime<Utc>,
}

impl From<&VmRecord> for VmView {
    fn from(r: &VmRecord) -> Self {
        let t = &r.timings;
        Self {
            hostname: r.hostname.to_string(),
            state: r.state.as_str().to_owned(),
            assignable: r.is_assignable(),
            gpu_health: r.gpu_health.as_str().to_owned(),
            in_use: r.in_use,
            status: status_text(r).to_owned(),
            assigned_to: r.assignment.as_ref().map(|a| a.email.to_string()),
            assigned_at: r.assignment.as_ref().map(|a| a.assigned_at),
            desktop: r.assignment.as_ref().map(|a| DesktopView {
                mode: if a.crd_command.is_some() {
                    "crd"
                } else {
                    "browser"
                },
                attempt: a.desktop.attempt,
                stage: a.desktop.stage.as_str(),
                failure: a.desktop.failure.map(|f| f.as_str()),
                exit_status: a.desktop.exit_status,
                at: a.desktop.at,
            }),
            instance_id: r.instance_id.as_ref().map(ToString::to_string),
            address: r.address.clone(),
            instance_type: r.instance_type.clone(),
            last_heartbeat: r.last_heartbeat,
            restarts: r.restarts,
            last_error: r.last_error.clone(),
            timings: TimingsView {
                provision_start: t.provision_start,
                provision_end: t.provision_end,
                cloud_init_start: t.cloud_init_start,
                cloud_init_end: t.cloud_init_end,
                container_start: t.container_start,
                container_end: t.container_end,
                cloud_init_duration_seconds: t.cloud_init_duration_seconds,
                container_startup_duration_seconds: t.container_startup_duration_seconds,
                provision_seconds: t.provision_seconds(),
                total_startup_seconds: t.total_startup_seconds(),
            },
            created_at: r.created_at,
            updated_at: r.updated_at,
            origin: if r.is_registered() {
                "registered"
            } else {
                "launched"
            },
        }
    }
}

/// A provisioning operation and its progress.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OperationView {
    /// Its id (also `job_id` in the compatibility responses).
    pub id: Uuid,
    /// `launch`, `destroy` or `reboot`.
    pub kind: String,
    /// `running`, `succeeded` or `failed`.
    pub status: String,
    /// The VMs it concerns.
    pub hostnames: Vec<String>,
    /// VMs done.
    pub done: usize,
    /// VMs in total.
    pub total: usize,
    /// The newest provider output lines.
    pub progress: Vec<String>,
    /// The outcome in words.
    pub message: Option<String>,
    /// Started.
    pub started_at: DateTime<Utc>,
    /// Finished.
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<&Operation> for OperationView {
    fn from(op: &Operation) -> Self {
        Self {
            id: op.id,
            kind: op.kind.as_str().to_owned(),
            status: op.status.as_str().to_owned(),
            hostnames: op.hostnames.iter().map(ToString::to_string).collect(),
            done: op.done,
            total: op.hostnames.len(),
            progress: op.progress.clone(),
            message: op.message.clone(),
            started_at: op.started_at,
            finished_at: op.finished_at,
        }
    }
}

/// VM counts by state: the domain's counts, shown as they are.
pub use lablink_core::VmCounts as CountsView;

/// A VM's logs.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LogsView {
    /// The VM.
    pub hostname: String,
    /// cloud-init output.
    pub cloud_init: String,
    /// Container output.
    pub container: String,
    /// The agent's own log.
    pub agent: String,
}
