//! The processing step driven directly (no background loop): duplicates, case-distinct
//! ids, a lock held elsewhere, and bad input.

use std::time::Duration;

use im_ingest::consumer::ensure_topics;
use im_ingest::lock::holder_fingerprint;
use im_ingest::pipeline::{Outcome, Pipeline, Record};
use im_ingest::retry::headers::RetryHeaders;
use im_ingest::worker::build_pipeline;
use sqlx::MySqlPool;

use crate::helpers::{refuse_message_id, unique, OutsideLock, WorkerEnv};
use crate::kafka_util::{header, read_all};

pub fn payload(customer: &str, message_id: &str) -> String {
    serde_json::json!({
        "message_id": message_id,
        "from_user_id": customer,
        "to_user_id": "575d2c135e87e733f0162b88",
        "message_type": "TEXT",
        "message_source": 2,
        "content": format!("hello from {message_id}"),
        "timestamp": "1723268668573",
        "user_info": [{"header_image": "a.jpg", "nickname": "Ann", "user_id": customer}]
    })
    .to_string()
}

fn record(topic: &str, offset: i64, value: &str) -> Record {
    Record {
        topic: topic.to_string(),
        partition: 0,
        offset,
        timestamp: Some(1_723_268_668_600),
        key: Some(b"random-key".to_vec()),
        value: Some(value.as_bytes().to_vec()),
        headers: None,
    }
}

async fn setup() -> (WorkerEnv, Pipeline, MySqlPool) {
    setup_with_delays(&[250, 1000, 4000, 16000]).await
}

async fn setup_with_delays(delays_ms: &[u64]) -> (WorkerEnv, Pipeline, MySqlPool) {
    setup_with(delays_ms, 5).await
}

async fn setup_with(delays_ms: &[u64], max_attempts: u32) -> (WorkerEnv, Pipeline, MySqlPool) {
    let env = WorkerEnv::new(1);
    let mut settings = env.settings();
    settings.retry.delays_ms = delays_ms.to_vec();
    settings.retry.max_attempts = max_attempts;
    im_ingest::store::migrate(&settings.database).await.unwrap();
    let topics = ensure_topics(&settings).await.unwrap();
    let pipeline = build_pipeline(&settings, &topics).await.unwrap();
    let pool = pipeline.pool.clone();
    (env, pipeline, pool)
}

async fn count(pool: &MySqlPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn the_pipeline_sessions_wait_for_a_row_lock_no_longer_than_the_lock_hold() {
    let (_env, _pipeline, pool) = setup().await;
    // The default hold is 2.5 s (a quarter of the 10 s lease): whole seconds, 2.
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let mut connection = pool.acquire().await.unwrap();
        let wait: u64 = sqlx::query_scalar("SELECT @@SESSION.innodb_lock_wait_timeout")
            .fetch_one(&mut *connection)
            .await
            .unwrap();
        assert_eq!(wait, 2);
        sessions.push(connection);
    }
}

