//! Start-up checks: one connection probe per dependency a command needs.
//!
//! Guarantee: a wrong password, a certificate that does not verify, or plaintext spoken
//! to a TLS listener (or the reverse) stops the command at start-up, within
//! [`PROBE_LIMIT`], with one line naming the dependency and the cause. A dependency that
//! refuses connections, does not answer, or answers "busy" (loading, full, shutting
//! down) is not decided here: each keeps its existing behaviour (Redis: degraded mode;
//! the database and Kafka: the errors and retries of their first use), so an outage at
//! start-up is not mistaken for a misconfiguration.

mod database;
mod kafka;
mod redis;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use anyhow::anyhow;
use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::config::Settings;

/// The longest a probe takes; a dependency still silent then is left to the command.
pub const PROBE_LIMIT: Duration = Duration::from_secs(15);

/// The dependencies a command uses.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    pub kafka: bool,
    pub database: bool,
    pub redis: bool,
}

impl Needs {
    pub const ALL: Self = Self {
        kafka: true,
        database: true,
        redis: true,
    };
}

/// What one probe found.
#[derive(Debug)]
enum Probe {
    /// Connected and answered.
    Ok,
    /// Not reachable, or busy: left to the command's own handling.
    Unreachable(String),
    /// Reached, but the connection cannot work as configured: fatal.
    Misconfigured(String),
}

type Probing<'a> = Pin<Box<dyn Future<Output = (&'static str, Probe)> + Send + 'a>>;

/// Probes the dependencies in `needs` at once; the first misconfiguration found is the
/// error (naming its dependency), without waiting for the other probes.
pub async fn check(settings: &Settings, needs: Needs) -> anyhow::Result<()> {
    let mut probes: FuturesUnordered<Probing<'_>> = FuturesUnordered::new();
    if needs.kafka {
        probes.push(Box::pin(async { ("Kafka", kafka::probe(settings).await) }));
    }
    if needs.database {
        probes.push(Box::pin(async {
            ("database", database::probe(settings).await)
        }));
    }
    if needs.redis {
        probes.push(Box::pin(async { ("Redis", redis::probe(settings).await) }));
    }
    while let Some((name, probe)) = probes.next().await {
        match probe {
            Probe::Ok => tracing::debug!(dependency = name, "start-up probe answered"),
            Probe::Unreachable(cause) => {
                tracing::warn!(dependency = name, cause, "not reachable at start-up")
            }
            Probe::Misconfigured(cause) => return Err(anyhow!("{name}: {cause}")),
        }
    }
    Ok(())
}
