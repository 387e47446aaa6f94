//! The claim processor: `coupons.claims` → a decision on `coupons.claim-results`.
//!
//! Claims are keyed by user id, so all of one user's requests land on one
//! partition and are decided in order by one processor. Correctness does not
//! rest on that, though: the quota is the primary key of `quota_grants`
//! (one row per user per window) and a coupon is taken with
//! `FOR UPDATE SKIP LOCKED` plus a conditional update, so two processors
//! (e.g. during a rebalance) can never grant one coupon twice or one user
//! twice in a window.
//!
//! A batch is decided in three steps. The rules run on one read of every
//! user's state (one statement for the batch). The claims that pass draw
//! their coupons in one statement per pool, the oldest coupons going to the
//! earliest claims. A user's second request in the same batch is decided
//! last, on a fresh read of that user (rare: clients retry with the same
//! request id, which is answered from the stored decision). Decisions are
//! published in arrival order.
//!
//! Delivery guarantee: at least once, effect exactly once. A batch is decided
//! in one transaction that also stores each decision under its request id;
//! after the commit the decisions are published and only then are offsets
//! stored. A redelivered request finds its stored decision and publishes it
//! again unchanged (same event id), so a crash between commit and publish
//! loses no decision and a redelivery creates no second one.

mod store;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use coupon_domain::claim::{
    allocation_groups, precheck, ClaimOutcome, ClaimPrecheck, PoolKnowledge, UserClaimState,
};
use coupon_domain::{Category, RequestId, UserId};
use coupon_platform::kafka::consumer::RetryableError;
use coupon_platform::kafka::{decode, Record};
use coupon_platform::redis::CachedHold;
use coupon_platform::time::to_ms;
use coupon_schemas::{ClaimDecided, ClaimOutcome as WireOutcome, ClaimRequested};

use crate::{dead_letter_all, retryable, Context, Decided, PollSettings};

pub use store::StoredDecision;

pub const ROLE: &str = "claims";

/// A claim request that passed validation.
#[derive(Debug, Clone)]
pub struct Claim {
    pub request_id: String,
    pub user_id: UserId,
    pub category: Option<Category>,
    pub correlation_id: String,
}

/// Why a decodable request is refused; the requester still gets a decision.
pub fn validate(request: &ClaimRequested) -> Result<Claim, String> {
    // Ids end up in Postgres text columns, which refuse NUL: a NUL let
    // through here fails the batch forever instead of refusing one record.
    let request_id = RequestId::parse(request.request_id.clone()).map_err(|e| e.to_string())?;
    let user_id = UserId::parse(request.user_id.clone()).map_err(|e| e.to_string())?;
    let category = match request.category.as_str() {
        "" => None,
        raw => Some(Category::parse(raw).map_err(|e| e.to_string())?),
    };
    Ok(Claim {
        request_id: request_id.into_string(),
        user_id,
        category,
        correlation_id: request
            .envelope
            .as_ref()
            .map(|e| e.correlation_id.clone())
            .unwrap_or_default(),
    })
}

/// What the batch transaction knows while it decides its claims.
struct BatchView {
    /// Decisions stored before this batch, and those made in it so far.
    decided: HashMap<String, StoredDecision>,
    /// Each user's state as read at the start of the batch.
    states: HashMap<String, UserClaimState>,
    /// Users with a claim decided (or waiting for a coupon) in this batch:
    /// their state above is stale, so a second request of theirs is decided
    /// after the batch's grants, on a fresh read.
    touched: HashSet<String>,
    pool: PoolKnowledge,
}

impl BatchView {
    fn record(
        &mut self,
        claim: &Claim,
        outcome: ClaimOutcome,
        now: DateTime<Utc>,
    ) -> (StoredDecision, bool) {
        let decision = StoredDecision::new(claim, outcome, now);
        self.decided
            .insert(claim.request_id.clone(), decision.clone());
        (decision, true)
    }
}

/// Where a claim stands after the rules ran on the batch's first read.
enum Step<'a> {
    /// `true` with a decision made now, `false` with one stored earlier (a
    /// redelivery or a retry).
    Decided(StoredDecision, bool),
    /// Passed the rules; waits for a coupon from the batch's grant.
    Waiting(store::Candidate<'a>),
    /// The user already has a claim in this batch: decided after the grants.
    Deferred,
}

