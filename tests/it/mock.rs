//! A stand-in for an LLM server that speaks Ollama's native API and the
//! OpenAI-compatible one exactly as `/work/shared/UPSTREAM-WIRE.md` describes,
//! with knobs for slowness and failures and counters the tests read back.
//!
//! The token statistics it reports follow `llm_quota::tokens`, so they are the
//! numbers the gateway must meter for the same traffic.
//!
//! Streams are produced one chunk per write (honouring the chunk delay), so the
//! gateway's relaying and cancellation can be observed from here.

// Not every helper is used by every test module that includes this file.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use llm_quota::tokens::{
    count_chat_prompt, count_generate_prompt, count_ollama_chunk, count_openai_chunk,
};
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::Notify;

/// The arguments of every tool call the mock makes.
pub const TOOL_ARGUMENTS: &str = r#"{"city":"Tokyo"}"#;

/// How the OpenAI stream splits [`TOOL_ARGUMENTS`]. The cuts sit on the
/// tokeniser's pre-split boundaries, so the fragments' token counts add up to
/// the count of the whole string and streamed and non-streamed usage agree.
pub const TOOL_ARGUMENT_FRAGMENTS: [&str; 3] = [r#"{""#, r#"city":""#, r#"Tokyo"}"#];

/// How long [`MockState::wait_until`] waits before failing the test.
const WAIT_LIMIT: Duration = Duration::from_secs(10);

const WORDS: [&str; 26] = [
    " alpha",
    " bravo",
    " charlie",
    " delta",
    " echo",
    " foxtrot",
    " golf",
    " hotel",
    " india",
    " juliett",
    " kilo",
    " lima",
    " mike",
    " november",
    " oscar",
    " papa",
    " quebec",
    " romeo",
    " sierra",
    " tango",
    " uniform",
    " victor",
    " whiskey",
    " xray",
    " yankee",
    " zulu",
];

/// The `i`-th chunk of every text completion: "Hello", " alpha", " bravo", …
pub fn reply_word(i: usize) -> &'static str {
    if i == 0 {
        "Hello"
    } else {
        WORDS[(i - 1) % WORDS.len()]
    }
}

/// The whole text of a completion of `n` chunks.
pub fn reply_text(n: usize) -> String {
    (0..n).map(reply_word).collect()
}

/// A failure the mock injects into generation requests (`/api/chat`,
/// `/api/generate`, `/v1/chat/completions`); metadata routes are unaffected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Failure {
    #[default]
    None,
    /// Answer with this status and an error body in the route's protocol.
    Status(u16),
    /// Stream this many generation chunks, then an error line/event (HTTP 200)
    /// and end. Non-streaming requests get a 500.
    ErrorAfter(usize),
    /// Stream this many generation chunks, then abort the connection without
    /// a final chunk. Non-streaming requests get half a JSON body, then the abort.
    ResetAfter(usize),
    /// HTTP 200 with a body that is not valid NDJSON / SSE JSON / JSON.
    Garbage,
}

pub struct MockUpstream {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    pub state: Arc<MockState>,
}

impl MockUpstream {
    /// Binds 127.0.0.1 on a free port and serves on the current runtime.
    pub async fn start() -> MockUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock upstream: cannot bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("mock upstream: no local address");
        let state = Arc::new(MockState::default());
        let app = router(state.clone());
        let counter = state.clone();
        let listener = axum::serve::ListenerExt::tap_io(listener, move |_| {
            counter.connections.fetch_add(1, Ordering::SeqCst);
        });
        tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("mock upstream server failed");
        });
        MockUpstream {
            url: format!("http://{addr}"),
            state,
        }
    }
}

pub struct MockState {
    reply_tokens: AtomicUsize,
    chunk_delay: Mutex<Duration>,
    header_delay: Mutex<Duration>,
    one_write: AtomicBool,
    failure: Mutex<Failure>,
    requests: AtomicUsize,
    connections: AtomicUsize,
    requests_by_path: Mutex<HashMap<String, usize>>,
    last_body: Mutex<Option<Value>>,
    last_headers: Mutex<HeaderMap>,
    cancelled: AtomicUsize,
    completed: AtomicUsize,
    changed: Notify,
}

