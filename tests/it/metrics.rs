//! Prometheus metrics: the exposition parses, and every documented family
//! is there after traffic.

use std::collections::HashSet;

use serde_json::json;

use crate::common::{chat, Cluster, TestApp};

const MODEL: &str = "llama3.2:latest";

async fn families(app: &TestApp) -> HashSet<String> {
    let resp = app.http.get(format!("{}/metrics", app.metrics)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    scrape.samples.iter().map(|s| s.metric.clone()).collect()
}

#[tokio::test]
async fn every_documented_family_is_exported_after_traffic() {
    let cluster = Cluster::new().await;
    let app = TestApp::spawn_with(cluster.options()).await;
    let (_, key) = app.create_key(json!({"name": "m", "daily_request_limit": 2})).await;
    // an ordinary request, a stream ended at the quota, a refused key, a quota rejection
    assert_eq!(app.post("/api/chat", &key, json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]})).send().await.unwrap().status(), 200);
    let (_, small) = app.create_key(json!({"name": "small", "daily_token_limit": llm_quota::tokens::count_chat_prompt(&chat(MODEL, "hi")) + 2})).await;
    let _ = app.post("/api/chat", &small, chat(MODEL, "hi")).send().await.unwrap().text().await;
    assert_eq!(app.post("/api/chat", "sk-wrong", chat(MODEL, "hi")).send().await.unwrap().status(), 401);
    app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap().text().await.unwrap();
    assert_eq!(app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap().status(), 429);
    app.settled().await;
    app.state.flush().await.unwrap();

    let have = families(&app).await;
    for family in [
        "llm_quota_http_requests_total",
        "llm_quota_http_request_duration_seconds",
        "llm_quota_requests_total",
        "llm_quota_request_duration_seconds",
        "llm_quota_tokens_total",
        "llm_quota_rejections_total",
        "llm_quota_streams_ended_at_quota_total",
        "llm_quota_gateway_overhead_seconds",
        "llm_quota_upstream_ttfb_seconds",
        "llm_quota_redis_script_duration_seconds",
        "llm_quota_key_cache_lookups_total",
        "llm_quota_in_flight_requests",
    ] {
        assert!(have.contains(family), "{family} missing; have {have:?}");
    }
    let text = app.http.get(format!("{}/metrics", app.metrics)).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("small") && !text.contains(&key), "key names or keys leaked into labels");
    assert!(text.contains("llm_quota_gateway_overhead_seconds_bucket{"), "latencies are histograms, not summaries");
    assert!(text.contains(r#"reason="daily_requests""#));
    assert!(text.contains(r#"reason="invalid_key""#));
    assert!(text.contains(r#"route="/api/chat""#));
}
