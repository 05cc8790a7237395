//! Shutdown of `im-ingest run` when in-flight work does not finish (fault point
//! `slow_db_write`, cargo feature `failpoints`): the deadline ends the wait, a second
//! signal ends the process at once, and neither loses a record.

use std::time::{Duration, Instant};

use crate::admin::wait_for_metric;
use crate::helpers::{unique, WorkerEnv, WorkerProcess};
use crate::kafka_util::{committed, end_offset, produce, producer};
use crate::pipeline::payload;
use crate::worker::{count_of, start, wait_for_count, wait_until_all_committed};

/// Produces one message and waits until the worker has it in flight.
async fn one_record_in_flight(env: &WorkerEnv, worker: &WorkerProcess, message_id: &str) {
    let value = payload(&unique("s"), message_id);
    produce(&producer(), &env.inbound, Some(0), value.as_bytes()).await;
    wait_for_metric(&worker.admin_address(), "im_ingest_in_flight", 1.0).await;
}

#[tokio::test]
async fn a_shutdown_deadline_that_expires_exits_zero_and_leaves_the_unfinished_record_uncommitted()
{
    let env = WorkerEnv::new(1);
    let slow = env
        .clone()
        .with("WORKER__SHUTDOWN_DEADLINE_MS", "1000")
        .with_var("FAILPOINTS", "slow_db_write=return(20000)");
    let (worker, pool) = start(&slow).await;
    one_record_in_flight(&env, &worker, "unfinished").await;
    let asked = Instant::now();
    let (status, log) = worker.stop_with_log();
    let status = status.expect("the worker did not exit after SIGTERM");
    assert!(status.success(), "exit status {status:?}; log:\n{log}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "exited after {:?}: the 20 s write was waited for",
        asked.elapsed()
    );
    assert!(
        log.contains("shutdown deadline reached"),
        "the deadline was not reported:\n{log}"
    );
    assert!(
        committed(&env.group, &env.inbound, 0).unwrap_or(0) < end_offset(&env.inbound, 0),
        "the unfinished record was committed"
    );
    // The next worker stores it.
    let next = WorkerProcess::start(&env);
    wait_for_count(&pool, &count_of("unfinished"), 1, &next).await;
    wait_until_all_committed(&env, &next).await;
    drop(next);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn a_second_signal_exits_at_once_with_code_130_and_the_record_is_redelivered() {
    let env = WorkerEnv::new(1);
    let slow = env
        .clone()
        .with_var("FAILPOINTS", "slow_db_write=return(20000)");
    let (mut worker, pool) = start(&slow).await;
    one_record_in_flight(&env, &worker, "interrupted").await;
    worker.signal("-TERM");
    // The first signal waits for in-flight work (up to the 20 s deadline)...
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    worker.signal("-INT");
    let status = worker.wait_for_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "exit status {status:?}");
    assert!(asked.elapsed() < Duration::from_secs(5));
    let log = worker.log_text();
    assert!(log.contains("second signal"), "{log}");
    drop(worker);
    let next = WorkerProcess::start(&env);
    wait_for_count(&pool, &count_of("interrupted"), 1, &next).await;
    drop(next);
    pool.close().await;
    env.drop_database().await;
}
