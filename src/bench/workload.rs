//! The records a benchmark scenario sends: platform-shaped chat messages, each sent
//! twice with random keys (as platforms and their retries do), and the expectation they
//! leave behind.
//!
//! Guarantee: every message the bench sends is valid and is described by a
//! [`BenchMessage`] returned to the caller, so the correctness check knows exactly
//! which rows must exist; a send returns only after the broker acknowledged it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::task::JoinSet;

use crate::config::KafkaSettings;
use crate::pipeline::now_millis;

/// Tenant of every bench message (the database is fresh per trial anyway).
pub const TENANT: &str = "bench";
/// Platform of every bench message.
pub const PLATFORM: &str = "bench";
/// How often each message is sent.
pub const COPIES: usize = 2;
/// How many producers push the burst at once.
pub const BURST_PRODUCERS: usize = 10;
/// Share of the records that belong to the hot user, in tenths.
const HOT_USER_TENTHS: usize = 3;
/// Sends awaited at once.
const IN_FLIGHT_SENDS: usize = 2_000;
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// How messages are spread over users.
#[derive(Debug, Clone, Copy)]
pub enum Spread {
    /// Message `n` belongs to user `n % users`.
    Even { users: usize },
    /// 30% of the messages belong to user 0, the rest spread evenly over the others.
    HotUser { users: usize },
    /// Every message belongs to one (new) user.
    OneUser,
}

impl Spread {
    fn user_of(self, n: usize) -> usize {
        match self {
            Spread::Even { users } => n % users.max(1),
            Spread::HotUser { users } if users > 1 && n % 10 >= HOT_USER_TENTHS => {
                1 + n % (users - 1)
            }
            Spread::HotUser { .. } | Spread::OneUser => 0,
        }
    }
}

/// One message the bench sent: what its row must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchMessage {
    pub message_id: String,
    pub user_id: String,
    pub agent_id: String,
    pub content: String,
    /// Epoch ms; also the records' CreateTime.
    pub sent_at: i64,
}

impl BenchMessage {
    /// Message `n` of a trial, sent (stamped) at `sent_at`.
    pub fn new(trial: &str, n: usize, spread: Spread, sent_at: i64) -> Self {
        let user = spread.user_of(n);
        Self {
            message_id: format!("{trial}-m{n}"),
            user_id: format!("{trial}-u{user}"),
            agent_id: format!("agent-{}", user % 7),
            content: format!("bench message {n}: {}", "lorem ipsum ".repeat(8)),
            sent_at,
        }
    }

    /// The record value, in the platforms' shape (DESIGN.md, "Inbound records").
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "message_id": self.message_id,
            "tenant_id": TENANT,
            "platform": PLATFORM,
            "from_user_id": self.user_id,
            "to_user_id": self.agent_id,
            "message_type": "TEXT",
            "content": self.content,
            "timestamp": self.sent_at,
            "user_info": [{"header_image": "avatar.jpg", "nickname": format!("nick {}", self.user_id), "user_id": self.user_id}]
        })
        .to_string()
    }

    /// A read receipt of this message's conversation, up to this message.
    pub fn read_receipt_json(&self) -> String {
        serde_json::json!({
            "type": "read",
            "tenant_id": TENANT,
            "platform": PLATFORM,
            "from_user_id": self.user_id,
            "to_user_id": self.agent_id,
            "timestamp": self.sent_at,
        })
        .to_string()
    }
}

/// `count` messages of a trial, stamped with fixed, distinct times.
pub fn backlog(trial: &str, count: usize, spread: Spread) -> Vec<BenchMessage> {
    let base = now_millis();
    (0..count)
        .map(|n| BenchMessage::new(trial, n, spread, base + n as i64))
        .collect()
}

pub fn producer(kafka: &KafkaSettings) -> anyhow::Result<FutureProducer> {
    kafka
        .client_config()
        .set("linger.ms", "5")
        .set("acks", "all")
        .create()
        .context("creating the bench producer")
}

