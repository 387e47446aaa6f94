//! The claim rules over one batch, without I/O: the batch's stored state is
//! read up front (into a [`BatchView`], by the store), each claim is sorted
//! here ([`classify`]) into a decision, a wait for a coupon, a deferral or a
//! refusal, and the store then carries out the grants. Everything in this
//! file is plain Rust, so it is unit- and property-tested below without
//! Postgres or Kafka.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use coupon_domain::claim::{
    precheck, ActiveHold, Allocation, ClaimOutcome, ClaimPrecheck, PoolKnowledge, UserClaimState,
};

use super::Claim;
use crate::Policy;
use coupon_domain::profile::ineligible_batches;
use coupon_domain::{Category, Eligibility, Profile, RequestId, UserId};
use coupon_platform::store::claims::{ClaimDecisionRecord, Released};

/// A claim that passed the rules and waits for a coupon.
#[derive(Clone)]
pub struct Candidate<'a> {
    pub claim: &'a Claim,
    pub window_start: DateTime<Utc>,
    pub hold_until: DateTime<Utc>,
    /// The user's overdue hold, which the grant releases first.
    pub releases: Option<ActiveHold>,
}

impl Candidate<'_> {
    /// What the store needs to draw this claim's coupon.
    pub fn allocation(&self) -> Allocation {
        Allocation {
            user_id: self.claim.user_id.clone(),
            request_id: self.claim.request_id.clone(),
            window_start: self.window_start,
            hold_until: self.hold_until,
            at: self.claim.at,
        }
    }
}

/// What the batch transaction knows while it decides its claims.
pub(super) struct BatchView {
    /// Decisions stored before this batch, and those made in it so far.
    pub(super) decided: HashMap<RequestId, ClaimDecisionRecord>,
    /// The user each request id belongs to: the one of its stored decision,
    /// or of the first claim in this batch that used it.
    pub(super) owners: HashMap<RequestId, UserId>,
    /// Each user's state as read at the start of the batch.
    pub(super) states: HashMap<UserId, UserClaimState>,
    /// Users with a claim decided (or waiting for a coupon) in this batch:
    /// their state above is stale, so a second request of theirs is decided
    /// after the batch's grants, on a fresh read.
    pub(super) touched: HashSet<UserId>,
    pub(super) pool: PoolKnowledge,
    /// Overdue holds released by this batch's grants.
    pub(super) released: Vec<Released>,
    /// The campaigns with eligibility rules that still have coupons, and
    /// the profiles of the batch's users (read only when there are such
    /// campaigns).
    pub(super) restricted: Vec<(uuid::Uuid, Eligibility)>,
    pub(super) profiles: HashMap<UserId, Profile>,
}

impl BatchView {
    /// The view of a batch from the decisions stored for its request ids and
    /// its users' states, as the store read them.
    pub(super) fn new(
        stored: HashMap<RequestId, ClaimDecisionRecord>,
        states: HashMap<UserId, UserClaimState>,
    ) -> Self {
        let owners = stored
            .iter()
            .map(|(id, d)| (id.clone(), d.user_id.clone()))
            .collect();
        Self {
            decided: stored,
            owners,
            states,
            touched: HashSet::new(),
            pool: PoolKnowledge::default(),
            released: Vec::new(),
            restricted: Vec::new(),
            profiles: HashMap::new(),
        }
    }

    /// The restricted campaigns `claim`'s user may not have at the claim's
    /// day (in the quota's zone): what its grant leaves out. Empty: the
    /// whole pool, and so a grant that finds nothing proves the pool empty
    /// for everyone (`coupon_domain::sold_out`).
    pub(super) fn excluded(&self, policy: &Policy, claim: &Claim) -> Vec<uuid::Uuid> {
        if self.restricted.is_empty() {
            return Vec::new();
        }
        ineligible_batches(
            &self.restricted,
            self.profiles.get(&claim.user_id),
            policy.quota_window.local_date(claim.at),
        )
    }

