//! Rebuild: project the log into a fresh database.
//!
//! The rebuild applies *outcomes*, never re-decides requests (a decision
//! depends on the time it was taken and on the state then):
//!
//! | topic              | effect                                                         |
//! |--------------------|----------------------------------------------------------------|
//! | `created`          | `coupons` rows, `available`                                    |
//! | `claim-results`    | granted (not `repeated`): coupon `held` by the user until `expires_at`, `hold_id` = request id; `users.last_coupon_at` |
//! | `purchase-results` | redeemed (not `repeated`): coupon `redeemed`, `redeemed_at`, `redeemed_order_id` |
//! | `expirations`      | the coupon back to `available`, only if still held under that `hold_id` |
//!
//! Events are applied in one deterministic global order: envelope
//! `occurred_at_ms`, then topic (created < claim-results < purchase-results <
//! expirations), then partition and offset; an event republished under the
//! same event id (e.g. a decision published again after a redelivery) is
//! applied once. Every event also yields its
//! `coupon_history` rows (the history sink's own [`history::rows_of`], plus a
//! `released` row per released hold, dated at the hold's deadline).
//!
//! The state is computed in memory, then written in bulk: coupons through the
//! projector's [`coupons::insert_coupons`], then the final holds and
//! redemptions, then users.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Instant;

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use coupon_consumers::coupons::{self, NewCoupon};
use coupon_consumers::history::{self, HistoryRow};
use coupon_platform::kafka::Record;
use coupon_platform::time::from_ms;
use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::{ClaimOutcome, PurchaseOutcome};

use crate::replay::{decode_event, Event, PartitionRange, Reader, StartAt, TopicKind};

/// The topics whose events change projected state, in tie-break order.
pub const OUTCOME_TOPICS: [TopicKind; 4] = [
    TopicKind::Created,
    TopicKind::ClaimResults,
    TopicKind::PurchaseResults,
    TopicKind::Expirations,
];

/// History rows are written in chunks of this many.
const HISTORY_CHUNK: usize = 5_000;
/// At most this many anomalies are kept for the report (all are counted).
const ANOMALIES_KEPT: usize = 20;

fn topic_rank(kind: TopicKind) -> u8 {
    match kind {
        TopicKind::Created => 0,
        TopicKind::ClaimResults => 1,
        TopicKind::PurchaseResults => 2,
        TopicKind::Expirations => 3,
        _ => 4,
    }
}

/// One outcome record, with the key it is applied in.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub kind: TopicKind,
    pub occurred_at_ms: i64,
    pub record: Record,
}

impl LogRecord {
    /// Decodes just enough to order the record; `None` for a record that
    /// cannot be decoded (the live consumers dead-lettered it too).
    pub fn new(kind: TopicKind, record: Record) -> Option<Self> {
        let event = decode_event(kind, &record).ok()?;
        let occurred_at_ms = event.envelope().map(|e| e.occurred_at_ms)?;
        Some(Self {
            kind,
            occurred_at_ms,
            record,
        })
    }

    fn order_key(&self) -> (i64, u8, &str, i32, i64) {
        (
            self.occurred_at_ms,
            topic_rank(self.kind),
            &self.record.topic,
            self.record.partition,
            self.record.offset,
        )
    }
}

/// Sorts records into the order they are applied in.
pub fn sort(records: &mut [LogRecord]) {
    records.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Available,
    Held,
    Redeemed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Available => "available",
            Status::Held => "held",
            Status::Redeemed => "redeemed",
        }
    }
}

/// A coupon as the log says it is.
#[derive(Debug, Clone, PartialEq)]
pub struct CouponState {
    pub coupon: NewCoupon,
    pub status: Status,
    pub holder_user_id: Option<String>,
    pub hold_id: Option<String>,
    pub held_until: Option<DateTime<Utc>>,
    pub redeemed_at: Option<DateTime<Utc>>,
    pub redeemed_order_id: Option<String>,
}

/// The projection, in memory: pure, no I/O.
#[derive(Debug, Default)]
pub struct Projection {
    coupons: HashMap<String, CouponState>,
    /// Codes in the order they were created (the order rows are inserted in).
    created: Vec<String>,
    users: HashMap<String, DateTime<Utc>>,
    /// Event ids applied so far: a republished event (same id, e.g. a
    /// decision published again after a redelivery) is applied once.
    seen: HashSet<String>,
    pub applied: u64,
    /// Events skipped because an event with the same id was applied.
    pub duplicates: u64,
    pub anomalies: u64,
    pub anomaly_examples: Vec<String>,
}

