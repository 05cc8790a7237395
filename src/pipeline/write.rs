//! The write stage: every message of the batch to store, in one transaction; when that
//! fails, user batch by user batch; when the database refuses a user batch's rows,
//! message by message.
//!
//! Guarantee: a message is settled `Stored` or `Duplicate` only after the transaction
//! that wrote it committed. A combined transaction is tried once, bounded in time (see
//! `store::BatchConnection`), so a deadlock, a row lock held by an outside transaction
//! or one user's refused data costs the others one failed attempt, not a wait: each
//! user batch is then written alone, and one that still fails leaves its messages
//! unsettled (its caller processes them again with a growing pause) without holding
//! up the rest. A message whose rows the database refuses (see [`is_refusal`]) goes to
//! the dead-letter topic as `im_ingest::DatabaseRejected` with the database's reason;
//! the partition moves on and no other record is lost. Under a user lock, no
//! transaction starts that could outlast the batch's hold (`lock.max_hold_ms`), and a
//! user batch whose lease was lost writes nothing more: their messages go through the
//! delay topics as a new attempt (`im_ingest::HoldExceeded`, `im_ingest::LeaseLost`),
//! or, with no attempt left, stay unsettled for their caller to process again.

use super::batch::{Pending, Stages, Step};
use super::route::Route;
use super::{Job, Outcome};
use crate::lock::LockGuard;
use std::collections::BTreeSet;

use crate::message::Inbound;
use crate::retry::policy::NextStep;
use crate::store::{
    self, BatchConnection, BatchItem, BatchWriteError, ConversationUnread, Provenance, WriteOutcome,
};
use crate::unread::copy::Agent;

/// Error class of messages whose rows the database refuses (DESIGN.md, "Dead-letter").
pub const DATABASE_REJECTED_FQCN: &str = "im_ingest::DatabaseRejected";

/// What the write stage hands to the unread copy (see `unread`).
#[derive(Debug, Default)]
pub(super) struct UnreadChanges {
    /// The unread state of every conversation a committed transaction touched.
    pub committed: Vec<ConversationUnread>,
    /// Agents of a write given up while it may have committed (a stall that the
    /// database did not answer): their copies are reconciled from MySQL.
    pub uncertain: BTreeSet<Agent>,
}

/// Why a user batch's writes were left to a later attempt.
#[derive(Debug, Clone, Copy)]
enum Abandoned {
    /// The next transaction could have run past the end of the lock's hold.
    HoldExceeded,
    /// The lease was lost: another holder may be writing this user now.
    LeaseLost,
}

impl Abandoned {
    /// The error class the delay records carry.
    fn fqcn(self) -> &'static str {
        match self {
            Abandoned::HoldExceeded => "im_ingest::HoldExceeded",
            Abandoned::LeaseLost => "im_ingest::LeaseLost",
        }
    }

    /// The `reason` label of `im_ingest_abandoned_writes_total`.
    fn label(self) -> &'static str {
        match self {
            Abandoned::HoldExceeded => "hold_exceeded",
            Abandoned::LeaseLost => "lease_lost",
        }
    }

    fn reason(self, max_hold: std::time::Duration) -> String {
        match self {
            Abandoned::HoldExceeded => format!(
                "the write could outlast the user lock's hold of {} ms (lock.max_hold_ms)",
                max_hold.as_millis()
            ),
            Abandoned::LeaseLost => "the user lock's lease was lost before the write".into(),
        }
    }
}

impl Stages {
    /// Writes every message and read receipt of the batch that is to be written (see
    /// the module guarantee); returns what the unread copy must learn.
    pub(super) async fn write(
        &self,
        connection: &mut BatchConnection,
        batch: &mut [Pending],
    ) -> UnreadChanges {
        let mut unread = UnreadChanges::default();
        let writers: Vec<usize> = (0..batch.len())
            .filter(|unit| batch[*unit].to_write().next().is_some())
            .collect();
        if writers.is_empty() {
            return unread;
        }
        crate::failpoint::delay("slow_db_write").await;
        let writers: Vec<usize> = writers
            .into_iter()
            .filter(|unit| !self.abandon_if_lease_lost(&mut batch[*unit]))
            .collect();
        // A user whose last write stalled is written alone, so a row lock held outside
        // does not hold up every batch the user's retries join.
        let (alone, together): (Vec<usize>, Vec<usize>) = writers
            .into_iter()
            .partition(|unit| self.stalled_before(&batch[*unit]));
        let together = if together.len() > 1 {
            self.write_together(connection, batch, together, &mut unread)
                .await
        } else {
            together
        };
        for unit in together.into_iter().chain(alone) {
            self.write_unit(connection, &mut batch[unit], &mut unread)
                .await;
        }
        unread
    }

