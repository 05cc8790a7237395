//! Reading a whole topic, as it is when the read starts, without joining anybody's
//! consumer group (for `verify` and `replay`).
//!
//! Guarantee: every record of every partition from its earliest offset up to the end
//! offset taken at the start is handed over exactly once, in offset order within a
//! partition, in chunks of bounded size; no offset is ever committed (the reader is an
//! assigned consumer of a group of its own, with auto-commit off).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
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
    pub fn open(kafka: &KafkaSettings, topic: &str) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = kafka
            .client_config()
            .set(
                "group.id",
                format!("im-ingest-verify-{:016x}", rand::random::<u64>()),
            )
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
        let mut assignment = TopicPartitionList::new();
        let (mut ends, mut next, mut total) = (HashMap::new(), HashMap::new(), 0);
        for partition in partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, TIMEOUT)
                .with_context(|| format!("reading the offsets of {topic}/{partition}"))?;
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
