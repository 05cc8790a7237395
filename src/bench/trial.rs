//! One trial: one contender on one scenario, on fresh topics and a fresh database,
//! measured from outside the contender's processes.
//!
//! Guarantee: the clock starts when the backlog becomes visible to a contender whose
//! group has already joined (it was written in a Kafka transaction held open until then)
//! or when the first record is sent (burst, steady window), and stops when the group's committed
//! offsets reach the end of every topic it consumes — start-up is never counted, and
//! work is counted only once it is durable. CPU time and peak memory come from the OS.
//! The trial's topics and database are removed afterwards, whatever the outcome; a
//! durability trial puts `innodb_flush_log_at_trx_commit` back as it found it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sqlx::{Connection, MySqlPool};

use super::check::{check, Correctness};
use super::contender::naive;
use super::kafka_probe::{GroupReader, KafkaProbe};
use super::matrix::{ContenderKind, Scenario, Tables};
use super::process::{counter_sum, free_loopback_address, scrape_metrics, ContenderProcess};
use super::procstat::{cpu_seconds, peak_rss_bytes};
use super::workload::{self, BenchMessage, PartitionEnds};
use crate::config::Settings;
use crate::retry::policy::RetryPolicy;
use crate::secret::SecretUrl;

/// How often the bench looks at the group's committed offsets. Contenders send their
/// commits every 100 ms (`auto.commit.interval.ms`), so the clock stops at most about
/// 0.2 s late.
const POLL: Duration = Duration::from_millis(50);
const COMMIT_INTERVAL_MS: &str = "100";
/// Longest a contender may take to join its group.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything a trial needs that does not change between trials.
pub struct Bench {
    pub settings: Settings,
    pub config: Option<PathBuf>,
    pub exe: PathBuf,
    pub probe: KafkaProbe,
    pub services: Services,
    pub log_dir: PathBuf,
    pub partitions: i32,
    pub users: usize,
    pub messages: usize,
    pub burst_messages: usize,
    /// Backlog: a read receipt after every Nth message (0: none).
    pub read_receipt_every: usize,
    pub warmup: Duration,
    pub window: Duration,
    pub timeout: Duration,
    /// `innodb_flush_log_at_trx_commit` as the bench found it, when a durability trial
    /// may change it.
    pub original_flush_at_commit: Option<u8>,
    /// The names of the trial under way, for [`Bench::clean_up`].
    pub current: std::sync::Mutex<Option<Names>>,
}

