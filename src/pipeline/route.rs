//! The route stage: a batch's delay and dead-letter records, published all at once.
//!
//! Guarantee: every record routed in a batch is sent concurrently with the others, and
//! it is settled only once the broker acknowledged it (`Publisher`); a send that fails
//! leaves its record unsettled with the error in its place, so the record is processed
//! again. Records after one of their user batch that already failed are not sent (they
//! will be processed again anyway); records of one user batch sent together may still
//! be sent twice when an earlier one of them fails (a duplicate delay record, stored
//! once like any redelivery). The original key and value travel unchanged, with the
//! contract's headers. A record its topic refuses (too large for it) never holds its
//! partition: refused by a delay topic it is dead-lettered as `im_ingest::DelayRefused`,
//! refused by the dead-letter topic it goes there as a stub without its value.

use std::sync::Arc;

use tokio::task::JoinSet;

use super::batch::{Pending, Stages, Step};
use super::{now_millis, Job, Outcome};
use crate::message::UserKey;
use crate::retry::headers::{RetryHeaders, MAX_EXCEPTION_MESSAGE_BYTES};
use crate::retry::publish::{Payload, PublishError, Publisher};

/// Error class of a record that a delay topic refused (too large for it), so it went
/// to the dead-letter topic instead.
pub const DELAY_REFUSED_FQCN: &str = "im_ingest::DelayRefused";
/// Longest key a dead-letter stub keeps: a longer one may be what made the record too
/// large.
const MAX_STUB_KEY_BYTES: usize = 1024;

/// A record to publish to a delay or dead-letter topic.
pub(super) struct Route {
    topic: String,
    headers: RetryHeaders,
    /// For a delay record: its user, whose delayed records all go to one partition.
    user: Option<UserKey>,
    outcome: Outcome,
}

impl Route {
    /// To the delay topic `topic`, due at `due_at` (epoch ms), as attempt `attempts`,
    /// with the error class `fqcn` and the reason.
    pub fn delay(
        job: &Job,
        topic: String,
        attempts: u32,
        due_at: i64,
        fqcn: &str,
        reason: &str,
    ) -> Self {
        Self {
            headers: headers(job, attempts, due_at, fqcn, reason),
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

    /// Publishes the record; one its topic refuses goes on to the dead-letter topic
    /// (from a delay topic) or as a stub (see [`Route::publish_stub`]), so a refusal
    /// never holds the partition. Only a retryable or fatal failure is an error.
    async fn publish(
        self,
        publisher: &Publisher,
        job: &Job,
        dlq_topic: &str,
    ) -> anyhow::Result<Outcome> {
        let refusal = match self.send(publisher, payload(job)).await {
            Ok(()) => return Ok(self.count()),
            Err(PublishError::Refused { topic, source }) => format!(
                "{topic} refused the record ({} bytes): {source}",
                job.record.key_and_value_bytes()
            ),
            Err(other) => return Err(other.into()),
        };
        if self.user.is_none() {
            return self.publish_stub(publisher, job, &refusal).await;
        }
        tracing::warn!(topic = %job.record.topic, partition = job.record.partition,
            offset = job.record.offset, reason = %refusal,
            "a delay topic refused a record; dead-lettering it");
        let dead_letter = Self::dead_letter(
            dlq_topic,
            job,
            self.headers.attempts as u32,
            DELAY_REFUSED_FQCN,
            &refusal,
        );
        match dead_letter.send(publisher, payload(job)).await {
            Ok(()) => Ok(dead_letter.count()),
            // Its exception message already says what the delay topic refused.
            Err(PublishError::Refused { topic, source }) => {
                let refusal = format!("{topic} refused it too: {source}");
                dead_letter.publish_stub(publisher, job, &refusal).await
            }
            Err(other) => Err(other.into()),
        }
    }

    /// Dead-letters the record without its value (and without a long key): the
    /// contract's headers still name it, and the exception message says what was refused
    /// and why. A dead-letter topic that refuses even that is a fatal misconfiguration.
    async fn publish_stub(
        mut self,
        publisher: &Publisher,
        job: &Job,
        refusal: &str,
    ) -> anyhow::Result<Outcome> {
        tracing::error!(topic = %job.record.topic, partition = job.record.partition,
            offset = job.record.offset, reason = %refusal,
            "the dead-letter topic refused a record; dead-lettering it without its value");
        // The refusal first: a long original reason is what gets cut.
        self.headers.exception_message = bounded(format!(
            "{refusal}; dead-lettered without its value; {}",
            self.headers.exception_message
        ));
        let key = job
            .record
            .key
            .as_deref()
            .filter(|key| key.len() <= MAX_STUB_KEY_BYTES);
        let stub = Payload {
            key,
            value: Some(&[]),
        };
        match self.send(publisher, stub).await {
            Ok(()) => {
                metrics::counter!("im_ingest_dead_letter_stubs_total").increment(1);
                Ok(self.count())
            }
            Err(PublishError::Refused { topic, source }) => Err(PublishError::Fatal(format!(
                "{topic} refuses even a dead-letter stub without a value ({source}): raise the \
                 topic's max.message.bytes"
            ))
            .into()),
            Err(other) => Err(other.into()),
        }
    }

    async fn send(&self, publisher: &Publisher, record: Payload<'_>) -> Result<(), PublishError> {
        match &self.user {
            Some(user) => {
                publisher
                    .publish_for_user(&self.topic, record, &self.headers, user)
                    .await
            }
            None => publisher.publish(&self.topic, record, &self.headers).await,
        }
    }

    /// Counts the published record and returns its outcome.
    fn count(self) -> Outcome {
        match self.user {
            Some(_) => metrics::counter!("im_ingest_retries_total", "attempt" => self.headers.attempts.to_string())
                .increment(1),
            None => metrics::counter!("im_ingest_dead_letters_total", "reason" => self.headers.exception_fqcn)
                .increment(1),
        }
        self.outcome
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
                let (publisher, dlq_topic) = (self.publisher.clone(), self.dlq_topic.clone());
                sends.spawn(async move {
                    (
                        unit,
                        index,
                        route.publish(&publisher, &job, &dlq_topic).await,
                    )
                });
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
        exception_message: bounded(message.to_string()),
        replay_count: crate::retry::headers::replay_count(job.record.headers.as_ref()),
    }
}

/// `message` cut to [`MAX_EXCEPTION_MESSAGE_BYTES`] (on a character boundary), so the
/// headers fit in the room the topics keep for them.
fn bounded(mut message: String) -> String {
    if message.len() > MAX_EXCEPTION_MESSAGE_BYTES {
        let mut end = MAX_EXCEPTION_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_exception_message_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_EXCEPTION_MESSAGE_BYTES);
        let cut = bounded(long);
        assert!(
            cut.len() <= MAX_EXCEPTION_MESSAGE_BYTES && cut.len() > MAX_EXCEPTION_MESSAGE_BYTES - 2
        );
        assert_eq!(bounded("short".into()), "short");
    }
}
