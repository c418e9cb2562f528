//! The in-process quota store (embedded mode): one mutex around plain maps.
//! Every method holds the lock for a few map operations only.

use std::sync::Mutex;

use rustc_hash::FxHashMap;

use super::{Admit, AdmitRequest, BucketRef, Charge, LimitKind, Limits, QuotaStore, ReservationRef, StoreError, Usage};

#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

/// Fx hashing: the maps' keys are key ids, dates and the gateway's own
/// random reservation ids, nothing a client chooses (SipHash's defence
/// against chosen collisions would cost some 400 instructions a lookup).
#[derive(Debug, Default)]
struct Inner {
    buckets: FxHashMap<BucketRef, Bucket>,
    /// key id → reservation id → reservation
    reservations: FxHashMap<i64, FxHashMap<String, Held>>,
}

#[derive(Debug, Default)]
struct Bucket {
    usage: Usage,
    dirty: bool,
}

#[derive(Debug)]
struct Held {
    day: String,
    month: String,
    prompt: u64,
    held: u64,
    expires_at_ms: i64,
}

fn day_ref(key_id: i64, day: &str) -> BucketRef {
    BucketRef { key_id, period: "day", bucket: day.to_string() }
}

fn month_ref(key_id: i64, month: &str) -> BucketRef {
    BucketRef { key_id, period: "month", bucket: month.to_string() }
}

/// What a key may still take in both buckets: the smallest headroom of the
/// limited ones, `u64::MAX` when both are unlimited.
pub(crate) fn token_headroom(limits: &Limits, day: &Usage, month: &Usage) -> u64 {
    let d = limits.daily_tokens.map_or(u64::MAX, |l| l.saturating_sub(day.committed_tokens()));
    let m = limits.monthly_tokens.map_or(u64::MAX, |l| l.saturating_sub(month.committed_tokens()));
    d.min(m)
}

/// The first limit (requests before tokens, day before month) that a new
/// request of `prompt` tokens would break.
pub(crate) fn broken_limit(limits: &Limits, day: &Usage, month: &Usage, prompt: u64) -> Option<LimitKind> {
    let over_requests = |l: Option<u64>, u: &Usage| l.is_some_and(|l| u.net_requests() + 1 > l);
    let over_tokens = |l: Option<u64>, u: &Usage| l.is_some_and(|l| u.committed_tokens() + prompt > l);
    if over_requests(limits.daily_requests, day) {
        Some(LimitKind::DailyRequests)
    } else if over_requests(limits.monthly_requests, month) {
        Some(LimitKind::MonthlyRequests)
    } else if over_tokens(limits.daily_tokens, day) {
        Some(LimitKind::DailyTokens)
    } else if over_tokens(limits.monthly_tokens, month) {
        Some(LimitKind::MonthlyTokens)
    } else {
        None
    }
}

impl Inner {
    fn bucket(&mut self, r: &BucketRef) -> &mut Bucket {
        self.buckets.entry(r.clone()).or_default()
    }

    /// Release a reservation from its buckets and charge `charge` instead.
    fn release(&mut self, key_id: i64, h: &Held, charge: Charge) {
        for r in [day_ref(key_id, &h.day), month_ref(key_id, &h.month)] {
            let b = self.bucket(&r);
            b.usage.reserved = b.usage.reserved.saturating_sub(h.held);
            b.usage.prompt_tokens += charge.prompt_tokens;
            b.usage.completion_tokens += charge.completion_tokens;
            if charge.refund_request {
                b.usage.refunds += 1;
            }
            b.dirty = true;
        }
    }

    /// Lapsed reservations are charged what they held: the gateway that held
    /// them may have delivered all of it before it died.
    fn expire_key(&mut self, key_id: i64, now_ms: i64) -> u64 {
        let Some(map) = self.reservations.get_mut(&key_id) else { return 0 };
        let lapsed: Vec<String> = map.iter().filter(|(_, h)| h.expires_at_ms <= now_ms).map(|(id, _)| id.clone()).collect();
        let lapsed: Vec<Held> = lapsed.iter().filter_map(|id| map.remove(id)).collect();
        for h in &lapsed {
            let charge = Charge {
                prompt_tokens: h.prompt,
                completion_tokens: h.held.saturating_sub(h.prompt),
                refund_request: false,
            };
            self.release(key_id, h, charge);
        }
        lapsed.len() as u64
    }

    fn lock_err() -> StoreError {
        StoreError::new("in-process quota store poisoned")
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        self.inner.lock().map_err(|_| Inner::lock_err())
    }
}

