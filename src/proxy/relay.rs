//! The relay: reads the upstream's stream frame by frame, meters every
//! completion token against the reservation (growing it by leases), and
//! either forwards the frames as they arrive (those that came together,
//! together) or assembles the single non-stream answer. It runs where its
//! output is taken (`Inline`: the streaming client's response body, or
//! the handler awaiting the answer), and goes on in a task of its own if
//! that goes away first, so settlement happens whatever the client does; a
//! client that goes away cancels the upstream request by dropping it.
//! When the upstream answers a request sent ahead before its admission
//! comes, the relay reads on meanwhile (see `RelayJob::admission`).

use std::{
    borrow::Cow,
    collections::VecDeque,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{body::Body, http::StatusCode};
use bytes::{Bytes, BytesMut};
use futures_util::{future::Either, FutureExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::{ollama, openai, upstream};
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
    /// Every dialect, in declaration order (`d as usize` is its place).
    pub const ALL: [Dialect; 3] = [Dialect::OllamaChat, Dialect::OllamaGenerate, Dialect::OpenAiChat];

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

/// How many frames a relay handles before its admission comes, at most,
/// before it awaits the admission (the room it assumes bounds the frames
/// with tokens; this bounds the others).
const KEEP_AT_MOST: usize = 256;

/// How long a finished relay waits for the end of the upstream's body.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// One unit of the upstream stream: an NDJSON line or an SSE event's data.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    Data(Chunk),
    /// SSE `data: [DONE]`
    Done,
}

/// One chunk's JSON: a slice of the read it came in (of the gathered
/// pieces, for a line cut by the end of a read); for an SSE event with
/// more than one data line, the lines joined.
#[derive(Debug, PartialEq, Eq)]
struct Chunk {
    /// The JSON text as it arrived, not yet checked to be UTF-8.
    json: Bytes,
    /// NDJSON: the line as it arrived, line break included, forwarded
    /// unchanged when it is valid UTF-8.
    line: Option<Bytes>,
}

impl Chunk {
    /// The JSON text, invalid UTF-8 replaced (a copy only then). The relay
    /// calls it once per chunk: it is the one UTF-8 check a chunk gets.
    fn text(&self) -> Cow<'_, str> {
        // `from_utf8` first: `from_utf8_lossy` has no fast path for text
        // that is valid, and costs twice as much on it.
        match std::str::from_utf8(&self.json) {
            Ok(text) => Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(&self.json),
        }
    }
}

/// `json` as the client gets it: an SSE event's one `data:` line, or an
/// NDJSON line.
fn frame(sse: bool, json: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + 8);
    if sse {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(json);
        out.extend_from_slice(b"\n\n");
    } else {
        out.extend_from_slice(json);
        out.extend_from_slice(b"\n");
    }
    out.freeze()
}

/// An upstream chunk as the client gets it, given its `text`: an NDJSON
/// line unchanged, an SSE event as one `data:` line. A line with invalid
/// UTF-8 goes out as its replaced `text` (which then is a copy, not a view
/// of the line).
fn forward(sse: bool, chunk: &Chunk, text: &str) -> Bytes {
    match &chunk.line {
        // `text` is a view of the chunk's own bytes exactly when they were valid.
        Some(line) if std::ptr::eq(text.as_ptr(), chunk.json.as_ptr()) => line.clone(),
        _ => frame(sse, text.as_bytes()),
    }
}

/// Splits a byte stream into frames; holds at most one partial line. A
/// line that arrives whole in one read is a slice of that read, not a copy
/// (an upstream writes its chunks whole, so that is nearly every line).
#[derive(Debug, Default)]
struct Framer {
    sse: bool,
    /// The rest of the last read, not yet framed.
    pending: Bytes,
    /// A line cut by the end of a read, gathered until its newline comes.
    partial: BytesMut,
    /// SSE: the data of the event being read: its one data line as it
    /// came, or its data lines joined.
    data: Option<Bytes>,
}

impl Framer {
    fn push(&mut self, bytes: Bytes) {
        if !self.pending.is_empty() {
            self.partial.extend_from_slice(&self.pending);
        }
        self.pending = bytes;
    }

    /// Everything left when the stream ends (a last line without newline).
    fn finish(&mut self) -> Option<Frame> {
        if self.pending.is_empty() && self.partial.is_empty() {
            return None;
        }
        let mut rest = std::mem::take(&mut self.partial);
        rest.extend_from_slice(&self.pending);
        rest.extend_from_slice(b"\n\n");
        self.pending = rest.freeze();
        self.next_frame()
    }

    /// The next whole line, its newline included; `None` keeps what there
    /// is of the line for the next read.
    fn next_line(&mut self) -> Option<Bytes> {
        let Some(pos) = memchr::memchr(b'\n', &self.pending) else {
            self.partial.extend_from_slice(&std::mem::take(&mut self.pending));
            return None;
        };
        // The last line of a read takes the read itself, so the framer
        // keeps no hold on its memory while it waits for the next one.
        let line = if pos + 1 == self.pending.len() { std::mem::take(&mut self.pending) } else { self.pending.split_to(pos + 1) };
        if self.partial.is_empty() {
            return Some(line);
        }
        self.partial.extend_from_slice(&line);
        Some(self.partial.split().freeze())
    }

    fn next_frame(&mut self) -> Option<Frame> {
        while let Some(line) = self.next_line() {
            let pos = line.len() - 1;
            let end = if pos > 0 && line[pos - 1] == b'\r' { pos - 1 } else { pos };
            if !self.sse {
                // JSON's whitespace is ASCII.
                if line[..end].trim_ascii().is_empty() {
                    continue;
                }
                return Some(Frame::Data(Chunk { json: line.slice(..end), line: Some(line) }));
            }
            if end == 0 {
                // An event whose data is empty is no frame.
                let Some(data) = self.data.take().filter(|d| !d.is_empty()) else { continue };
                return Some(if data.trim_ascii() == b"[DONE]" {
                    Frame::Done
                } else {
                    Frame::Data(Chunk { json: data, line: None })
                });
            }
            if let Some(data) = line[..end].strip_prefix(b"data:") {
                let start = end - data.len() + usize::from(data.first() == Some(&b' '));
                let data = line.slice(start..end);
                self.data = Some(match self.data.take().filter(|d| !d.is_empty()) {
                    None => data,
                    // A second data line: joined in a buffer of the
                    // framer's own, grown in place from then on.
                    Some(before) => {
                        let mut joined = before.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
                        joined.extend_from_slice(b"\n");
                        joined.extend_from_slice(&data);
                        joined.freeze()
                    }
                });
            }
            // comments (":…"), `event:`, `id:` and `retry:` lines carry nothing we relay
        }
        None
    }
}