/// The local services' processes, when they run on this machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct Services {
    pub mariadbd: Option<u32>,
    pub kafka: Option<u32>,
    pub redis: Option<u32>,
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct TrialSpec {
    pub run: usize,
    pub scenario: Scenario,
    pub contender: ContenderKind,
    /// Records per batch of the ideal consumer.
    pub batch_rows: usize,
    /// Steady scenario: messages per second offered.
    pub offered_rate: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// CPU seconds per 1,000 messages, per process.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuPer1k {
    pub contender: Option<f64>,
    pub mariadbd: Option<f64>,
    pub kafka: Option<f64>,
    pub redis: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrialResult {
    pub run: usize,
    pub scenario: Scenario,
    pub contender: ContenderKind,
    pub batch_rows: Option<usize>,
    pub offered_rate: Option<f64>,
    /// Distinct messages measured (each sent twice).
    pub messages: u64,
    pub seconds: f64,
    pub messages_per_second: f64,
    /// This trial's rate over the ideal consumer's in the same run and scenario.
    pub ratio_to_ideal: Option<f64>,
    pub latency: Option<Latency>,
    /// Largest peak RSS of the contender's processes.
    pub peak_rss_bytes: Option<u64>,
    pub cpu_seconds_per_1k_messages: CpuPer1k,
    /// Records published to delay topics per inbound record (workers).
    pub delay_records_per_record: Option<f64>,
    /// Writes without the lock (contended last attempts and degraded mode) per inbound
    /// record (workers).
    pub unlocked_writes_per_record: Option<f64>,
    pub correctness: Option<Correctness>,
}

/// The names private to one trial.
#[derive(Clone)]
pub struct Names {
    inbound: String,
    retry: String,
    dlq: String,
    group: String,
    database: SecretUrl,
}

impl Names {
    fn new(settings: &Settings) -> anyhow::Result<Self> {
        let id = format!("bench{:012x}", rand::random::<u64>() >> 16);
        let mut url = settings
            .database
            .url
            .parsed()
            .context("database.url is not a URL")?;
        url.set_path(&format!("/im_{id}"));
        Ok(Self {
            inbound: format!("{id}.in"),
            retry: format!("{id}.retry"),
            dlq: format!("{id}.dlq"),
            group: format!("{id}.group"),
            database: SecretUrl::new(url.as_str()),
        })
    }
}

/// CPU seconds of the contender's processes and the services at one moment.
struct CpuSnapshot {
    contender: Option<f64>,
    mariadbd: Option<f64>,
    kafka: Option<f64>,
    redis: Option<f64>,
}

impl CpuSnapshot {
    fn take(processes: &[ContenderProcess], services: &Services) -> Self {
        let contender = processes
            .iter()
            .map(|p| cpu_seconds(p.pid()))
            .sum::<Option<f64>>();
        Self {
            contender,
            mariadbd: services.mariadbd.and_then(cpu_seconds),
            kafka: services.kafka.and_then(cpu_seconds),
            redis: services.redis.and_then(cpu_seconds),
        }
    }

    fn per_1k(&self, later: &Self, messages: u64) -> CpuPer1k {
        let thousands = (messages as f64 / 1_000.0).max(1e-9);
        let rate = |a: Option<f64>, b: Option<f64>| Some((b? - a?).max(0.0) / thousands);
        CpuPer1k {
            contender: rate(self.contender, later.contender),
            mariadbd: rate(self.mariadbd, later.mariadbd),
            kafka: rate(self.kafka, later.kafka),
            redis: rate(self.redis, later.redis),
        }
    }
}

impl Bench {
    /// Runs one trial and removes its topics and database afterwards.
    pub async fn trial(&self, spec: TrialSpec) -> anyhow::Result<TrialResult> {
        let names = Names::new(&self.settings)?;
        *self.current.lock().expect("not poisoned") = Some(names.clone());
        let result = async {
            if spec.scenario == Scenario::Durable {
                self.set_flush_at_commit(1).await?;
            }
            self.measure(spec, &names).await
        }
        .await;
        let cleaned = self.clean_up().await;
        if result.is_ok() {
            cleaned?;
        } else if let Err(error) = cleaned {
            // The trial's own error is the one to report.
            tracing::warn!("cleaning up after a failed trial: {error:#}");
        }
        result.with_context(|| {
            format!(
                "run {}, scenario {}, contender {}",
                spec.run,
                spec.scenario.label(),
                spec.contender.label()
            )
        })
    }

    /// Puts `innodb_flush_log_at_trx_commit` back as the bench found it and removes the
    /// current trial's topics and database. Called after every trial, and by the bench
    /// when it is interrupted mid-trial.
    pub async fn clean_up(&self) -> anyhow::Result<()> {
        if let Some(original) = self.original_flush_at_commit {
            self.set_flush_at_commit(original).await?;
        }
        // Forgotten only once removed: an interrupt in between leaves them to the
        // bench's own clean-up.
        let names = self.current.lock().expect("not poisoned").clone();
        if let Some(names) = names {
            let mut topics = vec![names.inbound.clone(), names.dlq.clone()];
            topics.extend(self.delay_topics(&names));
            self.probe.delete_topics(&topics).await;
            let mut database = self.settings.database.clone();
            database.url = names.database.clone();
            drop_database(&database).await?;
            *self.current.lock().expect("not poisoned") = None;
        }
        Ok(())
    }

    fn delay_topics(&self, names: &Names) -> Vec<String> {
        RetryPolicy::from_settings(&self.settings.retry).topics(&names.retry)
    }

    async fn measure(&self, spec: TrialSpec, names: &Names) -> anyhow::Result<TrialResult> {
        let pool = self.prepare_tables(spec.contender, &names.database).await?;
        self.probe
            .create_topic(&names.inbound, self.partitions)
            .await?;
        let producer = workload::producer(&self.settings.kafka)?;
        let trial_id = names.group.trim_end_matches(".group").to_string();
        let spread = spec.scenario.spread(self.users);
        let mut sent: Vec<BenchMessage> = Vec::new();
        let held = if spec.scenario.is_backlog() {
            sent = workload::backlog(&trial_id, self.messages, spread);
            Some(
                workload::HeldBacklog::send(
                    &self.settings.kafka,
                    &names.inbound,
                    &sent,
                    spec.scenario.keys(),
                    self.read_receipt_every,
                )
                .await?,
            )
        } else {
            None
        };
        let mut processes = self.start(spec, names)?;
        let reader = self.probe.group_reader(&names.group)?;
        let mut consumed = vec![names.inbound.clone()];
        let mut members = 1;
        if spec.contender.is_worker() {
            consumed.extend(self.delay_topics(names));
            members = crate::worker::consumer_subscriptions(&self.settings).len();
        }
        self.wait_joined(&reader, &mut processes, members).await?;

        let mut known_ends = HashMap::new();
        let (started, before, measured, window_end) = match (spec.scenario, held) {
            (_, Some(held)) => {
                let before = CpuSnapshot::take(&processes, &self.services);
                let started = Instant::now();
                known_ends.insert(names.inbound.clone(), held.commit()?);
                (started, before, sent.len() as u64, None)
            }
            (Scenario::Steady, None) => {
                let rate = spec
                    .offered_rate
                    .context("the steady scenario needs an offered rate")?;
                let warm = workload::send_paced(
                    &producer,
                    &names.inbound,
                    &trial_id,
                    0,
                    spread,
                    rate,
                    self.warmup,
                )
                .await?;
                let started = Instant::now();
                let before = CpuSnapshot::take(&processes, &self.services);
                let window = workload::send_paced(
                    &producer,
                    &names.inbound,
                    &trial_id,
                    warm.len(),
                    spread,
                    rate,
                    self.window,
                )
                .await?;
                let window_end = Some(CpuSnapshot::take(&processes, &self.services));
                let measured = window.len() as u64;
                sent = warm;
                sent.extend(window);
                (started, before, measured, window_end)
            }
            (Scenario::Burst, None) => {
                let started = Instant::now();
                let before = CpuSnapshot::take(&processes, &self.services);
                sent = workload::send_burst(
                    &self.settings.kafka,
                    &names.inbound,
                    &trial_id,
                    self.burst_messages,
                )
                .await?;
                (started, before, sent.len() as u64, None)
            }
            (scenario, None) => anyhow::bail!("scenario {} sends nothing", scenario.label()),
        };
        self.wait_committed(&reader, &consumed, &known_ends, &mut processes)
            .await?;
        let seconds = started.elapsed().as_secs_f64();
        let after = window_end.unwrap_or_else(|| CpuSnapshot::take(&processes, &self.services));
        let peak_rss_bytes = processes
            .iter()
            .map(|p| peak_rss_bytes(p.pid()))
            .max()
            .flatten();
        let unlocked = self.unlocked_writes(&processes).await?;
        drop(processes);

        let records = (sent.len() * workload::COPIES) as f64;
        let delayed = self.count_records(&reader, &self.delay_topics(names))?;
        let dead_lettered = reader.record_count(&names.dlq)?;
        let correctness = match &pool {
            Some(pool) => Some(check(pool, &sent, dead_lettered).await?),
            None => None,
        };
        let latency = match (&pool, spec.scenario) {
            (Some(pool), Scenario::Steady) => {
                let window = &sent[sent.len() - measured as usize..];
                Some(latency(pool, window).await?)
            }
            _ => None,
        };
        if let Some(pool) = pool {
            pool.close().await;
        }
        let worker = spec.contender.is_worker();
        Ok(TrialResult {
            run: spec.run,
            scenario: spec.scenario,
            contender: spec.contender,
            batch_rows: (spec.contender == ContenderKind::Ideal).then_some(spec.batch_rows),
            offered_rate: spec.offered_rate,
            messages: measured,
            seconds,
            messages_per_second: measured as f64 / seconds.max(1e-9),
            ratio_to_ideal: None,
            latency,
            peak_rss_bytes,
            cpu_seconds_per_1k_messages: before.per_1k(&after, measured),
            delay_records_per_record: worker.then(|| delayed as f64 / records),
            unlocked_writes_per_record: unlocked.map(|n| n / records),
            correctness,
        })
    }

    /// Creates the trial's database and the contender's tables; `None` for a contender
    /// that writes nothing.
    async fn prepare_tables(
        &self,
        contender: ContenderKind,
        url: &SecretUrl,
    ) -> anyhow::Result<Option<MySqlPool>> {
        let mut database = self.settings.database.clone();
        database.url = url.clone();
        match contender.tables() {
            Tables::None => return Ok(None),
            Tables::Worker => crate::store::migrate(&database).await?,
            Tables::WithoutUniqueKeys => {
                crate::store::create_database_if_missing(&database).await?;
                let pool = crate::store::connect(&database).await?;
                naive::create_schema(&pool).await?;
                pool.close().await;
            }
        }
        Ok(Some(crate::store::connect(&database).await?))
    }

    fn start(&self, spec: TrialSpec, names: &Names) -> anyhow::Result<Vec<ContenderProcess>> {
        let mut processes = Vec::new();
        for index in 0..spec.scenario.processes() {
            let admin = free_loopback_address()?;
            let mut env: Vec<(String, String)> = vec![
                ("KAFKA__INBOUND_TOPIC", names.inbound.clone()),
                ("KAFKA__RETRY_TOPIC", names.retry.clone()),
                ("KAFKA__DLQ_TOPIC", names.dlq.clone()),
                ("KAFKA__GROUP_ID", names.group.clone()),
                ("KAFKA__TOPIC_PARTITIONS", self.partitions.to_string()),
                (
                    "KAFKA__LIBRDKAFKA__AUTO.COMMIT.INTERVAL.MS",
                    COMMIT_INTERVAL_MS.to_string(),
                ),
                ("DATABASE__URL", names.database.expose().to_string()),
                ("ADMIN__LISTEN", admin.clone()),
                ("LOG__FILTER", "warn".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (format!("{}{k}", crate::config::ENV_PREFIX), v))
            .collect();
            for (key, value) in spec.contender.settings() {
                env.push((
                    format!("{}{key}", crate::config::ENV_PREFIX),
                    value.to_string(),
                ));
            }
            let name = format!(
                "r{}-{}-{}-{index}",
                spec.run,
                spec.scenario.label(),
                spec.contender
                    .label()
                    .split(' ')
                    .next()
                    .unwrap_or("contender")
            );
            processes.push(ContenderProcess::spawn(
                &self.exe,
                self.config.as_deref(),
                &spec.contender.args(spec.batch_rows),
                &env,
                &self.log_dir,
                &name,
                spec.contender.is_worker().then_some(admin),
            )?);
        }
        Ok(processes)
    }

    /// Waits until every process has joined the group with each of its `members`
    /// consumers (a worker has one per kind of topic, see `consumer::member`).
    async fn wait_joined(
        &self,
        reader: &GroupReader,
        processes: &mut [ContenderProcess],
        members: usize,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + JOIN_TIMEOUT;
        loop {
            for process in processes.iter_mut() {
                process.ensure_running()?;
            }
            if tokio::task::block_in_place(|| reader.is_stable(processes.len() * members))? {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the contender did not join its group within {JOIN_TIMEOUT:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the group has committed the end of every consumed topic, seen twice
    /// in a row (a delay record published between two looks would show in the second).
    async fn wait_committed(
        &self,
        reader: &GroupReader,
        topics: &[String],
        known_ends: &HashMap<String, PartitionEnds>,
        processes: &mut [ContenderProcess],
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut seen_once = false;
        loop {
            for process in processes.iter_mut() {
                process.ensure_running()?;
            }
            let done = tokio::task::block_in_place(|| reader.all_committed(topics, known_ends))?;
            if done && seen_once {
                return Ok(());
            }
            seen_once = done;
            anyhow::ensure!(
                Instant::now() < deadline,
                "the contender did not commit every record within {:?} (--trial-timeout-secs)",
                self.timeout
            );
            tokio::time::sleep(if done { Duration::ZERO } else { POLL }).await;
        }
    }

    fn count_records(&self, reader: &GroupReader, topics: &[String]) -> anyhow::Result<u64> {
        topics.iter().map(|t| reader.record_count(t)).sum()
    }

    /// Contended plus degraded-mode writes of the worker processes; `None` for others.
    async fn unlocked_writes(&self, processes: &[ContenderProcess]) -> anyhow::Result<Option<f64>> {
        let mut total = None;
        for process in processes {
            if let Some(admin) = &process.admin {
                let metrics = scrape_metrics(admin, self.settings.admin.token.as_ref()).await?;
                let writes = counter_sum(
                    &metrics,
                    &[
                        "im_ingest_contended_writes_total",
                        "im_ingest_unlocked_writes_total",
                    ],
                );
                *total.get_or_insert(0.0) += writes;
            }
        }
        Ok(total)
    }

    /// The server's `innodb_flush_log_at_trx_commit`.
    pub async fn flush_at_commit(&self) -> anyhow::Result<u8> {
        let mut connection = crate::store::connect_server(&self.settings.database).await?;
        let value: u64 = sqlx::query_scalar("SELECT @@GLOBAL.innodb_flush_log_at_trx_commit")
            .fetch_one(&mut connection)
            .await?;
        connection.close().await.ok();
        Ok(u8::try_from(value).unwrap_or(1))
    }

    async fn set_flush_at_commit(&self, value: u8) -> anyhow::Result<()> {
        let mut connection = crate::store::connect_server(&self.settings.database).await?;
        sqlx::query(&format!(
            "SET GLOBAL innodb_flush_log_at_trx_commit = {value}"
        ))
        .execute(&mut connection)
        .await
        .context(
            "the durable scenario sets innodb_flush_log_at_trx_commit (needs the \
             SUPER or SYSTEM_VARIABLES_ADMIN privilege); leave it out with --scenarios",
        )?;
        connection.close().await.ok();
        Ok(())
    }
}

/// From each message's CreateTime (= its `timestamp`, stamped when sent) to its row's
/// insert (`created_at`, taken inside the transaction that commits it).
async fn latency(pool: &MySqlPool, window: &[BenchMessage]) -> anyhow::Result<Latency> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT CAST(external_message_id AS CHAR), CAST(ROUND(MIN(UNIX_TIMESTAMP(created_at)) * 1000) AS SIGNED) \
         FROM message WHERE tenant_id = ? AND platform = ? GROUP BY external_message_id",
    )
    .bind(workload::TENANT)
    .bind(workload::PLATFORM)
    .fetch_all(pool)
    .await?;
    let stored: std::collections::HashMap<String, i64> = rows.into_iter().collect();
    let mut samples: Vec<f64> = window
        .iter()
        .filter_map(|m| stored.get(&m.message_id).map(|at| (at - m.sent_at) as f64))
        .collect();
    samples.sort_by(f64::total_cmp);
    Ok(Latency {
        p50_ms: percentile(&samples, 0.50),
        p99_ms: percentile(&samples, 0.99),
        max_ms: samples.last().copied().unwrap_or(0.0),
    })
}

/// Nearest-rank percentile of sorted samples (0 when there are none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn drop_database(settings: &crate::config::DatabaseSettings) -> anyhow::Result<()> {
    let name = settings
        .url
        .parsed()?
        .path()
        .trim_start_matches('/')
        .to_string();
    let mut connection = crate::store::connect_server(settings).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`"))
        .execute(&mut connection)
        .await?;
    connection.close().await.ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&samples, 0.50), 50.0);
        assert_eq!(percentile(&samples, 0.99), 99.0);
        assert_eq!(percentile(&samples, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