impl Default for MockState {
    fn default() -> Self {
        MockState {
            reply_tokens: AtomicUsize::new(12),
            chunk_delay: Mutex::new(Duration::ZERO),
            header_delay: Mutex::new(Duration::ZERO),
            one_write: AtomicBool::new(false),
            failure: Mutex::new(Failure::None),
            requests: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            requests_by_path: Mutex::new(HashMap::new()),
            last_body: Mutex::new(None),
            last_headers: Mutex::new(HeaderMap::new()),
            cancelled: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }
}

/// A poisoned lock only means another test thread panicked; the data is fine.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MockState {
    /// Number of chunks in a text completion (default 12).
    pub fn set_reply_tokens(&self, n: usize) {
        self.reply_tokens.store(n, Ordering::SeqCst);
    }

    /// Delay between stream chunks (default zero). A non-streaming reply waits
    /// this long once per chunk it contains before answering.
    pub fn set_chunk_delay(&self, d: Duration) {
        *lock(&self.chunk_delay) = d;
    }

    /// Delay before the response headers of every route (default zero).
    pub fn set_header_delay(&self, d: Duration) {
        *lock(&self.header_delay) = d;
    }

    /// A stream's frames in one write, as a server that has the whole
    /// answer at once (or a buffering hop on the way) sends them (default
    /// off: one write per frame). The gateway then has them all in one read.
    pub fn set_one_write(&self, on: bool) {
        self.one_write.store(on, Ordering::SeqCst);
    }

    pub fn set_failure(&self, f: Failure) {
        *lock(&self.failure) = f;
    }

    /// Requests received on any route (counted on arrival, before any delay).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests received on this exact path (no query string).
    pub fn requests_to(&self, path: &str) -> usize {
        lock(&self.requests_by_path).get(path).copied().unwrap_or(0)
    }

    /// The last request body that parsed as JSON, on any route.
    pub fn last_body(&self) -> Option<Value> {
        lock(&self.last_body).clone()
    }

