//! The admin HTTP server of a worker process: readiness follows its dependencies, and
//! `/metrics` lists every family when idle and counts a known run exactly.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::db_proxy::DbProxy;
use crate::faults::PrivateRedis;
use crate::helpers::{mysql_server_url, unique, WorkerEnv};
use crate::kafka_util::{produce, producer};
use crate::pipeline::payload;
use crate::worker::{start, wait_until_all_committed};

/// A plain HTTP/1.1 GET; returns (status, body).
pub fn get(address: &str, path: &str) -> (u16, String) {
    get_with_headers(address, path, "")
}

/// [`get`] with `Authorization: Bearer <token>`.
pub fn get_with_token(address: &str, path: &str, token: &str) -> (u16, String) {
    get_with_headers(address, path, &format!("Authorization: Bearer {token}\r\n"))
}

/// [`get`] with more header lines (each ending in CRLF).
fn get_with_headers(address: &str, path: &str, headers: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{headers}\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

async fn wait_for_status(address: &str, path: &str, status: u16, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (got, body) = get(address, path);
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} stayed {got} ({what}): {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_stays_ready_through_a_redis_outage_saying_degraded_and_turns_unready_without_the_database(
) {
    let mut redis = PrivateRedis::start();
    let server = url::Url::parse(&mysql_server_url()).unwrap();
    let proxy = DbProxy::start(format!(
        "{}:{}",
        server.host_str().unwrap(),
        server.port().unwrap_or(3306)
    ))
    .await;
    let base = WorkerEnv::new(1);
    let proxied = format!("mysql://root@127.0.0.1:{}/{}", proxy.port, base.database);
    let env = base
        .with("REDIS__URL", &redis.url())
        .with("DATABASE__URL", &proxied)
        .with("DATABASE__ACQUIRE_TIMEOUT_MS", "1000");
    let (worker, pool) = start(&env).await;
    let admin = worker.admin_address();
    // The admin server binds just before the consumer loop's first heartbeat.
    wait_for_status(&admin, "/healthz", 200, "once the consumer loop turns").await;
    wait_for_status(&admin, "/readyz", 200, "with every dependency up").await;

    redis.kill();
    // A record meets the missing Redis: degraded mode, and the worker still stores.
    let message = payload(&unique("r"), "during-redis-outage");
    produce(&producer(), &env.inbound, Some(0), message.as_bytes()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get(&admin, "/readyz");
        assert_eq!(status, 200, "unready while only Redis is down: {body}");
        if body.contains("\"degraded\":true") {
            assert!(body.contains("\"redis\":\"down"), "{body}");
            assert!(body.contains("\"mysql\":\"ok\""), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never reported degraded: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored = crate::worker::count_of("during-redis-outage");
    crate::worker::wait_for_count(&pool, &stored, 1, &worker).await;
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get(&admin, "/readyz").1.contains("\"redis\":\"ok\"") {
        assert!(Instant::now() < deadline, "Redis never reported back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    proxy.cut();
    let body = wait_for_status(&admin, "/readyz", 503, "database cut").await;
    assert!(body.contains("\"mysql\":\"down"), "{body}");
    proxy.restore();
    wait_for_status(&admin, "/readyz", 200, "database back").await;
    assert_eq!(get(&admin, "/healthz").0, 200);
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}

/// Waits (bounded) until the series `series` of the instance behind `admin` reads
/// `expected` in its `/metrics`.
pub async fn wait_for_metric(admin: &str, series: &str, expected: f64) {
    let deadline = Instant::now() + crate::worker::WAIT;
    loop {
        let (_, body) = get(admin, "/metrics");
        let value = metric(&body, series);
        if value == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed {value:?}, never {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Partitions of `topic` the instance behind `admin` holds, from its `/metrics`.
pub fn assigned_partitions(admin: &str, topic: &str) -> Option<f64> {
    let (_, body) = get(admin, "/metrics");
    metric(
        &body,
        &format!("im_ingest_assigned_partitions{{topic=\"{topic}\"}}"),
    )
}

pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_list_every_family_when_idle_and_count_a_known_run_exactly() {
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    let admin = worker.admin_address();
    let (status, idle) = get(&admin, "/metrics");
    assert_eq!(status, 200);
    for family in [
        "im_ingest_records_total",
        "im_ingest_dead_letters_total",
        "im_ingest_retries_total",
        "im_ingest_lock_acquisitions_total",
        "im_ingest_lock_conflicts_total",
        "im_ingest_lock_extensions_total",
        "im_ingest_unlocked_writes_total",
        "im_ingest_contended_writes_total",
        "im_ingest_redis_degraded",
        "im_ingest_in_flight",
        "im_ingest_backpressure",
        "im_ingest_held_partitions",
        "im_ingest_retry_headers_distrusted_total",
        "im_ingest_dead_letter_stubs_total",
        "im_ingest_offset_resets_total",
        "im_ingest_processing_seconds",
        "im_ingest_retry_lateness_seconds",
        "im_ingest_batch_size",
    ] {
        assert!(
            idle.contains(family),
            "{family} missing from an idle worker's /metrics:\n{idle}"
        );
    }

    // A known run: 5 messages each sent twice, 2 poison records, 1 read receipt.
    let producer = producer();
    let customer = unique("c");
    for n in 0..5 {
        let value = payload(&customer, &format!("m{n}"));
        produce(&producer, &env.inbound, Some(0), value.as_bytes()).await;
        produce(&producer, &env.inbound, Some(0), value.as_bytes()).await;
    }
    produce(&producer, &env.inbound, Some(0), b"not json").await;
    produce(&producer, &env.inbound, Some(0), b"[]").await;
    let read = format!(
        r#"{{"type":"read","from_user_id":"{customer}","to_user_id":"agent","timestamp":1}}"#
    );
    produce(&producer, &env.inbound, Some(0), read.as_bytes()).await;
    wait_until_all_committed(&env, &worker).await;

    let (_, text) = get(&admin, "/metrics");
    let value =
        |series: &str| metric(&text, series).unwrap_or_else(|| panic!("{series} not in:\n{text}"));
    assert_eq!(value(r#"im_ingest_records_total{outcome="stored"}"#), 5.0);
    assert_eq!(
        value(r#"im_ingest_records_total{outcome="duplicate"}"#),
        5.0
    );
    assert_eq!(
        value(r#"im_ingest_records_total{outcome="dead_lettered"}"#),
        2.0
    );
    assert_eq!(
        value(r#"im_ingest_records_total{outcome="read_receipt"}"#),
        1.0
    );
    assert_eq!(value(r#"im_ingest_records_total{outcome="retried"}"#), 0.0);
    assert_eq!(
        value(r#"im_ingest_dead_letters_total{reason="im_ingest::InvalidMessage"}"#),
        2.0
    );
    assert_eq!(value("im_ingest_processing_seconds_count"), 13.0);
    // Each record went through exactly one batch; the two poison records alone (they
    // have no user), the customer's eleven in however many batches they queued up in.
    // A batch with a message takes the lock once: at most one acquisition per batch.
    assert_eq!(value("im_ingest_batch_size_sum"), 13.0);
    let batches = value("im_ingest_batch_size_count");
    let acquisitions = value("im_ingest_lock_acquisitions_total");
    assert!(
        (3.0..=13.0).contains(&batches) && (1.0..=batches - 2.0).contains(&acquisitions),
        "{batches} batches, {acquisitions} lock acquisitions"
    );
    assert_eq!(value("im_ingest_in_flight"), 0.0);
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}
