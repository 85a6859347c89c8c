//! `xsrec serve`'s log: tracing events as text or JSON lines on stderr, written by a background
//! thread so that a slow stderr never stalls a request (past its buffer, lines are dropped).
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event: time, level, message, fields.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `message` and the fields at top level).
    Json,
}

/// Installs the process's logger; the level comes from `XSREC_LOG` (a tracing filter such as
/// `debug` or `xsrec=info,tower_http=debug`), by default `info` for xsrec and `warn` for the
/// libraries under it. Keep the guard until the process ends: dropping it writes out what is
/// still queued.
pub fn init(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let filter = EnvFilter::try_from_env("XSREC_LOG").unwrap_or_else(|_| EnvFilter::new("warn,xsrec=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false)
        .with_ansi(false);
    // Already set (a second server in one process): the first logger stays.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // Panics (caught ones too: a failed batch, a handler) go to the log as events, so that a
    // JSON log stays all JSON.
    std::panic::set_hook(Box::new(|panic| {
        let payload = panic.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        let location = panic.location().map(ToString::to_string).unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
        tracing::error!(location, thread, "panic: {message}");
    }));
    guard
}
