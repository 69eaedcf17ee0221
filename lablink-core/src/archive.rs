//! [`RemovedVm`]: what a store keeps of a VM after removing its record (a destroyed VM's
//! record goes once the machine is gone), so an export at the end of a workshop still says
//! who had which VM, how it started and what its time was spent on. Never a secret: no
//! token digest, no Chrome Remote Desktop command, no PIN.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::record::History;
use crate::usage::Seconds;
use crate::{GpuHealth, Hostname, InstanceId, StartupTimings, VmRecord};

/// A removed VM, as its record was when it was removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemovedVm {
    /// Its name.
    pub hostname: Hostname,
    /// The provider's id.
    pub instance_id: Option<InstanceId>,
    /// The provider's instance type.
    pub instance_type: Option<String>,
    /// Its address.
    pub address: Option<String>,
    /// Whether it was a machine that registered itself.
    pub registered: bool,
    /// When its record was created.
    pub created_at: DateTime<Utc>,
    /// When its record last changed before it was removed (its termination, for a
    /// destroyed VM).
    pub ended_at: DateTime<Utc>,
    /// Start-up timings.
    pub timings: StartupTimings,
    /// Agent restarts seen.
    pub restarts: u32,
    /// Its last GPU health.
    pub gpu_health: GpuHealth,
    /// Its time by kind, as accounted at its last change.
    pub usage: Seconds,
    /// Who had it, and its health changes.
    pub history: History,
    /// Why it failed, if it did.
    pub last_error: Option<String>,
}

impl From<&VmRecord> for RemovedVm {
    fn from(r: &VmRecord) -> Self {
        let mut history = r.history.clone();
        // A record removed while still assigned: its participant had it until then.
        if let Some(a) = &r.assignment {
            history.assignments.push(crate::record::PastAssignment {
                email: a.email.clone(),
                assigned_at: a.assigned_at,
                ended_at: r.updated_at,
            });
        }
        Self {
            hostname: r.hostname.clone(),
            instance_id: r.instance_id.clone(),
            instance_type: r.instance_type.clone(),
            address: r.address.clone(),
            registered: r.is_registered(),
            created_at: r.created_at,
            ended_at: r.updated_at,
            timings: r.timings.clone(),
            restarts: r.restarts,
            gpu_health: r.gpu_health,
            usage: r.usage.seconds,
            history,
            last_error: r.last_error.clone(),
        }
    }
}