    /// A header of the last request received, e.g. to check what the gateway
    /// sends upstream as `authorization`.
    pub fn last_header(&self, name: &str) -> Option<String> {
        lock(&self.last_headers)
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// Streams whose body the client dropped before the mock had sent it all.
    pub fn cancelled_streams(&self) -> usize {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Streams the mock sent to their end (including an `ErrorAfter` error
    /// line). Streams cut by `ResetAfter` count as neither.
    pub fn completed_streams(&self) -> usize {
        self.completed.load(Ordering::SeqCst)
    }

    /// Waits until `cond` holds (it is re-checked whenever a request arrives
    /// or a stream ends); panics naming `what` after 10 s.
    pub async fn wait_until(&self, what: &str, cond: impl Fn(&MockState) -> bool) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                // Register before checking so a change in between is not lost.
                changed.as_mut().enable();
                if cond(self) {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(WAIT_LIMIT, wait).await.is_err() {
            panic!(
                "mock upstream: timed out after {WAIT_LIMIT:?} waiting for {what} \
                 (requests={}, cancelled streams={}, completed streams={})",
                self.requests(),
                self.cancelled_streams(),
                self.completed_streams()
            );
        }
    }

    pub async fn wait_for_cancelled(&self, n: usize) {
        self.wait_until(&format!("{n} cancelled stream(s)"), |s| {
            s.cancelled_streams() >= n
        })
        .await;
    }

    pub async fn wait_for_completed(&self, n: usize) {
        self.wait_until(&format!("{n} completed stream(s)"), |s| {
            s.completed_streams() >= n
        })
        .await;
    }

    fn reply_tokens(&self) -> usize {
        self.reply_tokens.load(Ordering::SeqCst)
    }

    fn chunk_delay(&self) -> Duration {
        *lock(&self.chunk_delay)
    }

    fn header_delay(&self) -> Duration {
        *lock(&self.header_delay)
    }

    fn failure(&self) -> Failure {
        *lock(&self.failure)
    }

    fn record_request(&self, path: &str, headers: &HeaderMap, body: &[u8]) {
        *lock(&self.requests_by_path)
            .entry(path.to_owned())
            .or_insert(0) += 1;
        *lock(&self.last_headers) = headers.clone();
        if let Ok(v) = serde_json::from_slice::<Value>(body) {
            *lock(&self.last_body) = Some(v);
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn record_stream_end(&self, completed: bool) {
        let counter = if completed {
            &self.completed
        } else {
            &self.cancelled
        };
        counter.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/", get(|| async { "Ollama is running" }))
        .route(
            "/api/version",
            get(|| async { Json(json!({"version": "0.12.3"})) }),
        )
        .route("/api/tags", get(api_tags))
        .route("/api/chat", post(api_chat))
        .route("/api/generate", post(api_generate))
        .route("/v1/models", get(v1_models))
        .route("/v1/chat/completions", post(v1_chat_completions))
        .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found") })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Counts and records every request, then applies the header delay.
async fn observe(State(st): State<Arc<MockState>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("cannot read body: {e}")).into_response()
        }
    };
    st.record_request(parts.uri.path(), &parts.headers, &body);
    let delay = st.header_delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    next.run(Request::from_parts(parts, Body::from(body))).await
}

// ---------------------------------------------------------------- metadata

const MODELS: [(&str, &str, u64, &str, &str); 2] = [
    (
        "llama3.2:latest",
        "llama",
        2_019_393_189,
        "3.2B",
        "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
    ),
    (
        "qwen3:8b",
        "qwen3",
        5_225_388_164,
        "8.2B",
        "500a1f067a9f782620b40bee6f7b0c89e17ae61f686b92c24933e4ca4b2b8b41",
    ),
];

async fn api_tags() -> Json<Value> {
    let models: Vec<Value> = MODELS
        .iter()
        .map(|(name, family, size, params, digest)| {
            json!({
                "name": name,
                "model": name,
                "modified_at": "2025-10-01T12:00:00.123456789Z",
                "size": size,
                "digest": digest,
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": family,
                    "families": [family],
                    "parameter_size": params,
                    "quantization_level": "Q4_K_M"
                }
            })
        })
        .collect();
    Json(json!({ "models": models }))
}

async fn v1_models() -> Json<Value> {
    let data: Vec<Value> = MODELS
        .iter()
        .map(|(name, ..)| json!({"id": name, "object": "model", "created": 1_759_320_000, "owned_by": "library"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

// ---------------------------------------------------------------- generation

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Ollama,
    OpenAi,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Generate,
}

/// A reply as the chunks a stream would carry. `body` holds the generation
/// chunks (words or tool-call pieces) that failures count; `head` and `tail`
/// the framing around them.
struct Reply {
    head: Vec<Value>,
    body: Vec<Value>,
    tail: Vec<Value>,
}

async fn api_chat(State(st): State<Arc<MockState>>, body: Bytes) -> Response {
    ollama_generation(&st, Endpoint::Chat, &body).await
}

async fn api_generate(State(st): State<Arc<MockState>>, body: Bytes) -> Response {
    ollama_generation(&st, Endpoint::Generate, &body).await
}

async fn v1_chat_completions(State(st): State<Arc<MockState>>, body: Bytes) -> Response {
    let (req, model) = match accept(&st, &body) {
        Ok(accepted) => accepted,
        Err((status, message)) => return error_response(Proto::OpenAi, status, &message),
    };
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = stream
        && req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
    let (reply, whole) = openai_reply(&st, &req, &model, include_usage);
    if stream {
        stream_response(&st, Proto::OpenAi, reply)
    } else {
        whole_response(&st, Proto::OpenAi, reply.body.len(), whole).await
    }
}

async fn ollama_generation(st: &Arc<MockState>, ep: Endpoint, raw: &Bytes) -> Response {
    let (req, model) = match accept(st, raw) {
        Ok(accepted) => accepted,
        Err((status, message)) => return error_response(Proto::Ollama, status, &message),
    };
    let reply = ollama_reply(st, ep, &req, &model);
    if req.get("stream").and_then(Value::as_bool).unwrap_or(true) {
        stream_response(st, Proto::Ollama, reply)
    } else {
        let chunks = reply.body.len();
        let whole = ollama_whole(ep, reply);
        whole_response(st, Proto::Ollama, chunks, whole).await
    }
}

/// Parses and validates a generation request; `Err` is the status and message
/// to answer with.
fn accept(st: &MockState, raw: &[u8]) -> Result<(Value, String), (StatusCode, String)> {
    let req: Value = serde_json::from_slice(raw)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))?;
    let model = match req.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => m.to_owned(),
        _ => return Err((StatusCode::BAD_REQUEST, "model is required".to_owned())),
    };
    if model.starts_with("missing") {
        return Err((StatusCode::NOT_FOUND, format!("model '{model}' not found")));
    }
    if let Failure::Status(code) = st.failure() {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err((status, format!("mock upstream failure ({code})")));
    }
    Ok((req, model))
}

fn error_body(proto: Proto, status: StatusCode, message: &str) -> Value {
    match proto {
        Proto::Ollama => json!({ "error": message }),
        Proto::OpenAi => {
            let kind = match status.as_u16() {
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                429 => "rate_limit_error",
                400..=499 => "invalid_request_error",
                _ => "api_error",
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
        }
    }
}

fn error_response(proto: Proto, status: StatusCode, message: &str) -> Response {
    (status, Json(error_body(proto, status, message))).into_response()
}

/// `(chunks, "stop")`, or the cut and `"length"` when `limit` is below `n`.
/// A negative limit means "no limit", as Ollama's `num_predict: -1`.
fn cut(n: usize, limit: Option<i64>) -> (usize, &'static str) {
    match limit.and_then(|l| usize::try_from(l).ok()) {
        Some(l) if l < n => (l, "length"),
        _ => (n, "stop"),
    }
}

fn first_tool_name(req: &Value) -> Option<String> {
    let tools = req.get("tools")?.as_array()?;
    let first = tools.first()?;
    Some(
        first
            .pointer("/function/name")
            .and_then(Value::as_str)
            .unwrap_or("tool")
            .to_owned(),
    )
}

fn random_id(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn ollama_reply(st: &MockState, ep: Endpoint, req: &Value, model: &str) -> Reply {
    let prompt_tokens = match ep {
        Endpoint::Chat => count_chat_prompt(req),
        Endpoint::Generate => count_generate_prompt(req),
    };
    if ep == Endpoint::Generate
        && req
            .get("prompt")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
    {
        let last = json!({"model": model, "created_at": now_rfc3339(), "response": "", "done": true, "done_reason": "load"});
        return Reply {
            head: vec![],
            body: vec![],
            tail: vec![last],
        };
    }
    let piece = |content: &str| match ep {
        Endpoint::Chat => json!({
            "model": model, "created_at": now_rfc3339(),
            "message": {"role": "assistant", "content": content}, "done": false
        }),
        Endpoint::Generate => {
            json!({"model": model, "created_at": now_rfc3339(), "response": content, "done": false})
        }
    };

    let tool = if ep == Endpoint::Chat {
        first_tool_name(req)
    } else {
        None
    };
    let (body, reason) = match tool {
        Some(name) => {
            let mut chunk = piece("");
            let arguments: Value =
                serde_json::from_str(TOOL_ARGUMENTS).expect("TOOL_ARGUMENTS is JSON");
            chunk["message"]["tool_calls"] = json!([{
                "id": format!("call_{}", random_id(8).to_lowercase()),
                "function": {"index": 0, "name": name, "arguments": arguments}
            }]);
            (vec![chunk], "stop")
        }
        None => {
            let limit = req.pointer("/options/num_predict").and_then(Value::as_i64);
            let (n, reason) = cut(st.reply_tokens(), limit);
            ((0..n).map(|i| piece(reply_word(i))).collect(), reason)
        }
    };

    let eval_count: u64 = body.iter().map(count_ollama_chunk).sum();
    let mut last = match ep {
        Endpoint::Chat => json!({
            "model": model, "created_at": now_rfc3339(),
            "message": {"role": "assistant", "content": ""}, "done_reason": reason, "done": true
        }),
        Endpoint::Generate => json!({
            "model": model, "created_at": now_rfc3339(), "response": "", "done": true,
            "done_reason": reason, "context": [1, 2, 3]
        }),
    };
    // Plausible durations; as in Ollama, zero values are omitted.
    let per_chunk = st.chunk_delay().max(Duration::from_millis(2)).as_nanos() as u64;
    let load = 1_500_000u64;
    let prompt_eval = prompt_tokens * 20_000;
    let eval = body.len() as u64 * per_chunk;
    let metrics = [
        ("total_duration", load + prompt_eval + eval),
        ("load_duration", load),
        ("prompt_eval_count", prompt_tokens),
        ("prompt_eval_duration", prompt_eval),
        ("eval_count", eval_count),
        ("eval_duration", eval),
    ];
    for (key, value) in metrics {
        if value != 0 {
            last[key] = json!(value);
        }
    }
    Reply {
        head: vec![],
        body,
        tail: vec![last],
    }
}

/// The `stream: false` answer: the final chunk carrying the whole message.
fn ollama_whole(ep: Endpoint, reply: Reply) -> Value {
    let mut whole = reply
        .tail
        .into_iter()
        .last()
        .expect("an Ollama reply has a final chunk");
    let text: String = reply
        .body
        .iter()
        .filter_map(|c| c.pointer("/message/content").or_else(|| c.get("response")))
        .filter_map(Value::as_str)
        .collect();
    let tool_calls: Vec<Value> = reply
        .body
        .iter()
        .filter_map(|c| c.pointer("/message/tool_calls").and_then(Value::as_array))
        .flatten()
        .cloned()
        .collect();
    match ep {
        Endpoint::Chat => {
            whole["message"]["content"] = json!(text);
            if !tool_calls.is_empty() {
                whole["message"]["tool_calls"] = json!(tool_calls);
            }
        }
        Endpoint::Generate => whole["response"] = json!(text),
    }
    whole
}

/// The stream chunks of a chat completion and the equivalent non-streaming
/// `chat.completion` object.
fn openai_reply(st: &MockState, req: &Value, model: &str, include_usage: bool) -> (Reply, Value) {
    let id = format!("chatcmpl-{}", random_id(24));
    let created = chrono::Utc::now().timestamp();
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };

    let (head, body, reason) = match first_tool_name(req) {
        Some(name) => {
            let call_id = format!("call_{}", random_id(24));
            let mut body = vec![chunk(
                json!({"role": "assistant", "content": null, "tool_calls": [{
                    "index": 0, "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": ""}
                }]}),
                Value::Null,
            )];
            body.extend(TOOL_ARGUMENT_FRAGMENTS.iter().map(|fragment| {
                chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}),
                    Value::Null,
                )
            }));
            (vec![], body, "tool_calls")
        }
        None => {
            let limit = req
                .get("max_completion_tokens")
                .or_else(|| req.get("max_tokens"))
                .and_then(Value::as_i64);
            let (n, reason) = cut(st.reply_tokens(), limit);
            let head = vec![chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            )];
            let body = (0..n)
                .map(|i| chunk(json!({"content": reply_word(i)}), Value::Null))
                .collect();
            (head, body, reason)
        }
    };
    let mut tail = vec![chunk(json!({}), json!(reason))];

    let prompt_tokens = count_chat_prompt(req);
    let completion_tokens: u64 = head
        .iter()
        .chain(&body)
        .chain(&tail)
        .map(count_openai_chunk)
        .sum();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens
    });
    if include_usage {
        tail.push(json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_mock", "choices": [], "usage": usage
        }));
    }

    let mut message = json!({"role": "assistant", "content": null});
    let deltas = head
        .iter()
        .chain(&body)
        .filter_map(|c| c.pointer("/choices/0/delta"));
    let mut text = String::new();
    let mut calls: Vec<Value> = Vec::new();
    for delta in deltas {
        if let Some(s) = delta.get("content").and_then(Value::as_str) {
            text.push_str(s);
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let index = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            while calls.len() <= index {
                calls.push(json!({"id": "", "type": "function", "function": {"name": "", "arguments": ""}}));
            }
            let entry = &mut calls[index];
            if let Some(call_id) = call.get("id") {
                entry["id"] = call_id.clone();
            }
            if let Some(name) = call.pointer("/function/name") {
                entry["function"]["name"] = name.clone();
            }
            if let Some(fragment) = call.pointer("/function/arguments").and_then(Value::as_str) {
                let joined = format!(
                    "{}{fragment}",
                    entry["function"]["arguments"].as_str().unwrap_or("")
                );
                entry["function"]["arguments"] = json!(joined);
            }
        }
    }
    if calls.is_empty() {
        message["content"] = json!(text);
    } else {
        message["tool_calls"] = json!(calls);
    }
    let whole = json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": "fp_mock",
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": reason}],
        "usage": usage
    });
    (Reply { head, body, tail }, whole)
}

