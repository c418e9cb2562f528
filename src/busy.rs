//! Busy polling (`BUSY_POLL`, off by default): while traffic flows, the
//! runtime's workers poll for I/O without ever sleeping, so that the next
//! packet (the upstream's answer, Redis's reply, the client's next request)
//! finds the gateway running instead of a halted CPU.
//!
//! On a virtual machine a vCPU with nothing to do halts, and getting it
//! running again when a packet arrives costs the hypervisor tens of
//! microseconds, sometimes hundreds (the bench's "hop" line measures it); the
//! sender pays too, for the interrupt that wakes it. A request through the
//! gateway waits for several such wake-ups. HAProxy's `busy-polling` option
//! answers the same problem the same way: its poller never sleeps. Here one
//! task per worker yields in a loop, and a worker with only yielded tasks
//! polls its I/O driver with a zero timeout before running them again; a
//! worker that is never asleep in `epoll_wait` is never woken, and notices
//! a ready socket on its next poll.
//!
//! It spins only for `BUSY_POLL` after the last request or upstream read,
//! then waits for the next one, so an idle gateway uses no CPU.
//!
//! The cost is CPU: while traffic flows every worker's CPU is 100 % busy.
//! A spinning worker calls `sched_yield` on every turn, so a thread that
//! wants its CPU (the gateway's blocking work, another process) runs at
//! once rather than after the worker's time slice. Still, turn it on only
//! where the gateway has CPUs to itself, pinned to them (`taskset`, a
//! cpuset, Kubernetes' static CPU manager policy): unpinned, it would keep
//! as many CPUs busy as it has workers, wherever the scheduler puts them. Under a cgroup CPU limit
//! smaller than the CPUs it may run on, spinning uses the quota up and the
//! gateway gets throttled. It warns at start in both cases.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// The handle the gateway keeps; dropping it stops the polling.
pub struct BusyPoll(Option<Arc<Inner>>);

struct Inner {
    window: Duration,
    /// Bumped by every [`BusyPoll::touch`].
    activity: AtomicU64,
    /// Pollers waiting (or about to wait) for the next touch.
    sleeping: AtomicUsize,
    stop: AtomicBool,
    wake: Notify,
}

impl BusyPoll {
    /// One polling task per worker of the current runtime; `window` zero
    /// is off (`touch` then does nothing).
    pub fn start(window: Duration) -> BusyPoll {
        if window.is_zero() {
            return BusyPoll(None);
        }
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        let inner = Arc::new(Inner {
            window,
            activity: AtomicU64::new(0),
            sleeping: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            wake: Notify::new(),
        });
        for _ in 0..workers {
            tokio::spawn(poll_busily(inner.clone()));
        }
        tracing::info!(workers, ?window, "busy polling: the workers poll without sleeping for the window after each request");
        if let Some(cpus) = placement::cpus() {
            let online = placement::online();
            if online > 1 && cpus >= online {
                tracing::warn!(workers, "busy polling in a process that is not pinned: its spinning workers keep CPUs busy wherever they run; pin it (taskset, a cpuset, Kubernetes' static CPU manager) to CPUs of its own");
            }
            if let Some(limit) = placement::cgroup_cpu_limit().filter(|&limit| limit < cpus as f64) {
                tracing::warn!(cpu_limit = limit, cpus, "busy polling under a cgroup CPU limit smaller than the CPUs it may run on: the spinning uses the quota up and the gateway gets throttled");
            }
        }
        BusyPoll(Some(inner))
    }

