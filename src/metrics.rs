//! Metric names in one place, the Prometheus recorder, and label hygiene:
//! labels are routes, statuses, limits, outcomes and model names, never key
//! names or raw paths; model names are capped at `MAX_MODELS` distinct
//! values (the rest are `other`).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, OnceLock},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::{IntoResponse, Response},
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::proxy::relay::Dialect;

/// Every HTTP request by listener, route template and status.
pub const HTTP_REQUESTS: &str = "llm_quota_http_requests_total";
/// Wall time of every HTTP request (streams: until the headers are sent).
pub const HTTP_DURATION: &str = "llm_quota_http_request_duration_seconds";
/// Completion requests by route, status and model (one per usage event).
pub const REQUESTS: &str = "llm_quota_requests_total";
/// Completion request duration, to the last byte, by route.
pub const REQUEST_DURATION: &str = "llm_quota_request_duration_seconds";
/// Tokens charged, by model and kind (`prompt`, `completion`).
pub const TOKENS: &str = "llm_quota_tokens_total";
/// Refused requests by reason: `daily_tokens`, `daily_requests`,
/// `monthly_tokens`, `monthly_requests`, `invalid_key`, `inactive`, `expired`.
pub const REJECTIONS: &str = "llm_quota_rejections_total";
/// Completions the gateway ended because the key's quota ran out, by route.
pub const STREAMS_ENDED_AT_QUOTA: &str = "llm_quota_streams_ended_at_quota_total";
/// Time spent in the gateway itself (auth, parsing, counting, admission,
/// settlement), excluding the upstream, by route.
pub const GATEWAY_OVERHEAD: &str = "llm_quota_gateway_overhead_seconds";
/// Upstream time to response headers, by route.
pub const UPSTREAM_TTFB: &str = "llm_quota_upstream_ttfb_seconds";
/// Redis script latency and errors, by script.
pub const REDIS_SCRIPT_DURATION: &str = "llm_quota_redis_script_duration_seconds";
pub const REDIS_ERRORS: &str = "llm_quota_redis_errors_total";
/// Seconds since the last successful flush, and failed flushes.
pub const FLUSH_LAG: &str = "llm_quota_flush_lag_seconds";
pub const FLUSH_FAILURES: &str = "llm_quota_flush_failures_total";
/// Key-cache lookups by result (`hit`, `miss`).
pub const KEY_CACHE: &str = "llm_quota_key_cache_lookups_total";
/// Completion requests being served right now.
pub const IN_FLIGHT: &str = "llm_quota_in_flight_requests";

pub const MAX_MODELS: usize = 64;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder (installed once; every app in the process shares it).
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let latency = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .expect("static buckets are valid");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may exist (embedding); then ours just renders nothing new.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(HTTP_REQUESTS, "HTTP requests by listener, route and status");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "HTTP request time to response headers");
    describe_counter!(REQUESTS, "Completion requests by route, status and model");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "Completion request duration to the last byte");
    describe_counter!(TOKENS, "Tokens charged by model and kind");
    describe_counter!(REJECTIONS, "Refused requests by reason");
    describe_counter!(STREAMS_ENDED_AT_QUOTA, "Completions ended by the gateway at the key's quota");
    describe_histogram!(GATEWAY_OVERHEAD, Unit::Seconds, "Time in the gateway excluding the upstream");
    describe_histogram!(UPSTREAM_TTFB, Unit::Seconds, "Upstream time to response headers");
    describe_histogram!(REDIS_SCRIPT_DURATION, Unit::Seconds, "Redis script latency");
    describe_counter!(REDIS_ERRORS, "Redis script errors");
    describe_gauge!(FLUSH_LAG, Unit::Seconds, "Seconds since the last successful flush");
    describe_counter!(FLUSH_FAILURES, "Failed flushes");
    describe_counter!(KEY_CACHE, "Key cache lookups by result");
    describe_gauge!(IN_FLIGHT, "Completion requests in flight");
}

/// The model as a label: known (first `MAX_MODELS` seen) or `other`.
fn model_label(model: &str) -> String {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    let Ok(mut seen) = seen.lock() else { return "other".into() };
    if seen.contains(model) {
        return model.to_string();
    }
    if seen.len() < MAX_MODELS && model.len() <= 100 {
        seen.insert(model.to_string());
        return model.to_string();
    }
    "other".into()
}

/// One completion request's metrics for a route, status and model,
/// registered once (`cached`). Registering finds the metric in the
/// recorder's registry (building its key, hashing and comparing the
/// labels); done for every request, it cost about 6 k instructions.
pub struct RequestMetrics {
    pub requests: metrics::Counter,
    pub duration: metrics::Histogram,
    model: String,
    prompt_tokens: OnceLock<metrics::Counter>,
    completion_tokens: OnceLock<metrics::Counter>,
}

impl RequestMetrics {
    /// Registered when first used: a series appears once it has tokens.
    pub fn prompt_tokens(&self) -> &metrics::Counter {
        self.prompt_tokens.get_or_init(|| metrics::counter!(TOKENS, "model" => self.model.clone(), "kind" => "prompt"))
    }

    pub fn completion_tokens(&self) -> &metrics::Counter {
        self.completion_tokens.get_or_init(|| metrics::counter!(TOKENS, "model" => self.model.clone(), "kind" => "completion"))
    }
}

/// How many label sets a cache keeps; past that, the metrics are
/// registered for every request, as before.
const MAX_CACHED: usize = 1024;

