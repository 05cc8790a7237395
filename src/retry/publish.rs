//! Publishing a record to a delay or dead-letter topic.
//!
//! Guarantee: [`Publisher::publish`] returns only after the broker acknowledged the
//! record (idempotent producer, `acks=all`), so the caller may then store the source
//! offset: a crash before the ack replays the source record, never loses it. The
//! original key and value travel unchanged. A failure says what the caller can do
//! about it ([`PublishError`]): try again, publish something else, or stop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use super::headers::RetryHeaders;
use crate::config::KafkaSettings;
use crate::message::UserKey;

/// How long one publish may wait for the broker before it counts as failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long reading a topic's partition count may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a topic may be missing from the broker's metadata before it counts as gone
/// (a topic created a moment ago may take a moment to appear everywhere).
const MISSING_TOPIC_GRACE: Duration = Duration::from_secs(10);
/// Room for a record's headers and framing on top of the inbound topic's record limit:
/// the contract's headers are a few hundred bytes, the exception message is cut to
/// `headers::MAX_EXCEPTION_MESSAGE_BYTES`.
pub const HEADER_ALLOWANCE: usize = 64 * 1024;
/// librdkafka's largest `message.max.bytes`.
const LIBRDKAFKA_MAX_MESSAGE_BYTES: usize = 1_000_000_000;
/// librdkafka's default `batch.size`, kept when the topics allow it.
const LIBRDKAFKA_DEFAULT_BATCH_BYTES: usize = 1_000_000;
/// Room kept below a topic's limit for the framing of a batch around its records.
const BATCH_FRAMING_ALLOWANCE: usize = 1024;

/// The record limits (`max.message.bytes`) of the worker's topics, as found at start-up
/// (see `consumer::ensure_topics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// The largest record the inbound topic takes.
    pub inbound_record_bytes: usize,
    /// The smallest limit among the delay and dead-letter topics.
    pub smallest_outbound_record_bytes: usize,
}

/// Why a publish failed, by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Worth sending again as it is: the broker is away, slow or moving.
    #[error("publishing to {topic}: {source}")]
    Retryable {
        topic: String,
        #[source]
        source: anyhow::Error,
    },
    /// The topic refuses this record as it is (too large, invalid): sending it again
    /// changes nothing, sending something else may work.
    #[error("{topic} refused the record: {source}")]
    Refused {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// Nothing can be published there until an operator acts (authorization, a topic
    /// that is gone): the worker stops instead of trying forever.
    #[error("{0}")]
    Fatal(String),
}

/// What a librdkafka error code says about sending to a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// This record is refused; another may not be.
    RecordRefused,
    /// The worker may not publish (credentials, ACLs).
    NotAllowed,
    /// The producer reached a state it cannot leave (librdkafka's fatal error).
    ProducerFailed,
    /// The topic or partition is not there.
    TopicMissing,
    /// Anything else: the broker is away, slow or moving.
    Transient,
}

fn cause_of(code: Option<RDKafkaErrorCode>) -> Cause {
    use RDKafkaErrorCode as Code;
    match code {
        Some(
            Code::MessageSizeTooLarge
            | Code::MessageBatchTooLarge
            | Code::InvalidMessageSize
            | Code::InvalidRecord,
        ) => Cause::RecordRefused,
        Some(
            Code::TopicAuthorizationFailed
            | Code::ClusterAuthorizationFailed
            | Code::SaslAuthenticationFailed
            | Code::Authentication,
        ) => Cause::NotAllowed,
        Some(Code::Fatal) => Cause::ProducerFailed,
        Some(
            Code::UnknownTopic
            | Code::UnknownTopicOrPartition
            | Code::UnknownPartition
            | Code::InvalidTopic,
        ) => Cause::TopicMissing,
        _ => Cause::Transient,
    }
}

impl PublishError {
    /// Classifies a failed send to `topic` by its librdkafka error code.
    fn from_kafka(topic: &str, error: KafkaError) -> Self {
        match cause_of(error.rdkafka_error_code()) {
            Cause::RecordRefused => Self::Refused {
                topic: topic.to_string(),
                source: error,
            },
            Cause::NotAllowed => Self::Fatal(format!(
                "publishing to {topic} is not allowed ({error}): check the worker's Kafka \
                 credentials and ACLs"
            )),
            Cause::ProducerFailed => Self::Fatal(format!(
                "the producer for delay and dead-letter records failed for good while \
                 publishing to {topic} ({error}): restart the worker"
            )),
            Cause::TopicMissing => Self::missing_topic(topic),
            Cause::Transient => Self::Retryable {
                topic: topic.to_string(),
                source: error.into(),
            },
        }
    }

