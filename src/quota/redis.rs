//! The Redis quota store (cluster mode): the Lua scripts in `lua/`,
//! embedded at build time, called by SHA (reloaded on NOSCRIPT by
//! `redis::Script`), over one multiplexed connection per replica. Each
//! script touches only the keys of one API key (one hash tag, one slot).
//! Every call has a strict timeout, so a Redis outage is an error in
//! bounded time, never a hang.

use std::{sync::RwLock, time::Duration};

use deadpool_redis::{Pool, Runtime, Timeouts};
use redis::{aio::MultiplexedConnection, IntoConnectionInfo, Script};

use super::{Admit, AdmitRequest, BucketRef, Charge, LimitKind, Limits, QuotaStore, ReservationRef, StoreError, Usage};

/// A script's text: `common.lua`, the parts it uses (in the order
/// `common.lua` gives), then its own file.
macro_rules! script {
    ($file:literal $(, $part:literal)*) => {
        Script::new(concat!(
            include_str!("../../lua/common.lua"),
            $(include_str!(concat!("../../lua/", $part)),)*
            include_str!(concat!("../../lua/", $file))
        ))
    };
}

struct Scripts {
    admit: Script,
    lease: Script,
    settle: Script,
    seed: Script,
    expire: Script,
    dirty: Script,
}

/// Buckets outlive their period by this much (the flusher has long written them).
const DAY_BUCKET_TTL_SECS: u64 = 3 * 86_400;
const MONTH_BUCKET_TTL_SECS: u64 = 35 * 86_400;

pub struct RedisStore {
    pool: Pool,
    /// The shared multiplexed connection; replaced from the pool when it breaks.
    conn: RwLock<Option<MultiplexedConnection>>,
    prefix: String,
    timeout: Duration,
    reservation_ttl: Duration,
    scripts: Scripts,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(format!("redis: {e}"))
}

fn limit_arg(l: Option<u64>) -> i64 {
    l.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX))
}

fn usage_of(v: &[i64]) -> Usage {
    let g = |i: usize| u64::try_from(v.get(i).copied().unwrap_or(0)).unwrap_or(0);
    Usage { requests: g(0), refunds: g(1), prompt_tokens: g(2), completion_tokens: g(3), reserved: g(4) }
}

