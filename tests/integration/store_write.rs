//! The idempotent write against real MariaDB, without any Redis lock: the unique
//! indexes alone keep customers, sessions and messages single, and mutable fields
//! converge whatever the order of application.

use im_ingest::message::{ChatMessage, Profile};
use im_ingest::store::{
    self, write_batch, write_message, BatchConnection, BatchItem, BatchWriteError, Provenance,
    UnreadRules, WriteOutcome,
};
use sqlx::MySqlPool;

use crate::helpers::{unique, TestDatabase};

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

/// Writes `messages` in one batch transaction; one outcome per message.
async fn write_messages(
    pool: &MySqlPool,
    messages: &[(&ChatMessage, &Provenance)],
) -> Result<Vec<WriteOutcome>, BatchWriteError> {
    let items: Vec<BatchItem<'_>> = messages
        .iter()
        .map(|(m, p)| BatchItem::Message(m, p))
        .collect();
    Ok(write_batch(pool, &items, UnreadRules::default())
        .await?
        .outcomes)
}

async fn count(pool: &MySqlPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn same_message_written_five_times_is_one_row_and_four_duplicates() {
    let (db, pool) = TestDatabase::migrated().await;
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
    let (db, pool) = TestDatabase::migrated().await;
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
    let (db, pool) = TestDatabase::migrated().await;
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

#[tokio::test]
async fn each_profile_field_is_newest_wins_on_its_own_whatever_the_order() {
    let (db, pool) = TestDatabase::migrated().await;
    let part = |customer: &str, id: &str, at: i64, nickname: Option<&str>, avatar: Option<&str>| {
        let mut m = chat(customer, id, at);
        m.profile = Some(Profile {
            nickname: nickname.map(str::to_string),
            avatar: avatar.map(str::to_string),
        });
        m
    };
    // The newest nickname is A's, the newest avatar B's, though A is newer than B.
    let messages = |customer: &str| {
        [
            part(customer, "a", 2_000, Some("nick-new"), None),
            part(customer, "b", 1_000, None, Some("avatar-new.jpg")),
            part(customer, "c", 500, Some("nick-old"), Some("avatar-old.jpg")),
        ]
    };
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    let mut customers = Vec::new();
    for order in orders {
        let customer = unique("one-by-one");
        let all = messages(&customer);
        for (offset, index) in order.iter().enumerate() {
            write_message(&pool, &all[*index], &provenance(offset as i64))
                .await
                .unwrap();
        }
        customers.push(customer);
    }
    // The batch path: all three in one batch, and the newest in a later batch.
    let customer = unique("one-batch");
    let all = messages(&customer);
    let provenances: Vec<Provenance> = (0..3).map(provenance).collect();
    write_messages(&pool, &all.iter().zip(&provenances).collect::<Vec<_>>())
        .await
        .unwrap();
    customers.push(customer);
    let customer = unique("two-batches");
    let all = messages(&customer);
    write_messages(
        &pool,
        &all[1..].iter().zip(&provenances).collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    write_messages(
        &pool,
        &all[..1].iter().zip(&provenances).collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    customers.push(customer);

    for customer in customers {
        let profile: (Option<String>, Option<String>) =
            sqlx::query_as("SELECT nickname, avatar FROM customer WHERE external_user_id = ?")
                .bind(&customer)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            profile,
            (
                Some("nick-new".to_string()),
                Some("avatar-new.jpg".to_string())
            ),
            "customer {customer}"
        );
    }
    pool.close().await;
    db.drop_now().await;
}

fn with_profile(customer: &str, id: &str, at: i64, nick: &str) -> ChatMessage {
    let mut m = chat(customer, id, at);
    m.profile = Some(Profile {
        nickname: Some(nick.into()),
        avatar: Some(format!("{nick}.jpg")),
    });
    m
}

#[tokio::test]
async fn a_batch_stores_each_new_message_once_and_tells_copies_and_stored_ones_apart() {
    let (db, pool) = TestDatabase::migrated().await;
    let (a, b) = (unique("a"), unique("b"));
    let earlier = chat(&a, "m0", 500);
    write_message(&pool, &earlier, &provenance(0))
        .await
        .unwrap();
    let messages = [
        chat(&a, "m1", 1_000),
        chat(&a, "m2", 2_000),
        chat(&a, "m1", 1_000),
        chat(&b, "m3", 3_000),
        earlier.clone(),
    ];
    let provenances: Vec<Provenance> = (1..=5).map(provenance).collect();
    let items: Vec<_> = messages.iter().zip(&provenances).collect();
    let outcomes = write_messages(&pool, &items).await.unwrap();
    use WriteOutcome::{Duplicate, Stored};
    assert_eq!(outcomes, [Stored, Stored, Duplicate, Stored, Duplicate]);
    assert_eq!(count(&pool, "customer").await, 2);
    assert_eq!(count(&pool, "session").await, 2);
    assert_eq!(count(&pool, "message").await, 4);
    let offset: i64 =
        sqlx::query_scalar("SELECT source_offset FROM message WHERE external_message_id = 'm1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(offset, 1, "provenance is the first copy's record");
    // Each message linked to its own customer's session.
    let mislinked: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM message m JOIN session s ON s.id = m.session_id \
         WHERE s.customer_id <> m.customer_id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(mislinked, 0);
    // The same batch again: everything is a duplicate.
    let again = write_messages(&pool, &items).await.unwrap();
    assert!(again.iter().all(|o| *o == Duplicate), "{again:?}");
    assert_eq!(count(&pool, "message").await, 4);
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test]
async fn a_batch_converges_like_the_same_messages_written_one_by_one() {
    let (db, pool) = TestDatabase::migrated().await;
    let customer = unique("c");
    // Stored before: a profile newer than all but one of the batch's.
    write_message(
        &pool,
        &with_profile(&customer, "p", 2_500, "stored"),
        &provenance(0),
    )
    .await
    .unwrap();
    let messages = [
        with_profile(&customer, "b", 2_000, "older-than-stored"),
        with_profile(&customer, "z", 3_000, "newest"),
        with_profile(&customer, "a", 3_000, "tied-but-smaller-id"),
        chat(&customer, "no-profile", 4_000),
    ];
    let provenances: Vec<Provenance> = (1..=4).map(provenance).collect();
    let items: Vec<_> = messages.iter().zip(&provenances).collect();
    write_messages(&pool, &items).await.unwrap();
    let (nickname, nickname_at, last): (String, i64, i64) = sqlx::query_as(
        "SELECT c.nickname, c.nickname_at, s.last_message_at FROM customer c \
         JOIN session s ON s.customer_id = c.id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (nickname.as_str(), nickname_at, last),
        ("newest", 3_000, 4_000)
    );

    // A batch of only older messages changes neither.
    let late = [with_profile(&customer, "y", 100, "late")];
    let late_provenance = [provenance(9)];
    let items: Vec<_> = late.iter().zip(&late_provenance).collect();
    write_messages(&pool, &items).await.unwrap();
    let (nickname, last): (String, i64) = sqlx::query_as(
        "SELECT c.nickname, s.last_message_at FROM customer c JOIN session s ON s.customer_id = c.id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((nickname.as_str(), last), ("newest", 4_000));
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test]
async fn concurrent_batches_of_the_same_messages_store_each_exactly_once() {
    let (db, pool) = TestDatabase::migrated().await;
    let users: Vec<String> = (0..5).map(|_| unique("u")).collect();
    let messages: Vec<ChatMessage> = (0..50)
        .map(|n| chat(&users[n % 5], &format!("m{n}"), 1_000 + n as i64))
        .collect();
    let mut tasks = Vec::new();
    // Three writers, no lock, each the whole set in its own order.
    for writer in 0..3 {
        let pool = pool.clone();
        let mut mine = messages.clone();
        mine.rotate_left(writer * 17);
        tasks.push(tokio::spawn(async move {
            let provenances: Vec<Provenance> = (0..mine.len() as i64).map(provenance).collect();
            let items: Vec<_> = mine.iter().zip(&provenances).collect();
            write_messages(&pool, &items).await
        }));
    }
    let mut stored = 0;
    for task in tasks {
        let outcomes = task.await.unwrap().unwrap();
        stored += outcomes
            .iter()
            .filter(|o| **o == WriteOutcome::Stored)
            .count();
    }
    assert_eq!(
        stored, 50,
        "each message reported stored by exactly one writer"
    );
    assert_eq!(count(&pool, "customer").await, 5);
    assert_eq!(count(&pool, "session").await, 5);
    assert_eq!(count(&pool, "message").await, 50);
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test]
async fn a_batch_write_blocked_by_an_outside_row_lock_is_interrupted_at_its_stall_limit() {
    let (db, pool) = TestDatabase::migrated().await;
    let customer = unique("blocked");
    write_message(&pool, &chat(&customer, "first", 1_000), &provenance(0))
        .await
        .unwrap();
    // An outside transaction holds the customer's row (the lock-wait timeout is 50 s).
    let mut outside = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM customer WHERE external_user_id = ? FOR UPDATE")
        .bind(&customer)
        .fetch_one(&mut *outside)
        .await
        .unwrap();
    let stall_limit = std::time::Duration::from_millis(300);
    let mut connection = BatchConnection::acquire(&pool, stall_limit, UnreadRules::default())
        .await
        .unwrap();
    let (message, source) = (chat(&customer, "second", 2_000), provenance(1));
    let started = std::time::Instant::now();
    let written = connection
        .write_once(&[BatchItem::Message(&message, &source)])
        .await;
    let waited = started.elapsed();
    assert!(
        matches!(written, Err(BatchWriteError::Stalled(limit)) if limit == stall_limit),
        "{written:?}"
    );
    assert!(
        waited < std::time::Duration::from_secs(10),
        "the write waited {waited:?}, as if never interrupted"
    );
    outside.rollback().await.unwrap();
    assert_eq!(
        count(&pool, "message").await,
        1,
        "the interrupted write committed"
    );
    // The same connection handle goes on (with a fresh connection) once the row is free.
    let written = connection
        .write_once(&[BatchItem::Message(&message, &source)])
        .await
        .unwrap();
    assert_eq!(written.outcomes, [WriteOutcome::Stored]);
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test]
async fn every_kind_of_refusal_fails_the_write_as_a_refusal_and_stores_nothing_of_it() {
    let (db, pool) = TestDatabase::migrated().await;
    // What an operator's own schema may add: a CHECK, a foreign key, narrower columns.
    for ddl in [
        "ALTER TABLE message ADD CONSTRAINT no_forbidden CHECK (content <> 'forbidden')",
        "CREATE TABLE allowed_type (name VARCHAR(64) NOT NULL PRIMARY KEY) \
         DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci",
        "INSERT INTO allowed_type VALUES ('TEXT')",
        "ALTER TABLE message ADD CONSTRAINT fk_type FOREIGN KEY (message_type) \
         REFERENCES allowed_type (name)",
        "ALTER TABLE customer MODIFY nickname VARCHAR(8) NULL",
        "ALTER TABLE customer MODIFY avatar VARCHAR(2048) CHARACTER SET latin1 NULL",
    ] {
        sqlx::query(ddl).execute(&pool).await.unwrap();
    }
    let customer = unique("c");
    let mut check = chat(&customer, "check", 1_000);
    check.content = "forbidden".into();
    let mut foreign_key = chat(&customer, "foreign-key", 1_000);
    foreign_key.message_type = "IMAGE".into();
    let mut too_long = chat(&unique("long"), "too-long", 1_000);
    too_long.profile = Some(Profile {
        nickname: Some("longer than eight".into()),
        avatar: None,
    });
    let mut bad_string = chat(&unique("latin"), "bad-string", 1_000);
    bad_string.profile = Some(Profile {
        nickname: None,
        avatar: Some("\u{1F600}.jpg".into()),
    });
    let good = chat(&customer, "good", 1_000);

    for (refused, code) in [
        (&check, [4025, 3819]),
        (&foreign_key, [1452, 1452]),
        (&too_long, [1406, 1406]),
        (&bad_string, [1366, 1366]),
    ] {
        let error = write_message(&pool, refused, &provenance(1))
            .await
            .expect_err(&format!("{} was accepted", refused.message_id));
        let number = error
            .database()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
            .map(|e| e.number());
        assert!(
            number.is_some_and(|n| code.contains(&n)),
            "{}: {error}",
            refused.message_id
        );
        assert!(
            error.database().is_some_and(store::is_refusal),
            "{}: {error}",
            refused.message_id
        );
        // In a batch with a good message: the whole transaction fails, nothing is kept.
        let provenances = [provenance(2), provenance(3)];
        let items = [(&good, &provenances[0]), (refused, &provenances[1])];
        let error = write_messages(&pool, &items)
            .await
            .expect_err(&format!("a batch with {} was accepted", refused.message_id));
        assert!(
            error.database().is_some_and(store::is_refusal),
            "{}: {error}",
            refused.message_id
        );
    }
    assert_eq!(count(&pool, "message").await, 0);
    // The good message alone is stored.
    write_message(&pool, &good, &provenance(4)).await.unwrap();
    assert_eq!(count(&pool, "message").await, 1);
    pool.close().await;
    db.drop_now().await;
}
