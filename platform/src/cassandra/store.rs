//! The connected store: its prepared statements, the writes (one
//! unlogged batch per partition, bounded concurrency) and the reads.

use std::collections::BTreeMap;
use std::sync::Arc;

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use uuid::Uuid;

use super::rows::{entry, epoch_max, epoch_min, hour_of, Job, Stored, StoredRow, Table};
use super::schema::{create_schema, open_session};
use super::{read_error, CassandraError, CassandraSettings, BATCH_ROWS, TIME_SHARDS};
use crate::store::history::{HistoryEntry, HistoryRow};

/// The three inserts and the reads, prepared once per session.
struct Statements {
    by_user: PreparedStatement,
    by_coupon: PreparedStatement,
    by_time: PreparedStatement,
    read_user: PreparedStatement,
    read_coupon: PreparedStatement,
    read_time: PreparedStatement,
}

impl Statements {
    /// The inserts (idempotent: a retry rewrites the same cells) and the
    /// reads (paged) of the three tables.
    async fn prepare(session: &Session, keyspace: &str) -> Result<Self, CassandraError> {
        let ks = keyspace;
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
        Ok(statements)
    }
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

impl CassandraHistory {
    /// Connects, creates the keyspace and the tables when missing, and
    /// prepares the statements.
    pub async fn connect(settings: &CassandraSettings) -> Result<Self, CassandraError> {
        let session = open_session(settings).await?;
        create_schema(&session, &settings.keyspace, &settings.replication).await?;
        let statements = Statements::prepare(&session, &settings.keyspace).await?;
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

    /// The keys (`event_id`, `item`) of the time table's rows between
    /// `since` and `until`: what `couponctl audit` checks the log's rows
    /// against.
    pub async fn keys_between(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<(Uuid, i32)>, CassandraError> {
        Ok(self
            .between(since, until)
            .await?
            .into_iter()
            .map(|(_, event_id, item, ..)| (event_id, item))
            .collect())
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
