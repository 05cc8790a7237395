//! Databases filled without the unique keys (issue 16): the worker and `migrate` refuse
//! them, naming `im-ingest adopt`.

use std::time::Duration;

use crate::helpers::{im_ingest, stderr_of, TestDatabase, WorkerEnv, WorkerProcess};

/// A database with the worker's tables minus their unique keys, as a team's naive
/// writer had them.
async fn database_without_unique_keys() -> TestDatabase {
    let db = TestDatabase::reserve();
    let settings = im_ingest::config::DatabaseSettings {
        url: im_ingest::secret::SecretUrl::new(db.url()),
        ..Default::default()
    };
    im_ingest::store::create_database_if_missing(&settings)
        .await
        .unwrap();
    let pool = im_ingest::store::connect(&settings).await.unwrap();
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