/// What the relay handles, in the order the upstream's stream brought it.
enum Input {
    Frame(Frame),
    /// The stream ended (its last frame already handed on).
    End,
    /// The stream broke off, or went quiet for too long.
    Fail(String),
}

/// What one read of the upstream's body brought.
enum Read {
    Bytes(Bytes),
    End,
    Broke(upstream::BoxError),
    /// Nothing for the idle limit.
    Idle,
}

/// The upstream's body, read with an idle limit that costs no timer per
/// read: one timer, moved on only when it fires before the limit is up.
struct Reader {
    body: upstream::Body,
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Reader {
    fn new(body: upstream::Body, limit: Duration) -> Reader {
        Reader { body, limit, timer: Box::pin(tokio::time::sleep(limit)) }
    }

    fn read(read: Result<Option<Bytes>, upstream::BoxError>) -> Read {
        match read {
            Ok(Some(bytes)) => Read::Bytes(bytes),
            Ok(None) => Read::End,
            Err(e) => Read::Broke(e),
        }
    }

    /// The next read if the upstream's body already holds it.
    fn ready(&mut self) -> Option<Read> {
        // Reading the body is cancel-safe: a read not finished loses nothing.
        upstream::chunk(&mut self.body).now_or_never().map(Reader::read)
    }

    /// The next read, or `Idle` when the upstream sends nothing for the
    /// limit from now.
    async fn next(&mut self) -> Read {
        let due = tokio::time::Instant::now() + self.limit;
        loop {
            tokio::select! {
                biased;
                read = upstream::chunk(&mut self.body) => return Reader::read(read),
                () = &mut self.timer => {
                    if tokio::time::Instant::now() >= due {
                        return Read::Idle;
                    }
                    self.timer.as_mut().reset(due);
                }
            }
        }
    }
}

/// One upstream chunk, read for the relay.
enum Parsed<'a> {
    OpenAi(openai::Plain<'a>),
    OpenAiUsage(openai::UsageOnly),
    Ollama(ollama::Plain<'a>),
    Value(Value),
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
    Whole(oneshot::Sender<Result<Answer, ApiError>>),
}

/// A relay run by what takes its output: the streaming client's response
/// body, or the handler awaiting a non-stream answer. A chunk then wakes
/// one task fewer on its way (the upstream connection's task wakes the
/// client's, which runs the relay). If that goes away first (a client that
/// hangs up, or a body that has sent its last frame while the relay still
/// settles or reads the upstream's end), the rest of the relay goes on as
/// a task of its own: it sees the client gone, settles the reservation and
/// records the usage event, as a relay in its own task always did.
pub struct Inline {
    relay: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    tasks: TaskTracker,
}

impl Inline {
    pub fn new(relay: impl Future<Output = ()> + Send + 'static, tasks: &TaskTracker) -> Inline {
        Inline { relay: Some(Box::pin(relay)), tasks: tasks.clone() }
    }

    /// Moves the relay on as far as it goes without waiting.
    fn poll(&mut self, cx: &mut Context<'_>) {
        if let Some(relay) = &mut self.relay {
            if relay.as_mut().poll(cx).is_ready() {
                self.relay = None;
            }
        }
    }

    /// A streaming client's response body: what the relay sends to `rx`.
    pub fn body(self, rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Body {
        Body::from_stream(Streaming { rx, relay: self })
    }

    /// Awaits `other`, moving the relay on meanwhile: the admission of a
    /// relay that started before it came, or the relay's own answer.
    pub async fn alongside<F: Future>(&mut self, mut other: Pin<&mut F>) -> F::Output {
        std::future::poll_fn(|cx| {
            self.poll(cx);
            other.as_mut().poll(cx)
        })
        .await
    }

    /// Drops a relay whose admission refused it: it has sent nothing and
    /// holds nothing, so nothing is left for it to do on its own.
    pub fn cancel(mut self) {
        self.relay = None;
    }

    /// A non-stream client's answer, from what the relay sends to `rx`.
    pub async fn answer(mut self, rx: oneshot::Receiver<Result<Answer, ApiError>>) -> Result<Result<Answer, ApiError>, oneshot::error::RecvError> {
        self.alongside(std::pin::pin!(rx)).await
    }
}

impl Drop for Inline {
    fn drop(&mut self) {
        let Some(relay) = self.relay.take() else { return };
        // Outside a runtime (it has shut down) nothing could run it; the
        // reservation lapses and is charged what it held.
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tasks.spawn(relay);
        }
    }
}

/// The frames of a streaming client's response. `rx` is dropped first, so
/// a relay that goes on without its body finds the client gone.
struct Streaming {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    relay: Inline,
}

impl futures_util::Stream for Streaming {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.relay.poll(cx);
        // Only the relay sends, and it runs only here (or on its own once
        // this is gone): what it sent is in `rx` now, and its next send
        // comes in a later poll of this body, which the relay's own wakers
        // bring. So `rx` is read without leaving a waker (a send would
        // wake this task again for nothing).
        match this.rx.try_recv() {
            Ok(bytes) => Poll::Ready(Some(bytes)),
            Err(mpsc::error::TryRecvError::Empty) => Poll::Pending,
            Err(mpsc::error::TryRecvError::Disconnected) => Poll::Ready(None),
        }
    }
}

/// A non-stream request's answer: its JSON text, written by
/// `ollama::Assembler::finish` or serialised from `openai::Completion` when
/// the relay makes it (which can be before the admission comes).
#[derive(Debug)]
pub struct Answer(Bytes);

impl axum::response::IntoResponse for Answer {
    fn into_response(self) -> axum::response::Response {
        ([(axum::http::header::CONTENT_TYPE, "application/json")], self.0).into_response()
    }
}

/// What identifies one completion request, from admission to its usage event.
#[derive(Clone)]
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
    /// The admission and the handler's overhead, when the upstream answered
    /// before the admission came (a request sent ahead, see
    /// `Quota::may_send_ahead`). Until they come the relay reads on with
    /// `reservation` as `Quota::assumed` makes it (the prompt and one
    /// lease), hands nothing to the client, and keeps what it handled;
    /// it takes the admission in as soon as it comes while it waits for the
    /// upstream, and awaits it before a chunk that needs more than that
    /// room, and before it finishes. An admission that left less room than was assumed, with a
    /// lease that cannot make up the difference, has the relay handle what
    /// it kept again with the room there is: the answer is the one a relay
    /// that had waited would give.
    pub admission: Option<oneshot::Receiver<(Reservation, Duration)>>,
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
    /// Ollama: the upstream's final chunk, as it came (it shapes the
    /// non-stream answer).
    final_chunk: Option<String>,
    /// OpenAI: a `finish_reason` arrived (a missing `[DONE]` is forgiven).
    saw_finish: bool,
    /// Streaming: frames not yet handed to the client.
    outbox: Outbox,
    /// A non-stream answer made while the admission was on its way.
    early_answer: Option<Answer>,
}

