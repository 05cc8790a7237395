//! Database creation and migrations.
//!
//! Guarantee: `migrate` may run any number of times, from any number of processes at
//! once (sqlx serialises migrators with a server-side advisory lock); each migration is
//! applied once and a changed, already-applied migration is an error, not a silent skip.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::Migrator;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{ConnectOptions, Connection, MySqlPool};

use crate::config::DatabaseSettings;
use crate::secret::SecretUrl;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

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

fn pool_options(settings: &DatabaseSettings) -> MySqlPoolOptions {
    MySqlPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
}

fn connect_options(settings: &DatabaseSettings) -> anyhow::Result<MySqlConnectOptions> {
    Ok(MySqlConnectOptions::from_str(settings.url.expose())
        .with_context(|| format!("invalid database URL {}", settings.url))?
        .charset("utf8mb4"))
}

/// Creates the URL's database if it does not exist (utf8mb4; the tables choose binary
/// collations for their ids themselves).
pub async fn create_database_if_missing(url: &SecretUrl) -> anyhow::Result<()> {
    let mut server_url = url.parsed().context("database URL is not a URL")?;
    let name = server_url.path().trim_start_matches('/').to_string();
    anyhow::ensure!(
        !name.is_empty(),
        "database URL {url} names no database (expected mysql://…/<database>)"
    );
    anyhow::ensure!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$'),
        "database name `{name}` may use only letters, digits, `_` and `$`"
    );
    server_url.set_path("");
    let mut conn = MySqlConnectOptions::from_str(server_url.as_str())
        .with_context(|| format!("invalid database URL {url}"))?
        .connect()
        .await
        .with_context(|| format!("connecting to the database server of {url}"))?;
    sqlx::query(&format!(
        "CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
    ))
    .execute(&mut conn)
    .await
    .with_context(|| format!("creating database `{name}`"))?;
    conn.close().await.ok();
    Ok(())
}

/// Creates the database if missing and applies pending migrations.
pub async fn migrate(settings: &DatabaseSettings) -> anyhow::Result<()> {
    create_database_if_missing(&settings.url).await?;
    let pool = connect(settings).await?;
    MIGRATOR
        .run(&pool)
        .await
        .context("applying database migrations")?;
    pool.close().await;
    Ok(())
}
