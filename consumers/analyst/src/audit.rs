//! Audit: rebuild the state from the log into a scratch database and compare
//! it with the live database: coupons, users (`last_coupon_at` and the
//! blacklist), quota slots and stored claim and purchase decisions, that is
//! everything that decides a later request.
//!
//! Only what the live consumers have finished counts. The cut is each live
//! consumer group's committed offsets, read (before the log's ends are
//! snapshotted) by a client that has the group's id but never subscribes,
//! assigns or commits:
//!
//! - `created` below `<prefix>.coupons-processor`'s offsets and `expirations`
//!   below `<prefix>.expiry-processor`'s are applied; the coupons (and users)
//!   named by later records are skipped, as their effect may or may not be in
//!   the live database yet;
//! - `claim-results` and `purchase-results` are applied up to their ends (a
//!   decision is published only after its effect committed), and users (and
//!   coupons) named by `claims` and `purchases` records at or after
//!   `<prefix>.claims-processor` / `<prefix>.purchases-processor`'s offsets
//!   are skipped, with every coupon a skipped user holds on either side
//!   (its decision may be committed but not yet published). Their quota
//!   slots and stored decisions are skipped too.
//! - `blacklist` is applied up to its end: a change is published after its
//!   transaction commits (through an outbox, so a committed change may reach
//!   the log a little later). The live entries are read before the log and
//!   again at the end; a user whose entry changed in between, or whose change
//!   still waits in the outbox, is left out.
//!
//! The scratch database `audit_<random>` lives on the same server as the
//! live one and is dropped afterwards, whatever happened.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use coupon_domain::{
    Category, ClaimOutcomeKind, CouponCode, CouponStatus, OrderId, PurchaseOutcome, QuotaWindow,
    RequestId, UserId,
};
use coupon_platform::kafka::Record;
use coupon_platform::store;
use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::{ClaimOutcome, Role};

use crate::rebuild::{self, LogRecord, RebuildStats};
use crate::replay::{
    committed_offsets, decode_event, Event, Flow, PartitionRange, Reader, TopicKind,
};

/// The live groups whose committed offsets cut the log, with the topic each
/// one's offsets are read on.
const CUTS: [Role; 4] = [Role::Coupons, Role::Claims, Role::Purchases, Role::Expiry];

/// The outcome of an audit.
#[derive(Debug, Clone, Default)]
pub struct AuditReport {
    /// One line per coupon or user that differs, sorted.
    pub differences: Vec<String>,
    pub coupons_checked: usize,
    pub users_checked: usize,
    pub quota_checked: usize,
    pub claim_decisions_checked: usize,
    pub purchase_decisions_checked: usize,
    pub blacklist_checked: usize,
    /// Left out because records still in flight name them.
    pub coupons_skipped: usize,
    pub users_skipped: usize,
    /// Quota slots and stored decisions of users still in flight.
    pub decisions_skipped: usize,
    /// Blacklist entries that changed while the audit ran.
    pub blacklist_skipped: usize,
    /// Records past the live groups' committed offsets.
    pub in_flight_records: u64,
    pub rebuild: RebuildStats,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.differences.is_empty()
    }

    /// What was compared, e.g. `3 coupons, 3 users, ... checked`.
    pub fn checked(&self) -> String {
        format!(
            "{} coupons, {} users, {} quota grants, {} claim decisions, {} purchase decisions, \
             {} blacklist entries checked",
            self.coupons_checked,
            self.users_checked,
            self.quota_checked,
            self.claim_decisions_checked,
            self.purchase_decisions_checked,
            self.blacklist_checked
        )
    }
}

/// The log, cut at the live groups' committed offsets.
#[derive(Debug, Default)]
struct CutLog {
    outcomes: Vec<LogRecord>,
    undecodable: u64,
    in_flight: u64,
    skip_coupons: HashSet<String>,
    skip_users: HashSet<String>,
    /// Request ids of claims still in flight.
    pending_claims: HashSet<String>,
}

fn canonical_code(raw: &str) -> String {
    CouponCode::parse(raw)
        .map(|c| c.to_string())
        .unwrap_or_else(|_| raw.to_owned())
}