    /// Activity: the pollers keep (or start) spinning for the next window.
    #[inline]
    pub fn touch(&self) {
        if let Some(inner) = &self.0 {
            // SeqCst pairs with the poller's wait below: either it sees
            // this bump and does not wait, or this sees it waiting and
            // wakes it.
            inner.activity.fetch_add(1, Ordering::SeqCst);
            if inner.sleeping.load(Ordering::SeqCst) > 0 {
                inner.wake.notify_waiters();
            }
        }
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// How many touches there have been (0 when off).
    pub fn activity(&self) -> u64 {
        self.0.as_ref().map_or(0, |inner| inner.activity.load(Ordering::Relaxed))
    }

    /// How many pollers are waiting for the next touch.
    pub fn sleeping(&self) -> usize {
        self.0.as_ref().map_or(0, |inner| inner.sleeping.load(Ordering::SeqCst))
    }
}

impl Drop for BusyPoll {
    fn drop(&mut self) {
        if let Some(inner) = &self.0 {
            inner.stop.store(true, Ordering::SeqCst);
            inner.wake.notify_waiters();
        }
    }
}

async fn poll_busily(inner: Arc<Inner>) {
    let mut seen = inner.activity.load(Ordering::SeqCst);
    loop {
        // Spinning until a whole window passes without activity. Each
        // yield lets the worker run its other tasks and poll its I/O
        // driver, without sleeping, before this task runs again.
        let mut quiet_since = Instant::now();
        loop {
            tokio::task::yield_now().await;
            // Let any other thread waiting for this CPU (the gateway's
            // blocking work, another process) run now rather than at the
            // end of the worker's time slice, milliseconds later.
            std::thread::yield_now();
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
        // Waiting for the next touch.
        inner.sleeping.fetch_add(1, Ordering::SeqCst);
        loop {
            let notified = inner.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if inner.activity.load(Ordering::SeqCst) != seen || inner.stop.load(Ordering::SeqCst) {
                break;
            }
            notified.await;
        }
        inner.sleeping.fetch_sub(1, Ordering::SeqCst);
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        seen = inner.activity.load(Ordering::SeqCst);
    }
}

/// Where the process may run, for the start-up warnings.
#[cfg(target_os = "linux")]
mod placement {
    /// How many CPUs the process may run on (its affinity mask).
    pub fn cpus() -> Option<usize> {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity
        // writes at most its size.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return None;
            }
            Some(libc::CPU_COUNT(&set) as usize)
        }
    }

    /// CPUs online on the machine.
    pub fn online() -> usize {
        // SAFETY: sysconf has no preconditions.
        unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize }
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
}

#[cfg(not(target_os = "linux"))]
mod placement {
    pub fn cpus() -> Option<usize> {
        None
    }

    pub fn online() -> usize {
        1
    }

    pub fn cgroup_cpu_limit() -> Option<f64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (up to 10 s: the deadline only keeps a slow, shared machine
    /// from failing the test) until `done` holds.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spins_while_touched_waits_after_the_window_and_stops_on_drop() {
        // A long window: the test task, not the poller, could be kept off
        // the CPU between two touches on a busy machine.
        let busy = BusyPoll::start(Duration::from_millis(500));
        assert!(busy.is_on());
        // One poller per worker; started spinning, they wait once nothing
        // happens for a window.
        eventually("the pollers wait", || busy.sleeping() == 2).await;
        busy.touch();
        assert_eq!(busy.activity(), 1);
        eventually("a touch wakes them", || busy.sleeping() == 0).await;
        // Touched more often than the window: they never wait.
        for _ in 0..100 {
            busy.touch();
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(busy.sleeping(), 0, "waiting while touched");
        }
        eventually("they wait once touches stop", || busy.sleeping() == 2).await;
        let inner = busy.0.clone().unwrap();
        drop(busy);
        // Dropped: the pollers end, and let go of the shared state.
        eventually("the pollers end", || Arc::strong_count(&inner) == 1).await;
    }

    #[tokio::test]
    async fn off_does_nothing() {
        let busy = BusyPoll::start(Duration::ZERO);
        assert!(!busy.is_on());
        busy.touch();
        assert_eq!(busy.activity(), 0);
    }

    /// While a poller spins, its worker still runs every other task and
    /// still sees its sockets: a one-worker runtime answers a TCP echo. The
    /// runtime runs on a thread of its own, so a worker that starved its
    /// I/O (no timer could fire on it either) fails the test after 10 s
    /// instead of hanging it.
    #[test]
    fn a_spinning_worker_still_serves_io() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let echoed = rt.block_on(async {
                let busy = BusyPoll::start(Duration::from_secs(30));
                busy.touch();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                tokio::spawn(async move {
                    let (mut s, _) = listener.accept().await.unwrap();
                    let mut buf = [0u8; 4];
                    s.read_exact(&mut buf).await.unwrap();
                    s.write_all(&buf).await.unwrap();
                });
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                c.write_all(b"ping").await.unwrap();
                let mut back = [0u8; 4];
                c.read_exact(&mut back).await.unwrap();
                (back, busy.sleeping())
            });
            let _ = tx.send(echoed);
        });
        let (back, sleeping) = rx.recv_timeout(Duration::from_secs(10)).expect("the echo was answered while the poller spun");
        assert_eq!(&back, b"ping");
        assert_eq!(sleeping, 0, "the poller was spinning all along");
    }
}
