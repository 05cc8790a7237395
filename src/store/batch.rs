//! The idempotent write of many chat messages in one transaction: the write stage of a
//! batch (DESIGN.md, "Defence in depth", layer 2, in bulk).
//!
//! Guarantee: the same rows and the same convergence as [`super::write_message`]
//! applied to each message in turn — one customer per natural key with each profile
//! field from its newest carrier, one session per (customer, agent) with the latest
//! `last_message_at`, one message row per message id — in one transaction of a fixed
//! number of statements, whatever the batch holds. Customers and sessions are multi-row
//! upserts and messages one multi-row `INSERT` of the ids not stored yet (never
//! `INSERT IGNORE`, which would skip or cut a row the database refuses without an
//! error), rows sorted by natural key so that concurrent batches take row locks in the
//! same order. Which messages are new is told by natural key: a read of the batch's
//! message ids before the insert; the first copy of a message id that was not there is
//! `Stored`, every other copy `Duplicate`. The read takes no locks (a locking read would
//! lock the gaps where the absent ids go, and concurrent batches inserting into those
//! gaps would deadlock); instead, when another writer inserted one of them in between,
//! the insert fails on the duplicate key and the batch is reported as raced, to be
//! rolled back and run again. The common small batch costs no more round trips than a
//! single write: one customer or one session returns its id with its upsert, and one
//! message id is inserted without a read (a duplicate key then means it was stored).

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::{MySql, MySqlConnection, QueryBuilder};

use super::profile;
use super::write::{is_duplicate_key, Provenance, WriteOutcome};
use crate::message::ChatMessage;

/// Tenant and platform: the scope of every natural key.
pub(crate) type Scope = (String, String);

/// One message to write and the record it came from.
pub type BatchItem<'a> = (&'a ChatMessage, &'a Provenance);

/// Writes `items` in one transaction on `connection` (the caller commits or retries);
/// returns one outcome per item, in order, or `None` when another writer inserted one
/// of the messages between the read and the insert: the caller must roll back and run
/// the batch again (the read then finds it).
pub async fn try_write_batch(
    connection: &mut MySqlConnection,
    items: &[BatchItem<'_>],
) -> Result<Option<Vec<WriteOutcome>>, sqlx::Error> {
    if items.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let customer_ids = upsert_customers(connection, items).await?;
    let session_ids = upsert_sessions(connection, items, &customer_ids).await?;
    let distinct: HashSet<(Scope, &str)> = items
        .iter()
        .map(|(m, _)| (scope(m), m.message_id.as_str()))
        .collect();
    // One message id: the insert's own row count tells new from stored, no read needed.
    let existing = if distinct.len() == 1 {
        HashSet::new()
    } else {
        existing_message_ids(connection, items).await?
    };

    // The first copy of each message id that is not stored yet is inserted; the rows
    // are sorted by natural key.
    let mut new: BTreeMap<(Scope, &str), usize> = BTreeMap::new();
    let mut outcomes = Vec::with_capacity(items.len());
    for (index, (message, _)) in items.iter().enumerate() {
        let stored = existing.contains(&(scope(message), message.message_id.clone()));
        let key = (scope(message), message.message_id.as_str());
        let is_new = !stored && !new.contains_key(&key);
        if is_new {
            new.insert(key, index);
        }
        outcomes.push(if is_new {
            WriteOutcome::Stored
        } else {
            WriteOutcome::Duplicate
        });
    }
    if new.is_empty() {
        return Ok(Some(outcomes));
    }
    let rows: Vec<BatchItem<'_>> = new.values().map(|index| items[*index]).collect();
    match insert_messages(
        connection,
        Insert::Strict,
        &rows,
        &customer_ids,
        &session_ids,
    )
    .await
    {
        Ok(_) => Ok(Some(outcomes)),
        // One id, not read before: it was stored already (only the statement failed).
        Err(error) if is_duplicate_key(&error) && distinct.len() == 1 => {
            outcomes.fill(WriteOutcome::Duplicate);
            Ok(Some(outcomes))
        }
        // Another writer inserted one of the ids found absent, in between: which ones is
        // unknown, so the outcomes cannot be told.
        Err(error) if is_duplicate_key(&error) => Ok(None),
        Err(error) => Err(error),
    }
}

/// How the message insert meets rows that cannot go in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Insert {
    /// A duplicate key, or any row the database refuses (a CHECK, a foreign key, data
    /// too long, a trigger), fails the statement: nothing is skipped or cut silently.
    Strict,
    /// `INSERT IGNORE`: duplicates (and refused rows) are skipped. Only for the bench's
    /// ideal consumer, which offers every copy.
    IgnoreDuplicates,
}

