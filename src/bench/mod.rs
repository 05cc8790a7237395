//! `im-ingest bench`: every contender and every limit, side by side, in one run.
//!
//! Guarantee: each figure comes from trials on fresh topics and a fresh database, each
//! contender running as its own process and measured from outside it (see `trial`);
//! runs are interleaved (every scenario and contender once per run) and each figure is
//! their median with min–max; every ratio is taken against the ideal consumer of the
//! same run and scenario (the database write limit on the same rows). Every trial is
//! bounded in time, and a failing trial stops the bench with the cause.

mod check;
pub mod contender;
mod kafka_probe;
mod matrix;
mod process;
pub mod procstat;
mod report;
mod trial;
pub mod workload;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

pub use check::{check, Correctness};
pub use matrix::{ContenderKind, Scenario};
pub use report::{Figure, Summary};
pub use trial::TrialResult;

use crate::config::Settings;
use kafka_probe::KafkaProbe;
use trial::{Bench, Services, TrialSpec};

/// Statement sizes the ideal consumer tries on the backlog; the best one is its figure
/// and is used in the other scenarios of the same run.
pub const IDEAL_BATCH_ROWS: [usize; 3] = [100, 500, 1000];

/// Trials shorter than this are flagged: the stop clock's resolution is about 0.2 s.
const SHORTEST_HONEST_TRIAL_SECS: f64 = 1.0;

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct BenchArgs {
    /// Distinct messages of a backlog (each sent twice with random keys).
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Distinct users (customers) the messages are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub users: usize,
    /// Interleaved runs; each figure is their median, with min–max (at least 3 on a
    /// shared, noisy machine).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Scenarios to run, comma-separated (default: all). `steady` needs `backlog`: it
    /// offers half the rate each contender reached there.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Scenario::Backlog, Scenario::Steady, Scenario::Burst, Scenario::HotUser, Scenario::Group, Scenario::Durable])]
    pub scenarios: Vec<Scenario>,
    /// Contenders to run, comma-separated (default: all). `ideal` is always run: every
    /// ratio is taken against it.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [ContenderKind::Ideal, ContenderKind::Shipped, ContenderKind::LockNone, ContenderKind::Naive, ContenderKind::Noop])]
    pub contenders: Vec<ContenderKind>,
    /// Backlog scenarios: after every Nth message, a read receipt of its conversation up
    /// to that message (sent twice, like the messages; not counted in the rates), to
    /// measure what unread upkeep costs. 0: none.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub read_receipt_every: usize,
    /// Messages of the burst scenario (one new customer, 10 producers, each sent twice).
    #[arg(long, default_value_t = 5_000)]
    pub burst_messages: usize,
    /// Steady scenario: seconds of paced load before the measured window.
    #[arg(long, default_value_t = 10)]
    pub warmup_secs: u64,
    /// Steady scenario: seconds of the measured window (latency and rate).
    #[arg(long, default_value_t = 60)]
    pub window_secs: u64,
    /// Partitions of each trial's inbound topic (and of the workers' delay topics).
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Longest one trial may take to commit everything before the bench fails.
    #[arg(long, default_value_t = 900)]
    pub trial_timeout_secs: u64,
    /// Also write the results as JSON to this file (with the git revision and the
    /// machine's cores and memory).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

impl BenchArgs {
    fn validate(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.messages > 0 && self.users > 0,
            "--messages and --users must be at least 1"
        );
        anyhow::ensure!(self.runs > 0, "--runs must be at least 1");
        anyhow::ensure!(
            self.burst_messages > 0,
            "--burst-messages must be at least 1"
        );
        anyhow::ensure!(self.partitions > 0, "--partitions must be at least 1");
        anyhow::ensure!(self.window_secs > 0, "--window-secs must be at least 1");
        anyhow::ensure!(
            !self.scenarios.contains(&Scenario::Steady) || self.scenarios.contains(&Scenario::Backlog),
            "the steady scenario offers half the rate measured on the backlog: add `backlog` to --scenarios"
        );
        if !self.contenders.contains(&ContenderKind::Ideal) {
            self.contenders.insert(0, ContenderKind::Ideal);
        }
        dedupe(&mut self.scenarios);
        dedupe(&mut self.contenders);
        // The order of a run: backlog first (steady needs its rates), ideal first in each
        // scenario (its best batch size is chosen on the backlog).
        self.scenarios.sort();
        self.contenders.sort();
        Ok(())
    }
}