impl RedisStore {
    pub async fn connect(url: &str, prefix: &str, timeout: Duration, reservation_ttl: Duration) -> anyhow::Result<RedisStore> {
        let mut pool_cfg = deadpool_redis::PoolConfig::new(2);
        pool_cfg.timeouts = Timeouts { wait: Some(timeout), create: Some(timeout), recycle: Some(timeout) };
        // TCP_NODELAY: calls from many requests share the connection, and
        // Nagle would hold a call back until the previous one's reply came.
        // The connection's per-command timer is each call's timeout (a
        // second timer around every call would cost a wake-up of the
        // runtime's driver per call).
        let info = url
            .into_connection_info()?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let conn_cfg = redis::AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout));
        let manager = deadpool_redis::Manager::new_with_config(info, conn_cfg)?;
        let pool = Pool::builder(manager).config(pool_cfg).runtime(Runtime::Tokio1).build()?;
        let store = RedisStore {
            pool,
            conn: RwLock::new(None),
            prefix: prefix.to_string(),
            timeout,
            reservation_ttl,
            scripts: Scripts {
                admit: script!("admit.lua", "reserve.lua"),
                lease: script!("lease.lua", "reserve.lua"),
                settle: script!("settle.lua", "release.lua"),
                seed: script!("seed.lua"),
                expire: script!("expire.lua", "release.lua"),
                dirty: script!("dirty.lua", "reserve.lua"),
            },
        };
        // Reachable at start (a clear error beats a first request failing),
        // and the scripts loaded so the hot path only ever sends EVALSHA.
        store.ping().await.map_err(|e| anyhow::anyhow!("{e} ({})", crate::store::redact(url)))?;
        let mut c = store.conn().await?;
        for s in [&store.scripts.admit, &store.scripts.lease, &store.scripts.settle, &store.scripts.seed, &store.scripts.expire, &store.scripts.dirty] {
            tokio::time::timeout(timeout, s.prepare_invoke().load_async(&mut c)).await.map_err(|_| err("timed out"))?.map_err(err)?;
        }
        Ok(store)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>:{<key id>}`: the hash tag that keeps a key's data in one slot.
    pub fn base(&self, key_id: i64) -> String {
        format!("{}:{{{key_id}}}", self.prefix)
    }

    async fn conn(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(c) = self.conn.read().map_err(err)?.as_ref() {
            return Ok(c.clone());
        }
        let pooled = self.pool.get().await.map_err(|e| {
            let timed_out = match &e {
                deadpool_redis::PoolError::Timeout(_) => true,
                deadpool_redis::PoolError::Backend(b) => b.is_timeout(),
                _ => false,
            };
            StoreError { timed_out, ..err(e) }
        })?;
        let c = deadpool_redis::Connection::take(pooled);
        *self.conn.write().map_err(err)? = Some(c.clone());
        Ok(c)
    }

    /// Run one call (each command under the connection's response timeout);
    /// a broken connection is dropped so the next call gets a fresh one.
    async fn run<T, F, Fut>(&self, name: &'static str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let started = std::time::Instant::now();
        let result = match self.conn().await {
            Ok(c) => match f(c).await {
                Ok(v) => Ok(v),
                Err(e) if e.is_timeout() => {
                    self.reset();
                    Err(StoreError { timed_out: true, ..err(format!("no answer within {:?}", self.timeout)) })
                }
                Err(e) => {
                    if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                        self.reset();
                    }
                    Err(err(e))
                }
            },
            Err(e) => Err(e),
        };
        ::metrics::histogram!(crate::metrics::REDIS_SCRIPT_DURATION, "script" => name).record(started.elapsed().as_secs_f64());
        if result.is_err() {
            ::metrics::counter!(crate::metrics::REDIS_ERRORS, "script" => name).increment(1);
        }
        result
    }

    fn reset(&self) {
        if let Ok(mut c) = self.conn.write() {
            *c = None;
        }
    }
}

fn period_code(period: &str) -> &'static str {
    if period == "day" {
        "d"
    } else {
        "m"
    }
}

impl QuotaStore for RedisStore {
    async fn admit(&self, req: &AdmitRequest) -> Result<Admit, StoreError> {
        let base = self.base(req.key_id);
        let l = &req.limits;
        let v: Vec<i64> = self
            .run("admit", |mut c| async move {
                self.scripts
                    .admit
                    .arg(&base)
                    .arg(0)
                    .arg(&req.reservation_id)
                    .arg(&req.day)
                    .arg(&req.month)
                    .arg(req.prompt_tokens)
                    .arg(req.lease_tokens)
                    .arg(req.expires_at_ms)
                    .arg(limit_arg(l.daily_requests))
                    .arg(limit_arg(l.monthly_requests))
                    .arg(limit_arg(l.daily_tokens))
                    .arg(limit_arg(l.monthly_tokens))
                    .arg(self.reservation_ttl.as_millis() as u64 * 2)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        match v.first() {
            Some(0) => {
                let mut missing = Vec::new();
                if v.get(1) == Some(&1) {
                    missing.push(BucketRef { key_id: req.key_id, period: "day", bucket: req.day.clone() });
                }
                if v.get(2) == Some(&1) {
                    missing.push(BucketRef { key_id: req.key_id, period: "month", bucket: req.month.clone() });
                }
                Ok(Admit::Missing(missing))
            }
            Some(1) if v.len() == 12 => {
                let limit = match v[1] {
                    1 => LimitKind::DailyRequests,
                    2 => LimitKind::MonthlyRequests,
                    3 => LimitKind::DailyTokens,
                    _ => LimitKind::MonthlyTokens,
                };
                Ok(Admit::Rejected { limit, day: usage_of(&v[2..7]), month: usage_of(&v[7..12]) })
            }
            Some(2) if v.len() == 12 => {
                Ok(Admit::Granted { held: v[1].max(0) as u64, day: usage_of(&v[2..7]), month: usage_of(&v[7..12]) })
            }
            _ => Err(err(format!("unexpected admit reply {v:?}"))),
        }
    }

    async fn lease(&self, resv: &ReservationRef, limits: &Limits, want: u64, expires_at_ms: i64) -> Result<u64, StoreError> {
        let base = self.base(resv.key_id);
        let granted: i64 = self
            .run("lease", |mut c| async move {
                self.scripts
                    .lease
                    .arg(&base)
                    .arg(0)
                    .arg(&resv.id)
                    .arg(want)
                    .arg(expires_at_ms)
                    .arg(limit_arg(limits.daily_tokens))
                    .arg(limit_arg(limits.monthly_tokens))
                    .arg(self.reservation_ttl.as_millis() as u64 * 2)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(granted.max(0) as u64)
    }

    async fn settle(&self, resv: &ReservationRef, charge: Charge) -> Result<(), StoreError> {
        let base = self.base(resv.key_id);
        let _: i64 = self
            .run("settle", |mut c| async move {
                self.scripts
                    .settle
                    .arg(&base)
                    .arg(0)
                    .arg(&resv.id)
                    .arg(charge.prompt_tokens)
                    .arg(charge.completion_tokens)
                    .arg(if charge.refund_request { 1 } else { 0 })
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn seed(&self, bucket: &BucketRef, totals: Usage) -> Result<(), StoreError> {
        let base = self.base(bucket.key_id);
        let ttl = if bucket.period == "day" { DAY_BUCKET_TTL_SECS } else { MONTH_BUCKET_TTL_SECS };
        let _: i64 = self
            .run("seed", |mut c| async move {
                self.scripts
                    .seed
                    .arg(&base)
                    .arg(0)
                    .arg(period_code(bucket.period))
                    .arg(&bucket.bucket)
                    .arg(totals.requests)
                    .arg(totals.refunds)
                    .arg(totals.prompt_tokens)
                    .arg(totals.completion_tokens)
                    .arg(ttl)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn usage(&self, key_id: i64, day: &str, month: &str) -> Result<(Option<Usage>, Option<Usage>), StoreError> {
        let base = self.base(key_id);
        let (d, m): (Vec<Option<i64>>, Vec<Option<i64>>) = self
            .run("usage", |mut c| async move {
                redis::pipe()
                    .cmd("HMGET")
                    .arg(format!("{base}:d:{day}"))
                    .arg(&["req", "ref", "pt", "ct", "rsv"])
                    .cmd("HMGET")
                    .arg(format!("{base}:m:{month}"))
                    .arg(&["req", "ref", "pt", "ct", "rsv"])
                    .query_async(&mut c)
                    .await
            })
            .await?;
        // A seeded bucket always has every field; all missing = no bucket.
        let conv = |v: Vec<Option<i64>>| {
            if v.iter().all(Option::is_none) {
                None
            } else {
                Some(usage_of(&v.into_iter().map(|x| x.unwrap_or(0)).collect::<Vec<_>>()))
            }
        };
        Ok((conv(d), conv(m)))
    }

    async fn expire(&self, now_ms: i64, key_ids: &[i64]) -> Result<u64, StoreError> {
        let calls = key_ids.iter().map(|&id| {
            let base = self.base(id);
            self.run("expire", move |mut c| async move { self.scripts.expire.arg(&base).arg(now_ms).invoke_async::<i64>(&mut c).await })
        });
        let mut n = 0;
        for r in futures_util::future::join_all(calls).await {
            n += r?.max(0) as u64;
        }
        Ok(n)
    }

    async fn take_dirty(&self, key_ids: &[i64]) -> Result<Vec<(BucketRef, Usage)>, StoreError> {
        let calls = key_ids.iter().map(|&id| {
            let base = self.base(id);
            async move {
                let v: Vec<redis::Value> =
                    self.run("dirty", move |mut c| async move { self.scripts.dirty.arg(&base).arg(0).invoke_async(&mut c).await }).await?;
                Ok::<_, StoreError>((id, v))
            }
        });
        let mut out = Vec::new();
        for r in futures_util::future::join_all(calls).await {
            let (id, v) = r?;
            for rec in v.chunks(7) {
                let text = |x: &redis::Value| -> String { redis::from_redis_value_ref::<String>(x).unwrap_or_default() };
                let int = |x: &redis::Value| -> i64 { redis::from_redis_value_ref::<i64>(x).unwrap_or(0) };
                if rec.len() < 7 {
                    continue;
                }
                let period = if text(&rec[0]) == "d" { "day" } else { "month" };
                let nums: Vec<i64> = rec[2..7].iter().map(int).collect();
                out.push((BucketRef { key_id: id, period, bucket: text(&rec[1]) }, usage_of(&nums)));
            }
        }
        Ok(out)
    }

    async fn mark_dirty(&self, buckets: &[BucketRef]) -> Result<(), StoreError> {
        for b in buckets {
            let key = format!("{}:dirty", self.base(b.key_id));
            let member = format!("{}|{}", period_code(b.period), b.bucket);
            let _: i64 = self.run("mark_dirty", |mut c| async move { redis::cmd("SADD").arg(&key).arg(&member).query_async(&mut c).await }).await?;
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.run("ping", |mut c| async move { redis::cmd("PING").query_async(&mut c).await }).await?;
        Ok(())
    }
}
