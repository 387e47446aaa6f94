//! The `coupon_history` table: the history sink's append-only record of
//! every state change, partitioned by month on `occurred_at`. Rows are keyed
//! by `(occurred_at, event_id, item)`, all taken from the event, so a replay
//! appends nothing new. With the history in Cassandra, the rows a role
//! writes inside its own transaction (releases) wait in `history_outbox`
//! instead, until the history role forwards them ([`append_in_tx`]).

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use coupon_domain::HistoryKind;

/// One history row.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    pub occurred_at: DateTime<Utc>,
    pub event_id: Uuid,
    pub item: i32,
    pub coupon_code: Option<String>,
    pub user_id: Option<String>,
    pub kind: HistoryKind,
    pub detail: serde_json::Value,
}

/// What ended a hold unbought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleasedBy {
    /// The expiry role, after the deadline and its grace.
    Expiry,
    /// A grant that found the user's overdue hold before the expiry did.
    NextGrant,
}

/// A hold that ended unbought, as its `released` row tells it.
#[derive(Debug, Clone)]
pub struct HoldRelease<'a> {
    pub code: String,
    pub user: Option<String>,
    pub hold_id: &'a str,
    pub held_until: Option<DateTime<Utc>>,
    pub by: ReleasedBy,
    /// When the coupon's campaign had ended by the deadline: the coupon
    /// went to `expired`, not back to `available`
    /// (`coupon_domain::lifecycle::after_hold`), and the row says so.
    pub campaign_ended_at: Option<DateTime<Utc>>,
}

impl HistoryRow {
    /// The `released` row of a hold: the one shape the live consumers and
    /// the rebuild write, so a rebuilt history equals the live one.
    pub fn released(occurred_at: DateTime<Utc>, event_id: Uuid, release: HoldRelease<'_>) -> Self {
        let mut detail = serde_json::json!({
            "hold_id": release.hold_id,
            "held_until_ms": release.held_until.map(|t| t.timestamp_millis()),
            "reason": "hold_expired",
        });
        if release.by == ReleasedBy::NextGrant {
            detail["released_by"] = "next_grant".into();
        }
        let mut kind = HistoryKind::Released;
        if let Some(ended) = release.campaign_ended_at {
            detail["campaign_ended_at_ms"] = ended.timestamp_millis().into();
            kind = HistoryKind::Expired;
        }
        Self {
            occurred_at,
            event_id,
            item: 0,
            coupon_code: Some(release.code),
            user_id: release.user,
            kind,
            detail,
        }
    }

    /// The `expired` row of an available coupon whose campaign ended (a
    /// `CouponExpired` event): the one shape the expiry consumer and the
    /// rebuild write.
    pub fn campaign_expired(
        occurred_at: DateTime<Utc>,
        event_id: Uuid,
        code: String,
        batch_id: &str,
        ended_at: Option<DateTime<Utc>>,
    ) -> Self {
        Self {
            occurred_at,
            event_id,
            item: 0,
            coupon_code: Some(code),
            user_id: None,
            kind: HistoryKind::Expired,
            detail: serde_json::json!({
                "reason": "campaign_ended",
                "campaign_id": batch_id,
                "campaign_ended_at_ms": ended_at.map(|t| t.timestamp_millis()),
            }),
        }
    }
}

/// History rows as the columns `UNNEST` takes, one array per column.
struct Columns<'a> {
    occurred: Vec<DateTime<Utc>>,
    events: Vec<Uuid>,
    items: Vec<i32>,
    codes: Vec<Option<&'a str>>,
    users: Vec<Option<&'a str>>,
    kinds: Vec<&'a str>,
    details: Vec<&'a serde_json::Value>,
}

impl<'a> Columns<'a> {
    fn of(rows: &'a [HistoryRow]) -> Self {
        Self {
            occurred: rows.iter().map(|r| r.occurred_at).collect(),
            events: rows.iter().map(|r| r.event_id).collect(),
            items: rows.iter().map(|r| r.item).collect(),
            codes: rows.iter().map(|r| r.coupon_code.as_deref()).collect(),
            users: rows.iter().map(|r| r.user_id.as_deref()).collect(),
            kinds: rows.iter().map(|r| r.kind.as_str()).collect(),
            details: rows.iter().map(|r| &r.detail).collect(),
        }
    }
}

