//! The route stage: a batch's delay and dead-letter records, published all at once.
//!
//! Guarantee: every record routed in a batch is sent concurrently with the others, and
//! it is settled only once the broker acknowledged it (`Publisher`); a send that fails
//! leaves its record unsettled with the error in its place, so the record is processed
//! again. Records after one of their user batch that already failed are not sent (they
//! will be processed again anyway); records of one user batch sent together may still
//! be sent twice when an earlier one of them fails (a duplicate delay record, stored
//! once like any redelivery). The original key and value travel unchanged, with the contract's headers.

use std::sync::Arc;

use tokio::task::JoinSet;

use super::batch::{Pending, Stages, Step};
use super::{now_millis, Job, Outcome};
use crate::message::UserKey;
use crate::retry::headers::RetryHeaders;
use crate::retry::publish::{Payload, Publisher};

/// A record to publish to a delay or dead-letter topic.
pub(super) struct Route {
    topic: String,
    headers: RetryHeaders,
    /// For a delay record: its user, whose delayed records all go to one partition.
    user: Option<UserKey>,
    outcome: Outcome,
}

impl Route {
    /// To the delay topic `topic`, due at `due_at` (epoch ms), as attempt `attempts`.
    pub fn delay(job: &Job, topic: String, attempts: u32, due_at: i64, reason: &str) -> Self {
        Self {
            headers: headers(job, attempts, due_at, super::LOCK_HELD_FQCN, reason),
            user: job.user(),
            outcome: Outcome::Delayed {
                topic: topic.clone(),
            },
            topic,
        }
    }

    /// To the dead-letter topic, with the error class `fqcn` and the reason.
    pub fn dead_letter(
        dlq_topic: &str,
        job: &Job,
        attempts: u32,
        fqcn: &str,
        reason: &str,
    ) -> Self {
        Self {
            topic: dlq_topic.to_string(),
            headers: headers(job, attempts, now_millis(), fqcn, reason),
            user: None,
            outcome: Outcome::DeadLettered {
                reason: reason.to_string(),
            },
        }
    }

    async fn publish(self, publisher: &Publisher, job: &Job) -> anyhow::Result<Outcome> {
        match &self.user {
            Some(user) => {
                publisher
                    .publish_for_user(&self.topic, payload(job), &self.headers, user)
                    .await?;
                metrics::counter!("im_ingest_retries_total", "attempt" => self.headers.attempts.to_string())
                    .increment(1);
            }
            None => {
                publisher
                    .publish(&self.topic, payload(job), &self.headers)
                    .await?;
                metrics::counter!("im_ingest_dead_letters_total", "reason" => self.headers.exception_fqcn.clone())
                    .increment(1);
            }
        }
        Ok(self.outcome)
    }
}

impl Stages {
    /// Publishes every routed record of the batch concurrently and settles each with
    /// its acknowledgement.
    pub(super) async fn route(&self, batch: &mut [Pending]) {
        let mut sends = JoinSet::new();
        for (unit, pending) in batch.iter_mut().enumerate() {
            let mut failed = false;
            for (index, step) in pending.steps.iter_mut().enumerate() {
                // Past a record that failed, nothing of the user batch is reported, so
                // a record published there would be published again when it is retried.
                failed |= matches!(step, Step::Settled(Err(_)) | Step::Unsettled);
                if !matches!(step, Step::Route(_)) {
                    continue;
                }
                if failed {
                    *step = Step::Unsettled;
                    continue;
                }
                let Step::Route(route) = std::mem::replace(step, Step::Unsettled) else {
                    unreachable!("matched just above");
                };
                let job: Arc<Job> = pending.jobs[index].clone();
                let publisher = self.publisher.clone();
                sends.spawn(async move { (unit, index, route.publish(&publisher, &job).await) });
            }
        }
        let mut delayed = false;
        while let Some(sent) = sends.join_next().await {
            // A panicked send leaves its record unsettled: it is processed again.
            let Ok((unit, index, result)) = sent else {
                continue;
            };
            delayed |= matches!(result, Ok(Outcome::Delayed { .. }));
            batch[unit].steps[index] = Step::Settled(result);
        }
        if delayed {
            fail::fail_point!("after_delay_publish", |_| crate::failpoint::crash(
                "after_delay_publish"
            ));
        }
    }
}

/// The source record's key and value, unchanged.
fn payload(job: &Job) -> Payload<'_> {
    Payload {
        key: job.record.key.as_deref(),
        value: job.record.value.as_deref(),
    }
}

fn headers(job: &Job, attempts: u32, due_at: i64, fqcn: &str, message: &str) -> RetryHeaders {
    RetryHeaders {
        attempts: i64::from(attempts),
        backoff_timestamp: due_at,
        origin: job.origin.clone(),
        exception_fqcn: fqcn.to_string(),
        exception_message: message.to_string(),
    }
}
