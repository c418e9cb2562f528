//! The measurements. Each one alternates between the mock directly and the
//! gateway in front of it within the same run, so the "added" numbers compare
//! like with like on a machine whose speed drifts.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::time::MissedTickBehavior;

use crate::load::{self, histogram, record, Api, Loader, Target, Which};
use crate::mock::Knobs;
use crate::{report, sys};

/// The two sides of one measurement.
pub struct Sides<'a> {
    pub direct: &'a Target,
    pub gateway: &'a Target,
    /// A bare proxy on the gateway's CPU (see `floor.rs`), if one runs.
    pub floor: Option<&'a Target>,
    pub gateway_pid: u32,
    /// Cluster mode's own redis-server.
    pub redis_pid: Option<u32>,
}

impl<'a> Sides<'a> {
    pub fn get(&self, w: Which) -> &'a Target {
        match w {
            Which::Direct => self.direct,
            Which::Gateway => self.gateway,
            Which::Floor => self.floor.expect("no floor proxy in this run"),
        }
    }

    /// The sides that take turns, in the order of turn `i` (it rotates, so
    /// no side always goes first).
    fn turns(&self, i: usize) -> Vec<Which> {
        let mut all = vec![Which::Direct, Which::Gateway];
        all.extend(self.floor.map(|_| Which::Floor));
        let n = all.len();
        (0..n).map(|j| all[(i + j) % n]).collect()
    }
}

pub struct Pair<T> {
    pub direct: T,
    pub gateway: T,
}

impl<T> Pair<T> {
    pub fn get_mut(&mut self, w: Which) -> &mut T {
        match w {
            Which::Direct => &mut self.direct,
            Which::Gateway => &mut self.gateway,
            Which::Floor => unreachable!("the floor takes turns only in the latency and stream phases"),
        }
    }
}

/// One histogram per side that takes turns: direct, gateway and, when it
/// runs, the floor proxy.
pub struct Hists {
    pub direct: Histogram<u64>,
    pub gateway: Histogram<u64>,
    pub floor: Option<Histogram<u64>>,
}

impl Hists {
    fn new(sides: &Sides<'_>) -> Hists {
        Hists { direct: histogram(), gateway: histogram(), floor: sides.floor.map(|_| histogram()) }
    }

    fn get_mut(&mut self, w: Which) -> &mut Histogram<u64> {
        match w {
            Which::Direct => &mut self.direct,
            Which::Gateway => &mut self.gateway,
            Which::Floor => self.floor.as_mut().expect("no floor proxy in this run"),
        }
    }
}

fn hist_pair() -> Pair<Histogram<u64>> {
    Pair { direct: histogram(), gateway: histogram() }
}

/// Alternating order, so neither side always goes first.
fn order(i: usize) -> [Which; 2] {
    if i & 1 == 0 {
        [Which::Direct, Which::Gateway]
    } else {
        [Which::Gateway, Which::Direct]
    }
}

// ---------------------------------------------------------------- sanity

/// One request of each kind to both sides; the differences a client would see.
pub async fn sanity(loader: &Loader, sides: &Sides<'_>) -> Vec<String> {
    let knobs = Knobs { delay_ms: 0, chunks: 8, gap_ms: 0 };
    let mut cases: Vec<(String, Api, bool, Bytes)> = Vec::new();
    for api in [Api::OpenAi, Api::Chat, Api::Generate] {
        for stream in [false, true] {
            let label = format!("{} stream={stream}", api.path());
            cases.push((label, api, stream, load::body(api, knobs, 200, stream)));
        }
    }
    let with_usage = json!({"model": knobs.model(), "messages": [{"role": "user", "content": load::prompt(200)}],
        "stream": true, "stream_options": {"include_usage": true}});
    cases.push((
        "/v1/chat/completions stream=true include_usage".into(),
        Api::OpenAi,
        true,
        Bytes::from(with_usage.to_string()),
    ));
    let mut findings = Vec::new();
    for (label, api, stream, body) in cases {
        let d = loader.summary(sides.direct, api, body.clone(), stream).await;
        let g = loader.summary(sides.gateway, api, body, stream).await;
        match (d, g) {
            (Ok(d), Ok(g)) if d == g => {}
            (Ok(d), Ok(g)) => findings.push(format!("{label}: direct `{d}` but gateway `{g}`")),
            (d, g) => findings.push(format!("{label}: direct {d:?}, gateway {g:?}")),
        }
    }
    findings
}

// ---------------------------------------------------------------- latency

pub struct LatencyRow {
    pub case: String,
    pub h: Hists,
}

