//! The projection: the rebuilt state in memory, pure, no I/O. Each outcome
//! event is applied once, in causal order (see the module doc of `rebuild`).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use coupon_consumers::coupons::{self};
use coupon_consumers::profiles::{self, ProfileUpdate};
use coupon_domain::lifecycle::release_event_id;
use coupon_domain::{ClaimOutcomeKind, CouponStatus, QuotaWindow, RequestId};
use coupon_platform::kafka::Record;
use coupon_platform::store::decisions::CancelRecord;
use coupon_platform::store::history::{HistoryRow, HoldRelease, ReleasedBy};
use coupon_platform::time::from_ms;
use coupon_schemas::{
    ClaimDecided, ClaimOutcome, CouponExpired, CouponsCreated, HoldExpired, PurchaseDecided,
    PurchaseOutcome,
};

use crate::replay::TopicEvent;

mod ends;

use super::state::{
    claim_decision_row, purchase_decision_row, sort, BlacklistState, ClaimDecisionRecord,
    CouponState, LogRecord, QuotaGrant, StoredPurchase,
};

/// At most this many anomalies are kept for the report (all are counted).
const ANOMALIES_KEPT: usize = 20;

/// The sets that grow with the log, an entry per event or claim, hash with
/// foldhash (several times SipHash's speed on short keys; their keys come
/// from a log read once, not from clients aiming collisions at a service)
/// and are reserved up front ([`Projection::reserve`]).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<T> = HashSet<T, foldhash::fast::RandomState>;

/// The projection, in memory: pure, no I/O.
#[derive(Debug, Default)]
pub struct Projection {
    /// Names quota slots: the deployment's `QUOTA_WINDOW`.
    pub(super) window: QuotaWindow,
    pub(super) coupons: HashMap<String, CouponState>,
    /// Codes in the order they were created (the order rows are inserted in).
    pub(super) created: Vec<String>,
    /// The batches' campaigns, once per batch (the first chunk's), in the
    /// order their batches appeared.
    pub(super) campaigns: Vec<(uuid::Uuid, coupon_domain::Campaign)>,
    /// Campaigns ended early, as the log's `CouponExpired` events tell
    /// (their end, where it came before `valid_until`).
    pub(super) ended_early: HashMap<uuid::Uuid, (DateTime<Utc>, Option<String>)>,
    /// Cancelled orders, with their cancellation (by order id).
    pub(super) cancels: Vec<(coupon_domain::OrderId, CancelRecord)>,
    pub(super) users: HashMap<String, DateTime<Utc>>,
    pub(super) blacklist: HashMap<String, BlacklistState>,
    /// The coupon each user was last granted (checked against the coupon's
    /// state before use: it may have been redeemed or released since).
    pub(super) holding: HashMap<String, String>,
    /// By (user, window start).
    pub(super) quota: HashMap<(String, DateTime<Utc>), QuotaGrant>,
    /// The outcome of the stored decision of each request id (the first
    /// stands).
    pub(super) claim_decisions: FastMap<RequestId, ClaimOutcomeKind>,
    /// Claim decisions stored since the last [`Projection::take_new_claim_decisions`]:
    /// a stored decision never changes (the first stands), so the rebuild
    /// writes them while it applies the rest.
    new_claim_decisions: Vec<ClaimDecisionRecord>,
    /// By order id.
    pub(super) purchase_decisions: HashMap<String, StoredPurchase>,
    /// TopicEvent ids applied so far: a republished event (same id, e.g. a
    /// decision published again after a redelivery) is applied once.
    pub(super) seen: FastSet<String>,
    /// Hold ids (claim request ids) whose grant was applied.
    pub(super) granted_holds: HashSet<String>,
    /// Events that cannot have happened yet, by the coupon they wait for.
    pub(super) waiting: HashMap<String, Vec<LogRecord>>,
    /// Coupons whose state changed while events wait (to wake them).
    pub(super) touched: Vec<String>,
    pub applied: u64,
    /// Events applied later than their time order put them, after the
    /// event they waited for.
    pub reordered: u64,
    /// Events skipped because an event with the same id was applied.
    pub duplicates: u64,
    pub anomalies: u64,
    pub anomaly_examples: Vec<String>,
    /// Each user's latest profile (by its time, then event id), as the
    /// profiles processor keeps it.
    pub(super) profiles: HashMap<String, ProfileUpdate>,
}

impl Projection {
    /// An empty projection naming quota slots by `window`.
    pub fn new(window: QuotaWindow) -> Self {
        Self {
            window,
            ..Self::default()
        }
    }

    /// Every user's latest profile, by user id.
    pub fn profiles(&self) -> Vec<&ProfileUpdate> {
        let mut all: Vec<&ProfileUpdate> = self.profiles.values().collect();
        all.sort_by(|a, b| a.user_id.as_str().cmp(b.user_id.as_str()));
        all
    }

    pub fn quota_grant(&self, user: &str, window_start: DateTime<Utc>) -> Option<&QuotaGrant> {
        self.quota.get(&(user.to_owned(), window_start))
    }

    /// How many claim decisions were stored since they were last taken.
    pub(super) fn new_claim_decision_count(&self) -> usize {
        self.new_claim_decisions.len()
    }

    /// The claim decisions stored since they were last taken.
    pub(super) fn take_new_claim_decisions(&mut self) -> Vec<ClaimDecisionRecord> {
        std::mem::take(&mut self.new_claim_decisions)
    }

    /// Room for `events` more events' ids and claim decisions (the maps
    /// that grow with the log), so they do not grow by rehashing.
    pub fn reserve(&mut self, events: usize) {
        self.seen.reserve(events);
        self.claim_decisions.reserve(events);
    }

    /// The stored decision for `request_id`, while it is not yet taken by
    /// the rebuild's writer (a scan: for tests and small logs).
    pub fn claim_decision(&self, request_id: &str) -> Option<&ClaimDecisionRecord> {
        let request_id = RequestId::parse(request_id).ok()?;
        self.new_claim_decisions
            .iter()
            .find(|d| d.request_id == request_id)
    }

    pub fn purchase_decision(&self, order_id: &str) -> Option<&StoredPurchase> {
        self.purchase_decisions.get(order_id)
    }

    pub fn blacklist_entry(&self, user: &str) -> Option<&BlacklistState> {
        self.blacklist.get(user)
    }

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

    /// Offers the next record in time order ([`sort`]): applied now if it
    /// can have happened in the state so far, else kept until the event it
    /// waits for is applied (see the module doc). Returns the history rows
    /// of everything applied. Call [`Projection::finish`] after the last.
    pub fn offer(&mut self, log: LogRecord) -> Vec<HistoryRow> {
        if let Some(code) = self.waits_for(&log) {
            self.waiting.entry(code).or_default().push(log);
            return Vec::new();
        }
        let mut rows = self.apply_event(log);
        self.wake(&mut rows);
        rows
    }

