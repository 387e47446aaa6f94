//! Kafka: topic names, the producer, group consumers and the admin client.
//!
//! The code talks plain Kafka through librdkafka, so it runs unchanged against
//! Apache Kafka (the local broker `make up` starts), Redpanda or a managed
//! service, over TLS/SASL when `extra` says so. Exactly-once effects come from
//! idempotent consumers (natural keys, stored decisions), not from Kafka
//! transactions: the effects land in Postgres and Redis, which a Kafka
//! transaction cannot cover, and it keeps the system portable to brokers
//! without them.

pub mod admin;
pub mod consumer;
pub mod lag;
pub mod producer;
pub mod role;

pub use admin::{ensure_topics, TopicSpec};
pub use consumer::{decode, decode_topic, decode_value, DecodeError, Record};
pub use producer::{PublishError, Publisher};
pub use role::{PollSettings, RoleHandler};

use coupon_schemas::{Role, TopicKind};

/// How to reach the brokers. Extra librdkafka properties may be given as
/// `key=value` pairs (e.g. security settings for a managed cluster).
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    /// `enable.idempotence` on producers: no duplicates from producer retries.
    pub idempotent_producer: bool,
    /// Which consumer-group protocol the role consumers speak.
    pub group_protocol: GroupProtocol,
    pub extra: Vec<(String, String)>,
}

/// The consumer-group protocol. Both move partitions between the instances
/// of a role as they join, leave or die.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupProtocol {
    /// The classic protocol with the cooperative-sticky assignor: every
    /// Kafka-protocol broker supports it (Kafka 2.4+, Redpanda, managed
    /// services), so it is the default.
    #[default]
    Classic,
    /// KIP-848's `consumer` protocol (Kafka 4.0+): the broker assigns, and
    /// rebalances never stop the partitions that stay put.
    Consumer,
}

impl std::str::FromStr for GroupProtocol {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw {
            "classic" => Ok(GroupProtocol::Classic),
            "consumer" => Ok(GroupProtocol::Consumer),
            other => Err(format!(
                "{other:?} is not a group protocol (classic or consumer)"
            )),
        }
    }
}

impl KafkaSettings {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            idempotent_producer: true,
            group_protocol: GroupProtocol::default(),
            extra: Vec::new(),
        }
    }

    pub fn client_config(&self) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("socket.keepalive.enable", "true")
            // After a broker restart, reconnect within a second instead of
            // librdkafka's default back-off of up to 10 s.
            .set("reconnect.backoff.max.ms", "1000")
            .set("log_level", "4");
        for (key, value) in &self.extra {
            config.set(key, value);
        }
        config
    }
}

/// The topic names for one deployment: `<prefix>.<name>`, as fixed by the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub const DEFAULT_PREFIX: &'static str = crate::settings::TOPIC_PREFIX;

    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    /// The full name of a topic of the catalogue (`coupon_schemas::catalogue`).
    pub fn of(&self, kind: TopicKind) -> String {
        self.name(kind.short())
    }

    pub fn created(&self) -> String {
        self.of(TopicKind::Created)
    }
    pub fn claims(&self) -> String {
        self.of(TopicKind::Claims)
    }
    pub fn claim_results(&self) -> String {
        self.of(TopicKind::ClaimResults)
    }
    pub fn purchases(&self) -> String {
        self.of(TopicKind::Purchases)
    }
    pub fn purchase_results(&self) -> String {
        self.of(TopicKind::PurchaseResults)
    }
    pub fn expirations(&self) -> String {
        self.of(TopicKind::Expirations)
    }
    pub fn dead_letter(&self) -> String {
        self.of(TopicKind::DeadLetter)
    }
    /// Blacklist changes (`BlacklistChanged`), so a rebuild restores them.
    pub fn blacklist(&self) -> String {
        self.of(TopicKind::Blacklist)
    }
    /// Profiles (`UserProfileUpdated`), from the gateway or a storefront.
    pub fn users(&self) -> String {
        self.of(TopicKind::Users)
    }

    pub fn all(&self) -> Vec<String> {
        TopicKind::ALL.into_iter().map(|k| self.of(k)).collect()
    }

    /// The topics `role` reads.
    pub fn read_by(&self, role: Role) -> Vec<String> {
        role.topics().iter().map(|k| self.of(*k)).collect()
    }

    /// The kind of a topic of this deployment, by its full name.
    pub fn kind_of(&self, topic: &str) -> Option<TopicKind> {
        TopicKind::ALL.into_iter().find(|k| self.of(*k) == topic)
    }

    /// The consumer group of a role, e.g. `coupons.claims-processor`.
    pub fn group(&self, role: Role) -> String {
        self.name(&format!("{}-processor", role.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_the_spec() {
        let topics = Topics::new("coupons");
        assert_eq!(
            topics.all(),
            [
                "coupons.created",
                "coupons.claims",
                "coupons.claim-results",
                "coupons.purchases",
                "coupons.purchase-results",
                "coupons.expirations",
                "coupons.dead-letter",
                "coupons.blacklist",
                "coupons.users"
            ]
        );
    }
}
