//! Structured logging set-up shared by every binary.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, for terminals.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global tracing subscriber. The filter comes from `env_var` (`RUST_LOG` syntax)
/// and falls back to `default_filter`. Safe to call more than once: later calls are no-ops.
/// The binaries' logging: the filter from `MECHA_LOG` (default `info`), JSON lines when
/// `MECHA_LOG_FORMAT=json`.
pub fn init_tracing_from_env() {
    let format = match std::env::var("MECHA_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    };
    init_tracing("MECHA_LOG", "info", format);
}

pub fn init_tracing(env_var: &str, default_filter: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_from_env(env_var).unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.compact().try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
