//! Several `im-ingest run` processes in one consumer group: the inbound topic's
//! partitions are spread over every instance, whatever the delay topics add to the
//! group's partition count.

use std::time::{Duration, Instant};

use crate::admin::assigned_partitions as assigned;
use crate::helpers::{unique, WorkerEnv, WorkerProcess};
use crate::kafka_util::{produce, producer};
use crate::pipeline::payload;
use crate::worker::{start, wait_for_count, wait_until_all_committed, WAIT};

#[tokio::test]
async fn three_workers_in_one_group_each_hold_two_of_the_six_inbound_partitions() {
    // Six inbound partitions and four delay topics of six: thirty partitions in all.
    // Balanced by count alone, one instance may hold every inbound partition (and do all
    // the work) while the others hold only delay partitions, which are mostly idle.
    let env = WorkerEnv::new(6);
    let (a, pool) = start(&env).await;
    let b = WorkerProcess::start(&env);
    let c = WorkerProcess::start(&env);
    let workers = [&a, &b, &c];
    let admins: Vec<String> = workers.iter().map(|w| w.admin_address()).collect();
    let delay_topics: Vec<String> = [250, 1000, 4000, 16000]
        .iter()
        .map(|ms| env.delay_topic(*ms))
        .collect();

    let deadline = Instant::now() + WAIT;
    loop {
        let inbound: Vec<Option<f64>> = admins.iter().map(|a| assigned(a, &env.inbound)).collect();
        let delays: Vec<f64> = admins
            .iter()
            .map(|a| delay_topics.iter().filter_map(|t| assigned(a, t)).sum())
            .collect();
        if inbound.iter().all(|n| *n == Some(2.0)) && delays.iter().all(|n| *n == 8.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "inbound partitions per instance {inbound:?}, delay partitions {delays:?}; \
             wanted 2 and 8 each"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The group of three stores everything once.
    let producer = producer();
    let run = unique("g");
    for n in 0..60 {
        let value = payload(&format!("{run}-u{}", n % 12), &format!("{run}-m{n}"));
        produce(&producer, &env.inbound, Some(n % 6), value.as_bytes()).await;
    }
    wait_for_count(&pool, "SELECT COUNT(*) FROM message", 60, &a).await;
    wait_until_all_committed(&env, &a).await;
    drop((a, b, c));
    pool.close().await;
    env.drop_database().await;
}