/// Sorts `claim` with what the batch read up front. No I/O.
fn classify<'a>(
    ctx: &Context,
    claim: &'a Claim,
    now: DateTime<Utc>,
    view: &mut BatchView,
) -> Step<'a> {
    if let Some(stored) = view.decided.get(&claim.request_id) {
        return Step::Decided(stored.clone(), false);
    }
    let user = claim.user_id.as_str();
    if !view.touched.insert(user.to_owned()) {
        return Step::Deferred;
    }
    let state = view.states.get(user).cloned().unwrap_or_default();
    match apply_rules(ctx, claim, &state, now, &view.pool) {
        Ok(outcome) => {
            let (decision, is_new) = view.record(claim, outcome, now);
            Step::Decided(decision, is_new)
        }
        Err(candidate) => Step::Waiting(candidate),
    }
}

/// The claim rules on the user's `state`: a decision, or a candidate for a
/// coupon.
fn apply_rules<'a>(
    ctx: &Context,
    claim: &'a Claim,
    state: &UserClaimState,
    now: DateTime<Utc>,
    pool: &PoolKnowledge,
) -> Result<ClaimOutcome, store::Candidate<'a>> {
    match precheck(state, now, ctx.policy.quota_window, ctx.policy.hold_ttl) {
        ClaimPrecheck::Decided(outcome) => Ok(outcome),
        // The flash-sale shortcut: once this batch found the pool empty,
        // further claims are sold out without touching the database.
        ClaimPrecheck::Allocate { .. } if pool.known_empty(category_of(claim)) => {
            Ok(ClaimOutcome::SoldOut)
        }
        ClaimPrecheck::Allocate {
            window_start,
            hold_until,
        } => Err(store::Candidate {
            claim,
            window_start,
            hold_until,
        }),
    }
}

fn category_of(claim: &Claim) -> Option<&str> {
    claim.category.as_ref().map(|c| c.as_str())
}