impl Projection {
    pub fn coupon(&self, code: &str) -> Option<&CouponState> {
        self.coupons.get(code)
    }

    pub fn last_coupon_at(&self, user: &str) -> Option<DateTime<Utc>> {
        self.users.get(user).copied()
    }

    pub fn coupon_count(&self) -> usize {
        self.created.len()
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    fn anomaly(&mut self, record: &Record, what: String) {
        self.anomalies += 1;
        if self.anomaly_examples.len() < ANOMALIES_KEPT {
            self.anomaly_examples.push(format!(
                "{}[{}]@{}: {what}",
                record.topic, record.partition, record.offset
            ));
        }
    }

    /// Applies one outcome record; returns its history rows.
    pub fn apply(&mut self, topics: &Topics, log: &LogRecord) -> Vec<HistoryRow> {
        let record = &log.record;
        let Ok(event) = decode_event(log.kind, record) else {
            return Vec::new();
        };
        let event_id = event
            .envelope()
            .map(|e| e.event_id.clone())
            .unwrap_or_default();
        if !self.seen.insert(event_id) {
            self.duplicates += 1;
            return Vec::new();
        }
        self.applied += 1;
        let mut rows = match log.kind {
            TopicKind::Created | TopicKind::ClaimResults | TopicKind::PurchaseResults => {
                match history::rows_of(topics, record) {
                    Ok(rows) => rows,
                    Err(reason) => {
                        self.anomaly(record, format!("no history: {reason}"));
                        Vec::new()
                    }
                }
            }
            _ => Vec::new(),
        };
        match event {
            Event::Created(event) => match coupons::coupons_of(&event) {
                Ok(new) => {
                    for coupon in new {
                        let code = coupon.code.to_string();
                        if self.coupons.contains_key(&code) {
                            continue; // a replayed batch adds nothing
                        }
                        self.created.push(code.clone());
                        self.coupons.insert(
                            code,
                            CouponState {
                                coupon,
                                status: Status::Available,
                                holder_user_id: None,
                                hold_id: None,
                                held_until: None,
                                redeemed_at: None,
                                redeemed_order_id: None,
                            },
                        );
                    }
                }
                Err(reason) => self.anomaly(record, format!("refused batch: {reason}")),
            },
            Event::ClaimDecided(event) => {
                let granted = ClaimOutcome::try_from(event.outcome) == Ok(ClaimOutcome::Granted);
                if granted && !event.repeated {
                    let at = from_ms(log.occurred_at_ms);
                    let until = from_ms(event.expires_at_ms);
                    let (Some(at), Some(until)) = (at, until) else {
                        self.anomaly(record, "grant without valid times".into());
                        return rows;
                    };
                    match self.coupons.get_mut(&event.coupon_code) {
                        None => self.anomaly(
                            record,
                            format!("grant of unknown coupon {}", event.coupon_code),
                        ),
                        Some(state) => {
                            let was = state.status;
                            state.status = Status::Held;
                            state.holder_user_id = Some(event.user_id.clone());
                            state.hold_id = Some(event.request_id.clone());
                            state.held_until = Some(until);
                            state.redeemed_at = None;
                            state.redeemed_order_id = None;
                            if was != Status::Available {
                                self.anomaly(
                                    record,
                                    format!(
                                        "grant of {} while it was {}",
                                        event.coupon_code,
                                        was.as_str()
                                    ),
                                );
                            }
                        }
                    }
                    let last = self.users.entry(event.user_id.clone()).or_insert(at);
                    *last = at;
                }
            }
            Event::PurchaseDecided(event) => {
                let redeemed =
                    PurchaseOutcome::try_from(event.outcome) == Ok(PurchaseOutcome::Redeemed);
                if redeemed && !event.repeated {
                    let at = from_ms(event.redeemed_at_ms).or_else(|| from_ms(log.occurred_at_ms));
                    let Some(at) = at else {
                        self.anomaly(record, "redemption without a valid time".into());
                        return rows;
                    };
                    match self.coupons.get_mut(&event.coupon_code) {
                        None => self.anomaly(
                            record,
                            format!("redemption of unknown coupon {}", event.coupon_code),
                        ),
                        Some(state) => {
                            let fits = state.status == Status::Held
                                && state.holder_user_id.as_deref() == Some(&event.user_id);
                            state.status = Status::Redeemed;
                            state.redeemed_at = Some(at);
                            state.redeemed_order_id = Some(event.order_id.clone());
                            if !fits {
                                state.holder_user_id = Some(event.user_id.clone());
                                self.anomaly(
                                    record,
                                    format!(
                                        "redemption of {} by {}, who did not hold it",
                                        event.coupon_code, event.user_id
                                    ),
                                );
                            }
                        }
                    }
                }
            }
            Event::HoldExpired(event) => {
                if let Some(state) = self.coupons.get_mut(&event.coupon_code) {
                    if state.status == Status::Held
                        && state.hold_id.as_deref() == Some(event.hold_id.as_str())
                    {
                        let user = state.holder_user_id.take();
                        let held_until = state.held_until.take();
                        state.status = Status::Available;
                        state.hold_id = None;
                        let event_id = event
                            .envelope
                            .as_ref()
                            .and_then(|e| Uuid::parse_str(&e.event_id).ok());
                        if let (Some(event_id), Some(at)) = (event_id, from_ms(log.occurred_at_ms))
                        {
                            rows.push(HistoryRow {
                                occurred_at: at,
                                event_id,
                                item: 0,
                                coupon_code: Some(event.coupon_code.clone()),
                                user_id: user,
                                kind: "released",
                                detail: json!({
                                    "hold_id": event.hold_id,
                                    "held_until_ms": held_until.map(|t| t.timestamp_millis()),
                                    "reason": "hold_expired",
                                }),
                            });
                        }
                    }
                }
            }
            Event::ClaimRequested(_) | Event::PurchaseRequested(_) | Event::DeadLetter(_) => {
                self.applied -= 1;
            }
        }
        rows
    }

    /// Coupons in creation order.
    pub fn coupons(&self) -> impl Iterator<Item = &CouponState> {
        self.created
            .iter()
            .filter_map(|code| self.coupons.get(code))
    }

    pub fn users(&self) -> impl Iterator<Item = (&String, &DateTime<Utc>)> {
        self.users.iter()
    }
}

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RebuildStats {
    /// Outcome events applied.
    pub events: u64,
    /// Records that could not be decoded (skipped, as the live consumers did).
    pub undecodable: u64,
    /// Republished events (an id already applied), skipped.
    pub duplicates: u64,
    pub coupons: u64,
    pub available: u64,
    pub held: u64,
    pub redeemed: u64,
    pub users: u64,
    pub history_rows: u64,
    pub anomalies: u64,
    pub anomaly_examples: Vec<String>,
    /// Reading the log.
    pub read_seconds: f64,
    /// Applying and writing.
    pub write_seconds: f64,
}

impl RebuildStats {
    pub fn seconds(&self) -> f64 {
        self.read_seconds + self.write_seconds
    }