/// What the relay has for a streaming client and not yet handed on. The
/// frames that are there when the relay would wait for the upstream go
/// out together, in one piece: one channel send and one socket write for
/// however many there are (a fast upstream, or a gateway that fell
/// behind, has several at once).
#[derive(Debug, Default)]
struct Outbox {
    /// A lone frame goes out as it is, without a copy.
    first: Option<Bytes>,
    more: BytesMut,
}

impl Outbox {
    fn push(&mut self, bytes: Bytes) {
        if self.first.is_none() && self.more.is_empty() {
            self.first = Some(bytes);
            return;
        }
        if let Some(first) = self.first.take() {
            self.more.extend_from_slice(&first);
        }
        self.more.extend_from_slice(&bytes);
    }

    fn take(&mut self) -> Option<Bytes> {
        self.first.take().or_else(|| (!self.more.is_empty()).then(|| self.more.split().freeze()))
    }
}

impl RelayJob {
    pub async fn run(mut self, upstream: upstream::Response) {
        let idle = self.state.config.upstream_idle_timeout;
        let mut run = Run::new(self.meta.dialect);
        let mut framer = Framer { sse: self.meta.dialect.is_sse(), ..Default::default() };
        let mut upstream = Reader::new(upstream.into_body(), idle);
        // While the admission is on its way: what was handled, in case it
        // must be handled again; and what is to be handled again.
        let mut kept: Vec<Input> = Vec::new();
        let mut again: VecDeque<Input> = VecDeque::new();
        loop {
            while run.outcome.is_none() {
                if kept.len() >= KEEP_AT_MOST {
                    if !self.admitted(&mut run, &mut kept, &mut again).await {
                        return;
                    }
                    continue;
                }
                let input = if let Some(input) = again.pop_front() {
                    input
                } else if let Some(frame) = framer.next_frame() {
                    Input::Frame(frame)
                } else {
                    let read = match upstream.ready() {
                        Some(read) => read,
                        None if self.admission.is_some() => {
                            // Whichever comes first: more of the answer, or
                            // the admission.
                            let Some(admission) = self.admission.as_mut() else { unreachable!("checked") };
                            let came = tokio::select! {
                                biased;
                                admitted = admission => Either::Left(admitted),
                                read = upstream.next() => Either::Right(read),
                            };
                            self.state.busy.touch();
                            match came {
                                Either::Right(read) => read,
                                Either::Left(admitted) => {
                                    self.admission = None;
                                    if !self.take_admission(admitted, &mut run, &mut kept, &mut again).await {
                                        return;
                                    }
                                    continue;
                                }
                            }
                        }
                        None => {
                            // Nothing more has come: what is queued goes
                            // out before the wait.
                            self.flush(&mut run).await;
                            if run.outcome.is_some() {
                                break;
                            }
                            let read = upstream.next().await;
                            self.state.busy.touch();
                            read
                        }
                    };
                    match read {
                        Read::Bytes(bytes) => {
                            framer.push(bytes);
                            continue;
                        }
                        Read::End => framer.finish().map_or(Input::End, Input::Frame),
                        Read::Broke(e) => Input::Fail(format!("upstream stream broke: {e}")),
                        Read::Idle => Input::Fail(format!("upstream sent nothing for {idle:?}")),
                    }
                };
                match &input {
                    Input::Frame(frame) => {
                        if !self.handle(&mut run, frame).await {
                            // It needs more room than was assumed.
                            again.push_front(input);
                            if !self.admitted(&mut run, &mut kept, &mut again).await {
                                return;
                            }
                            continue;
                        }
                    }
                    Input::End if run.outcome.is_none() && run.saw_finish => run.outcome = Some(Outcome::Complete),
                    // The stream ended without its final chunk.
                    Input::End if run.outcome.is_none() => run.fail("upstream ended the stream early".into()),
                    Input::End => {}
                    Input::Fail(msg) => run.fail(msg.clone()),
                }
                if self.admission.is_some() {
                    kept.push(input);
                }
            }
            if self.admission.is_none() {
                break;
            }
            // All of a complete answer is in: a non-stream client's answer
            // is made while the admission comes. It stands unless the
            // admission leaves less room than was assumed, and then the
            // relay starts over with a fresh run.
            if run.outcome == Some(Outcome::Complete) && matches!(self.sink, Sink::Whole(_)) {
                run.early_answer = Some(run.answer(&self.meta, self.reservation.prompt_tokens));
            }
            if !self.admitted(&mut run, &mut kept, &mut again).await {
                return;
            }
        }
        // Dropping the response cancels the upstream request; a complete
        // one is kept for the end of its body.
        let rest = (run.outcome == Some(Outcome::Complete)).then_some(upstream);
        self.finish(run).await;
        if let Some(mut upstream) = rest {
            // The body's end (the chunked terminator) usually follows the
            // final chunk in a write of its own. Read it, after the client
            // has its answer, so the connection goes back to the pool:
            // dropped unread, it would be closed, and the next request would
            // open a new one (a TCP handshake with the upstream).
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
                while let Ok(Some(_)) = upstream::chunk(&mut upstream.body).await {}
            })
            .await;
        }
    }

    /// Awaits the admission of a relay that started before it came (see
    /// `admission`; at once when there is none to await); false if it
    /// refused.
    async fn admitted(&mut self, run: &mut Run, kept: &mut Vec<Input>, again: &mut VecDeque<Input>) -> bool {
        match self.admission.take() {
            Some(admission) => self.take_admission(admission.await, run, kept, again).await,
            None => true,
        }
    }

    /// Takes the admission in; false if it refused or failed (the handler
    /// answers, nothing is charged or recorded here). If it left less room
    /// than was assumed and a lease cannot make up the difference, the relay
    /// starts over: what it `kept` is to be handled `again`, before the
    /// rest, with the room there is.
    async fn take_admission(
        &mut self,
        admitted: Result<(Reservation, Duration), oneshot::error::RecvError>,
        run: &mut Run,
        kept: &mut Vec<Input>,
        again: &mut VecDeque<Input>,
    ) -> bool {
        let Ok((reservation, overhead)) = admitted else { return false };
        (self.reservation, self.overhead) = (reservation, overhead);
        let (need, held) = (self.reservation.prompt_tokens + run.metered, self.reservation.held);
        let fits = need <= held
            || match self.state.quota.lease(&mut self.reservation, need - held).await {
                Ok(_) => self.reservation.held >= need,
                Err(e) => {
                    tracing::error!(error = %e, "lease failed; ending the completion");
                    false
                }
            };
        if fits {
            *kept = Vec::new();
        } else {
            *run = Run::new(self.meta.dialect);
            for input in kept.drain(..).rev() {
                again.push_front(input);
            }
        }
        true
    }

    fn client_gone(&self) -> bool {
        match &self.sink {
            Sink::Stream(tx) => tx.is_closed(),
            Sink::Whole(tx) => tx.is_closed(),
        }
    }

    /// Queues bytes for a streaming client; `flush` hands them on.
    fn send(&self, run: &mut Run, bytes: Bytes) {
        if let Sink::Stream(_) = &self.sink {
            run.outbox.push(bytes);
        }
    }

    /// Hands what is queued to a streaming client, as one piece. A client
    /// that has gone turns a completion still under way (or just
    /// complete) into a disconnect.
    async fn flush(&self, run: &mut Run) {
        // Nothing reaches the client before the admission: the relay takes
        // it in before any flush.
        debug_assert!(self.admission.is_none(), "flush before the admission");
        let (Sink::Stream(tx), Some(bytes)) = (&self.sink, run.outbox.take()) else { return };
        if tx.send(Ok(bytes)).await.is_err() && matches!(run.outcome, None | Some(Outcome::Complete)) {
            run.outcome = Some(Outcome::Disconnect);
        }
    }

    /// Queues an upstream chunk as the client gets it (see `forward`).
    fn send_chunk(&self, run: &mut Run, chunk: &Chunk, text: &str) {
        self.send(run, forward(self.meta.dialect.is_sse(), chunk, text));
    }

    fn frame_bytes(&self, json: &str) -> Bytes {
        frame(self.meta.dialect.is_sse(), json.as_bytes())
    }

    /// Handles one frame; false (and nothing done) when the admission has
    /// not come and the frame needs more room than was assumed.
    async fn handle(&mut self, run: &mut Run, frame: &Frame) -> bool {
        let data = match frame {
            Frame::Done => {
                self.send(run, Bytes::from_static(b"data: [DONE]\n\n"));
                run.outcome.get_or_insert(Outcome::Complete);
                return true;
            }
            Frame::Data(chunk) => chunk,
        };
        let text = data.text();
        let whole = matches!(self.sink, Sink::Whole(_));
        // Ordinary chunks and OpenAI's usage chunk are read without a
        // `Value`; the rest (tool calls, errors, an odd field) as a `Value`.
        let parsed = match self.meta.dialect {
            Dialect::OpenAiChat if run.openai.meta.id.is_empty() => openai::Plain::parse_first(&text).map(Parsed::OpenAi),
            Dialect::OpenAiChat => openai::Plain::parse(&text)
                .map(Parsed::OpenAi)
                .or_else(|| openai::UsageOnly::parse(&text).map(Parsed::OpenAiUsage)),
            Dialect::OllamaChat | Dialect::OllamaGenerate => {
                ollama::Plain::parse(&text).map(Parsed::Ollama)
            }
        };
        let parsed = match parsed {
            Some(p) => p,
            None => match serde_json::from_str::<Value>(&text) {
                Ok(v) => Parsed::Value(v),
                Err(_) => {
                    run.fail("upstream sent a chunk that is not JSON".into());
                    return true;
                }
            },
        };
        if let Parsed::Value(v) = &parsed {
            if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
                let msg = err
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| err.get("message").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| err.to_string());
                // Pass the upstream's own error line on to a streaming client.
                self.send_chunk(run, data, &text);
                run.error_forwarded = true;
                run.fail(msg);
                return true;
            }
        }
        let n = match &parsed {
            Parsed::Value(v) => self.meta.dialect.count(v),
            Parsed::OpenAi(p) => p.tokens(),
            Parsed::OpenAiUsage(_) => 0,
            Parsed::Ollama(p) => p.tokens(),
        };
        if n > 0 {
            let need = self.reservation.prompt_tokens + run.metered + n;
            if need > self.reservation.held {
                if self.admission.is_some() {
                    return false;
                }
                let short = need - self.reservation.held;
                // What is ready goes out before the store round trip.
                self.flush(run).await;
                if run.outcome.is_some() {
                    return true;
                }
                match self.state.quota.lease(&mut self.reservation, short).await {
                    Ok(_) if self.reservation.held >= need => {}
                    Ok(_) => {
                        self.end_at_quota(run);
                        return true;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "lease failed; ending the completion");
                        self.end_at_quota(run);
                        return true;
                    }
                }
            }
            run.metered += n;
        }
        match self.meta.dialect {
            Dialect::OpenAiChat => {
                let (finished, usage, usage_only) = match &parsed {
                    Parsed::Value(v) => {
                        run.openai.meta.observe(v);
                        let finished = v
                            .get("choices")
                            .and_then(Value::as_array)
                            .is_some_and(|cs| cs.iter().any(|c| c.get("finish_reason").is_some_and(|f| !f.is_null())));
                        (finished, openai::usage(v), openai::is_usage_chunk(v))
                    }
                    Parsed::OpenAi(p) => {
                        run.openai.meta.observe_plain(p);
                        (p.finish_reason.is_some(), None, false)
                    }
                    Parsed::OpenAiUsage(u) => (false, Some(u.tokens), true),
                    Parsed::Ollama(_) => unreachable!("parsed for the dialect"),
                };
                run.saw_finish |= finished;
                if let Some(u) = usage {
                    run.upstream_usage = Some(u);
                }
                if usage_only && !self.client_wants_usage {
                    // asked for by the gateway, not by the client
                } else if !whole {
                    self.send_chunk(run, data, &text);
                } else {
                    match &parsed {
                        Parsed::Value(v) => run.openai.push(v),
                        Parsed::OpenAi(p) => run.openai.push_plain(p),
                        Parsed::OpenAiUsage(u) => run.openai.push_usage(u.usage.clone()),
                        Parsed::Ollama(_) => {}
                    }
                }
            }
            Dialect::OllamaChat | Dialect::OllamaGenerate => {
                let (is_final, usage) = match &parsed {
                    Parsed::Value(v) => (ollama::is_final(v), ollama::usage(v)),
                    Parsed::Ollama(p) => (p.is_final(), p.usage()),
                    Parsed::OpenAi(_) | Parsed::OpenAiUsage(_) => unreachable!("parsed for the dialect"),
                };
                if let Some(u) = usage {
                    run.upstream_usage = Some(u);
                }
                if !whole {
                    self.send_chunk(run, data, &text);
                } else {
                    match &parsed {
                        Parsed::Value(v) => run.ollama.push(v),
                        Parsed::Ollama(p) => run.ollama.push_plain(p),
                        Parsed::OpenAi(_) | Parsed::OpenAiUsage(_) => {}
                    }
                    if is_final {
                        run.final_chunk = Some(text.to_string());
                    }
                }
                if is_final && run.outcome.is_none() {
                    run.outcome = Some(Outcome::Complete);
                }
            }
        }
        if run.outcome.is_none() && self.client_gone() {
            run.outcome = Some(Outcome::Disconnect);
        }
        true
    }

    /// The key has nothing left: end the completion the way the protocol
    /// ends one that ran out of `max_tokens`.
    fn end_at_quota(&self, run: &mut Run) {
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
                self.send(run, f);
            }
        }
    }

    async fn finish(self, mut run: Run) {
        if run.outcome.unwrap_or(Outcome::UpstreamError) == Outcome::UpstreamError && !run.error_forwarded {
            // A stream that broke off gets an error in its protocol, so the
            // client can tell it from a complete answer.
            let msg = run.error.clone().unwrap_or_else(|| "upstream error".into());
            let frame = match self.meta.dialect {
                Dialect::OpenAiChat => json!({"error": {"message": msg, "type": "api_error", "param": null, "code": null}}),
                _ => json!({"error": msg}),
            };
            let bytes = self.frame_bytes(&frame.to_string());
            self.send(&mut run, bytes);
        }
        self.flush(&mut run).await;
        let (refund, (prompt, completion)) = run.charged(self.reservation.prompt_tokens);
        let outcome = run.outcome.unwrap_or(Outcome::UpstreamError);
        let settling = Instant::now();
        let charge = Charge { prompt_tokens: prompt, completion_tokens: completion, refund_request: refund };
        let mut settle = std::pin::pin!(self.state.quota.settle(&self.reservation, charge));
        // The settlement is queued before the answer goes out, and its reply
        // is awaited after: one store round trip less on the client's time.
        // The first poll queues the call on the store's one connection, ahead
        // of anything this client's next request sends there; the
        // connection's task writes it out when it next runs, on one worker
        // right after the answer. (Written first, it woke Redis first, and
        // where Redis shares a CPU with the client the client waited for the
        // script: 25-60 µs added at p50 in the bench.)
        let settled = settle.as_mut().now_or_never();
        let mut status = StatusCode::OK;
        match self.sink {
            Sink::Whole(tx) => {
                let answer = match outcome {
                    Outcome::UpstreamError => {
                        status = StatusCode::BAD_GATEWAY;
                        Err(ApiError::new(status, run.error.clone().unwrap_or_else(|| "upstream error".into())))
                    }
                    _ => Ok(match run.early_answer.take() {
                        Some(answer) => answer,
                        None => run.answer(&self.meta, self.reservation.prompt_tokens),
                    }),
                };
                let _ = tx.send(answer);
            }
            // Dropping the sender ends the client's stream.
            Sink::Stream(tx) => drop(tx),
        }
        let settled = match settled {
            Some(r) => r,
            None => settle.await,
        };
        if let Err(e) = settled {
            // The reservation lapses and is charged what it held.
            tracing::error!(error = %e, "settle failed");
        }
        metrics::gateway_overhead(self.meta.dialect).record((self.overhead + settling.elapsed()).as_secs_f64());
        if let Some(err) = &run.error {
            tracing::warn!(request_id = %self.meta.request_id, error = %err, "upstream failed during the completion");
        }
        let event = self.meta.event(self.state.quota.now(), &self.reservation.resv.day, status.as_u16(), (prompt, completion), refund, outcome.as_str());
        self.state.events.record(event);
    }
}

