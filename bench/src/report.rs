//! The markdown report printed at the end of a run.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::gateway::Mode;
use crate::mock::Knobs;
use crate::phases::{CpuRow, CrowdLevel, LatencyRow, RateLevel, StreamRow, STALL};
use crate::sys::{MachineInfo, Placement};

pub struct Header {
    pub machine: MachineInfo,
    pub nofile: u64,
    pub placement: Placement,
    pub awake: bool,
    /// The gateway's `BUSY_POLL`, when `--busy-poll` set it.
    pub busy_poll: Option<String>,
    pub quick: bool,
    pub mode: Mode,
    pub revision: String,
    pub duration: Duration,
    pub loadavg_after: String,
}

impl Default for Header {
    fn default() -> Self {
        Header {
            machine: MachineInfo {
                cpus: 0,
                cpu_model: String::new(),
                mem_total: String::new(),
                kernel: String::new(),
                date: String::new(),
                busy_before: Vec::new(),
                loadavg_before: String::new(),
                hop: None,
            },
            nofile: 0,
            placement: Placement::Unpinned,
            awake: false,
            busy_poll: None,
            quick: false,
            mode: Mode::Embedded,
            revision: String::new(),
            duration: Duration::ZERO,
            loadavg_after: String::new(),
        }
    }
}

#[derive(Default)]
pub struct Report {
    pub header: Header,
    pub findings: Vec<String>,
    pub latency: Vec<LatencyRow>,
    pub cpu: Vec<CpuRow>,
    pub stream_knobs: Option<Knobs>,
    pub streaming: Vec<StreamRow>,
    pub rates: Vec<RateLevel>,
    pub crowds: Vec<CrowdLevel>,
    pub rss: Vec<(String, u64)>,
    pub hwm_kib: u64,
    pub threads_idle: u64,
    pub threads_end: u64,
    /// Open descriptors once the load stopped, and after `--linger`.
    pub fds_idle: usize,
    pub fds_linger: Option<usize>,
    /// RSS added per idle client connection (bytes), from `idle_connections`.
    pub idle_connection_bytes: Option<u64>,
    pub gateway_cpu_total: Duration,
    /// CPU time of all other processes on the machine while measuring.
    pub foreign_cpu: Duration,
    /// Steal time of the machine's CPUs while measuring (the hypervisor's).
    pub steal: Duration,
    /// The first request after start-up, per side.
    pub first_request: Vec<(crate::load::Which, Duration)>,
    pub measure_wall: Duration,
    pub errors: BTreeMap<String, u64>,
    pub statuses: BTreeMap<String, u64>,
    pub gateway_survived: bool,
    pub gateway_log: Vec<(String, usize)>,
}