/// Appends rows; rows already present are skipped. Returns how many were new.
pub async fn append<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    rows: &[HistoryRow],
) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let c = Columns::of(rows);
    let result = sqlx::query!(
        "INSERT INTO coupon_history (occurred_at, event_id, item, coupon_code, user_id, kind, detail)
         SELECT * FROM UNNEST($1::timestamptz[], $2::uuid[], $3::int[], $4::text[], $5::text[], $6::text[], $7::jsonb[])
         ON CONFLICT DO NOTHING",
        &c.occurred,
        &c.events,
        &c.items,
        &c.codes as _,
        &c.users as _,
        &c.kinds as _,
        &c.details as _,
    )
    .execute(executor)
    .await?;
    Ok(result.rows_affected())
}

/// Where the history is kept (`HISTORY_STORE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HistoryStore {
    /// The partitioned `coupon_history` table.
    #[default]
    Postgres,
    /// Apache Cassandra (`crate::cassandra`); the rows written inside
    /// another role's transaction (releases) wait in `history_outbox`.
    Cassandra,
}

impl HistoryStore {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Cassandra => "cassandra",
        }
    }
}

impl std::str::FromStr for HistoryStore {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "postgres" => Ok(Self::Postgres),
            "cassandra" => Ok(Self::Cassandra),
            other => Err(format!(
                "{other:?} is no history store (postgres or cassandra)"
            )),
        }
    }
}

impl std::fmt::Display for HistoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Appends the rows a role writes inside its own transaction (the
/// releases): to `coupon_history`, or, when the history is in Cassandra,
/// to `history_outbox`, which the history role forwards. Either way they
/// commit (or not) with the change they record.
pub async fn append_in_tx<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    store: HistoryStore,
    rows: &[HistoryRow],
) -> Result<u64, sqlx::Error> {
    match store {
        HistoryStore::Postgres => append(executor, rows).await,
        HistoryStore::Cassandra => outbox_push(executor, rows).await,
    }
}

/// Queues rows for the Cassandra history; a row already queued is skipped.
pub async fn outbox_push<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    rows: &[HistoryRow],
) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let c = Columns::of(rows);
    let result = sqlx::query!(
        "INSERT INTO history_outbox (occurred_at, event_id, item, coupon_code, user_id, kind, detail)
         SELECT * FROM UNNEST($1::timestamptz[], $2::uuid[], $3::int[], $4::text[], $5::text[], $6::text[], $7::jsonb[])
         ON CONFLICT DO NOTHING",
        &c.occurred,
        &c.events,
        &c.items,
        &c.codes as _,
        &c.users as _,
        &c.kinds as _,
        &c.details as _,
    )
    .execute(executor)
    .await?;
    Ok(result.rows_affected())
}

/// The keys (`event_id`, `item`) of the rows between `since` and `until`
/// (inclusive): what `couponctl audit` checks the log's rows against. The
/// bounds prune the months outside them.
pub async fn keys_between(
    pool: &PgPool,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<(Uuid, i32)>, sqlx::Error> {
    // Not compile-checked: a plain two-column read, kept out of `.sqlx`.
    sqlx::query_as("SELECT event_id, item FROM coupon_history WHERE occurred_at BETWEEN $1 AND $2")
        .bind(since)
        .bind(until)
        .fetch_all(pool)
        .await
}

/// Takes up to `limit` queued rows, oldest first, locking them for this
/// transaction (another forwarder skips them): the caller writes them to
/// Cassandra, then [`outbox_delete`]s them and commits; a failure rolls
/// back and leaves them queued.
pub async fn outbox_take(
    tx: &mut sqlx::PgConnection,
    limit: i64,
) -> Result<Vec<(i64, HistoryRow)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT seq, occurred_at, event_id, item, coupon_code, user_id, kind AS "kind: HistoryKind", detail
           FROM history_outbox ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED"#,
        limit
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.seq,
                HistoryRow {
                    occurred_at: r.occurred_at,
                    event_id: r.event_id,
                    item: r.item,
                    coupon_code: r.coupon_code,
                    user_id: r.user_id,
                    kind: r.kind,
                    detail: r.detail,
                },
            )
        })
        .collect())
}

