//! Thin adapters around the outside world: Kafka (rdkafka), Postgres (sqlx),
//! Redis (fred), the metrics recorder and the reachability checks.
//!
//! Nothing here decides anything about coupons; the rules are in
//! `coupon-domain`. These modules turn those decisions into records, rows and
//! keys, and make the delivery guarantees explicit (see [`kafka::consumer`]).

pub mod cassandra;
pub mod db;
pub mod kafka;
pub mod metrics;
pub mod pgcopy;
pub mod reach;
pub mod redis;
pub mod settings;
pub mod store;
pub mod time;

pub use kafka::{KafkaSettings, Topics};
