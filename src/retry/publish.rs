//! Publishing a record to a delay or dead-letter topic.
//!
//! Guarantee: [`Publisher::publish`] returns only after the broker acknowledged the
//! record (idempotent producer, `acks=all`), so the caller may then store the source
//! offset: a crash before the ack replays the source record, never loses it. The
//! original key and value travel unchanged.

use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::headers::RetryHeaders;
use crate::config::KafkaSettings;
use crate::pipeline::Record;

/// How long one publish may wait for the broker before it counts as failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
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
        Ok(Self { producer })
    }

    /// Sends `record`'s key and value to `topic` with `headers` and waits for the ack.
    pub async fn publish(
        &self,
        topic: &str,
        record: &Record,
        headers: &RetryHeaders,
    ) -> anyhow::Result<()> {
        let mut out: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).headers(headers.to_headers());
        if let Some(key) = &record.key {
            out = out.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            out = out.payload(value.as_slice());
        }
        self.producer
            .send(out, DELIVERY_TIMEOUT)
            .await
            .map_err(|(error, _)| error)
            .with_context(|| format!("publishing to {topic}"))?;
        Ok(())
    }
}