/// Added latency at concurrency 1: non-streaming requests, answering mock.
pub async fn latency(loader: &Loader, sides: &Sides<'_>, warmup: usize, pairs: usize) -> Vec<LatencyRow> {
    let knobs = Knobs { delay_ms: 0, chunks: 16, gap_ms: 0 };
    let mut rows = Vec::new();
    for (api, size) in [(Api::OpenAi, 200), (Api::OpenAi, 2048), (Api::Chat, 200), (Api::Chat, 2048)] {
        let body = load::body(api, knobs, size, false);
        for i in 0..warmup {
            for w in sides.turns(i) {
                loader.unary(sides.get(w), api, body.clone()).await;
            }
        }
        let mut h = Hists::new(sides);
        for i in 0..pairs {
            for w in sides.turns(i) {
                let t0 = Instant::now();
                if loader.unary(sides.get(w), api, body.clone()).await.is_some() {
                    record(h.get_mut(w), t0.elapsed());
                }
            }
        }
        let case = format!("{} {} prompt", api.path(), if size < 1024 { "200 B" } else { "2 KB" });
        eprintln!("bench:   {case}: {} / {} ok", h.direct.len(), h.gateway.len());
        rows.push(LatencyRow { case, h });
    }
    rows
}

// ---------------------------------------------------------------- cpu

pub struct CpuRow {
    pub case: String,
    pub requests: usize,
    pub concurrency: usize,
    pub cpu_per_request: Duration,
    /// Redis's CPU time per request through the gateway (cluster mode).
    pub redis_per_request: Option<Duration>,
    pub gateway_rps: f64,
    pub direct_rps: f64,
}

async fn closed_loop(loader: &Loader, t: &Target, api: Api, body: &Bytes, stream: bool, n: usize, c: usize) -> Duration {
    let t0 = Instant::now();
    futures_util::stream::iter(0..n)
        .for_each_concurrent(c, |_| async {
            if stream {
                loader.stream(t, api, body.clone(), Instant::now()).await;
            } else {
                loader.unary(t, api, body.clone()).await;
            }
        })
        .await;
    t0.elapsed()
}

/// Gateway CPU time per request (utime + stime over a fixed number of
/// requests), and the closed-loop throughput of each side.
pub async fn cpu(loader: &Loader, sides: &Sides<'_>, requests: usize, streams: usize, c: usize) -> Vec<CpuRow> {
    let fast = Knobs { delay_ms: 0, chunks: 16, gap_ms: 0 };
    let long = Knobs { delay_ms: 0, chunks: 64, gap_ms: 0 };
    let cases = [
        ("/v1/chat/completions non-stream, 200 B, 16 chunks", Api::OpenAi, load::body(Api::OpenAi, fast, 200, false), false, requests),
        ("/api/chat non-stream, 2 KB, 16 chunks", Api::Chat, load::body(Api::Chat, fast, 2048, false), false, requests),
        ("/api/chat stream, 200 B, 64 chunks", Api::Chat, load::body(Api::Chat, long, 200, true), true, streams),
    ];
    let redis_cpu = || sides.redis_pid.and_then(sys::cpu_time);
    let mut rows = Vec::new();
    for (case, api, body, stream, n) in cases {
        // Warm both sides' connection pools to this concurrency.
        closed_loop(loader, sides.direct, api, &body, stream, c * 4, c).await;
        closed_loop(loader, sides.gateway, api, &body, stream, c * 4, c).await;
        let direct = closed_loop(loader, sides.direct, api, &body, stream, n, c).await;
        let (before, redis_before) = (sys::cpu_time(sides.gateway_pid).unwrap_or_default(), redis_cpu());
        let gateway = closed_loop(loader, sides.gateway, api, &body, stream, n, c).await;
        let (after, redis_after) = (sys::cpu_time(sides.gateway_pid).unwrap_or_default(), redis_cpu());
        let row = CpuRow {
            case: case.into(),
            requests: n,
            concurrency: c,
            cpu_per_request: (after - before) / n as u32,
            redis_per_request: redis_before.zip(redis_after).map(|(b, a)| a.saturating_sub(b) / n as u32),
            gateway_rps: n as f64 / gateway.as_secs_f64(),
            direct_rps: n as f64 / direct.as_secs_f64(),
        };
        let redis = row.redis_per_request.map_or_else(String::new, |d| format!(" (Redis {})", report::us(d)));
        eprintln!("bench:   {case}: {} CPU/request{redis}", report::us(row.cpu_per_request));
        rows.push(row);
    }
    rows
}

// ---------------------------------------------------------------- streaming

