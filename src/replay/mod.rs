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
//! acknowledged every record it republished; it prints counts by outcome.

mod select;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

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
    let producer: FutureProducer = settings
        .kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .context("creating the replay's producer")?;
    let mut reader =
        tokio::task::block_in_place(|| TopicReader::open(&settings.kafka, &args.from))?;
    let progress = indicatif::ProgressBar::new(reader.total).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} records {per_sec} eta {eta} {wide_bar}",
        )
        .expect("a valid progress template"),
    );
    let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
    loop {
        let chunk = tokio::task::block_in_place(|| reader.next_chunk(CHUNK))?;
        if chunk.is_empty() {
            break;
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
        progress.inc(chunk.len() as u64);
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
