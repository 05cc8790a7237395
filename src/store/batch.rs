//! The idempotent write of many chat messages and read receipts in one transaction:
//! the write stage of a batch (DESIGN.md, "Defence in depth", layer 2, in bulk).
//!
//! Guarantee: one customer per natural key with each profile field from its newest
//! carrier, one session per (customer, agent), one message row per message id, and
//! each touched session's unread state (see `unread`) brought up to date — in one
//! transaction of a fixed number of statements, whatever the batch holds, with the
//! same result as writing the records one by one in any order. Customers and sessions
//! are multi-row upserts and messages one multi-row `INSERT` of the ids not stored yet
//! (never `INSERT IGNORE`, which would skip or cut a row the database refuses without
//! an error), rows sorted by natural key so that concurrent batches take row locks in
//! the same order. Which messages are new is told by natural key: a read of the batch's
//! message ids before the insert; the first copy of a message id that was not there is
//! `Stored`, every other copy `Duplicate`. The read takes no locks (a locking read would
//! lock the gaps where the absent ids go, and concurrent batches inserting into those
//! gaps would deadlock); instead, when another writer inserted one of them in between,
//! the insert fails on the duplicate key and the batch is reported as raced, to be
//! rolled back and run again.
//!
//! Unread counts are exact because the transaction's first statement upserts every
//! customer of the batch, which locks each customer's row until commit, and every
//! writer of a customer's sessions does the same: nothing is read before those locks
//! are held, so the sessions' state and their messages, as this transaction reads them,
//! are everything committed by the customers' writers, and nobody else's changes can
//! arrive until it commits (tested in `unread_store`). Each session is got-or-created
//! and locked, read, and changed once at the end, after the messages are in.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::{MySql, MySqlConnection, QueryBuilder};

use super::profile;
use super::unread::{self, Arrivals, Plan, SessionState};
use super::write::{is_duplicate_key, Provenance, WriteOutcome};
use crate::message::{ChatMessage, ReadReceipt};

/// Tenant and platform: the scope of every natural key.
pub(crate) type Scope = (String, String);

/// A session's natural key: scope, customer id, agent.
type SessionKey = (Scope, i64, String);

/// One record to write: a message and the record it came from, or a read receipt.
#[derive(Debug, Clone, Copy)]
pub enum BatchItem<'a> {
    Message(&'a ChatMessage, &'a Provenance),
    Receipt(&'a ReadReceipt),
}

impl<'a> BatchItem<'a> {
    fn scope(&self) -> Scope {
        let (tenant, platform, _) = self.customer();
        (tenant.to_string(), platform.to_string())
    }

    /// The customer's natural key.
    fn customer(&self) -> profile::CustomerKey<'a> {
        match self {
            BatchItem::Message(m, _) => (&m.tenant_id, &m.platform, &m.from_user_id),
            BatchItem::Receipt(r) => (&r.tenant_id, &r.platform, &r.from_user_id),
        }
    }

    fn agent(&self) -> &'a str {
        match self {
            BatchItem::Message(m, _) => &m.to_user_id,
            BatchItem::Receipt(r) => &r.to_user_id,
        }
    }

    fn message(&self) -> Option<&'a ChatMessage> {
        match self {
            BatchItem::Message(m, _) => Some(m),
            BatchItem::Receipt(_) => None,
        }
    }
}

/// One conversation's unread count after a committed batch, to copy to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationUnread {
    pub tenant_id: String,
    pub platform: String,
    pub agent_id: String,
    /// The customer's external id (`from_user_id`).
    pub customer: String,
    pub unread: u32,
    /// Increases with every change of the session's unread state.
    pub version: u64,
    pub last_message_at: Option<i64>,
}

/// What a committed batch did: one outcome per item, in order, and the unread state of
/// every conversation it touched (changed or not: a redelivered copy carries the state
/// again, so a copy lost after a commit is sent once more).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchWritten {
    pub outcomes: Vec<WriteOutcome>,
    pub unread: Vec<ConversationUnread>,
}

/// How unread counts are kept (`unread.*` settings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnreadRules {
    /// A conversation silent for longer than this (ms, event time) counts 0 until its
    /// next message, which counts from 1.
    pub expire_after_ms: Option<i64>,
}

