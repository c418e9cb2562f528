//! `TestApp`: the real application (what `main` starts) on port 0, with its
//! own SQLite file (or PostgreSQL database), its own mock upstream and typed
//! helpers for the admin API.

use std::{collections::HashMap, sync::Arc};

use llm_quota::{
    config::Config,
    quota::buckets::{Clock, SystemClock},
    App, AppState,
};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::mock::MockUpstream;

pub const PASSWORD: &str = "test-admin-password";

pub struct TestApp {
    pub proxy: String,
    pub admin: String,
    pub metrics: String,
    pub state: AppState,
    pub mock: MockUpstream,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    stop: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

pub struct Options {
    pub env: Vec<(String, String)>,
    pub clock: Arc<dyn Clock>,
}

impl Default for Options {
    fn default() -> Self {
        Options { env: Vec::new(), clock: Arc::new(SystemClock) }
    }
}

impl Options {
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn clock(mut self, c: Arc<dyn Clock>) -> Self {
        self.clock = c;
        self
    }
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(opts: Options) -> TestApp {
        let mock = MockUpstream::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut env: HashMap<String, String> = [
            ("PROXY_HOST", "127.0.0.1".to_string()),
            ("PROXY_PORT", "0".into()),
            ("ADMIN_PORT", "0".into()),
            ("METRICS_PORT", "0".into()),
            ("ADMIN_PASSWORD", PASSWORD.into()),
            ("DATABASE_URL", format!("sqlite://{}/llm-quota.db", dir.path().display())),
            ("LOG_FILE", format!("{}/usage.log", dir.path().display())),
            ("OLLAMA_URL", mock.url.clone()),
            ("DEFAULT_MODEL", "llama3.2:latest".into()),
            // Tests flush explicitly; the timer must not race them.
            ("FLUSH_INTERVAL", "1h".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        env.extend(opts.env);
        let config = Config::from_map(&env).expect("test configuration is valid");
        let app = App::build_with_clock(config, opts.clock).await.expect("app builds");
        let proxy = format!("http://{}", app.proxy_addr);
        let admin = format!("http://{}", app.admin_addr);
        let metrics = format!("http://{}", app.metrics_addr);
        let state = app.state.clone();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(app.run(stop.clone()));
        TestApp { proxy, admin, metrics, state, mock, http: reqwest::Client::new(), dir, stop, handle: Some(handle) }
    }

    /// Stop as SIGTERM would, without waiting (`shutdown` waits).
    pub fn begin_shutdown(&self) {
        self.stop.cancel();
    }

    /// Stop as SIGTERM would, and wait until the app has finished.
    pub async fn shutdown(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("app task").expect("app shut down cleanly");
        }
    }

    pub fn admin_req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.admin)).bearer_auth(PASSWORD)
    }

    pub async fn admin_json(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.admin_req(method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("admin request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Create a key; returns (id, plaintext).
    pub async fn create_key(&self, body: Value) -> (i64, String) {
        let (status, v) = self.admin_json(reqwest::Method::POST, "/api/api-keys", Some(body)).await;
        assert_eq!(status, 200, "create key failed: {v}");
        (v["id"].as_i64().expect("id"), v["key"].as_str().expect("plaintext key").to_string())
    }

    pub async fn key(&self, name: &str) -> (i64, String) {
        self.create_key(json!({"name": name})).await
    }

    /// Waits until every relay has settled its request. Settlement runs after
    /// the client has its answer, and a relay that outlives its client's
    /// response (or its client) goes on as a task: this waits for those. A
    /// relay whose response is still being read is not waited for, so read
    /// responses to their end first.
    pub async fn settled(&self) {
        self.state.tasks.close();
        self.state.tasks.wait().await;
        self.state.tasks.reopen();
    }

    /// The admin list's entry for a key.
    pub async fn key_info(&self, id: i64) -> Value {
        let (status, list) = self.admin_json(reqwest::Method::GET, "/api/api-keys", None).await;
        assert_eq!(status, 200);
        list.as_array().expect("list").iter().find(|k| k["id"] == id).cloned().expect("key listed")
    }

    pub fn post(&self, path: &str, key: &str, body: Value) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.proxy)).bearer_auth(key).json(&body)
    }

    pub fn get(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.proxy)).bearer_auth(key)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Polls `probe` every 20 ms until it returns `Ok`, for at most 10 s (the
/// deadline only keeps a slow, shared machine from failing a test; no
/// timing is asserted). Panics naming `what` and the last `Err` it saw.
pub async fn eventually<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) if tokio::time::Instant::now() >= deadline => panic!("timed out after 10 s waiting for {what}; last: {last:?}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

/// An upstream URL where nothing listens: a port the system just handed
/// out and took back, so connecting is refused (no fixed port).
pub fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    format!("http://{}", listener.local_addr().expect("local address"))
}

pub fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// Parse an NDJSON body into its lines.
pub fn ndjson(body: &str) -> Vec<Value> {
    body.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("NDJSON line is JSON")).collect()
}

/// Parse an SSE body into its data payloads (`[DONE]` kept as a string).
pub fn sse(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| if d == "[DONE]" { Value::String(d.into()) } else { serde_json::from_str(d).expect("SSE data is JSON") })
        .collect()
}

