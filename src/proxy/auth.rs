//! Key authentication: the presented key's SHA-256 looks up the key record
//! in a short-lived cache in front of the database. Admin changes clear the
//! cache at once; the TTL is the safety net.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
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

struct Entry {
    rec: Option<Arc<KeyRecord>>,
    fetched: Instant,
    generation: u64,
}

/// Key records by key hash. An entry is fresh for `ttl` and until the next
/// admin change (`clear` bumps the generation). A stale entry is refetched;
/// if the database cannot answer, the stale entry is served instead
/// (stale-if-error), so a database outage does not lock out known keys.
pub struct KeyCache {
    ttl: Duration,
    generation: AtomicU64,
    entries: RwLock<HashMap<String, Entry>>,
}

impl KeyCache {
    pub fn new(ttl: Duration) -> Self {
        KeyCache { ttl, generation: AtomicU64::new(0), entries: RwLock::new(HashMap::new()) }
    }

    /// Every entry must be refetched before it is trusted again.
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The key record for a key hash, from the cache or the database.
    pub async fn lookup(&self, db: &Db, hash: &str) -> sqlx::Result<Option<Arc<KeyRecord>>> {
        let generation = self.generation.load(Ordering::SeqCst);
        let cached = self.entries.read().ok().and_then(|e| {
            e.get(hash).map(|entry| (entry.rec.clone(), entry.generation == generation && entry.fetched.elapsed() < self.ttl))
        });
        if let Some((rec, true)) = &cached {
            metrics::key_cache_hit();
            return Ok(rec.clone());
        }
        ::metrics::counter!(metrics::KEY_CACHE, "result" => "miss").increment(1);
        // Boxed: the query's state machine is kilobytes, and unboxed it
        // would make every request's future that much larger (and copied).
        let rec = match Box::pin(db.key_by_hash(hash)).await {
            Ok(rec) => rec.map(Arc::new),
            Err(e) => {
                return match cached {
                    Some((stale, _)) => {
                        tracing::warn!(error = %e, "database unavailable; using the cached key record");
                        Ok(stale)
                    }
                    None => Err(e),
                }
            }
        };
        if let Ok(mut e) = self.entries.write() {
            if e.len() >= MAX_ENTRIES {
                e.clear();
            }
            e.insert(hash.to_string(), Entry { rec: rec.clone(), fetched: Instant::now(), generation });
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