pub struct StreamRow {
    pub case: String,
    pub ttfc: Hists,
    pub gap: Hists,
}

/// Time to first chunk and the gaps between chunks of paced streams, the
/// sides interleaved, `workers` streams at a time.
pub async fn streaming(loader: &Loader, sides: &Sides<'_>, knobs: Knobs, pairs: usize, workers: usize) -> Vec<StreamRow> {
    let mut rows = Vec::new();
    for api in [Api::Chat, Api::Generate, Api::OpenAi] {
        let body = load::body(api, knobs, 200, true);
        let mut ttfc = Hists::new(sides);
        let mut gap = Hists::new(sides);
        let n = sides.turns(0).len();
        let mut results = futures_util::stream::iter(0..pairs * n)
            .map(|i| {
                let w = sides.turns(i / n)[i % n];
                let body = body.clone();
                async move { (w, loader.stream(sides.get(w), api, body, Instant::now()).await) }
            })
            .buffer_unordered(workers);
        while let Some((w, timing)) = results.next().await {
            if let Some(t) = timing {
                record(ttfc.get_mut(w), t.ttfc);
                for g in &t.gaps {
                    record(gap.get_mut(w), *g);
                }
            }
        }
        let case = format!("{} stream, {} chunks {} ms apart", api.path(), knobs.chunks, knobs.gap_ms);
        eprintln!("bench:   {case}: {} / {} ok", ttfc.direct.len(), ttfc.gateway.len());
        rows.push(StreamRow { case, ttfc, gap });
    }
    rows
}

// ---------------------------------------------------------------- throughput

pub struct RateLevel {
    pub rate: f64,
    pub h: Pair<Histogram<u64>>,
    pub achieved: Pair<f64>,
    pub errors: Pair<u64>,
    /// Worst delay between a request's scheduled and actual start.
    pub lag: Pair<Duration>,
}

impl RateLevel {
    pub fn added_p99(&self) -> i64 {
        self.h.gateway.value_at_quantile(0.99) as i64 - self.h.direct.value_at_quantile(0.99) as i64
    }

    /// The load generator kept up: the direct side met the schedule.
    pub fn generator_ok(&self) -> bool {
        self.errors.direct == 0
            && self.lag.direct < Duration::from_millis(10)
            && self.achieved.direct >= self.rate * 0.9
    }

    pub fn passes(&self) -> bool {
        self.errors.gateway == 0 && self.added_p99() <= 10_000 && self.achieved.gateway >= self.rate * 0.9
    }
}

static TRACE_EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Open-loop load at a fixed rate for `dur`; latency counts from each
/// request's scheduled start (so a stalled server cannot hide its queue).
async fn open_loop(loader: &Loader, t: &Target, api: Api, body: &Bytes, rate: f64, dur: Duration, h: &mut Histogram<u64>) -> (f64, Duration, u64) {
    let total = (rate * dur.as_secs_f64()).round().max(1.0) as u64;
    let errors_before = loader.error_count(t.which);
    let start = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut sent = 0u64;
    let mut ok = 0u64;
    let mut max_lag = Duration::ZERO;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    // Start times in the trace are relative to the first level's first round.
    let epoch = *TRACE_EPOCH.get_or_init(|| {
        if loader.trace.is_some() {
            // To line the trace up with other recordings of the same run.
            let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            eprintln!("bench: trace start_ms 0 is unix time {:.3} s", unix.as_secs_f64());
        }
        start
    });
    loop {
        tokio::select! {
            biased;
            Some((scheduled, done)) = inflight.next(), if !inflight.is_empty() => {
                let (scheduled, done): (Instant, Option<Duration>) = (scheduled, done);
                if let Some(trace) = &loader.trace {
                    let latency = done.unwrap_or_else(|| scheduled.elapsed());
                    trace.borrow_mut().push(format!(
                        "{},{rate:.0},{:.3},{},{}",
                        t.which.label(),
                        scheduled.duration_since(epoch).as_secs_f64() * 1e3,
                        latency.as_micros(),
                        u8::from(done.is_some())
                    ));
                }
                if let Some(d) = done {
                    record(h, d);
                    ok += 1;
                }
            }
            _ = tick.tick(), if sent < total => {
                let now = Instant::now();
                let due = ((now.duration_since(start).as_secs_f64() * rate) as u64 + 1).min(total);
                while sent < due {
                    let scheduled = start + Duration::from_secs_f64(sent as f64 / rate);
                    max_lag = max_lag.max(now.saturating_duration_since(scheduled));
                    let body = body.clone();
                    inflight.push(async move { (scheduled, loader.unary(t, api, body).await.map(|_| scheduled.elapsed())) });
                    sent += 1;
                }
            }
            else => break,
        }
    }
    // Completions per second of the sending window (the last replies land
    // one response time after it closes).
    let achieved = ok as f64 / dur.as_secs_f64();
    (achieved, max_lag, loader.error_count(t.which) - errors_before)
}

