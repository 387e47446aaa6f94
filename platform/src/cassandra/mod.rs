//! The history in Apache Cassandra (`HISTORY_STORE=cassandra`): a thin
//! adapter over the `scylla` driver (CQL), writing the very [`HistoryRow`]s
//! the Postgres table takes and reading them back as [`HistoryEntry`]s.
//!
//! One table per query analysts run, each row written to every table it
//! belongs in (Cassandra answers a query from one partition, never from a
//! secondary index):
//!
//! | table               | partition                  | clustering                       | serves                      |
//! |---------------------|----------------------------|----------------------------------|-----------------------------|
//! | `history_by_user`   | `user_id`                  | `occurred_at, event_id, item`    | `history --user`            |
//! | `history_by_coupon` | `coupon_code`              | `occurred_at, event_id, item`    | `history --coupon`          |
//! | `history_by_time`   | `(hour, shard)`            | `occurred_at, event_id, item`    | time ranges (console, audit)|
//!
//! A user's partition grows by a few rows a day (one grant a quota window,
//! its rejections) and a coupon's by a handful over its life; the time
//! table is bucketed by the hour and spread over [`TIME_SHARDS`] shards
//! (by event id), so the burst after a release (a million claims within
//! minutes) fills no partition without bound. Rows without a user (a
//! coupon's creation) or without a coupon (a refused claim) go only to the
//! tables they have a key for.
//!
//! Idempotent by key: every row's clustering key `(occurred_at, event_id,
//! item)` and its values come from the event, and every write carries a
//! write timestamp derived from the row (`USING TIMESTAMP`, the event's
//! time in microseconds), so a redelivered batch rewrites the same cells
//! with the same timestamp: it adds no row and changes no cell. No
//! lightweight transaction (`IF NOT EXISTS`, a Paxos round per row) is
//! needed for that.
//!
//! Writes are prepared statements in unlogged batches that each stay in one
//! partition (Cassandra applies such a batch as one mutation, without the
//! batch log, and does not apply its batch size limits to it), at most
//! [`CassandraSettings::concurrency`] in flight, at the configured
//! consistency (`LOCAL_QUORUM` by default: see the README).

mod rows;
mod schema;
mod store;

use std::path::PathBuf;
use std::time::Duration;

pub use rows::{hour_of, shard_of};
pub use scylla::statement::Consistency;
pub use store::CassandraHistory;

/// Shards of each hour of `history_by_time`: a burst's rows spread over
/// this many partitions (and nodes) per hour.
pub const TIME_SHARDS: i8 = 8;

/// Rows of one unlogged batch (all in one partition).
pub(super) const BATCH_ROWS: usize = 100;

/// How to reach the cluster and how to write.
#[derive(Debug, Clone)]
pub struct CassandraSettings {
    /// Contact points, `host:port` (the driver discovers the other nodes).
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// Plain-text authentication (`PasswordAuthenticator`).
    pub username: Option<String>,
    pub password: Option<String>,
    /// Connect with TLS, trusting the CA certificates of this PEM file.
    pub tls_ca: Option<PathBuf>,
    /// The replication the keyspace is created with when missing (a CQL map).
    pub replication: String,
    pub consistency: Consistency,
    /// Single-partition batches in flight at once.
    pub concurrency: usize,
    pub request_timeout: Duration,
}

impl CassandraSettings {
    /// The defaults of `settings`, with these nodes and keyspace.
    pub fn new(nodes: &str, keyspace: &str) -> Self {
        use crate::settings;
        Self {
            nodes: split_nodes(nodes),
            keyspace: keyspace.to_owned(),
            username: None,
            password: None,
            tls_ca: None,
            replication: settings::CASSANDRA_REPLICATION.to_owned(),
            consistency: Consistency::LocalQuorum,
            concurrency: settings::CASSANDRA_CONCURRENCY,
            request_timeout: settings::CASSANDRA_REQUEST_TIMEOUT,
        }
    }
}

