//! Usage: `usage_buckets` (absolute totals written by the flusher with
//! greatest-wins upserts, so any replica may flush any number of times) and
//! `usage_events` (one row per request, unique request id).

use serde::Serialize;
use sqlx::Row;

use super::{to_i64, to_u64, Db};
use crate::quota::{BucketRef, Usage};

#[derive(Debug, Clone, Serialize)]
pub struct UsageEvent {
    pub request_id: String,
    pub ts_ms: i64,
    pub day: String,
    pub key_id: i64,
    pub route: String,
    pub model: String,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub duration_ms: u64,
    pub refunded: bool,
    /// `complete`, `quota` (ended at the quota), `disconnect`, `upstream_error`, `rejected`
    pub outcome: &'static str,
}

impl Db {
    pub async fn load_bucket(&self, b: &BucketRef) -> sqlx::Result<Usage> {
        let row = sqlx::query(
            "SELECT requests, refunds, prompt_tokens, completion_tokens FROM usage_buckets \
             WHERE key_id = $1 AND period = $2 AND bucket = $3",
        )
        .bind(b.key_id)
        .bind(b.period)
        .bind(&b.bucket)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(Usage::default()) };
        Ok(Usage {
            requests: to_u64(row.try_get("requests")?),
            refunds: to_u64(row.try_get("refunds")?),
            prompt_tokens: to_u64(row.try_get("prompt_tokens")?),
            completion_tokens: to_u64(row.try_get("completion_tokens")?),
            reserved: 0,
        })
    }

    /// Write absolute bucket totals; a column only ever grows.
    pub async fn upsert_buckets(&self, buckets: &[(BucketRef, Usage)]) -> sqlx::Result<()> {
        if buckets.is_empty() {
            return Ok(());
        }
        let g = self.greatest();
        let sql = format!(
            "INSERT INTO usage_buckets (key_id, period, bucket, requests, refunds, prompt_tokens, completion_tokens) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (key_id, period, bucket) DO UPDATE SET \
             requests = {g}(usage_buckets.requests, excluded.requests), \
             refunds = {g}(usage_buckets.refunds, excluded.refunds), \
             prompt_tokens = {g}(usage_buckets.prompt_tokens, excluded.prompt_tokens), \
             completion_tokens = {g}(usage_buckets.completion_tokens, excluded.completion_tokens)"
        );
        let mut tx = self.pool.begin().await?;
        for (b, u) in buckets {
            sqlx::query(&sql)
                .bind(b.key_id)
                .bind(b.period)
                .bind(&b.bucket)
                .bind(to_i64(u.requests))
                .bind(to_i64(u.refunds))
                .bind(to_i64(u.prompt_tokens))
                .bind(to_i64(u.completion_tokens))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    /// Insert events; a request id already present is skipped (a retried batch).
    pub async fn insert_events(&self, events: &[UsageEvent]) -> sqlx::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for e in events {
            sqlx::query(
                "INSERT INTO usage_events (request_id, ts_ms, day, key_id, route, model, status, prompt_tokens, \
                 completion_tokens, duration_ms, refunded, outcome) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (request_id) DO NOTHING",
            )
            .bind(&e.request_id)
            .bind(e.ts_ms)
            .bind(&e.day)
            .bind(e.key_id)
            .bind(&e.route)
            .bind(&e.model)
            .bind(i64::from(e.status))
            .bind(to_i64(e.prompt_tokens))
            .bind(to_i64(e.completion_tokens))
            .bind(to_i64(e.duration_ms))
            .bind(i64::from(e.refunded))
            .bind(e.outcome)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Totals of a key's events: (requests not refunded, prompt, completion).
    pub async fn event_totals(&self, key_id: i64) -> sqlx::Result<(u64, u64, u64)> {
        let row = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n, CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS p, \
             CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS c FROM usage_events \
             WHERE key_id = $1 AND refunded = 0 AND outcome <> 'rejected'",
        )
        .bind(key_id)
        .fetch_one(&self.pool)
        .await?;
        Ok((to_u64(row.try_get("n")?), to_u64(row.try_get("p")?), to_u64(row.try_get("c")?)))
    }

    /// Drop events older than `before_ms` (retention).
    pub async fn prune_events(&self, before_ms: i64) -> sqlx::Result<u64> {
        Ok(sqlx::query("DELETE FROM usage_events WHERE ts_ms < $1").bind(before_ms).execute(&self.pool).await?.rows_affected())
    }
}