    /// Applies what still waits when the log ends, in time order: each is
    /// reported as an anomaly where it does not fit.
    pub fn finish(&mut self) -> Vec<HistoryRow> {
        let mut left: Vec<LogRecord> = self.waiting.drain().flat_map(|(_, logs)| logs).collect();
        sort(&mut left);
        self.touched.clear();
        left.into_iter()
            .flat_map(|log| self.apply_event(log))
            .collect()
    }

    /// The coupon `event` (of `log`) waits for, if it cannot have happened
    /// yet.
    ///
    /// A grant waits for its coupon to be free, and for the user's own live
    /// hold of another coupon to end: the live system grants nobody a second
    /// coupon while the first is held, so a redemption or release stamped
    /// the same millisecond as the grant happened before it.
    fn waits_for(&self, log: &LogRecord) -> Option<String> {
        match &log.event {
            TopicEvent::ClaimDecided(e)
                if !e.repeated
                    && ClaimOutcome::try_from(e.outcome) == Ok(ClaimOutcome::Granted) =>
            {
                let ready = self.coupons.get(&e.coupon_code).is_some_and(|c| {
                    c.status != CouponStatus::Held
                        || c.holder_user_id.as_deref() == Some(e.user_id.as_str())
                        || c.hold_id.as_deref() == Some(e.request_id.as_str())
                });
                if !ready {
                    return Some(e.coupon_code.clone());
                }
                self.live_hold_of(&e.user_id, &e.coupon_code, log.occurred_at_ms)
            }
            TopicEvent::PurchaseDecided(e)
                if !e.repeated
                    && PurchaseOutcome::try_from(e.outcome) == Ok(PurchaseOutcome::Redeemed) =>
            {
                let ready = self.coupons.get(&e.coupon_code).is_some_and(|c| {
                    c.status == CouponStatus::Redeemed
                        || (c.status == CouponStatus::Held
                            && c.holder_user_id.as_deref() == Some(e.user_id.as_str()))
                });
                (!ready).then(|| e.coupon_code.clone())
            }
            // A cancellation waits for the redemption it undoes.
            TopicEvent::PurchaseDecided(e)
                if !e.repeated
                    && PurchaseOutcome::try_from(e.outcome) == Ok(PurchaseOutcome::Cancelled) =>
            {
                let ready = self.coupons.get(&e.coupon_code).is_some_and(|c| {
                    c.status == CouponStatus::Redeemed
                        && c.redeemed_order_id.as_deref() == Some(e.order_id.as_str())
                });
                (!ready).then(|| e.coupon_code.clone())
            }
            TopicEvent::HoldExpired(e) => {
                (!self.granted_holds.contains(&e.hold_id)).then(|| e.coupon_code.clone())
            }
            _ => None,
        }
    }

    /// The coupon other than `granted` that `user` holds, live at `at_ms`.
    fn live_hold_of(&self, user: &str, granted: &str, at_ms: i64) -> Option<String> {
        let code = self.holding.get(user)?;
        let at = from_ms(at_ms)?;
        let state = self.coupons.get(code)?;
        let live = code != granted
            && state.status == CouponStatus::Held
            && state.holder_user_id.as_deref() == Some(user)
            && state.held_until.is_some_and(|until| until > at);
        live.then(|| code.clone())
    }

    fn touch(&mut self, code: &str) {
        if self.waiting.contains_key(code) {
            self.touched.push(code.to_owned());
        }
    }

    /// Applies the waiting events that the changes since the last call made
    /// possible, and those that these make possible in turn.
    fn wake(&mut self, rows: &mut Vec<HistoryRow>) {
        while let Some(code) = self.touched.pop() {
            let Some(logs) = self.waiting.remove(&code) else {
                continue;
            };
            let mut still = Vec::new();
            for log in logs {
                match self.waits_for(&log) {
                    Some(other) if other == code => still.push(log),
                    Some(other) => self.waiting.entry(other).or_default().push(log),
                    None => {
                        self.reordered += 1;
                        rows.extend(self.apply_event(log));
                    }
                }
            }
            if !still.is_empty() {
                let entry = self.waiting.entry(code).or_default();
                still.append(entry);
                *entry = still;
            }
        }
    }

    /// Applies one outcome record as it comes, whatever the state (no
    /// waiting); returns its history rows.
    pub fn apply(&mut self, log: &LogRecord) -> Vec<HistoryRow> {
        self.apply_event(log.clone())
    }

    fn apply_event(&mut self, mut log: LogRecord) -> Vec<HistoryRow> {
        let event_id = log
            .event
            .envelope()
            .map(|e| e.event_id.clone())
            .unwrap_or_default();
        if !self.seen.insert(event_id) {
            self.duplicates += 1;
            return Vec::new();
        }
        self.applied += 1;
        // Made when the record was decoded (`LogRecord::new`).
        let mut rows = match std::mem::replace(&mut log.history, Ok(Vec::new())) {
            Ok(rows) => rows,
            Err(reason) => {
                self.anomaly(&log.record, format!("no history: {reason}"));
                Vec::new()
            }
        };
        let (log, record) = (&log, &log.record);
        match &log.event {
            TopicEvent::Created(event) => self.apply_created(record, event),
            TopicEvent::ClaimDecided(event) => self.apply_claim_decision(log, event, &mut rows),
            TopicEvent::PurchaseDecided(event) => self.apply_purchase_decision(log, event),
            TopicEvent::HoldExpired(event) => self.apply_expiry(log, event, &mut rows),
            TopicEvent::CouponExpired(event) => self.apply_campaign_expiry(log, event, &mut rows),
            TopicEvent::CampaignEnded(event) => {
                match (Uuid::parse_str(&event.batch_id), from_ms(event.ended_at_ms)) {
                    (Ok(batch), Some(at)) if event.ended_at_ms > 0 => {
                        let by = (!event.ended_by.is_empty()).then(|| event.ended_by.clone());
                        self.ended_early.insert(batch, (at, by));
                    }
                    _ => self.anomaly(record, "campaign end without a batch or a time".into()),
                }
            }
            TopicEvent::BlacklistChanged(event) => {
                let state = BlacklistState::of(
                    event,
                    (record.partition, record.offset, log.occurred_at_ms),
                );
                match self.blacklist.get(&event.user_id) {
                    Some(last) if !state.follows(last) => {}
                    _ => {
                        self.blacklist.insert(event.user_id.clone(), state);
                    }
                }
            }
            TopicEvent::UserProfileUpdated(event) => match profiles::update_of(event, record) {
                Ok(update) => {
                    let newer = self
                        .profiles
                        .get(update.user_id.as_str())
                        .is_none_or(|kept| {
                            (&kept.updated_at, &kept.event_id)
                                < (&update.updated_at, &update.event_id)
                        });
                    if newer {
                        self.profiles
                            .insert(update.user_id.as_str().to_owned(), update);
                    }
                }
                Err(reason) => self.anomaly(record, format!("refused profile: {reason}")),
            },
            TopicEvent::ClaimRequested(_)
            | TopicEvent::PurchaseRequested(_)
            | TopicEvent::PurchaseCancelled(_)
            | TopicEvent::DeadLetter(_) => {
                self.applied -= 1;
            }
        }
        rows
    }

