//! Typed, layered configuration.
//!
//! Guarantee: the settings a process runs with are exactly built-in defaults, overlaid by
//! one TOML file (if any), overlaid by `IM_INGEST__SECTION__KEY` environment variables;
//! an unknown key or a value of the wrong type is an error that names the key and where
//! it came from, never silently ignored. Secrets (passwords in URLs, SASL passwords)
//! never appear in `Debug` output or logs.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::Deserialize;

use crate::secret::{Secret, SecretUrl};

/// Prefix of environment overrides: `IM_INGEST__KAFKA__BROKERS` sets `kafka.brokers`.
pub const ENV_PREFIX: &str = "IM_INGEST__";

/// The file used when `--config` is not given, if it exists (relative to the working
/// directory). A container has no config directory and runs on built-in defaults.
pub const DEFAULT_CONFIG_FILE: &str = "config/default.toml";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub worker: WorkerSettings,
    pub lock: LockSettings,
    pub retry: RetrySettings,
    pub unread: UnreadSettings,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub brokers: String,
    pub group_id: String,
    pub inbound_topic: String,
    /// Prefix of the delay topics, which are named `<retry_topic>-<delay ms>`.
    pub retry_topic: String,
    pub dlq_topic: String,
    /// `security.protocol` (`plaintext`, `ssl`, `sasl_plaintext`, `sasl_ssl`).
    pub security_protocol: Option<String>,
    /// `sasl.mechanism` (`PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`).
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    /// Secret: from `IM_INGEST__KAFKA__SASL_PASSWORD` or the file `sasl_password_file`.
    pub sasl_password: Option<Secret>,
    pub sasl_password_file: Option<PathBuf>,
    /// `ssl.ca.location`: the CA certificates (PEM) the brokers' certificates must chain
    /// to. Unset: the system's CAs.
    pub ssl_ca_location: Option<PathBuf>,
    /// `ssl.certificate.location`: this client's certificate (PEM), for brokers that
    /// require one (mutual TLS).
    pub ssl_certificate_location: Option<PathBuf>,
    /// `ssl.key.location`: the private key (PEM) of `ssl_certificate_location`.
    pub ssl_key_location: Option<PathBuf>,
    /// `ssl.key.password`, for an encrypted key. Secret: from the environment or
    /// `ssl_key_password_file`.
    pub ssl_key_password: Option<Secret>,
    pub ssl_key_password_file: Option<PathBuf>,
    /// Partitions of a topic the worker creates because it is missing.
    pub topic_partitions: i32,
    /// Replication factor of a topic the worker creates because it is missing.
    pub topic_replication: i32,
    /// Raw librdkafka properties, applied last (e.g. `"fetch.min.bytes" = "1"`).
    pub librdkafka: BTreeMap<String, String>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "im-ingest".into(),
            inbound_topic: "im.inbound".into(),
            retry_topic: "im.inbound.retry".into(),
            dlq_topic: "im.inbound.dlq".into(),
            security_protocol: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            sasl_password_file: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            ssl_key_password: None,
            ssl_key_password_file: None,
            topic_partitions: 6,
            topic_replication: 1,
            librdkafka: BTreeMap::new(),
        }
    }
}

/// Hand-written so that passthrough properties that look secret are redacted too.
impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let librdkafka: BTreeMap<&str, &str> = self
            .librdkafka
            .iter()
            .map(|(key, value)| {
                let shown = if is_secret_property(key) {
                    Secret::REDACTED
                } else {
                    value
                };
                (key.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("inbound_topic", &self.inbound_topic)
            .field("retry_topic", &self.retry_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &self.sasl_password)
            .field("sasl_password_file", &self.sasl_password_file)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_certificate_location", &self.ssl_certificate_location)
            .field("ssl_key_location", &self.ssl_key_location)
            .field("ssl_key_password", &self.ssl_key_password)
            .field("ssl_key_password_file", &self.ssl_key_password_file)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication", &self.topic_replication)
            .field("librdkafka", &librdkafka)
            .finish()
    }
}

fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "key.pem", "jaas"]
        .iter()
        .any(|word| key.contains(word))
}

impl KafkaSettings {
    /// librdkafka client properties shared by every consumer, producer and admin client:
    /// brokers, security, then the raw passthrough map (which may override anything).
    pub fn client_config(&self) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        if let Some(protocol) = &self.security_protocol {
            config.set("security.protocol", protocol);
        }
        if let Some(mechanism) = &self.sasl_mechanism {
            config.set("sasl.mechanism", mechanism);
        }
        if let Some(username) = &self.sasl_username {
            config.set("sasl.username", username);
        }
        if let Some(password) = &self.sasl_password {
            config.set("sasl.password", password.expose());
        }
        let paths = [
            ("ssl.ca.location", &self.ssl_ca_location),
            ("ssl.certificate.location", &self.ssl_certificate_location),
            ("ssl.key.location", &self.ssl_key_location),
        ];
        for (property, path) in paths {
            if let Some(path) = path {
                config.set(property, path.to_string_lossy());
            }
        }
        if let Some(password) = &self.ssl_key_password {
            config.set("ssl.key.password", password.expose());
        }
        for (key, value) in &self.librdkafka {
            config.set(key, value);
        }
        config
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `mysql://user@host:port/database`; the database is created if missing (by
    /// `migrate`, or `run` with `migrate_on_start`).
    pub url: SecretUrl,
    /// The user's password, instead of one in `url`. Secret: from
    /// `IM_INGEST__DATABASE__PASSWORD` or the file `password_file`.
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// TLS to the server. Unset: what `url` says (`?ssl-mode=`), else `preferred`.
    pub tls_mode: Option<DatabaseTlsMode>,
    /// CA certificates (PEM) the server's certificate must chain to (`verify-ca`,
    /// `verify-identity` only; the system's CAs stay trusted too, so prefer
    /// `verify-identity`, which also checks the name). Unset: the system's CAs.
    pub tls_ca: Option<PathBuf>,
    /// Apply pending migrations when the worker starts.
    pub migrate_on_start: bool,
    pub max_connections: u32,
    /// How long to wait for a pooled connection before the operation fails.
    pub acquire_timeout_ms: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: SecretUrl::new("mysql://root@127.0.0.1:3306/im_ingest"),
            password: None,
            password_file: None,
            tls_mode: None,
            tls_ca: None,
            migrate_on_start: true,
            max_connections: 16,
            acquire_timeout_ms: 5_000,
        }
    }
}

