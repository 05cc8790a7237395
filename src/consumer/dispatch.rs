//! Hands prepared records to processing: different users concurrently, the same user's
//! records one at a time in arrival order.
//!
//! Guarantee: within this process, two records of one user are never processed at the
//! same time (so the process never conflicts with itself on the Redis lock), and a
//! record's offset is offered for storing only after its processing returned `Ok`
//! (durable). Each record holds its in-flight slot and bytes until then, so the records
//! in memory are bounded in number and in size. A failed processing (database down) is retried with
//! capped exponential backoff with jitter (so the records of many users waiting for one
//! database do not all come back at once) while the partition is still ours; once it is revoked the
//! record is abandoned to the partition's next owner. A fatal failure (one no retry can
//! mend, see `PublishError::Fatal`) is not retried: its records are left to redelivery
//! and the dispatcher asks the worker to stop ([`Dispatcher::fatal`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::member::Member;
use super::tracker::TopicPartition;
use crate::message::UserKey;
use crate::pipeline::{Job, Pipeline};
use crate::retry::publish::PublishError;

/// Most records of one user processed under one lock hold: enough to save most lock
/// round trips for a busy user, few enough that the hold (and the other workers'
/// conflicts with it) stays short.
pub const MAX_USER_BATCH: usize = 32;

/// A prepared record with its share of the in-flight bounds.
pub struct Work {
    pub job: Arc<Job>,
    /// The assignment of its partition the record was received in.
    pub generation: u64,
    /// The member (consumer) that received it: its partition's state and offsets.
    pub member: Arc<Member>,
    /// Held, never read: dropping it (when the record is done) frees the slot.
    pub _in_flight: InFlight,
}

/// A record's share of the in-flight bounds: its slot (`worker.max_in_flight`) and its
/// bytes (`worker.max_in_flight_bytes`), both freed when it is dropped.
pub struct InFlight {
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
    /// The record's real size (its share of the bound is capped at the whole bound).
    size: usize,
}

impl InFlight {
    pub fn new(slot: OwnedSemaphorePermit, bytes: OwnedSemaphorePermit, size: usize) -> Self {
        metrics::gauge!("im_ingest_in_flight_bytes").increment(size as f64);
        Self {
            _slot: slot,
            _bytes: bytes,
            size,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("im_ingest_in_flight_bytes").decrement(self.size as f64);
    }
}

impl Work {
    fn tp(&self) -> TopicPartition {
        (self.job.record.topic.clone(), self.job.record.partition)
    }

    /// Whether the record still belongs to its partition's current assignment.
    fn is_current(&self) -> bool {
        self.member
            .partitions()
            .is_current(&self.tp(), self.generation)
    }

    /// Marks the record durable and stores the partition's new contiguous position
    /// (under the partitions lock, so a revoke cannot slip in between).
    fn complete(&self) {
        self.member.partitions().complete(
            &self.member.consumer,
            &self.tp(),
            self.job.record.offset,
            self.generation,
        );
    }
}

pub struct Dispatcher {
    pipeline: Pipeline,
    /// Queued records of users being processed now; a user is present while its task runs.
    active: Mutex<HashMap<Option<UserKey>, VecDeque<Work>>>,
    cancel: CancellationToken,
    backoff: (Duration, Duration),
    /// The first fatal failure's reason; `stop` is cancelled when it is set.
    fatal: OnceLock<String>,
    stop: CancellationToken,
}

impl Dispatcher {
    pub fn new(
        pipeline: Pipeline,
        cancel: CancellationToken,
        backoff: (Duration, Duration),
    ) -> Arc<Self> {
        Arc::new(Self {
            pipeline,
            active: Mutex::new(HashMap::new()),
            cancel,
            backoff,
            fatal: OnceLock::new(),
            stop: CancellationToken::new(),
        })
    }

    /// Completes when a fatal failure happened; the worker should then stop.
    pub async fn stopped(&self) {
        self.stop.cancelled().await
    }

    /// The first fatal failure's reason, if one happened.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.get().cloned()
    }

    fn record_fatal(&self, reason: &str) {
        if self.fatal.set(reason.to_string()).is_ok() {
            tracing::error!(%reason, "fatal failure; stopping the worker");
            self.stop.cancel();
        }
    }

