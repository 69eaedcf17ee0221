//! What is kept of removed VMs (`lablink_removed_vms`) and the fleet's usage
//! (`lablink_core::usage`): removing a VM archives it in the same transaction, and the
//! usage sums the live rows' time with the archive's.

use chrono::{DateTime, Utc};
use lablink_core::usage::{FleetUsage, Seconds, UsageKind};
use lablink_core::RemovedVm;
use sqlx::PgPool;

use crate::error::PgError;
use crate::row::{corrupt, vm_row};

/// Removes the records of `names` and keeps a [`RemovedVm`] of each, in one transaction
/// (`sql/vm_remove.sql`, `sql/removed_insert.sql`); how many were removed.
pub(crate) async fn remove_keeping(pool: &PgPool, names: &[&str]) -> Result<usize, PgError> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query_file!("sql/vm_remove.sql", names as &[&str])
        .fetch_all(&mut *tx)
        .await?;
    let mut kept = RemovedColumns::default();
    for r in rows {
        let record = vm_row!(r).into_record()?;
        kept.push(&RemovedVm::from(&record))?;
    }
    let removed = kept.hostnames.len();
    sqlx::query_file!(
        "sql/removed_insert.sql",
        &kept.hostnames[..],
        &kept.instance_types[..],
        &kept.seconds[0][..],
        &kept.seconds[1][..],
        &kept.seconds[2][..],
        &kept.seconds[3][..],
        &kept.seconds[4][..],
        &kept.vms[..],
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(removed)
}

/// The columns of `sql/removed_insert.sql`, one element per removed VM.
#[derive(Default)]
struct RemovedColumns {
    hostnames: Vec<String>,
    instance_types: Vec<String>,
    /// Seconds by kind, in [`UsageKind::ALL`] order.
    seconds: [Vec<f64>; 5],
    vms: Vec<serde_json::Value>,
}

impl RemovedColumns {
    fn push(&mut self, vm: &RemovedVm) -> Result<(), PgError> {
        self.hostnames.push(vm.hostname.to_string());
        self.instance_types
            .push(vm.instance_type.clone().unwrap_or_default());
        for (column, kind) in self.seconds.iter_mut().zip(UsageKind::ALL) {
            column.push(vm.usage.get(kind));
        }
        self.vms
            .push(serde_json::to_value(vm).map_err(|e| corrupt("vm", e))?);
        Ok(())
    }
}

/// Every removed VM, in order of removal (`sql/removed_list.sql`).
pub(crate) async fn removed_vms(pool: &PgPool) -> Result<Vec<RemovedVm>, PgError> {
    let rows = sqlx::query_file_scalar!("sql/removed_list.sql")
        .fetch_all(pool)
        .await?;
    rows.into_iter()
        .map(|vm| serde_json::from_value(vm).map_err(|e| corrupt("vm", e)))
        .collect()
}

/// The fleet's seconds by kind and instance type up to `now` (`sql/usage.sql`).
pub(crate) async fn fleet(pool: &PgPool, now: DateTime<Utc>) -> Result<FleetUsage, PgError> {
    let rows = sqlx::query_file!("sql/usage.sql", now)
        .fetch_all(pool)
        .await?;
    let mut usage = FleetUsage::default();
    for r in rows {
        let seconds = Seconds {
            starting: r.starting,
            free: r.free,
            in_use: r.in_use,
            idle: r.idle,
            other: r.other,
        };
        usage.add(Some(&r.instance_type), &seconds);
    }
    Ok(usage)
}
