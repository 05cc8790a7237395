//! The write stage shared by every user batch: the messages that user batches hand in
//! while the writers are busy are written together, in one transaction per batch
//! (`store::write_batch`), by at most `worker.write_concurrency` transactions at once.
//!
//! Guarantee: each request gets back the outcomes of exactly its own messages, in its
//! order, only after the transaction that wrote them committed — or an error, and then
//! nothing of it is settled. A combined transaction that fails (tried once) is run again
//! request by request, each with the usual in-place retries, so a request whose rows the
//! database refuses fails alone and the others are stored. Batches form by themselves
//! under load (requests queue while every writer is busy) and add no wait when the
//! worker is idle.

use std::sync::Arc;

use anyhow::Context;
use sqlx::MySqlPool;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::message::ChatMessage;
use crate::store::{write_batch, write_batch_once, BatchItem, Provenance, WriteOutcome};

/// One user batch's messages to write, and where its outcomes go.
struct Request {
    items: Vec<(ChatMessage, Provenance)>,
    reply: oneshot::Sender<anyhow::Result<Vec<WriteOutcome>>>,
}

/// A handle on the shared write stage; cheap to clone. The stage runs until every
/// handle is dropped.
#[derive(Clone)]
pub struct BatchWriter {
    requests: mpsc::UnboundedSender<Request>,
}

impl BatchWriter {
    /// Starts the stage: up to `concurrency` transactions at once, each of up to about
    /// `max_messages` messages (a request is never split).
    pub fn start(pool: MySqlPool, concurrency: usize, max_messages: usize) -> Self {
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, queue, concurrency.max(1), max_messages.max(1)));
        Self { requests }
    }

    /// Writes `items` with whatever else is waiting; returns one outcome per item.
    pub async fn write(
        &self,
        items: Vec<(ChatMessage, Provenance)>,
    ) -> anyhow::Result<Vec<WriteOutcome>> {
        let (reply, outcome) = oneshot::channel();
        self.requests
            .send(Request { items, reply })
            .map_err(|_| anyhow::anyhow!("the write stage has stopped"))?;
        outcome.await.context("the write stage dropped a request")?
    }
}

async fn run(
    pool: MySqlPool,
    mut queue: mpsc::UnboundedReceiver<Request>,
    concurrency: usize,
    max_messages: usize,
) {
    let writers = Arc::new(Semaphore::new(concurrency));
    while let Some(first) = queue.recv().await {
        // Wait for a free writer first: meanwhile the requests that arrive queue up and
        // join this batch.
        let Ok(writer) = writers.clone().acquire_owned().await else {
            return;
        };
        let mut messages = first.items.len();
        let mut batch = vec![first];
        while messages < max_messages {
            match queue.try_recv() {
                Ok(request) => {
                    messages += request.items.len();
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        metrics::histogram!("im_ingest_write_batch_messages").record(messages as f64);
        let pool = pool.clone();
        tokio::spawn(async move {
            write_requests(&pool, batch).await;
            drop(writer);
        });
    }
}

/// Writes the requests in one transaction and answers each; when that fails, each
/// request alone.
async fn write_requests(pool: &MySqlPool, batch: Vec<Request>) {
    if batch.len() > 1 {
        let items: Vec<BatchItem<'_>> = batch
            .iter()
            .flat_map(|r| r.items.iter().map(|(m, p)| (m, p)))
            .collect();
        // Tried once: a combined batch that meets a deadlock or a row lock held elsewhere
        // is split at once rather than holding every user in it through retries.
        match write_batch_once(pool, &items).await {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for request in batch {
                    let own = outcomes.by_ref().take(request.items.len()).collect();
                    let _ = request.reply.send(Ok(own));
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, requests = batch.len(), "a combined write failed; writing its requests one by one");
            }
        }
    }
    for request in batch {
        let items: Vec<BatchItem<'_>> = request.items.iter().map(|(m, p)| (m, p)).collect();
        let result = write_batch(pool, &items)
            .await
            .context("writing the messages to the database");
        let _ = request.reply.send(result);
    }
}
