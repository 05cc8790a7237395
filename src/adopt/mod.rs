//! `im-ingest adopt --dry-run|--apply`: take over a database whose tables are shaped like
//! the worker's but were filled without the unique keys, duplicates included.
//!
//! Guarantee: `--dry-run` only reads. `--apply` converts the id columns to
//! `utf8mb4_bin`, merges every natural key's rows into the lowest id (see `merge`),
//! recounts unread counts and clears the touched agents' Redis copies (noting them for
//! the workers to rebuild), adds the unique keys (online where the server can), records
//! the migrations as applied, and ends with the check `run` makes: when it returns Ok,
//! `im-ingest run` starts. Every step is idempotent and each key is merged in one
//! transaction (message keys, which nothing references, up to 200 per transaction), so
//! a run killed anywhere and run again reaches the same end state; a writer still
//! inserting meanwhile is merged again until the keys are in.

mod finish;
mod merge;
mod scan;

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::config::Settings;
use crate::store::{ADOPT_MARKER, NATURAL_KEYS};
use crate::unread::copy::Agent;
use finish::KeysAdded;
use merge::{Merged, Pace};
use scan::Survey;

use merge::MAP_TABLE;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["dry_run", "apply"])))]
pub struct AdoptArgs {
    /// Report the duplicates, the columns to convert and the keys to add; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Merge the duplicates, convert the id columns, add the unique keys.
    #[arg(long)]
    pub apply: bool,
    /// Duplicate keys found and merged per batch (each customer or session key in its
    /// own transaction, message keys up to 200 per transaction).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
    /// Pause after each batch, leaving the database to its other clients.
    #[arg(long, default_value_t = 10, value_name = "MS")]
    pub pause_ms: u64,
    /// Merge-then-add-keys rounds before giving up on a writer that keeps making
    /// duplicates (stop it for a moment, then run adopt again).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rounds: u32,
    /// Print one JSON object (before, after) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `--apply` did.
#[derive(Debug, Default, Serialize)]
pub struct Applied {
    pub customer: Merged,
    pub session: Merged,
    pub message: Merged,
    /// Rows a writer pointed at a loser after its merge, moved to the survivor (sessions
    /// that met one of the survivor's merged into it).
    pub stragglers: Merged,
    pub columns_converted: Vec<String>,
    pub keys_added: Vec<String>,
    pub sessions_recounted: u64,
    pub agents_cleared: usize,
    pub rounds: u32,
    pub seconds: f64,
}

/// Runs the command, printing the report to stdout.
pub async fn run(settings: &Settings, args: &AdoptArgs) -> anyhow::Result<()> {
    let pool = crate::store::connect(&settings.database).await?;
    scan::require_our_shape(&pool).await?;
    let before = Survey::read(&pool).await?;
    anyhow::ensure!(
        args.dry_run || before.to_fix_by_hand.is_empty(),
        "adopt leaves these to you: {}; then run adopt again",
        before.to_fix_by_hand.join("; ")
    );
    let applied = match args.apply {
        true => Some(apply(settings, &pool, args).await?),
        false => None,
    };
    let after = match args.apply {
        true => Some(Survey::read(&pool).await?),
        false => None,
    };
    pool.close().await;
    let mut out = std::io::stdout().lock();
    if args.json {
        let report = serde_json::json!({
            "dry_run": args.dry_run,
            "before": before,
            "applied": applied,
            "after": after,
        });
        writeln!(out, "{report}")?;
        return Ok(());
    }
    write_survey(&mut out, "before", &before)?;
    match (applied, after) {
        (Some(applied), Some(after)) => {
            write_applied(&mut out, &applied)?;
            write_survey(&mut out, "after", &after)?;
        }
        _ => writeln!(out, "dry run: nothing changed")?,
    }
    Ok(())
}

async fn apply(
    settings: &Settings,
    pool: &sqlx::MySqlPool,
    args: &AdoptArgs,
) -> anyhow::Result<Applied> {
    let started = Instant::now();
    let pace = Pace {
        batch: args.batch,
        pause: Duration::from_millis(args.pause_ms),
    };
    let progress = indicatif::ProgressBar::new_spinner();
    progress.enable_steady_tick(Duration::from_millis(200));
    let mut applied = Applied::default();
    // First the marker (run and migrate refuse while it exists), the worker's own table,
    // the migrations recorded, the map; last of all the marker goes.
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {ADOPT_MARKER} (started_at DATETIME(3) NOT NULL \
         DEFAULT CURRENT_TIMESTAMP(3)) ENGINE = InnoDB"
    ))
    .execute(pool)
    .await
    .context("creating the adopt marker table")?;
    finish::create_worker_tables(pool).await?;
    finish::record_migrations(pool).await?;
    merge::create_map_table(pool).await?;
    progress.set_message("converting id columns");
    applied.columns_converted = finish::convert_columns(pool).await?;
    applied.keys_added.extend(finish::name_indexes(pool).await?);
    loop {
        applied.rounds += 1;
        // Customers first: merging them makes their sessions share keys, and merging
        // sessions makes their messages share sessions.
        let [customer, session, message] = &NATURAL_KEYS;
        applied
            .customer
            .add(merge::merge_pass(pool, customer, pace, &progress).await?);
        applied
            .session
            .add(merge::merge_pass(pool, session, pace, &progress).await?);
        applied
            .message
            .add(merge::merge_pass(pool, message, pace, &progress).await?);
        progress.set_message("moving rows written with merged ids");
        applied
            .stragglers
            .add(merge::repoint_stragglers(pool, pace).await?);
        progress.set_message("adding the unique keys");
        match finish::add_keys(pool).await? {
            KeysAdded::All(tables) => {
                applied.keys_added.extend(tables);
                break;
            }
            KeysAdded::NewDuplicates { added, cause } if applied.rounds < args.max_rounds => {
                applied.keys_added.extend(added);
                tracing::info!(
                    round = applied.rounds,
                    cause,
                    "a writer made new duplicates; merging again"
                );
            }
            KeysAdded::NewDuplicates { cause, .. } => anyhow::bail!(
                "a writer kept making duplicates through {} rounds ({cause}): stop it for a \
                 moment and run adopt again (it goes on from here)",
                applied.rounds
            ),
        }
    }
    // Any rows referencing a loser that slipped in while the keys were added.
    applied
        .stragglers
        .add(merge::repoint_stragglers(pool, pace).await?);
    progress.set_message("recounting unread counts");
    let (recounted, mut agents) = finish::recount_sessions(
        pool,
        i64::from(args.batch) * 50,
        pace.pause,
        settings.unread.expire_after_ms(),
    )
    .await?;
    applied.sessions_recounted = recounted;
    agents.extend(finish::agents_of_merged_sessions(pool).await?);
    clear_copies(settings, pool, &agents).await?;
    applied.agents_cleared = agents.len();
    sqlx::query(&format!("DROP TABLE IF EXISTS {ADOPT_MARKER}"))
        .execute(pool)
        .await
        .context("dropping the adopt marker table")?;
    crate::store::require_natural_keys(pool)
        .await
        .context("after adopt")?;
    progress.finish_and_clear();
    applied.seconds = started.elapsed().as_secs_f64();
    Ok(applied)
}

