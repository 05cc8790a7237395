//! Unread counts in MySQL, the truth (issue 13, item 1), against real MariaDB and
//! without any Redis lock: whatever the order, the batching, the copies and the
//! concurrency of messages and read receipts, each session's `unread_count` equals the
//! number of its messages sent after its `read_up_to`, the newest receipt's watermark.

use std::collections::{BTreeMap, HashMap};

use im_ingest::message::{ChatMessage, ReadReceipt};
use im_ingest::store::{write_batch, BatchItem, Provenance, UnreadRules, WriteOutcome};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sqlx::MySqlPool;

use crate::helpers::{unique, TestDatabase};

const AGENT: &str = "agent-1";
const DAY: i64 = 86_400_000;

/// One event of the log a test writes.
#[derive(Debug, Clone)]
enum Event {
    Message(ChatMessage),
    Receipt(ReadReceipt),
}

fn message(customer: &str, id: &str, sent_at: i64) -> Event {
    Event::Message(ChatMessage {
        tenant_id: "t".into(),
        platform: "2".into(),
        message_id: id.into(),
        from_user_id: customer.into(),
        to_user_id: AGENT.into(),
        message_type: "TEXT".into(),
        content: format!("content of {id}"),
        sent_at,
        profile: None,
    })
}

fn receipt(customer: &str, read_up_to: i64) -> Event {
    Event::Receipt(ReadReceipt {
        tenant_id: "t".into(),
        platform: "2".into(),
        from_user_id: customer.into(),
        to_user_id: AGENT.into(),
        read_up_to,
    })
}

/// Writes `events` in one batch transaction.
async fn write(pool: &MySqlPool, events: &[Event], rules: UnreadRules) -> Vec<WriteOutcome> {
    let provenance = Provenance {
        topic: "im.inbound".into(),
        partition: 0,
        offset: 0,
    };
    let items: Vec<BatchItem<'_>> = events
        .iter()
        .map(|event| match event {
            Event::Message(m) => BatchItem::Message(m, &provenance),
            Event::Receipt(r) => BatchItem::Receipt(r),
        })
        .collect();
    write_batch(pool, &items, rules).await.unwrap().outcomes
}

/// The watermark model: per customer, (read_up_to, unread) from the whole event log.
fn model(events: &[Event]) -> BTreeMap<String, (Option<i64>, u32)> {
    let mut read_up_to: HashMap<&str, i64> = HashMap::new();
    let mut sent: HashMap<&str, BTreeMap<&str, i64>> = HashMap::new();
    for event in events {
        match event {
            Event::Message(m) => {
                sent.entry(&m.from_user_id)
                    .or_default()
                    .insert(&m.message_id, m.sent_at);
            }
            Event::Receipt(r) => {
                let w = read_up_to.entry(&r.from_user_id).or_insert(i64::MIN);
                *w = (*w).max(r.read_up_to);
            }
        }
    }
    let customers: std::collections::BTreeSet<&str> =
        sent.keys().chain(read_up_to.keys()).copied().collect();
    customers
        .into_iter()
        .map(|customer| {
            let watermark = read_up_to.get(customer).copied();
            let unread = sent.get(customer).map_or(0, |messages| {
                messages
                    .values()
                    .filter(|at| watermark.is_none_or(|w| **at > w))
                    .count() as u32
            });
            (customer.to_string(), (watermark, unread))
        })
        .collect()
}

/// Per customer of the agent: (read_up_to, unread_count, unread_version) in MySQL.
async fn stored(pool: &MySqlPool) -> BTreeMap<String, (Option<i64>, u32, u64)> {
    let rows: Vec<(String, Option<i64>, u32, u64)> = sqlx::query_as(
        "SELECT CAST(c.external_user_id AS CHAR), s.read_up_to, s.unread_count, s.unread_version \
         FROM session s JOIN customer c ON c.id = s.customer_id WHERE s.agent_id = ?",
    )
    .bind(AGENT)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(customer, w, unread, version)| (customer, (w, unread, version)))
        .collect()
}

