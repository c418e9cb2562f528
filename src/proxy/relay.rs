//! The relay: reads the upstream's stream frame by frame, meters every
//! completion token against the reservation (growing it by leases), and
//! either forwards each frame as it arrives or assembles the single
//! non-stream answer. It runs in its own task so that settlement happens
//! whatever the client does; a client that goes away cancels the upstream
//! request by dropping it.

use std::time::Instant;

use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::{ollama, openai};
use crate::{
    error::ApiError,
    metrics,
    quota::{Charge, Reservation},
    store::usage::UsageEvent,
    tokens, AppState,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OllamaChat,
    OllamaGenerate,
    OpenAiChat,
}

impl Dialect {
    pub fn route(self) -> &'static str {
        match self {
            Dialect::OllamaChat => "/api/chat",
            Dialect::OllamaGenerate => "/api/generate",
            Dialect::OpenAiChat => "/v1/chat/completions",
        }
    }

    fn is_sse(self) -> bool {
        self == Dialect::OpenAiChat
    }

    fn count(self, v: &Value) -> u64 {
        match self {
            Dialect::OpenAiChat => tokens::count_openai_chunk(v),
            _ => tokens::count_ollama_chunk(v),
        }
    }
}

/// One unit of the upstream stream: an NDJSON line or an SSE event's data.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    Data(String),
    /// SSE `data: [DONE]`
    Done,
}

/// Splits a byte stream into frames; holds at most one partial line.
#[derive(Debug, Default)]
struct Framer {
    sse: bool,
    buf: BytesMut,
    event: String,
}

impl Framer {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Everything left when the stream ends (a last line without newline).
    fn finish(&mut self) -> Option<Frame> {
        if !self.buf.is_empty() {
            self.buf.extend_from_slice(b"\n\n");
            return self.next_frame();
        }
        None
    }

    fn next_frame(&mut self) -> Option<Frame> {
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let raw = self.buf.split_to(pos + 1);
            let line = String::from_utf8_lossy(&raw[..pos]);
            let line = line.trim_end_matches('\r');
            if !self.sse {
                if !line.trim().is_empty() {
                    return Some(Frame::Data(line.to_string()));
                }
                continue;
            }
            if line.is_empty() {
                if self.event.is_empty() {
                    continue;
                }
                let data = std::mem::take(&mut self.event);
                return Some(if data.trim() == "[DONE]" { Frame::Done } else { Frame::Data(data) });
            }
            if let Some(data) = line.strip_prefix("data:") {
                if !self.event.is_empty() {
                    self.event.push('\n');
                }
                self.event.push_str(data.strip_prefix(' ').unwrap_or(data));
            }
            // comments (":…"), `event:`, `id:` and `retry:` lines carry nothing we relay
        }
        None
    }
}

/// How a relayed completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Complete,
    Quota,
    Disconnect,
    UpstreamError,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Quota => "quota",
            Outcome::Disconnect => "disconnect",
            Outcome::UpstreamError => "upstream_error",
        }
    }
}

/// Where the relay's output goes.
pub enum Sink {
    Stream(mpsc::Sender<Result<Bytes, std::io::Error>>),
    Whole(oneshot::Sender<Result<Value, ApiError>>),
}

/// What identifies one completion request, from admission to its usage event.
pub struct RequestMeta {
    pub request_id: String,
    pub key_id: i64,
    pub dialect: Dialect,
    pub model: String,
    pub started: Instant,
}

impl RequestMeta {
    /// The request's usage event (recorded once, when it is over).
    pub fn event(&self, now: chrono::DateTime<chrono::Utc>, day: &str, status: u16, tokens: (u64, u64), refunded: bool, outcome: &'static str) -> UsageEvent {
        UsageEvent {
            request_id: self.request_id.clone(),
            ts_ms: now.timestamp_millis(),
            day: day.to_string(),
            key_id: self.key_id,
            route: self.dialect.route().to_string(),
            model: self.model.clone(),
            status,
            prompt_tokens: tokens.0,
            completion_tokens: tokens.1,
            duration_ms: self.started.elapsed().as_millis() as u64,
            refunded,
            outcome,
        }
    }
}

pub struct RelayJob {
    pub state: AppState,
    pub meta: RequestMeta,
    pub reservation: Reservation,
    pub sink: Sink,
    /// OpenAI stream: the client asked for the usage chunk itself.
    pub client_wants_usage: bool,
    /// Time the gateway spent before calling the upstream.
    pub overhead: std::time::Duration,
    pub _in_flight: metrics::InFlight,
}

