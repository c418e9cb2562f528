//! Hostile and malformed input: each gets a 4xx in the caller's protocol,
//! never a 5xx, never a stuck task; and nothing secret reaches the logs.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{chat, Options, TestApp};

const MODEL: &str = "llama3.2:latest";

#[tokio::test]
async fn invalid_utf8_is_a_400_in_protocol() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    let body: Vec<u8> = b"{\"model\": \"m\xff\xfe\", \"messages\": []}".to_vec();
    for (path, openai) in [("/v1/chat/completions", true), ("/api/chat", false)] {
        let resp = app.http.post(format!("{}{path}", app.proxy)).bearer_auth(&key).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        let v: Value = resp.json().await.unwrap();
        if openai {
            assert!(v["error"]["message"].as_str().unwrap().contains("not valid JSON"));
        } else {
            assert!(v["error"].as_str().unwrap().contains("not valid JSON"));
        }
    }
    assert_eq!(app.mock.state.requests(), 0);
}

#[tokio::test]
async fn many_or_huge_headers_are_refused_with_a_4xx() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    let mut req = app.post("/api/chat", &key, chat(MODEL, "hi"));
    for i in 0..200 {
        req = req.header(format!("x-junk-{i}"), "v");
    }
    let s = req.send().await.unwrap().status();
    assert!(s.is_client_error(), "200 headers → {s}");
    let s = app.post("/api/chat", &key, chat(MODEL, "hi")).header("x-big", "a".repeat(512 * 1024)).send().await.map(|r| r.status());
    // hyper answers 431 or closes the connection; either way no 5xx and no upstream call
    if let Ok(s) = s {
        assert!(s.is_client_error(), "a 512 KiB header → {s}");
    }
    assert_eq!(app.mock.state.requests(), 0);
}

#[tokio::test]
async fn a_slow_body_times_out_with_408_in_protocol() {
    let app = TestApp::spawn_with(Options::default().env("BODY_TIMEOUT", "300ms")).await;
    let (_, key) = app.key("k").await;
    let chunks: Vec<Result<&'static [u8], std::io::Error>> = vec![Ok(b"{\"model\":")];
    let stalled = futures_util::stream::iter(chunks).chain(futures_util::stream::pending());
    let resp = app
        .http
        .post(format!("{}/v1/chat/completions", app.proxy))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stalled))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 408);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

use futures_util::StreamExt as _;

#[tokio::test]
async fn path_tricks_find_nothing() {
    let app = TestApp::spawn().await;
    let (_, key) = app.key("k").await;
    for path in ["/v1/../api/api-keys", "/api/api-keys", "/api/settings", "/%2e%2e/api/api-keys", "/api//chat", "/api/chat/", "/V1/models", "/api/tags%00"] {
        let resp = app.http.get(format!("{}{path}", app.proxy)).bearer_auth(&key).send().await.unwrap();
        let s = resp.status();
        assert!(s == 404 || s == 405, "{path} → {s}");
        let body = resp.text().await.unwrap();
        assert!(!body.contains("sk-"), "{path} leaked something: {body}");
    }
    // the admin API is not on the proxy port, even with the password
    let s = app.http.get(format!("{}/api/api-keys", app.proxy)).bearer_auth(crate::common::PASSWORD).send().await.unwrap().status();
    assert_eq!(s, 404);
}

#[tokio::test]
async fn html_and_sql_in_key_names_are_data() {
    let app = TestApp::spawn().await;
    for name in ["'; DROP TABLE api_keys; --", "<script>alert(1)</script>", "ümlaut \u{1F600} \"quoted\""] {
        let (id, key) = app.create_key(json!({"name": name, "daily_request_limit": 0})).await;
        assert_eq!(app.key_info(id).await["name"], name);
        let resp = app.post("/v1/chat/completions", &key, chat(MODEL, "hi")).send().await.unwrap();
        assert_eq!(resp.status(), 429);
        let v: Value = resp.json().await.unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains(&format!("key '{name}'")));
    }
    let (s, list) = app.admin_json(reqwest::Method::GET, "/api/api-keys", None).await;
    assert_eq!((s, list.as_array().unwrap().len()), (200, 3), "the table survived");
}