/// Grants coupons from one pool to its waiting claims in one statement;
/// those left without one are sold out.
async fn grant_group(
    tx: &mut sqlx::PgConnection,
    view: &mut BatchView,
    category: Option<&str>,
    waiting: Vec<(usize, store::Candidate<'_>)>,
    now: DateTime<Utc>,
) -> Result<Vec<(usize, StoredDecision)>, sqlx::Error> {
    let granted: HashMap<String, store::Granted> = if view.pool.known_empty(category) {
        HashMap::new()
    } else {
        let candidates: Vec<store::Candidate<'_>> =
            waiting.iter().map(|(_, c)| c.clone()).collect();
        store::grant(tx, category, &candidates, now)
            .await?
            .into_iter()
            .map(|g| (g.request_id.clone(), g))
            .collect()
    };
    if granted.len() < waiting.len() {
        view.pool.record_empty(category);
    }
    Ok(waiting
        .into_iter()
        .map(|(index, candidate)| {
            let outcome = match granted.get(&candidate.claim.request_id) {
                Some(g) => ClaimOutcome::Granted {
                    code: g.code.clone(),
                    category: g.category.clone(),
                    expires_at: g.held_until,
                    repeated: false,
                },
                // Sold out does not use the quota.
                None => ClaimOutcome::SoldOut,
            };
            (index, view.record(candidate.claim, outcome, now).0)
        })
        .collect())
}

/// Decides a user's second (or later) claim of the batch, after the grants,
/// on a fresh read of the user's state.
async fn decide_deferred(
    tx: &mut sqlx::PgConnection,
    ctx: &Context,
    claim: &Claim,
    now: DateTime<Utc>,
    view: &mut BatchView,
) -> Result<(StoredDecision, bool), sqlx::Error> {
    if let Some(stored) = view.decided.get(&claim.request_id) {
        return Ok((stored.clone(), false));
    }
    let window = ctx.policy.quota_window;
    let user = claim.user_id.as_str();
    let state = store::user_states(&mut *tx, &[user], window.start_of(now), now)
        .await?
        .remove(user)
        .unwrap_or_default();
    match apply_rules(ctx, claim, &state, now, &view.pool) {
        Ok(outcome) => Ok(view.record(claim, outcome, now)),
        Err(candidate) => {
            let category = category_of(claim);
            let decided = grant_group(tx, view, category, vec![(0, candidate)], now).await?;
            let decision = decided
                .into_iter()
                .next()
                .map(|(_, decision)| decision)
                .unwrap_or_else(|| view.record(claim, ClaimOutcome::SoldOut, now).0);
            Ok((decision, true))
        }
    }
}

pub async fn handle_batch(ctx: &Context, batch: &[Record]) -> Result<(), RetryableError> {
    let now = Utc::now();
    let mut decisions: Vec<(String, ClaimDecided)> = Vec::with_capacity(batch.len());
    let mut refused = Vec::new();
    let mut claims = Vec::with_capacity(batch.len());
    // Logged once the decisions are published, so a retried batch does not
    // log decisions that were rolled back.
    let mut decided: Vec<Decided> = Vec::with_capacity(batch.len());
    for record in batch {
        let request = match decode::<ClaimRequested>(record) {
            Ok(request) => request,
            Err(error) => {
                refused.push((record, error.to_string()));
                continue;
            }
        };
        match validate(&request) {
            Ok(claim) => claims.push(claim),
            Err(reason) => {
                if let Some(decision) = invalid_decision(ctx, &request, &reason) {
                    decided.push(Decided {
                        request_id: crate::log_request_id(
                            request
                                .envelope
                                .as_ref()
                                .map_or("", |e| e.correlation_id.as_str()),
                            &request.request_id,
                        )
                        .to_owned(),
                        user_id: decision.0.clone(),
                        outcome: "invalid".into(),
                        coupon_code: None,
                        redelivered: false,
                        reason: Some(reason.clone()),
                    });
                    decisions.push(decision);
                }
                refused.push((record, reason));
            }
        }
    }

    let mut fresh = Vec::new();
    if !claims.is_empty() {
        let mut tx = ctx.pool.begin().await.map_err(retryable)?;
        let request_ids: Vec<&str> = claims.iter().map(|c| c.request_id.as_str()).collect();
        let user_ids: Vec<&str> = claims.iter().map(|c| c.user_id.as_str()).collect();
        let window_start = ctx.policy.quota_window.start_of(now);
        let mut view = BatchView {
            decided: store::find_decisions(&mut tx, &request_ids)
                .await
                .map_err(retryable)?,
            states: store::user_states(&mut tx, &user_ids, window_start, now)
                .await
                .map_err(retryable)?,
            touched: HashSet::new(),
            pool: PoolKnowledge::default(),
        };
        let mut decided_claims: Vec<Option<(StoredDecision, bool)>> = vec![None; claims.len()];
        let mut waiting = Vec::new();
        let mut deferred = Vec::new();
        for (index, claim) in claims.iter().enumerate() {
            match classify(ctx, claim, now, &mut view) {
                Step::Decided(decision, is_new) => decided_claims[index] = Some((decision, is_new)),
                Step::Waiting(candidate) => {
                    waiting.push((category_of(claim).map(str::to_owned), (index, candidate)))
                }
                Step::Deferred => deferred.push(index),
            }
        }
        for (category, group) in allocation_groups(waiting) {
            for (index, decision) in
                grant_group(&mut tx, &mut view, category.as_deref(), group, now)
                    .await
                    .map_err(retryable)?
            {
                decided_claims[index] = Some((decision, true));
            }
        }
        for index in deferred {
            decided_claims[index] = Some(
                decide_deferred(&mut tx, ctx, &claims[index], now, &mut view)
                    .await
                    .map_err(retryable)?,
            );
        }
        for (claim, outcome) in claims.iter().zip(decided_claims) {
            let Some((decision, is_new)) = outcome else {
                return Err(RetryableError::new(format!(
                    "claim {} was left undecided; retrying the batch",
                    claim.request_id
                )));
            };
            decided.push(Decided {
                request_id: crate::log_request_id(&claim.correlation_id, &claim.request_id)
                    .to_owned(),
                user_id: decision.user_id.clone(),
                outcome: decision.outcome.clone(),
                coupon_code: decision.coupon_code.clone(),
                redelivered: !is_new,
                reason: None,
            });
            decisions.push((
                decision.user_id.clone(),
                decision.to_event(ctx.publisher.name(), &claim.correlation_id),
            ));
            if is_new {
                fresh.push(decision);
            }
        }
        let inserted = store::insert_decisions(&mut tx, &fresh)
            .await
            .map_err(retryable)?;
        if inserted != fresh.len() as u64 {
            // Another processor decided some of these requests meanwhile (a
            // rebalance): its decisions stand, ours roll back with the batch.
            return Err(RetryableError::new(format!(
                "{} of {} claims were decided concurrently; retrying the batch",
                fresh.len() as u64 - inserted,
                fresh.len()
            )));
        }
        tx.commit().await.map_err(retryable)?;
    }

    // Counted after the commit, so a retried batch is not counted twice.
    let mut new_holds = Vec::new();
    for decision in &fresh {
        metrics::counter!("coupon_claim_decisions_total", "outcome" => decision.outcome.clone())
            .increment(1);
        if decision.outcome == "granted" && !decision.repeated {
            if let (Some(code), Some(category), Some(expires_at)) = (
                &decision.coupon_code,
                &decision.category,
                decision.expires_at,
            ) {
                new_holds.push(CachedHold {
                    code: code.clone(),
                    user_id: decision.user_id.clone(),
                    category: category.clone(),
                    expires_at,
                });
            }
        }
    }
    // Redis mirrors the holds; it is a cache, so a failure here only costs speed.
    if let Err(error) = ctx.cache.put_holds(&new_holds).await {
        tracing::warn!(%error, holds = new_holds.len(), "could not mirror holds to Redis");
    }
    let topic = ctx.topics.claim_results();
    ctx.publisher
        .send_all(&topic, &decisions)
        .await
        .map_err(retryable)?;
    for d in &decided {
        d.log("claim");
    }
    dead_letter_all(&ctx.dead_letters(ROLE), &refused).await
}

/// A request we can answer although it is invalid: it has a usable request id.
fn invalid_decision(
    ctx: &Context,
    request: &ClaimRequested,
    reason: &str,
) -> Option<(String, ClaimDecided)> {
    RequestId::parse(request.request_id.as_str()).ok()?;
    let key = crate::echoed_user_id(&request.user_id);
    let envelope = coupon_schemas::new_envelope::<ClaimDecided>(
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("invalid-claim:{}", request.request_id).as_bytes(),
        )
        .to_string(),
        coupon_platform::time::now_ms(),
        ctx.publisher.name(),
        request
            .envelope
            .as_ref()
            .map(|e| e.correlation_id.as_str())
            .unwrap_or(""),
    );
    Some((
        key.clone(),
        ClaimDecided {
            envelope: Some(envelope),
            request_id: request.request_id.clone(),
            user_id: key,
            outcome: WireOutcome::Invalid as i32,
            reason: reason.to_owned(),
            ..Default::default()
        },
    ))
}