/// Sessions whose stored count differs from a recount of their message rows after
/// both watermarks.
async fn counts_off_their_rows(pool: &MySqlPool) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM session s WHERE s.unread_count <> (SELECT COUNT(*) FROM message m \
         WHERE m.session_id = s.id AND m.sent_at > GREATEST(COALESCE(s.read_up_to, -9223372036854775808), \
         COALESCE(s.expired_up_to, -9223372036854775808)))",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_receipt_before_any_message_creates_the_session_and_later_messages_count_against_it() {
    let (db, pool) = TestDatabase::migrated().await;
    let customer = unique("early-reader");
    let outcomes = write(&pool, &[receipt(&customer, 2_000)], UnreadRules::default()).await;
    assert_eq!(outcomes, [WriteOutcome::ReadApplied]);
    assert_eq!(
        stored(&pool).await[&customer],
        (Some(2_000), 0, 1),
        "the receipt made the session with its watermark"
    );
    let events = [
        message(&customer, "read-already", 1_500),
        message(&customer, "unread", 2_500),
    ];
    write(&pool, &events, UnreadRules::default()).await;
    let (w, unread, version) = stored(&pool).await[&customer];
    assert_eq!((w, unread), (Some(2_000), 1));
    assert_eq!(version, 2, "one change, one version");
    // An older receipt changes nothing; a newer one recounts.
    write(&pool, &[receipt(&customer, 1_000)], UnreadRules::default()).await;
    assert_eq!(stored(&pool).await[&customer], (Some(2_000), 1, 2));
    write(&pool, &[receipt(&customer, 3_000)], UnreadRules::default()).await;
    assert_eq!(stored(&pool).await[&customer], (Some(3_000), 0, 3));
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test]
async fn copies_of_a_message_in_one_batch_and_again_later_add_exactly_one() {
    let (db, pool) = TestDatabase::migrated().await;
    let customer = unique("copies");
    let once = message(&customer, "m1", 1_000);
    let outcomes = write(&pool, &[once.clone(), once.clone()], UnreadRules::default()).await;
    assert_eq!(outcomes, [WriteOutcome::Stored, WriteOutcome::Duplicate]);
    write(&pool, std::slice::from_ref(&once), UnreadRules::default()).await;
    write(
        &pool,
        &[once, message(&customer, "m2", 900)],
        UnreadRules::default(),
    )
    .await;
    let (_, unread, _) = stored(&pool).await[&customer];
    assert_eq!(unread, 2);
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test]
async fn messages_and_receipts_in_any_order_batching_and_concurrency_match_the_watermark_model() {
    let (db, pool) = TestDatabase::migrated().await;
    let mut rng = StdRng::seed_from_u64(13);
    let customers: Vec<String> = (0..3).map(|n| unique(&format!("c{n}"))).collect();
    let mut events = Vec::new();
    for customer in &customers {
        for n in 0..60 {
            events.push(message(
                customer,
                &format!("{customer}-m{n}"),
                rng.random_range(0..1_000),
            ));
        }
        for _ in 0..10 {
            events.push(receipt(customer, rng.random_range(0..1_000)));
        }
    }
    let expected = model(&events);
    // Every event twice (redelivery), shuffled, in batches of 1 to 12, written by eight
    // writers at once.
    let mut log: Vec<Event> = events.iter().chain(&events).cloned().collect();
    log.shuffle(&mut rng);
    let mut batches = Vec::new();
    while !log.is_empty() {
        let size = rng.random_range(1..=12).min(log.len());
        batches.push(log.drain(..size).collect::<Vec<_>>());
    }
    let mut writers = tokio::task::JoinSet::new();
    for lane in 0..8 {
        let mine: Vec<Vec<Event>> = batches.iter().skip(lane).step_by(8).cloned().collect();
        let pool = pool.clone();
        writers.spawn(async move {
            for batch in mine {
                write(&pool, &batch, UnreadRules::default()).await;
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    let stored = stored(&pool).await;
    for (customer, (watermark, unread)) in &expected {
        let (w, u, version) = stored[customer];
        assert_eq!((w, u), (*watermark, *unread), "{customer}");
        assert!(version > 0, "{customer}: the version never moved");
    }
    assert_eq!(counts_off_their_rows(&pool).await, 0);
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test]
async fn with_expiry_a_message_after_a_long_silence_counts_from_one() {
    let (db, pool) = TestDatabase::migrated().await;
    let customer = unique("silent");
    let rules = UnreadRules {
        expire_after_ms: Some(7 * DAY),
    };
    let old = 1_000_000;
    let events: Vec<Event> = (0..3)
        .map(|n| message(&customer, &format!("old-{n}"), old + n))
        .collect();
    write(&pool, &events, rules).await;
    assert_eq!(stored(&pool).await[&customer].1, 3);
    let late = old + 8 * DAY;
    write(&pool, &[message(&customer, "late", late)], rules).await;
    let (receipts, unread, _) = stored(&pool).await[&customer];
    assert_eq!((receipts, unread), (None, 1));
    assert_eq!(expired_up_to(&pool, &customer).await, Some(late - 1));
    pool.close().await;
    db.drop_now().await;
}

async fn expired_up_to(pool: &MySqlPool, customer: &str) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT s.expired_up_to FROM session s JOIN customer c ON c.id = s.customer_id \
         WHERE c.external_user_id = ?",
    )
    .bind(customer)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn with_expiry_every_arrival_order_and_batching_gives_the_counts_of_the_silences_between_messages(
) {
    let (db, pool) = TestDatabase::migrated().await;
    let rules = UnreadRules {
        expire_after_ms: Some(7 * DAY),
    };
    let mut rng = StdRng::seed_from_u64(7);
    // Silences of 11 and 14 days end at 20d and 35d: only 35d (and 35d + 1 h) count.
    let days = [
        0,
        3 * DAY,
        9 * DAY,
        20 * DAY,
        21 * DAY,
        35 * DAY,
        35 * DAY + 3_600_000,
    ];
    // The same, with 15d filling the first silence and 28d the second: no silence left.
    let filled = [
        0,
        3 * DAY,
        9 * DAY,
        15 * DAY,
        20 * DAY,
        21 * DAY,
        28 * DAY,
        35 * DAY,
    ];
    for (sent, expected_unread, expected_expiry) in
        [(&days[..], 2, Some(35 * DAY - 1)), (&filled[..], 8, None)]
    {
        for round in 0..6 {
            let customer = unique(&format!("order{round}"));
            let mut events: Vec<Event> = sent
                .iter()
                .enumerate()
                .map(|(n, at)| message(&customer, &format!("{customer}-{n}"), *at))
                .collect();
            events.shuffle(&mut rng);
            while !events.is_empty() {
                let size = rng.random_range(1..=3).min(events.len());
                let batch: Vec<Event> = events.drain(..size).collect();
                write(&pool, &batch, rules).await;
            }
            let (_, unread, _) = stored(&pool).await[&customer];
            assert_eq!(unread, expected_unread, "{customer}: {sent:?}");
            assert_eq!(expired_up_to(&pool, &customer).await, expected_expiry);
        }
    }
    assert_eq!(counts_off_their_rows(&pool).await, 0);
    pool.close().await;
    db.drop_now().await;
}

/// Waits until a batch's customer upsert waits (for the row lock another writer holds).
async fn until_a_batch_waits_for_its_customer(connection: &mut sqlx::MySqlConnection) {
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.processlist \
             WHERE state = 'Update' AND info LIKE 'INSERT INTO customer %'",
        )
        .fetch_one(&mut *connection)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no batch waited for its customer's row lock within 5 s");
}

#[tokio::test]
async fn a_batch_that_waited_for_another_writer_counts_what_that_writer_committed_meanwhile() {
    let (db, pool) = TestDatabase::migrated().await;
    let (a, b) = (unique("held"), unique("other"));
    write(
        &pool,
        &[message(&a, "a1", 1_000), message(&b, "b1", 1_000)],
        UnreadRules::default(),
    )
    .await;
    let (session, customer): (i64, i64) = sqlx::query_as(
        "SELECT s.id, s.customer_id FROM session s JOIN customer c ON c.id = s.customer_id \
         WHERE c.external_user_id = ?",
    )
    .bind(&a)
    .fetch_one(&pool)
    .await
    .unwrap();
    // Another writer of a's messages, as a batch does it: a's customer row locked first,
    // then its session, a new message, the session's new count.
    let mut holder = pool.begin().await.unwrap();
    for lock in [
        "SELECT id FROM customer WHERE id = ? FOR UPDATE",
        "SELECT id FROM session WHERE customer_id = ? FOR UPDATE",
    ] {
        sqlx::query(lock)
            .bind(customer)
            .execute(&mut *holder)
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO message (tenant_id, platform, external_message_id, session_id, customer_id, \
         content, sent_at, source_topic, source_partition, source_offset) \
         VALUES ('t', '2', 'a2', ?, ?, '', 2000, 'im.inbound', 0, 0)",
    )
    .bind(session)
    .bind(customer)
    .execute(&mut *holder)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE session SET unread_count = 2, last_message_at = 2000, \
         unread_version = unread_version + 1 WHERE id = ?",
    )
    .bind(session)
    .execute(&mut *holder)
    .await
    .unwrap();
    // A batch of both customers waits for a, then reads a's session.
    let writer = {
        let pool = pool.clone();
        let events = [message(&a, "a3", 3_000), message(&b, "b2", 3_000)];
        tokio::spawn(async move { write(&pool, &events, UnreadRules::default()).await })
    };
    until_a_batch_waits_for_its_customer(&mut db.connect().await).await;
    holder.commit().await.unwrap();
    writer.await.unwrap();
    let stored = stored(&pool).await;
    assert_eq!(
        stored[&a].1, 3,
        "the count missed what the other writer committed"
    );
    assert_eq!(stored[&b].1, 2);
    assert_eq!(counts_off_their_rows(&pool).await, 0);
    pool.close().await;
    db.drop_now().await;
}
