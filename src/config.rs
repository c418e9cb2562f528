//! Every environment variable, its default and its validation. A bad value
//! stops start-up with a message naming the variable and the value.

use std::{collections::HashMap, fmt, net::IpAddr, time::Duration};

use chrono_tz::Tz;

/// A string that never shows up in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Quota store unreachable: refuse with 503.
    Closed,
    /// Quota store unreachable: serve without enforcing.
    Open,
}

/// Which HTTP client the generation requests take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamClient {
    /// The gateway's own HTTP/1.1 client (hyper) for a plain-HTTP upstream
    /// that no proxy variable applies to; reqwest for the rest (HTTPS, a
    /// proxy).
    Auto,
    /// reqwest for every upstream.
    Reqwest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub admin_password: Option<Secret>,
    pub proxy_host: IpAddr,
    pub proxy_port: u16,
    pub admin_host: IpAddr,
    pub admin_port: u16,
    pub metrics_port: u16,
    pub database_url: String,
    pub ollama_url: String,
    pub default_model: String,
    pub app_tz: Tz,
    pub log_file: Option<String>,
    pub allowed_origins: Vec<String>,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    pub redis_timeout: Duration,
    pub lease_tokens: u64,
    pub reservation_ttl: Duration,
    pub flush_interval: Duration,
    pub quota_failure_mode: FailureMode,
    pub migrate_on_start: bool,
    pub session_secret: Option<Secret>,
    pub log_format: LogFormat,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    /// How long a client connection may wait for its next request.
    pub keepalive_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_client: UpstreamClient,
    pub upstream_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub key_cache_ttl: Duration,
    pub usage_retention_days: u32,
    /// Keep the workers polling without sleeping this long after each
    /// request (zero: off; see `busy`).
    pub busy_poll: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("{var}={value}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub reason: String,
}

struct Env<'a>(&'a HashMap<String, String>);

impl Env<'_> {
    fn raw(&self, var: &str) -> Option<&str> {
        self.0.get(var).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.raw(var).unwrap_or(default).to_string()
    }

    fn parse<T>(&self, var: &'static str, default: T, f: impl Fn(&str) -> Result<T, String>) -> Result<T, ConfigError> {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => f(v).map_err(|reason| ConfigError { var, value: v.to_string(), reason }),
        }
    }
}

/// `5s`, `250ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| "expected a duration like 5s, 250ms or 2m".to_string())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err("unknown unit (use ms, s, m or h)".into()),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err("must be a non-negative duration".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A duration that must not be zero (an interval, an idle limit).
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).and_then(|d| if d.is_zero() { Err("must be positive".into()) } else { Ok(d) })
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

fn parse_num<T: std::str::FromStr>(what: &'static str) -> impl Fn(&str) -> Result<T, String> {
    move |s| s.parse().map_err(|_| format!("expected {what}"))
}