struct Run {
    metered: u64,
    upstream_usage: Option<(u64, u64)>,
    outcome: Option<Outcome>,
    error: Option<String>,
    /// The upstream's own error frame already went to the client.
    error_forwarded: bool,
    ollama: ollama::Assembler,
    openai: openai::Assembler,
    /// Ollama: the upstream's final chunk (non-stream answer shape).
    final_chunk: Option<Value>,
    /// OpenAI: a `finish_reason` arrived (a missing `[DONE]` is forgiven).
    saw_finish: bool,
}

impl RelayJob {
    pub async fn run(mut self, upstream: reqwest::Response) {
        let idle = self.state.config.upstream_idle_timeout;
        let mut run = Run {
            metered: 0,
            upstream_usage: None,
            outcome: None,
            error: None,
            ollama: ollama::Assembler::new(self.meta.dialect == Dialect::OllamaGenerate),
            openai: openai::Assembler::default(),
            final_chunk: None,
            saw_finish: false,
            error_forwarded: false,
        };
        let mut framer = Framer { sse: self.meta.dialect.is_sse(), ..Default::default() };
        let mut upstream = upstream;
        while run.outcome.is_none() {
            let frame = match framer.next_frame() {
                Some(f) => Some(f),
                None => match tokio::time::timeout(idle, upstream.chunk()).await {
                    Ok(Ok(Some(bytes))) => {
                        framer.push(&bytes);
                        continue;
                    }
                    Ok(Ok(None)) => framer.finish(),
                    Ok(Err(e)) => {
                        run.fail(format!("upstream stream broke: {e}"));
                        None
                    }
                    Err(_) => {
                        run.fail(format!("upstream sent nothing for {idle:?}"));
                        None
                    }
                },
            };
            match frame {
                Some(frame) => self.handle(&mut run, frame).await,
                None if run.outcome.is_none() && run.saw_finish => run.outcome = Some(Outcome::Complete),
                // The stream ended without its final chunk.
                None if run.outcome.is_none() => run.fail("upstream ended the stream early".into()),
                None => {}
            }
        }
        // Dropping the response cancels the upstream request.
        drop(upstream);
        self.finish(run).await;
    }

    fn client_gone(&self) -> bool {
        match &self.sink {
            Sink::Stream(tx) => tx.is_closed(),
            Sink::Whole(tx) => tx.is_closed(),
        }
    }

    async fn send(&mut self, run: &mut Run, bytes: Bytes) {
        if let Sink::Stream(tx) = &self.sink {
            if tx.send(Ok(bytes)).await.is_err() {
                run.outcome = Some(Outcome::Disconnect);
            }
        }
    }

    fn frame_bytes(&self, json: &str) -> Bytes {
        if self.meta.dialect.is_sse() {
            Bytes::from(format!("data: {json}\n\n"))
        } else {
            Bytes::from(format!("{json}\n"))
        }
    }

