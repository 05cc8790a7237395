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

    /// Database settings for it (otherwise the defaults).
    pub fn settings(&self) -> im_ingest::config::DatabaseSettings {
        im_ingest::config::DatabaseSettings {
            url: im_ingest::secret::SecretUrl::new(self.url()),
            ..Default::default()
        }
    }

    /// A new, empty database.
    pub async fn created() -> Self {
        let db = Self::reserve();
        im_ingest::store::create_database_if_missing(&db.settings())
            .await
            .unwrap();
        db
    }

    /// A new database with the worker's schema, and a pool on it.
    pub async fn migrated() -> (Self, sqlx::MySqlPool) {
        let db = Self::reserve();
        let settings = db.settings();
        im_ingest::store::migrate(&settings).await.unwrap();
        let pool = im_ingest::store::connect(&settings).await.unwrap();
        (db, pool)
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

/// The built `im-ingest` binary, to run in `dir` (a directory without `config/`) and
/// without this process's `IM_INGEST__…` variables: only built-in defaults and what the
/// caller sets apply.
pub fn bare_command(dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_im-ingest"));
    command.current_dir(dir);
    for (key, _) in std::env::vars() {
        if key.starts_with("IM_INGEST__") {
            command.env_remove(key);
        }
    }
    command
}

/// Runs the built `im-ingest` binary with the given arguments and extra environment
/// (see [`bare_command`]).
pub fn im_ingest(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut command = bare_command(dir.path());
    command.args(args);
    command.envs(envs.iter().copied());
    command.output().expect("running im-ingest")
}

/// Owned variables as the borrowed pairs [`im_ingest`] takes.
pub fn borrowed(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

pub fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Redis of the test stack (`IM_TEST_REDIS_URL`, default the local stack).
pub fn redis_url() -> String {
    std::env::var("IM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// An `im-ingest run` process with its own topics, group and database; killed on drop.
pub struct WorkerProcess {
    child: std::process::Child,
    pub log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl WorkerProcess {
    pub fn start(env: &WorkerEnv) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("worker.log");
        let mut command = bare_command(dir.path());
        command
            .arg("run")
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        command.envs(env.vars());
        let child = command.spawn().expect("starting im-ingest run");
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn wait_for_exit(&mut self, limit: std::time::Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the worker did not exit; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The admin server's address, as the worker logged it (waits for it).
    pub fn admin_address(&self) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let log = self.log_text();
            if let Some(line) = log.lines().find(|l| l.contains("admin server listening")) {
                let address = line.rsplit("address=").next().unwrap().trim();
                return address.to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no admin address in:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Sends `signal` (e.g. `-TERM`) to the process.
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, wait (bounded) for the exit, and return the exit status with the log
    /// (which is removed with the process's directory).
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    pub fn stop_with_log(mut self) -> (Option<std::process::ExitStatus>, String) {
        let status = self.terminate();
        (status, self.log_text())
    }

    /// SIGTERM, then wait (bounded) for the exit.
    pub fn stop(mut self) -> Option<std::process::ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Names and settings private to one test: topics, consumer group, database.
#[derive(Debug, Clone)]
pub struct WorkerEnv {
    pub inbound: String,
    pub retry_prefix: String,
    pub dlq: String,
    pub group: String,
    pub database: String,
    pub partitions: i32,
    /// More `IM_INGEST__…` settings for the worker process.
    pub extra: Vec<(String, String)>,
}

impl WorkerEnv {
    pub fn new(partitions: i32) -> Self {
        let id = unique("t");
        Self {
            inbound: format!("{id}.in"),
            retry_prefix: format!("{id}.retry"),
            dlq: format!("{id}.dlq"),
            group: format!("{id}.group"),
            database: format!("im_test_{}", &id[2..]),
            partitions,
            extra: Vec::new(),
        }
    }

    /// Adds a setting for the worker process, e.g. `("RETRY__MAX_ATTEMPTS", "3")`.
    pub fn with(self, key: &str, value: &str) -> Self {
        self.with_var(&format!("IM_INGEST__{key}"), value)
    }

    /// Adds any environment variable for the worker process (e.g. `FAILPOINTS`).
    pub fn with_var(mut self, name: &str, value: &str) -> Self {
        self.extra.push((name.to_string(), value.to_string()));
        self
    }

    /// The same names and database, without the extra variables.
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    pub fn without_extra(&self) -> Self {
        Self {
            extra: Vec::new(),
            ..self.clone()
        }
    }

    pub fn delay_topic(&self, delay_ms: u64) -> String {
        format!("{}-{delay_ms}", self.retry_prefix)
    }

    pub fn database_url(&self) -> String {
        format!("{}/{}", mysql_server_url(), self.database)
    }

    pub fn first_delay_topic(&self) -> String {
        format!("{}-250", self.retry_prefix)
    }

    /// Every delay topic of the default `retry.delays_ms`.
    pub fn delay_topics(&self) -> Vec<String> {
        im_ingest::config::RetrySettings::default()
            .delays_ms
            .iter()
            .map(|delay| format!("{}-{delay}", self.retry_prefix))
            .collect()
    }

    pub fn vars(&self) -> Vec<(String, String)> {
        [
            ("IM_INGEST__KAFKA__BROKERS", brokers()),
            ("IM_INGEST__KAFKA__INBOUND_TOPIC", self.inbound.clone()),
            ("IM_INGEST__KAFKA__RETRY_TOPIC", self.retry_prefix.clone()),
            ("IM_INGEST__KAFKA__DLQ_TOPIC", self.dlq.clone()),
            ("IM_INGEST__KAFKA__GROUP_ID", self.group.clone()),
            (
                "IM_INGEST__KAFKA__TOPIC_PARTITIONS",
                self.partitions.to_string(),
            ),
            (
                "IM_INGEST__KAFKA__LIBRDKAFKA__SESSION.TIMEOUT.MS",
                "6000".into(),
            ),
            (
                "IM_INGEST__KAFKA__LIBRDKAFKA__AUTO.COMMIT.INTERVAL.MS",
                "200".into(),
            ),
            ("IM_INGEST__DATABASE__URL", self.database_url()),
            ("IM_INGEST__REDIS__URL", redis_url()),
            ("IM_INGEST__LOG__FILTER", "info,im_ingest=debug".into()),
            // Port 0: every worker process gets its own admin port (see admin_address).
            ("IM_INGEST__ADMIN__LISTEN", "127.0.0.1:0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(self.extra.iter().cloned())
        .collect()
    }

    /// The same settings as the worker process gets, for driving the library directly.
    pub fn settings(&self) -> im_ingest::config::Settings {
        let mut s = im_ingest::config::Settings::default();
        s.kafka.brokers = brokers();
        s.kafka.inbound_topic = self.inbound.clone();
        s.kafka.retry_topic = self.retry_prefix.clone();
        s.kafka.dlq_topic = self.dlq.clone();
        s.kafka.group_id = self.group.clone();
        s.kafka.topic_partitions = self.partitions;
        s.database.url = im_ingest::secret::SecretUrl::new(self.database_url());
        s.redis.url = im_ingest::secret::SecretUrl::new(redis_url());
        s
    }

    pub async fn drop_database(&self) {
        TestDatabase {
            name: self.database.clone(),
        }
        .drop_now()
        .await;
    }
}

pub async fn redis_connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A user lock held by "another process": the key written as the public contract names
/// it (`im:lock:{tenant:platform:user}`, for tenant `default` and platform `2`).
pub struct OutsideLock {
    pub key: String,
    redis: redis::aio::MultiplexedConnection,
}

impl OutsideLock {
    /// Holds the lock of `user` for `ttl` (`None`: no TTL, held until released).
    pub async fn hold(user: &str, ttl: Option<std::time::Duration>) -> Self {
        let mut redis = redis_connection().await;
        let key = format!("im:lock:{{default:2:{user}}}");
        let mut set = redis::cmd("SET");
        set.arg(&key).arg("outsider");
        if let Some(ttl) = ttl {
            set.arg("PX").arg(ttl.as_millis() as u64);
        }
        let _: () = set.query_async(&mut redis).await.unwrap();
        Self { key, redis }
    }

    pub async fn release(mut self) {
        let _: () = redis::cmd("DEL")
            .arg(&self.key)
            .query_async(&mut self.redis)
            .await
            .unwrap();
    }
}

/// Makes the database refuse every message row with this id (a trigger's `SIGNAL`,
/// reason "refused by test trigger"), as a schema limit or a business rule would.
pub async fn refuse_message_id(pool: &sqlx::MySqlPool, message_id: &str) {
    sqlx::raw_sql(&format!(
        "CREATE TRIGGER refuse_message BEFORE INSERT ON message FOR EACH ROW \
         IF NEW.external_message_id = '{message_id}' THEN \
         SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused by test trigger'; END IF"
    ))
    .execute(pool)
    .await
    .unwrap();
}
