//! Busy polling (`BUSY_POLL`, off by default): keeps the gateway's CPUs
//! from idling for a while after each request or upstream read, so that
//! the next packet (the upstream's answer, Redis's reply, the client's
//! next request) finds its CPU running.
//!
//! On a virtual machine a vCPU with nothing to do halts, and getting it
//! running again when a packet arrives costs the hypervisor tens of
//! microseconds, sometimes hundreds (the bench's "hop" line measures it).
//! A request through the gateway waits for several such wake-ups. HAProxy's
//! `busy-polling` option answers the same problem by never letting its
//! poller sleep; here one lowest-priority thread per CPU of the process's
//! affinity mask spins instead (`SCHED_IDLE`: the scheduler switches to any
//! woken thread of the gateway at once), and only for `BUSY_POLL` after the
//! last activity, so an idle gateway uses no CPU.
//!
//! The cost is CPU time: while traffic flows, each of those CPUs is 100 %
//! busy, so turn it on only where the gateway has CPUs to itself, pinned to
//! them (`taskset`, a cpuset, Kubernetes' static CPU manager policy); an
//! unpinned gateway would spin on every CPU of the machine. Spinning also
//! counts against a cgroup's CPU limit: under a limit smaller than the CPUs
//! it spins on, it would throttle the gateway itself. It warns at start in
//! both cases.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    thread::{self, Thread},
    time::{Duration, Instant},
};

/// The spinners' thread name (the bench leaves their CPU time out of the
/// gateway's per-request figure by it).
pub const THREAD_NAME: &str = "lq-busy-poll";

/// Pause instructions between two looks at the activity counter: a few
/// microseconds, so a spinner notices activity, and stop, promptly.
const SPINS: u32 = 64;

/// The handle the gateway keeps; dropping it stops the spinners.
pub struct BusyPoll(Option<Spinners>);

struct Spinners {
    inner: Arc<Inner>,
    joins: Vec<thread::JoinHandle<()>>,
}

struct Inner {
    window: Duration,
    /// Bumped by every [`BusyPoll::touch`].
    activity: AtomicU64,
    /// Spinners parked (or about to park) until the next touch.
    sleeping: AtomicUsize,
    stop: AtomicBool,
    threads: Vec<Thread>,
}

impl BusyPoll {
    /// Off: `touch` does nothing.
    pub fn off() -> BusyPoll {
        BusyPoll(None)
    }

    /// One spinner per CPU the process may run on, each pinned to its CPU.
    /// `window` zero is off. Errors when a spinner cannot be started.
    pub fn start(window: Duration) -> std::io::Result<BusyPoll> {
        if window.is_zero() {
            return Ok(BusyPoll::off());
        }
        let cpus = affinity::current()?;
        Self::start_on(window, &cpus)
    }

    fn start_on(window: Duration, cpus: &[usize]) -> std::io::Result<BusyPoll> {
        // The spinners need the shared state and the shared state needs the
        // spinners' handles (to wake them): each waits for its `Arc` first.
        let (mut txs, mut joins) = (Vec::new(), Vec::new());
        for &cpu in cpus {
            let (tx, rx) = std::sync::mpsc::channel::<Arc<Inner>>();
            let handle = thread::Builder::new().name(THREAD_NAME.into()).stack_size(64 * 1024).spawn(move || {
                let Ok(inner) = rx.recv() else { return };
                // A spinner at normal priority would take half of a busy
                // CPU from the gateway: one that cannot be lowered (or
                // pinned) does not spin.
                match affinity::pin_idle(cpu) {
                    Ok(()) => spin(&inner),
                    Err(e) => tracing::warn!(cpu, error = %e, "busy polling: cannot pin the spinner or lower its priority; CPU {cpu} is not kept awake"),
                }
            })?;
            joins.push(handle);
            txs.push(tx);
        }
        let inner = Arc::new(Inner {
            window,
            activity: AtomicU64::new(0),
            sleeping: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            threads: joins.iter().map(|j| j.thread().clone()).collect(),
        });
        for tx in txs {
            let _ = tx.send(inner.clone());
        }
        tracing::info!(?cpus, ?window, "busy polling: CPUs kept awake for the window after each request");
        if affinity::online() > 1 && cpus.len() >= affinity::online() {
            tracing::warn!(cpus = cpus.len(), "busy polling on every CPU of the machine (the process is not pinned): pin it (taskset, a cpuset, Kubernetes' static CPU manager) to the CPUs it should keep awake");
        }
        if let Some(limit) = affinity::cgroup_cpu_limit().filter(|&limit| limit < cpus.len() as f64) {
            tracing::warn!(cpu_limit = limit, cpus = cpus.len(), "busy polling on more CPUs than the cgroup's CPU limit: the spinning counts against it and throttles the gateway");
        }
        Ok(BusyPoll(Some(Spinners { inner, joins })))
    }

    /// Activity: the spinners keep (or start) spinning for the next window.
    #[inline]
    pub fn touch(&self) {
        if let Some(Spinners { inner, .. }) = &self.0 {
            // SeqCst pairs with the spinner's park below: either it sees
            // this bump and does not park, or this sees it sleeping and
            // wakes it.
            inner.activity.fetch_add(1, Ordering::SeqCst);
            if inner.sleeping.load(Ordering::SeqCst) > 0 {
                for t in &inner.threads {
                    t.unpark();
                }
            }
        }
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// How many touches there have been (0 when off).
    pub fn activity(&self) -> u64 {
        self.0.as_ref().map_or(0, |s| s.inner.activity.load(Ordering::Relaxed))
    }

    /// How many spinners are parked, waiting for the next touch.
    pub fn sleeping(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.inner.sleeping.load(Ordering::SeqCst))
    }
}

