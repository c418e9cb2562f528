//! The floor: a bare reverse proxy with the gateway's own stack (tokio's
//! multi-thread runtime, hyper server, hyper's pooled client)
//! and nothing else — no key check, no quota, no token counting, no parsing.
//! It runs on the gateway's CPU, so "added by the floor" is what one more
//! HTTP hop costs on this machine, and the gateway's added minus the floor's
//! is what llm-quota itself adds.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The floor's client: hyper's pooled HTTP/1.1 client, as the gateway's
/// for a plain-HTTP upstream.
type Client = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Forwards every request to `upstream` and streams the answer back.
pub async fn serve(listener: tokio::net::TcpListener, upstream: String) {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(client.clone(), upstream.clone(), req));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn forward(client: Client, upstream: String, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(fail(StatusCode::BAD_REQUEST, e.to_string())),
    };
    let uri: hyper::Uri = match format!("{upstream}{}", parts.uri.path()).parse() {
        Ok(u) => u,
        Err(e) => return Ok(fail(StatusCode::BAD_GATEWAY, e.to_string())),
    };
    let mut out = Request::builder().method(parts.method).uri(uri);
    if let Some(ct) = parts.headers.get(hyper::header::CONTENT_TYPE) {
        out = out.header(hyper::header::CONTENT_TYPE, ct);
    }
    let out = out.body(Full::new(body)).expect("valid request");
    let answer = match client.request(out).await {
        Ok(a) => a,
        Err(e) => return Ok(fail(StatusCode::BAD_GATEWAY, e.to_string())),
    };
    let mut response = Response::builder().status(answer.status());
    if let Some(ct) = answer.headers().get(hyper::header::CONTENT_TYPE) {
        response = response.header(hyper::header::CONTENT_TYPE, ct);
    }
    let body = answer.into_body().map_err(std::io::Error::other);
    Ok(response.body(BodyExt::boxed_unsync(body)).expect("valid response"))
}

fn fail(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg)).map_err(|e: Infallible| match e {}).boxed_unsync());
    *r.status_mut() = status;
    r
}