/// How the connection to MySQL is encrypted (MySQL's `--ssl-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatabaseTlsMode {
    /// Plaintext.
    Disabled,
    /// TLS when the server offers it, else plaintext.
    Preferred,
    /// TLS, without checking the server's certificate.
    Required,
    /// TLS, the certificate signed by `tls_ca`.
    VerifyCa,
    /// TLS, the certificate signed by `tls_ca` and naming the URL's host.
    VerifyIdentity,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://host:port[/db]`, or `rediss://…` for TLS.
    pub url: SecretUrl,
    /// ACL user (Redis 6+), instead of one in `url`.
    pub username: Option<String>,
    /// The password (of `username`, or of `default`), instead of one in `url`. Secret:
    /// from `IM_INGEST__REDIS__PASSWORD` or the file `password_file`.
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// With `rediss://`: the CA certificates (PEM) the server's certificate must chain
    /// to. Unset: the system's CAs.
    pub tls_ca: Option<PathBuf>,
    /// A Redis that does not accept within this time counts as down (degraded mode).
    pub connect_timeout_ms: u64,
    /// A Redis that does not answer within this time counts as hung (degraded mode).
    pub response_timeout_ms: u64,
    /// In degraded mode, how often one lock attempt probes whether Redis is back.
    pub probe_interval_ms: u64,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: SecretUrl::new("redis://127.0.0.1:6379"),
            username: None,
            password: None,
            password_file: None,
            tls_ca: None,
            connect_timeout_ms: 1_000,
            response_timeout_ms: 1_000,
            probe_interval_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Address of the admin HTTP server (health, readiness, metrics, read API).
    pub listen: SocketAddr,
    /// When set, `/metrics` and `/v1/*` require `Authorization: Bearer <token>`
    /// (`/healthz` and `/readyz` stay open). Secret: from `IM_INGEST__ADMIN__TOKEN` or
    /// the file `token_file`.
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            token: None,
            token_file: None,
        }
    }
}

/// Unread counters (README, "Unread counters").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnreadSettings {
    /// A conversation whose newest message is older than this many days (event time)
    /// with no read receipt since counts 0; its next message counts from 1. Unset: off.
    pub expire_after_days: Option<u32>,
}

impl UnreadSettings {
    /// The rules the write path applies.
    pub fn rules(&self) -> crate::store::UnreadRules {
        crate::store::UnreadRules {
            expire_after_ms: self.expire_after_ms(),
        }
    }

