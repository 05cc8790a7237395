//! What the poll loop does when `worker.max_in_flight` records, or records of
//! `worker.max_in_flight_bytes` bytes, are in flight.
//!
//! Guarantee: memory stays bounded, the instance's members stay in the group, and
//! nothing is skipped. A short wait (records finishing normally under a backlog) just
//! waits for a slot: nothing is paused and no fetched data is thrown away. A wait longer
//! than [`GRACE`] (e.g. the database is down and every record waits for it) pauses every
//! partition of every member and keeps calling `recv()` on each, so
//! `max.poll.interval.ms` never evicts one. Records delivered during the pause are
//! dropped, and before resuming each partition is sought back to its first record not
//! tracked (librdkafka resumes after the last record it delivered, so without the seek
//! the dropped ones would be skipped); the pauses, seeks and resumes are each member's
//! `partitions`' own.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Interval;

use super::member::{recv_any, Member};
use super::tracker::TopicPartition;
use crate::health::Health;

/// How long the loop waits for a free slot before it pauses the partitions. Well below
/// any sane `max.poll.interval.ms`, and long enough that a backlog draining at full speed
/// never pauses (pausing discards prefetched data, which then has to be fetched again).
pub const GRACE: Duration = Duration::from_secs(1);

/// The consumer state backpressure touches.
pub struct Loop<'a> {
    pub members: &'a [Arc<Member>],
    pub health: &'a Health,
    pub heartbeat: &'a mut Interval,
}

impl Loop<'_> {
    /// `count` free in-flight permits of `permits` (records or bytes), or `None` if
    /// `shutdown` completed first.
    pub async fn acquire(
        &mut self,
        permits: &Arc<Semaphore>,
        count: u32,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> anyhow::Result<Option<OwnedSemaphorePermit>> {
        if let Ok(permit) = permits.clone().try_acquire_many_owned(count) {
            return Ok(Some(permit));
        }
        let grace = tokio::time::sleep(GRACE);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(None),
                _ = self.heartbeat.tick() => self.health.beat(),
                permit = permits.clone().acquire_many_owned(count) => {
                    return Ok(Some(permit.context("in-flight semaphore closed")?));
                }
                _ = &mut grace => break,
            }
        }
        // Still full after the grace period: pause every partition but keep polling, so
        // the group keeps this member and no rebalance moves the partitions around.
        let paused: Vec<Vec<TopicPartition>> = self
            .members
            .iter()
            .map(|m| m.partitions().pause_all(&m.consumer))
            .collect();
        metrics::gauge!("im_ingest_backpressure").set(1.0);
        let in_flight: usize = self
            .members
            .iter()
            .map(|m| m.partitions().in_flight())
            .sum();
        tracing::warn!(
            in_flight,
            "in-flight limit reached for longer than {GRACE:?}: partitions paused until records finish"
        );
        let mut dropped: HashMap<TopicPartition, i64> = HashMap::new();
        let mut turn = 0;
        let permit = loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(None),
                _ = self.heartbeat.tick() => self.health.beat(),
                permit = permits.clone().acquire_many_owned(count) => {
                    break permit.context("in-flight semaphore closed")?;
                }
                (_, message) = recv_any(self.members, &mut turn) => match message {
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
        for (member, paused) in self.members.iter().zip(paused) {
            member
                .partitions()
                .resume_after_backpressure(&member.consumer, paused, &dropped);
        }
        metrics::gauge!("im_ingest_backpressure").set(0.0);
        tracing::info!("in-flight records finished: partitions resumed");
        Ok(Some(permit))
    }
}
