//! The idempotent write of one chat message (DESIGN.md, "Defence in depth", layer 2),
//! and how the database's errors are told apart.
//!
//! Guarantee: a message written alone goes through the same transaction as a batch
//! (see `batch`): the customer and the session are got-or-created by their natural
//! keys, the message inserted once, the unread count kept; the unique indexes make any
//! number of concurrent or repeated writes of the same message leave exactly one row of
//! each, with or without the Redis lock.

use sqlx::MySqlPool;

use super::batch::{BatchItem, UnreadRules};
use super::bounded::{write_batch, BatchWriteError};
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
    /// A read receipt, applied to its session's watermark.
    ReadApplied,
}

/// How often a transaction that hit a deadlock or lock-wait timeout is tried in all.
pub(super) const MAX_TRANSACTION_ATTEMPTS: u32 = 5;

/// Writes one message idempotently (see [`write_batch`]), without expiry.
pub async fn write_message(
    pool: &MySqlPool,
    message: &ChatMessage,
    provenance: &Provenance,
) -> Result<WriteOutcome, BatchWriteError> {
    let written = write_batch(
        pool,
        &[BatchItem::Message(message, provenance)],
        UnreadRules::default(),
    )
    .await?;
    Ok(written.outcomes[0])
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

pub fn mysql_error_number(error: &sqlx::Error) -> Option<u16> {
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
