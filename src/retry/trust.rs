//! How far the worker believes the retry headers of a record it consumes (DESIGN.md,
//! "Retry headers are the worker's own").
//!
//! Guarantee: retry headers are read only on the worker's delay topics; on any other
//! topic they are ignored and the record is a first attempt. On a delay topic the due
//! time is at most the record's timestamp (when it reached the topic; now, if that lies
//! ahead) + that topic's delay × (1 + jitter) + [`CLOCK_MARGIN`], the
//! attempt count lies between the attempt that topic carries and `retry.max_attempts`,
//! and headers that are malformed, too many or too large are replaced by what the topic
//! implies (the record's own coordinates, that topic's attempt, due at once). Whatever is
//! out of range is logged and counted (`im_ingest_retry_headers_distrusted_total`), and
//! is never a reason to dead-letter a record or to hold its partition longer than that
//! topic's delay allows.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::message::{Headers, OwnedHeaders};

use super::headers::{Origin, RetryHeaders};
use super::policy::RetryPolicy;

/// Allowance for clocks of different instances when capping a due time.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(1);
/// More headers than this on a delay record: its retry headers are not read.
pub const MAX_HEADERS: usize = 64;
/// A header value larger than this on a delay record: its retry headers are not read.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Labels of `im_ingest_retry_headers_distrusted_total`.
pub const DISTRUST_REASONS: [&str; 5] = [
    "not_a_delay_topic",
    "malformed",
    "oversized",
    "due_capped",
    "attempts_clamped",
];

/// What a delay topic implies about the records on it.
#[derive(Debug, Clone, Copy)]
struct DelayTopic {
    delay: Duration,
    /// The attempt a record published to this topic carries at least.
    first_attempt: u32,
}

/// The worker's delay topics and the bounds they put on retry headers.
#[derive(Debug, Clone)]
pub struct RetryTrust {
    topics: HashMap<String, DelayTopic>,
    jitter: f64,
    max_attempts: u32,
}

impl RetryTrust {
    /// The delay topics of `policy` under `prefix` (as the worker publishes to them).
    pub fn new(policy: &RetryPolicy, prefix: &str) -> Self {
        let topics = policy
            .delays
            .iter()
            .enumerate()
            .map(|(index, delay)| {
                let first_attempt = u32::try_from(index + 2).unwrap_or(u32::MAX);
                (
                    RetryPolicy::topic_for(prefix, *delay),
                    DelayTopic {
                        delay: *delay,
                        first_attempt,
                    },
                )
            })
            .collect();
        Self {
            topics,
            jitter: policy.jitter,
            max_attempts: policy.max_attempts,
        }
    }

    /// The retry state a record of `topic` is processed with: `None` for a first attempt.
    /// `own` is the record's own coordinates, used when its headers cannot be read; `now`
    /// (epoch ms) the basis of the due-time cap (the caller passes the record's
    /// timestamp, not later than the present, so the cap is the same at every read).
    pub fn read(
        &self,
        topic: &str,
        headers: Option<&OwnedHeaders>,
        own: &Origin,
        now: i64,
    ) -> Option<RetryHeaders> {
        let headers = headers.filter(|h| h.count() > 0);
        let Some(delay_topic) = self.topics.get(topic) else {
            if headers.is_some_and(|h| !matches!(RetryHeaders::from_headers(h), Ok(None))) {
                distrusted("not_a_delay_topic");
                // DEBUG: a platform may send such headers on every record.
                tracing::debug!(
                    topic,
                    "retry headers on a topic that is not a delay topic ignored: the record is a first attempt"
                );
            }
            return None;
        };
        let parsed = match headers {
            Some(h) if h.count() > MAX_HEADERS || h.iter().any(|e| too_large(e.value)) => {
                Err(("oversized", "too many or too large headers".to_string()))
            }
            Some(h) => RetryHeaders::from_headers(h)
                .map_err(|reason| ("malformed", reason))
                .and_then(|parsed| parsed.ok_or(("malformed", "no retry headers".to_string()))),
            None => Err(("malformed", "no headers".to_string())),
        };
        let mut retry = match parsed {
            Ok(retry) => retry,
            Err((label, reason)) => {
                distrusted(label);
                tracing::warn!(topic, reason = %reason,
                    "delay record with unreadable retry headers: processed now as this topic's attempt");
                RetryHeaders {
                    attempts: i64::from(delay_topic.first_attempt.min(self.max_attempts)),
                    backoff_timestamp: now,
                    origin: own.clone(),
                    exception_fqcn: String::new(),
                    exception_message: String::new(),
                    replay_count: None,
                }
            }
        };
        self.bound(topic, delay_topic, &mut retry, now);
        Some(retry)
    }

