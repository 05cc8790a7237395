//! A batch whose transaction fails does not fail forever, and one user's trouble does
//! not hold up the others (issue "staged batch pipeline", item 2), with `im-ingest run`
//! against the real services. The bounds are the issue's: they hold with room to spare
//! on an idle stack and are what a user of the worker would call "not held up".

use std::time::{Duration, Instant};

use sqlx::MySqlPool;

use crate::helpers::{refuse_message_id, unique, WorkerEnv, WorkerProcess};
use crate::kafka_util::{
    committed, end_offset, header, message_id_of, produce, producer, read_all,
};
use crate::pipeline::payload;
use crate::worker::{count, start, wait_for_count, wait_until_all_committed};

/// Produces one message per (user, message id) to partition 0, all sent at once;
/// returns their offsets, in order, once the broker acknowledged every one.
async fn produce_at_once(topic: &str, messages: &[(String, String)]) -> Vec<i64> {
    let producer = producer();
    let sends: Vec<_> = messages
        .iter()
        .map(|(user, id)| {
            let (producer, topic, value) = (producer.clone(), topic.to_string(), payload(user, id));
            tokio::spawn(async move { produce(&producer, &topic, Some(0), value.as_bytes()).await })
        })
        .collect();
    let mut offsets = Vec::new();
    for send in sends {
        offsets.push(send.await.unwrap().1);
    }
    offsets
}

/// Waits until `sql` counts `expected`, and returns how long that took from `since`;
/// fails after a minute.
async fn durable_after(
    pool: &MySqlPool,
    sql: &str,
    expected: i64,
    since: Instant,
    worker: &WorkerProcess,
) -> Duration {
    wait_for_count(pool, sql, expected, worker).await;
    since.elapsed()
}

/// Stores one message first, so the worker has joined its group and owns the partition
/// before anything is timed.
async fn warm_up(env: &WorkerEnv, pool: &MySqlPool, worker: &WorkerProcess, user: &str) {
    produce_at_once(&env.inbound, &[(user.to_string(), "warm-up".to_string())]).await;
    wait_for_count(pool, "SELECT COUNT(*) FROM message", 1, worker).await;
}

#[tokio::test]
async fn a_message_the_database_refuses_every_time_leaves_for_the_dead_letter_topic_and_the_others_are_durable_within_two_seconds(
) {
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    warm_up(&env, &pool, &worker, &unique("warm")).await;
    refuse_message_id(&pool, "poison").await;

    let mut messages: Vec<(String, String)> = (0..10)
        .map(|n| (unique("other"), format!("other-{n}")))
        .collect();
    messages.insert(5, (unique("poisoned"), "poison".to_string()));
    produce_at_once(&env.inbound, &messages).await;
    let sent = Instant::now();
    let others = "SELECT COUNT(*) FROM message WHERE external_message_id LIKE 'other-%'";
    let took = durable_after(&pool, others, 10, sent, &worker).await;
    assert!(
        took <= Duration::from_secs(2),
        "the other users' messages became durable only after {took:?}"
    );

    // The refused record is dead-lettered with the database's reason, and the
    // partition's committed offset moves past it.
    wait_until_all_committed(&env, &worker).await;
    assert_eq!(
        committed(&env.group, &env.inbound, 0),
        Some(end_offset(&env.inbound, 0))
    );
    let dead = read_all(&env.dlq);
    assert_eq!(dead.len(), 1, "one dead letter, for the refused message");
    assert_eq!(message_id_of(&dead[0]), "poison");
    assert_eq!(
        header(&dead[0], "kafka_dlt-exception-fqcn"),
        Some(&b"im_ingest::DatabaseRejected"[..])
    );
    let reason = String::from_utf8_lossy(header(&dead[0], "kafka_dlt-exception-message").unwrap());
    assert!(reason.contains("refused by test trigger"), "{reason}");
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM message WHERE external_message_id = 'poison'"
        )
        .await,
        0
    );
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn a_session_row_locked_outside_for_thirty_seconds_holds_up_no_other_user_beyond_one_second()
{
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    let blocked_user = unique("blocked");
    warm_up(&env, &pool, &worker, &blocked_user).await;

    // An outside transaction locks the blocked user's session row; it would keep it for
    // 30 s (far past the worker's stall limit); the test ends it once it has seen enough.
    let session_id: i64 = sqlx::query_scalar(
        "SELECT s.id FROM session s JOIN customer c ON c.id = s.customer_id \
         WHERE c.tenant_id = 'default' AND c.platform = '2' AND c.external_user_id = ?",
    )
    .bind(&blocked_user)
    .fetch_one(&pool)
    .await
    .unwrap();
    let mut outside = pool.begin().await.unwrap();
    // By primary key: a lock on that one row, not on a scanned range.
    sqlx::query("SELECT id FROM session WHERE id = ? FOR UPDATE")
        .bind(session_id)
        .fetch_one(&mut *outside)
        .await
        .unwrap();
    let held_since = Instant::now();

    let mut messages = vec![(blocked_user.clone(), "blocked".to_string())];
    messages.extend((0..10).map(|n| (unique("other"), format!("other-{n}"))));
    let blocked_offset = produce_at_once(&env.inbound, &messages).await[0];
    let sent = Instant::now();
    let others = "SELECT COUNT(*) FROM message WHERE external_message_id LIKE 'other-%'";
    let took = durable_after(&pool, others, 10, sent, &worker).await;
    assert!(
        took <= Duration::from_secs(1),
        "the other users' messages became durable only after {took:?}"
    );
    // The blocked record is not stored and its partition's offset waits for it.
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM message WHERE external_message_id = 'blocked'"
        )
        .await,
        0
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let position = committed(&env.group, &env.inbound, 0).unwrap_or(0);
    assert!(
        position <= blocked_offset,
        "committed {position} passed the blocked record at {blocked_offset}"
    );
    assert!(held_since.elapsed() < Duration::from_secs(30));
    outside.rollback().await.unwrap();

    wait_until_all_committed(&env, &worker).await;
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM message").await, 12);
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}