pub fn parse_url(s: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("expected an http:// or https:// URL".into());
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// Accepts sqlx URLs and the SQLAlchemy spellings the Python proxy used
/// (`sqlite:///./data/x.db`, `postgresql+asyncpg://…`).
pub fn normalise_database_url(s: &str) -> Result<String, String> {
    if let Some(rest) = s.strip_prefix("sqlite:") {
        // SQLAlchemy: sqlite:////abs and sqlite:///./rel; sqlx: sqlite:///abs and sqlite://rel.
        let path = if let Some(abs) = rest.strip_prefix("///") {
            if abs.starts_with('/') || abs.starts_with('.') { abs.to_string() } else { format!("/{abs}") }
        } else {
            rest.trim_start_matches("//").to_string()
        };
        let path = path.as_str();
        if path.is_empty() || path == ":memory:" {
            return Ok("sqlite::memory:".into());
        }
        let (file, _query) = path.split_once('?').unwrap_or((path, ""));
        return Ok(format!("sqlite://{file}"));
    }
    for prefix in ["postgresql+asyncpg://", "postgresql+psycopg2://", "postgresql+psycopg://", "postgresql://", "postgres://"] {
        if let Some(rest) = s.strip_prefix(prefix) {
            return Ok(format!("postgres://{rest}"));
        }
    }
    Err("expected sqlite://PATH or postgres://…".into())
}

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_map(&std::env::vars().collect())
    }

    pub fn from_map(vars: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let env = Env(vars);
        let redis_url = env.raw("REDIS_URL").map(str::to_string);
        if let Some(url) = &redis_url {
            if !url.starts_with("redis://") && !url.starts_with("rediss://") {
                return Err(ConfigError { var: "REDIS_URL", value: url.clone(), reason: "expected redis://…".into() });
            }
        }
        let cluster = redis_url.is_some();
        let config = Config {
            admin_password: env.raw("ADMIN_PASSWORD").map(Secret::new),
            proxy_host: env.parse("PROXY_HOST", [0, 0, 0, 0].into(), parse_num("an IP address"))?,
            proxy_port: env.parse("PROXY_PORT", 8000, parse_num("a port number"))?,
            admin_host: env.parse("ADMIN_HOST", [127, 0, 0, 1].into(), parse_num("an IP address"))?,
            admin_port: env.parse("ADMIN_PORT", 8001, parse_num("a port number"))?,
            metrics_port: env.parse("METRICS_PORT", 9100, parse_num("a port number"))?,
            database_url: env.parse("DATABASE_URL", "sqlite://./data/llm-quota.db".into(), normalise_database_url)?,
            ollama_url: env.parse("OLLAMA_URL", "http://localhost:11434".into(), parse_url)?,
            default_model: env.string("DEFAULT_MODEL", "llama3"),
            app_tz: env.parse("APP_TZ", chrono_tz::Europe::Berlin, |s| {
                s.parse::<Tz>().map_err(|_| "unknown time zone".to_string())
            })?,
            log_file: match env.raw("LOG_FILE") {
                Some("off" | "none" | "-") => None,
                Some(p) => Some(p.to_string()),
                None => Some("logs/usage.log".into()),
            },
            allowed_origins: env
                .raw("ALLOWED_ORIGINS")
                .map(|s| s.split(',').map(|o| o.trim().to_string()).filter(|o| !o.is_empty()).collect())
                .unwrap_or_default(),
            redis_prefix: env.parse("REDIS_PREFIX", "lq".into(), |s| {
                if s.chars().all(|c| c.is_ascii_alphanumeric() || "-_:.".contains(c)) {
                    Ok(s.to_string())
                } else {
                    Err("use letters, digits and - _ : . only".into())
                }
            })?,
            redis_timeout: env.parse("REDIS_TIMEOUT", Duration::from_millis(250), parse_duration)?,
            lease_tokens: env.parse("LEASE_TOKENS", 256, |s| match s.parse::<u64>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err("expected a positive number of tokens".into()),
            })?,
            reservation_ttl: env.parse("RESERVATION_TTL", Duration::from_secs(600), parse_duration)?,
            flush_interval: env.parse("FLUSH_INTERVAL", Duration::from_secs(5), parse_positive_duration)?,
            quota_failure_mode: env.parse("QUOTA_FAILURE_MODE", FailureMode::Closed, |s| match s {
                "closed" => Ok(FailureMode::Closed),
                "open" => Ok(FailureMode::Open),
                _ => Err("expected closed or open".into()),
            })?,
            migrate_on_start: env.parse("MIGRATE_ON_START", !cluster, parse_bool)?,
            session_secret: env.raw("SESSION_SECRET").map(Secret::new),
            log_format: env.parse("LOG_FORMAT", LogFormat::Pretty, |s| match s {
                "json" => Ok(LogFormat::Json),
                "pretty" => Ok(LogFormat::Pretty),
                _ => Err("expected json or pretty".into()),
            })?,
            max_body_bytes: env.parse("MAX_BODY_BYTES", 16 * 1024 * 1024, parse_num("a number of bytes"))?,
            body_timeout: env.parse("BODY_TIMEOUT", Duration::from_secs(30), parse_duration)?,
            keepalive_timeout: env.parse("KEEPALIVE_TIMEOUT", Duration::from_secs(75), parse_positive_duration)?,
            upstream_connect_timeout: env.parse("UPSTREAM_CONNECT_TIMEOUT", Duration::from_secs(5), parse_duration)?,
            upstream_client: env.parse("UPSTREAM_CLIENT", UpstreamClient::Auto, |s| match s {
                "auto" => Ok(UpstreamClient::Auto),
                "reqwest" => Ok(UpstreamClient::Reqwest),
                _ => Err("expected auto or reqwest".into()),
            })?,
            upstream_timeout: env.parse("UPSTREAM_TIMEOUT", Duration::from_secs(300), parse_duration)?,
            upstream_idle_timeout: env.parse("UPSTREAM_IDLE_TIMEOUT", Duration::from_secs(300), parse_duration)?,
            shutdown_grace: env.parse("SHUTDOWN_GRACE", Duration::from_secs(30), parse_duration)?,
            key_cache_ttl: env.parse("KEY_CACHE_TTL", Duration::from_secs(30), parse_duration)?,
            usage_retention_days: env.parse("USAGE_RETENTION_DAYS", 90, parse_num("a number of days"))?,
            busy_poll: env.parse("BUSY_POLL", Duration::ZERO, |s| match s {
                "off" => Ok(Duration::ZERO),
                s => parse_duration(s),
            })?,
            redis_url,
        };
        if cluster && config.admin_password.is_none() {
            return Err(ConfigError {
                var: "ADMIN_PASSWORD",
                value: String::new(),
                reason: "required in cluster mode (REDIS_URL set): every replica must share it".into(),
            });
        }
        Ok(config)
    }

    pub fn is_cluster(&self) -> bool {
        self.redis_url.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_map(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn defaults_match_the_python_proxy() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.proxy_port, 8000);
        assert_eq!(c.admin_port, 8001);
        assert_eq!(c.proxy_host.to_string(), "0.0.0.0");
        assert_eq!(c.admin_host.to_string(), "127.0.0.1");
        assert_eq!(c.ollama_url, "http://localhost:11434");
        assert_eq!(c.default_model, "llama3");
        assert_eq!(c.app_tz, chrono_tz::Europe::Berlin);
        assert_eq!(c.log_file.as_deref(), Some("logs/usage.log"));
        assert_eq!(c.database_url, "sqlite://./data/llm-quota.db");
        assert!(c.migrate_on_start);
        assert_eq!(c.quota_failure_mode, FailureMode::Closed);
        assert_eq!(c.keepalive_timeout, Duration::from_secs(75));
    }

    #[test]
    fn bad_values_name_variable_and_value() {
        let e = cfg(&[("APP_TZ", "Europe/Berln")]).unwrap_err();
        assert_eq!(e.to_string(), "APP_TZ=Europe/Berln: unknown time zone");
        let e = cfg(&[("PROXY_PORT", "80000")]).unwrap_err();
        assert!(e.to_string().starts_with("PROXY_PORT=80000:"), "{e}");
        let e = cfg(&[("FLUSH_INTERVAL", "5 parsecs")]).unwrap_err();
        assert!(e.to_string().starts_with("FLUSH_INTERVAL=5 parsecs:"), "{e}");
        let e = cfg(&[("KEEPALIVE_TIMEOUT", "0")]).unwrap_err();
        assert_eq!(e.to_string(), "KEEPALIVE_TIMEOUT=0: must be positive");
        let e = cfg(&[("FLUSH_INTERVAL", "0ms")]).unwrap_err();
        assert_eq!(e.to_string(), "FLUSH_INTERVAL=0ms: must be positive");
        let e = cfg(&[("UPSTREAM_CLIENT", "hyper")]).unwrap_err();
        assert_eq!(e.to_string(), "UPSTREAM_CLIENT=hyper: expected auto or reqwest");
        let e = cfg(&[("BUSY_POLL", "on")]).unwrap_err();
        assert!(e.to_string().starts_with("BUSY_POLL=on:"), "{e}");
        assert_eq!(cfg(&[]).unwrap().busy_poll, Duration::ZERO, "off by default");
        assert_eq!(cfg(&[("BUSY_POLL", "off")]).unwrap().busy_poll, Duration::ZERO);
        assert_eq!(cfg(&[("BUSY_POLL", "50ms")]).unwrap().busy_poll, Duration::from_millis(50));
        let e = cfg(&[("OLLAMA_URL", "ftp://x")]).unwrap_err();
        assert!(e.to_string().starts_with("OLLAMA_URL=ftp://x:"), "{e}");
        let e = cfg(&[("REDIS_URL", "redis://127.0.0.1")]).unwrap_err();
        assert!(e.to_string().starts_with("ADMIN_PASSWORD="), "{e}");
    }

    #[test]
    fn sqlalchemy_database_urls_are_accepted() {
        assert_eq!(normalise_database_url("sqlite:///./data/x.db").unwrap(), "sqlite://./data/x.db");
        assert_eq!(normalise_database_url("sqlite:////var/x.db").unwrap(), "sqlite:///var/x.db");
        assert_eq!(normalise_database_url("sqlite://x.db").unwrap(), "sqlite://x.db");
        assert_eq!(normalise_database_url("postgresql+asyncpg://u@h/db").unwrap(), "postgres://u@h/db");
        assert!(normalise_database_url("mysql://x").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let c = cfg(&[("ADMIN_PASSWORD", "hunter2")]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