// ---------------------------------------------------------------- responses

enum Frame {
    Json(Value),
    SseDone,
    Raw(Bytes),
    Reset,
}

fn content_type(proto: Proto) -> &'static str {
    match proto {
        Proto::Ollama => "application/x-ndjson",
        Proto::OpenAi => "text/event-stream",
    }
}

fn stream_response(st: &Arc<MockState>, proto: Proto, reply: Reply) -> Response {
    let failure = st.failure();
    let mut frames: Vec<Frame> = Vec::new();
    match failure {
        Failure::Garbage => {
            let garbage = match proto {
                Proto::Ollama => "{\"model\": not json at all\n<html>Bad Gateway</html>\n",
                Proto::OpenAi => "data: {\"id\": not json at all\n\n",
            };
            frames.push(Frame::Raw(Bytes::from_static(garbage.as_bytes())));
        }
        Failure::ErrorAfter(n) | Failure::ResetAfter(n) => {
            frames.extend(reply.head.into_iter().map(Frame::Json));
            frames.extend(reply.body.into_iter().take(n).map(Frame::Json));
            frames.push(match failure {
                Failure::ErrorAfter(_) => Frame::Json(error_body(
                    proto,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("mock upstream failed after {n} chunks"),
                )),
                _ => Frame::Reset,
            });
        }
        Failure::None | Failure::Status(_) => {
            frames.extend(
                reply
                    .head
                    .into_iter()
                    .chain(reply.body)
                    .chain(reply.tail)
                    .map(Frame::Json),
            );
            if proto == Proto::OpenAi {
                frames.push(Frame::SseDone);
            }
        }
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type(proto))
        .header(header::CACHE_CONTROL, "no-cache")
        .body(stream_body(st.clone(), proto, frames))
        .expect("static response parts are valid")
}