#[tokio::test]
async fn an_enormous_single_word_prompt_is_counted_in_bounded_time() {
    let app = TestApp::spawn().await;
    let (_, key) = app.create_key(json!({"name": "k", "daily_token_limit": 1000})).await;
    let prompt = "x".repeat(2 * 1024 * 1024);
    // A liveness bound, not a speed test: quadratic tokenising would take hours.
    let resp = tokio::time::timeout(Duration::from_secs(120), app.post("/api/generate", &key, json!({"model": MODEL, "prompt": prompt})).send())
        .await
        .expect("the gateway answered")
        .unwrap();
    assert_eq!(resp.status(), 429, "a 2 MiB prompt does not fit 1000 tokens");
    assert_eq!(app.mock.state.requests(), 0);
}

#[tokio::test]
async fn cors_answers_only_allowed_origins() {
    let app = TestApp::spawn_with(Options::default().env("ALLOWED_ORIGINS", "https://ok.example")).await;
    let preflight = |origin: &str| {
        app.http
            .request(reqwest::Method::OPTIONS, format!("{}/v1/chat/completions", app.proxy))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
    };
    let ok = preflight("https://ok.example").await.unwrap();
    assert_eq!(ok.headers().get("access-control-allow-origin").unwrap(), "https://ok.example");
    let evil = preflight("https://evil.example").await.unwrap();
    assert!(evil.headers().get("access-control-allow-origin").is_none());
}

/// Runs the real binary, drives a full session, and reads everything it
/// logged: no API key, no admin password.
#[tokio::test]
async fn logs_of_a_full_run_contain_no_key_and_no_password() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mock = crate::mock::MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let password = "pw-7c1d6a2e9b-secret";
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-quota"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ADMIN_PASSWORD", password)
        .env("PROXY_HOST", "127.0.0.1")
        .env("PROXY_PORT", "0")
        .env("ADMIN_PORT", "0")
        .env("METRICS_PORT", "0")
        .env("DATABASE_URL", format!("sqlite://{}/db.sqlite", dir.path().display()))
        .env("LOG_FILE", format!("{}/usage.log", dir.path().display()))
        .env("OLLAMA_URL", &mock.url)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut captured = String::new();
    let (mut proxy, mut admin) = (None, None);
    while proxy.is_none() || admin.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line()).await.expect("start-up output").unwrap().expect("banner");
        captured.push_str(&line);
        captured.push('\n');
        let url = line.split_whitespace().find(|w| w.starts_with("http://")).map(str::to_string);
        if line.trim_start().starts_with("proxy:") {
            proxy = url;
        } else if line.trim_start().starts_with("admin:") {
            admin = url.map(|u| u.trim_end_matches('/').to_string());
        }
    }
    let (proxy, admin) = (proxy.unwrap(), admin.unwrap());
    let http = reqwest::Client::new();
    let created: Value = http.post(format!("{admin}/api/api-keys")).bearer_auth(password).json(&json!({"name": "logged"})).send().await.unwrap().json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    assert_eq!(http.post(format!("{proxy}/api/chat")).bearer_auth(&key).json(&chat(MODEL, "hi")).send().await.unwrap().status(), 200);
    let _ = http.post(format!("{proxy}/v1/chat/completions")).bearer_auth(&key).json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true})).send().await.unwrap().text().await;
    assert_eq!(http.get(format!("{admin}/api/api-keys")).bearer_auth("wrong-password").send().await.unwrap().status(), 401);
    assert_eq!(http.get(format!("{proxy}/api/tags")).bearer_auth(format!("{key}x")).send().await.unwrap().status(), 401);
    // SIGTERM, then read everything the process wrote
    let pid = child.id().unwrap();
    std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    while let Ok(Some(line)) = stdout.next_line().await {
        captured.push_str(&line);
        captured.push('\n');
    }
    // Logs leave through a thread of their own; what was queued at exit
    // still reaches stdout, down to the last line.
    let lines = captured.lines().filter(|l| l.contains("\"message\":\"request\"") && l.contains("\"request_id\"")).count();
    assert_eq!(lines, 2, "one request line on stdout per completion request: {captured}");
    assert!(captured.contains("shutting down"), "the last log line reached stdout: {captured}");
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).await.unwrap();
    captured.push_str(&stderr);
    assert!(child.wait().await.unwrap().success(), "clean exit on SIGTERM");
    captured.push_str(&std::fs::read_to_string(dir.path().join("usage.log")).unwrap());
    assert!(captured.contains("\"request_id\""), "the request lines were captured: {captured}");
    assert!(!captured.contains(&key), "the API key appears in the logs");
    assert!(!captured.contains(&key[3..]), "part of the API key appears in the logs");
    assert!(!captured.contains(password), "the admin password appears in the logs");
}
