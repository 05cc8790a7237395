//! The steps around the merge: id columns made binary, unread counts and last message
//! times recounted, Redis copies cleared, unique keys added, migrations recorded.
//!
//! Guarantee: each step is idempotent, so a re-run after a kill redoes only what is
//! missing. Adding a key fails (and says so) when a writer made a new duplicate in the
//! meantime; the caller merges again and retries.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use sqlx::{MySql, MySqlPool, QueryBuilder};

use crate::store::{
    mysql_error_number, Catalog, KeyProblem, BINARY_COLLATION, MIGRATOR, NATURAL_KEYS,
};
use crate::unread::copy::Agent;

/// Converts every natural-key id column that is not `utf8mb4_bin`, one `ALTER` per
/// table (the server copies the table, blocking writes meanwhile). Returns the columns.
pub async fn convert_columns(pool: &MySqlPool) -> anyhow::Result<Vec<String>> {
    let mut converted = Vec::new();
    for key in &NATURAL_KEYS {
        let mut changes = Vec::new();
        for problem in Catalog::read(pool).await?.problems() {
            let KeyProblem::NotBinary { table, column, .. } = problem else {
                continue;
            };
            if table != key.table {
                continue;
            }
            let (column_type, nullable): (String, String) = sqlx::query_as(
                "SELECT CAST(COLUMN_TYPE AS CHAR), CAST(IS_NULLABLE AS CHAR) \
                 FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?",
            )
            .bind(table)
            .bind(column)
            .fetch_one(pool)
            .await?;
            let null = if nullable == "YES" {
                "NULL"
            } else {
                "NOT NULL"
            };
            changes.push(format!(
                "MODIFY {column} {column_type} CHARACTER SET utf8mb4 COLLATE {BINARY_COLLATION} {null}"
            ));
            converted.push(format!("{table}.{column}"));
        }
        if !changes.is_empty() {
            sqlx::query(&format!("ALTER TABLE {} {}", key.table, changes.join(", ")))
                .execute(pool)
                .await
                .with_context(|| format!("converting the id columns of `{}`", key.table))?;
        }
    }
    Ok(converted)
}

/// Whether adding the keys worked, or a writer made a duplicate meanwhile.
#[derive(Debug)]
pub enum KeysAdded {
    All(Vec<String>),
    /// Those added before a key failed, and why it failed.
    NewDuplicates {
        added: Vec<String>,
        cause: String,
    },
}

/// Gives the worker the index names it uses: a natural key under another name renamed,
/// a missing lookup index added online. Done before merging (the merges find a
/// customer's or session's rows through them) and again with the keys.
pub async fn name_indexes(pool: &MySqlPool) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    for problem in Catalog::read(pool).await?.problems() {
        let statement = match &problem {
            KeyProblem::MisnamedKey { table, name } => {
                let key = NATURAL_KEYS.iter().find(|key| key.table == *table);
                let index = key.map_or("", |key| key.index);
                format!("ALTER TABLE {table} RENAME INDEX {name} TO {index}")
            }
            KeyProblem::MissingIndex {
                table,
                index,
                columns,
            } => format!(
                "ALTER TABLE {table} ADD INDEX {index} ({}), ALGORITHM = INPLACE, LOCK = NONE",
                columns.join(", ")
            ),
            _ => continue,
        };
        sqlx::query(&statement)
            .execute(pool)
            .await
            .with_context(|| format!("fixing: {problem}"))?;
        done.push(problem.to_string());
    }
    Ok(done)
}

/// Adds each missing natural unique key, online where the server can (`ALGORITHM =
/// INPLACE, LOCK = NONE`), replacing a plain index of the same name.
pub async fn add_keys(pool: &MySqlPool) -> anyhow::Result<KeysAdded> {
    let mut added = name_indexes(pool).await?;
    for problem in Catalog::read(pool).await?.problems() {
        let KeyProblem::MissingKey { table } = problem else {
            continue;
        };
        let key = NATURAL_KEYS
            .iter()
            .find(|key| key.table == table)
            .expect("a problem names one of our tables");
        let same_name: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.STATISTICS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND INDEX_NAME = ?",
        )
        .bind(table)
        .bind(key.index)
        .fetch_one(pool)
        .await?;
        let drop = match same_name > 0 {
            true => format!("DROP INDEX {}, ", key.index),
            false => String::new(),
        };
        let alter = format!(
            "ALTER TABLE {table} {drop}ADD UNIQUE KEY {} ({})",
            key.index,
            key.columns.join(", ")
        );
        let online = sqlx::query(&format!("{alter}, ALGORITHM = INPLACE, LOCK = NONE"))
            .execute(pool)
            .await;
        let result = match online {
            // The server cannot do it online (ER_ALTER_OPERATION_NOT_SUPPORTED*).
            Err(error) if matches!(mysql_error_number(&error), Some(1845 | 1846)) => {
                sqlx::query(&alter).execute(pool).await
            }
            other => other,
        };
        match result {
            Ok(_) => added.push(table.to_string()),
            // ER_DUP_ENTRY, ER_DUP_KEY: a writer made a duplicate after the merge.
            Err(error) if matches!(mysql_error_number(&error), Some(1062 | 1022)) => {
                return Ok(KeysAdded::NewDuplicates {
                    added,
                    cause: format!("`{table}`: {error}"),
                });
            }
            Err(error) => {
                return Err(error).with_context(|| format!("adding the unique key of `{table}`"))
            }
        }
    }
    Ok(KeysAdded::All(added))
}

