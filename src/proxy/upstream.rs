//! Talking to the upstream: one pooled client, strict timeouts, and the
//! mapping of transport failures to 502 / 504.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;

use crate::{config::Config, error::ApiError};

pub fn client(config: &Config) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(config.upstream_connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        // Idle upstream connections left from a burst of streams are kept
        // up to this many; the rest close.
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .build()
        .expect("static reqwest configuration is valid")
}

/// Why an upstream call produced no usable response.
#[derive(Debug)]
pub enum UpstreamFailure {
    Unreachable(String),
    Timeout,
}

impl UpstreamFailure {
    pub fn into_error(self) -> ApiError {
        match self {
            UpstreamFailure::Unreachable(cause) => {
                tracing::warn!(error = %cause, "upstream unreachable");
                ApiError::new(StatusCode::BAD_GATEWAY, "upstream unreachable")
            }
            UpstreamFailure::Timeout => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "upstream timed out"),
        }
    }
}

fn classify(e: reqwest::Error) -> UpstreamFailure {
    if e.is_timeout() {
        UpstreamFailure::Timeout
    } else {
        // Show the root cause (connection refused, DNS…) without the URL's credentials.
        let mut cause: &dyn std::error::Error = &e;
        while let Some(src) = cause.source() {
            cause = src;
        }
        UpstreamFailure::Unreachable(cause.to_string())
    }
}

/// Send a request and wait at most `timeout` for the response headers.
pub async fn send(req: reqwest::RequestBuilder, timeout: Duration) -> Result<reqwest::Response, UpstreamFailure> {
    match tokio::time::timeout(timeout, req.send()).await {
        Err(_) => Err(UpstreamFailure::Timeout),
        Ok(Err(e)) => Err(classify(e)),
        Ok(Ok(resp)) => Ok(resp),
    }
}

/// GET a JSON document from the upstream (`/api/tags`, `/v1/models`, …).
pub async fn get_json(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    timeout: Duration,
) -> Result<(StatusCode, Value), UpstreamFailure> {
    let resp = send(http.get(format!("{base}{path}")), timeout).await?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let bytes = tokio::time::timeout(timeout, resp.bytes())
        .await
        .map_err(|_| UpstreamFailure::Timeout)?
        .map_err(classify)?;
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, value))
}
