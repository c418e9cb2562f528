//! The admin JSON API: the Python proxy's routes, auth and validation.

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::TestApp;

#[tokio::test]
async fn every_admin_route_requires_the_password() {
    let app = TestApp::spawn().await;
    let routes = [
        (Method::GET, "/api/api-keys"),
        (Method::POST, "/api/api-keys"),
        (Method::PATCH, "/api/api-keys/1/quota"),
        (Method::PUT, "/api/api-keys/1/activate"),
        (Method::PUT, "/api/api-keys/1/deactivate"),
        (Method::DELETE, "/api/api-keys/1"),
        (Method::GET, "/api/settings"),
        (Method::PUT, "/api/settings"),
        (Method::GET, "/api/ollama-models"),
        (Method::GET, "/api/proxy-info"),
    ];
    for (m, path) in routes {
        let url = format!("{}{path}", app.admin);
        let none = app.http.request(m.clone(), &url).send().await.unwrap();
        assert_eq!(none.status(), 401, "{m} {path} without password");
        let wrong = app.http.request(m.clone(), &url).bearer_auth("guess").send().await.unwrap();
        assert_eq!(wrong.status(), 401, "{m} {path} with a wrong password");
        let body: Value = wrong.json().await.unwrap();
        assert!(body["detail"].is_string());
    }
}

#[tokio::test]
async fn create_shows_the_key_once_and_stores_only_its_hash() {
    let app = TestApp::spawn().await;
    let (s, v) = app
        .admin_json(Method::POST, "/api/api-keys", Some(json!({"name": "team-a", "daily_token_limit": 1000,
            "monthly_request_limit": 50, "expires_at": "2099-01-01"})))
        .await;
    assert_eq!(s, 200, "{v}");
    let key = v["key"].as_str().unwrap();
    assert!(key.starts_with("sk-") && key.len() >= 3 + 64, "{key}");
    assert_eq!(v["key_prefix"], &key[..10]);
    assert_eq!(v["daily_token_limit"], 1000);
    assert_eq!(v["monthly_request_limit"], 50);
    assert_eq!(v["daily_request_limit"], Value::Null);
    assert_eq!(v["expires_at"], "2098-12-31T23:00:00Z", "a date expires at its local midnight (Europe/Berlin)");
    assert_eq!(v["is_active"], true);

    let (_, list) = app.admin_json(Method::GET, "/api/api-keys", None).await;
    let text = list.to_string();
    assert!(!text.contains(key), "the list must never show the plaintext key");
    let entry = &list[0];
    for field in ["tokens_used_today", "tokens_used_month", "requests_today", "requests_month", "daily_reset_at", "monthly_reset_at"] {
        assert!(!entry[field].is_null(), "{field} missing from {entry}");
    }
    let db_file = std::fs::read(app.dir.path().join("llm-quota.db")).unwrap();
    assert!(!db_file.windows(key.len()).any(|w| w == key.as_bytes()), "plaintext key stored in the database");
}

#[tokio::test]
async fn invalid_input_is_a_422_naming_the_field() {
    let app = TestApp::spawn().await;
    let cases = [
        (json!({}), "name"),
        (json!({"name": ""}), "name"),
        (json!({"name": 5}), "name"),
        (json!({"name": "x", "daily_token_limit": -1}), "daily_token_limit"),
        (json!({"name": "x", "monthly_token_limit": "lots"}), "monthly_token_limit"),
        (json!({"name": "x", "daily_request_limit": 1.5}), "daily_request_limit"),
        (json!({"name": "x", "expires_at": "next tuesday"}), "expires_at"),
        (json!({"name": "x", "allowed_models": "llama3"}), "allowed_models"),
    ];
    for (body, field) in cases {
        let (s, v) = app.admin_json(Method::POST, "/api/api-keys", Some(body.clone())).await;
        assert_eq!(s, 422, "{body}");
        assert_eq!(v["detail"][0]["loc"], json!(["body", field]), "{body} → {v}");
    }
    let resp = app.admin_req(Method::POST, "/api/api-keys").header("content-type", "application/json").body("{oops").send().await.unwrap();
    assert_eq!(resp.status(), 422);
    let (s, v) = app.admin_json(Method::PATCH, "/api/api-keys/abc/quota", Some(json!({}))).await;
    assert_eq!((s, v["detail"][0]["loc"][1].as_str()), (422, Some("id")));
    let (s, v) = app.admin_json(Method::PUT, "/api/settings", Some(json!({"ollama_url": "not a url"}))).await;
    assert_eq!((s, v["detail"][0]["loc"][1].as_str()), (422, Some("ollama_url")));
    let (s, v) = app.admin_json(Method::PUT, "/api/settings", Some(json!({"default_model": ""}))).await;
    assert_eq!((s, v["detail"][0]["loc"][1].as_str()), (422, Some("default_model")));
}

