//! Quotas through the real gateway: rejections, headers, completions that
//! end at the quota in each protocol, leases, rollover with an injected
//! clock, and the invariant under 64 concurrent mixed clients.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use llm_quota::quota::{buckets::ManualClock, QuotaStore};
use serde_json::{json, Value};

use crate::common::{chat, ndjson, sse, Options, TestApp};

const MODEL: &str = "llama3.2:latest";

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}


#[tokio::test]
async fn a_rejection_is_429_naming_limit_key_and_local_reset() {
    let clock = ManualClock::new(utc("2026-11-27T21:49:00Z"));
    let app = TestApp::spawn_with(Options::default().clock(Arc::new(clock))).await;
    let (_, key) = app.create_key(json!({"name": "team-a", "daily_request_limit": 1})).await;
    let ok = app.post("/v1/chat/completions", &key, chat(MODEL, "hi")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-ratelimit-limit-requests"], "1");
    assert_eq!(ok.headers()["x-ratelimit-remaining-requests"], "0");
    assert_eq!(ok.headers()["x-ratelimit-reset-requests"], "1h11m0s");
    let resp = app.post("/v1/chat/completions", &key, chat(MODEL, "hi")).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "4260");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["message"], "daily request limit of 1 reached for key 'team-a'; resets 2026-11-28 00:00 Europe/Berlin");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let resp = app.post("/api/chat", &key, chat(MODEL, "hi")).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().starts_with("daily request limit of 1 reached for key 'team-a'"));
    assert_eq!(app.mock.state.requests(), 1, "rejected requests never reach the upstream");
}

#[tokio::test]
async fn token_headers_show_the_tightest_window() {
    let app = TestApp::spawn().await;
    let (_, key) = app.create_key(json!({"name": "k", "daily_token_limit": 100_000, "monthly_token_limit": 5_000})).await;
    let resp = app.post("/api/chat", &key, json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]})).send().await.unwrap();
    assert_eq!(resp.headers()["x-ratelimit-limit-tokens"], "5000");
    let remaining: u64 = resp.headers()["x-ratelimit-remaining-tokens"].to_str().unwrap().parse().unwrap();
    assert!(remaining < 5_000);
    assert!(resp.headers().get("x-ratelimit-limit-requests").is_none(), "no request limit, no request headers");
}

/// How many reply chunks fit into `room` completion tokens, and their tokens.
fn words_within(room: u64) -> (usize, u64) {
    let mut used = 0;
    for i in 0.. {
        let n = llm_quota::tokens::count_text(crate::mock::reply_word(i));
        if used + n > room {
            return (i, used);
        }
        used += n;
    }
    unreachable!()
}

/// A key with room for its prompt and a few completion tokens only.
async fn small_token_key(app: &TestApp, prompt_body: &Value, completion_room: u64) -> String {
    let prompt = llm_quota::tokens::count_chat_prompt(prompt_body);
    let (_, key) = app.create_key(json!({"name": "small", "daily_token_limit": prompt + completion_room})).await;
    key
}

#[tokio::test]
async fn an_ollama_stream_ends_cleanly_at_the_quota_and_the_upstream_is_cancelled() {
    let app = TestApp::spawn().await;
    app.mock.state.set_reply_tokens(100);
    app.mock.state.set_chunk_delay(Duration::from_millis(5));
    let body = chat(MODEL, "tell me a long story");
    let key = small_token_key(&app, &body, 8).await;
    let (words, tokens) = words_within(8);
    let lines = ndjson(&app.post("/api/chat", &key, body).send().await.unwrap().text().await.unwrap());
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "length");
    assert_eq!(last["eval_count"], tokens);
    assert_eq!(last["message"]["content"], "");
    let text: String = lines.iter().filter_map(|l| l["message"]["content"].as_str()).collect();
    assert_eq!(text, crate::mock::reply_text(words));
    app.mock.state.wait_for_cancelled(1).await;
    app.settled().await;
    let (status, list) = app.admin_json(reqwest::Method::GET, "/api/api-keys", None).await;
    assert_eq!(status, 200);
    let limit = list[0]["daily_token_limit"].as_u64().unwrap();
    let used = list[0]["tokens_used_today"].as_u64().unwrap();
    assert_eq!(used, limit - 8 + tokens, "charged the prompt and what was delivered");
    assert!(used <= limit);
    // nothing is left: the next request is refused
    let again = app.post("/api/chat", &key, chat(MODEL, "x")).send().await.unwrap();
    assert_eq!(again.status(), 429);
}