/// Handles by two string labels and a status, and how many there are.
type Entries<V> = (usize, HashMap<String, Vec<(String, u16, Arc<V>)>>);
type Cache<V> = Mutex<Entries<V>>;

/// The handles for `(a, b, status)`, registered by `register` the first time.
fn cached<V>(cache: &Cache<V>, a: &str, b: &str, status: u16, register: impl FnOnce() -> V) -> Arc<V> {
    let find = |c: &Entries<V>| {
        c.1.get(a)?.iter().find(|(kb, ks, _)| kb == b && *ks == status).map(|(_, _, v)| v.clone())
    };
    if let Some(v) = cache.lock().ok().and_then(|c| find(&c)) {
        return v;
    }
    let v = Arc::new(register());
    if let Ok(mut c) = cache.lock() {
        if c.0 < MAX_CACHED && find(&c).is_none() {
            c.0 += 1;
            c.1.entry(a.to_string()).or_default().push((b.to_string(), status, v.clone()));
        }
    }
    v
}

/// The metrics of completion requests with this route, status and model.
pub fn request_metrics(route: &str, status: u16, model: &str) -> Arc<RequestMetrics> {
    static CACHE: OnceLock<Cache<RequestMetrics>> = OnceLock::new();
    cached(CACHE.get_or_init(Default::default), model, route, status, || {
        let model = model_label(model);
        RequestMetrics {
            requests: metrics::counter!(REQUESTS, "route" => route.to_string(), "status" => status.to_string(), "model" => model.clone()),
            duration: metrics::histogram!(REQUEST_DURATION, "route" => route.to_string()),
            model,
            prompt_tokens: OnceLock::new(),
            completion_tokens: OnceLock::new(),
        }
    })
}

struct HttpMetrics {
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

/// Counts every request by route template (never the raw path) and status.
pub async fn track_http(listener: &'static str, req: Request, next: Next) -> Response {
    static CACHE: OnceLock<Cache<HttpMetrics>> = OnceLock::new();
    // A clone of the matched path shares its text (no copy per request).
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let m = cached(CACHE.get_or_init(Default::default), route, listener, status, || HttpMetrics {
        requests: metrics::counter!(HTTP_REQUESTS, "listener" => listener, "route" => route.to_string(), "status" => status.to_string()),
        duration: metrics::histogram!(HTTP_DURATION, "listener" => listener, "route" => route.to_string()),
    });
    m.requests.increment(1);
    m.duration.record(started.elapsed().as_secs_f64());
    resp
}

/// `GET /metrics`
pub async fn render() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle().render())
}

/// The label-free or per-route metrics every completion request touches,
/// registered once (each registration finds the metric in the recorder's
/// registry: some 400 instructions, five times a request).
struct Hot {
    key_cache_hits: metrics::Counter,
    in_flight: metrics::Gauge,
    /// By dialect (`Dialect as usize`).
    overhead: [metrics::Histogram; Dialect::ALL.len()],
    upstream_ttfb: [metrics::Histogram; Dialect::ALL.len()],
}

fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| {
        // Registered with our recorder, installed first if it is not yet.
        handle();
        Hot {
            key_cache_hits: metrics::counter!(KEY_CACHE, "result" => "hit"),
            in_flight: metrics::gauge!(IN_FLIGHT),
            overhead: Dialect::ALL.map(|d| metrics::histogram!(GATEWAY_OVERHEAD, "route" => d.route())),
            upstream_ttfb: Dialect::ALL.map(|d| metrics::histogram!(UPSTREAM_TTFB, "route" => d.route())),
        }
    })
}

/// A key found fresh in the key cache.
pub fn key_cache_hit() {
    hot().key_cache_hits.increment(1);
}

/// The gateway's own time on a completion request of `dialect`.
pub fn gateway_overhead(dialect: Dialect) -> &'static metrics::Histogram {
    &hot().overhead[dialect as usize]
}

/// The upstream's time to response headers, for `dialect`.
pub fn upstream_ttfb(dialect: Dialect) -> &'static metrics::Histogram {
    &hot().upstream_ttfb[dialect as usize]
}

/// Decrements the in-flight gauge when the request is over, however it ends.
pub struct InFlight;

impl InFlight {
    pub fn start() -> InFlight {
        hot().in_flight.increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        hot().in_flight.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_metrics_are_registered_once_and_count_what_each_request_adds() {
        let rendered = handle();
        let a = request_metrics("/test/route", 299, "metrics-cache-test");
        let b = request_metrics("/test/route", 299, "metrics-cache-test");
        assert!(Arc::ptr_eq(&a, &b), "the second request reuses the handles");
        let other = request_metrics("/test/route", 298, "metrics-cache-test");
        assert!(!Arc::ptr_eq(&a, &other), "another status has its own");
        a.requests.increment(1);
        b.requests.increment(1);
        other.requests.increment(1);
        a.prompt_tokens().increment(5);
        b.prompt_tokens().increment(2);
        let text = rendered.render();
        assert!(text.contains(r#"llm_quota_requests_total{route="/test/route",status="299",model="metrics-cache-test"} 2"#), "{text}");
        assert!(text.contains(r#"llm_quota_requests_total{route="/test/route",status="298",model="metrics-cache-test"} 1"#), "{text}");
        assert!(text.contains(r#"llm_quota_tokens_total{model="metrics-cache-test",kind="prompt"} 7"#), "{text}");
        assert!(!text.contains(r#"model="metrics-cache-test",kind="completion""#), "no completion tokens, no series: {text}");
    }
}
