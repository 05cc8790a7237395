//! Start-up checks: one connection probe per dependency a command needs.
//!
//! Guarantee: a wrong password, a certificate that does not verify, or plaintext spoken
//! to a TLS listener (or the reverse) stops the command at start-up, within
//! [`PROBE_LIMIT`], with one line naming the dependency and the cause. A dependency that
//! refuses connections or does not answer is not decided here: each keeps its existing
//! behaviour (Redis: degraded mode; the database and Kafka: the errors and retries of
//! their first use), so an outage at start-up is not mistaken for a misconfiguration.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::anyhow;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

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
    /// Not reachable (refused, timed out): left to the command's own handling.
    Unreachable(String),
    /// Reached, but the connection cannot work as configured: fatal.
    Misconfigured(String),
}

/// Probes the dependencies in `needs` at once; the first misconfiguration found is the
/// error (each names its dependency).
pub async fn check(settings: &Settings, needs: Needs) -> anyhow::Result<()> {
    let (kafka, database, redis) = tokio::join!(
        async {
            match needs.kafka {
                true => probe_kafka(settings).await,
                false => Probe::Ok,
            }
        },
        async {
            match needs.database {
                true => probe_database(settings).await,
                false => Probe::Ok,
            }
        },
        async {
            match needs.redis {
                true => probe_redis(settings).await,
                false => Probe::Ok,
            }
        },
    );
    let mut fatal = Vec::new();
    for (name, probe) in [("Kafka", kafka), ("database", database), ("Redis", redis)] {
        match probe {
            Probe::Ok => tracing::debug!(dependency = name, "start-up probe answered"),
            Probe::Unreachable(cause) => {
                tracing::warn!(dependency = name, cause, "not reachable at start-up")
            }
            Probe::Misconfigured(cause) => fatal.push(format!("{name}: {cause}")),
        }
    }
    match fatal.is_empty() {
        true => Ok(()),
        false => Err(anyhow!("{}", fatal.join("; "))),
    }
}

// ------------------------------------------------------------------ database

async fn probe_database(settings: &Settings) -> Probe {
    let attempt = crate::store::connect_server(&settings.database);
    match tokio::time::timeout(PROBE_LIMIT, attempt).await {
        Err(_) => Probe::Unreachable(format!("no answer within {PROBE_LIMIT:?}")),
        Ok(Ok(connection)) => {
            drop(connection);
            Probe::Ok
        }
        Ok(Err(error)) => classify_database(&error),
    }
}

/// MySQL error numbers (`ER_ACCESS_DENIED_ERROR`, `ER_CON_COUNT_ERROR`).
const ACCESS_DENIED: u16 = 1045;
const TOO_MANY_CONNECTIONS: u16 = 1040;

fn classify_database(error: &anyhow::Error) -> Probe {
    let cause = crate::telemetry::error_line(error);
    let number = match error.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(server)) => server
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(|server| server.number()),
        _ => None,
    };
    match error.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(_)) if number == Some(ACCESS_DENIED) => {
            Probe::Misconfigured(format!(
                "{cause} (wrong user or password, or an account that requires TLS: \
                 `database.tls_mode`)"
            ))
        }
        // The server answered and refused us (no rights, TLS required) — except when it
        // is merely full.
        Some(sqlx::Error::Database(_)) if number != Some(TOO_MANY_CONNECTIONS) => {
            Probe::Misconfigured(cause)
        }
        Some(sqlx::Error::Tls(_)) => Probe::Misconfigured(format!("TLS: {cause}")),
        Some(sqlx::Error::Configuration(_)) | Some(sqlx::Error::Protocol(_)) => {
            Probe::Misconfigured(cause)
        }
        _ => Probe::Unreachable(cause),
    }
}

// ------------------------------------------------------------------ Redis

async fn probe_redis(settings: &Settings) -> Probe {
    let client = match crate::redis_client::open(&settings.redis) {
        Ok(client) => client,
        Err(error) => return Probe::Misconfigured(format!("{error:#}")),
    };
    // The worker's own timeouts: a Redis that is merely slow or hung is left to degraded
    // mode, as it would be later.
    let redis = &settings.redis;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(redis.connect_timeout_ms)))
        .set_response_timeout(Some(Duration::from_millis(redis.response_timeout_ms)));
    let ping = async {
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    let found = match tokio::time::timeout(PROBE_LIMIT, ping).await {
        Err(_) => Probe::Unreachable(format!("no answer within {PROBE_LIMIT:?}")),
        Ok(Ok(_)) => return Probe::Ok,
        Ok(Err(error)) => classify_redis(&error, settings),
    };
    // A TLS client waits for a handshake a plaintext server never sends: ask in plaintext.
    if let (Probe::Unreachable(_), redis::ConnectionAddr::TcpTls { host, port, .. }) =
        (&found, client.get_connection_info().addr())
    {
        if speaks_plaintext(host, *port).await {
            return Probe::Misconfigured(format!(
                "{host}:{port} answers in plaintext but `redis.url` is rediss:// (TLS): use redis://"
            ));
        }
    }
    found
}

/// Whether a server answers a plaintext `PING` with a RESP reply (`+PONG`, `-NOAUTH …`).
async fn speaks_plaintext(host: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await?;
        Ok::<_, std::io::Error>(matches!(first[0], b'+' | b'-'))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), exchange).await,
        Ok(Ok(true))
    )
}