#[tokio::test]
async fn an_openai_stream_ends_with_length_usage_and_done() {
    let app = TestApp::spawn().await;
    app.mock.state.set_reply_tokens(100);
    let mut body = chat(MODEL, "tell me a long story");
    let key = small_token_key(&app, &body, 7).await;
    let (words, tokens) = words_within(7);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = sse(&app.post("/v1/chat/completions", &key, body).send().await.unwrap().text().await.unwrap());
    let n = events.len();
    assert_eq!(events[n - 1], "[DONE]");
    assert_eq!(events[n - 2]["choices"], json!([]));
    assert_eq!(events[n - 2]["usage"]["completion_tokens"], tokens);
    assert_eq!(events[n - 3]["choices"][0]["finish_reason"], "length");
    assert_eq!(events[n - 3]["id"], events[0]["id"], "the gateway's chunk carries the completion's id");
    let text: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, crate::mock::reply_text(words));
}

#[tokio::test]
async fn non_stream_answers_end_at_the_quota_with_length() {
    let app = TestApp::spawn().await;
    app.mock.state.set_reply_tokens(100);
    let body = chat(MODEL, "long story please");
    let (words, tokens) = words_within(6);
    let key = small_token_key(&app, &body, 6).await;
    let (s, v) = {
        let r = app.post("/v1/chat/completions", &key, body.clone()).send().await.unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(s, 200);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], tokens, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], crate::mock::reply_text(words));
    let mut body = body;
    body["stream"] = json!(false);
    let key = small_token_key(&app, &body, 6).await;
    let v: Value = app.post("/api/chat", &key, body).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["done_reason"], "length");
    assert_eq!(v["message"]["content"], crate::mock::reply_text(words));
    assert_eq!(v["eval_count"], tokens);
}

/// A long request holds its prompt, what it has produced and at most one
/// lease ahead, never "everything the key has left": so another request
/// of the same key still gets in while it runs.
#[tokio::test]
async fn a_long_stream_does_not_block_the_keys_other_requests() {
    let app = TestApp::spawn_with(Options::default().env("LEASE_TOKENS", "4")).await;
    app.mock.state.set_reply_tokens(200);
    app.mock.state.set_chunk_delay(Duration::from_millis(20));
    let body = chat(MODEL, "long");
    let prompt = llm_quota::tokens::count_chat_prompt(&body);
    let (id, key) = app.create_key(json!({"name": "k", "daily_token_limit": prompt + 60})).await;
    let resp = app.post("/api/chat", &key, body.clone()).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let periods = app.state.quota.periods();
    let (d, _) = app.state.quota.store.usage(id, &periods.day, &periods.month).await.unwrap();
    assert!(d.unwrap().reserved < prompt + 30, "the stream reserved far ahead of its output");
    // meanwhile another request of the same key is admitted
    let short = json!({"model": MODEL, "prompt": "hi", "stream": false, "options": {"num_predict": 2}});
    let r = app.post("/api/generate", &key, short).send().await.unwrap();
    assert_eq!(r.status(), 200, "a running stream blocked the key's other requests");
    assert_eq!(app.mock.state.cancelled_streams(), 0, "the long stream is still running");
    // the long one then ends at what is left
    let mut rest = Vec::new();
    while let Some(Ok(b)) = stream.next().await {
        rest.extend_from_slice(&b);
    }
    let last = ndjson(std::str::from_utf8(&rest).unwrap()).pop().unwrap();
    assert_eq!(last["done_reason"], "length");
    app.settled().await;
    let info = app.key_info(id).await;
    assert!(info["tokens_used_today"].as_u64().unwrap() <= prompt + 60);
    assert_eq!(info["requests_today"], 2);
}

