//! The quota engine: one trait with identical semantics in the in-process
//! store (`memory`) and the Redis store, and `Quota`, which the request path
//! uses: seeding missing buckets from the durable store, admission, leases,
//! settlement.
//!
//! Accounting per bucket (a key's day or month):
//! - `requests` counts admissions and `refunds` the admissions given back
//!   (upstream failed before any output); both only grow, so the flusher can
//!   write absolute values with `GREATEST` and replicas never undo each other.
//! - `prompt_tokens` / `completion_tokens` are charged at settlement.
//! - `reserved` is what in-flight requests hold (prompt + leases); it is
//!   never persisted.
//!
//! A request is admitted only if, in both buckets, `requests - refunds + 1`
//! fits the request limit and `charged + reserved + prompt` fits the token
//! limit. It then holds `prompt + min(lease, what is left)`, and grows by
//! leases while it streams. Nothing is delivered beyond what is held, so
//! charged tokens never pass a limit as long as the upstream's counts agree
//! with the gateway's.

pub mod buckets;
pub mod flush;
pub mod memory;
pub mod redis;

use std::{future::Future, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use self::buckets::{Clock, Periods};

/// The four limits of a key; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub daily_tokens: Option<u64>,
    pub monthly_tokens: Option<u64>,
    pub daily_requests: Option<u64>,
    pub monthly_requests: Option<u64>,
}

/// Totals of one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub requests: u64,
    pub refunds: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub reserved: u64,
}

impl Usage {
    pub fn net_requests(&self) -> u64 {
        self.requests.saturating_sub(self.refunds)
    }
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
    /// Tokens that count against the limit right now.
    pub fn committed_tokens(&self) -> u64 {
        self.tokens() + self.reserved
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    DailyRequests,
    MonthlyRequests,
    DailyTokens,
    MonthlyTokens,
}

impl LimitKind {
    /// The metric label of a rejection by this limit.
    pub fn label(self) -> &'static str {
        match self {
            LimitKind::DailyRequests => "daily_requests",
            LimitKind::MonthlyRequests => "monthly_requests",
            LimitKind::DailyTokens => "daily_tokens",
            LimitKind::MonthlyTokens => "monthly_tokens",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            LimitKind::DailyRequests => "daily request limit",
            LimitKind::MonthlyRequests => "monthly request limit",
            LimitKind::DailyTokens => "daily token limit",
            LimitKind::MonthlyTokens => "monthly token limit",
        }
    }
    pub fn is_daily(self) -> bool {
        matches!(self, LimitKind::DailyRequests | LimitKind::DailyTokens)
    }
    pub fn limit(self, l: &Limits) -> Option<u64> {
        match self {
            LimitKind::DailyRequests => l.daily_requests,
            LimitKind::MonthlyRequests => l.monthly_requests,
            LimitKind::DailyTokens => l.daily_tokens,
            LimitKind::MonthlyTokens => l.monthly_tokens,
        }
    }
}

/// Which bucket of a key: `d` + `YYYY-MM-DD` or `m` + `YYYY-MM`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketRef {
    pub key_id: i64,
    /// "day" or "month"
    pub period: &'static str,
    pub bucket: String,
}

#[derive(Debug, Clone)]
pub struct AdmitRequest {
    pub key_id: i64,
    pub day: String,
    pub month: String,
    pub limits: Limits,
    pub prompt_tokens: u64,
    pub lease_tokens: u64,
    pub reservation_id: String,
    /// When the reservation lapses unless a lease renews it.
    pub expires_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    Granted { held: u64, day: Usage, month: Usage },
    Rejected { limit: LimitKind, day: Usage, month: Usage },
    /// These buckets are not in the hot store: seed them and try again.
    Missing(Vec<BucketRef>),
}

/// Identifies a live reservation and the buckets it was admitted into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRef {
    pub key_id: i64,
    pub id: String,
    pub day: String,
    pub month: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Give the request back (upstream failed before any output).
    pub refund_request: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("quota store unavailable: {message}")]
