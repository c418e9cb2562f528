//! The proxy listener: every endpoint, every auth outcome, streaming,
//! cancellation, upstream failures and usage counting.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::{
    common::{chat, eventually, ndjson, refused_url, sse, Options, TestApp},
    mock::{reply_text, reply_word, Failure},
};

const MODEL: &str = "llama3.2:latest";

async fn status_and_json(resp: reqwest::Response) -> (u16, Value) {
    let s = resp.status().as_u16();
    (s, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn missing_and_unknown_keys_get_401_in_each_protocol_and_never_reach_upstream() {
    let app = TestApp::spawn().await;
    let no_key = app.http.post(format!("{}/v1/chat/completions", app.proxy)).json(&chat(MODEL, "hi")).send().await.unwrap();
    let (s, v) = status_and_json(no_key).await;
    assert_eq!(s, 401);
    assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("missing API key"));

    let (s, v) = status_and_json(app.post("/api/chat", "sk-nope", chat(MODEL, "hi")).send().await.unwrap()).await;
    assert_eq!(s, 401);
    assert_eq!(v, json!({"error": "invalid API key"}));

    for path in ["/api/tags", "/api/version", "/v1/models", "/v1/quota"] {
        let s = app.get(path, "sk-nope").send().await.unwrap().status().as_u16();
        assert_eq!(s, 401, "{path}");
    }
    assert_eq!(app.mock.state.requests(), 0, "a rejected request reached the upstream");
}

#[tokio::test]
async fn inactive_and_expired_keys_get_403() {
    let app = TestApp::spawn().await;
    let (id, key) = app.key("team-a").await;
    let (s, _) = app.admin_json(reqwest::Method::PUT, &format!("/api/api-keys/{id}/deactivate"), None).await;
    assert_eq!(s, 200);
    let (s, v) = status_and_json(app.post("/v1/chat/completions", &key, chat(MODEL, "hi")).send().await.unwrap()).await;
    assert_eq!(s, 403);
    assert_eq!(v["error"]["message"], "API key 'team-a' is deactivated");
    assert_eq!(v["error"]["type"], "permission_error");

    let (_, expired) = app.create_key(json!({"name": "old", "expires_at": "2020-01-01T00:00:00Z"})).await;
    let (s, v) = status_and_json(app.post("/api/generate", &expired, json!({"model": MODEL, "prompt": "x"})).send().await.unwrap()).await;
    assert_eq!(s, 403);
    assert_eq!(v, json!({"error": "API key 'old' has expired"}));

    // reactivated, the key works again at once (the cache was cleared)
    app.admin_json(reqwest::Method::PUT, &format!("/api/api-keys/{id}/activate"), None).await;
    let s = app.post("/v1/chat/completions", &key, chat(MODEL, "hi")).send().await.unwrap().status();
    assert_eq!(s, 200);
    assert_eq!(app.mock.state.requests(), 1);
}

#[tokio::test]
async fn x_api_key_header_is_accepted() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    let resp = app.http.get(format!("{}/api/tags", app.proxy)).header("x-api-key", &key).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn openai_non_stream_answer_has_the_upstream_shape_and_usage() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    let (s, v) = status_and_json(app.post("/v1/chat/completions", &key, chat(MODEL, "Say hello")).send().await.unwrap()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["content"], reply_text(12));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // the gateway asked the upstream for a stream with usage
    let sent = app.mock.state.last_body().unwrap();
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn openai_stream_strips_the_usage_chunk_unless_asked() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    let mut body = chat(MODEL, "hi");
    body["stream"] = json!(true);
    let resp = app.post("/v1/chat/completions", &key, body.clone()).send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(events.iter().all(|e| e.get("choices").is_none_or(|c| !c.as_array().unwrap().is_empty())), "usage chunk leaked: {events:?}");
    let text: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, reply_text(12));

    body["stream_options"] = json!({"include_usage": true});
    let events = sse(&app.post("/v1/chat/completions", &key, body).send().await.unwrap().text().await.unwrap());
    let usage = &events[events.len() - 2];
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn openai_tool_calls_pass_through_in_both_modes() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}}}}]);
    let mut body = chat(MODEL, "Weather in Tokyo?");
    body["tools"] = tools;
    body["tool_choice"] = json!("auto");
    let (_, v) = status_and_json(app.post("/v1/chat/completions", &key, body.clone()).send().await.unwrap()).await;
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap(), json!({"city": "Tokyo"}));
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(app.mock.state.last_body().unwrap()["tool_choice"], "auto", "tool_choice forwarded");

    body["stream"] = json!(true);
    let events = sse(&app.post("/v1/chat/completions", &key, body).send().await.unwrap().text().await.unwrap());
    let args: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&args).unwrap(), json!({"city": "Tokyo"}));
}

