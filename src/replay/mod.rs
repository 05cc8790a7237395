//! `im-ingest replay --from TOPIC`: push records of a topic (dead letters after a fix,
//! or a time window of the inbound topic) through the worker again (README,
//! "Incidents").
//!
//! Guarantee: the source topic is read from its start to its end offsets of the moment
//! the command starts, without joining any consumer group, so no group's offsets move.
//! Each record that passes the range and filters is republished to the target topic
//! (default the inbound topic) with its original key, value and timestamp, its other
//! headers, without the retry and dead-letter headers (so it is a first attempt), and
//! with `im_ingest-replay-count` one higher; a record already replayed
//! `--max-replays` times is refused (the worker carries the count onto every delay and
//! dead-letter record, so the guard holds across hops). Idempotent writes make a
//! replay safe. `--dry-run` publishes nothing. The command returns once the broker
//! acknowledged every record it republished; it prints counts by outcome. With
//! `--checkpoint NAME`, each chunk's records and the source offsets after them are
//! committed in one Kafka transaction (the offsets under the group
//! `im-ingest-replay-<NAME>`, never the worker's): a replay killed mid-run and run again
//! with the same name goes on where the last committed chunk ended, and every record is
//! republished exactly once as read-committed consumers (the worker) see it.

mod select;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::Settings;
use crate::pipeline::Record;
use crate::retry::headers::REPLAY_COUNT;
use crate::topic_reader::TopicReader;
pub use select::{Filters, Outcome};

const CHUNK: usize = 500;
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The topic to read records from, e.g. the dead-letter topic.
    #[arg(long)]
    pub from: String,
    /// Where to republish them (default: `kafka.inbound_topic`).
    #[arg(long)]
    pub to: Option<String>,
    #[command(flatten)]
    pub filters: Filters,
    /// A record already replayed this many times is refused (the loop guard).
    #[arg(long, default_value_t = 3)]
    pub max_replays: u32,
    /// Read and decide, publish nothing: print what would happen, by reason.
    #[arg(long)]
    pub dry_run: bool,
    /// Make the replay resumable under this name: run it again with the same name after
    /// it was stopped or killed, and it goes on where it left off, each record
    /// republished once.
    #[arg(long, value_name = "NAME")]
    pub checkpoint: Option<String>,
    /// Read at most this many records per second.
    #[arg(long, value_name = "RECORDS")]
    pub rate: Option<u32>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command and prints its summary.
pub async fn run(settings: &Settings, args: &ReplayArgs) -> anyhow::Result<()> {
    let target = args
        .to
        .clone()
        .unwrap_or_else(|| settings.kafka.inbound_topic.clone());
    let checkpoint = args
        .checkpoint
        .as_ref()
        .filter(|_| !args.dry_run)
        .map(|name| format!("im-ingest-replay-{name}"));
    let mut producer_config = settings.kafka.client_config();
    producer_config
        .set("enable.idempotence", "true")
        .set("acks", "all");
    if let Some(id) = &checkpoint {
        producer_config.set("transactional.id", id);
    }
    let producer: FutureProducer = producer_config
        .create()
        .context("creating the replay's producer")?;
    let mut reader = tokio::task::block_in_place(|| match &checkpoint {
        Some(group) => {
            // Fences a killed run's producer and aborts its open transaction.
            producer
                .init_transactions(SEND_TIMEOUT)
                .context("starting the checkpoint's Kafka transactions")?;
            TopicReader::resume(&settings.kafka, &args.from, group)
        }
        None => TopicReader::open(&settings.kafka, &args.from),
    })?;
    let chunk_size = args
        .rate
        .map_or(CHUNK, |rate| (rate as usize).clamp(1, CHUNK));
    let started = std::time::Instant::now();
    let progress = indicatif::ProgressBar::new(reader.total).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} records {per_sec} eta {eta} {wide_bar}",
        )
        .expect("a valid progress template"),
    );
    let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut read = 0u64;
    loop {
        let chunk = tokio::task::block_in_place(|| reader.next_chunk(chunk_size))?;
        if chunk.is_empty() {
            break;
        }
        if checkpoint.is_some() {
            tokio::task::block_in_place(|| producer.begin_transaction())?;
        }
        let mut sends = Vec::new();
        for record in &chunk {
            let outcome =
                args.filters
                    .select(record, settings.worker.max_message_bytes, args.max_replays);
            *outcomes.entry(outcome.label(args.dry_run)).or_default() += 1;
            if let (Outcome::Replay { count }, false) = (outcome, args.dry_run) {
                sends.push(republish(&producer, &target, record, count));
            }
        }
        for sent in futures_util::future::join_all(sends).await {
            sent?;
        }
        if checkpoint.is_some() {
            let positions = reader.positions(&args.from)?;
            let group = reader
                .group_metadata()
                .context("the checkpoint's consumer has no group")?;
            tokio::task::block_in_place(|| {
                producer.send_offsets_to_transaction(&positions, &group, SEND_TIMEOUT)?;
                producer.commit_transaction(SEND_TIMEOUT)
            })
            .context("committing a chunk of the replay with its checkpoint")?;
        }
        read += chunk.len() as u64;
        progress.inc(chunk.len() as u64);
        if progress.is_hidden() && read % 100_000 < chunk.len() as u64 {
            tracing::info!(read, total = reader.total, "replaying");
        }
        if let Some(rate) = args.rate {
            let due = Duration::from_secs_f64(read as f64 / f64::from(rate.max(1)));
            tokio::time::sleep(due.saturating_sub(started.elapsed())).await;
        }
    }
    progress.finish_and_clear();
    let mut out = std::io::stdout().lock();
    if args.json {
        let summary = serde_json::json!({
            "from": args.from, "to": target, "dry_run": args.dry_run,
            "records": reader.total, "outcomes": outcomes,
        });
        writeln!(out, "{summary}")?;
    } else {
        writeln!(
            out,
            "{} -> {target}{}: {} records read",
            args.from,
            if args.dry_run {
                " (dry run: nothing published)"
            } else {
                ""
            },
            reader.total
        )?;
        for (outcome, count) in &outcomes {
            writeln!(out, "  {outcome}: {count}")?;
        }
    }
    Ok(())
}

/// Publishes `record` to `topic` as a first attempt, replayed `count` times, and waits
/// for the broker's acknowledgement.
async fn republish(
    producer: &FutureProducer,
    topic: &str,
    record: &Record,
    count: u32,
) -> anyhow::Result<()> {
    let count_text = count.to_string();
    let kept = record
        .headers
        .iter()
        .flat_map(|headers| headers.iter())
        .filter(|h| !select::is_retry_header(h.key) && h.key != REPLAY_COUNT)
        .fold(OwnedHeaders::new(), |headers, h| headers.insert(h));
    let headers = kept.insert(Header {
        key: REPLAY_COUNT,
        value: Some(count_text.as_bytes()),
    });
    let mut out = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
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