#[tokio::test]
async fn quota_update_is_partial_and_null_means_unlimited() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_key(json!({"name": "k", "daily_token_limit": 10, "daily_request_limit": 5})).await;
    let (s, v) = app.admin_json(Method::PATCH, &format!("/api/api-keys/{id}/quota"), Some(json!({"daily_token_limit": null, "monthly_token_limit": 99}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["daily_token_limit"], Value::Null);
    assert_eq!(v["monthly_token_limit"], 99);
    assert_eq!(v["daily_request_limit"], 5, "fields not sent stay as they were");
    let (s, _) = app.admin_json(Method::PATCH, "/api/api-keys/999/quota", Some(json!({}))).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn activate_deactivate_and_delete() {
    let app = TestApp::spawn().await;
    let (id, key) = app.key("k").await;
    let (_, v) = app.admin_json(Method::PUT, &format!("/api/api-keys/{id}/deactivate"), None).await;
    assert_eq!(v["is_active"], false);
    let (_, v) = app.admin_json(Method::PUT, &format!("/api/api-keys/{id}/activate"), None).await;
    assert_eq!(v["is_active"], true);
    let (s, v) = app.admin_json(Method::DELETE, &format!("/api/api-keys/{id}"), None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("deleted")));
    let (s, _) = app.admin_json(Method::DELETE, &format!("/api/api-keys/{id}"), None).await;
    assert_eq!(s, 404);
    let (s, _) = app.admin_json(Method::PUT, &format!("/api/api-keys/{id}/activate"), None).await;
    assert_eq!(s, 404);
    let resp = app.get("/api/tags", &key).send().await.unwrap();
    assert_eq!(resp.status(), 401, "a deleted key stops working at once");
}

#[tokio::test]
async fn settings_models_and_proxy_info() {
    let app = TestApp::spawn().await;
    let (s, v) = app.admin_json(Method::GET, "/api/settings", None).await;
    assert_eq!(s, 200);
    assert_eq!(v, json!({"ollama_url": app.mock.url, "default_model": "llama3.2:latest"}));
    let (s, v) = app.admin_json(Method::PUT, "/api/settings", Some(json!({"default_model": "qwen3:8b"}))).await;
    assert_eq!((s, v["default_model"].as_str()), (200, Some("qwen3:8b")));
    assert_eq!(v["ollama_url"], app.mock.url, "fields not sent stay as they were");

    let (s, v) = app.admin_json(Method::GET, "/api/ollama-models", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["models"].as_array().unwrap().len(), 2);

    let (s, v) = app.admin_json(Method::GET, "/api/proxy-info", None).await;
    assert_eq!(s, 200);
    let port = app.proxy.rsplit(':').next().unwrap();
    assert!(v["proxy_url"].as_str().unwrap().ends_with(&format!(":{port}")), "{v}");
    assert_eq!(v["mode"], "embedded");

    app.admin_json(Method::PUT, "/api/settings", Some(json!({"ollama_url": crate::common::refused_url()}))).await;
    let (s, _) = app.admin_json(Method::GET, "/api/ollama-models", None).await;
    assert_eq!(s, 502);
}
