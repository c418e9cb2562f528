//! Starting the processes under test: the mock upstream (this binary again,
//! `llm-quota-bench mock`) and the release gateway, each as a child process.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::sys;

/// A child process that is stopped when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if !self.alive() {
            return;
        }
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

/// One lowest-priority busy loop per CPU: a CPU that never idles answers a
/// wake-up at once (the scheduler preempts the spinner), where an idle vCPU
/// first has to be rescheduled by the hypervisor.
pub fn start_spinners(cpus: usize) -> anyhow::Result<Vec<Proc>> {
    (0..cpus)
        .map(|cpu| {
            let mut cmd = Command::new("/bin/sh");
            cmd.args(["-c", "while :; do :; done"]).stdin(Stdio::null()).stdout(Stdio::null());
            let mut setup = sys::child_setup(Some(cpu));
            // SAFETY: child_setup and setpriority make only async-signal-safe syscalls.
            unsafe {
                cmd.pre_exec(move || {
                    setup()?;
                    libc::setpriority(libc::PRIO_PROCESS, 0, 19);
                    Ok(())
                });
            }
            Ok(Proc { child: cmd.spawn().context("cannot start a CPU spinner")? })
        })
        .collect()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `<this binary> mock`, which prints its port on the first line.
pub fn start_mock(cpu: Option<usize>) -> anyhow::Result<(Proc, u16)> {
    start_helper(&["mock"], cpu).context("cannot start the mock upstream")
}

/// Cluster mode's own `redis-server`, on `cpu` (beside the mock: to the
/// gateway it is another service, as it would be on another machine): a free
/// port, nothing kept on disk, stopped with the run. Returns it and its URL.
pub fn start_redis(cpu: Option<usize>, workdir: &Path) -> anyhow::Result<(Proc, String)> {
    use std::io::{Read, Write};
    let port = free_port()?;
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
        .arg(workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: child_setup only makes async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(sys::child_setup(cpu));
    }
    let child = cmd.spawn().context("cannot start redis-server (cluster mode runs one of its own; is Redis installed?)")?;
    let mut proc = Proc { child };
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let pong = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut c| {
            c.write_all(b"PING\r\n")?;
            let mut b = [0u8; 7];
            c.read_exact(&mut b)?;
            Ok(&b == b"+PONG\r\n")
        });
        if pong.unwrap_or(false) {
            return Ok((proc, format!("redis://127.0.0.1:{port}/")));
        }
        if !proc.alive() || Instant::now() > until {
            proc.stop(Duration::from_secs(1));
            bail!("redis-server did not answer on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `<this binary> floor <upstream>`, the bare proxy, on `cpu`.
pub fn start_floor(upstream: &str, cpu: Option<usize>) -> anyhow::Result<(Proc, u16)> {
    start_helper(&["floor", upstream], cpu).context("cannot start the floor proxy")
}

/// This binary again with `args`; it prints `PORT <n>` on its first line.
fn start_helper(args: &[&str], cpu: Option<usize>) -> anyhow::Result<(Proc, u16)> {
    let exe = std::env::current_exe().context("cannot find the bench binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::inherit());
    // SAFETY: child_setup only makes async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(sys::child_setup(cpu));
    }
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let port = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("printed {line:?} instead of its port"))?;
    Ok((Proc { child }, port))
}

/// Builds the gateway binary (a no-op when it is up to date) and returns its path.
pub fn build_gateway(workspace: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("bench: cargo build --release --bin llm-quota");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--bin", "llm-quota"]).current_dir(workspace);
    // `cargo run` gives the bench its package's variables; build scripts that
    // track one of them (ring tracks CARGO_MANIFEST_DIR) would see a change and
    // rebuild on every switch between this build and a plain `cargo build`.
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("CARGO_PKG_")
            || matches!(
                n.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            )
        {
            cmd.env_remove(&name);
        }
    }
    let status = cmd.status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build --release --bin llm-quota failed");
    }
    Ok(target_dir(workspace).join("release/llm-quota"))
}

pub fn target_dir(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Embedded,
    Cluster,
}

pub struct Gateway {
    pub proc: Proc,
    pub proxy_url: String,
    pub admin_url: String,
    pub stderr_path: PathBuf,
}

pub struct Setup<'a> {
    pub binary: &'a Path,
    pub workdir: &'a Path,
    pub upstream_url: &'a str,
    pub database_url: String,
    /// Cluster mode: the run's own Redis.
    pub redis_url: Option<&'a str>,
    pub cpu: Option<usize>,
    /// The gateway's `BUSY_POLL` (`None`: off).
    pub busy_poll: Option<&'a str>,
}

pub const ADMIN_PASSWORD: &str = "bench";

