//! Who is calling: bearer tokens, the client's address, and the limit on
//! callers without a token.
//!
//! Tokens are [`Secret`]s: they never print (`Debug` shows `***`), and a
//! presented token is compared with the expected one through their SHA-256
//! digests in constant time, so neither where they differ nor the expected
//! token's length shows in the answer time.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A bearer token: compared in constant time, never printed.
#[derive(Clone)]
pub struct Secret {
    value: Arc<str>,
    digest: [u8; 32],
}

impl Secret {
    /// `None` for an empty (or all-whitespace) value: an empty token would
    /// match an empty `Authorization: Bearer ` header.
    pub fn new(value: impl AsRef<str>) -> Option<Self> {
        let value = value.as_ref().trim();
        if value.is_empty() {
            return None;
        }
        Some(Self {
            value: value.into(),
            digest: Sha256::digest(value.as_bytes()).into(),
        })
    }

    /// The token itself, for a client that must send it.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Whether `given` is this token. Time depends on the length of `given`
    /// only (hashing it), never on this token or on where they differ.
    pub fn matches(&self, given: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        bool::from(given.ct_eq(&self.digest))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// For tests and configuration code: `Some("t".into())`. An empty string
/// makes a token that nothing matches, rather than one an empty header does.
impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value).unwrap_or_else(|| Self {
            value: "".into(),
            // No input hashes to all ones.
            digest: [0xff; 32],
        })
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::from(value.as_str())
    }
}

/// The token of an `Authorization: Bearer <token>` header. The scheme is
/// matched case-insensitively (RFC 9110 §11.1); scheme and token are
/// separated by one space, and the token is taken as sent (a token with
/// extra spaces is another token).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Who a storefront request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// No COUPON_API_TOKEN is configured (development on loopback, or
    /// opened on purpose): anyone who can connect. Limited per address, and
    /// the user ids it names are not trusted.
    Open,
    /// The storefront, with COUPON_API_TOKEN.
    Storefront,
    /// An employee or operator, with an admin credential (an employee's
    /// token, or COUPON_ADMIN_TOKEN; see [`super::employees`]).
    Admin,
}

/// The address of the peer of the connection (set by [`super::serve`]);
/// `None` when the router runs without it (e.g. in a unit test).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<IpAddr>);

/// The connection's peer, as [`super::serve`] records it on each request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub SocketAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(
            parts.extensions.get::<Peer>().map(|peer| peer.0.ip()),
        ))
    }
}

/// Most distinct addresses tracked in one second; beyond, new addresses
/// are refused for the rest of that second, so the table stays bounded
/// under a spray of addresses.
const MAX_TRACKED: usize = 65_536;

/// Requests per second per client address (a fixed one-second window in
/// memory, per gateway instance).
pub struct AddressLimiter {
    per_second: u64,
    window: Mutex<(i64, HashMap<IpAddr, u64>)>,
}

impl AddressLimiter {
    pub fn new(per_second: u64) -> Self {
        Self {
            per_second,
            window: Mutex::new((0, HashMap::new())),
        }
    }

    /// Counts one request from `address` at `second`; whether it is within
    /// the limit. A request without a known address counts under
    /// `0.0.0.0`, so it is limited too.
    pub fn allow(&self, address: Option<IpAddr>, second: i64) -> bool {
        let address = address.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let Ok(mut window) = self.window.lock() else {
            return false;
        };
        if window.0 != second {
            window.0 = second;
            window.1.clear();
        }
        let counts = &mut window.1;
        if counts.len() >= MAX_TRACKED && !counts.contains_key(&address) {
            return false;
        }
        let count = counts.entry(address).or_insert(0);
        *count += 1;
        *count <= self.per_second
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_auth(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer tok", "bearer tok", "BEARER tok", "beArer tok"] {
            assert_eq!(bearer(&with_auth(value)), Some("tok"), "{value:?}");
        }
        assert_eq!(bearer(&with_auth("Bearer  tok")), Some(" tok"));
        for value in ["Basic tok", "Bearertok", "Bearer ", "tok", "Bearer\ttok"] {
            assert_eq!(bearer(&with_auth(value)), None, "{value:?}");
        }
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn secrets_match_only_themselves_and_never_print() {
        let secret = Secret::new("s3cret-token").unwrap();
        assert!(secret.matches("s3cret-token"));
        for wrong in ["", "s3cret-toke", "s3cret-token ", "S3cret-token", "x"] {
            assert!(!secret.matches(wrong), "{wrong:?}");
        }
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        assert!(!format!("{:?}", Some(secret)).contains("s3cret"));
        assert!(Secret::new("  ").is_none());
        let empty = Secret::from("");
        assert!(!empty.matches(""), "an empty token matches nothing");
    }

    #[test]
    fn the_address_limit_is_per_address_and_per_second() {
        let limiter = AddressLimiter::new(2);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        assert!(limiter.allow(a, 100));
        assert!(limiter.allow(a, 100));
        assert!(!limiter.allow(a, 100));
        assert!(limiter.allow(b, 100), "another address has its own count");
        assert!(limiter.allow(a, 101), "a new second starts over");
    }
}