    /// Events per second, reading and writing included.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.seconds().max(1e-9)
    }
}

impl fmt::Display for RebuildStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rebuilt from {} events in {:.2}s ({:.0} events/s; read {:.2}s, applied and written {:.2}s): \
             {} coupons ({} available, {} held, {} redeemed), {} users, {} history rows",
            self.events,
            self.seconds(),
            self.rate(),
            self.read_seconds,
            self.write_seconds,
            self.coupons,
            self.available,
            self.held,
            self.redeemed,
            self.users,
            self.history_rows,
        )?;
        if self.undecodable > 0 {
            write!(f, "; {} undecodable records skipped", self.undecodable)?;
        }
        if self.duplicates > 0 {
            write!(f, "; {} republished events applied once", self.duplicates)?;
        }
        if self.anomalies > 0 {
            write!(
                f,
                "; {} outcomes did not fit the rebuilt state",
                self.anomalies
            )?;
        }
        Ok(())
    }
}

/// Migrates `target` and checks that it holds no coupons yet.
pub async fn prepare_target(target: &PgPool) -> anyhow::Result<()> {
    coupon_platform::db::migrate(target)
        .await
        .context("applying migrations to the rebuild database")?;
    let has_rows: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM coupons)")
        .fetch_one(target)
        .await
        .context("checking the rebuild database is empty")?;
    if has_rows {
        bail!("the rebuild database already has coupons; rebuild only into a fresh database");
    }
    Ok(())
}