    pub(super) fn record(
        &mut self,
        claim: &Claim,
        outcome: ClaimOutcome,
    ) -> (ClaimDecisionRecord, bool) {
        let decision = decision_of(claim, outcome);
        self.decided
            .insert(claim.request_id.clone(), decision.clone());
        (decision, true)
    }
}

/// Where a claim stands after the rules ran on the batch's first read.
pub(super) enum Step<'a> {
    /// `true` with a decision made now, `false` with one stored earlier (a
    /// redelivery or a retry).
    Decided(ClaimDecisionRecord, bool),
    /// Passed the rules; waits for a coupon from the batch's grant.
    Waiting(Candidate<'a>),
    /// The user already has a claim in this batch: decided after the grants.
    Deferred,
    /// The request id belongs to another user's claim.
    IdTaken,
}

/// The users whose state the batch must read before [`classify`]: those
/// with a claim no gateway answered yet. A claim answered sold out is
/// decided without its user's state; in a flash sale that is nearly every
/// claim, and their three look-ups each would be most of what such a batch
/// costs Postgres.
pub(super) fn users_to_read(claims: &[Claim]) -> Vec<&UserId> {
    claims
        .iter()
        .filter(|c| !c.answered_sold_out)
        .map(|c| &c.user_id)
        .collect()
}

/// How far back the batch's stored decisions are looked up
/// (`claim_decisions` is partitioned by day of `decided_at`; a lookup bounded
/// in time probes only the days it covers). A stored decision is never
/// older than its record's own time or than the moment it was first
/// judged, so a redelivered record is always recognised, however late; a
/// client's retry under a used request id (a new record) is recognised
/// when it comes within `horizon` (`REQUEST_ID_HORIZON`) of the first. The
/// bound is floored to its UTC day: every decision in the day partitions
/// the batch's new decisions go to is looked up, so the per-day unique
/// index on `request_id` never refuses a decision the lookup missed.
pub(super) fn decisions_since(claims: &[Claim], horizon: std::time::Duration) -> DateTime<Utc> {
    let horizon = coupon_domain::clock::span(horizon);
    claims
        .iter()
        .map(|c| {
            let received = DateTime::<Utc>::from_timestamp_millis(c.received_ms).unwrap_or(c.at);
            received.min(c.at)
        })
        .min()
        .and_then(|earliest| earliest.checked_sub_signed(horizon))
        .and_then(|since| since.date_naive().and_hms_opt(0, 0, 0))
        // (Never before 1970: Postgres cannot take chrono's earliest time.)
        .map_or(DateTime::<Utc>::UNIX_EPOCH, |midnight| midnight.and_utc())
}