pub struct StoreError {
    pub message: String,
    /// No answer within the store's timeout: the store is slow, or this
    /// replica too busy to read the answer in time.
    pub timed_out: bool,
}

impl StoreError {
    pub fn new(message: impl Into<String>) -> Self {
        StoreError { message: message.into(), timed_out: false }
    }
}

/// The hot quota state. Every method is one atomic step.
pub trait QuotaStore: Send + Sync + 'static {
    fn admit(&self, req: &AdmitRequest) -> impl Future<Output = Result<Admit, StoreError>> + Send;
    /// Grow a reservation by up to `want` tokens; returns what was granted
    /// (0 when the key has nothing left or the reservation has lapsed).
    fn lease(
        &self,
        resv: &ReservationRef,
        limits: &Limits,
        want: u64,
        expires_at_ms: i64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Replace the reservation with the real usage. A lapsed reservation was
    /// already charged what it held; settling it again changes nothing.
    fn settle(&self, resv: &ReservationRef, charge: Charge) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Put a bucket's persisted totals in place if the bucket is missing.
    fn seed(&self, bucket: &BucketRef, totals: Usage) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Current totals of a key's two buckets, `None` for a missing one.
    fn usage(
        &self,
        key_id: i64,
        day: &str,
        month: &str,
    ) -> impl Future<Output = Result<(Option<Usage>, Option<Usage>), StoreError>> + Send;
    /// Charge lapsed reservations (what they held) of these keys.
    fn expire(&self, now_ms: i64, key_ids: &[i64]) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Buckets of these keys changed since the last call, with absolute
    /// totals, for the flusher.
    fn take_dirty(&self, key_ids: &[i64]) -> impl Future<Output = Result<Vec<(BucketRef, Usage)>, StoreError>> + Send;
    /// Mark buckets dirty again after a failed flush.
    fn mark_dirty(&self, buckets: &[BucketRef]) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Reachability, for `/readyz`.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// A random 128-bit id as 32 hex digits, from the thread's RNG (no system
/// call per request, unlike `Uuid::new_v4`).
pub fn fast_id() -> String {
    hex_id(rand::random())
}

/// `n` as 32 lowercase hex digits, most significant first: what
/// `format!("{n:032x}")` writes, without the formatter's padding path
/// (two ids a request). `hex::encode_to_slice`, not `hex::encode`, which
/// collects `char`s and costs more than the formatter.
fn hex_id(n: u128) -> String {
    let mut out = vec![0; 32];
    hex::encode_to_slice(n.to_be_bytes(), &mut out).expect("32 digits for 16 bytes");
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// The store in use; nothing outside `quota` needs to know which.
#[derive(Clone)]
pub enum Store {
    Memory(Arc<memory::MemoryStore>),
    Redis(Arc<redis::RedisStore>),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Memory($s) => $e.await,
            // Boxed: a Redis call's future is kilobytes (the pool checkout,
            // the timeout, the script call), and every future awaiting it
            // would carry them and copy them with every move.
            Store::Redis($s) => Box::pin($e).await,
        }
    };
}

impl Store {
    /// Every call is a network round trip (Redis), not a map lookup.
    pub fn is_remote(&self) -> bool {
        matches!(self, Store::Redis(_))
    }
}

