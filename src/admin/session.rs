//! Admin UI sessions: stateless signed cookies (so every replica accepts
//! every session), CSRF tokens derived from the session, and the login
//! throttle.
//!
//! Cookie value: `v1.<expires unix seconds>.<session id: 32 hex>.<HMAC-SHA256 hex>`,
//! the MAC over everything before it. The MAC key is derived from
//! `SESSION_SECRET` (or `ADMIN_PASSWORD` when unset) *and* the admin
//! password, so changing the password ends every session even when a
//! secret is set. A CSRF token is the HMAC of the session id under a
//! second derived key: it needs no storage and dies with the session.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::http::{header, HeaderMap, HeaderValue};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Secret;

type HmacSha256 = Hmac<Sha256>;

pub const COOKIE_NAME: &str = "lq_admin_session";
/// How long a login lasts; there is no sliding renewal.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The hidden form field that carries the CSRF token (htmx sends the header instead).
pub const CSRF_FIELD: &str = "_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// A verified session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    pub expires_unix: i64,
}

/// The keys sessions and CSRF tokens are signed with.
#[derive(Clone)]
pub struct SessionKeys {
    cookie: [u8; 32],
    csrf: [u8; 32],
}

fn derive(base: &[u8], label: &str, password: &str) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(base).expect("HMAC takes keys of any length");
    mac.update(label.as_bytes());
    mac.update(&[0]);
    mac.update(&Sha256::digest(password.as_bytes()));
    mac.finalize().into_bytes().into()
}

fn sign(key: &[u8; 32], msg: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    hex::encode(mac.finalize().into_bytes())
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl SessionKeys {
    pub fn new(session_secret: Option<&Secret>, admin_password: &Secret) -> Self {
        let base = session_secret.unwrap_or(admin_password).expose().as_bytes();
        let pw = admin_password.expose();
        SessionKeys { cookie: derive(base, "llm-quota session cookie v1", pw), csrf: derive(base, "llm-quota csrf v1", pw) }
    }

    /// A new session valid for `SESSION_TTL` from `now_unix`, and its cookie value.
    pub fn issue(&self, now_unix: i64) -> (Session, String) {
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let session = Session { id: hex::encode(id), expires_unix: now_unix + SESSION_TTL.as_secs() as i64 };
        let payload = format!("v1.{}.{}", session.expires_unix, session.id);
        let value = format!("{payload}.{}", sign(&self.cookie, payload.as_bytes()));
        (session, value)
    }

    /// The session a cookie value carries, if its signature holds and it has not expired.
    pub fn verify(&self, value: &str, now_unix: i64) -> Option<Session> {
        let (payload, mac) = value.rsplit_once('.')?;
        if !same(&sign(&self.cookie, payload.as_bytes()), mac) {
            return None;
        }
        let mut parts = payload.split('.');
        let (Some("v1"), Some(exp), Some(id), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        let expires_unix: i64 = exp.parse().ok()?;
        (expires_unix > now_unix).then(|| Session { id: id.to_string(), expires_unix })
    }

    /// The session of a request's cookie, if any is valid.
    pub fn from_headers(&self, headers: &HeaderMap, now_unix: i64) -> Option<Session> {
        cookie_values(headers, COOKIE_NAME).find_map(|v| self.verify(v, now_unix))
    }

    pub fn csrf_token(&self, session: &Session) -> String {
        sign(&self.csrf, session.id.as_bytes())
    }

    pub fn csrf_ok(&self, session: &Session, given: &str) -> bool {
        same(&self.csrf_token(session), given.trim())
    }
}

/// Every value of cookie `name` in the request's `Cookie` headers.
fn cookie_values<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(move |c| c.trim().split_once('=').filter(|(n, _)| *n == name).map(|(_, v)| v.trim()))
}

/// `Set-Cookie` for a fresh session. `Secure` only when the admin was
/// reached over HTTPS (a TLS-terminating proxy says so); on plain HTTP a
/// secure cookie would never come back.
pub fn set_cookie(value: &str, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let c = format!("{COOKIE_NAME}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{secure}", SESSION_TTL.as_secs());
    HeaderValue::from_str(&c).expect("cookie value is ASCII")
}

pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_str(&format!("{COOKIE_NAME}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict")).expect("ASCII")
}

/// Failed logins per client, in a sliding window. Kept per replica: with
/// N replicas behind a balancer an attacker gets N times the budget, which
/// still leaves a password guess rate far too low to matter.
pub struct LoginThrottle {
    max_failures: usize,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, Vec<Instant>>>,
}

/// Clients are told apart by IPv4 address or IPv6 /64 (one host usually owns a whole /64).
fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

