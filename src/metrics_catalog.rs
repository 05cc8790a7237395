//! Every metric family the worker exports, registered at start-up.
//!
//! Guarantee: after [`register_all`], an idle worker's `/metrics` already lists every
//! family (counters at 0), so dashboards and alerts never see a metric appear late.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

use crate::message::INVALID_MESSAGE_FQCN;
use crate::pipeline::LOCK_HELD_FQCN;

/// Outcome labels of `im_ingest_records_total` (see `Outcome::label`).
const OUTCOMES: [&str; 5] = [
    "stored",
    "duplicate",
    "read_receipt",
    "retried",
    "dead_lettered",
];

pub fn register_all() {
    describe_counter!("im_ingest_records_total", "Records processed, by outcome");
    for outcome in OUTCOMES {
        metrics::counter!("im_ingest_records_total", "outcome" => outcome).increment(0);
    }
    describe_counter!(
        "im_ingest_dead_letters_total",
        "Records dead-lettered, by reason (error class)"
    );
    for reason in [INVALID_MESSAGE_FQCN, LOCK_HELD_FQCN] {
        metrics::counter!("im_ingest_dead_letters_total", "reason" => reason).increment(0);
    }
    describe_counter!(
        "im_ingest_retries_total",
        "Records sent to a delay topic, by the attempt they carry"
    );
    metrics::counter!("im_ingest_retries_total", "attempt" => "2").increment(0);
    describe_counter!("im_ingest_lock_acquisitions_total", "Per-user locks taken");
    metrics::counter!("im_ingest_lock_acquisitions_total").increment(0);
    describe_counter!(
        "im_ingest_lock_conflicts_total",
        "Per-user locks found held elsewhere"
    );
    metrics::counter!("im_ingest_lock_conflicts_total").increment(0);
    describe_counter!(
        "im_ingest_lock_extensions_total",
        "Lock leases extended while work ran"
    );
    metrics::counter!("im_ingest_lock_extensions_total").increment(0);
    describe_counter!(
        "im_ingest_unlocked_writes_total",
        "Writes done without the lock (degraded mode)"
    );
    metrics::counter!("im_ingest_unlocked_writes_total").increment(0);
    describe_counter!(
        "im_ingest_db_transaction_retries_total",
        "Transactions retried after a deadlock or lock-wait timeout"
    );
    metrics::counter!("im_ingest_db_transaction_retries_total").increment(0);
    describe_gauge!(
        "im_ingest_redis_degraded",
        "1 while Redis is bypassed (degraded mode)"
    );
    metrics::gauge!("im_ingest_redis_degraded").set(0.0);
    describe_gauge!(
        "im_ingest_in_flight",
        "Records received and not yet durable"
    );
    metrics::gauge!("im_ingest_in_flight").set(0.0);
    describe_gauge!(
        "im_ingest_backpressure",
        "1 while partitions are paused because in-flight is full"
    );
    metrics::gauge!("im_ingest_backpressure").set(0.0);
    describe_gauge!(
        "im_ingest_held_partitions",
        "Delay partitions waiting for their head record to fall due"
    );
    metrics::gauge!("im_ingest_held_partitions").set(0.0);
    describe_gauge!(
        "im_ingest_consumer_lag",
        "Records behind the partition's end, per topic and partition (librdkafka statistics)"
    );
    describe_histogram!(
        "im_ingest_processing_seconds",
        Unit::Seconds,
        "Time from a record's dispatch to its durable outcome"
    );
    // Taking a handle registers the family; nothing is recorded.
    let _ = metrics::histogram!("im_ingest_processing_seconds");
    describe_histogram!(
        "im_ingest_retry_lateness_seconds",
        Unit::Seconds,
        "How long after its due time a delay record was picked up"
    );
    let _ = metrics::histogram!("im_ingest_retry_lateness_seconds");
}