/// Per partition, the offset just past the last record sent there.
pub type PartitionEnds = HashMap<i32, i64>;

/// A backlog written inside a Kafka transaction that is not yet committed: consumers
/// (librdkafka reads `read_committed` by default) see none of it until [`commit`]
/// makes all of it visible at once — so a contender can join its group first, and the
/// clock can start at the commit without counting start-up or racing the join.
///
/// [`commit`]: HeldBacklog::commit
pub struct HeldBacklog {
    producer: FutureProducer,
    /// Where the contender's committed offsets must reach: past the last data record of
    /// each partition (the transaction's commit marker sits at that offset, and a
    /// consumer that stores offsets itself never stores past it).
    pub ends: PartitionEnds,
}

impl HeldBacklog {
    /// Sends every message [`COPIES`] times inside one transaction, leaving it open;
    /// with [`Keys::None`] the records carry no key (the partitioner spreads them).
    /// With `receipt_every` N > 0, every Nth message is followed by a read receipt of
    /// its conversation up to it ([`COPIES`] times too).
    pub async fn send(
        kafka: &KafkaSettings,
        topic: &str,
        messages: &[BenchMessage],
        keys: Keys,
        receipt_every: usize,
    ) -> anyhow::Result<Self> {
        let producer: FutureProducer = kafka
            .client_config()
            .set("linger.ms", "5")
            .set(
                "transactional.id",
                format!("im-ingest-bench-{:016x}", rand::random::<u64>()),
            )
            // Open through sending, the contenders' start and their join (up to a
            // minute): well past librdkafka's 60 s default, within the broker's 15 min.
            .set("transaction.timeout.ms", "600000")
            .create()
            .context("creating the bench's transactional producer")?;
        tokio::task::block_in_place(|| {
            producer.init_transactions(SEND_TIMEOUT)?;
            producer.begin_transaction()
        })
        .context(
            "starting a Kafka transaction for the backlog (the broker needs the \
             transaction state log: transaction.state.log.replication.factor and \
             min.isr no larger than its broker count)",
        )?;
        let ends = send_with(&producer, topic, messages, keys, receipt_every).await?;
        Ok(Self { producer, ends })
    }

    /// Commits the transaction: the whole backlog becomes visible to consumers.
    pub fn commit(self) -> anyhow::Result<PartitionEnds> {
        tokio::task::block_in_place(|| self.producer.commit_transaction(SEND_TIMEOUT))
            .context("committing the backlog's Kafka transaction")?;
        Ok(self.ends)
    }
}

/// How the records of a scenario are keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// Each record its own random key, as platforms and their retries send them.
    Random,
    /// No key at all: an unkeyed producer.
    None,
}

/// Sends every message [`COPIES`] times (copies back to back, each with its own random
/// key) and waits for every acknowledgement. Returns where each partition now ends.
pub async fn send_all(
    producer: &FutureProducer,
    topic: &str,
    messages: &[BenchMessage],
) -> anyhow::Result<PartitionEnds> {
    send_with(producer, topic, messages, Keys::Random, 0).await
}

async fn send_with(
    producer: &FutureProducer,
    topic: &str,
    messages: &[BenchMessage],
    keys: Keys,
    receipt_every: usize,
) -> anyhow::Result<PartitionEnds> {
    let mut ends = PartitionEnds::new();
    let mut note = |(partition, offset): (i32, i64)| {
        let end = ends.entry(partition).or_insert(0);
        *end = (*end).max(offset + 1);
    };
    let mut pending = JoinSet::new();
    for (n, message) in messages.iter().enumerate() {
        let receipt = receipt_every > 0 && (n + 1) % receipt_every == 0;
        let values =
            std::iter::once(message.to_json()).chain(receipt.then(|| message.read_receipt_json()));
        for value in values {
            for _ in 0..COPIES {
                if pending.len() >= IN_FLIGHT_SENDS {
                    note(pending.join_next().await.expect("not empty")??);
                }
                pending.spawn(send_one(
                    producer.clone(),
                    topic.to_string(),
                    value.clone(),
                    message.sent_at,
                    keys,
                ));
            }
        }
    }
    while let Some(result) = pending.join_next().await {
        note(result??);
    }
    Ok(ends)
}