impl CutLog {
    fn skip_user(&mut self, user: &str) {
        if !user.is_empty() {
            self.skip_users.insert(user.to_owned());
        }
    }

    fn skip_coupon(&mut self, code: &str) {
        if !code.is_empty() {
            self.skip_coupons.insert(canonical_code(code));
        }
    }

    /// Notes what a record past the cut touches.
    fn in_flight(&mut self, kind: TopicKind, record: &Record) {
        self.in_flight += 1;
        match decode_event(kind, record) {
            Ok(Event::Created(event)) => {
                if let Ok(coupons) = coupon_consumers::coupons::coupons_of(&event) {
                    for coupon in coupons {
                        self.skip_coupons.insert(coupon.code.to_string());
                    }
                }
            }
            Ok(Event::HoldExpired(event)) => {
                self.skip_coupon(&event.coupon_code);
                self.skip_user(&event.user_id);
            }
            Ok(Event::ClaimRequested(event)) => {
                self.skip_user(&event.user_id);
                self.pending_claims.insert(event.request_id);
            }
            Ok(Event::PurchaseRequested(event)) => {
                self.skip_user(&event.user_id);
                self.skip_coupon(&event.coupon_code);
            }
            // Claims and purchases are keyed by user: an undecodable one
            // still names its user (its decision, if any, is `invalid`).
            _ => {
                if let Some(user) = record.key_str() {
                    if matches!(kind, TopicKind::Claims | TopicKind::Purchases) {
                        self.skip_user(user);
                    }
                }
            }
        }
    }

    /// Coupons granted to claims still in flight (their decision was
    /// published but the claim's offset not committed yet).
    fn skip_pending_grants(&mut self) {
        let mut codes = Vec::new();
        for log in &self.outcomes {
            if log.kind != TopicKind::ClaimResults {
                continue;
            }
            if let Ok(Event::ClaimDecided(event)) = decode_event(log.kind, &log.record) {
                if ClaimOutcome::try_from(event.outcome) == Ok(ClaimOutcome::Granted)
                    && self.pending_claims.contains(&event.request_id)
                {
                    codes.push(event.coupon_code);
                }
            }
        }
        for code in codes {
            self.skip_coupon(&code);
        }
    }
}

