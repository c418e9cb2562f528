//! The Linux bits: CPU pinning, file-descriptor limits, and reading a
//! process's CPU time and memory from `/proc`.

use std::time::Duration;

/// Where the bench puts its processes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Placement {
    /// Fewer than two CPUs (or pinning failed): everything shares the machine.
    Unpinned,
    /// The gateway (and the floor proxy) on CPU 1; the mock upstream and the
    /// load generator on CPU 0.
    Split,
    /// Everything on CPU 1 (`--one-cpu`): no hop between CPUs, so the
    /// added latency is the gateway's own work plus a context switch.
    OneCpu,
}

impl Placement {
    /// The CPU of the load generator and the mock upstream.
    pub fn client_cpu(self) -> Option<usize> {
        match self {
            Placement::Unpinned => None,
            Placement::Split => Some(0),
            Placement::OneCpu => Some(1),
        }
    }

    /// The CPU of the gateway and the floor proxy.
    pub fn gateway_cpu(self) -> Option<usize> {
        match self {
            Placement::Unpinned => None,
            Placement::Split | Placement::OneCpu => Some(1),
        }
    }
}

/// Logical CPUs of the machine (not of our affinity mask, which we narrow).
pub fn cpu_count() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        1
    }
}

/// Restricts the calling thread (and every thread and process it creates
/// afterwards) to one CPU.
pub fn pin_current_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the macros only index it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard one (children inherit it);
/// returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: plain getrlimit/setrlimit on a stack struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

/// For `Command::pre_exec`: the child is killed when the bench dies, and is
/// optionally pinned to one CPU.
pub fn child_setup(cpu: Option<usize>) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    move || {
        // SAFETY: prctl/sched_setaffinity are async-signal-safe syscalls.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        if let Some(cpu) = cpu {
            pin_current_to(cpu)?;
        }
        Ok(())
    }
}

pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// User + system CPU time a process has used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields resume after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = utime + stime;
    Some(Duration::from_micros(ticks * 1_000_000 / clock_ticks_per_sec()))
}

/// A `VmRSS`-style field of `/proc/<pid>/status`, in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

pub fn threads(pid: u32) -> Option<u64> {
    status_kib(pid, "Threads")
}

pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Busy share of each CPU over `window`, from `/proc/stat` (what else runs
/// on the machine before the bench starts anything).
pub fn cpu_busy(window: Duration) -> Vec<f64> {
    fn sample() -> Vec<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        stat.lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .map(|l| {
                let v = stat_ticks(l);
                let total: u64 = v.iter().take(8).sum();
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                (total, idle)
            })
            .collect()
    }
    let a = sample();
    std::thread::sleep(window);
    let b = sample();
    a.iter()
        .zip(&b)
        .map(|(a, b)| {
            let total = b.0.saturating_sub(a.0).max(1) as f64;
            1.0 - b.1.saturating_sub(a.1) as f64 / total
        })
        .collect()
}

/// A counter of the `TcpExt` block of `/proc/net/netstat` (machine-wide),
/// e.g. `ListenOverflows`: connections dropped because an accept queue was full.
pub fn tcp_ext(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The numbers of a `cpu…` line of `/proc/stat`: user, nice, system, idle,
/// iowait, irq, softirq, steal, … in clock ticks since boot.
fn stat_ticks(line: &str) -> Vec<u64> {
    line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect()
}

/// The machine-wide `cpu` line of `/proc/stat` (all CPUs together).
fn machine_ticks() -> Vec<u64> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines().find(|l| l.starts_with("cpu ")).map(stat_ticks).unwrap_or_default()
}

fn ticks(n: u64) -> Duration {
    Duration::from_micros(n * 1_000_000 / clock_ticks_per_sec())
}

/// Time the processes of all CPUs together ran since boot (user, nice,
/// system, irq, softirq: not idle, iowait or steal).
pub fn machine_busy() -> Duration {
    let v = machine_ticks();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    ticks(at(0) + at(1) + at(2) + at(5) + at(6))
}

/// Steal time of all CPUs together since boot: time a virtual CPU wanted to
/// run but the hypervisor ran something else.
pub fn steal() -> Duration {
    ticks(machine_ticks().get(7).copied().unwrap_or(0))
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub struct MachineInfo {
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total: String,
    pub kernel: String,
    pub date: String,
    /// Busy share per CPU in the second before the measurements (set by `run`).
    pub busy_before: Vec<f64>,
    pub loadavg_before: String,
    /// What one hop between CPU 0 and CPU 1 costs (set by `main` when pinned).
    pub hop: Option<Hop>,
}

/// Round trips of one byte between a thread on CPU 0 and one on CPU 1
/// over a socket pair: the cost of handing work to the other CPU, which
/// every hop between the gateway and the mock, Redis or the client pays.
pub struct Hop {
    /// Median round trip, one right after the other.
    pub busy: Duration,
    /// Median round trip after 1 ms of nothing to do (an idle CPU may be
    /// halted, and on a virtual machine waking it costs more).
    pub idle: Duration,
}

/// Measures `Hop` (about half a second); `None` if a thread cannot be pinned.
pub fn measure_hop() -> Option<Hop> {
    use std::io::{Read, Write};
    let (mut near, mut far) = std::os::unix::net::UnixStream::pair().ok()?;
    pin_current_to(0).ok()?;
    let echo = std::thread::spawn(move || {
        pin_current_to(1)?;
        let mut b = [0u8; 1];
        while far.read(&mut b)? == 1 {
            far.write_all(&b)?;
        }
        Ok::<(), std::io::Error>(())
    });
    let mut round = |gap: Duration, n: usize| -> Option<Duration> {
        let mut times = Vec::with_capacity(n);
        let mut b = [0u8; 1];
        for _ in 0..n {
            if !gap.is_zero() {
                std::thread::sleep(gap);
            }
            let t = std::time::Instant::now();
            near.write_all(&b).ok()?;
            near.read_exact(&mut b).ok()?;
            times.push(t.elapsed());
        }
        times.sort();
        Some(times[n / 2])
    };
    let hop = round(Duration::ZERO, 2000).zip(round(Duration::from_millis(1), 300)).map(|(busy, idle)| Hop { busy, idle });
    drop(near);
    let pinned = echo.join().ok().is_some_and(|r| r.is_ok());
    hop.filter(|_| pinned)
}

pub fn machine_info() -> MachineInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned()))
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or_else(|| "unknown".into(), |kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    MachineInfo {
        cpus: cpu_count(),
        cpu_model,
        mem_total,
        kernel,
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        busy_before: Vec::new(),
        loadavg_before: String::new(),
        hop: None,
    }
}
