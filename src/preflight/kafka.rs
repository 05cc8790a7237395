//! The Kafka probe: a metadata request through a client that watches librdkafka's errors
//! and logs for the signs of a misconfiguration.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::{Probe, PROBE_LIMIT};
use crate::config::Settings;

/// How often a sign that may also come from a broker going down must be seen before it
/// counts: librdkafka reconnects within a second, so a misconfiguration repeats at once.
const SIGHTINGS: usize = 3;

pub(super) async fn probe(settings: &Settings) -> Probe {
    let consumer: BaseConsumer<ProbeContext> = match settings
        .kafka
        .client_config()
        .create_with_context(ProbeContext::default())
    {
        Ok(consumer) => consumer,
        Err(error) => return Probe::Misconfigured(describe_creation_error(&error)),
    };
    let first_broker = settings
        .kafka
        .brokers
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let probe = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + PROBE_LIMIT;
        let mut asked_by_hand = false;
        loop {
            let answer = consumer.fetch_metadata(None, Duration::from_millis(500));
            if answer.is_ok() {
                return Probe::Ok;
            }
            // Serves the client's event queue: errors reach the context only from poll.
            let _ = consumer.poll(Duration::from_millis(100));
            if let Some(cause) = consumer.context().verdict() {
                return Probe::Misconfigured(cause);
            }
            // librdkafka says the broker hung up at the first request once or twice, then
            // goes quiet: ask it once by hand, in plaintext.
            if let (Some(cause), false) =
                (consumer.context().closed_at_first_request(), asked_by_hand)
            {
                asked_by_hand = true;
                if plaintext_api_versions(&first_broker) == Some(false) {
                    return Probe::Misconfigured(cause);
                }
            }
            if let (Err(error), true) = (answer, Instant::now() >= deadline) {
                return Probe::Unreachable(error.to_string());
            }
        }
    });
    probe
        .await
        .unwrap_or_else(|panic| Probe::Unreachable(format!("probe failed: {panic}")))
}

/// A client that could not be created: the property and librdkafka's reason, never the
/// value (it may be a secret, e.g. a property this build does not support).
fn describe_creation_error(error: &KafkaError) -> String {
    match error {
        KafkaError::ClientConfig(_, reason, property, _value) => {
            format!("invalid client property `{property}`: {reason}")
        }
        other => other.to_string(),
    }
}

/// What librdkafka said that matters to the probe.
#[derive(Default)]
struct ProbeContext {
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// librdkafka's note of a broker that closed the connection at the first request.
    closed_at_first_request: Option<String>,
    /// A sign that can only mean a misconfiguration.
    certain: Option<String>,
    /// Signs a broker going down can also give, and how often they came.
    suspect: Option<String>,
    suspect_sightings: usize,
}

impl ProbeContext {
    fn note(&self, sign: Sign, cause: String) {
        let mut seen = self.seen.lock().expect("not poisoned");
        match sign {
            Sign::Certain => {
                seen.certain.get_or_insert(cause);
            }
            Sign::Suspect => {
                seen.suspect.get_or_insert(cause);
                seen.suspect_sightings += 1;
            }
            Sign::None => {}
        }
    }

    fn closed_at_first_request(&self) -> Option<String> {
        let seen = self.seen.lock().expect("not poisoned");
        seen.closed_at_first_request.clone()
    }

    /// The misconfiguration found, if any.
    fn verdict(&self) -> Option<String> {
        let seen = self.seen.lock().expect("not poisoned");
        match (&seen.certain, &seen.suspect) {
            (Some(cause), _) => Some(cause.clone()),
            (None, Some(cause)) if seen.suspect_sightings >= SIGHTINGS => Some(cause.clone()),
            _ => None,
        }
    }
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "Kafka start-up probe");
        self.note(sign_of_error(&error, reason), reason.to_string());
    }

    fn log(&self, _level: RDKafkaLogLevel, facility: &str, message: &str) {
        tracing::debug!(target: "librdkafka", facility, message, "Kafka start-up probe");
        if is_closed_at_first_request(message) {
            let mut seen = self.seen.lock().expect("not poisoned");
            seen.closed_at_first_request.get_or_insert_with(|| {
                format!(
                    "{message}: the broker closed the connection at the first request, as a \
                     TLS listener does with plaintext: check `kafka.security_protocol` and the \
                     port"
                )
            });
        }
    }
}

impl ConsumerContext for ProbeContext {}

#[derive(Debug, PartialEq, Eq)]
enum Sign {
    Certain,
    Suspect,
    None,
}