#[tokio::test]
async fn the_day_rolls_over_at_local_midnight_across_both_dst_switches_and_month_ends() {
    let clock = ManualClock::new(utc("2026-03-28T22:30:00Z")); // 23:30 CET, Saturday before spring-forward
    let app = TestApp::spawn_with(Options::default().clock(Arc::new(clock.clone()))).await;
    let (id, key) = app.create_key(json!({"name": "k", "daily_request_limit": 1, "monthly_request_limit": 3})).await;
    let send = || async { app.post("/api/generate", &key, json!({"model": MODEL, "prompt": "x", "stream": false})).send().await.unwrap().status().as_u16() };
    assert_eq!(send().await, 200);
    assert_eq!(send().await, 429);
    clock.set(utc("2026-03-28T23:00:00Z")); // 00:00 CET, 2026-03-29: a 23-hour day begins
    assert_eq!(send().await, 200);
    clock.set(utc("2026-03-29T21:59:59Z")); // 23:59:59 CEST, same day
    assert_eq!(send().await, 429);
    let info = app.key_info(id).await;
    assert_eq!(info["daily_reset_at"], "2026-03-28T23:00:00Z");
    assert_eq!(info["next_daily_reset_at"], "2026-03-29T22:00:00Z");
    clock.set(utc("2026-03-29T22:00:00Z")); // 00:00 CEST, 2026-03-30
    assert_eq!(send().await, 200);
    clock.set(utc("2026-03-30T22:00:00Z")); // the 31st: a fresh day, but the month has used 3
    let resp = app.post("/api/generate", &key, json!({"model": MODEL, "prompt": "x", "stream": false})).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"], "monthly request limit of 3 reached for key 'k'; resets 2026-04-01 00:00 Europe/Berlin");
    clock.set(utc("2026-03-31T22:00:00Z")); // April
    assert_eq!(send().await, 200);

    // fall back: 2026-10-25 has 25 hours
    clock.set(utc("2026-10-24T22:00:00Z")); // 00:00 CEST, 2026-10-25
    assert_eq!(send().await, 200);
    clock.set(utc("2026-10-25T22:59:59Z")); // 23:59:59 CET, still the 25th
    assert_eq!(send().await, 429);
    clock.set(utc("2026-10-25T23:00:00Z"));
    assert_eq!(send().await, 200);

    // year end
    clock.set(utc("2026-12-31T22:59:00Z"));
    assert_eq!(send().await, 200);
    clock.set(utc("2026-12-31T23:00:00Z"));
    assert_eq!(send().await, 200);
    let info = app.key_info(id).await;
    assert_eq!(info["monthly_reset_at"], "2026-12-31T23:00:00Z");
    assert_eq!(info["requests_month"], 1);
}

