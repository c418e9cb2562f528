//! llm-quota: an API-key gateway in front of Ollama and OpenAI-compatible
//! servers that enforces daily and monthly token and request quotas.
//!
//! `App::build(config)` connects the stores, binds the listeners and returns
//! what `run` serves; `main` and the integration tests start exactly this.

pub mod admin;
pub mod busy;
pub mod config;
pub mod error;
pub mod events;
pub mod metrics;
pub mod proxy;
pub mod quota;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod tokens;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context;
use axum::{extract::State, http::StatusCode, response::IntoResponse, Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{
    config::{Config, Secret, UpstreamClient},
    proxy::{
        auth::KeyCache,
        relay::Dialect,
        upstream::{self, Target},
    },
    quota::{
        buckets::{Clock, SystemClock},
        flush::{EventSink, Flusher},
        memory::MemoryStore,
        redis::RedisStore,
        BucketRef, Quota, QuotaStore, Seeder, Store, Usage,
    },
    store::{settings, Db},
};

/// Settings an admin can change at run time.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ollama_url: String,
    pub default_model: String,
    /// The upstream's generation routes, parsed once per change of
    /// `ollama_url` instead of once per request (`None`: it does not parse).
    generation_targets: [Option<Target>; Dialect::ALL.len()],
}

impl Settings {
    pub fn new(ollama_url: String, default_model: String, client: UpstreamClient) -> Settings {
        let proxies = upstream::proxies_from_env();
        let generation_targets = Dialect::ALL.map(|d| Target::new(&route_url(&ollama_url, d), client, &proxies));
        Settings { ollama_url, default_model, generation_targets }
    }

    /// Where generation requests of `dialect` go: `Err` with the URL when
    /// it does not parse, so the request fails as an unreachable upstream.
    pub fn generation_target(&self, dialect: Dialect) -> Result<&Target, String> {
        self.generation_targets[dialect as usize].as_ref().ok_or_else(|| route_url(&self.ollama_url, dialect))
    }
}

/// The upstream's URL for `dialect`'s route: the base URL, path prefix
/// included, then the route.
fn route_url(ollama_url: &str, dialect: Dialect) -> String {
    format!("{ollama_url}{}", dialect.route())
}

pub struct SettingsCache(RwLock<Arc<Settings>>);

impl SettingsCache {
    pub fn get(&self) -> Arc<Settings> {
        self.0.read().map(|s| s.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Stored values over the environment's defaults.
    pub async fn reload(&self, db: &Db, config: &Config) -> sqlx::Result<()> {
        let fresh = Settings::new(
            db.get_setting(settings::OLLAMA_URL).await?.unwrap_or_else(|| config.ollama_url.clone()),
            db.get_setting(settings::DEFAULT_MODEL).await?.unwrap_or_else(|| config.default_model.clone()),
            config.upstream_client,
        );
        if let Ok(mut s) = self.0.write() {
            *s = Arc::new(fresh);
        }
        Ok(())
    }
}

/// What every handler shares; cheap to clone (one reference count: the
/// router clones it for every request).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Shared {
    pub config: Arc<Config>,
    pub db: Db,
    pub quota: Quota,
    pub keys: Arc<KeyCache>,
    pub settings: Arc<SettingsCache>,
    pub http: reqwest::Client,
    /// Generation requests to a plain-HTTP upstream (see `proxy::upstream`).
    pub direct: upstream::Direct,
    pub events: EventSink,
    /// `BUSY_POLL`: the request path touches it (see `busy`).
    pub busy: busy::BusyPoll,
    pub admin_password: Secret,
    pub tasks: TaskTracker,
    flusher: Arc<tokio::sync::Mutex<Flusher>>,
    proxy_port: Arc<std::sync::atomic::AtomicU16>,
    cluster_events: Option<Arc<events::ClusterEvents>>,
}

impl Seeder for Db {
    async fn load(&self, bucket: &BucketRef) -> anyhow::Result<Usage> {
        Ok(self.load_bucket(bucket).await?)
    }
}

impl AppState {
    /// An admin changed keys or settings: forget cached copies here, and
    /// tell every other replica (cluster mode).
    pub async fn admin_changed(&self) {
        self.evict_caches().await;
        if let Some(events) = &self.cluster_events {
            events.publish().await;
        }
    }

    /// Forget cached keys and settings.
    pub async fn evict_caches(&self) {
        self.keys.clear();
        if let Err(e) = self.settings.reload(&self.db, &self.config).await {
            tracing::error!(error = %e, "could not reload settings");
        }
    }

    /// Write usage to the durable store now (the flusher does this every
    /// `FLUSH_INTERVAL`).
    pub async fn flush(&self) -> anyhow::Result<()> {
        self.flusher.lock().await.flush().await
    }