impl Run {
    fn new(dialect: Dialect) -> Run {
        Run {
            metered: 0,
            upstream_usage: None,
            outcome: None,
            error: None,
            ollama: ollama::Assembler::new(dialect == Dialect::OllamaGenerate),
            openai: openai::Assembler::default(),
            final_chunk: None,
            saw_finish: false,
            error_forwarded: false,
            outbox: Outbox::default(),
            early_answer: None,
        }
    }

    /// Whether the request is refunded, and the tokens charged
    /// (`prompt_tokens`: the reservation's count, for want of the
    /// upstream's).
    fn charged(&self, prompt_tokens: u64) -> (bool, (u64, u64)) {
        let outcome = self.outcome.unwrap_or(Outcome::UpstreamError);
        let refund = outcome == Outcome::UpstreamError && self.metered == 0;
        let tokens = match (outcome, self.upstream_usage) {
            _ if refund => (0, 0),
            (Outcome::Complete, Some(u)) => u,
            _ => (prompt_tokens, self.metered),
        };
        (refund, tokens)
    }

    /// A non-stream client's answer to a run that did not fail, from what
    /// it assembled (taken out of it).
    fn answer(&mut self, meta: &RequestMeta, prompt_tokens: u64) -> Answer {
        let outcome = self.outcome.unwrap_or(Outcome::Complete);
        let (_, (prompt, completion)) = self.charged(prompt_tokens);
        match meta.dialect {
            Dialect::OpenAiChat => {
                let completion = std::mem::take(&mut self.openai).finish(outcome == Outcome::Quota, (prompt, completion));
                Answer(Bytes::from(serde_json::to_vec(&completion).expect("a completion serialises")))
            }
            d => {
                let final_chunk = match (outcome, self.final_chunk.take()) {
                    (Outcome::Complete, Some(f)) => f,
                    _ => ollama::length_chunk(d == Dialect::OllamaGenerate, &meta.model, prompt, completion, meta.started.elapsed().as_nanos() as u64)
                        .to_string(),
                };
                let fresh = ollama::Assembler::new(d == Dialect::OllamaGenerate);
                Answer(std::mem::replace(&mut self.ollama, fresh).finish(&final_chunk))
            }
        }
    }

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
            f.push(Bytes::copy_from_slice(part.as_ref()));
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
        assert_eq!(texts(&out), ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"]);
        // lines go on to the client as they came
        let lines: Vec<_> = out.iter().map(|f| match f {
            Frame::Data(c) => c.line.clone(),
            Frame::Done => None,
        }).collect();
        assert_eq!(lines, [Some(Bytes::from("{\"a\":1}\n")), Some(Bytes::from("{\"b\":2}\n")), Some(Bytes::from("{\"c\":3}\n"))]);
    }

