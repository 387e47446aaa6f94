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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Timelike, Utc};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
pub use scylla::statement::Consistency;
use uuid::Uuid;

use crate::store::history::{HistoryEntry, HistoryRow};

/// Shards of each hour of `history_by_time`: a burst's rows spread over
/// this many partitions (and nodes) per hour.
pub const TIME_SHARDS: i8 = 8;

/// Rows of one unlogged batch (all in one partition).
const BATCH_ROWS: usize = 100;

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

fn read_error(e: impl std::error::Error + Send + Sync + 'static) -> CassandraError {
    CassandraError::Read(Box::new(e))
}

/// The three inserts and the reads, prepared once per session.
struct Statements {
    by_user: PreparedStatement,
    by_coupon: PreparedStatement,
    by_time: PreparedStatement,
    read_user: PreparedStatement,
    read_coupon: PreparedStatement,
    read_time: PreparedStatement,
}

/// A connected history store. Cheap to clone.
#[derive(Clone)]
pub struct CassandraHistory {
    session: Arc<Session>,
    statements: Arc<Statements>,
    consistency: Consistency,
    concurrency: usize,
    keyspace: String,
}

impl std::fmt::Debug for CassandraHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CassandraHistory")
            .field("keyspace", &self.keyspace)
            .finish_non_exhaustive()
    }
}

const COLUMNS: &str = "occurred_at, event_id, item, coupon_code, user_id, kind, detail";

/// One stored row as read: the columns of [`COLUMNS`].
type StoredRow = (
    DateTime<Utc>,
    Uuid,
    i32,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
);