    pub fn proxy_port(&self) -> u16 {
        self.proxy_port.load(std::sync::atomic::Ordering::Relaxed)
    }
}

pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Ready = able to serve: the quota store answers (or `QUOTA_FAILURE_MODE=open`).
/// A database outage is reported (`degraded`) but keeps the replica in
/// rotation: cached keys keep working and usage is flushed when it returns.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let db = tokio::time::timeout(Duration::from_secs(2), state.db.ping()).await;
    let db = db.map_err(|_| "timed out".to_string()).and_then(|r| r.map_err(|e| e.to_string()));
    let quota = state.quota.store.ping().await.map_err(|e| e.to_string());
    let ready = quota.is_ok() || state.config.quota_failure_mode == config::FailureMode::Open;
    let show = |r: &Result<(), String>| r.as_ref().map_or_else(|e| format!("error: {e}"), |_| "ok".to_string());
    let (status, word) = match (ready, db.is_ok() && quota.is_ok()) {
        (true, true) => (StatusCode::OK, "ready"),
        (true, false) => (StatusCode::OK, "degraded"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    (status, Json(json!({"status": word, "database": show(&db), "quota_store": show(&quota)})))
}

/// A listener with a deep accept queue: a burst of new streams must not
/// overflow the default backlog of 128 (dropped SYNs cost clients a second).
fn bind(host: std::net::IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let addr = SocketAddr::new(host, port);
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Hands heap pages freed since the last call back to the system: after a
/// burst (a thousand streams' buffers), or after the tokenizer's start-up
/// scaffolding is dropped, the gateway would otherwise stay at its peak
/// resident size while idle. The gateway's binary allocates with mimalloc
/// (`src/main.rs`); glibc's heap is trimmed too, for whatever C code and
/// test binaries allocate there.
pub(crate) fn release_freed_memory() {
    // SAFETY: mi_collect is safe from any thread, at any time: it frees the
    // calling thread's unused pages and purges (decommits) the freed pages
    // of mimalloc's arenas, program-wide.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe (it locks each arena) and only
    // returns unused heap pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub struct App {
    pub state: AppState,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// Set when `ADMIN_PASSWORD` was not given and one was generated.
    pub generated_password: Option<String>,
    proxy: TcpListener,
    admin: TcpListener,
    metrics: TcpListener,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<App> {
        let db = Db::connect(&config.database_url).await?;
        if config.migrate_on_start {
            db.migrate().await?;
        }
        let store = match &config.redis_url {
            None => Store::Memory(Arc::new(MemoryStore::new())),
            Some(url) => Store::Redis(Arc::new(
                RedisStore::connect(url, &config.redis_prefix, config.redis_timeout, config.reservation_ttl)
                    .await
                    .context("connecting to Redis (REDIS_URL)")?,
            )),
        };
        let quota = Quota::new(store, clock, config.app_tz, config.lease_tokens, config.reservation_ttl);
        let (generated_password, admin_password) = match &config.admin_password {
            Some(p) => (None, p.clone()),
            None => {
                let p = store::keys::generate_key().replacen("sk-", "", 1)[..24].to_string();
                (Some(p.clone()), Secret::new(p))
            }
        };
        let (events, flusher) = Flusher::new(
            db.clone(),
            quota.clone(),
            config.log_file.as_ref().map(PathBuf::from),
            Duration::from_secs(u64::from(config.usage_retention_days) * 86_400),
        );
        let settings = Arc::new(SettingsCache(RwLock::new(Arc::new(Settings::new(
            config.ollama_url.clone(),
            config.default_model.clone(),
            config.upstream_client,
        )))));
        settings.reload(&db, &config).await.context("loading settings")?;
        let proxy = bind(config.proxy_host, config.proxy_port).with_context(|| format!("binding the proxy to {}:{}", config.proxy_host, config.proxy_port))?;
        let admin = bind(config.admin_host, config.admin_port).with_context(|| format!("binding the admin to {}:{}", config.admin_host, config.admin_port))?;
        let metrics = bind(config.proxy_host, config.metrics_port).with_context(|| format!("binding metrics to {}:{}", config.proxy_host, config.metrics_port))?;
        // Load the tokenizer's vocabulary now, not during the first request.
        tokio::task::spawn_blocking(|| tokens::count_text("warm up the tokenizer")).await?;
        metrics::handle();
        let proxy_addr = proxy.local_addr()?;
        let (config_redis, config_prefix) = (config.redis_url.clone(), config.redis_prefix.clone());
        let state = AppState(Arc::new(Shared {
            http: upstream::client(&config),
            direct: upstream::direct_client(&config),
            busy: busy::BusyPoll::start(config.busy_poll),
            keys: Arc::new(KeyCache::new(config.key_cache_ttl)),
            config: Arc::new(config),
            db,
            quota,
            settings,
            events,
            admin_password,
            tasks: TaskTracker::new(),
            flusher,
            proxy_port: Arc::new(proxy_addr.port().into()),
            cluster_events: match &config_redis {
                Some(url) => Some(Arc::new(events::ClusterEvents::new(url, &config_prefix)?)),
                None => None,
            },
        }));
        Ok(App {
            proxy_addr,
            admin_addr: admin.local_addr()?,
            metrics_addr: metrics.local_addr()?,
            generated_password,
            state,
            proxy,
            admin,
            metrics,
        })
    }

    fn cors(&self) -> CorsLayer {
        let origins: Vec<_> = self.state.config.allowed_origins.iter().filter_map(|o| o.parse().ok()).collect();
        let layer = CorsLayer::new()
            .allow_methods(tower_http::cors::Any)
            .allow_headers(tower_http::cors::Any)
            .expose_headers(tower_http::cors::Any);
        if self.state.config.allowed_origins.iter().any(|o| o == "*") {
            layer.allow_origin(tower_http::cors::Any)
        } else {
            layer.allow_origin(AllowOrigin::list(origins))
        }
    }

    /// Serve until `stop` is cancelled; then stop accepting, let in-flight
    /// requests finish (at most `SHUTDOWN_GRACE`) and flush usage.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let state = self.state.clone();
        let cors = self.cors();
        let proxy_app: Router = proxy::router(state.clone())
            .route_layer(axum::middleware::from_fn(|req, next| metrics::track_http("proxy", req, next)))
            .layer(axum::extract::DefaultBodyLimit::max(state.config.max_body_bytes))
            .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(state.config.body_timeout))
            .layer(cors.clone());
        let admin_app: Router = admin::router(state.clone())
            .route_layer(axum::middleware::from_fn(|req, next| metrics::track_http("admin", req, next)))
            .layer(cors);
        let metrics_app: Router = Router::new()
            .route("/metrics", axum::routing::get(metrics::render))
            .route("/healthz", axum::routing::get(healthz));
        let flush_stop = CancellationToken::new();
        let flusher = tokio::spawn(quota::flush::run(state.flusher.clone(), state.config.flush_interval, flush_stop.clone()));
        let listener = state.cluster_events.clone().map(|ev| tokio::spawn(ev.listen(state.clone(), flush_stop.clone())));

        let keepalive = state.config.keepalive_timeout;
        let serve = |listener: TcpListener, app: Router| tokio::spawn(serve::serve(listener, app, stop.clone(), keepalive));
        let proxy_task = serve(self.proxy, proxy_app);
        let admin_task = serve(self.admin, admin_app);
        let metrics_task = serve(self.metrics, metrics_app);
        stop.cancelled().await;
        let grace = state.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            let _ = proxy_task.await;
            let _ = admin_task.await;
            let _ = metrics_task.await;
            state.tasks.close();
            state.tasks.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(grace = ?grace, "in-flight requests did not finish in time; settling what they used");
        }
        flush_stop.cancel();
        flusher.await.context("flusher task")?;
        if let Some(l) = listener {
            let _ = l.await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_targets_keep_the_upstream_path() {
        let s = Settings::new("http://gpu.internal:8080/ollama".into(), "m".into(), UpstreamClient::Auto);
        let url = |d| match s.generation_target(d) {
            Ok(Target::Direct(uri)) => uri.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(url(Dialect::OllamaChat), "http://gpu.internal:8080/ollama/api/chat");
        assert_eq!(url(Dialect::OllamaGenerate), "http://gpu.internal:8080/ollama/api/generate");
        assert_eq!(url(Dialect::OpenAiChat), "http://gpu.internal:8080/ollama/v1/chat/completions");
        // `generation_target` indexes by `d as usize`
        assert!(Dialect::ALL.iter().enumerate().all(|(i, &d)| d as usize == i));
        // HTTPS, or reqwest asked for: reqwest, same URL.
        for (base, client) in [("https://gpu.internal/ollama", UpstreamClient::Auto), ("http://gpu.internal/ollama", UpstreamClient::Reqwest)] {
            let s = Settings::new(base.into(), "m".into(), client);
            match s.generation_target(Dialect::OllamaChat) {
                Ok(Target::Reqwest(url)) => assert_eq!(url.as_str(), format!("{base}/api/chat")),
                other => panic!("{base}: {other:?}"),
            }
        }
        // A stored value that does not parse fails when the request is
        // sent, as the upstream call would, naming the URL.
        let bad = Settings::new("not a url".into(), "m".into(), UpstreamClient::Auto);
        assert_eq!(bad.generation_target(Dialect::OllamaChat), Err("not a url/api/chat".to_string()));
    }
}
