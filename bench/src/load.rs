//! The load generator: requests in both protocols against a target (the mock
//! directly, or the gateway in front of it), with latency and stream timing.
//!
//! Everything runs on one thread (the bench pins itself to one CPU), so the
//! shared counters are plain `RefCell`s and concurrency comes from polling
//! many request futures in one task.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};

use crate::mock::Knobs;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Which {
    Direct,
    Gateway,
    /// The bare proxy of `floor.rs` (latency phase only).
    Floor,
}

impl Which {
    pub fn label(self) -> &'static str {
        match self {
            Which::Direct => "direct",
            Which::Gateway => "gateway",
            Which::Floor => "floor",
        }
    }
}

pub struct Target {
    pub which: Which,
    pub base: String,
    pub auth: Option<HeaderValue>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Api {
    OpenAi,
    Chat,
    Generate,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::OpenAi => "/v1/chat/completions",
            Api::Chat => "/api/chat",
            Api::Generate => "/api/generate",
        }
    }

    fn sse(self) -> bool {
        self == Api::OpenAi
    }
}

/// A prompt of exactly `bytes` ASCII bytes of ordinary words.
pub fn prompt(bytes: usize) -> String {
    const TEXT: &str = "Summarise the following notes about the quarterly report and list the open questions. ";
    TEXT.chars().cycle().take(bytes).collect()
}

/// A serialised request body; built once per case and cloned cheaply.
pub fn body(api: Api, knobs: Knobs, prompt_bytes: usize, stream: bool) -> Bytes {
    let model = knobs.model();
    let p = prompt(prompt_bytes);
    let v = match api {
        Api::OpenAi | Api::Chat => json!({"model": model, "messages": [{"role": "user", "content": p}], "stream": stream}),
        Api::Generate => json!({"model": model, "prompt": p, "stream": stream}),
    };
    Bytes::from(v.to_string())
}

pub fn histogram() -> Histogram<u64> {
    // Microseconds, 1 µs .. 10 min, 3 significant figures.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// What one stream looked like from the client.
#[derive(Debug, Default, Clone)]
pub struct StreamTiming {
    pub ttfc: Duration,
    /// Time between consecutive records (lines or SSE events).
    pub gaps: Vec<Duration>,
    pub records: usize,
}

impl StreamTiming {
    pub fn max_gap(&self) -> Duration {
        self.gaps.iter().copied().max().unwrap_or_default()
    }
}

pub struct Loader {
    client: RefCell<reqwest::Client>,
    /// Failures by "target route: cause".
    pub errors: RefCell<BTreeMap<String, u64>>,
    /// HTTP statuses seen, by "target status".
    pub statuses: RefCell<BTreeMap<String, u64>>,
    /// With `--trace`: one line per request of the rate ramp.
    pub trace: Option<RefCell<Vec<String>>>,
}

fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(120))
        .timeout(Duration::from_secs(120))
        .build()
}

impl Loader {
    pub fn new(trace: bool) -> anyhow::Result<Loader> {
        let trace = trace.then(|| RefCell::new(vec!["side,offered_rps,start_ms,latency_us,ok".to_owned()]));
        Ok(Loader { client: RefCell::new(client()?), errors: RefCell::default(), statuses: RefCell::default(), trace })
    }

    /// Closes every idle connection: a new client, the old one's pool
    /// dropped with it (requests in flight keep theirs until they end).
    pub fn close_idle_connections(&self) -> anyhow::Result<()> {
        *self.client.borrow_mut() = client()?;
        Ok(())
    }

    pub fn note_error(&self, t: &Target, api: Api, cause: &str) {
        *self.errors.borrow_mut().entry(format!("{} {}: {cause}", t.which.label(), api.path())).or_default() += 1;
    }

    pub fn error_count(&self, which: Which) -> u64 {
        let prefix = format!("{} ", which.label());
        self.errors.borrow().iter().filter(|(k, _)| k.starts_with(&prefix)).map(|(_, n)| n).sum()
    }

