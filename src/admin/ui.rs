//! The admin web UI on the admin listener: server-rendered pages (minijinja,
//! auto-escaped) whose forms and buttons swap partials in with htmx.
//!
//! - Templates (`templates/`) and assets (`static/`) are compiled into the
//!   binary with `include_str!`/`include_bytes!`: nothing is read from disk
//!   at run time, and no page loads anything from another host.
//! - Every route but `/login` and `/static/…` needs a session
//!   (`session.rs`); every state-changing request also needs the session's
//!   CSRF token, which htmx sends as `X-CSRF-Token` (set once on `<body>`)
//!   and plain forms as the `_csrf` field.
//! - Validation and writes go through the JSON API's functions
//!   (`api::create_key_from`, …): the UI only turns form strings into the
//!   API's JSON fields and its 422s into messages next to the inputs.

// Handlers here fail with a response (an error page), which is large; that
// is the point of the type, so the size lint does not apply.
#![allow(clippy::result_large_err)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    extract::{ConnectInfo, Form, Path, Query, Request, State},
    http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
    Extension, Router,
};
use chrono::{DateTime, Days, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use minijinja::{context, value::Serde, AutoEscape, Environment, UndefinedBehavior, Value as Ctx};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{
    api,
    session::{self, LoginThrottle, Session, SessionKeys, CSRF_FIELD, CSRF_HEADER},
};
use crate::{
    error::ApiError,
    proxy::upstream::{self, UpstreamFailure},
    quota::buckets::start_of,
    store::{
        keys::KeyRecord,
        usage::{DayUsage, EventRow, ModelUsage},
    },
    AppState,
};

// ---------------------------------------------------------------- routes

#[derive(Clone)]
pub struct UiState {
    app: AppState,
    keys: Arc<SessionKeys>,
    throttle: Arc<LoginThrottle>,
}

pub fn router<S>(state: AppState) -> Router<S> {
    // Compile the templates now: a broken template stops start-up, not a request.
    LazyLock::force(&TEMPLATES);
    let ui = UiState {
        keys: Arc::new(SessionKeys::new(state.config.session_secret.as_ref(), &state.admin_password)),
        throttle: Arc::new(LoginThrottle::default()),
        app: state,
    };
    let pages = Router::new()
        .route("/", get(keys_page))
        .route("/keys", post(create_key))
        .route("/keys/table", get(keys_table))
        .route("/keys/{id}", get(key_row).patch(update_key).delete(delete_key))
        .route("/keys/{id}/edit", get(key_edit))
        .route("/keys/{id}/activate", post(activate))
        .route("/keys/{id}/deactivate", post(deactivate))
        .route("/settings", get(settings_page).post(save_settings))
        .route("/settings/test", post(test_upstream))
        .route("/proxy", get(proxy_page))
        .route("/usage", get(usage_page))
        .route("/usage.csv", get(usage_csv))
        .route("/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(ui.clone(), require_session));
    Router::new()
        .merge(pages)
        .route("/login", get(login_page).post(login))
        .layer(middleware::from_fn(security_headers))
        .route("/static/{file}", get(asset))
        .with_state(ui)
}

// ------------------------------------------------------- templates, assets

const TEMPLATE_FILES: &[(&str, &str)] = &[
    ("_head.html", include_str!("../../templates/_head.html")),
    ("_macros.html", include_str!("../../templates/_macros.html")),
    ("_flash.html", include_str!("../../templates/_flash.html")),
    ("base.html", include_str!("../../templates/base.html")),
    ("login.html", include_str!("../../templates/login.html")),
    ("error.html", include_str!("../../templates/error.html")),
    ("keys.html", include_str!("../../templates/keys.html")),
    ("_create.html", include_str!("../../templates/_create.html")),
    ("_keys_table.html", include_str!("../../templates/_keys_table.html")),
    ("_key_row.html", include_str!("../../templates/_key_row.html")),
    ("_key_edit.html", include_str!("../../templates/_key_edit.html")),
    ("settings.html", include_str!("../../templates/settings.html")),
    ("_settings_form.html", include_str!("../../templates/_settings_form.html")),
    ("_model_select.html", include_str!("../../templates/_model_select.html")),
    ("_upstream_status.html", include_str!("../../templates/_upstream_status.html")),
    ("proxy.html", include_str!("../../templates/proxy.html")),
    ("usage.html", include_str!("../../templates/usage.html")),
    ("_charts.html", include_str!("../../templates/_charts.html")),
];

static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
    env.set_syntax(syntax.expect("the default delimiters are valid"));
    // A misspelt variable fails the render (and the tests) instead of printing nothing.
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env.add_function("asset", asset_url);
    for (name, source) in TEMPLATE_FILES {
        env.add_template(name, source).unwrap_or_else(|e| panic!("template {name}: {e:#}"));
    }
    env
});

struct Asset {
    name: &'static str,
    mime: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset { name: "htmx.min.js", mime: "text/javascript; charset=utf-8", body: include_bytes!("../../static/htmx.min.js") },
    Asset { name: "app.js", mime: "text/javascript; charset=utf-8", body: include_bytes!("../../static/app.js") },
    Asset { name: "app.css", mime: "text/css; charset=utf-8", body: include_bytes!("../../static/app.css") },
    Asset { name: "favicon.svg", mime: "image/svg+xml", body: include_bytes!("../../static/favicon.svg") },
];

/// Content hashes, so asset URLs change with their content and can be cached for good.
static ASSET_VERSIONS: LazyLock<HashMap<&'static str, String>> =
    LazyLock::new(|| ASSETS.iter().map(|a| (a.name, hex::encode(&Sha256::digest(a.body)[..6]))).collect());

fn asset_url(name: String) -> Result<String, minijinja::Error> {
    match ASSET_VERSIONS.get(name.as_str()) {
        Some(v) => Ok(format!("/static/{name}?v={v}")),
        None => Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("no asset {name}"))),
    }
}

async fn asset(Path(file): Path<String>) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.name == file) else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    (
        [
            (header::CONTENT_TYPE, a.mime),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        a.body,
    )
        .into_response()
}

fn render(name: &str, ctx: Ctx) -> Result<Html<String>, UiError> {
    Ok(Html(TEMPLATES.get_template(name)?.render(ctx)?))
}

/// A JSON value as template context.
fn ctx(v: Value) -> Ctx {
    Ctx::from(Serde(v))
}

// ----------------------------------------------------------------- errors

