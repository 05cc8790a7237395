//! `im-ingest verify` against real Kafka and MariaDB: it passes on what a worker
//! stored, tells dead-lettered records apart from lost ones, and fails naming the
//! record's offset after a row is deleted by hand, a row's content altered, a message
//! repointed to another customer's session, and a nickname (and an avatar) altered —
//! and when a row's provenance names a record that does not carry it.

use crate::helpers::{im_ingest, stderr_of, unique, WorkerEnv};
use crate::kafka_util::{produce, producer};
use crate::pipeline::payload;
use crate::worker::{finish, start, wait_until_all_committed};

/// Runs `verify` on the test's inbound topic; returns (success, stdout).
pub fn verify(env: &WorkerEnv) -> (bool, String) {
    verify_with(env, &[])
}

/// Runs `verify` with more arguments (range, filters).
fn verify_with(env: &WorkerEnv, more: &[&str]) -> (bool, String) {
    let output = im_ingest(
        &[&["verify", "--show", "50"], more].concat(),
        &[
            ("IM_INGEST__KAFKA__INBOUND_TOPIC", &env.inbound),
            ("IM_INGEST__KAFKA__DLQ_TOPIC", &env.dlq),
            ("IM_INGEST__DATABASE__URL", &env.database_url()),
        ],
    );
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    if !output.status.success() {
        assert!(
            stderr_of(&output).contains("mismatches between"),
            "{}",
            stderr_of(&output)
        );
    }
    (output.status.success(), stdout)
}

#[tokio::test]
async fn verify_passes_on_a_clean_run_and_names_the_offset_of_each_hand_made_mismatch() {
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    let (ann, bob) = (unique("ann"), unique("bob"));
    let producer = producer();
    let mut offsets = Vec::new();
    for (customer, id) in [(&ann, "m1"), (&ann, "m2"), (&ann, "m3"), (&bob, "m4")] {
        let (_, offset) = produce(
            &producer,
            &env.inbound,
            Some(0),
            payload(customer, id).as_bytes(),
        )
        .await;
        offsets.push(offset);
    }
    // A copy, and a record that is not a message at all.
    produce(
        &producer,
        &env.inbound,
        Some(0),
        payload(&ann, "m1").as_bytes(),
    )
    .await;
    let (_, invalid) = produce(&producer, &env.inbound, Some(0), b"not json").await;
    wait_until_all_committed(&env, &worker).await;

    let (ok, report) = verify(&env);
    assert!(ok, "{report}");
    assert!(
        report.contains(": 6 records (5 messages, 0 read receipts); 1 dead-lettered; 0 mismatches"),
        "{report}"
    );
    assert!(
        report.contains("dead-lettered as im_ingest::InvalidMessage: 1"),
        "{report}"
    );
    assert!(!report.contains(&format!("offset {invalid}")), "{report}");

    // Each hand edit (its one parameter bound; `? <> ''` where the edit needs none),
    // then verify: it fails and names what the edit broke.
    let repoint = "UPDATE message SET session_id = (SELECT s.id FROM session s JOIN customer c \
                   ON c.id = s.customer_id WHERE c.external_user_id = ?) \
                   WHERE external_message_id = 'm3'";
    let edits: [(&str, &str, String); 6] = [
        (
            "DELETE FROM message WHERE external_message_id = 'm1' AND ? <> ''",
            "-",
            format!("offset {}: message m1 is not stored", offsets[0]),
        ),
        (
            "UPDATE message SET content = 'altered' WHERE external_message_id = 'm2' AND ? <> ''",
            "-",
            format!("offset {}: message m2: content differs", offsets[1]),
        ),
        (
            repoint,
            &bob,
            format!("offset {}: message m3: in a session of agent", offsets[2]),
        ),
        (
            "UPDATE customer SET nickname = 'Mallory' WHERE external_user_id = ?",
            &bob,
            format!("offset {}: customer {bob}: nickname is Some(\"Mallory\"), the newest message carrying one says \"Ann\"", offsets[3]),
        ),
        (
            "UPDATE customer SET avatar = 'other.jpg' WHERE external_user_id = ?",
            &ann,
            format!("customer {ann}: avatar is Some(\"other.jpg\"), the newest message carrying one says \"a.jpg\""),
        ),
        (
            "UPDATE message SET source_offset = 999 WHERE external_message_id = 'm4' AND ? <> ''",
            "-",
            "1 stored messages name as their source a record of".to_string(),
        ),
    ];
    let mut report = String::new();
    for (edit, bind, expected) in &edits {
        sqlx::query(edit).bind(bind).execute(&pool).await.unwrap();
        let ok;
        (ok, report) = verify(&env);
        assert!(
            !ok && report.contains(expected.as_str()),
            "after `{edit}`: {report}"
        );
    }
    assert!(report.contains("of another customer"), "{report}");
    // The copy of m1 is missing too, and the hand edits left two sessions' unread
    // counts off their rows (m1 gone from ann's, m3 moved to bob's).
    assert!(
        report.contains("offset 4: message m1 is not stored"),
        "{report}"
    );
    assert!(
        report.contains("unread_count 3, its rows say 1"),
        "{report}"
    );
    assert!(
        report.contains("unread_count 1, its rows say 2"),
        "{report}"
    );
    assert!(report.contains("; 9 mismatches"), "{report}");
    // Narrowed to one untouched message, it passes.
    let (ok, report) = verify_with(&env, &["--message-id", "m4"]);
    assert!(ok, "{report}");
    assert!(
        report.contains(": 1 records (1 messages") && report.contains("filtered out: 5"),
        "{report}"
    );
    finish(&env, worker, pool).await;
}
