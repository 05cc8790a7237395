//! `im-ingest bench-contender`: the bench's reference consumers, each run as its own
//! process like the worker, so that the bench measures every contender the same way
//! (its own CPU, its own memory, offsets committed to its own group).
//!
//! Guarantee: a contender stores an offset only after its handler returned `Ok` for the
//! record (the same contiguous-prefix rule as the worker, `consumer::tracker`), so "all
//! offsets committed" means "everything handled" for every contender alike. A failing
//! handler is retried, never skipped.

mod ideal;
pub mod naive;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::MySqlPool;
use tokio::sync::Semaphore;

use crate::config::Settings;
use crate::consumer::tracker::{OffsetTracker, TopicPartition};
use crate::message::{decode, Inbound};
use crate::pipeline::Record;

/// The reference consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reference {
    /// Reads every record and does nothing: the Kafka read limit.
    Noop,
    /// Check-then-insert per record on tables without unique keys, records handled
    /// concurrently (`database.max_connections` at once): what teams write first.
    Naive,
    /// Batched multi-row writes of the same rows into the worker's schema: the database
    /// write limit.
    Ideal,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ContenderArgs {
    /// Which reference consumer to run.
    #[arg(value_enum)]
    pub kind: Reference,
    /// Records per batch (the ideal consumer's rows per statement).
    #[arg(long, default_value_t = 500)]
    pub batch_rows: usize,
}

/// How long a batch waits for more records before it is handled as it is.
const LINGER: Duration = Duration::from_millis(5);
/// Pause before a failed handler runs again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Forgets revoked partitions, so a completion for one stores nothing.
struct TrackingContext {
    tracker: Arc<Mutex<OffsetTracker>>,
}

impl ClientContext for TrackingContext {}

impl ConsumerContext for TrackingContext {
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<TopicPartition> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            self.tracker
                .lock()
                .expect("tracker lock poisoned")
                .revoke(&revoked);
            let _ = consumer.commit_consumer_state(CommitMode::Sync);
        }
    }
}

/// What a contender does with a batch of records.
#[derive(Clone)]
enum Handler {
    Noop,
    Naive { pool: MySqlPool, max_bytes: usize },
    Ideal { pool: MySqlPool, max_bytes: usize },
}

impl Handler {
    async fn handle(&self, records: &[Record]) -> anyhow::Result<()> {
        match self {
            Handler::Noop => Ok(()),
            Handler::Naive { pool, max_bytes } => {
                for record in records {
                    if let Ok(Inbound::Message(m)) = decode(record.value.as_deref(), *max_bytes) {
                        naive::write_one(pool, &m, record).await?;
                    }
                }
                Ok(())
            }
            Handler::Ideal { pool, max_bytes } => {
                ideal::write_batch(pool, records, *max_bytes).await
            }
        }
    }
}

/// Consumes the inbound topic in the configured group with the chosen reference
/// consumer until `shutdown` completes.
pub async fn run(
    settings: &Settings,
    args: &ContenderArgs,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let max_bytes = settings.worker.max_message_bytes;
    let connections = settings.database.max_connections as usize;
    let (handler, batch_rows, concurrency) = match args.kind {
        Reference::Noop => (Handler::Noop, args.batch_rows, 1),
        Reference::Naive => {
            let pool = crate::store::connect(&settings.database).await?;
            (Handler::Naive { pool, max_bytes }, 1, connections)
        }
        Reference::Ideal => {
            let pool = crate::store::connect(&settings.database).await?;
            let handler = Handler::Ideal { pool, max_bytes };
            (handler, args.batch_rows.max(1), connections)
        }
    };
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    // The worker's consumer settings, so offsets mean the same for every contender.
    let mut config = crate::consumer::group_consumer_config(settings);
    for (key, value) in &settings.kafka.librdkafka {
        config.set(key, value);
    }
    let consumer: Arc<StreamConsumer<TrackingContext>> = Arc::new(
        config
            .create_with_context(TrackingContext {
                tracker: tracker.clone(),
            })
            .context("creating the Kafka consumer")?,
    );
    consumer
        .subscribe(&[&settings.kafka.inbound_topic])
        .with_context(|| format!("subscribing to {}", settings.kafka.inbound_topic))?;
    let permits = Arc::new(Semaphore::new(concurrency));
    tokio::pin!(shutdown);
    loop {
        let first = tokio::select! {
            _ = &mut shutdown => break,
            message = consumer.recv() => message,
        };
        // A topic created a moment ago may be reported unknown at first: not fatal.
        let first = match first {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "Kafka consumer error");
                continue;
            }
        };
        let mut batch = vec![Record::from_message(&first)];
        let linger_until = Instant::now() + LINGER;
        while batch.len() < batch_rows {
            let left = linger_until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.recv()).await {
                Ok(Ok(message)) => batch.push(Record::from_message(&message)),
                Ok(Err(error)) => tracing::warn!(%error, "Kafka consumer error"),
                Err(_) => break,
            }
        }
        let generations: Vec<u64> = {
            let mut tracker = tracker.lock().expect("tracker lock poisoned");
            batch
                .iter()
                .map(|record| {
                    tracker.begin(&(record.topic.clone(), record.partition), record.offset)
                })
                .collect()
        };
        let permit = permits.clone().acquire_owned().await?;
        let handler = handler.clone();
        let consumer = consumer.clone();
        let tracker = tracker.clone();
        tokio::spawn(async move {
            while let Err(error) = handler.handle(&batch).await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "handling a batch failed; retrying"
                );
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            store_completed(&consumer, &tracker, &batch, &generations);
            drop(permit);
        });
    }
    let all = u32::try_from(concurrency).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(10), permits.acquire_many(all)).await;
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    Ok(())
}

/// Marks the batch done and stores each partition's new contiguous position.
fn store_completed<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    tracker: &Mutex<OffsetTracker>,
    batch: &[Record],
    generations: &[u64],
) {
    let mut tracker = tracker.lock().expect("tracker lock poisoned");
    let mut moved: HashMap<TopicPartition, i64> = HashMap::new();
    for (record, generation) in batch.iter().zip(generations) {
        let tp = (record.topic.clone(), record.partition);
        if let Some(position) = tracker.complete(&tp, record.offset, *generation) {
            moved.insert(tp, position);
        }
    }
    let mut positions = TopicPartitionList::new();
    for ((topic, partition), position) in moved {
        let _ = positions.add_partition_offset(&topic, partition, Offset::Offset(position));
    }
    if positions.count() > 0 {
        // A partition revoked meanwhile refuses the store: its next owner redelivers.
        let _ = consumer.store_offsets(&positions);
    }
}
