//! The write step of a user batch: messages to store wait, in order, and are handed to
//! the shared write stage (`writer`) together, before the lock hold that covers them
//! ends.
//!
//! Guarantee: a batch's results stay a prefix of settled records followed by at most
//! one error, as `Pipeline::process_user_batch` promises: when a write fails, every
//! record from its first message on is reported unsettled (the error in its place,
//! nothing after it), so the caller processes them again — idempotently.

use super::{Job, Outcome, Pipeline};
use crate::message::ChatMessage;
use crate::store::{Provenance, WriteOutcome};

/// The results of a user batch so far: settled ones, and messages waiting to be written.
pub(super) struct Results<'a> {
    /// One per record seen, in order; `None` while its message waits to be written.
    results: Vec<Option<anyhow::Result<Outcome>>>,
    /// The waiting messages: their index in `results`, their record and content.
    waiting: Vec<(usize, &'a Job, &'a ChatMessage)>,
}

impl<'a> Results<'a> {
    pub(super) fn with_capacity(records: usize) -> Self {
        Self {
            results: Vec::with_capacity(records),
            waiting: Vec::new(),
        }
    }

    pub(super) fn settled(&mut self, result: anyhow::Result<Outcome>) {
        self.results.push(Some(result));
    }

    pub(super) fn defer(&mut self, job: &'a Job, message: &'a ChatMessage) {
        self.waiting.push((self.results.len(), job, message));
        self.results.push(None);
    }

    /// Every result, in order. Called after the last write: nothing waits any more.
    pub(super) fn into_results(self) -> Vec<anyhow::Result<Outcome>> {
        debug_assert!(self.waiting.is_empty());
        self.results
            .into_iter()
            .map_while(|result| result)
            .collect()
    }
}

impl Pipeline {
    /// Writes the waiting messages in one transaction and settles them. `false` when the
    /// write failed: the results then end with its error (see the module guarantee).
    pub(super) async fn write_deferred(&self, results: &mut Results<'_>) -> bool {
        let Some(&(first, _, _)) = results.waiting.first() else {
            return true;
        };
        let waiting = std::mem::take(&mut results.waiting);
        let items: Vec<(ChatMessage, Provenance)> = waiting
            .iter()
            .map(|(_, job, message)| {
                let provenance = Provenance {
                    topic: job.origin.topic.clone(),
                    partition: job.origin.partition,
                    offset: job.origin.offset,
                };
                ((*message).clone(), provenance)
            })
            .collect();
        crate::failpoint::delay("slow_db_write").await;
        let written = self.writer.write(items).await;
        match written {
            Ok(outcomes) => {
                fail::fail_point!("after_db_commit", |_| crate::failpoint::crash(
                    "after_db_commit"
                ));
                for ((index, _, _), outcome) in waiting.iter().zip(outcomes) {
                    let outcome = match outcome {
                        WriteOutcome::Stored => Outcome::Stored,
                        WriteOutcome::Duplicate => Outcome::Duplicate,
                    };
                    metrics::counter!("im_ingest_records_total", "outcome" => outcome.label())
                        .increment(1);
                    results.results[*index] = Some(Ok(outcome));
                }
                true
            }
            Err(error) => {
                results.results.truncate(first);
                results.results.push(Some(Err(error)));
                false
            }
        }
    }
}