    fn missing_topic(topic: &str) -> Self {
        Self::Fatal(format!(
            "topic {topic} does not exist: the worker creates its topics at start-up, so \
             it was deleted or renamed since; restart the worker to create it again"
        ))
    }

    /// The fatal publish failure in `error`'s chain, if there is one.
    pub fn fatal_in(error: &anyhow::Error) -> Option<&str> {
        error.chain().find_map(|cause| match cause.downcast_ref() {
            Some(PublishError::Fatal(reason)) => Some(reason.as_str()),
            _ => None,
        })
    }
}

/// The key and value of a record to publish (each as the source record had it).
#[derive(Debug, Clone, Copy)]
pub struct Payload<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    /// Partition counts of the topics published to, fetched once each.
    partitions: Arc<Mutex<HashMap<String, i32>>>,
}

impl Publisher {
    /// A producer for records as large as the inbound topic takes, plus their headers,
    /// whose batches of several records stay within the smallest limit of the topics it
    /// publishes to: so only a record too large on its own is ever refused, never one
    /// that shared a batch with others (Kafka applies the limit to a whole batch).
    pub fn new(settings: &KafkaSettings, limits: &TopicLimits) -> anyhow::Result<Self> {
        let max_message_bytes =
            (limits.inbound_record_bytes + HEADER_ALLOWANCE).min(LIBRDKAFKA_MAX_MESSAGE_BYTES);
        let batch_bytes = limits
            .smallest_outbound_record_bytes
            .saturating_sub(BATCH_FRAMING_ALLOWANCE)
            .clamp(1, LIBRDKAFKA_DEFAULT_BATCH_BYTES);
        let producer = settings
            .client_config()
            .set("message.max.bytes", max_message_bytes.to_string())
            .set("batch.size", batch_bytes.to_string())
            // A deleted topic must be reported, not silently created again with the
            // broker's defaults.
            .set("allow.auto.create.topics", "false")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            )
            .create()
            .context("creating the Kafka producer for delay and dead-letter topics")?;
        Ok(Self {
            producer,
            partitions: Arc::default(),
        })
    }

    /// Like [`Publisher::publish`], but into the partition of `topic` that belongs to
    /// `user`: every delayed record of one user waits in one partition, so one worker
    /// takes them all and runs them one after another instead of several workers
    /// colliding on the user's lock when they fall due together.
    pub async fn publish_for_user(
        &self,
        topic: &str,
        record: Payload<'_>,
        headers: &RetryHeaders,
        user: &UserKey,
    ) -> Result<(), PublishError> {
        let count = self.partition_count(topic).await?;
        let partition = (stable_hash(user) % count as u64) as i32;
        self.send(topic, Some(partition), record, headers).await
    }

    /// Sends `record`'s key and value to `topic` with `headers` and waits for the ack.
    pub async fn publish(
        &self,
        topic: &str,
        record: Payload<'_>,
        headers: &RetryHeaders,
    ) -> Result<(), PublishError> {
        // Asked first so a topic that is gone is reported at once, not after librdkafka
        // waited for it to appear.
        self.partition_count(topic).await?;
        self.send(topic, None, record, headers).await
    }

    /// The topic's partition count, read once; a topic still missing after
    /// [`MISSING_TOPIC_GRACE`] is fatal.
    async fn partition_count(&self, topic: &str) -> Result<i32, PublishError> {
        if let Some(count) = self.partitions.lock().expect("partitions lock").get(topic) {
            return Ok(*count);
        }
        let missing_since = Instant::now();
        let count = loop {
            match self.read_partition_count(topic).await {
                Ok(Some(count)) => break count,
                Ok(None) if missing_since.elapsed() < MISSING_TOPIC_GRACE => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(None) => return Err(PublishError::missing_topic(topic)),
                Err(error) => return Err(error),
            }
        };
        self.partitions
            .lock()
            .expect("partitions lock")
            .insert(topic.to_string(), count);
        Ok(count)
    }

    /// The topic's partition count from the broker's metadata; `None` if it has none.
    async fn read_partition_count(&self, topic: &str) -> Result<Option<i32>, PublishError> {
        let producer = self.producer.clone();
        let name = topic.to_string();
        // librdkafka's metadata call blocks: keep it off the async workers.
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), METADATA_TIMEOUT)
        })
        .await
        .map_err(|error| PublishError::Retryable {
            topic: topic.to_string(),
            source: anyhow::Error::new(error).context("metadata task failed"),
        })?
        .map_err(|error| PublishError::from_kafka(topic, error))?;
        let Some(found) = metadata.topics().first() else {
            return Ok(None);
        };
        if let Some(error) = found.error() {
            let code = RDKafkaErrorCode::from(error);
            if cause_of(Some(code)) == Cause::TopicMissing {
                return Ok(None);
            }
            return Err(PublishError::from_kafka(
                topic,
                KafkaError::MetadataFetch(code),
            ));
        }
        Ok(Some(found.partitions().len() as i32).filter(|count| *count > 0))
    }

    async fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        record: Payload<'_>,
        headers: &RetryHeaders,
    ) -> Result<(), PublishError> {
        let mut out: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).headers(headers.to_headers());
        if let Some(partition) = partition {
            out = out.partition(partition);
        }
        if let Some(key) = record.key {
            out = out.key(key);
        }
        if let Some(value) = record.value {
            out = out.payload(value);
        }
        let Err((error, _)) = self.producer.send(out, DELIVERY_TIMEOUT).await else {
            return Ok(());
        };
        if cause_of(error.rdkafka_error_code()) == Cause::TopicMissing {
            // Also what a partition's leader moving looks like: the topic is gone only
            // if the broker's metadata still says so after its grace.
            self.partitions
                .lock()
                .expect("partitions lock")
                .remove(topic);
            self.partition_count(topic).await?;
            return Err(PublishError::Retryable {
                topic: topic.to_string(),
                source: error.into(),
            });
        }
        Err(PublishError::from_kafka(topic, error))
    }
}