    #[test]
    fn sse_events_comments_and_done() {
        let out = frames(true, &[": keep-alive\n\ndata: {\"x\"", ":1}\r\n\r\ndata: [DONE]\n\n"]);
        assert_eq!(texts(&out), ["{\"x\":1}", "[DONE]"]);
    }

    #[test]
    fn invalid_utf8_is_replaced_and_not_forwarded_raw() {
        let out = frames(false, &[&b"{\"a\":\"\xff\"}\n"[..]]);
        let Frame::Data(c) = &out[0] else { panic!("{out:?}") };
        assert_eq!(c.text(), "{\"a\":\"\u{fffd}\"}");
        assert_eq!(forward(false, c, &c.text()), "{\"a\":\"\u{fffd}\"}\n");
        // in SSE too: the event's data is checked once, as a whole
        let out = frames(true, &[&b"data: {\"a\":\"\xe2\x82\"}\n\n"[..]]);
        let Frame::Data(c) = &out[0] else { panic!("{out:?}") };
        assert_eq!(forward(true, c, &c.text()), "data: {\"a\":\"\u{fffd}\"}\n\n");
    }

    #[test]
    fn valid_lines_are_forwarded_without_a_copy() {
        let out = frames(false, &["{\"a\":\"é\"}\r\n"]);
        let Frame::Data(c) = &out[0] else { panic!("{out:?}") };
        let sent = forward(false, c, &c.text());
        assert_eq!(sent, "{\"a\":\"é\"}\r\n");
        assert_eq!(sent.as_ptr(), c.line.as_ref().unwrap().as_ptr(), "the line itself, not a copy");
        let out = frames(true, &["data: {\"a\":1}\r\ndata: {\"b\":2}\r\n\r\n"]);
        let Frame::Data(c) = &out[0] else { panic!("{out:?}") };
        assert_eq!(forward(true, c, &c.text()), "data: {\"a\":1}\n{\"b\":2}\n\n");
    }

