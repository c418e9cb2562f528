//! Usage: `usage_buckets` (absolute totals written by the flusher with
//! greatest-wins upserts, so any replica may flush any number of times) and
//! `usage_events` (one row per request, unique request id).

use serde::Serialize;
use sqlx::Row;

use super::{to_i64, to_u64, Db, DbKind};
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

    /// Insert events; a request id already present is skipped (a retried
    /// batch). Rows go in multi-row statements of `EVENT_ROWS`: one round
    /// trip per statement instead of one per event.
    pub async fn insert_events(&self, events: &[UsageEvent]) -> sqlx::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for batch in events.chunks(EVENT_ROWS) {
            let sql = events_insert_sql(batch.len(), self.kind);
            let mut q = sqlx::query(&sql);
            for e in batch {
                q = q
                    .bind(e.request_id.as_str())
                    .bind(e.ts_ms)
                    .bind(e.day.as_str())
                    .bind(e.key_id)
                    .bind(e.route.as_str())
                    .bind(e.model.as_str())
                    .bind(i64::from(e.status))
                    .bind(to_i64(e.prompt_tokens))
                    .bind(to_i64(e.completion_tokens))
                    .bind(to_i64(e.duration_ms))
                    .bind(i64::from(e.refunded))
                    .bind(e.outcome);
            }
            q.execute(&mut *tx).await?;
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

/// Rows per `INSERT` of usage events: 12 parameters each, well under
/// SQLite's 32,766 and PostgreSQL's 65,535 bind parameters.
const EVENT_ROWS: usize = 256;

/// `INSERT … VALUES ($1, …, $12), ($13, …), …` for `rows` events;
/// SQLite gets anonymous `?`s: it looks each numbered parameter up by name
/// in a list, while parsing and again while binding, so 3,072 `$n`s cost
/// millions of string compares per statement (seen in a profile of the
/// flusher); `?`s are numbered in order and never looked up.
fn events_insert_sql(rows: usize, kind: DbKind) -> String {
    use std::fmt::Write;
    let mut sql = String::from(
        "INSERT INTO usage_events (request_id, ts_ms, day, key_id, route, model, status, prompt_tokens, \
         completion_tokens, duration_ms, refunded, outcome) VALUES ",
    );
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..12 {
            let sep = if c == 0 { "" } else { ", " };
            match kind {
                DbKind::Sqlite => {
                    let _ = write!(sql, "{sep}?");
                }
                DbKind::Postgres => {
                    let _ = write!(sql, "{sep}${}", r * 12 + c + 1);
                }
            }
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (request_id) DO NOTHING");
    sql
}

/// One local day of a key's (or all keys') charged usage, from `usage_buckets`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DayUsage {
    /// `YYYY-MM-DD`
    pub day: String,
    /// Requests not refunded.
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A model's totals over a time range, from `usage_events`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ModelUsage {
    pub model: String,
    /// Requests neither refunded nor rejected.
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A usage event with its key's name (absent once the key is deleted), for export.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub id: i64,
    pub request_id: String,
    pub ts_ms: i64,
    pub key_id: i64,
    pub key_name: Option<String>,
    pub route: String,
    pub model: String,
    pub status: i64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub duration_ms: u64,
    pub outcome: String,
}

impl Db {
    /// Charged usage per day bucket in `[from_day, to_day]` (`YYYY-MM-DD`, which
    /// sort as text), summed over all keys or for one; days without usage are absent.
    pub async fn daily_usage(&self, key_id: Option<i64>, from_day: &str, to_day: &str) -> sqlx::Result<Vec<DayUsage>> {
        let key_filter = if key_id.is_some() { "AND key_id = $3" } else { "" };
        let sql = format!(
            "SELECT bucket, CAST(SUM(requests - refunds) AS BIGINT) AS requests, \
             CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens, CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens \
             FROM usage_buckets WHERE period = 'day' AND bucket >= $1 AND bucket <= $2 {key_filter} \
             GROUP BY bucket ORDER BY bucket"
        );
        let mut q = sqlx::query(&sql).bind(from_day).bind(to_day);
        if let Some(id) = key_id {
            q = q.bind(id);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(DayUsage {
                    day: row.try_get("bucket")?,
                    requests: to_u64(row.try_get("requests")?),
                    prompt_tokens: to_u64(row.try_get("prompt_tokens")?),
                    completion_tokens: to_u64(row.try_get("completion_tokens")?),
                })
            })
            .collect()
    }

    /// Totals per model of events in `[from_ms, to_ms)`, most tokens first.
    pub async fn model_usage(&self, key_id: Option<i64>, from_ms: i64, to_ms: i64) -> sqlx::Result<Vec<ModelUsage>> {
        let key_filter = if key_id.is_some() { "AND key_id = $3" } else { "" };
        let sql = format!(
            "SELECT model, CAST(COUNT(*) AS BIGINT) AS requests, CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens, \
             CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens FROM usage_events \
             WHERE ts_ms >= $1 AND ts_ms < $2 AND refunded = 0 AND outcome <> 'rejected' {key_filter} \
             GROUP BY model ORDER BY CAST(SUM(prompt_tokens) + SUM(completion_tokens) AS BIGINT) DESC, model"
        );
        let mut q = sqlx::query(&sql).bind(from_ms).bind(to_ms);
        if let Some(id) = key_id {
            q = q.bind(id);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(ModelUsage {
                    model: row.try_get("model")?,
                    requests: to_u64(row.try_get("requests")?),
                    prompt_tokens: to_u64(row.try_get("prompt_tokens")?),
                    completion_tokens: to_u64(row.try_get("completion_tokens")?),
                })
            })
            .collect()
    }

    /// Up to `limit` events in `[from_ms, to_ms)` with an id above `after_id`,
    /// in id order: keyset pages, so an export of any size streams in bounded memory.
    pub async fn events_page(
        &self,
        key_id: Option<i64>,
        from_ms: i64,
        to_ms: i64,
        after_id: i64,
        limit: i64,
    ) -> sqlx::Result<Vec<EventRow>> {
        let key_filter = if key_id.is_some() { "AND e.key_id = $5" } else { "" };
        let sql = format!(
            "SELECT e.id, e.request_id, e.ts_ms, e.key_id, k.name AS key_name, e.route, e.model, e.status, \
             e.prompt_tokens, e.completion_tokens, e.duration_ms, e.outcome \
             FROM usage_events e LEFT JOIN api_keys k ON k.id = e.key_id \
             WHERE e.ts_ms >= $1 AND e.ts_ms < $2 AND e.id > $3 {key_filter} ORDER BY e.id LIMIT $4"
        );
        let mut q = sqlx::query(&sql).bind(from_ms).bind(to_ms).bind(after_id).bind(limit);
        if let Some(id) = key_id {
            q = q.bind(id);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(EventRow {
                    id: row.try_get("id")?,
                    request_id: row.try_get("request_id")?,
                    ts_ms: row.try_get("ts_ms")?,
                    key_id: row.try_get("key_id")?,
                    key_name: row.try_get("key_name")?,
                    route: row.try_get("route")?,
                    model: row.try_get("model")?,
                    status: row.try_get("status")?,
                    prompt_tokens: to_u64(row.try_get("prompt_tokens")?),
                    completion_tokens: to_u64(row.try_get("completion_tokens")?),
                    duration_ms: to_u64(row.try_get("duration_ms")?),
                    outcome: row.try_get("outcome")?,
                })
            })
            .collect()
    }
}
