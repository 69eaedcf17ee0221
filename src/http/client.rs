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

/// The client's address of a request, as [`client_addr`] finds it with the server's trusted
/// proxies (an extractor).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

impl axum::extract::FromRequestParts<super::HttpState> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &super::HttpState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(state.client_addr(parts)))
    }
}

/// The address of the peer that opened the connection (unspecified when the router is
/// served without `ConnectInfo`); an IPv4 peer of an IPv6 listener as IPv4.
fn peer(extensions: &axum::http::Extensions) -> IpAddr {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_canonical())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

fn trusted(addr: IpAddr, proxies: &[IpNet]) -> bool {
    proxies.iter().any(|net| net.contains(&addr))
}

/// The client's address: the peer, or, when the peer is one of `proxies`, the nearest
/// address in `X-Forwarded-For` that is not a trusted proxy itself (read from the right,
/// the end our own proxies wrote, up to the first entry that is not an address).
/// `X-Forwarded-For` from anyone else is ignored, so a client cannot choose the address it
/// is counted under.
pub fn client_addr(parts: &Parts, proxies: &[IpNet]) -> IpAddr {
    let mut client = peer(&parts.extensions);
    if !trusted(client, proxies) {
        return client;
    }
    for hop in forwarded_for(&parts.headers) {
        match hop {
            Some(addr) => {
                client = addr;
                if !trusted(addr, proxies) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

/// The entries of every `X-Forwarded-For` header, nearest first (`None` for one that is not
/// an address; a port or IPv6 brackets are accepted).
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let mut hops: Vec<Option<IpAddr>> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        match value.to_str() {
            Ok(text) => hops.extend(text.split(',').map(|item| parse_hop(item.trim()))),
            Err(_) => hops.push(None),
        }
    }
    hops.reverse();
    hops
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:5678`.
fn parse_hop(item: &str) -> Option<IpAddr> {
    if let Ok(addr) = item.parse::<IpAddr>() {
        return Some(addr.to_canonical());
    }
    item.parse::<SocketAddr>()
        .ok()
        .map(|a| a.ip().to_canonical())
        .or_else(|| {
            item.strip_prefix('[')
                .and_then(|i| i.strip_suffix(']'))
                .and_then(|i| i.parse::<IpAddr>().ok())
        })
}

/// Whether the client's request was HTTPS as far as we can tell: only a trusted proxy's
/// `X-Forwarded-Proto` says so, and only its own (last) entry counts (TLS served by this
/// process is the caller's to add).
pub fn forwarded_https(parts: &Parts, proxies: &[IpNet]) -> bool {
    trusted(peer(&parts.extensions), proxies)
        && parts
            .headers
            .get_all("x-forwarded-proto")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .last()
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// The key a client is limited under: its IPv4 address, or the /64 network of its IPv6
/// address (one IPv6 client holds a whole /64, so it cannot take a fresh bucket per address).
pub(crate) fn limit_key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
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
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    by_client: HashMap<IpAddr, Bucket>,
    /// When full buckets were last forgotten.
    swept: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Clients remembered at most. Beyond it (after forgetting full buckets, at most once a
/// second), new clients share one overflow bucket, so a flood of addresses costs bounded
/// memory and time.
const MAX_TRACKED: usize = 10_000;

/// The key of the shared overflow bucket.
const OVERFLOW: IpAddr = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

impl RateLimiter {
    /// A limiter with `limit` per client (`burst` 0 refuses everything).
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
        let mut key = limit_key(addr);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.by_client.contains_key(&key) && buckets.by_client.len() >= MAX_TRACKED {
            if buckets
                .swept
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
            {
                let full = f64::from(self.limit.burst);
                buckets.by_client.retain(|_, b| {
                    self.refill(b, now);
                    b.tokens < full
                });
                buckets.swept = Some(now);
            }
            if buckets.by_client.len() >= MAX_TRACKED {
                key = OVERFLOW;
            }
        }
        let bucket = buckets.by_client.entry(key).or_insert(Bucket {
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
        if let Some(bucket) = buckets.by_client.get_mut(&limit_key(addr)) {
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
        // Read from our end: junk a client put in front does not matter; junk after its
        // address stops the walk at the last good hop.
        let junk = [("x-forwarded-for", "nonsense, 198.51.100.7:5678")];
        assert_eq!(
            client_addr(&parts("10.0.0.2", &junk), &proxies),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        let junk = [("x-forwarded-for", "198.51.100.7, nonsense")];
        assert_eq!(
            client_addr(&parts("10.0.0.2", &junk), &proxies),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
        // An IPv4 proxy seen through an IPv6 listener is still trusted.
        assert_eq!(
            client_addr(&parts("::ffff:10.0.0.2", &xff), &proxies),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        let https = [("x-forwarded-proto", "http, https")];
        assert!(forwarded_https(&parts("10.0.0.2", &https), &proxies));
        assert!(!forwarded_https(&parts("203.0.113.9", &https), &proxies));
        let spoofed = [("x-forwarded-proto", "https, http")];
        assert!(!forwarded_https(&parts("10.0.0.2", &spoofed), &proxies));
    }

    #[test]
    fn an_ipv6_client_is_limited_by_its_64_and_a_flood_of_addresses_shares_one_bucket() {
        let limiter = RateLimiter::new(RateLimit {
            burst: 1,
            per_minute: 1,
        });
        limiter.take("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(limiter.take("2001:db8:1:2::ffff".parse().unwrap()).is_err());
        limiter.take("2001:db8:1:3::1".parse().unwrap()).unwrap();
        let flood = RateLimiter::new(RateLimit {
            burst: 1,
            per_minute: 1,
        });
        for i in 0..MAX_TRACKED as u32 {
            flood.take(IpAddr::from(i.to_be_bytes())).unwrap();
        }
        let len = flood.buckets.lock().unwrap().by_client.len();
        assert_eq!(len, MAX_TRACKED);
        flood.take("198.51.100.1".parse().unwrap()).unwrap();
        assert!(
            flood.take("198.51.100.2".parse().unwrap()).is_err(),
            "overflow bucket"
        );
        assert_eq!(
            flood.buckets.lock().unwrap().by_client.len(),
            MAX_TRACKED + 1
        );
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