    #[test]
    fn a_line_within_one_read_is_a_slice_of_it_and_the_read_is_let_go() {
        for sse in [false, true] {
            // From a String: a static `Bytes` is never unique.
            let read = Bytes::from(String::from(if sse { "data: {\"a\":1}\n\n" } else { "{\"a\":1}\n" }));
            let mut f = Framer { sse, ..Default::default() };
            f.push(read.clone());
            let Some(Frame::Data(c)) = f.next_frame() else { panic!("no frame") };
            assert_eq!(c.json, "{\"a\":1}");
            assert_eq!(c.json.as_ptr(), read[if sse { 6 } else { 0 }..].as_ptr(), "a slice of the read, not a copy");
            assert!(f.next_frame().is_none());
            drop(c);
            assert!(read.is_unique(), "the framer holds nothing of a read it has framed");
        }
    }

    #[test]
    fn outbox_sends_what_it_holds_in_order_and_in_one_piece() {
        let mut o = Outbox::default();
        assert_eq!(o.take(), None);
        let one = Bytes::from("a\n");
        o.push(one.clone());
        let taken = o.take().unwrap();
        assert_eq!(taken.as_ptr(), one.as_ptr(), "a lone frame is not copied");
        assert_eq!(o.take(), None);
        for part in ["a\n", "bb\n", "ccc\n"] {
            o.push(Bytes::from(part));
        }
        assert_eq!(o.take().unwrap(), "a\nbb\nccc\n");
        assert_eq!(o.take(), None);
        o.push(Bytes::from("d\n"));
        o.push(Bytes::from("e\n"));
        assert_eq!(o.take().unwrap(), "d\ne\n");
    }