/// A fresh PostgreSQL database and a unique Redis prefix, shared by the
/// replicas of one test; both are removed when dropped.
pub struct Cluster {
    pub redis_url: String,
    pub prefix: String,
    pub database_url: String,
    admin_url: String,
    db_name: String,
}

pub fn test_redis_url() -> String {
    std::env::var("LQ_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

pub fn test_postgres_url() -> String {
    std::env::var("LQ_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

impl Cluster {
    pub async fn new() -> Cluster {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let admin_url = format!("{}/postgres", test_postgres_url());
        let db_name = format!("lq_test_{}", &id[..16]);
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url).await.expect("PostgreSQL reachable for tests");
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {db_name}").as_str()).await.expect("create test database");
        Cluster {
            redis_url: test_redis_url(),
            prefix: format!("lqtest-{}", &id[..12]),
            database_url: format!("{}/{db_name}", test_postgres_url()),
            admin_url,
            db_name,
        }
    }

    /// Options for one replica (point REDIS_URL / DATABASE_URL elsewhere, e.g.
    /// through a `TcpProxy`, by overriding).
    pub fn options(&self) -> Options {
        Options::default()
            .env("REDIS_URL", &self.redis_url)
            .env("REDIS_PREFIX", &self.prefix)
            .env("DATABASE_URL", &self.database_url)
            .env("MIGRATE_ON_START", "true")
            // Test machines are shared and debug builds slow: a generous
            // bound (outage tests cut connections, which fail at once).
            .env("REDIS_TIMEOUT", "2s")
    }

    pub async fn db(&self) -> llm_quota::store::Db {
        llm_quota::store::Db::connect(&self.database_url).await.expect("test database")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let (admin_url, db_name) = (self.admin_url.clone(), self.db_name.clone());
        // Cleanup needs async I/O but Drop is sync: a short-lived runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url).await {
                    let _ = sqlx::Executor::execute(&mut conn, format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)").as_str()).await;
                }
            })
        })
        .join();
        drop(RedisKeys(self.prefix.clone()));
    }
}

/// Deletes every Redis key under a test's prefix when dropped.
pub struct RedisKeys(pub String);

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let (redis_url, prefix) = (test_redis_url(), self.0.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                if let Ok(client) = redis::Client::open(redis_url) {
                    if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut c).await.unwrap_or_default();
                        if !keys.is_empty() {
                            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(keys).query_async(&mut c).await;
                        }
                    }
                }
            })
        })
        .join();
    }
}

/// A TCP forwarder in front of a real service, to cut it off and bring it
/// back (an outage without stopping the shared server).
pub struct TcpProxy {
    pub addr: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    /// Milliseconds each piece of data waits before it is passed on.
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

/// Copies `from` to `to`, holding each read back by the proxy's delay.
async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay_ms: Arc<std::sync::atomic::AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        let delay = delay_ms.load(std::sync::atomic::Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl TcpProxy {
    pub async fn start(target: &str) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let conns = Arc::new(std::sync::Mutex::new(Vec::<tokio::task::AbortHandle>::new()));
        let (up2, delay2, conns2, target) = (up.clone(), delay_ms.clone(), conns.clone(), target.to_string());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !up2.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let (target, delay) = (target.clone(), delay2.clone());
                let task = tokio::spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let ((in_r, in_w), (out_r, out_w)) = (inbound.into_split(), outbound.into_split());
                        tokio::join!(pipe(in_r, out_w, delay.clone()), pipe(out_r, in_w, delay));
                    }
                });
                conns2.lock().unwrap().push(task.abort_handle());
            }
        });
        TcpProxy { addr, up, delay_ms, conns }
    }

    /// Hold every piece of data back this long in each direction (a slow
    /// network), from now on.
    pub fn set_delay(&self, d: std::time::Duration) {
        self.delay_ms.store(d.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }

    /// Refuse new connections and break the open ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// 64-style hammering: `clients` concurrent clients, `rounds` requests
/// each, spread over `proxies` (base URLs), mixing protocols, stream and
/// non-stream, and clients that disconnect after the first chunk. Every
/// answer must be 200 or 429; returns how many were admitted.
pub async fn mixed_clients(proxies: Vec<String>, key: &str, clients: usize, rounds: usize) -> u64 {
    use futures_util::StreamExt;
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (http, proxies, key) = (http.clone(), proxies.clone(), key.to_string());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            for round in 0..rounds {
                let proxy = &proxies[(i + round) % proxies.len()];
                let (path, mut body) = match (i + round) % 3 {
                    0 => ("/v1/chat/completions", chat(MIXED_MODEL, "hello there")),
                    1 => ("/api/chat", chat(MIXED_MODEL, "hello there")),
                    _ => ("/api/generate", json!({"model": MIXED_MODEL, "prompt": "hello there"})),
                };
                body["stream"] = json!(i % 2 == 0);
                let resp = http.post(format!("{proxy}{path}")).bearer_auth(&key).json(&body).send().await.unwrap();
                let status = resp.status().as_u16();
                assert!(status == 200 || status == 429, "unexpected status {status}: {}", resp.text().await.unwrap_or_default());
                if status == 200 {
                    ok += 1;
                    if i % 5 == 0 {
                        // disconnect after the first chunk
                        let mut s = resp.bytes_stream();
                        let _ = s.next().await;
                    } else {
                        let _ = resp.bytes().await;
                    }
                }
            }
            ok
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    admitted
}

const MIXED_MODEL: &str = "llama3.2:latest";
