//! A lean, fast stand-in for an LLM server: Ollama's `/api/chat` and
//! `/api/generate` (NDJSON) and the OpenAI-compatible `/v1/chat/completions`
//! (SSE), in the shapes of `/work/shared/UPSTREAM-WIRE.md`.
//!
//! It is plain hyper on one thread with hand-written JSON for the chunks, so
//! that the mock costs far less than the gateway it is compared with. Token
//! statistics follow `llm_quota::tokens`, the numbers the gateway meters.
//!
//! Timing knobs travel in the model name (`bench-d50-n64-g20`: answer after
//! 50 ms, 64 completion chunks, 20 ms apart), so the gateway passes them through
//! untouched and one mock process serves every benchmark phase.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use llm_quota::tokens::{count_chat_prompt, count_generate_prompt, count_ollama_chunk, count_openai_chunk};
use serde_json::{json, Value};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Response timing of the mock, chosen per request through the model name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Knobs {
    /// Wait before the response headers (the "model thinking" time).
    pub delay_ms: u64,
    /// Completion chunks (one word each).
    pub chunks: usize,
    /// Pause between two stream chunks; 0 sends the whole stream in one write.
    pub gap_ms: u64,
}

impl Knobs {
    pub fn model(&self) -> String {
        format!("bench-d{}-n{}-g{}", self.delay_ms, self.chunks, self.gap_ms)
    }

    /// Unknown or missing parts keep their defaults (no delay, 16 chunks, no gap).
    pub fn parse(model: &str) -> Knobs {
        let mut k = Knobs { delay_ms: 0, chunks: 16, gap_ms: 0 };
        for part in model.split(['-', ':']) {
            let (tag, num) = part.split_at(part.len().min(1));
            let Ok(n) = num.parse::<u64>() else { continue };
            match tag {
                "d" => k.delay_ms = n,
                "n" => k.chunks = n as usize,
                "g" => k.gap_ms = n,
                _ => {}
            }
        }
        k
    }
}

const WORDS: [&str; 26] = [
    " alpha", " bravo", " charlie", " delta", " echo", " foxtrot", " golf", " hotel", " india", " juliett", " kilo",
    " lima", " mike", " november", " oscar", " papa", " quebec", " romeo", " sierra", " tango", " uniform", " victor",
    " whiskey", " xray", " yankee", " zulu",
];

/// The `i`-th chunk of every completion: "Hello", " alpha", " bravo", …
pub fn reply_word(i: usize) -> &'static str {
    if i == 0 {
        "Hello"
    } else {
        WORDS[(i - 1) % WORDS.len()]
    }
}

pub fn reply_text(n: usize) -> String {
    (0..n).map(reply_word).collect()
}

/// Completion tokens of the chunk carrying word `i` (index 0 = "Hello", then
/// the 26 words), as `llm_quota::tokens` counts them: (Ollama, OpenAI).
fn word_tokens() -> &'static [(u64, u64); 27] {
    static TABLE: OnceLock<[(u64, u64); 27]> = OnceLock::new();
    TABLE.get_or_init(|| {
        std::array::from_fn(|i| {
            let w = reply_word(i);
            (
                count_ollama_chunk(&json!({"message": {"role": "assistant", "content": w}})),
                count_openai_chunk(&json!({"choices": [{"index": 0, "delta": {"content": w}}]})),
            )
        })
    })
}

fn word_index(i: usize) -> usize {
    if i == 0 {
        0
    } else {
        1 + (i - 1) % WORDS.len()
    }
}

fn completion_tokens(n: usize, openai: bool) -> u64 {
    let t = word_tokens();
    (0..n).map(|i| if openai { t[word_index(i)].1 } else { t[word_index(i)].0 }).sum()
}

/// Loads the tokenizer the mock counts with. Done before the mock says it
/// listens: loading it takes 50–150 ms of CPU, and a mock still loading it
/// when the gateway's first request arrives made that request look that
/// much slower.
pub fn warm_up() {
    word_tokens();
}

/// Serves until the process ends. Accept errors (e.g. out of file
/// descriptors) are reported and retried rather than fatal.
pub async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("mock: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(handle)).await;
        });
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let raw = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(json_response(StatusCode::BAD_REQUEST, json!({"error": e.to_string()}).to_string())),
    };
    Ok(match (method, path.as_str()) {
        (Method::POST, "/api/chat") => ollama(Endpoint::Chat, &raw).await,
        (Method::POST, "/api/generate") => ollama(Endpoint::Generate, &raw).await,
        (Method::POST, "/v1/chat/completions") => openai(&raw).await,
        (Method::GET, "/api/version") => json_response(StatusCode::OK, r#"{"version":"0.12.3"}"#.into()),
        (Method::GET, "/") => Response::new(full("Ollama is running")),
        _ => json_response(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.into()),
    })
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed_unsync()
}

fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Generate,
}

/// An error in the route's protocol.
fn error_response(openai: bool, status: StatusCode, msg: String) -> Response<Body> {
    let body = if openai {
        json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": null}})
    } else {
        json!({"error": msg})
    };
    json_response(status, body.to_string())
}

