//! The idempotent write against real MariaDB, without any Redis lock: the unique
//! indexes alone keep customers, sessions and messages single, and mutable fields
//! converge whatever the order of application.

use im_ingest::message::{ChatMessage, Profile};
use im_ingest::store::{self, write_message, Provenance, WriteOutcome};
use sqlx::MySqlPool;

use crate::helpers::{unique, TestDatabase};

async fn migrated_pool() -> (TestDatabase, MySqlPool) {
    let db = TestDatabase::reserve();
    let settings = im_ingest::config::DatabaseSettings {
        url: im_ingest::secret::SecretUrl::new(db.url()),
        ..Default::default()
    };
    store::migrate(&settings).await.unwrap();
    let pool = store::connect(&settings).await.unwrap();
    (db, pool)
}

fn chat(customer: &str, message_id: &str, sent_at: i64) -> ChatMessage {
    ChatMessage {
        tenant_id: "default".into(),
        platform: "2".into(),
        message_id: message_id.into(),
        from_user_id: customer.into(),
        to_user_id: "575d2c135e87e733f0162b88".into(),
        message_type: "TEXT".into(),
        content: format!("content of {message_id}"),
        sent_at,
        profile: None,
    }
}

fn provenance(offset: i64) -> Provenance {
    Provenance {
        topic: "im.inbound".into(),
        partition: 0,
        offset,
    }
}

async fn count(pool: &MySqlPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn same_message_written_five_times_is_one_row_and_four_duplicates() {
    let (db, pool) = migrated_pool().await;
    let message = chat(&unique("c"), "m-1", 1_000);
    let mut outcomes = Vec::new();
    for offset in 0..5 {
        outcomes.push(
            write_message(&pool, &message, &provenance(offset))
                .await
                .unwrap(),
        );
    }
    assert_eq!(outcomes[0], WriteOutcome::Stored);
    assert!(outcomes[1..].iter().all(|o| *o == WriteOutcome::Duplicate));
    assert_eq!(count(&pool, "message").await, 1);
    let offset: i64 = sqlx::query_scalar("SELECT source_offset FROM message")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(offset, 0, "provenance is the record that inserted the row");
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test]
async fn unique_indexes_alone_keep_one_customer_under_concurrent_writes() {
    let (db, pool) = migrated_pool().await;
    let customer = unique("c");
    let mut tasks = Vec::new();
    // Ten messages of one new customer, each written twice, all at once, no lock.
    for round in 0..2 {
        for n in 0..10 {
            let pool = pool.clone();
            let message = chat(&customer, &format!("m-{n}"), 1_000);
            tasks.push(tokio::spawn(async move {
                write_message(&pool, &message, &provenance(round * 10 + n)).await
            }));
        }
    }
    let mut stored = 0;
    for task in tasks {
        if task.await.unwrap().unwrap() == WriteOutcome::Stored {
            stored += 1;
        }
    }
    assert_eq!(stored, 10);
    assert_eq!(count(&pool, "customer").await, 1);
    assert_eq!(count(&pool, "session").await, 1);
    assert_eq!(count(&pool, "message").await, 10);
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test]
async fn newest_profile_wins_whatever_the_order_of_application() {
    let (db, pool) = migrated_pool().await;
    let customer = unique("c");
    let with_profile = |id: &str, at: i64, nick: &str| {
        let mut m = chat(&customer, id, at);
        m.profile = Some(Profile {
            nickname: Some(nick.into()),
            avatar: Some(format!("{nick}.jpg")),
        });
        m
    };
    // Newest by (timestamp, message id): "b" at 2000 beats "a" at 2000 and "z" at 1000.
    let messages = [
        with_profile("b", 2_000, "newest"),
        with_profile("z", 1_000, "oldest"),
        with_profile("a", 2_000, "tied-but-smaller-id"),
        chat(&customer, "no-profile", 3_000),
    ];
    for (offset, m) in messages.iter().enumerate() {
        write_message(&pool, m, &provenance(offset as i64))
            .await
            .unwrap();
    }
    let (nickname, avatar, last): (String, String, i64) = sqlx::query_as(
        "SELECT c.nickname, c.avatar, s.last_message_at FROM customer c \
         JOIN session s ON s.customer_id = c.id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(nickname, "newest");
    assert_eq!(avatar, "newest.jpg");
    assert_eq!(last, 3_000, "last_message_at moves forward only");

    // An older message arriving late changes neither.
    write_message(&pool, &with_profile("y", 500, "late"), &provenance(9))
        .await
        .unwrap();
    let (nickname, last): (String, i64) = sqlx::query_as(
        "SELECT c.nickname, s.last_message_at FROM customer c JOIN session s ON s.customer_id = c.id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((nickname.as_str(), last), ("newest", 3_000));
    pool.close().await;
    db.drop_now().await;
}
