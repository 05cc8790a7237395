//! One record (or a batch of them) from decoded to durable: lock → write → release →
//! outcome (DESIGN.md, "Flow").
//!
//! Guarantee: when [`Pipeline::process`] returns `Ok`, the record's effect is durable —
//! its rows committed, or the record acknowledged by the delay or dead-letter topic — so
//! its offset may be stored. An `Err` means nothing about the record is settled and it
//! must be processed again (the writes are idempotent, so "again" is always safe). Bad
//! input is dead-lettered, never retried; a lock held elsewhere is tried again
//! in-process for at most 150 ms, then the record goes to a delay topic instead of
//! waiting longer; a Redis that fails is bypassed (degraded mode) because
//! the unique indexes alone already prevent duplicates. So is a lock that kept changing
//! hands until the record's last attempt (see `contention`).

mod contention;
mod deferred;
mod degraded;
mod record;
mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::MySqlPool;

use contention::{changed_hands, lock_held_message};
pub use deferred::DATABASE_REJECTED_FQCN;
pub use degraded::RedisHealth;
pub use record::{now_millis, Job, Record};
pub use writer::BatchWriter;

use crate::config::LockMode;
use crate::lock::{Acquire, LockClient, LockGuard};
use crate::message::{ChatMessage, Inbound, UserKey, INVALID_MESSAGE_FQCN};
use crate::retry::headers::RetryHeaders;
use crate::retry::policy::{NextStep, RetryPolicy};
use crate::retry::publish::Publisher;
use crate::store::{write_message, Provenance, WriteOutcome};

/// Gives a batch's lock back. A failure only leaves the key to expire with its lease; the
/// data is safe either way.
async fn release(lock: Option<LockGuard>) {
    if let Some(guard) = lock {
        if let Err(error) = guard.release().await {
            tracing::warn!(%error, "releasing the user lock failed");
        }
    }
}

/// What became of one record of a user batch, or that it waits for the batch's write.
enum Step<'a> {
    Done(Outcome),
    Write(&'a ChatMessage),
}

/// Lock attempts a user batch makes in-process before its message goes to a delay topic (DESIGN.md,
/// "Lock conflict is never a sleep"): a holder elsewhere usually finishes its batch — one
/// transaction — within them, so workers of one group rarely send each other's users'
/// records through the delay topics. Not delivery attempts: the retry headers do not
/// count them.
const IN_PROCESS_LOCK_ATTEMPTS: u32 = 4;
/// Pause between those attempts: 3 pauses, 150 ms in all, inside the contract's 200 ms.
/// Only the waiting user's task sleeps; the partition's other users go on, and the
/// record keeps its in-flight slot.
const IN_PROCESS_LOCK_PAUSE: Duration = Duration::from_millis(50);

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

