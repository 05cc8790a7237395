//! The ideal consumer: the database write limit every bench ratio is taken against.
//! It writes the same rows of all three tables into the same schema as the worker, but
//! batched — one multi-row statement per table per batch, rows sorted by key — with no
//! lock and no per-record checks.
//!
//! Guarantee: the rows are those the worker would write (customer and session got or
//! created by natural key, `last_message_at` moving forward, messages `INSERT IGNORE`),
//! so its correctness is checked like the worker's; it is a limit, not a product — it
//! does not resolve newest-wins profiles across batches.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sqlx::{MySql, MySqlConnection, MySqlPool, QueryBuilder};

use crate::message::{decode, ChatMessage, Inbound};
use crate::pipeline::Record;
use crate::store::is_retryable;

/// Tries per batch when the server reports a deadlock or a lock-wait timeout.
const MAX_ATTEMPTS: u32 = 5;

/// Writes the messages of `records` (others are skipped: the bench sends none).
pub async fn write_batch(
    pool: &MySqlPool,
    records: &[Record],
    max_bytes: usize,
) -> anyhow::Result<()> {
    let mut messages: BTreeMap<(String, String, String), (ChatMessage, &Record)> = BTreeMap::new();
    for record in records {
        if let Ok(Inbound::Message(m)) = decode(record.value.as_deref(), max_bytes) {
            let key = (
                m.tenant_id.clone(),
                m.platform.clone(),
                m.message_id.clone(),
            );
            messages.entry(key).or_insert((m, record));
        }
    }
    if messages.is_empty() {
        return Ok(());
    }
    let messages: Vec<&(ChatMessage, &Record)> = messages.values().collect();
    let mut attempt = 1;
    loop {
        let mut connection = pool.acquire().await?;
        match write(&mut connection, &messages).await {
            Err(error) if is_retryable(&error) && attempt < MAX_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
                attempt += 1;
            }
            result => return Ok(result?),
        }
    }
}

type Scope = (String, String);