fn classify_redis(error: &redis::RedisError, settings: &Settings) -> Probe {
    let cause = error.to_string();
    if error.is_connection_refusal() || error.is_timeout() {
        return Probe::Unreachable(cause);
    }
    if error.is_connection_dropped() {
        // Accepted, then closed before any answer: what a TLS-only server does with
        // plaintext.
        let hint = match settings.redis.url.expose().starts_with("rediss://") {
            true => "",
            false => " (a TLS-only server? use a rediss:// URL)",
        };
        return Probe::Misconfigured(format!(
            "the server closed the connection before answering{hint}: {cause}"
        ));
    }
    Probe::Misconfigured(cause)
}

// ------------------------------------------------------------------ Kafka

/// Keeps the first error that says the connection cannot work as configured.
#[derive(Default)]
struct ProbeContext {
    misconfigured: Mutex<Option<String>>,
}

impl ProbeContext {
    fn found(&self, cause: String) {
        let mut found = self.misconfigured.lock().expect("not poisoned");
        found.get_or_insert(cause);
    }
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if is_misconfiguration(&error, reason) {
            self.found(reason.to_string());
        } else {
            tracing::debug!(%error, reason, "Kafka start-up probe");
        }
    }

    fn log(&self, _level: RDKafkaLogLevel, facility: &str, message: &str) {
        tracing::debug!(target: "librdkafka", facility, message, "Kafka start-up probe");
        if is_closed_at_first_request(message) {
            self.found(format!(
                "{message}: the broker closed the connection at the first request, as a TLS \
                 or SASL listener does with plaintext: check `kafka.security_protocol` and \
                 the port"
            ));
        }
    }
}

/// librdkafka's note of a broker that accepted the connection and closed it at the first
/// request (ApiVersion): what a listener expecting TLS or SASL does with plaintext.
fn is_closed_at_first_request(message: &str) -> bool {
    message.contains("connection closed by peer") && message.contains("state APIVERSION_QUERY")
}

impl ConsumerContext for ProbeContext {}

/// Authentication and TLS failures (including a broker's TLS alert after the handshake,
/// as when it requires a client certificate), and librdkafka's own diagnosis of
/// plaintext spoken to a TLS listener.
fn is_misconfiguration(error: &KafkaError, reason: &str) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
    ) || [
        "security.protocol",
        "SSL handshake failed",
        "SASL authentication",
        // OpenSSL's own errors, such as the alert of a broker that wanted a certificate.
        "SSL routines",
    ]
    .iter()
    .any(|sign| reason.contains(sign))
}

async fn probe_kafka(settings: &Settings) -> Probe {
    let consumer: BaseConsumer<ProbeContext> = match settings
        .kafka
        .client_config()
        .create_with_context(ProbeContext::default())
    {
        Ok(consumer) => consumer,
        Err(error) => return Probe::Misconfigured(error.to_string()),
    };
    let probe = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + PROBE_LIMIT;
        loop {
            let answer = consumer.fetch_metadata(None, Duration::from_millis(500));
            // Serves the client's event queue: errors reach the context only from poll.
            let _ = consumer.poll(Duration::from_millis(100));
            if let Some(reason) = consumer
                .context()
                .misconfigured
                .lock()
                .expect("not poisoned")
                .take()
            {
                return Probe::Misconfigured(reason);
            }
            match answer {
                Ok(_) => return Probe::Ok,
                Err(error) if std::time::Instant::now() >= deadline => {
                    return Probe::Unreachable(error.to_string())
                }
                Err(_) => {}
            }
        }
    });
    probe
        .await
        .unwrap_or_else(|panic| Probe::Unreachable(format!("probe failed: {panic}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_authentication_tls_and_protocol_mismatches_are_misconfigurations() {
        let transport = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        assert!(is_misconfiguration(
            &KafkaError::Global(RDKafkaErrorCode::Authentication),
            "SASL authentication error: Authentication failed"
        ));
        assert!(is_misconfiguration(
            &KafkaError::Global(RDKafkaErrorCode::SSL),
            "certificate verify failed"
        ));
        assert!(is_misconfiguration(
            &transport,
            "Disconnected while requesting ApiVersion: might be caused by incorrect \
             security.protocol configuration (connecting to a SSL listener?)"
        ));
        assert!(is_misconfiguration(
            &transport,
            "ssl://127.0.0.1:9192/bootstrap: Receive failed: error:0A000412:SSL \
             routines::sslv3 alert bad certificate: SSL alert number 42"
        ));
        assert!(!is_misconfiguration(
            &transport,
            "Connect to ipv4#127.0.0.1:9 failed: Connection refused"
        ));
    }

    #[test]
    fn a_broker_closing_the_connection_at_the_first_request_is_told_from_one_that_refuses() {
        assert!(is_closed_at_first_request(
            "127.0.0.1:9192/bootstrap: Disconnected: connection closed by peer: receive 0 \
             after POLLIN (after 0ms in state APIVERSION_QUERY)"
        ));
        assert!(!is_closed_at_first_request(
            "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused \
             (after 0ms in state CONNECT)"
        ));
    }
}
