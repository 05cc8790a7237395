//! The truth of an agent's unread counts, read from MySQL: for rebuilding the Redis
//! copy, for the read API when Redis is down, and for reconcile.
//!
//! Guarantee: one indexed read per agent (`ix_session_agent`) returns every session of
//! the agent with its count, version and newest message time, as committed.

use sqlx::MySqlPool;

use super::copy::{Agent, Conversation};

/// Every conversation of `agent` as MySQL has it.
pub async fn conversations(
    pool: &MySqlPool,
    agent: &Agent,
) -> Result<Vec<Conversation>, sqlx::Error> {
    let rows: Vec<(String, u32, u64, Option<i64>)> = sqlx::query_as(
        "SELECT CAST(c.external_user_id AS CHAR), s.unread_count, s.unread_version, \
         s.last_message_at FROM session s FORCE INDEX (ix_session_agent) \
         JOIN customer c ON c.id = s.customer_id \
         WHERE s.tenant_id = ? AND s.platform = ? AND s.agent_id = ?",
    )
    .bind(&agent.tenant_id)
    .bind(&agent.platform)
    .bind(&agent.agent_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(customer, unread, version, last_message_at)| Conversation {
                customer,
                unread,
                version,
                last_message_at,
            },
        )
        .collect())
}

/// The agents that have sessions, optionally of one tenant and one agent id.
pub async fn agents(
    pool: &MySqlPool,
    tenant: Option<&str>,
    agent: Option<&str>,
) -> Result<Vec<Agent>, sqlx::Error> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT DISTINCT CAST(tenant_id AS CHAR), CAST(platform AS CHAR), CAST(agent_id AS CHAR) \
         FROM session WHERE (? IS NULL OR tenant_id = ?) AND (? IS NULL OR agent_id = ?) \
         ORDER BY 1, 2, 3",
    )
    .bind(tenant)
    .bind(tenant)
    .bind(agent)
    .bind(agent)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Agent::from).collect())
}