    /// The expiry in milliseconds, when on.
    pub fn expire_after_ms(&self) -> Option<i64> {
        self.expire_after_days
            .map(|days| i64::from(days) * 86_400_000)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `im_ingest=debug,rdkafka=warn`.
    /// `RUST_LOG`, when set, wins.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            filter: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Larger record values are invalid (dead-lettered with the reason).
    pub max_message_bytes: usize,
    /// Records received but not yet durable, across all partitions. When reached, the
    /// worker stops fetching until some finish: memory stays bounded under any backlog.
    pub max_in_flight: usize,
    /// Bytes (keys and values) of the records in flight: with large records, this bound
    /// is reached before `max_in_flight`. A record larger than it alone is let through
    /// when nothing else is in flight.
    pub max_in_flight_bytes: usize,
    /// Pause before retrying a batch whose database write failed (doubles, capped).
    pub db_retry_initial_ms: u64,
    pub db_retry_max_ms: u64,
    /// At shutdown, how long in-flight records get to finish before offsets are
    /// committed and the process exits (unfinished ones are redelivered later).
    pub shutdown_deadline_ms: u64,
    /// Batches processed at once, each on its own database connection; the records that
    /// arrive while they all run form the next batch.
    pub batch_concurrency: usize,
    /// Records at which a batch stops growing (one user's records are never split).
    pub batch_max_records: usize,
    /// Bytes of record values at which a batch stops growing.
    pub batch_max_bytes: usize,
    /// How long a batch waits for more records when it could take more; 0 takes what is
    /// queued, so batches grow with the load and an idle worker adds no wait.
    pub batch_linger_ms: u64,
    /// How long a batch's transaction may wait inside the database (a row lock held by
    /// another transaction) before it is interrupted and its users are written one by
    /// one, so one blocked user holds up the others for about this long at most.
    pub write_stall_ms: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: crate::message::DEFAULT_MAX_BYTES,
            max_in_flight: 1_000,
            max_in_flight_bytes: 64 * 1024 * 1024,
            db_retry_initial_ms: 100,
            db_retry_max_ms: 5_000,
            shutdown_deadline_ms: 20_000,
            batch_concurrency: 4,
            batch_max_records: 100,
            batch_max_bytes: 4 * 1024 * 1024,
            batch_linger_ms: 0,
            write_stall_ms: 300,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockSettings {
    /// Whether records take the per-user Redis lock before they are written.
    pub mode: LockMode,
    /// Lease of a per-user lock; extended every third of it while the hold lasts.
    pub lease_ms: u64,
    /// Longest time one batch holds a user's lock: a write that would still run after it
    /// is not started, its messages go through the delay topics as a new attempt.
    /// Unset: a quarter of `lease_ms`.
    pub max_hold_ms: Option<u64>,
}

impl Default for LockSettings {
    fn default() -> Self {
        Self {
            mode: LockMode::Redis,
            lease_ms: 10_000,
            max_hold_ms: None,
        }
    }
}

impl LockSettings {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// `max_hold_ms`, or a quarter of the lease.
    pub fn max_hold(&self) -> Duration {
        Duration::from_millis(self.max_hold_ms.unwrap_or(self.lease_ms / 4))
    }

    /// The database sessions' `innodb_lock_wait_timeout`: a statement waits for a row
    /// lock no longer than the hold lasts (whole seconds, at least 1), far inside the
    /// lease, even when the worker's own interrupt (`worker.write_stall_ms`) fails.
    pub fn row_lock_wait_secs(&self) -> u64 {
        (self.max_hold().as_millis() as u64 / 1000).max(1)
    }
}

/// `lock.mode`: the Redis lock is an efficiency device (DESIGN.md, "Defence in depth");
/// the unique indexes alone already keep every row single, so it may be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Take the per-user lease lock in Redis; records meeting a held lock are delayed.
    Redis,
    /// No lock: writes rely on the unique indexes only, and concurrent writers of one
    /// user meet inside the database instead (Redis still holds the unread copy).
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// One delay topic per entry, `<kafka.retry_topic>-<delay ms>`; the n-th retry uses
    /// the n-th. In the environment: a comma-separated list (`250,1000,4000`).
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub delays_ms: Vec<u64>,
    /// Deliveries in all, the first included; then the record is dead-lettered.
    pub max_attempts: u32,
    /// Upward jitter of each delay, as a fraction (0.2 = up to +20%).
    pub jitter: f64,
}

impl RetrySettings {
    /// The configured delay before a record's last attempt, if it has more than one.
    pub fn delay_before_last_attempt(&self) -> Option<Duration> {
        let retries = self.max_attempts.checked_sub(1).filter(|n| *n > 0)?;
        delay_after(&self.delays_ms, retries).map(Duration::from_millis)
    }
}

/// The delay after failed delivery number `attempts` (1-based) of `delays`: the n-th
/// delay, the last one for any further; `None` without delays.
pub fn delay_after<T: Copy>(delays: &[T], attempts: u32) -> Option<T> {
    let index = (attempts.max(1) as usize - 1).min(delays.len().checked_sub(1)?);
    Some(delays[index])
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            delays_ms: vec![250, 1_000, 4_000, 16_000],
            max_attempts: 5,
            jitter: 0.2,
        }
    }
}

fn list_or_comma_separated<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        List(Vec<u64>),
        Text(String),
    }
    match Form::deserialize(d)? {
        Form::List(list) => Ok(list),
        Form::Text(text) => text
            .split(',')
            .map(|part| part.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "expected a list of milliseconds such as \"250,1000,4000\", got {text:?}"
                ))
            }),
    }
}

/// Where the settings came from, for the start-up log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    BuiltInDefaults,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(path) => write!(f, "{}", path.display()),
            ConfigSource::BuiltInDefaults => f.write_str("built-in defaults"),
        }
    }
}

/// Loads the settings: `explicit` (from `--config`) must exist; without it,
/// [`DEFAULT_CONFIG_FILE`] is used when present, else the built-in defaults. Environment
/// overrides apply in every case.
pub fn load(explicit: Option<&Path>) -> anyhow::Result<(Settings, ConfigSource)> {
    let source = match explicit {
        Some(path) => {
            anyhow::ensure!(
                path.is_file(),
                "configuration file {} does not exist or is not a file",
                path.display()
            );
            ConfigSource::File(path.to_path_buf())
        }
        None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
            ConfigSource::File(PathBuf::from(DEFAULT_CONFIG_FILE))
        }
        None => ConfigSource::BuiltInDefaults,
    };
    let env = EnvOverrides::from_process(ENV_PREFIX);
    let settings = from_figment(figment(&source, env))?;
    Ok((settings, source))
}

fn figment(source: &ConfigSource, env: EnvOverrides) -> Figment {
    let mut figment = Figment::new();
    if let ConfigSource::File(path) = source {
        figment = figment.merge(Toml::file_exact(path));
    }
    figment.merge(env)
}

fn from_figment(figment: Figment) -> anyhow::Result<Settings> {
    // Lossy: environment values are strings; `"5000"` becomes a number (and `"true"` a
    // boolean) only where the key is numeric (boolean), while `"123"` stays a string for
    // a string key such as `kafka.group_id`.
    refuse_secrets_outside_the_environment(&figment)?;
    let mut settings: Settings = figment.extract_lossy().map_err(describe_error)?;
    settings.forget_empty_paths();
    settings.read_secret_files()?;
    settings.validate()?;
    Ok(settings)
}

/// The secret settings, each with the setting that may name a file holding it instead.
const SECRET_SETTINGS: [(&str, &str); 5] = [
    ("kafka.sasl_password", "kafka.sasl_password_file"),
    ("kafka.ssl_key_password", "kafka.ssl_key_password_file"),
    ("database.password", "database.password_file"),
    ("redis.password", "redis.password_file"),
    ("admin.token", "admin.token_file"),
];

