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
//! Every partition's state (offsets in flight, holds, pauses, seeks) has one owner,
//! `partitions`; backpressure when `worker.max_in_flight` records are in flight: see
//! `backpressure`; commits: see `commit`.

mod backpressure;
mod commit;
mod dispatch;
mod hold;
mod partitions;
mod topics;
pub mod tracker;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use topics::{ensure_topics, worker_topics};

use crate::config::Settings;
use crate::health::Health;
use crate::pipeline::{now_millis, Pipeline, Record};
use commit::{commit_at_shutdown, commit_on_revoke};
use dispatch::{Dispatcher, Work};
use partitions::Partitions;
use tracker::TopicPartition;

/// Rebalance hooks: the revoke side of the partitions' state.
pub struct WorkerContext {
    partitions: Arc<Mutex<Partitions>>,
    health: Arc<Health>,
}

impl ClientContext for WorkerContext {
    /// librdkafka statistics (every `statistics.interval.ms`): consumer lag per partition.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!("im_ingest_consumer_lag", "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    /// Runs inside `recv()`: it must not wait for our own tasks. Revoked partitions'
    /// in-flight records are abandoned (their offsets never stored), then what is stored
    /// is committed so the next owner starts exactly after the durable prefix.
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked = partitions_of(tpl);
                let abandoned = self
                    .partitions
                    .lock()
                    .expect("partitions lock poisoned")
                    .revoke(&revoked);
                tracing::info!(partitions = ?revoked, abandoned, "partitions revoked");
                commit_on_revoke(consumer);
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = ?partitions_of(tpl), "partitions assigned");
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }

    /// Newly assigned partitions start unpaused (see `Partitions::assigned`).
    fn post_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.health.set_assigned_partitions(assigned);
        if let Rebalance::Assign(tpl) = rebalance {
            self.partitions
                .lock()
                .expect("partitions lock poisoned")
                .assigned(consumer, tpl);
        }
    }
}

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

fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// The configured group's consumer settings, before the raw `kafka.librdkafka` map
/// (which the caller applies last, so it wins): offsets stored by the application only
/// after a record is durable, committed in the background, from the earliest record
/// when the group has none, cooperative rebalancing.
pub fn group_consumer_config(settings: &Settings) -> rdkafka::ClientConfig {
    let mut config = settings.kafka.client_config();
    config
        .set("group.id", &settings.kafka.group_id)
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky");
    config
}

/// Consumes `topics` in the configured group until `shutdown` completes.
pub async fn run(
    settings: &Settings,
    topics: &[String],
    pipeline: Pipeline,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let partitions = Arc::new(Mutex::new(Partitions::default()));
    let mut config = group_consumer_config(settings);
    config.set("statistics.interval.ms", "5000");
    // The raw passthrough map wins over our defaults too.
    for (key, value) in &settings.kafka.librdkafka {
        config.set(key, value);
    }
    let consumer: Arc<StreamConsumer<WorkerContext>> = Arc::new(
        config
            .create_with_context(WorkerContext {
                partitions: partitions.clone(),
                health: health.clone(),
            })
            .context("creating the Kafka consumer")?,
    );
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&names)
        .with_context(|| format!("subscribing to {names:?}"))?;
    tracing::info!(topics = ?names, group = %settings.kafka.group_id, "consuming");

    let max_in_flight = settings.worker.max_in_flight;
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let cancel = CancellationToken::new();
    let backoff = (
        Duration::from_millis(settings.worker.db_retry_initial_ms),
        Duration::from_millis(settings.worker.db_retry_max_ms),
    );
    let dispatcher = Dispatcher::new(
        pipeline.clone(),
        consumer.clone(),
        partitions.clone(),
        cancel.clone(),
        backoff,
    );

    tokio::pin!(shutdown);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    'consume: loop {
        health.beat();
        let mut backpressure = backpressure::Loop {
            consumer: &consumer,
            partitions: &partitions,
            health: &health,
            heartbeat: &mut heartbeat,
        };
        let Some(permit) = backpressure.acquire(&permits, shutdown.as_mut()).await? else {
            break 'consume;
        };
        // Wait for a record, waking held delay partitions when they fall due.
        let message = loop {
            let next_due = partitions
                .lock()
                .expect("partitions lock poisoned")
                .next_due();
            tokio::select! {
                _ = &mut shutdown => break 'consume,
                _ = heartbeat.tick() => {
                    health.beat();
                    partitions.lock().expect("partitions lock poisoned").retry_seeks(consumer.as_ref());
                }
                _ = sleep_until_epoch_ms(next_due) => {
                    partitions.lock().expect("partitions lock poisoned").release_due(consumer.as_ref());
                }
                message = consumer.recv() => break message,
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
        if !partitions
            .lock()
            .expect("partitions lock poisoned")
            .accepts(&tp)
        {
            // Fetched before the pause took effect; it comes again after the seek back.
            continue;
        }
        let job = pipeline.prepare(record);
        if let Some(due_at) = job.due_at.filter(|due| *due > now_millis()) {
            partitions.lock().expect("partitions lock poisoned").hold(
                consumer.as_ref(),
                tp,
                job.record.offset,
                due_at,
            );
            continue;
        }
        if let Some(due_at) = job.due_at {
            metrics::histogram!("im_ingest_retry_lateness_seconds")
                .record((now_millis() - due_at).max(0) as f64 / 1000.0);
        }
        let generation = partitions
            .lock()
            .expect("partitions lock poisoned")
            .begin(&tp, job.record.offset);
        dispatcher.dispatch(Work {
            job: Arc::new(job),
            generation,
            _permit: permit,
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
        let left = partitions
            .lock()
            .expect("partitions lock poisoned")
            .in_flight();
        tracing::warn!(
            left,
            "shutdown deadline reached; unfinished records will be redelivered"
        );
    }
    commit_at_shutdown(consumer.as_ref()).await;
    consumer.unsubscribe();
    Ok(())
}