/// Raises the request rate against a mock that answers in 50 ms until the
/// gateway adds more than 10 ms at p99 (or fails requests), then tries once
/// halfway between the last good and the first bad rate.
pub async fn throughput(loader: &Loader, sides: &Sides<'_>, rates: &[f64], round: Duration, rounds: usize) -> Vec<RateLevel> {
    let knobs = Knobs { delay_ms: 50, chunks: 16, gap_ms: 0 };
    let api = Api::OpenAi;
    let body = load::body(api, knobs, 200, false);
    let mut levels: Vec<RateLevel> = Vec::new();
    let mut queue: Vec<f64> = rates.to_vec();
    queue.reverse();
    let mut bisected = false;
    // A failing level is run once more before it counts as failed; this
    // many times per ramp, so a machine that fails everything stays quick.
    let mut retries_left = 3;
    let mut retrying = false;
    while let Some(rate) = queue.pop() {
        let mut level = RateLevel {
            rate,
            h: hist_pair(),
            achieved: Pair { direct: 0.0, gateway: 0.0 },
            errors: Pair { direct: 0, gateway: 0 },
            lag: Pair { direct: Duration::ZERO, gateway: Duration::ZERO },
        };
        for r in 0..rounds {
            for w in order(r) {
                let (achieved, lag, errors) = open_loop(loader, sides.get(w), api, &body, rate, round, level.h.get_mut(w)).await;
                *level.achieved.get_mut(w) += achieved / rounds as f64;
                let l = level.lag.get_mut(w);
                *l = (*l).max(lag);
                *level.errors.get_mut(w) += errors;
            }
            // Let the last round's stragglers and closing connections settle.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (pass, gen_ok) = (level.passes(), level.generator_ok());
        // One bad round can be another process (or the hypervisor) taking a
        // CPU for a few milliseconds: a level fails only when it fails twice
        // in a row.
        if (!pass || !gen_ok) && !retrying && retries_left > 0 {
            retries_left -= 1;
            retrying = true;
            eprintln!(
                "bench:   {rate:>6.0} req/s failed (added p99 {:+.2} ms{}); once more",
                level.added_p99() as f64 / 1000.0,
                if gen_ok { "" } else { ", load generator behind" }
            );
            queue.push(rate);
            continue;
        }
        eprintln!(
            "bench:   {rate:>6.0} req/s: added p99 {:+.2} ms, gateway {:.0} req/s, errors {}/{}{}",
            level.added_p99() as f64 / 1000.0,
            level.achieved.gateway,
            level.errors.direct,
            level.errors.gateway,
            if gen_ok { "" } else { " (load generator could not keep up)" }
        );
        retrying = false;
        let last_good = levels.iter().rev().find(|l| l.passes() && l.generator_ok()).map(|l| l.rate);
        levels.push(level);
        if !pass || !gen_ok {
            if let (false, Some(good)) = (bisected, last_good) {
                let mid = ((good + rate) / 2.0 / 50.0).round() * 50.0;
                if mid > good && mid < rate {
                    bisected = true;
                    queue.clear();
                    queue.push(mid);
                    continue;
                }
            }
            break;
        }
    }
    levels.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    levels
}

// ---------------------------------------------------------------- many streams

pub struct CrowdSide {
    pub ok: usize,
    pub errors: usize,
    /// Streams with a gap over the stall threshold (errors not included).
    pub stalled: usize,
    pub gap: Histogram<u64>,
    pub ttfc: Histogram<u64>,
    pub max_gap: Duration,
    pub wall: Duration,
    /// Connections the kernel dropped from full accept queues meanwhile
    /// (machine-wide; the client retries after about a second).
    pub listen_overflows: u64,
}

pub struct CrowdLevel {
    pub streams: usize,
    pub side: Pair<CrowdSide>,
    pub peak_rss_kib: u64,
    pub peak_fds: usize,
}

pub const STALL: Duration = Duration::from_millis(200);

impl CrowdLevel {
    pub fn passes(&self) -> bool {
        self.side.gateway.errors == 0 && self.side.gateway.stalled == 0
    }

    pub fn generator_ok(&self) -> bool {
        self.side.direct.errors == 0 && self.side.direct.stalled == 0
    }
}

async fn crowd(loader: &Loader, t: &Target, body: &Bytes, n: usize, ramp: Duration, watch: Option<u32>, peaks: &mut (u64, usize)) -> CrowdSide {
    let overflows_before = sys::tcp_ext("ListenOverflows");
    let start = Instant::now();
    let mut streams: FuturesUnordered<_> = (0..n)
        .map(|i| {
            let at = start + ramp.mul_f64(i as f64 / n as f64);
            let body = body.clone();
            async move {
                tokio::time::sleep_until(at.into()).await;
                loader.stream(t, Api::Chat, body, Instant::now()).await
            }
        })
        .collect();
    let mut side =
        CrowdSide {
            ok: 0,
            errors: 0,
            stalled: 0,
            gap: histogram(),
            ttfc: histogram(),
            max_gap: Duration::ZERO,
            wall: Duration::ZERO,
            listen_overflows: 0,
        };
    let mut sample = tokio::time::interval(Duration::from_millis(100));
    sample.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            next = streams.next() => match next {
                Some(Some(t)) => {
                    record(&mut side.ttfc, t.ttfc);
                    for g in &t.gaps {
                        record(&mut side.gap, *g);
                    }
                    let max = t.max_gap();
                    side.max_gap = side.max_gap.max(max);
                    if max > STALL {
                        side.stalled += 1;
                    } else {
                        side.ok += 1;
                    }
                }
                Some(None) => side.errors += 1,
                None => break,
            },
            _ = sample.tick(), if watch.is_some() => {
                let pid = watch.unwrap_or_default();
                peaks.0 = peaks.0.max(sys::rss_kib(pid).unwrap_or(0));
                peaks.1 = peaks.1.max(sys::open_fds(pid).unwrap_or(0));
            }
        }
    }
    side.wall = start.elapsed();
    side.listen_overflows = sys::tcp_ext("ListenOverflows") - overflows_before;
    side
}

