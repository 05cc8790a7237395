//! Checking a topic's records against the database, a chunk at a time.
//!
//! Guarantee: every valid message of the topic is looked up (one query per chunk and
//! tenant/platform) and must be stored with the record's content, type and sent time,
//! under the record's customer, in the session of that customer and the record's agent;
//! a record that is not stored counts as dead-lettered (with the dead letter's reason)
//! when the dead-letter topic holds it, as a mismatch otherwise. At the end, what the
//! whole topic implies is checked: each customer's nickname and avatar are their
//! newest carrier's, each session's `last_message_at` and `read_up_to` are at least the
//! newest message's and receipt's, every unread count equals a recount of its rows, each
//! row's provenance names a record that carries it, and no natural key is stored
//! twice. Memory: per customer and per session of the topic, not per record.

use std::collections::{BTreeMap, HashMap};

use sqlx::{MySql, MySqlPool, QueryBuilder};

use crate::message::{decode, ChatMessage, Inbound};
use crate::pipeline::Record;

/// The dead letters of the verified topic: (partition, offset) → (error class, reason).
pub type DeadLetters = HashMap<(i32, i64), (String, String)>;

/// One thing the database does not match.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    /// The record that shows it, when one does.
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub what: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.partition, self.offset) {
            (Some(p), Some(o)) => write!(f, "partition {p} offset {o}: {}", self.what),
            _ => write!(f, "{}", self.what),
        }
    }
}

/// What a verification found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Records checked (selected by the range and filters).
    pub records: u64,
    /// Records outside the range or filtered out.
    pub skipped: u64,
    pub messages: u64,
    pub read_receipts: u64,
    /// Records not stored because they were dead-lettered, by error class.
    pub dead_lettered: BTreeMap<String, u64>,
    pub mismatch_count: u64,
    /// The first mismatches (up to the limit given).
    pub mismatches: Vec<Mismatch>,
}

type CustomerKey = (String, String, String);

/// Per customer and profile field, the newest message carrying it: its (time, message
/// id) marker, the value, and where the record is.
type Carrier = ((i64, String), String, At);

/// A profile field, each newest-wins on its own (in the order of the customer query).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Field {
    Nickname = 0,
    Avatar = 1,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Nickname => "nickname",
            Field::Avatar => "avatar",
        }
    }
}
type SessionKey = (String, String, String, String);

/// Where a record is, for reports.
#[derive(Debug, Clone, Copy)]
struct At {
    partition: i32,
    offset: i64,
}

/// The verification under way.
pub struct Verifier {
    pool: MySqlPool,
    max_bytes: usize,
    dead_letters: DeadLetters,
    keep: usize,
    newest_profile: HashMap<(CustomerKey, Field), Carrier>,
    /// The topic being verified, and how many stored messages name one of its records
    /// that carries them as their source (see [`Verifier::check_provenance`]).
    topic: String,
    provenance_confirmed: u64,
    latest_message: HashMap<SessionKey, (i64, At)>,
    newest_receipt: HashMap<SessionKey, (i64, At)>,
    pub report: Report,
}

impl Verifier {
    pub fn new(
        pool: MySqlPool,
        topic: &str,
        max_bytes: usize,
        dead_letters: DeadLetters,
        keep: usize,
    ) -> Self {
        Self {
            pool,
            max_bytes,
            dead_letters,
            keep,
            newest_profile: HashMap::new(),
            topic: topic.to_string(),
            provenance_confirmed: 0,
            latest_message: HashMap::new(),
            newest_receipt: HashMap::new(),
            report: Report::default(),
        }
    }

    fn mismatch(&mut self, at: Option<At>, what: String) {
        self.report.mismatch_count += 1;
        if self.report.mismatches.len() < self.keep {
            self.report.mismatches.push(Mismatch {
                partition: at.map(|a| a.partition),
                offset: at.map(|a| a.offset),
                what,
            });
        }
    }

    /// A record that is not stored: dead-lettered, or a mismatch saying `what`.
    fn not_stored(&mut self, at: At, what: String) {
        match self.dead_letters.get(&(at.partition, at.offset)) {
            Some((fqcn, _)) => *self.report.dead_lettered.entry(fqcn.clone()).or_default() += 1,
            None => self.mismatch(Some(at), what),
        }
    }