    fn request(&self, t: &Target, api: Api, body: Bytes) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .borrow()
            .post(format!("{}{}", t.base, api.path()))
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body);
        if let Some(auth) = &t.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        req
    }

    async fn send(&self, t: &Target, api: Api, body: Bytes) -> Result<reqwest::Response, String> {
        let resp = self.request(t, api, body).send().await.map_err(|e| describe(&e))?;
        let status = resp.status();
        *self.statuses.borrow_mut().entry(format!("{} {}", t.which.label(), status.as_u16())).or_default() += 1;
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let text: String = text.chars().take(120).collect();
            return Err(format!("HTTP {} {text}", status.as_u16()));
        }
        Ok(resp)
    }

    /// A whole request; the body of a 2xx answer, or the failure (also counted).
    pub async fn unary(&self, t: &Target, api: Api, body: Bytes) -> Option<Bytes> {
        let result = async {
            let resp = self.send(t, api, body).await?;
            resp.bytes().await.map_err(|e| describe(&e))
        }
        .await;
        result.map_err(|e| self.note_error(t, api, &e)).ok()
    }

    /// A streaming request, timed record by record from `start` (normally the
    /// moment it was issued). A stream that does not end with its final record
    /// (`done:true` / `[DONE]`) or carries an error record counts as failed.
    pub async fn stream(&self, t: &Target, api: Api, body: Bytes, start: Instant) -> Option<StreamTiming> {
        let result = self.stream_inner(t, api, body, start).await;
        result.map_err(|e| self.note_error(t, api, &e)).ok()
    }

    async fn stream_inner(&self, t: &Target, api: Api, body: Bytes, start: Instant) -> Result<StreamTiming, String> {
        let mut resp = self.send(t, api, body).await?;
        let mut timing = StreamTiming::default();
        let mut current: Vec<u8> = Vec::with_capacity(512);
        let mut last_at: Option<Instant> = None;
        let mut finished = false;
        let sse = api.sse();
        while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
            let now = Instant::now();
            for &b in chunk.iter() {
                let prev = current.last().copied();
                current.push(b);
                let end = if sse { b == b'\n' && prev == Some(b'\n') } else { b == b'\n' };
                if !end {
                    continue;
                }
                match last_at {
                    None => timing.ttfc = now - start,
                    Some(at) => timing.gaps.push(now - at),
                }
                last_at = Some(now);
                timing.records += 1;
                if contains(&current, b"\"error\"") {
                    return Err(format!("error record: {}", String::from_utf8_lossy(&current).trim()));
                }
                if contains(&current, b"\"done\":true") || contains(&current, b"data: [DONE]") {
                    finished = true;
                }
                current.clear();
            }
        }
        if !finished {
            return Err(format!("stream ended without its final record after {} records", timing.records));
        }
        Ok(timing)
    }

    /// One request of each kind to the target, reduced to what a client
    /// would compare: text, token statistics, finish reason.
    pub async fn summary(&self, t: &Target, api: Api, body: Bytes, stream: bool) -> Result<String, String> {
        let resp = self.send(t, api, body).await?;
        let bytes = resp.bytes().await.map_err(|e| describe(&e))?;
        summarise(api, stream, &bytes)
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The innermost cause of a transport error (connection refused, reset…).
fn describe(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(src) = cause.source() {
        cause = src;
    }
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    format!("{kind}: {cause}")
}

/// "text=…, prompt=N, completion=N, finish=…" for a reply in either protocol.
pub fn summarise(api: Api, stream: bool, bytes: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(bytes);
    let records: Vec<Value> = if !stream {
        vec![serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e}): {text}"))?]
    } else if api == Api::OpenAi {
        let mut v = Vec::new();
        for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if line == "[DONE]" {
                v.push(json!({"[DONE]": true}));
            } else {
                v.push(serde_json::from_str(line).map_err(|e| format!("bad SSE event ({e}): {line}"))?);
            }
        }
        v
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("bad NDJSON line ({e}): {l}")))
            .collect::<Result<_, _>>()?
    };
    let mut content = String::new();
    let (mut prompt, mut completion, mut finish) = (None, None, None);
    let mut done_marker = false;
    for r in &records {
        let s = |p: &str| r.pointer(p).and_then(Value::as_str).map(str::to_owned);
        let n = |p: &str| r.pointer(p).and_then(Value::as_u64);
        if let Some(c) = s("/choices/0/message/content").or_else(|| s("/choices/0/delta/content")) {
            content.push_str(&c);
        }
        if let Some(c) = s("/message/content").or_else(|| s("/response")) {
            content.push_str(&c);
        }
        prompt = n("/usage/prompt_tokens").or(n("/prompt_eval_count")).or(prompt);
        completion = n("/usage/completion_tokens").or(n("/eval_count")).or(completion);
        finish = s("/choices/0/finish_reason").or(s("/done_reason")).or(finish);
        done_marker |= r.get("[DONE]").is_some() || r.get("done") == Some(&Value::Bool(true));
    }
    let show = |o: Option<u64>| o.map_or_else(|| "-".to_owned(), |n| n.to_string());
    Ok(format!(
        "text={content:?} prompt={} completion={} finish={} end={}",
        show(prompt),
        show(completion),
        finish.unwrap_or_else(|| "-".into()),
        if done_marker { "yes" } else { "no" }
    ))
}
