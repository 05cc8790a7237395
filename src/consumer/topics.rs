//! Creating the topics the worker uses when they are missing.
//!
//! Guarantee: after [`ensure_topics`] returns `Ok`, the inbound, every delay and the
//! dead-letter topic exist, and the delay and dead-letter topics it created take any
//! record the inbound topic takes, plus headers (existing topics are left exactly as
//! they are; one with a smaller limit is reported at start-up).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Settings;
use crate::retry::policy::RetryPolicy;
use crate::retry::publish::{TopicLimits, HEADER_ALLOWANCE};

/// The topic setting that limits a record's size (a record batch's, to be exact).
const RECORD_LIMIT: &str = "max.message.bytes";
/// How long a topic's settings may be missing from the broker's description of it.
const DESCRIBE_GRACE: Duration = Duration::from_secs(10);

/// The inbound topic, the delay topics in order, then the dead-letter topic.
pub fn worker_topics(settings: &Settings) -> Vec<String> {
    let kafka = &settings.kafka;
    let mut topics = vec![kafka.inbound_topic.clone()];
    topics.extend(RetryPolicy::from_settings(&settings.retry).topics(&kafka.retry_topic));
    topics.push(kafka.dlq_topic.clone());
    topics
}

/// Creates the missing topics: the inbound one first, then the others sized from it.
pub async fn ensure_topics(settings: &Settings) -> anyhow::Result<TopicLimits> {
    let kafka = &settings.kafka;
    let admin: AdminClient<DefaultClientContext> = kafka
        .client_config()
        .create()
        .context("creating the Kafka admin client")?;
    let names = worker_topics(settings);
    let existing = existing_topics(settings).await?;
    let (inbound, others) = names.split_first().expect("the inbound topic is first");
    let missing = |topics: &[String]| -> Vec<String> {
        topics
            .iter()
            .filter(|topic| !existing.contains(topic.as_str()))
            .cloned()
            .collect()
    };
    create_missing(
        &admin,
        settings,
        &missing(std::slice::from_ref(inbound)),
        None,
    )
    .await?;
    let inbound_record_bytes = record_limit(&admin, inbound).await?;
    let needed = inbound_record_bytes + HEADER_ALLOWANCE;
    let created = create_missing(&admin, settings, &missing(others), Some(needed)).await?;
    let mut smallest_outbound_record_bytes = needed;
    for topic in others.iter().filter(|topic| !created.contains(topic)) {
        let limit = record_limit(&admin, topic).await?;
        smallest_outbound_record_bytes = smallest_outbound_record_bytes.min(limit);
        if limit < needed {
            tracing::warn!(%topic, limit, needed, "this topic takes smaller records than the \
                inbound topic: a record a delay topic refuses is dead-lettered (whole), one the \
                dead-letter topic refuses goes there without its value; raise its \
                max.message.bytes to keep whole records on their way");
        }
    }
    Ok(TopicLimits {
        inbound_record_bytes,
        smallest_outbound_record_bytes,
    })
}

/// The topics the broker lists, so that only missing ones are created: asking to create
/// an existing topic needs the Create right, which a least-privilege account lacks.
async fn existing_topics(settings: &Settings) -> anyhow::Result<HashSet<String>> {
    let client: BaseConsumer = settings
        .kafka
        .client_config()
        .create()
        .context("creating the Kafka client that lists the topics")?;
    let brokers = settings.kafka.brokers.clone();
    tokio::task::spawn_blocking(move || {
        let metadata = client
            .fetch_metadata(None, METADATA_TIMEOUT)
            .with_context(|| format!("listing the topics at {brokers}"))?;
        Ok(metadata
            .topics()
            .iter()
            .map(|topic| topic.name().to_string())
            .collect())
    })
    .await?
}

/// How long listing the topics may take (the broker may still be starting).
const METADATA_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates `names` (which were missing; one created meanwhile by another worker is
/// fine), with `record_bytes` as their limit when given (else the broker's default);
/// returns the names it created.
async fn create_missing(
    admin: &AdminClient<DefaultClientContext>,
    settings: &Settings,
    names: &[String],
    record_bytes: Option<usize>,
) -> anyhow::Result<Vec<String>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let kafka = &settings.kafka;
    let record_bytes = record_bytes.map(|bytes| bytes.to_string());
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            let topic = NewTopic::new(
                name,
                kafka.topic_partitions,
                TopicReplication::Fixed(kafka.topic_replication),
            );
            match &record_bytes {
                Some(bytes) => topic.set(RECORD_LIMIT, bytes),
                None => topic,
            }
        })
        .collect();
    let results = admin
        .create_topics(&new_topics, &admin_options())
        .await
        .with_context(|| format!("creating topics at {}", kafka.brokers))?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(topic) => {
                tracing::info!(%topic, partitions = kafka.topic_partitions, record_bytes, "created topic");
                created.push(topic);
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(created)
}

/// The topic's `max.message.bytes`, as the broker applies it (its own default included).
/// A topic created a moment ago may be described without its settings for a moment:
/// asked again for up to [`DESCRIBE_GRACE`].
async fn record_limit(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> anyhow::Result<usize> {
    let started = Instant::now();
    loop {
        let described = admin
            .describe_configs(&[ResourceSpecifier::Topic(topic)], &admin_options())
            .await
            .with_context(|| format!("reading the configuration of topic {topic}"))?;
        let config = described
            .into_iter()
            .next()
            .context("the broker described no topic")?;
        let value = match &config {
            Ok(config) => config
                .get(RECORD_LIMIT)
                .and_then(|entry| entry.value.clone()),
            Err(_) => None,
        };
        match value {
            Some(value) => {
                return value.parse().with_context(|| {
                    format!("topic {topic}'s {RECORD_LIMIT} {value:?} is not a size")
                })
            }
            None if started.elapsed() < DESCRIBE_GRACE => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None => {
                // The client drops the broker's error for one resource (an authorization
                // failure among them) and hands back an empty description instead.
                let cause = match &config {
                    Err(code) => code.to_string(),
                    Ok(config) if config.entries.is_empty() => "the broker returned none of \
                        its settings: is DescribeConfigs on this topic allowed for the \
                        worker's principal? (README, \"Security\")"
                        .to_string(),
                    Ok(_) => "not in its settings".to_string(),
                };
                anyhow::bail!("reading {RECORD_LIMIT} of topic {topic}: {cause}")
            }
        }
    }
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))
}