/// A failed UI request: an error page (htmx requests show its message in the flash area).
#[derive(Debug)]
enum UiError {
    Status(StatusCode, String),
    Template(minijinja::Error),
    Api(ApiError),
}

impl From<minijinja::Error> for UiError {
    fn from(e: minijinja::Error) -> Self {
        UiError::Template(e)
    }
}

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> Self {
        UiError::Api(e)
    }
}

fn not_found(id: i64) -> UiError {
    UiError::Status(StatusCode::NOT_FOUND, format!("There is no key {id} (any more)."))
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            UiError::Status(s, m) => (s, m),
            // 5xx ApiErrors are already logged and opaque.
            UiError::Api(e) => (e.status, e.message),
            UiError::Template(e) => {
                tracing::error!(error = format!("{e:#}"), "rendering a template failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error".to_string())
            }
        };
        let page = TEMPLATES.get_template("error.html").and_then(|t| {
            t.render(context! { status => status.as_u16(), message => &message })
        });
        match page {
            Ok(html) => (status, Html(html)).into_response(),
            Err(_) => (status, message).into_response(),
        }
    }
}

// ------------------------------------------------ sessions, CSRF, headers

fn now_unix(app: &AppState) -> i64 {
    app.quota.now().timestamp()
}

fn is_htmx(headers: &HeaderMap) -> bool {
    headers.contains_key("hx-request")
}

async fn require_session(State(ui): State<UiState>, req: Request, next: Next) -> Response {
    let Some(session) = ui.keys.from_headers(req.headers(), now_unix(&ui.app)) else {
        return to_login(&req);
    };
    let mut req = if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        req
    } else {
        match csrf_checked(&ui.keys, &session, req).await {
            Ok(req) => req,
            Err(resp) => return resp,
        }
    };
    req.extensions_mut().insert(session);
    next.run(req).await
}

/// No (valid) session: pages go to the login page and come back after it;
/// htmx requests make the whole page go there.
fn to_login(req: &Request) -> Response {
    if is_htmx(req.headers()) {
        return (StatusCode::UNAUTHORIZED, [(HeaderName::from_static("hx-redirect"), "/login")], "Please log in again.")
            .into_response();
    }
    let back = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    if *req.method() != Method::GET || back == "/" {
        return Redirect::to("/login").into_response();
    }
    let mut url = reqwest::Url::parse("http://admin/login").expect("static URL");
    url.query_pairs_mut().append_pair("next", back);
    Redirect::to(&format!("/login?{}", url.query().unwrap_or(""))).into_response()
}

/// Let the request through only with the session's CSRF token: the
/// `X-CSRF-Token` header, or else the `_csrf` field of a form body.
async fn csrf_checked(keys: &SessionKeys, session: &Session, req: Request) -> Result<Request, Response> {
    let refused = || {
        UiError::Status(StatusCode::FORBIDDEN, "The page's security token is missing or out of date. Reload the page and try again.".into())
            .into_response()
    };
    if let Some(given) = req.headers().get(CSRF_HEADER) {
        return if given.to_str().is_ok_and(|g| keys.csrf_ok(session, g)) { Ok(req) } else { Err(refused()) };
    }
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Err(refused());
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map_err(|_| UiError::Status(StatusCode::PAYLOAD_TOO_LARGE, "form too large".into()).into_response())?;
    // The token is hex, which form encoding leaves as it is.
    let given = bytes.split(|b| *b == b'&').find_map(|pair| pair.strip_prefix(format!("{CSRF_FIELD}=").as_bytes()));
    match given.and_then(|g| std::str::from_utf8(g).ok()) {
        Some(g) if keys.csrf_ok(session, g) => Ok(Request::from_parts(parts, Body::from(bytes))),
        _ => Err(refused()),
    }
}

/// Pages may show a plaintext key: never cached, never framed, and only
/// this origin's scripts and styles run (htmx is configured for that).
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, name: HeaderName, value: &'static str| {
        h.entry(name).or_insert(HeaderValue::from_static(value));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, header::CACHE_CONTROL, "no-store");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::REFERRER_POLICY, "no-referrer");
    resp
}

/// Where to go after logging in: only a path on this site.
fn safe_next(next: &str) -> &str {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.starts_with("/login")
        && !next.chars().any(|c| c.is_control());
    if ok {
        next
    } else {
        "/"
    }
}

/// The context every page shares.
fn page(ui: &UiState, session: &Session, active: &str) -> Ctx {
    let c = &ui.app.config;
    context! {
        csrf => ui.keys.csrf_token(session),
        active => active,
        version => env!("CARGO_PKG_VERSION"),
        mode => if c.is_cluster() { "cluster" } else { "embedded" },
        tz => c.app_tz.name(),
    }
}

// ------------------------------------------------------------ login/out

#[derive(Deserialize)]
struct NextQuery {
    #[serde(default)]
    next: String,
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    password: String,
    #[serde(default)]
    next: String,
}

async fn login_page(State(ui): State<UiState>, headers: HeaderMap, Query(q): Query<NextQuery>) -> Result<Response, UiError> {
    if ui.keys.from_headers(&headers, now_unix(&ui.app)).is_some() {
        return Ok(Redirect::to(safe_next(&q.next)).into_response());
    }
    Ok(render("login.html", context! { next => safe_next(&q.next), error => () })?.into_response())
}

async fn login(
    State(ui): State<UiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, UiError> {
    // The login form has no session to derive a CSRF token from; a browser
    // says where a request comes from, and another site's may not log in
    // (nor use up this client's attempts).
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()).unwrap_or("none");
    if !matches!(site, "same-origin" | "none") {
        return Err(UiError::Status(StatusCode::FORBIDDEN, "Log in from the login page of this server.".into()));
    }
    let now = Instant::now();
    let next = safe_next(&form.next);
    if let Err(wait) = ui.throttle.check(peer.ip(), now) {
        let secs = wait.as_secs().max(1);
        tracing::warn!(client = %peer.ip(), "admin login throttled");
        let error = format!("Too many failed attempts. Try again in {secs} s.");
        let html = render("login.html", context! { next, error })?;
        return Ok((StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, secs.to_string())], html).into_response());
    }
    if !api::password_matches(&form.password, ui.app.admin_password.expose()) {
        ui.throttle.record_failure(peer.ip(), now);
        tracing::warn!(client = %peer.ip(), "admin login with a wrong password");
        let html = render("login.html", context! { next, error => "Wrong password." })?;
        return Ok((StatusCode::UNAUTHORIZED, html).into_response());
    }
    ui.throttle.clear(peer.ip());
    let (_, cookie) = ui.keys.issue(now_unix(&ui.app));
    let https = headers.get("x-forwarded-proto").is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    Ok(([(header::SET_COOKIE, session::set_cookie(&cookie, https))], Redirect::to(next)).into_response())
}