/// The smallest `BIGINT`: a watermark that is not set.
const NO_WATERMARK: &str = "-9223372036854775808";

/// Sessions recounted by one statement: one round trip and one commit for many (one
/// each had been a fifth of adopt's time on 100,000 sessions), few enough that the
/// `IN` list stays a primary-key range and the rows it locks are held briefly.
const SESSIONS_PER_UPDATE: usize = 200;

/// Sets each session's `unread_count` to what its rows say and its `last_message_at` to
/// at least its newest message (a naive writer kept neither) — with expiry on
/// (`expire_after` ms), its `expired_up_to` first, from the silences between its
/// messages as the worker derives it — in id ranges; returns the sessions whose counts
/// changed and the agents they belong to, each noted in `unread_reconcile` before its
/// sessions change (the workers rebuild noted agents' Redis copies).
pub async fn recount_sessions(
    pool: &MySqlPool,
    range: i64,
    pause: Duration,
    expire_after: Option<i64>,
) -> anyhow::Result<(u64, BTreeSet<Agent>)> {
    let recount = format!(
        "(SELECT COUNT(*) FROM message m WHERE m.session_id = s.id AND m.sent_at > \
         GREATEST(COALESCE(s.read_up_to, {NO_WATERMARK}), COALESCE(s.expired_up_to, {NO_WATERMARK})))"
    );
    let newest = "(SELECT MAX(m.sent_at) FROM message m WHERE m.session_id = s.id)";
    let max_id: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM session")
        .fetch_one(pool)
        .await?;
    let mut changed = 0;
    let mut agents = BTreeSet::new();
    let mut start = 0;
    while start <= max_id {
        let end = start + range - 1;
        match expire_after {
            Some(expire_after) => derive_expiry_between(pool, start, end, expire_after).await?,
            // Expiry off: no watermark, as the worker drops it at a session's next message.
            None => {
                sqlx::query(
                    "UPDATE session SET expired_up_to = NULL \
                     WHERE id BETWEEN ? AND ? AND expired_up_to IS NOT NULL",
                )
                .bind(start)
                .bind(end)
                .execute(pool)
                .await
                .context("dropping expiry watermarks")?;
            }
        }
        // Key columns read as optional: a team's nullable column may hold NULL (such a
        // session is recounted; it names no agent whose copy to clear).
        type Off = (i64, Option<String>, Option<String>, Option<String>);
        let off: Vec<Off> = sqlx::query_as(&format!(
            "SELECT s.id, CAST(s.tenant_id AS CHAR), CAST(s.platform AS CHAR), \
             CAST(s.agent_id AS CHAR) FROM session s \
             WHERE s.id BETWEEN ? AND ? AND (s.unread_count <> {recount} \
             OR COALESCE(s.last_message_at, {NO_WATERMARK}) < COALESCE({newest}, {NO_WATERMARK}))"
        ))
        .bind(start)
        .bind(end)
        .fetch_all(pool)
        .await
        .context("finding sessions whose counts are off")?;
        // Noted before their counts change: a kill after the update would leave no sign
        // of which agents' Redis copies are behind, the note survives it.
        let range_agents: BTreeSet<Agent> = off
            .iter()
            .filter_map(|(_, tenant_id, platform, agent_id)| {
                Some(Agent::from((
                    tenant_id.clone()?,
                    platform.clone()?,
                    agent_id.clone()?,
                )))
            })
            .collect();
        crate::unread::reconcile::note(pool, &range_agents)
            .await
            .context("noting the agents whose counts change")?;
        agents.extend(range_agents);
        let ids: Vec<i64> = off.iter().map(|(id, ..)| *id).collect();
        for ids in ids.chunks(SESSIONS_PER_UPDATE) {
            changed += recount_with_retries(pool, &recount, newest, ids).await?;
        }
        start = end + 1;
        tokio::time::sleep(pause).await;
    }
    Ok((changed, agents))
}

