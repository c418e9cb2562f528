//! One error type, rendered in the caller's protocol: an OpenAI error object
//! on `/v1`, `{"error": "…"}` on Ollama's `/api`, FastAPI's `{"detail": …}`
//! on the admin API. 5xx bodies are opaque; the cause is logged once.

use axum::{
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    OpenAi,
    Ollama,
    Admin,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub protocol: Protocol,
    /// For 422: the offending field.
    pub field: Option<String>,
    pub headers: HeaderMap,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), protocol: Protocol::Admin, field: None, headers: HeaderMap::new() }
    }

    pub fn in_protocol(mut self, p: Protocol) -> Self {
        self.protocol = p;
        self
    }

    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 422 naming the field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, message);
        e.field = Some(field.to_string());
        e
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// A 500 whose cause is logged here and not shown to the client.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }

    /// 503 for a failed quota store call. One that found no answer in time
    /// says so: under overload it is often this replica, not the store, that
    /// is slow, and "unavailable" would send an operator to the wrong place.
    pub fn quota_store(e: crate::quota::QuotaError) -> Self {
        if e.timed_out() {
            tracing::error!(error = %e, "the quota store did not answer in time");
            return Self::unavailable("quota store did not answer in time, try again shortly");
        }
        Self::dependency("quota store", e)
    }

    /// A dependency (database, quota store) is down: 503, cause logged.
    pub fn dependency(what: &str, cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, dependency = what, "dependency unavailable");
        Self::unavailable(format!("{what} unavailable, try again shortly"))
    }

    fn openai_type(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "api_error",
            _ => "invalid_request_error",
        }
    }

    fn openai_code(&self) -> serde_json::Value {
        match self.status {
            StatusCode::UNAUTHORIZED => json!("invalid_api_key"),
            StatusCode::TOO_MANY_REQUESTS => json!("rate_limit_exceeded"),
            StatusCode::PAYLOAD_TOO_LARGE => json!("request_too_large"),
            _ => json!(null),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.protocol {
            Protocol::OpenAi => json!({"error": {
                "message": self.message,
                "type": self.openai_type(),
                "param": self.field,
                "code": self.openai_code(),
            }}),
            Protocol::Ollama => json!({"error": self.message}),
            Protocol::Admin => match &self.field {
                Some(field) => json!({"detail": [{"loc": ["body", field], "msg": self.message, "type": "value_error"}]}),
                None => json!({"detail": self.message}),
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        resp.headers_mut().extend(self.headers);
        resp
    }
}
