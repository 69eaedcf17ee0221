//! [`CookieKey`]: signed, expiring cookie values, so a browser can prove what this server
//! (or any replica sharing the key) told it earlier, without server-side state.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The key that signs cookie values (HMAC-SHA256). Replicas behind one load balancer must
/// share it (`[server] cookie_secret`); without one, each process makes its own.
#[derive(Clone)]
pub struct CookieKey([u8; 32]);

impl fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CookieKey(***)")
    }
}

impl Default for CookieKey {
    fn default() -> Self {
        Self::generate()
    }
}

impl CookieKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self(key)
    }

    /// The key derived from a configured secret.
    pub fn from_secret(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// The key derived from a shared secret kept in the store (see
    /// [`Allocator::shared_secret`](lablink_core::Allocator::shared_secret)).
    pub fn from_bytes(secret: &[u8]) -> Self {
        Self(Sha256::digest(secret).into())
    }

    fn mac(&self, purpose: &str, payload: &str, expires: i64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for part in [
            purpose.as_bytes(),
            payload.as_bytes(),
            &expires.to_be_bytes(),
        ] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// A cookie value carrying `payload` for `purpose` until `expires` (Unix seconds).
    pub fn sign(&self, purpose: &str, payload: &str, expires: i64) -> String {
        let tag = self.mac(purpose, payload, expires).finalize().into_bytes();
        format!(
            "{}.{expires}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The payload of a value [`sign`](Self::sign)ed for `purpose` with this key, if it has
    /// not expired at `now` (Unix seconds). The tag is compared in constant time.
    pub fn verify(&self, purpose: &str, value: &str, now: i64) -> Option<String> {
        self.verify_until(purpose, value, now)
            .map(|(payload, _)| payload)
    }

    /// Like [`verify`](Self::verify), also giving the value's expiry (Unix seconds).
    pub fn verify_until(&self, purpose: &str, value: &str, now: i64) -> Option<(String, i64)> {
        let mut parts = value.splitn(3, '.');
        let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(parts.next()?).ok()?).ok()?;
        let expires: i64 = parts.next()?.parse().ok()?;
        let tag = URL_SAFE_NO_PAD.decode(parts.next()?).ok()?;
        self.mac(purpose, &payload, expires)
            .verify_slice(&tag)
            .ok()?;
        (now < expires).then_some((payload, expires))
    }

    /// The payload `value` claims to carry, unverified: only to look up what to
    /// [`verify`](Self::verify) it against (a participant cookie's email, to find the VM its
    /// purpose names).
    pub fn claimed_payload(value: &str) -> Option<String> {
        let encoded = value.split('.').next()?;
        String::from_utf8(URL_SAFE_NO_PAD.decode(encoded).ok()?).ok()
    }

    /// A token bound to `payload` for `purpose` (URL-safe): whoever holds the key computes
    /// the same one, nobody else can. Use a purpose of its own, never one of signed values.
    pub fn token(&self, purpose: &str, payload: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(purpose, payload, 0).finalize().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_value_is_accepted_only_as_signed_and_before_it_expires() {
        let key = CookieKey::generate();
        let value = key.sign("participant", "ada@example.org", 1_000);
        assert_eq!(
            key.verify("participant", &value, 999).as_deref(),
            Some("ada@example.org")
        );
        assert_eq!(key.verify("participant", &value, 1_000), None, "expired");
        assert_eq!(key.verify("admin", &value, 0), None, "another purpose");
        assert_eq!(CookieKey::generate().verify("participant", &value, 0), None);
        let forged = value.replacen(
            &URL_SAFE_NO_PAD.encode("ada@example.org"),
            &URL_SAFE_NO_PAD.encode("bob@example.org"),
            1,
        );
        assert_eq!(key.verify("participant", &forged, 0), None);
        let longer = value.replacen(".1000.", ".9999.", 1);
        assert_eq!(key.verify("participant", &longer, 0), None);
        for junk in ["", "a.b", "a.1.c", "...", "x.1.y.z"] {
            assert_eq!(key.verify("participant", junk, 0), None, "{junk:?}");
        }
        let shared = CookieKey::from_secret("a secret both replicas were given");
        let other = CookieKey::from_secret("a secret both replicas were given");
        assert!(other
            .verify("participant", &shared.sign("participant", "x", 10), 0)
            .is_some());
        assert!(!format!("{shared:?}").contains("secret"));
        assert_eq!(
            key.verify_until("participant", &value, 999),
            Some(("ada@example.org".to_owned(), 1_000))
        );
    }

    #[test]
    fn a_token_is_the_same_for_the_same_key_purpose_and_payload_only() {
        let key = CookieKey::from_bytes(b"stored secret");
        let token = key.token("csrf", "session-1");
        assert_eq!(
            token,
            CookieKey::from_bytes(b"stored secret").token("csrf", "session-1")
        );
        assert_ne!(token, key.token("csrf", "session-2"));
        assert_ne!(token, key.token("other", "session-1"));
        assert_ne!(
            token,
            CookieKey::from_bytes(b"another secret").token("csrf", "session-1")
        );
    }
}