/// Parses a generation request: the body and its model, or why not.
fn accept(raw: &[u8]) -> Result<(Value, String), (StatusCode, String)> {
    let req: Value =
        serde_json::from_slice(raw).map_err(|e| (StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))?;
    match req.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => {
            let m = m.to_owned();
            Ok((req, m))
        }
        _ => Err((StatusCode::BAD_REQUEST, "model is required".into())),
    }
}

/// `(chunks, "stop")`, or the cut and `"length"` when `limit` is below `n`.
fn cut(n: usize, limit: Option<i64>) -> (usize, &'static str) {
    match limit.and_then(|l| usize::try_from(l).ok()) {
        Some(l) if l < n => (l, "length"),
        _ => (n, "stop"),
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

static IDS: AtomicU64 = AtomicU64::new(1);

/// Produces record `i` of a reply (a line or an SSE event), `None` past the end.
/// Called when the record is sent, so timestamps advance with the pacing.
type Records = Box<dyn FnMut(usize) -> Option<String> + Send>;

fn stream_response(content_type: &'static str, knobs: Knobs, mut records: Records) -> Response<Body> {
    let body = if knobs.gap_ms == 0 {
        let mut all = String::new();
        let mut i = 0;
        while let Some(r) = records(i) {
            all.push_str(&r);
            i += 1;
        }
        full(all)
    } else {
        let gap = Duration::from_millis(knobs.gap_ms);
        // The body ends right after the last record, as a server's does
        // when its handler returns: waiting a gap first would hold the
        // connection (and the next request on it) for one more gap.
        let s = futures_util::stream::unfold((0usize, records), move |(i, mut records)| async move {
            let r = records(i)?;
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(r))), (i + 1, records)))
        });
        StreamBody::new(s).boxed_unsync()
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    r
}

async fn ollama(ep: Endpoint, raw: &[u8]) -> Response<Body> {
    let (req, model) = match accept(raw) {
        Ok(a) => a,
        Err((status, msg)) => return error_response(false, status, msg),
    };
    let knobs = Knobs::parse(&model);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(true);
    let prompt_tokens = match ep {
        Endpoint::Chat => count_chat_prompt(&req),
        Endpoint::Generate => count_generate_prompt(&req),
    };
    let load_only = ep == Endpoint::Generate && req.get("prompt").and_then(Value::as_str).unwrap_or("").is_empty();
    let (n, reason) = if load_only {
        (0, "load")
    } else {
        cut(knobs.chunks, req.pointer("/options/num_predict").and_then(Value::as_i64))
    };
    if knobs.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(knobs.delay_ms)).await;
    }
    let model_json = Value::String(model).to_string();
    let chunk_model = model_json.clone();

    // Final-chunk statistics; as in Ollama, zero values are omitted.
    let eval_count = completion_tokens(n, false);
    let per_chunk = knobs.gap_ms.max(2) * 1_000_000;
    let load = 1_500_000u64;
    let prompt_eval = prompt_tokens * 20_000;
    let eval = n as u64 * per_chunk;
    let mut stats = String::new();
    if !load_only {
        for (k, v) in [
            ("total_duration", load + prompt_eval + eval),
            ("load_duration", load),
            ("prompt_eval_count", prompt_tokens),
            ("prompt_eval_duration", prompt_eval),
            ("eval_count", eval_count),
            ("eval_duration", eval),
        ] {
            if v != 0 {
                stats.push_str(&format!(",\"{k}\":{v}"));
            }
        }
    }
    let final_record = move |content: &str| -> String {
        let content = Value::String(content.to_owned());
        match ep {
            Endpoint::Chat => format!(
                "{{\"model\":{model_json},\"created_at\":\"{}\",\"message\":{{\"role\":\"assistant\",\"content\":{content}}},\"done_reason\":\"{reason}\",\"done\":true{stats}}}",
                now_rfc3339()
            ),
            Endpoint::Generate => format!(
                "{{\"model\":{model_json},\"created_at\":\"{}\",\"response\":{content},\"done\":true,\"done_reason\":\"{reason}\"{stats}{}}}",
                now_rfc3339(),
                if load_only { "" } else { ",\"context\":[1,2,3]" }
            ),
        }
    };

    if !stream {
        let whole = final_record(&reply_text(n));
        return json_response(StatusCode::OK, whole);
    }
    let model_json = chunk_model;
    let records: Records = Box::new(move |i| {
        if i < n {
            let w = reply_word(i);
            Some(match ep {
                Endpoint::Chat => format!(
                    "{{\"model\":{model_json},\"created_at\":\"{}\",\"message\":{{\"role\":\"assistant\",\"content\":\"{w}\"}},\"done\":false}}\n",
                    now_rfc3339()
                ),
                Endpoint::Generate => format!(
                    "{{\"model\":{model_json},\"created_at\":\"{}\",\"response\":\"{w}\",\"done\":false}}\n",
                    now_rfc3339()
                ),
            })
        } else if i == n {
            Some(final_record("") + "\n")
        } else {
            None
        }
    });
    stream_response("application/x-ndjson", knobs, records)
}

