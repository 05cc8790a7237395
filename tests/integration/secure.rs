//! The secure profile (`scripts/stack.sh up --secure`): the worker over each secured
//! Kafka transport with MySQL `verify-identity` and a Redis ACL user over TLS; each
//! authentication or TLS mistake stopping it at start-up with its cause; a database user
//! without DDL rights; secrets absent from every output; the admin token.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use sqlx::MySqlPool;

use crate::admin::{get, get_with_token};
use crate::helpers::{borrowed, im_ingest, stderr_of, unique, WorkerEnv, WorkerProcess};
use crate::kafka_util::produce;
use crate::unread::{message, AGENT};
use crate::worker::{wait_for_count, WAIT};

/// The secure stack's state directory (`IM_TEST_SECURE_DIR`, default `.stack/secure`).
pub(crate) fn secure_dir() -> PathBuf {
    std::env::var_os("IM_TEST_SECURE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".stack/secure"))
}

pub(crate) fn tls(name: &str) -> String {
    secure_dir().join("tls").join(name).display().to_string()
}

pub(crate) fn secret_file(name: &str) -> String {
    secure_dir()
        .join("secrets")
        .join(name)
        .display()
        .to_string()
}

pub(crate) fn secret(name: &str) -> String {
    std::fs::read_to_string(secret_file(name))
        .unwrap_or_else(|e| panic!("{name}: {e} (run scripts/stack.sh up --secure)"))
        .trim_end()
        .to_string()
}

fn port(variable: &str, default: u16) -> u16 {
    std::env::var(variable)
        .ok()
        .and_then(|port| port.parse().ok())
        .unwrap_or(default)
}

pub(crate) fn kafka_ssl() -> String {
    format!("127.0.0.1:{}", port("SECURE_KAFKA_SSL_PORT", 9192))
}

fn kafka_sasl() -> String {
    format!("127.0.0.1:{}", port("SECURE_KAFKA_SASL_PORT", 9193))
}

fn mariadb() -> String {
    format!("127.0.0.1:{}", port("SECURE_MARIADB_PORT", 3307))
}

pub(crate) fn redis() -> String {
    format!("127.0.0.1:{}", port("SECURE_REDIS_PORT", 6380))
}

/// How the worker reaches the secure broker.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Transport {
    MutualTls,
    SaslPlain,
    Scram256,
    Scram512,
}

impl Transport {
    /// `kafka.*` settings (environment keys without the prefix).
    fn settings(self) -> Vec<(&'static str, String)> {
        let mut settings = vec![("KAFKA__SSL_CA_LOCATION", tls("ca.pem"))];
        let sasl = |mechanism: &str, user: &str, secret: &str| {
            vec![
                ("KAFKA__BROKERS", kafka_sasl()),
                ("KAFKA__SECURITY_PROTOCOL", "sasl_ssl".to_string()),
                ("KAFKA__SASL_MECHANISM", mechanism.to_string()),
                ("KAFKA__SASL_USERNAME", user.to_string()),
                ("KAFKA__SASL_PASSWORD_FILE", secret_file(secret)),
            ]
        };
        settings.extend(match self {
            Transport::MutualTls => vec![
                ("KAFKA__BROKERS", kafka_ssl()),
                ("KAFKA__SECURITY_PROTOCOL", "ssl".to_string()),
                ("KAFKA__SSL_CERTIFICATE_LOCATION", tls("client.pem")),
                ("KAFKA__SSL_KEY_LOCATION", tls("client.key")),
            ],
            Transport::SaslPlain => sasl("PLAIN", "im_plain", "kafka_im_plain"),
            Transport::Scram256 => sasl("SCRAM-SHA-256", "im_scram", "kafka_im_scram"),
            Transport::Scram512 => sasl("SCRAM-SHA-512", "im_scram", "kafka_im_scram"),
        });
        settings
    }

    /// A producer that speaks the same transport.
    pub(crate) fn producer(self) -> FutureProducer {
        self.client_config().create().unwrap()
    }

