//! The proxy listener: the Ollama and OpenAI endpoints, each request
//! authenticated, admitted against the key's quota, relayed and settled.

pub mod auth;
pub mod ollama;
pub mod openai;
pub mod relay;
pub mod upstream;

use std::{
    future::Future,
    pin::{pin, Pin},
    time::{Duration, Instant},
};

use axum::{
    extract::{rejection::BytesRejection, State},
    http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::future::{self, Either, MaybeDone};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use self::relay::{Dialect, Inline, RelayJob, RequestMeta, Sink};
use crate::{
    config::FailureMode,
    metrics,
    error::{ApiError, Protocol},
    quota::{buckets::local_display, Admission, Charge, QuotaError, QuotaStatus, Reservation, Window},
    store::keys::KeyRecord,
    tokens, AppState,
};

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v1/models", get(openai_models))
        .route("/v1/quota", get(openai_quota))
        .route("/api/chat", post(ollama_chat))
        .route("/api/generate", post(ollama_generate))
        .route("/api/tags", get(ollama_tags))
        .route("/api/version", get(ollama_version))
        .route("/api/versions", get(ollama_version))
        .route("/api/quota", get(ollama_quota))
        .route("/healthz", get(crate::healthz))
        .route("/readyz", get(crate::readyz))
        .fallback(not_found)
        .with_state(state)
}

fn protocol_of(path: &str) -> Protocol {
    if path.starts_with("/v1") {
        Protocol::OpenAi
    } else {
        Protocol::Ollama
    }
}

async fn not_found(uri: Uri) -> Response {
    ApiError::not_found(format!("no route for {}", uri.path())).in_protocol(protocol_of(uri.path())).into_response()
}

async fn openai_chat(State(s): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    generation(s, Dialect::OpenAiChat, headers, body).await
}

async fn ollama_chat(State(s): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    generation(s, Dialect::OllamaChat, headers, body).await
}

async fn ollama_generate(State(s): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    generation(s, Dialect::OllamaGenerate, headers, body).await
}

async fn generation(state: AppState, dialect: Dialect, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    state.busy.touch();
    let protocol = if dialect == Dialect::OpenAiChat { Protocol::OpenAi } else { Protocol::Ollama };
    // Boxed: the request's whole state machine is kilobytes, and axum's
    // handler and service layers would copy it with every move.
    match Box::pin(generate(state, dialect, headers, body)).await {
        Ok(resp) => resp,
        Err(e) => e.in_protocol(protocol).into_response(),
    }
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rej| {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&rej);
        let mut timed_out = false;
        while let Some(c) = cause {
            timed_out |= c.is::<tower_http::timeout::TimeoutError>();
            cause = c.source();
        }
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
        } else if timed_out {
            ApiError::new(StatusCode::REQUEST_TIMEOUT, "the request body arrived too slowly")
        } else {
            ApiError::bad_request(format!("could not read the request body: {rej}"))
        }
    })
}

fn field_error(field: &str, msg: &str) -> ApiError {
    let mut e = ApiError::bad_request(format!("'{field}' {msg}"));
    e.field = Some(field.to_string());
    e
}

/// What the gateway needs from a generation request, after validation.
struct Parsed {
    body: serde_json::Map<String, Value>,
    model: String,
    client_stream: bool,
    client_wants_usage: bool,
}

fn parse_request(dialect: Dialect, bytes: &[u8], default_model: &str) -> Result<Parsed, ApiError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(mut body) = value else {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    };
    let model = match body.get("model") {
        None | Some(Value::Null) => default_model.to_string(),
        Some(Value::String(m)) if m.trim().is_empty() => default_model.to_string(),
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(field_error("model", "must be a string")),
    };
    body.insert("model".into(), Value::String(model.clone()));
    let client_stream = match body.get("stream") {
        None | Some(Value::Null) => dialect != Dialect::OpenAiChat,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(field_error("stream", "must be a boolean")),
    };
    match dialect {
        Dialect::OpenAiChat | Dialect::OllamaChat => match body.get("messages") {
            None | Some(Value::Null) if dialect == Dialect::OllamaChat => {}
            None | Some(Value::Null) => return Err(field_error("messages", "is required")),
            Some(Value::Array(ms)) => {
                if let Some(i) = ms.iter().position(|m| !m.is_object()) {
                    return Err(field_error(&format!("messages[{i}]"), "must be an object"));
                }
            }
            Some(_) => return Err(field_error("messages", "must be an array")),
        },
        Dialect::OllamaGenerate => {
            if !matches!(body.get("prompt"), None | Some(Value::Null) | Some(Value::String(_))) {
                return Err(field_error("prompt", "must be a string"));
            }
        }
    }
    if !matches!(body.get("tools"), None | Some(Value::Null) | Some(Value::Array(_))) {
        return Err(field_error("tools", "must be an array"));
    }
    let client_wants_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => o.get("include_usage").and_then(Value::as_bool).unwrap_or(false),
        Some(_) => return Err(field_error("stream_options", "must be an object")),
    };
    Ok(Parsed { body, model, client_stream, client_wants_usage })
}

