//! Who is calling: the client's address (through trusted proxies) and whether its request
//! reached the proxy over HTTPS; and [`RateLimiter`], token buckets per client address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use ipnet::IpNet;

/// The address of the peer that opened the connection (unspecified when the router is
/// served without `ConnectInfo`).
fn peer(extensions: &axum::http::Extensions) -> IpAddr {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

fn trusted(addr: IpAddr, proxies: &[IpNet]) -> bool {
    proxies.iter().any(|net| net.contains(&addr))
}

/// The client's address: the peer, or, when the peer is one of `proxies`, the nearest
/// address in `X-Forwarded-For` that is not a trusted proxy itself. `X-Forwarded-For` from
/// anyone else is ignored, so a client cannot choose the address it is counted under.
pub fn client_addr(parts: &Parts, proxies: &[IpNet]) -> IpAddr {
    let peer = peer(&parts.extensions);
    if !trusted(peer, proxies) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = forwarded_for(&parts.headers);
    forwarded
        .iter()
        .rev()
        .find(|a| !trusted(**a, proxies))
        .or(forwarded.first())
        .copied()
        .unwrap_or(peer)
}

/// Every address of every `X-Forwarded-For` header, in order; a malformed entry ends the
/// list there (what comes before it was added by proxies we trust... or not: stop).
fn forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(text) = value.to_str() else {
            return Vec::new();
        };
        for item in text.split(',') {
            match item.trim().parse::<IpAddr>() {
                Ok(addr) => out.push(addr),
                Err(_) => return Vec::new(),
            }
        }
    }
    out
}

/// Whether the client's request was HTTPS as far as we can tell: only a trusted proxy's
/// `X-Forwarded-Proto: https` says so (TLS served by this process is set by the caller).
pub fn forwarded_https(parts: &Parts, proxies: &[IpNet]) -> bool {
    trusted(peer(&parts.extensions), proxies)
        && parts
            .headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// How many requests a client address may make: a burst, then a steady rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed at once (the bucket's size).
    pub burst: u32,
    /// Requests per minute after the burst (the bucket's refill).
    pub per_minute: u32,
}

/// Token buckets per client address. A request takes a token or is refused with the time
/// until the next one; a token can be given back (a sign-in that turned out right).
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Addresses remembered before full buckets are forgotten.
const MAX_TRACKED: usize = 10_000;

impl RateLimiter {
    /// A limiter with `limit` per address (`burst` 0 refuses everything).
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::default(),
        }
    }

    fn per_second(&self) -> f64 {
        f64::from(self.limit.per_minute) / 60.0
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens =
            (bucket.tokens + elapsed * self.per_second()).min(f64::from(self.limit.burst));
        bucket.at = now;
    }

    /// Takes a token for `addr`, or says how long until one is free.
    pub fn take(&self, addr: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&addr) {
            let full = f64::from(self.limit.burst);
            buckets.retain(|_, b| {
                self.refill(b, now);
                b.tokens < full
            });
        }
        let bucket = buckets.entry(addr).or_insert(Bucket {
            tokens: f64::from(self.limit.burst),
            at: now,
        });
        self.refill(bucket, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let rate = self.per_second();
        Err(if rate > 0.0 {
            Duration::from_secs_f64(((1.0 - bucket.tokens) / rate).max(0.001))
        } else {
            Duration::from_secs(60)
        })
    }

    /// Gives back a token taken for `addr`.
    pub fn give_back(&self, addr: IpAddr) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = buckets.get_mut(&addr) {
            bucket.tokens = (bucket.tokens + 1.0).min(f64::from(self.limit.burst));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(peer: &str, headers: &[(&str, &str)]) -> Parts {
        let mut req = Request::builder();
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let (mut parts, ()) = req.body(()).unwrap().into_parts();
        parts
            .extensions
            .insert(ConnectInfo(SocketAddr::new(peer.parse().unwrap(), 4000)));
        parts
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = [("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.0.0.3")];
        // Through two trusted hops: the first untrusted address from the right.
        assert_eq!(
            client_addr(&parts("10.0.0.2", &xff), &proxies),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        // From an untrusted peer the header is ignored.
        assert_eq!(
            client_addr(&parts("203.0.113.9", &xff), &proxies),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        // A malformed header is ignored too.
        let junk = [("x-forwarded-for", "1.2.3.4, nonsense")];
        assert_eq!(
            client_addr(&parts("10.0.0.2", &junk), &proxies),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
        let https = [("x-forwarded-proto", "https")];
        assert!(forwarded_https(&parts("10.0.0.2", &https), &proxies));
        assert!(!forwarded_https(&parts("203.0.113.9", &https), &proxies));
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_with_the_wait() {
        let limiter = RateLimiter::new(RateLimit {
            burst: 3,
            per_minute: 60,
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            limiter.take(a).unwrap();
        }
        let wait = limiter.take(a).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        limiter.take(b).expect("another address has its own bucket");
        limiter.give_back(a);
        limiter
            .take(a)
            .expect("a token given back can be used again");
    }
}
