//! The connection one pipeline batch writes on, with a bound on how long a transaction
//! may wait inside the database.
//!
//! Guarantee: a write returns within about the stall limit plus a round trip while the
//! database answers, and within the stall limit plus [`INTERRUPT_GRACE`] twice when it
//! does not answer at all: a transaction still running at the limit (a row lock held by an
//! outside transaction, a stalled disk) has its statement interrupted from a second
//! connection (`KILL QUERY <id>`, which MySQL and MariaDB allow on a user's own
//! connections without extra privileges), is rolled back, and the caller gets
//! [`BatchWriteError::Stalled`]. The write's future is dropped mid-statement only when
//! the database stops answering, and the interrupted connection is always thrown away
//! rather than given back to the pool (so a late interrupt can never hit a later
//! statement). Nothing of a failed write is committed. Given the end of the batch's lock
//! hold, no transaction is started that could run past it
//! ([`BatchWriteError::WouldOutlastHold`]).

use std::time::{Duration, Instant};

use sqlx::mysql::MySql;
use sqlx::pool::PoolConnection;
use sqlx::{ConnectOptions, Connection, MySqlPool};

use super::batch::{try_write_batch, BatchItem, BatchWritten, UnreadRules};
use super::write::{is_retryable, MAX_TRANSACTION_ATTEMPTS};

/// How long interrupting a stalled write, and then its end, may each take before the
/// write is given up (a database that does not answer at all).
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);

