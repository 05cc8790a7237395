//! `im-ingest replay` against real Kafka and MariaDB: dead letters replayed after their
//! cause is removed are stored once; the whole inbound topic replayed into a running
//! worker adds nothing; the loop guard holds across a delay topic; a dry run publishes
//! nothing; a tenant and a time window select exactly their records.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::helpers::{
    borrowed, brokers, im_ingest, refuse_message_id, stderr_of, unique, OutsideLock, WorkerEnv,
    WorkerProcess,
};
use crate::kafka_util::{end_offset, header, produce, producer, read_all};
use crate::pipeline::payload;
use crate::worker::{
    count, count_of, finish, start, wait_for_count, wait_until_all_committed, WAIT,
};

/// Runs `replay` with `args` against the test's topics and database; returns stdout.
fn replay(env: &WorkerEnv, args: &[&str]) -> String {
    let output = im_ingest(
        &[&["replay"], args].concat(),
        &[
            ("IM_INGEST__KAFKA__INBOUND_TOPIC", &env.inbound),
            ("IM_INGEST__DATABASE__URL", &env.database_url()),
        ],
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    String::from_utf8(output.stdout).unwrap()
}

/// Waits until `topic` holds at least `n` records.
async fn wait_for_records(
    topic: &str,
    n: usize,
    worker: &WorkerProcess,
) -> Vec<rdkafka::message::OwnedMessage> {
    let deadline = Instant::now() + WAIT;
    loop {
        let records = read_all(topic);
        if records.len() >= n {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{topic} holds {} records, expected {n}; log:\n{}",
            records.len(),
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Commits `offset` on partition 0 of `topic` for `group`; returns the group.
fn commit_for_group(group: &str, topic: &str, offset: i64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    consumer
        .commit(&list, rdkafka::consumer::CommitMode::Sync)
        .unwrap();
}

/// A worker that stored `ids` of one customer, the database refusing `refused` (so it
/// went to the dead-letter topic) until the test drops the trigger `refuse_message`.
async fn with_a_refused_message(
    ids: &[&str],
    refused: &str,
) -> (WorkerEnv, WorkerProcess, sqlx::MySqlPool) {
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    refuse_message_id(&pool, refused).await;
    let customer = unique("c");
    for id in ids {
        produce(
            &producer(),
            &env.inbound,
            Some(0),
            payload(&customer, id).as_bytes(),
        )
        .await;
    }
    wait_until_all_committed(&env, &worker).await;
    (env, worker, pool)
}

#[tokio::test]
async fn dead_letters_replayed_after_their_cause_is_removed_are_stored_once_and_no_groups_offsets_move(
) {
    let (env, worker, pool) = with_a_refused_message(&["m1", "m2", "m3"], "m2").await;
    assert_eq!(count(&pool, &count_of("m2")).await, 0);
    assert_eq!(read_all(&env.dlq).len(), 1);
    // Another group has read the dead-letter topic up to its end.
    let other = unique("dlq-reader");
    commit_for_group(&other, &env.dlq, 1);
    sqlx::query("DROP TRIGGER refuse_message")
        .execute(&pool)
        .await
        .unwrap();

    let report = replay(
        &env,
        &[
            "--from",
            &env.dlq,
            "--error-class",
            "im_ingest::DatabaseRejected",
        ],
    );
    assert!(report.contains("replayed: 1"), "{report}");
    wait_for_count(&pool, &count_of("m2"), 1, &worker).await;
    wait_until_all_committed(&env, &worker).await;
    for id in ["m1", "m2", "m3"] {
        assert_eq!(count(&pool, &count_of(id)).await, 1, "{id}");
    }
    assert_eq!(crate::kafka_util::committed(&other, &env.dlq, 0), Some(1));
    assert_eq!(crate::kafka_util::committed(&env.group, &env.dlq, 0), None);
    let (ok, verified) = crate::verify::verify(&env);
    assert!(ok, "{verified}");
    finish(&env, worker, pool).await;
}

#[tokio::test]
async fn the_whole_inbound_topic_replayed_into_a_running_worker_adds_no_row_and_no_error() {
    let env = WorkerEnv::new(2);
    let (worker, pool) = start(&env).await;
    let customer = unique("c");
    for n in 0..20 {
        produce(
            &producer(),
            &env.inbound,
            None,
            payload(&customer, &format!("w{n}")).as_bytes(),
        )
        .await;
    }
    wait_until_all_committed(&env, &worker).await;
    let before = count(&pool, "SELECT COUNT(*) FROM message").await;
    let report = replay(&env, &["--from", &env.inbound]);
    assert!(report.contains("replayed: 20"), "{report}");
    wait_for_records(&env.inbound, 40, &worker).await;
    wait_until_all_committed(&env, &worker).await;
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM message").await, before);
    assert!(
        read_all(&env.dlq).is_empty(),
        "replayed records were dead-lettered"
    );
    finish(&env, worker, pool).await;
}

#[tokio::test]
async fn the_loop_guard_refuses_a_record_over_its_limit_also_after_a_delay_topic_and_a_dry_run_publishes_nothing(
) {
    let env = WorkerEnv::new(1)
        .with("RETRY__DELAYS_MS", "100,200")
        .with("RETRY__MAX_ATTEMPTS", "3")
        .with("LOCK__MAX_HOLD_MS", "200")
        .with("WORKER__WRITE_STALL_MS", "100");
    let (worker, pool) = start(&env).await;
    let user = unique("looping");
    let _outside = OutsideLock::hold(&user, None).await;
    // A record replayed once already, whose user's lock is held elsewhere: it goes
    // through the delay topics to the dead-letter topic.
    let headers = OwnedHeaders::new().insert(Header {
        key: "im_ingest-replay-count",
        value: Some("1".as_bytes()),
    });
    let value = payload(&user, "loop");
    producer()
        .send(
            FutureRecord::<str, str>::to(&env.inbound)
                .payload(&value)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let dead = wait_for_records(&env.dlq, 1, &worker).await;
    assert_eq!(
        header(&dead[0], "im_ingest-replay-count"),
        Some("1".as_bytes())
    );
    assert_eq!(
        header(&dead[0], "kafka_dlt-exception-fqcn"),
        Some("im_ingest::LockHeld".as_bytes())
    );

    let inbound_end = end_offset(&env.inbound, 0);
    let report = replay(&env, &["--from", &env.dlq, "--max-replays", "1"]);
    assert!(
        report.contains("refused: replayed too often: 1"),
        "{report}"
    );
    let report = replay(
        &env,
        &["--from", &env.dlq, "--max-replays", "2", "--dry-run"],
    );
    assert!(
        report.contains("would replay: 1") && report.contains("dry run"),
        "{report}"
    );
    assert_eq!(
        end_offset(&env.inbound, 0),
        inbound_end,
        "something was published"
    );
    assert_eq!(count(&pool, &count_of("loop")).await, 0);
    finish(&env, worker, pool).await;
}

#[tokio::test]
async fn a_tenant_and_a_time_window_replay_exactly_their_records_with_key_timestamp_and_a_replay_count(
) {
    let source = unique("replay-src");
    let target = unique("replay-dst");
    let env = WorkerEnv::new(1);
    for topic in [&source, &target] {
        crate::worker::create_topics(&WorkerEnv {
            inbound: topic.clone(),
            ..env.clone()
        })
        .await;
    }
    let producer = producer();
    let record = |tenant: &str, id: &str| {
        serde_json::json!({"tenant_id": tenant, "message_id": id, "from_user_id": "u",
            "to_user_id": "a", "timestamp": 1})
        .to_string()
    };
    let retry = OwnedHeaders::new()
        .insert(Header {
            key: "retry_topic-attempts",
            value: Some(&[2u8][..]),
        })
        .insert(Header {
            key: "traceparent",
            value: Some("00-abc".as_bytes()),
        });
    for (tenant, id, at) in [
        ("t1", "in", 1_500),
        ("t1", "early", 900),
        ("t2", "other", 1_500),
        ("t1", "late", 2_000),
    ] {
        let value = record(tenant, id);
        producer
            .send(
                FutureRecord::to(&source)
                    .key(id)
                    .payload(&value)
                    .timestamp(at)
                    .headers(retry.clone()),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let report = replay(
        &env,
        &[
            "--from", &source, "--to", &target, "--tenant", "t1", "--since", "1000", "--until",
            "2000",
        ],
    );
    assert!(
        report.contains("replayed: 1")
            && report.contains("outside the range: 2")
            && report.contains("filtered out: 1"),
        "{report}"
    );
    let replayed = read_all(&target);
    assert_eq!(replayed.len(), 1);
    let r = &replayed[0];
    assert_eq!(r.key(), Some("in".as_bytes()));
    assert_eq!(r.timestamp().to_millis(), Some(1_500));
    assert_eq!(header(r, "im_ingest-replay-count"), Some("1".as_bytes()));
    assert_eq!(header(r, "traceparent"), Some("00-abc".as_bytes()));
    assert_eq!(header(r, "retry_topic-attempts"), None);
    assert_eq!(r.headers().map(|h| h.count()), Some(2));
}

#[tokio::test]
async fn a_replay_killed_mid_run_and_resumed_republishes_each_record_exactly_once() {
    let (source, target) = (unique("replay-src"), unique("replay-dst"));
    let env = WorkerEnv::new(2);
    for topic in [&source, &target] {
        crate::worker::create_topics(&WorkerEnv {
            inbound: topic.clone(),
            ..env.clone()
        })
        .await;
    }
    const RECORDS: usize = 3_000;
    let values = (0..RECORDS)
        .map(|n| payload("someone", &format!("k{n}")))
        .collect();
    crate::unread::push_all(&source, values).await;
    let checkpoint = unique("resumable");
    let args = [
        "replay",
        "--from",
        &source,
        "--to",
        &target,
        "--checkpoint",
        &checkpoint,
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut slow = crate::helpers::bare_command(dir.path());
    slow.args(args)
        .args(["--rate", "500"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut slow = slow.spawn().unwrap();
    // Killed once some chunks are committed, mid-run.
    let deadline = Instant::now() + WAIT;
    while committed_records(&env, &target).len() < 500 {
        assert!(Instant::now() < deadline, "the replay committed nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    slow.kill().unwrap();
    slow.wait().unwrap();
    let committed_before = committed_records(&env, &target).len();
    assert!(
        committed_before < RECORDS,
        "the replay finished before it was killed"
    );

    let output = im_ingest(&args, &[]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    let replayed = committed_records(&env, &target);
    let mut ids: Vec<String> = replayed
        .iter()
        .map(|r| {
            let value: serde_json::Value =
                serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
            value["message_id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (replayed.len(), ids.len()),
        (RECORDS, RECORDS),
        "{committed_before} were committed when the first run was killed"
    );
}

/// Every committed record of `topic` (transaction markers and aborted records skipped).
fn committed_records(env: &WorkerEnv, topic: &str) -> Vec<im_ingest::pipeline::Record> {
    let mut reader =
        im_ingest::topic_reader::TopicReader::open(&env.settings().kafka, topic).unwrap();
    let mut records = Vec::new();
    loop {
        let chunk = reader.next_chunk(1_000).unwrap();
        if chunk.is_empty() {
            return records;
        }
        records.extend(chunk);
    }
}

#[tokio::test]
async fn dead_letters_replayed_in_process_are_stored_without_a_worker() {
    let (env, worker, pool) = with_a_refused_message(&["p1", "p2"], "p2").await;
    drop(worker);
    sqlx::query("DROP TRIGGER refuse_message")
        .execute(&pool)
        .await
        .unwrap();
    let vars = env.vars();
    let output = im_ingest(
        &["replay", "--from", &env.dlq, "--process"],
        &borrowed(&vars),
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    let report = String::from_utf8(output.stdout).unwrap();
    assert!(
        report.contains("replayed: 1") && report.contains("stored: 1"),
        "{report}"
    );
    assert_eq!(count(&pool, &count_of("p2")).await, 1);
    pool.close().await;
    env.drop_database().await;
}