/// Deletes forwarded rows.
pub async fn outbox_delete(tx: &mut sqlx::PgConnection, seqs: &[i64]) -> Result<u64, sqlx::Error> {
    let result = sqlx::query!("DELETE FROM history_outbox WHERE seq = ANY($1)", seqs)
        .execute(&mut *tx)
        .await?;
    Ok(result.rows_affected())
}

/// Rows still waiting for Cassandra.
pub async fn outbox_len(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM history_outbox"#)
        .fetch_one(pool)
        .await
}

/// [`append`] for a sink's batch on its own: a binary `COPY` first, the
/// fast path a release's 1,000-row events take. A redelivered row (its key
/// already there) or a value Postgres refuses fails the `COPY` whole, with
/// nothing written, and [`append`] then decides as it always did.
pub async fn append_bulk(pool: &sqlx::PgPool, rows: &[HistoryRow]) -> Result<u64, sqlx::Error> {
    use crate::pgcopy::{copy_in, refused, BinaryRows};
    if rows.is_empty() {
        return Ok(0);
    }
    let mut body = BinaryRows::new(7, rows.len() * 160);
    for r in rows {
        body.row()
            .timestamptz(&r.occurred_at)
            .uuid(&r.event_id)
            .int4(r.item)
            .text_or_null(r.coupon_code.as_deref())
            .text_or_null(r.user_id.as_deref())
            .text(r.kind.as_str())
            .jsonb(&r.detail);
    }
    match copy_in(pool, COPY_HISTORY, body).await {
        Ok(added) => Ok(added),
        Err(error) if refused(&error) => {
            tracing::debug!(%error, "COPY refused; appending what is new");
            append(pool, rows).await
        }
        Err(error) => Err(error),
    }
}

const COPY_HISTORY: &str = "COPY coupon_history (occurred_at, event_id, item, coupon_code, user_id, kind, detail) FROM STDIN (FORMAT binary)";

/// One history row.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    pub occurred_at: DateTime<Utc>,
    pub kind: String,
    pub coupon_code: Option<String>,
    pub user_id: Option<String>,
    pub detail: Option<serde_json::Value>,
}

impl std::fmt::Display for HistoryEntry {
    /// `time  kind  coupon  user  detail`, tab separated; `-` for none.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let detail = self
            .detail
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| "{}".into());
        write!(
            f,
            "{}\t{}\t{}\t{}\t{}",
            self.occurred_at
                .to_rfc3339_opts(SecondsFormat::Millis, true),
            self.kind,
            self.coupon_code.as_deref().unwrap_or("-"),
            self.user_id.as_deref().unwrap_or("-"),
            detail
        )
    }
}

/// The rows of `user` and/or `coupon` (canonical code) between `since` and
/// `until` (inclusive, either open), oldest first (ties in the order one
/// event wrote them). The time bounds are plain comparisons on the
/// partition key, so Postgres prunes the months outside them.
pub async fn entries(
    pool: &PgPool,
    user: Option<&str>,
    coupon: Option<&str>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Result<Vec<HistoryEntry>, sqlx::Error> {
    sqlx::query_as!(
        HistoryEntry,
        "SELECT occurred_at, kind, coupon_code, user_id, detail FROM coupon_history
         WHERE ($1::text IS NULL OR user_id = $1)
           AND ($2::text IS NULL OR coupon_code = $2)
           AND occurred_at >= COALESCE($3::timestamptz, '-infinity')
           AND occurred_at <= COALESCE($4::timestamptz, 'infinity')
         ORDER BY occurred_at, event_id, item",
        user,
        coupon,
        since,
        until
    )
    .fetch_all(pool)
    .await
}