/// Authentication failures, TLS handshake failures and a TLS alert from the broker (as
/// when it wanted a client certificate) are certain; librdkafka's guess at a protocol
/// mismatch is suspect (a broker going down mid-request can give it too). Other OpenSSL
/// errors after the handshake (a connection cut mid-stream) are no sign at all.
fn sign_of_error(error: &KafkaError, reason: &str) -> Sign {
    let code = error.rdkafka_error_code();
    if matches!(
        code,
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
    ) || [
        "SSL handshake failed",
        "SASL authentication",
        "SSL alert number",
    ]
    .iter()
    .any(|sign| reason.contains(sign))
    {
        return Sign::Certain;
    }
    match reason.contains("security.protocol") {
        true => Sign::Suspect,
        false => Sign::None,
    }
}

/// Sends a Kafka `ApiVersions` request in plaintext to `broker` (`host:port`): `Some(true)`
/// when it answers, `Some(false)` when it accepts the connection and closes it (or
/// answers with anything but Kafka: a TLS listener), `None` when it cannot be reached.
fn plaintext_api_versions(broker: &str) -> Option<bool> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let address = broker.to_socket_addrs().ok()?.next()?;
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    // ApiVersions v0: api key 18, version 0, correlation id 1, client id "im-ingest".
    let client_id = b"im-ingest";
    let mut request = vec![0, 18, 0, 0, 0, 0, 0, 1, 0, client_id.len() as u8];
    request.extend_from_slice(client_id);
    let mut frame = (request.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&request);
    stream.write_all(&frame).ok()?;
    let mut answer = [0u8; 8];
    match stream.read_exact(&mut answer) {
        // Size, then the correlation id we sent.
        Ok(()) => Some(answer[4..8] == [0, 0, 0, 1]),
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(error) if error.kind() == std::io::ErrorKind::TimedOut => None,
        Err(_) => Some(false),
    }
}

/// librdkafka's note of a broker that accepted the connection and closed it at the first
/// request (ApiVersion): what a listener expecting TLS or SASL does with plaintext.
fn is_closed_at_first_request(message: &str) -> bool {
    message.contains("connection closed by peer") && message.contains("state APIVERSION_QUERY")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authentication_handshake_failures_and_alerts_are_certain_a_protocol_guess_suspect() {
        let transport = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        assert_eq!(
            sign_of_error(
                &KafkaError::Global(RDKafkaErrorCode::Authentication),
                "SASL authentication error: Authentication failed"
            ),
            Sign::Certain
        );
        assert_eq!(
            sign_of_error(
                &transport,
                "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed"
            ),
            Sign::Certain
        );
        assert_eq!(
            sign_of_error(
                &transport,
                "Disconnected while requesting ApiVersion: might be caused by incorrect \
                 security.protocol configuration (connecting to a SSL listener?)"
            ),
            Sign::Suspect
        );
        assert_eq!(
            sign_of_error(
                &transport,
                "ssl://127.0.0.1:9192/bootstrap: Receive failed: error:0A000412:SSL \
                 routines::sslv3 alert bad certificate: SSL alert number 42"
            ),
            Sign::Certain
        );
        assert_eq!(
            sign_of_error(
                &transport,
                "ssl://127.0.0.1:9192/bootstrap: Receive failed: error:0A000126:SSL \
                 routines::unexpected eof while reading"
            ),
            Sign::None
        );
        assert_eq!(
            sign_of_error(
                &transport,
                "Connect to ipv4#127.0.0.1:9 failed: Connection refused"
            ),
            Sign::None
        );
    }

    #[test]
    fn a_suspect_sign_counts_only_once_it_repeats() {
        let context = ProbeContext::default();
        for _ in 1..SIGHTINGS {
            context.note(Sign::Suspect, "closed at the first request".into());
        }
        assert_eq!(context.verdict(), None);
        context.note(Sign::Suspect, "again".into());
        assert_eq!(
            context.verdict().as_deref(),
            Some("closed at the first request")
        );
        let certain = ProbeContext::default();
        certain.note(Sign::Certain, "wrong password".into());
        assert_eq!(certain.verdict().as_deref(), Some("wrong password"));
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

    #[test]
    fn a_client_property_error_names_the_property_and_not_its_value() {
        let error = KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "not supported in this build".into(),
            "sasl.oauthbearer.client.secret".into(),
            "hunter2".into(),
        );
        let text = describe_creation_error(&error);
        assert!(text.contains("sasl.oauthbearer.client.secret"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
