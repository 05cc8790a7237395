//! The bench as a correctness test, against the real services (`scripts/stack.sh up`):
//! every contender on every scenario at a small size, and the bench's own correctness
//! check on a database with known faults. Its own test target, so its load does not
//! share the machine with the integration suite's timing-sensitive tests.

#[allow(dead_code)] // this target uses only part of the integration suite's plumbing
#[path = "integration/helpers.rs"]
mod helpers;

use std::str::FromStr;

use im_ingest::bench::contender::naive;
use im_ingest::bench::workload::{self, BenchMessage, Spread};
use im_ingest::message::{decode, Inbound};
use im_ingest::pipeline::Record;
use serde_json::Value;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::MySqlPool;

use helpers::{brokers, im_ingest, mysql_server_url, TestDatabase};

/// The CI configuration of the bench: about 2,000 messages of 100 users, one run of
/// every scenario and contender. The workers and the ideal consumer must store every
/// message exactly once everywhere, the naive writer must be caught duplicating, and
/// every figure the table reports must be there.
#[test]
fn bench_runs_every_contender_and_scenario_and_the_workers_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let database = format!("{}/im_bench_ci", mysql_server_url());
    let output = im_ingest(
        &[
            "bench",
            "--messages",
            "2000",
            "--users",
            "100",
            "--runs",
            "1",
            "--burst-messages",
            "200",
            "--warmup-secs",
            "2",
            "--window-secs",
            "5",
            "--trial-timeout-secs",
            "120",
            "--json",
            json.to_str().unwrap(),
        ],
        &[
            ("IM_INGEST__KAFKA__BROKERS", &brokers()),
            ("IM_INGEST__DATABASE__URL", &database),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("× ideal"), "no table printed:\n{stdout}");
    let document: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(document["machine"]["cores"].as_u64().unwrap() >= 1);
    let trials = document["trials"].as_array().unwrap();
    // 6 scenarios × 5 contenders, but no no-op in steady (it stores no row to time).
    assert_eq!(trials.len(), 29, "{trials:#?}");
    assert_eq!(document["ideal_batch_trials"].as_array().unwrap().len(), 3);
    for trial in trials {
        let (scenario, contender) = (
            trial["scenario"].as_str().unwrap(),
            trial["contender"].as_str().unwrap(),
        );
        let what = format!("{scenario} / {contender}: {trial:#}");
        assert!(
            trial["messages_per_second"].as_f64().unwrap() > 0.0,
            "{what}"
        );
        assert!(trial["ratio_to_ideal"].as_f64().is_some(), "{what}");
        // The local stack's servers are found and measured.
        let cpu = &trial["cpu_seconds_per_1k_messages"];
        for server in ["kafka", "mariadbd", "redis"] {
            assert!(cpu[server].as_f64().is_some(), "{server}: {what}");
        }
        assert!(trial["peak_rss_bytes"].as_u64().unwrap() > 0, "{what}");
        assert!(
            trial["cpu_seconds_per_1k_messages"]["contender"]
                .as_f64()
                .is_some(),
            "{what}"
        );
        assert!(!(scenario == "steady" && contender == "noop"), "{what}");
        if scenario == "steady" {
            let latency = &trial["latency"];
            let (p50, p99, max) = (
                latency["p50_ms"].as_f64().unwrap(),
                latency["p99_ms"].as_f64().unwrap(),
                latency["max_ms"].as_f64().unwrap(),
            );
            // Bounded by the trial itself: no row stored before its record was sent,
            // none later than the window plus the drain.
            assert!(0.0 <= p50 && p50 <= p99 && p99 <= max, "{what}");
            assert!(max < 60_000.0, "{what}");
        }
        let correctness = &trial["correctness"];
        match contender {
            "ideal" | "shipped" | "lock-none" => {
                assert_eq!(correctness["lost"], 0, "{what}");
                assert_eq!(correctness["duplicate_messages"], 0, "{what}");
                assert_eq!(correctness["altered"], 0, "{what}");
                assert_eq!(correctness["duplicate_customers"], 0, "{what}");
                assert_eq!(correctness["duplicate_sessions"], 0, "{what}");
                assert_eq!(correctness["dead_lettered"], 0, "{what}");
                assert_eq!(correctness["stored"], correctness["expected"], "{what}");
            }
            "noop" => assert!(correctness.is_null(), "{what}"),
            "naive" => assert_eq!(correctness["lost"], 0, "{what}"),
            other => panic!("unexpected contender {other}"),
        }
        if matches!(contender, "shipped" | "lock-none") {
            assert!(
                trial["delay_records_per_record"].as_f64().is_some(),
                "{what}"
            );
            assert!(
                trial["unlocked_writes_per_record"].as_f64().is_some(),
                "{what}"
            );
        }
    }
    // Two copies of every message with random keys, processed concurrently: the naive
    // check-then-insert writer duplicates somewhere in the whole matrix.
    let naive_duplicates: u64 = trials
        .iter()
        .filter(|t| t["contender"] == "naive")
        .map(|t| t["correctness"]["duplicate_messages"].as_u64().unwrap())
        .sum();
    assert!(naive_duplicates > 0, "the naive writer made no duplicate");
}

