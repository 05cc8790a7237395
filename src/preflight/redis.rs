//! The Redis probe: connect (TLS and `AUTH` included) and `PING`, within the worker's own
//! connect and response timeouts.

use std::time::Duration;

use redis::{ConnectionAddr, ErrorKind};

use super::{Probe, PROBE_LIMIT};
use crate::config::Settings;

pub(super) async fn probe(settings: &Settings) -> Probe {
    let client = match crate::redis_client::open(&settings.redis) {
        Ok(client) => client,
        Err(error) => return Probe::Misconfigured(crate::telemetry::error_line(&error)),
    };
    // The worker's own timeouts: a Redis that is merely slow or hung is left to degraded
    // mode, as it would be later.
    let config = crate::redis_client::timeouts(&settings.redis);
    let ping = async {
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    let address = client.get_connection_info().addr().clone();
    match tokio::time::timeout(PROBE_LIMIT, ping).await {
        Ok(Ok(_)) => Probe::Ok,
        Ok(Err(error)) => classify(&error, &address).await,
        Err(_) => classify_silence(&address, format!("no answer within {PROBE_LIMIT:?}")).await,
    }
}

/// Server errors that say the credentials or the ACL are wrong.
const REFUSAL_CODES: [&str; 3] = ["WRONGPASS", "NOAUTH", "NOPERM"];

async fn classify(error: &redis::RedisError, address: &ConnectionAddr) -> Probe {
    let cause = error.to_string();
    let refused_us = matches!(
        error.kind(),
        // `Client`: the TLS layer's errors (certificate, handshake).
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig | ErrorKind::Client
    ) || error
        .code()
        .is_some_and(|code| REFUSAL_CODES.contains(&code));
    if refused_us {
        return Probe::Misconfigured(cause);
    }
    if error.is_timeout() {
        return classify_silence(address, cause).await;
    }
    if let (true, ConnectionAddr::Tcp(host, port)) = (error.is_connection_dropped(), address) {
        // Accepted, then closed before any answer: what a TLS-only server does with
        // plaintext, but also what a restarting one may do. Ask once more, by hand.
        if plaintext_ping(host, *port).await == Answer::NotResp {
            return Probe::Misconfigured(format!(
                "{host}:{port} closed the connection without a Redis answer, as a TLS-only \
                 server does with plaintext: use a rediss:// URL ({cause})"
            ));
        }
    }
    Probe::Unreachable(cause)
}

/// No answer in time (the client's response timeout, or the probe's limit). A TLS client
/// waits for a handshake a plaintext server never sends: ask in plaintext.
async fn classify_silence(address: &ConnectionAddr, cause: String) -> Probe {
    if let ConnectionAddr::TcpTls { host, port, .. } = address {
        if plaintext_ping(host, *port).await == Answer::Resp {
            return Probe::Misconfigured(format!(
                "{host}:{port} answers in plaintext but `redis.url` is rediss:// (TLS): use redis://"
            ));
        }
    }
    Probe::Unreachable(cause)
}

#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// A RESP reply (`+PONG`, `-NOAUTH …`): a plaintext Redis.
    Resp,
    /// Connected, then anything but RESP (a TLS alert, or the connection closed).
    NotResp,
    /// Not connected, or no answer in time.
    Nothing,
}

/// Sends a plaintext `PING` and looks at the first byte of the answer.
async fn plaintext_ping(host: &str, port: u16) -> Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    else {
        return Answer::Nothing;
    };
    let exchange = async {
        stream.write_all(b"PING\r\n").await?;
        let mut first = [0u8; 1];
        let read = stream.read(&mut first).await?;
        Ok::<_, std::io::Error>((read, first[0]))
    };
    match tokio::time::timeout(Duration::from_secs(2), exchange).await {
        Ok(Ok((1, b'+' | b'-'))) => Answer::Resp,
        Ok(_) => Answer::NotResp,
        Err(_) => Answer::Nothing,
    }
}