/// Writes many messages idempotently in one transaction on a connection of `pool`,
/// tried again after a deadlock, a lock-wait timeout or a race like
/// [`BatchConnection::write`], bounded only by the database's own lock-wait timeout:
/// for callers outside the pipeline, which have no stall limit of their own.
pub async fn write_batch(
    pool: &MySqlPool,
    items: &[BatchItem<'_>],
    rules: UnreadRules,
) -> Result<BatchWritten, BatchWriteError> {
    const NO_STALL_LIMIT: Duration = Duration::from_secs(3600);
    BatchConnection::acquire(pool, NO_STALL_LIMIT, rules)
        .await?
        .write(items)
        .await
}

/// Why a batch write did not commit.
#[derive(Debug, thiserror::Error)]
pub enum BatchWriteError {
    /// The transaction was still running at the stall limit and was interrupted.
    #[error("the write was still waiting inside the database after {0:?} and was interrupted")]
    Stalled(Duration),
    /// Another writer inserted messages of the batch between its read and its insert.
    #[error("other writers inserted messages of this batch meanwhile")]
    Raced,
    /// Not started: it could have run past the end of the batch's lock hold.
    #[error("not started: the write could outlast the user lock's hold (lock.max_hold_ms)")]
    WouldOutlastHold,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl BatchWriteError {
    /// The database error behind it, if any (to classify refusals).
    pub fn database(&self) -> Option<&sqlx::Error> {
        match self {
            BatchWriteError::Database(error) => Some(error),
            _ => None,
        }
    }
}

/// A pooled connection held for one batch, taken before the batch's locks so that the
/// locks never wait for the pool.
pub struct BatchConnection {
    pool: MySqlPool,
    connection: Option<PoolConnection<MySql>>,
    /// The server's id of `connection`, to interrupt it (read on first write).
    server_id: Option<u64>,
    stall_limit: Duration,
    /// When the batch's lock hold ends, if it holds locks.
    hold_ends: Option<Instant>,
    rules: UnreadRules,
}

impl BatchConnection {
    /// Takes a connection from the pool now.
    pub async fn acquire(
        pool: &MySqlPool,
        stall_limit: Duration,
        rules: UnreadRules,
    ) -> Result<Self, sqlx::Error> {
        let connection = pool.acquire().await?;
        Ok(Self {
            pool: pool.clone(),
            connection: Some(connection),
            server_id: None,
            stall_limit,
            hold_ends: None,
            rules,
        })
    }

    /// Sets when the batch's lock hold ends (`None`: it holds no lock): from then on,
    /// a transaction that could still run at that moment is not started.
    pub fn set_hold_end(&mut self, hold_ends: Option<Instant>) {
        self.hold_ends = hold_ends;
    }

    /// Writes `items` in one transaction, tried once.
    pub async fn write_once(
        &mut self,
        items: &[BatchItem<'_>],
    ) -> Result<BatchWritten, BatchWriteError> {
        self.check_hold()?;
        if self.connection.is_none() {
            let acquire = self.pool.acquire();
            let connection = match self.hold_ends {
                // Waiting for the pool counts against the hold too.
                Some(end) => tokio::time::timeout_at(end.into(), acquire)
                    .await
                    .map_err(|_| BatchWriteError::WouldOutlastHold)??,
                None => acquire.await?,
            };
            self.connection = Some(connection);
            self.server_id = None;
        }
        let connection = self
            .connection
            .as_mut()
            .expect("a connection was just taken");
        let server_id = match self.server_id {
            Some(id) => id,
            None => {
                let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                    .fetch_one(&mut **connection)
                    .await?;
                *self.server_id.insert(id)
            }
        };
        self.check_hold()?;
        let connection = self
            .connection
            .as_mut()
            .expect("a connection was just taken");
        let started = Instant::now();
        let written = {
            let write = transaction(connection, items, self.rules);
            tokio::pin!(write);
            tokio::select! {
                written = &mut write => return written,
                _ = tokio::time::sleep(self.stall_limit) => {}
            }
            if tokio::time::timeout(INTERRUPT_GRACE, interrupt(&self.pool, server_id))
                .await
                .is_err()
            {
                tracing::warn!("interrupting a stalled write timed out");
            }
            // A database that no longer answers at all: give the write up (its
            // connection is thrown away below, so dropping it mid-statement is safe).
            tokio::time::timeout(INTERRUPT_GRACE, write)
                .await
                .unwrap_or(Err(BatchWriteError::Stalled(self.stall_limit)))
        };
        tracing::warn!(
            waited_ms = started.elapsed().as_millis() as u64,
            messages = items.len(),
            committed = written.is_ok(),
            "a batch write stalled inside the database and was interrupted"
        );
        metrics::counter!("im_ingest_db_write_stalls_total").increment(1);
        // Close it: an interrupt that arrives late must not hit a later statement.
        if let Some(connection) = self.connection.take() {
            let _ = tokio::time::timeout(INTERRUPT_GRACE, connection.detach().close()).await;
        }
        match written {
            // It committed after all, just before the interrupt landed.
            Ok(outcomes) => Ok(outcomes),
            Err(_) => Err(BatchWriteError::Stalled(self.stall_limit)),
        }
    }

    /// Refuses to start a transaction that could still run when the hold ends.
    fn check_hold(&self) -> Result<(), BatchWriteError> {
        match self.hold_ends {
            Some(end) if Instant::now() + self.stall_limit > end => {
                Err(BatchWriteError::WouldOutlastHold)
            }
            _ => Ok(()),
        }
    }

    /// Writes `items` in one transaction, tried again after a deadlock, a lock-wait
    /// timeout or a race, up to [`MAX_TRANSACTION_ATTEMPTS`] in all; a stall or any
    /// other error is returned at once.
    pub async fn write(
        &mut self,
        items: &[BatchItem<'_>],
    ) -> Result<BatchWritten, BatchWriteError> {
        let mut attempt = 1;
        loop {
            match self.write_once(items).await {
                Err(error) if attempt < MAX_TRANSACTION_ATTEMPTS && worth_retrying(&error) => {
                    metrics::counter!("im_ingest_db_transaction_retries_total").increment(1);
                    tracing::debug!(%error, attempt, "transaction retried");
                    tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }
}

fn worth_retrying(error: &BatchWriteError) -> bool {
    match error {
        BatchWriteError::Raced => true,
        BatchWriteError::Database(error) => is_retryable(error),
        BatchWriteError::Stalled(_) | BatchWriteError::WouldOutlastHold => false,
    }
}

/// One transaction: committed when the outcomes could be told, rolled back otherwise.
async fn transaction(
    connection: &mut PoolConnection<MySql>,
    items: &[BatchItem<'_>],
    rules: UnreadRules,
) -> Result<BatchWritten, BatchWriteError> {
    let mut tx = connection.begin().await?;
    match try_write_batch(&mut tx, items, rules).await? {
        Some(written) => {
            tx.commit().await?;
            Ok(written)
        }
        None => {
            tx.rollback().await?;
            Err(BatchWriteError::Raced)
        }
    }
}

/// Interrupts the statement running on the server connection `id`, from a connection of
/// its own (the pool may be exhausted by the very batches that wait).
async fn interrupt(pool: &MySqlPool, id: u64) {
    let killed = async {
        let mut connection = pool.connect_options().connect().await?;
        sqlx::query(&format!("KILL QUERY {id}"))
            .execute(&mut connection)
            .await?;
        connection.close().await
    };
    if let Err(error) = killed.await {
        // The write then ends when the database gives up on it (its lock-wait timeout).
        tracing::warn!(%error, "interrupting a stalled write failed");
    }
}
