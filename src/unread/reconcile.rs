//! Bringing the Redis copy back to the MySQL truth: after an outage, for the agents
//! noted while Redis was unreachable, and by hand (`im-ingest reconcile`).
//!
//! Guarantee: an agent whose changes could not reach Redis is noted in MySQL
//! (`unread_reconcile`) before its records are acknowledged, so the note outlives the
//! process; a noted agent is rebuilt once Redis answers, and its note is removed only
//! if no newer note came meanwhile (each note carries a random token). One agent that
//! fails does not hold up the others: its note goes to the back. Reconcile compares each conversation and the total, reports the
//! drift (before, after) and fixes it: counts and totals, versions Redis holds that
//! MySQL never had, and conversations MySQL does not have — keeping every change newer
//! than what it read from MySQL.

use std::collections::{BTreeSet, HashMap};

use sqlx::MySqlPool;

use super::copy::{Agent, Conversation, StoredCopy, UnreadCopy};
use super::source;

/// Notes agents whose Redis copy may be behind (one statement per 1,000 agents, well
/// under the protocol's 65,535 placeholders).
pub async fn note(pool: &MySqlPool, agents: &BTreeSet<Agent>) -> Result<(), sqlx::Error> {
    let agents: Vec<&Agent> = agents.iter().collect();
    for chunk in agents.chunks(1_000) {
        let mut insert = sqlx::QueryBuilder::<sqlx::MySql>::new(
            "INSERT INTO unread_reconcile (tenant_id, platform, agent_id, token) ",
        );
        insert.push_values(chunk, |mut row, agent| {
            row.push_bind(&agent.tenant_id)
                .push_bind(&agent.platform)
                .push_bind(&agent.agent_id)
                .push_bind(rand::random::<u64>() >> 1);
        });
        insert.push(
            " ON DUPLICATE KEY UPDATE token = VALUES(token), noted_at = CURRENT_TIMESTAMP(3)",
        );
        insert.build().execute(pool).await?;
    }
    Ok(())
}

/// One agent's drift between Redis and MySQL.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Drift {
    pub tenant_id: String,
    pub platform: String,
    pub agent_id: String,
    /// Conversations whose count or version in Redis differed from MySQL's (missing
    /// ones and ones MySQL does not have included).
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

/// Compares the agent's copy with MySQL and, unless `dry_run`, rebuilds it: merged by
/// version, or with `force` (reconcile) also overwriting equal versions and then
/// repairing what Redis holds that MySQL does not.
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
        copy.rebuild(agent, &truth, force).await?;
        if force {
            repair(pool, copy, agent).await?;
            // A change a worker copied while the repaired version still stood was
            // refused as older; it is in MySQL now.
            let truth = source::conversations(pool, agent).await?;
            copy.rebuild(agent, &truth, false).await?;
        }
        copy.read(agent).await?.total
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

/// Sets back conversations whose version in Redis is newer than MySQL's, or that
/// MySQL does not have: no worker can have written them (MySQL commits first), so they
/// are corrupt. Each repair applies only if the version is still the one seen; the
/// caller merges MySQL once more afterwards (see [`reconcile_agent`]).
async fn repair(pool: &MySqlPool, copy: &UnreadCopy, agent: &Agent) -> anyhow::Result<()> {
    let stored = copy.read(agent).await?;
    let truth: HashMap<String, Conversation> = source::conversations(pool, agent)
        .await?
        .into_iter()
        .map(|c| (c.customer.clone(), c))
        .collect();
    let repairs: Vec<(Conversation, Option<Conversation>)> = stored
        .conversations
        .into_values()
        .filter_map(|seen| match truth.get(&seen.customer) {
            Some(t) if seen.version > t.version => Some((seen, Some(t.clone()))),
            Some(_) => None,
            None => Some((seen, None)),
        })
        .collect();
    copy.repair(agent, &repairs).await?;
    Ok(())
}

/// Conversations whose count or version in Redis is not MySQL's, and conversations
/// Redis has that MySQL does not.
fn differing(copy: &StoredCopy, truth: &[Conversation]) -> usize {
    let off = truth
        .iter()
        .filter(|c| {
            copy.conversations
                .get(&c.customer)
                .is_none_or(|stored| (stored.unread, stored.version) != (c.unread, c.version))
        })
        .count();
    let known: BTreeSet<&str> = truth.iter().map(|c| c.customer.as_str()).collect();
    let unknown = copy
        .conversations
        .keys()
        .filter(|customer| !known.contains(customer.as_str()))
        .count();
    off + unknown
}

/// Rebuilds up to `limit` noted agents, oldest notes first, and removes the notes no
/// newer note replaced; an agent that fails keeps its note and the others go on.
/// Returns how many notes were read and how many agents were rebuilt. Drifted
/// conversations are counted in `im_ingest_unread_drift_total`.
pub async fn drain_noted(
    pool: &MySqlPool,
    copy: &UnreadCopy,
    limit: u32,
) -> anyhow::Result<(usize, usize)> {
    let rows: Vec<(String, String, String, u64)> = sqlx::query_as(
        "SELECT CAST(tenant_id AS CHAR), CAST(platform AS CHAR), CAST(agent_id AS CHAR), \
         token FROM unread_reconcile ORDER BY noted_at LIMIT ?",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut rebuilt = 0;
    for (tenant_id, platform, agent_id, token) in &rows {
        let agent = Agent {
            tenant_id: tenant_id.clone(),
            platform: platform.clone(),
            agent_id: agent_id.clone(),
        };
        let drift = match reconcile_agent(pool, copy, &agent, false, false).await {
            Ok(drift) => drift,
            Err(error) => {
                tracing::debug!(
                    error = format!("{error:#}"),
                    ?agent,
                    "rebuilding a noted agent failed; its note stays, at the back"
                );
                on_note(
                    pool,
                    "UPDATE unread_reconcile SET noted_at = CURRENT_TIMESTAMP(3)",
                    &agent,
                    *token,
                )
                .await?;
                continue;
            }
        };
        metrics::counter!("im_ingest_unread_drift_total").increment(drift.conversations as u64);
        on_note(pool, "DELETE FROM unread_reconcile", &agent, *token).await?;
        rebuilt += 1;
    }
    Ok((rows.len(), rebuilt))
}

/// Runs `statement` (an `UPDATE … SET …` or a `DELETE FROM …` of `unread_reconcile`) on
/// the agent's note, if it still carries `token` (no newer note replaced it).
async fn on_note(
    pool: &MySqlPool,
    statement: &str,
    agent: &Agent,
    token: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "{statement} WHERE tenant_id = ? AND platform = ? AND agent_id = ? AND token = ?"
    ))
    .bind(&agent.tenant_id)
    .bind(&agent.platform)
    .bind(&agent.agent_id)
    .bind(token)
    .execute(pool)
    .await?;
    Ok(())
}
