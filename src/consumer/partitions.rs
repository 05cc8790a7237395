//! The one owner of every assigned partition's state (DESIGN.md, "Module map"): offsets
//! in flight and the position that may be stored (`tracker`), delay partitions held
//! until their head record is due (`hold`), and every pause, seek, resume and offset
//! store the worker makes.
//!
//! Guarantee: a partition that was paused with records dropped is resumed only after
//! the seek back to its first record not tracked succeeded. A seek that fails leaves the
//! partition paused, its records still dropped, and is tried again on every tick
//! ([`Partitions::retry_seeks`]) — resuming without it would make librdkafka go on after
//! the last record it delivered, skipping the dropped ones. A stored offset never passes
//! a record whose effect is not durable (see `tracker`). Revoked partitions are
//! forgotten at once: their held state, pending seeks and in-flight records (abandoned
//! to the next owner, which the dispatcher checks with [`Partitions::is_current`]
//! before it processes queued work, even when the next owner is this member again).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::hold::HeldPartitions;
use super::tracker::{OffsetTracker, TopicPartition};
use crate::pipeline::now_millis;

/// How long a seek may take before it counts as failed.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct Partitions {
    tracker: OffsetTracker,
    held: HeldPartitions,
    /// Paused partitions whose seek back failed: the offset to seek to before resuming.
    seeks: HashMap<TopicPartition, i64>,
}

impl Partitions {
    /// Whether records now delivered from `tp` are to be processed: not while it is held
    /// for a due time or waits for a seek (they are fetched again after the seek back).
    pub fn accepts(&self, tp: &TopicPartition) -> bool {
        !self.held.is_held(tp) && !self.seeks.contains_key(tp)
    }

    /// Whether a record received in `generation` (see [`Partitions::begin`]) still
    /// belongs to its partition's current assignment.
    pub fn is_current(&self, tp: &TopicPartition, generation: u64) -> bool {
        self.tracker.is_current(tp, generation)
    }

    /// A record was received and is now in flight; returns its assignment generation.
    pub fn begin(&mut self, tp: &TopicPartition, offset: i64) -> u64 {
        let before = self.counts();
        let generation = self.tracker.begin(tp, offset);
        self.report(before);
        generation
    }

    /// Records in flight across all partitions.
    pub fn in_flight(&self) -> usize {
        self.tracker.in_flight()
    }

