//! Running as a consumer group: SIGTERM mid-batch, a member killed, a member joining.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::Message;
use sqlx::MySqlPool;

use crate::helpers::{redis_connection, unique, WorkerEnv, WorkerProcess};
use crate::kafka_util::{committed, header, message_id_of, produce, producer, read_all};
use crate::pipeline::payload;
use crate::worker::{count, start, wait_until_all_committed, WAIT};

/// Pushes messages `from..to` of `run` (over `customers` customers), each `copies` times,
/// from 8 concurrent producers.
async fn push(topic: &str, run: &str, from: usize, to: usize, customers: usize, copies: usize) {
    let mut tasks = Vec::new();
    for lane in 0..8 {
        let (topic, run) = (topic.to_string(), run.to_string());
        tasks.push(tokio::spawn(async move {
            let producer = producer();
            for i in (from + lane..to).step_by(8) {
                let value = payload(&format!("{run}-c{}", i % customers), &format!("{run}-m{i}"));
                for _ in 0..copies {
                    produce(&producer, &topic, None, value.as_bytes()).await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Every record here is valid: a dead letter is a failure; its id and reason are shown.
fn assert_nothing_dead_lettered(env: &WorkerEnv) {
    let dead: Vec<(String, String)> = read_all(&env.dlq)
        .iter()
        .map(|r| {
            let reason = header(r, "kafka_dlt-exception-message").unwrap_or_default();
            (
                message_id_of(r),
                String::from_utf8_lossy(reason).into_owned(),
            )
        })
        .collect();
    assert!(
        dead.is_empty(),
        "{} valid records dead-lettered: {dead:?}",
        dead.len()
    );
}

/// How much the members met on users' locks: records sent to delay topics, and last
/// attempts written without a lock that kept changing hands (as the members logged it).
fn contention_report(env: &WorkerEnv, members: &[&WorkerProcess]) -> String {
    let delayed: usize = [250, 1000, 4000, 16000]
        .iter()
        .map(|d| read_all(&env.delay_topic(*d)).len())
        .sum();
    let contended: usize = members
        .iter()
        .map(|w| w.log_text().matches("lock changed hands").count())
        .sum();
    format!("{delayed} delay records, {contended} last attempts written without a changing lock")
}

/// A run of the group tests: three workers of one group on six partitions, and the
/// query counting the run's stored messages.
struct GroupRun {
    env: WorkerEnv,
    run: String,
    pool: MySqlPool,
    progress: String,
}

async fn three_workers(prefix: &str) -> (GroupRun, [WorkerProcess; 3]) {
    let env = WorkerEnv::new(6);
    let run = unique(prefix);
    crate::worker::create_topics(&env).await;
    let (first, pool) = start(&env).await;
    let workers = [
        first,
        WorkerProcess::start(&env),
        WorkerProcess::start(&env),
    ];
    let progress = format!("SELECT COUNT(*) FROM message WHERE external_message_id LIKE '{run}-%'");
    let group = GroupRun {
        env,
        run,
        pool,
        progress,
    };
    (group, workers)
}

impl GroupRun {
    /// Waits until the inbound and every delay topic are committed (delay records only
    /// move to later topics, so checking them in order sees every one), then checks
    /// the 10,000 messages of 500 customers are each stored once and nothing is
    /// dead-lettered. `witness`'s log is shown if a wait times out.
    async fn assert_every_message_stored_once(&self, witness: &WorkerProcess) {
        wait_until_all_committed(&self.env, witness).await;
        for delay in [250, 1000, 4000, 16000] {
            let topic = self.env.delay_topic(delay);
            crate::worker::wait_until_topic_committed(&self.env, &topic, witness).await;
        }
        assert_nothing_dead_lettered(&self.env);
        let pool = &self.pool;
        assert_eq!(crate::worker::stored_message_ids(pool).await.len(), 10_000);
        assert_eq!(count(pool, &self.progress).await, 10_000);
        assert_eq!(count(pool, "SELECT COUNT(*) FROM customer").await, 500);
        assert_eq!(count(pool, "SELECT COUNT(*) FROM session").await, 500);
    }

    async fn clean_up(self) {
        self.pool.close().await;
        self.env.drop_database().await;
    }
}

/// Waits (bounded) until `sql` counts at least `at_least`, polling often so the caller
/// acts close to that point.
async fn wait_for_progress(pool: &MySqlPool, sql: &str, at_least: i64, worker: &WorkerProcess) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while count(pool, sql).await < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_batch_exits_zero_with_committed_offsets_equal_to_what_is_durable_and_no_lock_left(
) {
    let env = WorkerEnv::new(2);
    let run = unique("term");
    // Pushed while the worker runs: pushed before, the whole backlog could be stored
    // while `start` waits for the second member to join.
    let (worker, pool) = start(&env).await;
    let pushing = tokio::spawn({
        let (topic, run) = (env.inbound.clone(), run.clone());
        async move { push(&topic, &run, 0, 3_000, 100, 1).await }
    });
    let progress = format!("SELECT COUNT(*) FROM message WHERE external_message_id LIKE '{run}-%'");
    wait_for_progress(&pool, &progress, 200, &worker).await;
    let started = std::time::Instant::now();
    let status = worker
        .stop()
        .expect("the worker did not exit within 30 s after SIGTERM");
    pushing.await.unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );

    // Exactly the records below the committed offsets are stored: nothing durable is
    // left uncommitted (so nothing is redone), nothing committed is missing.
    let stored = crate::worker::stored_message_ids(&pool).await;
    let positions: Vec<i64> = (0..2)
        .map(|p| committed(&env.group, &env.inbound, p).unwrap_or(0))
        .collect();
    let below: BTreeSet<String> = read_all(&env.inbound)
        .iter()
        .filter(|r| r.offset() < positions[r.partition() as usize])
        .map(message_id_of)
        .collect();
    assert!(
        stored.len() < 3_000,
        "the run finished before SIGTERM; make it longer"
    );
    assert_eq!(
        below, stored,
        "committed offsets differ from what is durable"
    );

    let mut redis = redis_connection().await;
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("im:lock:{{default:2:{run}-*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(left.is_empty(), "lock keys left behind: {left:?}");

    let restarted = WorkerProcess::start(&env);
    wait_until_all_committed(&env, &restarted).await;
    assert_eq!(count(&pool, &progress).await, 3_000);
    drop(restarted);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_worker_joining_three_mid_run_loses_and_doubles_nothing_of_twenty_thousand_records(
) {
    let (group, [first, second, third]) = three_workers("group").await;
    let (env, run) = (&group.env, &group.run);

    // 10,000 messages of 500 customers, each twice: 20,000 records, in two halves.
    push(&env.inbound, run, 0, 5_000, 500, 2).await;
    let fourth = WorkerProcess::start(env); // joins mid-run: a rebalance
    push(&env.inbound, run, 5_000, 10_000, 500, 2).await;

    group.assert_every_message_stored_once(&first).await;
    let rebalanced = [&first, &second, &third]
        .iter()
        .any(|w| w.log_text().contains("partitions revoked"));
    assert!(
        rebalanced,
        "no member saw a revoke: the test did not exercise a rebalance"
    );
    eprintln!(
        "fourth worker joined; {}",
        contention_report(env, &[&first, &second, &third, &fourth])
    );
    drop((first, second, third, fourth));
    group.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_and_replaced_loses_and_doubles_nothing_of_twenty_thousand_records()
{
    let (group, [first, victim, third]) = three_workers("kill").await;
    let (env, pool) = (&group.env, &group.pool);

    // 10,000 messages of 500 customers, each twice: 20,000 records; the kill comes
    // while they are still arriving.
    let pushing = tokio::spawn({
        let (topic, run) = (env.inbound.clone(), group.run.clone());
        async move { push(&topic, &run, 0, 10_000, 500, 2).await }
    });
    wait_for_progress(pool, &group.progress, 2_000, &first).await;
    let stored_at_kill = count(pool, &group.progress).await;
    drop(victim); // SIGKILL: no shutdown, its locks stay until their lease ends
    let replacement = WorkerProcess::start(env);
    pushing.await.unwrap();

    group.assert_every_message_stored_once(&first).await;
    assert!(
        stored_at_kill < 10_000,
        "the run finished before the kill; make it longer"
    );
    eprintln!(
        "killed one of three workers at {stored_at_kill} of 10,000 messages stored; {}",
        contention_report(env, &[&first, &third, &replacement])
    );
    drop((first, third, replacement));
    group.clean_up().await;
}