    /// A batch's coupons, available (a replayed batch adds nothing).
    fn apply_created(&mut self, record: &Record, event: &CouponsCreated) {
        let new = match coupons::coupons_of(event) {
            Ok(new) => new,
            Err(reason) => return self.anomaly(record, format!("refused batch: {reason}")),
        };
        // `coupons_of` accepted the chunk, so its campaign is valid too.
        if let (Ok(Some(campaign)), Some(first)) = (coupons::campaign_of(event), new.first()) {
            if !self
                .campaigns
                .iter()
                .any(|(batch, _)| *batch == first.batch_id)
            {
                self.campaigns.push((first.batch_id, campaign));
            }
        }
        for coupon in new {
            let code = coupon.code.to_string();
            if self.coupons.contains_key(&code) {
                continue;
            }
            self.created.push(code.clone());
            self.touch(&code);
            self.coupons.insert(
                code,
                CouponState {
                    coupon,
                    status: CouponStatus::Available,
                    holder_user_id: None,
                    hold_id: None,
                    held_until: None,
                    redeemed_at: None,
                    redeemed_order_id: None,
                },
            );
        }
    }

    /// A claim's decision; a fresh grant takes the user's quota slot, ends
    /// their previous (overdue) hold and holds the coupon.
    fn apply_claim_decision(
        &mut self,
        log: &LogRecord,
        event: &ClaimDecided,
        rows: &mut Vec<HistoryRow>,
    ) {
        let record = &log.record;
        self.record_claim_decision(record, event, log.occurred_at_ms);
        let granted = ClaimOutcome::try_from(event.outcome) == Ok(ClaimOutcome::Granted);
        if !granted || event.repeated {
            return;
        }
        let (Some(at), Some(until)) = (from_ms(log.occurred_at_ms), from_ms(event.expires_at_ms))
        else {
            return self.anomaly(record, "grant without valid times".into());
        };
        self.take_quota(record, event, at);
        rows.extend(self.release_previous_hold(record, event, at));
        match self.coupons.get_mut(&event.coupon_code) {
            None => self.anomaly(
                record,
                format!("grant of unknown coupon {}", event.coupon_code),
            ),
            Some(state) => {
                let was = state.status;
                self.granted_holds.insert(event.request_id.clone());
                state.status = CouponStatus::Held;
                state.holder_user_id = Some(event.user_id.clone());
                state.hold_id = Some(event.request_id.clone());
                state.held_until = Some(until);
                state.redeemed_at = None;
                state.redeemed_order_id = None;
                if !was.may_become(CouponStatus::Held) {
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
        self.holding
            .insert(event.user_id.clone(), event.coupon_code.clone());
        self.touch(&event.coupon_code);
    }

    /// Stores the decision as the claim processor did (one per request id).
    fn record_claim_decision(&mut self, record: &Record, event: &ClaimDecided, at_ms: i64) {
        let Some(at) = from_ms(at_ms) else {
            self.anomaly(record, "claim decision without a valid time".into());
            return;
        };
        match claim_decision_row(event, at) {
            Ok(None) => {}
            Ok(Some(row)) => {
                if let Some(first) = self.claim_decisions.get(&row.request_id) {
                    let what = format!(
                        "a second decision for claim {} ({} after {first}); the first stands",
                        row.request_id, row.outcome
                    );
                    self.anomaly(record, what);
                } else {
                    self.claim_decisions
                        .insert(row.request_id.clone(), row.outcome);
                    self.new_claim_decisions.push(row);
                }
            }
            Err(reason) => self.anomaly(record, format!("claim decision not stored: {reason}")),
        }
    }

    /// A fresh grant ends the user's previous hold if it is still in place:
    /// a user holds one coupon at a time, and the claim processor releases
    /// an overdue hold the expiry has not released yet with the user's next
    /// grant (no expiration event then). That grant may be of the very
    /// coupon released: the oldest available one, in the next window.
    /// Returns its `released` history row, as the claim processor writes it.
    fn release_previous_hold(
        &mut self,
        record: &Record,
        event: &ClaimDecided,
        at: DateTime<Utc>,
    ) -> Option<HistoryRow> {
        let user = event.user_id.as_str();
        let code = self.holding.get(user)?.clone();
        let state = self.coupons.get_mut(&code)?;
        if state.status != CouponStatus::Held
            || state.holder_user_id.as_deref() != Some(user)
            || state.hold_id.as_deref() == Some(event.request_id.as_str())
        {
            return None;
        }
        let hold_id = state.hold_id.take().unwrap_or_default();
        let held_until = state.held_until.take();
        state.status = CouponStatus::Available;
        state.holder_user_id = None;
        if held_until.is_some_and(|until| until > at) {
            self.anomaly(
                record,
                format!("grant to {user} while their hold of {code} was live"),
            );
        }
        self.touch(&code);
        Some(HistoryRow::released(
            at,
            release_event_id(&hold_id, &code),
            HoldRelease {
                code,
                user: Some(user.to_owned()),
                hold_id: &hold_id,
                held_until,
                by: ReleasedBy::NextGrant,
                campaign_ended_at: None,
            },
        ))
    }

    /// Takes the user's quota slot for the window `at` falls in.
    fn take_quota(&mut self, record: &Record, event: &ClaimDecided, at: DateTime<Utc>) {
        let window_start = self.window.start_of(at);
        let key = (event.user_id.clone(), window_start);
        if let Some(first) = self.quota.get(&key) {
            let what = format!(
                "a second grant to {} in the window from {} (requests {} and {})",
                event.user_id,
                window_start.to_rfc3339(),
                first.request_id,
                event.request_id
            );
            self.anomaly(record, what);
            return;
        }
        self.quota.insert(
            key,
            QuotaGrant {
                user_id: event.user_id.clone(),
                window_start,
                request_id: event.request_id.clone(),
                granted_at: at,
            },
        );
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

    /// Every user with a `last_coupon_at` or a blacklist entry, sorted.
    pub(super) fn user_ids(&self) -> Vec<&String> {
        let mut ids: Vec<&String> = self.users.keys().chain(self.blacklist.keys()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Users blacklisted when the log ends (expired entries included).
    pub fn blacklisted_count(&self) -> usize {
        self.blacklist.values().filter(|b| b.blacklisted).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::TopicKind;
    use coupon_domain::{Category, ClaimOutcomeKind};
    use coupon_domain::{CouponCode, SnowflakeId};
    use coupon_platform::Topics;
    use coupon_schemas::{
        BlacklistChanged, ClaimDecided, CouponsCreated, HoldExpired, PurchaseDecided,
    };

    const T0: i64 = 1_795_564_800_000;

    /// Ids generated at `T0`: the projector's rule (and so the rebuild's)
    /// takes ids made shortly before their chunk was published.
    const BASE_ID: u64 = (T0 as u64 - coupon_domain::snowflake::EPOCH_MS) << 22;

    fn code(n: u64) -> String {
        let id = SnowflakeId::from_raw(BASE_ID + n).unwrap();
        CouponCode::from_id(id).to_string()
    }

    fn log<E: coupon_schemas::Event>(kind: TopicKind, offset: i64, event: E) -> LogRecord {
        let record = Record {
            topic: Topics::new("t").of(kind),
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
            coupon_ids: ids.iter().map(|n| (BASE_ID + n) as i64).collect(),
            chunk_index: 0,
            chunk_count: 1,
            campaign: None,
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
            ..Default::default()
        }
    }

    #[test]
    fn outcomes_apply_in_time_order_whatever_the_read_order() {
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
                    .apply(record)
                    .into_iter()
                    .map(|r| r.kind.as_str()),
            );
        }
        assert_eq!(projection.anomalies, 0, "{:?}", projection.anomaly_examples);
        let c1_state = projection.coupon(&c1).unwrap();
        assert_eq!(c1_state.status, CouponStatus::Held);
        assert_eq!(c1_state.holder_user_id.as_deref(), Some("carol"));
        assert_eq!(c1_state.hold_id.as_deref(), Some("r3"));
        let c2_state = projection.coupon(&c2).unwrap();
        assert_eq!(c2_state.status, CouponStatus::Redeemed);
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
        let batch = created(T0, &[1, 2, 3]);
        let mut projection = Projection::default();
        projection.apply(&log(TopicKind::Created, 0, batch.clone()));
        projection.apply(&log(TopicKind::Created, 1, batch));
        assert_eq!(projection.coupon_count(), 3);
    }

    #[test]
    fn a_republished_decision_is_applied_once() {
        let c1 = code(1);
        let decision = grant(T0 + 100, "alice", &c1, "r1", false);
        let mut records = vec![
            log(TopicKind::Created, 0, created(T0, &[1])),
            log(TopicKind::ClaimResults, 0, decision.clone()),
            log(TopicKind::ClaimResults, 5, decision),
        ];
        sort(&mut records);
        let mut projection = Projection::default();
        let rows: usize = records.iter().map(|r| projection.apply(r).len()).sum();
        assert_eq!(rows, 2, "one created and one granted row");
        assert_eq!((projection.applied, projection.duplicates), (2, 1));
        assert_eq!(projection.anomalies, 0, "{:?}", projection.anomaly_examples);
        assert_eq!(projection.coupon(&c1).unwrap().status, CouponStatus::Held);
    }

    #[test]
    fn a_grant_of_an_unknown_coupon_is_an_anomaly() {
        let mut projection = Projection::default();
        projection.apply(&log(
            TopicKind::ClaimResults,
            0,
            grant(T0, "alice", &code(9), "r", false),
        ));
        assert_eq!(projection.anomalies, 1);
    }

    fn decided(at: i64, user: &str, request: &str, outcome: ClaimOutcome) -> ClaimDecided {
        ClaimDecided {
            envelope: envelope::<ClaimDecided>(at),
            request_id: request.into(),
            user_id: user.into(),
            outcome: outcome as i32,
            retry_at_ms: if outcome == ClaimOutcome::RateLimited {
                at + 10_000
            } else {
                0
            },
            ..Default::default()
        }
    }

    fn apply_all(projection: &mut Projection, mut records: Vec<LogRecord>) {
        sort(&mut records);
        for record in &records {
            projection.apply(record);
        }
    }

    #[test]
    fn grants_take_the_quota_of_their_window_and_every_decision_is_stored() {
        let c1 = code(1);
        let mut projection = Projection::new(QuotaWindow::DAY);
        let mut invalid = decided(T0 + 400, "mallory", "r5", ClaimOutcome::Invalid);
        invalid.reason = "bad".into();
        apply_all(
            &mut projection,
            vec![
                log(TopicKind::Created, 0, created(T0, &[1])),
                log(
                    TopicKind::ClaimResults,
                    0,
                    grant(T0 + 100, "alice", &c1, "r1", false),
                ),
                log(
                    TopicKind::ClaimResults,
                    1,
                    grant(T0 + 150, "alice", &c1, "r2", true),
                ),
                log(
                    TopicKind::ClaimResults,
                    2,
                    decided(T0 + 200, "bob", "r3", ClaimOutcome::SoldOut),
                ),
                log(
                    TopicKind::ClaimResults,
                    3,
                    decided(T0 + 300, "carol", "r4", ClaimOutcome::RateLimited),
                ),
                log(TopicKind::ClaimResults, 4, invalid),
            ],
        );
        assert_eq!(projection.anomalies, 0, "{:?}", projection.anomaly_examples);
        // T0 is a UTC midnight: the day's window starts there.
        let day = from_ms(T0).unwrap();
        let slot = projection.quota_grant("alice", day).expect("alice's slot");
        assert_eq!(slot.request_id, "r1", "the repeated grant takes no slot");
        assert_eq!(slot.granted_at.timestamp_millis(), T0 + 100);
        assert!(
            projection.quota_grant("bob", day).is_none(),
            "sold out uses no quota"
        );

        let first = projection.claim_decision("r1").unwrap();
        assert_eq!(first.outcome, ClaimOutcomeKind::Granted);
        assert_eq!(
            first.coupon_code.map(|code| code.to_string()).as_deref(),
            Some(c1.as_str())
        );
        assert_eq!(first.category.as_ref().map(Category::as_str), Some("Shoes"));
        assert_eq!(
            first.expires_at.map(|t| t.timestamp_millis()),
            Some(T0 + 1_100)
        );
        assert!(projection.claim_decision("r2").unwrap().repeated);
        let sold_out = projection.claim_decision("r3").unwrap();
        assert_eq!(
            (sold_out.outcome, sold_out.coupon_code),
            (ClaimOutcomeKind::SoldOut, None)
        );
        let limited = projection.claim_decision("r4").unwrap();
        assert_eq!(
            limited.retry_at.map(|t| t.timestamp_millis()),
            Some(T0 + 10_300)
        );
        assert!(
            projection.claim_decision("r5").is_none(),
            "invalid answers are never stored"
        );
    }

    #[test]
    fn quota_slots_are_named_by_the_configured_window() {
        let (c1, c2) = (code(1), code(2));
        let hour = QuotaWindow::new(std::time::Duration::from_secs(3_600)).unwrap();
        let mut projection = Projection::new(hour);
        let later = T0 + 3 * 3_600_000 + 5;
        apply_all(
            &mut projection,
            vec![
                log(TopicKind::Created, 0, created(T0, &[1, 2])),
                log(
                    TopicKind::ClaimResults,
                    0,
                    grant(T0 + 100, "alice", &c1, "r1", false),
                ),
                log(
                    TopicKind::ClaimResults,
                    1,
                    grant(later, "alice", &c2, "r2", false),
                ),
            ],
        );
        assert_eq!(
            projection
                .quota_grant("alice", from_ms(T0).unwrap())
                .unwrap()
                .request_id,
            "r1"
        );
        assert_eq!(
            projection
                .quota_grant("alice", from_ms(T0 + 3 * 3_600_000).unwrap())
                .unwrap()
                .request_id,
            "r2"
        );
    }

    #[test]
    fn a_second_grant_in_one_window_is_an_anomaly() {
        let (c1, c2) = (code(1), code(2));
        let mut projection = Projection::new(QuotaWindow::DAY);
        apply_all(
            &mut projection,
            vec![
                log(TopicKind::Created, 0, created(T0, &[1, 2])),
                log(
                    TopicKind::ClaimResults,
                    0,
                    grant(T0 + 100, "alice", &c1, "r1", false),
                ),
                log(
                    TopicKind::ClaimResults,
                    1,
                    grant(T0 + 200, "alice", &c2, "r2", false),
                ),
            ],
        );
        assert!(projection
            .anomaly_examples
            .iter()
            .any(|a| a.contains("a second grant to alice")));
        assert_eq!(
            projection
                .quota_grant("alice", from_ms(T0).unwrap())
                .unwrap()
                .request_id,
            "r1",
            "the first grant keeps the slot"
        );
    }

    /// Sorts `records` and offers them in that order, as [`project`] does.
    fn apply_causally(
        projection: &mut Projection,
        mut records: Vec<LogRecord>,
    ) -> Vec<&'static str> {
        sort(&mut records);
        let mut rows = Vec::new();
        for log in records {
            rows.extend(projection.offer(log));
        }
        rows.extend(projection.finish());
        rows.iter().map(|r| r.kind.as_str()).collect()
    }

    fn coupon_expired(at: i64, code: &str) -> coupon_schemas::CouponExpired {
        coupon_schemas::CouponExpired {
            envelope: Some(
                coupon_schemas::new_envelope::<coupon_schemas::CouponExpired>(
                    coupon_domain::lifecycle::campaign_expiry_event_id(code).to_string(),
                    at,
                    "test",
                    "",
                ),
            ),
            coupon_code: code.into(),
            batch_id: "b".into(),
            campaign_ended_at_ms: at,
        }
    }

    fn cancelled(at: i64, user: &str, code: &str, order: &str, to: &str) -> PurchaseDecided {
        PurchaseDecided {
            envelope: envelope::<PurchaseDecided>(at),
            request_id: format!("cancel-{order}"),
            user_id: user.into(),
            coupon_code: code.into(),
            order_id: order.into(),
            outcome: PurchaseOutcome::Cancelled as i32,
            coupon_status: to.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_campaign_end_expires_available_coupons_once_and_spares_holds() {
        let (c1, c2) = (code(1), code(2));
        let mut projection = Projection::default();
        let kinds = apply_causally(
            &mut projection,
            vec![
                log(TopicKind::Created, 0, created(T0, &[1, 2])),
                log(
                    TopicKind::ClaimResults,
                    0,
                    grant(T0 + 100, "ann", &c1, "r1", false),
                ),
                log(TopicKind::Expirations, 0, coupon_expired(T0 + 200, &c1)),
                log(TopicKind::Expirations, 1, coupon_expired(T0 + 200, &c2)),
                // The sweeper announced it again: the same event id.
                log(TopicKind::Expirations, 2, coupon_expired(T0 + 300, &c2)),
            ],
        );
        assert_eq!(projection.coupon(&c1).unwrap().status, CouponStatus::Held);
        assert_eq!(
            projection.coupon(&c2).unwrap().status,
            CouponStatus::Expired
        );
        assert_eq!(kinds.iter().filter(|k| **k == "expired").count(), 1);
        assert_eq!(projection.duplicates, 1);
        assert_eq!(projection.anomalies, 0, "{:?}", projection.anomaly_examples);
    }

    #[test]
    fn a_hold_ending_after_its_campaign_expires_its_coupon() {
        let c1 = code(1);
        let mut projection = Projection::default();
        let mut late = expired(T0 + 5_000, "ann", &c1, "r1");
        late.campaign_ended_at_ms = T0 + 1_000;
        let kinds = apply_causally(
            &mut projection,
            vec![
                log(TopicKind::Created, 0, created(T0, &[1])),
                log(
                    TopicKind::ClaimResults,
                    0,
                    grant(T0 + 100, "ann", &c1, "r1", false),
                ),
                log(TopicKind::Expirations, 0, late),
            ],
        );
        let state = projection.coupon(&c1).unwrap();
        assert_eq!(state.status, CouponStatus::Expired);
        assert_eq!(state.holder_user_id, None);
        assert!(kinds.contains(&"expired"), "{kinds:?}");
    }

    #[test]
    fn a_cancellation_undoes_its_redemption_even_read_first() {
        let (c1, c2) = (code(1), code(2));
        let mut projection = Projection::default();
        let kinds = apply_causally(
            &mut projection,
            vec![
                log(TopicKind::Created, 0, created(T0, &[1, 2])),
                log(
                    TopicKind::ClaimResults,
                    0,
                    grant(T0 + 100, "ann", &c1, "r1", false),
                ),
                log(
                    TopicKind::ClaimResults,
                    1,
                    grant(T0 + 100, "bob", &c2, "r2", false),
                ),
                log(
                    TopicKind::PurchaseResults,
                    0,
                    redemption(T0 + 300, "ann", &c1, "o1"),
                ),
                log(
                    TopicKind::PurchaseResults,
                    1,
                    redemption(T0 + 300, "bob", &c2, "o2"),
                ),
                // Stamped before the redemption it undoes: it waits for it.
                log(
                    TopicKind::PurchaseResults,
                    2,
                    cancelled(T0 + 299, "ann", &c1, "o1", "available"),
                ),
                log(
                    TopicKind::PurchaseResults,
                    3,
                    cancelled(T0 + 400, "bob", &c2, "o2", "expired"),
                ),
            ],
        );
        let one = projection.coupon(&c1).unwrap();
        assert_eq!(one.status, CouponStatus::Available);
        assert_eq!(
            (
                one.holder_user_id.as_deref(),
                one.redeemed_order_id.as_deref()
            ),
            (None, None)
        );
        assert_eq!(
            projection.coupon(&c2).unwrap().status,
            CouponStatus::Expired
        );
        assert_eq!(kinds.iter().filter(|k| **k == "cancelled").count(), 2);
        assert_eq!(projection.anomalies, 0, "{:?}", projection.anomaly_examples);
        // The user's quota stays used.
        assert!(projection
            .quota_grant(
                "ann",
                from_ms(T0)
                    .unwrap()
                    .date_naive()
                    .and_hms_opt(0, 0, 0)
                    .unwrap()
                    .and_utc()
            )
            .is_some());
    }

    fn redemption(at: i64, user: &str, code: &str, order: &str) -> PurchaseDecided {
        PurchaseDecided {
            envelope: envelope::<PurchaseDecided>(at),
            request_id: format!("p-{order}"),
            user_id: user.into(),
            coupon_code: code.into(),
            order_id: order.into(),
            outcome: PurchaseOutcome::Redeemed as i32,
            redeemed_at_ms: at,
            ..Default::default()
        }
    }

    /// A purchase sent before its grant and decided after it was dated at
    /// its request by earlier versions: in time order its redemption comes
    /// before the grant. Before, the rebuild applied it to an available
    /// coupon (an anomaly) and then the grant over it: the coupon came out
    /// held, where the live database has it redeemed.
    #[test]
    fn a_redemption_dated_before_its_grant_is_applied_after_it() {
        let c1 = code(1);
        let mut projection = Projection::default();
        let kinds = apply_causally(
            &mut projection,
            vec![
                log(TopicKind::Created, 0, created(T0, &[1])),
                log(
                    TopicKind::PurchaseResults,
                    0,
                    redemption(T0 + 400, "ann", &c1, "o-1"),
                ),
                log(
                    TopicKind::ClaimResults,
                    0,
                    grant(T0 + 500, "ann", &c1, "r1", false),
                ),
            ],
        );
        assert_eq!(projection.anomalies, 0, "{:?}", projection.anomaly_examples);
        let state = projection.coupon(&c1).unwrap();
        assert_eq!(state.status, CouponStatus::Redeemed);
        assert_eq!(state.redeemed_order_id.as_deref(), Some("o-1"));
        assert_eq!(projection.reordered, 1);
        assert_eq!(kinds, ["created", "granted", "redeemed"]);
    }

    /// A claim is judged at its broker time, which can lie (within the
    /// grace) before the batch that supplied its coupon was published, and
    /// a grant at the very millisecond a hold's deadline passed sorts before
    /// that hold's release. Both wait for what they need.
    #[test]
    fn a_grant_waits_for_its_coupon_and_for_the_previous_hold_to_end() {
        let (c1, c2) = (code(1), code(2));
        let mut projection = Projection::default();
        let kinds = apply_causally(
            &mut projection,
            vec![
                log(
                    TopicKind::ClaimResults,
                    0,
                    grant(T0 - 300, "ann", &c1, "r1", false),
                ),
                log(TopicKind::Created, 0, created(T0, &[1, 2])),
                // r1 holds c1 until T0 + 700; bob is granted it at T0 + 700.
                log(
                    TopicKind::ClaimResults,
                    1,
                    grant(T0 + 700, "bob", &c1, "r2", false),
                ),
                log(
                    TopicKind::Expirations,
                    0,
                    expired(T0 + 700, "ann", &c1, "r1"),
                ),
                log(
                    TopicKind::ClaimResults,
                    2,
                    grant(T0 + 800, "cat", &c2, "r3", false),
                ),
            ],
        );
        assert_eq!(projection.anomalies, 0, "{:?}", projection.anomaly_examples);
        let state = projection.coupon(&c1).unwrap();
        assert_eq!(state.status, CouponStatus::Held);
        assert_eq!(state.holder_user_id.as_deref(), Some("bob"));
        assert_eq!(state.hold_id.as_deref(), Some("r2"));
        assert_eq!(projection.reordered, 2);
        assert_eq!(
            kinds,
            ["created", "created", "granted", "released", "granted", "granted"]
        );
    }

    /// What never becomes possible is applied when the log ends, as an
    /// anomaly, rather than dropped.
    #[test]
    fn what_still_waits_at_the_end_of_the_log_is_applied_and_reported() {
        let c1 = code(1);
        let mut projection = Projection::default();
        apply_causally(
            &mut projection,
            vec![
                log(TopicKind::Created, 0, created(T0, &[1])),
                log(
                    TopicKind::PurchaseResults,
                    0,
                    redemption(T0 + 400, "ann", &c1, "o-1"),
                ),
            ],
        );
        assert_eq!(projection.anomalies, 1, "{:?}", projection.anomaly_examples);
        assert_eq!(
            projection.coupon(&c1).unwrap().status,
            CouponStatus::Redeemed
        );
        assert!(projection.purchase_decision("o-1").is_some());
    }

    /// The oldest available coupon is often the one a user held before: the
    /// claim processor releases the overdue hold with the user's next grant
    /// and grants them the same coupon. Before, the rebuild wrote no
    /// `released` row for it and reported the grant as an anomaly.
    #[test]
    fn a_coupon_granted_again_to_its_last_holder_ends_the_old_hold_first() {
        let c1 = code(1);
        let hour = QuotaWindow::new(std::time::Duration::from_secs(3_600)).unwrap();
        let mut projection = Projection::new(hour);
        let kinds = apply_causally(
            &mut projection,
            vec![
                log(TopicKind::Created, 0, created(T0, &[1])),
                log(
                    TopicKind::ClaimResults,
                    0,
                    grant(T0 + 100, "ann", &c1, "r1", false),
                ),
                log(
                    TopicKind::ClaimResults,
                    1,
                    grant(T0 + 3_600_000, "ann", &c1, "r2", false),
                ),
            ],
        );
        assert_eq!(projection.anomalies, 0, "{:?}", projection.anomaly_examples);
        let state = projection.coupon(&c1).unwrap();
        assert_eq!(state.hold_id.as_deref(), Some("r2"));
        assert_eq!(kinds, ["created", "granted", "granted", "released"]);
    }

    /// The live system, modelled on its rules, for the property below: what
    /// it decides and what it logs, with the times each event is logged at.
    mod live {
        use super::*;
        use proptest::prelude::*;

        pub const TTL: i64 = 5_000;
        pub const GRACE: i64 = 2_000;
        pub const WINDOW_MS: i64 = 20_000;

        #[derive(Debug, Clone)]
        pub enum Step {
            /// Real time moves on by this many milliseconds.
            Wait(i64),
            /// Coupon `n` is released (published now).
            Create(u64),
            /// The user claims; the claim reached the broker `lag` ms ago.
            Claim { user: usize, lag: i64 },
            /// The user buys coupon `n` (one they got, or one they guess),
            /// sent `lag` ms ago.
            Purchase { user: usize, coupon: u64, lag: i64 },
            /// The expiry sweeps.
            Sweep,
        }

        pub fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                3 => (0i64..4_000).prop_map(Step::Wait),
                1 => (1u64..=3).prop_map(Step::Create),
                3 => (0usize..3, 0i64..=GRACE).prop_map(|(user, lag)| Step::Claim { user, lag }),
                3 => (0usize..3, 1u64..=3, 0i64..=GRACE)
                    .prop_map(|(user, coupon, lag)| Step::Purchase { user, coupon, lag }),
                2 => Just(Step::Sweep),
            ]
        }

        #[derive(Debug, Clone, Default, PartialEq)]
        pub struct Coupon {
            pub status: Option<CouponStatus>,
            pub holder: Option<String>,
            pub hold_id: Option<String>,
            held_until: i64,
            granted_at: i64,
            pub order: Option<String>,
        }

        pub const USERS: [&str; 3] = ["ann", "bob", "cat"];

        /// Runs `steps`: the final coupons, and the outcome log.
        pub fn run(steps: &[Step]) -> (Vec<Coupon>, Vec<LogRecord>) {
            let mut coupons = vec![Coupon::default(); 4];
            let mut quota: HashSet<(usize, i64)> = HashSet::new();
            let mut log = Vec::new();
            let mut offsets: HashMap<TopicKind, i64> = HashMap::new();
            let mut emit = |log: &mut Vec<LogRecord>, kind: TopicKind, record: LogRecord| {
                let offset = offsets.entry(kind).or_insert(0);
                let mut record = record;
                record.record.offset = *offset;
                *offset += 1;
                log.push(record);
            };
            let mut now = T0;
            let mut requests = 0;
            for step in steps {
                match *step {
                    Step::Wait(ms) => now += ms,
                    Step::Create(n) => {
                        if coupons[n as usize].status.is_none() {
                            coupons[n as usize].status = Some(CouponStatus::Available);
                            emit(
                                &mut log,
                                TopicKind::Created,
                                super::log(TopicKind::Created, 0, created(now, &[n])),
                            );
                        }
                    }
                    Step::Claim { user, lag } => {
                        let at = now - lag;
                        let name = USERS[user];
                        if quota.contains(&(user, at.div_euclid(WINDOW_MS))) {
                            continue;
                        }
                        // The user's live hold: no second one (the rules
                        // answer it again); an overdue one is released.
                        let own = (1..=3).find(|&n| {
                            coupons[n].status == Some(CouponStatus::Held)
                                && coupons[n].holder.as_deref() == Some(name)
                        });
                        if let Some(n) = own {
                            if coupons[n].held_until > at {
                                continue;
                            }
                            coupons[n] = Coupon {
                                status: Some(CouponStatus::Available),
                                ..Coupon::default()
                            };
                        }
                        let Some(n) =
                            (1..=3).find(|&n| coupons[n].status == Some(CouponStatus::Available))
                        else {
                            continue;
                        };
                        requests += 1;
                        let request = format!("r{requests}");
                        quota.insert((user, at.div_euclid(WINDOW_MS)));
                        coupons[n] = Coupon {
                            status: Some(CouponStatus::Held),
                            holder: Some(name.into()),
                            hold_id: Some(request.clone()),
                            held_until: at + TTL,
                            granted_at: at,
                            order: None,
                        };
                        let mut event = grant(at, name, &code(n as u64), &request, false);
                        event.expires_at_ms = at + TTL;
                        emit(
                            &mut log,
                            TopicKind::ClaimResults,
                            super::log(TopicKind::ClaimResults, 0, event),
                        );
                    }
                    Step::Purchase { user, coupon, lag } => {
                        let requested = now - lag;
                        let name = USERS[user];
                        let c = &mut coupons[coupon as usize];
                        if c.status != Some(CouponStatus::Held) || c.holder.as_deref() != Some(name)
                        {
                            continue; // refused: nothing changes
                        }
                        // `coupon_domain::purchase::judged_at`
                        let at = requested.max(c.granted_at);
                        if c.held_until <= at {
                            continue; // hold expired
                        }
                        requests += 1;
                        let order = format!("o{requests}");
                        c.status = Some(CouponStatus::Redeemed);
                        c.order = Some(order.clone());
                        let event = redemption(at, name, &code(coupon), &order);
                        emit(
                            &mut log,
                            TopicKind::PurchaseResults,
                            super::log(TopicKind::PurchaseResults, 0, event),
                        );
                    }
                    Step::Sweep => {
                        for (n, c) in coupons.iter_mut().enumerate().skip(1) {
                            if c.status == Some(CouponStatus::Held) && c.held_until + GRACE <= now {
                                let event = expired(
                                    c.held_until,
                                    c.holder.as_deref().unwrap_or(""),
                                    &code(n as u64),
                                    c.hold_id.as_deref().unwrap_or(""),
                                );
                                emit(
                                    &mut log,
                                    TopicKind::Expirations,
                                    super::log(TopicKind::Expirations, 0, event),
                                );
                                *c = Coupon {
                                    status: Some(CouponStatus::Available),
                                    ..Coupon::default()
                                };
                            }
                        }
                    }
                }
            }
            (coupons, log)
        }
    }

    proptest::proptest! {
        /// Whatever the live system did, in whatever order its events are
        /// read, the rebuild ends where the live database did: the event
        /// times come from different clocks (a claim judged at its broker
        /// time, before the batch it drew from was published or at the
        /// millisecond a hold's deadline passed; a purchase sent before its
        /// grant), and the rebuild applies them in causal order.
        #[test]
        fn the_rebuild_ends_where_the_live_system_did(
            steps in proptest::collection::vec(live::step(), 1..60),
            read_order in proptest::collection::vec(0u32..1000, 60),
        ) {
            rebuild_matches_live(&steps, &read_order)?;
        }
    }

    /// Runs `steps` live and rebuilds their log read in `read_order`
    /// (shuffled keys; the rebuild sorts): no anomaly, and every coupon ends
    /// as it did live.
    fn rebuild_matches_live(
        steps: &[live::Step],
        read_order: &[u32],
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        let (expected, mut records) = live::run(steps);
        // The read order is the log's, shuffled: the rebuild sorts.
        let keys: Vec<u32> = (0..records.len())
            .map(|i| read_order[i % read_order.len()])
            .collect();
        let mut order: Vec<usize> = (0..records.len()).collect();
        order.sort_by_key(|&i| keys[i]);
        let mut shuffled: Vec<Option<LogRecord>> = records.drain(..).map(Some).collect();
        let records: Vec<LogRecord> = order.iter().filter_map(|&i| shuffled[i].take()).collect();
        let window =
            QuotaWindow::new(std::time::Duration::from_millis(live::WINDOW_MS as u64)).unwrap();
        let mut projection = Projection::new(window);
        apply_causally(&mut projection, records);
        proptest::prop_assert_eq!(projection.anomalies, 0, "{:?}", projection.anomaly_examples);
        for n in 1..=3u64 {
            let want = &expected[n as usize];
            let got = projection.coupon(&code(n));
            match (&want.status, got) {
                (None, None) => {}
                (Some(status), Some(got)) => {
                    proptest::prop_assert_eq!(got.status, *status, "coupon {}", n);
                    proptest::prop_assert_eq!(
                        &got.holder_user_id,
                        &want
                            .holder
                            .clone()
                            .filter(|_| *status != CouponStatus::Available),
                        "coupon {}",
                        n
                    );
                    proptest::prop_assert_eq!(&got.redeemed_order_id, &want.order, "coupon {}", n);
                    if *status == CouponStatus::Held {
                        proptest::prop_assert_eq!(&got.hold_id, &want.hold_id, "coupon {}", n);
                    }
                }
                (want, got) => proptest::prop_assert!(
                    false,
                    "coupon {}: live {:?}, rebuilt {:?}",
                    n,
                    want,
                    got
                ),
            }
        }
        Ok(())
    }

    /// Found by the property above: the user's grant of the next window and
    /// the redemption of their previous hold share a millisecond; the
    /// redemption happened first.
    #[test]
    fn a_grant_waits_for_the_redemption_of_the_users_hold_in_its_millisecond() {
        use live::Step::*;
        let steps = [
            Wait(442),
            Create(2),
            Create(1),
            Claim { user: 0, lag: 443 },
            Purchase {
                user: 0,
                coupon: 1,
                lag: 0,
            },
            Wait(700),
            Claim { user: 0, lag: 700 },
            Wait(0),
        ];
        rebuild_matches_live(&steps, &[0]).unwrap();
    }

    #[test]
    fn a_fresh_grant_releases_the_users_overdue_hold() {
        let (c1, c2) = (code(1), code(2));
        let hour = QuotaWindow::new(std::time::Duration::from_secs(3_600)).unwrap();
        let mut projection = Projection::new(hour);
        let mut records = vec![
            log(TopicKind::Created, 0, created(T0, &[1, 2])),
            log(
                TopicKind::ClaimResults,
                0,
                grant(T0 + 100, "alice", &c1, "r1", false),
            ),
            // The next hour; no expiration event for r1's hold came first.
            log(
                TopicKind::ClaimResults,
                1,
                grant(T0 + 3_600_000, "alice", &c2, "r2", false),
            ),
        ];
        sort(&mut records);
        let kinds: Vec<&str> = records
            .iter()
            .flat_map(|r| projection.apply(r))
            .map(|r| r.kind.as_str())
            .collect();
        assert_eq!(projection.anomalies, 0, "{:?}", projection.anomaly_examples);
        assert_eq!(
            projection.coupon(&c1).unwrap().status,
            CouponStatus::Available
        );
        assert_eq!(projection.coupon(&c2).unwrap().status, CouponStatus::Held);
        assert_eq!(
            kinds,
            ["created", "created", "granted", "granted", "released"]
        );
    }

    fn changed(at: i64, user: &str, until: i64, reason: &str) -> BlacklistChanged {
        BlacklistChanged {
            envelope: envelope::<BlacklistChanged>(at),
            user_id: user.into(),
            blacklisted: !reason.is_empty(),
            blacklisted_until_ms: until,
            reason: reason.into(),
            blacklisted_at_ms: if reason.is_empty() { 0 } else { at },
            source: "manual".into(),
            changed_by: "e1".into(),
        }
    }

    #[test]
    fn the_last_blacklist_change_of_a_user_in_log_order_wins() {
        let mut projection = Projection::new(QuotaWindow::DAY);
        apply_all(
            &mut projection,
            vec![
                log(TopicKind::Blacklist, 0, changed(T0, "mallory", 0, "fraud")),
                // Lifted, then blacklisted for an hour; the last change was
                // stamped by a host whose clock runs behind.
                log(TopicKind::Blacklist, 1, changed(T0 + 100, "mallory", 0, "")),
                log(
                    TopicKind::Blacklist,
                    2,
                    changed(T0 + 50, "mallory", T0 + 3_600_000, "flooding"),
                ),
                log(TopicKind::Blacklist, 3, changed(T0, "trent", 0, "fraud")),
                log(TopicKind::Blacklist, 4, changed(T0 + 1, "trent", 0, "")),
            ],
        );
        let mallory = projection.blacklist_entry("mallory").unwrap();
        assert!(mallory.blacklisted);
        assert_eq!(
            mallory.until.map(|t| t.timestamp_millis()),
            Some(T0 + 3_600_000)
        );
        assert_eq!(mallory.reason.as_deref(), Some("flooding"));
        let trent = projection.blacklist_entry("trent").unwrap();
        assert!(!trent.blacklisted);
        assert_eq!(
            (trent.until, trent.reason.as_deref(), trent.at),
            (None, None, None)
        );
        assert_eq!(projection.blacklisted_count(), 1);
    }

    #[test]
    fn stored_purchase_decisions_leave_out_repeated_and_invalid_answers() {
        let at = from_ms(T0).unwrap();
        let decision = PurchaseDecided {
            envelope: envelope::<PurchaseDecided>(T0),
            request_id: "p1".into(),
            user_id: "bob".into(),
            coupon_code: code(1),
            order_id: "o-1".into(),
            outcome: PurchaseOutcome::NotHolder as i32,
            ..Default::default()
        };
        let row = purchase_decision_row(&decision, at).unwrap().unwrap();
        assert_eq!(
            (row.outcome, row.order_id.as_str()),
            (
                coupon_domain::PurchaseOutcome::Rejected(
                    coupon_domain::purchase::PurchaseRejection::NotHolder
                ),
                "o-1"
            )
        );
        let repeated = PurchaseDecided {
            repeated: true,
            ..decision.clone()
        };
        assert_eq!(purchase_decision_row(&repeated, at), Ok(None));
        let invalid = PurchaseDecided {
            outcome: PurchaseOutcome::Invalid as i32,
            ..decision
        };
        assert_eq!(purchase_decision_row(&invalid, at), Ok(None));
    }
}
