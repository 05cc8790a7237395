//! Baseline for throughput runs: reads `--records` records of a topic from the beginning
//! with a fresh consumer group, doing nothing with them, and prints the rate. The
//! worker's rate over the same records, divided by this, is the share of raw
//! consumption speed that processing keeps.

use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::ClientConfig;

#[derive(Parser)]
#[command(about = "Read N records of a topic and print the rate (throughput baseline)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long)]
    topic: String,
    #[arg(long)]
    records: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", format!("drain-{:x}", rand::random::<u64>()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&args.topic])?;
    let mut started = None;
    for _ in 0..args.records {
        tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await??;
        started.get_or_insert_with(Instant::now);
    }
    let elapsed = started.map(|s| s.elapsed()).unwrap_or_default();
    println!(
        "drained {} records in {:.3}s: {:.0} records/s",
        args.records,
        elapsed.as_secs_f64(),
        args.records as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    Ok(())
}