impl QuotaStore for Store {
    async fn admit(&self, req: &AdmitRequest) -> Result<Admit, StoreError> {
        dispatch!(self, s => s.admit(req))
    }
    async fn lease(&self, resv: &ReservationRef, limits: &Limits, want: u64, exp: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.lease(resv, limits, want, exp))
    }
    async fn settle(&self, resv: &ReservationRef, charge: Charge) -> Result<(), StoreError> {
        dispatch!(self, s => s.settle(resv, charge))
    }
    async fn seed(&self, bucket: &BucketRef, totals: Usage) -> Result<(), StoreError> {
        dispatch!(self, s => s.seed(bucket, totals))
    }
    async fn usage(&self, key_id: i64, day: &str, month: &str) -> Result<(Option<Usage>, Option<Usage>), StoreError> {
        dispatch!(self, s => s.usage(key_id, day, month))
    }
    async fn expire(&self, now_ms: i64, key_ids: &[i64]) -> Result<u64, StoreError> {
        dispatch!(self, s => s.expire(now_ms, key_ids))
    }
    async fn take_dirty(&self, key_ids: &[i64]) -> Result<Vec<(BucketRef, Usage)>, StoreError> {
        dispatch!(self, s => s.take_dirty(key_ids))
    }
    async fn mark_dirty(&self, buckets: &[BucketRef]) -> Result<(), StoreError> {
        dispatch!(self, s => s.mark_dirty(buckets))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping())
    }
}

/// Where persisted bucket totals come from when the hot store lacks them.
pub trait Seeder: Send + Sync + 'static {
    fn load(&self, bucket: &BucketRef) -> impl Future<Output = anyhow::Result<Usage>> + Send;
}

/// The outcome of an admission, as the request path sees it.
#[derive(Debug)]
pub enum Admission {
    Granted(Reservation),
    Rejected(Rejection),
}

#[derive(Debug, Clone)]
pub struct Rejection {
    pub limit: LimitKind,
    pub limit_value: u64,
    pub reset_at: DateTime<Utc>,
    pub status: QuotaStatus,
}

/// Limits, usage and resets of both windows, for headers and `/v1/quota`.
#[derive(Debug, Clone, Serialize)]
pub struct QuotaStatus {
    pub limits: Limits,
    pub day: Usage,
    pub month: Usage,
    pub day_bucket: String,
    pub month_bucket: String,
    pub day_start: DateTime<Utc>,
    pub day_reset: DateTime<Utc>,
    pub month_start: DateTime<Utc>,
    pub month_reset: DateTime<Utc>,
}

/// One window's figures for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub limit: u64,
    pub remaining: u64,
    pub reset_at: DateTime<Utc>,
}

impl QuotaStatus {
    fn window(&self, daily: Option<u64>, monthly: Option<u64>, used: impl Fn(&Usage) -> u64) -> Option<Window> {
        let day = daily.map(|l| Window { limit: l, remaining: l.saturating_sub(used(&self.day)), reset_at: self.day_reset });
        let month =
            monthly.map(|l| Window { limit: l, remaining: l.saturating_sub(used(&self.month)), reset_at: self.month_reset });
        match (day, month) {
            (Some(d), Some(m)) => Some(if m.remaining < d.remaining { m } else { d }),
            (d, m) => d.or(m),
        }
    }
    /// The tightest request window (fewest remaining), if any is limited.
    pub fn requests_window(&self) -> Option<Window> {
        self.window(self.limits.daily_requests, self.limits.monthly_requests, Usage::net_requests)
    }
    /// The tightest token window, counting in-flight reservations.
    pub fn tokens_window(&self) -> Option<Window> {
        self.window(self.limits.daily_tokens, self.limits.monthly_tokens, Usage::committed_tokens)
    }
}

/// A live reservation: what the relay meters against.
#[derive(Debug)]
pub struct Reservation {
    pub resv: ReservationRef,
    pub limits: Limits,
    pub prompt_tokens: u64,
    /// Tokens held: prompt + leases granted so far.
    pub held: u64,
    pub status: QuotaStatus,
    /// False when the quota store was down and `QUOTA_FAILURE_MODE=open`
    /// let the request through unmetered.
    pub enforced: bool,
}

#[derive(Clone)]
pub struct Quota {
    pub store: Store,
    clock: Arc<dyn Clock>,
    tz: Tz,
    lease_tokens: u64,
    ttl: Duration,
    /// What this replica's last admission of each key left (see `Room`).
    room: Arc<std::sync::Mutex<rustc_hash::FxHashMap<i64, Room>>>,
    /// The periods of the current local day (see `periods_at`).
    periods: Arc<std::sync::Mutex<Option<Arc<Periods>>>>,
}

