//! The naive writer: what a team writes first, and what this project exists to replace.
//! Per record, without a transaction or a lock: `SELECT` the customer, `INSERT` it if
//! none; the same for the session and the message.
//!
//! Guarantee: none — that is the point. Check and insert are not atomic, so two
//! records of one user processed at once both insert; the bench's correctness check
//! counts the duplicates it makes. It runs on the worker's tables without their unique
//! keys, as such teams' tables are.

use sqlx::MySqlPool;

use crate::message::ChatMessage;
use crate::pipeline::Record;

/// The worker's schema, from which the naive writer's is derived.
/// The worker's migrations, in order, as one script.
fn worker_schema() -> String {
    crate::store::MIGRATOR
        .iter()
        .map(|migration| migration.sql.as_ref())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The worker's tables with every unique key turned into a plain index: the same
/// columns, lookups as fast, only the uniqueness missing — as such teams' tables are.
fn schema() -> String {
    worker_schema().replace("UNIQUE KEY", "KEY")
}

/// Creates the naive writer's tables in an empty database.
pub async fn create_schema(pool: &MySqlPool) -> anyhow::Result<()> {
    sqlx::raw_sql(&schema()).execute(pool).await?;
    Ok(())
}

/// Check-then-insert of one message's customer, session and message.
pub async fn write_one(
    pool: &MySqlPool,
    message: &ChatMessage,
    record: &Record,
) -> anyhow::Result<()> {
    let customer_id = match sqlx::query_scalar::<_, i64>(
        "SELECT id FROM customer WHERE tenant_id = ? AND platform = ? AND external_user_id = ? LIMIT 1",
    )
    .bind(&message.tenant_id)
    .bind(&message.platform)
    .bind(&message.from_user_id)
    .fetch_optional(pool)
    .await?
    {
        Some(id) => id,
        None => {
            let profile = message.profile.as_ref();
            let nickname = profile.and_then(|p| p.nickname.as_deref());
            let avatar = profile.and_then(|p| p.avatar.as_deref());
            let marker = |field: Option<&str>| field.map(|_| (message.sent_at, &message.message_id));
            sqlx::query(
                "INSERT INTO customer (tenant_id, platform, external_user_id, nickname, \
                 nickname_at, nickname_message_id, avatar, avatar_at, avatar_message_id) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&message.tenant_id)
            .bind(&message.platform)
            .bind(&message.from_user_id)
            .bind(nickname)
            .bind(marker(nickname).map(|m| m.0))
            .bind(marker(nickname).map(|m| m.1))
            .bind(avatar)
            .bind(marker(avatar).map(|m| m.0))
            .bind(marker(avatar).map(|m| m.1))
            .execute(pool)
            .await?
            .last_insert_id() as i64
        }
    };
    let session_id = match sqlx::query_scalar::<_, i64>(
        "SELECT id FROM session WHERE tenant_id = ? AND platform = ? AND customer_id = ? \
         AND agent_id = ? LIMIT 1",
    )
    .bind(&message.tenant_id)
    .bind(&message.platform)
    .bind(customer_id)
    .bind(&message.to_user_id)
    .fetch_optional(pool)
    .await?
    {
        Some(id) => id,
        None => sqlx::query(
            "INSERT INTO session (tenant_id, platform, customer_id, agent_id, last_message_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&message.tenant_id)
        .bind(&message.platform)
        .bind(customer_id)
        .bind(&message.to_user_id)
        .bind(message.sent_at)
        .execute(pool)
        .await?
        .last_insert_id() as i64,
    };
    let exists = sqlx::query_scalar::<_, i64>(
        "SELECT id FROM message WHERE tenant_id = ? AND platform = ? AND external_message_id = ? LIMIT 1",
    )
    .bind(&message.tenant_id)
    .bind(&message.platform)
    .bind(&message.message_id)
    .fetch_optional(pool)
    .await?;
    if exists.is_none() {
        sqlx::query(
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
        .bind(&record.topic)
        .bind(record.partition)
        .bind(record.offset)
        .execute(pool)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_naive_schema_is_the_workers_without_unique_keys() {
        let schema = super::schema();
        assert!(!schema.contains("UNIQUE KEY"));
        assert_eq!(
            schema.matches("CREATE TABLE").count(),
            super::worker_schema().matches("CREATE TABLE").count()
        );
        assert_eq!(
            schema.matches("KEY ").count(),
            super::worker_schema().matches("KEY ").count()
        );
    }
}
