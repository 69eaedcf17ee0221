//! [`CallCounter`]: an SDK interceptor that counts EC2 calls by action, to see what a launch
//! costs in API calls (benchmarks, tests, metrics).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_ec2::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_ec2::config::{ConfigBag, Intercept, RuntimeComponents};

/// Counts the EC2 requests sent through a client, by action (`RunInstances`, `CreateTags`...).
/// Clones share the counts. Add it with `aws_sdk_ec2::config::Builder::interceptor` and hand
/// the client to [`Ec2ProvisionerBuilder::with_ec2_client`](crate::Ec2ProvisionerBuilder::with_ec2_client).
#[derive(Debug, Clone, Default)]
pub struct CallCounter(Arc<Mutex<BTreeMap<String, usize>>>);

impl CallCounter {
    /// Calls so far, by action.
    pub fn snapshot(&self) -> BTreeMap<String, usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Calls of `action` so far.
    pub fn get(&self, action: &str) -> usize {
        self.snapshot().get(action).copied().unwrap_or(0)
    }

    /// Every call so far.
    pub fn total(&self) -> usize {
        self.snapshot().values().sum()
    }

    /// Forgets the calls so far.
    pub fn reset(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Intercept for CallCounter {
    fn name(&self) -> &'static str {
        "CallCounter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), aws_sdk_ec2::error::BoxError> {
        // EC2's query protocol names the action in the form body; only that field is read.
        let body = context.request().body().bytes().unwrap_or_default();
        let action = body
            .split(|b| *b == b'&')
            .find_map(|kv| kv.strip_prefix(b"Action="))
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .unwrap_or_else(|| "?".into());
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(action)
            .or_default() += 1;
        Ok(())
    }
}
