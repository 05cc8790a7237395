//! One batch through the stages, top to bottom: classify → lock → write → release →
//! route → answer.
//!
//! Guarantee: every user batch of the batch gets one answer, and its results are a
//! prefix of settled records followed by at most one error — so its caller processes
//! the rest again, idempotently. A user's rows are written only under the user's lock
//! (taken for the whole batch in one pipelined round trip), or without it when the lock
//! is off, Redis is failing, or the lock kept changing hands until the last attempt.
//! Locks are released (one pipeline) as soon as the transaction has ended, together
//! with the unread copy and before any delay or dead-letter record is published, so a
//! hold lasts one transaction.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::contention::{changed_hands, lock_held_message};
use super::degraded::RedisHealth;
use super::route::Route;
use super::stage::{Unit, UnitReply};
use super::write::UnreadChanges;
use super::{Job, Outcome, LOCK_HELD_FQCN};
use crate::config::LockMode;
use crate::lock::{Acquire, LockClient, LockGuard};
use crate::message::{Inbound, UserKey, INVALID_MESSAGE_FQCN};
use crate::retry::policy::{NextStep, RetryPolicy};
use crate::retry::publish::Publisher;
use crate::store::BatchConnection;
use crate::unread::Unread;

/// What the stages need; shared by every batch.
#[derive(Clone)]
pub(super) struct Stages {
    pub pool: sqlx::MySqlPool,
    pub locks: LockClient,
    pub publisher: Publisher,
    pub policy: RetryPolicy,
    pub retry_topic_prefix: String,
    pub dlq_topic: String,
    /// `lock.mode`: with `None`, records are written without the user lock.
    pub lock_mode: LockMode,
    pub redis_health: Arc<RedisHealth>,
    /// Users whose last write stalled in the database (see `write`).
    pub stalled_users: Arc<Mutex<HashSet<UserKey>>>,
    /// Where committed unread changes are copied (Redis) or noted.
    pub unread: Unread,
}

/// Where one record of a user batch stands.
pub(super) enum Step {
    Settled(anyhow::Result<Outcome>),
    /// Its message or read receipt is to be written in the batch's transaction.
    Write,
    /// To be published to a delay or dead-letter topic.
    Route(Box<Route>),
    /// Not settled: an earlier record's error stands for it.
    Unsettled,
}

/// A user batch on its way through the stages.
pub(super) struct Pending {
    pub jobs: Vec<Arc<Job>>,
    pub steps: Vec<Step>,
    /// The user's lock, while this batch holds it.
    pub guard: Option<LockGuard>,
    pauses_left: u32,
    reply: oneshot::Sender<UnitReply>,
}

impl Pending {
    /// The jobs whose messages are to be written, with their index.
    pub fn to_write(&self) -> impl Iterator<Item = (usize, &Arc<Job>)> {
        self.steps
            .iter()
            .enumerate()
            .filter(|(_, step)| matches!(step, Step::Write))
            .map(|(index, _)| (index, &self.jobs[index]))
    }

    pub fn user(&self) -> Option<UserKey> {
        self.to_write().find_map(|(_, job)| job.user())
    }

    /// The results up to and including the first error; see the module guarantee.
    fn answer(self) {
        let mut results = Vec::with_capacity(self.steps.len());
        for step in self.steps {
            match step {
                Step::Settled(Ok(outcome)) => {
                    metrics::counter!("im_ingest_records_total", "outcome" => outcome.label())
                        .increment(1);
                    results.push(Ok(outcome));
                }
                Step::Settled(Err(error)) => {
                    results.push(Err(error));
                    break;
                }
                Step::Write | Step::Route(_) | Step::Unsettled => {
                    results.push(Err(anyhow::anyhow!("a record was left unsettled")));
                    break;
                }
            }
        }
        let _ = self.reply.send(UnitReply::Done(results));
    }
}

