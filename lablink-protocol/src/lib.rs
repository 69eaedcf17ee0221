//! The LabLink wire protocol (docs/protocol.md, part B): every `/api/v1` body the agent inside
//! a VM and the allocator exchange, defined once. The allocator's handlers parse and answer
//! with these types and the agent's client sends and reads them, so a field cannot drift
//! between the two.
//!
//! The types are plain wire types: strings, numbers and times exactly as they travel. Turning
//! them into domain types (a [`lablink_core::AgentStatus`], a [`lablink_core::LogStream`]...)
//! and refusing bad values is the allocator's business. Optional fields the agent leaves out
//! are not sent at all (`skip_serializing_if`); the allocator takes a missing field and
//! `null` alike.
//!
//! With the `openapi` feature every body also derives utoipa's `ToSchema` (queries:
//! `IntoParams`), for the allocator's OpenAPI document; the agent builds without it.
//!
//! | Route (`/api/v1/vms/{hostname}/...`) | Request | Answer |
//! |---|---|---|
//! | `POST ready` | [`ReadyBody`] | the VM view |
//! | `GET assignment?timeout=` | [`WaitQuery`] | [`AssignmentBody`] or 204 |
//! | `POST heartbeat` | [`HeartbeatBody`] | the VM view |
//! | `POST telemetry` | [`TelemetryBody`] | the VM view |
//! | `GET tasks?timeout=` | [`WaitQuery`] | [`TasksBody`] or 204 |
//! | `POST warnings/{id}/ack` | — | 204 |
//! | `PUT collections/{id}` | a tar archive ending in a [`Manifest`] | [`CollectionStatus`] |
//! | `DELETE registration` | — | 202 and the destroy operation |
//!
//! A machine that joins by registering first calls `POST /api/v1/registrations` with the
//! registration token as its bearer token and a [`RegistrationBody`]; the answer is a
//! [`RegisteredBody`] carrying the agent token for the routes above.
//!
//! Every error answer is an [`ErrorBody`].

#![warn(missing_docs)]

use chrono::{DateTime, Utc};
use lablink_core::StartupTimings;
use serde::{Deserialize, Serialize};

/// Every error: `{"error": "<human message>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

/// Body of `ready`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReadyBody {
    /// The agent's status; default `running` (which makes the VM assignable).
    #[cfg_attr(feature = "openapi", schema(example = "running"))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The boot id, counted as a heartbeat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// Query of the long-polls (the assignment and the tasks).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
pub struct WaitQuery {
    /// Longest to hold the request, in seconds (capped by the server's maximum; default 30).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    /// Assignment wait only: the `version` of the assignment the agent has; the request is
    /// held while the assignment is still that one (answering it, changed or not, when the
    /// hold ends) and answered 204 once there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<String>,
}

/// The VM's assignment, for the agent. `Debug` shows neither the command, the code nor the PIN.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AssignmentBody {
    /// The VM.
    pub hostname: String,
    /// The `start-host` command LabLink built from the validated code (never the text the
    /// participant pasted).
    pub command: String,
    /// Its `--code` value, validated (build the `start-host` invocation from this).
    pub code: String,
    /// The PIN, as a string of digits.
    pub pin: String,
    /// When it was assigned; identifies this assignment.
    pub assigned_at: DateTime<Utc>,
    /// `crd` (start Chrome Remote Desktop with `code`) or `browser` (serve the VNC desktop
    /// through tunnels; `command` and `code` are empty).
    #[serde(default = "crd")]
    pub mode: String,
    /// The attempt: 1, then one more for each fresh command the participant gave after a
    /// failed start (report the outcome with it).
    #[serde(default = "first")]
    pub attempt: u32,
    /// Changes whenever there is something new to act on (a new attempt or tunnel); give
    /// it back as `seen` to wait for the next change.
    #[serde(default)]
    pub version: String,
    /// The newest tunnel a browser asked for (browser mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelBody>,
}

fn crd() -> String {
    "crd".into()
}

fn first() -> u32 {
    1
}

/// A tunnel to open: dial `url` (a WebSocket URL, or a path on the allocator's URL) with
/// the VM token, and relay it to the VNC server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TunnelBody {
    /// The session's id.
    pub id: String,
    /// Where to dial.
    pub url: String,
}