/// Stateless sessions cannot be revoked one by one: logging out drops the
/// cookie; changing `ADMIN_PASSWORD` or `SESSION_SECRET` ends all sessions.
async fn logout() -> Response {
    ([(header::SET_COOKIE, session::clear_cookie())], Redirect::to("/login")).into_response()
}

// ------------------------------------------------------------------ keys

/// `1234567` → `1,234,567`
fn num(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn local_minute(t: DateTime<Utc>, tz: Tz) -> String {
    t.with_timezone(&tz).format("%Y-%m-%d %H:%M").to_string()
}

/// The value of a `datetime-local` input: local time in `APP_TZ`.
fn expiry_input(t: Option<DateTime<Utc>>, tz: Tz) -> String {
    t.map(|t| t.with_timezone(&tz).format("%Y-%m-%dT%H:%M").to_string()).unwrap_or_default()
}

/// One quota bar: used / limit, green below 70 %, orange below 90 %, red from there.
fn bar(name: &str, label: &str, used: u64, limit: Option<u64>, since: &str, note: Option<String>) -> Value {
    let pct = limit.map(|l| if l == 0 { 100.0 } else { used as f64 * 100.0 / l as f64 });
    let level = match pct {
        None => "none",
        Some(p) if p < 70.0 => "ok",
        Some(p) if p < 90.0 => "warn",
        Some(_) => "over",
    };
    let pct_text = pct.map(|p| if p > 0.0 && p < 1.0 { "<1 %".to_string() } else { format!("{p:.0} %") });
    json!({
        "name": name,
        "label": label,
        "since": since,
        "used": num(used),
        "limit": limit.map_or_else(|| "∞".to_string(), num),
        "limited": limit.is_some(),
        "pct": pct_text,
        "width": pct.map_or(0.0, |p| (p.min(100.0) * 10.0).round() / 10.0),
        "level": level,
        "note": note,
    })
}

/// The current periods' first days, for the "since" labels.
fn since_days(app: &AppState) -> (String, String) {
    let p = app.quota.periods();
    (p.day.clone(), format!("{}-01", p.month))
}

/// A key as the table shows it: the admin API's JSON plus display fields.
async fn key_view(app: &AppState, k: &KeyRecord) -> Result<Value, ApiError> {
    let mut v = api::key_with_usage(app, k).await?;
    let tz = app.quota.tz();
    let (since_day, since_month) = since_days(app);
    let used = |f: &str| v[f].as_u64().unwrap_or(0);
    let reserved = used("tokens_reserved");
    let in_flight = (reserved > 0).then(|| format!("+{} in flight", num(reserved)));
    let l = k.limits;
    let bars = json!([
        bar("tokens_day", "Tokens today", used("tokens_used_today"), l.daily_tokens, &since_day, in_flight),
        bar("tokens_month", "Tokens this month", used("tokens_used_month"), l.monthly_tokens, &since_month, None),
        bar("requests_day", "Requests today", used("requests_today"), l.daily_requests, &since_day, None),
        bar("requests_month", "Requests this month", used("requests_month"), l.monthly_requests, &since_month, None),
    ]);
    let state = if !k.is_active {
        ("inactive", "Inactive")
    } else if v["is_expired"] == json!(true) {
        ("expired", "Expired")
    } else {
        ("active", "Active")
    };
    v["bars"] = bars;
    v["state"] = json!(state.0);
    v["state_label"] = json!(state.1);
    v["expires_display"] = json!(k.expires_at.map(|t| local_minute(t, tz)));
    Ok(v)
}

async fn table_ctx(app: &AppState) -> Result<Value, UiError> {
    let keys = app.db.list_keys().await.map_err(api::db_err)?;
    let mut views = Vec::with_capacity(keys.len());
    for k in &keys {
        views.push(key_view(app, k).await?);
    }
    let (since_day, since_month) = since_days(app);
    Ok(json!({"keys": views, "since_day": since_day, "since_month": since_month}))
}

const LIMIT_FIELDS: [&str; 4] = ["daily_token_limit", "monthly_token_limit", "daily_request_limit", "monthly_request_limit"];

/// Form values to show in the create/edit inputs (all fields present, as strings).
fn form_values(form: &HashMap<String, String>) -> Value {
    let mut m = Map::new();
    for f in ["name", "expires_at"].into_iter().chain(LIMIT_FIELDS) {
        m.insert(f.into(), json!(form.get(f).map(|s| s.trim()).unwrap_or("")));
    }
    Value::Object(m)
}

fn key_form_values(k: &KeyRecord, tz: Tz) -> Value {
    let s = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_default();
    json!({
        "name": k.name,
        "daily_token_limit": s(k.limits.daily_tokens),
        "monthly_token_limit": s(k.limits.monthly_tokens),
        "daily_request_limit": s(k.limits.daily_requests),
        "monthly_request_limit": s(k.limits.monthly_requests),
        "expires_at": expiry_input(k.expires_at, tz),
    })
}

/// Turn form strings into the admin API's JSON fields: empty = null
/// (unlimited, no expiry); a `datetime-local` value is local time in
/// `APP_TZ`. An expiry left as the edit form showed it keeps its exact
/// stored instant (the input has minute precision).
fn api_body(form: &HashMap<String, String>, tz: Tz, current: Option<&KeyRecord>) -> Result<Map<String, Value>, ApiError> {
    let mut body = Map::new();
    if let Some(name) = form.get("name") {
        body.insert("name".into(), json!(name));
    }
    for field in LIMIT_FIELDS {
        let Some(raw) = form.get(field).map(|s| s.trim()) else { continue };
        let v = if raw.is_empty() {
            Value::Null
        } else {
            json!(raw.parse::<u64>().map_err(|_| ApiError::invalid(field, "Enter a whole number (0 or more), or leave empty for unlimited."))?)
        };
        body.insert(field.into(), v);
    }
    if let Some(raw) = form.get("expires_at").map(|s| s.trim()) {
        if current.is_some_and(|k| expiry_input(k.expires_at, tz) == raw) {
            return Ok(body);
        }
        let v = if raw.is_empty() {
            Value::Null
        } else if let Some(naive) = ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"].iter().find_map(|f| NaiveDateTime::parse_from_str(raw, f).ok()) {
            let t = tz.from_local_datetime(&naive).earliest().ok_or_else(|| {
                ApiError::invalid("expires_at", format!("{raw} does not exist in {} (the clocks skip it)", tz.name()))
            })?;
            json!(t.with_timezone(&Utc).to_rfc3339())
        } else {
            // A date or an RFC 3339 time: the API's own rules.
            json!(raw)
        };
        body.insert("expires_at".into(), v);
    }
    Ok(body)
}

