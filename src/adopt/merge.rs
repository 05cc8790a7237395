//! Merging the rows that share a natural key into the one with the lowest id.
//!
//! Guarantee: each key's rows are merged in one transaction that first locks them all
//! (`FOR UPDATE`; messages, which nothing references, up to 200 keys per transaction):
//! the survivor takes the converging fields (each profile field
//! newest-wins; the greatest `last_message_at`, `read_up_to`, `expired_up_to`), every
//! row that pointed at a loser points at the survivor, the losers are deleted, and
//! `adopt_merged` records loser → survivor. So a kill leaves each key merged or not,
//! never half, and a re-run finishes the rest. A writer inserting meanwhile either
//! waits for the lock and then sees the survivor, or (with the tables' foreign keys)
//! fails to reference a deleted loser; without foreign keys, [`repoint_stragglers`]
//! moves such rows to the survivor through `adopt_merged` (a session that lands on a
//! key the survivor customer already has is merged, never collides). A survivor merged
//! later takes its losers' map rows with it, so the map always names a row that exists.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use sqlx::mysql::MySqlRow;
use sqlx::{MySql, MySqlConnection, MySqlPool, QueryBuilder, Row};

use crate::store::NaturalKey;

/// The loser → survivor map, kept after `adopt` for whoever needs to follow an old id.
pub const MAP_TABLE: &str = "adopt_merged";

/// Creates the map table if missing.
pub async fn create_map_table(pool: &MySqlPool) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {MAP_TABLE} (\
           table_name  VARCHAR(16) NOT NULL, \
           loser_id    BIGINT      NOT NULL, \
           survivor_id BIGINT      NOT NULL, \
           merged_at   DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3), \
           PRIMARY KEY (table_name, loser_id), \
           KEY ix_{MAP_TABLE}_survivor (table_name, survivor_id)\
         ) ENGINE = InnoDB"
    ))
    .execute(pool)
    .await
    .context("creating the loser → survivor map table")?;
    Ok(())
}

/// What merging did to one table.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Merged {
    /// Natural keys whose rows were merged.
    pub keys: u64,
    /// Rows deleted (the losers).
    pub removed: u64,
    /// Rows of other tables moved from a loser to its survivor.
    pub repointed: u64,
}

impl Merged {
    pub fn add(&mut self, other: Merged) {
        self.keys += other.keys;
        self.removed += other.removed;
        self.repointed += other.repointed;
    }
}

/// How the work is paced.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Keys merged per batch (one query finds them).
    pub batch: u32,
    /// Pause after each batch.
    pub pause: Duration,
}

/// Message keys merged in one transaction: few enough that the locking read stays a
/// range read on the key's index (many more `OR`ed keys can turn it into a scan that
/// locks the table) and its statements far below 65,535 placeholders.
const KEYS_PER_TRANSACTION: usize = 200;

/// Ids bound in one statement: a key can hold very many rows, and a statement takes at
/// most 65,535 placeholders (the map insert binds three per loser).
const IDS_PER_STATEMENT: usize = 10_000;

/// Attempts after the first for a statement or transaction that met a writer (a
/// deadlock, a lock wait timeout), each after [`retry_pause`].
pub(super) const RETRIES: u64 = 5;

/// The pause before retry `attempt` (1, 2, …): a little longer each time.
pub(super) fn retry_pause(attempt: u64) -> Duration {
    Duration::from_millis(20 * attempt)
}

/// Whether a failed job gave up on deadlocks or lock waits (writers on the same rows).
fn is_contention(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<sqlx::Error>()
        .is_some_and(crate::store::is_retryable)
}

/// One value of a natural key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Text(String),
    Number(i64),
}

