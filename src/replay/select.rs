//! Which records a replay republishes: the range, the filters and the loop guard.
//!
//! Guarantee: a pure decision per record (no I/O), the same in a dry run and a real
//! one; every record gets exactly one outcome, and a filter on a message's fields never
//! matches a record whose value cannot be read.

use rdkafka::message::Headers;

use crate::message::{decode, Inbound};
use crate::pipeline::Record;
use crate::retry::headers::{self, DLT_EXCEPTION_FQCN};

/// Range and filters; every one given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct Filters {
    /// Only these partitions of the source topic (repeat the flag for several).
    #[arg(long = "partition")]
    pub partitions: Vec<i32>,
    /// From this offset on (in every partition read).
    #[arg(long)]
    pub from_offset: Option<i64>,
    /// Before this offset.
    #[arg(long)]
    pub until_offset: Option<i64>,
    /// Records with a timestamp at or after this, epoch ms.
    #[arg(long)]
    pub since: Option<i64>,
    /// Records with a timestamp before this, epoch ms.
    #[arg(long)]
    pub until: Option<i64>,
    /// Only this tenant's records.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only this customer's records (`from_user_id`).
    #[arg(long)]
    pub customer: Option<String>,
    /// Only this message.
    #[arg(long)]
    pub message_id: Option<String>,
    /// Only dead letters of this error class (`kafka_dlt-exception-fqcn`), e.g.
    /// `im_ingest::DatabaseRejected`.
    #[arg(long)]
    pub error_class: Option<String>,
}

/// What a replay does with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Republished, as its `count`-th replay.
    Replay {
        count: u32,
    },
    OutsideRange,
    FilteredOut,
    /// Already replayed `--max-replays` times: the loop guard.
    ReplayedTooOften,
}

impl Outcome {
    /// The summary's name for it.
    pub fn label(self, dry_run: bool) -> &'static str {
        match (self, dry_run) {
            (Outcome::Replay { .. }, false) => "replayed",
            (Outcome::Replay { .. }, true) => "would replay",
            (Outcome::OutsideRange, _) => "outside the range",
            (Outcome::FilteredOut, _) => "filtered out",
            (Outcome::ReplayedTooOften, _) => "refused: replayed too often",
        }
    }
}

impl Filters {
    pub fn select(&self, record: &Record, max_bytes: usize, max_replays: u32) -> Outcome {
        let in_range = (self.partitions.is_empty() || self.partitions.contains(&record.partition))
            && self.from_offset.is_none_or(|from| record.offset >= from)
            && self.until_offset.is_none_or(|until| record.offset < until)
            && self
                .since
                .is_none_or(|since| record.timestamp.is_some_and(|t| t >= since))
            && self
                .until
                .is_none_or(|until| record.timestamp.is_some_and(|t| t < until));
        if !in_range {
            return Outcome::OutsideRange;
        }
        if !self.matches(record, max_bytes) {
            return Outcome::FilteredOut;
        }
        let replayed = headers::replay_count(record.headers.as_ref()).unwrap_or(0);
        if replayed >= max_replays {
            return Outcome::ReplayedTooOften;
        }
        Outcome::Replay {
            count: replayed + 1,
        }
    }

    fn matches(&self, record: &Record, max_bytes: usize) -> bool {
        if let Some(class) = &self.error_class {
            let fqcn = record.headers.as_ref().and_then(|h| {
                h.iter()
                    .filter(|h| h.key == DLT_EXCEPTION_FQCN)
                    .last()
                    .and_then(|h| h.value)
            });
            if fqcn != Some(class.as_bytes()) {
                return false;
            }
        }
        if self.tenant.is_none() && self.customer.is_none() && self.message_id.is_none() {
            return true;
        }
        let Ok(content) = decode(record.value.as_deref(), max_bytes) else {
            return false;
        };
        let user = content.user();
        let message_id = match &content {
            Inbound::Message(m) => Some(m.message_id.as_str()),
            Inbound::Read(_) => None,
        };
        self.tenant.as_ref().is_none_or(|t| *t == user.tenant_id)
            && self.customer.as_ref().is_none_or(|c| *c == user.user_id)
            && self
                .message_id
                .as_ref()
                .is_none_or(|id| Some(id.as_str()) == message_id)
    }
}

/// A retry or dead-letter header, which a replayed record must not carry (so the worker
/// takes it as a first attempt).
pub fn is_retry_header(key: &str) -> bool {
    key.starts_with("retry_topic-") || key.starts_with("kafka_dlt-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders};

    fn record(offset: i64, timestamp: i64, value: &str, replays: Option<&str>) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset,
            timestamp: Some(timestamp),
            key: None,
            value: Some(value.as_bytes().to_vec()),
            headers: replays.map(|n| {
                OwnedHeaders::new().insert(Header {
                    key: headers::REPLAY_COUNT,
                    value: Some(n.as_bytes()),
                })
            }),
        }
    }

    fn message(tenant: &str) -> String {
        serde_json::json!({"tenant_id": tenant, "message_id": "m", "from_user_id": "u",
            "to_user_id": "a", "timestamp": 1})
        .to_string()
    }

    #[test]
    fn a_tenant_and_a_time_window_select_exactly_the_matching_records() {
        let filters = Filters {
            tenant: Some("t1".into()),
            since: Some(100),
            until: Some(200),
            ..Filters::default()
        };
        let pick = |offset, at, tenant: &str| {
            filters.select(&record(offset, at, &message(tenant), None), 1 << 20, 3)
        };
        assert_eq!(pick(0, 150, "t1"), Outcome::Replay { count: 1 });
        assert_eq!(pick(1, 99, "t1"), Outcome::OutsideRange);
        assert_eq!(pick(2, 200, "t1"), Outcome::OutsideRange);
        assert_eq!(pick(3, 150, "t2"), Outcome::FilteredOut);
        let unreadable = record(4, 150, "not json", None);
        assert_eq!(
            filters.select(&unreadable, 1 << 20, 3),
            Outcome::FilteredOut
        );
    }

    #[test]
    fn the_loop_guard_refuses_a_record_replayed_max_times_and_counts_the_others_up() {
        let filters = Filters::default();
        let value = message("t");
        assert_eq!(
            filters.select(&record(0, 1, &value, Some("2")), 1 << 20, 3),
            Outcome::Replay { count: 3 }
        );
        assert_eq!(
            filters.select(&record(0, 1, &value, Some("3")), 1 << 20, 3),
            Outcome::ReplayedTooOften
        );
    }

    #[test]
    fn retry_and_dead_letter_headers_are_dropped_and_others_kept() {
        assert!(is_retry_header("retry_topic-attempts"));
        assert!(is_retry_header("kafka_dlt-exception-fqcn"));
        assert!(!is_retry_header("traceparent"));
    }
}