/// A 422's field and message for the form.
fn field_error(e: &ApiError) -> Value {
    let mut errors = Map::new();
    errors.insert(e.field.clone().unwrap_or_else(|| "name".into()), json!(e.message));
    Value::Object(errors)
}

fn flash(message: &str, kind: &str) -> Result<String, UiError> {
    Ok(render("_flash.html", context! { message, kind })?.0)
}

async fn keys_page(State(ui): State<UiState>, Extension(s): Extension<Session>) -> Result<Html<String>, UiError> {
    let table = table_ctx(&ui.app).await?;
    let empty = form_values(&HashMap::new());
    render(
        "keys.html",
        context! { form => Serde(empty), errors => Serde(json!({})), created => (), table => false, ..context! { ..page(&ui, &s, "keys"), ..ctx(table) } },
    )
}

async fn keys_table(State(ui): State<UiState>) -> Result<Html<String>, UiError> {
    render("_keys_table.html", context! { oob => false, ..ctx(table_ctx(&ui.app).await?) })
}

async fn create_key(State(ui): State<UiState>, Form(form): Form<HashMap<String, String>>) -> Result<Response, UiError> {
    let tz = ui.app.quota.tz();
    let created = match api_body(&form, tz, None) {
        Ok(body) => api::create_key_from(&ui.app, &body).await,
        Err(e) => Err(e),
    };
    match created {
        Ok((rec, plaintext)) => {
            let table = table_ctx(&ui.app).await?;
            let html = render(
                "_create.html",
                context! {
                    created => context! { name => rec.name, key => plaintext },
                    form => Serde(form_values(&HashMap::new())), errors => Serde(json!({})), tz => tz.name(), table => true,
                    ..ctx(table),
                },
            )?;
            Ok(html.into_response())
        }
        Err(e) if e.status == StatusCode::UNPROCESSABLE_ENTITY => {
            let html = render(
                "_create.html",
                context! { created => (), form => Serde(form_values(&form)), errors => Serde(field_error(&e)), tz => tz.name(), table => false },
            )?;
            Ok((StatusCode::UNPROCESSABLE_ENTITY, html).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

async fn find_key(app: &AppState, id: i64) -> Result<KeyRecord, UiError> {
    app.db.key_by_id(id).await.map_err(api::db_err)?.ok_or_else(|| not_found(id))
}

async fn row_html(app: &AppState, k: &KeyRecord) -> Result<String, UiError> {
    Ok(render("_key_row.html", context! { k => Serde(key_view(app, k).await?) })?.0)
}

async fn key_row(State(ui): State<UiState>, Path(id): Path<i64>) -> Result<Html<String>, UiError> {
    let k = find_key(&ui.app, id).await?;
    Ok(Html(row_html(&ui.app, &k).await?))
}

async fn key_edit(State(ui): State<UiState>, Path(id): Path<i64>) -> Result<Html<String>, UiError> {
    let k = find_key(&ui.app, id).await?;
    let tz = ui.app.quota.tz();
    render(
        "_key_edit.html",
        context! { k => Serde(json!({"id": k.id, "name": k.name})), form => Serde(key_form_values(&k, tz)), errors => Serde(json!({})), tz => tz.name() },
    )
}

async fn update_key(
    State(ui): State<UiState>,
    Path(id): Path<i64>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, UiError> {
    let k = find_key(&ui.app, id).await?;
    let tz = ui.app.quota.tz();
    let updated = match api_body(&form, tz, Some(&k)) {
        Ok(body) => api::update_quota_from(&ui.app, id, &body).await,
        Err(e) => Err(e),
    };
    match updated {
        Ok(rec) => Ok(Html(row_html(&ui.app, &rec).await? + &flash(&format!("Saved the limits of “{}”.", rec.name), "ok")?).into_response()),
        Err(e) if e.status == StatusCode::UNPROCESSABLE_ENTITY => {
            let html = render(
                "_key_edit.html",
                context! { k => Serde(json!({"id": k.id, "name": k.name})), form => Serde(form_values(&form)), errors => Serde(field_error(&e)), tz => tz.name() },
            )?;
            Ok((StatusCode::UNPROCESSABLE_ENTITY, html).into_response())
        }
        Err(e) if e.status == StatusCode::NOT_FOUND => Err(not_found(id)),
        Err(e) => Err(e.into()),
    }
}

async fn set_active(ui: &UiState, id: i64, active: bool) -> Result<Html<String>, UiError> {
    let rec = ui.app.db.set_key_active(id, active).await.map_err(api::db_err)?.ok_or_else(|| not_found(id))?;
    ui.app.admin_changed().await;
    let what = if active { "activated" } else { "deactivated" };
    Ok(Html(row_html(&ui.app, &rec).await? + &flash(&format!("Key “{}” {what}.", rec.name), "ok")?))
}

async fn activate(State(ui): State<UiState>, Path(id): Path<i64>) -> Result<Html<String>, UiError> {
    set_active(&ui, id, true).await
}

async fn deactivate(State(ui): State<UiState>, Path(id): Path<i64>) -> Result<Html<String>, UiError> {
    set_active(&ui, id, false).await
}

/// The row disappears (an empty swap); the flash says what happened.
async fn delete_key(State(ui): State<UiState>, Path(id): Path<i64>) -> Result<Html<String>, UiError> {
    let k = find_key(&ui.app, id).await?;
    if !ui.app.db.delete_key(id).await.map_err(api::db_err)? {
        return Err(not_found(id));
    }
    ui.app.admin_changed().await;
    Ok(Html(flash(&format!("Key “{}” deleted.", k.name), "ok")?))
}

// -------------------------------------------------------------- settings

const UPSTREAM_TEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The upstream's model names: Ollama's `/api/tags`, or an OpenAI-compatible `/v1/models`.
async fn upstream_models(app: &AppState, base: &str) -> Result<Vec<String>, String> {
    let failure = |f: UpstreamFailure| match f {
        UpstreamFailure::Unreachable(cause) => format!("unreachable ({cause})"),
        UpstreamFailure::Timeout => format!("no answer within {} s", UPSTREAM_TEST_TIMEOUT.as_secs()),
    };
    let (status, body) = upstream::get_json(&app.http, base, "/api/tags", UPSTREAM_TEST_TIMEOUT).await.map_err(failure)?;
    let names = |list: Option<&Vec<Value>>, field: &str| -> Vec<String> {
        list.map(|l| l.iter().filter_map(|m| m[field].as_str().map(str::to_string)).collect()).unwrap_or_default()
    };
    if status.is_success() && body["models"].is_array() {
        return Ok(names(body["models"].as_array(), "name"));
    }
    let (status2, body2) = upstream::get_json(&app.http, base, "/v1/models", UPSTREAM_TEST_TIMEOUT).await.map_err(failure)?;
    if status2.is_success() && body2["data"].is_array() {
        return Ok(names(body2["data"].as_array(), "id"));
    }
    Err(format!("it answered HTTP {} to /api/tags and HTTP {} to /v1/models", status.as_u16(), status2.as_u16()))
}

/// The model list for the select: the upstream's, with the chosen one kept.
fn model_options(listed: &Result<Vec<String>, String>, selected: &str) -> Vec<String> {
    let mut models = listed.clone().unwrap_or_default();
    if !selected.is_empty() && !models.iter().any(|m| m == selected) {
        models.insert(0, selected.to_string());
    }
    models
}

fn upstream_status(url: &str, listed: &Result<Vec<String>, String>) -> Value {
    match listed {
        Ok(m) => json!({"ok": true, "url": url, "count": m.len(), "error": null}),
        Err(e) => json!({"ok": false, "url": url, "count": 0, "error": e}),
    }
}

async fn settings_form(app: &AppState, url: &str, model: &str, errors: Value, saved: bool) -> Value {
    let listed = match crate::config::parse_url(url) {
        Ok(u) => upstream_models(app, &u).await,
        Err(e) => Err(e),
    };
    json!({
        "form": {"ollama_url": url, "default_model": model},
        "errors": errors,
        "saved": saved,
        "models": model_options(&listed, model),
        "selected_model": model,
        "upstream": upstream_status(url, &listed),
        "oob": false,
    })
}

async fn settings_page(State(ui): State<UiState>, Extension(s): Extension<Session>) -> Result<Html<String>, UiError> {
    let current = ui.app.settings.get();
    let form = settings_form(&ui.app, &current.ollama_url, &current.default_model, json!({}), false).await;
    render("settings.html", context! { ..page(&ui, &s, "settings"), ..ctx(form) })
}

async fn save_settings(State(ui): State<UiState>, Form(form): Form<HashMap<String, String>>) -> Result<Response, UiError> {
    let url = form.get("ollama_url").map_or("", |s| s.trim());
    let model = form.get("default_model").map_or("", |s| s.trim());
    let body: Map<String, Value> = [("ollama_url".to_string(), json!(url)), ("default_model".to_string(), json!(model))].into_iter().collect();
    match api::put_settings_from(&ui.app, &body).await {
        Ok(()) => {
            let s = ui.app.settings.get();
            let ctx_v = settings_form(&ui.app, &s.ollama_url, &s.default_model, json!({}), true).await;
            Ok(render("_settings_form.html", ctx(ctx_v))?.into_response())
        }
        Err(e) if e.status == StatusCode::UNPROCESSABLE_ENTITY => {
            let ctx_v = settings_form(&ui.app, url, model, field_error(&e), false).await;
            Ok((StatusCode::UNPROCESSABLE_ENTITY, render("_settings_form.html", ctx(ctx_v))?).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

/// Try a URL before saving it: its model count or why it failed, and the
/// model select refilled with its models.
async fn test_upstream(State(ui): State<UiState>, Form(form): Form<HashMap<String, String>>) -> Result<Html<String>, UiError> {
    let url = form.get("ollama_url").map_or("", |s| s.trim());
    let model = form.get("default_model").map_or("", |s| s.trim());
    let listed = match crate::config::parse_url(url) {
        Ok(u) => upstream_models(&ui.app, &u).await,
        Err(e) => Err(e),
    };
    render(
        "_upstream_status.html",
        context! {
            upstream => Serde(upstream_status(url, &listed)),
            oob_select => listed.is_ok(),
            models => model_options(&listed, model),
            selected_model => model,
        },
    )
}

async fn proxy_page(State(ui): State<UiState>, Extension(s): Extension<Session>, headers: HeaderMap) -> Result<Html<String>, UiError> {
    let info = api::proxy_info_value(&ui.app, &headers);
    render("proxy.html", context! { info => Serde(info), ..page(&ui, &s, "proxy") })
}

// ----------------------------------------------------------------- usage

const CHART_DAYS: u64 = 30;

#[derive(Deserialize)]
struct UsageQuery {
    #[serde(default)]
    key: String,
}

fn parse_key(raw: &str) -> Result<Option<i64>, UiError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    raw.parse().map(Some).map_err(|_| UiError::Status(StatusCode::BAD_REQUEST, format!("key must be a key id, not {raw:?}")))
}

fn today(app: &AppState) -> NaiveDate {
    app.quota.now().with_timezone(&app.quota.tz()).date_naive()
}

/// `12345` → `12.3k`
fn compact(n: u64) -> String {
    let (v, unit) = match n {
        0..=999 => return n.to_string(),
        1_000..=999_999 => (n as f64 / 1e3, "k"),
        1_000_000..=999_999_999 => (n as f64 / 1e6, "M"),
        _ => (n as f64 / 1e9, "G"),
    };
    let s = if v < 10.0 { format!("{v:.1}") } else { format!("{v:.0}") };
    format!("{}{unit}", s.trim_end_matches(".0"))
}

/// The smallest 1, 2 or 5 × 10^k at or above `x` (at least 1).
fn nice_step(x: f64) -> f64 {
    let x = x.max(1.0);
    let mag = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * mag).find(|s| *s >= x).unwrap_or(10.0 * mag)
}

fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[derive(Serialize)]
struct Tick {
    y: f64,
    text_y: f64,
    label: String,
}

#[derive(Serialize)]
struct Segment {
    class: &'static str,
    y: f64,
    h: f64,
}

#[derive(Serialize)]
struct DayBar {
    day: String,
    title: String,
    slot_x: f64,
    slot_w: f64,
    x: f64,
    w: f64,
    cx: f64,
    label: Option<String>,
    segments: Vec<Segment>,
}

#[derive(Serialize)]
struct DayChart {
    id: &'static str,
    title: String,
    desc: String,
    width: u32,
    height: u32,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    plot_h: f64,
    tick_x: f64,
    label_y: f64,
    ticks: Vec<Tick>,
    bars: Vec<DayBar>,
}

/// One stacked series of a day chart: CSS class, name, value of a day.
type Series<'a> = (&'static str, &'a str, fn(&DayUsage) -> u64);

/// A stacked bar per day; `series` from bottom to top.
fn day_chart(id: &'static str, title: &str, unit: &str, days: &[DayUsage], series: &[Series]) -> DayChart {
    let (width, height) = (1000, 250);
    let (left, right, top, bottom) = (52.0, 992.0, 10.0, 220.0);
    let plot_h = bottom - top;
    let total = |d: &DayUsage| series.iter().map(|(_, _, f)| f(d)).sum::<u64>();
    let max = days.iter().map(total).max().unwrap_or(0);
    let step = nice_step(max as f64 / 4.0);
    let scale = plot_h / (step * 4.0);
    let ticks = (0..=4)
        .map(|i| {
            let y = r1(bottom - f64::from(i) * step * scale);
            Tick { y, text_y: r1(y + 4.0), label: compact((f64::from(i) * step) as u64) }
        })
        .collect();
    let slot_w = (right - left) / days.len().max(1) as f64;
    let w = r1(slot_w * 0.7);
    let bars = days
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let slot_x = left + i as f64 * slot_w;
            let mut acc = 0u64;
            let segments = series
                .iter()
                .filter_map(|(class, _, f)| {
                    let v = f(d);
                    if v == 0 {
                        return None;
                    }
                    let y0 = bottom - acc as f64 * scale;
                    acc += v;
                    let h = (v as f64 * scale).max(1.0);
                    Some(Segment { class, y: r1(y0 - h), h: r1(h) })
                })
                .collect();
            let parts: Vec<String> = series.iter().map(|(_, name, f)| format!("{name} {}", num(f(d)))).collect();
            let detail = if series.len() > 1 { format!(" ({})", parts.join(", ")) } else { String::new() };
            let date = NaiveDate::parse_from_str(&d.day, "%Y-%m-%d").ok();
            // Weekly labels, counted back from today so today is always labelled.
            let label = ((days.len() - 1 - i) % 7 == 0).then(|| date.map_or(d.day.clone(), |dt| dt.format("%-d %b").to_string()));
            DayBar {
                day: d.day.clone(),
                title: format!("{}: {} {unit}{detail}", d.day, num(total(d))),
                slot_x: r1(slot_x),
                slot_w: r1(slot_w),
                x: r1(slot_x + (slot_w - w) / 2.0),
                w,
                cx: r1(slot_x + slot_w / 2.0),
                label,
                segments,
            }
        })
        .collect();
    let busiest = days.iter().max_by_key(|d| total(d)).filter(|d| total(d) > 0);
    let desc = match (days.first(), days.last(), busiest) {
        (Some(a), Some(b), Some(m)) => {
            format!("{unit} per day from {} to {}; the most, {}, on {}.", a.day, b.day, num(total(m)), m.day)
        }
        (Some(a), Some(b), None) => format!("No {unit} from {} to {}.", a.day, b.day),
        _ => format!("No {unit}."),
    };
    DayChart {
        id,
        title: title.to_string(),
        desc,
        width,
        height,
        left,
        right,
        top,
        bottom,
        plot_h,
        tick_x: left - 6.0,
        label_y: bottom + 18.0,
        ticks,
        bars,
    }
}

#[derive(Serialize)]
struct ModelRow {
    model: String,
    label: String,
    title: String,
    text_y: f64,
    bar_y: f64,
    prompt_w: f64,
    completion_x: f64,
    completion_w: f64,
    value_x: f64,
    value: String,
}

#[derive(Serialize)]
struct ModelChart {
    id: &'static str,
    title: String,
    desc: String,
    width: u32,
    height: u32,
    label_x: f64,
    bar_x: f64,
    bar_h: f64,
    rows: Vec<ModelRow>,
}

const CHART_MODELS: usize = 12;

/// Horizontal bars of tokens per model (prompt + completion), the biggest
/// first; past a dozen models the rest share one bar.
fn model_chart(models: &[ModelUsage]) -> ModelChart {
    let mut shown: Vec<ModelUsage> = models.iter().take(CHART_MODELS).cloned().collect();
    if models.len() > CHART_MODELS {
        let rest = &models[CHART_MODELS..];
        shown.push(ModelUsage {
            model: format!("{} other models", rest.len()),
            requests: rest.iter().map(|m| m.requests).sum(),
            prompt_tokens: rest.iter().map(|m| m.prompt_tokens).sum(),
            completion_tokens: rest.iter().map(|m| m.completion_tokens).sum(),
        });
    }
    let width = 1000;
    let (label_w, row_h, bar_h, value_w) = (230.0, 30.0, 18.0, 90.0);
    let bar_x = label_w;
    let max = shown.iter().map(|m| m.prompt_tokens + m.completion_tokens).max().unwrap_or(0).max(1) as f64;
    let scale = (f64::from(width) - bar_x - value_w) / max;
    let rows = shown
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let y = i as f64 * row_h + 6.0;
            let (pw, cw) = (r1(m.prompt_tokens as f64 * scale), r1(m.completion_tokens as f64 * scale));
            let label: String = if m.model.chars().count() > 30 {
                m.model.chars().take(29).chain(std::iter::once('…')).collect()
            } else {
                m.model.clone()
            };
            ModelRow {
                model: m.model.clone(),
                label,
                title: format!(
                    "{}: {} tokens (prompt {}, completion {}) in {} requests",
                    m.model,
                    num(m.prompt_tokens + m.completion_tokens),
                    num(m.prompt_tokens),
                    num(m.completion_tokens),
                    num(m.requests)
                ),
                text_y: r1(y + bar_h / 2.0 + 5.0),
                bar_y: r1(y),
                prompt_w: pw,
                completion_x: r1(bar_x + pw),
                completion_w: cw,
                value_x: r1(bar_x + pw + cw + 6.0),
                value: compact(m.prompt_tokens + m.completion_tokens),
            }
        })
        .collect::<Vec<_>>();
    let desc = match shown.first() {
        Some(m) => format!("{} models; the most tokens: {} ({}).", models.len(), m.model, num(m.prompt_tokens + m.completion_tokens)),
        None => "No requests.".to_string(),
    };
    ModelChart {
        id: "models-chart",
        title: "Tokens per model".into(),
        desc,
        width,
        height: (rows.len() as f64 * row_h + 10.0).ceil() as u32,
        label_x: label_w - 10.0,
        bar_x,
        bar_h,
        rows,
    }
}

/// Today's usage from the quota store (live; the database has it only
/// after the next flush), for one key or all.
async fn live_today(app: &AppState, keys: &[KeyRecord], key: Option<i64>) -> Result<DayUsage, UiError> {
    let mut today = DayUsage { day: app.quota.periods().day.clone(), ..DayUsage::default() };
    for k in keys.iter().filter(|k| key.is_none_or(|id| id == k.id)) {
        let s = app.quota.status_of(&app.db, k.id, k.limits).await.map_err(ApiError::quota_store)?;
        today.requests += s.day.net_requests();
        today.prompt_tokens += s.day.prompt_tokens;
        today.completion_tokens += s.day.completion_tokens;
    }
    Ok(today)
}

async fn usage_page(
    State(ui): State<UiState>,
    Extension(s): Extension<Session>,
    Query(q): Query<UsageQuery>,
) -> Result<Html<String>, UiError> {
    let app = &ui.app;
    let key = parse_key(&q.key)?;
    let tz = app.quota.tz();
    let keys = app.db.list_keys().await.map_err(api::db_err)?;
    let selected_name = match key {
        Some(id) => Some(keys.iter().find(|k| k.id == id).ok_or_else(|| not_found(id))?.name.clone()),
        None => None,
    };
    let last = today(app);
    let first = last - Days::new(CHART_DAYS - 1);
    let (first_s, last_s) = (first.format("%Y-%m-%d").to_string(), last.format("%Y-%m-%d").to_string());
    let stored = app.db.daily_usage(key, &first_s, &last_s).await.map_err(api::db_err)?;
    let live = live_today(app, &keys, key).await?;
    let days: Vec<DayUsage> = first
        .iter_days()
        .take(CHART_DAYS as usize)
        .map(|d| {
            let day = d.format("%Y-%m-%d").to_string();
            if day == live.day {
                return live.clone();
            }
            stored.iter().find(|u| u.day == day).cloned().unwrap_or(DayUsage { day, ..DayUsage::default() })
        })
        .collect();
    let models = app
        .db
        .model_usage(key, start_of(first, tz).timestamp_millis(), start_of(last + Days::new(1), tz).timestamp_millis())
        .await
        .map_err(api::db_err)?;
    let tokens_chart = day_chart(
        "tokens-chart",
        "Tokens per day",
        "tokens",
        &days,
        &[("prompt", "prompt", |d| d.prompt_tokens), ("completion", "completion", |d| d.completion_tokens)],
    );
    let requests_chart = day_chart("requests-chart", "Requests per day", "requests", &days, &[("requests", "requests", |d| d.requests)]);
    let totals = json!({
        "tokens": num(days.iter().map(|d| d.prompt_tokens + d.completion_tokens).sum()),
        "requests": num(days.iter().map(|d| d.requests).sum()),
    });
    let day_rows: Vec<Value> = days
        .iter()
        .rev()
        .map(|d| json!({"day": d.day, "requests": num(d.requests), "prompt_tokens": num(d.prompt_tokens), "completion_tokens": num(d.completion_tokens)}))
        .collect();
    let model_rows: Vec<Value> = models
        .iter()
        .map(|m| json!({"model": m.model, "requests": num(m.requests), "prompt_tokens": num(m.prompt_tokens), "completion_tokens": num(m.completion_tokens)}))
        .collect();
    let key_list: Vec<Value> = keys.iter().map(|k| json!({"id": k.id, "name": k.name, "key_prefix": k.key_prefix})).collect();
    render(
        "usage.html",
        context! {
            keys => Serde(key_list),
            selected => key,
            selected_name,
            from_day => first_s,
            to_day => last_s,
            flush => format!("{} s", app.config.flush_interval.as_secs_f64()),
            retention_days => app.config.usage_retention_days,
            tokens_chart => Serde(tokens_chart),
            requests_chart => Serde(requests_chart),
            models_chart => Serde(model_chart(&models)),
            days => Serde(day_rows),
            models => Serde(model_rows),
            totals => Serde(totals),
            ..page(&ui, &s, "usage"),
        },
    )
}

#[derive(Deserialize)]
struct CsvQuery {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    key: String,
}

const CSV_HEADER: &str = "request_id,time,key,route,model,status,prompt_tokens,completion_tokens,duration_ms,outcome\r\n";
const CSV_PAGE: i64 = 1000;

/// One CSV field (RFC 4180 quoting). Text a spreadsheet would run as a
/// formula (`=`, `+`, `-`, `@` first: model names come from clients) gets a
/// leading `'`.
fn csv_field(out: &mut String, s: &str) {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{s}") } else { s.to_string() };
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(&s);
    }
}

fn csv_row(out: &mut String, e: &EventRow, tz: Tz) {
    let time = DateTime::from_timestamp_millis(e.ts_ms)
        .map(|t| t.with_timezone(&tz).to_rfc3339_opts(chrono::SecondsFormat::Millis, false))
        .unwrap_or_default();
    let key = e.key_name.clone().unwrap_or_else(|| format!("#{} (deleted)", e.key_id));
    let numbers = [e.status.to_string(), e.prompt_tokens.to_string(), e.completion_tokens.to_string(), e.duration_ms.to_string()];
    for (i, field) in [&e.request_id, &time, &key, &e.route, &e.model].into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        csv_field(out, field);
    }
    for n in &numbers {
        out.push(',');
        out.push_str(n);
    }
    out.push(',');
    csv_field(out, &e.outcome);
    out.push_str("\r\n");
}

/// `usage_events` in a local date range as CSV, streamed page by page.
async fn usage_csv(State(ui): State<UiState>, Query(q): Query<CsvQuery>) -> Result<Response, UiError> {
    let app = &ui.app;
    let tz = app.quota.tz();
    let last = today(app);
    let date = |raw: &str, default: NaiveDate, what: &str| -> Result<NaiveDate, UiError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Ok(default);
        }
        NaiveDate::parse_from_str(raw, "%Y-%m-%d")
            .map_err(|_| UiError::Status(StatusCode::BAD_REQUEST, format!("{what} must be a date like 2026-11-27, not {raw:?}")))
    };
    let from = date(&q.from, last - Days::new(CHART_DAYS - 1), "from")?;
    let to = date(&q.to, last, "to")?;
    if from > to {
        return Err(UiError::Status(StatusCode::BAD_REQUEST, format!("from ({from}) is after to ({to})")));
    }
    let key = parse_key(&q.key)?;
    let (from_ms, to_ms) = (start_of(from, tz).timestamp_millis(), start_of(to + Days::new(1), tz).timestamp_millis());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let db = app.db.clone();
    app.tasks.spawn(async move {
        if tx.send(Ok(Bytes::from_static(CSV_HEADER.as_bytes()))).await.is_err() {
            return;
        }
        let mut after = 0;
        loop {
            let rows = match db.events_page(key, from_ms, to_ms, after, CSV_PAGE).await {
                Ok(rows) => rows,
                Err(e) => {
                    // Breaking the stream makes the download fail visibly instead of ending short.
                    tracing::error!(error = %e, "CSV export: reading usage events failed");
                    let _ = tx.send(Err(std::io::Error::other("database error"))).await;
                    return;
                }
            };
            let mut chunk = String::with_capacity(rows.len() * 160);
            for e in &rows {
                csv_row(&mut chunk, e, tz);
            }
            if !chunk.is_empty() && tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                return;
            }
            match rows.last() {
                Some(last) if rows.len() as i64 == CSV_PAGE => after = last.id,
                _ => return,
            }
        }
    });
    let filename = format!("attachment; filename=\"llm-quota-usage-{from}-to-{to}.csv\"");
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8")),
            (header::CONTENT_DISPOSITION, HeaderValue::from_str(&filename).expect("ASCII file name")),
        ],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles_and_every_asset_has_a_version() {
        for (name, _) in TEMPLATE_FILES {
            assert!(TEMPLATES.get_template(name).is_ok(), "{name}");
        }
        for a in ASSETS {
            assert!(asset_url(a.name.to_string()).unwrap().starts_with(&format!("/static/{}?v=", a.name)));
        }
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(0), "0");
        assert_eq!(num(999), "999");
        assert_eq!(num(1000), "1,000");
        assert_eq!(num(1234567), "1,234,567");
        assert_eq!(compact(950), "950");
        assert_eq!(compact(1000), "1k");
        assert_eq!(compact(12_345), "12k");
        assert_eq!(compact(2_500_000), "2.5M");
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(120.0), 200.0);
    }

    #[test]
    fn bars_change_colour_at_70_and_90_percent() {
        let level = |used, limit| bar("x", "x", used, limit, "d", None)["level"].as_str().unwrap().to_string();
        assert_eq!(level(69, Some(100)), "ok");
        assert_eq!(level(70, Some(100)), "warn");
        assert_eq!(level(89, Some(100)), "warn");
        assert_eq!(level(90, Some(100)), "over");
        assert_eq!(level(500, Some(100)), "over");
        assert_eq!(level(0, Some(0)), "over", "a zero limit allows nothing");
        assert_eq!(level(5, None), "none");
        assert_eq!(bar("x", "x", 500, Some(100), "d", None)["width"], 100.0);
        assert_eq!(bar("x", "x", 5, None, "d", None)["limit"], "∞");
    }

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        let mut s = String::new();
        for f in ["plain", "a,b", "say \"hi\"", "=HYPERLINK(\"x\")", "-1", "line\nbreak"] {
            csv_field(&mut s, f);
            s.push('|');
        }
        assert_eq!(s, "plain|\"a,b\"|\"say \"\"hi\"\"\"|\"'=HYPERLINK(\"\"x\"\")\"|'-1|\"line\nbreak\"|");
    }

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(safe_next("/usage?key=1"), "/usage?key=1");
        for bad in ["https://evil.example", "//evil.example", "/\\evil.example", "", "/login?next=/", "javascript:alert(1)"] {
            assert_eq!(safe_next(bad), "/", "{bad}");
        }
    }

    #[test]
    fn form_strings_become_api_fields() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let form: HashMap<String, String> = [
            ("name", " team "),
            ("daily_token_limit", ""),
            ("monthly_token_limit", "5000"),
            ("expires_at", "2027-01-31T00:00"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let body = api_body(&form, tz, None).unwrap();
        assert_eq!(body["daily_token_limit"], Value::Null);
        assert_eq!(body["monthly_token_limit"], 5000);
        assert_eq!(body["expires_at"], "2027-01-30T23:00:00+00:00", "local time in APP_TZ");
        assert!(!body.contains_key("daily_request_limit"), "absent fields stay absent");
        let bad: HashMap<String, String> = [("daily_request_limit".to_string(), "ten".to_string())].into_iter().collect();
        assert_eq!(api_body(&bad, tz, None).unwrap_err().field.as_deref(), Some("daily_request_limit"));
        let gap: HashMap<String, String> = [("expires_at".to_string(), "2027-03-28T02:30".to_string())].into_iter().collect();
        assert_eq!(api_body(&gap, tz, None).unwrap_err().field.as_deref(), Some("expires_at"), "a time the DST switch skips");
    }

    #[test]
    fn day_chart_scales_to_the_busiest_day() {
        let days: Vec<DayUsage> = (1..=30)
            .map(|d| DayUsage { day: format!("2026-11-{d:02}"), requests: d, prompt_tokens: d * 10, completion_tokens: 0 })
            .collect();
        let c = day_chart("t", "t", "requests", &days, &[("requests", "requests", |d| d.requests)]);
        assert_eq!(c.ticks.last().unwrap().label, "40", "30 rounds up to 4 steps of 10");
        let tallest = c.bars.last().unwrap().segments[0].h;
        assert!((tallest - c.plot_h * 30.0 / 40.0).abs() < 0.2, "{tallest}");
        assert!(c.bars.last().unwrap().label.is_some(), "today is labelled");
        assert!(c.desc.contains("2026-11-30"), "{}", c.desc);
    }
}