/// The bench's check reports a database that differs from what was sent by exactly
/// the rows that differ: one message deleted, one duplicated, one altered, one customer
/// and one session duplicated.
#[tokio::test]
async fn correctness_check_reports_each_seeded_fault_exactly() {
    let database = TestDatabase::reserve();
    let pool = naive_database(&database).await;
    let sent = workload::backlog(&database.name, 20, Spread::Even { users: 4 });
    for (offset, message) in sent.iter().enumerate() {
        write_naively(&pool, message, offset as i64).await;
    }
    let clean = im_ingest::bench::check(&pool, &sent, 0).await.unwrap();
    assert!(clean.is_exact(), "{clean:?}");
    assert_eq!(clean.stored, 20);

    let id = |n: usize| sent[n].message_id.clone();
    sqlx::query("DELETE FROM message WHERE external_message_id = ?")
        .bind(id(0))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO message (tenant_id, platform, external_message_id, session_id, customer_id, \
         message_type, content, sent_at, source_topic, source_partition, source_offset) \
         SELECT tenant_id, platform, external_message_id, session_id, customer_id, message_type, \
         content, sent_at, source_topic, source_partition, source_offset \
         FROM message WHERE external_message_id = ?",
    )
    .bind(id(1))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE message SET content = CONCAT(content, '!') WHERE external_message_id = ?")
        .bind(id(2))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO customer (tenant_id, platform, external_user_id, nickname, avatar) \
         SELECT tenant_id, platform, external_user_id, nickname, avatar \
         FROM customer WHERE external_user_id = ?",
    )
    .bind(&sent[3].user_id)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO session (tenant_id, platform, customer_id, agent_id, last_message_at) \
         SELECT tenant_id, platform, customer_id, agent_id, last_message_at FROM session LIMIT 1",
    )
    .execute(&pool)
    .await
    .unwrap();

    let report = im_ingest::bench::check(&pool, &sent, 2).await.unwrap();
    assert_eq!(
        report,
        im_ingest::bench::Correctness {
            expected: 20,
            stored: 19,
            lost: 1,
            duplicate_messages: 1,
            altered: 1,
            duplicate_customers: 1,
            duplicate_sessions: 1,
            dead_lettered: 2,
        }
    );
    pool.close().await;
    database.drop_now().await;
}

/// A fresh database with the naive writer's tables (no unique keys, so faults can be
/// seeded).
async fn naive_database(database: &TestDatabase) -> MySqlPool {
    let server = MySqlPoolOptions::new()
        .max_connections(1)
        .connect_with(MySqlConnectOptions::from_str(&mysql_server_url()).unwrap())
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE `{}`", database.name))
        .execute(&server)
        .await
        .unwrap();
    server.close().await;
    let pool = MySqlPoolOptions::new()
        .max_connections(2)
        .connect_with(MySqlConnectOptions::from_str(&database.url()).unwrap())
        .await
        .unwrap();
    naive::create_schema(&pool).await.unwrap();
    pool
}

async fn write_naively(pool: &MySqlPool, message: &BenchMessage, offset: i64) {
    let json = message.to_json();
    let Ok(Inbound::Message(chat)) = decode(Some(json.as_bytes()), 1 << 20) else {
        panic!("the bench sends valid messages: {json}");
    };
    let record = Record {
        topic: "seeded".into(),
        partition: 0,
        offset,
        timestamp: Some(message.sent_at),
        key: None,
        value: Some(json.into_bytes()),
        headers: None,
    };
    naive::write_one(pool, &chat, &record).await.unwrap();
}