    /// A client configuration for the same transport (admin clients, consumers).
    pub(crate) fn client_config(self) -> rdkafka::ClientConfig {
        let mut kafka = im_ingest::config::KafkaSettings::default();
        for (key, value) in self.settings() {
            match key {
                "KAFKA__BROKERS" => kafka.brokers = value,
                "KAFKA__SECURITY_PROTOCOL" => kafka.security_protocol = Some(value),
                "KAFKA__SASL_MECHANISM" => kafka.sasl_mechanism = Some(value),
                "KAFKA__SASL_USERNAME" => kafka.sasl_username = Some(value),
                "KAFKA__SASL_PASSWORD_FILE" => {
                    kafka.sasl_password =
                        Some(im_ingest::secret::Secret::from_file(value.as_ref()).unwrap())
                }
                "KAFKA__SSL_CA_LOCATION" => kafka.ssl_ca_location = Some(value.into()),
                "KAFKA__SSL_CERTIFICATE_LOCATION" => {
                    kafka.ssl_certificate_location = Some(value.into())
                }
                "KAFKA__SSL_KEY_LOCATION" => kafka.ssl_key_location = Some(value.into()),
                other => panic!("unmapped {other}"),
            }
        }
        kafka.client_config()
    }
}

/// `database.*` settings for `user` (`im_admin` or `im_worker`) on `database`, TLS
/// verifying the server's name.
fn database_settings(user: &str, database: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "DATABASE__URL",
            format!("mysql://{user}@{}/{database}", mariadb()),
        ),
        (
            "DATABASE__PASSWORD_FILE",
            secret_file(&format!("mariadb_{user}")),
        ),
        ("DATABASE__TLS_MODE", "verify-identity".to_string()),
        ("DATABASE__TLS_CA", tls("ca.pem")),
    ]
}

fn redis_settings() -> Vec<(&'static str, String)> {
    vec![
        ("REDIS__URL", format!("rediss://{}", redis())),
        ("REDIS__USERNAME", "im".to_string()),
        ("REDIS__PASSWORD_FILE", secret_file("redis_im")),
        ("REDIS__TLS_CA", tls("ca.pem")),
    ]
}

/// A worker on the secure stack: Kafka over `transport`, the database as `im_worker`
/// (no DDL rights, so `migrate_on_start` is off), Redis as ACL user `im` over TLS.
pub(crate) fn secure_worker(transport: Transport) -> WorkerEnv {
    let env = WorkerEnv::new(2);
    let database = env.database.clone();
    let mut env = env.with("DATABASE__MIGRATE_ON_START", "false");
    let settings = transport
        .settings()
        .into_iter()
        .chain(database_settings("im_worker", &database))
        .chain(redis_settings());
    for (key, value) in settings {
        env = env.with(key, &value);
    }
    env
}

/// The worker's variables with `overrides` (keys without the prefix) on top.
fn vars_with(env: &WorkerEnv, overrides: &[(&str, String)]) -> Vec<(String, String)> {
    let mut vars = env.vars();
    vars.extend(
        overrides
            .iter()
            .map(|(key, value)| (format!("IM_INGEST__{key}"), value.clone())),
    );
    vars
}

/// Applies the schema as `im_admin` with `im-ingest migrate` (the worker cannot).
pub(crate) fn migrate_as_admin(env: &WorkerEnv) {
    let vars = vars_with(env, &database_settings("im_admin", &env.database));
    let output = im_ingest(&["migrate"], &borrowed(&vars));
    assert!(output.status.success(), "migrate: {}", stderr_of(&output));
}

/// A Redis client as ACL user `im` over TLS.
pub(crate) fn redis_client() -> redis::Client {
    im_ingest::redis_client::open(&im_ingest::config::RedisSettings {
        url: im_ingest::secret::SecretUrl::new(format!("rediss://{}", redis())),
        username: Some("im".to_string()),
        password: Some(im_ingest::secret::Secret::new(secret("redis_im"))),
        tls_ca: Some(tls("ca.pem").into()),
        ..Default::default()
    })
    .unwrap()
}

/// A pool as `im_admin`, over TLS.
pub(crate) async fn admin_pool(database: &str) -> MySqlPool {
    let settings = im_ingest::config::DatabaseSettings {
        url: im_ingest::secret::SecretUrl::new(format!(
            "mysql://im_admin@{}/{database}",
            mariadb()
        )),
        password: Some(im_ingest::secret::Secret::new(secret("mariadb_im_admin"))),
        tls_mode: Some(im_ingest::config::DatabaseTlsMode::VerifyIdentity),
        tls_ca: Some(tls("ca.pem").into()),
        ..Default::default()
    };
    im_ingest::store::connect(&settings).await.unwrap()
}