/// FNV-1a over the user key's fields, each NUL-terminated: the same partition for a user
/// in every process and version.
fn stable_hash(user: &UserKey) -> u64 {
    crate::fnv::fnv1a(
        [&user.tenant_id, &user.platform, &user.user_id]
            .into_iter()
            .flat_map(|part| part.bytes().chain([0])),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_record_a_denied_or_missing_topic_and_a_broker_hiccup_are_told_apart() {
        use RDKafkaErrorCode as Code;
        let refused = |code| {
            matches!(
                PublishError::from_kafka("t", KafkaError::MessageProduction(code)),
                PublishError::Refused { .. }
            )
        };
        let fatal = |code| match PublishError::from_kafka("t", KafkaError::MessageProduction(code))
        {
            PublishError::Fatal(reason) => reason,
            other => panic!("{code:?} is not fatal: {other}"),
        };
        let retryable = |code| {
            matches!(
                PublishError::from_kafka("t", KafkaError::MessageProduction(code)),
                PublishError::Retryable { .. }
            )
        };
        assert!(refused(Code::MessageSizeTooLarge));
        assert!(refused(Code::InvalidRecord));
        assert!(fatal(Code::TopicAuthorizationFailed).contains("not allowed"));
        assert!(fatal(Code::UnknownTopic).contains("topic t does not exist"));
        assert!(fatal(Code::UnknownTopicOrPartition).contains("does not exist"));
        assert!(retryable(Code::MessageTimedOut));
        assert!(retryable(Code::AllBrokersDown));
        assert!(retryable(Code::NotLeaderForPartition));
    }

    #[test]
    fn a_fatal_failure_is_found_under_any_context() {
        let error = anyhow::Error::new(PublishError::Fatal("gone".into()))
            .context("routing")
            .context("processing");
        assert_eq!(PublishError::fatal_in(&error), Some("gone"));
        let retryable = anyhow::Error::new(PublishError::Retryable {
            topic: "t".into(),
            source: anyhow::anyhow!("timed out"),
        });
        assert_eq!(PublishError::fatal_in(&retryable), None);
    }

    #[test]
    fn stable_hash_is_fixed_and_separates_fields() {
        let user = |t: &str, p: &str, u: &str| UserKey {
            tenant_id: t.into(),
            platform: p.into(),
            user_id: u.into(),
        };
        // Fixed across processes and builds: a change here moves users' partitions.
        // The value is FNV-1a 64 of "default\0" "2\0" "u1\0", computed independently.
        assert_eq!(
            stable_hash(&user("default", "2", "u1")),
            9_139_152_560_747_475_814
        );
        assert_ne!(
            stable_hash(&user("ab", "c", "u")),
            stable_hash(&user("a", "bc", "u"))
        );
    }
}
