//! A record the dead-letter topic refuses never freezes its partition (issue 12,
//! hazard 1): the worker's own topics and producer take whatever the inbound topic
//! holds; a record a dead-letter topic still refuses goes there as a stub; a topic that
//! is gone stops the worker with a clear error instead of a retry loop.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;

use crate::admin::wait_for_metric;
use crate::helpers::{brokers, unique, OutsideLock, WorkerEnv};
use crate::kafka_util::{committed, header, produce, read_all};
use crate::pipeline::payload;
use crate::worker::{
    count, count_of, finish, start, wait_for_count, wait_until_all_committed, WAIT,
};

/// The inbound topic's record limit in these tests: four times the worker's own.
const INBOUND_LIMIT: &str = "4194304";
/// A record over the worker's default `worker.max_message_bytes` (512 KiB), under the
/// inbound topic's limit and over the broker's default (1 MiB).
const OVERSIZED: usize = 1_500_000;

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap()
}

/// Creates `topic` with one partition and the record limit `max_message_bytes`.
async fn create_topic(topic: &str, max_message_bytes: &str) {
    let results = admin()
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))
                .set("max.message.bytes", max_message_bytes)],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    results[0].as_ref().unwrap();
}

/// A producer that may send records up to the inbound topic's limit.
fn large_producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("message.max.bytes", "5000000")
        .create()
        .unwrap()
}

/// An oversized record, then a valid message behind it in the same partition; returns
/// the valid message's id.
async fn push_oversized_then_valid(env: &WorkerEnv) -> String {
    let producer = large_producer();
    produce(&producer, &env.inbound, Some(0), &vec![b'x'; OVERSIZED]).await;
    let valid = unique("behind");
    produce(
        &producer,
        &env.inbound,
        Some(0),
        payload(&unique("c"), &valid).as_bytes(),
    )
    .await;
    valid
}

#[tokio::test]
async fn a_record_too_large_for_the_worker_on_a_4_mb_inbound_topic_is_dead_lettered_whole_and_the_partition_moves_on(
) {
    let env = WorkerEnv::new(1);
    create_topic(&env.inbound, INBOUND_LIMIT).await;
    let (worker, pool) = start(&env).await;
    let valid = push_oversized_then_valid(&env).await;

    wait_for_count(&pool, &count_of(&valid), 1, &worker).await;
    wait_until_all_committed(&env, &worker).await;
    let dead = read_all(&env.dlq);
    assert_eq!(dead.len(), 1, "one dead letter");
    assert_eq!(
        dead[0].payload().map(<[u8]>::len),
        Some(OVERSIZED),
        "the whole value, as received"
    );
    assert_eq!(
        header(&dead[0], "kafka_dlt-exception-fqcn"),
        Some(&b"im_ingest::InvalidMessage"[..])
    );
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM message").await, 1);
    finish(&env, worker, pool).await;
}

#[tokio::test]
async fn a_record_the_dead_letter_topic_still_refuses_goes_there_as_a_stub_and_the_partition_moves_on(
) {
    let env = WorkerEnv::new(1);
    create_topic(&env.inbound, INBOUND_LIMIT).await;
    // Created smaller by someone else: the worker leaves existing topics as they are.
    create_topic(&env.dlq, "1048576").await;
    let (worker, pool) = start(&env).await;
    let valid = push_oversized_then_valid(&env).await;

    wait_for_count(&pool, &count_of(&valid), 1, &worker).await;
    wait_until_all_committed(&env, &worker).await;
    let dead = read_all(&env.dlq);
    assert_eq!(dead.len(), 1, "one dead letter, the stub");
    let stub = &dead[0];
    assert_eq!(stub.payload().unwrap_or_default(), b"", "no value");
    assert_eq!(
        header(stub, "kafka_dlt-original-offset"),
        Some(&0_i64.to_be_bytes()[..]),
        "the contract's headers name the record"
    );
    assert_eq!(
        header(stub, "kafka_dlt-exception-fqcn"),
        Some(&b"im_ingest::InvalidMessage"[..])
    );
    let reason =
        String::from_utf8_lossy(header(stub, "kafka_dlt-exception-message").unwrap()).into_owned();
    assert!(
        reason.contains(&format!("{OVERSIZED} bytes")) && reason.contains("refused"),
        "the size and the refusal are in the reason: {reason}"
    );
    wait_for_metric(
        &worker.admin_address(),
        "im_ingest_dead_letter_stubs_total",
        1.0,
    )
    .await;
    finish(&env, worker, pool).await;
}

#[tokio::test]
async fn a_valid_message_its_delay_topic_refuses_is_dead_lettered_whole_as_delay_refused() {
    let env = WorkerEnv::new(1).with("WORKER__MAX_MESSAGE_BYTES", "2000000");
    create_topic(&env.inbound, INBOUND_LIMIT).await;
    create_topic(&env.first_delay_topic(), "1048576").await;
    let (worker, pool) = start(&env).await;
    let user = unique("held");
    let _outside = OutsideLock::hold(&user, None).await;
    let mut message: serde_json::Value =
        serde_json::from_str(&payload(&user, &unique("large"))).unwrap();
    message["content"] = "y".repeat(OVERSIZED).into();
    let value = message.to_string();
    produce(&large_producer(), &env.inbound, Some(0), value.as_bytes()).await;

    wait_until_all_committed(&env, &worker).await;
    let dead = read_all(&env.dlq);
    assert_eq!(dead.len(), 1, "one dead letter");
    assert_eq!(dead[0].payload(), Some(value.as_bytes()), "the whole value");
    assert_eq!(
        header(&dead[0], "kafka_dlt-exception-fqcn"),
        Some(&b"im_ingest::DelayRefused"[..])
    );
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM message").await, 0);
    finish(&env, worker, pool).await;
}

#[tokio::test]
async fn a_dead_letter_topic_deleted_under_the_worker_stops_it_with_a_clear_error_and_the_record_uncommitted(
) {
    let env = WorkerEnv::new(1);
    let (mut worker, pool) = start(&env).await;
    admin()
        .delete_topics(&[&env.dlq], &AdminOptions::new())
        .await
        .unwrap()[0]
        .as_ref()
        .unwrap();
    produce(&large_producer(), &env.inbound, Some(0), b"not json").await;

    let status = worker.wait_for_exit(WAIT + Duration::from_secs(30));
    let log = worker.log_text();
    assert_eq!(status.code(), Some(1), "a fatal error exits 1; log:\n{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains(&env.dlq) && last.contains("does not exist"),
        "the last line names the topic and the cause: {last}"
    );
    assert_eq!(
        committed(&env.group, &env.inbound, 0).unwrap_or(0),
        0,
        "the record is not passed over"
    );
    finish(&env, worker, pool).await;
}
