//! `llm-quota-bench`: what the gateway adds over talking to the upstream
//! directly. Starts a fast mock upstream and the release gateway as child
//! processes, drives both with the same requests interleaved, and prints a
//! markdown report. See bench/README.md.

mod floor;
mod gateway;
mod load;
mod mock;
mod phases;
mod report;
mod sys;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reqwest::header::HeaderValue;

use crate::gateway::Mode;
use crate::load::{Api, Loader, Target, Which};
use crate::mock::Knobs;
use crate::phases::Sides;

const USAGE: &str = "usage: llm-quota-bench [--quick] [--mode embedded|cluster] [--awake] [--busy-poll DURATION] [--one-cpu] [--phases LIST] [--gateway PATH] [--no-build] [--keep] [--linger SECS] [--trace FILE]
  --quick          every phase shrunk (under a minute in all)
  --mode           embedded (default: SQLite, in-process quota) or cluster (a redis-server of its own
                   + PostgreSQL on 127.0.0.1)
  --awake          keep every CPU out of its idle state with a lowest-priority spinner
                   (on a VM, waking an idle vCPU costs 0.1–1 ms per hop; see bench/README.md)
  --busy-poll DUR  run the gateway with BUSY_POLL=DUR (its workers poll without sleeping for DUR
                   after each request; the CPU-per-request figures then include the spinning)
  --one-cpu        pin the gateway, the mock, the load generator (and Redis) all to CPU 1 (no hop
                   between CPUs; by default the gateway has CPU 1 and the others share CPU 0)
  --phases LIST    comma-separated subset of: sanity,latency,cpu,stream,throughput,streams (default: all)
  --gateway PATH   use this gateway binary instead of building target/release/llm-quota
  --no-build       do not run `cargo build --release --bin llm-quota` first
  --keep           keep the scratch directory (gateway logs, SQLite file)
  --linger SECS    after the load, wait SECS and measure the idle gateway again (leak check;
                   idle upstream connections are pooled for 90 s)
  --trace FILE     write every request of the rate ramp to FILE (CSV: side, rate, start, latency)
  mock [PORT]      only serve the mock upstream (prints `PORT <n>`)";

/// Client connections opened and left idle to see what one costs.
const IDLE_CONNECTIONS: usize = 1000;
const PHASES: [&str; 6] = ["sanity", "latency", "cpu", "stream", "throughput", "streams"];

/// The gateway's RSS 6 s after `closed` (connections closed then): its
/// allocator hands freed memory back on the gateway's next activity, the
/// periodic flush (every FLUSH_INTERVAL, 5 s) at the latest.
async fn rss_once_released(pid: u32, closed: Instant) -> u64 {
    tokio::time::sleep_until((closed + Duration::from_secs(6)).into()).await;
    sys::rss_kib(pid).unwrap_or(0)
}