impl CassandraHistory {
    /// Connects, creates the keyspace and the tables when missing, and
    /// prepares the statements.
    pub async fn connect(settings: &CassandraSettings) -> Result<Self, CassandraError> {
        check_keyspace(&settings.keyspace).map_err(CassandraError::Config)?;
        if settings.nodes.is_empty() {
            return Err(CassandraError::Config("CASSANDRA_NODES is empty".into()));
        }
        let mut builder = SessionBuilder::new()
            .known_nodes(&settings.nodes)
            .connection_timeout(settings.request_timeout)
            .default_execution_profile_handle(
                scylla::client::execution_profile::ExecutionProfile::builder()
                    .consistency(settings.consistency)
                    .request_timeout(Some(settings.request_timeout))
                    .build()
                    .into_handle(),
            );
        if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
            builder = builder.user(user, password);
        }
        if let Some(ca) = &settings.tls_ca {
            builder = builder.tls_context(Some(tls_context(ca)?));
        }
        let session = builder
            .build()
            .await
            .map_err(|source| CassandraError::Connect {
                nodes: settings.nodes.join(","),
                source: Box::new(source),
            })?;
        create_schema(&session, &settings.keyspace, &settings.replication).await?;
        let ks = &settings.keyspace;
        let insert = |table: &str| {
            format!(
                "INSERT INTO {ks}.{table} ({COLUMNS}{extra}) VALUES (?, ?, ?, ?, ?, ?, ?{marks}) USING TIMESTAMP ?",
                extra = if table == "history_by_time" { ", hour, shard" } else { "" },
                marks = if table == "history_by_time" { ", ?, ?" } else { "" },
            )
        };
        let mut statements = Statements {
            by_user: session.prepare(insert("history_by_user")).await?,
            by_coupon: session.prepare(insert("history_by_coupon")).await?,
            by_time: session.prepare(insert("history_by_time")).await?,
            read_user: session
                .prepare(format!(
                    "SELECT {COLUMNS} FROM {ks}.history_by_user WHERE user_id = ? AND occurred_at >= ? AND occurred_at <= ?"
                ))
                .await?,
            read_coupon: session
                .prepare(format!(
                    "SELECT {COLUMNS} FROM {ks}.history_by_coupon WHERE coupon_code = ? AND occurred_at >= ? AND occurred_at <= ?"
                ))
                .await?,
            read_time: session
                .prepare(format!(
                    "SELECT {COLUMNS} FROM {ks}.history_by_time WHERE hour = ? AND shard = ? AND occurred_at >= ? AND occurred_at <= ?"
                ))
                .await?,
        };
        for write in [
            &mut statements.by_user,
            &mut statements.by_coupon,
            &mut statements.by_time,
        ] {
            write.set_is_idempotent(true);
        }
        for read in [
            &mut statements.read_user,
            &mut statements.read_coupon,
            &mut statements.read_time,
        ] {
            read.set_page_size(5_000);
            read.set_is_idempotent(true);
        }
        Ok(Self {
            session: Arc::new(session),
            statements: Arc::new(statements),
            consistency: settings.consistency,
            concurrency: settings.concurrency.max(1),
            keyspace: settings.keyspace.clone(),
        })
    }

    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// Drops the keyspace and everything in it (a test's own).
    pub async fn drop_keyspace(&self) -> Result<(), CassandraError> {
        // A schema change waits for the tables' flush: longer than a write.
        let mut drop =
            scylla::statement::Statement::new(format!("DROP KEYSPACE IF EXISTS {}", self.keyspace));
        drop.set_request_timeout(Some(Duration::from_secs(60)));
        self.session.query_unpaged(drop, ()).await?;
        Ok(())
    }

    /// Writes `rows` to every table each belongs in; returns how many rows
    /// were written (a redelivered row is written again, identically: it
    /// adds nothing). Once this returns `Ok`, every write was acknowledged
    /// at the configured consistency.
    pub async fn append(&self, rows: &[HistoryRow]) -> Result<u64, CassandraError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let stored: Vec<Stored> = rows.iter().map(Stored::of).collect();
        // Rows by partition, per table.
        let mut by_user: BTreeMap<&str, Vec<&Stored>> = BTreeMap::new();
        let mut by_coupon: BTreeMap<&str, Vec<&Stored>> = BTreeMap::new();
        let mut by_time: BTreeMap<(DateTime<Utc>, i8), Vec<&Stored>> = BTreeMap::new();
        for row in &stored {
            if let Some(user) = row.user_id {
                by_user.entry(user).or_default().push(row);
            }
            if let Some(code) = row.coupon_code {
                by_coupon.entry(code).or_default().push(row);
            }
            by_time.entry((row.hour, row.shard)).or_default().push(row);
        }
        let mut jobs: Vec<Job<'_>> = Vec::new();
        let s = &self.statements;
        for part in by_user.into_values() {
            jobs.extend(
                part.chunks(BATCH_ROWS)
                    .map(|c| (&s.by_user, Table::Plain, c.to_vec())),
            );
        }
        for part in by_coupon.into_values() {
            jobs.extend(
                part.chunks(BATCH_ROWS)
                    .map(|c| (&s.by_coupon, Table::Plain, c.to_vec())),
            );
        }
        for part in by_time.into_values() {
            jobs.extend(
                part.chunks(BATCH_ROWS)
                    .map(|c| (&s.by_time, Table::Time, c.to_vec())),
            );
        }
        // Futures made up front (a closure inside the stream would make
        // the whole future lifetime-generic, which `Send` bounds refuse).
        let writes: Vec<BoxFuture<'_, Result<(), CassandraError>>> = jobs
            .into_iter()
            .map(|(statement, table, rows)| self.write_partition(statement, table, rows).boxed())
            .collect();
        futures::stream::iter(writes)
            .buffer_unordered(self.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(rows.len() as u64)
    }

    async fn write_partition(
        &self,
        statement: &PreparedStatement,
        table: Table,
        rows: Vec<&Stored<'_>>,
    ) -> Result<(), CassandraError> {
        if let [row] = rows.as_slice() {
            match table {
                Table::Plain => self.session.execute_unpaged(statement, row.plain()).await?,
                Table::Time => self.session.execute_unpaged(statement, row.timed()).await?,
            };
            return Ok(());
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        for _ in &rows {
            batch.append_statement(statement.clone());
        }
        batch.set_consistency(self.consistency);
        batch.set_is_idempotent(true);
        match table {
            Table::Plain => {
                let values: Vec<_> = rows.iter().map(|r| r.plain()).collect();
                self.session.batch(&batch, values).await?
            }
            Table::Time => {
                let values: Vec<_> = rows.iter().map(|r| r.timed()).collect();
                self.session.batch(&batch, values).await?
            }
        };
        Ok(())
    }

    /// The rows of `user` and/or `coupon` (canonical code) between `since`
    /// and `until` (inclusive, either open), oldest first, in the order of
    /// the Postgres table (`occurred_at, event_id, item`). With both a user
    /// and a coupon, the coupon's partition (the smaller) is read and
    /// filtered by user. With neither, every hour of the time table
    /// between the bounds (both then required).
    pub async fn entries(
        &self,
        user: Option<&str>,
        coupon: Option<&str>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> Result<Vec<HistoryEntry>, CassandraError> {
        let from = since.unwrap_or_else(epoch_min);
        let to = until.unwrap_or_else(epoch_max);
        let mut rows = match (user, coupon) {
            (_, Some(code)) => {
                let rows = self
                    .read(&self.statements.read_coupon, (code, from, to))
                    .await?;
                rows.into_iter()
                    .filter(|r| user.is_none() || r.4.as_deref() == user)
                    .collect()
            }
            (Some(user), None) => {
                self.read(&self.statements.read_user, (user, from, to))
                    .await?
            }
            (None, None) => {
                let (Some(since), Some(until)) = (since, until) else {
                    return Err(CassandraError::Config(
                        "reading the history by time needs both --since and --until".into(),
                    ));
                };
                self.between(since, until).await?
            }
        };
        rows.sort_by_key(|r| (r.0, r.1, r.2));
        Ok(rows.into_iter().map(entry).collect())
    }

    /// Every row between `since` and `until` from the time table: each
    /// hour's shards, read [`CassandraSettings::concurrency`] at a time.
    async fn between(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<StoredRow>, CassandraError> {
        let mut partitions = Vec::new();
        let mut hour = hour_of(since);
        while hour <= until {
            for shard in 0..TIME_SHARDS {
                partitions.push((hour, shard));
            }
            hour += chrono::Duration::hours(1);
        }
        let reads: Vec<BoxFuture<'_, Result<Vec<StoredRow>, CassandraError>>> = partitions
            .into_iter()
            .map(|(hour, shard)| {
                self.read(&self.statements.read_time, (hour, shard, since, until))
                    .boxed()
            })
            .collect();
        let parts: Vec<Vec<StoredRow>> = futures::stream::iter(reads)
            .buffer_unordered(self.concurrency)
            .try_collect()
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// How many rows the time table holds between `since` and `until` (the
    /// whole history when the bounds cover it): every row is there once.
    pub async fn count_between(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<u64, CassandraError> {
        Ok(self.between(since, until).await?.len() as u64)
    }

    async fn read(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<StoredRow>, CassandraError> {
        let pager = self
            .session
            .execute_iter(statement.clone(), values)
            .await
            .map_err(read_error)?;
        pager
            .rows_stream::<StoredRow>()
            .map_err(read_error)?
            .try_collect()
            .await
            .map_err(read_error)
    }
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

/// The earliest and latest times a CQL `timestamp` bound takes here.
fn epoch_min() -> DateTime<Utc> {
    Utc.timestamp_millis_opt(0).single().unwrap_or_default()
}

fn epoch_max() -> DateTime<Utc> {
    // Year 9999: later than any event, within what Cassandra stores.
    Utc.timestamp_millis_opt(253_402_300_799_000)
        .single()
        .unwrap_or_default()
}

fn entry(row: StoredRow) -> HistoryEntry {
    let (occurred_at, _, _, coupon_code, user_id, kind, detail) = row;
    HistoryEntry {
        occurred_at,
        kind,
        coupon_code,
        user_id,
        detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
    }
}

/// The hour bucket of a time (its partition in `history_by_time`).
pub fn hour_of(at: DateTime<Utc>) -> DateTime<Utc> {
    at.with_nanosecond(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_minute(0))
        .unwrap_or(at)
}

/// The shard of an event in its hour: every row of one event (a release's
/// 1,000 coupons) shares it, so they batch together.
pub fn shard_of(event_id: &Uuid) -> i8 {
    (event_id.as_u128() % TIME_SHARDS as u128) as i8
}

#[derive(Clone, Copy)]
enum Table {
    /// `history_by_user`, `history_by_coupon`: the row's columns.
    Plain,
    /// `history_by_time`: also `hour` and `shard`.
    Time,
}

type Job<'a> = (&'a PreparedStatement, Table, Vec<&'a Stored<'a>>);

/// A row as bound to the inserts.
struct Stored<'a> {
    occurred_at: DateTime<Utc>,
    event_id: Uuid,
    item: i32,
    coupon_code: Option<&'a str>,
    user_id: Option<&'a str>,
    kind: &'static str,
    detail: String,
    hour: DateTime<Utc>,
    shard: i8,
    /// The write timestamp (microseconds): the row's own time, so a
    /// rewrite is the same cell version.
    written_at: i64,
}

type PlainValues<'a> = (
    DateTime<Utc>,
    Uuid,
    i32,
    Option<&'a str>,
    Option<&'a str>,
    &'a str,
    &'a str,
    i64,
);
type TimedValues<'a> = (
    DateTime<Utc>,
    Uuid,
    i32,
    Option<&'a str>,
    Option<&'a str>,
    &'a str,
    &'a str,
    DateTime<Utc>,
    i8,
    i64,
);

impl<'a> Stored<'a> {
    fn of(row: &'a HistoryRow) -> Self {
        Self {
            occurred_at: row.occurred_at,
            event_id: row.event_id,
            item: row.item,
            coupon_code: row.coupon_code.as_deref(),
            user_id: row.user_id.as_deref(),
            kind: row.kind.as_str(),
            detail: row.detail.to_string(),
            hour: hour_of(row.occurred_at),
            shard: shard_of(&row.event_id),
            written_at: row.occurred_at.timestamp_micros(),
        }
    }

    fn plain(&self) -> PlainValues<'_> {
        (
            self.occurred_at,
            self.event_id,
            self.item,
            self.coupon_code,
            self.user_id,
            self.kind,
            &self.detail,
            self.written_at,
        )
    }

    fn timed(&self) -> TimedValues<'_> {
        (
            self.occurred_at,
            self.event_id,
            self.item,
            self.coupon_code,
            self.user_id,
            self.kind,
            &self.detail,
            self.hour,
            self.shard,
            self.written_at,
        )
    }
}