/// A non-streaming answer; it takes as long as the stream would have.
async fn whole_response(
    st: &Arc<MockState>,
    proto: Proto,
    chunks: usize,
    whole: Value,
) -> Response {
    let delay = st.chunk_delay() * u32::try_from(chunks).unwrap_or(u32::MAX);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match st.failure() {
        Failure::Garbage => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "<html><body>Bad Gateway</body></html>",
        )
            .into_response(),
        Failure::ErrorAfter(_) => error_response(
            proto,
            StatusCode::INTERNAL_SERVER_ERROR,
            "mock upstream failed mid-generation",
        ),
        Failure::ResetAfter(_) => {
            let text = whole.to_string().into_bytes();
            let half = Bytes::copy_from_slice(&text[..text.len() / 2]);
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(stream_body(
                    st.clone(),
                    proto,
                    vec![Frame::Raw(half), Frame::Reset],
                ))
                .expect("static response parts are valid")
        }
        Failure::None | Failure::Status(_) => Json(whole).into_response(),
    }
}

/// Counts a stream as completed or cancelled when the server drops its body.
struct StreamGuard {
    state: Arc<MockState>,
    /// Every frame has been handed to the server.
    finished: bool,
    /// The mock aborted the connection itself; counted as neither.
    reset: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.reset {
            self.state.record_stream_end(self.finished);
        }
    }
}