/// Writes `items` in one transaction on `connection` (the caller commits or retries);
/// returns one outcome per item, in order, with the touched conversations' unread
/// state, or `None` when another writer inserted one of the messages between the read
/// and the insert: the caller must roll back and run the batch again (the read then
/// finds it).
pub async fn try_write_batch(
    connection: &mut MySqlConnection,
    items: &[BatchItem<'_>],
    rules: UnreadRules,
) -> Result<Option<BatchWritten>, sqlx::Error> {
    if items.is_empty() {
        return Ok(Some(BatchWritten::default()));
    }
    let customer_ids = upsert_customers(connection, items).await?;
    let sessions = upsert_sessions(connection, items, &customer_ids, SessionUpsert::Lock).await?;
    let messages: Vec<(usize, &ChatMessage, &Provenance)> = items
        .iter()
        .enumerate()
        .filter_map(|(index, item)| match item {
            BatchItem::Message(m, p) => Some((index, *m, *p)),
            BatchItem::Receipt(_) => None,
        })
        .collect();
    let distinct: HashSet<(Scope, &str)> = messages
        .iter()
        .map(|(_, m, _)| (scope(m), m.message_id.as_str()))
        .collect();
    // One message id: the insert's own row count tells new from stored, no read needed.
    let existing = if distinct.len() <= 1 {
        HashSet::new()
    } else {
        existing_message_ids(connection, &messages).await?
    };

    // The first copy of each message id that is not stored yet is inserted; the rows
    // are sorted by natural key.
    let mut new: BTreeMap<(Scope, &str), usize> = BTreeMap::new();
    let mut outcomes = vec![WriteOutcome::ReadApplied; items.len()];
    for (index, message, _) in &messages {
        let stored = existing.contains(&(scope(message), message.message_id.clone()));
        let key = (scope(message), message.message_id.as_str());
        let is_new = !stored && !new.contains_key(&key);
        if is_new {
            new.insert(key, *index);
        }
        outcomes[*index] = if is_new {
            WriteOutcome::Stored
        } else {
            WriteOutcome::Duplicate
        };
    }
    if !new.is_empty() {
        let rows: Vec<(&ChatMessage, &Provenance)> = new
            .values()
            .map(|index| match items[*index] {
                BatchItem::Message(m, p) => (m, p),
                BatchItem::Receipt(_) => unreachable!("only messages are inserted"),
            })
            .collect();
        let ids = |m: &ChatMessage| session_of(m, &customer_ids, &sessions);
        match insert_messages(connection, Insert::Strict, &rows, ids).await {
            Ok(_) => {}
            // One id, not read before: it was stored already (only the statement failed).
            Err(error) if is_duplicate_key(&error) && distinct.len() == 1 => {
                for (index, _, _) in &messages {
                    outcomes[*index] = WriteOutcome::Duplicate;
                }
            }
            // Another writer inserted one of the ids found absent, in between: which ones
            // is unknown, so the outcomes cannot be told.
            Err(error) if is_duplicate_key(&error) => return Ok(None),
            Err(error) => return Err(error),
        }
    }
    let unread = update_unread(
        connection,
        items,
        &outcomes,
        &customer_ids,
        &sessions,
        rules,
    )
    .await?;
    Ok(Some(BatchWritten { outcomes, unread }))
}

/// A session's id and the state it had when the batch locked it.
type LockedSessions = HashMap<SessionKey, (i64, SessionState)>;

/// The (customer id, session id) a message is written under.
fn session_of(
    message: &ChatMessage,
    customer_ids: &HashMap<(Scope, String), i64>,
    sessions: &LockedSessions,
) -> (i64, i64) {
    let customer = customer_ids[&(scope(message), message.from_user_id.clone())];
    let (session, _) = sessions[&(scope(message), customer, message.to_user_id.clone())];
    (customer, session)
}

/// Brings each touched session's unread state up to date (see `unread`): one update of
/// the changed sessions, after one count of the messages of those whose watermark
/// moved. Returns every touched conversation's state.
async fn update_unread(
    connection: &mut MySqlConnection,
    items: &[BatchItem<'_>],
    outcomes: &[WriteOutcome],
    customer_ids: &HashMap<(Scope, String), i64>,
    sessions: &LockedSessions,
    rules: UnreadRules,
) -> Result<Vec<ConversationUnread>, sqlx::Error> {
    let mut arrivals: BTreeMap<&SessionKey, (Arrivals, &str)> = BTreeMap::new();
    for (item, outcome) in items.iter().zip(outcomes) {
        let (_, _, user) = item.customer();
        let scope = item.scope();
        let customer = customer_ids[&(scope.clone(), user.to_string())];
        let (key, _) = sessions
            .get_key_value(&(scope, customer, item.agent().to_string()))
            .expect("every item's session was upserted");
        let (session, _) = arrivals.entry(key).or_insert((Arrivals::default(), user));
        match item {
            BatchItem::Message(m, _) => {
                session.message(m.sent_at, *outcome == WriteOutcome::Stored)
            }
            BatchItem::Receipt(r) => session.receipt(r.read_up_to),
        }
    }
    // Each changed session's next state; those planned for a recount (or a new expiry
    // watermark first) are completed from their rows below.
    let mut next: BTreeMap<i64, SessionState> = BTreeMap::new();
    let mut recount: Vec<i64> = Vec::new();
    let mut rederive: Vec<i64> = Vec::new();
    let mut touched = Vec::with_capacity(arrivals.len());
    for (key, (arrival, customer)) in &arrivals {
        let (id, old) = sessions[*key];
        let (state, count_again, derive_again) =
            match unread::plan(&old, arrival, rules.expire_after_ms) {
                Plan::Keep => (None, false, false),
                Plan::Set(state) => (Some(state), false, false),
                Plan::Recount(state) => (Some(state), true, false),
                Plan::Rederive(state) => (Some(state), true, true),
            };
        if let Some(state) = state {
            next.insert(id, state);
        }
        if count_again {
            recount.push(id);
        }
        if derive_again {
            rederive.push(id);
        }
        touched.push((id, *key, *customer, old));
    }
    if let Some(limit) = rules.expire_after_ms.filter(|_| !rederive.is_empty()) {
        let derived = derive_expiry(connection, &rederive, limit).await?;
        for id in &rederive {
            next.get_mut(id).expect("planned").expired_up_to = derived.get(id).copied();
        }
    }
    let watermarks: BTreeMap<i64, i64> = recount
        .iter()
        .map(|id| (*id, next[id].watermark().unwrap_or(i64::MIN)))
        .collect();
    for (id, count) in count_unread(connection, &watermarks).await? {
        next.get_mut(&id).expect("planned").unread = count;
    }
    let keys: HashMap<i64, &SessionKey> =
        touched.iter().map(|(id, key, _, _)| (*id, *key)).collect();
    set_unread(connection, &next, &keys).await?;
    Ok(touched
        .into_iter()
        .map(|(id, ((tenant, platform), _, agent), customer, state)| {
            let state = next.get(&id).copied().unwrap_or(state);
            ConversationUnread {
                tenant_id: tenant.clone(),
                platform: platform.clone(),
                agent_id: agent.clone(),
                customer: customer.to_string(),
                unread: state.unread,
                version: state.version,
                last_message_at: state.last_message_at,
            }
        })
        .collect())
}

/// The number of messages of each session sent after its watermark (`session id →
/// watermark`), in one statement; it sees every message of the session (see the
/// module guarantee).
async fn count_unread(
    connection: &mut MySqlConnection,
    watermarks: &BTreeMap<i64, i64>,
) -> Result<Vec<(i64, u32)>, sqlx::Error> {
    if watermarks.is_empty() {
        return Ok(Vec::new());
    }
    let mut query = QueryBuilder::<MySql>::new(
        "SELECT session_id, CAST(COUNT(*) AS UNSIGNED) FROM message FORCE INDEX (ix_message_session_sent) WHERE ",
    );
    let mut conditions = query.separated(" OR ");
    for (session, watermark) in watermarks {
        conditions
            .push("(session_id = ")
            .push_bind_unseparated(*session)
            .push_unseparated(" AND sent_at > ")
            .push_bind_unseparated(*watermark)
            .push_unseparated(")");
    }
    query.push(" GROUP BY session_id");
    let counts: Vec<(i64, u64)> = query.build_query_as().fetch_all(connection).await?;
    let mut counts: HashMap<i64, u32> = counts
        .into_iter()
        .map(|(id, count)| (id, u32::try_from(count).unwrap_or(u32::MAX)))
        .collect();
    Ok(watermarks
        .keys()
        .map(|id| (*id, counts.remove(id).unwrap_or(0)))
        .collect())
}

/// `expired_up_to` of each session of `ids` that has one: just before its newest message
/// sent more than `expire_after` ms after the message before it (see `unread`), in one
/// statement.
pub(crate) async fn derive_expiry(
    connection: &mut MySqlConnection,
    ids: &[i64],
    expire_after: i64,
) -> Result<HashMap<i64, i64>, sqlx::Error> {
    let mut query = QueryBuilder::<MySql>::new(
        "SELECT session_id, MAX(sent_at) - 1 FROM (SELECT session_id, sent_at, \
         LAG(sent_at) OVER (PARTITION BY session_id ORDER BY sent_at) AS previous \
         FROM message FORCE INDEX (ix_message_session_sent) WHERE session_id IN (",
    );
    let mut list = query.separated(", ");
    for id in ids {
        list.push_bind(*id);
    }
    query
        .push(")) AS spans WHERE sent_at - previous > ")
        .push_bind(expire_after)
        .push(" GROUP BY session_id");
    let rows: Vec<(i64, i64)> = query.build_query_as().fetch_all(connection).await?;
    Ok(rows.into_iter().collect())
}

/// Stores the new unread state of the sessions in `next` (their natural keys in
/// `keys`), in one statement: a multi-row upsert by primary key, so each row is found
/// by its id alone (a multi-row `UPDATE … WHERE id IN (…)` was planned as a scan of the
/// primary index once the list was long, locking rows of other batches: deadlocks).
/// Every row exists and is locked by this transaction, so each is an update.
async fn set_unread(
    connection: &mut MySqlConnection,
    next: &BTreeMap<i64, SessionState>,
    keys: &HashMap<i64, &SessionKey>,
) -> Result<(), sqlx::Error> {
    if next.is_empty() {
        return Ok(());
    }
    let mut upsert = QueryBuilder::<MySql>::new(
        "INSERT INTO session (id, tenant_id, platform, customer_id, agent_id, read_up_to, \
         expired_up_to, last_message_at, unread_count, unread_version) ",
    );
    upsert.push_values(next, |mut row, (id, state)| {
        let ((tenant, platform), customer, agent) = keys[id];
        row.push_bind(*id)
            .push_bind(tenant)
            .push_bind(platform)
            .push_bind(*customer)
            .push_bind(agent)
            .push_bind(state.read_up_to)
            .push_bind(state.expired_up_to)
            .push_bind(state.last_message_at)
            .push_bind(state.unread)
            .push_bind(state.version);
    });
    upsert.push(
        " ON DUPLICATE KEY UPDATE read_up_to = VALUES(read_up_to), \
         expired_up_to = VALUES(expired_up_to), last_message_at = VALUES(last_message_at), \
         unread_count = VALUES(unread_count), unread_version = VALUES(unread_version)",
    );
    upsert.build().execute(connection).await?;
    Ok(())
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

/// The same rows as [`try_write_batch`] without telling new messages from stored ones
/// and without unread counts: no read, every copy offered to `INSERT IGNORE`. The
/// bench's ideal consumer, in autocommit: the database's write limit on these rows.
pub(crate) async fn write_unchecked(
    connection: &mut MySqlConnection,
    messages: &[(&ChatMessage, &Provenance)],
) -> Result<(), sqlx::Error> {
    if messages.is_empty() {
        return Ok(());
    }
    let items: Vec<BatchItem<'_>> = messages
        .iter()
        .map(|(m, p)| BatchItem::Message(m, p))
        .collect();
    let customer_ids = upsert_customers(connection, &items).await?;
    let sessions = upsert_sessions(
        connection,
        &items,
        &customer_ids,
        SessionUpsert::LatestMessage,
    )
    .await?;
    let ids = |m: &ChatMessage| session_of(m, &customer_ids, &sessions);
    insert_messages(connection, Insert::IgnoreDuplicates, messages, ids).await?;
    Ok(())
}

/// One multi-row insert of `rows` (in the order given), each under the (customer,
/// session) ids `ids` gives it; returns the number of rows inserted.
async fn insert_messages(
    connection: &mut MySqlConnection,
    mode: Insert,
    rows: &[(&ChatMessage, &Provenance)],
    ids: impl Fn(&ChatMessage) -> (i64, i64),
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
        let (customer, session) = ids(message);
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
/// message that carries it (the upsert's newest-wins rule decides against the stored
/// one); returns their ids by natural key.
async fn upsert_customers(
    connection: &mut MySqlConnection,
    items: &[BatchItem<'_>],
) -> Result<HashMap<(Scope, String), i64>, sqlx::Error> {
    let mut customers: BTreeMap<(Scope, String), profile::CustomerRow<'_>> = BTreeMap::new();
    for item in items {
        let key = item.customer();
        let (_, nickname, avatar) = customers
            .entry((item.scope(), key.2.to_string()))
            .or_insert((key, None, None));
        if let Some(message) = item.message() {
            *nickname = profile::newest(*nickname, profile::nickname(message));
            *avatar = profile::newest(*avatar, profile::avatar(message));
        }
    }
    let mut insert = profile::customer_upsert(customers.values().copied());
    // With one row, its id comes back with the statement, saving the select-back.
    if customers.len() == 1 {
        insert.push(", id = LAST_INSERT_ID(id)");
        let id = insert
            .build()
            .execute(&mut *connection)
            .await?
            .last_insert_id() as i64;
        let key = customers.into_keys().next().expect("one customer");
        return Ok(HashMap::from([(key, id)]));
    }
    insert.build().execute(&mut *connection).await?;
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

/// What the session upsert does to an existing session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionUpsert {
    /// Nothing but lock it (`id = id` still takes the row lock): the unread update
    /// changes it after the messages are in, from the state read under this lock.
    Lock,
    /// `last_message_at` moves forward (the bench's ideal consumer, which keeps no
    /// unread counts).
    LatestMessage,
}

/// Get-or-create every session of the batch, locking each; returns their ids with the
/// state they had (a new session's is empty).
async fn upsert_sessions(
    connection: &mut MySqlConnection,
    items: &[BatchItem<'_>],
    customer_ids: &HashMap<(Scope, String), i64>,
    mode: SessionUpsert,
) -> Result<LockedSessions, sqlx::Error> {
    let mut sessions: BTreeMap<SessionKey, Option<i64>> = BTreeMap::new();
    for item in items {
        let scope = item.scope();
        let customer = customer_ids[&(scope.clone(), item.customer().2.to_string())];
        let latest = sessions
            .entry((scope, customer, item.agent().to_string()))
            .or_default();
        if let (SessionUpsert::LatestMessage, Some(message)) = (mode, item.message()) {
            *latest = Some(latest.map_or(message.sent_at, |t| t.max(message.sent_at)));
        }
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
    insert.push(match mode {
        SessionUpsert::Lock => " ON DUPLICATE KEY UPDATE id = id",
        SessionUpsert::LatestMessage => {
            " ON DUPLICATE KEY UPDATE last_message_at = \
             GREATEST(COALESCE(last_message_at, VALUES(last_message_at)), VALUES(last_message_at))"
        }
    });
    insert.build().execute(&mut *connection).await?;
    locked_sessions(connection, sessions.keys()).await
}

/// Sessions by natural key with their unread state: one `SELECT … IN (…)` of their
/// customers' sessions per tenant and platform.
async fn locked_sessions<'k>(
    connection: &mut MySqlConnection,
    keys: impl Iterator<Item = &'k SessionKey>,
) -> Result<LockedSessions, sqlx::Error> {
    let wanted: HashSet<&SessionKey> = keys.collect();
    let customers: BTreeMap<(&Scope, i64), ()> =
        wanted.iter().map(|(s, c, _)| ((s, *c), ())).collect();
    let mut by_scope: BTreeMap<&Scope, Vec<i64>> = BTreeMap::new();
    for (scope, customer) in customers.into_keys() {
        by_scope.entry(scope).or_default().push(customer);
    }
    type Row = (
        i64,
        i64,
        String,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        u32,
        u64,
    );
    let mut sessions = HashMap::new();
    for (scope, customers) in by_scope {
        let rows: Vec<Row> = select_in_scope(
            connection,
            "SELECT id, customer_id, CAST(agent_id AS CHAR), read_up_to, expired_up_to, \
             last_message_at, unread_count, unread_version \
             FROM session FORCE INDEX (uk_session_natural)",
            scope,
            "customer_id",
            customers,
        )
        .await?;
        for (id, customer, agent, read_up_to, expired_up_to, last_message_at, unread, version) in
            rows
        {
            let key = (scope.clone(), customer, agent);
            if wanted.contains(&key) {
                let state = SessionState {
                    read_up_to,
                    expired_up_to,
                    last_message_at,
                    unread,
                    version,
                };
                sessions.insert(key, (id, state));
            }
        }
    }
    Ok(sessions)
}

/// The batch's message ids that are already stored (a plain read: see the module
/// guarantee for why it takes no locks).
async fn existing_message_ids(
    connection: &mut MySqlConnection,
    messages: &[(usize, &ChatMessage, &Provenance)],
) -> Result<HashSet<(Scope, String)>, sqlx::Error> {
    let keys: BTreeMap<(Scope, &str), ()> = messages
        .iter()
        .map(|(_, m, _)| ((scope(m), m.message_id.as_str()), ()))
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