impl QuotaStore for MemoryStore {
    async fn admit(&self, req: &AdmitRequest) -> Result<Admit, StoreError> {
        let mut g = self.inner()?;
        let (dr, mr) = (day_ref(req.key_id, &req.day), month_ref(req.key_id, &req.month));
        let missing: Vec<BucketRef> = [&dr, &mr].into_iter().filter(|r| !g.buckets.contains_key(*r)).cloned().collect();
        if !missing.is_empty() {
            return Ok(Admit::Missing(missing));
        }
        let day = g.buckets[&dr].usage;
        let month = g.buckets[&mr].usage;
        if let Some(limit) = broken_limit(&req.limits, &day, &month, req.prompt_tokens) {
            return Ok(Admit::Rejected { limit, day, month });
        }
        let lease = token_headroom(&req.limits, &day, &month).saturating_sub(req.prompt_tokens).min(req.lease_tokens);
        let held = req.prompt_tokens + lease;
        for r in [&dr, &mr] {
            let b = g.bucket(r);
            b.usage.requests += 1;
            b.usage.reserved += held;
            b.dirty = true;
        }
        g.reservations.entry(req.key_id).or_default().insert(
            req.reservation_id.clone(),
            Held {
                day: req.day.clone(),
                month: req.month.clone(),
                prompt: req.prompt_tokens,
                held,
                expires_at_ms: req.expires_at_ms,
            },
        );
        Ok(Admit::Granted { held, day: g.buckets[&dr].usage, month: g.buckets[&mr].usage })
    }

    async fn lease(&self, resv: &ReservationRef, limits: &Limits, want: u64, expires_at_ms: i64) -> Result<u64, StoreError> {
        let mut g = self.inner()?;
        let alive = g.reservations.get(&resv.key_id).is_some_and(|m| m.contains_key(&resv.id));
        if !alive {
            return Ok(0);
        }
        let (dr, mr) = (day_ref(resv.key_id, &resv.day), month_ref(resv.key_id, &resv.month));
        let day = g.bucket(&dr).usage;
        let month = g.bucket(&mr).usage;
        let granted = token_headroom(limits, &day, &month).min(want);
        for r in [&dr, &mr] {
            g.bucket(r).usage.reserved += granted;
        }
        if let Some(h) = g.reservations.get_mut(&resv.key_id).and_then(|m| m.get_mut(&resv.id)) {
            h.held += granted;
            h.expires_at_ms = expires_at_ms;
        }
        Ok(granted)
    }

    async fn settle(&self, resv: &ReservationRef, charge: Charge) -> Result<(), StoreError> {
        let mut g = self.inner()?;
        let held = g.reservations.get_mut(&resv.key_id).and_then(|m| m.remove(&resv.id));
        if let Some(h) = held {
            g.release(resv.key_id, &h, charge);
        }
        Ok(())
    }

    async fn seed(&self, bucket: &BucketRef, totals: Usage) -> Result<(), StoreError> {
        let mut g = self.inner()?;
        g.buckets.entry(bucket.clone()).or_insert(Bucket { usage: Usage { reserved: 0, ..totals }, dirty: false });
        Ok(())
    }

    async fn usage(&self, key_id: i64, day: &str, month: &str) -> Result<(Option<Usage>, Option<Usage>), StoreError> {
        let g = self.inner()?;
        let get = |r: BucketRef| g.buckets.get(&r).map(|b| b.usage);
        Ok((get(day_ref(key_id, day)), get(month_ref(key_id, month))))
    }

    async fn expire(&self, now_ms: i64, _key_ids: &[i64]) -> Result<u64, StoreError> {
        let mut g = self.inner()?;
        let keys: Vec<i64> = g.reservations.keys().copied().collect();
        Ok(keys.into_iter().map(|k| g.expire_key(k, now_ms)).sum())
    }

    async fn take_dirty(&self, _key_ids: &[i64]) -> Result<Vec<(BucketRef, Usage)>, StoreError> {
        let mut g = self.inner()?;
        Ok(g.buckets
            .iter_mut()
            .filter(|(_, b)| b.dirty)
            .map(|(r, b)| {
                b.dirty = false;
                (r.clone(), b.usage)
            })
            .collect())
    }

    async fn mark_dirty(&self, buckets: &[BucketRef]) -> Result<(), StoreError> {
        let mut g = self.inner()?;
        for r in buckets {
            if let Some(b) = g.buckets.get_mut(r) {
                b.dirty = true;
            }
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner().map(|_| ())
    }
}