impl LoginThrottle {
    pub const MAX_FAILURES: usize = 5;
    pub const WINDOW: Duration = Duration::from_secs(60);
    /// Past this many tracked clients, forget those with no recent failure.
    const MAX_CLIENTS: usize = 10_000;

    pub fn new(max_failures: usize, window: Duration) -> Self {
        LoginThrottle { max_failures, window, failures: Mutex::new(HashMap::new()) }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<IpAddr, Vec<Instant>>) -> T) -> T {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut map)
    }

    /// `Err(retry_after)` when the client has used up its failures.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let window = self.window;
        self.with(|map| {
            let Some(list) = map.get_mut(&client_of(ip)) else { return Ok(()) };
            list.retain(|t| now.duration_since(*t) < window);
            if list.len() < self.max_failures {
                return Ok(());
            }
            let oldest = list.iter().min().copied().unwrap_or(now);
            Err((window.saturating_sub(now.duration_since(oldest))).max(Duration::from_secs(1)))
        })
    }

    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let window = self.window;
        self.with(|map| {
            if map.len() >= Self::MAX_CLIENTS {
                map.retain(|_, list| list.iter().any(|t| now.duration_since(*t) < window));
            }
            map.entry(client_of(ip)).or_default().push(now);
        })
    }

    pub fn clear(&self, ip: IpAddr) {
        self.with(|map| map.remove(&client_of(ip)));
    }
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self::new(Self::MAX_FAILURES, Self::WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pw: &str) -> SessionKeys {
        SessionKeys::new(None, &Secret::new(pw))
    }

    #[test]
    fn a_session_verifies_until_it_expires() {
        let k = keys("pw");
        let (s, cookie) = k.issue(1_000);
        assert_eq!(k.verify(&cookie, 1_001), Some(s.clone()));
        assert_eq!(k.verify(&cookie, s.expires_unix), None, "expired at its expiry instant");
    }

    #[test]
    fn tampered_or_foreign_cookies_are_refused() {
        let k = keys("pw");
        let (s, cookie) = k.issue(1_000);
        let longer = cookie.replacen(&format!("v1.{}", s.expires_unix), &format!("v1.{}", s.expires_unix + 999_999), 1);
        assert_eq!(k.verify(&longer, 1_001), None, "a changed expiry breaks the signature");
        assert_eq!(keys("other").verify(&cookie, 1_001), None, "another password's key");
        let secret = SessionKeys::new(Some(&Secret::new("s")), &Secret::new("pw"));
        assert_eq!(secret.verify(&cookie, 1_001), None, "SESSION_SECRET changes the key");
        for junk in ["", "v1", "v1.1.2", "x.y.z.w", "v1.abc.def.0000"] {
            assert_eq!(k.verify(junk, 0), None, "{junk}");
        }
    }

    #[test]
    fn replicas_with_the_same_secret_accept_each_others_sessions() {
        let a = SessionKeys::new(Some(&Secret::new("shared")), &Secret::new("pw"));
        let b = SessionKeys::new(Some(&Secret::new("shared")), &Secret::new("pw"));
        let (s, cookie) = a.issue(0);
        assert_eq!(b.verify(&cookie, 1), Some(s.clone()));
        assert!(b.csrf_ok(&s, &a.csrf_token(&s)));
        assert!(!b.csrf_ok(&s, "0000"));
        let (other, _) = a.issue(0);
        assert!(!a.csrf_ok(&other, &a.csrf_token(&s)), "a token belongs to its session");
    }

    #[test]
    fn the_cookie_is_read_among_others() {
        let k = keys("pw");
        let (s, cookie) = k.issue(0);
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(&format!("a=1; {COOKIE_NAME}=bogus; {COOKIE_NAME}={cookie}")).unwrap());
        assert_eq!(k.from_headers(&h, 1), Some(s));
    }

    #[test]
    fn the_throttle_counts_failures_per_client_in_a_window() {
        let t = LoginThrottle::new(3, Duration::from_secs(60));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let start = Instant::now();
        for i in 0..3 {
            assert!(t.check(a, start).is_ok());
            t.record_failure(a, start + Duration::from_secs(i));
        }
        let wait = t.check(a, start + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(50), "until the oldest failure leaves the window");
        assert!(t.check(b, start).is_ok(), "other clients are not affected");
        assert!(t.check(a, start + Duration::from_secs(61)).is_ok(), "the window slides");
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..3 {
            t.record_failure(v6a, start);
        }
        assert!(t.check(v6b, start).is_err(), "one IPv6 /64 is one client");
    }
}