/// The earliest quota window the batch's claims are judged in: an older
/// grant never counts ([`coupon_domain::claim::precheck`] compares the last
/// grant's window with the claim's), so the users' quota is read from there
/// on (`quota_grants` is partitioned by day of `window_start`).
pub(super) fn windows_since(claims: &[Claim], window: coupon_domain::QuotaWindow) -> DateTime<Utc> {
    claims
        .iter()
        .map(|c| window.start_of(c.at))
        .min()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// A user told `sold_out` never ends up holding a coupon from that request:
/// when any copy of a request (one request id, one user) in the batch was
/// answered sold out by a gateway, every copy of it is.
pub(super) fn told_sold_out_wins(claims: &mut [Claim]) {
    let told: HashSet<(RequestId, UserId)> = claims
        .iter()
        .filter(|c| c.answered_sold_out)
        .map(|c| (c.request_id.clone(), c.user_id.clone()))
        .collect();
    if told.is_empty() {
        return;
    }
    for claim in claims {
        if told.contains(&(claim.request_id.clone(), claim.user_id.clone())) {
            claim.answered_sold_out = true;
        }
    }
}

/// Sorts `claim` with what the batch read up front. No I/O.
pub(super) fn classify<'a>(policy: &Policy, claim: &'a Claim, view: &mut BatchView) -> Step<'a> {
    let user = &claim.user_id;
    match view.owners.get(&claim.request_id) {
        Some(owner) if owner != user => return Step::IdTaken,
        // A copy of a request earlier in this batch, not decided yet (it
        // waits for a coupon): this copy gets that copy's decision after the
        // grants. Deciding it now would put two decisions under one request
        // id, which the batch could only roll back, for ever.
        Some(_) if !view.decided.contains_key(&claim.request_id) => return Step::Deferred,
        Some(_) => {}
        None => {
            view.owners.insert(claim.request_id.clone(), user.clone());
        }
    }
    if let Some(stored) = view.decided.get(&claim.request_id) {
        return Step::Decided(stored.clone(), false);
    }
    if claim.answered_sold_out {
        // The user was told sold out: that is the decision, whatever the
        // pool holds now. It changes nothing about the user (sold out uses
        // no quota), so the user's other claims are decided as usual.
        let (decision, is_new) = view.record(claim, ClaimOutcome::SoldOut);
        return Step::Decided(decision, is_new);
    }
    if !view.touched.insert(user.clone()) {
        return Step::Deferred;
    }
    let state = view.states.get(user).cloned().unwrap_or_default();
    match apply_rules(policy, claim, &state, &view.pool) {
        Ok(outcome) => {
            let (decision, is_new) = view.record(claim, outcome);
            Step::Decided(decision, is_new)
        }
        Err(candidate) => Step::Waiting(candidate),
    }
}

/// The claim rules on the user's `state`, at the claim's time: a decision,
/// or a candidate for a coupon.
pub(super) fn apply_rules<'a>(
    policy: &Policy,
    claim: &'a Claim,
    state: &UserClaimState,
    pool: &PoolKnowledge,
) -> Result<ClaimOutcome, Candidate<'a>> {
    match precheck(state, claim.at, policy.quota_window, policy.hold_ttl) {
        ClaimPrecheck::Decided(outcome) => Ok(outcome),
        // The flash-sale shortcut: once this batch found the pool empty,
        // further claims are sold out without touching the database.
        ClaimPrecheck::Allocate { .. } if pool.known_empty(category_of(claim)) => {
            Ok(ClaimOutcome::SoldOut)
        }
        ClaimPrecheck::Allocate {
            window_start,
            hold_until,
            releases,
        } => Err(Candidate {
            claim,
            window_start,
            hold_until,
            releases,
        }),
    }
}

pub(super) fn category_of(claim: &Claim) -> Option<&Category> {
    claim.category.as_ref()
}