    /// Writes the user batches `units` in one transaction, tried once; returns the
    /// ones still to write (all of them when it failed, none when it committed).
    async fn write_together(
        &self,
        connection: &mut BatchConnection,
        batch: &mut [Pending],
        units: Vec<usize>,
        unread: &mut UnreadChanges,
    ) -> Vec<usize> {
        let provenances: Vec<Vec<(usize, Provenance)>> = units
            .iter()
            .map(|unit| provenances(&batch[*unit]))
            .collect();
        let written = {
            let items: Vec<BatchItem<'_>> = units
                .iter()
                .zip(&provenances)
                .flat_map(|(unit, own)| items(&batch[*unit], own))
                .collect();
            metrics::histogram!("im_ingest_write_batch_messages").record(items.len() as f64);
            connection.write_once(&items).await
        };
        match written {
            Ok(written) => {
                committed();
                unread.committed.extend(written.unread);
                let mut outcomes = written.outcomes.into_iter();
                for (unit, own) in units.iter().zip(&provenances) {
                    for (index, _) in own {
                        let outcome = outcomes.next().expect("one outcome per message");
                        batch[*unit].steps[*index] = settled(outcome);
                    }
                }
                Vec::new()
            }
            Err(error) => {
                tracing::warn!(%error, users = units.len(),
                    "a combined write failed; writing its users one by one");
                units
            }
        }
    }

    fn stalled_before(&self, pending: &Pending) -> bool {
        pending.user().is_some_and(|user| {
            self.stalled_users
                .lock()
                .expect("stalled users lock poisoned")
                .contains(&user)
        })
    }

    /// Remembers whether the user's last write stalled.
    fn note_stall(&self, pending: &Pending, stalled: bool) {
        let Some(user) = pending.user() else {
            return;
        };
        let mut users = self
            .stalled_users
            .lock()
            .expect("stalled users lock poisoned");
        if stalled {
            users.insert(user);
        } else {
            users.remove(&user);
        }
    }

    /// Writes one user batch's messages in one transaction (retried in place after a
    /// deadlock or a race).
    async fn write_unit(
        &self,
        connection: &mut BatchConnection,
        pending: &mut Pending,
        unread: &mut UnreadChanges,
    ) {
        if self.abandon_if_lease_lost(pending) {
            return;
        }
        let own = provenances(pending);
        let written = {
            let items: Vec<BatchItem<'_>> = items(pending, &own).collect();
            metrics::histogram!("im_ingest_write_batch_messages").record(items.len() as f64);
            connection.write(&items).await
        };
        self.note_stall(pending, matches!(written, Err(BatchWriteError::Stalled(_))));
        match written {
            Ok(written) => {
                committed();
                unread.committed.extend(written.unread);
                for ((index, _), outcome) in own.iter().zip(written.outcomes) {
                    pending.steps[*index] = settled(outcome);
                }
            }
            Err(error) if is_refusal(&error) => {
                self.isolate(connection, pending, own, unread).await
            }
            Err(BatchWriteError::WouldOutlastHold) => {
                self.abandon(pending, Abandoned::HoldExceeded)
            }
            Err(error) => {
                if matches!(error, BatchWriteError::Stalled(_)) {
                    unread.uncertain.extend(agents(pending));
                }
                unsettle_from(pending, own.first().map(|(i, _)| *i), error)
            }
        }
    }

    /// Abandons the user batch's writes if its lease was lost (another holder may be
    /// writing this user now); returns whether it did.
    fn abandon_if_lease_lost(&self, pending: &mut Pending) -> bool {
        let lost = pending.guard.as_ref().is_some_and(LockGuard::is_lost);
        if lost {
            self.abandon(pending, Abandoned::LeaseLost);
        }
        lost
    }

    /// The user batch's messages still to write go to a delay topic as a new attempt;
    /// from the first with no attempt left on, they stay unsettled (their caller
    /// processes them again, with a pause).
    fn abandon(&self, pending: &mut Pending, why: Abandoned) {
        let reason = why.reason(self.locks.max_hold());
        let abandoned: Vec<usize> = pending.to_write().map(|(index, _)| index).collect();
        tracing::warn!(messages = abandoned.len(), %reason, "write abandoned; retrying later");
        metrics::counter!("im_ingest_abandoned_writes_total", "reason" => why.label())
            .increment(abandoned.len() as u64);
        for (position, index) in abandoned.iter().enumerate() {
            let job = pending.jobs[*index].clone();
            match self.policy.next(job.attempts, None, rand::random::<f64>()) {
                NextStep::Delay {
                    delay,
                    attempts,
                    wait,
                } => {
                    pending.steps[*index] = Step::Route(Box::new(self.delay_route(
                        &job,
                        (delay, attempts, wait),
                        why.fqcn(),
                        &reason,
                    )));
                }
                NextStep::DeadLetter { .. } => {
                    pending.steps[*index] = Step::Settled(Err(anyhow::anyhow!(
                        "{reason}; no delivery attempt left, so it is tried again here"
                    )));
                    for later in &abandoned[position + 1..] {
                        pending.steps[*later] = Step::Unsettled;
                    }
                    return;
                }
            }
        }
    }