#[tokio::test]
async fn ollama_chat_streams_ndjson_and_assembles_non_stream() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    let resp = app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let lines = ndjson(&resp.text().await.unwrap());
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert!(last["eval_count"].as_u64().unwrap() > 0 && last["prompt_eval_count"].as_u64().unwrap() > 0);
    let text: String = lines.iter().filter_map(|l| l["message"]["content"].as_str()).collect();
    assert_eq!(text, reply_text(12));

    let mut body = chat(MODEL, "hi");
    body["stream"] = json!(false);
    let (s, v) = status_and_json(app.post("/api/chat", &key, body).send().await.unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(v["message"]["content"], reply_text(12));
    assert_eq!(v["message"]["role"], "assistant");
    assert_eq!(v["done"], true);
    assert!(v["total_duration"].as_u64().is_some());
    assert_eq!(v["eval_count"], last["eval_count"]);
}

/// A finished completion leaves its upstream connection in the pool: the
/// relay reads the body's end (which the mock, like Ollama, sends in a
/// write of its own) instead of dropping the body one read short of it.
#[tokio::test]
async fn finished_completions_reuse_the_upstream_connection() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    let messages = json!([{"role": "user", "content": "hi"}]);
    for (path, body) in [
        ("/api/chat", json!({"model": MODEL, "messages": messages})),
        ("/api/chat", json!({"model": MODEL, "messages": messages, "stream": false})),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": messages, "stream": true})),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": messages})),
        ("/api/generate", json!({"model": MODEL, "prompt": "hi"})),
    ] {
        let resp = app.post(path, &key, body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        resp.bytes().await.unwrap();
        app.settled().await;
    }
    assert_eq!(app.mock.state.requests(), 5);
    assert_eq!(app.mock.state.connections(), 1, "one upstream connection for five completions");
}

#[tokio::test]
async fn ollama_tool_call_arguments_stay_objects() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    let mut body = chat(MODEL, "Weather?");
    body["tools"] = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]);
    body["stream"] = json!(false);
    let (_, v) = status_and_json(app.post("/api/chat", &key, body).send().await.unwrap()).await;
    assert_eq!(v["message"]["tool_calls"][0]["function"]["arguments"], json!({"city": "Tokyo"}));
}

#[tokio::test]
async fn ollama_generate_both_modes() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    let lines = ndjson(&app.post("/api/generate", &key, json!({"model": MODEL, "prompt": "Hi"})).send().await.unwrap().text().await.unwrap());
    let text: String = lines.iter().filter_map(|l| l["response"].as_str()).collect();
    assert_eq!(text, reply_text(12));
    let (s, v) = status_and_json(app.post("/api/generate", &key, json!({"model": MODEL, "prompt": "Hi", "stream": false})).send().await.unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(v["response"], reply_text(12));
    assert_eq!(v["context"], json!([1, 2, 3]), "final fields of the upstream kept");
}

#[tokio::test]
async fn metadata_endpoints_pass_through() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    let (s, tags) = status_and_json(app.get("/api/tags", &key).send().await.unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(tags["models"][0]["name"], "llama3.2:latest");
    for path in ["/api/version", "/api/versions"] {
        let (s, v) = status_and_json(app.get(path, &key).send().await.unwrap()).await;
        assert_eq!((s, v), (200, json!({"version": "0.12.3"})), "{path}");
    }
    let (s, models) = status_and_json(app.get("/v1/models", &key).send().await.unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "llama3.2:latest");
}

