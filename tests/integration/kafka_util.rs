//! Producing, reading back and offset inspection for tests, with the plain rdkafka API.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::helpers::brokers;

pub const TIMEOUT: Duration = Duration::from_secs(30);

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap()
}

/// Produces `value` to `topic` (random key unless `partition` is given) and returns
/// (partition, offset).
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    value: &[u8],
) -> (i32, i64) {
    let key = format!("{:x}", rand::random::<u64>());
    let mut record = FutureRecord::to(topic).key(&key).payload(value);
    if let Some(p) = partition {
        record = record.partition(p);
    }
    let delivery = producer
        .send(record, TIMEOUT)
        .await
        .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    (delivery.partition, delivery.offset)
}

fn reader() -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", crate::helpers::unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// Every record of every partition of `topic`, read from the beginning to the end
/// offsets as of now.
pub fn read_all(topic: &str) -> Vec<OwnedMessage> {
    let consumer = reader();
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT).unwrap();
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut wanted = 0;
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, *p, TIMEOUT).unwrap();
        wanted += (high - low) as usize;
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while out.len() < wanted {
        assert!(
            Instant::now() < deadline,
            "read {} of {wanted} records of {topic}",
            out.len()
        );
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            out.push(message.unwrap().detach());
        }
    }
    out
}

/// The group's committed offset for one partition (`None` when nothing is committed).
pub fn committed(group: &str, topic: &str, partition: i32) -> Option<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = consumer.committed_offsets(tpl, TIMEOUT).unwrap();
    match committed.find_partition(topic, partition).unwrap().offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// End offset (next offset to be written) of one partition.
pub fn end_offset(topic: &str, partition: i32) -> i64 {
    reader()
        .fetch_watermarks(topic, partition, TIMEOUT)
        .unwrap()
        .1
}

pub fn header<'a>(message: &'a OwnedMessage, name: &str) -> Option<&'a [u8]> {
    use rdkafka::message::Headers;
    message
        .headers()?
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
}

/// The `message_id` of a record whose value is an inbound chat message.
pub fn message_id_of(record: &OwnedMessage) -> String {
    let value: serde_json::Value = serde_json::from_slice(record.payload().unwrap()).unwrap();
    value["message_id"].as_str().unwrap().to_string()
}