    async fn handle(&mut self, run: &mut Run, frame: Frame) {
        let data = match frame {
            Frame::Done => {
                self.send(run, Bytes::from_static(b"data: [DONE]\n\n")).await;
                run.outcome.get_or_insert(Outcome::Complete);
                return;
            }
            Frame::Data(d) => d,
        };
        let Ok(v) = serde_json::from_str::<Value>(&data) else {
            run.fail("upstream sent a chunk that is not JSON".into());
            return;
        };
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            let msg = err
                .as_str()
                .map(str::to_string)
                .or_else(|| err.get("message").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| err.to_string());
            // Pass the upstream's own error line on to a streaming client.
            let bytes = self.frame_bytes(&data);
            self.send(run, bytes).await;
            run.error_forwarded = true;
            run.fail(msg);
            return;
        }
        let n = self.meta.dialect.count(&v);
        if n > 0 {
            let need = self.reservation.prompt_tokens + run.metered + n;
            if need > self.reservation.held {
                let short = need - self.reservation.held;
                match self.state.quota.lease(&mut self.reservation, short).await {
                    Ok(_) if self.reservation.held >= need => {}
                    Ok(_) => {
                        self.end_at_quota(run).await;
                        return;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "lease failed; ending the completion");
                        self.end_at_quota(run).await;
                        return;
                    }
                }
            }
            run.metered += n;
        }
        match self.meta.dialect {
            Dialect::OpenAiChat => {
                run.openai.meta.observe(&v);
                run.saw_finish |= v
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_some_and(|cs| cs.iter().any(|c| c.get("finish_reason").is_some_and(|f| !f.is_null())));
                if let Some(u) = openai::usage(&v) {
                    run.upstream_usage = Some(u);
                }
                if openai::is_usage_chunk(&v) && !self.client_wants_usage {
                    // asked for by the gateway, not by the client
                } else if matches!(self.sink, Sink::Stream(_)) {
                    let bytes = self.frame_bytes(&data);
                    self.send(run, bytes).await;
                } else {
                    run.openai.push(&v);
                }
            }
            Dialect::OllamaChat | Dialect::OllamaGenerate => {
                let is_final = ollama::is_final(&v);
                if let Some(u) = ollama::usage(&v) {
                    run.upstream_usage = Some(u);
                }
                if matches!(self.sink, Sink::Stream(_)) {
                    let bytes = self.frame_bytes(&data);
                    self.send(run, bytes).await;
                } else if is_final {
                    run.final_chunk = Some(v);
                } else {
                    run.ollama.push(&v);
                }
                if is_final && run.outcome.is_none() {
                    run.outcome = Some(Outcome::Complete);
                }
            }
        }
        if run.outcome.is_none() && self.client_gone() {
            run.outcome = Some(Outcome::Disconnect);
        }
    }

    /// The key has nothing left: end the completion the way the protocol
    /// ends one that ran out of `max_tokens`.
    async fn end_at_quota(&mut self, run: &mut Run) {
        run.outcome = Some(Outcome::Quota);
        ::metrics::counter!(metrics::STREAMS_ENDED_AT_QUOTA, "route" => self.meta.dialect.route()).increment(1);
        let (prompt, completion) = (self.reservation.prompt_tokens, run.metered);
        if let Sink::Stream(_) = self.sink {
            let frames: Vec<Bytes> = match self.meta.dialect {
                Dialect::OpenAiChat => {
                    let mut out = vec![self.frame_bytes(&run.openai.meta.length_chunk().to_string())];
                    if self.client_wants_usage {
                        out.push(self.frame_bytes(&run.openai.meta.usage_chunk(prompt, completion).to_string()));
                    }
                    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                    out
                }
                d => {
                    let elapsed = self.meta.started.elapsed().as_nanos() as u64;
                    let chunk = ollama::length_chunk(d == Dialect::OllamaGenerate, &self.meta.model, prompt, completion, elapsed);
                    vec![self.frame_bytes(&chunk.to_string())]
                }
            };
            for f in frames {
                self.send(run, f).await;
            }
            if run.outcome == Some(Outcome::Disconnect) {
                run.outcome = Some(Outcome::Quota);
            }
        }
    }

    async fn finish(mut self, mut run: Run) {
        let outcome = run.outcome.unwrap_or(Outcome::UpstreamError);
        if outcome == Outcome::UpstreamError && !run.error_forwarded {
            // A stream that broke off gets an error in its protocol, so the
            // client can tell it from a complete answer.
            let msg = run.error.clone().unwrap_or_else(|| "upstream error".into());
            let frame = match self.meta.dialect {
                Dialect::OpenAiChat => json!({"error": {"message": msg, "type": "api_error", "param": null, "code": null}}),
                _ => json!({"error": msg}),
            };
            let bytes = self.frame_bytes(&frame.to_string());
            self.send(&mut run, bytes).await;
        }
        let refund = outcome == Outcome::UpstreamError && run.metered == 0;
        let (prompt, completion) = match (outcome, run.upstream_usage) {
            _ if refund => (0, 0),
            (Outcome::Complete, Some(u)) => u,
            _ => (self.reservation.prompt_tokens, run.metered),
        };
        let settling = Instant::now();
        if let Err(e) = self
            .state
            .quota
            .settle(&self.reservation, Charge { prompt_tokens: prompt, completion_tokens: completion, refund_request: refund })
            .await
        {
            // The reservation lapses and is charged what it held.
            tracing::error!(error = %e, "settle failed");
        }
        ::metrics::histogram!(metrics::GATEWAY_OVERHEAD, "route" => self.meta.dialect.route())
            .record((self.overhead + settling.elapsed()).as_secs_f64());
        let mut status = StatusCode::OK;
        if let Sink::Whole(tx) = self.sink {
            let answer = match outcome {
                Outcome::UpstreamError => {
                    status = StatusCode::BAD_GATEWAY;
                    Err(ApiError::new(status, run.error.clone().unwrap_or_else(|| "upstream error".into())))
                }
                _ => Ok(match self.meta.dialect {
                    Dialect::OpenAiChat => run.openai.finish(outcome == Outcome::Quota, (prompt, completion)),
                    d => {
                        let final_chunk = match (outcome, run.final_chunk) {
                            (Outcome::Complete, Some(f)) => f,
                            _ => ollama::length_chunk(
                                d == Dialect::OllamaGenerate,
                                &self.meta.model,
                                prompt,
                                completion,
                                self.meta.started.elapsed().as_nanos() as u64,
                            ),
                        };
                        run.ollama.finish(final_chunk)
                    }
                }),
            };
            let _ = tx.send(answer);
        }
        if let Some(err) = &run.error {
            tracing::warn!(request_id = %self.meta.request_id, error = %err, "upstream failed during the completion");
        }
        let event = self.meta.event(self.state.quota.now(), &self.reservation.resv.day, status.as_u16(), (prompt, completion), refund, outcome.as_str());
        self.state.events.record(event);
    }
}