pub(crate) async fn drop_database(pool: MySqlPool, database: &str) {
    sqlx::query(&format!("DROP DATABASE IF EXISTS `{database}`"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

/// Stores 5 customers × 4 messages through a worker on `transport`, reads the unread
/// total back through the worker's read API (Redis over TLS), then runs `verify`,
/// `reconcile` and `replay` with the same settings.
async fn stores_messages_over(transport: Transport) {
    let env = secure_worker(transport);
    migrate_as_admin(&env);
    let worker = WorkerProcess::start(&env);
    let producer = transport.producer();
    let tenant = unique("sec");
    for customer in 0..5 {
        for n in 0..4 {
            let id = format!("{tenant}-{customer}-{n}");
            let value = message(&tenant, &format!("c{customer}"), &id, 1_700_000_000_000 + n);
            produce(&producer, &env.inbound, None, value.as_bytes()).await;
        }
    }
    let pool = admin_pool(&env.database).await;
    wait_for_count(&pool, "SELECT COUNT(*) FROM message", 20, &worker).await;
    assert_eq!(
        crate::worker::count(&pool, "SELECT COUNT(*) FROM customer").await,
        5
    );
    let admin = worker.admin_address();
    let path = format!("/v1/unread?tenant={tenant}&platform=2&agent={AGENT}");
    let (status, body) = get(&admin, &path);
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["source"], "redis", "{body}");
    assert_eq!(answer["total"], 20, "{body}");
    let (status, body) = get(&admin, "/readyz");
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["redis"], "ok", "{body}");
    assert_eq!(ready["degraded"], false, "{body}");
    let (exit, log) = worker.stop_with_log();
    assert!(exit.is_some_and(|status| status.success()), "{log}");
    // The other commands reach the same services with the same settings.
    let vars = env.vars();
    for command in [
        vec!["verify"],
        vec!["reconcile", "--dry-run"],
        vec!["replay", "--from", env.inbound.as_str(), "--dry-run"],
    ] {
        let output = im_ingest(&command, &borrowed(&vars));
        assert!(
            output.status.success(),
            "{command:?} over {transport:?}: {}",
            stderr_of(&output)
        );
    }
    drop_database(pool, &env.database).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_stores_messages_over_kafka_ssl_with_client_certificates() {
    stores_messages_over(Transport::MutualTls).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_stores_messages_over_kafka_sasl_ssl_plain() {
    stores_messages_over(Transport::SaslPlain).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_stores_messages_over_kafka_sasl_ssl_scram_sha_256() {
    stores_messages_over(Transport::Scram256).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_stores_messages_over_kafka_sasl_ssl_scram_sha_512() {
    stores_messages_over(Transport::Scram512).await;
}

/// Runs `im-ingest run` with `vars`, killed after `limit`; (exit status if it exited,
/// time taken, stdout + stderr).
fn run_bounded(vars: &[(String, String)], limit: Duration) -> (Option<i32>, Duration, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = crate::helpers::bare_command(dir.path());
    command
        .arg("run")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.envs(vars.iter().map(|(k, v)| (k, v)));
    let started = Instant::now();
    let mut child = command.spawn().unwrap();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (code, took, text)
}

/// A CA that signed none of the stack's certificates.
fn foreign_ca(dir: &std::path::Path) -> String {
    let ca = dir.join("foreign-ca.pem");
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=foreign CA", "-keyout"])
        .arg(dir.join("foreign-ca.key"))
        .arg("-out")
        .arg(&ca)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    ca.display().to_string()
}

/// A misconfiguration: what it is, the settings that make it, and what the one-line
/// error must say.
type Mistake = (
    &'static str,
    Vec<(&'static str, String)>,
    &'static [&'static str],
);

#[tokio::test(flavor = "multi_thread")]
async fn each_authentication_and_tls_mistake_stops_the_worker_at_start_naming_its_cause() {
    let env = secure_worker(Transport::Scram256);
    migrate_as_admin(&env);
    let dir = tempfile::tempdir().unwrap();
    let foreign = foreign_ca(dir.path());
    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let wrong = wrong.display().to_string();
    let cases: Vec<Mistake> = vec![
        (
            "Kafka SCRAM, wrong password",
            vec![("KAFKA__SASL_PASSWORD_FILE", wrong.clone())],
            &["Kafka:", "Authentication failed"],
        ),
        (
            "Kafka, a CA that did not sign the broker",
            vec![("KAFKA__SSL_CA_LOCATION", foreign.clone())],
            &["Kafka:", "certificate verify failed"],
        ),
        (
            "Kafka, plaintext to the TLS listener",
            vec![
                ("KAFKA__SECURITY_PROTOCOL", "plaintext".into()),
                ("KAFKA__BROKERS", kafka_ssl()),
            ],
            &["Kafka:", "kafka.security_protocol"],
        ),
        (
            "Kafka mutual TLS without a client certificate",
            vec![
                ("KAFKA__SECURITY_PROTOCOL", "ssl".into()),
                ("KAFKA__BROKERS", kafka_ssl()),
            ],
            &["Kafka:", "alert bad certificate"],
        ),
        (
            "database, wrong password",
            vec![("DATABASE__PASSWORD_FILE", wrong.clone())],
            &["database:", "Access denied"],
        ),
        (
            "database, a CA that did not sign the server",
            vec![("DATABASE__TLS_CA", foreign.clone())],
            &["database: TLS", "certificate verify failed"],
        ),
        (
            "database, plaintext to a server that requires TLS",
            vec![
                ("DATABASE__TLS_MODE", "disabled".into()),
                ("DATABASE__TLS_CA", String::new()),
            ],
            &["database:", "database.tls_mode"],
        ),
        (
            "Redis, wrong password",
            vec![("REDIS__PASSWORD_FILE", wrong.clone())],
            &["Redis:", "authentication failed"],
        ),
        (
            "Redis, a CA that did not sign the server",
            vec![("REDIS__TLS_CA", foreign.clone())],
            &["Redis:", "certificate verify failed"],
        ),
        (
            "Redis, plaintext to the TLS port",
            vec![
                ("REDIS__URL", format!("redis://{}", redis())),
                ("REDIS__TLS_CA", String::new()),
            ],
            &["Redis:", "rediss://"],
        ),
        (
            "Redis, TLS to a plaintext server (the plain stack's)",
            vec![(
                "REDIS__URL",
                crate::helpers::redis_url().replacen("redis://", "rediss://", 1),
            )],
            &["Redis:", "use redis://"],
        ),
    ];
    for (case, overrides, expected) in cases {
        let vars = vars_with(&env, &overrides);
        let (code, took, output) = run_bounded(&vars, Duration::from_secs(40));
        assert_eq!(code, Some(1), "{case}: did not fail at start-up:\n{output}");
        let last = output.lines().last().unwrap_or_default();
        for text in expected {
            assert!(last.contains(text), "{case}: {text:?} not in {last:?}");
        }
        assert!(
            took < im_ingest::preflight::PROBE_LIMIT,
            "{case}: took {took:?}"
        );
    }
    drop_database(admin_pool(&env.database).await, &env.database).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_user_without_ddl_rights_cannot_migrate_and_says_so() {
    let env = secure_worker(Transport::Scram512);
    // `migrate` as the worker's user: the database cannot be created.
    let vars = vars_with(&env, &[]);
    let output = im_ingest(&["migrate"], &borrowed(&vars));
    let error = stderr_of(&output);
    assert!(!output.status.success(), "{error}");
    assert!(
        error.contains("denied") && error.contains("im_worker"),
        "{error}"
    );
    assert!(error.contains("migrate_on_start"), "{error}");
    // With the schema in place (by im_admin), `run` migrating on start still needs the
    // rights, and says which setting avoids it.
    migrate_as_admin(&env);
    let (code, _, output) = run_bounded(
        &vars_with(&env, &[("DATABASE__MIGRATE_ON_START", "true".into())]),
        Duration::from_secs(40),
    );
    assert_eq!(code, Some(1), "{output}");
    let last = output.lines().last().unwrap_or_default();
    assert!(
        last.contains("denied") && last.contains("migrate_on_start"),
        "{last}"
    );
    // Its unprivileged run is the one the other tests of this file make.
    drop_database(admin_pool(&env.database).await, &env.database).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn known_secrets_appear_in_no_output_of_a_traced_run_its_endpoints_or_failing_runs() {
    let token = format!("tok-{}", unique("admin"));
    let env = secure_worker(Transport::Scram256);
    // The database password in the URL this time (allowed from the environment), and
    // librdkafka's own debug output about security on.
    let url = format!(
        "mysql://im_worker:{}@{}/{}",
        secret("mariadb_im_worker"),
        mariadb(),
        env.database
    );
    let env = env
        .with("LOG__FILTER", "trace")
        .with("ADMIN__TOKEN", &token)
        .with("DATABASE__URL", &url)
        .with("DATABASE__PASSWORD_FILE", "")
        .with("KAFKA__LIBRDKAFKA__DEBUG", "security,broker");
    migrate_as_admin(&env);
    let worker = WorkerProcess::start(&env);
    let producer = Transport::Scram256.producer();
    let tenant = unique("sec");
    for n in 0..3 {
        let value = message(
            &tenant,
            "c1",
            &format!("{tenant}-{n}"),
            1_700_000_000_000 + n,
        );
        produce(&producer, &env.inbound, None, value.as_bytes()).await;
    }
    let pool = admin_pool(&env.database).await;
    wait_for_count(&pool, "SELECT COUNT(*) FROM message", 3, &worker).await;
    let admin = worker.admin_address();
    let mut outputs = vec![get(&admin, "/readyz").1];
    for path in [
        "/metrics".to_string(),
        format!("/v1/unread?tenant={tenant}&platform=2&agent={AGENT}"),
    ] {
        let (status, body) = get_with_token(&admin, &path, &token);
        assert_eq!(status, 200, "{path}: {body}");
        outputs.push(body);
    }
    let stdout = std::fs::read_to_string(worker.log.with_file_name("stdout.log")).unwrap();
    let (_, log) = worker.stop_with_log();
    outputs.push(log);
    outputs.push(stdout);
    // Failing runs at trace level, each with a wrong secret of its own.
    let wrong = |name: &str| format!("wrong-{name}-{}", unique("pw"));
    let failing = [
        ("KAFKA__SASL_PASSWORD", wrong("kafka")),
        ("DATABASE__PASSWORD", wrong("db")),
        ("REDIS__PASSWORD", wrong("redis")),
    ];
    let mut secrets = vec![
        token.clone(),
        secret("kafka_im_scram"),
        secret("mariadb_im_worker"),
        secret("redis_im"),
    ];
    for (key, value) in &failing {
        let file_key = format!("{key}_FILE");
        let vars = vars_with(
            &env,
            &[(key, value.clone()), (file_key.as_str(), String::new())],
        );
        let (code, _, output) = run_bounded(&vars, Duration::from_secs(40));
        assert_eq!(code, Some(1), "{key}: {output}");
        outputs.push(output);
        secrets.push(value.clone());
    }
    assert!(
        outputs.iter().any(|output| output.contains(" TRACE ")),
        "the run logged at trace level"
    );
    for output in &outputs {
        for secret in &secrets {
            assert!(
                !output.contains(secret.as_str()),
                "a secret leaked into:\n{output}"
            );
        }
    }
    drop_database(pool, &env.database).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_token_guards_metrics_and_the_read_api_but_not_health_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "s3cret-admin-token\n").unwrap();
    let env = WorkerEnv::new(1).with("ADMIN__TOKEN_FILE", &token_file.display().to_string());
    let worker = WorkerProcess::start(&env);
    let admin = worker.admin_address();
    let unread = format!("/v1/unread?tenant=t&platform=2&agent={AGENT}");
    for path in ["/metrics", unread.as_str()] {
        assert_eq!(get(&admin, path).0, 401, "{path} without a token");
        assert_eq!(
            get_with_token(&admin, path, "s3cret-admin-token-not").0,
            401,
            "{path} with a wrong token"
        );
        let (status, body) = get_with_token(&admin, path, "s3cret-admin-token");
        assert_eq!(status, 200, "{path} with the token: {body}");
    }
    assert_eq!(get(&admin, "/healthz").0, 200);
    let deadline = Instant::now() + WAIT;
    while get(&admin, "/readyz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "/readyz never answered 200 without a token"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.stop();
    env.drop_database().await;
}
