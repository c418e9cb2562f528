//! Key authentication: the presented key's SHA-256 looks up the key record
//! in a short-lived cache in front of the database. Admin changes clear the
//! cache at once; the TTL is the safety net.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use axum::http::{header, HeaderMap};

use crate::{
    error::ApiError,
    metrics,
    store::{keys::{hash_key, KeyRecord}, Db},
};

/// Unknown keys are cached too (so guessing does not hammer the database);
/// past this many entries the cache starts over.
const MAX_ENTRIES: usize = 50_000;

pub struct KeyCache {
    ttl: Duration,
    entries: RwLock<HashMap<String, (Option<Arc<KeyRecord>>, Instant)>>,
}

impl KeyCache {
    pub fn new(ttl: Duration) -> Self {
        KeyCache { ttl, entries: RwLock::new(HashMap::new()) }
    }

    pub fn clear(&self) {
        if let Ok(mut e) = self.entries.write() {
            e.clear();
        }
    }

    /// The key record for a key hash, from the cache or the database.
    pub async fn lookup(&self, db: &Db, hash: &str) -> sqlx::Result<Option<Arc<KeyRecord>>> {
        if let Ok(e) = self.entries.read() {
            if let Some((rec, at)) = e.get(hash) {
                if at.elapsed() < self.ttl {
                    ::metrics::counter!(metrics::KEY_CACHE, "result" => "hit").increment(1);
                    return Ok(rec.clone());
                }
            }
        }
        ::metrics::counter!(metrics::KEY_CACHE, "result" => "miss").increment(1);
        let rec = db.key_by_hash(hash).await?.map(Arc::new);
        if let Ok(mut e) = self.entries.write() {
            if e.len() >= MAX_ENTRIES {
                e.clear();
            }
            e.insert(hash.to_string(), (rec.clone(), Instant::now()));
        }
        Ok(rec)
    }
}

/// The key from `Authorization: Bearer …` or `x-api-key`.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    bearer
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim))
        .filter(|k| !k.is_empty())
}

/// Who is calling: 401 for a missing or unknown key, 403 for an inactive or
/// expired one.
pub async fn authenticate(
    cache: &KeyCache,
    db: &Db,
    headers: &HeaderMap,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Arc<KeyRecord>, ApiError> {
    let reject = |reason: &'static str| ::metrics::counter!(metrics::REJECTIONS, "reason" => reason).increment(1);
    let Some(key) = presented_key(headers) else {
        reject("invalid_key");
        return Err(ApiError::unauthorized("missing API key: send Authorization: Bearer sk-…"));
    };
    let rec = cache.lookup(db, &hash_key(key)).await.map_err(|e| ApiError::dependency("database", e))?;
    let Some(rec) = rec else {
        reject("invalid_key");
        return Err(ApiError::unauthorized("invalid API key"));
    };
    if !rec.is_active {
        reject("inactive");
        return Err(ApiError::forbidden(format!("API key '{}' is deactivated", rec.name)));
    }
    if rec.is_expired(now) {
        reject("expired");
        return Err(ApiError::forbidden(format!("API key '{}' has expired", rec.name)));
    }
    Ok(rec)
}