    /// Caps the due time and clamps the attempts of a delay record read from `topic`.
    fn bound(&self, topic: &str, delay_topic: &DelayTopic, retry: &mut RetryHeaders, now: i64) {
        let longest = delay_topic.delay.mul_f64(1.0 + self.jitter) + CLOCK_MARGIN;
        let latest_due = now.saturating_add(i64::try_from(longest.as_millis()).unwrap_or(i64::MAX));
        if retry.backoff_timestamp > latest_due {
            distrusted("due_capped");
            tracing::warn!(
                topic,
                due_at = retry.backoff_timestamp,
                capped_to = latest_due,
                "delay record due later than its topic's delay allows: due time capped"
            );
            retry.backoff_timestamp = latest_due;
        }
        let lowest = i64::from(delay_topic.first_attempt.min(self.max_attempts));
        let highest = i64::from(self.max_attempts);
        let clamped = retry.attempts.clamp(lowest, highest);
        if clamped != retry.attempts {
            distrusted("attempts_clamped");
            tracing::warn!(
                topic,
                attempts = retry.attempts,
                clamped_to = clamped,
                "delay record with an attempt count its topic cannot carry: clamped"
            );
            retry.attempts = clamped;
        }
    }
}

fn too_large(value: Option<&[u8]>) -> bool {
    value.is_some_and(|v| v.len() > MAX_HEADER_BYTES)
}

fn distrusted(reason: &'static str) {
    metrics::counter!("im_ingest_retry_headers_distrusted_total", "reason" => reason).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Header;

    const NOW: i64 = 1_700_000_000_000;

    fn trust() -> RetryTrust {
        let policy = RetryPolicy {
            delays: [250, 1000, 4000, 16000].map(Duration::from_millis).to_vec(),
            max_attempts: 5,
            jitter: 0.2,
        };
        RetryTrust::new(&policy, "in.retry")
    }

    fn own() -> Origin {
        Origin {
            topic: "in.retry-1000".into(),
            partition: 3,
            offset: 42,
            timestamp: NOW - 10,
            consumer_group: "g".into(),
        }
    }

    fn headers(attempts: i64, due: i64) -> OwnedHeaders {
        RetryHeaders {
            attempts,
            backoff_timestamp: due,
            origin: Origin {
                topic: "in".into(),
                partition: 0,
                offset: 7,
                timestamp: NOW - 5000,
                consumer_group: "g".into(),
            },
            exception_fqcn: "im_ingest::LockHeld".into(),
            exception_message: "held".into(),
            replay_count: None,
        }
        .to_headers()
    }

    #[test]
    fn headers_on_a_topic_that_is_not_a_delay_topic_are_ignored() {
        let h = headers(3, NOW + 1_000_000);
        assert!(trust().read("in", Some(&h), &own(), NOW).is_none());
        assert!(trust()
            .read("in.retry-999", Some(&h), &own(), NOW)
            .is_none());
    }

    #[test]
    fn well_formed_headers_within_bounds_are_kept_as_they_are() {
        let h = headers(3, NOW + 900);
        let read = trust()
            .read("in.retry-1000", Some(&h), &own(), NOW)
            .unwrap();
        assert_eq!((read.attempts, read.backoff_timestamp), (3, NOW + 900));
        assert_eq!(read.origin.topic, "in");
        assert_eq!(read.exception_fqcn, "im_ingest::LockHeld");
    }

    #[test]
    fn a_due_time_past_the_topics_delay_with_jitter_and_margin_is_capped() {
        let h = headers(3, NOW + 365 * 24 * 3600 * 1000);
        let read = trust()
            .read("in.retry-1000", Some(&h), &own(), NOW)
            .unwrap();
        // 1000 ms × 1.2 + 1000 ms margin.
        assert_eq!(read.backoff_timestamp, NOW + 2200);
    }

    #[test]
    fn attempts_are_clamped_between_the_topics_attempt_and_the_maximum() {
        let low = trust()
            .read("in.retry-4000", Some(&headers(1, NOW)), &own(), NOW)
            .unwrap();
        assert_eq!(
            low.attempts, 4,
            "the 3rd delay topic carries attempt 4 at least"
        );
        let high = trust()
            .read("in.retry-250", Some(&headers(1_000_000, NOW)), &own(), NOW)
            .unwrap();
        assert_eq!(high.attempts, 5, "retry.max_attempts");
    }

    #[test]
    fn malformed_or_missing_headers_on_a_delay_topic_become_the_topics_attempt_due_now() {
        let attempts_only = OwnedHeaders::new().insert(Header {
            key: "retry_topic-attempts",
            value: Some(&[2u8][..]),
        });
        for h in [Some(attempts_only), None] {
            let read = trust()
                .read("in.retry-1000", h.as_ref(), &own(), NOW)
                .unwrap();
            assert_eq!((read.attempts, read.backoff_timestamp), (3, NOW));
            assert_eq!(read.origin, own());
        }
    }

    #[test]
    fn too_many_or_too_large_headers_are_not_read() {
        let mut many = headers(3, NOW + 900);
        for n in 0..MAX_HEADERS {
            many = many.insert(Header {
                key: &format!("x-{n}"),
                value: Some(&b"v"[..]),
            });
        }
        let big = vec![b'x'; MAX_HEADER_BYTES + 1];
        let large = headers(3, NOW + 900).insert(Header {
            key: "x-big",
            value: Some(&big[..]),
        });
        for h in [many, large] {
            let read = trust()
                .read("in.retry-1000", Some(&h), &own(), NOW)
                .unwrap();
            assert_eq!(read.origin, own(), "the headers were read");
            assert_eq!(read.backoff_timestamp, NOW);
        }
    }
}
