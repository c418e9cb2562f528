//! The admin JSON API, with the Python proxy's paths, fields and meaning.
//! Every route requires `Authorization: Bearer <ADMIN_PASSWORD>`.

use axum::{
    extract::{rejection::JsonRejection, FromRequestParts, Path, Request, State},
    http::{header, request::Parts, HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, patch, put},
    Json, Router,
};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    error::ApiError,
    proxy::upstream,
    quota::{buckets::start_of, Limits, QuotaStatus},
    store::{
        keys::{ts, KeyRecord, NewKey},
        settings,
    },
    AppState,
};

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api-keys", get(list_keys).post(create_key))
        .route("/api-keys/{id}", axum::routing::delete(delete_key))
        .route("/api-keys/{id}/quota", patch(update_quota))
        .route("/api-keys/{id}/activate", put(activate))
        .route("/api-keys/{id}/deactivate", put(deactivate))
        .route("/settings", get(get_settings).put(put_settings))
        .route("/ollama-models", get(ollama_models))
        .route("/proxy-info", get(proxy_info))
        .fallback(|| async { ApiError::not_found("not found") })
        .route_layer(middleware::from_fn_with_state(state, require_admin))
}

/// Compare digests so neither content nor length leaks through timing.
pub fn password_matches(given: &str, expected: &str) -> bool {
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.ct_eq(&b).into()
}

async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(pw) if password_matches(pw, state.admin_password.expose()) => next.run(req).await,
        Some(_) => ApiError::unauthorized("wrong admin password").into_response(),
        None => ApiError::unauthorized("admin password required: Authorization: Bearer <ADMIN_PASSWORD>")
            .with_header(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"))
            .into_response(),
    }
}

/// A JSON body whose rejections come back as FastAPI-style 422s.
struct Body(Map<String, Value>);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<Value>::from_request(req, state).await {
            Ok(Json(Value::Object(m))) => Ok(Body(m)),
            Ok(Json(_)) => Err(ApiError::invalid("body", "expected a JSON object")),
            Err(JsonRejection::MissingJsonContentType(_)) => {
                Err(ApiError::invalid("body", "expected Content-Type: application/json"))
            }
            Err(e) => Err(ApiError::invalid("body", e.body_text())),
        }
    }
}

/// A key id from the path; anything but a positive integer is a 422.
struct KeyId(i64);

impl<S: Send + Sync> FromRequestParts<S> for KeyId {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::invalid("id", "missing key id"))?;
        raw.parse::<i64>().ok().filter(|i| *i > 0).map(KeyId).ok_or_else(|| ApiError::invalid("id", "must be a positive integer"))
    }
}

fn limit_field(body: &Map<String, Value>, field: &str) -> Result<Option<Option<u64>>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => match v.as_u64() {
            Some(n) => Ok(Some(Some(n))),
            None => Err(ApiError::invalid(field, "must be a non-negative integer or null")),
        },
    }
}

/// `2026-12-31T23:59:59Z`, an offset time, or a date (its local midnight
/// in `APP_TZ`, i.e. valid until that day starts).
fn expiry_field(body: &Map<String, Value>, tz: chrono_tz::Tz) -> Result<Option<Option<DateTime<Utc>>>, ApiError> {
    match body.get("expires_at") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(Some(None)),
        Some(Value::String(s)) => {
            let s = s.trim();
            if let Ok(t) = DateTime::parse_from_rfc3339(s) {
                return Ok(Some(Some(t.with_timezone(&Utc))));
            }
            if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f") {
                return Ok(Some(Some(t.and_utc())));
            }
            if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
                return Ok(Some(Some(start_of(d, tz))));
            }
            Err(ApiError::invalid("expires_at", "must be an ISO 8601 date or date-time"))
        }
        Some(_) => Err(ApiError::invalid("expires_at", "must be a string or null")),
    }
}

fn apply_limits(body: &Map<String, Value>, mut limits: Limits) -> Result<Limits, ApiError> {
    if let Some(v) = limit_field(body, "daily_token_limit")? {
        limits.daily_tokens = v;
    }
    if let Some(v) = limit_field(body, "monthly_token_limit")? {
        limits.monthly_tokens = v;
    }
    if let Some(v) = limit_field(body, "daily_request_limit")? {
        limits.daily_requests = v;
    }
    if let Some(v) = limit_field(body, "monthly_request_limit")? {
        limits.monthly_requests = v;
    }
    Ok(limits)
}

