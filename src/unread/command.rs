//! `im-ingest reconcile`: compare every agent's Redis copy with MySQL, report the drift
//! per agent (before, after) and fix it.
//!
//! Guarantee: with `--dry-run` nothing is written; otherwise each agent's copy is
//! rebuilt from MySQL (a count Redis holds at the same version is overwritten too, so a
//! hand-corrupted key is fixed), keeping only changes newer than what was read. The
//! exit code is 0 when every agent was checked, whatever the drift.

use std::io::Write;

use super::copy::UnreadCopy;
use super::reconcile::{reconcile_agent, Drift};
use super::source;
use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// Only this tenant's agents.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only this agent (the `to_user_id`), on every platform.
    #[arg(long)]
    pub agent: Option<String>,
    /// Report the drift without changing Redis.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object (every drifted agent and the totals) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command, printing the report to stdout.
pub async fn run(settings: &Settings, args: &ReconcileArgs) -> anyhow::Result<()> {
    let pool = crate::store::connect(&settings.database).await?;
    let locks = crate::lock::LockClient::new(
        &settings.redis,
        settings.lock.lease(),
        settings.lock.max_hold(),
    )?;
    let copy = UnreadCopy::new(locks.connection());
    let agents = source::agents(&pool, args.tenant.as_deref(), args.agent.as_deref()).await?;
    let mut drifted: Vec<Drift> = Vec::new();
    for agent in &agents {
        let drift = reconcile_agent(&pool, &copy, agent, true, args.dry_run).await?;
        if drift.is_some() {
            drifted.push(drift);
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let report = serde_json::json!({
            "agents_checked": agents.len(),
            "agents_drifted": drifted.len(),
            "dry_run": args.dry_run,
            "drift": drifted,
        });
        writeln!(out, "{report}")?;
        return Ok(());
    }
    for d in &drifted {
        writeln!(
            out,
            "{}/{}/{}: {} conversation(s) off; total in Redis {} -> {} (MySQL {})",
            d.tenant_id,
            d.platform,
            d.agent_id,
            d.conversations,
            shown(d.total_before),
            shown(d.total_after),
            d.total_in_mysql
        )?;
    }
    let verb = if args.dry_run { "would fix" } else { "fixed" };
    writeln!(
        out,
        "{} agent(s) checked, {} drifted ({verb})",
        agents.len(),
        drifted.len()
    )?;
    Ok(())
}

fn shown(total: Option<i64>) -> String {
    total.map_or_else(|| "missing".to_string(), |t| t.to_string())
}
