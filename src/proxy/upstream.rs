//! Talking to the upstream: pooled clients, strict timeouts, and the
//! mapping of transport failures to 502 / 504.
//!
//! Generation requests to a plain-HTTP upstream that no proxy variable
//! applies to (the usual Ollama or vLLM beside the gateway) go through
//! hyper's own pooled HTTP/1.1 client: it does per request what the
//! gateway needs and no more. reqwest, on top of the same client, also
//! parses the URL twice (its redirect layer) and wraps the request in
//! layers the gateway does not use: about 25 k instructions a request, 11 %
//! of a whole `/api/chat` through the gateway (callgrind). HTTPS upstreams,
//! URLs with credentials, upstreams behind `HTTP_PROXY`/`HTTPS_PROXY`/
//! `ALL_PROXY`, and every other upstream call (`/api/tags`, `/v1/models`,
//! the admin's connection test) keep reqwest, with its TLS, basic auth and
//! proxy handling. `UPSTREAM_CLIENT=reqwest`
//! sends everything through reqwest.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode, Uri};
use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper_util::{
    client::{
        legacy::{connect::HttpConnector, Client},
        proxy::matcher::Matcher,
    },
    rt::{TokioExecutor, TokioTimer},
};
use serde_json::Value;

use crate::{
    config::{Config, UpstreamClient},
    error::ApiError,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An upstream response's body, whichever client brought it.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// An upstream response, whichever client brought it.
pub type Response = axum::http::Response<Body>;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle upstream connections left from a burst of streams are kept up to
/// this many; the rest close.
const POOL_MAX_IDLE: usize = 64;

/// hyper's pooled HTTP/1.1 client, for plain-HTTP upstreams.
pub type Direct = Client<HttpConnector, Full<Bytes>>;

pub fn client(config: &Config) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(config.upstream_connect_timeout)
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        .tcp_nodelay(true)
        .build()
        .expect("static reqwest configuration is valid")
}

pub fn direct_client(config: &Config) -> Direct {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.upstream_connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// Where a generation route's requests go, and through which client.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Direct(Uri),
    Reqwest(reqwest::Url),
}

/// The proxy variables (`HTTP_PROXY`, `NO_PROXY`, …), read as reqwest
/// reads them.
pub fn proxies_from_env() -> Matcher {
    Matcher::from_env()
}

impl Target {
    /// The target for `url`, or `None` when it does not parse; `proxies`
    /// decide whether a plain-HTTP URL may go direct.
    pub fn new(url: &str, choice: UpstreamClient, proxies: &Matcher) -> Option<Target> {
        let parsed = reqwest::Url::parse(url).ok()?;
        // Credentials in the URL become reqwest's basic auth; hyper's
        // client would drop them.
        let plain = parsed.scheme() == "http" && parsed.username().is_empty() && parsed.password().is_none();
        if choice == UpstreamClient::Auto && plain {
            if let Ok(uri) = url.parse::<Uri>() {
                if proxies.intercept(&uri).is_none() {
                    return Some(Target::Direct(uri));
                }
            }
        }
        Some(Target::Reqwest(parsed))
    }
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

/// The deepest cause of `e`: connection refused, DNS…, without the
/// URL's credentials that the outer errors may show.
fn root_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> &'a (dyn std::error::Error + 'static) {
    let mut cause = e;
    while let Some(src) = cause.source() {
        cause = src;
    }
    cause
}

/// A connection that cannot be made, in time or at all, is 502 (as the
/// configuration table says of `UPSTREAM_CONNECT_TIMEOUT`); 504 is for an
/// upstream that took the request and did not answer in time.
fn classify(e: reqwest::Error) -> UpstreamFailure {
    if e.is_timeout() && !e.is_connect() {
        UpstreamFailure::Timeout
    } else {
        UpstreamFailure::Unreachable(root_cause(&e).to_string())
    }
}

/// hyper's client has no timeout of its own past the connect timeout:
/// every error is the upstream's failing to take the request.
fn classify_direct(e: hyper_util::client::legacy::Error) -> UpstreamFailure {
    UpstreamFailure::Unreachable(root_cause(&e).to_string())
}

/// Waits at most `timeout` for `sent`, an upstream's response headers.
async fn within<T, E>(
    timeout: Duration,
    sent: impl std::future::Future<Output = Result<T, E>>,
    classify: fn(E) -> UpstreamFailure,
) -> Result<T, UpstreamFailure> {
    tokio::time::timeout(timeout, sent).await.map_err(|_| UpstreamFailure::Timeout)?.map_err(classify)
}

/// Send a request and wait at most `timeout` for the response headers.
pub async fn send(req: reqwest::RequestBuilder, timeout: Duration) -> Result<reqwest::Response, UpstreamFailure> {
    within(timeout, req.send(), classify).await
}

/// A response with its body boxed as [`Body`], whichever client brought it.
fn boxed<B>(resp: axum::http::Response<B>) -> Response
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    resp.map(|b| b.map_err(Into::into).boxed_unsync())
}

/// POST `json` to `target` and wait at most `timeout` for the response
/// headers.
pub async fn post_json(
    direct: &Direct,
    http: &reqwest::Client,
    target: &Target,
    json: Bytes,
    timeout: Duration,
) -> Result<Response, UpstreamFailure> {
    match target {
        Target::Direct(uri) => {
            let mut req = axum::http::Request::new(Full::new(json));
            *req.method_mut() = axum::http::Method::POST;
            *req.uri_mut() = uri.clone();
            let h = req.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
            within(timeout, direct.request(req), classify_direct).await.map(boxed)
        }
        Target::Reqwest(url) => {
            let req = http.post(url.clone()).header(header::CONTENT_TYPE, "application/json").body(json);
            send(req, timeout).await.map(|resp| boxed(axum::http::Response::from(resp)))
        }
    }
}

/// The next piece of `body`'s data (trailers are skipped), or `None` at
/// its end. Cancel-safe: a read not finished loses nothing.
pub async fn chunk(body: &mut Body) -> Result<Option<Bytes>, BoxError> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            return Ok(Some(data));
        }
    }
    Ok(None)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_goes_direct_unless_a_proxy_applies() {
        let none = Matcher::builder().build();
        let proxy = Matcher::builder().http("http://proxy.corp:3128").no("ollama.local").build();
        let direct = |url: &str, m: &Matcher| matches!(Target::new(url, UpstreamClient::Auto, m), Some(Target::Direct(_)));
        assert!(direct("http://gpu:11434/api/chat", &none));
        assert!(!direct("http://gpu:11434/api/chat", &proxy), "HTTP_PROXY applies: reqwest proxies it");
        assert!(direct("http://ollama.local:11434/api/chat", &proxy), "NO_PROXY exempts it");
        assert!(!direct("https://api.example.com/v1/chat/completions", &none), "TLS stays with reqwest");
        assert!(!direct("http://user:secret@gpu:11434/api/chat", &none), "reqwest sends the URL's credentials");
        assert!(matches!(
            Target::new("http://gpu:11434/api/chat", UpstreamClient::Reqwest, &none),
            Some(Target::Reqwest(_))
        ));
        assert_eq!(Target::new("not a url", UpstreamClient::Auto, &none), None);
    }
}