/// Reads `ranges` (outcome topics) into records ready to apply. Blocking.
pub fn read_outcomes(
    reader: &Reader,
    ranges: &[PartitionRange],
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(Vec<LogRecord>, u64)> {
    let mut records = Vec::new();
    let mut undecodable = 0;
    reader.read(ranges, |kind, record| {
        bar.inc(1);
        match LogRecord::new(kind, record) {
            Some(log) => records.push(log),
            None => undecodable += 1,
        }
        Ok(crate::replay::Flow::Continue)
    })?;
    Ok((records, undecodable))
}

/// Applies `records` in order and writes the result into `target` (already
/// prepared). Returns the statistics, without the read time.
pub async fn project(
    target: &PgPool,
    topics: &Topics,
    mut records: Vec<LogRecord>,
) -> anyhow::Result<(RebuildStats, Projection)> {
    let started = Instant::now();
    sort(&mut records);
    let mut projection = Projection::default();
    let mut stats = RebuildStats::default();
    let mut rows = Vec::new();
    for log in &records {
        rows.extend(projection.apply(topics, log));
        if rows.len() >= HISTORY_CHUNK {
            stats.history_rows += history::append(target, &rows)
                .await
                .context("writing history rows")?;
            rows.clear();
        }
    }
    stats.history_rows += history::append(target, &rows)
        .await
        .context("writing history rows")?;
    drop(records);

    let all: Vec<NewCoupon> = projection.coupons().map(|c| c.coupon.clone()).collect();
    stats.coupons = coupons::insert_coupons(target, &all)
        .await
        .context("writing coupons")?;
    write_states(target, &projection)
        .await
        .context("writing holds and redemptions")?;
    stats.users = write_users(target, &projection)
        .await
        .context("writing users")?;
    for state in projection.coupons() {
        match state.status {
            Status::Available => stats.available += 1,
            Status::Held => stats.held += 1,
            Status::Redeemed => stats.redeemed += 1,
        }
    }
    stats.events = projection.applied;
    stats.duplicates = projection.duplicates;
    stats.anomalies = projection.anomalies;
    stats.anomaly_examples = projection.anomaly_examples.clone();
    stats.write_seconds = started.elapsed().as_secs_f64();
    Ok((stats, projection))
}

async fn write_states(target: &PgPool, projection: &Projection) -> Result<(), sqlx::Error> {
    let changed: Vec<&CouponState> = projection
        .coupons()
        .filter(|c| c.status != Status::Available)
        .collect();
    for chunk in changed.chunks(20_000) {
        let codes: Vec<String> = chunk.iter().map(|c| c.coupon.code.to_string()).collect();
        let statuses: Vec<&str> = chunk.iter().map(|c| c.status.as_str()).collect();
        let holders: Vec<Option<&str>> =
            chunk.iter().map(|c| c.holder_user_id.as_deref()).collect();
        let holds: Vec<Option<&str>> = chunk.iter().map(|c| c.hold_id.as_deref()).collect();
        let until: Vec<Option<DateTime<Utc>>> = chunk.iter().map(|c| c.held_until).collect();
        let redeemed: Vec<Option<DateTime<Utc>>> = chunk.iter().map(|c| c.redeemed_at).collect();
        let orders: Vec<Option<&str>> = chunk
            .iter()
            .map(|c| c.redeemed_order_id.as_deref())
            .collect();
        sqlx::query(
            "UPDATE coupons c
             SET status = u.status, holder_user_id = u.holder, hold_id = u.hold_id,
                 held_until = u.held_until, redeemed_at = u.redeemed_at,
                 redeemed_order_id = u.order_id
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                         $6::timestamptz[], $7::text[])
                  AS u(code, status, holder, hold_id, held_until, redeemed_at, order_id)
             WHERE c.code = u.code",
        )
        .bind(&codes)
        .bind(&statuses)
        .bind(&holders)
        .bind(&holds)
        .bind(&until)
        .bind(&redeemed)
        .bind(&orders)
        .execute(target)
        .await?;
    }
    Ok(())
}