#[tokio::test]
async fn same_message_delivered_five_times_is_one_row_one_stored_four_duplicates() {
    let (env, pipeline, pool) = setup().await;
    let value = payload(&unique("c"), "m-1");
    let records = (0..5).map(|o| record(&env.inbound, o, &value)).collect();
    let outcomes = pipeline.process_batch(records).await.unwrap();
    assert_eq!(outcomes[0], Outcome::Stored);
    assert_eq!(
        &outcomes[1..],
        [
            Outcome::Duplicate,
            Outcome::Duplicate,
            Outcome::Duplicate,
            Outcome::Duplicate
        ]
    );
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM message").await, 1);
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM customer").await, 1);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn ids_differing_only_in_case_are_different_messages() {
    let (env, pipeline, pool) = setup().await;
    let customer = unique("c");
    let records = vec![
        record(&env.inbound, 0, &payload(&customer, "MsgA")),
        record(&env.inbound, 1, &payload(&customer, "msga")),
        record(&env.inbound, 2, &payload(&customer.to_uppercase(), "MsgC")),
    ];
    let outcomes = pipeline.process_batch(records).await.unwrap();
    assert_eq!(
        outcomes,
        [Outcome::Stored, Outcome::Stored, Outcome::Stored]
    );
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM message").await, 3);
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM customer").await, 2);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn record_whose_lock_is_held_elsewhere_goes_once_to_the_first_delay_topic() {
    let (env, pipeline, pool) = setup().await;
    let locked = unique("locked");
    let free = unique("free");
    let outside = OutsideLock::hold(&locked, Some(Duration::from_secs(30))).await;

    let value = payload(&locked, "held-1");
    let outcomes = pipeline
        .process_batch(vec![
            record(&env.inbound, 7, &value),
            record(&env.inbound, 8, &payload(&free, "free-1")),
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes[0],
        Outcome::Delayed {
            topic: env.first_delay_topic()
        }
    );
    assert_eq!(outcomes[1], Outcome::Stored);
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM message WHERE external_message_id = 'held-1'"
        )
        .await,
        0,
        "a record whose lock is held must not be stored"
    );

    let delayed = read_all(&env.first_delay_topic());
    assert_eq!(delayed.len(), 1);
    let message = &delayed[0];
    use rdkafka::Message;
    assert_eq!(message.payload(), Some(value.as_bytes()));
    assert_eq!(message.key(), Some(&b"random-key"[..]));
    let headers = RetryHeaders::from_headers(message.headers().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(headers.attempts, 2);
    assert_eq!(headers.origin.topic, env.inbound);
    assert_eq!(headers.origin.partition, 0);
    assert_eq!(headers.origin.offset, 7);
    assert_eq!(headers.origin.timestamp, 1_723_268_668_600);
    assert_eq!(headers.origin.consumer_group, env.group);
    assert_eq!(headers.exception_fqcn, "im_ingest::LockHeld");
    assert_eq!(
        headers.exception_message,
        format!(
            "user lock held elsewhere (holder {})",
            holder_fingerprint("outsider")
        )
    );
    assert_eq!(header(message, "retry_topic-attempts"), Some(&[2u8][..]));
    let now = im_ingest::pipeline::now_millis();
    assert!(
        headers.backoff_timestamp > now - 5_000 && headers.backoff_timestamp <= now + 300,
        "due time {} should be about 250-300 ms after publishing (now {now})",
        headers.backoff_timestamp
    );
    outside.release().await;
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn with_lock_mode_none_a_record_whose_lock_is_held_elsewhere_is_stored_at_once() {
    let (env, pipeline, pool) = setup().await;
    let pipeline = pipeline.with_lock_mode(im_ingest::config::LockMode::None);
    let locked = unique("locked");
    let outside = OutsideLock::hold(&locked, Some(Duration::from_secs(30))).await;
    let value = payload(&locked, "unlocked-1");
    let outcomes = pipeline
        .process_batch(vec![
            record(&env.inbound, 0, &value),
            record(&env.inbound, 1, &value),
        ])
        .await
        .unwrap();
    assert_eq!(outcomes, [Outcome::Stored, Outcome::Duplicate]);
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM message WHERE external_message_id = 'unlocked-1'"
        )
        .await,
        1
    );
    assert!(
        read_all(&env.first_delay_topic()).is_empty(),
        "without the lock nothing is delayed"
    );
    outside.release().await;
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn a_lock_freed_within_the_in_process_wait_is_taken_without_a_delay_record() {
    // Another worker's batch holds the user's lock for 60 ms: less than the 198 ms of
    // in-process pauses a conflicted batch may spend before it goes to a delay topic.
    let (env, pipeline, pool) = setup().await;
    let locked = unique("locked");
    let _outside = OutsideLock::hold(&locked, Some(Duration::from_millis(60))).await;
    let outcomes = pipeline
        .process_batch(vec![record(&env.inbound, 0, &payload(&locked, "waited-1"))])
        .await
        .unwrap();
    assert_eq!(outcomes, [Outcome::Stored]);
    assert!(
        read_all(&env.first_delay_topic()).is_empty(),
        "the record went through a delay topic"
    );
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn a_message_the_database_refuses_is_dead_lettered_and_the_rest_of_the_batch_is_stored() {
    let (env, pipeline, pool) = setup().await;
    refuse_message_id(&pool, "poison").await;
    let (ann, bob) = (unique("ann"), unique("bob"));
    let outcomes = pipeline
        .process_batch(vec![
            record(&env.inbound, 0, &payload(&ann, "ok-1")),
            record(&env.inbound, 1, &payload(&ann, "poison")),
            record(&env.inbound, 2, &payload(&ann, "ok-2")),
            record(&env.inbound, 3, &payload(&bob, "ok-3")),
        ])
        .await
        .unwrap();
    assert_eq!(outcomes[0], Outcome::Stored);
    assert!(
        matches!(&outcomes[1], Outcome::DeadLettered { reason } if reason.contains("refused by test trigger")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[2..], [Outcome::Stored, Outcome::Stored]);
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM message").await, 3);
    let dead = read_all(&env.dlq);
    assert_eq!(dead.len(), 1);
    use rdkafka::Message;
    let headers = RetryHeaders::from_headers(dead[0].headers().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(headers.exception_fqcn, "im_ingest::DatabaseRejected");
    assert_eq!(headers.origin.offset, 1);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn due_time_is_shortened_to_a_short_remaining_lock_ttl() {
    // A 5 s delay and a lock with 1 s left: the record should be due in about 1 s (the
    // remaining TTL jittered up to +20%, plus a 25 ms margin), far sooner than 5 s.
    let (env, pipeline, pool) = setup_with_delays(&[5_000]).await;
    let delay_topic = format!("{}-5000", env.retry_prefix);
    let locked = unique("locked");
    let outside = OutsideLock::hold(&locked, Some(Duration::from_secs(1))).await;
    let before = im_ingest::pipeline::now_millis();
    let outcome = pipeline
        .process_batch(vec![record(&env.inbound, 0, &payload(&locked, "m"))])
        .await
        .unwrap();
    let after = im_ingest::pipeline::now_millis();
    assert_eq!(
        outcome,
        [Outcome::Delayed {
            topic: delay_topic.clone()
        }]
    );
    let delayed = read_all(&delay_topic);
    use rdkafka::Message;
    let headers = RetryHeaders::from_headers(delayed[0].headers().unwrap())
        .unwrap()
        .unwrap();
    let due = headers.backoff_timestamp;
    assert!(
        due >= before + 900 && due <= after + 1_200 + 25,
        "due at {due}, expected 1 to 1.225 s after {before}..{after}"
    );
    outside.release().await;
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn last_attempt_dead_letters_if_one_holder_kept_the_lock_and_is_stored_if_it_changed_hands() {
    // Two attempts in all: the delay record is the last one.
    let (env, pipeline, pool) = setup_with(&[250], 2).await;
    let user = unique("contended");
    let outside = OutsideLock::hold(&user, Some(Duration::from_secs(30))).await;
    let first = pipeline
        .process_batch(vec![record(&env.inbound, 3, &payload(&user, "m-last"))])
        .await
        .unwrap();
    assert_eq!(
        first,
        [Outcome::Delayed {
            topic: env.first_delay_topic()
        }]
    );
    let delayed = read_all(&env.first_delay_topic());
    assert_eq!(delayed.len(), 1);

    // The same holder still has the lock at the last attempt: stuck, dead-lettered.
    let stuck = pipeline
        .process_batch(vec![Record::from_message(&delayed[0])])
        .await
        .unwrap();
    assert!(
        matches!(stuck[0], Outcome::DeadLettered { .. }),
        "{stuck:?}"
    );
    let dead = read_all(&env.dlq);
    assert_eq!(dead.len(), 1);
    use rdkafka::Message;
    let reason = RetryHeaders::from_headers(dead[0].headers().unwrap())
        .unwrap()
        .unwrap()
        .exception_message;
    assert!(
        reason.ends_with(&format!("(holder {})", holder_fingerprint("outsider"))),
        "{reason}"
    );

    // Another holder has it now: the lock is changing hands, so the record is written
    // without it (the unique indexes keep it single) instead of being dead-lettered.
    let mut redis = crate::helpers::redis_connection().await;
    let _: () = redis::cmd("SET")
        .arg(&outside.key)
        .arg("next-holder")
        .arg("PX")
        .arg(30_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    let contended = pipeline
        .process_batch(vec![Record::from_message(&delayed[0])])
        .await
        .unwrap();
    assert_eq!(contended, [Outcome::Stored]);
    assert_eq!(read_all(&env.dlq).len(), 1, "no second dead letter");
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM message WHERE external_message_id = 'm-last'"
        )
        .await,
        1
    );
    outside.release().await;
    pool.close().await;
    env.drop_database().await;
}

/// Stores `count` messages of one new user in one batch, through a pipeline whose lock
/// lease is `lease_ms` on a Redis of its own (so the command counts are this batch's
/// alone). Returns how often Redis ran `SET` (lock acquisitions) and the lock keys
/// left afterwards.
async fn lock_traffic_of_one_user_batch(count: i64, lease_ms: u64) -> (u64, Vec<String>) {
    let redis = crate::faults::PrivateRedis::start();
    let env = WorkerEnv::new(1);
    let mut settings = env.settings();
    settings.redis.url = im_ingest::secret::SecretUrl::new(redis.url());
    settings.lock.lease_ms = lease_ms;
    im_ingest::store::migrate(&settings.database).await.unwrap();
    let topics = ensure_topics(&settings).await.unwrap();
    let pipeline = build_pipeline(&settings, &topics).await.unwrap();
    let user = unique("batched");
    let records = (0..count)
        .map(|n| record(&env.inbound, n, &payload(&user, &format!("b{n}"))))
        .collect();
    let outcomes = pipeline.process_batch(records).await.unwrap();
    assert_eq!(outcomes, vec![Outcome::Stored; count as usize]);

    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    let sets = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_set:calls="))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap());
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("im:lock:*")
        .query_async(&mut connection)
        .await
        .unwrap();
    pipeline.pool.close().await;
    env.drop_database().await;
    (sets, keys)
}

#[tokio::test]
async fn five_messages_of_one_user_in_one_batch_take_and_release_the_lock_once() {
    let (sets, keys) = lock_traffic_of_one_user_batch(5, 10_000).await;
    assert_eq!(sets, 1, "one acquisition for the batch");
    assert!(keys.is_empty(), "the lock was not released: {keys:?}");
}
