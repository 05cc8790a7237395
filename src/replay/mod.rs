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
//! republished exactly once as read-committed consumers (the worker) see it. With
//! `--process`, the records are written here through the worker's pipeline instead
//! (see `target`).

mod select;
mod target;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::{FutureProducer, Producer};

use crate::config::Settings;
use crate::topic_reader::TopicReader;
pub use select::{Filters, Outcome};
use target::Target;

const CHUNK: usize = 500;
const INIT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The topic to read records from, e.g. the dead-letter topic.
    #[arg(long)]
    pub from: String,
    /// Where to republish them (default: `kafka.inbound_topic`).
    #[arg(long, conflicts_with = "process")]
    pub to: Option<String>,
    /// Instead of republishing, write the records here and now through the worker's
    /// pipeline (locks, batches, delay and dead-letter topics); no worker needed.
    #[arg(long)]
    pub process: bool,
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
    let checkpoint = args
        .checkpoint
        .as_ref()
        .filter(|_| !args.dry_run)
        .map(|name| format!("im-ingest-replay-{name}"));
    let destination = match (&args.to, args.process) {
        (_, true) => "the pipeline, in-process".to_string(),
        (Some(to), false) => to.clone(),
        (None, false) => settings.kafka.inbound_topic.clone(),
    };
    let target = target(settings, args, &destination, checkpoint.is_some()).await?;
    let mut reader = tokio::task::block_in_place(|| match &checkpoint {
        Some(group) => TopicReader::resume(&settings.kafka, &args.from, group),
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
        let chunk_len = chunk.len() as u64;
        read += chunk_len;
        let mut selected = Vec::new();
        for record in chunk {
            let outcome =
                args.filters
                    .select(&record, settings.worker.max_message_bytes, args.max_replays);
            *outcomes.entry(outcome.label(args.dry_run)).or_default() += 1;
            if let Outcome::Replay { count } = outcome {
                selected.push((record, count));
            }
        }
        target
            .deliver(selected, &reader, &args.from, &mut outcomes)
            .await?;
        progress.inc(chunk_len);
        if progress.is_hidden() && read % 100_000 < chunk_len {
            tracing::info!(read, total = reader.total, "replaying");
        }
        if let Some(rate) = args.rate {
            let due = Duration::from_secs_f64(read as f64 / f64::from(rate.max(1)));
            tokio::time::sleep(due.saturating_sub(started.elapsed())).await;
        }
    }
    progress.finish_and_clear();
    print(args, &destination, reader.total, &outcomes)
}

/// Where this replay delivers, set up (a checkpointed republish starts its
/// transactions, which fences a killed run's producer and aborts its open transaction).
async fn target(
    settings: &Settings,
    args: &ReplayArgs,
    destination: &str,
    checkpointed: bool,
) -> anyhow::Result<Target> {
    if args.dry_run {
        return Ok(Target::DryRun);
    }
    if args.process {
        let topics = crate::consumer::ensure_topics(settings)
            .await
            .context("making sure the worker's topics exist")?;
        let pipeline = crate::worker::build_pipeline(settings, &topics).await?;
        return Ok(Target::Process {
            pipeline: Box::new(pipeline),
            checkpointed,
        });
    }
    let mut config = settings.kafka.client_config();
    config.set("enable.idempotence", "true").set("acks", "all");
    if let Some(name) = &args.checkpoint {
        config.set("transactional.id", format!("im-ingest-replay-{name}"));
    }
    let producer: FutureProducer = config.create().context("creating the replay's producer")?;
    if checkpointed {
        tokio::task::block_in_place(|| producer.init_transactions(INIT_TIMEOUT))
            .context("starting the checkpoint's Kafka transactions")?;
    }
    Ok(Target::Topic {
        producer,
        topic: destination.to_string(),
        transactional: checkpointed,
    })
}

fn print(
    args: &ReplayArgs,
    destination: &str,
    total: u64,
    outcomes: &BTreeMap<&'static str, u64>,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if args.json {
        let summary = serde_json::json!({
            "from": args.from, "to": destination, "dry_run": args.dry_run,
            "records": total, "outcomes": outcomes,
        });
        writeln!(out, "{summary}")?;
        return Ok(());
    }
    let dry = if args.dry_run {
        " (dry run: nothing published)"
    } else {
        ""
    };
    writeln!(
        out,
        "{} -> {destination}{dry}: {total} records read",
        args.from
    )?;
    for (outcome, count) in outcomes {
        writeln!(out, "  {outcome}: {count}")?;
    }
    Ok(())
}