/// Name of the environment provider's metadata.
const ENVIRONMENT: &str = "environment";

/// Secrets come from the environment or from files named in the configuration, never
/// from the configuration file itself, which is copied, committed and baked into images.
/// So a secret setting, a URL with a password, or a secret-looking librdkafka property
/// written in the file is an error that says where to put it instead.
fn refuse_secrets_outside_the_environment(figment: &Figment) -> anyhow::Result<()> {
    let from_file = |value: &Value| {
        figment
            .get_metadata(value.tag())
            .filter(|meta| meta.name != ENVIRONMENT)
            .map(|meta| {
                meta.source
                    .as_ref()
                    .map_or_else(|| meta.name.to_string(), |source| source.to_string())
            })
    };
    for (key, file_key) in SECRET_SETTINGS {
        if let Some(source) = figment.find_value(key).ok().as_ref().and_then(from_file) {
            anyhow::bail!(
                "invalid configuration: `{key}` is a secret and may not be written in {source}: \
                 set {} or name a file holding it in `{file_key}`",
                env_name(key)
            );
        }
    }
    for (key, password_key) in [
        ("database.url", "database.password"),
        ("redis.url", "redis.password"),
    ] {
        let Ok(value) = figment.find_value(key) else {
            continue;
        };
        let has_password = value
            .as_str()
            .is_some_and(|url| SecretUrl::new(url).has_password());
        if let (true, Some(source)) = (has_password, from_file(&value)) {
            anyhow::bail!(
                "invalid configuration: `{key}` in {source} carries a password: write the URL \
                 without it and set {} or `{password_key}_file`",
                env_name(password_key)
            );
        }
    }
    if let Ok(Value::Dict(_, properties)) = figment.find_value("kafka.librdkafka") {
        for (property, value) in &properties {
            if let (true, Some(source)) = (is_secret_property(property), from_file(value)) {
                anyhow::bail!(
                    "invalid configuration: `kafka.librdkafka.\"{property}\"` is a secret and may \
                     not be written in {source}: set {ENV_PREFIX}KAFKA__LIBRDKAFKA__{} instead",
                    property.to_ascii_uppercase()
                );
            }
        }
    }
    Ok(())
}

/// The environment variable of a setting: `kafka.sasl_password` →
/// `IM_INGEST__KAFKA__SASL_PASSWORD`.
fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

/// Every error (not only the first) on one line, naming the key as users write it
/// (`redis.connect_timeout_ms`) and where the value came from (file or variable).
fn describe_error(error: figment::Error) -> anyhow::Error {
    let messages: Vec<String> = error.into_iter().map(|e| describe_one(&e)).collect();
    anyhow::anyhow!("invalid configuration: {}", messages.join("; "))
}

fn describe_one(error: &figment::Error) -> String {
    let mut text = error.kind.to_string();
    if !error.path.is_empty() {
        text.push_str(&format!(" for key `{}`", error.path.join(".")));
    }
    match (&error.metadata, &error.profile) {
        (Some(meta), _) if meta.source.is_some() => {
            if let Some(source) = &meta.source {
                text.push_str(&format!(" in {source}"));
            }
        }
        (Some(meta), Some(profile)) if !error.path.is_empty() => {
            text.push_str(&format!(" from {}", meta.interpolate(profile, &error.path)));
        }
        (Some(meta), _) => text.push_str(&format!(" from {}", meta.name)),
        (None, _) => {}
    }
    text
}

/// `IM_INGEST__SECTION__KEY=value` variables as a figment provider. Unlike figment's own
/// `Env`, values stay strings (so `"123"` is a valid group id) and keys split on `__`
/// only (so `IM_INGEST__KAFKA__LIBRDKAFKA__FETCH.MIN.BYTES` keeps its dots).
#[derive(Debug, Clone)]
struct EnvOverrides {
    prefix: String,
    vars: Vec<(String, String)>,
}

impl EnvOverrides {
    fn from_process(prefix: &str) -> Self {
        Self::from_vars(
            prefix,
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    fn from_vars(prefix: &str, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let vars = vars
            .into_iter()
            .filter(|(key, _)| key.len() > prefix.len() && key.starts_with(prefix))
            .collect();
        Self {
            prefix: prefix.to_string(),
            vars,
        }
    }
}

impl figment::Provider for EnvOverrides {
    fn metadata(&self) -> figment::Metadata {
        let prefix = self.prefix.clone();
        figment::Metadata::named("environment").interpolater(move |_profile, keys| {
            format!("{prefix}{}", keys.join("__").to_ascii_uppercase())
        })
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (name, value) in &self.vars {
            let path: Vec<String> = name[self.prefix.len()..]
                .split("__")
                .map(|part| part.to_ascii_lowercase())
                .collect();
            insert_nested(&mut root, &path, Value::from(value.clone()));
        }
        Ok(figment::Profile::Default.collect(root))
    }
}

fn insert_nested(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_nested(inner, rest, value);
            }
        }
    }
}

impl Settings {
    /// An empty path (`IM_INGEST__REDIS__TLS_CA=`) means the setting is unset, as an
    /// empty variable does in most deployment tools.
    fn forget_empty_paths(&mut self) {
        let paths = [
            &mut self.kafka.sasl_password_file,
            &mut self.kafka.ssl_ca_location,
            &mut self.kafka.ssl_certificate_location,
            &mut self.kafka.ssl_key_location,
            &mut self.kafka.ssl_key_password_file,
            &mut self.database.password_file,
            &mut self.database.tls_ca,
            &mut self.redis.password_file,
            &mut self.redis.tls_ca,
            &mut self.admin.token_file,
        ];
        for path in paths {
            if path
                .as_ref()
                .is_some_and(|path| path.as_os_str().is_empty())
            {
                *path = None;
            }
        }
    }