/// Reads the committed offsets, then the log up to its current end. Blocking.
fn read_cut_log(
    kafka: &KafkaSettings,
    topics: &Topics,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<CutLog> {
    // Offsets first: everything they cover is then below the ends read next.
    let mut cuts: HashMap<(TopicKind, i32), Option<i64>> = HashMap::new();
    for role in CUTS {
        // Each of these roles reads exactly one topic.
        let kind = role.topics()[0];
        let group = topics.group(role);
        for (partition, offset) in committed_offsets(kafka, &group, &topics.of(kind))? {
            cuts.insert((kind, partition), offset);
        }
    }
    let reader = Reader::new(kafka)?;
    let kinds: Vec<TopicKind> = TopicKind::ALL
        .into_iter()
        .filter(|k| *k != TopicKind::DeadLetter)
        .collect();
    reader.ensure_whole(topics, &kinds, "an audit")?;
    let mut ranges = Vec::new();
    let mut cut_at: HashMap<(String, i32), i64> = HashMap::new();
    // Dead letters change no state: everything else is read.
    for kind in kinds {
        let topic = topics.of(kind);
        for partition in reader.partitions(&topic)? {
            let (low, high) = reader.watermarks(&topic, partition)?;
            let start = match kind {
                // Published only after (decisions) or just before (blacklist
                // changes) their effect commits: all of it counts.
                TopicKind::ClaimResults | TopicKind::PurchaseResults | TopicKind::Blacklist => low,
                _ => {
                    // Nothing committed: nothing is known to be done.
                    let cut = cuts
                        .get(&(kind, partition))
                        .copied()
                        .flatten()
                        .unwrap_or(low)
                        .clamp(low, high);
                    cut_at.insert((topic.clone(), partition), cut);
                    // Requests below the cut are done; only later ones matter.
                    if matches!(kind, TopicKind::Claims | TopicKind::Purchases) {
                        cut
                    } else {
                        low
                    }
                }
            };
            ranges.push(PartitionRange {
                kind,
                topic: topic.clone(),
                partition,
                start,
                end: high,
            });
        }
    }
    bar.set_length(ranges.iter().map(PartitionRange::len).sum());
    let mut log = CutLog::default();
    reader.read(&ranges, |kind, record| {
        bar.inc(1);
        let past_cut = cut_at
            .get(&(record.topic.clone(), record.partition))
            .is_some_and(|cut| record.offset >= *cut);
        if past_cut {
            log.in_flight(kind, &record);
        } else if matches!(kind, TopicKind::Claims | TopicKind::Purchases) {
            // Below the cut (not planned to be read): done.
        } else {
            match LogRecord::new(kind, record) {
                Some(record) => log.outcomes.push(record),
                None => log.undecodable += 1,
            }
        }
        Ok(Flow::Continue)
    })?;
    log.skip_pending_grants();
    Ok(log)
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct CouponRow {
    code: String,
    status: CouponStatus,
    holder_user_id: Option<String>,
    redeemed_order_id: Option<String>,
}

impl CouponRow {
    fn describe(&self) -> String {
        format!(
            "{} holder={} order={}",
            self.status,
            self.holder_user_id.as_deref().unwrap_or("-"),
            self.redeemed_order_id.as_deref().unwrap_or("-")
        )
    }
}

/// Whether two coupons agree on what the audit checks.
fn same_coupon(live: &CouponRow, log: &CouponRow) -> bool {
    live.status == log.status
        && (live.status == CouponStatus::Available || live.holder_user_id == log.holder_user_id)
        && (live.status != CouponStatus::Redeemed
            || live.redeemed_order_id == log.redeemed_order_id)
}

async fn coupons_of(pool: &PgPool) -> Result<HashMap<String, CouponRow>, sqlx::Error> {
    Ok(store::coupons::outcomes(pool)
        .await?
        .into_iter()
        .map(|c| {
            let row = CouponRow {
                code: c.code.to_string(),
                status: c.status,
                holder_user_id: c.holder_user_id.map(UserId::into_string),
                redeemed_order_id: c.redeemed_order_id.map(OrderId::into_string),
            };
            (row.code.clone(), row)
        })
        .collect())
}

/// Users with a `last_coupon_at`, in milliseconds.
async fn users_of(pool: &PgPool) -> Result<HashMap<String, i64>, sqlx::Error> {
    Ok(store::users::last_coupon_times(pool)
        .await?
        .into_iter()
        .map(|(user, at)| (user.into_string(), at.timestamp_millis()))
        .collect())
}

fn time_ms(ms: Option<&i64>) -> String {
    ms.and_then(|ms| coupon_platform::time::from_ms(*ms))
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into())
}

/// A quota slot: who took it, when.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QuotaRow {
    request_id: String,
    granted_at_ms: i64,
}

/// Quota slots by (user, window start in milliseconds).
async fn quota_of(pool: &PgPool) -> Result<HashMap<(String, i64), QuotaRow>, sqlx::Error> {
    Ok(store::decisions::quota_grants(pool)
        .await?
        .into_iter()
        .map(|g| {
            let row = QuotaRow {
                request_id: g.request_id.into_string(),
                granted_at_ms: g.granted_at.timestamp_millis(),
            };
            (
                (g.user_id.into_string(), g.window_start.timestamp_millis()),
                row,
            )
        })
        .collect())
}

/// A stored claim decision, times in milliseconds (what its event carries).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClaimDecisionRow {
    event_id: uuid::Uuid,
    user_id: UserId,
    outcome: ClaimOutcomeKind,
    coupon_code: Option<CouponCode>,
    category: Option<Category>,
    expires_at_ms: Option<i64>,
    repeated: bool,
    retry_at_ms: Option<i64>,
    blacklisted_until_ms: Option<i64>,
    decided_at_ms: i64,
}