impl Stages {
    /// Runs the batch and answers every user batch in it.
    pub async fn run(&self, mut connection: BatchConnection, units: Vec<Unit>) {
        let mut batch: Vec<Pending> = units.into_iter().map(|unit| self.classify(unit)).collect();
        let started = Instant::now();
        self.lock(&mut batch).await;
        timed("lock", started);
        // The hold counts from before the locks were asked for: it never ends later
        // than `lock.max_hold_ms` after any of them was taken.
        let holds = batch.iter().any(|pending| pending.guard.is_some());
        connection.set_hold_end(holds.then(|| started + self.locks.max_hold()));
        let started = Instant::now();
        let unread = self.write(&mut connection, &mut batch).await;
        timed("write", started);
        // Back to the pool before Redis: the unread copy may need a connection of its
        // own (a note, a rebuild), and must not wait for one this batch holds.
        drop(connection);
        // The locks go back and the unread copy goes out at once: both are Redis round
        // trips on one multiplexed connection, so they share one wait.
        let guards = batch.iter_mut().filter_map(|p| p.guard.take()).collect();
        let started = Instant::now();
        tokio::join!(
            async {
                self.release(guards).await;
                timed("release", started);
            },
            async {
                self.publish_unread(&unread).await;
                timed("unread", started);
            }
        );
        let started = Instant::now();
        self.route(&mut batch).await;
        timed("route", started);
        for pending in batch {
            pending.answer();
        }
    }

    /// What each record needs, before any I/O: invalid records are routed to the
    /// dead-letter topic, messages and read receipts wait for the write.
    fn classify(&self, unit: Unit) -> Pending {
        let steps = unit
            .jobs
            .iter()
            .map(|job| match &job.content {
                Err(invalid) => {
                    tracing::warn!(topic = %job.record.topic, partition = job.record.partition,
                        offset = job.record.offset, reason = %invalid, "invalid record, dead-lettering it");
                    Step::Route(Box::new(Route::dead_letter(
                        &self.dlq_topic,
                        job,
                        job.attempts,
                        INVALID_MESSAGE_FQCN,
                        &invalid.0,
                    )))
                }
                Ok(Inbound::Read(_) | Inbound::Message(_)) => Step::Write,
            })
            .collect();
        Pending {
            jobs: unit.jobs,
            steps,
            guard: None,
            pauses_left: unit.pauses_left,
            reply: unit.reply,
        }
    }

    /// Takes the lock of every user with something to write, in one round trip. A user
    /// batch whose lock is held elsewhere is answered `LockHeld` while it may still
    /// pause, or its messages are routed on (see [`Stages::lock_held`]). Each lock taken
    /// is kept in its user batch.
    async fn lock(&self, batch: &mut Vec<Pending>) {
        let wanting: Vec<(usize, UserKey)> = batch
            .iter()
            .enumerate()
            .filter_map(|(index, pending)| pending.user().map(|user| (index, user)))
            .collect();
        if wanting.is_empty() || self.lock_mode == LockMode::None {
            return;
        }
        let unlocked_writes = || {
            let writes = batch.iter().map(|p| p.to_write().count()).sum::<usize>();
            metrics::counter!("im_ingest_unlocked_writes_total").increment(writes as u64);
        };
        if !self.redis_health.should_try_lock(Instant::now()) {
            unlocked_writes();
            return;
        }
        let users: Vec<UserKey> = wanting.iter().map(|(_, user)| user.clone()).collect();
        let answers = match self.locks.acquire_many(&users).await {
            Ok(answers) => answers,
            Err(error) => {
                self.redis_health.record_failure(Instant::now(), &error);
                unlocked_writes();
                return;
            }
        };
        self.redis_health.record_success();
        let mut waiting = Vec::new();
        for ((index, _), answer) in wanting.into_iter().zip(answers) {
            match answer {
                Acquire::Acquired(guard) => batch[index].guard = Some(guard),
                Acquire::HeldElsewhere { .. } if batch[index].pauses_left > 0 => {
                    waiting.push(index);
                }
                Acquire::HeldElsewhere { remaining, holder } => {
                    let pending = &mut batch[index];
                    for (position, job) in pending.jobs.iter().enumerate() {
                        if matches!(pending.steps[position], Step::Write) {
                            pending.steps[position] =
                                self.lock_held(job, remaining, holder.as_deref());
                        }
                    }
                }
            }
        }
        // Out of the batch: they pause and are handed in again.
        for index in waiting.into_iter().rev() {
            let _ = batch.swap_remove(index).reply.send(UnitReply::LockHeld);
        }
    }

