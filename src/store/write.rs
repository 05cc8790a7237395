//! The idempotent write of one chat message (DESIGN.md, "Defence in depth", layer 2).
//!
//! Guarantee: in one transaction, the customer and the session are got-or-created by
//! their natural keys (`INSERT … ON DUPLICATE KEY UPDATE id = LAST_INSERT_ID(id)`) and the
//! message is inserted (a duplicate key means it is stored already; anything else the
//! database refuses is an error, see [`is_refusal`]); the unique indexes make any number of
//! concurrent or repeated writes of the same message leave exactly one row of each,
//! with or without the Redis lock. Mutable fields converge whatever the order of
//! application: each profile field is newest-wins by (timestamp, message id) and
//! `last_message_at` only moves forward (`GREATEST`). Deadlocks and lock-wait timeouts
//! are retried in place.

use std::future::Future;
use std::time::Duration;

use sqlx::{MySql, MySqlPool, Transaction};

use super::profile;
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

/// A duplicate key (1062): the row is there already.
pub(super) fn is_duplicate_key(error: &sqlx::Error) -> bool {
    mysql_error_number(error) == Some(1062)
}

/// MySQL/MariaDB errors that refuse the data itself, so running the same rows again can
/// never succeed: a trigger's `SIGNAL` (1644), data too long (1406), an incorrect
/// string value (1366), a NULL into a NOT NULL column (1048), a foreign key (1452) or a
/// CHECK constraint (3819 MySQL, 4025 MariaDB). Anything else — a lost connection, a
/// timeout, a full disk — is worth retrying.
pub fn is_refusal(error: &sqlx::Error) -> bool {
    matches!(
        mysql_error_number(error),
        Some(1644 | 1406 | 1366 | 1048 | 1452 | 3819 | 4025)
    )
}

fn mysql_error_number(error: &sqlx::Error) -> Option<u16> {
    match error {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(|e| e.number()),
        _ => None,
    }
}

/// MySQL/MariaDB deadlock (1213) or lock wait timeout (1205): the transaction was rolled
/// back (or its statement was) and may simply run again.
pub fn is_retryable(error: &sqlx::Error) -> bool {
    matches!(mysql_error_number(error), Some(1213 | 1205))
}

async fn try_write_message(
    pool: &MySqlPool,
    message: &ChatMessage,
    provenance: &Provenance,
) -> Result<WriteOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let customer_id = upsert_customer(&mut tx, message).await?;
    let session_id = upsert_session(&mut tx, message, customer_id).await?;
    // A plain INSERT, not INSERT IGNORE: a row the database refuses (CHECK, foreign key,
    // data too long) fails here instead of being skipped or cut without an error.
    let inserted = sqlx::query(
        "INSERT INTO message (tenant_id, platform, external_message_id, session_id, \
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
    .await;
    let outcome = match inserted {
        Ok(_) => WriteOutcome::Stored,
        // Only the statement failed; the customer and session upserts stand.
        Err(error) if is_duplicate_key(&error) => WriteOutcome::Duplicate,
        Err(error) => return Err(error),
    };
    tx.commit().await?;
    Ok(outcome)
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
    let mut upsert = profile::customer_upsert([profile::row_of(message)]);
    upsert.push(", id = LAST_INSERT_ID(id)");
    let result = upsert.build().execute(&mut **tx).await?;
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
