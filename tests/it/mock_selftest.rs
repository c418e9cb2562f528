//! The mock upstream checked on its own: if it drifts from the real wire
//! formats, every gateway test built on it proves less.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use llm_quota::tokens::{
    count_chat_prompt, count_generate_prompt, count_ollama_chunk, count_openai_chunk, count_text,
};
use serde_json::{json, Value};

use crate::mock::{
    reply_text, run_python_clients, Failure, MockUpstream, TOOL_ARGUMENTS, TOOL_ARGUMENT_FRAGMENTS,
};

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": "llama3.2",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    });
    for (k, v) in extra.as_object().expect("extra fields are an object") {
        body[k] = v.clone();
    }
    body
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    }})
}

async fn post(mock: &MockUpstream, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", mock.url))
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path} failed: {e}"))
}

fn content_type(resp: &reqwest::Response) -> String {
    resp.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .map(|v| v.to_str().expect("ASCII content type").to_owned())
        .unwrap_or_default()
}

/// Every line of an NDJSON body, parsed; fails on a line that is not JSON.
async fn ndjson(resp: reqwest::Response) -> Vec<Value> {
    assert_eq!(resp.status(), 200);
    assert_eq!(content_type(&resp), "application/x-ndjson");
    let text = resp.text().await.expect("NDJSON body");
    assert!(
        text.ends_with('\n'),
        "NDJSON must end with a newline: {text:?}"
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?} is not JSON: {e}")))
        .collect()
}

/// The payloads of an SSE body, checking its framing (`data: …\n\n` only).
async fn sse(resp: reqwest::Response) -> Vec<String> {
    assert_eq!(resp.status(), 200);
    assert_eq!(content_type(&resp), "text/event-stream");
    let text = resp.text().await.expect("SSE body");
    text.split_inclusive("\n\n")
        .map(|event| {
            let payload = event
                .strip_prefix("data: ")
                .and_then(|e| e.strip_suffix("\n\n"))
                .unwrap_or_else(|| panic!("malformed SSE event {event:?} in {text:?}"));
            assert!(!payload.contains('\n'), "one line per event: {event:?}");
            payload.to_owned()
        })
        .collect()
}

fn parse_events(payloads: &[String]) -> Vec<Value> {
    payloads
        .iter()
        .map(|p| serde_json::from_str(p).unwrap_or_else(|e| panic!("event {p:?} is not JSON: {e}")))
        .collect()
}

fn assert_rfc3339_nanos_utc(ts: &Value) {
    let ts = ts.as_str().expect("created_at is a string");
    chrono::DateTime::parse_from_rfc3339(ts).unwrap_or_else(|e| panic!("created_at {ts:?}: {e}"));
    let fraction = ts.rsplit('.').next().expect("fractional seconds");
    assert_eq!(fraction.len(), 10, "nanoseconds then Z expected in {ts:?}");
    assert!(fraction.ends_with('Z'), "UTC expected in {ts:?}");
}

fn assert_final_stats(last: &Value, prompt_tokens: u64, eval_count: u64) {
    assert_eq!(last["done"], true);
    assert_eq!(
        last["prompt_eval_count"], prompt_tokens,
        "prompt_eval_count in {last}"
    );
    assert_eq!(last["eval_count"], eval_count, "eval_count in {last}");
    for key in [
        "total_duration",
        "load_duration",
        "prompt_eval_duration",
        "eval_duration",
    ] {
        assert!(
            last[key].as_u64().is_some_and(|d| d > 0),
            "{key} missing in {last}"
        );
    }
}

#[tokio::test]
async fn mock_ollama_chat_streams_ndjson_with_final_statistics() {
    let mock = MockUpstream::start().await;
    let body = chat_body(json!({}));
    let lines = ndjson(post(&mock, "/api/chat", &body).await).await;

    assert_eq!(lines.len(), 13, "12 word chunks and a final line");
    let (last, chunks) = lines.split_last().expect("lines");
    for c in chunks {
        assert_eq!(c["model"], "llama3.2");
        assert_eq!(c["done"], false);
        assert_eq!(c["message"]["role"], "assistant");
        assert_rfc3339_nanos_utc(&c["created_at"]);
    }
    let text: String = chunks
        .iter()
        .map(|c| c["message"]["content"].as_str().expect("content"))
        .collect();
    assert_eq!(text, reply_text(12));
    assert!(text.starts_with("Hello alpha bravo"));

    assert_eq!(last["message"]["content"], "");
    assert_eq!(last["done_reason"], "stop");
    assert_rfc3339_nanos_utc(&last["created_at"]);
    let eval: u64 = chunks.iter().map(count_ollama_chunk).sum();
    assert!(eval >= 12);
    assert_final_stats(last, count_chat_prompt(&body), eval);
    assert!(last.get("context").is_none(), "chat has no context");
}

