//! Shared test plumbing: where the services are, unique names, a private database per
//! test, and running the real `im-ingest` binary.

use std::process::{Command, Output};
use std::str::FromStr;

use sqlx::mysql::MySqlConnectOptions;
use sqlx::{ConnectOptions, Connection, MySqlConnection};

/// Kafka brokers of the test stack (`IM_TEST_KAFKA_BROKERS`, default the local stack).
pub fn brokers() -> String {
    std::env::var("IM_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A MySQL/MariaDB server URL without a database (`IM_TEST_MYSQL_URL`).
pub fn mysql_server_url() -> String {
    std::env::var("IM_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// `prefix` plus a random suffix: a name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// A database name reserved for one test; it is dropped by [`TestDatabase::drop_now`].
pub struct TestDatabase {
    pub name: String,
}

impl TestDatabase {
    /// A fresh, not yet existing database name (the code under test creates it).
    pub fn reserve() -> Self {
        Self {
            name: unique("im_test"),
        }
    }

    pub fn url(&self) -> String {
        format!("{}/{}", mysql_server_url(), self.name)
    }

    pub async fn connect(&self) -> MySqlConnection {
        MySqlConnectOptions::from_str(&self.url())
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url()))
    }

    /// Drops the database; called at the end of a passing test (a failing one leaves
    /// its database behind for inspection).
    pub async fn drop_now(self) {
        let mut conn = MySqlConnectOptions::from_str(&mysql_server_url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        sqlx::query(&format!("DROP DATABASE IF EXISTS `{}`", self.name))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
}

/// Runs the built `im-ingest` binary with the given arguments and extra environment,
/// from a directory without `config/`, so only built-in defaults and `envs` apply.
pub fn im_ingest(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_im-ingest"));
    command.args(args).current_dir(dir.path());
    for (key, _) in std::env::vars() {
        if key.starts_with("IM_INGEST__") {
            command.env_remove(key);
        }
    }
    command.envs(envs.iter().copied());
    command.output().expect("running im-ingest")
}

pub fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Redis of the test stack (`IM_TEST_REDIS_URL`, default the local stack).
pub fn redis_url() -> String {
    std::env::var("IM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}