/// How starting the participant's desktop went, for one attempt. Never a code or a PIN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesktopReportBody {
    /// The assignment's attempt this is about.
    pub attempt: u32,
    /// `received`, `ready` or `failed`.
    pub stage: String,
    /// When failed: `code_rejected`, `invalid_command`, `host_failed`, `timed_out` or
    /// `desktop_unavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The desktop program's exit status, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
}

impl std::fmt::Debug for AssignmentBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssignmentBody")
            .field("hostname", &self.hostname)
            .field("assigned_at", &self.assigned_at)
            .finish_non_exhaustive()
    }
}

/// Body of `heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatBody {
    /// Changes on every boot of the VM (a change counts as a restart).
    pub boot_id: String,
}

/// Times of [`TimingsBody`] as the agent sends them: RFC 3339, UTC, microseconds.
mod micros {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(at: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => s.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Micros, true)),
            None => s.serialize_none(),
        }
    }
}

/// Start-up timings reported by the VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TimingsBody {
    /// cloud-init start.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "micros::serialize"
    )]
    pub cloud_init_start: Option<DateTime<Utc>>,
    /// cloud-init end.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "micros::serialize"
    )]
    pub cloud_init_end: Option<DateTime<Utc>>,
    /// Container start.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "micros::serialize"
    )]
    pub container_start: Option<DateTime<Utc>>,
    /// Container ready.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "micros::serialize"
    )]
    pub container_end: Option<DateTime<Utc>>,
    /// cloud-init duration measured on the VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_init_duration_seconds: Option<f64>,
    /// Container start-up duration measured on the VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_startup_duration_seconds: Option<f64>,
}

impl From<TimingsBody> for StartupTimings {
    fn from(t: TimingsBody) -> Self {
        Self {
            cloud_init_start: t.cloud_init_start,
            cloud_init_end: t.cloud_init_end,
            container_start: t.container_start,
            container_end: t.container_end,
            cloud_init_duration_seconds: t.cloud_init_duration_seconds,
            container_startup_duration_seconds: t.container_startup_duration_seconds,
            ..Default::default()
        }
    }
}

impl From<&StartupTimings> for TimingsBody {
    /// The VM-measured part (the provisioner's times are the allocator's own).
    fn from(t: &StartupTimings) -> Self {
        Self {
            cloud_init_start: t.cloud_init_start,
            cloud_init_end: t.cloud_init_end,
            container_start: t.container_start,
            container_end: t.container_end,
            cloud_init_duration_seconds: t.cloud_init_duration_seconds,
            container_startup_duration_seconds: t.container_startup_duration_seconds,
        }
    }
}

/// Lines for one log stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogBody {
    /// `cloud_init`, `container` or `agent`.
    #[cfg_attr(feature = "openapi", schema(example = "container"))]
    pub stream: String,
    /// The lines, oldest first (ANSI escapes are stripped, blank lines dropped).
    pub lines: Vec<String>,
}

/// Everything an agent reports, in one call; every field optional (absent ones are not sent).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TelemetryBody {
    /// `Healthy`, `Unhealthy` or `N/A`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_health: Option<String>,
    /// Whether the research software is in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_use: Option<bool>,
    /// `initializing`, `running`, `error`, `rebooting` or `unknown`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// A heartbeat with this boot id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Start-up timings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<TimingsBody>,
    /// Log lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogBody>,
    /// How starting the participant's desktop went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desktop: Option<DesktopReportBody>,
}

/// Work the allocator asks of an agent (the answer of `tasks`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TasksBody {
    /// A collection to upload.
    pub collection: Option<CollectionTask>,
    /// Reboot the machine (a registered machine whose owner allowed reboots): report the
    /// status `rebooting`, then reboot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reboot: bool,
    /// Reset the machine for the next participant (its participant's assignment ended and
    /// the allocator reuses VMs by resetting them): report the status `initializing`, end the
    /// desktop user's session, remove the remote-desktop registration, restore the home
    /// directory, then report `running` (or `error` when it failed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    /// Warnings to show the participant on the desktop, each once: show it, then
    /// acknowledge it (`POST warnings/{id}/ack`) so it is not sent again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<WarningTask>,
}

