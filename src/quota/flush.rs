//! The flusher: every `FLUSH_INTERVAL` it charges lapsed reservations,
//! writes changed bucket totals (absolute, greatest-wins) and the pending
//! usage events to the durable store (a few at a time, spread over half
//! the interval), and appends the events to the usage log. A failed write
//! keeps everything for the next round.

use std::{
    io::Write,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use super::{Quota, QuotaStore};
use crate::{
    metrics,
    store::{usage::UsageEvent, Db},
};

/// Where the request path drops usage events; never blocks.
#[derive(Clone)]
pub struct EventSink(mpsc::UnboundedSender<UsageEvent>);

impl EventSink {
    /// Record one request: its log line, its metrics and its usage event.
    pub fn record(&self, e: UsageEvent) {
        tracing::info!(
            target: "llm_quota::usage",
            request_id = %e.request_id,
            route = %e.route,
            key_id = e.key_id,
            model = %e.model,
            status = e.status,
            prompt_tokens = e.prompt_tokens,
            completion_tokens = e.completion_tokens,
            duration_ms = e.duration_ms,
            outcome = e.outcome,
            "request"
        );
        let m = metrics::request_metrics(&e.route, e.status, &e.model);
        m.requests.increment(1);
        m.duration.record(e.duration_ms as f64 / 1000.0);
        if e.prompt_tokens > 0 {
            m.prompt_tokens().increment(e.prompt_tokens);
        }
        if e.completion_tokens > 0 {
            m.completion_tokens().increment(e.completion_tokens);
        }
        // Only fails once the flusher is gone, at the very end of shutdown.
        let _ = self.0.send(e);
    }
}

pub struct Flusher {
    db: Db,
    quota: Quota,
    rx: mpsc::UnboundedReceiver<UsageEvent>,
    pending: Vec<UsageEvent>,
    log: Option<Arc<UsageLog>>,
    retention: Duration,
    last_prune: Option<Instant>,
}

impl Flusher {
    pub fn new(db: Db, quota: Quota, log_file: Option<PathBuf>, retention: Duration) -> (EventSink, Arc<Mutex<Flusher>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let flusher = Flusher {
            db,
            quota,
            rx,
            pending: Vec::new(),
            log: log_file.map(|path| Arc::new(UsageLog { path, max_bytes: 10 * 1024 * 1024, backups: 5 })),
            retention,
            last_prune: None,
        };
        (EventSink(tx), Arc::new(Mutex::new(flusher)))
    }

    /// One round, all at once; returns an error when something is left
    /// for the next.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.round(None).await
    }

    /// One round. With `pace`, its usage events and log lines go out a
    /// little at a time, spread over about half of the interval (see
    /// `pause`), until `stop`.
    async fn round(&mut self, pace: Option<(Duration, &CancellationToken)>) -> anyhow::Result<()> {
        let now = self.quota.now().timestamp_millis();
        let key_ids: Vec<i64> = self.db.list_keys().await?.iter().map(|k| k.id).collect();
        self.quota.store.expire(now, &key_ids).await?;
        let dirty = self.quota.store.take_dirty(&key_ids).await?;
        if let Err(e) = self.db.upsert_buckets(&dirty).await {
            let refs: Vec<_> = dirty.into_iter().map(|(r, _)| r).collect();
            self.quota.store.mark_dirty(&refs).await?;
            return Err(e.into());
        }
        let mut fresh = Vec::new();
        while let Ok(e) = self.rx.try_recv() {
            fresh.push(e);
        }
        let log_writes = if self.log.is_some() { fresh.len().div_ceil(PACED_LINES) } else { 0 };
        let statements = (self.pending.len() + fresh.len()).div_ceil(PACED_ROWS) + log_writes;
        // Before each write but the first, when paced: a pause, cut short by a stop.
        let mut first = true;
        let mut wait = async || {
            let Some((interval, stop)) = pace else { return };
            if std::mem::take(&mut first) {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause(interval, statements)) => {}
                _ = stop.cancelled() => {}
            }
        };
        if let Some(log) = &self.log {
            // Serialising and writing the lines takes about 1 µs an event
            // (20 ms a round at 4000 requests/s): off the runtime's threads,
            // and paced like the statements below.
            let mut done = 0;
            while done < fresh.len() {
                wait().await;
                let end = if pace.is_some() { fresh.len().min(done + PACED_LINES) } else { fresh.len() };
                let writer = Arc::clone(log);
                let written;
                (fresh, written) = tokio::task::spawn_blocking(move || {
                    let written = writer.append(&fresh[done..end]);
                    (fresh, written)
                })
                .await
                .expect("writing the usage log does not panic");
                if let Err(e) = written {
                    tracing::warn!(error = %e, path = %log.path.display(), "could not write the usage log");
                }
                done = end;
            }
        }
        self.pending.extend(fresh);
        while !self.pending.is_empty() {
            wait().await;
            let n = self.pending.len().min(if pace.is_some() { PACED_ROWS } else { 2048 });
            self.db.insert_events(&self.pending[..n]).await?;
            self.pending.drain(..n);
        }
        if self.last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
            let cutoff = now - self.retention.as_millis() as i64;
            self.db.prune_events(cutoff).await?;
            self.last_prune = Some(Instant::now());
        }
        Ok(())
    }
}