    fn texts(frames: &[Frame]) -> Vec<Cow<'_, str>> {
        frames.iter().map(|f| match f {
            Frame::Data(c) => c.text(),
            Frame::Done => "[DONE]".into(),
        }).collect()
    }
}

#[cfg(test)]
mod fuzz {
    use bytes::Buf;
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

    /// The framer as it was before lines were sliced from the reads (one
    /// buffer that every read is copied into): the oracle for
    /// `framing_is_what_it_was`.
    fn copying_frames(sse: bool, input: &[Vec<u8>]) -> Vec<Frame> {
        let (mut buf, mut event, mut out) = (BytesMut::new(), Vec::<u8>::new(), Vec::new());
        let mut drain = |buf: &mut BytesMut, out: &mut Vec<Frame>| {
            while let Some(pos) = memchr::memchr(b'\n', buf) {
                let end = if pos > 0 && buf[pos - 1] == b'\r' { pos - 1 } else { pos };
                if !sse {
                    let raw = buf.split_to(pos + 1).freeze();
                    if !raw[..end].trim_ascii().is_empty() {
                        out.push(Frame::Data(Chunk { json: raw.slice(..end), line: Some(raw) }));
                    }
                    continue;
                }
                if end == 0 {
                    buf.advance(pos + 1);
                    if !event.is_empty() {
                        let data = std::mem::take(&mut event);
                        out.push(if data.trim_ascii() == b"[DONE]" { Frame::Done } else { Frame::Data(Chunk { json: Bytes::from(data), line: None }) });
                    }
                    continue;
                }
                if let Some(data) = buf[..end].strip_prefix(b"data:") {
                    if !event.is_empty() {
                        event.push(b'\n');
                    }
                    event.extend_from_slice(data.strip_prefix(b" ").unwrap_or(data));
                }
                buf.advance(pos + 1);
            }
        };
        for part in input {
            buf.extend_from_slice(part);
            drain(&mut buf, &mut out);
        }
        if !buf.is_empty() {
            buf.extend_from_slice(b"\n\n");
            drain(&mut buf, &mut out);
        }
        out
    }

    proptest! {
        /// Any bytes, however cut, give the frames the copying framer gave
        /// (frames compare by their text and lines).
        #[test]
        fn framing_is_what_it_was(
            parts in proptest::collection::vec(
                proptest::collection::vec(prop_oneof![
                    4 => any::<u8>(),
                    2 => Just(b'\n'),
                    1 => Just(b'\r'),
                    1 => Just(b' '),
                    1 => Just(b':'),
                ], 0..40).prop_map(|mut v| {
                    // Often a data line, so SSE events form.
                    if v.first().is_some_and(|b| b % 2 == 0) {
                        v.splice(0..0, b"data:".iter().copied());
                    }
                    v
                }),
                0..12,
            ),
            sse in any::<bool>(),
        ) {
            prop_assert_eq!(super::tests::frames(sse, &parts), copying_frames(sse, &parts));
        }

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
                let _ = o.finish(&s);
            }
        }
    }
}

#[cfg(test)]
mod plain {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// A value that is sometimes what the field should hold and sometimes not.
    fn field(good: BoxedStrategy<Value>) -> BoxedStrategy<Option<Value>> {
        prop_oneof![
            3 => good.prop_map(Some),
            1 => Just(None),
            1 => Just(Some(Value::Null)),
            1 => prop_oneof![Just(json!(7)), Just(json!(-1)), Just(json!(1.5)), Just(json!(["x"])), Just(json!({"a": "b"})), Just(json!(true))].prop_map(Some),
        ]
        .boxed()
    }

    fn text() -> BoxedStrategy<Value> {
        "[a-z ,.']{0,12}".prop_map(Value::String).boxed()
    }

