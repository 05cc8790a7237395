//! Kafka consumer-group membership, in-flight tracking and offset storing (DESIGN.md,
//! "Defence in depth", layer 3).
//!
//! Guarantee: automatic offset *storing* is off; an offset is stored only for the
//! contiguous done prefix of its partition (see `tracker`), and librdkafka's periodic
//! auto-commit sends only stored offsets — so a committed offset never passes a record
//! whose effect is not durable. On revoke, the revoked partitions' in-flight records
//! are abandoned to the next owner and the stored offsets are committed synchronously.
//! At shutdown, fetching stops, in-flight work gets up to the deadline to finish, and the
//! stored offsets are committed synchronously. Assignment is cooperative-sticky.
//!
//! The instance joins the group as one member per kind of topic (inbound, delay: see
//! `member`), so each kind is spread over the group; one dispatcher serves them all.
//! Every partition's state (offsets in flight, holds, pauses, seeks) has one owner,
//! its member's `partitions`; backpressure when `worker.max_in_flight` records are in flight: see
//! `backpressure`; commits: see `commit`.

mod backpressure;
mod commit;
mod dispatch;
mod hold;
mod member;
mod partitions;
mod topics;
pub mod tracker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use member::group_consumer_config;
pub use topics::{ensure_topics, worker_topics};

use crate::config::Settings;
use crate::health::Health;
use crate::pipeline::{now_millis, Pipeline, Record};
use commit::commit_at_shutdown;
use dispatch::{Dispatcher, InFlight, Work};
use member::{recv_any, Member};
use tracker::TopicPartition;

/// Completes at `due` (epoch ms); never when there is nothing to wait for.
async fn sleep_until_epoch_ms(due: Option<i64>) {
    match due {
        Some(due) => {
            let wait = (due - now_millis()).max(0) as u64;
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        None => std::future::pending().await,
    }
}

/// Consumes in the configured group until `shutdown` completes: one member (consumer)
/// per entry of `subscriptions` (see `member`), all feeding one dispatcher.
pub async fn run(
    settings: &Settings,
    subscriptions: &[Vec<String>],
    pipeline: Pipeline,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let members: Vec<Arc<Member>> = subscriptions
        .iter()
        .map(|topics| Member::join(settings, topics, health.clone()).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!members.is_empty(), "no topics to consume");

    let max_in_flight = settings.worker.max_in_flight;
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let max_in_flight_bytes = settings.worker.max_in_flight_bytes;
    let byte_permits = Arc::new(Semaphore::new(max_in_flight_bytes));
    let cancel = CancellationToken::new();
    let backoff = (
        Duration::from_millis(settings.worker.db_retry_initial_ms),
        Duration::from_millis(settings.worker.db_retry_max_ms),
    );
    let dispatcher = Dispatcher::new(pipeline.clone(), cancel.clone(), backoff);
    // A fatal failure shuts the worker down like a signal, then fails the run.
    let shutdown = {
        let dispatcher = dispatcher.clone();
        async move {
            tokio::select! {
                _ = shutdown => {}
                _ = dispatcher.stopped() => {}
            }
        }
    };

    tokio::pin!(shutdown);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    let mut turn = 0;
    'consume: loop {
        health.beat();
        let mut backpressure = backpressure::Loop {
            members: &members,
            health: &health,
            heartbeat: &mut heartbeat,
        };
        let Some(slot) = backpressure.acquire(&permits, 1, shutdown.as_mut()).await? else {
            break 'consume;
        };
        // Wait for a record, waking held delay partitions when they fall due.
        let (member, message) = loop {
            let next_due = members
                .iter()
                .filter_map(|m| m.partitions().next_due())
                .min();
            tokio::select! {
                _ = &mut shutdown => break 'consume,
                _ = heartbeat.tick() => {
                    health.beat();
                    for member in &members {
                        member.partitions().retry_seeks(&member.consumer);
                    }
                }
                _ = sleep_until_epoch_ms(next_due) => {
                    for member in &members {
                        member.partitions().release_due(&member.consumer);
                    }
                }
                received = recv_any(&members, &mut turn) => break received,
            }
        };
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "Kafka consumer error");
                continue;
            }
        };
        let record = Record::from_message(&message);
        drop(message);
        let tp: TopicPartition = (record.topic.clone(), record.partition);
        if !member.partitions().accepts(&tp) {
            // Fetched before the pause took effect; it comes again after the seek back.
            continue;
        }
        let job = pipeline.prepare(record);
        if let Some(due_at) = job.due_at.filter(|due| *due > now_millis()) {
            let mut partitions = member.partitions();
            // A record is held once: read again after its release, it is processed.
            if !partitions.was_released(&tp, job.record.offset) {
                partitions.hold(&member.consumer, tp, job.record.offset, due_at);
                continue;
            }
        }
        if let Some(due_at) = job.due_at {
            metrics::histogram!("im_ingest_retry_lateness_seconds")
                .record((now_millis() - due_at).max(0) as f64 / 1000.0);
        }
        let generation = member.partitions().begin(&tp, job.record.offset);
        // Its bytes are waited for once it is tracked: a pause meanwhile (see
        // `backpressure`) then seeks back to the record after it, not to it.
        let mut backpressure = backpressure::Loop {
            members: &members,
            health: &health,
            heartbeat: &mut heartbeat,
        };
        // Its share of `worker.max_in_flight_bytes`: at least 1, at most the whole bound
        // (a larger record then goes through alone).
        let size = job.record.key_and_value_bytes();
        let share = size.clamp(1, max_in_flight_bytes) as u32;
        let Some(bytes) = backpressure
            .acquire(&byte_permits, share, shutdown.as_mut())
            .await?
        else {
            // Never dispatched, never done: its offset is not stored, it is redelivered.
            break 'consume;
        };
        if !member.partitions().is_current(&tp, generation) {
            // Revoked while it waited: it belongs to the partition's next owner.
            continue;
        }
        dispatcher.dispatch(Work {
            job: Arc::new(job),
            generation,
            member,
            _in_flight: InFlight::new(slot, bytes, size),
        });
    }

    let deadline = Duration::from_millis(settings.worker.shutdown_deadline_ms);
    tracing::info!(
        deadline_ms = deadline.as_millis() as u64,
        "shutting down: finishing in-flight records"
    );
    let all = u32::try_from(max_in_flight).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(deadline, permits.acquire_many(all)).await;
    cancel.cancel();
    if drained.is_err() {
        let left: usize = members.iter().map(|m| m.partitions().in_flight()).sum();
        tracing::warn!(
            left,
            "shutdown deadline reached; unfinished records will be redelivered"
        );
    }
    for member in &members {
        commit_at_shutdown(&member.consumer).await;
    }
    for member in &members {
        member.consumer.unsubscribe();
    }
    match dispatcher.fatal() {
        Some(reason) => Err(anyhow::anyhow!(reason)),
        None => Ok(()),
    }
}
