//! The ideal consumer: the database write limit every bench ratio is taken against.
//! It writes the same rows of all three tables into the same schema with the worker's
//! own multi-row statements (`store::batch`: one statement per table per batch, rows
//! sorted by key), but in autocommit, with no lock, no transaction and no locking read.
//!
//! Guarantee: the rows are those the worker would write (customer and session got or
//! created by natural key, newest-wins profile, `last_message_at` moving forward,
//! messages `INSERT IGNORE`), so its correctness is checked like the worker's; it is a
//! limit, not a product — it cannot tell which messages were new.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::{MySqlConnection, MySqlPool};

use crate::message::{decode, ChatMessage, Inbound};
use crate::pipeline::Record;
use crate::store::{is_retryable, write_unchecked, Provenance};

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

/// The batch's messages through the worker's own multi-row statements, in autocommit
/// and without the locking read that tells new messages from stored ones.
async fn write(
    connection: &mut MySqlConnection,
    messages: &[&(ChatMessage, &Record)],
) -> Result<(), sqlx::Error> {
    let provenances: Vec<Provenance> = messages
        .iter()
        .map(|(_, record)| Provenance {
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
        })
        .collect();
    let items: Vec<(&ChatMessage, &Provenance)> = messages
        .iter()
        .zip(&provenances)
        .map(|((message, _), provenance)| (message, provenance))
        .collect();
    write_unchecked(connection, &items).await
}