async fn openai(raw: &[u8]) -> Response<Body> {
    let (req, model) = match accept(raw) {
        Ok(a) => a,
        Err((status, msg)) => return error_response(true, status, msg),
    };
    let knobs = Knobs::parse(&model);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage =
        stream && req.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
    let limit = req.get("max_completion_tokens").or_else(|| req.get("max_tokens")).and_then(Value::as_i64);
    let (n, reason) = cut(knobs.chunks, limit);
    let prompt_tokens = count_chat_prompt(&req);
    let completion = completion_tokens(n, true);
    let usage = format!(
        "{{\"prompt_tokens\":{prompt_tokens},\"completion_tokens\":{completion},\"total_tokens\":{}}}",
        prompt_tokens + completion
    );
    if knobs.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(knobs.delay_ms)).await;
    }
    let id = format!("chatcmpl-{:024x}", IDS.fetch_add(1, Ordering::Relaxed));
    let created = chrono::Utc::now().timestamp();
    let model_json = Value::String(model).to_string();
    let common = format!(
        "\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{model_json},\"system_fingerprint\":\"fp_mock\""
    );

    if !stream {
        let text = Value::String(reply_text(n));
        let whole = format!(
            "{{\"id\":\"{id}\",\"object\":\"chat.completion\",\"created\":{created},\"model\":{model_json},\"system_fingerprint\":\"fp_mock\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":{text}}},\"logprobs\":null,\"finish_reason\":\"{reason}\"}}],\"usage\":{usage}}}"
        );
        return json_response(StatusCode::OK, whole);
    }
    let null_usage = if include_usage { ",\"usage\":null" } else { "" };
    let chunk = move |delta: &str, finish: &str| {
        format!(
            "data: {{{common},\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]{null_usage}}}\n\n"
        )
    };
    // Records: role delta, n words, then the end in one write — finish chunk,
    // usage chunk when asked for, `[DONE]` — as servers send it: they have
    // nothing left to generate, so a paced mock must not pace these.
    let records: Records = Box::new(move |i| {
        Some(match i {
            0 => chunk(r#"{"role":"assistant","content":""}"#, "null"),
            i if i <= n => chunk(&format!("{{\"content\":\"{}\"}}", reply_word(i - 1)), "null"),
            i if i == n + 1 => {
                let mut end = chunk("{}", &format!("\"{reason}\""));
                if include_usage {
                    end.push_str(&format!(
                        "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{model_json},\"system_fingerprint\":\"fp_mock\",\"choices\":[],\"usage\":{usage}}}\n\n"
                    ));
                }
                end.push_str("data: [DONE]\n\n");
                end
            }
            _ => return None,
        })
    });
    stream_response("text/event-stream", knobs, records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_round_trip_through_the_model_name() {
        let k = Knobs { delay_ms: 50, chunks: 64, gap_ms: 20 };
        assert_eq!(Knobs::parse(&k.model()), k);
        assert_eq!(Knobs::parse("llama3"), Knobs { delay_ms: 0, chunks: 16, gap_ms: 0 });
    }

    /// Every route and mode, through HTTP, parsed the way the load generator
    /// compares replies: the counts are those of `llm_quota::tokens`.
    #[tokio::test]
    async fn replies_carry_the_gateway_token_counts() {
        use crate::load::{body, summarise, Api};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(serve(listener));
        let http = reqwest::Client::builder().no_proxy().build().expect("client");
        let knobs = Knobs { delay_ms: 1, chunks: 5, gap_ms: 1 };
        for api in [Api::OpenAi, Api::Chat, Api::Generate] {
            for (stream, usage) in [(false, false), (true, false), (true, true)] {
                if usage && api != Api::OpenAi {
                    continue;
                }
                let mut req: Value = serde_json::from_slice(&body(api, knobs, 200, stream)).expect("JSON");
                if usage {
                    req["stream_options"] = json!({"include_usage": true});
                }
                let prompt = match api {
                    Api::Generate => count_generate_prompt(&req),
                    _ => count_chat_prompt(&req),
                };
                let completion = completion_tokens(5, api == Api::OpenAi);
                let resp = http.post(format!("{url}{}", api.path())).body(req.to_string()).send().await.expect("request");
                assert_eq!(resp.status(), 200);
                let bytes = resp.bytes().await.expect("body");
                let got = summarise(api, stream, &bytes).expect("parsable reply");
                let counted = api != Api::OpenAi || !stream || usage;
                let (p, c) = if counted { (prompt.to_string(), completion.to_string()) } else { ("-".into(), "-".into()) };
                let end = if api == Api::OpenAi && !stream { "no" } else { "yes" };
                let want = format!("text={:?} prompt={p} completion={c} finish=stop end={end}", reply_text(5));
                assert_eq!(got, want, "{} stream={stream} usage={usage}", api.path());
            }
        }
    }

    #[test]
    fn completion_tokens_match_the_gateway_rule() {
        let n = 40;
        let per_chunk: u64 = (0..n)
            .map(|i| count_ollama_chunk(&json!({"message": {"content": reply_word(i)}})))
            .sum();
        assert_eq!(completion_tokens(n, false), per_chunk);
        assert_eq!(completion_tokens(n, true), per_chunk);
    }
}
