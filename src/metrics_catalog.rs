//! Every metric family the worker exports, registered at start-up.
//!
//! Guarantee: after [`register_all`], an idle worker's `/metrics` already lists every
//! family (counters at 0), so dashboards and alerts never see a metric appear late.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

use crate::message::INVALID_MESSAGE_FQCN;
use crate::pipeline::{DATABASE_REJECTED_FQCN, DELAY_REFUSED_FQCN, LOCK_HELD_FQCN};
use crate::retry::trust::DISTRUST_REASONS;

/// Outcome labels of `im_ingest_records_total` (see `Outcome::label`).
const OUTCOMES: [&str; 5] = [
    "stored",
    "duplicate",
    "read_receipt",
    "retried",
    "dead_lettered",
];

/// Counters without labels: (name, help).
const COUNTERS: [(&str, &str); 17] = [
    (
        "im_ingest_offset_resets_total",
        "Committed offsets the broker no longer had (records removed before they were read)",
    ),
    ("im_ingest_lock_acquisitions_total", "Per-user locks taken"),
    (
        "im_ingest_lock_conflicts_total",
        "Per-user locks found held elsewhere",
    ),
    (
        "im_ingest_lock_extensions_total",
        "Lock leases extended while work ran",
    ),
    (
        "im_ingest_unlocked_writes_total",
        "Writes done without the lock (degraded mode)",
    ),
    (
        "im_ingest_contended_writes_total",
        "Last-attempt writes done without a lock that kept changing hands",
    ),
    (
        "im_ingest_db_transaction_retries_total",
        "Transactions retried after a deadlock or lock-wait timeout",
    ),
    (
        "im_ingest_lock_waits_total",
        "In-process pauses before a held lock was tried again",
    ),
    (
        "im_ingest_seek_failures_total",
        "Seeks back that failed (the partition stays paused and the seek is retried)",
    ),
    (
        "im_ingest_commit_retries_total",
        "Offset commits tried again after a rebalance-in-progress refusal",
    ),
    (
        "im_ingest_revoked_records_dropped_total",
        "Queued records of revoked partitions dropped (left to the next owner)",
    ),
    (
        "im_ingest_db_write_stalls_total",
        "Batch transactions interrupted after waiting worker.write_stall_ms in the database",
    ),
    (
        "im_ingest_dead_letter_stubs_total",
        "Records the dead-letter topic refused, dead-lettered without their value",
    ),
    (
        "im_ingest_unread_drift_total",
        "Conversations whose unread count in Redis differed from MySQL when reconciled",
    ),
    (
        "im_ingest_unread_noted_agents_total",
        "Agents noted for reconcile because their unread changes could not reach Redis",
    ),
    (
        "im_ingest_unread_copy_lost_total",
        "Unread changes that reached neither Redis nor the reconcile note (fixed at the \
         conversation's next change or by reconcile)",
    ),
    (
        "im_ingest_unread_rebuilds_total",
        "Agents' Redis copies rebuilt from MySQL because they were missing or incomplete",
    ),
];

/// Gauges without labels, starting at 0: (name, help).
const GAUGES: [(&str, &str); 5] = [
    (
        "im_ingest_redis_degraded",
        "1 while Redis is bypassed (degraded mode)",
    ),
    (
        "im_ingest_in_flight",
        "Records received and not yet durable",
    ),
    (
        "im_ingest_in_flight_bytes",
        "Key and value bytes of the records received and not yet durable",
    ),
    (
        "im_ingest_backpressure",
        "1 while partitions are paused because in-flight is full",
    ),
    (
        "im_ingest_held_partitions",
        "Delay partitions waiting for their head record to fall due",
    ),
];

/// Histograms: (name, unit, help).
const HISTOGRAMS: [(&str, Unit, &str); 5] = [
    (
        "im_ingest_processing_seconds",
        Unit::Seconds,
        "Time from a record's dispatch to its durable outcome",
    ),
    (
        "im_ingest_retry_lateness_seconds",
        Unit::Seconds,
        "How long after its due time a delay record was picked up",
    ),
    (
        "im_ingest_batch_size",
        Unit::Count,
        "Records of one user batch",
    ),
    (
        "im_ingest_stage_batch_records",
        Unit::Count,
        "Records of one batch (many users)",
    ),
    (
        "im_ingest_write_batch_messages",
        Unit::Count,
        "Messages written in one transaction",
    ),
];

/// The `stage` labels of `im_ingest_stage_seconds`, in the order a batch runs them.
const STAGES: [&str; 5] = ["connection", "lock", "write", "release", "route"];

pub fn register_all() {
    describe_counter!("im_ingest_records_total", "Records processed, by outcome");
    for outcome in OUTCOMES {
        metrics::counter!("im_ingest_records_total", "outcome" => outcome).increment(0);
    }
    describe_counter!(
        "im_ingest_dead_letters_total",
        "Records dead-lettered, by reason (error class)"
    );
    for reason in [
        INVALID_MESSAGE_FQCN,
        LOCK_HELD_FQCN,
        DATABASE_REJECTED_FQCN,
        DELAY_REFUSED_FQCN,
    ] {
        metrics::counter!("im_ingest_dead_letters_total", "reason" => reason).increment(0);
    }
    describe_counter!(
        "im_ingest_retries_total",
        "Records sent to a delay topic, by the attempt they carry"
    );
    metrics::counter!("im_ingest_retries_total", "attempt" => "2").increment(0);
    for (name, help) in COUNTERS {
        describe_counter!(name, help);
        metrics::counter!(name).increment(0);
    }
    for (name, help) in GAUGES {
        describe_gauge!(name, help);
        metrics::gauge!(name).set(0.0);
    }
    describe_gauge!(
        "im_ingest_consumer_lag",
        "Records behind the partition's end, per topic and partition (librdkafka statistics)"
    );
    describe_counter!(
        "im_ingest_retry_headers_distrusted_total",
        "Retry headers ignored (not a delay topic), replaced (malformed, oversized) or bounded (due time, attempts), by reason"
    );
    for reason in DISTRUST_REASONS {
        metrics::counter!("im_ingest_retry_headers_distrusted_total", "reason" => reason)
            .increment(0);
    }
    describe_counter!(
        "im_ingest_abandoned_writes_total",
        "Messages not written under a lock whose hold would have ended (hold_exceeded) or \
         whose lease was lost (lease_lost), sent through the delay topics instead"
    );
    for reason in ["hold_exceeded", "lease_lost"] {
        metrics::counter!("im_ingest_abandoned_writes_total", "reason" => reason).increment(0);
    }
    describe_gauge!(
        "im_ingest_assigned_partitions",
        "Partitions of each consumed topic this instance holds"
    );
    describe_histogram!(
        "im_ingest_stage_seconds",
        Unit::Seconds,
        "Time one batch spent in each stage"
    );
    for stage in STAGES {
        let _ = metrics::histogram!("im_ingest_stage_seconds", "stage" => stage);
    }
    for (name, unit, help) in HISTOGRAMS {
        describe_histogram!(name, unit, help);
        // Taking a handle registers the family; nothing is recorded.
        let _ = metrics::histogram!(name);
    }
}