/// A duration as whole microseconds: "176 µs".
pub fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// Microseconds as milliseconds, three significant-ish decimals.
fn ms(us: u64) -> String {
    if us < 10_000 {
        format!("{:.3} ms", us as f64 / 1000.0)
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

fn added(gateway: u64, direct: u64) -> String {
    let d = gateway as i64 - direct as i64;
    let sign = if d < 0 { "−" } else { "+" };
    let a = d.unsigned_abs();
    if a < 10_000 {
        format!("{sign}{:.3} ms", a as f64 / 1000.0)
    } else {
        format!("{sign}{:.1} ms", a as f64 / 1000.0)
    }
}

fn ratio(gateway: u64, direct: u64) -> String {
    if direct == 0 {
        "–".into()
    } else {
        format!("{:.2}×", gateway as f64 / direct as f64)
    }
}

fn q(h: &Histogram<u64>, quantile: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(quantile)
    }
}

/// The floor proxy's added p50 / p99 over direct, or a dash without one.
fn floor_added(floor: Option<&Histogram<u64>>, d50: u64, d99: u64) -> String {
    floor.map_or("–".into(), |f| format!("{} / {}", added(q(f, 0.5), d50), added(q(f, 0.99), d99)))
}

/// A summary row for the floor proxy: direct's and its p50 / p99.
fn floor_row(label: String, (d50, d99): (u64, u64), f: &Histogram<u64>) -> [String; 5] {
    let (f50, f99) = (q(f, 0.5), q(f, 0.99));
    [
        label,
        format!("{} / {}", ms(d50), ms(d99)),
        format!("{} / {}", ms(f50), ms(f99)),
        format!("{} / {}", added(f50, d50), added(f99, d99)),
        ratio(f50, d50),
    ]
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

impl Report {
    /// One line per headline number, the details follow in their sections.
    fn render_summary(&self, o: &mut String) {
        let mut rows: Vec<[String; 5]> = Vec::new();
        for r in &self.latency {
            let (d50, g50, d99, g99) = (q(&r.h.direct, 0.5), q(&r.h.gateway, 0.5), q(&r.h.direct, 0.99), q(&r.h.gateway, 0.99));
            rows.push([format!("latency p50, {}", r.case), ms(d50), ms(g50), added(g50, d50), ratio(g50, d50)]);
            rows.push([format!("latency p99, {}", r.case), ms(d99), ms(g99), added(g99, d99), ratio(g99, d99)]);
            if let Some(f) = &r.h.floor {
                rows.push(floor_row(format!("floor (bare proxy hop) p50 / p99, {}", r.case), (d50, d99), f));
            }
        }
        if let Some(best) = self.rates.iter().filter(|l| l.passes() && l.generator_ok()).max_by(|a, b| a.rate.total_cmp(&b.rate)) {
            rows.push([
                "max sustained req/s with added p99 ≤ 10 ms (mock 50 ms)".into(),
                format!("≥ {:.0}", best.achieved.direct),
                format!("{:.0}", best.rate),
                format!("added p99 {}", added(q(&best.h.gateway, 0.99), q(&best.h.direct, 0.99))),
                "".into(),
            ]);
        }
        for r in &self.cpu {
            for (who, cpu) in [("gateway", Some(r.cpu_per_request)), ("Redis", r.redis_per_request)] {
                if let Some(cpu) = cpu {
                    rows.push([format!("{who} CPU per request, {}", r.case), "".into(), us(cpu), "".into(), "".into()]);
                }
            }
        }
        for r in &self.streaming {
            let (t50d, t50g, t99d, t99g) = (q(&r.ttfc.direct, 0.5), q(&r.ttfc.gateway, 0.5), q(&r.ttfc.direct, 0.99), q(&r.ttfc.gateway, 0.99));
            let (g99d, g99g) = (q(&r.gap.direct, 0.99), q(&r.gap.gateway, 0.99));
            let api = r.case.split(' ').next().unwrap_or("");
            rows.push([format!("time to first chunk p50, {api}"), ms(t50d), ms(t50g), added(t50g, t50d), ratio(t50g, t50d)]);
            rows.push([format!("time to first chunk p99, {api}"), ms(t99d), ms(t99g), added(t99g, t99d), ratio(t99g, t99d)]);
            rows.push([format!("inter-chunk gap p99, {api}"), ms(g99d), ms(g99g), added(g99g, g99d), ratio(g99g, g99d)]);
            if let Some(f) = &r.ttfc.floor {
                rows.push(floor_row(format!("floor (bare proxy hop) TTFC p50 / p99, {api}"), (t50d, t99d), f));
            }
        }
        if !self.crowds.is_empty() {
            let held = |f: &dyn Fn(&CrowdLevel) -> bool| {
                self.crowds.iter().take_while(|l| f(l)).last().map_or_else(|| "0".to_owned(), |l| l.streams.to_string())
            };
            let tried = self.crowds.last().map_or(0, |l| l.streams);
            rows.push([
                format!("concurrent paced streams without a stall (tried up to {tried})"),
                held(&|l| l.generator_ok()),
                held(&|l| l.passes()),
                "".into(),
                "".into(),
            ]);
        }
        if let Some((_, idle)) = self.rss.first() {
            let (label, peak) = match self.crowds.iter().map(|l| l.peak_rss_kib).max() {
                Some(peak) => ("gateway RSS idle / peak under the stream load", peak),
                None => ("gateway RSS idle / high-water mark", self.hwm_kib),
            };
            rows.push([label.into(), "".into(), format!("{} / {}", mib(*idle), mib(peak)), "".into(), "".into()]);
        }
        if let (Some(g), Some(d)) = (
            self.first_request.iter().find(|(w, _)| *w == crate::load::Which::Gateway),
            self.first_request.iter().find(|(w, _)| *w == crate::load::Which::Direct),
        ) {
            let (g, d) = (g.1.as_micros() as u64, d.1.as_micros() as u64);
            rows.push(["first request after start-up (cold)".into(), ms(d), ms(g), added(g, d), ratio(g, d)]);
        }
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(o, "\n### Summary\n");
        let _ = writeln!(o, "| metric | direct | gateway | added | × |");
        let _ = writeln!(o, "|---|--:|--:|--:|--:|");
        for r in rows {
            let _ = writeln!(o, "| {} | {} | {} | {} | {} |", r[0], r[1], r[2], r[3], r[4]);
        }
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let h = &self.header;
        let m = &h.machine;
        let _ = writeln!(
            o,
            "\n## llm-quota benchmark — {} mode{}\n",
            match h.mode {
                Mode::Embedded => "embedded",
                Mode::Cluster => "cluster",
            },
            if h.quick { " (--quick: small samples, indicative only)" } else { "" }
        );
        let _ = writeln!(o, "- date: {}; gateway revision {}; run took {:.0} s", m.date, h.revision, h.duration.as_secs_f64());
        let _ = writeln!(o, "- machine: {} CPUs ({}), {} RAM, Linux {}", m.cpus, m.cpu_model, m.mem_total, m.kernel);
        if let Some(hop) = &m.hop {
            let _ = writeln!(
                o,
                "- one hop between CPU 0 and CPU 1 (a byte there and back over a socket pair, median): {} back to back, {} after 1 ms idle; {}",
                us(hop.busy),
                us(hop.idle),
                match h.placement {
                    Placement::OneCpu => "with --one-cpu only a hop to PostgreSQL (not pinned) can pay it",
                    _ => "every hop between the gateway and the other processes pays it",
                }
            );
        }
        let _ = writeln!(
            o,
            "- placement: {}; open-files limit {}{}",
            match h.placement {
                Placement::Split => "gateway pinned to CPU 1; mock upstream and load generator (and Redis, in cluster mode) share CPU 0",
                Placement::OneCpu => "--one-cpu: gateway, mock upstream and load generator (and Redis, in cluster mode) all pinned to CPU 1 (no hop between CPUs; they share one core)",
                Placement::Unpinned => "not pinned (fewer than 2 CPUs): all processes share the machine",
            },
            h.nofile,
            if h.awake { "; --awake: a nice-19 spinner on every CPU keeps it out of idle (its CPU time is not counted as load)" } else { "" }
        );
        if let Some(window) = &h.busy_poll {
            let _ = writeln!(
                o,
                "- gateway run with `BUSY_POLL={window}`: its workers poll for I/O without sleeping for {window} after each request or upstream read, so the gateway's CPU never goes idle while the load runs; **its CPU-per-request figures include that spinning** (measure CPU without `--busy-poll`)"
            );
        }
        let busy: Vec<String> = m.busy_before.iter().enumerate().map(|(i, b)| format!("CPU {i} {:.0} %", b * 100.0)).collect();
        let _ = writeln!(
            o,
            "- background load in the second before the measurements: {} busy; load average {} before, {} after{}",
            busy.join(", "),
            m.loadavg_before,
            h.loadavg_after,
            if m.busy_before.iter().any(|b| *b > 0.15) {
                " — **other work was running: expect noisy numbers, rerun on a quiet machine**"
            } else {
                ""
            }
        );
        let share = self.foreign_cpu.as_secs_f64() / self.measure_wall.as_secs_f64().max(1e-9);
        let _ = writeln!(
            o,
            "- other processes{} used {:.1} CPU-seconds during the {:.0} s of measurements ({:.0} % of one CPU){}",
            if h.mode == Mode::Cluster { " (PostgreSQL included)" } else { "" },
            self.foreign_cpu.as_secs_f64(),
            self.measure_wall.as_secs_f64(),
            share * 100.0,
            if share > 0.25 {
                " — **the machine was busy: numbers are disturbed, rerun on a quiet machine**"
            } else if share > 0.05 {
                " — the machine was not quite quiet: tails may be disturbed"
            } else {
                ""
            }
        );
        let stolen = self.steal.as_secs_f64() / self.measure_wall.as_secs_f64().max(1e-9);
        let _ = writeln!(
            o,
            "- steal time (the hypervisor ran something else while a vCPU of this VM wanted to run): {:.2} s in all, {:.1} % of one CPU{}",
            self.steal.as_secs_f64(),
            stolen * 100.0,
            if stolen > 0.02 { " — vCPUs were held up now and then: tails may be disturbed" } else { "" }
        );
        let _ = writeln!(
            o,
            "- every number compares the same requests sent straight to the mock (direct) and through the gateway, interleaved; added = gateway − direct, × = gateway / direct"
        );

        self.render_summary(&mut o);

        if !self.findings.is_empty() {
            let _ = writeln!(o, "\n### Sanity: replies that differ between direct and gateway\n");
            for f in &self.findings {
                let _ = writeln!(o, "- {f}");
            }
        }

        if !self.latency.is_empty() {
            let _ = writeln!(o, "\n### Added latency, concurrency 1, non-streaming (mock answers at once, 16 chunks)\n");
            let _ = writeln!(o, "| case | n | direct p50 | gateway p50 | added p50 | × | direct p99 | gateway p99 | added p99 | × | floor added p50 / p99 |");
            let _ = writeln!(o, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
            for r in &self.latency {
                let (d50, g50, d99, g99) =
                    (q(&r.h.direct, 0.5), q(&r.h.gateway, 0.5), q(&r.h.direct, 0.99), q(&r.h.gateway, 0.99));
                let floor = floor_added(r.h.floor.as_ref(), d50, d99);
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.case,
                    r.h.gateway.len(),
                    ms(d50),
                    ms(g50),
                    added(g50, d50),
                    ratio(g50, d50),
                    ms(d99),
                    ms(g99),
                    added(g99, d99),
                    ratio(g99, d99),
                    floor
                );
            }
            if self.latency.iter().any(|r| r.h.floor.is_some()) {
                let _ = writeln!(
                    o,
                    "\n**floor**: the same requests through a bare proxy on the gateway's CPU (tokio, hyper server and pooled client; no key, quota, counting or parsing), \
                     taking turns with the other two sides: what one more HTTP hop costs on this machine. The gateway's own work is its added minus the floor's."
                );
            }
        }

        if !self.cpu.is_empty() {
            let c = self.cpu[0].concurrency;
            let _ = writeln!(o, "\n### Gateway CPU per request (utime+stime from /proc, closed loop, concurrency {c}, mock answers at once)\n");
            let _ = writeln!(o, "| case | requests | gateway CPU / request | Redis CPU / request | gateway req/s (1 CPU) | direct req/s | × |");
            let _ = writeln!(o, "|---|--:|--:|--:|--:|--:|--:|");
            for r in &self.cpu {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {:.0} | {:.0} | {:.2}× |",
                    r.case,
                    r.requests,
                    us(r.cpu_per_request),
                    r.redis_per_request.map_or_else(|| "–".to_string(), us),
                    r.gateway_rps,
                    r.direct_rps,
                    r.gateway_rps / r.direct_rps.max(1e-9)
                );
            }
            let _ = writeln!(o, "\n(CPU time is read in clock ticks of {} ms; the direct req/s is bounded by the shared CPU 0.)", 1000 / crate::sys::clock_ticks_per_sec());
        }

        if !self.streaming.is_empty() {
            let k = self.stream_knobs.unwrap_or(Knobs { delay_ms: 0, chunks: 0, gap_ms: 0 });
            let _ = writeln!(o, "\n### Streaming: time to first chunk and inter-chunk gaps ({} chunks {} ms apart, 4 streams at a time)\n", k.chunks, k.gap_ms);
            let _ = writeln!(o, "| case | n | TTFC p50 direct / gateway | added | TTFC p99 direct / gateway | added | gap p99 direct / gateway | added | max gap direct / gateway | floor TTFC added p50 / p99 |");
            let _ = writeln!(o, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
            for r in &self.streaming {
                let (t50d, t50g, t99d, t99g) = (q(&r.ttfc.direct, 0.5), q(&r.ttfc.gateway, 0.5), q(&r.ttfc.direct, 0.99), q(&r.ttfc.gateway, 0.99));
                let (g99d, g99g) = (q(&r.gap.direct, 0.99), q(&r.gap.gateway, 0.99));
                let _ = writeln!(
                    o,
                    "| {} | {} | {} / {} | {} | {} / {} | {} | {} / {} | {} | {} / {} | {} |",
                    r.case,
                    r.ttfc.gateway.len(),
                    ms(t50d),
                    ms(t50g),
                    added(t50g, t50d),
                    ms(t99d),
                    ms(t99g),
                    added(t99g, t99d),
                    ms(g99d),
                    ms(g99g),
                    added(g99g, g99d),
                    ms(r.gap.direct.max()),
                    ms(r.gap.gateway.max()),
                    floor_added(r.ttfc.floor.as_ref(), t50d, t99d),
                );
            }
        }

        if !self.rates.is_empty() {
            let _ = writeln!(o, "\n### Request rate against a mock answering in 50 ms (`/v1/chat/completions` non-stream, 200 B prompt, open loop)\n");
            let _ = writeln!(o, "| offered req/s | in flight ≈ | direct p50 / p99 | gateway p50 / p99 | added p99 | gateway achieved req/s | errors direct / gateway | added p99 ≤ 10 ms |");
            let _ = writeln!(o, "|--:|--:|--:|--:|--:|--:|--:|:-:|");
            for l in &self.rates {
                let note = if !l.generator_ok() { " (load generator behind)" } else { "" };
                let _ = writeln!(
                    o,
                    "| {:.0} | {:.0} | {} / {} | {} / {} | {} | {:.0} | {} / {} | {}{} |",
                    l.rate,
                    l.rate * 0.05,
                    ms(q(&l.h.direct, 0.5)),
                    ms(q(&l.h.direct, 0.99)),
                    ms(q(&l.h.gateway, 0.5)),
                    ms(q(&l.h.gateway, 0.99)),
                    added(q(&l.h.gateway, 0.99), q(&l.h.direct, 0.99)),
                    l.achieved.gateway,
                    l.errors.direct,
                    l.errors.gateway,
                    if l.passes() { "yes" } else { "**no**" },
                    note
                );
            }
            let best = self.rates.iter().filter(|l| l.passes() && l.generator_ok()).map(|l| l.rate).fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.max(r))));
            let limited = self.rates.iter().any(|l| !l.generator_ok());
            match best {
                Some(b) => {
                    let _ = writeln!(
                        o,
                        "\n**Max sustained rate with added p99 ≤ 10 ms: {b:.0} req/s**{}",
                        if limited { " (the ramp stopped where the load generator on CPU 0 fell behind: a lower bound)" } else { "" }
                    );
                }
                None => {
                    let _ = writeln!(o, "\n**No offered rate met added p99 ≤ 10 ms.**");
                }
            }
        }

        if !self.crowds.is_empty() {
            let _ = writeln!(o, "\n### Concurrent paced streams (`/api/chat`, 64 chunks 20 ms apart; stall = a gap > {} ms, or an error)\n", STALL.as_millis());
            let _ = writeln!(o, "| streams | gateway ok / stalled / errors | direct ok / stalled / errors | gap p99 direct / gateway | max gap direct / gateway | TTFC p99 direct / gateway | accept-queue drops direct / gateway | gateway peak RSS | gateway peak fds | holds |");
            let _ = writeln!(o, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|");
            for l in &self.crowds {
                let (d, g) = (&l.side.direct, &l.side.gateway);
                let _ = writeln!(
                    o,
                    "| {} | {} / {} / {} | {} / {} / {} | {} / {} | {} / {} | {} / {} | {} / {} | {} | {} | {}{} |",
                    l.streams,
                    g.ok,
                    g.stalled,
                    g.errors,
                    d.ok,
                    d.stalled,
                    d.errors,
                    ms(q(&d.gap, 0.99)),
                    ms(q(&g.gap, 0.99)),
                    ms(d.max_gap.as_micros() as u64),
                    ms(g.max_gap.as_micros() as u64),
                    ms(q(&d.ttfc, 0.99)),
                    ms(q(&g.ttfc, 0.99)),
                    d.listen_overflows,
                    g.listen_overflows,
                    mib(l.peak_rss_kib),
                    l.peak_fds,
                    if l.passes() { "yes" } else { "**no**" },
                    if l.generator_ok() { "" } else { " (direct stalled too: load generator limit)" }
                );
            }
            let held = self.crowds.iter().take_while(|l| l.passes()).last().map(|l| l.streams);
            let _ = writeln!(
                o,
                "\n**Concurrent paced streams held without a stall: {}**",
                held.map_or_else(|| "none of the levels tried".into(), |n| format!("{n} (of {} tried)", self.crowds.iter().map(|l| l.streams.to_string()).collect::<Vec<_>>().join(", ")))
            );
        }

        if !self.rss.is_empty() {
            let _ = writeln!(o, "\n### Gateway memory and resources\n");
            let _ = writeln!(o, "| moment | VmRSS |");
            let _ = writeln!(o, "|---|--:|");
            for (when, kib) in &self.rss {
                let _ = writeln!(o, "| {when} | {} |", mib(*kib));
            }
            if let Some(peak) = self.crowds.iter().map(|l| l.peak_rss_kib).max() {
                let _ = writeln!(o, "| peak under the stream load (sampled every 100 ms) | {} |", mib(peak));
            }
            let _ = writeln!(o, "| VmHWM (high-water mark of the run) | {} |", mib(self.hwm_kib));
            let _ = writeln!(
                o,
                "\nthreads {} at start, {} at the end; {} open fds once the load stopped{}{}; {:.1} s CPU in all",
                self.threads_idle,
                self.threads_end,
                self.fds_idle,
                self.fds_linger.map_or_else(String::new, |n| format!(", {n} after lingering")),
                self.idle_connection_bytes.map_or_else(String::new, |b| format!("; {:.1} KiB per idle client connection", b as f64 / 1024.0)),
                self.gateway_cpu_total.as_secs_f64()
            );
        }

        let _ = writeln!(o, "\n### Errors\n");
        let _ = writeln!(o, "- gateway process {} the run", if self.gateway_survived { "survived" } else { "**died during**" });
        let statuses: Vec<String> = self.statuses.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        let _ = writeln!(o, "- HTTP statuses seen: {}", statuses.join(", "));
        if self.errors.is_empty() {
            let _ = writeln!(o, "- failed requests: none");
        } else {
            let _ = writeln!(o, "- failed requests:");
            for (k, n) in &self.errors {
                let _ = writeln!(o, "  - {n} × {k}");
            }
        }
        if self.gateway_log.is_empty() {
            let _ = writeln!(o, "- gateway log (RUST_LOG=warn): empty");
        } else {
            let _ = writeln!(o, "- gateway log (RUST_LOG=warn), by message:");
            for (msg, n) in self.gateway_log.iter().take(12) {
                let _ = writeln!(o, "  - {n} × {msg}");
            }
        }
        o
    }
}
