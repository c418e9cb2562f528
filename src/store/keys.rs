//! API keys: SQL for `api_keys`, key generation and hashing.

use chrono::{DateTime, SecondsFormat, Utc};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{any::AnyRow, Row};

use super::{to_i64, to_u64, Db};
use crate::quota::Limits;

#[derive(Debug, Clone, Serialize)]
pub struct KeyRecord {
    pub id: i64,
    pub name: String,
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub is_active: bool,
    pub limits: Limits,
    pub allowed_models: Option<Vec<String>>,
}

impl KeyRecord {
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }

    pub fn allows_model(&self, model: &str) -> bool {
        match &self.allowed_models {
            None => true,
            Some(list) if list.is_empty() => true,
            Some(list) => list.iter().any(|m| m == model || m.split(':').next() == Some(model) || model.split(':').next() == Some(m)),
        }
    }
}

/// A new key's fields, as validated by the admin API.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub limits: Limits,
    pub allowed_models: Option<Vec<String>>,
}

pub fn hash_key(plaintext: &str) -> String {
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

/// `sk-` and 32 random bytes as hex.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("sk-{}", hex::encode(bytes))
}

pub fn prefix_of(plaintext: &str) -> String {
    plaintext.chars().take(10).collect()
}

pub(crate) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn parse_ts(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

const COLUMNS: &str = "id, name, key_prefix, created_at, expires_at, is_active, daily_token_limit, \
    monthly_token_limit, daily_request_limit, monthly_request_limit, allowed_models";

fn from_row(row: &AnyRow) -> Result<KeyRecord, sqlx::Error> {
    let limit = |c: &str| -> Result<Option<u64>, sqlx::Error> { Ok(row.try_get::<Option<i64>, _>(c)?.map(to_u64)) };
    let created: String = row.try_get("created_at")?;
    let expires: Option<String> = row.try_get("expires_at")?;
    let models: Option<String> = row.try_get("allowed_models")?;
    Ok(KeyRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        key_prefix: row.try_get("key_prefix")?,
        created_at: parse_ts(&created).unwrap_or_default(),
        expires_at: expires.as_deref().and_then(parse_ts),
        is_active: row.try_get::<i64, _>("is_active")? != 0,
        limits: Limits {
            daily_tokens: limit("daily_token_limit")?,
            monthly_tokens: limit("monthly_token_limit")?,
            daily_requests: limit("daily_request_limit")?,
            monthly_requests: limit("monthly_request_limit")?,
        },
        allowed_models: models.and_then(|m| serde_json::from_str(&m).ok()),
    })
}

fn opt(v: Option<u64>) -> Option<i64> {
    v.map(to_i64)
}

impl Db {
    /// Store a new key; returns its record and the plaintext, which is never
    /// stored and cannot be recovered later.
    pub async fn create_key(&self, new: &NewKey, now: DateTime<Utc>) -> sqlx::Result<(KeyRecord, String)> {
        let plaintext = generate_key();
        let models = new.allowed_models.as_ref().map(|m| serde_json::Value::from(m.clone()).to_string());
        let row = sqlx::query(&format!(
            "INSERT INTO api_keys (name, key_hash, key_prefix, created_at, expires_at, is_active, daily_token_limit, \
             monthly_token_limit, daily_request_limit, monthly_request_limit, allowed_models) \
             VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8, $9, $10) RETURNING {COLUMNS}"
        ))
        .bind(&new.name)
        .bind(hash_key(&plaintext))
        .bind(prefix_of(&plaintext))
        .bind(ts(now))
        .bind(new.expires_at.map(ts))
        .bind(opt(new.limits.daily_tokens))
        .bind(opt(new.limits.monthly_tokens))
        .bind(opt(new.limits.daily_requests))
        .bind(opt(new.limits.monthly_requests))
        .bind(models)
        .fetch_one(&self.pool)
        .await?;
        Ok((from_row(&row)?, plaintext))
    }

    pub async fn key_by_hash(&self, hash: &str) -> sqlx::Result<Option<KeyRecord>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM api_keys WHERE key_hash = $1"))
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    pub async fn key_by_id(&self, id: i64) -> sqlx::Result<Option<KeyRecord>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    pub async fn list_keys(&self) -> sqlx::Result<Vec<KeyRecord>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM api_keys ORDER BY id")).fetch_all(&self.pool).await?;
        rows.iter().map(from_row).collect()
    }

    /// Replace the four limits and the expiry; `None` if there is no such key.
    pub async fn update_key_quota(
        &self,
        id: i64,
        limits: Limits,
        expires_at: Option<DateTime<Utc>>,
    ) -> sqlx::Result<Option<KeyRecord>> {
        let row = sqlx::query(&format!(
            "UPDATE api_keys SET daily_token_limit = $1, monthly_token_limit = $2, daily_request_limit = $3, \
             monthly_request_limit = $4, expires_at = $5 WHERE id = $6 RETURNING {COLUMNS}"
        ))
        .bind(opt(limits.daily_tokens))
        .bind(opt(limits.monthly_tokens))
        .bind(opt(limits.daily_requests))
        .bind(opt(limits.monthly_requests))
        .bind(expires_at.map(ts))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    pub async fn set_key_active(&self, id: i64, active: bool) -> sqlx::Result<Option<KeyRecord>> {
        let row = sqlx::query(&format!("UPDATE api_keys SET is_active = $1 WHERE id = $2 RETURNING {COLUMNS}"))
            .bind(i64::from(active))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Delete a key with its usage; false if there was none.
    pub async fn delete_key(&self, id: i64) -> sqlx::Result<bool> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("DELETE FROM api_keys WHERE id = $1").bind(id).execute(&mut *tx).await?.rows_affected();
        sqlx::query("DELETE FROM usage_buckets WHERE key_id = $1").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(n > 0)
    }
}