    /// The database refused a user batch's rows: each record is written alone, and one
    /// that is refused again is routed to the dead-letter topic as `DatabaseRejected`.
    async fn isolate(
        &self,
        connection: &mut BatchConnection,
        pending: &mut Pending,
        own: Vec<(usize, Provenance)>,
        unread: &mut UnreadChanges,
    ) {
        for (index, provenance) in own {
            let job = pending.jobs[index].clone();
            match connection.write(&[item(&job, &provenance)]).await {
                Ok(written) => {
                    committed();
                    unread.committed.extend(written.unread);
                    pending.steps[index] = settled(written.outcomes[0]);
                }
                Err(error) if is_refusal(&error) => {
                    let reason = format!("{:#}", anyhow::Error::new(error));
                    tracing::warn!(%reason, "the database refused a message; dead-lettering it");
                    pending.steps[index] = Step::Route(Box::new(Route::dead_letter(
                        &self.dlq_topic,
                        &job,
                        job.attempts,
                        DATABASE_REJECTED_FQCN,
                        &reason,
                    )));
                }
                Err(BatchWriteError::WouldOutlastHold) => {
                    self.abandon(pending, Abandoned::HoldExceeded);
                    return;
                }
                Err(error) => {
                    if matches!(error, BatchWriteError::Stalled(_)) {
                        unread.uncertain.extend(agents(pending));
                    }
                    unsettle_from(pending, Some(index), error);
                    return;
                }
            }
        }
    }
}

/// The provenance of each message to write, with its index in the user batch.
fn provenances(pending: &Pending) -> Vec<(usize, Provenance)> {
    pending
        .to_write()
        .map(|(index, job)| (index, provenance(job)))
        .collect()
}

/// The write items of a user batch, in the order of `own`.
fn items<'a>(
    pending: &'a Pending,
    own: &'a [(usize, Provenance)],
) -> impl Iterator<Item = BatchItem<'a>> {
    own.iter()
        .map(|(index, provenance)| item(&pending.jobs[*index], provenance))
}

/// The agents whose conversations a user batch's records to write touch.
fn agents(pending: &Pending) -> impl Iterator<Item = Agent> + '_ {
    pending.to_write().filter_map(|(_, job)| {
        let (tenant_id, platform, agent_id) = match job.content.as_ref().ok()? {
            Inbound::Message(m) => (&m.tenant_id, &m.platform, &m.to_user_id),
            Inbound::Read(r) => (&r.tenant_id, &r.platform, &r.to_user_id),
        };
        Some(Agent {
            tenant_id: tenant_id.clone(),
            platform: platform.clone(),
            agent_id: agent_id.clone(),
        })
    })
}

/// What a record to write writes: a message, or a read receipt.
fn item<'a>(job: &'a Job, provenance: &'a Provenance) -> BatchItem<'a> {
    match &job.content {
        Ok(Inbound::Message(message)) => BatchItem::Message(message, provenance),
        Ok(Inbound::Read(receipt)) => BatchItem::Receipt(receipt),
        Err(_) => unreachable!("invalid records are routed, never written"),
    }
}

fn provenance(job: &Job) -> Provenance {
    Provenance {
        topic: job.origin.topic.clone(),
        partition: job.origin.partition,
        offset: job.origin.offset,
    }
}

/// A transaction committed: the point where a crash leaves rows stored and offsets not.
fn committed() {
    fail::fail_point!("after_db_commit", |_| crate::failpoint::crash(
        "after_db_commit"
    ));
}

fn settled(outcome: WriteOutcome) -> Step {
    Step::Settled(Ok(match outcome {
        WriteOutcome::Stored => Outcome::Stored,
        WriteOutcome::Duplicate => Outcome::Duplicate,
        WriteOutcome::ReadApplied => Outcome::ReadReceipt,
    }))
}

/// The write of the messages from `first` on failed: the error stands in the first
/// one's place, the later ones are unsettled (see `batch`'s guarantee).
fn unsettle_from(pending: &mut Pending, first: Option<usize>, error: BatchWriteError) {
    let Some(first) = first else {
        return;
    };
    pending.steps[first] = Step::Settled(Err(
        anyhow::Error::new(error).context("writing the messages to the database")
    ));
    for step in &mut pending.steps[first + 1..] {
        if matches!(step, Step::Write) {
            *step = Step::Unsettled;
        }
    }
}

/// Whether the database refused the data itself (see [`store::is_refusal`]): running
/// the same rows again can never succeed.
fn is_refusal(error: &BatchWriteError) -> bool {
    error.database().is_some_and(store::is_refusal)
}