/// The decision `outcome` for `claim`, under a new event id.
pub fn decision_of(claim: &Claim, outcome: ClaimOutcome) -> ClaimDecisionRecord {
    let mut decision = ClaimDecisionRecord {
        request_id: claim.request_id.clone(),
        event_id: uuid::Uuid::new_v4(),
        user_id: claim.user_id.clone(),
        outcome: outcome.kind(),
        coupon_code: None,
        category: None,
        expires_at: None,
        repeated: false,
        retry_at: None,
        blacklisted_until: None,
        decided_at: claim.at,
    };
    match outcome {
        ClaimOutcome::Granted {
            code,
            category,
            expires_at,
            repeated,
        } => {
            decision.coupon_code = Some(code);
            decision.category = Some(category);
            decision.expires_at = Some(expires_at);
            decision.repeated = repeated;
        }
        ClaimOutcome::RateLimited { retry_at } => decision.retry_at = Some(retry_at),
        ClaimOutcome::Blacklisted { until } => decision.blacklisted_until = until,
        ClaimOutcome::SoldOut => {}
    }
    decision
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use chrono::Duration;
    use coupon_domain::claim::ClaimOutcomeKind;
    use coupon_domain::{Category, CouponCode, SnowflakeId};
    use proptest::prelude::*;

    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn lookups_reach_back_to_the_earliest_record_and_window_of_the_batch() {
        let mut late = claim("r-1", "u-1");
        // A record an hour old, judged now (it waited past the grace).
        late.received_ms = (now() - Duration::hours(1)).timestamp_millis();
        let mut future = claim("r-2", "u-2");
        // A producer's clock ahead: judged at the database's time.
        future.received_ms = (now() + Duration::hours(5)).timestamp_millis();
        let day = std::time::Duration::from_secs(86_400);
        let midnight = |at: &str| at.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(
            decisions_since(&[future.clone(), late.clone()], day),
            midnight("2026-11-24T00:00:00Z")
        );
        assert_eq!(
            decisions_since(&[future], std::time::Duration::from_secs(3_600)),
            midnight("2026-11-25T00:00:00Z"),
            "the whole of the day a new decision goes to"
        );
        let mut yesterday = claim("r-3", "u-3");
        yesterday.at = now() - Duration::days(1);
        assert_eq!(
            windows_since(&[late, yesterday], coupon_domain::QuotaWindow::DAY),
            "2026-11-24T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
    }

    fn claim(request: &str, user: &str) -> Claim {
        Claim {
            request_id: RequestId::parse(request).unwrap(),
            user_id: UserId::parse(user).unwrap(),
            category: None,
            correlation_id: String::new(),
            at: now(),
            received_ms: 0,
            answered_sold_out: false,
        }
    }

    fn view() -> BatchView {
        BatchView::new(HashMap::new(), HashMap::new())
    }

    fn outcome(step: &Step<'_>) -> Option<(ClaimOutcomeKind, bool)> {
        match step {
            Step::Decided(d, is_new) => Some((d.outcome, *is_new)),
            _ => None,
        }
    }

    /// Eligibility: each claim's grant leaves out the restricted campaigns
    /// its user may not have (on the claim's day); without restricted
    /// campaigns, nothing is left out, so a grant covers the whole pool.
    #[test]
    fn a_claim_leaves_out_the_campaigns_its_user_may_not_have() {
        let policy = Policy::default();
        let mut view = view();
        let (de, adults) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        assert!(view.excluded(&policy, &claim("r0", "ann")).is_empty());
        view.restricted = vec![
            (
                de,
                Eligibility {
                    locations: vec!["DE".into()],
                    min_age: None,
                },
            ),
            (
                adults,
                Eligibility {
                    locations: vec![],
                    min_age: Some(18),
                },
            ),
        ];
        let profile = |dob: &str, location: &str| {
            Profile::parse("", dob, location, now()).expect("a profile")
        };
        view.profiles
            .insert(UserId::parse("ann").unwrap(), profile("1990-01-01", "DE"));
        view.profiles
            .insert(UserId::parse("kid").unwrap(), profile("2015-01-01", "DE"));
        view.profiles
            .insert(UserId::parse("bob").unwrap(), profile("1990-01-01", "US"));
        assert!(view.excluded(&policy, &claim("r1", "ann")).is_empty());
        assert_eq!(view.excluded(&policy, &claim("r2", "kid")), vec![adults]);
        assert_eq!(view.excluded(&policy, &claim("r3", "bob")), vec![de]);
        assert_eq!(
            view.excluded(&policy, &claim("r4", "nobody")),
            vec![de, adults]
        );
    }

    #[test]
    fn a_fresh_user_waits_for_a_coupon_and_a_second_request_is_deferred() {
        let policy = Policy::default();
        let mut view = view();
        let (a, b) = (claim("r1", "u1"), claim("r2", "u1"));
        assert!(matches!(classify(&policy, &a, &mut view), Step::Waiting(_)));
        assert!(matches!(classify(&policy, &b, &mut view), Step::Deferred));
    }

    /// Issue #24, item 3: copies of one request in one batch get one
    /// decision, whichever flag they carry, and a copy a gateway answered
    /// sold out makes them all sold out.
    #[test]
    fn copies_of_one_request_in_a_batch_share_one_decision_and_sold_out_wins() {
        let policy = Policy::default();
        let mut view = view();
        let mut copies = vec![claim("r1", "u1"), claim("r1", "u1")];
        copies[1].answered_sold_out = true;
        told_sold_out_wins(&mut copies);
        assert!(copies.iter().all(|c| c.answered_sold_out));
        let first = classify(&policy, &copies[0], &mut view);
        assert_eq!(outcome(&first), Some((ClaimOutcomeKind::SoldOut, true)));
        let second = classify(&policy, &copies[1], &mut view);
        assert_eq!(outcome(&second), Some((ClaimOutcomeKind::SoldOut, false)));

        // Unflagged copies: the second waits for the first's decision.
        let mut view = super::tests::view();
        let (a, b) = (claim("r2", "u2"), claim("r2", "u2"));
        assert!(matches!(classify(&policy, &a, &mut view), Step::Waiting(_)));
        assert!(matches!(classify(&policy, &b, &mut view), Step::Deferred));
        // Another user's copy of r2 is still refused, not deferred.
        let theft = claim("r2", "u3");
        assert!(matches!(
            classify(&policy, &theft, &mut view),
            Step::IdTaken
        ));
    }

    #[test]
    fn a_request_id_of_another_user_is_refused_and_a_stored_one_repeats() {
        let policy = Policy::default();
        let first = claim("r1", "u1");
        let stored = decision_of(&first, ClaimOutcome::SoldOut);
        let mut view = BatchView::new(
            HashMap::from([(RequestId::parse("r1").unwrap(), stored.clone())]),
            HashMap::new(),
        );
        let theft = claim("r1", "u2");
        assert!(matches!(
            classify(&policy, &theft, &mut view),
            Step::IdTaken
        ));
        match classify(&policy, &first, &mut view) {
            Step::Decided(decision, false) => assert_eq!(decision, stored),
            _ => panic!("a redelivery must get the stored decision"),
        }
    }

    #[test]
    fn blacklisted_users_live_holds_and_answered_sold_out_are_decided_at_once() {
        let policy = Policy::default();
        let until = now() + Duration::hours(1);
        let code = CouponCode::from_id(SnowflakeId::from_raw(1).unwrap());
        let states = HashMap::from([
            (
                UserId::parse("banned").unwrap(),
                UserClaimState {
                    blacklisted: Some(None),
                    ..Default::default()
                },
            ),
            (
                UserId::parse("holder").unwrap(),
                UserClaimState {
                    hold: Some(ActiveHold {
                        code,
                        category: Category::parse("Books").unwrap(),
                        expires_at: until,
                    }),
                    ..Default::default()
                },
            ),
        ]);
        let mut view = BatchView::new(HashMap::new(), states);
        let banned = claim("r1", "banned");
        assert_eq!(
            outcome(&classify(&policy, &banned, &mut view)),
            Some((ClaimOutcomeKind::Blacklisted, true))
        );
        let holder = claim("r2", "holder");
        match classify(&policy, &holder, &mut view) {
            Step::Decided(d, true) => {
                assert_eq!(d.coupon_code, Some(code));
                assert!(d.repeated);
            }
            _ => panic!("a live hold is granted again"),
        }
        let mut told = claim("r3", "fresh");
        told.answered_sold_out = true;
        assert_eq!(
            outcome(&classify(&policy, &told, &mut view)),
            Some((ClaimOutcomeKind::SoldOut, true))
        );
    }

    #[test]
    fn a_claim_answered_sold_out_needs_no_state_and_leaves_its_user_free() {
        let policy = Policy::default();
        let mut told = claim("r1", "u1");
        told.answered_sold_out = true;
        let asks = claim("r2", "u1");
        let alone = {
            let mut c = claim("r3", "u2");
            c.answered_sold_out = true;
            c
        };
        let batch = [told.clone(), asks.clone(), alone];
        // u1 is read for its unanswered claim; u2 is not read at all.
        assert_eq!(users_to_read(&batch), vec![&UserId::parse("u1").unwrap()]);
        // Without any state read, the told claim is still decided sold out,
        // and the user's own claim after it waits for a coupon rather than
        // being deferred as a second request of a touched user.
        let mut view = view();
        assert_eq!(
            outcome(&classify(&policy, &told, &mut view)),
            Some((ClaimOutcomeKind::SoldOut, true))
        );
        assert!(matches!(
            classify(&policy, &asks, &mut view),
            Step::Waiting(_)
        ));
    }

    #[test]
    fn a_pool_known_empty_answers_sold_out_without_waiting() {
        let policy = Policy::default();
        let mut view = view();
        view.pool.record_empty(None);
        assert_eq!(
            outcome(&classify(&policy, &claim("r1", "u1"), &mut view)),
            Some((ClaimOutcomeKind::SoldOut, true))
        );
    }

    proptest! {
        /// Whatever mix of users, reused request ids, blacklists and holds a
        /// batch brings: every decision is for the claim's own user, a request
        /// id gets at most one new decision (or one wait), a user waits for
        /// at most one coupon, and a request id is refused exactly when
        /// another user used it first. (A request id's `answered_sold_out`
        /// is the same on every copy, as a redelivery's is: a retry that
        /// differs in it, within one batch, gets two decisions and is settled
        /// by the batch loop's isolation instead.)
        #[test]
        fn classify_keeps_the_batch_invariants(
            claims in proptest::collection::vec((0..4u8, 0..6u8), 0..40),
            banned in proptest::collection::vec(any::<bool>(), 4),
            told_sold_out in proptest::collection::vec(any::<bool>(), 6),
        ) {
            let policy = Policy::default();
            let states: HashMap<UserId, UserClaimState> = banned
                .iter()
                .enumerate()
                .filter(|(_, b)| **b)
                .map(|(u, _)| (UserId::parse(format!("u{u}")).unwrap(), UserClaimState {
                    blacklisted: Some(None),
                    ..Default::default()
                }))
                .collect();
            let claims: Vec<Claim> = claims
                .iter()
                .map(|(u, r)| {
                    let mut c = claim(&format!("r{r}"), &format!("u{u}"));
                    c.answered_sold_out = told_sold_out[usize::from(*r)];
                    c
                })
                .collect();
            let mut view = BatchView::new(HashMap::new(), states);
            let mut first_user: HashMap<String, String> = HashMap::new();
            let mut new_per_request: HashMap<String, u32> = HashMap::new();
            let mut waits_per_user: HashMap<String, u32> = HashMap::new();
            for c in &claims {
                let user = c.user_id.as_str().to_owned();
                let owner = first_user.entry(c.request_id.to_string()).or_insert(user.clone()).clone();
                let step = classify(&policy, c, &mut view);
                prop_assert_eq!(matches!(step, Step::IdTaken), owner != user);
                match step {
                    Step::Decided(d, is_new) => {
                        prop_assert_eq!(d.user_id.as_str(), user.as_str());
                        if is_new {
                            *new_per_request.entry(c.request_id.to_string()).or_default() += 1;
                        }
                        if banned[usize::from(c.user_id.as_str()[1..].parse::<u8>().unwrap())]
                            && !c.answered_sold_out && is_new {
                            prop_assert_eq!(d.outcome, ClaimOutcomeKind::Blacklisted);
                        }
                    }
                    Step::Waiting(candidate) => {
                        prop_assert_eq!(candidate.claim.user_id.as_str(), user.as_str());
                        *new_per_request.entry(c.request_id.to_string()).or_default() += 1;
                        *waits_per_user.entry(user).or_default() += 1;
                    }
                    Step::Deferred | Step::IdTaken => {}
                }
            }
            prop_assert!(new_per_request.values().all(|n| *n <= 1), "{:?}", new_per_request);
            prop_assert!(waits_per_user.values().all(|n| *n <= 1), "{:?}", waits_per_user);
        }
    }
}