    /// Reads each secret whose `…_file` setting is set; setting both is an error.
    fn read_secret_files(&mut self) -> anyhow::Result<()> {
        let [kafka_sasl, kafka_key, database, redis, admin] = SECRET_SETTINGS;
        let slots = [
            (
                &mut self.kafka.sasl_password,
                &self.kafka.sasl_password_file,
                kafka_sasl,
            ),
            (
                &mut self.kafka.ssl_key_password,
                &self.kafka.ssl_key_password_file,
                kafka_key,
            ),
            (
                &mut self.database.password,
                &self.database.password_file,
                database,
            ),
            (&mut self.redis.password, &self.redis.password_file, redis),
            (&mut self.admin.token, &self.admin.token_file, admin),
        ];
        for (secret, file, (key, file_key)) in slots {
            // An empty secret (an unset variable in a template) would be a password of
            // nothing, or an admin token any `Bearer ` header matches.
            anyhow::ensure!(
                secret
                    .as_ref()
                    .is_none_or(|secret| !secret.expose().is_empty()),
                "invalid configuration: `{key}` is empty (leave it unset, or give a value)"
            );
            let Some(path) = file else { continue };
            anyhow::ensure!(
                secret.is_none(),
                "invalid configuration: both `{key}` and `{file_key}` are set: keep one"
            );
            *secret = Some(
                Secret::from_file(path)
                    .with_context(|| format!("invalid configuration: `{file_key}`"))?,
            );
        }
        Ok(())
    }

    /// The lock hold against the lease, the write stall limit and the retry delays.
    /// Without the lock (`lock.mode = none`) there is no hold to check.
    fn validate_hold(&self) -> anyhow::Result<()> {
        if self.lock.mode == LockMode::None {
            return Ok(());
        }
        let (hold, lease) = (self.lock.max_hold(), self.lock.lease());
        let stall = Duration::from_millis(self.worker.write_stall_ms);
        anyhow::ensure!(
            hold < lease,
            "invalid configuration: `lock.max_hold_ms` ({} ms) must be below `lock.lease_ms` \
             ({} ms): a hold must end before its lease can",
            hold.as_millis(),
            lease.as_millis()
        );
        anyhow::ensure!(
            hold >= stall * 2,
            "invalid configuration: the lock hold ({} ms, `lock.max_hold_ms`, by default a \
             quarter of `lock.lease_ms`) must be at least twice `worker.write_stall_ms` \
             ({} ms): no write starts that could outlast its hold, so a shorter one leaves \
             no time to write",
            hold.as_millis(),
            stall.as_millis()
        );
        if let Some(last) = self.retry.delay_before_last_attempt() {
            anyhow::ensure!(
                last >= hold,
                "invalid configuration: the delay before a record's last attempt ({} ms, \
                 from `retry.delays_ms` and `retry.max_attempts`) is shorter than the lock \
                 hold ({} ms, `lock.max_hold_ms`): a busy holder met at both of the last \
                 attempts would be taken for a stuck one and valid records dead-lettered",
                last.as_millis(),
                hold.as_millis()
            );
        }
        Ok(())
    }