#[tokio::test]
async fn missing_model_takes_the_default_from_settings() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    app.admin_json(reqwest::Method::PUT, "/api/settings", Some(json!({"default_model": "qwen3:8b"}))).await;
    let s = app.post("/api/generate", &key, json!({"prompt": "Hi", "stream": false})).send().await.unwrap().status();
    assert_eq!(s, 200);
    assert_eq!(app.mock.state.last_body().unwrap()["model"], "qwen3:8b");
}

#[tokio::test]
async fn malformed_requests_get_400_in_protocol_and_never_reach_upstream() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    let raw = |path: &str, body: &'static str| {
        app.http.post(format!("{}{path}", app.proxy)).bearer_auth(&key).header("content-type", "application/json").body(body)
    };
    let (s, v) = status_and_json(raw("/v1/chat/completions", "{not json").send().await.unwrap()).await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (s, v) = status_and_json(raw("/api/chat", "[1,2]").send().await.unwrap()).await;
    assert_eq!(s, 400);
    assert_eq!(v["error"], "request body must be a JSON object");
    let (s, v) = status_and_json(raw("/v1/chat/completions", r#"{"model": 5, "messages": []}"#).send().await.unwrap()).await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "model");
    let (s, v) = status_and_json(raw("/v1/chat/completions", r#"{"model": "m"}"#).send().await.unwrap()).await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("messages")));
    let (s, v) = status_and_json(raw("/api/generate", r#"{"prompt": 7}"#).send().await.unwrap()).await;
    assert_eq!((s, v["error"].as_str()), (400, Some("'prompt' must be a string")));
    let (s, _) = status_and_json(raw("/api/chat", r#"{"messages": [], "stream": "yes"}"#).send().await.unwrap()).await;
    assert_eq!(s, 400);
    assert_eq!(app.mock.state.requests(), 0);
}

#[tokio::test]
async fn huge_bodies_get_413_in_protocol() {
    let app = TestApp::spawn_with(Options::default().env("MAX_BODY_BYTES", "1024")).await;
    let (_, key) = app.key("k").await;
    let big = "x".repeat(4096);
    let (s, v) = status_and_json(app.post("/v1/chat/completions", &key, chat(MODEL, &big)).send().await.unwrap()).await;
    assert_eq!(s, 413);
    assert_eq!(v["error"]["code"], "request_too_large");
    let (s, v) = status_and_json(app.post("/api/chat", &key, chat(MODEL, &big)).send().await.unwrap()).await;
    assert_eq!(s, 413);
    assert!(v["error"].is_string());
}

#[tokio::test]
async fn streams_are_relayed_as_they_arrive_not_buffered() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    app.mock.state.set_chunk_delay(Duration::from_millis(150));
    let resp = app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap();
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    let line: Value = serde_json::from_slice(first.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(line["message"]["content"], "Hello");
    assert_eq!(app.mock.state.completed_streams(), 0, "the first chunk arrived only after the upstream had finished");
    while body.next().await.is_some() {}
    app.mock.state.wait_for_completed(1).await;
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_and_is_charged_for_what_was_produced() {
    let app = TestApp::spawn().await;
    let (id, key) = app.key("k").await;
    app.mock.state.set_chunk_delay(Duration::from_millis(100));
    app.mock.state.set_reply_tokens(200);
    let resp = app.post("/v1/chat/completions", &key, json!({"model": MODEL, "stream": true,
        "messages": [{"role": "user", "content": "long"}]})).send().await.unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    app.mock.state.wait_for_cancelled(1).await;
    assert_eq!(app.mock.state.completed_streams(), 0);
    app.settled().await;
    let info = app.key_info(id).await;
    assert_eq!(info["requests_today"], 1);
    let used = info["tokens_used_today"].as_u64().unwrap();
    assert!(used > 0 && used < 200, "charged {used} tokens for a stream cut short");
}

/// The relay of a non-stream request runs inside its handler; a client that
/// hangs up before the answer drops the handler, and the relay must go on
/// without it: see the client gone, cancel the upstream and settle.
#[tokio::test]
async fn a_non_stream_client_that_hangs_up_is_charged_for_what_was_produced() {
    let app = TestApp::spawn().await;
    let (id, key) = app.key("k").await;
    app.mock.state.set_chunk_delay(Duration::from_millis(50));
    app.mock.state.set_reply_tokens(200);
    for (i, path) in ["/v1/chat/completions", "/api/chat"].into_iter().enumerate() {
        let mut body = chat(MODEL, "long");
        body["stream"] = json!(false);
        let sent = app.post(path, &key, body).timeout(Duration::from_millis(400)).send().await;
        assert!(sent.unwrap_err().is_timeout(), "the answer takes 10 s");
        app.mock.state.wait_for_cancelled(i + 1).await;
    }
    assert_eq!(app.mock.state.completed_streams(), 0);
    app.settled().await;
    let info = app.key_info(id).await;
    assert_eq!(info["requests_today"], 2);
    let used = info["tokens_used_today"].as_u64().unwrap();
    assert!(used > 2 && used < 400, "charged {used} tokens for two answers cut short");
}

#[tokio::test]
async fn upstream_unreachable_is_502_and_refunded() {
    let app = TestApp::spawn().await;
    let (id, key) = app.key("k").await;
    app.admin_json(reqwest::Method::PUT, "/api/settings", Some(json!({"ollama_url": refused_url()}))).await;
    let (s, v) = status_and_json(app.post("/v1/chat/completions", &key, chat(MODEL, "hi")).send().await.unwrap()).await;
    assert_eq!(s, 502);
    assert_eq!(v["error"]["type"], "api_error");
    let (s, v) = status_and_json(app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap()).await;
    assert_eq!((s, v), (502, json!({"error": "upstream unreachable"})));
    let info = app.key_info(id).await;
    assert_eq!((info["requests_today"].as_u64(), info["tokens_used_today"].as_u64()), (Some(0), Some(0)));
}

#[tokio::test]
async fn upstream_timeout_is_504_and_refunded() {
    let app = TestApp::spawn_with(Options::default().env("UPSTREAM_TIMEOUT", "300ms")).await;
    let (id, key) = app.key("k").await;
    app.mock.state.set_header_delay(Duration::from_secs(5));
    let (s, v) = status_and_json(app.post("/api/generate", &key, json!({"model": MODEL, "prompt": "x"})).send().await.unwrap()).await;
    assert_eq!((s, v), (504, json!({"error": "upstream timed out"})));
    assert_eq!(app.key_info(id).await["requests_today"], 0);
}

#[tokio::test]
async fn upstream_errors_pass_through_with_status_and_body() {
    let app = TestApp::spawn().await;
    let (id, key) = app.key("k").await;
    let (s, v) = status_and_json(app.post("/api/chat", &key, chat("missing", "hi")).send().await.unwrap()).await;
    assert_eq!((s, v), (404, json!({"error": "model 'missing' not found"})));
    let (s, v) = status_and_json(app.post("/v1/chat/completions", &key, chat("missing", "hi")).send().await.unwrap()).await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["type"], "not_found_error");
    // a 4xx counts as a request, with no tokens
    let info = app.key_info(id).await;
    assert_eq!((info["requests_today"].as_u64(), info["tokens_used_today"].as_u64()), (Some(2), Some(0)));

    app.mock.state.set_failure(Failure::Status(500));
    let (s, _) = status_and_json(app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap()).await;
    assert_eq!(s, 500);
    assert_eq!(app.key_info(id).await["requests_today"], 2, "a 5xx is refunded");
}

#[tokio::test]
async fn an_error_mid_stream_is_passed_on_and_charged_for_what_was_delivered() {
    let app = TestApp::spawn().await;
    let (id, key) = app.key("k").await;
    app.mock.state.set_failure(Failure::ErrorAfter(3));
    let lines = ndjson(&app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap().text().await.unwrap());
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines[3]["error"].is_string());
    app.settled().await;
    let info = app.key_info(id).await;
    assert_eq!(info["requests_today"], 1);
    assert!(info["tokens_used_today"].as_u64().unwrap() > 0);

    // before any output: refunded, and a non-stream client gets a 502 in its protocol
    app.mock.state.set_failure(Failure::ErrorAfter(0));
    let (s, v) = status_and_json(app.post("/v1/chat/completions", &key, chat(MODEL, "hi")).send().await.unwrap()).await;
    assert_eq!(s, 502);
    assert_eq!(v["error"]["type"], "api_error");
    assert_eq!(app.key_info(id).await["requests_today"], 1);
}

#[tokio::test]
async fn a_quiet_upstream_is_cut_off_at_the_idle_limit_and_a_slow_steady_one_is_not() {
    let app = TestApp::spawn_with(Options::default().env("UPSTREAM_IDLE_TIMEOUT", "500ms")).await;
    let (id, key) = app.key("k").await;

    // 8 gaps of 100 ms: the stream outlasts the limit, but no gap reaches it
    app.mock.state.set_reply_tokens(8);
    app.mock.state.set_chunk_delay(Duration::from_millis(100));
    let lines = ndjson(&app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap().text().await.unwrap());
    assert_eq!(lines.len(), 9, "{lines:?}");
    assert_eq!(lines[8]["done"], true);
    assert!(lines.iter().all(|l| l.get("error").is_none()), "{lines:?}");

    // a gap past the limit: the stream ends with an error line after the first chunk
    app.mock.state.set_chunk_delay(Duration::from_secs(3));
    let lines = ndjson(&app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap().text().await.unwrap());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["message"]["content"], reply_word(0));
    assert!(lines[1]["error"].as_str().unwrap().contains("upstream sent nothing for 500ms"), "{lines:?}");
    app.mock.state.wait_for_cancelled(1).await;

    // a non-stream client gets a 502 in its protocol
    let (s, v) = status_and_json(app.post("/v1/chat/completions", &key, chat(MODEL, "hi")).send().await.unwrap()).await;
    assert_eq!(s, 502, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("sent nothing"), "{v}");
    app.mock.state.wait_for_cancelled(2).await;

    // the cut-off stream had delivered a word, so it counts; the OpenAI
    // one had only its role chunk (no tokens), so it is refunded
    app.settled().await;
    let info = app.key_info(id).await;
    assert_eq!(info["requests_today"], 2, "{info}");
}

#[tokio::test]
async fn usage_is_persisted_per_bucket_and_per_request() {
    let mut app = TestApp::spawn().await;
    let (id, key) = app.key("k").await;
    let (_, v) = status_and_json(app.post("/v1/chat/completions", &key, chat(MODEL, "hi")).send().await.unwrap()).await;
    let expected = v["usage"]["total_tokens"].as_u64().unwrap();
    let lines = ndjson(&app.post("/api/generate", &key, json!({"model": MODEL, "prompt": "Hi"})).send().await.unwrap().text().await.unwrap());
    let last = lines.last().unwrap();
    let expected = expected + last["prompt_eval_count"].as_u64().unwrap() + last["eval_count"].as_u64().unwrap();
    app.settled().await;
    let info = app.key_info(id).await;
    assert_eq!(info["tokens_used_today"].as_u64(), Some(expected));
    assert_eq!(info["tokens_used_month"].as_u64(), Some(expected));
    assert_eq!(info["requests_month"], 2);

    app.shutdown().await; // persists usage
    let db = llm_quota::store::Db::connect(&format!("sqlite://{}/llm-quota.db", app.dir.path().display())).await.unwrap();
    let (n, p, c) = db.event_totals(id).await.unwrap();
    assert_eq!((n, p + c), (2, expected));
    let periods = llm_quota::quota::buckets::periods(chrono::Utc::now(), chrono_tz::Europe::Berlin);
    let day = db.load_bucket(&llm_quota::quota::BucketRef { key_id: id, period: "day", bucket: periods.day }).await.unwrap();
    assert_eq!((day.requests, day.tokens()), (2, expected));
    let log = std::fs::read_to_string(app.dir.path().join("usage.log")).unwrap();
    assert_eq!(log.lines().count(), 2, "one usage-log line per request");
    assert!(!log.contains(&key), "the usage log must not contain the key");
}

#[tokio::test]
async fn health_and_readiness_on_both_listeners() {
    let app = TestApp::spawn().await;
    for base in [&app.proxy, &app.admin] {
        let r = app.http.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let (s, v) = status_and_json(app.http.get(format!("{base}/readyz")).send().await.unwrap()).await;
        assert_eq!(s, 200);
        assert_eq!(v["status"], "ready");
    }
}

#[tokio::test]
async fn shutdown_refuses_new_connections_lets_an_in_flight_stream_finish_and_persists_its_usage() {
    let mut app = TestApp::spawn().await;
    let (id, key) = app.key("k").await;
    app.mock.state.set_chunk_delay(Duration::from_millis(100));
    let resp = app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    let reader = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Some(Ok(b)) = body.next().await {
            rest.extend_from_slice(&b);
        }
        String::from_utf8(rest).unwrap()
    });
    app.begin_shutdown();
    let addr = app.proxy.trim_start_matches("http://").to_string();
    eventually("a new connection refused", || {
        let addr = addr.clone();
        async move {
            match tokio::net::TcpStream::connect(&addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    // Refused while the stream (12 chunks, 100 ms apart) still ran, not
    // only once the last connection had closed.
    assert_eq!(app.mock.state.completed_streams(), 0, "the upstream stream had already finished");
    app.shutdown().await;
    let rest = reader.await.unwrap();
    let last = ndjson(&rest).pop().unwrap();
    assert_eq!(last["done"], true, "stream completed during shutdown");
    let db = llm_quota::store::Db::connect(&format!("sqlite://{}/llm-quota.db", app.dir.path().display())).await.unwrap();
    assert_eq!(db.event_totals(id).await.unwrap().0, 1);
}

/// Reads one HTTP/1.1 response with a `content-length` off `tcp`.
async fn read_response(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed mid-response: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .expect("content-length");
            if got.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

#[tokio::test]
async fn idle_client_connections_are_closed_but_a_longer_stream_is_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timeout = Duration::from_millis(300);
    let app = TestApp::spawn_with(Options::default().env("KEEPALIVE_TIMEOUT", "300ms")).await;
    let (_, key) = app.key("k").await;
    let addr = app.proxy.trim_start_matches("http://").to_string();

    // Served, then left idle: the gateway closes it (read gives EOF).
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // The gateway's idle timer starts after its answer went out, so after
    // this instant; the client's reading of the answer comes later still.
    let sent = std::time::Instant::now();
    tcp.write_all(b"GET /readyz HTTP/1.1\r\nhost: gw\r\n\r\n").await.unwrap();
    assert!(read_response(&mut tcp).await.starts_with("HTTP/1.1 200"));
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut rest))
        .await
        .expect("an idle connection is closed")
        .unwrap();
    assert_eq!(n, 0, "EOF, not data");
    assert!(sent.elapsed() >= timeout, "closed {:?} after the request, before the timeout", sent.elapsed());

    // Opened and never used: closed as well.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut rest)).await.expect("closed").unwrap();
    assert_eq!(n, 0);

    // A stream that runs longer than the timeout finishes, and the same
    // connection then serves another request.
    app.mock.state.set_chunk_delay(Duration::from_millis(100));
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = chat(MODEL, "hi").to_string();
    let post = format!(
        "POST /api/chat HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let started = std::time::Instant::now();
    tcp.write_all(post.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // A streamed answer is chunked; the empty last chunk ends it.
    while !got.ends_with(b"\r\n0\r\n\r\n") {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stream was cut: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"done\":true"), "the stream ran to its end: {text}");
    assert!(started.elapsed() > timeout * 2, "the stream outlasted the timeout ({:?})", started.elapsed());
    tcp.write_all(b"GET /readyz HTTP/1.1\r\nhost: gw\r\n\r\n").await.unwrap();
    assert!(read_response(&mut tcp).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn official_python_clients_work_through_the_gateway() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("python").await;
    crate::mock::run_python_clients(&format!("{}/v1", app.proxy), &app.proxy, &key, MODEL).await;
}

/// Usage events go in multi-row statements: 600 events make three (256,
/// 256, 88 rows), a repeated batch is skipped by request id, and the totals
/// add up. Run on SQLite (`?` placeholders) and PostgreSQL (`$n`).
pub async fn events_insert_in_statements_and_skip_repeats(db: &llm_quota::store::Db) {
    let event = |i: u64| llm_quota::store::usage::UsageEvent {
        request_id: format!("r{i}"),
        ts_ms: 1_795_000_000_000 + i as i64,
        day: "2026-11-28".into(),
        key_id: 4242,
        route: "/api/chat".into(),
        model: MODEL.into(),
        status: 200,
        prompt_tokens: 3,
        completion_tokens: i % 7,
        duration_ms: 1,
        refunded: false,
        outcome: "complete",
    };
    let events: Vec<_> = (0..600).map(event).collect();
    db.insert_events(&events).await.unwrap();
    db.insert_events(&events[500..]).await.unwrap();
    let completion: u64 = (0..600).map(|i| i % 7).sum();
    assert_eq!(db.event_totals(4242).await.unwrap(), (600, 1800, completion));
}

/// The periodic flusher writes a round's events a statement of 64 at a
/// time and its usage-log lines 1024 at a time, paused in between: every
/// one of them arrives, once.
#[tokio::test]
async fn the_periodic_flusher_writes_every_event_of_a_paced_round() {
    // One round finds them all: more than one write of log lines.
    let app = TestApp::spawn_with(Options::default().env("FLUSH_INTERVAL", "6s")).await;
    let (id, key) = app.create_key(json!({"name": "paced"})).await;
    let n = 1100;
    futures_util::stream::iter(0..n)
        .for_each_concurrent(16, |_| async {
            let resp = app.post("/api/generate", &key, json!({"model": MODEL, "prompt": "x", "stream": false})).send().await.unwrap();
            assert_eq!(resp.status(), 200);
        })
        .await;
    app.settled().await;
    let db = &app.state.db;
    let totals = eventually("every event to be written", || async {
        let t = db.event_totals(id).await.map_err(|e| e.to_string())?;
        if t.0 == n { Ok(t) } else { Err(format!("{t:?}")) }
    })
    .await;
    let info = app.key_info(id).await;
    assert_eq!(info["requests_today"], n);
    assert_eq!(info["tokens_used_today"], totals.1 + totals.2, "the events carry every token the key was charged");
    let log = std::fs::read_to_string(app.dir.path().join("usage.log")).unwrap();
    let ids: std::collections::HashSet<&str> = log.lines().map(|l| l.split("\"request_id\":\"").nth(1).unwrap().split('"').next().unwrap()).collect();
    assert_eq!((log.lines().count(), ids.len()), (n as usize, n as usize), "one usage-log line per request");
}

#[tokio::test]
async fn usage_events_insert_in_statements_on_sqlite() {
    let app = TestApp::spawn().await;
    events_insert_in_statements_and_skip_repeats(&app.state.db).await;
}

/// The two upstream clients (hyper's own for a plain-HTTP upstream,
/// reqwest for HTTPS, a proxy, or `UPSTREAM_CLIENT=reqwest`) relay alike:
/// answers, streams, a connection kept for the next request, a reset
/// mid-stream, an upstream status, the 504 of a slow upstream, and the 502
/// of one that refuses or never takes the connection.
#[tokio::test]
async fn both_upstream_clients_relay_answers_failures_and_timeouts_alike() {
    use llm_quota::proxy::{relay::Dialect, upstream::Target};
    for client in ["auto", "reqwest"] {
        let app = TestApp::spawn_with(
            Options::default().env("UPSTREAM_CLIENT", client).env("UPSTREAM_TIMEOUT", "1s").env("UPSTREAM_CONNECT_TIMEOUT", "300ms"),
        )
        .await;
        let target = app.state.settings.get().generation_target(Dialect::OllamaChat).cloned();
        match (client, &target) {
            ("auto", Ok(Target::Direct(_))) | ("reqwest", Ok(Target::Reqwest(_))) => {}
            _ => panic!("{client}: {target:?}"),
        }
        let (id, key) = app.key("k").await;

        let (s, v) = status_and_json(app.post("/api/chat", &key, json!({"model": MODEL, "stream": false,
            "messages": [{"role": "user", "content": "hi"}]})).send().await.unwrap()).await;
        assert_eq!(s, 200, "{client}: {v}");
        assert_eq!(v["message"]["content"], reply_text(12), "{client}");
        let sent = app.mock.state.last_body().unwrap();
        assert_eq!(sent["stream"], true, "{client}: the gateway asks for a stream");
        let mut body = chat(MODEL, "hi");
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let events = sse(&app.post("/v1/chat/completions", &key, body).send().await.unwrap().text().await.unwrap());
        let text: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, reply_text(12), "{client}");
        assert_eq!(events.last().unwrap(), "[DONE]", "{client}");
        assert!(events[events.len() - 2]["usage"]["total_tokens"].as_u64().unwrap() > 0, "{client}");
        app.settled().await;
        assert_eq!(app.mock.state.connections(), 1, "{client}: the finished completions shared one upstream connection");

        app.mock.state.set_failure(Failure::ResetAfter(3));
        let lines = ndjson(&app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap().text().await.unwrap());
        assert_eq!(lines.len(), 4, "{client}: {lines:?}");
        assert!(lines[3]["error"].as_str().unwrap().contains("upstream stream broke"), "{client}: {:?}", lines[3]);

        app.mock.state.set_failure(Failure::Status(503));
        let r = app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap();
        assert_eq!(r.status(), 503, "{client}");
        app.mock.state.set_failure(Failure::None);

        app.mock.state.set_header_delay(Duration::from_secs(5));
        let (s, v) = status_and_json(app.post("/api/generate", &key, json!({"model": MODEL, "prompt": "x"})).send().await.unwrap()).await;
        assert_eq!((s, v), (504, json!({"error": "upstream timed out"})), "{client}");
        app.mock.state.set_header_delay(Duration::ZERO);

        app.admin_json(reqwest::Method::PUT, "/api/settings", Some(json!({"ollama_url": refused_url()}))).await;
        let (s, v) = status_and_json(app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap()).await;
        assert_eq!((s, v), (502, json!({"error": "upstream unreachable"})), "{client}");

        // A listener whose accept queue is full: Linux drops further SYNs,
        // so the connection is never made and the connect timeout ends it.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let full = socket.listen(1).unwrap();
        let addr = full.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await {
                fillers.push(c);
            }
        }
        app.admin_json(reqwest::Method::PUT, "/api/settings", Some(json!({"ollama_url": format!("http://{addr}")}))).await;
        let (s, v) = status_and_json(app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap()).await;
        assert_eq!((s, v), (502, json!({"error": "upstream unreachable"})), "{client}: a connect timeout is 502");
        drop((fillers, full));

        app.settled().await;
        let info = app.key_info(id).await;
        // two answers, the reset stream; the 503, the 504 and the 502s are refunded
        assert_eq!(info["requests_today"], 3, "{client}: {info}");
    }
}

/// `BUSY_POLL`: every request and every upstream read of a stream keeps
/// the pollers spinning; the answers are the same as without it, and the
/// pollers wait once the traffic stops.
#[tokio::test]
async fn busy_polling_is_kept_awake_by_requests_and_stream_reads() {
    let app = TestApp::spawn_with(Options::default().env("BUSY_POLL", "20ms")).await;
    assert!(app.state.busy.is_on());
    let (_, key) = app.key("k").await;
    let before = app.state.busy.activity();
    let (s, v) = status_and_json(app.post("/api/chat", &key, json!({"model": MODEL, "stream": false,
        "messages": [{"role": "user", "content": "hi"}]})).send().await.unwrap()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["message"]["content"], reply_text(12));
    let after_one = app.state.busy.activity();
    assert!(after_one >= before + 2, "the request and its upstream reads touch it: {before} → {after_one}");

    // A stream whose chunks come 5 ms apart: each read keeps it awake.
    app.mock.state.set_chunk_delay(Duration::from_millis(5));
    let lines = ndjson(&app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap().text().await.unwrap());
    let text: String = lines.iter().filter_map(|l| l["message"]["content"].as_str()).collect();
    assert_eq!(text, reply_text(12));
    let after_stream = app.state.busy.activity();
    assert!(after_stream >= after_one + 4, "12 chunks 5 ms apart touched it {} times", after_stream - after_one);
    // Nothing more comes: the pollers wait after the window.
    eventually("a poller waiting", || async { if app.state.busy.sleeping() >= 1 { Ok(()) } else { Err("all spinning") } }).await;
}