struct StreamRun {
    frames: VecDeque<Frame>,
    proto: Proto,
    delay: Duration,
    one_write: bool,
    started: bool,
    guard: StreamGuard,
}

impl Frame {
    /// What the frame writes; `None` for a reset, which writes nothing.
    fn bytes(self, proto: Proto) -> Option<Bytes> {
        match self {
            Frame::Json(v) => Some(encode(proto, v)),
            Frame::SseDone => Some(Bytes::from_static(b"data: [DONE]\n\n")),
            Frame::Raw(b) => Some(b),
            Frame::Reset => None,
        }
    }
}

fn encode(proto: Proto, mut value: Value) -> Bytes {
    match proto {
        Proto::Ollama => {
            // Stamped when sent, so timestamps advance with the chunk delay.
            if let Some(ts) = value.get_mut("created_at") {
                *ts = json!(now_rfc3339());
            }
            Bytes::from(format!("{value}\n"))
        }
        Proto::OpenAi => Bytes::from(format!("data: {value}\n\n")),
    }
}

/// One write per frame, `delay` between frames.
fn stream_body(state: Arc<MockState>, proto: Proto, frames: Vec<Frame>) -> Body {
    let run = StreamRun {
        frames: frames.into(),
        proto,
        delay: state.chunk_delay(),
        one_write: state.one_write.load(Ordering::SeqCst),
        started: false,
        guard: StreamGuard {
            state,
            finished: false,
            reset: false,
        },
    };
    let stream = futures_util::stream::unfold(run, |mut run| async move {
        let Some(frame) = run.frames.pop_front() else {
            // As from Ollama (Go's net/http), the body's end (the chunked
            // terminator) comes in a write of its own after the last chunk.
            tokio::task::yield_now().await;
            return None;
        };
        if run.started && !run.delay.is_zero() {
            tokio::time::sleep(run.delay).await;
        }
        run.started = true;
        if run.one_write && !matches!(frame, Frame::Reset) && run.frames.iter().all(|f| !matches!(f, Frame::Reset)) {
            let mut all = bytes::BytesMut::new();
            for f in std::iter::once(frame).chain(run.frames.drain(..)) {
                all.extend_from_slice(&f.bytes(run.proto).expect("no reset among them"));
            }
            run.guard.finished = true;
            return Some((Ok(all.freeze()), run));
        }
        if run.frames.is_empty() {
            run.guard.finished = true;
        }
        let item = match frame.bytes(run.proto) {
            Some(bytes) => Ok(bytes),
            None => {
                // Let the server flush what came before (hyper drops buffered
                // output when the body fails), then abort.
                tokio::task::yield_now().await;
                run.guard.reset = true;
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "mock upstream reset",
                ))
            }
        };
        Some((item, run))
    });
    Body::from_stream(stream)
}