impl ClaimDecisionRow {
    fn describe(&self) -> String {
        let mut text = self.outcome.to_string();
        if let Some(code) = &self.coupon_code {
            text.push_str(&format!(" coupon={code}"));
        }
        if self.repeated {
            text.push_str(" repeated");
        }
        if let Some(at) = self.retry_at_ms {
            text.push_str(&format!(" retry_at={}", time_ms(Some(&at))));
        }
        text.push_str(&format!(
            " at={} event={}",
            time_ms(Some(&self.decided_at_ms)),
            self.event_id
        ));
        text
    }
}

/// Stored claim decisions by request id.
async fn claim_decisions_of(
    pool: &PgPool,
) -> Result<HashMap<RequestId, ClaimDecisionRow>, sqlx::Error> {
    let ms = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_millis());
    Ok(store::decisions::claim_decisions(pool)
        .await?
        .into_iter()
        .map(|r| {
            let row = ClaimDecisionRow {
                event_id: r.event_id,
                user_id: r.user_id,
                outcome: r.outcome,
                coupon_code: r.coupon_code,
                category: r.category,
                expires_at_ms: ms(r.expires_at),
                repeated: r.repeated,
                retry_at_ms: ms(r.retry_at),
                blacklisted_until_ms: ms(r.blacklisted_until),
                decided_at_ms: r.decided_at.timestamp_millis(),
            };
            (r.request_id, row)
        })
        .collect())
}

/// A stored purchase decision.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PurchaseDecisionRow {
    request_id: String,
    event_id: uuid::Uuid,
    user_id: String,
    coupon_code: String,
    outcome: PurchaseOutcome,
    decided_at_ms: i64,
}

impl PurchaseDecisionRow {
    fn describe(&self) -> String {
        format!(
            "{} coupon={} request={} at={} event={}",
            self.outcome,
            self.coupon_code,
            self.request_id,
            time_ms(Some(&self.decided_at_ms)),
            self.event_id
        )
    }
}

/// Stored purchase decisions by order id.
async fn purchase_decisions_of(
    pool: &PgPool,
) -> Result<HashMap<String, PurchaseDecisionRow>, sqlx::Error> {
    Ok(store::decisions::purchase_decisions(pool)
        .await?
        .into_iter()
        .map(|r| {
            let row = PurchaseDecisionRow {
                request_id: r.request_id.into_string(),
                event_id: r.event_id,
                user_id: r.user_id.into_string(),
                coupon_code: r.coupon_code,
                outcome: r.outcome,
                decided_at_ms: r.decided_at.timestamp_millis(),
            };
            (r.order_id.into_string(), row)
        })
        .collect())
}

/// A user's blacklist columns, times in milliseconds; no row reads as the
/// default (not blacklisted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct BlacklistRow {
    blacklisted: bool,
    until_ms: Option<i64>,
    reason: Option<String>,
    at_ms: Option<i64>,
}

impl BlacklistRow {
    fn describe(&self) -> String {
        if !self.blacklisted && *self == BlacklistRow::default() {
            return "not blacklisted".into();
        }
        format!(
            "{} until={} reason={} since={}",
            if self.blacklisted {
                "blacklisted"
            } else {
                "lifted"
            },
            match self.until_ms {
                Some(ms) => time_ms(Some(&ms)),
                None => "removed".into(),
            },
            self.reason.as_deref().unwrap_or("-"),
            time_ms(self.at_ms.as_ref())
        )
    }
}

/// Users whose blacklist columns are not all empty.
async fn blacklist_of(pool: &PgPool) -> Result<HashMap<String, BlacklistRow>, sqlx::Error> {
    Ok(store::users::blacklist_columns(pool)
        .await?
        .into_iter()
        .map(|u| {
            let row = BlacklistRow {
                blacklisted: u.blacklisted,
                until_ms: u.blacklisted_until.map(|t| t.timestamp_millis()),
                reason: u.blacklist_reason,
                at_ms: u.blacklisted_at.map(|t| t.timestamp_millis()),
            };
            (u.user_id.into_string(), row)
        })
        .collect())
}