/// Everything the processing step needs; cheap to clone (handles only).
#[derive(Clone)]
pub struct Pipeline {
    pub pool: MySqlPool,
    pub locks: LockClient,
    pub publisher: Publisher,
    pub policy: RetryPolicy,
    pub retry_topic_prefix: String,
    pub dlq_topic: String,
    pub consumer_group: String,
    pub max_message_bytes: usize,
    /// `lock.mode`: with `None`, records are written without the user lock.
    pub lock_mode: LockMode,
    /// The write stage every user batch hands its messages to.
    writer: BatchWriter,
    redis_health: Arc<RedisHealth>,
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
        let defaults = crate::config::WorkerSettings::default();
        let writer = BatchWriter::start(
            pool.clone(),
            defaults.write_concurrency,
            defaults.write_batch_messages,
        );
        Self {
            pool,
            locks,
            publisher,
            policy,
            retry_topic_prefix,
            dlq_topic,
            consumer_group,
            max_message_bytes,
            lock_mode: LockMode::Redis,
            writer,
            redis_health: Arc::new(RedisHealth::new(redis_probe_interval)),
        }
    }

    /// Switches the user lock on or off (`lock.mode`; on by default).
    pub fn with_lock_mode(mut self, mode: LockMode) -> Self {
        self.lock_mode = mode;
        self
    }

    /// Sizes the shared write stage (`worker.write_concurrency`,
    /// `worker.write_batch_messages`).
    pub fn with_write_stage(mut self, concurrency: usize, max_messages: usize) -> Self {
        self.writer = BatchWriter::start(self.pool.clone(), concurrency, max_messages);
        self
    }

    pub fn prepare(&self, record: Record) -> Job {
        Job::prepare(record, self.max_message_bytes, &self.consumer_group)
    }

    /// Processes a batch: users concurrently, each user's records one at a time in
    /// batch order under one lock (see [`Pipeline::process_user_batch`]). Returns one
    /// outcome per record, in input order; stops at the first error (see the module
    /// guarantee).
    pub async fn process_batch(&self, records: Vec<Record>) -> anyhow::Result<Vec<Outcome>> {
        let mut by_user: HashMap<Option<UserKey>, Vec<(usize, Job)>> = HashMap::new();
        let count = records.len();
        for (index, record) in records.into_iter().enumerate() {
            let job = self.prepare(record);
            by_user.entry(job.user()).or_default().push((index, job));
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (_, indexed) in by_user {
            let pipeline = self.clone();
            tasks.spawn(async move {
                let (indexes, jobs): (Vec<usize>, Vec<Job>) = indexed.into_iter().unzip();
                let results = pipeline.process_user_batch(jobs.iter()).await;
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
    pub async fn process(&self, job: &Job) -> anyhow::Result<Outcome> {
        let mut results = self.process_user_batch(std::iter::once(job)).await;
        results.pop().expect("one record, one result")
    }

    /// Processes records of one user in order, holding the user's lock across them once
    /// it is taken (one acquisition and one release for the batch, instead of one per
    /// record). Until it is taken, each message tries it anew, so a conflict delays only
    /// the records that met it. The messages to store are written together, in one
    /// transaction, before the lock is released (see `deferred`): a hold lasts one pass
    /// over the batch (no I/O once the lock is held), the wait for a free writer and one
    /// transaction — normally far below a quarter of the lease
    /// (`LockClient::longest_hold`; a database stall stretches it) — so a record of this user
    /// delayed elsewhere, which waits longer than that before its last attempt, never
    /// meets one busy holder at both of its last two attempts, which would read as a
    /// stuck lock and dead-letter it (see `contention`). Returns one result per record,
    /// in order, up to and including the first error; records after an error are not
    /// attempted (the module guarantee applies to each).
    pub async fn process_user_batch<'a>(
        &self,
        jobs: impl ExactSizeIterator<Item = &'a Job> + Send,
    ) -> Vec<anyhow::Result<Outcome>> {
        metrics::histogram!("im_ingest_batch_size").record(jobs.len() as f64);
        let mut lock: Option<LockGuard> = None;
        // In-process pauses left to this batch: once they are spent on a lock that stays
        // held, the batch's other messages go straight to the delay topic.
        let mut pauses = IN_PROCESS_LOCK_ATTEMPTS - 1;
        let mut results = deferred::Results::with_capacity(jobs.len());
        for job in jobs {
            match self.process_with(job, &mut lock, &mut pauses).await {
                Ok(Step::Done(outcome)) => results.settled(Ok(outcome)),
                Ok(Step::Write(message)) => results.defer(job, message),
                Err(error) => {
                    if self.write_deferred(&mut results).await {
                        results.settled(Err(error));
                    }
                    break;
                }
            }
        }
        self.write_deferred(&mut results).await;
        release(lock).await;
        results.into_results()
    }

    /// One record of a user batch; `lock` is the user's lock once this batch took it.
    /// A message to store comes back as [`Step::Write`], for the batch's next write.
    #[tracing::instrument(skip_all, fields(topic = %job.record.topic, partition = job.record.partition, offset = job.record.offset))]
    async fn process_with<'a>(
        &self,
        job: &'a Job,
        lock: &mut Option<LockGuard>,
        pauses: &mut u32,
    ) -> anyhow::Result<Step<'a>> {
        let outcome = match &job.content {
            Err(invalid) => {
                tracing::warn!(reason = %invalid, "invalid record, dead-lettering it");
                self.dead_letter(job, job.attempts, INVALID_MESSAGE_FQCN, &invalid.0)
                    .await?
            }
            Ok(Inbound::Read(_)) => Outcome::ReadReceipt,
            Ok(Inbound::Message(message)) => {
                match self.store_under_lock(job, message, lock, pauses).await? {
                    Some(outcome) => outcome,
                    None => return Ok(Step::Write(message)),
                }
            }
        };
        metrics::counter!("im_ingest_records_total", "outcome" => outcome.label()).increment(1);
        Ok(Step::Done(outcome))
    }

    /// `None` when the message is to be written (under `lock`, or without the lock when
    /// it is off or Redis is failing); otherwise what became of it instead.
    async fn store_under_lock(
        &self,
        job: &Job,
        message: &ChatMessage,
        lock: &mut Option<LockGuard>,
        pauses: &mut u32,
    ) -> anyhow::Result<Option<Outcome>> {
        if lock.is_some() || self.lock_mode == LockMode::None {
            return Ok(None);
        }
        if !self.redis_health.should_try_lock(Instant::now()) {
            metrics::counter!("im_ingest_unlocked_writes_total").increment(1);
            return Ok(None);
        }
        let user = message.user();
        loop {
            match self.locks.acquire(&user).await {
                Ok(Acquire::Acquired(guard)) => {
                    self.redis_health.record_success();
                    *lock = Some(guard);
                    return Ok(None);
                }
                Ok(Acquire::HeldElsewhere { remaining, holder }) => {
                    self.redis_health.record_success();
                    if *pauses > 0 {
                        // Behind the holder's batch, which lasts one transaction; only
                        // this user's records wait (see `IN_PROCESS_LOCK_PAUSE`).
                        metrics::counter!("im_ingest_lock_waits_total").increment(1);
                        tokio::time::sleep(IN_PROCESS_LOCK_PAUSE).await;
                        *pauses -= 1;
                        continue;
                    }
                    return self
                        .retry_later(job, message, remaining, holder)
                        .await
                        .map(Some);
                }
                Err(error) => {
                    self.redis_health.record_failure(Instant::now(), &error);
                    metrics::counter!("im_ingest_unlocked_writes_total").increment(1);
                    return Ok(None);
                }
            }
        }
    }

    async fn write(&self, job: &Job, message: &ChatMessage) -> anyhow::Result<Outcome> {
        let provenance = Provenance {
            topic: job.origin.topic.clone(),
            partition: job.origin.partition,
            offset: job.origin.offset,
        };
        crate::failpoint::delay("slow_db_write").await;
        let outcome = write_message(&self.pool, message, &provenance)
            .await
            .context("writing the message to the database")?;
        fail::fail_point!("after_db_commit", |_| crate::failpoint::crash(
            "after_db_commit"
        ));
        Ok(match outcome {
            WriteOutcome::Stored => Outcome::Stored,
            WriteOutcome::Duplicate => Outcome::Duplicate,
        })
    }

    /// The lock is held elsewhere: to the next delay topic; once the attempts are used
    /// up, to the dead-letter topic, or written without the lock if it changed hands
    /// since the previous attempt (see `contention`). Never a sleep.
    async fn retry_later(
        &self,
        job: &Job,
        message: &ChatMessage,
        remaining: Option<Duration>,
        holder: Option<String>,
    ) -> anyhow::Result<Outcome> {
        match self
            .policy
            .next(job.attempts, remaining, rand::random::<f64>())
        {
            NextStep::Delay {
                delay,
                attempts,
                wait,
            } => {
                let topic = RetryPolicy::topic_for(&self.retry_topic_prefix, delay);
                let headers = self.headers(
                    job,
                    attempts,
                    now_millis() + wait.as_millis() as i64,
                    LOCK_HELD_FQCN,
                    &lock_held_message("user lock held elsewhere", holder.as_deref()),
                );
                self.publisher
                    .publish_for_user(&topic, &job.record, &headers, &message.user())
                    .await?;
                fail::fail_point!("after_delay_publish", |_| crate::failpoint::crash(
                    "after_delay_publish"
                ));
                metrics::counter!("im_ingest_retries_total", "attempt" => attempts.to_string())
                    .increment(1);
                Ok(Outcome::Delayed { topic })
            }
            NextStep::DeadLetter { .. }
                if changed_hands(job.previous_holder.as_deref(), holder.as_deref()) =>
            {
                tracing::info!(
                    attempts = job.attempts,
                    "lock changed hands since the last attempt; writing without it"
                );
                metrics::counter!("im_ingest_contended_writes_total").increment(1);
                self.write(job, message).await
            }
            NextStep::DeadLetter { attempts } => {
                let reason = lock_held_message(
                    &format!("user lock held elsewhere through {attempts} attempts"),
                    holder.as_deref(),
                );
                self.dead_letter(job, attempts, LOCK_HELD_FQCN, &reason)
                    .await
            }
        }
    }

    async fn dead_letter(
        &self,
        job: &Job,
        attempts: u32,
        fqcn: &str,
        reason: &str,
    ) -> anyhow::Result<Outcome> {
        let headers = self.headers(job, attempts, now_millis(), fqcn, reason);
        self.publisher
            .publish(&self.dlq_topic, &job.record, &headers)
            .await?;
        metrics::counter!("im_ingest_dead_letters_total", "reason" => fqcn.to_string())
            .increment(1);
        Ok(Outcome::DeadLettered {
            reason: reason.to_string(),
        })
    }

    fn headers(
        &self,
        job: &Job,
        attempts: u32,
        due_at: i64,
        fqcn: &str,
        message: &str,
    ) -> RetryHeaders {
        RetryHeaders {
            attempts: i64::from(attempts),
            backoff_timestamp: due_at,
            origin: job.origin.clone(),
            exception_fqcn: fqcn.to_string(),
            exception_message: message.to_string(),
        }
    }
}