    /// A message whose lock is held elsewhere, with no in-process pause left: to the
    /// next delay topic; once the attempts are used up, to the dead-letter topic, or
    /// written without the lock if it changed hands since the previous attempt (see
    /// `contention`). Never a sleep.
    fn lock_held(
        &self,
        job: &Job,
        remaining: Option<std::time::Duration>,
        holder: Option<&str>,
    ) -> Step {
        match self
            .policy
            .next(job.attempts, remaining, rand::random::<f64>())
        {
            NextStep::Delay {
                delay,
                attempts,
                wait,
            } => {
                let reason = lock_held_message("user lock held elsewhere", holder);
                Step::Route(Box::new(self.delay_route(
                    job,
                    (delay, attempts, wait),
                    LOCK_HELD_FQCN,
                    &reason,
                )))
            }
            NextStep::DeadLetter { .. }
                if changed_hands(job.previous_holder.as_deref(), holder) =>
            {
                tracing::info!(
                    attempts = job.attempts,
                    "lock changed hands since the last attempt; writing without it"
                );
                metrics::counter!("im_ingest_contended_writes_total").increment(1);
                Step::Write
            }
            NextStep::DeadLetter { attempts } => {
                let reason = lock_held_message(
                    &format!("user lock held elsewhere through {attempts} attempts"),
                    holder,
                );
                Step::Route(Box::new(Route::dead_letter(
                    &self.dlq_topic,
                    job,
                    attempts,
                    LOCK_HELD_FQCN,
                    &reason,
                )))
            }
        }
    }

    /// The route of a message to the delay topic of `delay`, as attempt `attempts`, due
    /// after `wait` (a [`NextStep::Delay`]).
    pub(super) fn delay_route(
        &self,
        job: &Job,
        (delay, attempts, wait): (Duration, u32, Duration),
        fqcn: &str,
        reason: &str,
    ) -> Route {
        let topic = RetryPolicy::topic_for(&self.retry_topic_prefix, delay);
        let due_at = super::now_millis() + wait.as_millis() as i64;
        Route::delay(job, topic, attempts, due_at, fqcn, reason)
    }

    /// Copies the committed unread changes to Redis, or notes their agents for
    /// reconcile while Redis is failing (degraded mode, whatever `lock.mode`). Before
    /// the batch is answered, so a crash before the note leaves the records to be
    /// processed again (a copy carries its conversation's state again).
    async fn publish_unread(&self, changes: &UnreadChanges) {
        self.unread.note_uncertain(&changes.uncertain).await;
        let try_redis = self.redis_health.should_try_lock(Instant::now());
        let committed = &changes.committed;
        if let Some(error) = self.unread.publish(committed, try_redis).await {
            self.redis_health.record_failure(Instant::now(), &error);
        } else if try_redis && !committed.is_empty() {
            self.redis_health.record_success();
        }
    }

    /// Gives every lock back in one round trip. A failure only leaves the keys to
    /// expire with their leases; the data is safe either way.
    async fn release(&self, guards: Vec<LockGuard>) {
        if let Err(error) = self.locks.release_many(guards).await {
            tracing::warn!(%error, "releasing the user locks failed");
        }
    }
}

fn timed(stage: &'static str, started: Instant) {
    metrics::histogram!("im_ingest_stage_seconds", "stage" => stage)
        .record(started.elapsed().as_secs_f64());
}
