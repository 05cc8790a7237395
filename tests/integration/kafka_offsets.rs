//! The Kafka behaviour the worker's delivery guarantee rests on, proven against the real
//! broker: with automatic offset storing off, an offset is committed only once stored,
//! and what is committed is "next record to read" (last offset + 1).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::helpers::{brokers, unique};

const TIMEOUT: Duration = Duration::from_secs(30);

fn base_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers());
    config
}

async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = base_config().create().unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(TIMEOUT)),
        )
        .await
        .unwrap();
    for result in results {
        result.unwrap_or_else(|(topic, e)| panic!("creating {topic}: {e}"));
    }
}

fn consumer(group: &str) -> StreamConsumer {
    base_config()
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("session.timeout.ms", "6000")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()
        .unwrap()
}

#[tokio::test]
async fn stored_then_committed_offset_reads_back_as_last_offset_plus_one() {
    let topic = unique("im_test_offsets");
    let group = unique("im_test_group");
    create_topic(&topic, 3).await;

    let producer: FutureProducer = base_config().create().unwrap();
    let mut last_offset = -1;
    for i in 0..3 {
        let payload = format!("{{\"n\":{i}}}");
        let delivery = producer
            .send(
                FutureRecord::<(), _>::to(&topic)
                    .partition(1)
                    .payload(&payload),
                TIMEOUT,
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing: {e}"));
        assert_eq!(delivery.partition, 1);
        last_offset = delivery.offset;
    }

    let worker = consumer(&group);
    worker.subscribe(&[&topic]).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let message = tokio::time::timeout(TIMEOUT, worker.recv())
            .await
            .expect("no record within the timeout")
            .unwrap();
        seen.push(message.offset());
        worker.store_offset_from_message(&message).unwrap();
    }
    assert_eq!(seen.last(), Some(&last_offset));
    worker.commit_consumer_state(CommitMode::Sync).unwrap();
    drop(worker);

    // A fresh member of the group reads back what the broker holds.
    let reader = consumer(&group);
    let mut wanted = TopicPartitionList::new();
    for partition in 0..3 {
        wanted.add_partition(&topic, partition);
    }
    let committed = reader.committed_offsets(wanted, TIMEOUT).unwrap();
    let offset_of = |p| committed.find_partition(&topic, p).unwrap().offset();
    assert_eq!(offset_of(1), Offset::Offset(last_offset + 1));
    assert_eq!(
        offset_of(0),
        Offset::Invalid,
        "nothing was consumed from partition 0"
    );
    assert_eq!(
        offset_of(2),
        Offset::Invalid,
        "nothing was consumed from partition 2"
    );
}

#[tokio::test]
async fn consumed_but_unstored_offsets_are_not_committed() {
    let topic = unique("im_test_unstored");
    let group = unique("im_test_group");
    create_topic(&topic, 1).await;
    let producer: FutureProducer = base_config().create().unwrap();
    producer
        .send(FutureRecord::<(), _>::to(&topic).payload("x"), TIMEOUT)
        .await
        .unwrap_or_else(|(e, _)| panic!("producing: {e}"));

    let worker = consumer(&group);
    worker.subscribe(&[&topic]).unwrap();
    tokio::time::timeout(TIMEOUT, worker.recv())
        .await
        .expect("no record within the timeout")
        .unwrap();
    // Nothing stored: a commit has nothing to send, and the broker keeps no offset.
    assert!(worker.commit_consumer_state(CommitMode::Sync).is_err());
    drop(worker);

    let reader = consumer(&group);
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(&topic, 0);
    let committed = reader.committed_offsets(wanted, TIMEOUT).unwrap();
    assert_eq!(
        committed.find_partition(&topic, 0).unwrap().offset(),
        Offset::Invalid
    );
}
