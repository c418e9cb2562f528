//! Logging set-up, once per process.

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Lines queued for stdout at most (two seconds of request lines at 4,000
/// requests a second); past that, lines are dropped rather than holding a
/// request up. The queue is allocated whole at start-up, 32 bytes a line:
/// tracing-appender's default of 128,000 lines kept 4 MiB resident.
const QUEUED_LINES: usize = 8_192;

/// Logs to stdout from a thread of its own: a request formats its line and
/// queues it, and never waits on the write (a terminal, or a pipe to a slow
/// log collector). Colours only on a terminal. Keep the guard until the
/// process ends: dropping it writes out what is still queued.
pub fn init(format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("llm-quota-log")
        .finish(std::io::stdout());
    let builder = fmt().with_env_filter(filter).with_writer(writer).with_ansi(std::io::stdout().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    guard
}