impl Drop for BusyPoll {
    fn drop(&mut self) {
        if let Some(Spinners { inner, joins }) = self.0.take() {
            inner.stop.store(true, Ordering::SeqCst);
            for t in &inner.threads {
                t.unpark();
            }
            for j in joins {
                let _ = j.join();
            }
        }
    }
}

fn spin(inner: &Inner) {
    let mut seen = inner.activity.load(Ordering::SeqCst);
    while !inner.stop.load(Ordering::Relaxed) {
        // Awake until a whole window passes without activity.
        let mut quiet_since = Instant::now();
        loop {
            for _ in 0..SPINS {
                std::hint::spin_loop();
            }
            if inner.stop.load(Ordering::Relaxed) {
                return;
            }
            let now = inner.activity.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= inner.window {
                break;
            }
        }
        // Asleep until the next touch.
        inner.sleeping.fetch_add(1, Ordering::SeqCst);
        while inner.activity.load(Ordering::SeqCst) == seen && !inner.stop.load(Ordering::SeqCst) {
            thread::park();
        }
        inner.sleeping.fetch_sub(1, Ordering::SeqCst);
        seen = inner.activity.load(Ordering::SeqCst);
    }
}

#[cfg(target_os = "linux")]
mod affinity {
    /// The CPUs this thread (at start-up: the process) may run on.
    pub fn current() -> std::io::Result<Vec<usize>> {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity
        // writes at most its size.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect())
        }
    }

    /// Gives the calling thread the lowest priority there is (`SCHED_IDLE`),
    /// then pins it to `cpu`.
    pub fn pin_idle(cpu: usize) -> std::io::Result<()> {
        // SAFETY: sched_setscheduler reads the param it is given; a zeroed
        // cpu_set_t is a valid empty set.
        unsafe {
            let param = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// The cgroup (v2) CPU limit in CPUs (`cpu.max`: quota and period in
    /// microseconds, or `max` for none).
    pub fn cgroup_cpu_limit() -> Option<f64> {
        let max = std::fs::read_to_string("/sys/fs/cgroup/cpu.max").ok()?;
        let mut fields = max.split_whitespace();
        let quota: f64 = fields.next()?.parse().ok()?;
        let period: f64 = fields.next()?.parse().ok()?;
        (period > 0.0).then(|| quota / period)
    }

    /// CPUs online on the machine.
    pub fn online() -> usize {
        // SAFETY: sysconf has no preconditions.
        unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize }
    }
}

#[cfg(not(target_os = "linux"))]
mod affinity {
    pub fn current() -> std::io::Result<Vec<usize>> {
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "BUSY_POLL needs Linux (CPU affinity and SCHED_IDLE)"))
    }

    pub fn pin_idle(_: usize) -> std::io::Result<()> {
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "SCHED_IDLE is Linux's"))
    }

    pub fn cgroup_cpu_limit() -> Option<f64> {
        None
    }

    pub fn online() -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (up to 10 s: a spinner at the lowest priority may wait for a
    /// busy CPU) until `done` holds.
    fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn spins_while_touched_sleeps_after_the_window_and_stops_on_drop() {
        let cpus = affinity::current().unwrap();
        // A long window: the test thread, not the spinner, could be kept
        // off the CPU between two touches on a busy machine.
        let busy = BusyPoll::start_on(Duration::from_millis(500), &cpus[..1]).unwrap();
        assert!(busy.is_on());
        // Started awake; with nothing happening it parks after the window.
        eventually("the spinner parks", || busy.sleeping() == 1);
        busy.touch();
        assert_eq!(busy.activity(), 1);
        eventually("a touch wakes it", || busy.sleeping() == 0);
        // Touched more often than the window: it never parks, whatever
        // CPU time it gets in between.
        for _ in 0..100 {
            busy.touch();
            thread::sleep(Duration::from_millis(5));
            assert_eq!(busy.sleeping(), 0, "parked while touched");
        }
        eventually("it parks once touches stop", || busy.sleeping() == 1);
        // Dropping joins the spinner: this returns only once it has ended.
        drop(busy);
    }

    #[test]
    fn off_does_nothing() {
        let busy = BusyPoll::start(Duration::ZERO).unwrap();
        assert!(!busy.is_on());
        busy.touch();
        assert_eq!(busy.activity(), 0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_spinner_runs_pinned_at_the_lowest_priority() {
        let cpus = affinity::current().unwrap();
        let cpu = *cpus.last().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            affinity::pin_idle(cpu).unwrap();
            // SAFETY: sched_getscheduler has no preconditions.
            tx.send((affinity::current().unwrap(), unsafe { libc::sched_getscheduler(0) })).unwrap();
        })
        .join()
        .unwrap();
        let (mask, policy) = rx.recv().unwrap();
        assert_eq!(mask, vec![cpu]);
        assert_eq!(policy, libc::SCHED_IDLE);
    }
}
