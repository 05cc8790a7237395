//! Unread counters: per conversation and total, for each agent (README, "Unread
//! counters").
//!
//! Guarantee: MySQL holds the truth (`session.read_up_to`, `unread_count`,
//! `unread_version`, kept by the batch transaction: see `store::unread`); Redis holds a
//! copy that only moves to newer versions (`copy`); a change that could not reach Redis
//! is noted durably and reconciled when Redis answers (`reconcile`); reads come from
//! Redis, rebuilding a lost copy from MySQL, or from MySQL while Redis is down (`view`).

pub mod command;
pub mod copy;
pub mod reconcile;
pub mod source;
pub mod view;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::MySqlPool;

use crate::pipeline::{is_unreachable, RedisHealth};
use crate::store::{ConversationUnread, UnreadRules};
use copy::{Agent, UnreadCopy};
use view::{Cursor, Source, UnreadView};

/// How long a read waits for Redis before answering from MySQL.
const REDIS_READ_TIMEOUT: Duration = Duration::from_millis(500);

/// The counters' read and write sides, shared by the pipeline and the admin server.
#[derive(Clone)]
pub struct Unread {
    pub pool: MySqlPool,
    pub copy: UnreadCopy,
    /// How counts are kept (`unread.*`): the write path and the reads apply the same.
    pub rules: UnreadRules,
    /// While the worker is in degraded mode, reads go to MySQL without waiting on Redis.
    pub redis_health: Arc<RedisHealth>,
}

impl Unread {
    /// Copies committed changes to Redis (rebuilding an agent's incomplete copy from
    /// MySQL); when Redis fails, notes their agents for reconcile. Returns the error if
    /// Redis could not be reached (for the degraded-mode bookkeeping; an error Redis
    /// answered, such as a script's on a corrupted key, does not make it "down").
    pub async fn publish(
        &self,
        changes: &[ConversationUnread],
        try_redis: bool,
    ) -> Option<redis::RedisError> {
        if changes.is_empty() {
            return None;
        }
        let failed = if try_redis {
            match self.copy.apply(changes).await {
                Ok(incomplete) => {
                    for agent in incomplete {
                        if let Err(error) = self.rebuild(&agent).await {
                            tracing::warn!(
                                error = format!("{error:#}"),
                                "rebuilding an unread copy failed; noting it for reconcile"
                            );
                            self.note(&BTreeSet::from([agent]), 1).await;
                        }
                    }
                    return None;
                }
                Err(error) if is_unreachable(&error) => Some(error),
                Err(error) => {
                    tracing::warn!(%error, "Redis refused the unread copy; noting the agents for reconcile");
                    None
                }
            }
        } else {
            None
        };
        let agents: BTreeSet<Agent> = changes.iter().map(Agent::from).collect();
        self.note(&agents, changes.len()).await;
        failed
    }

    /// Notes agents whose writes may have committed without the batch knowing (see
    /// `pipeline::write`), so their copies are rebuilt from MySQL.
    pub async fn note_uncertain(&self, agents: &BTreeSet<Agent>) {
        if !agents.is_empty() {
            self.note(agents, 0).await;
        }
    }

    /// Notes `agents` for reconcile (their `changes` changes did not reach Redis).
    async fn note(&self, agents: &BTreeSet<Agent>, changes: usize) {
        metrics::counter!("im_ingest_unread_noted_agents_total").increment(agents.len() as u64);
        if let Err(error) = reconcile::note(&self.pool, agents).await {
            // The conversations stay behind in Redis until their next change or a
            // `reconcile`; their records are stored all the same.
            metrics::counter!("im_ingest_unread_copy_lost_total").increment(changes as u64);
            tracing::error!(%error, agents = agents.len(),
                "neither Redis nor the reconcile note took the unread changes");
        }
    }

    /// Rebuilds the agent's copy from MySQL, merging by version.
    async fn rebuild(&self, agent: &Agent) -> anyhow::Result<()> {
        let truth = source::conversations(&self.pool, agent).await?;
        self.copy.rebuild(agent, &truth, false).await?;
        metrics::counter!("im_ingest_unread_rebuilds_total").increment(1);
        Ok(())
    }

    /// The agent's answer for `GET /v1/unread`: from Redis (a missing or incomplete copy
    /// rebuilt from MySQL first), or from MySQL when Redis does not answer in time or
    /// the worker is in degraded mode.
    pub async fn read(
        &self,
        agent: &Agent,
        limit: usize,
        cursor: Option<&Cursor>,
    ) -> Result<UnreadView, sqlx::Error> {
        let now = crate::pipeline::now_millis();
        // In degraded mode, once per probe interval a read is Redis's probe.
        if self.redis_health.should_try_lock(Instant::now()) {
            match tokio::time::timeout(REDIS_READ_TIMEOUT, self.read_redis(agent)).await {
                Ok(Ok(stored)) => {
                    return Ok(view::page(
                        Source::Redis,
                        stored.conversations.into_values(),
                        stored.total,
                        now,
                        self.rules.expire_after_ms,
                        limit,
                        cursor,
                    ));
                }
                Ok(Err(error)) => {
                    if let Some(error) = error
                        .downcast_ref::<redis::RedisError>()
                        .filter(|e| is_unreachable(e))
                    {
                        self.redis_health.record_failure(Instant::now(), error);
                    }
                    tracing::debug!(
                        error = format!("{error:#}"),
                        "unread read from Redis failed; using MySQL"
                    );
                }
                Err(_) => tracing::debug!("unread read from Redis timed out; using MySQL"),
            }
        }
        let conversations = source::conversations(&self.pool, agent).await?;
        Ok(view::page(
            Source::Mysql,
            conversations,
            None,
            now,
            self.rules.expire_after_ms,
            limit,
            cursor,
        ))
    }

    /// The agent's copy, rebuilt from MySQL first when it is incomplete (an agent with
    /// no conversation anywhere gets no key: reads of unknown agents write nothing).
    async fn read_redis(&self, agent: &Agent) -> anyhow::Result<copy::StoredCopy> {
        let stored = self.copy.read(agent).await?;
        // Redis answered: whatever follows (a rebuild) is not about its reachability.
        self.redis_health.record_success();
        if stored.total.is_some() {
            return Ok(stored);
        }
        let truth = source::conversations(&self.pool, agent).await?;
        if truth.is_empty() && stored.conversations.is_empty() {
            return Ok(stored);
        }
        self.copy.rebuild(agent, &truth, false).await?;
        metrics::counter!("im_ingest_unread_rebuilds_total").increment(1);
        Ok(self.copy.read(agent).await?)
    }
}