/// A key as the admin API shows it, with live usage.
pub fn key_json(k: &KeyRecord, s: &QuotaStatus) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "key_prefix": k.key_prefix,
        "created_at": ts(k.created_at),
        "expires_at": k.expires_at.map(ts),
        "is_active": k.is_active,
        "is_expired": k.is_expired(Utc::now()),
        "daily_token_limit": k.limits.daily_tokens,
        "monthly_token_limit": k.limits.monthly_tokens,
        "daily_request_limit": k.limits.daily_requests,
        "monthly_request_limit": k.limits.monthly_requests,
        "allowed_models": k.allowed_models,
        "tokens_used_today": s.day.tokens(),
        "tokens_used_month": s.month.tokens(),
        "requests_today": s.day.net_requests(),
        "requests_month": s.month.net_requests(),
        "tokens_reserved": s.day.reserved,
        "daily_reset_at": ts(s.day_start),
        "monthly_reset_at": ts(s.month_start),
        "next_daily_reset_at": ts(s.day_reset),
        "next_monthly_reset_at": ts(s.month_reset),
    })
}

pub(crate) async fn key_with_usage(state: &AppState, k: &KeyRecord) -> Result<Value, ApiError> {
    let status = state.quota.status_of(&state.db, k.id, k.limits).await.map_err(ApiError::quota_store)?;
    Ok(key_json(k, &status))
}

pub(crate) fn db_err(e: sqlx::Error) -> ApiError {
    ApiError::dependency("database", e)
}

async fn list_keys(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let keys = state.db.list_keys().await.map_err(db_err)?;
    let mut out = Vec::with_capacity(keys.len());
    for k in &keys {
        out.push(key_with_usage(&state, k).await?);
    }
    Ok(Json(Value::Array(out)))
}

async fn create_key(State(state): State<AppState>, Body(body): Body) -> Result<Json<Value>, ApiError> {
    let (rec, plaintext) = create_key_from(&state, &body).await?;
    let mut v = key_with_usage(&state, &rec).await?;
    v["key"] = json!(plaintext);
    v["api_key"] = json!(plaintext);
    Ok(Json(v))
}

/// Validate a new key's fields (the JSON API's, also used by the UI), store
/// it and tell the replicas; returns the record and the plaintext key.
pub(crate) async fn create_key_from(state: &AppState, body: &Map<String, Value>) -> Result<(KeyRecord, String), ApiError> {
    let name = match body.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() && s.trim().chars().count() <= 100 => s.trim().to_string(),
        Some(Value::String(_)) => return Err(ApiError::invalid("name", "must be 1 to 100 characters")),
        None | Some(Value::Null) => return Err(ApiError::invalid("name", "field required")),
        Some(_) => return Err(ApiError::invalid("name", "must be a string")),
    };
    let expires_at = expiry_field(body, state.quota.tz())?.flatten();
    let allowed_models = match body.get("allowed_models") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            Some(a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        }
        Some(_) => return Err(ApiError::invalid("allowed_models", "must be a list of model names or null")),
    };
    let new = NewKey { name, expires_at, limits: apply_limits(body, Limits::default())?, allowed_models };
    let (rec, plaintext) = state.db.create_key(&new, Utc::now()).await.map_err(db_err)?;
    state.admin_changed().await;
    Ok((rec, plaintext))
}

async fn found(state: &AppState, rec: Option<KeyRecord>, id: i64) -> Result<Json<Value>, ApiError> {
    let rec = rec.ok_or_else(|| ApiError::not_found(format!("API key {id} not found")))?;
    state.admin_changed().await;
    Ok(Json(key_with_usage(state, &rec).await?))
}

async fn update_quota(State(state): State<AppState>, KeyId(id): KeyId, Body(body): Body) -> Result<Json<Value>, ApiError> {
    let rec = update_quota_from(&state, id, &body).await?;
    Ok(Json(key_with_usage(&state, &rec).await?))
}

/// Apply the limits and expiry present in `body` (absent fields stay) and
/// tell the replicas; 404 when there is no such key.
pub(crate) async fn update_quota_from(state: &AppState, id: i64, body: &Map<String, Value>) -> Result<KeyRecord, ApiError> {
    let current = state.db.key_by_id(id).await.map_err(db_err)?.ok_or_else(|| ApiError::not_found(format!("API key {id} not found")))?;
    let limits = apply_limits(body, current.limits)?;
    let expires_at = expiry_field(body, state.quota.tz())?.unwrap_or(current.expires_at);
    let rec = state.db.update_key_quota(id, limits, expires_at).await.map_err(db_err)?;
    let rec = rec.ok_or_else(|| ApiError::not_found(format!("API key {id} not found")))?;
    state.admin_changed().await;
    Ok(rec)
}