// ---------------------------------------------------------------- Python clients

/// The interpreter for `tests/python/clients.py`: `$LQ_PYTHON`, else the
/// repository's `.venv`. Panics with setup instructions when neither exists.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("LQ_PYTHON") {
        return PathBuf::from(p);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = repo.join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python for the client tests: {} is missing. Run \
         `python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt` in {} \
         (or point LQ_PYTHON at an interpreter that has those packages)",
        venv.display(),
        repo.display()
    );
    venv
}

/// Runs the official `openai` and `ollama` Python clients against a server
/// (the gateway or the mock) and panics with the script's output on failure.
///
/// Async because the server under test usually runs on the caller's runtime,
/// which a blocking wait would starve.
pub async fn run_python_clients(openai_base: &str, ollama_host: &str, key: &str, model: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/clients.py");
    let python = python();
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .env("LQ_OPENAI_BASE_URL", openai_base)
        .env("LQ_OLLAMA_HOST", ollama_host)
        .env("LQ_API_KEY", key)
        .env("LQ_MODEL", model)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env_remove("OLLAMA_API_KEY")
        .env_remove("OLLAMA_HOST")
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(120), run).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot run {} {}: {e}", python.display(), script.display()),
        Err(_) => panic!("{} did not finish within 120 s", script.display()),
    };
    assert!(
        output.status.success(),
        "Python client checks failed ({}):\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
