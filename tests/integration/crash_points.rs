//! A worker process aborted at each deterministic fault point (cargo feature
//! `failpoints`, see src/failpoint.rs) loses nothing and doubles nothing after a restart,
//! and at the moment of the crash its committed offset is behind what it made durable.

use std::time::Duration;

use crate::helpers::{unique, OutsideLock, WorkerEnv, WorkerProcess};
use crate::kafka_util::{committed, produce, producer, read_all};
use crate::pipeline::payload;
use crate::worker::{count, count_of, start, wait_for_count, wait_until_all_committed, WAIT};

/// Produces message `m1` of `customer` to partition 0 and waits for the worker to abort
/// at its fail point; returns the record's offset.
async fn produce_and_expect_abort(
    env: &WorkerEnv,
    worker: &mut WorkerProcess,
    customer: &str,
) -> i64 {
    let value = payload(customer, "m1");
    let (_, offset) = produce(&producer(), &env.inbound, Some(0), value.as_bytes()).await;
    assert!(
        !worker.wait_for_exit(WAIT).success(),
        "the fail point should abort the worker"
    );
    offset
}

#[tokio::test]
async fn crash_after_db_commit_before_offset_store_redelivers_and_stores_once() {
    let env = WorkerEnv::new(1).with_var("FAILPOINTS", "after_db_commit=return");
    let (mut worker, pool) = start(&env).await;
    let offset = produce_and_expect_abort(&env, &mut worker, &unique("c")).await;

    // The row is durable, the offset is not.
    assert_eq!(count(&pool, &count_of("m1")).await, 1);
    let position = committed(&env.group, &env.inbound, 0).unwrap_or(0);
    assert!(
        position <= offset,
        "committed {position} is past the crashed record {offset}"
    );

    let restarted = WorkerProcess::start(&env.without_extra());
    wait_until_all_committed(&env, &restarted).await;
    assert_eq!(
        count(&pool, &count_of("m1")).await,
        1,
        "redelivery doubled the row"
    );
    drop(restarted);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn crash_after_delay_publish_before_offset_store_loses_nothing() {
    let env = WorkerEnv::new(1).with_var("FAILPOINTS", "after_delay_publish=return");
    let (mut worker, pool) = start(&env).await;
    let user = unique("held");
    let outside = OutsideLock::hold(&user, Some(Duration::from_secs(3))).await;
    let offset = produce_and_expect_abort(&env, &mut worker, &user).await;

    // The delay record is durable, the source offset is not, nothing is stored yet.
    assert_eq!(read_all(&env.first_delay_topic()).len(), 1);
    let position = committed(&env.group, &env.inbound, 0).unwrap_or(0);
    assert!(
        position <= offset,
        "committed {position} is past the crashed record {offset}"
    );
    assert_eq!(count(&pool, &count_of("m1")).await, 0);

    let restarted = WorkerProcess::start(&env.without_extra());
    wait_for_count(&pool, &count_of("m1"), 1, &restarted).await;
    wait_until_all_committed(&env, &restarted).await;
    // Both copies (the redelivered source and the first delay record) end as one row.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(count(&pool, &count_of("m1")).await, 1);
    outside.release().await;
    drop(restarted);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn crash_inside_a_lease_extension_loses_nothing() {
    // The batch waits 500 ms under its lock before writing (900 ms lease, held up to
    // 600 ms): the lease extension at 300 ms aborts the process.
    let env = WorkerEnv::new(1)
        .with("LOCK__LEASE_MS", "900")
        .with("LOCK__MAX_HOLD_MS", "600")
        .with_var(
            "FAILPOINTS",
            "slow_db_write=return(500);in_lease_extension=return",
        );
    let (mut worker, pool) = start(&env).await;
    let offset = produce_and_expect_abort(&env, &mut worker, &unique("c")).await;
    assert!(
        worker.log_text().contains("in_lease_extension"),
        "{}",
        worker.log_text()
    );

    assert_eq!(count(&pool, &count_of("m1")).await, 0);
    let position = committed(&env.group, &env.inbound, 0).unwrap_or(0);
    assert!(position <= offset);

    // The crashed holder's key expires with its short lease; the restart stores once.
    let restarted = WorkerProcess::start(
        &env.without_extra()
            .with("LOCK__LEASE_MS", "900")
            .with("LOCK__MAX_HOLD_MS", "600"),
    );
    wait_for_count(&pool, &count_of("m1"), 1, &restarted).await;
    wait_until_all_committed(&env, &restarted).await;
    assert_eq!(count(&pool, &count_of("m1")).await, 1);
    drop(restarted);
    pool.close().await;
    env.drop_database().await;
}