    /// Checks one chunk of the topic's records.
    pub async fn check(&mut self, records: &[Record]) -> anyhow::Result<()> {
        let mut messages: Vec<(ChatMessage, At)> = Vec::new();
        for record in records {
            self.report.records += 1;
            let at = At {
                partition: record.partition,
                offset: record.offset,
            };
            match decode(record.value.as_deref(), self.max_bytes) {
                Err(invalid) => self.not_stored(
                    at,
                    format!("invalid record ({invalid}) is not in the dead-letter topic"),
                ),
                Ok(Inbound::Read(r)) => {
                    self.report.read_receipts += 1;
                    let key = (r.tenant_id, r.platform, r.from_user_id, r.to_user_id);
                    let newest = self.newest_receipt.entry(key).or_insert((r.read_up_to, at));
                    if r.read_up_to > newest.0 {
                        *newest = (r.read_up_to, at);
                    }
                }
                Ok(Inbound::Message(m)) => {
                    self.report.messages += 1;
                    self.expect_convergence(&m, at);
                    messages.push((m, at));
                }
            }
        }
        self.check_messages(&messages).await
    }

    fn expect_convergence(&mut self, m: &ChatMessage, at: At) {
        let session = (
            m.tenant_id.clone(),
            m.platform.clone(),
            m.from_user_id.clone(),
            m.to_user_id.clone(),
        );
        let latest = self
            .latest_message
            .entry(session)
            .or_insert((m.sent_at, at));
        if m.sent_at > latest.0 {
            *latest = (m.sent_at, at);
        }
        let customer = (
            m.tenant_id.clone(),
            m.platform.clone(),
            m.from_user_id.clone(),
        );
        let profile = m.profile.as_ref();
        for (field, value) in [
            (Field::Nickname, profile.and_then(|p| p.nickname.clone())),
            (Field::Avatar, profile.and_then(|p| p.avatar.clone())),
        ] {
            let Some(value) = value else {
                continue;
            };
            let marker = (m.sent_at, m.message_id.clone());
            let key = (customer.clone(), field);
            match self.newest_profile.get(&key) {
                Some((newest, _, _)) if *newest >= marker => {}
                _ => {
                    self.newest_profile.insert(key, (marker, value, at));
                }
            }
        }
    }

    async fn check_messages(&mut self, messages: &[(ChatMessage, At)]) -> anyhow::Result<()> {
        let mut by_scope: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
        for (m, _) in messages {
            by_scope
                .entry((&m.tenant_id, &m.platform))
                .or_default()
                .push(&m.message_id);
        }
        let mut stored: HashMap<(String, String, String), Vec<StoredMessage>> = HashMap::new();
        for ((tenant, platform), ids) in by_scope {
            let mut query = QueryBuilder::<MySql>::new(
                // STRAIGHT_JOIN: message rows first, by their natural key. Left to
                // itself, MariaDB started from customer and scanned the messages of
                // each (a 500-id lookup took minutes on 500,000 messages).
                "SELECT STRAIGHT_JOIN CAST(m.external_message_id AS CHAR), m.content, m.message_type, m.sent_at, \
                 CAST(c.external_user_id AS CHAR), CAST(s.agent_id AS CHAR), \
                 s.customer_id = m.customer_id, CAST(m.source_topic AS CHAR), \
                 m.source_partition, m.source_offset \
                 FROM message m FORCE INDEX (uk_message_natural) \
                 JOIN customer c ON c.id = m.customer_id JOIN session s ON s.id = m.session_id \
                 WHERE m.tenant_id = ",
            );
            query
                .push_bind(tenant)
                .push(" AND m.platform = ")
                .push_bind(platform)
                .push(" AND m.external_message_id IN (");
            let mut list = query.separated(", ");
            for id in ids {
                list.push_bind(id);
            }
            query.push(")");
            let rows: Vec<StoredMessage> = query.build_query_as().fetch_all(&self.pool).await?;
            for row in rows {
                stored
                    .entry((tenant.to_string(), platform.to_string(), row.0.clone()))
                    .or_default()
                    .push(row);
            }
        }
        for (m, at) in messages {
            let key = (
                m.tenant_id.clone(),
                m.platform.clone(),
                m.message_id.clone(),
            );
            match stored.get(&key).map(Vec::as_slice) {
                None | Some([]) => {
                    self.not_stored(*at, format!("message {} is not stored", m.message_id))
                }
                Some([row]) => {
                    let (_, _, _, _, _, _, _, topic, partition, offset) = row;
                    if (topic, *partition, *offset) == (&self.topic, at.partition, at.offset) {
                        self.provenance_confirmed += 1;
                    }
                    if let Some(what) = differences(m, row) {
                        self.mismatch(Some(*at), format!("message {}: {what}", m.message_id));
                    }
                }
                Some(rows) => self.mismatch(
                    Some(*at),
                    format!("message {} is stored {} times", m.message_id, rows.len()),
                ),
            }
        }
        Ok(())
    }