    /// Queues the record behind its user's earlier ones, or starts a task for the user.
    /// Invalid records (no user) each get a task of their own.
    pub fn dispatch(self: &Arc<Self>, work: Work) {
        let user = work.job.user();
        if user.is_some() {
            let mut active = self.active.lock().expect("dispatcher lock poisoned");
            if let Some(queue) = active.get_mut(&user) {
                queue.push_back(work);
                return;
            }
            active.insert(user.clone(), VecDeque::new());
        }
        tokio::spawn(self.clone().drain(user, work));
    }

    /// Runs the user's records until its queue is empty: the first alone, then whatever
    /// queued up meanwhile in batches of up to [`MAX_USER_BATCH`] (one lock hold each).
    async fn drain(self: Arc<Self>, user: Option<UserKey>, first: Work) {
        let mut batch = vec![first];
        loop {
            self.run(batch).await;
            if user.is_none() {
                return;
            }
            let mut active = self.active.lock().expect("dispatcher lock poisoned");
            if self.stop.is_cancelled() {
                // After a fatal failure: the user's later records stay behind the failed
                // one (redelivered in order after the restart), not written past it.
                active.remove(&user);
                return;
            }
            let Some(queue) = active.get_mut(&user) else {
                return;
            };
            // Queued records of partitions revoked meanwhile belong to their next owner:
            // processing them here would only repeat its delay and dead-letter records.
            let before = queue.len();
            queue.retain(|work| work.is_current());
            let dropped = before - queue.len();
            if dropped > 0 {
                metrics::counter!("im_ingest_revoked_records_dropped_total")
                    .increment(dropped as u64);
                tracing::info!(dropped, "queued records of revoked partitions dropped");
            }
            if queue.is_empty() {
                active.remove(&user);
                return;
            }
            let take = queue.len().min(MAX_USER_BATCH);
            batch = queue.drain(..take).collect();
        }
    }

    /// Processes one user's batch until every record in it is durable or abandoned.
    async fn run(&self, mut pending: Vec<Work>) {
        let mut pauses = retry_pauses(self.backoff.0, self.backoff.1);
        let started = std::time::Instant::now();
        loop {
            let results = self
                .pipeline
                .process_user_batch(pending.iter().map(|w| w.job.clone()).collect())
                .await;
            let done = results.iter().take_while(|r| r.is_ok()).count();
            let error = results.into_iter().find_map(Result::err);
            for work in pending.drain(..done) {
                metrics::histogram!("im_ingest_processing_seconds")
                    .record(started.elapsed().as_secs_f64());
                work.complete();
            }
            let Some(error) = error else {
                return;
            };
            if let Some(reason) = PublishError::fatal_in(&error) {
                // No retry mends it: the records stay uncommitted for the next start.
                self.record_fatal(reason);
                return;
            }
            // Records of revoked partitions are abandoned to their next owner; the rest
            // are retried while the partition is ours.
            let cancelled = self.cancel.is_cancelled();
            pending.retain(|work| {
                let record = &work.job.record;
                let keep = !cancelled && work.is_current();
                if !keep {
                    tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset,
                        error = format!("{error:#}"), "processing failed; record left to redelivery");
                }
                keep
            });
            let Some(head) = pending.first().map(|w| &w.job.record) else {
                return;
            };
            let pause = pauses.next().unwrap_or(self.backoff.1);
            tracing::warn!(topic = %head.topic, partition = head.partition, offset = head.offset,
                error = format!("{error:#}"), retry_in_ms = pause.as_millis() as u64,
                "processing failed; retrying");
            tokio::select! {
                _ = self.cancel.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// The pauses between attempts of a failed write: from `initial`, doubling up to `max`,
/// each lengthened by a random part of itself (backon's jitter), without end.
fn retry_pauses(initial: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(initial)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_pauses_double_from_the_first_stay_below_twice_the_cap_and_vary() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_millis(5_000));
        let pauses: Vec<Duration> = retry_pauses(initial, max).take(12).collect();
        assert!(
            pauses[0] >= initial && pauses[0] < initial * 2,
            "{pauses:?}"
        );
        assert!(pauses[3] >= initial * 8, "doubling: {pauses:?}");
        assert!(pauses.iter().all(|p| *p < max * 2), "capped: {pauses:?}");
        assert!(pauses[10] >= max, "reaches the cap: {pauses:?}");
        let again: Vec<Duration> = retry_pauses(initial, max).take(12).collect();
        assert_ne!(pauses, again, "jittered: two sequences are not the same");
    }
}