/// Usage events per statement (and transaction) in a paced round: 1–3 ms
/// of SQLite's time while requests are coming in.
const PACED_ROWS: usize = 64;

/// Usage log lines per write in a paced round (about 1 ms).
const PACED_LINES: usize = 1024;

/// The pause between a paced round's statements: the round's writes are
/// spread over about half the interval, at most 20 ms apart. Written all
/// at once, a round's events (5 s of requests: 16,000 at 3,200
/// requests/s) kept the database busy for half a second or more on the
/// CPU that serves the requests (SQLite works in the gateway's own
/// process), and requests queued behind it: the gateway's added p99
/// jumped by 20–90 ms once a round.
fn pause(interval: Duration, statements: usize) -> Duration {
    (interval / 2 / u32::try_from(statements.max(1)).unwrap_or(u32::MAX)).min(Duration::from_millis(20))
}

/// Runs rounds until cancelled, then one last round (not paced). Failures
/// back off (doubling up to a minute) and are retried; nothing is dropped.
pub async fn run(flusher: Arc<Mutex<Flusher>>, interval: Duration, stop: CancellationToken) {
    let mut wait = interval;
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        match flusher.lock().await.round(Some((interval, &stop))).await {
            Ok(()) => {
                wait = interval;
                last_ok = Instant::now();
            }
            Err(e) => {
                wait = (wait * 2).min(Duration::from_secs(60));
                ::metrics::counter!(metrics::FLUSH_FAILURES).increment(1);
                tracing::warn!(error = %e, retry_in = ?wait, "flush failed");
            }
        }
        ::metrics::gauge!(metrics::FLUSH_LAG).set(last_ok.elapsed().as_secs_f64());
        // Off the runtime's threads: it walks the heap's free lists.
        tokio::task::spawn_blocking(crate::release_freed_memory);
    }
    if let Err(e) = flusher.lock().await.flush().await {
        tracing::error!(error = %e, "final flush failed; unflushed usage is lost");
    }
}

/// The Python proxy's usage log: one JSON line per request, rotated at
/// `max_bytes` into `usage.log.1` … `usage.log.N`.
struct UsageLog {
    path: PathBuf,
    max_bytes: u64,
    backups: u32,
}

impl UsageLog {
    fn append(&self, events: &[UsageEvent]) -> std::io::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        if std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0) >= self.max_bytes {
            for i in (1..self.backups).rev() {
                let _ = std::fs::rename(self.backup(i), self.backup(i + 1));
            }
            std::fs::rename(&self.path, self.backup(1))?;
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        let mut buf = Vec::new();
        for e in events {
            serde_json::to_writer(&mut buf, e)?;
            buf.push(b'\n');
        }
        f.write_all(&buf)
    }

    fn backup(&self, i: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{i}"));
        p.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_round_spreads_its_statements_over_half_the_interval() {
        let ms = Duration::from_millis;
        // 16,000 events at 64 a statement: 250 statements, 10 ms apart.
        assert_eq!(pause(ms(5000), 250), ms(10));
        // Few statements are not spread thinner than 20 ms apart.
        assert_eq!(pause(ms(5000), 3), ms(20));
        assert_eq!(pause(ms(5000), 0), ms(20));
        assert_eq!(pause(ms(200), 10), ms(10));
    }
}
