//! An owned copy of a consumed record and what the pipeline reads from it before any
//! I/O: its decoded content and its retry state.
//!
//! Guarantee: preparing a record never fails and never loses it: whatever is wrong with
//! its value becomes a reason to dead-letter, carried with the record; its retry headers
//! count only as far as `retry::trust` believes them, never as a reason to dead-letter.

use rdkafka::message::{Headers, Message, OwnedHeaders};

use super::contention::holder_in;
use super::LOCK_HELD_FQCN;
use crate::message::{decode, ChatMessage, Inbound, InvalidMessage, UserKey};
use crate::retry::headers::Origin;
use crate::retry::trust::RetryTrust;

/// One consumed record, detached from the consumer so it can outlive the poll.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Epoch ms, when the broker gave one.
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Option<OwnedHeaders>,
}

impl Record {
    /// Copies a consumed message (borrowed from the consumer, or owned).
    pub fn from_message(message: &impl Message) -> Self {
        Self {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers: message.headers().map(|headers| {
                headers.iter().fold(
                    OwnedHeaders::new_with_capacity(headers.count()),
                    |owned, h| owned.insert(h),
                )
            }),
        }
    }

    /// Bytes of its key and value.
    pub fn key_and_value_bytes(&self) -> usize {
        let length = |part: &Option<Vec<u8>>| part.as_ref().map_or(0, Vec::len);
        length(&self.key) + length(&self.value)
    }
}

/// A record ready for the processing step.
#[derive(Debug, Clone)]
pub struct Job {
    pub record: Record,
    pub content: Result<Inbound, InvalidMessage>,
    /// The main-topic record this one stems from (itself, on the main topic).
    pub origin: Origin,
    /// Deliveries so far, this one included (1 on the main topic).
    pub attempts: u32,
    /// The due time of a delay record, epoch ms.
    pub due_at: Option<i64>,
    /// Fingerprint of the lock holder that sent this record to its delay topic, if it
    /// says (see `contention`).
    pub previous_holder: Option<String>,
}

impl Job {
    /// Decodes the value and reads the retry state, as far as `trust` believes the
    /// retry headers (only on the worker's delay topics, bounded there).
    pub fn prepare(
        record: Record,
        max_bytes: usize,
        consumer_group: &str,
        trust: &RetryTrust,
    ) -> Self {
        let own_origin = Origin {
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            timestamp: record.timestamp.unwrap_or_else(now_millis),
            consumer_group: consumer_group.to_string(),
        };
        let retry = trust.read(
            &record.topic,
            record.headers.as_ref(),
            &own_origin,
            // When the record reached its delay topic (never later than now): a basis
            // that stays the same each time the record is read.
            record
                .timestamp
                .map_or_else(now_millis, |at| at.min(now_millis())),
        );
        let previous_holder = match &retry {
            Some(h) if h.exception_fqcn == LOCK_HELD_FQCN => {
                holder_in(&h.exception_message).map(str::to_string)
            }
            _ => None,
        };
        let (origin, attempts, due_at) = match retry {
            Some(h) => (
                h.origin,
                u32::try_from(h.attempts.max(1)).unwrap_or(u32::MAX),
                Some(h.backoff_timestamp),
            ),
            None => (own_origin, 1, None),
        };
        Self {
            content: decode(record.value.as_deref(), max_bytes),
            record,
            origin,
            attempts,
            due_at,
            previous_holder,
        }
    }

    /// The user whose records must be processed one at a time; `None` for invalid
    /// records, which touch no user's data.
    pub fn user(&self) -> Option<UserKey> {
        self.content.as_ref().ok().map(Inbound::user)
    }

    /// The chat message to store, when the record is one.
    pub fn message(&self) -> Option<&ChatMessage> {
        match &self.content {
            Ok(Inbound::Message(message)) => Some(message),
            _ => None,
        }
    }
}

pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
