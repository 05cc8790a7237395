//! Committing the stored offsets synchronously: on revoke and at shutdown.
//!
//! Guarantee: at shutdown, a commit the coordinator refuses because a rebalance is in
//! progress (REBALANCE_IN_PROGRESS) is tried again, up to [`COMMIT_ATTEMPTS`] times
//! [`COMMIT_PAUSE`] apart (an async pause: no runtime thread is blocked), instead of
//! being dropped — dropped, the partitions' next owner would redeliver everything since
//! the last periodic commit. On revoke the commit is made once: it runs inside the
//! rebalance callback, within `recv()`, where a pause would stall the poll loop; what it
//! fails to commit is redelivered to the next owner and stored once. Nothing stored
//! since the last commit is not an error.

use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// Commit attempts at shutdown when a rebalance is in progress.
const COMMIT_ATTEMPTS: u32 = 5;
const COMMIT_PAUSE: Duration = Duration::from_millis(100);

/// The revoke-time commit: one attempt (see the module guarantee).
pub fn commit_on_revoke<C: ConsumerContext>(consumer: &impl Consumer<C>) {
    let _ = log_commit(commit_once(consumer), "on revoke");
}

/// The shutdown commit, tried again while a rebalance is in progress.
pub async fn commit_at_shutdown<C: ConsumerContext>(consumer: &impl Consumer<C>) {
    for attempt in 1..=COMMIT_ATTEMPTS {
        let refused = log_commit(commit_once(consumer), "at shutdown");
        if !refused || attempt == COMMIT_ATTEMPTS {
            return;
        }
        tracing::info!(
            attempt,
            "commit refused: a rebalance is in progress; trying again"
        );
        metrics::counter!("im_ingest_commit_retries_total").increment(1);
        tokio::time::sleep(COMMIT_PAUSE).await;
    }
}

/// Logs a commit's result; returns whether it was refused for a rebalance in progress.
fn log_commit(result: Result<(), KafkaError>, when: &str) -> bool {
    match result {
        Ok(()) => tracing::info!(when, "offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {
            tracing::debug!(when, "no new offsets to commit");
        }
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::RebalanceInProgress)) => return true,
        Err(error) => tracing::warn!(when, %error,
            "committing offsets failed; the next owner redelivers from the last commit"),
    }
    false
}

/// One synchronous commit; the `commit_rebalance_in_progress` fail point makes it fail
/// as the coordinator does during a rebalance.
fn commit_once<C: ConsumerContext>(consumer: &impl Consumer<C>) -> Result<(), KafkaError> {
    fail::fail_point!("commit_rebalance_in_progress", |_| Err(
        KafkaError::ConsumerCommit(RDKafkaErrorCode::RebalanceInProgress)
    ));
    consumer.commit_consumer_state(CommitMode::Sync)
}
