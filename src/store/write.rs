//! The idempotent write of one chat message (DESIGN.md, "Defence in depth", layer 2).
//!
//! Guarantee: in one transaction, the customer and the session are got-or-created by
//! their natural keys (`INSERT … ON DUPLICATE KEY UPDATE id = LAST_INSERT_ID(id)`) and the
//! message is inserted with `INSERT IGNORE`; the unique indexes make any number of
//! concurrent or repeated writes of the same message leave exactly one row of each,
//! with or without the Redis lock. Mutable fields converge whatever the order of
//! application: each profile field is newest-wins by (timestamp, message id) and
//! `last_message_at` only moves forward (`GREATEST`). Deadlocks and lock-wait timeouts
//! are retried in place.

use std::future::Future;
use std::time::Duration;

use sqlx::{MySql, MySqlPool, Transaction};

use super::profile::{self, CUSTOMER_COLUMNS, CUSTOMER_ON_DUPLICATE};
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

/// The session upsert's convergent update: `last_message_at` only moves forward.
pub(super) const SESSION_ON_DUPLICATE: &str = " ON DUPLICATE KEY UPDATE \
     last_message_at = GREATEST(COALESCE(last_message_at, VALUES(last_message_at)), \
                                VALUES(last_message_at))";

/// Get-or-create the customer; returns its id. Each profile field changes only when
/// this message carries it and is newer than the message that set it (see `profile`).
async fn upsert_customer(
    tx: &mut Transaction<'_, MySql>,
    message: &ChatMessage,
) -> Result<u64, sqlx::Error> {
    let (nickname, avatar) = (profile::nickname(message), profile::avatar(message));
    let sql = format!(
        "{CUSTOMER_COLUMNS} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) {CUSTOMER_ON_DUPLICATE}, \
         id = LAST_INSERT_ID(id)"
    );
    let result = sqlx::query(&sql)
        .bind(&message.tenant_id)
        .bind(&message.platform)
        .bind(&message.from_user_id)
        .bind(nickname.map(|f| f.value))
        .bind(nickname.map(|f| f.at))
        .bind(nickname.map(|f| f.message_id))
        .bind(avatar.map(|f| f.value))
        .bind(avatar.map(|f| f.at))
        .bind(avatar.map(|f| f.message_id))
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
