//! Wrappers that count what a backend does into the server's
//! [`Metrics`](crate::http::Metrics), tower-style: a
//! [`MeteredProvisioner`](crate::metered::MeteredProvisioner) around the configured
//! provisioner (time of launches and destroys, errors by kind, VMs a launch did not create)
//! and a [`MeteredNotifier`](crate::metered::MeteredNotifier) around the notifier (resync
//! wake-ups its waiters received). Neither changes what it wraps.
//!
//! ```
//! use std::sync::Arc;
//! use lablink::http::Metrics;
//! use lablink::metered::{MeteredNotifier, MeteredProvisioner};
//!
//! let metrics = Arc::new(Metrics::default());
//! let provisioner = MeteredProvisioner::new(
//!     Arc::new(lablink::FakeProvisioner::default()),
//!     "fake",
//!     metrics.clone(),
//! );
//! let notifier = MeteredNotifier::new(Arc::new(lablink::MemoryNotifier::default()), metrics.clone());
//! let lablink = lablink::LabLink::builder()
//!     .with_provisioner(Arc::new(provisioner))
//!     .with_notifier(Arc::new(notifier))
//!     .build()?;
//! // Then serve it with `HttpState::with_metrics(.., metrics)`.
//! # let _ = lablink;
//! # Ok::<(), lablink::Error>(())
//! ```

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use futures::StreamExt as _;
use lablink_core::notifier::{Subscription, Wake};
use lablink_core::{
    Capabilities, Hostname, LaunchRequest, Notifier, ProvisionedVm, Provisioner, Result,
};

use crate::http::Metrics;

/// A [`Provisioner`] that observes the time of every launch and destroy, and counts failed
/// calls by [`ErrorKind`](lablink_core::ErrorKind) and VMs a launch did not create, labelled
/// with the provisioner's name (the configured kind: `aws`, `terraform`, `local`...). Put it
/// outside a [`RetryProvisioner`](lablink_core::RetryProvisioner): a call's time then
/// includes its retries, and only errors the retries did not cure count.
#[derive(Debug)]
pub struct MeteredProvisioner {
    inner: Arc<dyn Provisioner>,
    name: &'static str,
    metrics: Arc<Metrics>,
}

impl MeteredProvisioner {
    /// `inner`, counted into `metrics` under `provisioner="<name>"`.
    pub fn new(inner: Arc<dyn Provisioner>, name: &'static str, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            name,
            metrics,
        }
    }

    /// Records a call (its time when it `started` is given) and returns its result.
    fn record<T>(
        &self,
        operation: &'static str,
        started: Option<Instant>,
        result: Result<T>,
    ) -> Result<T> {
        self.metrics.provisioner_call(
            self.name,
            operation,
            started.map(|s| s.elapsed()),
            result.as_ref().err(),
        );
        result
    }
}

#[async_trait]
impl Provisioner for MeteredProvisioner {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<ProvisionedVm>> {
        let started = Instant::now();
        let launched = self.inner.launch(request).await;
        // A failed call created none of them; a partial one leaves some out.
        let created = launched.as_ref().map_or(0, Vec::len);
        let missing = request.vms.len().saturating_sub(created);
        if missing > 0 {
            self.metrics.vms_not_created(self.name, missing);
        }
        self.record("launch", Some(started), launched)
    }

    async fn destroy(&self, vms: &[ProvisionedVm]) -> Result<()> {
        let started = Instant::now();
        let destroyed = self.inner.destroy(vms).await;
        self.record("destroy", Some(started), destroyed)
    }

    async fn list(&self) -> Result<Vec<ProvisionedVm>> {
        let listed = self.inner.list().await;
        self.record("list", None, listed)
    }

    async fn reboot(&self, vm: &ProvisionedVm) -> Result<()> {
        let rebooted = self.inner.reboot(vm).await;
        self.record("reboot", None, rebooted)
    }
}

/// A [`Notifier`] that counts the [`Wake::Resync`]s its subscriptions deliver (a shared
/// notifier's reconnect, or a waiter that fell behind): each one is a waiter told that
/// notifications may have been lost, which then reads the store again.
#[derive(Debug)]
pub struct MeteredNotifier {
    inner: Arc<dyn Notifier>,
    metrics: Arc<Metrics>,
}

impl MeteredNotifier {
    /// `inner`, counted into `metrics`.
    pub fn new(inner: Arc<dyn Notifier>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait]
impl Notifier for MeteredNotifier {
    async fn subscribe(&self, hostname: &Hostname) -> Result<Subscription> {
        let metrics = self.metrics.clone();
        let wakes = self.inner.subscribe(hostname).await?;
        Ok(Subscription::new(wakes.inspect(move |wake| {
            if *wake == Wake::Resync {
                metrics.notifier_resync();
            }
        })))
    }

    async fn publish(&self, hostname: &Hostname) -> Result<()> {
        self.inner.publish(hostname).await
    }
}