/// Sends one record; returns its partition and offset.
async fn send_one(
    producer: FutureProducer,
    topic: String,
    value: String,
    timestamp: i64,
    keys: Keys,
) -> anyhow::Result<(i32, i64)> {
    let key = format!("{:016x}", rand::random::<u64>());
    let mut record = FutureRecord::to(&topic)
        .payload(&value)
        .timestamp(timestamp);
    if keys == Keys::Random {
        record = record.key(&key);
    }
    let delivered = producer
        .send(record, SEND_TIMEOUT)
        .await
        .map_err(|(error, _)| error)
        .with_context(|| format!("sending a bench record to {topic}"))?;
    Ok((delivered.partition, delivered.offset))
}

/// Offers `rate` messages per second (each sent [`COPIES`] times, stamped when sent)
/// for `duration`, paced in 10 ms steps, numbered from `first`. Returns what was sent.
pub async fn send_paced(
    producer: &FutureProducer,
    topic: &str,
    trial: &str,
    first: usize,
    spread: Spread,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Vec<BenchMessage>> {
    let started = Instant::now();
    let mut sent = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while started.elapsed() < duration {
        tick.tick().await;
        let due = (rate * started.elapsed().as_secs_f64()) as usize;
        let now = now_millis();
        let step: Vec<BenchMessage> = (sent.len()..due)
            .map(|n| BenchMessage::new(trial, first + n, spread, now))
            .collect();
        send_all(producer, topic, &step).await?;
        sent.extend(step);
    }
    Ok(sent)
}

/// The seeds' burst: [`BURST_PRODUCERS`] producers push `count` messages of one new
/// user at once, each message twice. Returns what was sent.
pub async fn send_burst(
    kafka: &KafkaSettings,
    topic: &str,
    trial: &str,
    count: usize,
) -> anyhow::Result<Vec<BenchMessage>> {
    let messages = backlog(trial, count, Spread::OneUser);
    let mut producers = JoinSet::new();
    for first in 0..BURST_PRODUCERS {
        let own: Vec<BenchMessage> = messages
            .iter()
            .skip(first)
            .step_by(BURST_PRODUCERS)
            .cloned()
            .collect();
        let producer = producer(kafka)?;
        let topic = topic.to_string();
        producers.spawn(async move { send_all(&producer, &topic, &own).await });
    }
    while let Some(result) = producers.join_next().await {
        result??;
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hot_user_gets_three_tenths_of_the_messages() {
        let spread = Spread::HotUser { users: 100 };
        let hot = (0..10_000).filter(|n| spread.user_of(*n) == 0).count();
        assert_eq!(hot, 3_000);
        let users: std::collections::HashSet<usize> =
            (0..10_000).map(|n| spread.user_of(n)).collect();
        assert_eq!(users.len(), 100);
    }

    #[test]
    fn messages_are_valid_for_the_worker() {
        let message = BenchMessage::new("t1", 5, Spread::Even { users: 3 }, 1_700_000_000_000);
        let decoded = crate::message::decode(Some(message.to_json().as_bytes()), 1 << 20);
        let Ok(crate::message::Inbound::Message(decoded)) = decoded else {
            panic!("{decoded:?}");
        };
        assert_eq!(decoded.message_id, "t1-m5");
        assert_eq!(decoded.from_user_id, "t1-u2");
        assert_eq!(decoded.tenant_id, TENANT);
        assert_eq!(decoded.sent_at, 1_700_000_000_000);
    }
}