#[tokio::test]
async fn mock_ollama_chat_non_stream_is_one_object_with_the_same_counts() {
    let mock = MockUpstream::start().await;
    let body = chat_body(json!({"stream": false}));
    let resp = post(&mock, "/api/chat", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(content_type(&resp), "application/json");
    let whole: Value = resp.json().await.expect("JSON");

    assert_eq!(
        whole["message"],
        json!({"role": "assistant", "content": reply_text(12)})
    );
    assert_eq!(whole["done_reason"], "stop");
    // Counting the whole message gives what the stream's chunks add up to.
    assert_final_stats(&whole, count_chat_prompt(&body), count_ollama_chunk(&whole));
    let streamed = ndjson(post(&mock, "/api/chat", &chat_body(json!({}))).await).await;
    assert_eq!(
        streamed.last().expect("final")["eval_count"],
        whole["eval_count"]
    );
}

#[tokio::test]
async fn mock_ollama_num_predict_cuts_with_done_reason_length() {
    let mock = MockUpstream::start().await;
    let body = chat_body(json!({"options": {"num_predict": 3, "temperature": 0}}));
    let lines = ndjson(post(&mock, "/api/chat", &body).await).await;
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[3]["done_reason"], "length");

    let unlimited = chat_body(json!({"options": {"num_predict": -1}}));
    let lines = ndjson(post(&mock, "/api/chat", &unlimited).await).await;
    assert_eq!(lines.last().expect("final")["done_reason"], "stop");
}

#[tokio::test]
async fn mock_ollama_generate_streams_response_and_context() {
    let mock = MockUpstream::start().await;
    mock.state.set_reply_tokens(5);
    let body =
        json!({"model": "qwen3:8b", "prompt": "Why is the sky blue?", "system": "Be brief."});
    let lines = ndjson(post(&mock, "/api/generate", &body).await).await;
    assert_eq!(lines.len(), 6);
    let (last, chunks) = lines.split_last().expect("lines");
    let text: String = chunks
        .iter()
        .map(|c| c["response"].as_str().expect("response"))
        .collect();
    assert_eq!(text, "Hello alpha bravo charlie delta");
    assert!(chunks
        .iter()
        .all(|c| c.get("message").is_none() && c["done"] == false));
    assert_eq!(last["response"], "");
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(last["context"], json!([1, 2, 3]));
    let eval: u64 = chunks.iter().map(count_ollama_chunk).sum();
    assert_final_stats(last, count_generate_prompt(&body), eval);

    let resp = post(
        &mock,
        "/api/generate",
        &json!({"model": "qwen3:8b", "prompt": "Hi", "stream": false}),
    )
    .await;
    let whole: Value = resp.json().await.expect("JSON");
    assert_eq!(whole["response"], "Hello alpha bravo charlie delta");
    assert_eq!(whole["context"], json!([1, 2, 3]));
    assert_eq!(whole["eval_count"], eval);
}

#[tokio::test]
async fn mock_ollama_generate_with_empty_prompt_only_loads() {
    let mock = MockUpstream::start().await;
    let lines = ndjson(
        post(
            &mock,
            "/api/generate",
            &json!({"model": "llama3.2", "prompt": ""}),
        )
        .await,
    )
    .await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["done"], true);
    assert_eq!(lines[0]["done_reason"], "load");
    assert_eq!(lines[0]["response"], "");
    assert!(
        lines[0].get("eval_count").is_none(),
        "zero values are omitted: {}",
        lines[0]
    );
}

