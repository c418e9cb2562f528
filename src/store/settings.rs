//! Runtime settings (upstream URL, default model): stored values override
//! the environment's defaults.

use super::Db;

pub const OLLAMA_URL: &str = "ollama_url";
pub const DEFAULT_MODEL: &str = "default_model";

impl Db {
    pub async fn get_setting(&self, name: &str) -> sqlx::Result<Option<String>> {
        sqlx::query_scalar("SELECT value FROM settings WHERE name = $1").bind(name).fetch_optional(&self.pool).await
    }

    pub async fn put_setting(&self, name: &str, value: &str) -> sqlx::Result<()> {
        sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            .bind(name)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
