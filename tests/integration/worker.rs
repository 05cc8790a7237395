//! `im-ingest run` as a process against the real services: concurrency and duplicates,
//! bad input, a lock held elsewhere, and offsets that never pass undurable work.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::Message;
use sqlx::mysql::MySqlPoolOptions;
use sqlx::MySqlPool;

use crate::admin::get;
use crate::helpers::{brokers, unique, OutsideLock, WorkerEnv, WorkerProcess};
use crate::kafka_util::{committed, end_offset, header, produce, producer, read_all};
use crate::pipeline::payload;

pub const WAIT: Duration = Duration::from_secs(60);

pub async fn create_topics(env: &WorkerEnv) {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    admin
        .create_topics(
            &[NewTopic::new(
                &env.inbound,
                env.partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
}

/// Starts a worker and waits until its schema exists and both its members have joined
/// the group; returns a pool on its database.
pub async fn start(env: &WorkerEnv) -> (WorkerProcess, MySqlPool) {
    create_topics(env).await;
    let worker = WorkerProcess::start(env);
    let url = env.database_url();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(pool) = MySqlPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
        {
            if sqlx::query("SELECT 1 FROM message LIMIT 1")
                .fetch_optional(&pool)
                .await
                .is_ok()
            {
                wait_until_both_members_joined(env, &worker).await;
                return (worker, pool);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker did not migrate its database; log:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the instance holds partitions of the inbound topic and of a delay topic:
/// both of its members (see `consumer::member`) have joined. The second to join waits
/// for the first's next heartbeat (up to 3 s), and either may be first, so [`start`]
/// waits for this: a test that times records sees both members at work.
pub async fn wait_until_both_members_joined(env: &WorkerEnv, worker: &WorkerProcess) {
    let admin = worker.admin_address();
    let deadline = tokio::time::Instant::now() + WAIT;
    let series = |topic: &str| format!("im_ingest_assigned_partitions{{topic=\"{topic}");
    let (inbound_series, delay_series) = (
        series(&format!("{}\"}}", env.inbound)),
        series(&format!("{}-", env.retry_prefix)),
    );
    loop {
        let (_, body) = get(&admin, "/metrics");
        // Some series starting so holds at least one partition.
        let holds = |start: &str| {
            body.lines()
                .filter(|l| l.starts_with(start))
                .any(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) > Some(0.0))
        };
        let (inbound, delays) = (holds(&inbound_series), holds(&delay_series));
        if inbound && delays {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker's members did not both join; log:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Ends a test that passed: stops its worker and drops its database.
pub async fn finish(env: &WorkerEnv, worker: WorkerProcess, pool: MySqlPool) {
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}

/// How many messages with this external id are stored (an SQL count).
pub fn count_of(message_id: &str) -> String {
    format!("SELECT COUNT(*) FROM message WHERE external_message_id = '{message_id}'")
}

/// The external ids of every stored message.
pub async fn stored_message_ids(pool: &MySqlPool) -> std::collections::BTreeSet<String> {
    // utf8mb4_bin columns come back as VARBINARY under sqlx: cast to read them as text.
    sqlx::query_scalar("SELECT CAST(external_message_id AS CHAR) FROM message")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

pub async fn count(pool: &MySqlPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

pub async fn wait_for_count(pool: &MySqlPool, sql: &str, expected: i64, worker: &WorkerProcess) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let n = count(pool, sql).await;
        if n == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "`{sql}` stayed {n}, expected {expected}; worker log:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the group's committed offsets reach the end of every partition of the
/// inbound topic.
pub async fn wait_until_all_committed(env: &WorkerEnv, worker: &WorkerProcess) {
    wait_until_topic_committed(env, &env.inbound, worker).await;
}

/// Waits until the group's committed offsets reach the end of every partition of `topic`
/// (as of the call).
pub async fn wait_until_topic_committed(env: &WorkerEnv, topic: &str, worker: &WorkerProcess) {
    for partition in 0..env.partitions {
        let end = end_offset(topic, partition);
        if end == 0 {
            continue;
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        while committed(&env.group, topic, partition) != Some(end) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{topic}/{partition} not committed to {end}; log:\n{}",
                worker.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The seed scenario: ten concurrent producers each push one message of one new
/// customer (same timestamp), twice, with random keys (so over several partitions).
pub async fn push_ten_messages_of_one_new_customer_twice(topic: &str) {
    let customer = unique("c");
    let mut producers = Vec::new();
    for n in 0..10 {
        let (topic, value) = (topic.to_string(), payload(&customer, &format!("msg-{n}")));
        producers.push(tokio::spawn(async move {
            let producer = producer();
            produce(&producer, &topic, None, value.as_bytes()).await;
            produce(&producer, &topic, None, value.as_bytes()).await;
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
}

#[tokio::test]
async fn ten_concurrent_producers_pushing_one_new_customer_twice_create_one_customer_one_session_ten_messages(
) {
    let env = WorkerEnv::new(4);
    let (worker, pool) = start(&env).await;
    push_ten_messages_of_one_new_customer_twice(&env.inbound).await;
    wait_until_all_committed(&env, &worker).await;
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM customer").await, 1);
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM session").await, 1);
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM message").await, 10);
    assert_eq!(
        count(&pool, "SELECT COUNT(DISTINCT session_id) FROM message").await,
        1,
        "every message hangs off the one session"
    );
    assert_eq!(
        worker.stop().map(|s| s.success()),
        Some(true),
        "clean exit on SIGTERM"
    );
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn poison_inputs_are_dead_lettered_with_their_reason_and_good_messages_around_them_are_stored(
) {
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    let customer = unique("c");
    let long_id = "x".repeat(65);
    let poison: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not json", b"hello there".to_vec(), "not JSON"),
        ("wrong shape", b"[1,2,3]".to_vec(), "not an object"),
        (
            "wrong type",
            br#"{"message_id":42,"from_user_id":"a","to_user_id":"b","timestamp":1}"#.to_vec(),
            "wrong shape",
        ),
        (
            "missing id",
            br#"{"from_user_id":"a","to_user_id":"b","timestamp":1}"#.to_vec(),
            "message_id is missing",
        ),
        (
            "empty id",
            br#"{"message_id":"","from_user_id":"a","to_user_id":"b","timestamp":1}"#.to_vec(),
            "message_id is empty",
        ),
        (
            "whitespace id",
            br#"{"message_id":"m","from_user_id":" a","to_user_id":"b","timestamp":1}"#.to_vec(),
            "leading or trailing whitespace",
        ),
        (
            "long id",
            format!(
                r#"{{"message_id":"{long_id}","from_user_id":"a","to_user_id":"b","timestamp":1}}"#
            )
            .into_bytes(),
            "more than 64",
        ),
        (
            "oversized",
            format!(r#"{{"content":"{}"}}"#, "x".repeat(600 * 1024)).into_bytes(),
            "exceeds the limit",
        ),
        ("invalid utf-8", vec![b'{', 0xff, 0xfe, b'}'], "UTF-8"),
        ("empty value", Vec::new(), "empty record"),
    ];
    let producer = producer();
    let mut good = 0;
    for (n, (_, value, _)) in poison.iter().enumerate() {
        produce(
            &producer,
            &env.inbound,
            Some(0),
            payload(&customer, &format!("good-{n}")).as_bytes(),
        )
        .await;
        produce(&producer, &env.inbound, Some(0), value).await;
        good += 1;
    }
    produce(
        &producer,
        &env.inbound,
        Some(0),
        payload(&customer, "good-last").as_bytes(),
    )
    .await;
    good += 1;

    wait_until_all_committed(&env, &worker).await;
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM message").await, good);
    let dead = read_all(&env.dlq);
    assert_eq!(
        dead.len(),
        poison.len(),
        "one dead letter per poison record"
    );
    let mut by_value: BTreeMap<Vec<u8>, String> = BTreeMap::new();
    for message in &dead {
        assert_eq!(
            header(message, "kafka_dlt-exception-fqcn"),
            Some(&b"im_ingest::InvalidMessage"[..])
        );
        assert_eq!(
            header(message, "kafka_dlt-original-topic"),
            Some(env.inbound.as_bytes())
        );
        let reason = String::from_utf8(
            header(message, "kafka_dlt-exception-message")
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        by_value.insert(message.payload().unwrap_or_default().to_vec(), reason);
    }
    for (name, value, expected) in &poison {
        let reason = by_value
            .get(value)
            .unwrap_or_else(|| panic!("{name} not dead-lettered"));
        assert!(
            reason.contains(expected),
            "{name}: reason {reason:?} lacks {expected:?}"
        );
    }
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn lock_held_elsewhere_sends_the_record_to_the_delay_topic_and_the_partition_flows_on() {
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    let (locked, free) = (unique("locked"), unique("free"));
    let outside = OutsideLock::hold(&locked, Some(Duration::from_secs(60))).await;

    let producer = producer();
    let (_, locked_offset) = produce(
        &producer,
        &env.inbound,
        Some(0),
        payload(&locked, "held").as_bytes(),
    )
    .await;
    produce(
        &producer,
        &env.inbound,
        Some(0),
        payload(&free, "behind").as_bytes(),
    )
    .await;

    wait_for_count(
        &pool,
        "SELECT COUNT(*) FROM message WHERE external_message_id = 'behind'",
        1,
        &worker,
    )
    .await;
    wait_until_all_committed(&env, &worker).await;
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM message WHERE external_message_id = 'held'"
        )
        .await,
        0
    );
    let delayed = read_all(&env.first_delay_topic());
    assert_eq!(delayed.len(), 1);
    assert_eq!(
        header(&delayed[0], "kafka_dlt-original-offset"),
        Some(&locked_offset.to_be_bytes()[..])
    );
    outside.release().await;
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn committed_offset_never_passes_a_record_blocked_in_the_database() {
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    let blocked_user = unique("blocked");
    let producer = producer();
    produce(
        &producer,
        &env.inbound,
        Some(0),
        payload(&blocked_user, "first").as_bytes(),
    )
    .await;
    wait_for_count(&pool, "SELECT COUNT(*) FROM message", 1, &worker).await;

    // An outside transaction holds the customer's row lock: A's next write must wait.
    let mut blocker = pool.begin().await.unwrap();
    // The full natural key: a point lock on one row, not a scan that locks the table.
    sqlx::query(
        "SELECT id FROM customer WHERE tenant_id = 'default' AND platform = '2' \
         AND external_user_id = ? FOR UPDATE",
    )
    .bind(&blocked_user)
    .fetch_one(&mut *blocker)
    .await
    .unwrap();
    let (_, blocked_offset) = produce(
        &producer,
        &env.inbound,
        Some(0),
        payload(&blocked_user, "blocked").as_bytes(),
    )
    .await;
    for n in 0..5 {
        produce(
            &producer,
            &env.inbound,
            Some(0),
            payload(&unique("other"), &format!("later-{n}")).as_bytes(),
        )
        .await;
    }
    wait_for_count(
        &pool,
        "SELECT COUNT(*) FROM message WHERE external_message_id LIKE 'later-%'",
        5,
        &worker,
    )
    .await;
    // Commits do happen (the first record's), and stop exactly at the blocked record...
    let deadline = tokio::time::Instant::now() + WAIT;
    while committed(&env.group, &env.inbound, 0) != Some(blocked_offset) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "committed offset never reached {blocked_offset}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and stay there for several auto-commit intervals (200 ms) while it is blocked.
    for _ in 0..10 {
        let position = committed(&env.group, &env.inbound, 0).unwrap_or(0);
        assert!(
            position <= blocked_offset,
            "committed {position} passed the blocked record at {blocked_offset}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    blocker.rollback().await.unwrap();

    wait_until_all_committed(&env, &worker).await;
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM message").await, 7);
    assert_eq!(
        committed(&env.group, &env.inbound, 0),
        Some(end_offset(&env.inbound, 0))
    );
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_ten_times_the_in_flight_limit_drains_without_pausing_partitions() {
    // Slots free up within milliseconds while a healthy backlog drains, so the loop
    // waits for them instead of pausing (which would discard prefetched records and
    // fetch them again). Pausing is for long waits, such as a database outage.
    let env = WorkerEnv::new(3).with("WORKER__MAX_IN_FLIGHT", "20");
    let run = unique("backlog");
    create_topics(&env).await;
    let producer = producer();
    for i in 0..200 {
        let value = payload(&format!("{run}-c{}", i % 10), &format!("{run}-m{i}"));
        produce(&producer, &env.inbound, None, value.as_bytes()).await;
    }
    let (worker, pool) = start(&env).await;
    wait_until_all_committed(&env, &worker).await;
    let sql = format!("SELECT COUNT(*) FROM message WHERE external_message_id LIKE '{run}-%'");
    assert_eq!(count(&pool, &sql).await, 200);
    let log = worker.log_text();
    assert!(
        !log.contains("partitions paused"),
        "a draining backlog paused the partitions:\n{log}"
    );
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn a_committed_offset_deleted_by_retention_is_reported_as_an_error_and_counted() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};

    let env = WorkerEnv::new(1);
    create_topics(&env).await;
    let producer = producer();
    for n in 0..10 {
        let value = payload(&unique("r"), &format!("retention-{n}"));
        produce(&producer, &env.inbound, Some(0), value.as_bytes()).await;
    }
    // The group has read up to offset 3; then retention removes everything before 6.
    let group_member: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", &env.group)
        .create()
        .unwrap();
    let mut position = TopicPartitionList::new();
    position
        .add_partition_offset(&env.inbound, 0, Offset::Offset(3))
        .unwrap();
    group_member
        .commit(&position, CommitMode::Sync)
        .expect("committing the group's position");
    drop(group_member);
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let mut before = TopicPartitionList::new();
    before
        .add_partition_offset(&env.inbound, 0, Offset::Offset(6))
        .unwrap();
    admin
        .delete_records(&before, &AdminOptions::new())
        .await
        .expect("deleting records");

    let (worker, pool) = start(&env).await;
    wait_for_count(&pool, "SELECT COUNT(*) FROM message", 4, &worker).await;
    crate::admin::wait_for_metric(
        &worker.admin_address(),
        "im_ingest_offset_resets_total",
        1.0,
    )
    .await;
    let log = worker.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("fetch position is no longer on the broker"))
        .unwrap_or_else(|| panic!("the reset was not logged:\n{log}"));
    assert!(line.contains("ERROR"), "{line}");
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}