/// `host:port,host:port` as a list.
pub fn split_nodes(raw: &str) -> Vec<String> {
    raw.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A consistency level by its CQL name (`local_quorum`, `quorum`, `one`, ...).
pub fn parse_consistency(raw: &str) -> Result<Consistency, String> {
    Ok(match raw.to_ascii_lowercase().replace('-', "_").as_str() {
        "any" => Consistency::Any,
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "local_one" => Consistency::LocalOne,
        other => {
            return Err(format!(
                "{other:?} is no consistency level (one, quorum, local_quorum, local_one, each_quorum, all)"
            ))
        }
    })
}

/// A keyspace name Cassandra takes unquoted (it is written into DDL).
pub fn check_keyspace(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if first_ok && name.len() <= 48 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is no keyspace name (a letter, then letters, digits or _, at most 48)"
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CassandraError {
    #[error("{0}")]
    Config(String),
    #[error("setting up TLS to Cassandra")]
    Tls(#[from] openssl::error::ErrorStack),
    #[error("reading the CA file {path}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to Cassandra at {nodes}")]
    Connect {
        nodes: String,
        #[source]
        source: Box<scylla::errors::NewSessionError>,
    },
    #[error("creating the history tables")]
    Schema(#[source] Box<scylla::errors::ExecutionError>),
    #[error("preparing a statement")]
    Prepare(#[source] Box<scylla::errors::PrepareError>),
    #[error("a Cassandra request failed")]
    Execute(#[source] Box<scylla::errors::ExecutionError>),
    #[error("reading from Cassandra")]
    Read(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl CassandraError {
    /// Whether the same request can never succeed (a value Cassandra
    /// refuses, a statement it finds invalid): anything else is an outage
    /// that the same request outlives.
    pub fn is_permanent(&self) -> bool {
        use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
        let Self::Execute(error) = self else {
            return false;
        };
        matches!(
            error.as_ref(),
            ExecutionError::BadQuery(_)
                | ExecutionError::LastAttemptError(RequestAttemptError::DbError(
                    DbError::Invalid | DbError::SyntaxError,
                    _,
                ))
        )
    }
}

impl CassandraError {
    /// Whether the settings themselves are wrong (a keyspace name, the TLS
    /// CA file): no retry can help.
    pub fn is_setup(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Tls(_) | Self::CaFile { .. })
    }
}

impl From<scylla::errors::ExecutionError> for CassandraError {
    fn from(error: scylla::errors::ExecutionError) -> Self {
        Self::Execute(Box::new(error))
    }
}

impl From<scylla::errors::PrepareError> for CassandraError {
    fn from(error: scylla::errors::PrepareError) -> Self {
        Self::Prepare(Box::new(error))
    }
}

impl From<CassandraError> for crate::kafka::consumer::BatchError {
    fn from(error: CassandraError) -> Self {
        if error.is_permanent() {
            Self::permanent(error)
        } else {
            Self::transient(error)
        }
    }
}

pub(super) fn read_error(e: impl std::error::Error + Send + Sync + 'static) -> CassandraError {
    CassandraError::Read(Box::new(e))
}

/// A history store reached on first use: what a reader (the gateway's
/// console) holds, so that a process starts and serves while Cassandra is
/// down, and connects once it is asked and Cassandra answers.
#[derive(Debug)]
pub struct LazyCassandra {
    settings: CassandraSettings,
    store: tokio::sync::OnceCell<CassandraHistory>,
}

impl LazyCassandra {
    pub fn new(settings: CassandraSettings) -> Self {
        Self {
            settings,
            store: tokio::sync::OnceCell::new(),
        }
    }

    /// The connected store; connects now if not yet (a failure is retried
    /// on the next call).
    pub async fn get(&self) -> Result<&CassandraHistory, CassandraError> {
        self.store
            .get_or_try_init(|| CassandraHistory::connect(&self.settings))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use uuid::Uuid;

    #[test]
    fn names_and_levels_are_checked() {
        assert!(check_keyspace("coupons").is_ok());
        assert!(check_keyspace("t_abc123").is_ok());
        assert!(check_keyspace("1abc").is_err());
        assert!(check_keyspace("a-b").is_err());
        assert!(check_keyspace("a; DROP").is_err());
        assert_eq!(
            parse_consistency("LOCAL_QUORUM"),
            Ok(Consistency::LocalQuorum)
        );
        assert_eq!(parse_consistency("one"), Ok(Consistency::One));
        assert!(parse_consistency("most").is_err());
        assert_eq!(split_nodes(" a:1, b:2 ,"), vec!["a:1", "b:2"]);
    }

    #[test]
    fn buckets_are_hours_and_shards_stay_in_range() {
        let at = Utc.with_ymd_and_hms(2026, 12, 5, 23, 59, 59).unwrap()
            + chrono::Duration::milliseconds(999);
        assert_eq!(
            hour_of(at),
            Utc.with_ymd_and_hms(2026, 12, 5, 23, 0, 0).unwrap()
        );
        for _ in 0..100 {
            let shard = shard_of(&Uuid::new_v4());
            assert!((0..TIME_SHARDS).contains(&shard));
        }
    }
}
