//! Databases filled without the unique keys (issue 16): the worker and `migrate` refuse
//! them, naming `im-ingest adopt`; `adopt --dry-run` changes nothing; `adopt --apply`
//! killed and run again ends as one run would; and beside a naive writer still inserting
//! it ends with every record stored once, no dangling reference, the keys, and `run`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use im_ingest::bench::contender::naive;
use im_ingest::message::{decode, ChatMessage, Inbound};
use im_ingest::pipeline::Record;
use rand::seq::SliceRandom;

use crate::helpers::{im_ingest, stderr_of, unique, TestDatabase, WorkerEnv, WorkerProcess};
use crate::kafka_util::{produce, producer, read_all};
use crate::unread::message;
use crate::verify::verify;
use crate::worker::{create_topics, wait_until_all_committed};

/// A database with the worker's tables minus their unique keys, as a team's naive
/// writer had them.
async fn database_without_unique_keys() -> TestDatabase {
    let db = TestDatabase::created().await;
    let pool = pool_of(&db).await;
    im_ingest::bench::contender::naive::create_schema(&pool)
        .await
        .unwrap();
    pool.close().await;
    db
}

#[tokio::test(flavor = "multi_thread")]
async fn run_and_migrate_refuse_tables_without_their_unique_keys_naming_adopt() {
    let db = database_without_unique_keys().await;
    let output = im_ingest(&["migrate"], &[("IM_INGEST__DATABASE__URL", &db.url())]);
    let error = stderr_of(&output);
    assert!(!output.status.success(), "{error}");
    for expected in [
        "`customer` has no unique key on (tenant_id, platform, external_user_id)",
        "`session` has no unique key",
        "`message` has no unique key",
        "im-ingest adopt --dry-run",
    ] {
        assert!(error.contains(expected), "{expected:?} not in {error}");
    }
    let env = WorkerEnv {
        database: db.name.clone(),
        ..WorkerEnv::new(1)
    };
    for migrate_on_start in ["true", "false"] {
        let env = env
            .clone()
            .with("DATABASE__MIGRATE_ON_START", migrate_on_start);
        let mut worker = WorkerProcess::start(&env);
        let status = worker.wait_for_exit(Duration::from_secs(60));
        let log = worker.log_text();
        assert!(
            !status.success(),
            "migrate_on_start={migrate_on_start}: {log}"
        );
        let last = log.lines().last().unwrap_or_default();
        assert!(last.contains("im-ingest adopt"), "{last}");
    }
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_case_insensitive_id_column_is_refused_like_a_missing_key() {
    let (db, pool) = TestDatabase::migrated().await;
    sqlx::query(
        "ALTER TABLE message MODIFY external_message_id VARCHAR(64) \
         CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci NOT NULL",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let output = im_ingest(&["migrate"], &[("IM_INGEST__DATABASE__URL", &db.url())]);
    let error = stderr_of(&output);
    assert!(!output.status.success(), "{error}");
    assert!(
        error.contains("`message`.`external_message_id` is utf8mb4_unicode_ci, not utf8mb4_bin")
            && error.contains("im-ingest adopt"),
        "{error}"
    );
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unique_index_on_a_prefix_of_an_id_is_refused_by_migrate_and_left_to_the_team_by_adopt() {
    let (db, pool) = TestDatabase::migrated().await;
    // Two users whose ids share 8 characters would be one customer to the upsert.
    sqlx::query("ALTER TABLE customer ADD UNIQUE KEY ux_customer_user (external_user_id(8))")
        .execute(&pool)
        .await
        .unwrap();
    let db_url = db.url();
    let url = [("IM_INGEST__DATABASE__URL", db_url.as_str())];
    let migrate = im_ingest(&["migrate"], &url);
    let error = stderr_of(&migrate);
    assert!(!migrate.status.success(), "{error}");
    assert!(
        error.contains(
            "`customer` has the unique index `ux_customer_user` on (external_user_id(8))"
        ) && error.contains("ALTER TABLE customer DROP INDEX `ux_customer_user`")
            && error.contains("then start again")
            && !error.contains("adopt --apply"),
        "{error}"
    );
    let dry_run = im_ingest(&["adopt", "--dry-run"], &url);
    let report = String::from_utf8_lossy(&dry_run.stdout).into_owned();
    assert!(dry_run.status.success(), "{}", stderr_of(&dry_run));
    assert!(
        report.contains(
            "to fix by hand before --apply: `customer` has the unique index `ux_customer_user`"
        ),
        "{report}"
    );
    let apply = im_ingest(&["adopt", "--apply"], &url);
    let error = stderr_of(&apply);
    assert!(!apply.status.success(), "{error}");
    assert!(error.contains("adopt leaves these to you"), "{error}");
    sqlx::query("ALTER TABLE customer DROP INDEX ux_customer_user")
        .execute(&pool)
        .await
        .unwrap();
    let migrate = im_ingest(&["migrate"], &url);
    assert!(migrate.status.success(), "{}", stderr_of(&migrate));
    pool.close().await;
    db.drop_now().await;
}

/// `im-ingest adopt ARGS` on `db`, which must succeed; its report (stdout).
fn adopt_ok(db: &TestDatabase, args: &[&str]) -> String {
    let args: Vec<&str> = ["adopt"].iter().chain(args).copied().collect();
    let output = im_ingest(&args, &[("IM_INGEST__DATABASE__URL", &db.url())]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Counts of rows that reference a missing customer or session, and of messages whose
/// session belongs to another customer: each must be 0.
const DANGLING: [&str; 4] = [
        "SELECT COUNT(*) FROM session s LEFT JOIN customer c ON c.id = s.customer_id WHERE c.id IS NULL",
        "SELECT COUNT(*) FROM message m LEFT JOIN customer c ON c.id = m.customer_id WHERE c.id IS NULL",
        "SELECT COUNT(*) FROM message m LEFT JOIN session s ON s.id = m.session_id WHERE s.id IS NULL",
        "SELECT COUNT(*) FROM message m JOIN session s ON s.id = m.session_id WHERE s.customer_id <> m.customer_id",
];

/// A pool on `db`.
async fn pool_of(db: &TestDatabase) -> sqlx::MySqlPool {
    im_ingest::store::connect(&db.settings()).await.unwrap()
}

/// `customers` users, each stored three times with a session each (nicknames `nick0`
/// … `nick2`, newest last), their 4 messages spread over the copies, and the first
/// message stored twice.
async fn seed_duplicates(pool: &sqlx::MySqlPool, customers: usize) {
    for c in 0..customers {
        let user = format!("u{c}");
        let mut copies = Vec::new();
        for copy in 0..3i64 {
            let customer = sqlx::query(
                "INSERT INTO customer (tenant_id, platform, external_user_id, nickname, \
                 nickname_at, nickname_message_id) VALUES ('t', '2', ?, ?, ?, ?)",
            )
            .bind(&user)
            .bind(format!("nick{copy}"))
            .bind(copy)
            .bind(format!("m{copy}"))
            .execute(pool)
            .await
            .unwrap()
            .last_insert_id() as i64;
            let session = sqlx::query(
                "INSERT INTO session (tenant_id, platform, customer_id, agent_id, last_message_at) \
                 VALUES ('t', '2', ?, 'agent-7', 0)",
            )
            .bind(customer)
            .execute(pool)
            .await
            .unwrap()
            .last_insert_id() as i64;
            copies.push((customer, session));
        }
        for m in 0..5usize {
            let (customer, session) = copies[(m % 4) % 3];
            let id = format!("{user}-{}", m % 4);
            sqlx::query(
                "INSERT INTO message (tenant_id, platform, external_message_id, session_id, \
                 customer_id, message_type, content, sent_at, source_topic, source_partition, \
                 source_offset) VALUES ('t', '2', ?, ?, ?, 'TEXT', 'hi', ?, 'seed', 0, ?)",
            )
            .bind(&id)
            .bind(session)
            .bind(customer)
            .bind(1_000 + (m % 4) as i64)
            .bind((c * 10 + m) as i64)
            .execute(pool)
            .await
            .unwrap();
        }
    }
}

/// The tables' contents that adopt decides, in id order: rows, profiles, watermarks,
/// the loser → survivor map and each table's definition.
async fn end_state(pool: &sqlx::MySqlPool) -> Vec<String> {
    let mut rows: Vec<String> = Vec::new();
    let customers: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        "SELECT id, CAST(external_user_id AS CHAR), nickname FROM customer ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.extend(customers.iter().map(|r| format!("customer {r:?}")));
    let sessions: Vec<(i64, i64, Option<i64>, u32)> = sqlx::query_as(
        "SELECT id, customer_id, last_message_at, unread_count FROM session ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.extend(sessions.iter().map(|r| format!("session {r:?}")));
    let messages: Vec<(i64, String, i64, i64)> = sqlx::query_as(
        "SELECT id, CAST(external_message_id AS CHAR), session_id, customer_id FROM message \
         ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.extend(messages.iter().map(|r| format!("message {r:?}")));
    /// id, nickname_at, nickname_message_id, avatar
    type Profile = (i64, Option<i64>, Option<String>, Option<String>);
    let profiles: Vec<Profile> = sqlx::query_as(
        "SELECT id, nickname_at, CAST(nickname_message_id AS CHAR), avatar FROM customer \
         ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.extend(profiles.iter().map(|r| format!("profile {r:?}")));
    let watermarks: Vec<(i64, Option<i64>, Option<i64>)> =
        sqlx::query_as("SELECT id, read_up_to, expired_up_to FROM session ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.extend(watermarks.iter().map(|r| format!("watermarks {r:?}")));
    let map: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT CAST(table_name AS CHAR), loser_id, survivor_id FROM adopt_merged \
         ORDER BY table_name, loser_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.extend(map.iter().map(|r| format!("map {r:?}")));
    // The keys, indexes and collations adopt leaves (less the next auto-increment id).
    for table in ["customer", "session", "message"] {
        let (_, definition): (String, String) =
            sqlx::query_as(&format!("SHOW CREATE TABLE {table}"))
                .fetch_one(pool)
                .await
                .unwrap();
        let definition: Vec<&str> = definition
            .split(' ')
            .filter(|word| !word.starts_with("AUTO_INCREMENT="))
            .collect();
        rows.push(definition.join(" "));
    }
    rows
}

/// The one number `sql` selects (a count, an id).
async fn scalar(pool: &sqlx::MySqlPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_reports_the_duplicates_by_table_and_changes_nothing() {
    let db = database_without_unique_keys().await;
    let pool = pool_of(&db).await;
    seed_duplicates(&pool, 20).await;
    let before = tables_and_contents(&pool).await;
    let report = adopt_ok(&db, &["--dry-run"]);
    for expected in [
        "customer: 20 keys held by more than one row, 40 rows to remove",
        "message: 20 keys held by more than one row, 20 rows to remove",
        "unique keys to add: customer, session, message",
        "dry run: nothing changed",
    ] {
        assert!(report.contains(expected), "{expected:?} not in {report}");
    }
    assert_eq!(before, tables_and_contents(&pool).await);
    pool.close().await;
    db.drop_now().await;
}

/// Every table of the database with its definition (`SHOW CREATE TABLE`) and its
/// contents (`CHECKSUM TABLE … EXTENDED`), by name: a table added, dropped, altered or
/// written shows.
async fn tables_and_contents(pool: &sqlx::MySqlPool) -> Vec<(String, String, Option<i64>)> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut tables = Vec::new();
    for name in names {
        let (_, definition): (String, String) =
            sqlx::query_as(&format!("SHOW CREATE TABLE `{name}`"))
                .fetch_one(pool)
                .await
                .unwrap();
        let (_, checksum): (String, Option<i64>) =
            sqlx::query_as(&format!("CHECKSUM TABLE `{name}` EXTENDED"))
                .fetch_one(pool)
                .await
                .unwrap();
        tables.push((name, definition, checksum));
    }
    tables
}

#[tokio::test(flavor = "multi_thread")]
async fn adopt_killed_mid_apply_and_run_again_ends_as_one_uninterrupted_run() {
    let (killed, whole) = (
        database_without_unique_keys().await,
        database_without_unique_keys().await,
    );
    let (killed_pool, whole_pool) = (pool_of(&killed).await, pool_of(&whole).await);
    for pool in [&killed_pool, &whole_pool] {
        // An id column that compares case-insensitively, and two users only case tells
        // apart: adopt converts the column first, so they stay two.
        sqlx::query(
            "ALTER TABLE customer MODIFY external_user_id VARCHAR(64) \
             CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci NOT NULL",
        )
        .execute(pool)
        .await
        .unwrap();
        // A lookup index the worker names in its queries, missing.
        sqlx::query("ALTER TABLE session DROP INDEX ix_session_agent")
            .execute(pool)
            .await
            .unwrap();
        // A team's database has none of the worker's own tables.
        sqlx::query("DROP TABLE unread_reconcile")
            .execute(pool)
            .await
            .unwrap();
        seed_duplicates(pool, 60).await;
        sqlx::query(
            "INSERT INTO customer (tenant_id, platform, external_user_id) \
             VALUES ('t', '2', 'Case'), ('t', '2', 'case')",
        )
        .execute(pool)
        .await
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut slow = crate::helpers::bare_command(dir.path())
        .args(["adopt", "--apply", "--batch", "1", "--pause-ms", "40"])
        .env("IM_INGEST__DATABASE__URL", killed.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let merged = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM adopt_merged")
            .fetch_one(&killed_pool)
            .await
            .unwrap_or(0);
        if merged >= 20 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "adopt merged nothing");
        if slow.try_wait().unwrap().is_some() {
            let mut error = String::new();
            std::io::Read::read_to_string(&mut slow.stderr.take().unwrap(), &mut error).unwrap();
            panic!("adopt ended before the kill: {error}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    slow.kill().unwrap();
    slow.wait().unwrap();
    let customers_left = scalar(&killed_pool, "SELECT COUNT(*) FROM customer").await;
    assert!(
        customers_left > 62,
        "the kill came after the customers were merged"
    );
    let output = im_ingest(&["migrate"], &[("IM_INGEST__DATABASE__URL", &killed.url())]);
    assert!(
        !output.status.success() && stderr_of(&output).contains("adopt --apply` has not finished"),
        "migrate after a killed adopt: {}",
        stderr_of(&output)
    );
    for db in [&killed, &whole] {
        adopt_ok(db, &["--apply"]);
    }
    let (killed_state, whole_state) = (end_state(&killed_pool).await, end_state(&whole_pool).await);
    assert_eq!(killed_state, whole_state);
    // The end state itself: one row per natural key, newest nickname, counts recounted.
    assert_eq!(
        scalar(&whole_pool, "SELECT COUNT(*) FROM customer").await,
        62
    );
    assert_eq!(
        scalar(&whole_pool, "SELECT COUNT(*) FROM session").await,
        60
    );
    assert_eq!(
        scalar(&whole_pool, "SELECT COUNT(*) FROM message").await,
        240
    );
    let nicknames = scalar(
        &whole_pool,
        "SELECT COUNT(*) FROM customer WHERE nickname = 'nick2'",
    )
    .await;
    assert_eq!(nicknames, 60);
    let counted = scalar(
        &whole_pool,
        "SELECT COUNT(*) FROM session WHERE unread_count = 4 AND last_message_at = 1003",
    )
    .await;
    assert_eq!(counted, 60);
    for db in [&killed, &whole] {
        let output = im_ingest(&["migrate"], &[("IM_INGEST__DATABASE__URL", &db.url())]);
        assert!(
            output.status.success(),
            "migrate after adopt: {}",
            stderr_of(&output)
        );
    }
    killed_pool.close().await;
    whole_pool.close().await;
    killed.drop_now().await;
    whole.drop_now().await;
}

/// Writes every record with the naive check-then-insert writer, `writers` at once, in
/// the same order (they race on each record) or each in its own, `pace` after each
/// record, and again until `stop` is set (when given); a write that fails (a deadlock, a
/// loser deleted under it, a key added meanwhile) is tried again, as redelivery would.
async fn naive_writers(
    pool: sqlx::MySqlPool,
    records: Vec<(Record, ChatMessage)>,
    writers: usize,
    shuffled: bool,
    pace: Duration,
    stop: Option<Arc<AtomicBool>>,
) -> u64 {
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let pool = pool.clone();
        let mut mine = records.clone();
        if shuffled {
            mine.shuffle(&mut rand::rng());
        }
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut retried = 0;
            loop {
                for (record, message) in &mine {
                    let mut attempt = 0;
                    while let Err(error) = naive::write_one(&pool, message, record).await {
                        attempt += 1;
                        retried += 1;
                        assert!(attempt < 50, "a naive write kept failing: {error:#}");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    tokio::time::sleep(pace).await;
                }
                if stop.as_ref().is_none_or(|stop| stop.load(Ordering::SeqCst)) {
                    return retried;
                }
            }
        }));
    }
    let mut retried = 0;
    for task in tasks {
        retried += task.await.unwrap();
    }
    retried
}

/// The newest message id when adopt's mark (`adopt_in_progress`) was first seen, and
/// the greatest seen while it stood, sampled until `stop`: the second above the first
/// means a writer inserted while adopt ran.
async fn newest_message_ids_while_adopting(
    pool: sqlx::MySqlPool,
    stop: Arc<AtomicBool>,
) -> Option<(i64, i64)> {
    let mut seen: Option<(i64, i64)> = None;
    while !stop.load(Ordering::SeqCst) {
        let (marked, newest): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM information_schema.TABLES WHERE \
             TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'adopt_in_progress'), \
             (SELECT COALESCE(MAX(id), 0) FROM message)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if marked == 1 {
            // The greatest seen: merging deletes losers, newest ones among them.
            seen = Some(seen.map_or((newest, newest), |(first, last)| (first, last.max(newest))));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn adopt_beside_a_naive_writer_still_inserting_ends_verified_with_nothing_lost_or_dangling() {
    const CUSTOMERS: i64 = 200;
    let db = database_without_unique_keys().await;
    let env = WorkerEnv {
        database: db.name.clone(),
        ..WorkerEnv::new(3)
    };
    create_topics(&env).await;
    let producer = producer();
    let tenant = unique("adopt");
    for c in 0..CUSTOMERS {
        for m in 0..12 {
            let id = format!("{tenant}-{c}-{m}");
            let value = message(&tenant, &format!("c{c}"), &id, 1_700_000_000_000 + m);
            produce(&producer, &env.inbound, None, value.as_bytes()).await;
        }
    }
    let records: Vec<(Record, ChatMessage)> = read_all(&env.inbound)
        .iter()
        .map(|consumed| {
            let record = Record::from_message(consumed);
            let Ok(Inbound::Message(chat)) = decode(record.value.as_deref(), 1 << 20) else {
                panic!("not a chat message");
            };
            (record, chat)
        })
        .collect();
    assert_eq!(records.len() as i64, CUSTOMERS * 12);
    let pool = pool_of(&db).await;
    // Seed: eight writers at once over the first half, racing check against insert.
    let (first, second) = records.split_at(records.len() / 2);
    naive_writers(pool.clone(), first.to_vec(), 8, false, Duration::ZERO, None).await;
    let extra = scalar(
        &pool,
        "SELECT (SELECT COUNT(*) FROM customer) - (SELECT COUNT(DISTINCT external_user_id) FROM customer) \
         + (SELECT COUNT(*) FROM message) - (SELECT COUNT(DISTINCT external_message_id) FROM message)",
    )
    .await;
    assert!(extra >= 1_000, "only {extra} duplicate rows seeded");
    // Adopt while four writers go through the second half and the first again: the
    // users being merged (each user's records are in both halves), paced so that their
    // inserts last beyond adopt's start.
    let again = [second, first].concat();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(naive_writers(
        pool.clone(),
        again,
        4,
        true,
        Duration::from_millis(5),
        Some(stop.clone()),
    ));
    let watch = tokio::spawn(newest_message_ids_while_adopting(
        pool.clone(),
        stop.clone(),
    ));
    let url = db.url();
    let adopt = tokio::task::spawn_blocking(move || {
        im_ingest(
            &["adopt", "--apply", "--batch", "5", "--pause-ms", "5"],
            &[("IM_INGEST__DATABASE__URL", &url)],
        )
    });
    let output = adopt.await.unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(
        !writer.is_finished(),
        "the writer stopped before adopt ended"
    );
    stop.store(true, Ordering::SeqCst);
    let retried = writer.await.unwrap();
    let (first_seen, last_seen) = watch.await.unwrap().expect("adopt's mark was never seen");
    assert!(
        last_seen > first_seen,
        "no message was inserted while adopt ran (newest id {first_seen} throughout; \
         {retried} writes retried)"
    );
    // The hand-over: with the writer stopped, adopt once more recounts what it wrote.
    adopt_ok(&db, &["--apply"]);
    for dangling in DANGLING {
        assert_eq!(scalar(&pool, dangling).await, 0, "{dangling}");
    }
    assert_eq!(
        scalar(&pool, "SELECT COUNT(*) FROM message").await,
        CUSTOMERS * 12
    );
    assert_eq!(
        scalar(&pool, "SELECT COUNT(*) FROM customer").await,
        CUSTOMERS
    );
    im_ingest::store::require_natural_keys(&pool).await.unwrap();
    // `run` takes over: it starts, reads every record again and adds nothing.
    let worker = WorkerProcess::start(&env);
    wait_until_all_committed(&env, &worker).await;
    let (exit, log) = worker.stop_with_log();
    assert!(exit.is_some_and(|status| status.success()), "{log}");
    assert_eq!(
        scalar(&pool, "SELECT COUNT(*) FROM message").await,
        CUSTOMERS * 12
    );
    let (passed, report) = verify(&env);
    assert!(passed, "{report}");
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_foreign_keys_rows_written_with_merged_ids_move_to_the_survivors() {
    let db = database_without_unique_keys().await;
    let pool = pool_of(&db).await;
    for statement in [
        "ALTER TABLE message DROP FOREIGN KEY fk_message_session, DROP FOREIGN KEY fk_message_customer",
        "ALTER TABLE session DROP FOREIGN KEY fk_session_customer",
        // Ids below 100 stay free for a late row with a lower id than its survivor.
        "ALTER TABLE session AUTO_INCREMENT = 100",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    seed_duplicates(&pool, 4).await;
    adopt_ok(&db, &["--apply"]);
    // A naive writer that read ids before the merge writes with them afterwards.
    let loser_customer = |user: &str| {
        format!(
            "SELECT MIN(m.loser_id) FROM adopt_merged m JOIN customer c ON c.id = m.survivor_id \
             WHERE m.table_name = 'customer' AND c.external_user_id = '{user}'"
        )
    };
    let u0_customer = scalar(
        &pool,
        "SELECT id FROM customer WHERE external_user_id = 'u0'",
    )
    .await;
    let u0_session = scalar(
        &pool,
        &format!("SELECT id FROM session WHERE customer_id = {u0_customer}"),
    )
    .await;
    let u0_loser_customer = scalar(&pool, &loser_customer("u0")).await;
    let u0_loser_session = scalar(
        &pool,
        &format!(
            "SELECT MIN(loser_id) FROM adopt_merged WHERE table_name = 'session' \
             AND survivor_id = {u0_session}"
        ),
    )
    .await;
    let u1_loser_customer = scalar(&pool, &loser_customer("u1")).await;
    let u0_session_version = scalar(
        &pool,
        &format!("SELECT CAST(unread_version AS SIGNED) FROM session WHERE id = {u0_session}"),
    )
    .await;
    // u0: a session with a lower id than u0's, under a merged customer id (its key
    // becomes u0's session's once moved), and a message on a merged session.
    sqlx::query(
        "INSERT INTO session (id, tenant_id, platform, customer_id, agent_id, last_message_at) \
         VALUES (1, 't', '2', ?, 'agent-7', 0)",
    )
    .bind(u0_loser_customer)
    .execute(&pool)
    .await
    .unwrap();
    let late_message =
        "INSERT INTO message (tenant_id, platform, external_message_id, session_id, \
         customer_id, message_type, content, sent_at, source_topic, source_partition, \
         source_offset) VALUES ('t', '2', ?, ?, ?, 'TEXT', 'late', 2000, 'seed', 0, 0)";
    sqlx::query(late_message)
        .bind("u0-late")
        .bind(u0_loser_session)
        .bind(u0_loser_customer)
        .execute(&pool)
        .await
        .unwrap();
    // u1: a session with another agent under a merged customer id, and its message.
    let u1_new_session = sqlx::query(
        "INSERT INTO session (tenant_id, platform, customer_id, agent_id, last_message_at) \
         VALUES ('t', '2', ?, 'agent-9', 0)",
    )
    .bind(u1_loser_customer)
    .execute(&pool)
    .await
    .unwrap()
    .last_insert_id() as i64;
    sqlx::query(late_message)
        .bind("u1-late")
        .bind(u1_new_session)
        .bind(u1_loser_customer)
        .execute(&pool)
        .await
        .unwrap();

    // One row per batch: every finding query goes round more than once.
    adopt_ok(&db, &["--apply", "--batch", "1", "--pause-ms", "0"]);

    for dangling in DANGLING.into_iter().chain([
        // Every loser maps to a row that exists: a survivor merged later is followed.
        "SELECT COUNT(*) FROM adopt_merged m LEFT JOIN session s ON s.id = m.survivor_id \
         WHERE m.table_name = 'session' AND s.id IS NULL",
        "SELECT COUNT(*) FROM adopt_merged m LEFT JOIN customer c ON c.id = m.survivor_id \
         WHERE m.table_name = 'customer' AND c.id IS NULL",
    ]) {
        assert_eq!(scalar(&pool, dangling).await, 0, "{dangling}");
    }
    let u0_sessions: Vec<(i64, i64, u32, Option<i64>)> = sqlx::query_as(
        "SELECT id, customer_id, unread_count, last_message_at FROM session \
         WHERE customer_id = ? ORDER BY id",
    )
    .bind(u0_customer)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(u0_sessions, vec![(1, u0_customer, 5, Some(2000))]);
    let version = scalar(
        &pool,
        "SELECT CAST(unread_version AS SIGNED) FROM session WHERE id = 1",
    )
    .await;
    assert!(
        version > u0_session_version,
        "the merged session's unread_version {version} is not above {u0_session_version}"
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT COUNT(*) FROM message WHERE session_id = 1 AND external_message_id LIKE 'u0-%'"
        )
        .await,
        5
    );
    let u1_agents: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(s.agent_id AS CHAR) FROM session s JOIN customer c ON c.id = s.customer_id \
         WHERE c.external_user_id = 'u1' ORDER BY s.agent_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(u1_agents, ["agent-7", "agent-9"]);
    // Both agents' Redis copies are left for the workers to rebuild.
    let noted: Vec<String> =
        sqlx::query_scalar("SELECT CAST(agent_id AS CHAR) FROM unread_reconcile ORDER BY agent_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(noted, ["agent-7", "agent-9"]);
    assert_eq!(scalar(&pool, "SELECT COUNT(*) FROM customer").await, 4);
    assert_eq!(scalar(&pool, "SELECT COUNT(*) FROM message").await, 18);
    im_ingest::store::require_natural_keys(&pool).await.unwrap();
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_expiry_on_adopt_counts_only_the_messages_after_the_last_silence() {
    const DAY: i64 = 86_400_000;
    let db = database_without_unique_keys().await;
    let pool = pool_of(&db).await;
    let customer = sqlx::query(
        "INSERT INTO customer (tenant_id, platform, external_user_id) VALUES ('t', '2', 'u')",
    )
    .execute(&pool)
    .await
    .unwrap()
    .last_insert_id();
    let session = sqlx::query(
        "INSERT INTO session (tenant_id, platform, customer_id, agent_id) \
         VALUES ('t', '2', ?, 'agent-7')",
    )
    .bind(customer)
    .execute(&pool)
    .await
    .unwrap()
    .last_insert_id();
    // Nine silent days between the second and the third message.
    let sent = [DAY, 2 * DAY, 11 * DAY, 11 * DAY + 1];
    for (index, sent_at) in sent.iter().enumerate() {
        sqlx::query(
            "INSERT INTO message (tenant_id, platform, external_message_id, session_id, \
             customer_id, content, sent_at, source_topic, source_partition, source_offset) \
             VALUES ('t', '2', ?, ?, ?, 'hi', ?, 'seed', 0, ?)",
        )
        .bind(format!("m{index}"))
        .bind(session)
        .bind(customer)
        .bind(sent_at)
        .bind(index as i64)
        .execute(&pool)
        .await
        .unwrap();
    }
    let state = || {
        sqlx::query_as::<_, (Option<i64>, u32)>(
            "SELECT expired_up_to, unread_count FROM session WHERE id = ?",
        )
        .bind(session)
        .fetch_one(&pool)
    };
    adopt_ok(&db, &["--apply"]);
    assert_eq!(
        state().await.unwrap(),
        (None, 4),
        "expiry off: every message"
    );
    let output = im_ingest(
        &["adopt", "--apply"],
        &[
            ("IM_INGEST__DATABASE__URL", &db.url()),
            ("IM_INGEST__UNREAD__EXPIRE_AFTER_DAYS", "7"),
        ],
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(
        state().await.unwrap(),
        (Some(11 * DAY - 1), 2),
        "expiry on: the two after the silence"
    );
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_with_a_null_in_a_nullable_key_column_are_reported_and_left_while_the_rest_is_adopted()
{
    let db = database_without_unique_keys().await;
    let pool = pool_of(&db).await;
    for (table, column) in [("customer", "external_user_id"), ("session", "agent_id")] {
        sqlx::query(&format!(
            "ALTER TABLE {table} MODIFY {column} VARCHAR(64) \
             CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL"
        ))
        .execute(&pool)
        .await
        .unwrap();
    }
    seed_duplicates(&pool, 3).await;
    // A session without an agent, holding one message.
    let customer = scalar(&pool, "SELECT MIN(id) FROM customer").await;
    let session = sqlx::query(
        "INSERT INTO session (tenant_id, platform, customer_id, agent_id) \
         VALUES ('t', '2', ?, NULL)",
    )
    .bind(customer)
    .execute(&pool)
    .await
    .unwrap()
    .last_insert_id();
    sqlx::query(
        "INSERT INTO message (tenant_id, platform, external_message_id, session_id, \
         customer_id, content, sent_at, source_topic, source_partition, source_offset) \
         VALUES ('t', '2', 'no-agent', ?, ?, 'hi', 1, 'seed', 0, 0)",
    )
    .bind(session)
    .bind(customer)
    .execute(&pool)
    .await
    .unwrap();
    for _ in 0..2 {
        sqlx::query(
            "INSERT INTO customer (tenant_id, platform, external_user_id) VALUES ('t', '2', NULL)",
        )
        .execute(&pool)
        .await
        .unwrap();
    }
    let report = adopt_ok(&db, &["--dry-run"]);
    for expected in [
        "customer: 3 keys held by more than one row, 6 rows to remove",
        "customer: 2 rows with a NULL in the key, left as they are",
        "session: 1 rows with a NULL in the key, left as they are",
    ] {
        assert!(report.contains(expected), "{expected:?} not in {report}");
    }
    adopt_ok(&db, &["--apply"]);
    assert_eq!(
        scalar(
            &pool,
            "SELECT COUNT(*) FROM customer WHERE external_user_id IS NULL"
        )
        .await,
        2
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT COUNT(*) FROM customer WHERE external_user_id IS NOT NULL"
        )
        .await,
        3
    );
    assert_eq!(scalar(&pool, "SELECT COUNT(*) FROM message").await, 13);
    let unread = scalar(
        &pool,
        &format!("SELECT CAST(unread_count AS SIGNED) FROM session WHERE id = {session}"),
    )
    .await;
    assert_eq!(unread, 1, "the session without an agent was not recounted");
    im_ingest::store::require_natural_keys(&pool).await.unwrap();
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn message_ids_differing_only_by_trailing_spaces_merge_as_the_unique_key_compares_them() {
    let db = database_without_unique_keys().await;
    let pool = pool_of(&db).await;
    seed_duplicates(&pool, 1).await;
    let session = scalar(&pool, "SELECT MIN(id) FROM session").await;
    let customer = scalar(
        &pool,
        "SELECT customer_id FROM session WHERE id = (SELECT MIN(id) FROM session)",
    )
    .await;
    // A naive writer stored what the worker refuses; `utf8mb4_bin` pads, so these three
    // are one key to the unique index.
    for id in ["pad ", "pad", "pad"] {
        sqlx::query(
            "INSERT INTO message (tenant_id, platform, external_message_id, session_id, \
             customer_id, content, sent_at, source_topic, source_partition, source_offset) \
             VALUES ('t', '2', ?, ?, ?, 'hi', 1, 'seed', 0, 0)",
        )
        .bind(id)
        .bind(session)
        .bind(customer)
        .execute(&pool)
        .await
        .unwrap();
    }
    let report = adopt_ok(&db, &["--apply", "--max-rounds", "2"]);
    assert!(report.contains("1 round(s)"), "{report}");
    let kept: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(external_message_id AS CHAR) FROM message WHERE external_message_id = 'pad'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(kept, ["pad "], "the lowest id survives, as it was spelled");
    pool.close().await;
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_held_by_more_rows_than_one_statement_can_bind_merges_in_one_run() {
    // 25,000 rows of one key: three placeholders per loser would pass the 65,535 a
    // statement takes.
    let db = database_without_unique_keys().await;
    let pool = pool_of(&db).await;
    let copies: i64 = 25_000;
    for statement in [
        format!(
            "INSERT INTO customer (tenant_id, platform, external_user_id, nickname, nickname_at, \
             nickname_message_id) SELECT 't', '2', 'big', CONCAT('nick', seq), seq, \
             CONCAT('m', seq) FROM seq_1_to_{copies}"
        ),
        "INSERT INTO session (tenant_id, platform, customer_id, agent_id, last_message_at) \
         SELECT 't', '2', id, 'agent-7', id FROM customer"
            .to_string(),
        // One message stored once per session, and one of each session's own.
        "INSERT INTO message (tenant_id, platform, external_message_id, session_id, \
         customer_id, content, sent_at, source_topic, source_partition, source_offset) \
         SELECT 't', '2', 'big-1', id, customer_id, 'hi', 1, 'seed', 0, id FROM session"
            .to_string(),
        "INSERT INTO message (tenant_id, platform, external_message_id, session_id, \
         customer_id, content, sent_at, source_topic, source_partition, source_offset) \
         SELECT 't', '2', CONCAT('own-', id), id, customer_id, 'hi', 2, 'seed', 0, id \
         FROM session"
            .to_string(),
    ] {
        sqlx::query(&statement).execute(&pool).await.unwrap();
    }
    let report = adopt_ok(&db, &["--apply", "--pause-ms", "0"]);
    assert!(report.contains("1 round(s)"), "{report}");
    for (sql, expected) in [
        ("SELECT COUNT(*) FROM customer", 1),
        ("SELECT COUNT(*) FROM session", 1),
        (
            "SELECT COUNT(*) FROM message WHERE external_message_id = 'big-1'",
            1,
        ),
        ("SELECT COUNT(*) FROM message", 1 + copies),
        (
            "SELECT COUNT(*) FROM adopt_merged WHERE table_name = 'customer'",
            copies - 1,
        ),
        (
            "SELECT COUNT(*) FROM adopt_merged WHERE table_name = 'session'",
            copies - 1,
        ),
        (
            "SELECT COUNT(*) FROM adopt_merged WHERE table_name = 'message'",
            copies - 1,
        ),
        (
            "SELECT CAST(unread_count AS SIGNED) FROM session",
            1 + copies,
        ),
        (
            "SELECT COUNT(*) FROM customer WHERE nickname = 'nick25000'",
            1,
        ),
    ] {
        assert_eq!(scalar(&pool, sql).await, expected, "{sql}");
    }
    for dangling in DANGLING {
        assert_eq!(scalar(&pool, dangling).await, 0, "{dangling}");
    }
    pool.close().await;
    db.drop_now().await;
}