/// Starts the gateway and waits until `/readyz` answers 200.
pub async fn start_gateway(s: Setup<'_>) -> anyhow::Result<Gateway> {
    let proxy_port = free_port()?;
    let admin_port = free_port()?;
    let stdout = std::fs::File::create(s.workdir.join("gateway.stdout"))?;
    let stderr_path = s.workdir.join("gateway.stderr");
    let stderr = std::fs::File::create(&stderr_path)?;
    let mut cmd = Command::new(s.binary);
    cmd.env("PROXY_HOST", "127.0.0.1")
        .env("PROXY_PORT", proxy_port.to_string())
        .env("ADMIN_PORT", admin_port.to_string())
        .env("ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("DATABASE_URL", &s.database_url)
        .env("LOG_FILE", s.workdir.join("usage.log"))
        .env("OLLAMA_URL", s.upstream_url)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .env_remove("REDIS_URL")
        .env("BUSY_POLL", s.busy_poll.unwrap_or("off"))
        .current_dir(s.workdir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    if let Some(url) = s.redis_url {
        cmd.env("REDIS_URL", url).env("MIGRATE_ON_START", "true");
    }
    // SAFETY: child_setup only makes async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(sys::child_setup(s.cpu));
    }
    let child = cmd.spawn().with_context(|| format!("cannot start {}", s.binary.display()))?;
    let mut proc = Proc { child };
    let proxy_url = format!("http://127.0.0.1:{proxy_port}");
    let admin_url = format!("http://127.0.0.1:{admin_port}");

    let http = reqwest::Client::builder().no_proxy().build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if !proc.alive() {
            let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            bail!("the gateway exited during start-up:\n{log}");
        }
        let ready = http.get(format!("{proxy_url}/readyz")).send().await;
        if matches!(&ready, Ok(r) if r.status() == 200) {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            bail!("the gateway did not become ready within 30 s ({ready:?}):\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Gateway { proc, proxy_url, admin_url, stderr_path })
}

impl Gateway {
    /// Creates an unlimited API key and returns its plaintext.
    pub async fn create_key(&self) -> anyhow::Result<String> {
        let http = reqwest::Client::builder().no_proxy().build()?;
        let resp = http
            .post(format!("{}/api/api-keys", self.admin_url))
            .bearer_auth(ADMIN_PASSWORD)
            .header("content-type", "application/json")
            .body(r#"{"name":"bench","daily_token_limit":null}"#)
            .send()
            .await
            .context("admin API unreachable")?;
        let status = resp.status();
        let body = resp.text().await?;
        if !status.is_success() {
            bail!("POST /api/api-keys answered {status}: {body}");
        }
        let v: Value = serde_json::from_str(&body).with_context(|| format!("admin API answered {body}"))?;
        v.get("key")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("no `key` in the admin API's answer: {body}"))
    }

    /// Warning and error lines the gateway logged, by message, most frequent first.
    pub fn log_summary(&self) -> Vec<(String, usize)> {
        let log = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let key = match serde_json::from_str::<Value>(line) {
                Ok(v) => {
                    let level = v.get("level").and_then(Value::as_str).unwrap_or("?");
                    let msg = v
                        .pointer("/fields/message")
                        .and_then(Value::as_str)
                        .or_else(|| v.get("message").and_then(Value::as_str))
                        .unwrap_or(line);
                    let err = v.pointer("/fields/error").and_then(Value::as_str).unwrap_or("");
                    if err.is_empty() {
                        format!("{level} {msg}")
                    } else {
                        format!("{level} {msg}: {err}")
                    }
                }
                Err(_) => line.chars().take(160).collect(),
            };
            *counts.entry(key).or_default() += 1;
        }
        let mut v: Vec<_> = counts.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }
}

/// A fresh PostgreSQL database for cluster mode, dropped again afterwards.
pub struct ScratchDb {
    pub url: String,
    pub name: String,
}

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

impl ScratchDb {
    pub async fn create() -> anyhow::Result<ScratchDb> {
        use sqlx::Connection;
        let name = format!("lq_bench_{}_{}", std::process::id(), chrono::Utc::now().timestamp());
        let mut conn = sqlx::PgConnection::connect(PG_ADMIN)
            .await
            .with_context(|| format!("cluster mode needs PostgreSQL at {PG_ADMIN}"))?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await?;
        Ok(ScratchDb { url: format!("postgres://postgres@127.0.0.1:5432/{name}"), name })
    }

    pub async fn drop_db(self) {
        use sqlx::Connection;
        match sqlx::PgConnection::connect(PG_ADMIN).await {
            Ok(mut conn) => {
                if let Err(e) =
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut conn).await
                {
                    eprintln!("bench: could not drop database {}: {e}", self.name);
                }
            }
            Err(e) => eprintln!("bench: could not drop database {}: {e}", self.name),
        }
    }
}