/// Deletes the agents' Redis copies, so readers and writers rebuild them from MySQL, and
/// notes them for the workers to rebuild (which also covers a Redis that is down now).
async fn clear_copies(
    settings: &Settings,
    pool: &sqlx::MySqlPool,
    agents: &BTreeSet<Agent>,
) -> anyhow::Result<()> {
    if agents.is_empty() {
        return Ok(());
    }
    crate::unread::reconcile::note(pool, agents)
        .await
        .context("noting the agents whose Redis copies to rebuild")?;
    let deleted = async {
        let client = crate::redis_client::open(&settings.redis)?;
        let config = crate::redis_client::timeouts(&settings.redis);
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        for agent in agents {
            redis::cmd("DEL")
                .arg(agent.key())
                .arg(agent.times_key())
                .query_async::<()>(&mut connection)
                .await?;
        }
        anyhow::Ok(())
    };
    if let Err(error) = deleted.await {
        tracing::warn!(
            error = crate::telemetry::error_line(&error),
            "could not clear the Redis copies now; the workers rebuild the noted agents"
        );
    }
    Ok(())
}

fn write_survey(out: &mut impl Write, title: &str, survey: &Survey) -> std::io::Result<()> {
    writeln!(out, "{title}:")?;
    if survey.unfinished {
        writeln!(
            out,
            "  an earlier --apply did not finish: --apply goes on from there"
        )?;
    }
    for (table, found) in [
        ("customer", survey.customer),
        ("session", survey.session),
        ("message", survey.message),
    ] {
        writeln!(
            out,
            "  {table}: {} keys held by more than one row, {} rows to remove",
            found.keys, found.extra_rows
        )?;
        if found.rows_without_key > 0 {
            writeln!(
                out,
                "  {table}: {} rows with a NULL in the key, left as they are (no unique key \
                 covers them and the worker never finds them)",
                found.rows_without_key
            )?;
        }
    }
    if survey.customer.keys > 0 {
        writeln!(
            out,
            "  (merging customers can make more sessions share a key)"
        )?;
    }
    let list = |items: &[String]| match items.is_empty() {
        true => "none".to_string(),
        false => items.join(", "),
    };
    writeln!(
        out,
        "  id columns to convert to utf8mb4_bin: {}",
        list(&survey.columns_to_convert)
    )?;
    writeln!(out, "  unique keys to add: {}", list(&survey.keys_to_add))?;
    for fix in &survey.to_fix_by_hand {
        writeln!(out, "  to fix by hand before --apply: {fix}")?;
    }
    if survey.is_adopted() {
        writeln!(out, "  nothing to do: the database has its keys")?;
    }
    Ok(())
}

fn write_applied(out: &mut impl Write, applied: &Applied) -> std::io::Result<()> {
    writeln!(
        out,
        "applied in {:.1} s ({} round(s)):",
        applied.seconds, applied.rounds
    )?;
    for (table, merged) in [
        ("customer", applied.customer),
        ("session", applied.session),
        ("message", applied.message),
    ] {
        writeln!(
            out,
            "  {table}: {} keys merged, {} rows removed, {} rows of other tables repointed",
            merged.keys, merged.removed, merged.repointed
        )?;
    }
    writeln!(
        out,
        "  rows written with a merged id: {} moved, {} sessions merged into one the survivor had",
        applied.stragglers.repointed, applied.stragglers.removed
    )?;
    writeln!(
        out,
        "  sessions recounted: {}; agents' Redis copies cleared: {}",
        applied.sessions_recounted, applied.agents_cleared
    )?;
    writeln!(
        out,
        "  unique keys added: {}; loser → survivor map: table {MAP_TABLE}",
        match applied.keys_added.is_empty() {
            true => "none".to_string(),
            false => applied.keys_added.join(", "),
        }
    )?;
    writeln!(
        out,
        "the database has its unique keys: `im-ingest run` can start"
    )
}