/// What a key had left after this replica last admitted it (`None`:
/// unlimited). Only a hint, for sending a request to the upstream while
/// its admission is still on the way; the admission alone decides.
#[derive(Debug, Clone, Copy)]
struct Room {
    requests: Option<u64>,
    tokens: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("durable store unavailable: {0}")]
    Seed(anyhow::Error),
}

impl QuotaError {
    /// The store did not answer within its timeout.
    pub fn timed_out(&self) -> bool {
        matches!(self, QuotaError::Store(e) if e.timed_out)
    }
}

impl Quota {
    pub fn new(store: Store, clock: Arc<dyn Clock>, tz: Tz, lease_tokens: u64, ttl: Duration) -> Self {
        Quota { store, clock, tz, lease_tokens, ttl, room: Default::default(), periods: Default::default() }
    }

    /// Whether a request whose prompt counts at most `prompt_tokens()` may
    /// go to the upstream before its admission has come back: only with a
    /// remote store (an admission is a round trip; `prompt_tokens` is not
    /// asked otherwise), and only when this replica's last admission of
    /// the key left room for another request of this size, which it then
    /// counts as taken until the next admission of the key reports afresh.
    /// A key that was refused, is near a limit, or is new here is admitted
    /// first.
    pub fn may_send_ahead(&self, key_id: i64, prompt_tokens: impl FnOnce() -> u64) -> bool {
        if !self.store.is_remote() {
            return false;
        }
        let need = prompt_tokens() + self.lease_tokens;
        let mut map = self.room.lock().expect("room lock");
        let Some(r) = map.get_mut(&key_id) else { return false };
        if r.requests.is_some_and(|n| n < 1) || r.tokens.is_some_and(|t| t < need) {
            return false;
        }
        r.requests = r.requests.map(|n| n - 1);
        r.tokens = r.tokens.map(|t| t - need);
        true
    }

    /// Remembers what an admission left; a refusal or an error forgets it.
    fn note_room(&self, key_id: i64, outcome: &Result<Admission, QuotaError>) {
        if !self.store.is_remote() {
            return;
        }
        let mut map = self.room.lock().expect("room lock");
        match outcome {
            Ok(Admission::Granted(r)) => {
                let s = &r.status;
                let room = Room { requests: s.requests_window().map(|w| w.remaining), tokens: s.tokens_window().map(|w| w.remaining) };
                map.insert(key_id, room);
            }
            _ => {
                map.remove(&key_id);
            }
        }
    }