    /// Marks the record durable and stores the partition's new contiguous position.
    pub fn complete<C: ConsumerContext>(
        &mut self,
        consumer: &impl Consumer<C>,
        tp: &TopicPartition,
        offset: i64,
        generation: u64,
    ) {
        let before = self.counts();
        let moved = self.tracker.complete(tp, offset, generation);
        self.report(before);
        let Some(position) = moved else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        if let Err(error) = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(position)) {
            tracing::error!(%error, "building the offset list failed");
            return;
        }
        if let Err(error) = consumer.store_offsets(&tpl) {
            // The partition was revoked meanwhile: abandoned, its next owner redelivers.
            tracing::debug!(%error, topic = %tp.0, partition = tp.1, position, "offset not stored");
        }
    }

    /// Newly assigned partitions start unpaused, whatever this member did with them
    /// before a revoke: their state was forgotten, so a pause left on one would stall it
    /// for good.
    pub fn assigned<C: ConsumerContext>(
        &mut self,
        consumer: &impl Consumer<C>,
        tpl: &TopicPartitionList,
    ) {
        if tpl.count() > 0 {
            if let Err(error) = consumer.resume(tpl) {
                tracing::warn!(%error, "resuming newly assigned partitions");
            }
        }
    }

    /// Forgets revoked partitions; returns how many records were in flight there.
    pub fn revoke(&mut self, tps: &[TopicPartition]) -> usize {
        let before = self.counts();
        self.held.forget(tps);
        for tp in tps {
            self.seeks.remove(tp);
        }
        let abandoned = self.tracker.revoke(tps);
        self.report(before);
        abandoned
    }

    /// Pauses `tp` until `due_at` because its head record (at `offset`) is not due yet.
    pub fn hold<C: ConsumerContext>(
        &mut self,
        consumer: &impl Consumer<C>,
        tp: TopicPartition,
        offset: i64,
        due_at: i64,
    ) {
        if let Err(error) = consumer.pause(&list_of([&tp])) {
            // Not paused: what it delivers meanwhile is dropped; the seek back fetches it.
            tracing::warn!(%error, topic = %tp.0, partition = tp.1, "pausing a delay partition failed");
        }
        tracing::debug!(topic = %tp.0, partition = tp.1, offset, wait_ms = due_at - now_millis(), "holding delay partition");
        let before = self.counts();
        self.held.hold(tp, offset, due_at);
        self.report(before);
    }

    /// Whether the head record at `offset` of `tp` was already held and released: it is
    /// not held again (see `hold`).
    pub fn was_released(&self, tp: &TopicPartition, offset: i64) -> bool {
        self.held.was_released(tp, offset)
    }

    /// The earliest due time of any held partition (epoch ms).
    pub fn next_due(&self) -> Option<i64> {
        self.held.next_due()
    }

    /// Seeks every due held partition back to its head record and resumes it.
    pub fn release_due<C: ConsumerContext>(&mut self, consumer: &impl Consumer<C>) {
        let before = self.counts();
        let due = self.held.take_due(now_millis());
        self.report(before);
        for (tp, offset) in due {
            self.seek_and_resume(consumer, tp, Some(offset));
        }
    }

    /// Pauses every assigned partition (backpressure); returns them.
    pub fn pause_all<C: ConsumerContext>(
        &mut self,
        consumer: &impl Consumer<C>,
    ) -> Vec<TopicPartition> {
        let assigned = consumer.assignment().unwrap_or_default();
        if let Err(error) = consumer.pause(&assigned) {
            tracing::warn!(%error, "pausing partitions for backpressure failed");
        }
        assigned
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect()
    }

    /// Resumes partitions paused by [`Partitions::pause_all`] — except those still held
    /// for a due time — each sought back to its first record not tracked: one past the
    /// last tracked, else the lowest dropped (`dropped`); a partition with neither
    /// delivered nothing and resumes where it was. Partitions no longer assigned are
    /// left alone.
    pub fn resume_after_backpressure<C: ConsumerContext>(
        &mut self,
        consumer: &impl Consumer<C>,
        paused: impl IntoIterator<Item = TopicPartition>,
        dropped: &HashMap<TopicPartition, i64>,
    ) {
        let assigned = consumer.assignment().unwrap_or_default();
        let partitions: BTreeSet<TopicPartition> =
            paused.into_iter().chain(dropped.keys().cloned()).collect();
        for tp in partitions {
            // Held ones wait for their due time; ones whose seek failed stay paused
            // until `retry_seeks` gets it done.
            if assigned.find_partition(&tp.0, tp.1).is_none()
                || self.held.is_held(&tp)
                || self.seeks.contains_key(&tp)
            {
                continue;
            }
            let offset = self
                .tracker
                .next_offset(&tp)
                .or_else(|| dropped.get(&tp).copied());
            self.seek_and_resume(consumer, tp, offset);
        }
    }

    /// Tries again every seek that failed; resumes each partition whose seek now succeeds.
    pub fn retry_seeks<C: ConsumerContext>(&mut self, consumer: &impl Consumer<C>) {
        let pending: Vec<(TopicPartition, i64)> = self.seeks.drain().collect();
        for (tp, offset) in pending {
            self.seek_and_resume(consumer, tp, Some(offset));
        }
    }

    /// Seeks `tp` to `offset` (if any) and resumes it; a failed seek leaves it paused and
    /// remembered for [`Partitions::retry_seeks`].
    fn seek_and_resume<C: ConsumerContext>(
        &mut self,
        consumer: &impl Consumer<C>,
        tp: TopicPartition,
        offset: Option<i64>,
    ) {
        if let Some(offset) = offset {
            if let Err(error) = seek(consumer, &tp, offset) {
                tracing::warn!(%error, topic = %tp.0, partition = tp.1, offset,
                    "seeking back failed: the partition stays paused and the seek is retried");
                metrics::counter!("im_ingest_seek_failures_total").increment(1);
                self.seeks.insert(tp, offset);
                return;
            }
        }
        if let Err(error) = consumer.resume(&list_of([&tp])) {
            tracing::warn!(%error, topic = %tp.0, partition = tp.1, "resuming a partition failed");
        }
    }

    /// Records in flight and partitions held: what the instance-wide gauges count.
    fn counts(&self) -> (usize, usize) {
        (self.tracker.in_flight(), self.held.count())
    }

    /// Moves `im_ingest_in_flight` and `im_ingest_held_partitions` by what a change of
    /// this member's state did since `before`: each member of the instance adds its own
    /// difference, so the gauges show the sum over the members (setting them would show
    /// whichever member changed last).
    fn report(&self, before: (usize, usize)) {
        let (in_flight, held) = self.counts();
        metrics::gauge!("im_ingest_in_flight").increment(in_flight as f64 - before.0 as f64);
        metrics::gauge!("im_ingest_held_partitions").increment(held as f64 - before.1 as f64);
    }
}

/// Seeks one partition; the `seek_fails` fail point makes it fail.
fn seek<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    tp: &TopicPartition,
    offset: i64,
) -> Result<(), KafkaError> {
    fail::fail_point!("seek_fails", |_| Err(KafkaError::Seek(
        "fail point seek_fails".to_string()
    )));
    consumer.seek(&tp.0, tp.1, Offset::Offset(offset), SEEK_TIMEOUT)
}

fn list_of<'a>(tps: impl IntoIterator<Item = &'a TopicPartition>) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for tp in tps {
        list.add_partition(&tp.0, tp.1);
    }
    list
}
