//! The write step of a user batch: messages to store wait, in order, and are handed to
//! the shared write stage (`writer`) together, before the lock hold that covers them
//! ends.
//!
//! Guarantee: a batch's results stay a prefix of settled records followed by at most
//! one error, as `Pipeline::process_user_batch` promises: when a write fails, every
//! record from its first message on is reported unsettled (the error in its place,
//! nothing after it), so the caller processes them again — idempotently. When the
//! database refuses the data itself (see [`is_refusal`]), the messages are written one
//! by one and only the refused one is dead-lettered (`im_ingest::DatabaseRejected`).

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
            .map(|(_, job, message)| ((*message).clone(), provenance(job)))
            .collect();
        crate::failpoint::delay("slow_db_write").await;
        let written = self.writer.write(items).await;
        match written {
            Ok(outcomes) => {
                fail::fail_point!("after_db_commit", |_| crate::failpoint::crash(
                    "after_db_commit"
                ));
                for ((index, _, _), outcome) in waiting.iter().zip(outcomes) {
                    settle(results, *index, outcome);
                }
                true
            }
            Err(error) if is_refusal(&error) => self.isolate(results, waiting).await,
            Err(error) => {
                results.results.truncate(first);
                results.results.push(Some(Err(error)));
                false
            }
        }
    }

    /// The database refused the batch's rows: each message is written alone, and one
    /// that is refused again goes to the dead-letter topic as `DatabaseRejected` with
    /// the database's reason — the partition moves on, and no other record is lost.
    async fn isolate(
        &self,
        results: &mut Results<'_>,
        waiting: Vec<(usize, &Job, &ChatMessage)>,
    ) -> bool {
        for (index, job, message) in waiting {
            let provenance = provenance(job);
            let written = self.writer.write(vec![(message.clone(), provenance)]).await;
            let outcome = match written {
                Ok(mut outcomes) => Ok(outcomes.pop().expect("one message, one outcome")),
                Err(error) if is_refusal(&error) => {
                    let reason = format!("{error:#}");
                    tracing::warn!(%reason, "the database refused a message; dead-lettering it");
                    match self
                        .dead_letter(job, job.attempts, DATABASE_REJECTED_FQCN, &reason)
                        .await
                    {
                        Ok(outcome) => {
                            metrics::counter!("im_ingest_records_total", "outcome" => outcome.label())
                                .increment(1);
                            results.results[index] = Some(Ok(outcome));
                            continue;
                        }
                        Err(error) => Err(error),
                    }
                }
                Err(error) => Err(error),
            };
            match outcome {
                Ok(outcome) => settle(results, index, outcome),
                Err(error) => {
                    results.results.truncate(index);
                    results.results.push(Some(Err(error)));
                    return false;
                }
            }
        }
        true
    }
}

/// Error class of messages whose rows the database refuses (DESIGN.md, "Dead-letter").
pub const DATABASE_REJECTED_FQCN: &str = "im_ingest::DatabaseRejected";

/// MySQL/MariaDB errors that refuse the data itself, so running the same rows again can
/// never succeed: a trigger's `SIGNAL` (1644), data too long (1406), an incorrect
/// string value (1366), a NULL into a NOT NULL column (1048), a foreign key (1452) or a
/// CHECK constraint (3819 MySQL, 4025 MariaDB). Anything else — a lost connection, a
/// timeout, a full disk — is worth retrying.
fn is_refusal(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<sqlx::Error>())
        .filter_map(|sqlx_error| match sqlx_error {
            sqlx::Error::Database(db) => db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .map(|e| e.number()),
            _ => None,
        })
        .any(|number| matches!(number, 1644 | 1406 | 1366 | 1048 | 1452 | 3819 | 4025))
}

fn provenance(job: &Job) -> Provenance {
    Provenance {
        topic: job.origin.topic.clone(),
        partition: job.origin.partition,
        offset: job.origin.offset,
    }
}

fn settle(results: &mut Results<'_>, index: usize, outcome: WriteOutcome) {
    let outcome = match outcome {
        WriteOutcome::Stored => Outcome::Stored,
        WriteOutcome::Duplicate => Outcome::Duplicate,
    };
    metrics::counter!("im_ingest_records_total", "outcome" => outcome.label()).increment(1);
    results.results[index] = Some(Ok(outcome));
}
