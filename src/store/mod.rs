//! The durable store: SQLite (embedded) or PostgreSQL (cluster), through
//! sqlx's `Any` driver so every query is written once. Portable SQL only:
//! `$N` placeholders, BIGINT/INTEGER columns, timestamps as RFC 3339 text.

pub mod keys;
pub mod settings;
pub mod usage;

use std::{path::Path, str::FromStr, time::Duration};

use anyhow::Context;
use sqlx::{
    any::{AnyConnectOptions, AnyPoolOptions},
    migrate::Migrator,
    AnyPool, Executor,
};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub kind: DbKind,
}

impl Db {
    /// Connect (creating a SQLite file and its folder when missing).
    pub async fn connect(url: &str) -> anyhow::Result<Db> {
        sqlx::any::install_default_drivers();
        let kind = if url.starts_with("sqlite:") { DbKind::Sqlite } else { DbKind::Postgres };
        let url = match kind {
            DbKind::Sqlite => {
                let path = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
                if path != ":memory:" {
                    if let Some(dir) = Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                    }
                }
                format!("sqlite://{path}?mode=rwc")
            }
            DbKind::Postgres => url.to_string(),
        };
        let opts = AnyConnectOptions::from_str(&url).context("DATABASE_URL")?;
        let pool = AnyPoolOptions::new()
            .max_connections(match kind {
                DbKind::Sqlite => 4,
                DbKind::Postgres => 8,
            })
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if kind == DbKind::Sqlite {
                        conn.execute("PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000; PRAGMA synchronous=NORMAL;")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await
            .with_context(|| format!("connecting to the database ({})", redact(&url)))?;
        Ok(Db { pool, kind })
    }

    pub async fn migrate(&self) -> anyhow::Result<()> {
        let migrator = match self.kind {
            DbKind::Sqlite => &SQLITE_MIGRATIONS,
            DbKind::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.run(&self.pool).await.context("running migrations")?;
        Ok(())
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// SQL for "the larger of two values": `GREATEST` or SQLite's scalar `MAX`.
    pub fn greatest(&self) -> &'static str {
        match self.kind {
            DbKind::Sqlite => "MAX",
            DbKind::Postgres => "GREATEST",
        }
    }
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
