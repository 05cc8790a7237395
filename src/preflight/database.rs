//! The database probe: one connection to the server of `database.url`.

use super::{Probe, PROBE_LIMIT};
use crate::config::Settings;

pub(super) async fn probe(settings: &Settings) -> Probe {
    let attempt = crate::store::connect_server(&settings.database);
    match tokio::time::timeout(PROBE_LIMIT, attempt).await {
        Err(_) => Probe::Unreachable(format!("no answer within {PROBE_LIMIT:?}")),
        Ok(Ok(connection)) => {
            drop(connection);
            Probe::Ok
        }
        Ok(Err(error)) => classify(&error),
    }
}

/// MySQL/MariaDB errors that say the account or the transport is wrong, not that the
/// server is busy: access denied (to the server, to the database, without a password),
/// an authentication method the client lacks or a missing plugin, a locked account or
/// an expired password, and (MySQL 8) TLS required.
const REFUSALS: [u16; 9] = [1044, 1045, 1251, 1524, 1698, 1862, 3118, 3159, 4151];
/// `ER_ACCESS_DENIED_ERROR` and `ER_SECURE_TRANSPORT_REQUIRED`: a hint names the TLS mode.
const ACCESS_DENIED: u16 = 1045;
const TLS_REQUIRED: u16 = 3159;

fn classify(error: &anyhow::Error) -> Probe {
    let cause = crate::telemetry::error_line(error);
    match error.downcast_ref::<sqlx::Error>() {
        Some(database @ sqlx::Error::Database(_)) => {
            match crate::store::mysql_error_number(database) {
                Some(ACCESS_DENIED | TLS_REQUIRED) => Probe::Misconfigured(format!(
                    "{cause} (wrong user or password, or an account or server that requires \
                     TLS: `database.tls_mode`)"
                )),
                Some(number) if REFUSALS.contains(&number) => Probe::Misconfigured(cause),
                // Busy, full, shutting down, blocked for a while: the usual retries.
                _ => Probe::Unreachable(cause),
            }
        }
        Some(sqlx::Error::Tls(_)) => Probe::Misconfigured(format!("TLS: {cause}")),
        Some(sqlx::Error::Configuration(_) | sqlx::Error::Protocol(_)) => {
            Probe::Misconfigured(cause)
        }
        // An unreadable CA file is a setting to fix, not an outage to wait out.
        _ if cause.contains("database.tls_ca") => Probe::Misconfigured(cause),
        _ => Probe::Unreachable(cause),
    }
}