/// Recounts the sessions `ids` in one statement. A deadlock or lock wait with a writer
/// still inserting (its subqueries read the sessions' messages) is tried again, as the
/// merges are: the statement is atomic and sets what the rows say.
async fn recount_with_retries(
    pool: &MySqlPool,
    recount: &str,
    newest: &str,
    ids: &[i64],
) -> anyhow::Result<u64> {
    let mut attempt = 0;
    loop {
        let mut update = QueryBuilder::<MySql>::new(format!(
            "UPDATE session s SET \
             s.last_message_at = COALESCE(GREATEST(s.last_message_at, {newest}), s.last_message_at, {newest}), \
             s.unread_count = {recount}, s.unread_version = s.unread_version + 1 \
             WHERE s.id IN ("
        ));
        super::merge::push_ids(&mut update, ids);
        match update.build().execute(pool).await {
            Ok(done) => return Ok(done.rows_affected()),
            Err(error) if crate::store::is_retryable(&error) && attempt < super::merge::RETRIES => {
                attempt += 1;
                tokio::time::sleep(super::merge::retry_pause(attempt)).await;
            }
            Err(error) => return Err(error).context("recounting sessions"),
        }
    }
}

/// Sets `expired_up_to` of the sessions with ids in `start..=end` to what the silences
/// between their messages imply (none: `NULL`), the worker's rule.
async fn derive_expiry_between(
    pool: &MySqlPool,
    start: i64,
    end: i64,
    expire_after: i64,
) -> anyhow::Result<()> {
    let sessions: Vec<(i64, Option<i64>)> =
        sqlx::query_as("SELECT id, expired_up_to FROM session WHERE id BETWEEN ? AND ?")
            .bind(start)
            .bind(end)
            .fetch_all(pool)
            .await
            .context("reading the sessions' expiry watermarks")?;
    if sessions.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = sessions.iter().map(|(id, _)| *id).collect();
    let mut connection = pool.acquire().await?;
    let mut derived = std::collections::HashMap::new();
    // Well under the protocol's 65,535 placeholders per statement.
    for chunk in ids.chunks(10_000) {
        derived.extend(
            crate::store::derive_expiry(&mut connection, chunk, expire_after)
                .await
                .context("deriving the sessions' expiry watermarks")?,
        );
    }
    for (id, current) in sessions {
        let wanted = derived.get(&id).copied();
        if wanted != current {
            sqlx::query("UPDATE session SET expired_up_to = ? WHERE id = ?")
                .bind(wanted)
                .bind(id)
                .execute(&mut *connection)
                .await
                .context("setting a session's expiry watermark")?;
        }
    }
    Ok(())
}

/// The agents of the sessions merged into others: their Redis copies counted the
/// losers' conversations apart.
pub async fn agents_of_merged_sessions(pool: &MySqlPool) -> anyhow::Result<BTreeSet<Agent>> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(&format!(
        "SELECT DISTINCT CAST(s.tenant_id AS CHAR), CAST(s.platform AS CHAR), \
         CAST(s.agent_id AS CHAR) FROM session s \
         JOIN {} m ON m.table_name = 'session' AND m.survivor_id = s.id",
        super::merge::MAP_TABLE
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Agent::from).collect())
}

/// Creates the worker's own table for unread notes, which a team's database lacks (the
/// DDL of the migration that introduced it).
pub async fn create_worker_tables(pool: &MySqlPool) -> anyhow::Result<()> {
    const DDL: &str = "CREATE TABLE IF NOT EXISTS unread_reconcile";
    let sql = MIGRATOR
        .iter()
        .map(|migration| migration.sql.as_ref())
        .find(|sql| sql.contains(DDL))
        .context("the migration that creates unread_reconcile")?;
    let start = sql.find(DDL).expect("found above");
    let statement = sql[start..].split(';').next().expect("split yields a part");
    sqlx::query(statement)
        .execute(pool)
        .await
        .context("creating the table unread_reconcile")?;
    Ok(())
}

/// Records every migration of this release as applied (also over a row a failed
/// `migrate` left unfinished): the tables have their shape (checked first). `run` and
/// `migrate` go on from here once the keys exist and the adopt marker is gone.
pub async fn record_migrations(pool: &MySqlPool) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS _sqlx_migrations (\
           version BIGINT PRIMARY KEY, \
           description TEXT NOT NULL, \
           installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, \
           success BOOLEAN NOT NULL, \
           checksum BLOB NOT NULL, \
           execution_time BIGINT NOT NULL)",
    )
    .execute(pool)
    .await
    .context("creating the migrations table")?;
    for migration in MIGRATOR.iter() {
        sqlx::query(
            "INSERT INTO _sqlx_migrations \
             (version, description, success, checksum, execution_time) VALUES (?, ?, TRUE, ?, 0) \
             ON DUPLICATE KEY UPDATE success = TRUE, checksum = VALUES(checksum)",
        )
        .bind(migration.version)
        .bind(migration.description.as_ref())
        .bind(migration.checksum.as_ref())
        .execute(pool)
        .await
        .context("recording the migrations as applied")?;
    }
    Ok(())
}
