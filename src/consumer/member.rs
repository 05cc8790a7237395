//! One Kafka consumer of the worker's group, subscribed to one kind of topic, with the
//! state of the partitions it holds.
//!
//! Guarantee: an instance joins its group as two members, one subscribed to the inbound
//! topic and one to the delay topics, each with its own partitions' state. The group's
//! assignor balances members by partition count across every topic they subscribe to,
//! so one member of all topics per instance could be given every inbound partition while
//! the others hold only delay partitions (measured: one of three instances did all the
//! work, see BENCHMARKS.md); members of one kind each get their share of that kind.
//! Assignment stays cooperative-sticky. On revoke, the revoked partitions' in-flight
//! records are abandoned to the next owner and what is stored is committed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use futures_util::future::select_all;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, TopicPartitionList};

use super::commit::commit_on_revoke;
use super::partitions::Partitions;
use super::tracker::TopicPartition;
use crate::config::Settings;
use crate::health::Health;

/// A consumer of the group and the state of its partitions.
pub struct Member {
    pub consumer: StreamConsumer<WorkerContext>,
    partitions: Arc<Mutex<Partitions>>,
}

impl Member {
    /// Creates a consumer with the group's settings (the raw `kafka.librdkafka` map
    /// last, so it wins) and subscribes it to `topics`.
    pub fn join(
        settings: &Settings,
        topics: &[String],
        health: Arc<Health>,
    ) -> anyhow::Result<Self> {
        let partitions = Arc::new(Mutex::new(Partitions::default()));
        let mut config = group_consumer_config(settings);
        config.set("statistics.interval.ms", "5000");
        for (key, value) in &settings.kafka.librdkafka {
            config.set(key, value);
        }
        // librdkafka drops lines below the level derived from the log filter before
        // `WorkerContext::log` sees them; the offset-reset warning must reach it.
        if (config.log_level as i32) < (RDKafkaLogLevel::Warning as i32) {
            config.set_log_level(RDKafkaLogLevel::Warning);
        }
        let consumer: StreamConsumer<WorkerContext> = config
            .create_with_context(WorkerContext {
                partitions: partitions.clone(),
                health,
                assigned: AtomicUsize::new(0),
            })
            .context("creating the Kafka consumer")?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .with_context(|| format!("subscribing to {names:?}"))?;
        tracing::info!(topics = ?names, group = %settings.kafka.group_id, "consuming");
        Ok(Self {
            consumer,
            partitions,
        })
    }

    /// The state of this member's partitions.
    pub fn partitions(&self) -> MutexGuard<'_, Partitions> {
        self.partitions.lock().expect("partitions lock poisoned")
    }

    /// The next message (or consumer error) of this member, with the member.
    pub async fn recv(self: &Arc<Self>) -> (Arc<Self>, KafkaResult<BorrowedMessage<'_>>) {
        (self.clone(), self.consumer.recv().await)
    }
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

/// The next message of any member. Members are tried from a start that moves on with
/// every call, so a member whose records are always ready (a backlog on the inbound
/// topic) cannot keep another's (due delay records) waiting.
pub async fn recv_any<'a>(
    members: &'a [Arc<Member>],
    turn: &mut usize,
) -> (Arc<Member>, KafkaResult<BorrowedMessage<'a>>) {
    *turn = turn.wrapping_add(1);
    let first = *turn % members.len();
    let receiving = members[first..]
        .iter()
        .chain(&members[..first])
        .map(|member| Box::pin(member.recv()));
    select_all(receiving).await.0
}

/// Rebalance hooks: the revoke side of the member's partitions' state, and the
/// assignment it reports (the instance's partition count in `health`, the
/// `im_ingest_assigned_partitions` gauge).
pub struct WorkerContext {
    partitions: Arc<Mutex<Partitions>>,
    health: Arc<Health>,
    /// Partitions this member holds, so the instance's total in `health` stays right.
    assigned: AtomicUsize,
}

impl ClientContext for WorkerContext {
    /// librdkafka's log lines, as its default does, except one: a fetch position (the
    /// committed offset, or a lagging consumer's) the broker no longer has (retention or deletion removed records the group had not
    /// read) makes librdkafka reset to the earliest record and only warn, which loses
    /// those records silently. That one is an ERROR and counted
    /// (`im_ingest_offset_resets_total`).
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if is_offset_out_of_range_reset(facility, message) {
            metrics::counter!("im_ingest_offset_resets_total").increment(1);
            tracing::error!(librdkafka = message,
                "the partition's fetch position is no longer on the broker (retention or deletion removed records the group had not read): \
                 consumption restarts at the earliest record; the records in between were never read");
            return;
        }
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {facility} {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", "librdkafka: {facility} {message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {facility} {message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}")
            }
        }
    }

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
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
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
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let assignment = consumer.assignment().unwrap_or_default();
        let before = self.assigned.swap(assignment.count(), Ordering::Relaxed);
        self.health.assignment_changed(before, assignment.count());
        report_assignment(consumer, &assignment);
        if let Rebalance::Assign(tpl) = rebalance {
            self.partitions
                .lock()
                .expect("partitions lock poisoned")
                .assigned(consumer, tpl);
        }
    }
}

/// Sets `im_ingest_assigned_partitions{topic}` for every subscribed topic (0 for one
/// this member holds nothing of), so each instance shows which topics it works on.
fn report_assignment<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    assignment: &TopicPartitionList,
) {
    let mut per_topic: std::collections::HashMap<String, usize> = consumer
        .subscription()
        .map(|s| {
            s.elements()
                .iter()
                .map(|e| (e.topic().to_string(), 0))
                .collect()
        })
        .unwrap_or_default();
    for element in assignment.elements() {
        *per_topic.entry(element.topic().to_string()).or_default() += 1;
    }
    for (topic, count) in per_topic {
        metrics::gauge!("im_ingest_assigned_partitions", "topic" => topic).set(count as f64);
    }
}

/// Whether a librdkafka log line reports an automatic offset reset because the fetch
/// offset is out of range: facility `OFFSET`, a message like `topic [0]: offset reset
/// (at offset 3, broker 1) to BEGINNING: fetch failed due to requested offset not
/// available on the broker: Broker: Offset out of range`.
fn is_offset_out_of_range_reset(facility: &str, message: &str) -> bool {
    facility == "OFFSET"
        && message.contains("offset reset")
        && message.contains("Offset out of range")
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_out_of_range_offset_reset_is_taken_for_one() {
        let reset = "in [0]: offset reset (at offset 3, broker 1) to BEGINNING: fetch failed \
                     due to requested offset not available on the broker: Broker: Offset out of range";
        assert!(is_offset_out_of_range_reset("OFFSET", reset));
        assert!(!is_offset_out_of_range_reset("FETCH", reset));
        assert!(!is_offset_out_of_range_reset(
            "OFFSET",
            "in [0]: offset reset (at offset INVALID) to BEGINNING: no previously committed offset"
        ));
    }
}