async fn write(
    connection: &mut MySqlConnection,
    messages: &[&(ChatMessage, &Record)],
) -> Result<(), sqlx::Error> {
    // Customers: one row per user, the newest message's profile; sorted by key.
    let mut customers: BTreeMap<(Scope, String), &ChatMessage> = BTreeMap::new();
    for (m, _) in messages {
        let slot = customers
            .entry((
                (m.tenant_id.clone(), m.platform.clone()),
                m.from_user_id.clone(),
            ))
            .or_insert(m);
        if (m.sent_at, &m.message_id) > (slot.sent_at, &slot.message_id) {
            *slot = m;
        }
    }
    let mut insert = QueryBuilder::<MySql>::new(
        "INSERT IGNORE INTO customer (tenant_id, platform, external_user_id, nickname, avatar, \
         profile_at, profile_message_id) ",
    );
    insert.push_values(customers.values(), |mut row, m| {
        let profile = m.profile.as_ref();
        row.push_bind(&m.tenant_id)
            .push_bind(&m.platform)
            .push_bind(&m.from_user_id)
            .push_bind(profile.and_then(|p| p.nickname.as_deref()))
            .push_bind(profile.and_then(|p| p.avatar.as_deref()))
            .push_bind(m.sent_at)
            .push_bind(&m.message_id);
    });
    insert.build().execute(&mut *connection).await?;
    let customer_ids = select_customer_ids(connection, customers.keys()).await?;

    // Sessions: one row per (customer, agent), the latest message time; sorted by key.
    let mut sessions: BTreeMap<(Scope, i64, String), i64> = BTreeMap::new();
    for (m, _) in messages {
        let scope = (m.tenant_id.clone(), m.platform.clone());
        let customer = customer_ids[&(scope.clone(), m.from_user_id.clone())];
        let latest = sessions
            .entry((scope, customer, m.to_user_id.clone()))
            .or_insert(m.sent_at);
        *latest = (*latest).max(m.sent_at);
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
    insert.push(
        " ON DUPLICATE KEY UPDATE last_message_at = \
         GREATEST(COALESCE(last_message_at, VALUES(last_message_at)), VALUES(last_message_at))",
    );
    insert.build().execute(&mut *connection).await?;
    let session_ids = select_session_ids(connection, sessions.keys()).await?;

    // Messages, sorted by key (the caller's map is ordered).
    let mut insert = QueryBuilder::<MySql>::new(
        "INSERT IGNORE INTO message (tenant_id, platform, external_message_id, session_id, \
         customer_id, message_type, content, sent_at, source_topic, source_partition, \
         source_offset) ",
    );
    insert.push_values(messages, |mut row, (m, record)| {
        let scope = (m.tenant_id.clone(), m.platform.clone());
        let customer = customer_ids[&(scope.clone(), m.from_user_id.clone())];
        let session = session_ids[&(scope, customer, m.to_user_id.clone())];
        row.push_bind(&m.tenant_id)
            .push_bind(&m.platform)
            .push_bind(&m.message_id)
            .push_bind(session)
            .push_bind(customer)
            .push_bind(&m.message_type)
            .push_bind(&m.content)
            .push_bind(m.sent_at)
            .push_bind(&record.topic)
            .push_bind(record.partition)
            .push_bind(record.offset);
    });
    insert.build().execute(&mut *connection).await?;
    Ok(())
}

/// Ids of the customers by natural key, one `SELECT … IN (…)` per tenant and platform.
async fn select_customer_ids<'a>(
    connection: &mut MySqlConnection,
    keys: impl Iterator<Item = &'a (Scope, String)>,
) -> Result<HashMap<(Scope, String), i64>, sqlx::Error> {
    let mut by_scope: BTreeMap<&Scope, Vec<&str>> = BTreeMap::new();
    for (scope, user) in keys {
        by_scope.entry(scope).or_default().push(user);
    }
    let mut ids = HashMap::new();
    for (scope, users) in by_scope {
        let mut select = QueryBuilder::<MySql>::new(
            "SELECT id, CAST(external_user_id AS CHAR) FROM customer WHERE tenant_id = ",
        );
        select
            .push_bind(&scope.0)
            .push(" AND platform = ")
            .push_bind(&scope.1);
        select.push(" AND external_user_id IN (");
        let mut list = select.separated(", ");
        for user in users {
            list.push_bind(user);
        }
        select.push(")");
        let rows: Vec<(i64, String)> = select.build_query_as().fetch_all(&mut *connection).await?;
        for (id, user) in rows {
            ids.insert((scope.clone(), user), id);
        }
    }
    Ok(ids)
}

/// Ids of the sessions by natural key, one `SELECT … IN (…)` per tenant and platform.
async fn select_session_ids<'a>(
    connection: &mut MySqlConnection,
    keys: impl Iterator<Item = &'a (Scope, i64, String)>,
) -> Result<HashMap<(Scope, i64, String), i64>, sqlx::Error> {
    let mut by_scope: BTreeMap<&Scope, Vec<i64>> = BTreeMap::new();
    for (scope, customer, _) in keys {
        by_scope.entry(scope).or_default().push(*customer);
    }
    let mut ids = HashMap::new();
    for (scope, customers) in by_scope {
        let mut select = QueryBuilder::<MySql>::new(
            "SELECT id, customer_id, CAST(agent_id AS CHAR) FROM session WHERE tenant_id = ",
        );
        select
            .push_bind(&scope.0)
            .push(" AND platform = ")
            .push_bind(&scope.1);
        select.push(" AND customer_id IN (");
        let mut list = select.separated(", ");
        for customer in customers {
            list.push_bind(customer);
        }
        select.push(")");
        let rows: Vec<(i64, i64, String)> =
            select.build_query_as().fetch_all(&mut *connection).await?;
        for (id, customer, agent) in rows {
            ids.insert((scope.clone(), customer, agent), id);
        }
    }
    Ok(ids)
}