async fn activate(State(state): State<AppState>, KeyId(id): KeyId) -> Result<Json<Value>, ApiError> {
    let rec = state.db.set_key_active(id, true).await.map_err(db_err)?;
    found(&state, rec, id).await
}

async fn deactivate(State(state): State<AppState>, KeyId(id): KeyId) -> Result<Json<Value>, ApiError> {
    let rec = state.db.set_key_active(id, false).await.map_err(db_err)?;
    found(&state, rec, id).await
}

async fn delete_key(State(state): State<AppState>, KeyId(id): KeyId) -> Result<Json<Value>, ApiError> {
    if !state.db.delete_key(id).await.map_err(db_err)? {
        return Err(ApiError::not_found(format!("API key {id} not found")));
    }
    state.admin_changed().await;
    Ok(Json(json!({"status": "deleted", "id": id})))
}

async fn get_settings(State(state): State<AppState>) -> Json<Value> {
    let s = state.settings.get();
    Json(json!({"ollama_url": s.ollama_url, "default_model": s.default_model}))
}

async fn put_settings(State(state): State<AppState>, Body(body): Body) -> Result<Json<Value>, ApiError> {
    put_settings_from(&state, &body).await?;
    Ok(get_settings(State(state)).await)
}

/// Validate and store `ollama_url` / `default_model` (absent fields stay)
/// and tell the replicas.
pub(crate) async fn put_settings_from(state: &AppState, body: &Map<String, Value>) -> Result<(), ApiError> {
    let url = match body.get("ollama_url") {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) => Some(
            crate::config::parse_url(u.trim()).map_err(|reason| ApiError::invalid("ollama_url", reason))?,
        ),
        Some(_) => return Err(ApiError::invalid("ollama_url", "must be a string")),
    };
    let model = match body.get("default_model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) if !m.trim().is_empty() => Some(m.trim().to_string()),
        Some(_) => return Err(ApiError::invalid("default_model", "must be a non-empty string")),
    };
    if let Some(u) = &url {
        state.db.put_setting(settings::OLLAMA_URL, u).await.map_err(db_err)?;
    }
    if let Some(m) = &model {
        state.db.put_setting(settings::DEFAULT_MODEL, m).await.map_err(db_err)?;
    }
    state.admin_changed().await;
    Ok(())
}

async fn ollama_models(State(state): State<AppState>) -> Result<Response, ApiError> {
    let base = state.settings.get().ollama_url.clone();
    let (status, body) =
        upstream::get_json(&state.http, &base, "/api/tags", state.config.upstream_timeout).await.map_err(|f| f.into_error())?;
    if !status.is_success() {
        return Err(ApiError::new(StatusCode::BAD_GATEWAY, format!("upstream answered {status}")));
    }
    Ok(Json(body).into_response())
}

async fn proxy_info(State(state): State<AppState>, headers: HeaderMap) -> Json<Value> {
    Json(proxy_info_value(&state, &headers))
}

/// How clients reach the proxy (also shown on the UI's proxy page).
pub(crate) fn proxy_info_value(state: &AppState, headers: &HeaderMap) -> Value {
    let c = &state.config;
    // The host the admin was reached by is the best guess at how clients reach the proxy.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.rsplit_once(':').map_or(h, |(host, _)| host).to_string())
        .unwrap_or_else(|| "localhost".into());
    let proxy_url = format!("http://{host}:{}", state.proxy_port());
    json!({
        "proxy_url": proxy_url,
        "proxy_host": c.proxy_host.to_string(),
        "proxy_port": state.proxy_port(),
        "openai_base_url": format!("{proxy_url}/v1"),
        "ollama_base_url": proxy_url,
        "upstream_url": state.settings.get().ollama_url,
        "default_model": state.settings.get().default_model,
        "timezone": c.app_tz.name(),
        "mode": if c.is_cluster() { "cluster" } else { "embedded" },
        "endpoints": [
            "POST /v1/chat/completions", "GET /v1/models", "GET /v1/quota",
            "POST /api/chat", "POST /api/generate", "GET /api/tags", "GET /api/version", "GET /api/quota",
        ],
        "version": env!("CARGO_PKG_VERSION"),
    })
}
