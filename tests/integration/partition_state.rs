//! The one owner of partition state (`consumer::partitions`), with `im-ingest run`
//! against the real services and fault points (cargo feature `failpoints`): a failed
//! seek never resumes a partition, queued work of a revoked partition is dropped, and a
//! commit refused during a rebalance is tried again.

use std::time::{Duration, Instant};

use crate::admin::{get, metric, wait_for_metric};
use crate::helpers::{unique, OutsideLock, WorkerEnv, WorkerProcess};
use crate::kafka_util::{committed, end_offset, produce, producer};
use crate::pipeline::payload;
use crate::worker::{
    start, wait_for_count, wait_until_all_committed, wait_until_topic_committed, WAIT,
};

#[tokio::test]
async fn a_failed_seek_back_keeps_the_delay_partition_paused_until_a_seek_succeeds_and_skips_nothing(
) {
    // The first seek the worker makes fails: the one that brings a held delay partition
    // back to its head record when it falls due.
    let env = WorkerEnv::new(1).with_var("FAILPOINTS", "seek_fails=1*return");
    let (worker, pool) = start(&env).await;
    // One message first, so the worker owns the partition before the lock's TTL runs.
    let warm_up = payload(&unique("warm"), "warm-up");
    produce(&producer(), &env.inbound, Some(0), warm_up.as_bytes()).await;
    wait_for_count(&pool, "SELECT COUNT(*) FROM message", 1, &worker).await;
    let user = unique("held");
    // Held elsewhere through the in-process wait, so the record goes to a delay topic
    // (whose partition the worker then holds until the record is due); free by then.
    let _outside = OutsideLock::hold(&user, Some(Duration::from_millis(800))).await;
    produce(
        &producer(),
        &env.inbound,
        Some(0),
        payload(&user, "delayed").as_bytes(),
    )
    .await;
    // Without the seek the partition would resume past the held record: never stored.
    wait_for_count(
        &pool,
        "SELECT COUNT(*) FROM message WHERE external_message_id = 'delayed'",
        1,
        &worker,
    )
    .await;
    wait_until_all_committed(&env, &worker).await;
    // The delay topic the record went through is committed to its end too.
    let delay_topic = env.first_delay_topic();
    assert!(
        end_offset(&delay_topic, 0) > 0,
        "nothing went through {delay_topic}"
    );
    wait_until_topic_committed(&env, &delay_topic, &worker).await;
    let log = worker.log_text();
    assert!(
        log.contains("seeking back failed: the partition stays paused"),
        "the fault point never made a seek fail; log:\n{log}"
    );
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn a_commit_refused_during_a_rebalance_is_tried_again_and_the_offsets_reach_the_end() {
    // Periodic commits are off for the test (a 10-minute interval): only the worker's
    // own commit at shutdown commits, and its first attempt is refused.
    let env = WorkerEnv::new(1)
        .with_var("FAILPOINTS", "commit_rebalance_in_progress=1*return")
        .with("KAFKA__LIBRDKAFKA__AUTO.COMMIT.INTERVAL.MS", "600000");
    let (worker, pool) = start(&env).await;
    let producer = producer();
    for n in 0..5 {
        let value = payload(&unique("u"), &format!("m-{n}"));
        produce(&producer, &env.inbound, Some(0), value.as_bytes()).await;
    }
    wait_for_count(&pool, "SELECT COUNT(*) FROM message", 5, &worker).await;
    let (status, log) = worker.stop_with_log();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}; log:\n{log}"
    );
    let refused = log
        .find("commit refused: a rebalance is in progress; trying again")
        .unwrap_or_else(|| panic!("the fault point never refused a commit; log:\n{log}"));
    assert!(
        log[refused..].contains("offsets committed when=\"at shutdown\""),
        "the refused commit was not tried again; log:\n{log}"
    );
    assert_eq!(
        committed(&env.group, &env.inbound, 0),
        Some(end_offset(&env.inbound, 0)),
        "log:\n{log}"
    );
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_records_of_a_revoked_partition_are_dropped_not_processed_by_the_old_owner() {
    // Worker A writes slowly (every write waits 10 s), so while the first record of a
    // user is being written the user's later records queue behind it. A second worker
    // joins the group meanwhile. With the eager `range` assignor (instead of the
    // worker's cooperative-sticky one, whose choice of partitions to move is arbitrary)
    // the join revokes every partition of A at once, so the 4 queued records of each of
    // the two inbound partitions belong to the next owner — of one partition A itself,
    // which fetches them again from the committed offset.
    // A's holds must outlast its 10 s writes (a hold of 15 s, a quarter of the lease),
    // or they would be abandoned to the delay topics instead of written late.
    let env = WorkerEnv::new(2).with("KAFKA__LIBRDKAFKA__PARTITION.ASSIGNMENT.STRATEGY", "range");
    let a_env = env.clone().with("LOCK__LEASE_MS", "60000");
    let slow = a_env.with_var("FAILPOINTS", "slow_db_write=return(10000)");
    let (a, pool) = start(&slow).await;
    // (`start` waits for both of A's members: with `range`, the second one's join
    // revokes A's partitions too, so it must be over before the records come.)
    let producer = producer();
    for partition in 0..2 {
        let user = unique(&format!("p{partition}"));
        for n in 0..5 {
            let value = payload(&user, &format!("p{partition}-m{n}"));
            produce(&producer, &env.inbound, Some(partition), value.as_bytes()).await;
        }
    }
    // A holds all 10 (2 being written, 8 queued) before the second worker joins.
    let admin = a.admin_address();
    wait_for_metric(&admin, "im_ingest_in_flight", 10.0).await;
    let b = WorkerProcess::start(&env);

    let deadline = Instant::now() + WAIT;
    let dropped = loop {
        let (_, body) = get(&admin, "/metrics");
        let dropped = metric(&body, "im_ingest_revoked_records_dropped_total").unwrap_or(0.0);
        if dropped >= 8.0 || Instant::now() > deadline {
            break dropped;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // At least the 8 queued ones (a further rebalance may drop records fetched again).
    assert!(
        dropped >= 8.0,
        "A dropped {dropped}; A's log:\n{}",
        a.log_text()
    );
    // Nothing is lost: the next owners store everything.
    wait_for_count(&pool, "SELECT COUNT(*) FROM message", 10, &b).await;
    wait_until_all_committed(&env, &b).await;
    drop((a, b));
    pool.close().await;
    env.drop_database().await;
}
