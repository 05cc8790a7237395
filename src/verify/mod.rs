//! `im-ingest verify [--topic TOPIC]`: proves that the database matches a topic
//! (README, "Incidents").
//!
//! Guarantee: the topic is read from its start to its end offsets of the moment the
//! command starts, without joining any consumer group (no offset moves), and checked
//! against the database as `check` says; the dead-letter topic is read first, so a
//! record that is missing because it was dead-lettered is reported with its reason,
//! apart from lost ones. The exit code is non-zero when anything does not match, and
//! the first mismatches are printed with their partition and offset.

mod check;

use std::io::Write;

use anyhow::Context;

use crate::config::Settings;
use crate::pipeline::Record;
use crate::retry::headers::RetryHeaders;
use crate::topic_reader::TopicReader;
use check::{DeadLetters, Report, Verifier};

/// Records checked per database round trip.
const CHUNK: usize = 500;

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The topic to verify (default: `kafka.inbound_topic`), all of it.
    #[arg(long)]
    pub topic: Option<String>,
    /// How many mismatches to print (all are counted).
    #[arg(long, default_value_t = 20)]
    pub show: usize,
    /// Range and filters, as `replay` takes them. With any, only the selected records
    /// are checked, with what they imply that a part of the topic can (last message
    /// times, read watermarks); nicknames and the database-wide checks need it whole.
    #[command(flatten)]
    pub filters: crate::replay::Filters,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command: prints the report, and fails when the database does not match.
pub async fn run(settings: &Settings, args: &VerifyArgs) -> anyhow::Result<()> {
    let topic = args
        .topic
        .clone()
        .unwrap_or_else(|| settings.kafka.inbound_topic.clone());
    let pool = crate::store::connect(&settings.database).await?;
    let dead_letters = tokio::task::block_in_place(|| {
        dead_letters_of(settings, &topic, &settings.kafka.dlq_topic)
    })?;
    let mut reader = tokio::task::block_in_place(|| TopicReader::open(&settings.kafka, &topic))?;
    let progress = indicatif::ProgressBar::new(reader.total).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} records {per_sec} eta {eta} {wide_bar}",
        )
        .expect("a valid progress template"),
    );
    let max_bytes = settings.worker.max_message_bytes;
    let mut verifier = Verifier::new(pool, &topic, max_bytes, dead_letters, args.show);
    loop {
        let chunk = tokio::task::block_in_place(|| reader.next_chunk(CHUNK))?;
        if chunk.is_empty() {
            break;
        }
        let read = chunk.len();
        let selected: Vec<Record> = chunk
            .into_iter()
            .filter(|record| {
                let outcome = args.filters.select(record, max_bytes, u32::MAX);
                matches!(outcome, crate::replay::Outcome::Replay { .. })
            })
            .collect();
        verifier.report.skipped += (read - selected.len()) as u64;
        verifier.check(&selected).await?;
        progress.inc(read as u64);
        if !progress.is_hidden() {
            continue;
        }
        if verifier.report.records % 100_000 < CHUNK as u64 {
            tracing::info!(
                records = verifier.report.records,
                total = reader.total,
                "verifying"
            );
        }
    }
    progress.finish_and_clear();
    verifier
        .finish(args.filters == crate::replay::Filters::default())
        .await?;
    print(&topic, &verifier.report, args.json)?;
    anyhow::ensure!(
        verifier.report.mismatch_count == 0,
        "{} mismatches between {topic} and the database",
        verifier.report.mismatch_count
    );
    Ok(())
}

/// The dead letters of records of `topic`, by their original partition and offset
/// (an absent dead-letter topic has none).
fn dead_letters_of(settings: &Settings, topic: &str, dlq: &str) -> anyhow::Result<DeadLetters> {
    let mut reader = match TopicReader::open(&settings.kafka, dlq) {
        Ok(reader) => reader,
        Err(error) if format!("{error:#}").contains("does not exist") => {
            return Ok(DeadLetters::new())
        }
        Err(error) => return Err(error).context("reading the dead-letter topic"),
    };
    let mut found = DeadLetters::new();
    loop {
        let chunk = reader.next_chunk(CHUNK)?;
        if chunk.is_empty() {
            return Ok(found);
        }
        for record in chunk {
            let Some(headers) = &record.headers else {
                continue;
            };
            if let Ok(Some(h)) = RetryHeaders::from_headers(headers) {
                if h.origin.topic == topic {
                    found.insert(
                        (h.origin.partition, h.origin.offset),
                        (h.exception_fqcn, h.exception_message),
                    );
                }
            }
        }
    }
}

fn print(topic: &str, report: &Report, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(report)?)?;
        return Ok(());
    }
    let dead: u64 = report.dead_lettered.values().sum();
    writeln!(
        out,
        "{topic}: {} records ({} messages, {} read receipts); {dead} dead-lettered; {} mismatches",
        report.records, report.messages, report.read_receipts, report.mismatch_count
    )?;
    if report.skipped > 0 {
        writeln!(
            out,
            "  outside the range or filtered out: {}",
            report.skipped
        )?;
    }
    for (reason, count) in &report.dead_lettered {
        writeln!(out, "  dead-lettered as {reason}: {count}")?;
    }
    if !report.mismatches.is_empty() {
        writeln!(out, "first mismatches:")?;
        for mismatch in &report.mismatches {
            writeln!(out, "  {mismatch}")?;
        }
    }
    Ok(())
}
