//! Non-blocking retries through the delay topics, with real worker processes: records
//! wait until due without blocking anything else, come back exactly once, and end in
//! the dead-letter topic after the last attempt.

use std::time::{Duration, Instant};

use im_ingest::pipeline::now_millis;
use im_ingest::retry::headers::{decode_big_integer, Origin, RetryHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::Message;
use sqlx::MySqlPool;

use crate::admin::assigned_partitions;
use crate::helpers::{unique, OutsideLock, WorkerEnv, WorkerProcess};
use crate::kafka_util::{committed, end_offset, header, produce, producer, read_all, TIMEOUT};
use crate::pipeline::payload;
use crate::worker::{
    count, count_of, push_ten_messages_of_one_new_customer_twice, start, wait_for_count,
    wait_until_all_committed, wait_until_topic_committed, WAIT,
};

const DELAYS: [u64; 4] = [250, 1000, 4000, 16000];

/// Waits until `sql` counts `expected` and returns when that was first seen (epoch ms).
async fn time_of_count(pool: &MySqlPool, sql: &str, expected: i64, worker: &WorkerProcess) -> i64 {
    wait_for_count(pool, sql, expected, worker).await;
    now_millis()
}

/// Produces a delay record straight to `topic`/`partition`, due at `due_at`.
async fn park(topic: &str, partition: i32, value: &str, due_at: i64, env: &WorkerEnv) {
    let headers = RetryHeaders {
        attempts: 2,
        backoff_timestamp: due_at,
        origin: Origin {
            topic: env.inbound.clone(),
            partition: 0,
            offset: rand::random::<u32>() as i64,
            timestamp: now_millis(),
            consumer_group: env.group.clone(),
        },
        exception_fqcn: "im_ingest::LockHeld".into(),
        exception_message: "parked by the test".into(),
        replay_count: None,
    };
    producer()
        .send(
            FutureRecord::<(), _>::to(topic)
                .partition(partition)
                .payload(value)
                .headers(headers.to_headers()),
            TIMEOUT,
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
}

async fn wait_until_retries_settled(env: &WorkerEnv, worker: &WorkerProcess) {
    wait_until_all_committed(env, worker).await;
    for delay in DELAYS {
        wait_until_topic_committed(env, &env.delay_topic(delay), worker).await;
    }
}

#[tokio::test]
async fn two_workers_in_one_group_store_one_customer_one_session_ten_messages_from_concurrent_duplicated_pushes(
) {
    let env = WorkerEnv::new(4);
    let (first, pool) = start(&env).await;
    let second = WorkerProcess::start(&env);
    // Both take part: each holds inbound partitions before the pushes.
    let admins = [first.admin_address(), second.admin_address()];
    let deadline = Instant::now() + WAIT;
    loop {
        let held: Vec<Option<f64>> = admins
            .iter()
            .map(|a| assigned_partitions(a, &env.inbound))
            .collect();
        if held.iter().all(|n| n.is_some_and(|n| n >= 1.0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "inbound partitions per worker: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    push_ten_messages_of_one_new_customer_twice(&env.inbound).await;
    wait_for_count(&pool, "SELECT COUNT(*) FROM message", 10, &first).await;
    wait_until_retries_settled(&env, &first).await;
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM customer").await, 1);
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM session").await, 1);
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM message").await, 10);
    drop((first, second));
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn record_whose_lock_is_held_for_two_seconds_is_stored_once_after_release_with_one_delay_record_per_attempt(
) {
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    let user = unique("held");
    let held_from = now_millis();
    let outside = OutsideLock::hold(&user, Some(Duration::from_secs(2))).await;
    produce(
        &producer(),
        &env.inbound,
        Some(0),
        payload(&user, "held-2s").as_bytes(),
    )
    .await;

    // Not stored while the lock is held...
    while now_millis() < held_from + 1_900 {
        assert_eq!(
            count(&pool, &count_of("held-2s")).await,
            0,
            "stored while the lock was held"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...stored once it expired, exactly once.
    let stored_at = time_of_count(&pool, &count_of("held-2s"), 1, &worker).await;
    assert!(
        stored_at >= held_from + 2_000,
        "stored at +{} ms",
        stored_at - held_from
    );
    wait_until_retries_settled(&env, &worker).await;
    assert_eq!(count(&pool, &count_of("held-2s")).await, 1);

    // Every failed attempt left exactly one delay record, the n-th in the n-th topic.
    let mut attempts = Vec::new();
    for (n, delay) in DELAYS.iter().enumerate() {
        let records = read_all(&env.delay_topic(*delay));
        assert!(
            records.len() <= 1,
            "{} records in the {delay} ms topic",
            records.len()
        );
        for record in records {
            let a = decode_big_integer(header(&record, "retry_topic-attempts").unwrap()).unwrap();
            assert_eq!(a, n as i64 + 2, "attempt {a} in the {delay} ms topic");
            attempts.push(a);
        }
    }
    assert!(
        !attempts.is_empty(),
        "the record never went through a delay topic"
    );
    assert_eq!(attempts, (2..2 + attempts.len() as i64).collect::<Vec<_>>());
    println!(
        "lock held 2 s: stored {} ms after the lock was taken, after {} delay records",
        stored_at - held_from,
        attempts.len()
    );
    outside.release().await;
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn lock_held_forever_dead_letters_after_max_attempts_with_original_coordinates() {
    // Delays this short need holds as short (the last delay is at least the hold).
    let env = WorkerEnv::new(1)
        .with("RETRY__DELAYS_MS", "100,200")
        .with("RETRY__MAX_ATTEMPTS", "4")
        .with("LOCK__MAX_HOLD_MS", "200")
        .with("WORKER__WRITE_STALL_MS", "100");
    let (worker, pool) = start(&env).await;
    let user = unique("forever");
    let outside = OutsideLock::hold(&user, None).await;
    let (partition, offset) = produce(
        &producer(),
        &env.inbound,
        Some(0),
        payload(&user, "never").as_bytes(),
    )
    .await;
    let original = read_all(&env.inbound)
        .into_iter()
        .find(|m| m.offset() == offset)
        .unwrap();
    let original_timestamp = original.timestamp().to_millis().unwrap();

    let deadline = Instant::now() + WAIT;
    let dead = loop {
        let dead = read_all(&env.dlq);
        if !dead.is_empty() {
            break dead;
        }
        assert!(
            Instant::now() < deadline,
            "nothing dead-lettered; log:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead.len(), 1);
    let headers = RetryHeaders::from_headers(dead[0].headers().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(headers.attempts, 4);
    assert_eq!(headers.origin.topic, env.inbound);
    assert_eq!(headers.origin.partition, partition);
    assert_eq!(headers.origin.offset, offset);
    assert_eq!(headers.origin.timestamp, original_timestamp);
    assert_eq!(headers.origin.consumer_group, env.group);
    assert_eq!(headers.exception_fqcn, "im_ingest::LockHeld");
    assert!(
        headers.exception_message.contains("4 attempts"),
        "{}",
        headers.exception_message
    );
    assert_eq!(dead[0].payload(), original.payload());
    // Attempt 2 waited in the 100 ms topic, attempts 3 and 4 in the last (200 ms) one.
    assert_eq!(read_all(&env.delay_topic(100)).len(), 1);
    assert_eq!(read_all(&env.delay_topic(200)).len(), 2);
    assert_eq!(count(&pool, &count_of("never")).await, 0);
    outside.release().await;
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn delay_partition_waits_for_its_head_record_while_another_delay_partition_flows() {
    let env = WorkerEnv::new(2);
    let (worker, pool) = start(&env).await;
    // The 4 s topic: a due time 4 s ahead is within what its delay allows.
    let topic = env.delay_topic(4000);
    let head_due = now_millis() + 4_000;
    park(
        &topic,
        0,
        &payload(&unique("a"), "head-not-due"),
        head_due,
        &env,
    )
    .await;
    park(
        &topic,
        0,
        &payload(&unique("a2"), "behind-head"),
        now_millis(),
        &env,
    )
    .await;
    park(
        &topic,
        1,
        &payload(&unique("b"), "other-partition"),
        now_millis(),
        &env,
    )
    .await;
    let head_offset = end_offset(&topic, 0) - 2;

    let other_at = time_of_count(&pool, &count_of("other-partition"), 1, &worker).await;
    assert!(
        other_at < head_due,
        "the due partition waited for the other one"
    );
    while now_millis() < head_due - 300 {
        assert_eq!(
            count(&pool, &count_of("head-not-due")).await,
            0,
            "processed before due"
        );
        assert_eq!(
            count(&pool, &count_of("behind-head")).await,
            0,
            "passed the held head record"
        );
        let position = committed(&env.group, &topic, 0).unwrap_or(0);
        assert!(
            position <= head_offset,
            "committed {position} passed the held record at {head_offset}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let head_at = time_of_count(&pool, &count_of("head-not-due"), 1, &worker).await;
    assert!(
        head_at >= head_due,
        "processed {} ms early",
        head_due - head_at
    );
    wait_for_count(&pool, &count_of("behind-head"), 1, &worker).await;
    wait_until_topic_committed(&env, &topic, &worker).await;
    println!(
        "held record stored {} ms after its due time (polled every 100 ms)",
        head_at - head_due
    );
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn parked_records_are_stored_once_after_the_worker_holding_them_is_killed() {
    let env = WorkerEnv::new(2);
    let (first, pool) = start(&env).await;
    // The 4 s topic: a due time 3 s ahead is within what its delay allows.
    let topic = env.delay_topic(4000);
    let due = now_millis() + 3_000;
    for n in 0..6 {
        park(
            &topic,
            n % 2,
            &payload(&unique("p"), &format!("parked-{n}")),
            due,
            &env,
        )
        .await;
    }
    // Let the first worker fetch and hold both partitions, then kill it (SIGKILL).
    let deadline = Instant::now() + WAIT;
    while first.log_text().matches("holding delay partition").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the worker never held the partitions:\n{}",
            first.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(first);
    let second = WorkerProcess::start(&env);
    // Nothing is stored before its due time, by the first worker or the second.
    while now_millis() < due - 300 {
        assert_eq!(
            count(
                &pool,
                "SELECT COUNT(*) FROM message WHERE external_message_id LIKE 'parked-%'"
            )
            .await,
            0,
            "a parked record was stored before its due time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_count(
        &pool,
        "SELECT COUNT(*) FROM message WHERE external_message_id LIKE 'parked-%'",
        6,
        &second,
    )
    .await;
    wait_until_topic_committed(&env, &topic, &second).await;
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM message WHERE external_message_id LIKE 'parked-%'"
        )
        .await,
        6
    );
    drop(second);
    pool.close().await;
    env.drop_database().await;
}