impl Run {
    fn fail(&mut self, msg: String) {
        self.error = Some(msg);
        self.outcome = Some(Outcome::UpstreamError);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of a stream that arrives in `input`'s pieces.
    pub(super) fn frames(sse: bool, input: &[impl AsRef<[u8]>]) -> Vec<Frame> {
        let mut f = Framer { sse, ..Default::default() };
        let mut out = Vec::new();
        for part in input {
            f.push(part.as_ref());
            while let Some(fr) = f.next_frame() {
                out.push(fr);
            }
        }
        out.extend(f.finish());
        out
    }

    #[test]
    fn ndjson_lines_split_across_reads() {
        let out = frames(false, &["{\"a\":", "1}\n{\"b\"", ":2}\n\n{\"c\":3}"]);
        assert_eq!(out, vec![Frame::Data("{\"a\":1}".into()), Frame::Data("{\"b\":2}".into()), Frame::Data("{\"c\":3}".into())]);
    }

    #[test]
    fn sse_events_comments_and_done() {
        let out = frames(true, &[": keep-alive\n\ndata: {\"x\"", ":1}\r\n\r\ndata: [DONE]\n\n"]);
        assert_eq!(out, vec![Frame::Data("{\"x\":1}".into()), Frame::Done]);
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut out = Vec::new();
        let mut last = 0;
        for p in points {
            out.push(bytes[last..p].to_vec());
            last = p;
        }
        out.push(bytes[last..].to_vec());
        out
    }

    proptest! {
        /// However the network cuts a stream, the same frames come out.
        #[test]
        fn framing_does_not_depend_on_read_boundaries(
            lines in proptest::collection::vec("[a-z0-9{}\":, ]{0,40}", 0..20),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
            sse in any::<bool>(),
        ) {
            let body: String = if sse {
                lines.iter().map(|l| format!("data: {l}\n\n")).collect()
            } else {
                lines.iter().map(|l| format!("{l}\n")).collect()
            };
            let whole = super::tests::frames(sse, &[body.as_bytes()]);
            let pieces = super::tests::frames(sse, &split(body.as_bytes(), &cuts));
            prop_assert_eq!(whole, pieces);
        }

        /// Arbitrary bytes (invalid UTF-8, stray CRs, huge lines) never panic.
        #[test]
        fn framing_survives_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..2000), sse in any::<bool>()) {
            let _ = super::tests::frames(sse, &[bytes]);
        }

        /// Chunk counting and the assemblers accept any JSON without panicking.
        #[test]
        fn metering_and_assembly_accept_any_json(s in "\\PC{0,200}") {
            if let Ok(v) = serde_json::from_str::<Value>(&s) {
                let _ = tokens::count_openai_chunk(&v);
                let _ = tokens::count_ollama_chunk(&v);
                let mut a = openai::Assembler::default();
                a.push(&v);
                let _ = a.finish(false, (0, 0));
                let mut o = ollama::Assembler::new(false);
                o.push(&v);
                let _ = o.finish(v.clone());
            }
        }
    }
}
