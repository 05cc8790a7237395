//! Retry headers are the worker's own (DESIGN.md): read only on its delay topics, and
//! bounded there. A producer's or an operator's headers never hold a partition, never
//! shorten a record's attempts and never cost a valid message.

use std::time::Duration;

use im_ingest::pipeline::now_millis;
use im_ingest::retry::headers::{encode_big_integer, Origin, RetryHeaders};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::helpers::{unique, WorkerEnv};
use crate::kafka_util::{producer, read_all, TIMEOUT};
use crate::pipeline::payload;
use crate::worker::{
    count, count_of, start, wait_for_count, wait_until_all_committed, wait_until_topic_committed,
};

const A_YEAR_MS: i64 = 365 * 24 * 3600 * 1000;

/// The contract's full retry header set, due at `due_at`, on its 3rd attempt.
fn full_retry_headers(env: &WorkerEnv, due_at: i64) -> OwnedHeaders {
    RetryHeaders {
        attempts: 3,
        backoff_timestamp: due_at,
        origin: Origin {
            topic: env.inbound.clone(),
            partition: 0,
            offset: 7,
            timestamp: now_millis(),
            consumer_group: env.group.clone(),
        },
        exception_fqcn: "im_ingest::LockHeld".into(),
        exception_message: "sent by the test".into(),
        replay_count: None,
    }
    .to_headers()
}

async fn send(topic: &str, partition: i32, value: &str, headers: OwnedHeaders) {
    producer()
        .send(
            FutureRecord::<(), _>::to(topic)
                .partition(partition)
                .payload(value)
                .headers(headers),
            TIMEOUT,
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
}

#[tokio::test]
async fn retry_headers_on_the_inbound_topic_are_ignored_and_the_messages_stored_at_once() {
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    // The full set, due in a year: read as a delay record, it would hold the partition.
    send(
        &env.inbound,
        0,
        &payload(&unique("full"), "full-set"),
        full_retry_headers(&env, now_millis() + A_YEAR_MS),
    )
    .await;
    // Two of the headers only: read as a delay record, it is "malformed".
    let partial = OwnedHeaders::new()
        .insert(Header {
            key: "retry_topic-attempts",
            value: Some(&encode_big_integer(2)),
        })
        .insert(Header {
            key: "retry_topic-backoff-timestamp",
            value: Some(&encode_big_integer(now_millis() + A_YEAR_MS)),
        });
    send(
        &env.inbound,
        0,
        &payload(&unique("partial"), "partial-set"),
        partial,
    )
    .await;
    // Behind them on the same partition, without headers.
    send(
        &env.inbound,
        0,
        &payload(&unique("plain"), "behind"),
        OwnedHeaders::new(),
    )
    .await;

    for id in ["full-set", "partial-set", "behind"] {
        wait_for_count(&pool, &count_of(id), 1, &worker).await;
    }
    wait_until_all_committed(&env, &worker).await;
    assert!(
        read_all(&env.dlq).is_empty(),
        "a valid message was dead-lettered"
    );
    let (_, metrics) = crate::admin::get(&worker.admin_address(), "/metrics");
    assert_eq!(
        crate::admin::metric(
            &metrics,
            "im_ingest_retry_headers_distrusted_total{reason=\"not_a_delay_topic\"}"
        ),
        Some(2.0),
        "the two records with retry headers were not counted"
    );
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn a_delay_record_due_in_a_year_waits_no_longer_than_its_topics_delay() {
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    let topic = env.first_delay_topic();
    let sent_at = now_millis();
    send(
        &topic,
        0,
        &payload(&unique("year"), "due-in-a-year"),
        full_retry_headers(&env, sent_at + A_YEAR_MS),
    )
    .await;
    // Its topic's delay is 250 ms: with jitter and the margin for clocks, well within 10 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while count(&pool, &count_of("due-in-a-year")).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the delay record was held past its topic's delay; log:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until_topic_committed(&env, &topic, &worker).await;
    assert!(read_all(&env.dlq).is_empty());
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn a_delay_record_with_malformed_retry_headers_is_stored_not_dead_lettered() {
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    let topic = env.first_delay_topic();
    // Attempts only: every other header of the set is missing.
    let malformed = OwnedHeaders::new().insert(Header {
        key: "retry_topic-attempts",
        value: Some(&encode_big_integer(2)),
    });
    send(
        &topic,
        0,
        &payload(&unique("bad"), "malformed-on-delay"),
        malformed,
    )
    .await;
    wait_for_count(&pool, &count_of("malformed-on-delay"), 1, &worker).await;
    wait_until_topic_committed(&env, &topic, &worker).await;
    assert!(read_all(&env.dlq).is_empty());
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}