/// One line for a key that differs between live and log (`None`: the same).
fn difference<V: PartialEq>(
    what: &str,
    live: Option<&V>,
    log: Option<&V>,
    describe: impl Fn(&V) -> String,
) -> Option<String> {
    match (live, log) {
        (Some(l), Some(r)) if l == r => None,
        (Some(l), Some(r)) => Some(format!(
            "{what}: live {}, log says {}",
            describe(l),
            describe(r)
        )),
        (Some(l), None) => Some(format!("{what}: live {}, not on the log", describe(l))),
        (None, Some(r)) => Some(format!(
            "{what}: missing from the live database, log says {}",
            describe(r)
        )),
        (None, None) => None,
    }
}

/// Compares quota slots, stored decisions and blacklist entries: what
/// decides a later request. `blacklist_before` is the live blacklist as read
/// before the log.
async fn compare_decisions(
    live: &PgPool,
    rebuilt: &PgPool,
    log: &CutLog,
    blacklist_before: &HashMap<String, BlacklistRow>,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let in_flight = |user: &str| log.skip_users.contains(user);

    let live_quota = quota_of(live).await.context("reading the live quota")?;
    let log_quota = quota_of(rebuilt)
        .await
        .context("reading the rebuilt quota")?;
    let keys: BTreeSet<&(String, i64)> = live_quota.keys().chain(log_quota.keys()).collect();
    for key in keys {
        let (user, window) = key;
        if in_flight(user) {
            report.decisions_skipped += 1;
            continue;
        }
        report.quota_checked += 1;
        let what = format!(
            "quota of {user} in the window from {}",
            time_ms(Some(window))
        );
        report.differences.extend(difference(
            &what,
            live_quota.get(key),
            log_quota.get(key),
            |q| {
                format!(
                    "taken by request {} at {}",
                    q.request_id,
                    time_ms(Some(&q.granted_at_ms))
                )
            },
        ));
    }

    let live_claims = claim_decisions_of(live)
        .await
        .context("reading the live claim decisions")?;
    let log_claims = claim_decisions_of(rebuilt)
        .await
        .context("reading the rebuilt claim decisions")?;
    let requests: BTreeSet<&RequestId> = live_claims.keys().chain(log_claims.keys()).collect();
    for request in requests {
        let (l, r) = (live_claims.get(request), log_claims.get(request));
        let user = l.or(r).map(|d| d.user_id.as_str()).unwrap_or_default();
        if in_flight(user) || log.pending_claims.contains(request.as_str()) {
            report.decisions_skipped += 1;
            continue;
        }
        report.claim_decisions_checked += 1;
        let what = format!("claim decision {request} (user {user})");
        report
            .differences
            .extend(difference(&what, l, r, ClaimDecisionRow::describe));
    }

    let live_purchases = purchase_decisions_of(live)
        .await
        .context("reading the live purchase decisions")?;
    let log_purchases = purchase_decisions_of(rebuilt)
        .await
        .context("reading the rebuilt purchase decisions")?;
    let orders: BTreeSet<&String> = live_purchases.keys().chain(log_purchases.keys()).collect();
    for order in orders {
        let (l, r) = (live_purchases.get(order), log_purchases.get(order));
        let user = l.or(r).map(|d| d.user_id.as_str()).unwrap_or_default();
        if in_flight(user) {
            report.decisions_skipped += 1;
            continue;
        }
        report.purchase_decisions_checked += 1;
        let what = format!("purchase decision for order {order} (user {user})");
        report
            .differences
            .extend(difference(&what, l, r, PurchaseDecisionRow::describe));
    }

    let live_blacklist = blacklist_of(live)
        .await
        .context("reading the live blacklist")?;
    let log_blacklist = blacklist_of(rebuilt)
        .await
        .context("reading the rebuilt blacklist")?;
    let users: BTreeSet<&String> = live_blacklist
        .keys()
        .chain(log_blacklist.keys())
        .chain(blacklist_before.keys())
        .collect();
    // Read after the log: a change committed but still waiting in the
    // outbox is not on the log yet, and is left out like one that changed.
    let pending: HashSet<String> = store::users::blacklist_pending_users(live)
        .await
        .context("reading the blacklist changes not yet on the log")?
        .into_iter()
        .collect();
    let none = BlacklistRow::default();
    for user in users {
        let now = live_blacklist.get(user).unwrap_or(&none);
        if blacklist_before.get(user).unwrap_or(&none) != now || pending.contains(user.as_str()) {
            report.blacklist_skipped += 1;
            continue;
        }
        report.blacklist_checked += 1;
        let logged = log_blacklist.get(user).unwrap_or(&none);
        report.differences.extend(difference(
            &format!("blacklist of user {user}"),
            Some(now),
            Some(logged),
            BlacklistRow::describe,
        ));
    }
    Ok(())
}

