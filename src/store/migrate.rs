//! Database creation and migrations.
//!
//! Guarantee: `migrate` may run any number of times, from any number of processes at
//! once (sqlx serialises migrators with a server-side advisory lock); each migration is
//! applied once and a changed, already-applied migration is an error, not a silent skip.

use anyhow::Context;
use sqlx::migrate::Migrator;
use sqlx::Connection;

use crate::config::DatabaseSettings;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Creates the URL's database if it does not exist (utf8mb4; the tables choose binary
/// collations for their ids themselves).
pub async fn create_database_if_missing(settings: &DatabaseSettings) -> anyhow::Result<()> {
    let url = &settings.url;
    let name = url
        .parsed()
        .context("database URL is not a URL")?
        .path()
        .trim_start_matches('/')
        .to_string();
    anyhow::ensure!(
        !name.is_empty(),
        "database URL {url} names no database (expected mysql://…/<database>)"
    );
    anyhow::ensure!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$'),
        "database name `{name}` may use only letters, digits, `_` and `$`"
    );
    let mut conn = super::connect::connect_server(settings).await?;
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
    let applied = async {
        create_database_if_missing(settings).await?;
        let pool = super::connect::connect(settings).await?;
        // Tables of ours made without the keys: `CREATE TABLE IF NOT EXISTS` would
        // leave them so, and record the migration as applied.
        super::keys::require_natural_keys(&pool).await?;
        MIGRATOR
            .run(&pool)
            .await
            .context("applying database migrations")?;
        pool.close().await;
        Ok(())
    };
    applied
        .await
        .map_err(|error: anyhow::Error| match is_access_denied(&error) {
            true => error.context(
                "the database user may not change the schema: run `im-ingest migrate` as a \
                 user that may (README, \"Security\"), and run the worker with \
                 `database.migrate_on_start = false`",
            ),
            false => error,
        })
}

/// Whether the server refused a statement for lack of rights (`ER_DBACCESS_DENIED_ERROR`,
/// `ER_TABLEACCESS_DENIED_ERROR`).
fn is_access_denied(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .and_then(super::write::mysql_error_number)
            .is_some_and(|number| matches!(number, 1044 | 1142))
    })
}
