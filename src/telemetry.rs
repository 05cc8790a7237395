//! Logging set-up: one `tracing` subscriber per process, writing to stderr.
//!
//! Guarantee: installed once; `RUST_LOG` (when set) wins over `log.filter`; the format
//! is human-readable or one JSON object per line (`log.format`). An error is reported on
//! one line, each cause once ([`error_line`]).

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

/// An error and its causes on one line, each cause once: sqlx and OpenSSL errors repeat
/// their source in their own text, which `{:#}` would print twice.
pub fn error_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain().map(ToString::to_string) {
        if !line.contains(&cause) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&cause);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Repeating;

    impl std::fmt::Display for Repeating {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("server said: access denied")
        }
    }

    impl std::error::Error for Repeating {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&Inner)
        }
    }

    #[derive(Debug)]
    struct Inner;

    impl std::fmt::Display for Inner {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("access denied")
        }
    }

    impl std::error::Error for Inner {}

    #[test]
    fn an_error_line_names_each_cause_once_in_order() {
        let error = anyhow::Error::new(Repeating).context("connecting to the database");
        assert_eq!(
            error_line(&error),
            "connecting to the database: server said: access denied"
        );
        let plain = anyhow::anyhow!("refused").context("probing Redis");
        assert_eq!(error_line(&plain), "probing Redis: refused");
    }
}