/// The keyspace (when missing, with `replication`) and the three tables.
async fn create_schema(
    session: &Session,
    keyspace: &str,
    replication: &str,
) -> Result<(), CassandraError> {
    let columns = "occurred_at timestamp, event_id uuid, item int, coupon_code text, user_id text, kind text, detail text";
    let clustering = "WITH CLUSTERING ORDER BY (occurred_at ASC, event_id ASC, item ASC)";
    let ddl = [
        format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.history_by_user ({columns}, \
             PRIMARY KEY ((user_id), occurred_at, event_id, item)) {clustering}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.history_by_coupon ({columns}, \
             PRIMARY KEY ((coupon_code), occurred_at, event_id, item)) {clustering}"
        ),
        // Append-only, read by time: time-window compaction (one SSTable
        // per day once the day is over).
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.history_by_time ({columns}, hour timestamp, shard tinyint, \
             PRIMARY KEY ((hour, shard), occurred_at, event_id, item)) {clustering} \
             AND compaction = {{'class': 'TimeWindowCompactionStrategy', 'compaction_window_unit': 'DAYS', 'compaction_window_size': 1}}"
        ),
    ];
    for statement in ddl {
        session
            .query_unpaged(statement, ())
            .await
            .map_err(|e| CassandraError::Schema(Box::new(e)))?;
    }
    Ok(())
}

/// A TLS context trusting the CA certificates of `ca` (PEM) only, and
/// checking the node's certificate against them.
fn tls_context(
    ca: &std::path::Path,
) -> Result<scylla::client::session::OpenSsl010Config, CassandraError> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    use openssl::x509::store::X509StoreBuilder;
    use openssl::x509::X509;
    let pem = std::fs::read(ca).map_err(|source| CassandraError::CaFile {
        path: ca.to_owned(),
        source,
    })?;
    let mut store = X509StoreBuilder::new()?;
    for cert in X509::stack_from_pem(&pem)? {
        store.add_cert(cert)?;
    }
    let mut builder = SslConnector::builder(SslMethod::tls())?;
    builder.set_cert_store(store.build());
    builder.set_verify(SslVerifyMode::PEER);
    Ok(scylla::client::session::OpenSsl010Config::from(builder))
}

#[cfg(test)]
mod tests {
    use super::*;

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