    pub fn tz(&self) -> Tz {
        self.tz
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    pub fn periods(&self) -> Arc<Periods> {
        self.periods_at(self.clock.now())
    }

    /// The periods `now` falls in. They are the same from one local midnight
    /// to the next, so they are worked out once a day, not once a request
    /// (naming the buckets and finding the local midnights took 5 k
    /// instructions); a clock that goes back gets them worked out again.
    fn periods_at(&self, now: DateTime<Utc>) -> Arc<Periods> {
        let mut cached = self.periods.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*cached {
            Some(p) if p.day_start <= now && now < p.day_reset => p.clone(),
            _ => {
                let p = Arc::new(buckets::periods(now, self.tz));
                *cached = Some(p.clone());
                p
            }
        }
    }

    fn expiry_ms(&self, now: DateTime<Utc>) -> i64 {
        now.timestamp_millis() + self.ttl.as_millis() as i64
    }

    fn status(&self, limits: Limits, p: &Periods, day: Usage, month: Usage) -> QuotaStatus {
        QuotaStatus {
            limits,
            day,
            month,
            day_bucket: p.day.clone(),
            month_bucket: p.month.clone(),
            day_start: p.day_start,
            day_reset: p.day_reset,
            month_start: p.month_start,
            month_reset: p.month_reset,
        }
    }

    async fn seed_missing(&self, seeder: &impl Seeder, missing: &[BucketRef]) -> Result<(), QuotaError> {
        for b in missing {
            let totals = seeder.load(b).await.map_err(QuotaError::Seed)?;
            self.store.seed(b, totals).await?;
        }
        Ok(())
    }

    /// Admit one request of `prompt_tokens` for a key, in one atomic step.
    pub async fn admit(
        &self,
        seeder: &impl Seeder,
        key_id: i64,
        limits: Limits,
        prompt_tokens: u64,
    ) -> Result<Admission, QuotaError> {
        let outcome = self.admit_once(seeder, key_id, limits, prompt_tokens).await;
        self.note_room(key_id, &outcome);
        outcome
    }

    async fn admit_once(
        &self,
        seeder: &impl Seeder,
        key_id: i64,
        limits: Limits,
        prompt_tokens: u64,
    ) -> Result<Admission, QuotaError> {
        let now = self.clock.now();
        let p = self.periods_at(now);
        let req = AdmitRequest {
            key_id,
            day: p.day.clone(),
            month: p.month.clone(),
            limits,
            prompt_tokens,
            lease_tokens: self.lease_tokens,
            reservation_id: fast_id(),
            expires_at_ms: self.expiry_ms(now),
        };
        // A bucket can go missing again between seeding and admission (expiry,
        // a Redis restart); a few rounds settle it.
        for _ in 0..3 {
            let admitted = match self.store.admit(&req).await {
                Ok(a) => a,
                Err(e) => {
                    if e.timed_out {
                        self.give_back_late(&req);
                    }
                    return Err(e.into());
                }
            };
            match admitted {
                Admit::Granted { held, day, month } => {
                    return Ok(Admission::Granted(Reservation {
                        resv: ReservationRef { key_id, id: req.reservation_id, day: req.day, month: req.month },
                        limits,
                        prompt_tokens,
                        held,
                        status: self.status(limits, &p, day, month),
                        enforced: true,
                    }))
                }
                Admit::Rejected { limit, day, month } => {
                    let reset_at = if limit.is_daily() { p.day_reset } else { p.month_reset };
                    return Ok(Admission::Rejected(Rejection {
                        limit,
                        limit_value: limit.limit(&limits).unwrap_or(0),
                        reset_at,
                        status: self.status(limits, &p, day, month),
                    }));
                }
                Admit::Missing(missing) => self.seed_missing(seeder, &missing).await?,
            }
        }
        Err(QuotaError::Store(StoreError::new("buckets kept disappearing during admission")))
    }

    /// An admission that found no answer in time may still run in the
    /// store once its command gets there, and its reservation would lapse
    /// and be charged what it held although the client had a 503. Settle it
    /// as refunded in the background, a few times until the store answers.
    /// The admission's command went out first, on the connection the
    /// timeout dropped, so it is normally there before this settle; one
    /// that arrives even later is not given back.
    fn give_back_late(&self, req: &AdmitRequest) {
        let store = self.store.clone();
        let resv = ReservationRef { key_id: req.key_id, id: req.reservation_id.clone(), day: req.day.clone(), month: req.month.clone() };
        let charge = Charge { prompt_tokens: 0, completion_tokens: 0, refund_request: true };
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(200);
            for _ in 0..6 {
                if store.settle(&resv, charge).await.is_ok() {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            tracing::warn!(key_id = resv.key_id, "a timed-out admission could not be given back; if it ran, it lapses and is charged");
        });
    }

    /// Grow a reservation by at least `need` tokens (a whole lease when the
    /// key has it). Returns the tokens granted.
    pub async fn lease(&self, r: &mut Reservation, need: u64) -> Result<u64, StoreError> {
        if !r.enforced {
            r.held += need;
            return Ok(need);
        }
        let want = need.max(self.lease_tokens);
        let granted = self.store.lease(&r.resv, &r.limits, want, self.expiry_ms(self.clock.now())).await?;
        r.held += granted;
        Ok(granted)
    }

    pub async fn settle(&self, r: &Reservation, charge: Charge) -> Result<(), StoreError> {
        if !r.enforced {
            return Ok(());
        }
        self.store.settle(&r.resv, charge).await
    }

    /// A pass for a request admitted without the quota store
    /// (`QUOTA_FAILURE_MODE=open` during an outage): nothing is reserved or
    /// charged in the hot store; the usage event still records it.
    pub fn unenforced(&self, key_id: i64, limits: Limits, prompt_tokens: u64) -> Reservation {
        let p = self.periods();
        Reservation {
            resv: ReservationRef { key_id, id: fast_id(), day: p.day.clone(), month: p.month.clone() },
            limits,
            prompt_tokens,
            held: prompt_tokens,
            status: self.status(Limits::default(), &p, Usage::default(), Usage::default()),
            enforced: false,
        }
    }

    /// What a request sent ahead holds while its admission is on the way
    /// (the relay's stand-in, see `RelayJob::admission`): its prompt and
    /// one lease, the room `may_send_ahead` saw. Never in the store, never
    /// settled: the admission's reservation replaces it.
    pub fn assumed(&self, key_id: i64, limits: Limits, prompt_tokens: u64) -> Reservation {
        Reservation { held: prompt_tokens + self.lease_tokens, enforced: true, ..self.unenforced(key_id, limits, prompt_tokens) }
    }

    /// Limits, usage and resets of a key right now (seeding what is missing).
    pub async fn status_of(&self, seeder: &impl Seeder, key_id: i64, limits: Limits) -> Result<QuotaStatus, QuotaError> {
        let p = self.periods();
        for _ in 0..3 {
            match self.store.usage(key_id, &p.day, &p.month).await? {
                (Some(day), Some(month)) => return Ok(self.status(limits, &p, day, month)),
                (day, month) => {
                    let mut missing = Vec::new();
                    if day.is_none() {
                        missing.push(BucketRef { key_id, period: "day", bucket: p.day.clone() });
                    }
                    if month.is_none() {
                        missing.push(BucketRef { key_id, period: "month", bucket: p.month.clone() });
                    }
                    self.seed_missing(seeder, &missing).await?;
                }
            }
        }
        Err(QuotaError::Store(StoreError::new("buckets kept disappearing")))
    }
}

#[cfg(test)]
mod tests {
    use chrono_tz::Europe::Berlin;

