//! Migrations and the natural-key unique indexes that are the real duplicate guard.

use sqlx::{Connection, MySqlConnection, Row};

use crate::helpers::{im_ingest, stderr_of, TestDatabase};

async fn migrated_database() -> TestDatabase {
    let db = TestDatabase::reserve();
    let output = im_ingest(&["migrate"], &[("IM_INGEST__DATABASE__URL", &db.url())]);
    assert!(
        output.status.success(),
        "migrate failed: {}",
        stderr_of(&output)
    );
    db
}

async fn schema_of(conn: &mut MySqlConnection) -> Vec<String> {
    let mut schema = Vec::new();
    for table in ["customer", "session", "message"] {
        let row = sqlx::query(&format!("SHOW CREATE TABLE `{table}`"))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        let ddl: String = row.get(1);
        // AUTO_INCREMENT=n changes with data, not with the schema.
        schema.push(ddl.split(" AUTO_INCREMENT=").next().unwrap().to_string());
    }
    schema
}

async fn insert_customer(conn: &mut MySqlConnection, user: &str) -> Result<u64, sqlx::Error> {
    sqlx::query("INSERT INTO customer (tenant_id, platform, external_user_id) VALUES ('t', 'p', ?)")
        .bind(user)
        .execute(&mut *conn)
        .await
        .map(|r| r.last_insert_id())
}

async fn insert_session(
    conn: &mut MySqlConnection,
    customer_id: u64,
    agent: &str,
) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "INSERT INTO session (tenant_id, platform, customer_id, agent_id) VALUES ('t', 'p', ?, ?)",
    )
    .bind(customer_id)
    .bind(agent)
    .execute(&mut *conn)
    .await
    .map(|r| r.last_insert_id())
}

async fn insert_message(
    conn: &mut MySqlConnection,
    session_id: u64,
    customer_id: u64,
    message: &str,
) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "INSERT INTO message (tenant_id, platform, external_message_id, session_id, customer_id, \
         message_type, content, sent_at, source_topic, source_partition, source_offset) \
         VALUES ('t', 'p', ?, ?, ?, 'TEXT', 'hi', 1723268668573, 'im.inbound', 0, 0)",
    )
    .bind(message)
    .bind(session_id)
    .bind(customer_id)
    .execute(&mut *conn)
    .await
    .map(|r| r.last_insert_id())
}

fn is_duplicate_key(result: Result<u64, sqlx::Error>) -> bool {
    match result {
        Err(sqlx::Error::Database(e)) => e.is_unique_violation(),
        _ => false,
    }
}

#[tokio::test]
async fn migrating_twice_leaves_one_schema() {
    let db = migrated_database().await;
    let mut conn = db.connect().await;
    let first = schema_of(&mut conn).await;

    let again = im_ingest(&["migrate"], &[("IM_INGEST__DATABASE__URL", &db.url())]);
    assert!(
        again.status.success(),
        "second migrate failed: {}",
        stderr_of(&again)
    );

    assert_eq!(schema_of(&mut conn).await, first);
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(applied as usize, im_ingest::store::MIGRATOR.iter().count());
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(table_name AS CHAR) FROM information_schema.tables \
         WHERE table_schema = DATABASE() AND table_name <> '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        tables,
        ["customer", "message", "session", "unread_reconcile"]
    );
    conn.close().await.unwrap();
    db.drop_now().await;
}

#[tokio::test]
async fn customer_natural_key_rejects_a_second_row_and_is_case_sensitive() {
    let db = migrated_database().await;
    let mut conn = db.connect().await;
    insert_customer(&mut conn, "63038d28000000001200d311")
        .await
        .unwrap();
    assert!(is_duplicate_key(
        insert_customer(&mut conn, "63038d28000000001200d311").await
    ));
    insert_customer(&mut conn, "63038D28000000001200D311")
        .await
        .unwrap();
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM customer")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 2);
    conn.close().await.unwrap();
    db.drop_now().await;
}

#[tokio::test]
async fn session_natural_key_rejects_a_second_row_and_is_case_sensitive() {
    let db = migrated_database().await;
    let mut conn = db.connect().await;
    let customer = insert_customer(&mut conn, "customer-1").await.unwrap();
    insert_session(&mut conn, customer, "agentA").await.unwrap();
    assert!(is_duplicate_key(
        insert_session(&mut conn, customer, "agentA").await
    ));
    insert_session(&mut conn, customer, "AGENTA").await.unwrap();
    conn.close().await.unwrap();
    db.drop_now().await;
}

#[tokio::test]
async fn message_natural_key_rejects_a_second_row_and_is_case_sensitive() {
    let db = migrated_database().await;
    let mut conn = db.connect().await;
    let customer = insert_customer(&mut conn, "customer-1").await.unwrap();
    let session = insert_session(&mut conn, customer, "agent").await.unwrap();
    insert_message(&mut conn, session, customer, "7c1cAbc")
        .await
        .unwrap();
    assert!(is_duplicate_key(
        insert_message(&mut conn, session, customer, "7c1cAbc").await
    ));
    insert_message(&mut conn, session, customer, "7c1cabc")
        .await
        .unwrap();
    let ignored = sqlx::query(
        "INSERT IGNORE INTO message (tenant_id, platform, external_message_id, session_id, \
         customer_id, content, sent_at, source_topic, source_partition, source_offset) \
         VALUES ('t', 'p', '7c1cAbc', ?, ?, 'again', 1, 'im.inbound', 0, 1)",
    )
    .bind(session)
    .bind(customer)
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        ignored.rows_affected(),
        0,
        "INSERT IGNORE of a duplicate must insert nothing"
    );
    conn.close().await.unwrap();
    db.drop_now().await;
}

/// A customer's user id with its nickname and avatar markers.
type MarkerRow = (
    String,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
);

#[tokio::test]
async fn migrating_a_database_of_the_first_schema_gives_each_profile_field_its_old_marker() {
    // A database as the first release left it: only the initial migration applied.
    let db = TestDatabase::created().await;
    let settings = db.settings();
    let first = tempfile::tempdir().unwrap();
    let initial = "20261122000001_initial_schema.sql";
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(initial),
        first.path().join(initial),
    )
    .unwrap();
    let mut conn = db.connect().await;
    sqlx::migrate::Migrator::new(first.path())
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO customer (tenant_id, platform, external_user_id, nickname, avatar, \
         profile_at, profile_message_id) VALUES \
         ('t', 'p', 'both', 'nick', 'a.jpg', 5, 'm5'), \
         ('t', 'p', 'nickname-only', 'nick', NULL, 6, 'm6'), \
         ('t', 'p', 'none', NULL, NULL, NULL, NULL)",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    im_ingest::store::migrate(&settings).await.unwrap();
    let rows: Vec<MarkerRow> = sqlx::query_as(
        "SELECT CAST(external_user_id AS CHAR), nickname_at, CAST(nickname_message_id AS CHAR), \
             avatar_at, CAST(avatar_message_id AS CHAR) FROM customer ORDER BY external_user_id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        rows,
        [
            ("both".into(), Some(5), some("m5"), Some(5), some("m5")),
            ("nickname-only".into(), Some(6), some("m6"), None, None),
            ("none".into(), None, None, None, None),
        ]
    );
    conn.close().await.unwrap();
    db.drop_now().await;
}
