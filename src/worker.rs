//! `im-ingest run`: wires the parts together and runs the consumer until shutdown.
//!
//! Guarantee: start-up fails fast with a clear cause (database unreachable, topics not
//! creatable) before any record is consumed; the schema is migrated first when
//! `database.migrate_on_start` is set.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::admin;
use crate::config::Settings;
use crate::consumer;
use crate::health::Health;
use crate::lock::LockClient;
use crate::pipeline::{BatchLimits, Pipeline};
use crate::retry::policy::RetryPolicy;
use crate::retry::publish::{Publisher, TopicLimits};
use crate::store;
use crate::unread::{reconcile, Unread};

/// Builds the processing step from the settings (database pool, lock client, producer);
/// `topics` is what [`consumer::ensure_topics`] found.
pub async fn build_pipeline(settings: &Settings, topics: &TopicLimits) -> anyhow::Result<Pipeline> {
    let pool =
        store::connect_for_writes(&settings.database, settings.lock.row_lock_wait_secs()).await?;
    store::require_natural_keys(&pool).await?;
    let locks = LockClient::new(
        &settings.redis,
        settings.lock.lease(),
        settings.lock.max_hold(),
    )?;
    let publisher = Publisher::new(&settings.kafka, topics)?;
    let policy = RetryPolicy::from_settings(&settings.retry);
    Ok(Pipeline::new(
        pool,
        locks,
        publisher,
        policy,
        settings.kafka.retry_topic.clone(),
        settings.kafka.dlq_topic.clone(),
        settings.kafka.group_id.clone(),
        settings.worker.max_message_bytes,
        Duration::from_millis(settings.redis.probe_interval_ms),
    )
    .with_lock_mode(settings.lock.mode)
    .with_unread_rules(settings.unread.rules())
    .with_batch_limits(BatchLimits::from(&settings.worker)))
}

/// Buckets of the per-batch record and message counts (up to `worker.batch_max_records`
/// and beyond).
const BATCH_COUNT_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// The process-wide metrics registry (Prometheus format), installed on first use.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            // Real histograms (with buckets), not summaries: they aggregate across
            // instances. Latencies from 1 ms to 30 s; batch sizes in powers of two.
            .set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
            .expect("the bucket list is not empty")
            .set_buckets_for_metric(
                Matcher::Full("im_ingest_batch_size".to_string()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
            )
            .expect("the bucket list is not empty")
            .set_buckets_for_metric(
                Matcher::Full("im_ingest_stage_batch_records".to_string()),
                &BATCH_COUNT_BUCKETS,
            )
            .expect("the bucket list is not empty")
            .set_buckets_for_metric(
                Matcher::Full("im_ingest_write_batch_messages".to_string()),
                &BATCH_COUNT_BUCKETS,
            )
            .expect("the bucket list is not empty")
            .install_recorder()
            .expect("the metrics recorder is installed only here, once")
    })
}

/// Runs the worker until `shutdown` completes.
pub async fn run(settings: &Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = metrics_handle().clone();
    crate::metrics_catalog::register_all();
    if settings.database.migrate_on_start {
        store::migrate(&settings.database).await?;
    }
    let topics = consumer::ensure_topics(settings)
        .await
        .context("making sure the topics exist")?;
    let pipeline = build_pipeline(settings, &topics).await?;
    let health = Arc::new(Health::default());
    let upkeep = tokio::spawn(metrics_upkeep(metrics.clone()));
    let reconciler = tokio::spawn(reconcile_noted_agents(
        pipeline.unread(),
        Duration::from_millis(settings.redis.probe_interval_ms),
    ));
    let (_, admin) = admin::serve(settings, health.clone(), &pipeline, metrics).await?;
    let result = consumer::run(
        settings,
        &consumer_subscriptions(settings),
        pipeline,
        health,
        shutdown,
    )
    .await;
    admin.abort();
    upkeep.abort();
    reconciler.abort();
    result
}

/// Agents noted for reconcile (their unread changes could not reach Redis) taken at a
/// time.
const RECONCILE_TURN: u32 = 100;

/// Rebuilds the Redis copy of agents noted while Redis was unreachable, by this process
/// or an earlier one, once Redis answers again (see `unread::reconcile`): every
/// `period`, and at once again after a full turn that rebuilt every agent it read.
async fn reconcile_noted_agents(unread: Unread, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        loop {
            match reconcile::drain_noted(&unread.pool, &unread.copy, RECONCILE_TURN).await {
                Ok((read, rebuilt)) => {
                    if rebuilt > 0 {
                        tracing::info!(
                            agents = rebuilt,
                            "unread copies reconciled after an outage"
                        );
                    }
                    if read < RECONCILE_TURN as usize || rebuilt < read {
                        break;
                    }
                }
                Err(error) => {
                    tracing::debug!(
                        error = format!("{error:#}"),
                        "reconciling noted agents failed; trying again later"
                    );
                    break;
                }
            }
        }
    }
}

/// How often recorded histogram samples are folded into their buckets.
const METRICS_UPKEEP_PERIOD: Duration = Duration::from_secs(5);

/// Folds histogram samples into their buckets now and then. The recorder keeps every
/// sample until then, and only a scrape of `/metrics` would otherwise do it: a worker
/// nobody scrapes grew by a few hundred KB per second under load (measured, see
/// BENCHMARKS.md).
async fn metrics_upkeep(handle: PrometheusHandle) {
    let mut period = tokio::time::interval(METRICS_UPKEEP_PERIOD);
    loop {
        period.tick().await;
        handle.run_upkeep();
    }
}

/// What the instance's consumers subscribe to: the inbound topic, and the delay topics
/// (configuration validation asks for at least one). Both are consumed in the one group, so delay records come back
/// to the same processing step once due; as two members, so each kind is spread over
/// the group (see `consumer::member`).
pub fn consumer_subscriptions(settings: &Settings) -> Vec<Vec<String>> {
    let kafka = &settings.kafka;
    let delays = RetryPolicy::from_settings(&settings.retry).topics(&kafka.retry_topic);
    vec![vec![kafka.inbound_topic.clone()], delays]
}

/// Completes on the first SIGINT or SIGTERM. A second one exits the process at once
/// (uncommitted work is redelivered to the group later: nothing is lost).
pub async fn shutdown_signal() {
    next_signal().await;
    tracing::info!("shutdown requested; a second signal exits at once");
    tokio::spawn(async {
        next_signal().await;
        tracing::warn!("second signal: exiting without finishing in-flight records");
        std::process::exit(130);
    });
}

/// Completes on the next SIGINT or SIGTERM.
pub(crate) async fn next_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the worker");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
