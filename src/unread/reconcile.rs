//! Bringing the Redis copy back to the MySQL truth: after an outage, for the agents
//! noted while Redis was unreachable, and by hand (`im-ingest reconcile`).
//!
//! Guarantee: an agent whose changes could not reach Redis is noted in MySQL
//! (`unread_reconcile`) before its records are acknowledged, so the note outlives the
//! process; a noted agent is rebuilt once Redis answers, and its note is removed only
//! if no newer note came meanwhile. Reconcile compares each conversation and the total,
//! reports the drift (before, after) and fixes it, keeping only changes newer than what
//! it read from MySQL.

use std::collections::BTreeSet;

use sqlx::MySqlPool;

use super::copy::{Agent, Conversation, StoredCopy, UnreadCopy};
use super::source;

/// Notes agents whose Redis copy may be behind (one statement).
pub async fn note(pool: &MySqlPool, agents: &BTreeSet<Agent>) -> Result<(), sqlx::Error> {
    if agents.is_empty() {
        return Ok(());
    }
    let mut insert = sqlx::QueryBuilder::<sqlx::MySql>::new(
        "INSERT INTO unread_reconcile (tenant_id, platform, agent_id) ",
    );
    insert.push_values(agents, |mut row, agent| {
        row.push_bind(&agent.tenant_id)
            .push_bind(&agent.platform)
            .push_bind(&agent.agent_id);
    });
    insert.push(" ON DUPLICATE KEY UPDATE noted_at = CURRENT_TIMESTAMP(3)");
    insert.build().execute(pool).await?;
    Ok(())
}

/// One agent's drift between Redis and MySQL.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Drift {
    pub tenant_id: String,
    pub platform: String,
    pub agent_id: String,
    /// Conversations whose count in Redis differed from MySQL's (missing ones included).
    pub conversations: usize,
    /// Redis's total before (`None`: no complete copy), and after.
    pub total_before: Option<i64>,
    pub total_after: Option<i64>,
    /// The sum of MySQL's counts.
    pub total_in_mysql: i64,
}

impl Drift {
    pub fn is_some(&self) -> bool {
        self.conversations > 0 || self.total_before != Some(self.total_in_mysql)
    }
}

/// Compares the agent's copy with MySQL and, unless `dry_run`, rebuilds it (equal
/// versions overwritten with `force`, so a hand-corrupted count is fixed too).
pub async fn reconcile_agent(
    pool: &MySqlPool,
    copy: &UnreadCopy,
    agent: &Agent,
    force: bool,
    dry_run: bool,
) -> anyhow::Result<Drift> {
    let before = copy.read(agent).await?;
    let truth = source::conversations(pool, agent).await?;
    let conversations = differing(&before, &truth);
    let total_in_mysql = truth.iter().map(|c| i64::from(c.unread)).sum();
    let total_after = if dry_run {
        before.total
    } else {
        Some(copy.rebuild(agent, &truth, force).await?)
    };
    Ok(Drift {
        tenant_id: agent.tenant_id.clone(),
        platform: agent.platform.clone(),
        agent_id: agent.agent_id.clone(),
        conversations,
        total_before: before.total,
        total_after,
        total_in_mysql,
    })
}

/// Conversations whose count in Redis is not MySQL's.
fn differing(copy: &StoredCopy, truth: &[Conversation]) -> usize {
    truth
        .iter()
        .filter(|c| {
            copy.conversations
                .get(&c.customer)
                .is_none_or(|stored| stored.unread != c.unread)
        })
        .count()
}

/// Rebuilds up to `limit` noted agents and removes their notes; returns how many were
/// rebuilt. Drifted conversations are counted in `im_ingest_unread_drift_total`.
pub async fn drain_noted(pool: &MySqlPool, copy: &UnreadCopy, limit: u32) -> anyhow::Result<usize> {
    // The note's time in epoch ms, as MySQL computes it (compared again on delete).
    type Noted = (String, String, String, i64);
    let rows: Vec<Noted> = sqlx::query_as(
        "SELECT CAST(tenant_id AS CHAR), CAST(platform AS CHAR), CAST(agent_id AS CHAR), \
         CAST(UNIX_TIMESTAMP(noted_at) * 1000 AS SIGNED) FROM unread_reconcile LIMIT ?",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    for (tenant_id, platform, agent_id, noted_at) in &rows {
        let agent = Agent {
            tenant_id: tenant_id.clone(),
            platform: platform.clone(),
            agent_id: agent_id.clone(),
        };
        let drift = reconcile_agent(pool, copy, &agent, false, false).await?;
        metrics::counter!("im_ingest_unread_drift_total").increment(drift.conversations as u64);
        sqlx::query(
            "DELETE FROM unread_reconcile WHERE tenant_id = ? AND platform = ? AND agent_id = ? \
             AND CAST(UNIX_TIMESTAMP(noted_at) * 1000 AS SIGNED) = ?",
        )
        .bind(tenant_id)
        .bind(platform)
        .bind(agent_id)
        .bind(noted_at)
        .execute(pool)
        .await?;
    }
    Ok(rows.len())
}