#[tokio::test]
async fn quota_endpoint_reports_both_windows() {
    let clock = ManualClock::new(utc("2026-11-27T12:00:00Z"));
    let app = TestApp::spawn_with(Options::default().clock(Arc::new(clock))).await;
    let (_, key) = app.create_key(json!({"name": "k", "daily_token_limit": 1000, "monthly_request_limit": 10})).await;
    app.post("/api/generate", &key, json!({"model": MODEL, "prompt": "x", "stream": false})).send().await.unwrap();
    app.settled().await;
    for path in ["/v1/quota", "/api/quota"] {
        let v: Value = app.get(path, &key).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["timezone"], "Europe/Berlin");
        assert_eq!(v["daily"]["period"], "2026-11-27");
        assert_eq!(v["daily"]["since"], "2026-11-26T23:00:00Z");
        assert_eq!(v["daily"]["resets_at_local"], "2026-11-28 00:00 Europe/Berlin");
        assert_eq!(v["daily"]["tokens"]["limit"], 1000);
        let used = v["daily"]["tokens"]["used"].as_u64().unwrap();
        assert!(used > 0);
        assert_eq!(v["daily"]["tokens"]["remaining"].as_u64().unwrap(), 1000 - used);
        assert_eq!(v["daily"]["requests"]["limit"], Value::Null);
        assert_eq!(v["monthly"]["requests"]["remaining"], 9);
        assert_eq!(v["monthly"]["period"], "2026-11");
    }
}

/// The invariant through the whole gateway: 64 concurrent clients, mixed
/// stream / non-stream / both protocols / disconnecting, on one key with
/// small limits; charged never passes a limit, every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mixed_clients_never_overshoot_the_limits() {
    let app = TestApp::spawn_with(Options::default().env("LEASE_TOKENS", "8")).await;
    app.mock.state.set_reply_tokens(40);
    let (id, key) = app.create_key(json!({"name": "hammer", "daily_token_limit": 3000, "daily_request_limit": 100})).await;
    let admitted = crate::common::mixed_clients(vec![app.proxy.clone()], &key, 64, 3).await;
    app.settled().await;
    let info = app.key_info(id).await;
    let used = info["tokens_used_today"].as_u64().unwrap();
    let requests = info["requests_today"].as_u64().unwrap();
    assert!(used <= 3000, "charged {used} tokens > limit 3000");
    assert!(requests <= 100, "charged {requests} requests > limit 100");
    assert_eq!(requests, admitted, "every admitted request is charged once");
    assert!(requests == 100 || used > 2500, "the key was driven to one of its limits ({requests} requests, {used} tokens)");
    let periods = app.state.quota.periods();
    let (d, _) = app.state.quota.store.usage(id, &periods.day, &periods.month).await.unwrap();
    assert_eq!(d.unwrap().reserved, 0, "no reservation left behind");
}

/// A client's next request finds its previous one settled, without waiting:
/// the gateway queues the settlement on the quota store before the answer
/// (or the stream's end) goes out, and the store runs calls in order. The
/// key has room for two prompts and one answer, which is only true once
/// the first request's reservation (all the key had) became its usage.
pub async fn the_next_request_finds_the_last_one_settled(app: &TestApp) {
    let body = json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    let prompt = llm_quota::tokens::count_chat_prompt(&body);
    let (_, probe) = app.create_key(json!({"name": "probe"})).await;
    let answer: Value = app.post("/api/chat", &probe, body.clone()).send().await.unwrap().json().await.unwrap();
    let completion = answer["eval_count"].as_u64().unwrap();
    assert!(completion + 5 < 256, "the first request holds the whole key (LEASE_TOKENS is 256)");
    let (_, key) = app.create_key(json!({"name": "tight", "daily_token_limit": 2 * prompt + completion + 5})).await;

    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let first = app.post("/api/chat", &key, stream_body).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let lines = ndjson(&first.text().await.unwrap());
    assert_eq!(lines.last().unwrap()["done_reason"], "stop");
    let second = app.post("/api/chat", &key, body.clone()).send().await.unwrap();
    assert_eq!(second.status(), 200, "the first request's reservation was settled to its usage");
    let v: Value = second.json().await.unwrap();
    assert_eq!(v["done_reason"], "length", "the second had room for its prompt and 5 tokens");
    let third = app.post("/api/chat", &key, body).send().await.unwrap();
    assert_eq!(third.status(), 429, "the second was settled too");
}

#[tokio::test]
async fn the_next_request_finds_the_last_one_settled_embedded() {
    the_next_request_finds_the_last_one_settled(&TestApp::spawn().await).await;
}
