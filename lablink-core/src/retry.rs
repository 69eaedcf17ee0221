//! [`RetryProvisioner`]: retries retryable provisioner errors with jittered exponential
//! backoff under an overall deadline. Backends classify errors; only this wrapper loops.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use tokio::time::Instant;

use crate::{Capabilities, Error, LaunchRequest, ProvisionedVm, Provisioner, Result};

/// When and how often to retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Backoff before the first retry.
    pub initial_backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// Growth factor of the backoff.
    pub multiplier: f64,
    /// Most attempts in all (first try included).
    pub max_attempts: u32,
    /// No retry starts after this much time since the first attempt.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            max_attempts: 5,
            deadline: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// Full-jitter backoff before retry number `retry` (1-based): uniform in
    /// `[0, min(max, initial * multiplier^(retry-1))]`.
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let exp = self.multiplier.powi(retry.saturating_sub(1) as i32);
        let ceiling = self.initial_backoff.mul_f64(exp).min(self.max_backoff);
        ceiling.mul_f64(rng.gen_range(0.0..=1.0))
    }

    /// Runs `attempt` until it succeeds, fails permanently, or attempts/deadline run out. A
    /// temporary error that exhausted the policy is returned as
    /// [`Persistent`](crate::error::ErrorStatus::Persistent).
    pub async fn run<T, F, Fut>(&self, operation: &'static str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let start = Instant::now();
        let mut retry = 0;
        loop {
            let err: Error = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            retry += 1;
            let wait = self.backoff(retry, &mut rand::thread_rng());
            let out_of_time = start.elapsed() + wait > self.deadline;
            if !err.is_retryable() || retry >= self.max_attempts || out_of_time {
                return Err(err.persistent());
            }
            tracing::warn!(
                operation,
                attempt = retry,
                backoff_ms = wait.as_millis() as u64,
                error = %err,
                "retrying after a temporary error"
            );
            tokio::time::sleep(wait).await;
        }
    }
}

/// A [`Provisioner`] that retries the retryable errors of an inner one.
#[derive(Debug, Clone)]
pub struct RetryProvisioner {
    inner: Arc<dyn Provisioner>,
    policy: RetryPolicy,
}

impl RetryProvisioner {
    /// Wraps `inner` with `policy`.
    pub fn new(inner: Arc<dyn Provisioner>, policy: RetryPolicy) -> Self {
        Self { inner, policy }
    }
}

#[async_trait]
impl Provisioner for RetryProvisioner {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<ProvisionedVm>> {
        self.policy
            .run("launch", || self.inner.launch(request))
            .await
    }

    async fn destroy(&self, vms: &[ProvisionedVm]) -> Result<()> {
        self.policy.run("destroy", || self.inner.destroy(vms)).await
    }

    async fn list(&self) -> Result<Vec<ProvisionedVm>> {
        self.policy.run("list", || self.inner.list()).await
    }

    async fn reboot(&self, vm: &ProvisionedVm) -> Result<()> {
        self.policy.run("reboot", || self.inner.reboot(vm)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorStatus;
    use crate::ErrorKind;
    use rand::SeedableRng;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_attempts: 4,
            deadline: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_temporary_errors_until_success() {
        let calls = AtomicU32::new(0);
        let out = policy()
            .run("test", || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(Error::new(ErrorKind::Unavailable, "down"))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(out.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let err = policy()
            .run("test", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Error::invalid_input("bad ami"))
            })
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(err.status(), ErrorStatus::Permanent);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_as_persistent() {
        let calls = AtomicU32::new(0);
        let err = policy()
            .run("test", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Error::new(ErrorKind::Unavailable, "down"))
            })
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(err.status(), ErrorStatus::Persistent);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_stops_retrying() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(10),
            multiplier: 1.0,
            max_attempts: 100,
            deadline: Duration::from_secs(25),
        };
        let calls = AtomicU32::new(0);
        let start = Instant::now();
        let _ = p
            .run("test", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(5)).await;
                Err::<(), _>(Error::new(ErrorKind::Unavailable, "down"))
            })
            .await;
        assert!(start.elapsed() <= Duration::from_secs(40));
        assert!(calls.load(Ordering::SeqCst) < 10);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for retry in 1..20 {
            let b = p.backoff(retry, &mut rng);
            let ceiling = Duration::from_millis(100).mul_f64(2f64.powi(retry as i32 - 1));
            assert!(b <= ceiling.min(p.max_backoff));
        }
    }
}