/// Compares the live database with the rebuilt one.
async fn compare(
    live: &PgPool,
    rebuilt: &PgPool,
    log: &mut CutLog,
    blacklist_before: &HashMap<String, BlacklistRow>,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let live_coupons = coupons_of(live).await.context("reading the live coupons")?;
    let log_coupons = coupons_of(rebuilt)
        .await
        .context("reading the rebuilt coupons")?;
    // A user still in flight may hold a coupon whose decision is not published yet.
    for row in live_coupons.values().chain(log_coupons.values()) {
        if row
            .holder_user_id
            .as_ref()
            .is_some_and(|u| log.skip_users.contains(u))
        {
            log.skip_coupons.insert(row.code.clone());
        }
    }
    let codes: BTreeSet<&String> = live_coupons.keys().chain(log_coupons.keys()).collect();
    for code in codes {
        if log.skip_coupons.contains(code.as_str()) {
            report.coupons_skipped += 1;
            continue;
        }
        report.coupons_checked += 1;
        let line = match (live_coupons.get(code), log_coupons.get(code)) {
            (Some(l), Some(r)) if same_coupon(l, r) => None,
            (Some(l), Some(r)) => Some(format!(
                "coupon {code}: live {}, log says {}",
                l.describe(),
                r.describe()
            )),
            (Some(l), None) => Some(format!(
                "coupon {code}: live {}, but the log never created it",
                l.describe()
            )),
            (None, Some(r)) => Some(format!(
                "coupon {code}: missing from the live database, log says {}",
                r.describe()
            )),
            (None, None) => None,
        };
        report.differences.extend(line);
    }

    let live_users = users_of(live).await.context("reading the live users")?;
    let log_users = users_of(rebuilt)
        .await
        .context("reading the rebuilt users")?;
    let users: BTreeSet<&String> = live_users.keys().chain(log_users.keys()).collect();
    for user in users {
        if log.skip_users.contains(user.as_str()) {
            report.users_skipped += 1;
            continue;
        }
        report.users_checked += 1;
        let (l, r) = (live_users.get(user), log_users.get(user));
        if l != r {
            report.differences.push(format!(
                "user {user}: live last_coupon_at={}, log says {}",
                time_ms(l),
                time_ms(r)
            ));
        }
    }
    compare_decisions(live, rebuilt, log, blacklist_before, report).await
}