    fn object(fields: Vec<(&'static str, Option<Value>)>) -> Value {
        Value::Object(fields.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect())
    }

    fn ollama_chunk() -> impl Strategy<Value = Value> {
        let message = (field(text()), field(text()), field(Just(json!([{"function": {"name": "f", "arguments": {}}}])).boxed()))
            .prop_map(|(c, t, calls)| object(vec![("role", Some(json!("assistant"))), ("content", c), ("thinking", t), ("tool_calls", calls)]));
        (
            field(message.boxed()),
            field(text()),
            field(text()),
            field(any::<bool>().prop_map(Value::Bool).boxed()),
            field((0u64..1000).prop_map(|n| json!(n)).boxed()),
            field((0u64..1000).prop_map(|n| json!(n)).boxed()),
            field(text()),
        )
            .prop_map(|(m, r, t, d, p, e, err)| {
                object(vec![("model", Some(json!("m"))), ("message", m), ("response", r), ("thinking", t), ("done", d),
                    ("prompt_eval_count", p), ("eval_count", e), ("error", err)])
            })
    }

    fn openai_chunk() -> impl Strategy<Value = Value> {
        let delta = (field(text()), field(text()), field(text()), field(text()), field(Just(json!([{"index": 0, "function": {"arguments": "{}"}}])).boxed()))
            .prop_map(|(role, c, rc, r, calls)| object(vec![("role", role), ("content", c), ("reasoning_content", rc), ("reasoning", r), ("tool_calls", calls)]));
        let choice = (field((0u64..2).prop_map(|n| json!(n)).boxed()), field(delta.boxed()), field(Just(json!("stop")).boxed()))
            .prop_map(|(i, d, f)| object(vec![("index", i), ("delta", d), ("finish_reason", f)]));
        let usage = Just(json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})).boxed();
        let choices = prop_oneof![4 => choice.clone().prop_map(|c| vec![c]), 1 => proptest::collection::vec(choice, 0..3)];
        let created = (0i64..2_000_000_000).prop_map(|n| json!(n)).boxed();
        (field(choices.prop_map(Value::Array).boxed()), field(usage), field(text()), (field(text()), field(created), field(text()), field(text())))
            .prop_map(|(cs, u, err, (id, created, model, fp))| {
                object(vec![("id", id), ("object", Some(json!("chat.completion.chunk"))), ("created", created), ("model", model),
                    ("system_fingerprint", fp), ("choices", cs), ("usage", u), ("error", err)])
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whenever the `Value`-free reading takes a chunk, it reads what the
        /// `Value` reading does: tokens, end, usage (and the usage chunk's), the
        /// completion's identity (id, created, model, fingerprint) and the
        /// assembled answer.
        #[test]
        fn plain_ollama_reads_like_value(chunk in ollama_chunk(), generate in any::<bool>()) {
            let text = chunk.to_string();
            if let Some(p) = ollama::Plain::parse(&text) {
                prop_assert!(chunk.get("error").is_none_or(Value::is_null));
                prop_assert_eq!(p.tokens(), tokens::count_ollama_chunk(&chunk));
                prop_assert_eq!(p.is_final(), ollama::is_final(&chunk));
                prop_assert_eq!(p.usage(), ollama::usage(&chunk));
                let (mut a, mut b) = (ollama::Assembler::new(generate), ollama::Assembler::new(generate));
                a.push(&chunk);
                b.push_plain(&p);
                prop_assert_eq!(a.finish(r#"{"done": true}"#), b.finish(r#"{"done": true}"#));
            }
        }

        /// The non-stream answer written from the final chunk's text is
        /// what building it as a `Value` gives: the final chunk's members in
        /// their order, the assembled message or response in their place,
        /// Ollama's first members first.
        #[test]
        fn ollama_answer_text_is_the_value_answer(chunk in ollama_chunk(), last in ollama_chunk(), generate in any::<bool>()) {
            let mut a = ollama::Assembler::new(generate);
            a.push(&chunk);
            let expected = value_answer(generate, &chunk, &last);
            let got: Value = serde_json::from_slice(&a.finish(&last.to_string())).expect("the answer is JSON");
            prop_assert_eq!(got.to_string(), expected.to_string());
        }
        #[test]
        fn plain_openai_reads_like_value(chunk in openai_chunk()) {
            let text = chunk.to_string();
            if let Some(u) = openai::UsageOnly::parse(&text) {
                prop_assert!(chunk.get("error").is_none_or(Value::is_null));
                prop_assert!(openai::is_usage_chunk(&chunk));
                prop_assert_eq!(Some(u.tokens), openai::usage(&chunk));
                prop_assert_eq!(tokens::count_openai_chunk(&chunk), 0);
                prop_assert_eq!(Some(&u.usage), chunk.get("usage"));
            }
            let first = openai::Plain::parse_first(&text);
            if let Some(p) = &first {
                let (mut seen, mut seen_plain) = (openai::Meta::default(), openai::Meta::default());
                seen.observe(&chunk);
                seen_plain.observe_plain(p);
                prop_assert_eq!(seen, seen_plain);
                prop_assert!(openai::Plain::parse(&text).is_some(), "a chunk parse_first takes, parse takes");
            }
            for p in [openai::Plain::parse(&text), first].into_iter().flatten() {
                prop_assert!(chunk.get("error").is_none_or(Value::is_null));
                prop_assert_eq!(p.tokens(), tokens::count_openai_chunk(&chunk));
                prop_assert!(openai::usage(&chunk).is_none() && !openai::is_usage_chunk(&chunk));
                let finished = chunk["choices"].as_array().is_some_and(|cs| cs.iter().any(|c| c.get("finish_reason").is_some_and(|f| !f.is_null())));
                prop_assert_eq!(p.finish_reason.is_some(), finished);
                let first = json!({"id": "c1", "created": 1, "model": "m", "choices": []});
                let (mut a, mut b) = (openai::Assembler::default(), openai::Assembler::default());
                a.push(&first);
                b.push(&first);
                a.push(&chunk);
                b.push_plain(&p);
                prop_assert_eq!(a.finish(false, (1, 2)), b.finish(false, (1, 2)));
            }
        }
    }

    #[test]
    fn ordinary_chunks_take_the_plain_path() {
        let o = json!({"model": "m", "created_at": "t", "message": {"role": "assistant", "content": "Hello there"}, "done": false});
        assert_eq!(ollama::Plain::parse(&o.to_string()).map(|p| p.tokens()), Some(2));
        let c = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "system_fingerprint": "fp",
            "choices": [{"index": 0, "delta": {"content": "Hello there"}, "logprobs": null, "finish_reason": null}]});
        assert_eq!(openai::Plain::parse(&c.to_string()).map(|p| p.tokens()), Some(2));
        // the shapes it leaves to the Value reading
        assert!(openai::Plain::parse(r#"{"choices": [], "usage": {"prompt_tokens": 1}}"#).is_none());
        assert!(ollama::Plain::parse(r#"{"error": "boom"}"#).is_none());
        assert!(ollama::Plain::parse(r#"["hello"]"#).is_none());
        assert!(ollama::Plain::parse(r#"{"done": true, "done": false}"#).is_none());
    }

    /// The answer built as a `Value` from one chunk and the final one.
    fn value_answer(generate: bool, chunk: &Value, last: &Value) -> Value {
        let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
        let mut out = last.as_object().cloned().unwrap_or_default();
        if generate {
            out.insert("response".into(), json!(s(chunk.get("response"))));
            if !s(chunk.get("thinking")).is_empty() {
                out.insert("thinking".into(), json!(s(chunk.get("thinking"))));
            }
        } else {
            let m = chunk.get("message");
            let mut msg = serde_json::Map::new();
            msg.insert("role".into(), json!("assistant"));
            msg.insert("content".into(), json!(s(m.and_then(|m| m.get("content")))));
            if !s(m.and_then(|m| m.get("thinking"))).is_empty() {
                msg.insert("thinking".into(), json!(s(m.and_then(|m| m.get("thinking")))));
            }
            if let Some(Value::Array(calls)) = m.and_then(|m| m.get("tool_calls")) {
                msg.insert("tool_calls".into(), Value::Array(calls.clone()));
            }
            out.insert("message".into(), Value::Object(msg));
        }
        let mut ordered = serde_json::Map::new();
        for k in ["model", "created_at", "message", "response", "thinking"] {
            if let Some(v) = out.shift_remove(k) {
                ordered.insert(k.into(), v);
            }
        }
        ordered.extend(out);
        Value::Object(ordered)
    }
}