async fn write_users(target: &PgPool, projection: &Projection) -> Result<u64, sqlx::Error> {
    let users: Vec<(&String, &DateTime<Utc>)> = projection.users().collect();
    let mut written = 0;
    for chunk in users.chunks(20_000) {
        let ids: Vec<&str> = chunk.iter().map(|(u, _)| u.as_str()).collect();
        let at: Vec<DateTime<Utc>> = chunk.iter().map(|(_, t)| **t).collect();
        written += sqlx::query(
            "INSERT INTO users (user_id, last_coupon_at)
             SELECT * FROM UNNEST($1::text[], $2::timestamptz[])
             ON CONFLICT (user_id) DO UPDATE SET last_coupon_at = EXCLUDED.last_coupon_at",
        )
        .bind(&ids)
        .bind(&at)
        .execute(target)
        .await?
        .rows_affected();
    }
    Ok(written)
}

/// `couponctl replay --rebuild`: the whole log (up to its current end) into
/// `target`, which must be a fresh database.
pub async fn rebuild(
    kafka: &KafkaSettings,
    topics: &Topics,
    target: &PgPool,
    bar: indicatif::ProgressBar,
) -> anyhow::Result<RebuildStats> {
    prepare_target(target).await?;
    let started = Instant::now();
    let (kafka, read_topics) = (kafka.clone(), topics.clone());
    let read_bar = bar.clone();
    let (records, undecodable) = tokio::task::spawn_blocking(move || {
        let reader = Reader::new(&kafka)?;
        let ranges = reader.plan(&read_topics, &OUTCOME_TOPICS, StartAt::Beginning)?;
        read_bar.set_length(ranges.iter().map(PartitionRange::len).sum());
        read_outcomes(&reader, &ranges, &read_bar)
    })
    .await
    .context("the log reader stopped")??;
    bar.finish_and_clear();
    let read_seconds = started.elapsed().as_secs_f64();
    let (mut stats, _) = project(target, topics, records).await?;
    stats.read_seconds = read_seconds;
    stats.undecodable = undecodable;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use coupon_domain::{CouponCode, SnowflakeId};
    use coupon_schemas::{ClaimDecided, CouponsCreated, HoldExpired, PurchaseDecided};

    const T0: i64 = 1_795_564_800_000;

    fn code(n: u64) -> String {
        let id = SnowflakeId::from_raw((1u64 << 40) + n).unwrap();
        CouponCode::from_id(id).to_string()
    }

    fn log<E: coupon_schemas::Event>(kind: TopicKind, offset: i64, event: E) -> LogRecord {
        let record = Record {
            topic: kind.topic(&Topics::new("t")),
            partition: 0,
            offset,
            key: None,
            value: Some(event.encode_to_vec()),
            timestamp_ms: None,
        };
        LogRecord::new(kind, record).expect("decodable")
    }

    fn envelope<E: coupon_schemas::Event>(at: i64) -> Option<coupon_schemas::Envelope> {
        Some(coupon_schemas::new_envelope::<E>(
            Uuid::new_v4().to_string(),
            at,
            "test",
            "",
        ))
    }

    fn created(at: i64, ids: &[u64]) -> CouponsCreated {
        CouponsCreated {
            envelope: envelope::<CouponsCreated>(at),
            batch_id: Uuid::new_v4().to_string(),
            employee_id: "e1".into(),
            category: "Shoes".into(),
            coupon_ids: ids.iter().map(|n| ((1u64 << 40) + n) as i64).collect(),
            chunk_index: 0,
            chunk_count: 1,
        }
    }

    fn grant(at: i64, user: &str, code: &str, request: &str, repeated: bool) -> ClaimDecided {
        ClaimDecided {
            envelope: envelope::<ClaimDecided>(at),
            request_id: request.into(),
            user_id: user.into(),
            outcome: ClaimOutcome::Granted as i32,
            coupon_code: code.into(),
            category: "Shoes".into(),
            expires_at_ms: at + 1_000,
            repeated,
            ..Default::default()
        }
    }

    fn expired(at: i64, user: &str, code: &str, hold: &str) -> HoldExpired {
        HoldExpired {
            envelope: envelope::<HoldExpired>(at),
            coupon_code: code.into(),
            user_id: user.into(),
            hold_id: hold.into(),
            held_until_ms: at,
        }
    }

    #[test]
    fn outcomes_apply_in_time_order_whatever_the_read_order() {
        let topics = Topics::new("t");
        let (c1, c2) = (code(1), code(2));
        let redeem = PurchaseDecided {
            envelope: envelope::<PurchaseDecided>(T0 + 500),
            request_id: "p1".into(),
            user_id: "bob".into(),
            coupon_code: c2.clone(),
            order_id: "o-1".into(),
            outcome: PurchaseOutcome::Redeemed as i32,
            redeemed_at_ms: T0 + 500,
            ..Default::default()
        };
        let mut records = vec![
            // Read order differs from time order on purpose.
            log(
                TopicKind::ClaimResults,
                3,
                grant(T0 + 2_000, "carol", &c1, "r3", false),
            ),
            log(
                TopicKind::Expirations,
                0,
                expired(T0 + 1_100, "alice", &c1, "r1"),
            ),
            log(TopicKind::PurchaseResults, 0, redeem),
            log(
                TopicKind::ClaimResults,
                0,
                grant(T0 + 100, "alice", &c1, "r1", false),
            ),
            log(
                TopicKind::ClaimResults,
                1,
                grant(T0 + 200, "bob", &c2, "r2", false),
            ),
            log(
                TopicKind::ClaimResults,
                2,
                grant(T0 + 300, "alice", &c1, "r1b", true),
            ),
            // A stale expiry of a hold that was redeemed changes nothing.
            log(
                TopicKind::Expirations,
                1,
                expired(T0 + 1_200, "bob", &c2, "r2"),
            ),
            log(TopicKind::Created, 0, created(T0, &[1, 2])),
        ];
        sort(&mut records);
        let mut projection = Projection::default();
        let mut kinds = Vec::new();
        for record in &records {
            kinds.extend(
                projection
                    .apply(&topics, record)
                    .into_iter()
                    .map(|r| r.kind),
            );
        }
        assert_eq!(projection.anomalies, 0, "{:?}", projection.anomaly_examples);
        let c1_state = projection.coupon(&c1).unwrap();
        assert_eq!(c1_state.status, Status::Held);
        assert_eq!(c1_state.holder_user_id.as_deref(), Some("carol"));
        assert_eq!(c1_state.hold_id.as_deref(), Some("r3"));
        let c2_state = projection.coupon(&c2).unwrap();
        assert_eq!(c2_state.status, Status::Redeemed);
        assert_eq!(c2_state.redeemed_order_id.as_deref(), Some("o-1"));
        assert_eq!(c2_state.holder_user_id.as_deref(), Some("bob"));
        assert_eq!(
            projection
                .last_coupon_at("alice")
                .map(|t| t.timestamp_millis()),
            Some(T0 + 100),
            "a repeated grant does not move last_coupon_at"
        );
        assert_eq!(
            kinds,
            ["created", "created", "granted", "granted", "redeemed", "released", "granted"]
        );
    }

    #[test]
    fn a_replayed_batch_adds_nothing() {
        let topics = Topics::new("t");
        let batch = created(T0, &[1, 2, 3]);
        let mut projection = Projection::default();
        projection.apply(&topics, &log(TopicKind::Created, 0, batch.clone()));
        projection.apply(&topics, &log(TopicKind::Created, 1, batch));
        assert_eq!(projection.coupon_count(), 3);
    }

    #[test]
    fn a_republished_decision_is_applied_once() {
        let topics = Topics::new("t");
        let c1 = code(1);
        let decision = grant(T0 + 100, "alice", &c1, "r1", false);
        let mut records = vec![
            log(TopicKind::Created, 0, created(T0, &[1])),
            log(TopicKind::ClaimResults, 0, decision.clone()),
            log(TopicKind::ClaimResults, 5, decision),
        ];
        sort(&mut records);
        let mut projection = Projection::default();
        let rows: usize = records
            .iter()
            .map(|r| projection.apply(&topics, r).len())
            .sum();
        assert_eq!(rows, 2, "one created and one granted row");
        assert_eq!((projection.applied, projection.duplicates), (2, 1));
        assert_eq!(projection.anomalies, 0, "{:?}", projection.anomaly_examples);
        assert_eq!(projection.coupon(&c1).unwrap().status, Status::Held);
    }

    #[test]
    fn a_grant_of_an_unknown_coupon_is_an_anomaly() {
        let topics = Topics::new("t");
        let mut projection = Projection::default();
        projection.apply(
            &topics,
            &log(
                TopicKind::ClaimResults,
                0,
                grant(T0, "alice", &code(9), "r", false),
            ),
        );
        assert_eq!(projection.anomalies, 1);
    }
}
