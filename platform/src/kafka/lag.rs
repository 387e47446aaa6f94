//! Consumer lag: records published to a partition that a consumer group has
//! not committed yet. Shared by `couponctl status`, the lag gauges and the
//! tests' "caught up" waits.
//!
//! The look-ups (metadata, committed offsets, watermarks) are blocking
//! librdkafka calls: call them from a blocking thread.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::KafkaSettings;

/// How long one broker look-up may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The lag of one group on one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The end of the partition (the next offset to be written).
    pub high: i64,
    /// The group's committed offset, if it has one.
    pub committed: Option<i64>,
    /// `high - committed` (from the start of the log when nothing is committed).
    pub lag: i64,
}

/// A client that reads one group's committed offsets. It never joins the
/// group or fetches records, so it does not disturb the group's members;
/// keep it to query again (a client per query costs a connection setup).
pub struct LagProbe {
    consumer: BaseConsumer,
    group: String,
}

impl LagProbe {
    pub fn new(kafka: &KafkaSettings, group: &str) -> Result<Self, KafkaError> {
        let mut config = kafka.client_config();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false");
        Ok(Self {
            consumer: config.create()?,
            group: group.to_owned(),
        })
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// The lag of the group on every partition of `topics`.
    pub fn lag(&self, topics: &[String]) -> Result<Vec<PartitionLag>, KafkaError> {
        let mut lags = Vec::new();
        for topic in topics {
            let metadata = self.consumer.fetch_metadata(Some(topic), TIMEOUT)?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition(topic, *p);
            }
            let committed = self.consumer.committed_offsets(tpl, TIMEOUT)?;
            for partition in partitions {
                let (low, high) = self.consumer.fetch_watermarks(topic, partition, TIMEOUT)?;
                let committed = match committed
                    .find_partition(topic, partition)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                };
                lags.push(PartitionLag {
                    topic: topic.clone(),
                    partition,
                    high,
                    committed,
                    lag: (high - committed.unwrap_or(low)).max(0),
                });
            }
        }
        Ok(lags)
    }
}

/// One-off: the lag of `group` on every partition of `topics`.
pub fn group_lag(
    kafka: &KafkaSettings,
    group: &str,
    topics: &[String],
) -> Result<Vec<PartitionLag>, KafkaError> {
    LagProbe::new(kafka, group)?.lag(topics)
}
