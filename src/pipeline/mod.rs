//! Records from decoded to durable (DESIGN.md, "Flow"), as stages that read top to
//! bottom in `batch`: classify → lock → write → release → route → answer.
//!
//! Guarantee: when [`Pipeline::process`] returns `Ok`, the record's effect is durable —
//! its rows committed, or the record acknowledged by the delay or dead-letter topic — so
//! its offset may be stored. An `Err` means nothing about the record is settled and it
//! must be processed again (the writes are idempotent, so "again" is always safe). Bad
//! input is dead-lettered, never retried; a lock held elsewhere is tried again
//! in-process for at most 198 ms, then the record goes to a delay topic instead of
//! waiting longer; a Redis that fails is bypassed (degraded mode) because the unique
//! indexes alone already prevent duplicates. So is a lock that kept changing hands
//! until the record's last attempt (see `contention`).
//!
//! Each user's records arrive as a user batch (one user, in order; see
//! [`Pipeline::process_user_batch`]); `stage` gathers the user batches handed in
//! meanwhile into one batch, up to the configured records, bytes and linger time, and
//! runs it: one connection taken first, every user's lock in one pipelined round trip,
//! every locked user's rows in one transaction, every lock released in one pipeline,
//! every delay and dead-letter record published at once.

mod batch;
mod contention;
mod degraded;
mod record;
mod route;
mod stage;
mod write;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::MySqlPool;

pub use degraded::{is_unreachable, RedisHealth};
pub use record::{now_millis, Job, Record};
pub use route::DELAY_REFUSED_FQCN;
pub use stage::BatchLimits;
pub use write::DATABASE_REJECTED_FQCN;

use crate::config::LockMode;
use crate::lock::LockClient;
use crate::message::UserKey;
use crate::retry::policy::RetryPolicy;
use crate::retry::publish::Publisher;
use crate::retry::trust::RetryTrust;
use crate::store::UnreadRules;
use crate::unread::copy::UnreadCopy;
use crate::unread::Unread;
use batch::Stages;
use stage::{StageHandle, UnitReply};

/// Lock attempts a user batch makes in-process before its messages go to a delay topic
/// (DESIGN.md, "Lock conflict is never a sleep"): a holder elsewhere usually finishes
/// its batch — one transaction — within them, so workers of one group rarely send each
/// other's users' records through the delay topics. Not delivery attempts: the retry
/// headers do not count them.
const IN_PROCESS_LOCK_ATTEMPTS: u32 = 4;
/// Pause between those attempts: 3 pauses, 198 ms in all, inside the contract's 200 ms
/// (a holder's transaction under load can outlast a shorter wait).
/// Only the waiting user's batch waits (out of the stage: its place in the next batch is
/// taken by others); the partition's other users go on, and the records keep their
/// in-flight slots.
const IN_PROCESS_LOCK_PAUSE: Duration = Duration::from_millis(66);

/// Error class of records whose user lock stayed held through every attempt.
pub const LOCK_HELD_FQCN: &str = "im_ingest::LockHeld";

/// What processing one record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    Duplicate,
    /// A read receipt, acknowledged (its effect on unread state comes with that feature).
    ReadReceipt,
    /// Republished to a delay topic because the user's lock was held elsewhere.
    Delayed {
        topic: String,
    },
    /// Published to the dead-letter topic.
    DeadLettered {
        reason: String,
    },
}

impl Outcome {
    /// The `outcome` label of `im_ingest_records_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Stored => "stored",
            Outcome::Duplicate => "duplicate",
            Outcome::ReadReceipt => "read_receipt",
            Outcome::Delayed { .. } => "retried",
            Outcome::DeadLettered { .. } => "dead_lettered",
        }
    }
}

/// The processing step; cheap to clone (handles only).
#[derive(Clone)]
pub struct Pipeline {
    pub pool: MySqlPool,
    consumer_group: String,
    max_message_bytes: usize,
    /// What the retry headers of consumed records are believed.
    retry_trust: Arc<RetryTrust>,
    stages: Arc<Stages>,
    limits: BatchLimits,
    /// Where user batches are handed in; the stage runs while a handle lives.
    stage: StageHandle,
}