/// One pass over `key.table` in key order: every key held by more than one row, merged.
/// Rows a writer adds behind the pass are left to the next one.
pub async fn merge_pass(
    pool: &MySqlPool,
    key: &NaturalKey,
    pace: Pace,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Merged> {
    let mut total = Merged::default();
    let mut after: Option<Vec<Part>> = None;
    let mut together = true;
    loop {
        let keys = next_keys(pool, key, after.as_deref(), pace.batch).await?;
        let Some(last) = keys.last() else {
            return Ok(total);
        };
        after = Some(last.clone());
        // Nothing points at a message: its keys merge [`KEYS_PER_TRANSACTION`] at a
        // time. If writers keep deadlocking with those wider locks, the rest of the pass
        // goes key by key like the other tables.
        for chunk in keys.chunks(KEYS_PER_TRANSACTION) {
            if key.table == "message" && together {
                match with_retries(pool, Job::Unreferenced(key, chunk)).await {
                    Ok(merged) => {
                        total.add(merged);
                        continue;
                    }
                    Err(error) if is_contention(&error) => {
                        tracing::warn!(
                            error = crate::telemetry::error_line(&error),
                            "merging message keys together keeps meeting writers; key by key"
                        );
                        together = false;
                    }
                    Err(error) => return Err(error),
                }
            }
            for parts in chunk {
                total.add(with_retries(pool, Job::Key(key, parts)).await?);
            }
        }
        progress.set_message(format!(
            "{}: {} keys merged, {} rows removed",
            key.table, total.keys, total.removed
        ));
        tracing::debug!(
            table = key.table,
            keys = total.keys,
            removed = total.removed,
            "merging"
        );
        tokio::time::sleep(pace.pause).await;
    }
}

/// The next keys (in key order, after `after`) held by more than one row.
async fn next_keys(
    pool: &MySqlPool,
    key: &NaturalKey,
    after: Option<&[Part]>,
    limit: u32,
) -> anyhow::Result<Vec<Vec<Part>>> {
    let columns = key.columns.join(", ");
    let selected = selected_columns(key);
    // Rows with a NULL in the key are left alone: no unique key covers them.
    let mut query = QueryBuilder::<MySql>::new(format!(
        "SELECT {selected} FROM {}{} WHERE {} ",
        key.table,
        ignore_lookup_indexes(key.table),
        super::scan::key_is_null(key, false)
    ));
    if let Some(after) = after {
        // `(a, b, c) > (x, y, z)` spelled out: MariaDB uses no index for a row
        // comparison, and every batch would read the table from its start.
        query.push("AND (");
        for depth in 0..key.columns.len() {
            query.push(if depth == 0 { "(" } else { " OR (" });
            for (index, column) in key.columns[..=depth].iter().enumerate() {
                let operator = if index == depth { ">" } else { "=" };
                if index > 0 {
                    query.push(" AND ");
                }
                query.push(format!("{column} {operator} "));
                push_part(&mut query, &after[index]);
            }
            query.push(")");
        }
        query.push(") ");
    }
    query.push(format!(
        "GROUP BY {columns} HAVING COUNT(*) > 1 ORDER BY {columns} LIMIT "
    ));
    query.push_bind(limit);
    let rows = query
        .build()
        .fetch_all(pool)
        .await
        .with_context(|| format!("finding the duplicates of `{}`", key.table))?;
    Ok(rows
        .iter()
        .map(|row| parts_from(key, row, 0))
        .collect::<Result<_, _>>()?)
}

/// ` IGNORE INDEX (…)` of the worker's lookup indexes on `table` (there once
/// [`super::finish::name_indexes`] ran), or nothing. MariaDB 10.11 otherwise merged
/// `ix_session_agent` and `ix_session_customer` for the keyset condition (sort_union,
/// then a temporary table and a filesort): every batch read all the sessions after its
/// position, about 1 s a batch on 110,000 sessions, where the key's own index streams
/// in key order and stops at the `LIMIT` (slow log, BENCHMARKS.md "Issue 16").
fn ignore_lookup_indexes(table: &str) -> String {
    let names: Vec<&str> = crate::store::NAMED_INDEXES
        .iter()
        .filter(|(on, _, _)| *on == table)
        .map(|(_, name, _)| *name)
        .collect();
    match names.is_empty() {
        true => String::new(),
        false => format!(" IGNORE INDEX ({})", names.join(", ")),
    }
}

/// The key's columns for a `SELECT` (binary-collated ones come back as bytes unless cast).
fn selected_columns(key: &NaturalKey) -> String {
    key.columns
        .iter()
        .map(|column| match key.binary_columns.contains(column) {
            true => format!("CAST({column} AS CHAR)"),
            false => column.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The key's values from `row`, whose columns from `first` on are [`selected_columns`].
fn parts_from(key: &NaturalKey, row: &MySqlRow, first: usize) -> Result<Vec<Part>, sqlx::Error> {
    key.columns
        .iter()
        .enumerate()
        .map(|(index, column)| {
            Ok(match key.binary_columns.contains(column) {
                true => Part::Text(row.try_get(first + index)?),
                false => Part::Number(row.try_get(first + index)?),
            })
        })
        .collect()
}

fn push_part(query: &mut QueryBuilder<'_, MySql>, part: &Part) {
    match part {
        Part::Text(text) => query.push_bind(text.clone()),
        Part::Number(number) => query.push_bind(*number),
    };
}

/// `k1 = ? AND k2 = ? …` for the key's rows.
fn push_key_condition(query: &mut QueryBuilder<'_, MySql>, key: &NaturalKey, parts: &[Part]) {
    for (index, (column, part)) in key.columns.iter().zip(parts).enumerate() {
        if index > 0 {
            query.push(" AND ");
        }
        query.push(format!("{column} = "));
        push_part(query, part);
    }
}

/// One unit of merging, done in its own transaction.
#[derive(Debug, Clone, Copy)]
enum Job<'a> {
    /// The rows holding one natural key.
    Key(&'a NaturalKey, &'a [Part]),
    /// The rows holding any of these keys of a table no other table references.
    Unreferenced(&'a NaturalKey, &'a [Vec<Part>]),
    /// A session written under a merged customer's id after that customer was merged.
    LateSession(i64),
}

/// Runs `job` in a transaction, again after a deadlock or lock wait timeout (a writer
/// on the same rows), a few times.
async fn with_retries(pool: &MySqlPool, job: Job<'_>) -> anyhow::Result<Merged> {
    let mut attempt = 0;
    loop {
        let mut transaction = pool.begin().await?;
        let result = match job {
            Job::Key(key, parts) => merge_key(&mut transaction, key, parts).await,
            Job::Unreferenced(key, keys) => merge_unreferenced(&mut transaction, key, keys).await,
            Job::LateSession(id) => move_late_session(&mut transaction, id).await,
        };
        let result = match result {
            Ok(merged) => transaction.commit().await.map(|()| merged),
            Err(error) => Err(error),
        };
        match result {
            Ok(merged) => return Ok(merged),
            Err(error) if retryable(job, &error) && attempt < RETRIES => {
                attempt += 1;
                tokio::time::sleep(retry_pause(attempt)).await;
            }
            Err(error) => {
                return Err(error).with_context(|| match job {
                    Job::Key(key, _) | Job::Unreferenced(key, _) => {
                        format!("merging keys of `{}`", key.table)
                    }
                    Job::LateSession(id) => format!("moving session {id} to its customer"),
                })
            }
        }
    }
}

/// A deadlock or lock wait timeout; for a late session also a duplicate key: without a
/// gap lock (`READ COMMITTED`) a writer can create the survivor customer's session with
/// the same agent between the lookup and the move, and the next attempt merges it.
fn retryable(job: Job<'_>, error: &sqlx::Error) -> bool {
    crate::store::is_retryable(error)
        || (matches!(job, Job::LateSession(_))
            && crate::store::mysql_error_number(error) == Some(1062))
}

/// The columns merging reads from each table's rows.
fn merged_columns(table: &str) -> &'static str {
    match table {
        "customer" => {
            "id, nickname, nickname_at, CAST(nickname_message_id AS CHAR) AS nickname_message_id, \
             avatar, avatar_at, CAST(avatar_message_id AS CHAR) AS avatar_message_id"
        }
        "session" => "id, last_message_at, read_up_to, expired_up_to, unread_version",
        _ => "id",
    }
}

async fn merge_key(
    connection: &mut MySqlConnection,
    key: &NaturalKey,
    parts: &[Part],
) -> Result<Merged, sqlx::Error> {
    let mut select = QueryBuilder::<MySql>::new(format!(
        "SELECT {} FROM {} WHERE ",
        merged_columns(key.table),
        key.table
    ));
    push_key_condition(&mut select, key, parts);
    select.push(" ORDER BY id FOR UPDATE");
    let rows = select.build().fetch_all(&mut *connection).await?;
    merge_rows(connection, key.table, &rows).await
}

/// Merges the rows of each of `keys` into its lowest id, for a table whose rows nothing
/// references (so merging is deleting the others and mapping them): one locking read,
/// then one map insert, one map follow-up and one delete per [`IDS_PER_STATEMENT`]
/// losers, all in the caller's transaction.
async fn merge_unreferenced(
    connection: &mut MySqlConnection,
    key: &NaturalKey,
    keys: &[Vec<Part>],
) -> Result<Merged, sqlx::Error> {
    let mut select = QueryBuilder::<MySql>::new(format!(
        "SELECT id, {} FROM {} WHERE ",
        selected_columns(key),
        key.table
    ));
    for (index, parts) in keys.iter().enumerate() {
        select.push(if index == 0 { "(" } else { " OR (" });
        push_key_condition(&mut select, key, parts);
        select.push(")");
    }
    select.push(" ORDER BY id FOR UPDATE");
    let rows = select.build().fetch_all(&mut *connection).await?;
    // Rows come in id order, so each key's first id is its survivor.
    let mut survivors: std::collections::BTreeMap<Vec<Part>, i64> = Default::default();
    let mut pairs: Vec<(i64, i64)> = Vec::new();
    let mut merged_keys = std::collections::BTreeSet::new();
    for row in &rows {
        let id: i64 = row.try_get("id")?;
        // Grouped as the key compares: `utf8mb4_bin` pads, so `a` and `a ` are one key.
        let parts: Vec<Part> = parts_from(key, row, 1)?
            .into_iter()
            .map(|part| match part {
                Part::Text(text) => Part::Text(text.trim_end_matches(' ').to_string()),
                number => number,
            })
            .collect();
        match survivors.get(&parts) {
            Some(survivor) => {
                pairs.push((id, *survivor));
                merged_keys.insert(parts);
            }
            None => {
                survivors.insert(parts, id);
            }
        }
    }
    if pairs.is_empty() {
        return Ok(Merged::default());
    }
    let mut removed = 0;
    for pairs in pairs.chunks(IDS_PER_STATEMENT) {
        removed += map_and_delete(connection, key.table, pairs).await?;
    }
    Ok(Merged {
        keys: merged_keys.len() as u64,
        removed,
        repointed: 0,
    })
}

/// Merges `rows` (locked, in id order, sharing a natural key or about to) into the first: the
/// converging fields, the references to the others, the map (earlier losers of the
/// others follow to the survivor), and the others deleted.
async fn merge_rows(
    connection: &mut MySqlConnection,
    table: &'static str,
    rows: &[MySqlRow],
) -> Result<Merged, sqlx::Error> {
    if rows.len() < 2 {
        return Ok(Merged::default());
    }
    let survivor: i64 = rows[0].try_get("id")?;
    let losers: Vec<i64> = rows[1..]
        .iter()
        .map(|row| row.try_get("id"))
        .collect::<Result<_, _>>()?;
    let mut merged = Merged {
        keys: 1,
        removed: 0,
        repointed: 0,
    };
    match table {
        "customer" => keep_newest_profile(connection, survivor, rows).await?,
        "session" => keep_greatest_times(connection, survivor, rows).await?,
        _ => {}
    }
    // All in the caller's transaction, in statements of at most [`IDS_PER_STATEMENT`]
    // losers.
    for losers in losers.chunks(IDS_PER_STATEMENT) {
        merge_losers(connection, table, survivor, losers, &mut merged).await?;
    }
    Ok(merged)
}

/// [`merge_rows`]'s references, map and delete for some of the losers, counted into
/// `merged`.
async fn merge_losers(
    connection: &mut MySqlConnection,
    table: &'static str,
    survivor: i64,
    losers: &[i64],
    merged: &mut Merged,
) -> Result<(), sqlx::Error> {
    match table {
        "customer" => {
            merged.repointed +=
                repoint(connection, "session", "customer_id", survivor, losers).await?;
            merged.repointed +=
                repoint(connection, "message", "customer_id", survivor, losers).await?;
        }
        "session" => {
            merged.repointed +=
                repoint(connection, "message", "session_id", survivor, losers).await?;
        }
        _ => {}
    }
    let pairs: Vec<(i64, i64)> = losers.iter().map(|loser| (*loser, survivor)).collect();
    merged.removed += map_and_delete(connection, table, &pairs).await?;
    Ok(())
}

/// Records each (loser, survivor) of `pairs` in the map, makes map rows whose survivor
/// is one of these losers follow to its survivor (a survivor of an earlier merge can
/// lose now, to a late row with a lower id: whoever follows the map lands on a row that
/// exists), and deletes the losers; returns the rows deleted. Survivors are never
/// losers in the same transaction.
async fn map_and_delete(
    connection: &mut MySqlConnection,
    table: &'static str,
    pairs: &[(i64, i64)],
) -> Result<u64, sqlx::Error> {
    let mut map = QueryBuilder::<MySql>::new(format!(
        "INSERT IGNORE INTO {MAP_TABLE} (table_name, loser_id, survivor_id) "
    ));
    map.push_values(pairs, |mut row, (loser, survivor)| {
        row.push_bind(table).push_bind(*loser).push_bind(*survivor);
    });
    map.build().execute(&mut *connection).await?;
    let losers: Vec<i64> = pairs.iter().map(|(loser, _)| *loser).collect();
    let mut follow = QueryBuilder::<MySql>::new(format!(
        "UPDATE {MAP_TABLE} a JOIN {MAP_TABLE} b ON b.table_name = a.table_name \
         AND b.loser_id = a.survivor_id SET a.survivor_id = b.survivor_id WHERE a.table_name = "
    ));
    follow.push_bind(table);
    follow.push(" AND a.survivor_id IN (");
    push_ids(&mut follow, &losers);
    follow.build().execute(&mut *connection).await?;
    let mut delete = QueryBuilder::<MySql>::new(format!("DELETE FROM {table} WHERE id IN ("));
    push_ids(&mut delete, &losers);
    Ok(delete
        .build()
        .execute(&mut *connection)
        .await?
        .rows_affected())
}

/// Moves session `id`, written under a merged customer's id, to the survivor customer;
/// if that customer already has a session with the same agent, the two are merged
/// (lowest id survives), so the move never collides with the unique key.
async fn move_late_session(
    connection: &mut MySqlConnection,
    id: i64,
) -> Result<Merged, sqlx::Error> {
    // A NULL key column (a team's nullable column) matches no other session: moved alone.
    type Late = (i64, Option<String>, Option<String>, Option<String>);
    let late: Option<Late> = sqlx::query_as(&format!(
        "SELECT m.survivor_id, CAST(s.tenant_id AS CHAR), CAST(s.platform AS CHAR), \
         CAST(s.agent_id AS CHAR) FROM session s JOIN {MAP_TABLE} m \
         ON m.table_name = 'customer' AND m.loser_id = s.customer_id WHERE s.id = ? FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *connection)
    .await?;
    let Some((customer, tenant_id, platform, agent_id)) = late else {
        // Moved (or gone) since it was found.
        return Ok(Merged::default());
    };
    let columns = merged_columns("session");
    let mut rows = sqlx::query(&format!(
        "SELECT {columns} FROM session WHERE tenant_id = ? AND platform = ? \
         AND customer_id = ? AND agent_id = ? FOR UPDATE"
    ))
    .bind(&tenant_id)
    .bind(&platform)
    .bind(customer)
    .bind(&agent_id)
    .fetch_all(&mut *connection)
    .await?;
    rows.extend(
        sqlx::query(&format!(
            "SELECT {columns} FROM session WHERE id = ? FOR UPDATE"
        ))
        .bind(id)
        .fetch_all(&mut *connection)
        .await?,
    );
    let mut by_id = rows
        .into_iter()
        .map(|row| Ok((row.try_get::<i64, _>("id")?, row)))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    by_id.sort_by_key(|(id, _)| *id);
    let rows: Vec<MySqlRow> = by_id.into_iter().map(|(_, row)| row).collect();
    let merged = merge_rows(connection, "session", &rows).await?;
    let kept: i64 = rows[0].try_get("id")?;
    sqlx::query("UPDATE session SET customer_id = ? WHERE id = ?")
        .bind(customer)
        .bind(kept)
        .execute(&mut *connection)
        .await?;
    // Its messages carry the merged customer's id too: moved with it, so the session and
    // its messages never disagree on the customer.
    let messages = sqlx::query(&format!(
        "UPDATE message t JOIN {MAP_TABLE} m ON m.table_name = 'customer' \
         AND m.loser_id = t.customer_id SET t.customer_id = m.survivor_id WHERE t.session_id = ?"
    ))
    .bind(kept)
    .execute(connection)
    .await?
    .rows_affected();
    Ok(Merged {
        keys: merged.keys,
        removed: merged.removed,
        repointed: 1 + messages,
    })
}

/// `?, ?, …)` for `ids`, closing the list the caller opened.
pub(super) fn push_ids(query: &mut QueryBuilder<'_, MySql>, ids: &[i64]) {
    let mut list = query.separated(", ");
    for id in ids {
        list.push_bind(*id);
    }
    query.push(")");
}

/// Points `table.column` at `survivor` where it points at a loser.
async fn repoint(
    connection: &mut MySqlConnection,
    table: &str,
    column: &str,
    survivor: i64,
    losers: &[i64],
) -> Result<u64, sqlx::Error> {
    let mut update = QueryBuilder::<MySql>::new(format!("UPDATE {table} SET {column} = "));
    update.push_bind(survivor);
    update.push(format!(" WHERE {column} IN ("));
    push_ids(&mut update, losers);
    Ok(update.build().execute(connection).await?.rows_affected())
}

/// A profile field with its newest-wins marker.
type Field = (Option<String>, Option<i64>, Option<String>);

/// The newest value of a profile field among the rows (by its time, then message id;
/// a value without a marker loses to any with one).
fn newest(rows: &[MySqlRow], value: &str, at: &str, message: &str) -> Result<Field, sqlx::Error> {
    let mut best: Option<Field> = None;
    for row in rows {
        let field: Field = (row.try_get(value)?, row.try_get(at)?, row.try_get(message)?);
        if field.0.is_none() {
            continue;
        }
        let newer = match &best {
            None => true,
            Some(kept) => (field.1, &field.2) > (kept.1, &kept.2),
        };
        if newer {
            best = Some(field);
        }
    }
    Ok(best.unwrap_or((None, None, None)))
}

async fn keep_newest_profile(
    connection: &mut MySqlConnection,
    survivor: i64,
    rows: &[MySqlRow],
) -> Result<(), sqlx::Error> {
    let nickname = newest(rows, "nickname", "nickname_at", "nickname_message_id")?;
    let avatar = newest(rows, "avatar", "avatar_at", "avatar_message_id")?;
    sqlx::query(
        "UPDATE customer SET nickname = ?, nickname_at = ?, nickname_message_id = ?, \
         avatar = ?, avatar_at = ?, avatar_message_id = ? WHERE id = ?",
    )
    .bind(nickname.0)
    .bind(nickname.1)
    .bind(nickname.2)
    .bind(avatar.0)
    .bind(avatar.1)
    .bind(avatar.2)
    .bind(survivor)
    .execute(connection)
    .await?;
    Ok(())
}

async fn keep_greatest_times(
    connection: &mut MySqlConnection,
    survivor: i64,
    rows: &[MySqlRow],
) -> Result<(), sqlx::Error> {
    let greatest = |column: &str| -> Result<Option<i64>, sqlx::Error> {
        let mut values = Vec::new();
        for row in rows {
            values.push(row.try_get::<Option<i64>, _>(column)?);
        }
        Ok(values.into_iter().flatten().max())
    };
    let mut version = 0;
    for row in rows {
        version = version.max(row.try_get::<u64, _>("unread_version")?);
    }
    // Above every merged row's version: a Redis copy that holds any of them yields to the
    // survivor's state (copies keep the higher version).
    sqlx::query(
        "UPDATE session SET last_message_at = ?, read_up_to = ?, expired_up_to = ?, \
         unread_version = ? WHERE id = ?",
    )
    .bind(greatest("last_message_at")?)
    .bind(greatest("read_up_to")?)
    .bind(greatest("expired_up_to")?)
    .bind(version + 1)
    .bind(survivor)
    .execute(connection)
    .await?;
    Ok(())
}

/// Rows a writer inserted pointing at a loser after it was merged (possible only without
/// foreign keys), moved to the survivor through the map in batches: sessions one by one
/// (merged where the survivor customer has one with the same agent already), then the
/// messages. Returns what was done.
pub async fn repoint_stragglers(pool: &MySqlPool, pace: Pace) -> anyhow::Result<Merged> {
    let mut done = Merged::default();
    loop {
        let late: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT s.id FROM {MAP_TABLE} m JOIN session s ON s.customer_id = m.loser_id \
             WHERE m.table_name = 'customer' LIMIT ?"
        ))
        .bind(pace.batch)
        .fetch_all(pool)
        .await
        .context("finding sessions of merged customers")?;
        if late.is_empty() {
            break;
        }
        for id in late {
            done.add(with_retries(pool, Job::LateSession(id)).await?);
        }
        tokio::time::sleep(pace.pause).await;
    }
    for (column, merged_table) in [("customer_id", "customer"), ("session_id", "session")] {
        loop {
            let late: Vec<i64> = sqlx::query_scalar(&format!(
                "SELECT t.id FROM {MAP_TABLE} m JOIN message t ON t.{column} = m.loser_id \
                 WHERE m.table_name = '{merged_table}' LIMIT ?"
            ))
            .bind(pace.batch)
            .fetch_all(pool)
            .await
            .with_context(|| format!("finding messages whose `{column}` was merged"))?;
            if late.is_empty() {
                break;
            }
            let mut update = QueryBuilder::<MySql>::new(format!(
                "UPDATE message t JOIN {MAP_TABLE} m ON m.table_name = '{merged_table}' \
                 AND m.loser_id = t.{column} SET t.{column} = m.survivor_id WHERE t.id IN ("
            ));
            push_ids(&mut update, &late);
            done.repointed += update
                .build()
                .execute(pool)
                .await
                .with_context(|| format!("repointing `message`.`{column}` from merged rows"))?
                .rows_affected();
            tokio::time::sleep(pace.pause).await;
        }
    }
    Ok(done)
}