pub struct Args {
    pub quick: bool,
    pub mode: Mode,
    pub phases: Vec<String>,
    pub gateway: Option<PathBuf>,
    pub build: bool,
    pub keep: bool,
    pub trace: Option<PathBuf>,
    pub linger: Duration,
    pub awake: bool,
    /// The gateway's `BUSY_POLL` (`None`: off).
    pub busy_poll: Option<String>,
    pub one_cpu: bool,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let mut a = Args {
        quick: false,
        mode: Mode::Embedded,
        phases: PHASES.iter().map(|s| s.to_string()).collect(),
        gateway: None,
        build: true,
        keep: false,
        trace: None,
        linger: Duration::ZERO,
        awake: false,
        busy_poll: None,
        one_cpu: false,
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--mode" => {
                a.mode = match it.next().as_deref() {
                    Some("embedded") => Mode::Embedded,
                    Some("cluster") => Mode::Cluster,
                    other => bail!("--mode takes embedded or cluster, not {other:?}"),
                }
            }
            "--phases" => {
                let list = it.next().context("--phases needs a list")?;
                a.phases = list.split(',').map(|s| s.trim().to_owned()).collect();
                if let Some(bad) = a.phases.iter().find(|p| !PHASES.contains(&p.as_str())) {
                    bail!("unknown phase {bad:?}; phases are {}", PHASES.join(","));
                }
            }
            "--gateway" => a.gateway = Some(it.next().context("--gateway needs a path")?.into()),
            "--no-build" => a.build = false,
            "--awake" => a.awake = true,
            "--busy-poll" => {
                let window = it.next().context("--busy-poll needs a duration (e.g. 50ms)")?;
                llm_quota::config::parse_duration(&window).map_err(|e| anyhow::anyhow!("--busy-poll {window}: {e}"))?;
                a.busy_poll = Some(window);
            }
            "--one-cpu" => a.one_cpu = true,
            "--keep" => a.keep = true,
            "--linger" => {
                let secs: u64 = it.next().and_then(|s| s.parse().ok()).context("--linger takes a number of seconds")?;
                a.linger = Duration::from_secs(secs);
            }
            "--trace" => a.trace = Some(it.next().context("--trace needs a file name")?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(a)
}

/// Sizes of every phase; `--quick` shrinks them all.
pub struct Plan {
    pub latency_warmup: usize,
    pub latency_pairs: usize,
    pub cpu_requests: usize,
    pub cpu_streams: usize,
    pub cpu_concurrency: usize,
    pub stream_knobs: Knobs,
    pub stream_pairs: usize,
    pub stream_workers: usize,
    pub rates: Vec<f64>,
    pub rate_round: Duration,
    pub rate_rounds: usize,
    pub crowd_levels: Vec<usize>,
    pub crowd_ramp: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        let stream_knobs = Knobs { delay_ms: 0, chunks: 16, gap_ms: 5 };
        if quick {
            Plan {
                latency_warmup: 20,
                latency_pairs: 200,
                cpu_requests: 1000,
                cpu_streams: 300,
                cpu_concurrency: 16,
                stream_knobs,
                stream_pairs: 30,
                stream_workers: 4,
                rates: vec![100.0, 400.0, 1600.0, 3200.0, 6400.0],
                rate_round: Duration::from_millis(500),
                rate_rounds: 1,
                crowd_levels: vec![100, 250, 500],
                crowd_ramp: Duration::from_millis(300),
            }
        } else {
            Plan {
                latency_warmup: 100,
                latency_pairs: 1000,
                cpu_requests: 5000,
                cpu_streams: 2000,
                cpu_concurrency: 16,
                stream_knobs,
                stream_pairs: 200,
                stream_workers: 4,
                rates: vec![100.0, 200.0, 400.0, 800.0, 1200.0, 1600.0, 2400.0, 3200.0, 4800.0, 6400.0, 9600.0],
                rate_round: Duration::from_millis(1500),
                rate_rounds: 2,
                crowd_levels: vec![100, 250, 500, 1000, 2000],
                crowd_ramp: Duration::from_millis(500),
            }
        }
    }
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some("mock") {
        argv.next();
        let port = argv.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        return run_mock(port);
    }
    if argv.peek().map(String::as_str) == Some("floor") {
        argv.next();
        return run_floor(argv.next().unwrap_or_default());
    }
    let args = match parse_args(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("llm-quota-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut machine = sys::machine_info();
    let nofile = sys::raise_nofile();
    // The gateway gets CPU 1 to itself; the load generator and the mock share
    // CPU 0 (or CPU 1 too, with --one-cpu).
    let mut placement = if args.one_cpu { sys::Placement::OneCpu } else { sys::Placement::Split };
    if machine.cpus >= 2 {
        machine.hop = sys::measure_hop();
    }
    if machine.cpus < 2 || placement.client_cpu().is_some_and(|cpu| sys::pin_current_to(cpu).is_err()) {
        placement = sys::Placement::Unpinned;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(run(args, machine, nofile, placement)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llm-quota-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_mock(port: u16) -> ExitCode {
    mock::warm_up();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async { mock::serve(announce(port).await).await });
    ExitCode::SUCCESS
}

/// The bare proxy, on the runtime the gateway uses (`#[tokio::main]`: one
/// worker per CPU it may run on).
fn run_floor(upstream: String) -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async { floor::serve(announce(0).await, upstream).await });
    ExitCode::SUCCESS
}

/// `http://127.0.0.1:<port>`, where the bench's helpers listen.
fn local_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Listens on 127.0.0.1:`port` (0 = any) and prints `PORT <n>` for the parent.
async fn announce(port: u16) -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(([127, 0, 0, 1], port).into()).expect("cannot bind");
    let listener = socket.listen(4096).expect("cannot listen");
    let port = listener.local_addr().expect("local address").port();
    println!("PORT {port}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    listener
}

fn git_revision(workspace: &Path) -> String {
    let out = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(workspace)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match out(&["rev-parse", "--short", "HEAD"]) {
        Some(rev) => {
            let dirty = out(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{rev}+dirty")
            } else {
                rev
            }
        }
        None => "unknown".into(),
    }
}

async fn run(args: Args, machine: sys::MachineInfo, nofile: u64, placement: sys::Placement) -> anyhow::Result<()> {
    let started = Instant::now();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("bench/ has no parent")?.to_path_buf();
    let binary = match &args.gateway {
        Some(p) => p.clone(),
        None if args.build => gateway::build_gateway(&workspace)?,
        None => gateway::target_dir(&workspace).join("release/llm-quota"),
    };
    if !binary.exists() {
        bail!("no gateway binary at {}; run `cargo build --release --bin llm-quota`", binary.display());
    }
    let mut machine = machine;
    machine.busy_before = sys::cpu_busy(Duration::from_secs(1));
    machine.loadavg_before = sys::loadavg();
    let plan = Plan::new(args.quick);
    let workdir = std::env::temp_dir().join(format!("llm-quota-bench-{}", std::process::id()));
    std::fs::create_dir_all(&workdir)?;

    let spinners = if args.awake { gateway::start_spinners(machine.cpus)? } else { Vec::new() };
    let spinner_pids: Vec<u32> = spinners.iter().map(|p| p.pid()).collect();
    let (mut mock, mock_port) = gateway::start_mock(placement.client_cpu())?;
    let mock_pid = mock.pid();
    let upstream = local_url(mock_port);
    // The bare proxy, beside the gateway on its CPU, for the latency and stream phases.
    let mut floor = if args.phases.iter().any(|p| p == "latency" || p == "stream") {
        Some(gateway::start_floor(&upstream, placement.gateway_cpu())?)
    } else {
        None
    };
    let mut helper_pids = vec![mock_pid];
    helper_pids.extend(floor.as_ref().map(|(p, _)| p.pid()));
    helper_pids.extend(&spinner_pids);
    let floor_url = floor.as_ref().map(|(_, port)| local_url(*port));
    let (scratch, mut redis) = match args.mode {
        Mode::Cluster => {
            let redis = gateway::start_redis(placement.client_cpu(), &workdir)?;
            helper_pids.push(redis.0.pid());
            (Some(gateway::ScratchDb::create().await?), Some(redis))
        }
        Mode::Embedded => (None, None),
    };
    let database_url =
        scratch.as_ref().map_or_else(|| format!("sqlite://{}/bench.db", workdir.display()), |db| db.url.clone());
    let result = async {
        let mut gw = gateway::start_gateway(gateway::Setup {
            binary: &binary,
            workdir: &workdir,
            upstream_url: &upstream,
            database_url,
            redis_url: redis.as_ref().map(|(_, url)| url.as_str()),
            cpu: placement.gateway_cpu(),
            busy_poll: args.busy_poll.as_deref(),
        })
        .await?;
        let key = gw.create_key().await?;
        let redis_pid = redis.as_ref().map(|(p, _)| p.pid());
        let measured = measure(&args, &plan, &gw, &helper_pids, redis_pid, &upstream, floor_url.as_deref(), &key).await;
        let alive = gw.proc.alive();
        let log = gw.log_summary();
        gw.proc.stop(Duration::from_secs(5));
        let mut report = measured?;
        report.gateway_survived = alive;
        report.gateway_log = log;
        anyhow::Ok(report)
    }
    .await;
    mock.stop(Duration::from_secs(1));
    if let Some((p, _)) = floor.as_mut() {
        p.stop(Duration::from_secs(1));
    }
    if let Some((p, _)) = redis.as_mut() {
        p.stop(Duration::from_secs(1));
    }
    drop(spinners);
    if let Some(db) = scratch {
        db.drop_db().await;
    }
    if args.keep {
        eprintln!("bench: scratch directory kept at {}", workdir.display());
    } else {
        let _ = std::fs::remove_dir_all(&workdir);
    }
    let mut report = result?;
    report.header = report::Header {
        machine,
        nofile,
        placement,
        awake: args.awake,
        busy_poll: args.busy_poll.clone(),
        quick: args.quick,
        mode: args.mode,
        revision: git_revision(&workspace),
        duration: started.elapsed(),
        loadavg_after: sys::loadavg(),
    };
    println!("{}", report.render());
    Ok(())
}

async fn measure(
    args: &Args,
    plan: &Plan,
    gw: &gateway::Gateway,
    helper_pids: &[u32],
    redis_pid: Option<u32>,
    upstream: &str,
    floor_url: Option<&str>,
    key: &str,
) -> anyhow::Result<report::Report> {
    let loader = Loader::new(args.trace.is_some())?;
    let direct = Target { which: Which::Direct, base: upstream.to_owned(), auth: None };
    let gateway = Target {
        which: Which::Gateway,
        base: gw.proxy_url.clone(),
        auth: Some(HeaderValue::from_str(&format!("Bearer {key}"))?),
    };
    let pid = gw.proc.pid();
    let floor = floor_url.map(|base| Target { which: Which::Floor, base: base.to_owned(), auth: None });
    let sides = Sides { direct: &direct, gateway: &gateway, floor: floor.as_ref(), gateway_pid: pid, redis_pid };
    let on = |p: &str| args.phases.iter().any(|x| x == p);
    // CPU used by processes other than ours while measuring: the noise.
    let ours = || {
        [std::process::id(), pid].iter().chain(helper_pids).map(|&p| sys::cpu_time(p).unwrap_or_default()).sum::<Duration>()
    };
    let (busy_start, ours_start, wall_start, steal_start) = (sys::machine_busy(), ours(), Instant::now(), sys::steal());
    let mut r = report::Report::default();
    r.rss.push(("idle, after start-up".into(), sys::rss_kib(pid).unwrap_or(0)));
    r.threads_idle = sys::threads(pid).unwrap_or(0);

    // The very first request through a fresh gateway (lazy initialisation
    // shows here), then one of each route to warm both sides.
    {
        let body = load::body(Api::OpenAi, Knobs { delay_ms: 0, chunks: 16, gap_ms: 0 }, 200, false);
        for w in [Which::Gateway, Which::Direct] {
            let t0 = Instant::now();
            loader.unary(sides.get(w), Api::OpenAi, body.clone()).await;
            r.first_request.push((w, t0.elapsed()));
        }
        for api in [Api::OpenAi, Api::Chat, Api::Generate] {
            let body = load::body(api, Knobs { delay_ms: 0, chunks: 16, gap_ms: 0 }, 200, false);
            for w in [Which::Gateway, Which::Direct] {
                loader.unary(sides.get(w), api, body.clone()).await;
            }
        }
    }
    // What an idle client connection holds (until KEEPALIVE_TIMEOUT closes
    // it), measured on the fresh gateway: later, memory the phases freed
    // would be reused by the connections and hide their cost.
    eprintln!("bench: {IDLE_CONNECTIONS} idle client connections");
    match phases::idle_connections(sides.gateway, pid, IDLE_CONNECTIONS).await {
        Ok((before, after)) => {
            r.rss.push((format!("with {IDLE_CONNECTIONS} idle client connections open (one request each)"), after));
            r.idle_connection_bytes = Some(after.saturating_sub(before) * 1024 / IDLE_CONNECTIONS as u64);
            r.rss.push(("6 s after they closed".into(), rss_once_released(pid, Instant::now()).await));
        }
        Err(e) => eprintln!("bench: idle connections not measured: {e:#}"),
    }
    if on("sanity") {
        eprintln!("bench: sanity — one request of each kind to both sides");
        r.findings.extend(phases::sanity(&loader, &sides).await);
    }
    if on("latency") {
        eprintln!("bench: latency at concurrency 1");
        r.latency = phases::latency(&loader, &sides, plan.latency_warmup, plan.latency_pairs).await;
        r.rss.push(("after the latency phase".into(), sys::rss_kib(pid).unwrap_or(0)));
    }
    if on("cpu") {
        eprintln!("bench: gateway CPU per request");
        r.cpu = phases::cpu(&loader, &sides, plan.cpu_requests, plan.cpu_streams, plan.cpu_concurrency).await;
        r.rss.push(("after the CPU phase".into(), sys::rss_kib(pid).unwrap_or(0)));
    }
    if on("stream") {
        eprintln!("bench: streaming time to first chunk and gaps");
        r.stream_knobs = Some(plan.stream_knobs);
        r.streaming =
            phases::streaming(&loader, &sides, plan.stream_knobs, plan.stream_pairs, plan.stream_workers).await;
    }
    if on("throughput") {
        eprintln!("bench: request rate against a mock answering in 50 ms");
        r.rates = phases::throughput(&loader, &sides, &plan.rates, plan.rate_round, plan.rate_rounds).await;
        let fds = sys::open_fds(pid).unwrap_or(0);
        r.rss.push((format!("after the rate ramp ({fds} descriptors open)"), sys::rss_kib(pid).unwrap_or(0)));
        // An overloaded last level leaves the load generator with thousands
        // of idle connections, which the gateway would hold (11 KiB and more
        // each) until KEEPALIVE_TIMEOUT, through the streams phase. Closing
        // them keeps that phase's memory the streams' own.
        loader.close_idle_connections()?;
        let settle = Instant::now();
        while sys::open_fds(pid).unwrap_or(0) > 200 && settle.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rss = rss_once_released(pid, settle).await;
        let fds = sys::open_fds(pid).unwrap_or(0);
        r.rss.push((format!("6 s after the ramp's client connections closed ({fds} descriptors open)"), rss));
    }
    if on("streams") {
        eprintln!("bench: concurrent paced streams (64 chunks, 20 ms apart)");
        r.crowds = phases::crowds(&loader, &sides, &plan.crowd_levels, plan.crowd_ramp).await;
    }
    if let (Some(path), Some(trace)) = (&args.trace, &loader.trace) {
        std::fs::write(path, trace.borrow().join("\n") + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("bench: request trace written to {}", path.display());
    }
    r.foreign_cpu = (sys::machine_busy().saturating_sub(busy_start)).saturating_sub(ours().saturating_sub(ours_start));
    r.steal = sys::steal().saturating_sub(steal_start);
    r.measure_wall = wall_start.elapsed();
    r.errors = loader.errors.borrow().clone();
    r.statuses = loader.statuses.borrow().clone();
    // Idle again: what the load left behind.
    drop(loader);
    tokio::time::sleep(Duration::from_secs(if args.quick { 1 } else { 3 })).await;
    r.rss.push(("idle, after all load (client connections closed)".into(), sys::rss_kib(pid).unwrap_or(0)));
    r.fds_idle = sys::open_fds(pid).unwrap_or(0);
    if !args.linger.is_zero() {
        eprintln!("bench: idle for {} s", args.linger.as_secs());
        tokio::time::sleep(args.linger).await;
        r.rss.push((format!("idle, {} s later", args.linger.as_secs()), sys::rss_kib(pid).unwrap_or(0)));
        r.fds_linger = Some(sys::open_fds(pid).unwrap_or(0));
    }
    r.hwm_kib = sys::status_kib(pid, "VmHWM").unwrap_or(0);
    r.threads_end = sys::threads(pid).unwrap_or(0);
    r.gateway_cpu_total = sys::cpu_time(pid).unwrap_or_default();
    Ok(r)
}
