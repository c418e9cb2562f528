//! The admin web UI: every page and partial, sessions, CSRF, throttling,
//! escaping; and the whole flow in headless Chromium (`browser_end_to_end`).

use std::{path::Path, time::Duration};

use reqwest::{header, Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{chat, Options, TestApp, PASSWORD};

const MODEL: &str = "llama3.2:latest";
const XSS: &str = "<script>alert(1)</script>";

/// Text as the templates escape it (minijinja also escapes `/`).
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#x27;").replace('/', "&#x2f;")
}

/// A client that does not follow redirects, so tests can see them.
fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client")
}

fn set_cookie(resp: &reqwest::Response) -> String {
    resp.headers().get(header::SET_COOKIE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// A logged-in admin: the session cookie and the page's CSRF token.
struct Admin {
    base: String,
    http: reqwest::Client,
    cookie: String,
    csrf: String,
}

/// `name=value` of a `Set-Cookie` header.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap_or_default().to_string()
}

fn csrf_of(html: &str) -> String {
    let start = html.find(r#""X-CSRF-Token": ""#).expect("the page carries a CSRF token") + r#""X-CSRF-Token": ""#.len();
    html[start..].split('"').next().unwrap().to_string()
}

impl Admin {
    async fn login(app: &TestApp) -> Admin {
        Self::login_at(&app.admin).await
    }

    async fn login_at(base: &str) -> Admin {
        let http = client();
        let resp = http.post(format!("{base}/login")).form(&[("password", PASSWORD), ("next", "/")]).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "login with the right password");
        let cookie = cookie_pair(&set_cookie(&resp));
        let mut admin = Admin { base: base.to_string(), http, cookie, csrf: String::new() };
        let (s, page) = admin.get("/").await;
        assert_eq!(s, 200, "{page}");
        admin.csrf = csrf_of(&page);
        admin
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).header(header::COOKIE, &self.cookie)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let resp = self.req(Method::GET, path).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// What htmx sends: the form, `HX-Request` and the CSRF header.
    async fn htmx(&self, method: Method, path: &str, form: &[(&str, &str)]) -> (u16, String) {
        let resp = self
            .req(method, path)
            .header("hx-request", "true")
            .header("x-csrf-token", &self.csrf)
            .form(form)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }
}

/// The `<tr>` of a key in a page or partial.
fn row(html: &str, id: i64) -> &str {
    let start = html.find(&format!(r#"<tr id="key-{id}""#)).unwrap_or_else(|| panic!("no row for key {id} in:\n{html}"));
    let end = html[start..].find("</tr>").map_or(html.len(), |e| start + e);
    &html[start..end]
}

/// The cell of one quota bar in a row.
fn quota_cell<'a>(row: &'a str, quota: &str) -> &'a str {
    let start = row.find(&format!(r#"data-quota="{quota}""#)).unwrap_or_else(|| panic!("no {quota} bar in:\n{row}"));
    let end = row[start..].find("</td>").map_or(row.len(), |e| start + e);
    &row[start..end]
}

async fn chat_ok(app: &TestApp, key: &str) {
    let resp = app.post("/v1/chat/completions", key, chat(MODEL, "Hello there")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap_or_default());
    resp.bytes().await.unwrap();
}

fn today(app: &TestApp) -> String {
    app.state.quota.periods().day.clone()
}

#[tokio::test]
async fn pages_without_a_session_go_to_the_login_page() {
    let app = TestApp::spawn().await;
    let http = client();
    for path in ["/", "/usage", "/usage?key=1", "/settings", "/proxy", "/keys/table", "/keys/1", "/keys/1/edit", "/usage.csv"] {
        let resp = http.get(format!("{}{path}", app.admin)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "GET {path}");
        let to = resp.headers()[header::LOCATION].to_str().unwrap();
        assert!(to.starts_with("/login"), "GET {path} → {to}");
    }
    let resp = http.get(format!("{}/usage?key=1", app.admin)).send().await.unwrap();
    assert_eq!(resp.headers()[header::LOCATION], "/login?next=%2Fusage%3Fkey%3D1", "comes back after the login");

    let resp = http.get(format!("{}/keys/table", app.admin)).header("hx-request", "true").send().await.unwrap();
    assert_eq!(resp.status(), 401, "an htmx request");
    assert_eq!(resp.headers()["hx-redirect"], "/login", "htmx sends the whole page to the login");

    let resp = http.post(format!("{}/keys", app.admin)).form(&[("name", "sneaky")]).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, keys) = app.admin_json(Method::GET, "/api/api-keys", None).await;
    assert_eq!(keys, json!([]), "nothing was created without a session");

    let resp = http.get(format!("{}/login?next=/usage", app.admin)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let page = resp.text().await.unwrap();
    assert!(page.contains(r#"<label for="password">"#) && page.contains(r#"type="password""#), "{page}");
    assert!(page.contains(&format!(r#"name="next" value="{}""#, esc("/usage"))), "{page}");
}

#[tokio::test]
async fn login_sets_a_hardened_session_cookie_and_logout_drops_it() {
    let app = TestApp::spawn().await;
    let http = client();
    let wrong = http.post(format!("{}/login", app.admin)).form(&[("password", "guess")]).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(set_cookie(&wrong).is_empty(), "no cookie for a wrong password");
    assert!(wrong.text().await.unwrap().contains("Wrong password."));

    let resp = http
        .post(format!("{}/login", app.admin))
        .form(&[("password", PASSWORD), ("next", "/usage?key=3")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[header::LOCATION], "/usage?key=3");
    let c = set_cookie(&resp);
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(c.contains(attr), "{attr} missing from {c}");
    }
    assert!(!c.contains("Secure"), "plain HTTP gets no Secure cookie (it would never come back)");
    let over_tls = http
        .post(format!("{}/login", app.admin))
        .header("x-forwarded-proto", "https")
        .form(&[("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert!(set_cookie(&over_tls).contains("; Secure"), "behind a TLS proxy the cookie is Secure");
    let cross = http
        .post(format!("{}/login", app.admin))
        .header("sec-fetch-site", "cross-site")
        .form(&[("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403, "another site's page cannot post to the login");
    assert!(set_cookie(&cross).is_empty());
    let evil = http.post(format!("{}/login", app.admin)).form(&[("password", PASSWORD), ("next", "//evil.example/")]).send().await.unwrap();
    assert_eq!(evil.headers()[header::LOCATION], "/", "no open redirect");

    let admin = Admin::login(&app).await;
    let resp = admin.req(Method::GET, "/login").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "logged in: the login page sends you on");

    let no_token = admin.req(Method::POST, "/logout").form(&[("x", "y")]).send().await.unwrap();
    assert_eq!(no_token.status(), 403, "logout is a change: it needs the CSRF token");
    let out = admin.req(Method::POST, "/logout").form(&[("_csrf", admin.csrf.as_str())]).send().await.unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert_eq!(out.headers()[header::LOCATION], "/login");
    assert!(set_cookie(&out).contains("Max-Age=0"), "{}", set_cookie(&out));
}

#[tokio::test]
async fn tampered_and_foreign_cookies_are_refused_and_replicas_share_sessions() {
    let app = TestApp::spawn().await;
    let admin = Admin::login(&app).await;
    let value = admin.cookie.split_once('=').unwrap().1.to_string();
    let (payload, mac) = value.rsplit_once('.').unwrap();
    let mut parts: Vec<String> = payload.split('.').map(str::to_string).collect();
    parts[1] = (parts[1].parse::<i64>().unwrap() + 86_400 * 365).to_string();
    let flipped_mac = format!("{}{}", &mac[..mac.len() - 1], if mac.ends_with('0') { '1' } else { '0' });
    let tampered = [
        format!("{}.{mac}", parts.join(".")),
        format!("{payload}.{flipped_mac}"),
        format!("{payload}."),
        payload.to_string(),
        "v1.9999999999.00000000000000000000000000000000.00".to_string(),
    ];
    for bad in &tampered {
        let resp = client().get(format!("{}/", app.admin)).header(header::COOKIE, format!("lq_admin_session={bad}")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "tampered cookie {bad} let in");
    }

    // Another replica (same ADMIN_PASSWORD, no SESSION_SECRET) accepts the session …
    let replica = TestApp::spawn().await;
    let resp = client().get(format!("{}/", replica.admin)).header(header::COOKIE, &admin.cookie).send().await.unwrap();
    assert_eq!(resp.status(), 200, "a session is valid on every replica");
    // … a deployment with its own SESSION_SECRET does not.
    let other = TestApp::spawn_with(Options::default().env("SESSION_SECRET", "another-secret-entirely")).await;
    let resp = client().get(format!("{}/", other.admin)).header(header::COOKIE, &admin.cookie).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "a cookie signed with another secret");
}

#[tokio::test]
async fn login_attempts_are_throttled_per_client() {
    let app = TestApp::spawn().await;
    let http = client();
    for i in 1..=5 {
        let resp = http.post(format!("{}/login", app.admin)).form(&[("password", format!("guess-{i}"))]).send().await.unwrap();
        assert_eq!(resp.status(), 401, "failure {i}");
    }
    let resp = http.post(format!("{}/login", app.admin)).form(&[("password", PASSWORD)]).send().await.unwrap();
    assert_eq!(resp.status(), 429, "the 6th attempt in a minute, even with the right password");
    let retry: u64 = resp.headers()[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert!(set_cookie(&resp).is_empty());
    assert!(resp.text().await.unwrap().contains("Too many failed attempts"));

    // Another client address (127.0.0.2 is loopback too) is not affected.
    let other = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let resp = other.post(format!("{}/login", app.admin)).form(&[("password", PASSWORD)]).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "another client logs in");
}

#[tokio::test]
async fn the_keys_page_shows_bars_with_colours_limits_and_since_dates() {
    let app = TestApp::spawn().await;
    let (busy, busy_key) = app
        .create_key(json!({"name": "busy", "daily_request_limit": 10, "monthly_request_limit": 100, "daily_token_limit": 1_000_000}))
        .await;
    let (full, full_key) = app.create_key(json!({"name": "full", "daily_request_limit": 1, "expires_at": "2099-01-31"})).await;
    let (free, _) = app.key("free").await;
    for _ in 0..7 {
        chat_ok(&app, &busy_key).await;
    }
    chat_ok(&app, &full_key).await;

    let admin = Admin::login(&app).await;
    let (s, page) = admin.get("/").await;
    assert_eq!(s, 200);
    let since_day = today(&app);
    let since_month = format!("{}-01", &since_day[..7]);
    assert!(page.contains(&format!("since {since_day}")) && page.contains(&format!("since {since_month}")), "since dates");

    let r = row(&page, busy);
    assert!(r.contains("busy") && r.contains("Active"), "{r}");
    let day = quota_cell(r, "requests_day");
    assert!(day.contains(r#"<span class="used">7</span>"#) && day.contains(r#"<span class="limit">10</span>"#), "{day}");
    assert!(day.contains("fill warn") && day.contains("70 %"), "70 % is orange: {day}");
    assert!(quota_cell(r, "requests_month").contains("fill ok"), "7 % is green");
    assert!(quota_cell(r, "tokens_day").contains("fill ok"));
    let tokens_used = app.key_info(busy).await["tokens_used_today"].as_u64().unwrap();
    assert!(tokens_used > 0);
    assert!(quota_cell(r, "tokens_day").contains(&format!(r#"<span class="used">{tokens_used}</span>"#)), "{}", quota_cell(r, "tokens_day"));
    assert!(quota_cell(r, "tokens_month").contains(r#"<span class="limit inf">∞</span>"#), "unlimited is ∞");
    assert!(r.contains(r#"title="never expires">∞"#), "no expiry is ∞");

    let r = row(&page, full);
    assert!(quota_cell(r, "requests_day").contains("fill over") && quota_cell(r, "requests_day").contains("100 %"), "100 % is red");
    assert!(r.contains("2099-01-31 00:00"), "expiry in local time: {r}");

    let r = row(&page, free);
    assert!(!r.contains("class=\"fill"), "unlimited keys have no filled bars: {r}");

    // The refresh partial is the same table.
    let (s, table) = admin.htmx(Method::GET, "/keys/table", &[]).await;
    assert_eq!(s, 200);
    assert!(table.starts_with(r#"<div id="keys-table""#) && table.contains(r#"id="key-3""#), "{table}");
}

#[tokio::test]
async fn creating_a_key_shows_its_plaintext_once_and_swaps_the_table() {
    let app = TestApp::spawn().await;
    let admin = Admin::login(&app).await;
    let resp = admin
        .req(Method::POST, "/keys")
        .header("hx-request", "true")
        .header("x-csrf-token", &admin.csrf)
        .form(&[
            ("name", "team-a"),
            ("daily_token_limit", "5000"),
            ("monthly_token_limit", ""),
            ("daily_request_limit", "50"),
            ("monthly_request_limit", "1000"),
            ("expires_at", "2099-06-30T12:00"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store", "a page with a plaintext key is never cached");
    let html = resp.text().await.unwrap();
    let start = html.find(r#"id="new-key-value""#).expect("plaintext shown");
    let plaintext = html[start..].split("value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    assert!(plaintext.starts_with("sk-") && plaintext.len() == 67, "{plaintext}");
    assert!(html.contains("only time the key is shown") && html.contains(r##"data-copy="#new-key-value""##), "warning and copy button");
    assert!(html.contains(r#"<div id="keys-table" class="table-wrap" hx-swap-oob="true">"#), "the table is swapped in too");
    assert!(row(&html, 1).contains("team-a"));

    let v = app.key_info(1).await;
    assert_eq!((v["daily_token_limit"].as_u64(), v["monthly_token_limit"].as_u64()), (Some(5000), None));
    assert_eq!((v["daily_request_limit"].as_u64(), v["monthly_request_limit"].as_u64()), (Some(50), Some(1000)));
    assert_eq!(v["expires_at"], "2099-06-30T10:00:00Z", "12:00 Europe/Berlin in summer");
    assert_eq!(app.get("/api/tags", &plaintext).send().await.unwrap().status(), 200, "the shown key works");

    let (_, page) = admin.get("/").await;
    assert!(!page.contains(&plaintext), "the plaintext is never shown again");
    assert!(page.contains(&plaintext[..10]), "its prefix is");
}

#[tokio::test]
async fn invalid_key_input_comes_back_next_to_its_field() {
    let app = TestApp::spawn().await;
    let admin = Admin::login(&app).await;
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[("name", "  ")], "new-name"),
        (&[("name", &"x".repeat(101))], "new-name"),
        (&[("name", "ok"), ("daily_token_limit", "-5")], "new-daily_token_limit"),
        (&[("name", "ok"), ("monthly_request_limit", "lots")], "new-monthly_request_limit"),
        (&[("name", "ok"), ("expires_at", "next tuesday")], "new-expires_at"),
    ];
    for (form, id) in cases {
        let (s, html) = admin.htmx(Method::POST, "/keys", form).await;
        assert_eq!(s, 422, "{form:?}");
        assert!(html.contains(&format!(r#"<p class="err" id="{id}-err">"#)), "{form:?}: error next to {id}:\n{html}");
        assert!(html.contains(r#"aria-invalid="true""#));
        assert!(html.contains(r#"<form id="create-form""#), "the form comes back to fix");
    }
    let (s, html) = admin.htmx(Method::POST, "/keys", &[("name", "ok"), ("daily_request_limit", "lots")]).await;
    assert_eq!(s, 422);
    assert!(html.contains(r#"value="lots""#) && html.contains(r#"value="ok""#), "what was typed stays");
    let (_, keys) = app.admin_json(Method::GET, "/api/api-keys", None).await;
    assert_eq!(keys, json!([]), "nothing was created");
}

#[tokio::test]
async fn every_change_needs_the_sessions_csrf_token() {
    let app = TestApp::spawn().await;
    let (id, key) = app.create_key(json!({"name": "k", "daily_token_limit": 10})).await;
    let admin = Admin::login(&app).await;
    let other = Admin::login(&app).await;
    assert_ne!(admin.csrf, other.csrf, "each session has its own token");
    let changes = [
        (Method::POST, "/keys".to_string()),
        (Method::PATCH, format!("/keys/{id}")),
        (Method::POST, format!("/keys/{id}/activate")),
        (Method::POST, format!("/keys/{id}/deactivate")),
        (Method::DELETE, format!("/keys/{id}")),
        (Method::POST, "/settings".to_string()),
        (Method::POST, "/settings/test".to_string()),
        (Method::POST, "/logout".to_string()),
    ];
    let form = [("name", "x"), ("daily_token_limit", "99"), ("ollama_url", "http://127.0.0.1:9"), ("default_model", "x")];
    for (m, path) in &changes {
        let none = admin.req(m.clone(), path).header("hx-request", "true").form(&form).send().await.unwrap();
        assert_eq!(none.status(), 403, "{m} {path} without a token");
        for token in ["0123abcd", other.csrf.as_str()] {
            let wrong = admin.req(m.clone(), path).header("x-csrf-token", token).form(&form).send().await.unwrap();
            assert_eq!(wrong.status(), 403, "{m} {path} with a wrong token ({token})");
        }
        let in_form = admin.req(m.clone(), path).form(&[("_csrf", other.csrf.as_str())]).send().await.unwrap();
        assert_eq!(in_form.status(), 403, "{m} {path} with another session's token in the form");
        let body = in_form.text().await.unwrap();
        assert!(body.contains("security token"), "{body}");
    }
    let v = app.key_info(id).await;
    assert_eq!((v["daily_token_limit"].as_u64(), v["is_active"].as_bool()), (Some(10), Some(true)), "nothing changed");
    assert_eq!(app.state.settings.get().ollama_url, app.mock.url);
    assert_eq!(app.get("/api/tags", &key).send().await.unwrap().status(), 200);
    let (_, keys) = app.admin_json(Method::GET, "/api/api-keys", None).await;
    assert_eq!(keys.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn limits_and_expiry_are_edited_in_place() {
    let app = TestApp::spawn().await;
    let (id, _) = app
        .create_key(json!({"name": "k", "daily_token_limit": 10, "monthly_request_limit": 7, "expires_at": "2099-05-05T10:20:30Z"}))
        .await;
    let admin = Admin::login(&app).await;
    let (s, edit) = admin.htmx(Method::GET, &format!("/keys/{id}/edit"), &[]).await;
    assert_eq!(s, 200);
    assert!(edit.starts_with(&format!(r#"<tr id="key-{id}" class="key-row editing">"#)), "{edit}");
    assert!(edit.contains(&format!(r#"hx-patch="/keys/{id}""#)));
    for (field, value) in [("daily_token_limit", "10"), ("monthly_request_limit", "7"), ("daily_request_limit", ""), ("expires_at", "2099-05-05T12:20")] {
        let input = format!(r#"<input id="k{id}-{field}" name="{field}" "#);
        let at = edit.find(&input).unwrap_or_else(|| panic!("no input {field} in {edit}"));
        let tag = &edit[at..at + edit[at..].find('>').unwrap()];
        assert!(tag.contains(&format!(r#"value="{value}""#)), "{field} prefilled with {value}: {tag}");
        assert!(edit.contains(&format!(r#"<label for="k{id}-{field}">"#)), "{field} has a label");
    }

    // Limits change; the untouched expiry keeps its seconds.
    let form = [
        ("daily_token_limit", "20000"),
        ("monthly_token_limit", ""),
        ("daily_request_limit", "3"),
        ("monthly_request_limit", ""),
        ("expires_at", "2099-05-05T12:20"),
    ];
    let (s, html) = admin.htmx(Method::PATCH, &format!("/keys/{id}"), &form).await;
    assert_eq!(s, 200, "{html}");
    let r = row(&html, id);
    assert!(quota_cell(r, "tokens_day").contains(r#"<span class="limit">20,000</span>"#), "{r}");
    assert!(quota_cell(r, "requests_month").contains("∞"));
    assert!(html.contains(r#"id="flash""#) && html.contains("hx-swap-oob"), "a flash message comes along");
    let v = app.key_info(id).await;
    assert_eq!(v["daily_token_limit"], 20000);
    assert_eq!(v["daily_request_limit"], 3);
    assert_eq!(v["monthly_request_limit"], Value::Null, "empty = unlimited");
    assert_eq!(v["expires_at"], "2099-05-05T10:20:30Z", "the expiry shown unchanged stays exact");

    let mut form2 = form;
    form2[4] = ("expires_at", "");
    admin.htmx(Method::PATCH, &format!("/keys/{id}"), &form2).await;
    assert_eq!(app.key_info(id).await["expires_at"], Value::Null, "empty expiry = never");

    let (s, html) = admin.htmx(Method::PATCH, &format!("/keys/{id}"), &[("daily_token_limit", "1.5")]).await;
    assert_eq!(s, 422);
    assert!(html.contains(&format!(r#"id="k{id}-daily_token_limit-err""#)) && html.contains("class=\"key-row editing\""), "{html}");

    let (s, cancel) = admin.htmx(Method::GET, &format!("/keys/{id}"), &[]).await;
    assert_eq!(s, 200);
    assert!(cancel.starts_with(&format!(r#"<tr id="key-{id}" class="key-row active">"#)), "{cancel}");
    let (s, _) = admin.htmx(Method::GET, "/keys/999/edit", &[]).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn keys_are_deactivated_activated_and_deleted() {
    let app = TestApp::spawn().await;
    let (id, key) = app.key("k").await;
    let admin = Admin::login(&app).await;

    let (s, html) = admin.htmx(Method::POST, &format!("/keys/{id}/deactivate"), &[]).await;
    assert_eq!(s, 200);
    let r = row(&html, id);
    assert!(r.contains("Inactive") && r.contains(&format!(r#"hx-post="/keys/{id}/activate""#)), "{r}");
    assert!(html.contains("deactivated"), "flash");
    assert_eq!(app.get("/api/tags", &key).send().await.unwrap().status(), 403, "deactivated at once");

    let (s, html) = admin.htmx(Method::POST, &format!("/keys/{id}/activate"), &[]).await;
    assert_eq!(s, 200);
    assert!(row(&html, id).contains("Active"));
    assert_eq!(app.get("/api/tags", &key).send().await.unwrap().status(), 200);

    let (_, page) = admin.get("/").await;
    assert!(row(&page, id).contains(r#"hx-confirm="Delete the key “k”?"#), "delete asks first");
    let (s, html) = admin.htmx(Method::DELETE, &format!("/keys/{id}"), &[]).await;
    assert_eq!(s, 200);
    assert!(!html.contains("<tr"), "the row is swapped out for nothing");
    assert!(html.contains("Key “k” deleted."), "{html}");
    assert_eq!(app.get("/api/tags", &key).send().await.unwrap().status(), 401, "deleted at once");
    let (s, html) = admin.htmx(Method::DELETE, &format!("/keys/{id}"), &[]).await;
    assert_eq!(s, 404);
    assert!(html.contains(r#"id="error-message""#), "htmx shows this message: {html}");
    for (m, path) in [(Method::GET, format!("/keys/{id}")), (Method::POST, format!("/keys/{id}/activate"))] {
        assert_eq!(admin.htmx(m, &path, &[]).await.0, 404, "{path}");
    }
}

#[tokio::test]
async fn key_names_are_escaped_on_every_page_and_partial() {
    let app = TestApp::spawn().await;
    let admin = Admin::login(&app).await;
    let (s, created) = admin.htmx(Method::POST, "/keys", &[("name", XSS)]).await;
    assert_eq!(s, 200);
    let id = app.key_info(1).await["id"].as_i64().unwrap();
    let key = created.split(r#"id="new-key-value""#).nth(1).unwrap().split("value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    chat_ok(&app, &key).await;
    app.state.flush().await.unwrap();
    let outputs = [
        ("create", created),
        ("keys page", admin.get("/").await.1),
        ("row", admin.htmx(Method::GET, &format!("/keys/{id}"), &[]).await.1),
        ("edit", admin.htmx(Method::GET, &format!("/keys/{id}/edit"), &[]).await.1),
        ("deactivate", admin.htmx(Method::POST, &format!("/keys/{id}/deactivate"), &[]).await.1),
        ("usage", admin.get(&format!("/usage?key={id}")).await.1),
        ("csv", admin.get("/usage.csv").await.1),
        ("delete", admin.htmx(Method::DELETE, &format!("/keys/{id}"), &[]).await.1),
    ];
    for (what, html) in &outputs {
        if *what == "csv" {
            assert!(html.contains(&format!(",{XSS},")), "the CSV (a download, text/csv) holds the name as it is:\n{html}");
            continue;
        }
        assert!(!html.contains(XSS), "{what}: the name reached the page unescaped:\n{html}");
        assert!(html.contains(&esc(XSS)), "{what}: the name is shown, escaped:\n{html}");
    }
}

#[tokio::test]
async fn settings_test_the_upstream_and_save_url_and_model() {
    let app = TestApp::spawn().await;
    let admin = Admin::login(&app).await;
    let (s, page) = admin.get("/settings").await;
    assert_eq!(s, 200);
    assert!(page.contains(&format!(r#"value="{}""#, esc(&app.mock.url))), "current URL");
    assert!(page.contains(r#"<label for="ollama_url">"#) && page.contains(r#"<label for="default_model">"#));
    assert!(page.contains(r#"<option value="llama3.2:latest" selected>"#) && page.contains(r#"<option value="qwen3:8b">"#), "{page}");
    assert!(page.contains("Connected to"), "the page shows the upstream's state");

    let (s, html) = admin.htmx(Method::POST, "/settings/test", &[("ollama_url", &app.mock.url), ("default_model", "qwen3:8b")]).await;
    assert_eq!(s, 200);
    assert!(html.contains("Connected to") && html.contains("2 models"), "{html}");
    assert!(html.contains(r#"<select id="default_model" name="default_model" aria-describedby="default_model-hint" hx-swap-oob="true">"#));
    assert!(html.contains(r#"<option value="qwen3:8b" selected>"#), "the chosen model stays chosen");

    let refused = crate::common::refused_url();
    let (s, html) = admin.htmx(Method::POST, "/settings/test", &[("ollama_url", refused.as_str()), ("default_model", "x")]).await;
    assert_eq!(s, 200);
    assert!(html.contains(&format!("Cannot list the models of {}: unreachable", esc(&refused))), "{html}");
    assert!(!html.contains("hx-swap-oob"), "a failed test leaves the model list alone");
    let (_, html) = admin.htmx(Method::POST, "/settings/test", &[("ollama_url", "not a url")]).await;
    assert!(html.contains("not a URL"), "{html}");

    let (s, html) = admin.htmx(Method::POST, "/settings", &[("ollama_url", "ftp://x"), ("default_model", "qwen3:8b")]).await;
    assert_eq!(s, 422);
    assert!(html.contains(r#"id="ollama_url-err""#), "{html}");
    assert_eq!(app.state.settings.get().default_model, "llama3.2:latest", "nothing saved");

    let (s, html) = admin.htmx(Method::POST, "/settings", &[("ollama_url", &app.mock.url), ("default_model", "qwen3:8b")]).await;
    assert_eq!(s, 200);
    assert!(html.contains("Settings saved.") && html.contains(r#"<option value="qwen3:8b" selected>"#), "{html}");
    let (_, v) = app.admin_json(Method::GET, "/api/settings", None).await;
    assert_eq!(v["default_model"], "qwen3:8b");
}

#[tokio::test]
async fn the_proxy_page_has_ready_to_copy_snippets() {
    let app = TestApp::spawn().await;
    let admin = Admin::login(&app).await;
    let (s, page) = admin.get("/proxy").await;
    assert_eq!(s, 200);
    let port = app.proxy.rsplit(':').next().unwrap();
    let proxy_url = format!("http://127.0.0.1:{port}");
    assert!(page.contains(&format!(r#"<code id="proxy-url">{}</code>"#, esc(&proxy_url))), "{page}");
    let openai_base = esc(&format!("{proxy_url}/v1"));
    for snippet in [
        format!("curl {openai_base}/chat/completions"),
        "from openai import OpenAI".to_string(),
        format!(r#"OpenAI(base_url="{openai_base}""#),
        "from ollama import Client".to_string(),
        format!(r#"Client(host="{}""#, esc(&proxy_url)),
        format!(r#"model="{MODEL}""#),
    ] {
        assert!(page.contains(&snippet), "missing {snippet} in\n{page}");
    }
    assert_eq!(page.matches(r##"data-copy="#snippet-"##).count(), 4, "a copy button per snippet");
}

#[tokio::test]
async fn the_usage_page_draws_svg_charts_per_day_and_model() {
    let app = TestApp::spawn().await;
    let (id, key) = app.key("charted").await;
    let (other, other_key) = app.key("other").await;
    for _ in 0..3 {
        chat_ok(&app, &key).await;
    }
    let resp = app.post("/api/chat", &other_key, json!({"model": "qwen3:8b", "messages": [{"role": "user", "content": "hi"}], "stream": false})).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    app.state.flush().await.unwrap();
    // An older day straight in the database, as the flusher writes it.
    let five_ago = (chrono::NaiveDate::parse_from_str(&today(&app), "%Y-%m-%d").unwrap() - chrono::Days::new(5)).format("%Y-%m-%d").to_string();
    let usage = llm_quota::quota::Usage { requests: 4, refunds: 0, prompt_tokens: 1200, completion_tokens: 800, reserved: 0 };
    app.state.db.upsert_buckets(&[(llm_quota::quota::BucketRef { key_id: id, period: "day", bucket: five_ago.clone() }, usage)]).await.unwrap();

    let admin = Admin::login(&app).await;
    let (s, page) = admin.get(&format!("/usage?key={id}")).await;
    assert_eq!(s, 200);
    let info = app.key_info(id).await;
    let tokens = info["tokens_used_today"].as_u64().unwrap();
    assert!(page.contains(r#"<svg class="chart" viewBox="0 0 1000 250" role="img""#), "{page}");
    assert_eq!(page.matches(r#"<g class="day" data-day=""#).count(), 60, "30 days in two charts");
    let tokens = tokens.to_string().as_bytes().rchunks(3).rev().map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join(",");
    assert!(page.contains(&format!("<title>{}: {tokens} tokens (prompt ", today(&app))), "today's bar: {tokens} tokens");
    assert!(page.contains(&format!("<title>{five_ago}: 2,000 tokens (prompt 1,200, completion 800)</title>")), "an older day");
    assert!(page.contains(&format!("<title>{five_ago}: 4 requests</title>")));
    assert!(page.contains(r#"<rect class="prompt""#) && page.contains(r#"<rect class="completion""#));
    assert!(page.contains(r#"<g class="model-row" data-model="llama3.2:latest">"#), "the model chart");
    assert!(!page.contains(r#"data-model="qwen3:8b""#), "only this key's models");
    assert!(page.contains(r#"<option value="1" selected>charted"#));

    let (s, all) = admin.get("/usage").await;
    assert_eq!(s, 200);
    assert!(all.contains(r#"data-model="qwen3:8b""#) && all.contains(r#"data-model="llama3.2:latest""#), "all keys");
    assert!(all.contains(&format!("<title>{}: 4 requests</title>", today(&app))), "3 + 1 requests today");
    let _ = other;

    assert_eq!(admin.get("/usage?key=abc").await.0, 400);
    assert_eq!(admin.get("/usage?key=999").await.0, 404);
}

#[tokio::test]
async fn usage_events_export_as_csv_for_a_date_range() {
    let app = TestApp::spawn().await;
    let (id, key) = app.key("exported").await;
    let (_, other_key) = app.key("other").await;
    chat_ok(&app, &key).await;
    chat_ok(&app, &key).await;
    chat_ok(&app, &other_key).await;
    app.state.flush().await.unwrap();

    let admin = Admin::login(&app).await;
    let day = today(&app);
    let resp = admin.req(Method::GET, &format!("/usage.csv?from={day}&to={day}&key={id}")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/csv; charset=utf-8");
    assert!(resp.headers()[header::CONTENT_DISPOSITION].to_str().unwrap().contains(&format!("llm-quota-usage-{day}-to-{day}.csv")));
    let csv = resp.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "request_id,time,key,route,model,status,prompt_tokens,completion_tokens,duration_ms,outcome");
    assert_eq!(lines.len(), 3, "two requests of this key:\n{csv}");
    let cols: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(cols.len(), 10, "{}", lines[1]);
    assert!(cols[1].starts_with(&day) && (cols[1].ends_with("+01:00") || cols[1].ends_with("+02:00")), "local time: {}", cols[1]);
    assert_eq!((cols[2], cols[3], cols[4], cols[5], cols[9]), ("exported", "/v1/chat/completions", MODEL, "200", "complete"));
    assert!(cols[6].parse::<u64>().unwrap() > 0 && cols[7].parse::<u64>().unwrap() > 0);

    let (s, all) = admin.get("/usage.csv").await;
    assert_eq!((s, all.lines().count()), (200, 4), "every key, default range:\n{all}");
    let (s, past) = admin.get("/usage.csv?from=2020-01-01&to=2020-01-31").await;
    assert_eq!((s, past.lines().count()), (200, 1), "only the header");
    assert_eq!(admin.get("/usage.csv?from=yesterday").await.0, 400);
    assert_eq!(admin.get("/usage.csv?from=2026-02-01&to=2026-01-01").await.0, 400);

    // Many events stream out in pages.
    let events: Vec<llm_quota::store::usage::UsageEvent> = (0..2500)
        .map(|i| llm_quota::store::usage::UsageEvent {
            request_id: format!("bulk-{i}"),
            ts_ms: app.state.quota.now().timestamp_millis(),
            day: day.clone(),
            key_id: 999,
            route: "/api/chat".into(),
            model: if i == 0 { "=cmd|' /C calc'!A0".into() } else { "m".into() },
            status: 200,
            prompt_tokens: 1,
            completion_tokens: 1,
            duration_ms: 1,
            refunded: false,
            outcome: "complete",
        })
        .collect();
    app.state.db.insert_events(&events).await.unwrap();
    let (_, big) = admin.get(&format!("/usage.csv?key=999&from={day}")).await;
    assert_eq!(big.lines().count(), 2501, "every event, across pages");
    assert!(big.contains(",#999 (deleted),"), "a deleted key by its id");
    assert!(big.contains(",'=cmd|' /C calc'!A0,"), "formulas are defused");
}

#[tokio::test]
async fn assets_are_local_long_cached_and_pages_are_locked_down() {
    let app = TestApp::spawn().await;
    let http = client();
    let resp = http.get(format!("{}/static/htmx.min.js?v=x", app.admin)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "public, max-age=31536000, immutable");
    assert!(resp.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/javascript"));
    assert!(resp.text().await.unwrap().contains(r#"version:"2.0.11""#), "the vendored htmx 2");
    for asset in ["app.js", "app.css", "favicon.svg"] {
        assert_eq!(http.get(format!("{}/static/{asset}", app.admin)).send().await.unwrap().status(), 200, "{asset}");
    }
    assert_eq!(http.get(format!("{}/static/nope.js", app.admin)).send().await.unwrap().status(), 404);

    let admin = Admin::login(&app).await;
    for path in ["/", "/usage", "/settings", "/proxy"] {
        let resp = admin.req(Method::GET, path).send().await.unwrap();
        let csp = resp.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap().to_string();
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
        let html = resp.text().await.unwrap();
        assert!(html.contains(&format!(r#"<script src="{}?v="#, esc("/static/htmx.min.js"))), "{path}");
        for external in [r#"src="http"#, r#"href="http"#, r#"src="&#x2f;&#x2f;"#, r#"href="&#x2f;&#x2f;"#, "@import"] {
            assert!(!html.contains(external), "{path} loads something from another host ({external})");
        }
        assert!(!html.contains(" style=") && !html.contains("<style") && !html.contains(" onclick="), "{path}: nothing inline the CSP would block");
    }
}

/// The whole flow in headless Chromium, driven by `tests/e2e/admin.e2e.mjs`
/// (playwright-core): log in, create a key, read it once, change its limits,
/// watch its bars move with proxied requests, deactivate and delete it.
#[tokio::test]
async fn browser_end_to_end() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chromium = std::env::var("LQ_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "the browser test needs Chromium at {chromium}: install it with `apt-get install -y chromium` \
         (scripts/test.sh does), or point LQ_CHROMIUM at a Chromium binary"
    );
    let e2e = repo.join("tests/e2e");
    assert!(
        e2e.join("node_modules/playwright-core").exists(),
        "the browser test needs playwright-core: run `npm ci` in {} (scripts/test.sh does)",
        e2e.display()
    );
    // The usage page shows flushed days; let the flusher run often.
    let app = TestApp::spawn_with(Options::default().env("FLUSH_INTERVAL", "200ms")).await;
    let artefacts = repo.join("tests/artefacts");
    std::fs::create_dir_all(&artefacts).expect("tests/artefacts");
    let run = tokio::process::Command::new("node")
        .arg(e2e.join("admin.e2e.mjs"))
        .current_dir(&e2e)
        .env("LQ_ADMIN_URL", &app.admin)
        .env("LQ_PROXY_URL", &app.proxy)
        .env("LQ_ADMIN_PASSWORD", PASSWORD)
        .env("LQ_MODEL", MODEL)
        .env("LQ_CHROMIUM", &chromium)
        .env("LQ_ARTEFACTS", &artefacts)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(180), run).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot run node (is Node.js installed?): {e}"),
        Err(_) => panic!("the browser test did not finish within 180 s"),
    };
    assert!(
        output.status.success(),
        "browser test failed ({}); screenshots in {}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        artefacts.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let (_, keys) = app.admin_json(Method::GET, "/api/api-keys", None).await;
    assert_eq!(keys, json!([]), "the browser deleted its key");
}