/// Many paced streams at once (64 chunks 20 ms apart), started over `ramp`;
/// stops raising the count after the first level the gateway fails.
pub async fn crowds(loader: &Loader, sides: &Sides<'_>, levels: &[usize], ramp: Duration) -> Vec<CrowdLevel> {
    let knobs = Knobs { delay_ms: 0, chunks: 64, gap_ms: 20 };
    let body = load::body(Api::Chat, knobs, 200, true);
    let mut out = Vec::new();
    for &n in levels {
        let mut peaks = (0u64, 0usize);
        let direct = crowd(loader, sides.direct, &body, n, ramp, None, &mut peaks).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let gateway = crowd(loader, sides.gateway, &body, n, ramp, Some(sides.gateway_pid), &mut peaks).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let level = CrowdLevel { streams: n, side: Pair { direct, gateway }, peak_rss_kib: peaks.0, peak_fds: peaks.1 };
        eprintln!(
            "bench:   {n:>5} streams: gateway ok {} stalled {} errors {}, max gap {} ms (direct: ok {} stalled {} errors {}, max gap {} ms)",
            level.side.gateway.ok,
            level.side.gateway.stalled,
            level.side.gateway.errors,
            level.side.gateway.max_gap.as_millis(),
            level.side.direct.ok,
            level.side.direct.stalled,
            level.side.direct.errors,
            level.side.direct.max_gap.as_millis(),
        );
        let stop = !level.passes();
        out.push(level);
        if stop {
            break;
        }
    }
    out
}

/// What an idle client connection costs the gateway: `n` connections that
/// made one request each (`GET /readyz`) and stay open, the gateway's RSS
/// before and after (KiB). They close when this returns.
pub async fn idle_connections(gateway: &Target, pid: u32, n: usize) -> anyhow::Result<(u64, u64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = gateway.base.trim_start_matches("http://");
    let before = sys::rss_kib(pid).unwrap_or(0);
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /readyz HTTP/1.1\r\nhost: bench\r\n\r\n").await?;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        loop {
            let k = tcp.read(&mut buf).await?;
            anyhow::ensure!(k > 0, "the gateway closed the connection before answering /readyz");
            got.extend_from_slice(&buf[..k]);
            let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            anyhow::ensure!(head.starts_with("http/1.1 200"), "/readyz answered {}", head.lines().next().unwrap_or(""));
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| anyhow::anyhow!("/readyz answered without a content-length"))?;
            if got.len() >= end + 4 + len {
                break;
            }
        }
        open.push(tcp);
    }
    // Each connection has had its answer: its task waits for the next
    // request, holding what it will hold while idle.
    let after = sys::rss_kib(pid).unwrap_or(0);
    drop(open);
    Ok((before, after))
}
