//! Publishing a record to a delay or dead-letter topic.
//!
//! Guarantee: [`Publisher::publish`] returns only after the broker acknowledged the
//! record (idempotent producer, `acks=all`), so the caller may then store the source
//! offset: a crash before the ack replays the source record, never loses it. The
//! original key and value travel unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::headers::RetryHeaders;
use crate::config::KafkaSettings;
use crate::message::UserKey;

/// How long one publish may wait for the broker before it counts as failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long reading a topic's partition count may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub fn new(settings: &KafkaSettings) -> anyhow::Result<Self> {
        let producer = settings
            .client_config()
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
    ) -> anyhow::Result<()> {
        let count = self.partition_count(topic).await?;
        let partition = (stable_hash(user) % count as u64) as i32;
        self.send(topic, Some(partition), record, headers).await
    }

    async fn partition_count(&self, topic: &str) -> anyhow::Result<i32> {
        if let Some(count) = self.partitions.lock().expect("partitions lock").get(topic) {
            return Ok(*count);
        }
        let producer = self.producer.clone();
        let name = topic.to_string();
        // librdkafka's metadata call blocks: keep it off the async workers.
        let count = tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&name), METADATA_TIMEOUT)?;
            anyhow::Ok(
                metadata
                    .topics()
                    .first()
                    .map_or(0, |t| t.partitions().len()) as i32,
            )
        })
        .await
        .context("metadata task failed")?
        .with_context(|| format!("reading the partitions of {topic}"))?;
        anyhow::ensure!(
            count > 0,
            "topic {topic} has no partitions (does it exist?)"
        );
        self.partitions
            .lock()
            .expect("partitions lock")
            .insert(topic.to_string(), count);
        Ok(count)
    }

    /// Sends `record`'s key and value to `topic` with `headers` and waits for the ack.
    pub async fn publish(
        &self,
        topic: &str,
        record: Payload<'_>,
        headers: &RetryHeaders,
    ) -> anyhow::Result<()> {
        self.send(topic, None, record, headers).await
    }

    async fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        record: Payload<'_>,
        headers: &RetryHeaders,
    ) -> anyhow::Result<()> {
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
        self.producer
            .send(out, DELIVERY_TIMEOUT)
            .await
            .map_err(|(error, _)| error)
            .with_context(|| format!("publishing to {topic}"))?;
        Ok(())
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