/// The prompt's tokens, counted off the runtime's workers when it is big.
async fn count_prompt(dialect: Dialect, body: Value, size: usize) -> u64 {
    let count = move |body: Value| match dialect {
        Dialect::OllamaGenerate => tokens::count_generate_prompt(&body),
        _ => tokens::count_chat_prompt(&body),
    };
    if size >= tokens::BLOCKING_THRESHOLD {
        tokio::task::spawn_blocking(move || count(body)).await.expect("token counting does not panic")
    } else {
        count(body)
    }
}

async fn generate(state: AppState, dialect: Dialect, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let started = Instant::now();
    let key = auth::authenticate(&state.keys, &state.db, &headers, state.quota.now()).await?;
    let bytes = body_bytes(body)?;
    let settings = state.settings.get();
    let parsed = parse_request(dialect, &bytes, &settings.default_model)?;
    if !key.allows_model(&parsed.model) {
        return Err(ApiError::forbidden(format!("API key '{}' may not use model '{}'", key.name, parsed.model)));
    }
    let meta = RequestMeta { request_id: crate::quota::fast_id(), key_id: key.id, dialect, model: parsed.model.clone(), started };
    let size = bytes.len();
    drop(bytes);

    // The gateway always streams from the upstream, so it can meter and stop.
    let mut body = parsed.body;
    body.insert("stream".into(), Value::Bool(true));
    if dialect == Dialect::OpenAiChat {
        let opts = body.entry("stream_options").or_insert_with(|| json!({}));
        if let Value::Object(o) = opts {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    let body = Value::Object(body);
    let json = Bytes::from(serde_json::to_vec(&body).expect("a JSON object serialises"));
    let target = settings.generation_target(dialect);
    let open = state.config.quota_failure_mode == FailureMode::Open;
    let mut send = pin!(future::maybe_done(async {
        let sent = Instant::now();
        let upstream = match target {
            Ok(target) => upstream::post_json(&state.direct, &state.http, target, json, state.config.upstream_timeout).await,
            Err(url) => Err(upstream::UpstreamFailure::Unreachable(format!("not a URL: {url}"))),
        };
        metrics::upstream_ttfb(dialect).record(sent.elapsed().as_secs_f64());
        upstream
    }));
    // Whether the request may go ahead of its admission is decided on a
    // bound of its prompt's count (`tokens::prompt_bound`, no tokenising),
    // so a request sent ahead is on its way while its prompt is counted:
    // the first poll hands it to the connection's task, and the yield lets
    // that task write it.
    let ahead = state.quota.may_send_ahead(key.id, || tokens::prompt_bound(dialect == Dialect::OllamaGenerate, &body));
    let sent_at = ahead.then(|| started.elapsed());
    if ahead {
        let _ = futures_util::poll!(send.as_mut());
        tokio::task::yield_now().await;
    }
    let prompt_tokens = count_prompt(dialect, body, size).await;
    let before_upstream = sent_at.unwrap_or_else(|| started.elapsed());
    // Pinned here, and lent to `admit_and_send`: moved into it, each would
    // take room twice in this request's future (the argument, and the
    // pinned copy), and the future is copied whole when it is boxed.
    let mut admit = pin!(state.quota.admit(&state.db, key.id, key.limits, prompt_tokens));
    let goes_on = |a: &Result<Admission, QuotaError>| matches!(a, Ok(Admission::Granted(_))) || (open && a.is_err());
    let job = |meta: RequestMeta, reservation: Reservation, admission, overhead, sink| RelayJob {
        state: state.clone(),
        meta,
        reservation,
        admission,
        sink,
        client_wants_usage: parsed.client_wants_usage,
        overhead,
        _in_flight: metrics::InFlight::start(),
    };
    // A relay started before the admission came, and where its admission goes.
    let mut early = None;
    let (admission, upstream, admission_wait) = match admit_and_send(admit.as_mut(), send.as_mut(), ahead, goes_on).await {
        Sent::Both(admission, upstream, waited) => (admission, upstream, waited),
        Sent::UpstreamFirst(upstream) => {
            let answered = Instant::now();
            match upstream {
                // The relay reads the upstream's answer while the admission
                // comes (see `RelayJob::admission`).
                Ok(resp) if resp.status().is_success() => {
                    let (tx, rx) = oneshot::channel();
                    let (sink, out) = sink(parsed.client_stream);
                    let assumed = state.quota.assumed(key.id, key.limits, prompt_tokens);
                    let mut relay = Inline::new(job(meta.clone(), assumed, Some(rx), Duration::ZERO, sink).run(resp), &state.tasks);
                    let admission = relay.alongside(admit.as_mut()).await;
                    early = Some((relay, out, tx));
                    (admission, None, answered.elapsed())
                }
                failed => {
                    let admission = admit.await;
                    let upstream = goes_on(&admission).then_some(failed);
                    (admission, upstream, answered.elapsed())
                }
            }
        }
    };
    let overhead = before_upstream + admission_wait;
    let cancel_early = |early: Option<(Inline, Out, _)>| {
        if let Some((relay, _, _)) = early {
            relay.cancel();
        }
    };

    let admission = match admission {
        Ok(a) => a,
        Err(e) if open => {
            tracing::warn!(error = %e, key_id = key.id, "quota store unavailable; serving unmetered (QUOTA_FAILURE_MODE=open)");
            Admission::Granted(state.quota.unenforced(key.id, key.limits, prompt_tokens))
        }
        Err(e) => {
            cancel_early(early);
            return Err(ApiError::quota_store(e));
        }
    };
    let reservation = match admission {
        Admission::Granted(r) => r,
        Admission::Rejected(rej) => {
            cancel_early(early);
            ::metrics::counter!(metrics::REJECTIONS, "reason" => rej.limit.label()).increment(1);
            let now = state.quota.now();
            let msg = format!(
                "{} of {} reached for key '{}'; resets {}",
                rej.limit.describe(),
                rej.limit_value,
                key.name,
                local_display(rej.reset_at, state.quota.tz())
            );
            let retry = (rej.reset_at - now).num_seconds().max(1);
            state.events.record(meta.event(now, &rej.status.day_bucket, 429, (0, 0), false, "rejected"));
            let mut err = ApiError::new(StatusCode::TOO_MANY_REQUESTS, msg)
                .with_header(header::RETRY_AFTER, HeaderValue::from(retry));
            rate_limit_headers(&mut err.headers, &rej.status, now);
            return Err(err);
        }
    };
    let now = state.quota.now();
    let mut extra = HeaderMap::new();
    rate_limit_headers(&mut extra, &reservation.status, now);
    extra.insert(HeaderName::from_static("x-request-id"), HeaderValue::from_str(&meta.request_id).expect("hex id is ASCII"));
    if let Some((relay, out, admitted)) = early {
        // The relay awaits this before it hands anything on or finishes,
        // so it is there to take it.
        let _ = admitted.send((reservation, overhead));
        return respond(relay, out, extra, dialect).await;
    }
    let upstream = upstream.expect("a granted request went to the upstream");
    let fail = |r: &Reservation, status: StatusCode, refund: bool| {
        let outcome = if refund { "upstream_error" } else { "upstream_rejected" };
        state.events.record(meta.event(state.quota.now(), &r.resv.day, status.as_u16(), (0, 0), refund, outcome));
    };
    let upstream = match upstream {
        Ok(resp) => resp,
        Err(failure) => {
            let err = failure.into_error();
            settle_refund(&state, &reservation, true).await;
            fail(&reservation, err.status, true);
            return Err(err);
        }
    };
    if !upstream.status().is_success() {
        // Upstream errors pass through with their status and body. A 5xx is
        // the upstream's failure (refunded); a 4xx counts as a request.
        let status = StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
        let body = tokio::time::timeout(state.config.upstream_timeout, upstream.into_body().collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| b.to_bytes());
        let refund = status.is_server_error();
        settle_refund(&state, &reservation, refund).await;
        fail(&reservation, status, refund);
        metrics::gateway_overhead(dialect).record(overhead.as_secs_f64());
        let mut resp = (status, body.unwrap_or_default()).into_response();
        if let Some(ct) = content_type {
            resp.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        rate_limit_headers(resp.headers_mut(), &reservation.status, now);
        return Ok(resp);
    }

    let (sink, out) = sink(parsed.client_stream);
    let relay = Inline::new(job(meta, reservation, None, overhead, sink).run(upstream), &state.tasks);
    respond(relay, out, extra, dialect).await
}

/// Where a relay's output goes, as the handler takes it.
enum Out {
    Stream(mpsc::Receiver<Result<Bytes, std::io::Error>>),
    Whole(oneshot::Receiver<Result<relay::Answer, ApiError>>),
}

fn sink(client_stream: bool) -> (Sink, Out) {
    if client_stream {
        let (tx, rx) = mpsc::channel(16);
        (Sink::Stream(tx), Out::Stream(rx))
    } else {
        let (tx, rx) = oneshot::channel();
        (Sink::Whole(tx), Out::Whole(rx))
    }
}

/// The client's response, from the relay: a streaming body, or the
/// non-stream answer once the relay has it.
async fn respond(relay: Inline, out: Out, extra: HeaderMap, dialect: Dialect) -> Result<Response, ApiError> {
    let mut resp = match out {
        Out::Stream(rx) => {
            let content_type = if dialect == Dialect::OpenAiChat { "text/event-stream" } else { "application/x-ndjson" };
            let mut resp = Response::new(relay.body(rx));
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
            resp
        }
        Out::Whole(rx) => match relay.answer(rx).await.map_err(|_| ApiError::internal("the relay ended without an answer"))? {
            Ok(answer) => answer.into_response(),
            Err(e) => {
                let protocol = if dialect == Dialect::OpenAiChat { Protocol::OpenAi } else { Protocol::Ollama };
                e.in_protocol(protocol).into_response()
            }
        },
    };
    resp.headers_mut().extend(extra);
    Ok(resp)
}

/// What `admit_and_send` brings back.
enum Sent<A, U> {
    /// The admission, the upstream's answer if the admission let the
    /// request through, and how long the request waited on the admission
    /// alone.
    Both(A, Option<U>, Duration),
    /// The upstream's answer: it came first, and the admission is still on
    /// its way.
    UpstreamFirst(U),
}

/// Runs the admission, and the upstream request once the admission lets
/// it through (`goes_on`). With `ahead`, the upstream request has started
/// already (see `generate`) and goes on alongside the admission (one store
/// round trip off the client's time); it is dropped, which cancels it, if
/// the admission refuses: nothing of it reaches the client or the key's
/// usage before the admission is in.
async fn admit_and_send<A: Future, U: Future>(
    admit: Pin<&mut A>,
    mut send: Pin<&mut MaybeDone<U>>,
    ahead: bool,
    goes_on: impl Fn(&A::Output) -> bool,
) -> Sent<A::Output, U::Output> {
    let started = Instant::now();
    let take = |send: Pin<&mut MaybeDone<U>>| send.take_output().expect("the upstream request was awaited");
    if !ahead {
        let admission = admit.await;
        let waited = started.elapsed();
        let upstream = if goes_on(&admission) {
            send.as_mut().await;
            Some(take(send))
        } else {
            None
        };
        return Sent::Both(admission, upstream, waited);
    }
    match future::select(admit, send.as_mut()).await {
        Either::Left((admission, _)) => {
            let upstream = if goes_on(&admission) {
                send.as_mut().await;
                Some(take(send))
            } else {
                None
            };
            Sent::Both(admission, upstream, Duration::ZERO)
        }
        Either::Right(((), _)) => Sent::UpstreamFirst(take(send)),
    }
}

async fn settle_refund(state: &AppState, r: &Reservation, refund: bool) {
    let charge = Charge { prompt_tokens: 0, completion_tokens: 0, refund_request: refund };
    if let Err(e) = state.quota.settle(r, charge).await {
        tracing::error!(error = %e, "settle failed");
    }
}

/// `6h12m5s`, the way OpenAI writes `x-ratelimit-reset-*`.
pub fn reset_in(now: DateTime<Utc>, at: DateTime<Utc>) -> String {
    let secs = (at - now).num_seconds().max(0);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// The names of OpenAI's `x-ratelimit-*` headers (limit, remaining, reset)
/// for the request and token windows; made at compile time.
const REQUEST_WINDOW: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
const TOKEN_WINDOW: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

/// OpenAI's `x-ratelimit-*` headers for the tightest request and token windows.
pub fn rate_limit_headers(h: &mut HeaderMap, status: &QuotaStatus, now: DateTime<Utc>) {
    let mut put = |[limit, remaining, reset]: [HeaderName; 3], w: Option<Window>| {
        let Some(w) = w else { return };
        h.insert(limit, HeaderValue::from(w.limit));
        h.insert(remaining, HeaderValue::from(w.remaining));
        if let Ok(v) = HeaderValue::try_from(reset_in(now, w.reset_at)) {
            h.insert(reset, v);
        }
    };
    put(REQUEST_WINDOW, status.requests_window());
    put(TOKEN_WINDOW, status.tokens_window());
}

async fn passthrough(state: &AppState, headers: &HeaderMap, path: &str, protocol: Protocol) -> Response {
    let result = async {
        auth::authenticate(&state.keys, &state.db, headers, state.quota.now()).await?;
        let base = state.settings.get().ollama_url.clone();
        let (status, body) =
            upstream::get_json(&state.http, &base, path, state.config.upstream_timeout).await.map_err(|f| f.into_error())?;
        Ok::<_, ApiError>((status, Json(body)).into_response())
    }
    .await;
    result.unwrap_or_else(|e| e.in_protocol(protocol).into_response())
}

async fn openai_models(State(s): State<AppState>, headers: HeaderMap) -> Response {
    passthrough(&s, &headers, "/v1/models", Protocol::OpenAi).await
}

async fn ollama_tags(State(s): State<AppState>, headers: HeaderMap) -> Response {
    passthrough(&s, &headers, "/api/tags", Protocol::Ollama).await
}

async fn ollama_version(State(s): State<AppState>, headers: HeaderMap) -> Response {
    passthrough(&s, &headers, "/api/version", Protocol::Ollama).await
}

async fn openai_quota(State(s): State<AppState>, headers: HeaderMap) -> Response {
    quota_report(&s, &headers).await.unwrap_or_else(|e| e.in_protocol(Protocol::OpenAi).into_response())
}

async fn ollama_quota(State(s): State<AppState>, headers: HeaderMap) -> Response {
    quota_report(&s, &headers).await.unwrap_or_else(|e| e.in_protocol(Protocol::Ollama).into_response())
}

/// `GET /v1/quota`: the caller's limits, usage and resets in both windows.
async fn quota_report(state: &AppState, headers: &HeaderMap) -> Result<Response, ApiError> {
    let key = auth::authenticate(&state.keys, &state.db, headers, state.quota.now()).await?;
    let status = state
        .quota
        .status_of(&state.db, key.id, key.limits)
        .await
        .map_err(ApiError::quota_store)?;
    let mut resp = Json(quota_json(&key, &status, state.quota.tz())).into_response();
    rate_limit_headers(resp.headers_mut(), &status, state.quota.now());
    Ok(resp)
}

pub fn quota_json(key: &KeyRecord, s: &QuotaStatus, tz: chrono_tz::Tz) -> Value {
    let window = |period: &str, since: DateTime<Utc>, resets: DateTime<Utc>, u: &crate::quota::Usage, rl: Option<u64>, tl: Option<u64>| {
        json!({
            "period": period,
            "since": since,
            "resets_at": resets,
            "resets_at_local": local_display(resets, tz),
            "requests": {"limit": rl, "used": u.net_requests(), "remaining": rl.map(|l| l.saturating_sub(u.net_requests()))},
            "tokens": {
                "limit": tl,
                "used": u.tokens(),
                "prompt": u.prompt_tokens,
                "completion": u.completion_tokens,
                "reserved": u.reserved,
                "remaining": tl.map(|l| l.saturating_sub(u.committed_tokens())),
            },
        })
    };
    let l = &s.limits;
    json!({
        "key": {"id": key.id, "name": key.name, "key_prefix": key.key_prefix, "expires_at": key.expires_at},
        "timezone": tz.name(),
        "daily": window(&s.day_bucket, s.day_start, s.day_reset, &s.day, l.daily_requests, l.daily_tokens),
        "monthly": window(&s.month_bucket, s.month_start, s.month_reset, &s.month, l.monthly_requests, l.monthly_tokens),
    })
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "\\PC{0,20}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::hash_map(
                    prop_oneof![Just("model".to_string()), Just("messages".to_string()), Just("stream".to_string()),
                        Just("prompt".to_string()), Just("tools".to_string()), Just("stream_options".to_string()), "[a-z]{1,8}"],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Any body is either accepted with a model and a stream flag, or a
        /// 4xx; never a panic.
        #[test]
        fn request_parsing_never_panics(body in json_value(), raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            for dialect in [Dialect::OpenAiChat, Dialect::OllamaChat, Dialect::OllamaGenerate] {
                match parse_request(dialect, body.to_string().as_bytes(), "default") {
                    Ok(p) => {
                        prop_assert!(!p.model.is_empty());
                        prop_assert_eq!(p.body.get("model").and_then(Value::as_str), Some(p.model.as_str()));
                    }
                    Err(e) => prop_assert!(e.status.is_client_error()),
                }
                if let Err(e) = parse_request(dialect, &raw, "default") {
                    prop_assert!(e.status.is_client_error());
                }
            }
        }
    }
}