impl Pipeline {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: MySqlPool,
        locks: LockClient,
        publisher: Publisher,
        policy: RetryPolicy,
        retry_topic_prefix: String,
        dlq_topic: String,
        consumer_group: String,
        max_message_bytes: usize,
        redis_probe_interval: Duration,
    ) -> Self {
        let retry_trust = Arc::new(RetryTrust::new(&policy, &retry_topic_prefix));
        let redis_health = Arc::new(RedisHealth::new(redis_probe_interval));
        let unread = Unread {
            pool: pool.clone(),
            copy: UnreadCopy::new(locks.connection()),
            rules: UnreadRules::default(),
            redis_health: redis_health.clone(),
        };
        let stages = Arc::new(Stages {
            pool: pool.clone(),
            locks,
            publisher,
            policy,
            retry_topic_prefix,
            dlq_topic,
            lock_mode: LockMode::Redis,
            redis_health,
            stalled_users: Arc::default(),
            unread,
        });
        let limits = BatchLimits::from(&crate::config::WorkerSettings::default());
        Self {
            stage: StageHandle::start(stages.clone(), limits),
            pool,
            consumer_group,
            max_message_bytes,
            retry_trust,
            stages,
            limits,
        }
    }

    /// The unread counters' read and write sides (for the read API and reconcile).
    pub fn unread(&self) -> Unread {
        self.stages.unread.clone()
    }

    /// Whether the worker runs without the Redis lock now (degraded mode), for reports.
    pub fn redis_health(&self) -> Arc<RedisHealth> {
        self.stages.redis_health.clone()
    }

    /// Switches the user lock on or off (`lock.mode`; on by default).
    pub fn with_lock_mode(mut self, mode: LockMode) -> Self {
        let mut stages = (*self.stages).clone();
        stages.lock_mode = mode;
        self.stages = Arc::new(stages);
        self.restart_stage()
    }

    /// How unread counts are kept (the `unread.*` settings).
    pub fn with_unread_rules(mut self, rules: UnreadRules) -> Self {
        let mut stages = (*self.stages).clone();
        stages.unread.rules = rules;
        self.stages = Arc::new(stages);
        self.restart_stage()
    }

    /// Sizes the batches and how many run at once (the `worker.batch_*` settings).
    pub fn with_batch_limits(mut self, limits: BatchLimits) -> Self {
        self.limits = limits;
        self.restart_stage()
    }

    /// A stage with the current settings; the old one stops with its last handle.
    fn restart_stage(mut self) -> Self {
        self.stage = StageHandle::start(self.stages.clone(), self.limits);
        self
    }

    pub fn prepare(&self, record: Record) -> Job {
        Job::prepare(
            record,
            self.max_message_bytes,
            &self.consumer_group,
            &self.retry_trust,
        )
    }

    /// Processes a batch: users concurrently, each user's records in batch order as one
    /// user batch (see [`Pipeline::process_user_batch`]). Returns one outcome per
    /// record, in input order; stops at the first error (see the module guarantee).
    pub async fn process_batch(&self, records: Vec<Record>) -> anyhow::Result<Vec<Outcome>> {
        let mut by_user: HashMap<Option<UserKey>, Vec<(usize, Arc<Job>)>> = HashMap::new();
        let count = records.len();
        for (index, record) in records.into_iter().enumerate() {
            let job = Arc::new(self.prepare(record));
            by_user.entry(job.user()).or_default().push((index, job));
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (_, indexed) in by_user {
            let pipeline = self.clone();
            tasks.spawn(async move {
                let (indexes, jobs): (Vec<usize>, Vec<Arc<Job>>) = indexed.into_iter().unzip();
                let results = pipeline.process_user_batch(jobs).await;
                let outcomes: anyhow::Result<Vec<Outcome>> = results.into_iter().collect();
                anyhow::Ok(indexes.into_iter().zip(outcomes?).collect::<Vec<_>>())
            });
        }
        let mut outcomes = vec![None; count];
        while let Some(result) = tasks.join_next().await {
            for (index, outcome) in result.context("a processing task panicked")?? {
                outcomes[index] = Some(outcome);
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every record has an outcome"))
            .collect())
    }

    /// Processes one prepared record; see the module guarantee.
    pub async fn process(&self, job: Job) -> anyhow::Result<Outcome> {
        let mut results = self.process_user_batch(vec![Arc::new(job)]).await;
        results.pop().expect("one record, one result")
    }

    /// Processes records of one user (or invalid records, which have none) in order,
    /// as part of whatever batch the stage runs next: under one lock hold that lasts the
    /// batch's transaction. When the user's lock is held elsewhere, the user batch waits
    /// out of the stage and is handed in again, [`IN_PROCESS_LOCK_ATTEMPTS`] times in all;
    /// after that its messages go on to a delay topic. Returns one result per record, in
    /// order, up to and including the first error; records after an error are not
    /// settled (the module guarantee applies to each).
    pub async fn process_user_batch(&self, jobs: Vec<Arc<Job>>) -> Vec<anyhow::Result<Outcome>> {
        metrics::histogram!("im_ingest_batch_size").record(jobs.len() as f64);
        let mut pauses_left = IN_PROCESS_LOCK_ATTEMPTS - 1;
        loop {
            match self.stage.submit(jobs.clone(), pauses_left).await {
                Ok(UnitReply::Done(results)) => return results,
                Ok(UnitReply::LockHeld) => {
                    metrics::counter!("im_ingest_lock_waits_total").increment(1);
                    tokio::time::sleep(IN_PROCESS_LOCK_PAUSE).await;
                    pauses_left -= 1;
                }
                Err(error) => return vec![Err(error)],
            }
        }
    }
}
