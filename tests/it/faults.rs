//! Upstream faults: refused, timed out, reset mid-stream, 5xx, garbage.
//! Each gets the right status in the caller's protocol; failures before any
//! output are refunded; nothing stays reserved.

use serde_json::{json, Value};

use crate::{
    common::{chat, ndjson, sse, TestApp},
    mock::Failure,
};

const MODEL: &str = "llama3.2:latest";

async fn nothing_held(app: &TestApp, id: i64) -> (u64, u64) {
    app.settled().await;
    let p = app.state.quota.periods();
    let (d, _) = llm_quota::quota::QuotaStore::usage(&app.state.quota.store, id, &p.day, &p.month).await.unwrap();
    let d = d.unwrap();
    assert_eq!(d.reserved, 0, "a reservation leaked");
    (d.net_requests(), d.tokens())
}

#[tokio::test]
async fn a_reset_mid_stream_ends_with_an_error_and_charges_what_was_delivered() {
    let app = TestApp::spawn().await;
    let (id, key) = app.key("k").await;
    app.mock.state.set_failure(Failure::ResetAfter(3));
    let lines = ndjson(&app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap().text().await.unwrap());
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines[3]["error"].as_str().unwrap().contains("upstream"), "{:?}", lines[3]);
    let events = sse(&app.post("/v1/chat/completions", &key, json!({"model": MODEL, "stream": true,
        "messages": [{"role": "user", "content": "hi"}]})).send().await.unwrap().text().await.unwrap());
    let last = events.last().unwrap();
    assert_eq!(last["error"]["type"], "api_error", "{events:?}");
    let (requests, tokens) = nothing_held(&app, id).await;
    assert_eq!(requests, 2);
    assert!(tokens > 0);
}

#[tokio::test]
async fn failures_before_any_output_are_refunded_in_every_shape() {
    let app = TestApp::spawn().await;
    let (id, key) = app.key("k").await;
    let non_stream = json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]});

    app.mock.state.set_failure(Failure::ResetAfter(0));
    let r = app.post("/api/chat", &key, non_stream.clone()).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());

    app.mock.state.set_failure(Failure::Garbage);
    let r = app.post("/v1/chat/completions", &key, chat(MODEL, "hi")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "api_error");
    let lines = ndjson(&app.post("/api/generate", &key, json!({"model": MODEL, "prompt": "x"})).send().await.unwrap().text().await.unwrap());
    assert!(lines.last().unwrap()["error"].is_string(), "a streaming client is told: {lines:?}");

    app.mock.state.set_failure(Failure::Status(503));
    let r = app.post("/api/chat", &key, non_stream.clone()).send().await.unwrap();
    assert_eq!(r.status(), 503, "an upstream 5xx passes through with its status");

    app.mock.state.set_failure(Failure::ErrorAfter(0));
    let events = sse(&app.post("/v1/chat/completions", &key, json!({"model": MODEL, "stream": true,
        "messages": [{"role": "user", "content": "hi"}]})).send().await.unwrap().text().await.unwrap());
    assert!(events.last().unwrap()["error"].is_object());

    let (requests, tokens) = nothing_held(&app, id).await;
    assert_eq!((requests, tokens), (0, 0), "every one of them was refunded");
    app.state.flush().await.unwrap();
}
