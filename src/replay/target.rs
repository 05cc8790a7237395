//! Where replayed records go: republished to a topic (each chunk in a Kafka transaction
//! with the checkpoint's offsets, when there is a checkpoint), or written here through
//! the worker's pipeline.
//!
//! Guarantee: a chunk is delivered whole before its checkpoint moves: republished records
//! are acknowledged by the broker (and, with a checkpoint, committed together with the
//! source offsets after them: exactly once); processed records are durable by the
//! pipeline's own rule (stored, or acknowledged on a delay or dead-letter topic) before
//! the checkpoint's offsets are committed (at least once: a record processed twice is a
//! duplicate, which changes nothing).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::CommitMode;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::select::is_retry_header;
use crate::pipeline::{Pipeline, Record};
use crate::retry::headers::REPLAY_COUNT;
use crate::topic_reader::TopicReader;

const SEND_TIMEOUT: Duration = Duration::from_secs(30);

pub enum Target {
    /// Republish to `topic`; `transactional` with a checkpoint.
    Topic {
        producer: FutureProducer,
        topic: String,
        transactional: bool,
    },
    /// Write through the pipeline; `checkpointed` commits the source offsets after each
    /// chunk.
    Process {
        pipeline: Box<Pipeline>,
        checkpointed: bool,
    },
    /// Decide only.
    DryRun,
}

impl Target {
    /// Delivers a chunk's selected records (each with its new replay count) and moves the
    /// checkpoint past the chunk; counts what happened in `outcomes`.
    pub async fn deliver(
        &self,
        selected: Vec<(Record, u32)>,
        reader: &TopicReader,
        from: &str,
        outcomes: &mut BTreeMap<&'static str, u64>,
    ) -> anyhow::Result<()> {
        match self {
            Target::DryRun => {}
            Target::Topic {
                producer,
                topic,
                transactional,
            } => {
                if *transactional {
                    tokio::task::block_in_place(|| producer.begin_transaction())?;
                }
                let sends = selected
                    .iter()
                    .map(|(record, count)| republish(producer, topic, record, *count));
                for sent in futures_util::future::join_all(sends).await {
                    sent?;
                }
                if *transactional {
                    let positions = reader.positions(from)?;
                    let group = reader
                        .group_metadata()
                        .context("the checkpoint's consumer has no group")?;
                    tokio::task::block_in_place(|| {
                        producer.send_offsets_to_transaction(&positions, &group, SEND_TIMEOUT)?;
                        producer.commit_transaction(SEND_TIMEOUT)
                    })
                    .context("committing a chunk of the replay with its checkpoint")?;
                }
            }
            Target::Process {
                pipeline,
                checkpointed,
            } => {
                let records = selected
                    .into_iter()
                    .map(|(mut record, count)| {
                        record.headers = Some(replayed_headers(&record, count));
                        record
                    })
                    .collect();
                for outcome in pipeline.process_batch(records).await? {
                    *outcomes.entry(outcome.label()).or_default() += 1;
                }
                if *checkpointed {
                    tokio::task::block_in_place(|| reader.commit(from, CommitMode::Sync))
                        .context("committing the replay's checkpoint")?;
                }
            }
        }
        Ok(())
    }
}

/// The record's headers as replayed: without the retry and dead-letter headers (so the
/// worker takes it as a first attempt), with [`REPLAY_COUNT`] set to `count`.
fn replayed_headers(record: &Record, count: u32) -> OwnedHeaders {
    let count = count.to_string();
    record
        .headers
        .iter()
        .flat_map(|headers| headers.iter())
        .filter(|h| !is_retry_header(h.key) && h.key != REPLAY_COUNT)
        .fold(OwnedHeaders::new(), |headers, h| headers.insert(h))
        .insert(Header {
            key: REPLAY_COUNT,
            value: Some(count.as_bytes()),
        })
}

/// Publishes `record` to `topic` as a first attempt, replayed `count` times, with its
/// key, value and timestamp, and waits for the broker's acknowledgement.
async fn republish(
    producer: &FutureProducer,
    topic: &str,
    record: &Record,
    count: u32,
) -> anyhow::Result<()> {
    let mut out = FutureRecord::<[u8], [u8]>::to(topic).headers(replayed_headers(record, count));
    if let Some(key) = &record.key {
        out = out.key(key.as_slice());
    }
    if let Some(value) = &record.value {
        out = out.payload(value.as_slice());
    }
    if let Some(timestamp) = record.timestamp {
        out = out.timestamp(timestamp);
    }
    producer
        .send(out, SEND_TIMEOUT)
        .await
        .map_err(|(error, _)| error)
        .with_context(|| {
            format!(
                "republishing {}/{}@{} to {topic}",
                record.topic, record.partition, record.offset
            )
        })?;
    Ok(())
}