    /// The checks of what the records read imply; see the module guarantee. Nicknames
    /// and the database-wide checks only when `whole`: the whole topic was checked.
    pub async fn finish(&mut self, whole: bool) -> anyhow::Result<()> {
        self.check_sessions().await?;
        if whole {
            self.check_profiles().await?;
            self.check_provenance().await?;
            self.check_database_wide().await?;
        }
        Ok(())
    }

    /// Every stored message whose provenance names this topic names a record of it that
    /// carries the message: each such record, when read, confirmed its row (a record
    /// carries one message, so it confirms at most one), so the confirmations must
    /// number the rows.
    async fn check_provenance(&mut self) -> anyhow::Result<()> {
        let named: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM message WHERE source_topic = ?")
            .bind(&self.topic)
            .fetch_one(&self.pool)
            .await?;
        let unconfirmed = named - self.provenance_confirmed as i64;
        if unconfirmed != 0 {
            self.mismatch(
                None,
                format!(
                    "{unconfirmed} stored messages name as their source a record of {} that does not carry them",
                    self.topic
                ),
            );
        }
        Ok(())
    }

    /// Each profile field is the newest carrier's (by time, then message id).
    async fn check_profiles(&mut self) -> anyhow::Result<()> {
        let expected: Vec<((CustomerKey, Field), String, At)> = self
            .newest_profile
            .drain()
            .map(|(key, (_, value, at))| (key, value, at))
            .collect();
        for chunk in expected.chunks(500) {
            let mut query = QueryBuilder::<MySql>::new(
                "SELECT CAST(tenant_id AS CHAR), CAST(platform AS CHAR), \
                 CAST(external_user_id AS CHAR), nickname, avatar FROM customer \
                 WHERE (tenant_id, platform, external_user_id) IN (",
            );
            push_tuples(
                &mut query,
                chunk.iter().map(|(((t, p, u), _), _, _)| vec![t, p, u]),
            );
            type Row = (String, String, String, Option<String>, Option<String>);
            let rows: Vec<Row> = query.build_query_as().fetch_all(&self.pool).await?;
            let stored: HashMap<CustomerKey, [Option<String>; 2]> = rows
                .into_iter()
                .map(|(t, p, u, nickname, avatar)| ((t, p, u), [nickname, avatar]))
                .collect();
            for ((customer, field), value, at) in chunk {
                let found = stored
                    .get(customer)
                    .and_then(|fields| fields[*field as usize].clone());
                if found.as_ref() != Some(value) {
                    self.mismatch(
                        Some(*at),
                        format!(
                            "customer {}: {} is {found:?}, the newest message carrying one says {value:?}",
                            customer.2,
                            field.name()
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    async fn check_sessions(&mut self) -> anyhow::Result<()> {
        /// A session's newest message time and newest receipt, with their records.
        type Newest = (Option<(i64, At)>, Option<(i64, At)>);
        let mut expected: HashMap<SessionKey, Newest> = HashMap::new();
        for (key, latest) in self.latest_message.drain() {
            expected.entry(key).or_default().0 = Some(latest);
        }
        for (key, receipt) in self.newest_receipt.drain() {
            expected.entry(key).or_default().1 = Some(receipt);
        }
        let expected: Vec<_> = expected.into_iter().collect();
        for chunk in expected.chunks(500) {
            let mut query = QueryBuilder::<MySql>::new(
                "SELECT CAST(s.tenant_id AS CHAR), CAST(s.platform AS CHAR), \
                 CAST(c.external_user_id AS CHAR), CAST(s.agent_id AS CHAR), s.last_message_at, \
                 s.read_up_to FROM session s JOIN customer c ON c.id = s.customer_id \
                 WHERE (s.tenant_id, s.platform, c.external_user_id, s.agent_id) IN (",
            );
            push_tuples(
                &mut query,
                chunk.iter().map(|((t, p, u, a), _)| vec![t, p, u, a]),
            );
            type Row = (String, String, String, String, Option<i64>, Option<i64>);
            let rows: Vec<Row> = query.build_query_as().fetch_all(&self.pool).await?;
            let stored: HashMap<SessionKey, (Option<i64>, Option<i64>)> = rows
                .into_iter()
                .map(|(t, p, u, a, last, read)| ((t, p, u, a), (last, read)))
                .collect();
            for (key, (latest, receipt)) in chunk {
                let Some((last, read)) = stored.get(key) else {
                    let at = latest.or(*receipt).map(|(_, at)| at);
                    self.mismatch(
                        at,
                        format!(
                            "the session of customer {} and agent {} is not stored",
                            key.2, key.3
                        ),
                    );
                    continue;
                };
                if let Some((at_ms, at)) = latest {
                    if last.is_none_or(|last| last < *at_ms) {
                        self.mismatch(
                            Some(*at),
                            format!(
                                "session {}/{}: last_message_at {last:?} is before {at_ms}",
                                key.2, key.3
                            ),
                        );
                    }
                }
                if let Some((up_to, at)) = receipt {
                    if read.is_none_or(|read| read < *up_to) {
                        self.mismatch(
                            Some(*at),
                            format!("session {}/{}: read_up_to {read:?} is before the receipt's {up_to}", key.2, key.3),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    async fn check_database_wide(&mut self) -> anyhow::Result<()> {
        for (table, key) in [
            ("customer", "tenant_id, platform, external_user_id"),
            ("session", "tenant_id, platform, customer_id, agent_id"),
            ("message", "tenant_id, platform, external_message_id"),
        ] {
            let twice: i64 = sqlx::query_scalar(&format!(
                "SELECT COUNT(*) FROM (SELECT 1 FROM {table} GROUP BY {key} HAVING COUNT(*) > 1) AS d"
            ))
            .fetch_one(&self.pool)
            .await?;
            if twice > 0 {
                self.mismatch(
                    None,
                    format!("{twice} {table} natural keys are stored more than once"),
                );
            }
        }
        let off: Vec<(i64, u32, i64)> = sqlx::query_as(
            "SELECT s.id, s.unread_count, (SELECT COUNT(*) FROM message m WHERE m.session_id = s.id \
             AND m.sent_at > GREATEST(COALESCE(s.read_up_to, -9223372036854775808), \
             COALESCE(s.expired_up_to, -9223372036854775808))) AS recounted FROM session s \
             HAVING s.unread_count <> recounted",
        )
        .fetch_all(&self.pool)
        .await?;
        for (id, stored, recounted) in off {
            self.mismatch(
                None,
                format!("session {id}: unread_count {stored}, its rows say {recounted}"),
            );
        }
        Ok(())
    }
}

/// A stored message: id, content, type, sent time, customer, agent, and whether its
/// session belongs to its customer.
/// Ends an `… IN (` with the rows' values as row constructors, `(?, ?), (?, ?))`.
fn push_tuples<'q>(
    query: &mut QueryBuilder<'q, MySql>,
    rows: impl Iterator<Item = Vec<&'q String>>,
) {
    let mut list = query.separated(", ");
    for row in rows {
        list.push("(");
        for (position, value) in row.into_iter().enumerate() {
            if position > 0 {
                list.push_unseparated(", ");
            }
            list.push_bind_unseparated(value);
        }
        list.push_unseparated(")");
    }
    query.push(")");
}

/// ...and its provenance (topic, partition, offset).
type StoredMessage = (
    String,
    String,
    String,
    i64,
    String,
    String,
    bool,
    String,
    i32,
    i64,
);

/// How a stored message differs from its record, if it does.
fn differences(m: &ChatMessage, row: &StoredMessage) -> Option<String> {
    let (_, content, message_type, sent_at, customer, agent, session_is_customers, ..) = row;
    let mut found = Vec::new();
    if *content != m.content {
        found.push("content differs".to_string());
    }
    if *message_type != m.message_type {
        found.push(format!(
            "type is {message_type:?}, the record says {:?}",
            m.message_type
        ));
    }
    if *sent_at != m.sent_at {
        found.push(format!(
            "sent_at is {sent_at}, the record says {}",
            m.sent_at
        ));
    }
    if *customer != m.from_user_id {
        found.push(format!(
            "stored under customer {customer}, the record says {}",
            m.from_user_id
        ));
    }
    if *agent != m.to_user_id || !session_is_customers {
        found.push(format!(
            "in a session of agent {agent}{}, the record says customer {} and agent {}",
            if *session_is_customers {
                ""
            } else {
                " of another customer"
            },
            m.from_user_id,
            m.to_user_id
        ));
    }
    (!found.is_empty()).then(|| found.join("; "))
}
