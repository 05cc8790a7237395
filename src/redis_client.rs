//! Redis clients made from `redis.*`: the URL, the ACL user and password, TLS.
//!
//! Guarantee: the lock, the unread copy and the readiness check all connect the same
//! way; a `rediss://` URL verifies the server's certificate against `redis.tls_ca` (else
//! the system's CAs), and the password never appears in an error (the URL is shown
//! redacted).

use anyhow::Context;
use redis::{IntoConnectionInfo, TlsCertificates};

use crate::config::RedisSettings;

/// A client for the configured Redis; it connects on first use.
pub fn open(settings: &RedisSettings) -> anyhow::Result<redis::Client> {
    let info = settings
        .url
        .expose()
        .into_connection_info()
        .with_context(|| format!("invalid Redis URL {}", settings.url))?;
    let mut credentials = info.redis_settings().clone();
    if let Some(username) = &settings.username {
        credentials = credentials.set_username(username);
    }
    if let Some(password) = &settings.password {
        credentials = credentials.set_password(password.expose());
    }
    let info = info.set_redis_settings(credentials);
    let Some(ca) = &settings.tls_ca else {
        return redis::Client::open(info)
            .with_context(|| format!("invalid Redis URL {}", settings.url));
    };
    anyhow::ensure!(
        settings.url.expose().starts_with("rediss://"),
        "`redis.tls_ca` is set but `redis.url` ({}) is not a rediss:// URL",
        settings.url
    );
    let root_cert =
        std::fs::read(ca).with_context(|| format!("reading `redis.tls_ca` {}", ca.display()))?;
    let certificates = TlsCertificates {
        client_tls: None,
        root_cert: Some(root_cert),
    };
    redis::Client::build_with_tls(info, certificates)
        .with_context(|| format!("`redis.tls_ca` {} is not a PEM certificate", ca.display()))
}

/// The configured connect and response timeouts, for a connection made outside the
/// lock's connection manager: a slow Redis counts as down, as everywhere else.
pub fn timeouts(settings: &RedisSettings) -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_millis(
            settings.connect_timeout_ms,
        )))
        .set_response_timeout(Some(std::time::Duration::from_millis(
            settings.response_timeout_ms,
        )))
}