/// Runs an audit of the deployment under `topics` whose live database is
/// `database_url`. With `read_url` (a replica of it), the live state is read
/// there, once the replica has replayed everything the primary had written
/// when the log was read; the scratch database is made on the primary.
pub async fn audit(
    kafka: &KafkaSettings,
    topics: &Topics,
    window: QuotaWindow,
    database_url: &str,
    read_url: Option<&str>,
    bar: indicatif::ProgressBar,
) -> anyhow::Result<AuditReport> {
    let options: PgConnectOptions = database_url
        .parse()
        .context("the database URL is not a valid Postgres URL")?;
    let connect = |options: PgConnectOptions, url: &str, connections: u32| {
        let url = coupon_platform::db::redact(url);
        async move {
            PgPoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await
                .with_context(|| format!("connecting to Postgres at {url}"))
        }
    };
    let primary = connect(options.clone(), database_url, 2).await?;
    let replica = match read_url.filter(|url| *url != database_url) {
        Some(url) => {
            let replica_options: PgConnectOptions = url
                .parse()
                .context("the read database URL is not a valid Postgres URL")?;
            // One connection: behind a balancer another could reach a
            // replica that has not caught up.
            Some(connect(replica_options, url, 1).await?)
        }
        None => None,
    };
    let live = replica.clone().unwrap_or_else(|| primary.clone());

    // Before the log: a change published then is in the log, or still
    // changing (then the second read differs and the user is left out).
    let blacklist_before = blacklist_of(&live)
        .await
        .context("reading the live blacklist")?;
    let started = std::time::Instant::now();
    let (k, t, b) = (kafka.clone(), topics.clone(), bar.clone());
    let mut log = tokio::task::spawn_blocking(move || read_cut_log(&k, &t, &b))
        .await
        .context("the log reader stopped")??;
    bar.finish_and_clear();
    let read_seconds = started.elapsed().as_secs_f64();
    if let Some(replica) = &replica {
        wait_replayed(&primary, replica, Duration::from_secs(60)).await?;
    }

    let scratch = format!("audit_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    coupon_platform::db::create_database(&primary, &scratch)
        .await
        .with_context(|| {
            format!("creating the scratch database {scratch} (the role needs CREATEDB)")
        })?;
    let scratch_options = options.database(&scratch);
    let result = audit_in(
        &live,
        scratch_options,
        topics,
        window,
        &mut log,
        &blacklist_before,
    )
    .await;
    let dropped = coupon_platform::db::drop_database_when_idle(&primary, &scratch).await;
    live.close().await;
    primary.close().await;
    let mut report = result?;
    dropped.with_context(|| format!("dropping the scratch database {scratch}"))?;
    report.rebuild.read_seconds = read_seconds;
    report.rebuild.undecodable = log.undecodable;
    report.in_flight_records = log.in_flight;
    Ok(report)
}

/// Waits until `replica` has replayed the primary's WAL as of now, so that
/// what it answers is at least as new as the log just read.
async fn wait_replayed(primary: &PgPool, replica: &PgPool, within: Duration) -> anyhow::Result<()> {
    let lsn = store::replication::wal_position(primary)
        .await
        .context("reading the primary's WAL position")?;
    let deadline = std::time::Instant::now() + within;
    loop {
        let replayed = store::replication::replayed_up_to(replica, &lsn)
            .await
            .context("reading the replica's replay position")?;
        if replayed {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "the read replica did not replay the primary's WAL up to {lsn} within {within:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn audit_in(
    live: &PgPool,
    scratch: PgConnectOptions,
    topics: &Topics,
    window: QuotaWindow,
    log: &mut CutLog,
    blacklist_before: &HashMap<String, BlacklistRow>,
) -> anyhow::Result<AuditReport> {
    let rebuilt = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(scratch)
        .await
        .context("connecting to the scratch database")?;
    let result = async {
        rebuild::prepare_target(&rebuilt).await?;
        let outcomes = std::mem::take(&mut log.outcomes);
        let (stats, _) = rebuild::project(&rebuilt, topics, window, outcomes).await?;
        let mut report = AuditReport {
            rebuild: stats,
            ..AuditReport::default()
        };
        compare(live, &rebuilt, log, blacklist_before, &mut report).await?;
        Ok(report)
    }
    .await;
    rebuilt.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: &str, holder: Option<&str>, order: Option<&str>) -> CouponRow {
        CouponRow {
            code: "C".into(),
            status: status.parse().unwrap(),
            holder_user_id: holder.map(Into::into),
            redeemed_order_id: order.map(Into::into),
        }
    }

    #[test]
    fn coupons_are_compared_on_status_holder_and_order() {
        let redeemed = row("redeemed", Some("bob"), Some("o-1"));
        assert!(same_coupon(&redeemed, &redeemed.clone()));
        assert!(!same_coupon(&redeemed, &row("available", None, None)));
        assert!(!same_coupon(
            &redeemed,
            &row("redeemed", Some("bob"), Some("o-2"))
        ));
        assert!(!same_coupon(
            &row("held", Some("bob"), None),
            &row("held", Some("carol"), None)
        ));
        assert!(same_coupon(
            &row("available", None, None),
            &row("available", None, None)
        ));
    }

    #[test]
    fn codes_are_canonical_before_skipping() {
        let code = CouponCode::from_id(coupon_domain::SnowflakeId::from_raw(1 << 40).unwrap());
        let text = code.to_string();
        assert_eq!(canonical_code(&text.to_lowercase()), text);
        assert_eq!(canonical_code("not a code"), "not a code");
    }
}
