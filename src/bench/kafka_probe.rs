//! What the bench asks Kafka from outside the contenders: topics of a trial, whether the
//! contender's group has joined, whether it has committed everything, record counts.
//!
//! Guarantee: "done" means committed offsets, read from the group coordinator, have
//! reached the end of every topic the contender consumes — the moment the work is
//! durable by the contract's own rule (offsets after durability), not the moment rows
//! appear. Every call is bounded in time.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::workload::PartitionEnds;
use crate::config::KafkaSettings;

const TIMEOUT: Duration = Duration::from_secs(10);

pub struct KafkaProbe {
    settings: KafkaSettings,
    admin: AdminClient<DefaultClientContext>,
}

impl KafkaProbe {
    pub fn new(settings: &KafkaSettings) -> anyhow::Result<Self> {
        let admin = settings
            .client_config()
            .create()
            .context("creating the bench's Kafka admin client")?;
        Ok(Self {
            settings: settings.clone(),
            admin,
        })
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        for result in self.admin.create_topics(&[topic], &options).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
            }
        }
        Ok(())
    }

    /// Deletes a trial's topics; missing ones are fine.
    pub async fn delete_topics(&self, names: &[String]) {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        if let Err(error) = self.admin.delete_topics(&names, &options).await {
            tracing::debug!(%error, "deleting bench topics");
        }
    }

    /// A client of `group` that reads its committed offsets without joining it.
    pub fn group_reader(&self, group: &str) -> anyhow::Result<GroupReader> {
        let consumer: BaseConsumer = self
            .settings
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .context("creating the bench's group reader")?;
        Ok(GroupReader {
            consumer,
            group: group.to_string(),
        })
    }
}

pub struct GroupReader {
    consumer: BaseConsumer,
    group: String,
}

impl GroupReader {
    /// Whether the group has finished joining (state `Stable`) with `members` members
    /// (a group of several processes is stable in between, while the rest still join).
    /// A coordinator still loading (a freshly started broker) reads as "not yet".
    pub fn is_stable(&self, members: usize) -> anyhow::Result<bool> {
        let groups = match self
            .consumer
            .client()
            .fetch_group_list(Some(&self.group), TIMEOUT)
        {
            Ok(groups) => groups,
            Err(error) if coordinator_is_settling(&error) => return Ok(false),
            Err(error) => return Err(error).context("describing the bench group"),
        };
        Ok(groups
            .groups()
            .iter()
            .any(|g| g.state() == "Stable" && g.members().len() == members))
    }

    /// Whether the group's committed offset has reached the end of every partition of
    /// every topic in `topics` (a missing or empty topic counts as done). The end is the
    /// high watermark, or for a topic in `known_ends` the offsets given there (a
    /// transactional backlog's watermark lies past its commit marker, which a consumer
    /// storing its own offsets never commits). A coordinator still settling reads as
    /// "not yet".
    pub fn all_committed(
        &self,
        topics: &[String],
        known_ends: &HashMap<String, PartitionEnds>,
    ) -> anyhow::Result<bool> {
        for topic in topics {
            let partitions = self.partitions(topic)?;
            if partitions.is_empty() {
                continue;
            }
            let mut wanted = TopicPartitionList::new();
            for partition in &partitions {
                wanted.add_partition(topic, *partition);
            }
            let committed = match self.consumer.committed_offsets(wanted, TIMEOUT) {
                Ok(committed) => committed,
                Err(error) if coordinator_is_settling(&error) => return Ok(false),
                Err(error) => return Err(error).context("reading committed offsets"),
            };
            for partition in partitions {
                let high = match known_ends.get(topic) {
                    Some(ends) => ends.get(&partition).copied().unwrap_or(0),
                    None => {
                        self.consumer
                            .fetch_watermarks(topic, partition, TIMEOUT)
                            .context("reading watermarks")?
                            .1
                    }
                };
                let at = match committed
                    .find_partition(topic, partition)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(offset)) => offset,
                    _ => 0,
                };
                if at < high {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Records in `topic` (0 when it does not exist).
    pub fn record_count(&self, topic: &str) -> anyhow::Result<u64> {
        let mut count = 0;
        for partition in self.partitions(topic)? {
            let (low, high) = self
                .consumer
                .fetch_watermarks(topic, partition, TIMEOUT)
                .context("reading watermarks")?;
            count += (high - low).max(0) as u64;
        }
        Ok(count)
    }

    fn partitions(&self, topic: &str) -> anyhow::Result<Vec<i32>> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(topic), TIMEOUT)
            .context("reading topic metadata")?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect())
    }
}

/// Whether `error` is a group coordinator that is still loading or moving (a broker
/// just started, or the coordinator changed): the question is asked again, not failed.
fn coordinator_is_settling(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::NotCoordinator
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loading_or_moving_coordinator_is_asked_again_other_errors_fail() {
        let settling = [
            RDKafkaErrorCode::CoordinatorLoadInProgress,
            RDKafkaErrorCode::CoordinatorNotAvailable,
            RDKafkaErrorCode::NotCoordinator,
        ];
        for code in settling {
            assert!(coordinator_is_settling(&KafkaError::GroupListFetch(code)));
            // What `committed_offsets` returns (rdkafka 0.39).
            assert!(coordinator_is_settling(&KafkaError::MetadataFetch(code)));
        }
        let fatal = KafkaError::GroupListFetch(RDKafkaErrorCode::GroupAuthorizationFailed);
        assert!(!coordinator_is_settling(&fatal));
    }
}