    use super::{buckets::ManualClock, *};

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    /// Ids read as the formatter would write them: 32 digits, leading
    /// zeros kept, most significant first.
    #[test]
    fn hex_ids_are_the_formatted_number() {
        for n in [0, 1, 0xab, 0x0123_4567_89ab_cdef_0011_2233_4455_6677, u128::MAX, 1 << 127] {
            assert_eq!(hex_id(n), format!("{n:032x}"));
        }
        assert_ne!(fast_id(), fast_id());
    }

    /// The periods kept for the day are those of the clock's time, at each
    /// local midnight (a 23-hour day included) and when the clock goes back.
    #[test]
    fn kept_periods_follow_the_clock() {
        let clock = ManualClock::new(utc("2026-03-28T22:59:59Z"));
        let store = Store::Memory(Arc::new(memory::MemoryStore::new()));
        let q = Quota::new(store, Arc::new(clock.clone()), Berlin, 100, Duration::from_secs(60));
        for t in [
            "2026-03-28T22:59:59Z",
            "2026-03-28T23:00:00Z",
            "2026-03-29T21:59:59Z",
            "2026-03-29T22:00:00Z",
            "2026-03-31T21:59:59Z",
            "2026-03-31T22:00:00Z",
            "2026-03-29T12:00:00Z",
            "2026-03-28T12:00:00Z",
        ] {
            clock.set(utc(t));
            assert_eq!(*q.periods(), buckets::periods(utc(t), Berlin), "at {t}");
        }
    }
}
