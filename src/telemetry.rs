//! Logging set-up: one `tracing` subscriber per process, writing to stderr.
//!
//! Guarantee: installed once; `RUST_LOG` (when set) wins over `log.filter`; the format
//! is human-readable or one JSON object per line (`log.format`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. A second call (tests) is a harmless no-op.
pub fn init(settings: &LogSettings) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(directives)
            .map_err(|e| anyhow::anyhow!("invalid RUST_LOG filter: {e}"))?,
        _ => EnvFilter::try_new(&settings.filter)
            .map_err(|e| anyhow::anyhow!("invalid configuration: `log.filter`: {e}"))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}
