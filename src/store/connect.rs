//! Connections to MySQL, for the worker and every command alike.
//!
//! Guarantee: every connection is made from `database.*` the same way (the URL; the
//! password from `database.password` or its file, over one in the URL; the TLS mode and
//! CA), so whatever `run` reaches, `migrate`, `replay`, `verify`, `reconcile`, `bench`
//! and `adopt` reach too, and none of them logs the password (the URL is shown
//! redacted).

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlSslMode};
use sqlx::{ConnectOptions, MySqlConnection, MySqlPool};

use crate::config::{DatabaseSettings, DatabaseTlsMode};

/// Opens a pool on the configured database (which must exist).
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<MySqlPool> {
    pool_options(settings)
        .connect_with(connect_options(settings)?)
        .await
        .with_context(|| format!("connecting to the database at {}", settings.url))
}

/// Like [`connect`], but every session waits for a row lock at most `row_lock_wait_secs`
/// (`innodb_lock_wait_timeout`), so a write under a user's lock never waits in the
/// database for longer than the lock's hold, even if interrupting it fails.
pub async fn connect_for_writes(
    settings: &DatabaseSettings,
    row_lock_wait_secs: u64,
) -> anyhow::Result<MySqlPool> {
    pool_options(settings)
        .after_connect(move |connection, _| {
            Box::pin(async move {
                sqlx::query(&format!(
                    "SET SESSION innodb_lock_wait_timeout = {row_lock_wait_secs}"
                ))
                .execute(connection)
                .await?;
                Ok(())
            })
        })
        .connect_with(connect_options(settings)?)
        .await
        .with_context(|| format!("connecting to the database at {}", settings.url))
}

/// One connection to the server of `database.url`, on no database (to create or drop
/// one).
pub async fn connect_server(settings: &DatabaseSettings) -> anyhow::Result<MySqlConnection> {
    let mut server = settings
        .url
        .parsed()
        .with_context(|| format!("invalid database URL {}", settings.url))?;
    server.set_path("");
    apply(settings, MySqlConnectOptions::from_str(server.as_str())?)?
        .connect()
        .await
        .with_context(|| format!("connecting to the database server of {}", settings.url))
}

fn pool_options(settings: &DatabaseSettings) -> MySqlPoolOptions {
    MySqlPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
}

/// The options of a connection to the configured database.
fn connect_options(settings: &DatabaseSettings) -> anyhow::Result<MySqlConnectOptions> {
    let options = MySqlConnectOptions::from_str(settings.url.expose())
        .with_context(|| format!("invalid database URL {}", settings.url))?;
    apply(settings, options)
}

/// The settings beside the URL: charset, password, TLS. The CA file is read here, so a
/// wrong path is an error of the settings, not a connection failure retried forever.
fn apply(
    settings: &DatabaseSettings,
    mut options: MySqlConnectOptions,
) -> anyhow::Result<MySqlConnectOptions> {
    options = options.charset("utf8mb4");
    if let Some(password) = &settings.password {
        options = options.password(password.expose());
    }
    if let Some(mode) = settings.tls_mode {
        options = options.ssl_mode(ssl_mode(mode));
    }
    if let Some(ca) = &settings.tls_ca {
        let pem = std::fs::read(ca)
            .with_context(|| format!("reading `database.tls_ca` {}", ca.display()))?;
        options = options.ssl_ca_from_pem(pem);
    }
    Ok(options)
}

fn ssl_mode(mode: DatabaseTlsMode) -> MySqlSslMode {
    match mode {
        DatabaseTlsMode::Disabled => MySqlSslMode::Disabled,
        DatabaseTlsMode::Preferred => MySqlSslMode::Preferred,
        DatabaseTlsMode::Required => MySqlSslMode::Required,
        DatabaseTlsMode::VerifyCa => MySqlSslMode::VerifyCa,
        DatabaseTlsMode::VerifyIdentity => MySqlSslMode::VerifyIdentity,
    }
}