/// A warning for the participant at the VM's desktop: the VM will be destroyed (the
/// scheduled destruction) or released (idle release) at `at`. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WarningTask {
    /// Its id, to acknowledge it.
    pub id: String,
    /// `destruction` or `idle_release`.
    #[cfg_attr(feature = "openapi", schema(example = "destruction"))]
    pub kind: String,
    /// When it happens.
    pub at: DateTime<Utc>,
    /// The notification's title.
    pub title: String,
    /// The notification's text.
    pub message: String,
}

/// Body of `POST /api/v1/registrations` (the bearer token is the registration token). Its
/// `Debug` hides the machine identity.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegistrationBody {
    /// The name to join under: letters, digits, `.`, `_`, `-`; unique in the deployment.
    #[cfg_attr(feature = "openapi", schema(example = "lab-ws-07"))]
    pub hostname: String,
    /// A stable identity of the machine (16–128 of `[A-Za-z0-9_-]`), the same at every
    /// registration: a secret only the machine's owner can read (the agent keeps 256 random
    /// bits in a root-only file). The allocator keeps only its digest.
    pub machine_identity: String,
    /// Whether the allocator may reboot the machine (default: no).
    #[serde(default)]
    pub allow_reboot: bool,
    /// The machine's address, shown to admins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

impl std::fmt::Debug for RegistrationBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrationBody")
            .field("hostname", &self.hostname)
            .field("machine_identity", &"***")
            .field("allow_reboot", &self.allow_reboot)
            .field("address", &self.address)
            .finish()
    }
}

/// Answer of `POST /api/v1/registrations`: 201 for a new machine, 200 for one registered
/// again (its record is kept; the previous agent token stops working).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisteredBody {
    /// The name the machine serves under.
    pub hostname: String,
    /// The machine's own agent token (a secret: keep it in a file only its agent reads).
    pub token: String,
    /// Whether the machine was registered already.
    pub again: bool,
}

impl std::fmt::Debug for RegisteredBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredBody")
            .field("hostname", &self.hostname)
            .field("token", &"***")
            .field("again", &self.again)
            .finish()
    }
}

/// What an agent is asked to collect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionTask {
    /// The collection; upload to `collections/{id}`.
    pub id: String,
    /// Directories to search (`~` is the agent's `$HOME`, `{hostname}` the VM's name).
    pub roots: Vec<String>,
    /// Glob patterns matched against each file's path relative to its root (`**/*.slp`).
    pub patterns: Vec<String>,
    /// Most bytes of file content to upload.
    pub max_bytes: u64,
}

/// A collected file, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectedFile {
    /// Its path within the collection (the VM's folder).
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 of its content, lowercase hex.
    pub sha256: String,
}

/// A matching file the agent left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SkippedFile {
    /// Its path on the VM.
    pub path: String,
    /// Why (a symbolic link, over the size limit, unreadable...).
    pub reason: String,
}

/// `manifest.json`, the last entry of a collection's archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Manifest {
    /// The collection's id.
    pub collection: String,
    /// Every file in the archive, in archive order.
    pub files: Vec<CollectedFile>,
    /// Every matching file that was left out (may be absent when none was).
    #[serde(default)]
    pub skipped: Vec<SkippedFile>,
}

/// Where a VM's current collection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CollectionState {
    /// Asked for; the agent has not uploaded it yet (or its last upload was cut).
    Requested,
    /// An upload is arriving.
    Uploading,
    /// Stored.
    Complete,
    /// Given up: the upload was refused or the VM did not answer in time.
    Failed,
}

impl CollectionState {
    /// Whether the collection is still to be done (requested or uploading).
    pub fn is_pending(self) -> bool {
        matches!(self, Self::Requested | Self::Uploading)
    }
}

/// A VM's current collection: the answer of an upload (and what admins see).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionStatus {
    /// The VM.
    pub hostname: String,
    /// The collection's id.
    pub id: String,
    /// Where it is.
    pub state: CollectionState,
    /// When it was asked for.
    pub requested_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Uploads tried so far.
    pub attempts: u32,
    /// What went wrong last, if anything.
    pub error: Option<String>,
    /// Files collected (when complete).
    pub files: usize,
    /// Bytes collected (when complete).
    pub bytes: u64,
    /// Matching files the agent left out (when complete).
    pub skipped: usize,
}