impl StoredDecision {
    fn new(claim: &Claim, outcome: ClaimOutcome, now: DateTime<Utc>) -> Self {
        let mut decision = StoredDecision {
            request_id: claim.request_id.clone(),
            event_id: uuid::Uuid::new_v4(),
            user_id: claim.user_id.as_str().to_owned(),
            outcome: outcome.kind().to_owned(),
            coupon_code: None,
            category: None,
            expires_at: None,
            repeated: false,
            retry_at: None,
            blacklisted_until: None,
            decided_at: now,
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

    /// The event for this decision; a stored decision always yields the same
    /// event id, so consumers can deduplicate republished decisions.
    pub fn to_event(&self, producer: &str, correlation_id: &str) -> ClaimDecided {
        let outcome = match self.outcome.as_str() {
            "granted" => WireOutcome::Granted,
            "rate_limited" => WireOutcome::RateLimited,
            "blacklisted" => WireOutcome::Blacklisted,
            "sold_out" => WireOutcome::SoldOut,
            _ => WireOutcome::Unspecified,
        };
        ClaimDecided {
            envelope: Some(coupon_schemas::new_envelope::<ClaimDecided>(
                self.event_id.to_string(),
                to_ms(self.decided_at),
                producer,
                correlation_id,
            )),
            request_id: self.request_id.clone(),
            user_id: self.user_id.clone(),
            outcome: outcome as i32,
            coupon_code: self.coupon_code.clone().unwrap_or_default(),
            category: self.category.clone().unwrap_or_default(),
            expires_at_ms: self.expires_at.map(to_ms).unwrap_or(0),
            repeated: self.repeated,
            retry_at_ms: self.retry_at.map(to_ms).unwrap_or(0),
            blacklisted_until_ms: self.blacklisted_until.map(to_ms).unwrap_or(0),
            reason: String::new(),
        }
    }
}

pub async fn run(
    ctx: Context,
    poll: PollSettings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), rdkafka::error::KafkaError> {
    let topics = crate::role_topics(ROLE, &ctx.topics);
    crate::run_role(
        &ctx,
        ROLE,
        topics,
        poll,
        |batch| {
            let ctx = ctx.clone();
            async move { handle_batch(&ctx, &batch).await }
        },
        shutdown,
    )
    .await
}
