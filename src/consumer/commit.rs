//! Committing the stored offsets synchronously: on revoke and at shutdown.
//!
//! Guarantee: a commit the coordinator refuses because a rebalance is in progress
//! (REBALANCE_IN_PROGRESS) is tried again, up to [`COMMIT_ATTEMPTS`] times
//! [`COMMIT_PAUSE`] apart, instead of being dropped (dropped, the partitions' next owner
//! would redeliver everything since the last periodic commit). Nothing stored since the
//! last commit is not an error. The pauses block the calling thread (the commit call
//! itself does), at most 400 ms in all.

use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// Commit attempts when a rebalance is in progress.
const COMMIT_ATTEMPTS: u32 = 5;
const COMMIT_PAUSE: Duration = Duration::from_millis(100);

/// Commits what is stored; `when` names the occasion in the log.
pub fn commit_stored<C: ConsumerContext>(consumer: &impl Consumer<C>, when: &str) {
    for attempt in 1..=COMMIT_ATTEMPTS {
        match commit_once(consumer) {
            Ok(()) => {
                tracing::info!(when, "offsets committed");
                return;
            }
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {
                tracing::debug!(when, "no new offsets to commit");
                return;
            }
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::RebalanceInProgress))
                if attempt < COMMIT_ATTEMPTS =>
            {
                tracing::info!(
                    when,
                    attempt,
                    "commit refused: a rebalance is in progress; trying again"
                );
                metrics::counter!("im_ingest_commit_retries_total").increment(1);
                std::thread::sleep(COMMIT_PAUSE);
            }
            Err(error) => {
                tracing::warn!(when, %error, "committing offsets failed; the next owner redelivers from the last commit");
                return;
            }
        }
    }
}

/// One synchronous commit; the `commit_rebalance_in_progress` fail point makes it fail
/// as the coordinator does during a rebalance.
fn commit_once<C: ConsumerContext>(consumer: &impl Consumer<C>) -> Result<(), KafkaError> {
    fail::fail_point!("commit_rebalance_in_progress", |_| Err(
        KafkaError::ConsumerCommit(RDKafkaErrorCode::RebalanceInProgress)
    ));
    consumer.commit_consumer_state(CommitMode::Sync)
}
