//! What the poll loop does when `worker.max_in_flight` records are in flight.
//!
//! Guarantee: memory stays bounded, the member stays in the group, and nothing is
//! skipped. A short wait (records finishing normally under a backlog) just waits for a
//! slot: nothing is paused and no fetched data is thrown away. A wait longer than
//! [`GRACE`] (e.g. the database is down and every record waits for it) pauses every
//! partition and keeps calling `recv()`, so `max.poll.interval.ms` never evicts the
//! member. Records delivered during the pause are dropped, and before resuming each
//! partition is sought back to its first record not tracked (librdkafka resumes after
//! the last record it delivered, so without the seek the dropped ones would be skipped).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Interval;

use super::hold::HeldPartitions;
use super::tracker::{OffsetTracker, TopicPartition};
use super::SEEK_TIMEOUT;
use crate::health::Health;

/// How long the loop waits for a free slot before it pauses the partitions. Well below
/// any sane `max.poll.interval.ms`, and long enough that a backlog draining at full speed
/// never pauses (pausing discards prefetched data, which then has to be fetched again).
pub const GRACE: Duration = Duration::from_secs(1);

/// The consumer state backpressure touches.
pub struct Loop<'a, C: ConsumerContext + 'static> {
    pub consumer: &'a StreamConsumer<C>,
    pub tracker: &'a Mutex<OffsetTracker>,
    pub held: &'a Mutex<HeldPartitions>,
    pub health: &'a Health,
    pub heartbeat: &'a mut Interval,
}

impl<C: ConsumerContext + 'static> Loop<'_, C> {
    /// A free in-flight slot, or `None` if `shutdown` completed first.
    pub async fn acquire(
        &mut self,
        permits: &Arc<Semaphore>,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> anyhow::Result<Option<OwnedSemaphorePermit>> {
        if let Ok(permit) = permits.clone().try_acquire_owned() {
            return Ok(Some(permit));
        }
        let grace = tokio::time::sleep(GRACE);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(None),
                _ = self.heartbeat.tick() => self.health.beat(),
                permit = permits.clone().acquire_owned() => {
                    return Ok(Some(permit.context("in-flight semaphore closed")?));
                }
                _ = &mut grace => break,
            }
        }
        // Still full after the grace period: pause every partition but keep polling, so
        // the group keeps this member and no rebalance moves the partitions around.
        let paused = self.pause_all();
        let in_flight = self
            .tracker
            .lock()
            .expect("tracker lock poisoned")
            .in_flight();
        tracing::warn!(
            in_flight,
            "in-flight limit reached for longer than {GRACE:?}: partitions paused until records finish"
        );
        let mut dropped: HashMap<TopicPartition, i64> = HashMap::new();
        let permit = loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(None),
                _ = self.heartbeat.tick() => self.health.beat(),
                permit = permits.clone().acquire_owned() => {
                    break permit.context("in-flight semaphore closed")?;
                }
                message = self.consumer.recv() => match message {
                    // Fetched before the pause: dropped now, fetched again after the seek.
                    Ok(message) => {
                        let tp = (message.topic().to_string(), message.partition());
                        let lowest = dropped.entry(tp).or_insert(message.offset());
                        *lowest = (*lowest).min(message.offset());
                    }
                    Err(error) => tracing::warn!(%error, "Kafka consumer error"),
                },
            }
        };
        self.resume(paused, &dropped);
        Ok(Some(permit))
    }

    fn pause_all(&self) -> TopicPartitionList {
        let assigned = self.consumer.assignment().unwrap_or_default();
        if let Err(error) = self.consumer.pause(&assigned) {
            tracing::warn!(%error, "pausing partitions for backpressure failed");
        }
        metrics::gauge!("im_ingest_backpressure").set(1.0);
        assigned
    }

    /// Resumes what [`Loop::pause_all`] paused — except delay partitions still held for
    /// a due time — each sought back to its first record not tracked: one past the last
    /// tracked, else the lowest dropped; a partition with neither delivered nothing, so
    /// it resumes where it was. Partitions assigned during the pause were never paused,
    /// but records of theirs may have been dropped too: they are sought back as well.
    fn resume(&self, paused: TopicPartitionList, dropped: &HashMap<TopicPartition, i64>) {
        let assigned = self.consumer.assignment().unwrap_or_default();
        let mut partitions: BTreeSet<TopicPartition> = paused
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        partitions.extend(dropped.keys().cloned());
        let mut resume = TopicPartitionList::new();
        for tp in partitions {
            let still_assigned = assigned.find_partition(&tp.0, tp.1).is_some();
            if !still_assigned || self.held.lock().expect("held lock poisoned").is_held(&tp) {
                continue;
            }
            let tracked = self
                .tracker
                .lock()
                .expect("tracker lock poisoned")
                .next_offset(&tp);
            if let Some(offset) = tracked.or_else(|| dropped.get(&tp).copied()) {
                let seek = self
                    .consumer
                    .seek(&tp.0, tp.1, Offset::Offset(offset), SEEK_TIMEOUT);
                if let Err(error) = seek {
                    tracing::warn!(%error, topic = %tp.0, partition = tp.1, offset,
                        "seeking back after backpressure failed");
                }
            }
            resume.add_partition(&tp.0, tp.1);
        }
        if let Err(error) = self.consumer.resume(&resume) {
            tracing::warn!(%error, "resuming partitions after backpressure failed");
        }
        metrics::gauge!("im_ingest_backpressure").set(0.0);
        tracing::info!("in-flight records finished: partitions resumed");
    }
}
