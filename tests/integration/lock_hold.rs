//! No lease outlives its use (issue 12, hazard 4): a write that could run past the end
//! of its lock hold (`lock.max_hold_ms`) is not started, and a batch that lost its
//! lease writes nothing more under it; their messages go through the delay topics as a
//! new attempt and are stored once. Slow writes come from the `slow_db_write` fault
//! point (cargo feature `failpoints`).

use std::time::Duration;

use im_ingest::retry::headers::RetryHeaders;
use rdkafka::Message;

use crate::admin::wait_for_metric;
use crate::helpers::{redis_connection, unique, WorkerEnv};
use crate::kafka_util::{produce, producer, read_all};
use crate::pipeline::payload;
use crate::worker::{
    count, count_of, finish, start, wait_for_count, wait_until_all_committed, WAIT,
};

/// The delay records of `topic`, as (error class, attempts) each.
fn delay_records(topic: &str) -> Vec<(String, i64)> {
    read_all(topic)
        .iter()
        .map(|record| {
            let headers = RetryHeaders::from_headers(record.headers().unwrap())
                .unwrap()
                .unwrap();
            (headers.exception_fqcn, headers.attempts)
        })
        .collect()
}

#[tokio::test]
async fn a_write_that_could_outlast_the_lock_hold_is_not_started_and_goes_through_a_delay_topic() {
    // The first batch spends 1.5 s under its locks before writing; the hold is 1 s.
    let env = WorkerEnv::new(1)
        .with("LOCK__MAX_HOLD_MS", "1000")
        .with_var("FAILPOINTS", "slow_db_write=1*return(1500)");
    let (worker, pool) = start(&env).await;
    let id = unique("held-long");
    produce(
        &producer(),
        &env.inbound,
        Some(0),
        payload(&unique("c"), &id).as_bytes(),
    )
    .await;

    wait_for_count(&pool, &count_of(&id), 1, &worker).await;
    wait_until_all_committed(&env, &worker).await;
    assert_eq!(
        delay_records(&env.first_delay_topic()),
        [("im_ingest::HoldExceeded".to_string(), 2)],
        "the message went through the first delay topic as attempt 2"
    );
    wait_for_metric(
        &worker.admin_address(),
        "im_ingest_abandoned_writes_total{reason=\"hold_exceeded\"}",
        1.0,
    )
    .await;
    assert_eq!(count(&pool, &count_of(&id)).await, 1);
    finish(&env, worker, pool).await;
}

#[tokio::test]
async fn a_batch_that_lost_its_lease_writes_nothing_under_it_and_goes_through_a_delay_topic() {
    // Lease 3 s, extended every second while the 2 s hold lasts; the first batch spends
    // 1.5 s under its lock before writing, and the key is taken over meanwhile, so the
    // extension at 1 s finds it lost.
    let env = WorkerEnv::new(1)
        .with("LOCK__LEASE_MS", "3000")
        .with("LOCK__MAX_HOLD_MS", "2000")
        .with_var("FAILPOINTS", "slow_db_write=1*return(1500)");
    let (worker, pool) = start(&env).await;
    let user = unique("taken-over");
    let id = unique("lost");
    produce(
        &producer(),
        &env.inbound,
        Some(0),
        payload(&user, &id).as_bytes(),
    )
    .await;

    let key = format!("im:lock:{{default:2:{user}}}");
    let mut redis = redis_connection().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let holder: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        if holder.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never took the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Someone else's for 800 ms: it expires before the delayed attempt has to give up.
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("outsider")
        .arg("PX")
        .arg(800)
        .query_async(&mut redis)
        .await
        .unwrap();

    wait_for_count(&pool, &count_of(&id), 1, &worker).await;
    wait_until_all_committed(&env, &worker).await;
    let delays = delay_records(&env.first_delay_topic());
    assert_eq!(
        delays.first(),
        Some(&("im_ingest::LeaseLost".to_string(), 2)),
        "the first delay record is the abandoned write: {delays:?}"
    );
    assert_eq!(count(&pool, &count_of(&id)).await, 1);
    finish(&env, worker, pool).await;
}
