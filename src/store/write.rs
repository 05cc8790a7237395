//! The idempotent write of one chat message (DESIGN.md, "Defence in depth", layer 2).
//!
//! Guarantee: in one transaction, the customer and the session are got-or-created by
//! their natural keys (`INSERT … ON DUPLICATE KEY UPDATE id = LAST_INSERT_ID(id)`) and the
//! message is inserted with `INSERT IGNORE`; the unique indexes make any number of
//! concurrent or repeated writes of the same message leave exactly one row of each,
//! with or without the Redis lock. Mutable fields converge whatever the order of
//! application: the profile is newest-wins by (timestamp, message id) and
//! `last_message_at` only moves forward (`GREATEST`). Deadlocks and lock-wait timeouts
//! are retried in place.

use std::future::Future;
use std::time::Duration;

use sqlx::{MySql, MySqlPool, Transaction};

use crate::message::ChatMessage;

/// Where the record that carried a message came from (stored on the message row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// What writing one message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// A new message row.
    Stored,
    /// The message was already stored: nothing changed but convergent fields.
    Duplicate,
}

/// How often a transaction that hit a deadlock or lock-wait timeout is tried in all.
pub(super) const MAX_TRANSACTION_ATTEMPTS: u32 = 5;

/// Writes one message idempotently, retrying deadlocks (1213) and lock-wait timeouts
/// (1205) with a short growing pause.
pub async fn write_message(
    pool: &MySqlPool,
    message: &ChatMessage,
    provenance: &Provenance,
) -> Result<WriteOutcome, sqlx::Error> {
    with_retries(|| try_write_message(pool, message, provenance)).await
}

/// Runs a transaction until it succeeds, fails otherwise than by a deadlock or a
/// lock-wait timeout, or has been tried [`MAX_TRANSACTION_ATTEMPTS`] times; a short
/// growing pause between tries.
async fn with_retries<T, F, Fut>(mut transaction: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 1;
    loop {
        match transaction().await {
            Err(error) if is_retryable(&error) && attempt < MAX_TRANSACTION_ATTEMPTS => {
                metrics::counter!("im_ingest_db_transaction_retries_total").increment(1);
                tracing::debug!(%error, attempt, "transaction retried");
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// MySQL/MariaDB deadlock (1213) or lock wait timeout (1205): the transaction was rolled
/// back (or its statement was) and may simply run again.
pub fn is_retryable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|e| matches!(e.number(), 1213 | 1205)),
        _ => false,
    }
}

async fn try_write_message(
    pool: &MySqlPool,
    message: &ChatMessage,
    provenance: &Provenance,
) -> Result<WriteOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let customer_id = upsert_customer(&mut tx, message).await?;
    let session_id = upsert_session(&mut tx, message, customer_id).await?;
    let inserted = sqlx::query(
        "INSERT IGNORE INTO message (tenant_id, platform, external_message_id, session_id, \
         customer_id, message_type, content, sent_at, source_topic, source_partition, \
         source_offset) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&message.tenant_id)
    .bind(&message.platform)
    .bind(&message.message_id)
    .bind(session_id)
    .bind(customer_id)
    .bind(&message.message_type)
    .bind(&message.content)
    .bind(message.sent_at)
    .bind(&provenance.topic)
    .bind(provenance.partition)
    .bind(provenance.offset)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    // A single-row INSERT IGNORE reports 1 for a new row and 0 for a duplicate (unlike
    // ON DUPLICATE KEY UPDATE under sqlx's CLIENT_FOUND_ROWS).
    Ok(if inserted.rows_affected() == 1 {
        WriteOutcome::Stored
    } else {
        WriteOutcome::Duplicate
    })
}

/// Whether the row being upserted carries a newer profile than the stored one (a
/// macro, so that `concat!` can build the statement at compile time).
macro_rules! newer {
    () => {
        "(VALUES(profile_at) IS NOT NULL AND (profile_at IS NULL \
         OR (VALUES(profile_at), VALUES(profile_message_id)) > (profile_at, profile_message_id)))"
    };
}

/// The customer upsert's convergent update: the profile is newest-wins.
///
/// Assignments run left to right, so the comparison must see the old marker: nickname
/// and avatar first, then `profile_message_id`, then `profile_at`. After the id is
/// replaced, the comparison for `profile_at` can only differ when both timestamps are
/// equal — and then `profile_at` keeps the same value either way.
pub(super) const CUSTOMER_ON_DUPLICATE: &str = concat!(
    " ON DUPLICATE KEY UPDATE nickname = IF(",
    newer!(),
    ", COALESCE(VALUES(nickname), nickname), nickname), avatar = IF(",
    newer!(),
    ", COALESCE(VALUES(avatar), avatar), avatar), profile_message_id = IF(",
    newer!(),
    ", VALUES(profile_message_id), profile_message_id), profile_at = IF(",
    newer!(),
    ", VALUES(profile_at), profile_at)"
);

/// The session upsert's convergent update: `last_message_at` only moves forward.
pub(super) const SESSION_ON_DUPLICATE: &str = " ON DUPLICATE KEY UPDATE \
     last_message_at = GREATEST(COALESCE(last_message_at, VALUES(last_message_at)), \
                                VALUES(last_message_at))";

/// Get-or-create the customer; returns its id. The profile columns change only when
/// this message's (timestamp, message id) is newer than the one that set them.
async fn upsert_customer(
    tx: &mut Transaction<'_, MySql>,
    message: &ChatMessage,
) -> Result<u64, sqlx::Error> {
    let profile = message.profile.as_ref();
    let (nickname, avatar) = match profile {
        Some(p) => (p.nickname.as_deref(), p.avatar.as_deref()),
        None => (None, None),
    };
    let (profile_at, profile_message_id) = match profile {
        Some(_) => (Some(message.sent_at), Some(message.message_id.as_str())),
        None => (None, None),
    };
    let sql = format!(
        "INSERT INTO customer (tenant_id, platform, external_user_id, nickname, avatar, \
         profile_at, profile_message_id) VALUES (?, ?, ?, ?, ?, ?, ?) \
         {CUSTOMER_ON_DUPLICATE}, id = LAST_INSERT_ID(id)"
    );
    let result = sqlx::query(&sql)
        .bind(&message.tenant_id)
        .bind(&message.platform)
        .bind(&message.from_user_id)
        .bind(nickname)
        .bind(avatar)
        .bind(profile_at)
        .bind(profile_message_id)
        .execute(&mut **tx)
        .await?;
    Ok(result.last_insert_id())
}

/// Get-or-create the session of (customer, agent); returns its id. `last_message_at`
/// only moves forward.
async fn upsert_session(
    tx: &mut Transaction<'_, MySql>,
    message: &ChatMessage,
    customer_id: u64,
) -> Result<u64, sqlx::Error> {
    let result = sqlx::query(&format!(
        "INSERT INTO session (tenant_id, platform, customer_id, agent_id, last_message_at) \
             VALUES (?, ?, ?, ?, ?) {SESSION_ON_DUPLICATE}, id = LAST_INSERT_ID(id)"
    ))
    .bind(&message.tenant_id)
    .bind(&message.platform)
    .bind(customer_id)
    .bind(&message.to_user_id)
    .bind(message.sent_at)
    .execute(&mut **tx)
    .await?;
    Ok(result.last_insert_id())
}
