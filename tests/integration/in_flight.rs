//! The in-flight bound counts bytes too (issue 12, hazard 7): with large records the
//! worker holds no more than `worker.max_in_flight_bytes` of them in memory, and a
//! record larger than the whole bound still goes through, alone. Slow writes come from
//! the `slow_db_write` fault point (cargo feature `failpoints`).

use std::time::Duration;

use crate::admin::{get, metric};
use crate::helpers::{unique, WorkerEnv};
use crate::kafka_util::{produce, producer};
use crate::pipeline::payload;
use crate::worker::{count, finish, start, wait_for_count, wait_until_all_committed, WAIT};

/// A valid message of about `bytes` bytes.
fn message_of(bytes: usize) -> String {
    let mut message: serde_json::Value =
        serde_json::from_str(&payload(&unique("c"), &unique("m"))).unwrap();
    let padding = bytes.saturating_sub(message.to_string().len());
    message["content"] = "z".repeat(padding).into();
    message.to_string()
}

#[tokio::test]
async fn records_in_flight_stay_within_the_byte_bound_and_a_larger_one_goes_through_alone() {
    // Every batch waits 1 s before its write; 2,000 bytes in flight take 3 records of
    // 600 bytes, not the 12 that `worker.max_in_flight` (1,000) would let in.
    let env = WorkerEnv::new(1)
        .with("WORKER__MAX_IN_FLIGHT_BYTES", "2000")
        .with_var("FAILPOINTS", "slow_db_write=return(1000)");
    let (worker, pool) = start(&env).await;
    let admin = worker.admin_address();
    let producer = producer();
    for _ in 0..12 {
        produce(&producer, &env.inbound, Some(0), message_of(600).as_bytes()).await;
    }
    let (mut most_records, mut most_bytes) = (0.0_f64, 0.0_f64);
    let deadline = tokio::time::Instant::now() + WAIT;
    while count(&pool, "SELECT COUNT(*) FROM message").await < 12 {
        let (_, body) = get(&admin, "/metrics");
        most_records = most_records.max(metric(&body, "im_ingest_in_flight").unwrap_or(0.0));
        most_bytes = most_bytes.max(metric(&body, "im_ingest_in_flight_bytes").unwrap_or(0.0));
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all stored; log:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        (1_200.0..=2_000.0).contains(&most_bytes),
        "{most_bytes} bytes were in flight at once (3 records of 600 fit in 2,000)"
    );
    assert!(
        (2.0..=4.0).contains(&most_records),
        "{most_records} records were in flight at once (3 fit in the byte bound, a 4th \
         may be received and wait for its bytes)"
    );

    // Larger than the whole bound: it takes all of it and goes through alone.
    let large = message_of(3_000);
    produce(&producer, &env.inbound, Some(0), large.as_bytes()).await;
    wait_for_count(&pool, "SELECT COUNT(*) FROM message", 13, &worker).await;
    wait_until_all_committed(&env, &worker).await;
    finish(&env, worker, pool).await;
}
