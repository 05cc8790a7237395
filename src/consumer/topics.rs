//! Creating the topics the worker uses when they are missing.
//!
//! Guarantee: after [`ensure_topics`] returns `Ok`, the inbound, every delay and the
//! dead-letter topic exist (existing ones are left exactly as they are).

use std::time::Duration;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Settings;
use crate::retry::policy::RetryPolicy;

/// The inbound topic, the delay topics in order, then the dead-letter topic.
pub fn worker_topics(settings: &Settings) -> Vec<String> {
    let kafka = &settings.kafka;
    let mut topics = vec![kafka.inbound_topic.clone()];
    topics.extend(RetryPolicy::from_settings(&settings.retry).topics(&kafka.retry_topic));
    topics.push(kafka.dlq_topic.clone());
    topics
}

pub async fn ensure_topics(settings: &Settings) -> anyhow::Result<()> {
    let kafka = &settings.kafka;
    let admin: AdminClient<DefaultClientContext> = kafka
        .client_config()
        .create()
        .context("creating the Kafka admin client")?;
    let names = worker_topics(settings);
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                kafka.topic_partitions,
                TopicReplication::Fixed(kafka.topic_replication),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .with_context(|| format!("creating topics at {}", kafka.brokers))?;
    for result in results {
        match result {
            Ok(topic) => {
                tracing::info!(%topic, partitions = kafka.topic_partitions, "created topic")
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}
