//! The command line: `im-ingest [--config FILE] <command>`.
//!
//! Guarantee: every command loads the same layered settings (see [`crate::config`]) and
//! returns an error instead of exiting, so `main` prints one line and exits non-zero.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::preflight::{self, Needs};
use crate::{config, store, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "im-ingest",
    version,
    about = "Idempotent Kafka consumer that stores chat messages in MySQL exactly once in effect",
    long_about = "Idempotent Kafka consumer that stores chat messages in MySQL exactly once \
in effect.\n\nSettings come from built-in defaults, then one TOML file (--config, else \
config/default.toml if present), then environment variables IM_INGEST__SECTION__KEY \
(e.g. IM_INGEST__KAFKA__BROKERS), which win."
)]
pub struct Cli {
    /// TOML settings file. Without it, config/default.toml is used if present, else the
    /// built-in defaults. Environment variables IM_INGEST__SECTION__KEY override it.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker: consume the inbound topic in the consumer group and store every
    /// message, customer and session exactly once in effect. Stops on SIGINT/SIGTERM.
    Run,
    /// Create the database if missing and apply pending schema migrations (idempotent).
    Migrate,
    /// Compare every agent's unread copy in Redis with MySQL (the truth), report the
    /// drift per agent (conversations off, total before and after) and fix it. Safe
    /// while workers run: only changes newer than what it read are kept.
    Reconcile(crate::unread::command::ReconcileArgs),
    /// Push records of a topic through the worker again: republish them (default: to
    /// the inbound topic) with their key, value and timestamp, as first attempts, with
    /// `im_ingest-replay-count` one higher; a record replayed `--max-replays` times is
    /// refused. Range (partitions, offsets, times) and filters (tenant, customer,
    /// message id, error class) narrow it; `--dry-run` publishes nothing; `--process`
    /// writes the records here through the worker's pipeline instead; `--checkpoint`
    /// makes it resumable, each record republished once. Reads the topic without
    /// joining any group.
    Replay(crate::replay::ReplayArgs),
    /// Check that the database matches a topic (default: the inbound topic, all of it):
    /// every valid message stored once with its content, time, customer and session;
    /// nicknames, last message times and read watermarks as the records imply; unread
    /// counts equal to their rows. Dead-lettered records are reported with their reason,
    /// apart from lost ones. Exit code 1 on any mismatch, naming the first ones with
    /// their partition and offset. Reads the topic without joining any group.
    Verify(crate::verify::VerifyArgs),
    /// Measure im-ingest against its limits and alternatives, side by side: the worker
    /// as shipped, with `lock.mode = none`, a naive check-then-insert writer, a no-op
    /// consumer (Kafka read limit) and an ideal batched writer (database write limit),
    /// each as its own process on fresh topics and databases, on several scenarios.
    /// Prints a table (median of interleaved runs, min–max) and optionally JSON.
    /// Uses the configured Kafka, database server and Redis; creates and removes its
    /// own topics and databases (`im_bench…`).
    Bench(crate::bench::BenchArgs),
    /// Take over a database whose tables are shaped like the worker's but lack the
    /// unique keys (and so may hold duplicates): convert the id columns to utf8mb4_bin,
    /// merge each natural key's rows into the lowest id (profile newest-wins, greatest
    /// times; references repointed; loser → survivor kept in `adopt_merged`), recount
    /// unread counts, add the unique keys online, and hand over to `run`. Small batches
    /// with a pause; safe while a writer still inserts; a killed run goes on when run
    /// again. `--dry-run` reports and changes nothing.
    Adopt(crate::adopt::AdoptArgs),
    /// Run one reference consumer of `bench` as its own process (started by `bench`;
    /// useful on its own to profile one). Consumes `kafka.inbound_topic` in
    /// `kafka.group_id` until SIGINT/SIGTERM.
    BenchContender(crate::bench::contender::ContenderArgs),
}

impl Command {
    /// The dependencies the command connects to, probed before it starts (a wrong
    /// password or certificate fails there, naming the dependency).
    fn needs(&self) -> Needs {
        let only = |kafka, database, redis| Needs {
            kafka,
            database,
            redis,
        };
        match self {
            Command::Run | Command::Bench(_) | Command::BenchContender(_) => Needs::ALL,
            Command::Migrate => only(false, true, false),
            Command::Adopt(args) => only(false, true, args.apply),
            Command::Reconcile(_) => only(false, true, true),
            Command::Verify(_) => only(true, true, false),
            Command::Replay(args) => only(true, args.process, args.process),
        }
    }
}

/// Runs the parsed command to completion.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let (settings, source) = config::load(cli.config.as_deref())?;
    telemetry::init(&settings.log)?;
    tracing::debug!(%source, ?settings, "settings loaded");
    preflight::check(&settings, cli.command.needs()).await?;
    match cli.command {
        Command::Run => crate::worker::run(&settings, crate::worker::shutdown_signal()).await?,
        Command::Bench(args) => crate::bench::run(&settings, cli.config.as_deref(), args).await?,
        Command::BenchContender(args) => {
            crate::bench::contender::run(&settings, &args, crate::worker::shutdown_signal()).await?
        }
        Command::Reconcile(args) => crate::unread::command::run(&settings, &args).await?,
        Command::Verify(args) => crate::verify::run(&settings, &args).await?,
        Command::Replay(args) => crate::replay::run(&settings, &args).await?,
        Command::Adopt(args) => crate::adopt::run(&settings, &args).await?,
        Command::Migrate => {
            store::migrate(&settings.database).await?;
            tracing::info!(database = %settings.database.url, "migrations applied");
        }
    }
    Ok(())
}
