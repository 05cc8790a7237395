//! Reading a whole topic, as it is when the read starts, without joining anybody's
//! consumer group (for `verify` and `replay`).
//!
//! Guarantee: every record of every partition from its earliest offset (or, resuming,
//! from the offsets its checkpoint group has committed) up to the end offset taken at
//! the start is handed over exactly once, in offset order within a partition, in chunks
//! of bounded size; the reader itself never commits an offset (it is an assigned
//! consumer, auto-commit off; a checkpoint's offsets are committed by the caller's
//! transaction, see `replay`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaSettings;
use crate::pipeline::Record;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A topic being read from its start to the end offsets of the moment it was opened.
pub struct TopicReader {
    consumer: BaseConsumer,
    /// Per partition, the offset to stop before.
    ends: HashMap<i32, i64>,
    /// Per partition, the next offset expected.
    next: HashMap<i32, i64>,
    pub total: u64,
}

impl TopicReader {
    /// From the start of every partition, as a group of its own that nobody uses.
    pub fn open(kafka: &KafkaSettings, topic: &str) -> anyhow::Result<Self> {
        let group = format!("im-ingest-reader-{:016x}", rand::random::<u64>());
        Self::open_as(kafka, topic, &group, false)
    }

    /// From the offsets `group` has committed (the start where it has none).
    pub fn resume(kafka: &KafkaSettings, topic: &str, group: &str) -> anyhow::Result<Self> {
        Self::open_as(kafka, topic, group, true)
    }

    fn open_as(
        kafka: &KafkaSettings,
        topic: &str,
        group: &str,
        resume: bool,
    ) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = kafka
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()
            .context("creating the Kafka consumer that reads the topic")?;
        let metadata = consumer
            .fetch_metadata(Some(topic), TIMEOUT)
            .with_context(|| format!("reading the metadata of {topic}"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        anyhow::ensure!(!partitions.is_empty(), "topic {topic} does not exist");
        let committed: HashMap<i32, i64> = if resume {
            let mut wanted = TopicPartitionList::new();
            for partition in &partitions {
                wanted.add_partition(topic, *partition);
            }
            consumer
                .committed_offsets(wanted, TIMEOUT)
                .context("reading the checkpoint's committed offsets")?
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect()
        } else {
            HashMap::new()
        };
        let mut assignment = TopicPartitionList::new();
        let (mut ends, mut next, mut total) = (HashMap::new(), HashMap::new(), 0);
        for partition in partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, TIMEOUT)
                .with_context(|| format!("reading the offsets of {topic}/{partition}"))?;
            let low = committed.get(&partition).map_or(low, |c| (*c).max(low));
            if high > low {
                assignment.add_partition_offset(topic, partition, Offset::Offset(low))?;
                ends.insert(partition, high);
                next.insert(partition, low);
                total += (high - low) as u64;
            }
        }
        consumer.assign(&assignment)?;
        Ok(Self {
            consumer,
            ends,
            next,
            total,
        })
    }

    /// The next records (at most `max`), or an empty chunk when every partition is read
    /// to its end offset. Transaction markers and aborted records leave gaps, which
    /// count as read.
    pub fn next_chunk(&mut self, max: usize) -> anyhow::Result<Vec<Record>> {
        let mut chunk = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while chunk.len() < max && !self.done() {
            let Some(message) = self.consumer.poll(Duration::from_millis(200)) else {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "no record arrived for 60 s while {} partitions were still unread",
                    self.unfinished()
                );
                self.catch_up_positions()?;
                continue;
            };
            let message = message.context("reading the topic")?;
            let record = Record::from_message(&message);
            let end = self.ends.get(&record.partition).copied().unwrap_or(0);
            if record.offset >= end {
                self.next.insert(record.partition, end);
                continue;
            }
            self.next.insert(record.partition, record.offset + 1);
            chunk.push(record);
        }
        Ok(chunk)
    }

    /// Per partition, the offset after the last record handed over: what a checkpoint
    /// commits.
    pub fn positions(&self, topic: &str) -> anyhow::Result<TopicPartitionList> {
        let mut list = TopicPartitionList::new();
        for (partition, next) in &self.next {
            list.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
        }
        Ok(list)
    }

    /// Commits the offsets after the records handed over, for the reader's group (a
    /// checkpoint outside a transaction).
    pub fn commit(&self, topic: &str, mode: rdkafka::consumer::CommitMode) -> anyhow::Result<()> {
        self.consumer.commit(&self.positions(topic)?, mode)?;
        Ok(())
    }

    /// The reader's group, for committing a checkpoint in a producer's transaction.
    pub fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        self.consumer.group_metadata()
    }

    fn done(&self) -> bool {
        self.unfinished() == 0
    }

    fn unfinished(&self) -> usize {
        self.ends
            .iter()
            .filter(|(p, end)| self.next.get(p).copied().unwrap_or(0) < **end)
            .count()
    }

    /// A partition whose last offsets are transaction markers yields no record for
    /// them: its consumer position (past them) says it is read through.
    fn catch_up_positions(&mut self) -> anyhow::Result<()> {
        let positions = self.consumer.position()?;
        for element in positions.elements() {
            if let Offset::Offset(position) = element.offset() {
                let next = self.next.entry(element.partition()).or_insert(0);
                *next = (*next).max(position);
            }
        }
        Ok(())
    }
}