/// The same rows as [`try_write_batch`] without telling new messages from stored ones:
/// no locking read, every copy offered to `INSERT IGNORE`. The bench's ideal consumer,
/// in autocommit: the database's write limit on these rows.
pub(crate) async fn write_unchecked(
    connection: &mut MySqlConnection,
    items: &[BatchItem<'_>],
) -> Result<(), sqlx::Error> {
    if items.is_empty() {
        return Ok(());
    }
    let customer_ids = upsert_customers(connection, items).await?;
    let session_ids = upsert_sessions(connection, items, &customer_ids).await?;
    insert_messages(
        connection,
        Insert::IgnoreDuplicates,
        items,
        &customer_ids,
        &session_ids,
    )
    .await?;
    Ok(())
}

/// One multi-row insert of `rows` (in the order given); returns the number of rows
/// inserted.
async fn insert_messages(
    connection: &mut MySqlConnection,
    mode: Insert,
    rows: &[BatchItem<'_>],
    customer_ids: &HashMap<(Scope, String), i64>,
    session_ids: &HashMap<(Scope, i64, String), i64>,
) -> Result<u64, sqlx::Error> {
    let verb = match mode {
        Insert::Strict => "INSERT",
        Insert::IgnoreDuplicates => "INSERT IGNORE",
    };
    let mut insert = QueryBuilder::<MySql>::new(format!(
        "{verb} INTO message (tenant_id, platform, external_message_id, session_id, \
         customer_id, message_type, content, sent_at, source_topic, source_partition, \
         source_offset) "
    ));
    insert.push_values(rows, |mut row, (message, provenance)| {
        let customer = customer_ids[&(scope(message), message.from_user_id.clone())];
        let session = session_ids[&(scope(message), customer, message.to_user_id.clone())];
        row.push_bind(&message.tenant_id)
            .push_bind(&message.platform)
            .push_bind(&message.message_id)
            .push_bind(session)
            .push_bind(customer)
            .push_bind(&message.message_type)
            .push_bind(&message.content)
            .push_bind(message.sent_at)
            .push_bind(&provenance.topic)
            .push_bind(provenance.partition)
            .push_bind(provenance.offset);
    });
    Ok(insert.build().execute(connection).await?.rows_affected())
}

fn scope(message: &ChatMessage) -> Scope {
    (message.tenant_id.clone(), message.platform.clone())
}

/// Get-or-create every customer of the batch, each profile field from its newest
/// message that carries it (the upsert's newest-wins rule, as in `write`, decides
/// against the stored one); returns their ids by natural key.
async fn upsert_customers(
    connection: &mut MySqlConnection,
    items: &[BatchItem<'_>],
) -> Result<HashMap<(Scope, String), i64>, sqlx::Error> {
    let mut customers: BTreeMap<(Scope, String), profile::CustomerRow<'_>> = BTreeMap::new();
    for (message, _) in items {
        let (_, nickname, avatar) = customers
            .entry((scope(message), message.from_user_id.clone()))
            .or_insert((message, None, None));
        *nickname = profile::newest(*nickname, profile::nickname(message));
        *avatar = profile::newest(*avatar, profile::avatar(message));
    }
    let insert = profile::customer_upsert(customers.values().copied());
    if let Some(id) = upsert(connection, insert, customers.len()).await? {
        let key = customers.into_keys().next().expect("one customer");
        return Ok(HashMap::from([(key, id)]));
    }

    customer_ids(connection, customers.keys()).await
}

/// Ids of customers by natural key: one `SELECT … IN (…)` per tenant and platform.
pub(crate) async fn customer_ids<'k>(
    connection: &mut MySqlConnection,
    keys: impl Iterator<Item = &'k (Scope, String)>,
) -> Result<HashMap<(Scope, String), i64>, sqlx::Error> {
    let mut ids = HashMap::new();
    for (scope, users) in by_scope(keys.map(|(s, u)| (s, u.as_str()))) {
        let rows: Vec<(i64, String)> = select_in_scope(
            connection,
            "SELECT id, CAST(external_user_id AS CHAR) FROM customer FORCE INDEX (uk_customer_natural)",
            scope,
            "external_user_id",
            users,
        )
        .await?;
        for (id, user) in rows {
            ids.insert((scope.clone(), user), id);
        }
    }
    Ok(ids)
}

/// Runs a multi-row upsert (ending in its `ON DUPLICATE KEY UPDATE` list) of `rows`
/// rows. With one row, its id comes back with the statement (`LAST_INSERT_ID(id)`),
/// saving the select-back: returned as `Some`.
async fn upsert(
    connection: &mut MySqlConnection,
    mut insert: QueryBuilder<'_, MySql>,
    rows: usize,
) -> Result<Option<i64>, sqlx::Error> {
    if rows == 1 {
        insert.push(", id = LAST_INSERT_ID(id)");
    }
    let result = insert.build().execute(connection).await?;
    Ok((rows == 1).then(|| result.last_insert_id() as i64))
}

/// Get-or-create every session of the batch with its latest message time; returns their
/// ids by natural key.
async fn upsert_sessions(
    connection: &mut MySqlConnection,
    items: &[BatchItem<'_>],
    customer_ids: &HashMap<(Scope, String), i64>,
) -> Result<HashMap<(Scope, i64, String), i64>, sqlx::Error> {
    let mut sessions: BTreeMap<(Scope, i64, String), i64> = BTreeMap::new();
    for (message, _) in items {
        let customer = customer_ids[&(scope(message), message.from_user_id.clone())];
        let latest = sessions
            .entry((scope(message), customer, message.to_user_id.clone()))
            .or_insert(message.sent_at);
        *latest = (*latest).max(message.sent_at);
    }
    let mut insert = QueryBuilder::<MySql>::new(
        "INSERT INTO session (tenant_id, platform, customer_id, agent_id, last_message_at) ",
    );
    insert.push_values(
        sessions.iter(),
        |mut row, ((scope, customer, agent), at)| {
            row.push_bind(&scope.0)
                .push_bind(&scope.1)
                .push_bind(*customer)
                .push_bind(agent)
                .push_bind(*at);
        },
    );
    insert.push(super::write::SESSION_ON_DUPLICATE);
    if let Some(id) = upsert(connection, insert, sessions.len()).await? {
        let key = sessions.into_keys().next().expect("one session");
        return Ok(HashMap::from([(key, id)]));
    }

    session_ids(connection, sessions.keys()).await
}

/// Ids of sessions by natural key: one `SELECT … IN (…)` of their customers' sessions
/// per tenant and platform.
pub(crate) async fn session_ids<'k>(
    connection: &mut MySqlConnection,
    keys: impl Iterator<Item = &'k (Scope, i64, String)>,
) -> Result<HashMap<(Scope, i64, String), i64>, sqlx::Error> {
    let customers: BTreeMap<(&Scope, i64), ()> = keys.map(|(s, c, _)| ((s, *c), ())).collect();
    let mut by_scope: BTreeMap<&Scope, Vec<i64>> = BTreeMap::new();
    for (scope, customer) in customers.into_keys() {
        by_scope.entry(scope).or_default().push(customer);
    }
    let mut ids = HashMap::new();
    for (scope, customers) in by_scope {
        let rows: Vec<(i64, i64, String)> = select_in_scope(
            connection,
            "SELECT id, customer_id, CAST(agent_id AS CHAR) FROM session FORCE INDEX (uk_session_natural)",
            scope,
            "customer_id",
            customers,
        )
        .await?;
        for (id, customer, agent) in rows {
            ids.insert((scope.clone(), customer, agent), id);
        }
    }
    Ok(ids)
}

/// The batch's message ids that are already stored (a plain read: see the module
/// guarantee for why it takes no locks).
async fn existing_message_ids(
    connection: &mut MySqlConnection,
    items: &[BatchItem<'_>],
) -> Result<HashSet<(Scope, String)>, sqlx::Error> {
    let keys: BTreeMap<(Scope, &str), ()> = items
        .iter()
        .map(|(m, _)| ((scope(m), m.message_id.as_str()), ()))
        .collect();
    let mut existing = HashSet::new();
    for (scope, ids) in by_scope(keys.keys().map(|(s, id)| (s, *id))) {
        let rows: Vec<(String,)> = select_in_scope(
            connection,
            "SELECT CAST(external_message_id AS CHAR) FROM message FORCE INDEX (uk_message_natural)",
            scope,
            "external_message_id",
            ids,
        )
        .await?;
        existing.extend(rows.into_iter().map(|(id,)| (scope.clone(), id)));
    }
    Ok(existing)
}

/// `<select> WHERE tenant_id = ? AND platform = ? AND <column> IN (<values>)`. Each
/// select names its natural unique key (`FORCE INDEX`): left to itself, MariaDB picked
/// the (tenant, platform, agent) index for the session lookup — every session of the
/// agent read per batch — and a full scan for customers whenever its statistics were
/// stale (seen in the slow log under load; 80% of the database's CPU went there).
async fn select_in_scope<'v, V, R>(
    connection: &mut MySqlConnection,
    select: &str,
    scope: &'v Scope,
    column: &str,
    values: Vec<V>,
) -> Result<Vec<R>, sqlx::Error>
where
    V: 'v + sqlx::Encode<'v, MySql> + sqlx::Type<MySql> + Send,
    R: for<'r> sqlx::FromRow<'r, sqlx::mysql::MySqlRow> + Send + Unpin,
{
    let mut query = QueryBuilder::<MySql>::new(select);
    query
        .push(" WHERE tenant_id = ")
        .push_bind(&scope.0)
        .push(" AND platform = ")
        .push_bind(&scope.1)
        .push(format!(" AND {column} IN ("));
    let mut list = query.separated(", ");
    for value in values {
        list.push_bind(value);
    }
    query.push(")");
    query.build_query_as().fetch_all(connection).await
}

/// Keys grouped by scope, scopes in order.
fn by_scope<'a>(
    keys: impl Iterator<Item = (&'a Scope, &'a str)>,
) -> BTreeMap<&'a Scope, Vec<&'a str>> {
    let mut grouped: BTreeMap<&Scope, Vec<&str>> = BTreeMap::new();
    for (scope, key) in keys {
        grouped.entry(scope).or_default().push(key);
    }
    grouped
}
