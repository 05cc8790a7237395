//! Forms batches out of the user batches handed in, and runs them.
//!
//! Guarantee: at most `worker.batch_concurrency` batches run at once, each on a database
//! connection it took before anything else (so its locks never wait for the pool). A
//! batch holds at least one user batch and stops growing at `worker.batch_max_records`
//! records or `worker.batch_max_bytes` bytes of record values (a user batch is never
//! split); it waits up to `worker.batch_linger_ms` for more only when that is set — by
//! default it takes what queued while a slot and a connection were awaited, so batches
//! grow with the load and an idle worker adds no wait. Every user batch handed in gets
//! exactly one answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::batch::Stages;
use super::{Job, Outcome};
use crate::config::WorkerSettings;
use crate::store::BatchConnection;

/// How batches are sized and how many run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Batches running at once (each on its own database connection).
    pub concurrency: usize,
    /// Records at which a batch stops growing.
    pub max_records: usize,
    /// Bytes of record values at which a batch stops growing.
    pub max_bytes: usize,
    /// How long a batch waits for more user batches when it could take more.
    pub linger: Duration,
    /// How long a batch's transaction may wait inside the database (see
    /// `store::BatchConnection`).
    pub write_stall: Duration,
}

impl From<&WorkerSettings> for BatchLimits {
    fn from(worker: &WorkerSettings) -> Self {
        Self {
            concurrency: worker.batch_concurrency,
            max_records: worker.batch_max_records,
            max_bytes: worker.batch_max_bytes,
            linger: Duration::from_millis(worker.batch_linger_ms),
            write_stall: Duration::from_millis(worker.write_stall_ms),
        }
    }
}

/// One user batch in the stage: the records of one user in order (or invalid records).
pub(super) struct Unit {
    pub jobs: Vec<Arc<Job>>,
    /// In-process pauses this user batch may still take when its lock is held elsewhere;
    /// at 0 a held lock sends its messages on to a delay topic.
    pub pauses_left: u32,
    pub reply: oneshot::Sender<UnitReply>,
}

impl Unit {
    fn bytes(&self) -> usize {
        self.jobs
            .iter()
            .map(|job| job.record.value.as_ref().map_or(0, Vec::len))
            .sum()
    }
}

/// The answer to a user batch.
pub(super) enum UnitReply {
    /// The user's lock is held elsewhere and pauses are left: nothing was done; hand it
    /// in again after a pause.
    LockHeld,
    /// One result per record, in order, up to and including the first error.
    Done(Vec<anyhow::Result<Outcome>>),
}

/// A handle on a running stage; cheap to clone. The stage stops when the last handle is
/// dropped.
#[derive(Clone)]
pub(super) struct StageHandle {
    units: mpsc::UnboundedSender<Unit>,
}

impl StageHandle {
    pub fn start(stages: Arc<Stages>, limits: BatchLimits) -> Self {
        let (units, queue) = mpsc::unbounded_channel();
        tokio::spawn(run(stages, queue, limits));
        Self { units }
    }

    /// Hands a user batch in and waits for its answer.
    pub async fn submit(&self, jobs: Vec<Arc<Job>>, pauses_left: u32) -> anyhow::Result<UnitReply> {
        let (reply, answer) = oneshot::channel();
        self.units
            .send(Unit {
                jobs,
                pauses_left,
                reply,
            })
            .map_err(|_| anyhow::anyhow!("the processing stage has stopped"))?;
        answer.await.context("the processing stage dropped a batch")
    }
}

async fn run(stages: Arc<Stages>, mut queue: mpsc::UnboundedReceiver<Unit>, limits: BatchLimits) {
    let slots = Arc::new(Semaphore::new(limits.concurrency.max(1)));
    while let Some(first) = queue.recv().await {
        // A free slot and a connection first: what queues meanwhile joins this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let waited = Instant::now();
        let connection =
            BatchConnection::acquire(&stages.pool, limits.write_stall, stages.unread.rules).await;
        metrics::histogram!("im_ingest_stage_seconds", "stage" => "connection")
            .record(waited.elapsed().as_secs_f64());
        let units = gather(first, &mut queue, &limits).await;
        let connection = match connection {
            Ok(connection) => connection,
            Err(error) => {
                let error = anyhow::Error::new(error).context("taking a database connection");
                for unit in units {
                    let _ = unit
                        .reply
                        .send(UnitReply::Done(vec![Err(anyhow::anyhow!("{error:#}"))]));
                }
                continue;
            }
        };
        let stages = stages.clone();
        tokio::spawn(async move {
            stages.run(connection, units).await;
            drop(slot);
        });
    }
}

/// The batch that starts with `first`: what is queued, and with a linger what arrives
/// within it, up to the limits.
async fn gather(
    first: Unit,
    queue: &mut mpsc::UnboundedReceiver<Unit>,
    limits: &BatchLimits,
) -> Vec<Unit> {
    let linger_until = tokio::time::Instant::now() + limits.linger;
    let mut records = first.jobs.len();
    let mut bytes = first.bytes();
    let mut units = vec![first];
    while records < limits.max_records && bytes < limits.max_bytes {
        let next = match queue.try_recv() {
            Ok(unit) => Some(unit),
            Err(TryRecvError::Empty) if !limits.linger.is_zero() => {
                tokio::time::timeout_at(linger_until, queue.recv())
                    .await
                    .ok()
                    .flatten()
            }
            Err(_) => None,
        };
        let Some(unit) = next else {
            break;
        };
        records += unit.jobs.len();
        bytes += unit.bytes();
        units.push(unit);
    }
    metrics::histogram!("im_ingest_stage_batch_records").record(records as f64);
    units
}