#[tokio::test]
async fn mock_ollama_tool_call_has_object_arguments() {
    let mock = MockUpstream::start().await;
    let body = chat_body(json!({"tools": [weather_tool()]}));
    let lines = ndjson(post(&mock, "/api/chat", &body).await).await;
    assert_eq!(lines.len(), 2, "one tool-call chunk and the final line");
    let message = &lines[0]["message"];
    assert_eq!(message["content"], "");
    let call = &message["tool_calls"][0];
    assert!(
        call["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_")),
        "{call}"
    );
    assert_eq!(call["function"]["index"], 0);
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], json!({"city": "Tokyo"}));
    assert_eq!(lines[1]["done_reason"], "stop");
    assert_final_stats(
        &lines[1],
        count_chat_prompt(&body),
        count_ollama_chunk(&lines[0]),
    );

    let whole: Value = post(
        &mock,
        "/api/chat",
        &chat_body(json!({"tools": [weather_tool()], "stream": false})),
    )
    .await
    .json()
    .await
    .expect("JSON");
    assert_eq!(
        whole["message"]["tool_calls"][0]["function"]["arguments"],
        json!({"city": "Tokyo"})
    );
    assert_eq!(whole["eval_count"], lines[1]["eval_count"]);
}

#[tokio::test]
async fn mock_openai_non_stream_completion_has_usage() {
    let mock = MockUpstream::start().await;
    let body = chat_body(json!({}));
    let resp = post(&mock, "/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(content_type(&resp), "application/json");
    let c: Value = resp.json().await.expect("JSON");
    assert!(c["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(c["object"], "chat.completion");
    assert!(c["created"].as_i64().is_some_and(|t| t > 1_700_000_000));
    assert_eq!(c["model"], "llama3.2");
    assert_eq!(c["system_fingerprint"], "fp_mock");
    assert_eq!(
        c["choices"][0]["message"],
        json!({"role": "assistant", "content": reply_text(12)})
    );
    assert_eq!(c["choices"][0]["finish_reason"], "stop");
    let prompt = count_chat_prompt(&body);
    let completion = count_text(&reply_text(12));
    assert_eq!(
        c["usage"],
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    );

    for limit in ["max_tokens", "max_completion_tokens"] {
        let c: Value = post(
            &mock,
            "/v1/chat/completions",
            &chat_body(json!({ limit: 2 })),
        )
        .await
        .json()
        .await
        .expect("JSON");
        assert_eq!(c["choices"][0]["finish_reason"], "length", "{limit}");
        assert_eq!(
            c["choices"][0]["message"]["content"], "Hello alpha",
            "{limit}"
        );
    }
}

#[tokio::test]
async fn mock_openai_stream_without_include_usage_has_no_usage() {
    let mock = MockUpstream::start().await;
    mock.state.set_reply_tokens(4);
    let payloads = sse(post(
        &mock,
        "/v1/chat/completions",
        &chat_body(json!({"stream": true})),
    )
    .await)
    .await;
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks = parse_events(&payloads[..payloads.len() - 1]);
    assert_eq!(chunks.len(), 6, "role, 4 words, finish");
    let id = &chunks[0]["id"];
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(&c["id"], id, "one id per completion");
        assert!(c.get("usage").is_none(), "no usage key unless asked: {c}");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks[1..5]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .expect("content")
        })
        .collect();
    assert_eq!(text, "Hello alpha bravo charlie");
    assert!(chunks[..5]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(chunks[5]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn mock_openai_stream_with_include_usage_ends_with_usage_chunk() {
    let mock = MockUpstream::start().await;
    let body = chat_body(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let payloads = sse(post(&mock, "/v1/chat/completions", &body).await).await;
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks = parse_events(&payloads[..payloads.len() - 1]);
    let (usage_chunk, rest) = chunks.split_last().expect("chunks");
    assert!(
        rest.iter().all(|c| c.get("usage") == Some(&Value::Null)),
        "earlier chunks carry usage: null"
    );
    assert_eq!(usage_chunk["choices"], json!([]));
    let completion: u64 = rest.iter().map(count_openai_chunk).sum();
    let prompt = count_chat_prompt(&body);
    assert_eq!(completion, count_text(&reply_text(12)));
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    );
    assert_eq!(
        rest.last().expect("finish")["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn mock_openai_tool_call_streams_string_argument_fragments() {
    let fragments: u64 = TOOL_ARGUMENT_FRAGMENTS.iter().map(|f| count_text(f)).sum();
    assert_eq!(
        fragments,
        count_text(TOOL_ARGUMENTS),
        "fragments must split on token boundaries"
    );
    assert_eq!(TOOL_ARGUMENT_FRAGMENTS.concat(), TOOL_ARGUMENTS);

    let mock = MockUpstream::start().await;
    let body = chat_body(
        json!({"stream": true, "stream_options": {"include_usage": true}, "tools": [weather_tool()]}),
    );
    let payloads = sse(post(&mock, "/v1/chat/completions", &body).await).await;
    let chunks = parse_events(&payloads[..payloads.len() - 1]);
    let first = &chunks[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(first["index"], 0);
    assert!(first["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("call_")));
    assert_eq!(first["type"], "function");
    assert_eq!(
        first["function"],
        json!({"name": "get_weather", "arguments": ""})
    );
    let arguments: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).expect("joined arguments"),
        json!({"city": "Tokyo"})
    );
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    let streamed_usage = chunks.last().expect("usage chunk")["usage"].clone();
    let completion: u64 = chunks.iter().map(count_openai_chunk).sum();
    assert_eq!(streamed_usage["completion_tokens"], completion);

    let c: Value = post(
        &mock,
        "/v1/chat/completions",
        &chat_body(json!({"tools": [weather_tool()]})),
    )
    .await
    .json()
    .await
    .expect("JSON");
    let message = &c["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null);
    assert_eq!(message["tool_calls"][0]["type"], "function");
    assert_eq!(
        message["tool_calls"][0]["function"],
        json!({"name": "get_weather", "arguments": TOOL_ARGUMENTS})
    );
    assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        c["usage"], streamed_usage,
        "streamed and non-streamed usage agree"
    );
}

#[tokio::test]
async fn mock_error_after_sends_an_error_line_mid_stream() {
    let mock = MockUpstream::start().await;
    mock.state.set_failure(Failure::ErrorAfter(3));

    let lines = ndjson(post(&mock, "/api/chat", &chat_body(json!({}))).await).await;
    assert_eq!(lines.len(), 4);
    assert!(lines[..3].iter().all(|l| l["done"] == false));
    assert!(
        lines[3]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{}",
        lines[3]
    );
    assert!(
        lines.iter().all(|l| l["done"] != true),
        "no final line after an error"
    );

    let payloads = sse(post(
        &mock,
        "/v1/chat/completions",
        &chat_body(json!({"stream": true})),
    )
    .await)
    .await;
    assert!(
        !payloads.iter().any(|p| p == "[DONE]"),
        "no [DONE] after an error"
    );
    let events = parse_events(&payloads);
    assert_eq!(events.len(), 5, "role chunk, 3 words, error");
    let error = &events[4]["error"];
    assert_eq!(error["type"], "api_error");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(
        error.get("param").is_some_and(Value::is_null)
            && error.get("code").is_some_and(Value::is_null)
    );

    let resp = post(&mock, "/api/chat", &chat_body(json!({"stream": false}))).await;
    assert_eq!(resp.status(), 500);
    mock.state.wait_for_completed(2).await;
    assert_eq!(mock.state.cancelled_streams(), 0);
}

#[tokio::test]
async fn mock_reset_after_aborts_the_connection_without_a_final_chunk() {
    let mock = MockUpstream::start().await;
    mock.state.set_failure(Failure::ResetAfter(2));
    let resp = post(
        &mock,
        "/api/generate",
        &json!({"model": "llama3.2", "prompt": "Hi"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut received = Vec::new();
    let mut error = None;
    while let Some(item) = body.next().await {
        match item {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    assert!(
        error.is_some(),
        "the body must end in an error, got {:?}",
        String::from_utf8_lossy(&received)
    );
    let text = String::from_utf8(received).expect("UTF-8");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["done"] == false));

    let resp = post(&mock, "/v1/chat/completions", &chat_body(json!({}))).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err(), "non-stream body is cut off");
    assert_eq!(
        mock.state.completed_streams() + mock.state.cancelled_streams(),
        0
    );
}

#[tokio::test]
async fn mock_garbage_is_not_parseable() {
    let mock = MockUpstream::start().await;
    mock.state.set_failure(Failure::Garbage);
    let resp = post(&mock, "/api/chat", &chat_body(json!({}))).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("body");
    assert!(
        text.lines()
            .any(|l| serde_json::from_str::<Value>(l).is_err()),
        "{text:?}"
    );

    let resp = post(
        &mock,
        "/v1/chat/completions",
        &chat_body(json!({"stream": true})),
    )
    .await;
    let text = resp.text().await.expect("body");
    let payload = text
        .strip_prefix("data: ")
        .expect("SSE framing kept")
        .trim_end();
    assert!(serde_json::from_str::<Value>(payload).is_err(), "{text:?}");

    let resp = post(&mock, "/v1/chat/completions", &chat_body(json!({}))).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.json::<Value>().await.is_err());
}

#[tokio::test]
async fn mock_unknown_model_is_404_and_missing_model_400_in_each_protocol() {
    let mock = MockUpstream::start().await;
    let resp = post(
        &mock,
        "/api/chat",
        &json!({"model": "missing", "messages": []}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<Value>().await.expect("JSON"),
        json!({"error": "model 'missing' not found"})
    );

    let resp = post(
        &mock,
        "/api/generate",
        &json!({"model": "missing-7b", "prompt": "x"}),
    )
    .await;
    assert_eq!(resp.status(), 404);

    let resp = post(
        &mock,
        "/v1/chat/completions",
        &json!({"model": "missing", "messages": []}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<Value>().await.expect("JSON"),
        json!({"error": {"message": "model 'missing' not found", "type": "not_found_error", "param": null, "code": null}})
    );

    let resp = post(&mock, "/api/generate", &json!({"prompt": "x"})).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.expect("JSON"),
        json!({"error": "model is required"})
    );

    let resp = post(&mock, "/v1/chat/completions", &json!({"messages": []})).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.expect("JSON")["error"]["type"],
        "invalid_request_error"
    );
}

#[tokio::test]
async fn mock_status_failure_answers_generation_routes_only() {
    let mock = MockUpstream::start().await;
    mock.state.set_failure(Failure::Status(503));
    let resp = post(&mock, "/api/chat", &chat_body(json!({}))).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.json::<Value>().await.expect("JSON")["error"].is_string());

    let resp = post(&mock, "/v1/chat/completions", &chat_body(json!({}))).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.json::<Value>().await.expect("JSON")["error"]["type"],
        "api_error"
    );

    mock.state.set_failure(Failure::Status(429));
    let resp = post(&mock, "/v1/chat/completions", &chat_body(json!({}))).await;
    assert_eq!(resp.status(), 429);

    let resp = reqwest::get(format!("{}/api/tags", mock.url))
        .await
        .expect("GET /api/tags");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn mock_metadata_routes() {
    let mock = MockUpstream::start().await;
    let get = |path: &str| reqwest::get(format!("{}{path}", mock.url));

    let root = get("/").await.expect("GET /");
    assert_eq!(root.text().await.expect("text"), "Ollama is running");
    let version: Value = get("/api/version")
        .await
        .expect("version")
        .json()
        .await
        .expect("JSON");
    assert_eq!(version, json!({"version": "0.12.3"}));

    let tags: Value = get("/api/tags")
        .await
        .expect("tags")
        .json()
        .await
        .expect("JSON");
    let models = tags["models"].as_array().expect("models");
    let names: Vec<&str> = models
        .iter()
        .map(|m| m["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["llama3.2:latest", "qwen3:8b"]);
    for m in models {
        assert_eq!(m["model"], m["name"]);
        assert!(m["size"].as_u64().is_some_and(|s| s > 0) && m["digest"].is_string());
        chrono::DateTime::parse_from_rfc3339(m["modified_at"].as_str().expect("modified_at"))
            .expect("RFC 3339");
        for key in [
            "parent_model",
            "format",
            "family",
            "families",
            "parameter_size",
            "quantization_level",
        ] {
            assert!(
                m["details"].get(key).is_some(),
                "details.{key} missing in {m}"
            );
        }
    }

    let list: Value = get("/v1/models")
        .await
        .expect("models")
        .json()
        .await
        .expect("JSON");
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, names);
    assert_eq!(list["data"][0]["object"], "model");
    assert_eq!(list["data"][0]["owned_by"], "library");

    assert_eq!(get("/api/nothing-here").await.expect("GET").status(), 404);
}

#[tokio::test]
async fn mock_records_requests_bodies_and_headers() {
    let mock = MockUpstream::start().await;
    assert_eq!(mock.state.requests(), 0);
    assert_eq!(mock.state.last_body(), None);
    let body = chat_body(json!({"stream": false}));
    reqwest::Client::new()
        .post(format!("{}/api/chat", mock.url))
        .bearer_auth("upstream-secret")
        .json(&body)
        .send()
        .await
        .expect("POST");
    reqwest::get(format!("{}/api/tags", mock.url))
        .await
        .expect("GET");
    assert_eq!(mock.state.requests(), 2);
    assert_eq!(mock.state.requests_to("/api/chat"), 1);
    assert_eq!(mock.state.requests_to("/api/tags"), 1);
    assert_eq!(mock.state.requests_to("/v1/models"), 0);
    assert_eq!(mock.state.last_body(), Some(body));
    assert_eq!(
        mock.state.last_header("authorization"),
        None,
        "last request was the GET"
    );
}

#[tokio::test]
async fn mock_chunk_delay_paces_the_stream() {
    let mock = MockUpstream::start().await;
    mock.state.set_reply_tokens(4);
    mock.state.set_chunk_delay(Duration::from_millis(60));
    let started = Instant::now();
    let resp = post(&mock, "/api/chat", &chat_body(json!({}))).await;
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("bytes");
    let first_at = started.elapsed();
    let first: Value =
        serde_json::from_slice(&first).expect("the first write is exactly one JSON line");
    assert_eq!(first["message"]["content"], "Hello");
    while let Some(chunk) = body.next().await {
        chunk.expect("bytes");
    }
    let total = started.elapsed();
    // 5 frames, 4 gaps of 60 ms.
    assert!(total >= Duration::from_millis(240), "took only {total:?}");
    assert!(
        first_at + Duration::from_millis(200) <= total,
        "first chunk at {first_at:?}, end at {total:?}"
    );
}

#[tokio::test]
async fn mock_header_delay_holds_back_the_response_headers() {
    let mock = MockUpstream::start().await;
    mock.state.set_header_delay(Duration::from_millis(500));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .expect("client");
    let err = client
        .post(format!("{}/api/chat", mock.url))
        .json(&chat_body(json!({})))
        .send()
        .await
        .expect_err("headers arrive after the client's timeout");
    assert!(err.is_timeout(), "{err}");
    assert_eq!(mock.state.requests_to("/api/chat"), 1, "counted on arrival");
}

#[tokio::test]
async fn mock_counts_cancelled_and_completed_streams() {
    let mock = MockUpstream::start().await;
    mock.state.set_reply_tokens(200);
    mock.state.set_chunk_delay(Duration::from_millis(10));
    let resp = post(
        &mock,
        "/v1/chat/completions",
        &chat_body(json!({"stream": true})),
    )
    .await;
    let mut body = resp.bytes_stream();
    body.next().await.expect("a first event").expect("bytes");
    drop(body);
    mock.state.wait_for_cancelled(1).await;
    assert_eq!(mock.state.completed_streams(), 0);

    mock.state.set_chunk_delay(Duration::ZERO);
    mock.state.set_reply_tokens(3);
    ndjson(post(&mock, "/api/chat", &chat_body(json!({}))).await).await;
    mock.state.wait_for_completed(1).await;
    assert_eq!(mock.state.cancelled_streams(), 1);
}

#[tokio::test]
async fn python_clients_against_mock_directly() {
    let mock = MockUpstream::start().await;
    run_python_clients(
        &format!("{}/v1", mock.url),
        &mock.url,
        "sk-test-key",
        "llama3.2",
    )
    .await;
    assert_eq!(
        mock.state.last_header("authorization").as_deref(),
        Some("Bearer sk-test-key")
    );
}
