//! The correctness check of one trial: the database against what the bench sent.
//!
//! Guarantee: every message the bench sent is accounted for exactly once — present
//! and equal (content, sent time, customer, session linkage), altered, or lost — and
//! every surplus row is counted as a duplicate (of a message, of a customer, or of a
//! conversation's session), so a database that differs from the expectation by one row
//! is reported as differing by exactly that row.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use sqlx::MySqlPool;

use super::workload::{BenchMessage, PLATFORM, TENANT};

/// What the check found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Correctness {
    /// Distinct messages sent.
    pub expected: u64,
    /// Distinct sent messages that have at least one row.
    pub stored: u64,
    /// Sent messages without a row.
    pub lost: u64,
    /// Message rows beyond the first of each message id.
    pub duplicate_messages: u64,
    /// Messages whose row differs from what was sent (content, sent time, customer,
    /// agent, or a session of another customer).
    pub altered: u64,
    /// Customer rows beyond the first of each user.
    pub duplicate_customers: u64,
    /// Session rows beyond the first of each (user, agent) conversation.
    pub duplicate_sessions: u64,
    /// Records in the dead-letter topic: every record the bench sends is valid.
    pub dead_lettered: u64,
}

impl Correctness {
    /// Every message once, unaltered, nothing duplicated, nothing dead-lettered.
    pub fn is_exact(&self) -> bool {
        self.stored == self.expected
            && self.lost == 0
            && self.duplicate_messages == 0
            && self.altered == 0
            && self.duplicate_customers == 0
            && self.duplicate_sessions == 0
            && self.dead_lettered == 0
    }

    /// One line: `exact` or what is wrong.
    pub fn summary(&self) -> String {
        if self.is_exact() {
            return "exact".to_string();
        }
        let parts: Vec<String> = [
            ("lost", self.lost),
            ("dup msgs", self.duplicate_messages),
            ("altered", self.altered),
            ("dup customers", self.duplicate_customers),
            ("dup sessions", self.duplicate_sessions),
            ("dead-lettered", self.dead_lettered),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{what} {n}"))
        .collect();
        parts.join(", ")
    }
}

/// A message row as stored, with the natural keys of its customer and session.
type Row = (String, String, i64, Option<String>, Option<String>, bool);

/// Compares the bench tables of `pool` (with or without unique keys) with `sent`.
/// `dead_lettered` is the dead-letter topic's record count.
pub async fn check(
    pool: &MySqlPool,
    sent: &[BenchMessage],
    dead_lettered: u64,
) -> anyhow::Result<Correctness> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT CAST(m.external_message_id AS CHAR), m.content, m.sent_at, CAST(c.external_user_id AS CHAR), CAST(s.agent_id AS CHAR), \
                COALESCE(s.customer_id = m.customer_id, FALSE) \
         FROM message m \
         LEFT JOIN customer c ON c.id = m.customer_id \
         LEFT JOIN session s ON s.id = m.session_id \
         WHERE m.tenant_id = ? AND m.platform = ?",
    )
    .bind(TENANT)
    .bind(PLATFORM)
    .fetch_all(pool)
    .await?;
    let mut report = compare_messages(sent, &rows);
    let users: HashSet<&str> = sent.iter().map(|m| m.user_id.as_str()).collect();
    let customers: Vec<(String, i64)> = sqlx::query_as(
        "SELECT CAST(external_user_id AS CHAR), COUNT(*) FROM customer \
         WHERE tenant_id = ? AND platform = ? GROUP BY external_user_id",
    )
    .bind(TENANT)
    .bind(PLATFORM)
    .fetch_all(pool)
    .await?;
    report.duplicate_customers = surplus(
        customers
            .iter()
            .filter(|(user, _)| users.contains(user.as_str()))
            .map(|(_, count)| *count),
    );
    let sessions: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT CAST(c.external_user_id AS CHAR), CAST(s.agent_id AS CHAR), COUNT(*) FROM session s \
         JOIN customer c ON c.id = s.customer_id \
         WHERE s.tenant_id = ? AND s.platform = ? GROUP BY c.external_user_id, s.agent_id",
    )
    .bind(TENANT)
    .bind(PLATFORM)
    .fetch_all(pool)
    .await?;
    report.duplicate_sessions = surplus(
        sessions
            .iter()
            .filter(|(user, _, _)| users.contains(user.as_str()))
            .map(|(_, _, count)| *count),
    );
    report.dead_lettered = dead_lettered;
    Ok(report)
}

/// Rows beyond the first, summed over per-key row counts.
fn surplus(counts: impl Iterator<Item = i64>) -> u64 {
    counts.map(|count| (count - 1).max(0) as u64).sum()
}

/// The message part of the check, on rows already read.
fn compare_messages(sent: &[BenchMessage], rows: &[Row]) -> Correctness {
    let expected: HashMap<&str, &BenchMessage> =
        sent.iter().map(|m| (m.message_id.as_str(), m)).collect();
    let mut seen: HashMap<&str, u64> = HashMap::new();
    let mut report = Correctness {
        expected: expected.len() as u64,
        ..Correctness::default()
    };
    for (id, content, sent_at, user, agent, same_customer) in rows {
        let Some(want) = expected.get(id.as_str()) else {
            continue; // not one of ours
        };
        let copies = seen.entry(want.message_id.as_str()).or_insert(0);
        *copies += 1;
        if *copies > 1 {
            report.duplicate_messages += 1;
            continue;
        }
        let equal = *content == want.content
            && *sent_at == want.sent_at
            && user.as_deref() == Some(want.user_id.as_str())
            && agent.as_deref() == Some(want.agent_id.as_str())
            && *same_customer;
        if !equal {
            report.altered += 1;
        }
    }
    report.stored = seen.len() as u64;
    report.lost = report.expected - report.stored;
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::Spread;

    fn row(m: &BenchMessage) -> Row {
        (
            m.message_id.clone(),
            m.content.clone(),
            m.sent_at,
            Some(m.user_id.clone()),
            Some(m.agent_id.clone()),
            true,
        )
    }

    #[test]
    fn each_difference_is_counted_once_in_its_own_column() {
        let sent = super::super::workload::backlog("t", 5, Spread::Even { users: 2 });
        let mut rows: Vec<Row> = sent.iter().map(row).collect();
        assert!(compare_messages(&sent, &rows).stored == 5);
        rows.remove(0); // lost
        rows.push(row(&sent[1])); // duplicated
        rows[1].1.push('!'); // sent[2] altered
        rows[2].5 = false; // sent[3] linked to another customer's session
        rows.push(("not-ours".into(), String::new(), 0, None, None, false));
        let report = compare_messages(&sent, &rows);
        assert_eq!(report.expected, 5);
        assert_eq!(report.stored, 4);
        assert_eq!(report.lost, 1);
        assert_eq!(report.duplicate_messages, 1);
        assert_eq!(report.altered, 2);
        assert!(!report.is_exact());
        assert_eq!(report.summary(), "lost 1, dup msgs 1, altered 2");
    }
}