fn dedupe<T: PartialEq + Clone>(items: &mut Vec<T>) {
    let mut seen = Vec::new();
    items.retain(|item| {
        let new = !seen.contains(item);
        if new {
            seen.push(item.clone());
        }
        new
    });
}

#[derive(Debug, Serialize)]
struct Machine {
    cores: usize,
    memory_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Document<'a> {
    revision: Option<String>,
    version: &'static str,
    machine: Machine,
    parameters: &'a BenchArgs,
    summary: &'a [Summary],
    trials: &'a [TrialResult],
    /// Every backlog trial of the ideal consumer, one per statement size.
    ideal_batch_trials: &'a [TrialResult],
}

/// Runs the bench and prints its tables; see the module guarantee.
pub async fn run(
    settings: &Settings,
    config: Option<&Path>,
    mut args: BenchArgs,
) -> anyhow::Result<()> {
    args.validate()?;
    let log_dir = tempfile::Builder::new()
        .prefix("im-ingest-bench-")
        .tempdir()
        .context("creating a directory for the contenders' logs")?;
    let mut bench = Bench {
        settings: settings.clone(),
        config: config.map(Path::to_path_buf),
        exe: std::env::current_exe().context("locating the im-ingest binary")?,
        probe: KafkaProbe::new(&settings.kafka)?,
        services: find_services(settings),
        log_dir: log_dir.path().to_path_buf(),
        partitions: args.partitions,
        users: args.users,
        messages: args.messages,
        burst_messages: args.burst_messages,
        read_receipt_every: args.read_receipt_every,
        warmup: Duration::from_secs(args.warmup_secs),
        window: Duration::from_secs(args.window_secs),
        timeout: Duration::from_secs(args.trial_timeout_secs),
        original_flush_at_commit: None,
        current: std::sync::Mutex::new(None),
    };
    if args.scenarios.contains(&Scenario::Durable) {
        bench.original_flush_at_commit = Some(bench.flush_at_commit().await?);
    }
    tracing::info!(services = ?bench.services, "bench starting");
    let per_run = args
        .scenarios
        .iter()
        .map(|s| args.contenders.iter().filter(|c| s.measures(**c)).count())
        .sum::<usize>()
        + if args.scenarios.contains(&Scenario::Backlog) {
            IDEAL_BATCH_ROWS.len() - 1
        } else {
            0
        };
    let progress = progress_bar((per_run * args.runs) as u64);
    // On SIGINT or SIGTERM the trial under way is dropped (which kills its contenders)
    // and cleaned up like any other.
    let outcome = tokio::select! {
        outcome = run_trials(&bench, &args, &progress) => outcome,
        () = crate::worker::next_signal() => Err(anyhow::anyhow!("bench interrupted")),
    };
    if let Err(error) = bench.clean_up().await {
        tracing::warn!("cleaning up after the bench: {error:#}");
    }
    let (mut trials, ideal_batch_trials) = outcome?;
    progress.finish_and_clear();
    report::fill_ratios(&mut trials);
    let summary = report::summarize(&trials);
    print_tables(&summary)?;
    if let Some(path) = &args.json {
        let document = Document {
            revision: git_revision(),
            version: env!("CARGO_PKG_VERSION"),
            machine: Machine {
                cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
                memory_bytes: procstat::memory_total_bytes(),
            },
            parameters: &args,
            summary: &summary,
            trials: &trials,
            ideal_batch_trials: &ideal_batch_trials,
        };
        let text = serde_json::to_string_pretty(&document)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Every trial of every run, in order; see the module guarantee. Returns the trials and,
/// separately, every backlog trial of the ideal consumer (one per statement size).
async fn run_trials(
    bench: &Bench,
    args: &BenchArgs,
    progress: &ProgressBar,
) -> anyhow::Result<(Vec<TrialResult>, Vec<TrialResult>)> {
    let mut trials = Vec::new();
    let mut ideal_batch_trials = Vec::new();
    for run in 1..=args.runs {
        let mut best_rows = IDEAL_BATCH_ROWS[1];
        let mut backlog_rate: HashMap<ContenderKind, f64> = HashMap::new();
        for &scenario in &args.scenarios {
            for &contender in &args.contenders {
                if !scenario.measures(contender) {
                    continue;
                }
                let spec = TrialSpec {
                    run,
                    scenario,
                    contender,
                    batch_rows: best_rows,
                    offered_rate: (scenario == Scenario::Steady)
                        .then(|| backlog_rate.get(&contender).map(|rate| rate / 2.0))
                        .flatten(),
                };
                let result = if contender == ContenderKind::Ideal && scenario == Scenario::Backlog {
                    let mut tried = Vec::new();
                    for rows in IDEAL_BATCH_ROWS {
                        let result = bench
                            .trial(TrialSpec {
                                batch_rows: rows,
                                ..spec
                            })
                            .await?;
                        announce(progress, &result);
                        tried.push(result);
                    }
                    let best = tried
                        .iter()
                        .max_by(|a, b| a.messages_per_second.total_cmp(&b.messages_per_second))
                        .cloned()
                        .expect("three trials");
                    best_rows = best.batch_rows.unwrap_or(best_rows);
                    ideal_batch_trials.extend(tried);
                    best
                } else {
                    let result = bench.trial(spec).await?;
                    announce(progress, &result);
                    result
                };
                if scenario == Scenario::Backlog {
                    backlog_rate.insert(contender, result.messages_per_second);
                }
                trials.push(result);
            }
        }
    }
    Ok((trials, ideal_batch_trials))
}

/// The bench's result on standard output (the command's output, unlike its logs and
/// progress, which go to standard error).
fn print_tables(summary: &[Summary]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}\n", report::throughput_table(summary))?;
    writeln!(out, "{}", report::cost_table(summary))?;
    out.flush()?;
    Ok(())
}

/// A progress bar on a terminal; hidden otherwise (each trial is then logged).
fn progress_bar(trials: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(trials);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} trials, ETA {eta} {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

fn announce(progress: &ProgressBar, result: &TrialResult) {
    let correctness = result
        .correctness
        .as_ref()
        .map_or_else(|| "n/a".to_string(), Correctness::summary);
    // Offsets are committed every 100 ms and looked at every 50 ms: a shorter trial
    // measures the clock more than the contender.
    let short = if result.seconds < SHORTEST_HONEST_TRIAL_SECS {
        " (under 1 s: too short to trust, raise --messages)"
    } else {
        ""
    };
    let line = format!(
        "run {} {:<8} {:<26} {:>9.0} msg/s{}{short} correctness: {correctness}",
        result.run,
        result.scenario.label(),
        result.contender.label(),
        result.messages_per_second,
        result
            .batch_rows
            .map_or_else(String::new, |rows| format!(" ({rows}-row statements)")),
    );
    if progress.is_hidden() {
        tracing::info!("{line}");
    } else {
        progress.println(line);
        progress.inc(1);
    }
}

/// The local mariadbd, Kafka broker and redis-server, found by the ports of the
/// configured URLs (only on loopback: a remote service's CPU cannot be read here).
fn find_services(settings: &Settings) -> Services {
    let local_port = |host: Option<&str>, port: Option<u16>| {
        let host = host?;
        let local =
            host == "localhost" || host.starts_with("127.") || host == "[::1]" || host == "::1";
        local.then_some(port?)
    };
    let database = settings.database.url.parsed().ok();
    let redis = settings.redis.url.parsed().ok();
    let broker = settings.kafka.brokers.split(',').next().unwrap_or_default();
    let (broker_host, broker_port) = broker.rsplit_once(':').unwrap_or((broker, "9092"));
    Services {
        mariadbd: database
            .as_ref()
            .and_then(|u| local_port(u.host_str(), Some(u.port().unwrap_or(3306))))
            .and_then(procstat::listener_pid),
        kafka: local_port(Some(broker_host), broker_port.parse().ok())
            .and_then(procstat::listener_pid),
        redis: redis
            .as_ref()
            .and_then(|u| local_port(u.host_str(), Some(u.port().unwrap_or(6379))))
            .and_then(procstat::listener_pid),
    }
}

fn git_revision() -> Option<String> {
    let output = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}