    /// Cross-field and value checks that serde's types cannot express.
    pub fn validate(&self) -> anyhow::Result<()> {
        let kafka = &self.kafka;
        for (key, value) in [
            ("kafka.brokers", &kafka.brokers),
            ("kafka.group_id", &kafka.group_id),
            ("kafka.inbound_topic", &kafka.inbound_topic),
            ("kafka.retry_topic", &kafka.retry_topic),
            ("kafka.dlq_topic", &kafka.dlq_topic),
        ] {
            anyhow::ensure!(
                !value.trim().is_empty(),
                "invalid configuration: `{key}` is empty"
            );
        }
        self.database
            .url
            .parsed()
            .context("invalid configuration: `database.url` is not a URL")?;
        self.redis
            .url
            .parsed()
            .context("invalid configuration: `redis.url` is not a URL")?;
        anyhow::ensure!(
            self.database.max_connections > 0,
            "invalid configuration: `database.max_connections` must be at least 1"
        );
        anyhow::ensure!(
            self.worker.max_in_flight > 0,
            "invalid configuration: `worker.max_in_flight` must be at least 1"
        );
        anyhow::ensure!(
            (1..=u32::MAX as usize).contains(&self.worker.max_in_flight_bytes),
            "invalid configuration: `worker.max_in_flight_bytes` must be between 1 and {}",
            u32::MAX
        );
        anyhow::ensure!(
            self.worker.db_retry_initial_ms >= 1,
            "invalid configuration: `worker.db_retry_initial_ms` must be at least 1 \
             (0 would retry a failing write in a busy loop)"
        );
        anyhow::ensure!(
            self.worker.db_retry_max_ms >= self.worker.db_retry_initial_ms,
            "invalid configuration: `worker.db_retry_max_ms` ({}) must not be below \
             `worker.db_retry_initial_ms` ({})",
            self.worker.db_retry_max_ms,
            self.worker.db_retry_initial_ms
        );
        for (key, value) in [
            ("batch_concurrency", self.worker.batch_concurrency),
            ("batch_max_records", self.worker.batch_max_records),
            ("batch_max_bytes", self.worker.batch_max_bytes),
        ] {
            anyhow::ensure!(
                value > 0,
                "invalid configuration: `worker.{key}` must be at least 1"
            );
        }
        anyhow::ensure!(
            self.worker.batch_concurrency <= self.database.max_connections as usize,
            "invalid configuration: `worker.batch_concurrency` ({}) must not exceed \
             `database.max_connections` ({}): each batch holds a connection",
            self.worker.batch_concurrency,
            self.database.max_connections
        );
        anyhow::ensure!(
            self.worker.batch_linger_ms <= 1_000,
            "invalid configuration: `worker.batch_linger_ms` must be at most 1000 \
             (a linger holds every record of the batch)"
        );
        anyhow::ensure!(
            self.worker.write_stall_ms >= 50,
            "invalid configuration: `worker.write_stall_ms` must be at least 50"
        );
        anyhow::ensure!(
            self.lock.lease_ms >= 30,
            "invalid configuration: `lock.lease_ms` must be at least 30"
        );
        anyhow::ensure!(
            !self.retry.delays_ms.is_empty() && self.retry.delays_ms.iter().all(|d| *d > 0),
            "invalid configuration: `retry.delays_ms` needs at least one delay, each above 0"
        );
        let distinct: std::collections::BTreeSet<u64> =
            self.retry.delays_ms.iter().copied().collect();
        anyhow::ensure!(
            distinct.len() == self.retry.delays_ms.len(),
            "invalid configuration: `retry.delays_ms` lists a delay twice (each delay is a \
             topic of its own)"
        );
        anyhow::ensure!(
            self.retry.max_attempts >= 1,
            "invalid configuration: `retry.max_attempts` must be at least 1"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.retry.jitter),
            "invalid configuration: `retry.jitter` must be between 0 and 1"
        );
        anyhow::ensure!(
            !self.kafka.librdkafka.contains_key("group.instance.id"),
            "invalid configuration: `kafka.librdkafka.\"group.instance.id\"` is not supported: \
             each instance joins the group as two members (inbound, delay topics), and one \
             static id given to both would have the broker fence one of them"
        );
        anyhow::ensure!(
            self.kafka.topic_partitions >= 1 && self.kafka.topic_replication >= 1,
            "invalid configuration: `kafka.topic_partitions` and `kafka.topic_replication` must be at least 1"
        );
        anyhow::ensure!(
            self.database.tls_ca.is_none()
                || matches!(
                    self.database.tls_mode,
                    Some(DatabaseTlsMode::VerifyCa | DatabaseTlsMode::VerifyIdentity)
                ),
            "invalid configuration: `database.tls_ca` is set but `database.tls_mode` does not \
             verify the server: set it to `verify-identity` (or `verify-ca`)"
        );
        anyhow::ensure!(
            self.unread.expire_after_days != Some(0),
            "invalid configuration: `unread.expire_after_days` must be at least 1 (leave it unset to turn expiry off)"
        );
        self.validate_hold()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(toml: &str, env: &[(&str, &str)]) -> anyhow::Result<Settings> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.toml");
        std::fs::write(&path, toml).unwrap();
        // Variables are handed in, not set on the process, so tests stay independent.
        let vars = env
            .iter()
            .map(|(k, v)| (format!("{ENV_PREFIX}{k}"), v.to_string()));
        let env = EnvOverrides::from_vars(ENV_PREFIX, vars);
        from_figment(figment(&ConfigSource::File(path), env))
    }

    #[test]
    fn built_in_defaults_match_the_contract() {
        let s = load_with("", &[]).unwrap();
        assert_eq!(s.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(s.kafka.group_id, "im-ingest");
        assert_eq!(s.kafka.inbound_topic, "im.inbound");
        assert_eq!(s.kafka.retry_topic, "im.inbound.retry");
        assert_eq!(s.kafka.dlq_topic, "im.inbound.dlq");
        assert_eq!(
            s.database.url.expose(),
            "mysql://root@127.0.0.1:3306/im_ingest"
        );
        assert_eq!(s.redis.url.expose(), "redis://127.0.0.1:6379");
        assert_eq!(s.admin.listen.to_string(), "127.0.0.1:9464");
        assert!(s.database.migrate_on_start);
        assert_eq!(s.redis.connect_timeout_ms, 1_000);
        assert_eq!(s.redis.response_timeout_ms, 1_000);
        assert_eq!(s.lock.mode, LockMode::Redis);
    }

    #[test]
    fn lock_mode_is_redis_or_none_and_anything_else_names_the_key() {
        let s = load_with("", &[("LOCK__MODE", "none")]).unwrap();
        assert_eq!(s.lock.mode, LockMode::None);
        let s = load_with("[lock]\nmode = \"redis\"\n", &[]).unwrap();
        assert_eq!(s.lock.mode, LockMode::Redis);
        let err = load_with("", &[("LOCK__MODE", "off")]).unwrap_err();
        assert!(format!("{err:#}").contains("lock.mode"), "{err:#}");
    }

    #[test]
    fn worker_knobs_have_their_defaults_and_an_out_of_range_value_names_the_key() {
        let s = load_with("", &[]).unwrap();
        let w = &s.worker;
        assert_eq!(
            (w.batch_concurrency, w.batch_max_records, w.batch_max_bytes),
            (4, 100, 4 * 1024 * 1024)
        );
        assert_eq!((w.batch_linger_ms, w.write_stall_ms), (0, 300));
        for (key, value) in [
            ("batch_concurrency", "0"),
            ("batch_max_records", "0"),
            ("batch_max_bytes", "0"),
            ("batch_linger_ms", "1001"),
            ("write_stall_ms", "49"),
            ("db_retry_initial_ms", "0"),
            ("db_retry_max_ms", "50"),
        ] {
            let env = format!("WORKER__{}", key.to_uppercase());
            let err = load_with("", &[(env.as_str(), value)]).unwrap_err();
            assert!(
                format!("{err:#}").contains(&format!("worker.{key}")),
                "{err:#}"
            );
        }
    }

    #[test]
    fn unread_expiry_is_off_by_default_in_days_when_set_and_never_zero() {
        assert_eq!(load_with("", &[]).unwrap().unread.expire_after_ms(), None);
        let seven = load_with("", &[("UNREAD__EXPIRE_AFTER_DAYS", "7")]).unwrap();
        assert_eq!(seven.unread.expire_after_ms(), Some(7 * 86_400_000));
        let err = load_with("", &[("UNREAD__EXPIRE_AFTER_DAYS", "0")]).unwrap_err();
        assert!(
            format!("{err:#}").contains("unread.expire_after_days"),
            "{err:#}"
        );
    }

    #[test]
    fn a_delay_listed_twice_is_refused_naming_the_key() {
        let err = load_with("", &[("RETRY__DELAYS_MS", "250,1000,1000")]).unwrap_err();
        assert!(format!("{err:#}").contains("retry.delays_ms"), "{err:#}");
    }

    #[test]
    fn a_static_group_instance_id_is_refused_naming_the_key() {
        let err = load_with(
            "[kafka.librdkafka]\n\"group.instance.id\" = \"worker-1\"\n",
            &[],
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("group.instance.id"), "{err:#}");
        let other = "[kafka.librdkafka]\n\"fetch.min.bytes\" = \"7\"\n";
        assert!(load_with(other, &[]).is_ok());
    }

    #[test]
    fn environment_overrides_win_over_the_file() {
        let s = load_with(
            "[kafka]\nbrokers = \"file:1\"\ngroup_id = \"from-file\"\n",
            &[("KAFKA__BROKERS", "env:2"), ("KAFKA__GROUP_ID", "123")],
        )
        .unwrap();
        assert_eq!(s.kafka.brokers, "env:2");
        // A numeric-looking value stays a string for a string key.
        assert_eq!(s.kafka.group_id, "123");
    }

    #[test]
    fn unknown_key_in_file_is_an_error_naming_it() {
        let err = load_with("[kafka]\nbrokerz = \"x\"\n", &[]).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("brokerz"), "{text}");
        assert!(text.contains("kafka"), "{text}");
    }

    #[test]
    fn unknown_section_from_environment_is_an_error_naming_the_variable() {
        let err = load_with("", &[("DATABSE__URL", "mysql://x")]).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("databse"), "{text}");
        assert!(text.contains("DATABSE"), "{text}");
    }

    #[test]
    fn malformed_environment_override_is_an_error_naming_the_key() {
        let err = load_with("", &[("REDIS__CONNECT_TIMEOUT_MS", "soon")]).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("redis.connect_timeout_ms"), "{text}");
        assert!(text.contains("REDIS__CONNECT_TIMEOUT_MS"), "{text}");
    }

    #[test]
    fn environment_values_become_numbers_and_booleans_where_the_key_needs_them() {
        let s = load_with(
            "",
            &[
                ("REDIS__RESPONSE_TIMEOUT_MS", "250"),
                ("DATABASE__MIGRATE_ON_START", "false"),
                ("KAFKA__LIBRDKAFKA__FETCH.MIN.BYTES", "1"),
            ],
        )
        .unwrap();
        assert_eq!(s.redis.response_timeout_ms, 250);
        assert!(!s.database.migrate_on_start);
        assert_eq!(
            s.kafka
                .librdkafka
                .get("fetch.min.bytes")
                .map(String::as_str),
            Some("1")
        );
    }

    #[test]
    fn retry_delays_come_as_a_list_from_a_file_or_comma_separated_from_the_environment() {
        let short_holds = "[lock]\nmax_hold_ms = 200\n[worker]\nwrite_stall_ms = 100\n";
        let s = load_with(
            &format!("[retry]\ndelays_ms = [100, 200]\n{short_holds}"),
            &[],
        )
        .unwrap();
        assert_eq!(s.retry.delays_ms, [100, 200]);
        let s = load_with("", &[("RETRY__DELAYS_MS", "50, 500,5000")]).unwrap();
        assert_eq!(s.retry.delays_ms, [50, 500, 5000]);
        let err = load_with("", &[("RETRY__DELAYS_MS", "50,soon")]).unwrap_err();
        assert!(format!("{err:#}").contains("retry.delays_ms"), "{err:#}");
    }

    #[test]
    fn the_delay_before_the_last_attempt_is_that_of_the_last_hop() {
        let mut retry = RetrySettings::default();
        let ms = Duration::from_millis;
        assert_eq!(retry.delay_before_last_attempt(), Some(ms(16000)));
        retry.max_attempts = 3;
        assert_eq!(retry.delay_before_last_attempt(), Some(ms(1000)));
        retry.max_attempts = 9; // beyond the list: the last delay repeats
        assert_eq!(retry.delay_before_last_attempt(), Some(ms(16000)));
        retry.max_attempts = 1;
        assert_eq!(retry.delay_before_last_attempt(), None);
    }

    #[test]
    fn the_lock_hold_defaults_to_a_quarter_of_the_lease_and_sets_the_row_lock_wait() {
        let s = load_with("", &[]).unwrap();
        assert_eq!(s.lock.max_hold(), Duration::from_millis(2_500));
        assert_eq!(s.lock.row_lock_wait_secs(), 2);
        let s = load_with("", &[("LOCK__MAX_HOLD_MS", "900")]).unwrap();
        assert_eq!(s.lock.max_hold(), Duration::from_millis(900));
        assert_eq!(s.lock.row_lock_wait_secs(), 1, "at least one second");
    }

    #[test]
    fn a_hold_outside_the_lease_or_the_stall_limit_or_longer_than_the_last_delay_is_refused() {
        let refusal = |env: &[(&str, &str)]| format!("{:#}", load_with("", env).unwrap_err());
        let error = refusal(&[("LOCK__MAX_HOLD_MS", "10000")]);
        assert!(error.contains("must be below `lock.lease_ms`"), "{error}");
        let error = refusal(&[("LOCK__MAX_HOLD_MS", "300")]);
        assert!(
            error.contains("at least twice `worker.write_stall_ms`"),
            "{error}"
        );
        let error = refusal(&[("LOCK__MAX_HOLD_MS", "599")]);
        assert!(error.contains("at least twice"), "{error}");
        // Attempt 4 follows the 200 ms delay; a 2.5 s hold can span it.
        let error = refusal(&[
            ("RETRY__DELAYS_MS", "100,200"),
            ("RETRY__MAX_ATTEMPTS", "4"),
        ]);
        assert!(
            error.contains("delay before a record's last attempt (200 ms")
                && error.contains("lock hold (2500 ms"),
            "{error}"
        );
        // With a hold as short as that delay, the same delays are accepted.
        load_with(
            "",
            &[
                ("RETRY__DELAYS_MS", "100,200"),
                ("RETRY__MAX_ATTEMPTS", "4"),
                ("LOCK__MAX_HOLD_MS", "200"),
                ("WORKER__WRITE_STALL_MS", "100"),
            ],
        )
        .unwrap();
    }

    #[test]
    fn malformed_socket_address_is_an_error_naming_the_key() {
        let err = load_with("[admin]\nlisten = \"localhost\"\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("admin.listen"), "{err:#}");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "tok3n\n").unwrap();
        let s = load_with(
            &format!(
                "[kafka.librdkafka]\n\"fetch.min.bytes\" = \"7\"\n\
                 [admin]\ntoken_file = {:?}\n",
                token_file.display().to_string()
            ),
            &[
                ("DATABASE__URL", "mysql://app:hunter2@db:3306/im"),
                ("REDIS__URL", "redis://:sesame@cache:6379"),
                ("REDIS__PASSWORD", "redispass"),
                ("DATABASE__PASSWORD", "dbpass"),
                ("KAFKA__SASL_PASSWORD", "kafkapass"),
                ("KAFKA__LIBRDKAFKA__SSL.KEY.PASSWORD", "keypass"),
            ],
        )
        .unwrap();
        assert_eq!(s.admin.token.as_ref().map(Secret::expose), Some("tok3n"));
        let text = format!("{s:?}");
        for secret in [
            "hunter2",
            "sesame",
            "kafkapass",
            "keypass",
            "redispass",
            "dbpass",
            "tok3n",
        ] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
        assert!(text.contains("app"), "{text}");
        assert!(text.contains("fetch.min.bytes"), "{text}");
        assert_eq!(s.database.url.expose(), "mysql://app:hunter2@db:3306/im");
    }

    #[test]
    fn a_secret_written_in_the_configuration_file_is_refused_naming_where_it_belongs() {
        let cases = [
            (
                "[kafka]\nsasl_password = \"pw\"\n",
                "IM_INGEST__KAFKA__SASL_PASSWORD or name a file holding it in `kafka.sasl_password_file`",
            ),
            ("[admin]\ntoken = \"t\"\n", "IM_INGEST__ADMIN__TOKEN"),
            ("[redis]\npassword = \"pw\"\n", "`redis.password_file`"),
            (
                "[database]\nurl = \"mysql://app:pw@db/im\"\n",
                "`database.url` in",
            ),
            (
                "[kafka.librdkafka]\n\"sasl.password\" = \"pw\"\n",
                "IM_INGEST__KAFKA__LIBRDKAFKA__SASL.PASSWORD",
            ),
        ];
        for (toml, expected) in cases {
            let error = format!("{:#}", load_with(toml, &[]).unwrap_err());
            assert!(error.contains(expected), "{toml}: {error}");
            assert!(
                !error.contains("pw@") && !error.contains("\"pw\""),
                "{error}"
            );
        }
        // The same settings from the environment are fine.
        let s = load_with("", &[("DATABASE__URL", "mysql://app:pw@db/im")]).unwrap();
        assert!(s.database.url.has_password());
    }

    #[test]
    fn a_secret_and_its_file_together_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "x").unwrap();
        let toml = format!(
            "[database]\npassword_file = {:?}\n",
            file.display().to_string()
        );
        let error = format!(
            "{:#}",
            load_with(&toml, &[("DATABASE__PASSWORD", "y")]).unwrap_err()
        );
        assert!(
            error.contains("both `database.password` and `database.password_file`"),
            "{error}"
        );
        let missing = "[redis]\npassword_file = \"/nonexistent/pw\"\n";
        let error = format!("{:#}", load_with(missing, &[]).unwrap_err());
        assert!(error.contains("`redis.password_file`"), "{error}");
    }

    #[test]
    fn an_empty_secret_is_refused_and_a_ca_needs_a_verifying_tls_mode() {
        let error = format!("{:#}", load_with("", &[("ADMIN__TOKEN", "")]).unwrap_err());
        assert!(error.contains("`admin.token` is empty"), "{error}");
        let ca = [("DATABASE__TLS_CA", "/etc/ca.pem")];
        let error = format!("{:#}", load_with("", &ca).unwrap_err());
        assert!(error.contains("verify-identity"), "{error}");
        let verified = [ca[0], ("DATABASE__TLS_MODE", "verify-identity")];
        assert!(load_with("", &verified).is_ok());
    }
}
