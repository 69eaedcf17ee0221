//! Provisioning operations (launch, destroy, reboot) recorded with progress and outcome so an
//! admin can watch them.

mod flows;

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Hostname;

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    /// Create VMs.
    Launch,
    /// Remove VMs.
    Destroy,
    /// Reboot a VM.
    Reboot,
}

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationStatus {
    /// Still going.
    Running,
    /// Finished, every VM done.
    Succeeded,
    /// Finished with at least one VM failed; `message` says why.
    Failed,
}

impl OperationKind {
    /// Lower-case name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Launch => "launch",
            Self::Destroy => "destroy",
            Self::Reboot => "reboot",
        }
    }
}

impl OperationStatus {
    /// Lower-case name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for OperationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for OperationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many progress lines an operation keeps (the newest).
pub const MAX_PROGRESS_LINES: usize = 200;

/// A recorded operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// Unique id.
    pub id: Uuid,
    /// What it does.
    pub kind: OperationKind,
    /// Where it is.
    pub status: OperationStatus,
    /// The VMs it concerns.
    pub hostnames: Vec<Hostname>,
    /// How many VMs are done (succeeded or failed).
    pub done: usize,
    /// The newest progress lines (provider output), at most [`MAX_PROGRESS_LINES`].
    pub progress: Vec<String>,
    /// The outcome in words, once finished (the error message on failure).
    pub message: Option<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
}

impl Operation {
    /// A running operation over `hostnames`, started `now`.
    pub fn start(kind: OperationKind, hostnames: Vec<Hostname>, now: DateTime<Utc>) -> Self {
        Self {
            id: Uuid::new_v4(),
            kind,
            status: OperationStatus::Running,
            hostnames,
            done: 0,
            progress: Vec::new(),
            message: None,
            started_at: now,
            finished_at: None,
        }
    }

    /// Adds a progress line, keeping only the newest [`MAX_PROGRESS_LINES`].
    pub fn push_progress(&mut self, line: impl Into<String>) {
        self.progress.push(line.into());
        if self.progress.len() > MAX_PROGRESS_LINES {
            let excess = self.progress.len() - MAX_PROGRESS_LINES;
            self.progress.drain(..excess);
        }
    }

    /// Marks it finished: `Succeeded` when `error` is `None`, else `Failed` with the message.
    pub fn finish(&mut self, error: Option<String>, now: DateTime<Utc>) {
        self.status = match error {
            None => OperationStatus::Succeeded,
            Some(_) => OperationStatus::Failed,
        };
        self.message = Some(error.unwrap_or_else(|| format!("{} done", self.kind)));
        self.done = self.hostnames.len();
        self.finished_at = Some(now);
    }

    /// Whether it is still running.
    pub fn is_running(&self) -> bool {
        self.status == OperationStatus::Running
    }
}
