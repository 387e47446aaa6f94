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
//! Each claim is judged at its own time, the broker's timestamp bounded by
//! the database's clock (`coupon_domain::clock`): its quota window, its
//! hold's deadline and whether the user's current hold is still live. A
//! user's hold whose deadline has passed but that the expiry has not
//! released yet (it is down, behind, or waiting out its grace) is released
//! by the user's next grant, in the same transaction: an overdue hold never
//! blocks a claim.
//!
//! A request id is one user's. A claim that reuses the id of another user's
//! claim (stored, or earlier in the same batch) is answered `invalid`,
//! addressed to its own user, without touching the store: never with the
//! other user's decision or coupon, and never with two decisions under one
//! id in a batch (which could only be rolled back and retried forever).
//!
//! Delivery guarantee: at least once, effect exactly once. A batch is decided
//! in one transaction that also stores each decision under its request id;
//! after the commit the decisions are published and only then are offsets
//! stored. A redelivered request finds its stored decision and publishes it
//! again unchanged (same event id), so a crash between commit and publish
//! loses no decision and a redelivery creates no second one. Answers that
//! are not stored (invalid requests) take their event id from the request
//! and their time from the record, so a redelivery repeats them exactly.

mod decide;

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use coupon_domain::claim::{
    allocation_groups, Allocation, ClaimOutcome, ClaimOutcomeKind, PoolKnowledge,
};
use coupon_domain::clock::judged_at;
use coupon_domain::{Category, RequestId, UserId};
use coupon_platform::kafka::consumer::{stable_time_ms, BatchError};
use coupon_platform::kafka::{decode, Record};
use coupon_platform::redis::{CachedHold, EndedHold};
use coupon_platform::time::to_ms;
use coupon_schemas::{ClaimDecided, ClaimOutcome as WireOutcome, ClaimRequested};

use coupon_domain::lifecycle::release_event_id;
use coupon_platform::kafka::role::{dead_letter_all, Decoded};
use coupon_platform::store::history::{HistoryRow, HoldRelease, ReleasedBy};

use crate::{Context, Decided, Role};

use coupon_platform::store::claims as store;
pub use store::{insert_decisions, StoredDecision};

use decide::{apply_rules, category_of, classify, users_to_read, BatchView, Candidate, Step};

pub const ROLE: Role = Role::Claims;

/// A claim request that passed validation.
#[derive(Debug, Clone)]
pub struct Claim {
    pub request_id: RequestId,
    pub user_id: UserId,
    pub category: Option<Category>,
    pub correlation_id: String,
    /// The time the claim is judged at (`coupon_domain::clock`).
    pub at: DateTime<Utc>,
    /// The record's own time, the same on every delivery: the time of an
    /// answer that is not stored.
    pub received_ms: i64,
    /// A gateway already answered this claim `sold_out` (its fast path):
    /// it is decided `sold_out` and never allocated a coupon.
    pub answered_sold_out: bool,
}

/// Why a decodable request is refused; the requester still gets a decision.
/// `record` is the request's record: it gives the claim its times.
pub fn validate(
    request: &ClaimRequested,
    record: &Record,
    db_now: DateTime<Utc>,
    grace: std::time::Duration,
) -> Result<Claim, String> {
    // Ids end up in Postgres text columns, which refuse NUL: a NUL let
    // through here fails the batch forever instead of refusing one record.
    let request_id = RequestId::parse(request.request_id.clone()).map_err(|e| e.to_string())?;
    let user_id = UserId::parse(request.user_id.clone()).map_err(|e| e.to_string())?;
    let category = match request.category.as_str() {
        "" => None,
        raw => Some(Category::parse(raw).map_err(|e| e.to_string())?),
    };
    let envelope = request.envelope.as_ref();
    Ok(Claim {
        request_id,
        user_id,
        category,
        correlation_id: envelope
            .map(|e| e.correlation_id.clone())
            .unwrap_or_default(),
        at: judged_at(record.timestamp_ms, db_now, grace),
        received_ms: stable_time_ms(record, envelope.map(|e| e.occurred_at_ms)),
        answered_sold_out: request.answered_sold_out,
    })
}

/// Why deciding a batch failed.
#[derive(Debug, thiserror::Error)]
enum ClaimsError {
    #[error("postgres")]
    Db(#[from] sqlx::Error),
    /// Another processor stored decisions for some of these requests
    /// meanwhile (a rebalance). Its decisions stand and ours roll back; the
    /// next attempt reads them. Reported as permanent so that the batch
    /// loop isolates the records should it ever recur, rather than retry
    /// one batch forever.
    #[error("{conflicting} of {of} claims were decided concurrently by another processor")]
    Concurrent { conflicting: u64, of: usize },
    #[error("claim {0} was left undecided")]
    Undecided(String),
    /// An allocation came up short while the pool still has available
    /// coupons: `SKIP LOCKED` passed over rows another transaction holds (a
    /// purchase, a second processor). Not an empty pool: the batch is tried
    /// again once those locks are gone, instead of storing `sold_out`.
    #[error("available coupons of pool {0:?} were locked by another transaction")]
    Contended(Option<String>),
}

impl From<ClaimsError> for BatchError {
    fn from(error: ClaimsError) -> Self {
        match error {
            ClaimsError::Db(error) => error.into(),
            ClaimsError::Contended(_) => BatchError::transient(error),
            other => BatchError::permanent(other),
        }
    }
}

/// Grants coupons from one pool to its waiting claims in one statement
/// (after releasing their overdue holds); those left without one are sold
/// out.
async fn grant_group(
    tx: &mut sqlx::PgConnection,
    view: &mut BatchView,
    category: Option<&str>,
    waiting: Vec<(usize, Candidate<'_>)>,
) -> Result<Vec<(usize, StoredDecision)>, ClaimsError> {
    let granted: HashMap<RequestId, store::Granted> = if view.pool.known_empty(category) {
        HashMap::new()
    } else {
        let releasing: Vec<Allocation> = waiting
            .iter()
            .map(|(_, c)| c)
            .filter(|c| c.releases.is_some())
            .map(Candidate::allocation)
            .collect();
        let released = store::release_overdue(tx, &releasing).await?;
        if !released.is_empty() {
            let at: HashMap<&UserId, DateTime<Utc>> =
                releasing.iter().map(|c| (&c.user_id, c.at)).collect();
            let rows: Vec<HistoryRow> = released
                .iter()
                .map(|r| release_history(r, at.get(&r.user_id).copied()))
                .collect();
            coupon_platform::store::history::append(&mut *tx, &rows).await?;
            view.released.extend(released);
        }
        let claims: Vec<Allocation> = waiting.iter().map(|(_, c)| c.allocation()).collect();
        store::grant(tx, category, &claims)
            .await?
            .into_iter()
            .map(|g| (g.request_id.clone(), g))
            .collect()
    };
    if granted.len() < waiting.len() {
        // A skipped lock is not an empty pool: only a pool without
        // available rows is recorded (and marked) sold out.
        let pool = waiting.first().and_then(|(_, c)| c.claim.category.as_ref());
        if !view.pool.known_empty(category)
            && coupon_platform::store::coupons::any_available(&mut *tx, pool).await?
        {
            return Err(ClaimsError::Contended(category.map(str::to_owned)));
        }
        view.pool.record_empty(category);
    }
    Ok(waiting
        .into_iter()
        .map(|(index, candidate)| {
            let outcome = match granted.get(&candidate.claim.request_id) {
                Some(g) => ClaimOutcome::Granted {
                    code: g.code,
                    category: g.category.clone(),
                    expires_at: g.held_until,
                    repeated: false,
                },
                // Sold out does not use the quota.
                None => ClaimOutcome::SoldOut,
            };
            (index, view.record(candidate.claim, outcome).0)
        })
        .collect())
}

/// The history row of an overdue hold released by a grant. Its event id is
/// the one the expiry would have used for the same hold, so the hold has one
/// release in the history whichever path ended it.
fn release_history(released: &store::Released, at: Option<DateTime<Utc>>) -> HistoryRow {
    let code = released.code.to_string();
    HistoryRow::released(
        at.unwrap_or(released.held_until),
        release_event_id(&released.hold_id, &code),
        HoldRelease {
            code,
            user: Some(released.user_id.to_string()),
            hold_id: &released.hold_id,
            held_until: Some(released.held_until),
            by: ReleasedBy::NextGrant,
        },
    )
}

/// Decides a user's second (or later) claim of the batch, after the grants,
/// on a fresh read of the user's state.
async fn decide_deferred(
    tx: &mut sqlx::PgConnection,
    ctx: &Context,
    claim: &Claim,
    view: &mut BatchView,
) -> Result<(StoredDecision, bool), ClaimsError> {
    if let Some(stored) = view.decided.get(&claim.request_id) {
        return Ok((stored.clone(), false));
    }
    let state = store::user_states(&mut *tx, &[&claim.user_id])
        .await?
        .remove(&claim.user_id)
        .unwrap_or_default();
    match apply_rules(&ctx.policy, claim, &state, &view.pool) {
        Ok(outcome) => Ok(view.record(claim, outcome)),
        Err(candidate) => {
            let category = category_of(claim);
            let decided = grant_group(tx, view, category, vec![(0, candidate)]).await?;
            let decision = decided
                .into_iter()
                .next()
                .map(|(_, decision)| decision)
                .unwrap_or_else(|| view.record(claim, ClaimOutcome::SoldOut).0);
            Ok((decision, true))
        }
    }
}

/// What one valid claim of a batch gets.
enum Answer {
    Decision(StoredDecision, bool),
    IdTaken,
}

pub async fn handle_events(
    ctx: &Context,
    batch: &[Decoded<ClaimRequested>],
) -> Result<(), BatchError> {
    let mut decisions: Vec<(String, ClaimDecided)> = Vec::with_capacity(batch.len());
    let mut refused = Vec::new();
    let mut claims = Vec::with_capacity(batch.len());
    // Logged once the decisions are published, so a retried batch does not
    // log decisions that were rolled back.
    let mut decided: Vec<Decided> = Vec::with_capacity(batch.len());
    let mut tx = ctx.pool.begin().await?;
    let db_now = crate::db_now(&mut tx).await?;
    for (record, request) in batch {
        match validate(request, record, db_now, ctx.policy.hold_grace) {
            Ok(claim) => claims.push(claim),
            Err(reason) => {
                if let Some(decision) = invalid_decision(ctx, record, request, &reason) {
                    decided.push(invalid_logged(request, &decision.0, &reason));
                    decisions.push(decision);
                }
                refused.push((record, reason));
            }
        }
    }

    let mut fresh = Vec::new();
    decide::told_sold_out_wins(&mut claims);
    if !claims.is_empty() {
        let request_ids: Vec<&RequestId> = claims.iter().map(|c| &c.request_id).collect();
        let user_ids = users_to_read(&claims);
        let stored = store::find_decisions(&mut tx, &request_ids).await?;
        let states = if user_ids.is_empty() {
            HashMap::new()
        } else {
            store::user_states(&mut tx, &user_ids).await?
        };
        let mut view = BatchView::new(stored, states);
        let mut answers: Vec<Option<Answer>> = Vec::with_capacity(claims.len());
        let mut waiting = Vec::new();
        let mut deferred = Vec::new();
        for (index, claim) in claims.iter().enumerate() {
            answers.push(match classify(&ctx.policy, claim, &mut view) {
                Step::Decided(decision, is_new) => Some(Answer::Decision(decision, is_new)),
                Step::IdTaken => Some(Answer::IdTaken),
                Step::Waiting(candidate) => {
                    waiting.push((category_of(claim).map(str::to_owned), (index, candidate)));
                    None
                }
                Step::Deferred => {
                    deferred.push(index);
                    None
                }
            });
        }
        // The supply version before any allocation statement of the batch
        // starts: the version its sold-out marks carry (see
        // `coupon_domain::sold_out`). `None` when Redis did not answer or
        // has no version (it lost its data): then nothing is marked.
        let supply = if waiting.is_empty() && deferred.is_empty() {
            None
        } else {
            current_supply_version(ctx).await
        };
        for (category, group) in allocation_groups(waiting) {
            for (index, decision) in
                grant_group(&mut tx, &mut view, category.as_deref(), group).await?
            {
                answers[index] = Some(Answer::Decision(decision, true));
            }
        }
        for index in deferred {
            let (decision, is_new) =
                decide_deferred(&mut tx, ctx, &claims[index], &mut view).await?;
            answers[index] = Some(Answer::Decision(decision, is_new));
        }
        for (claim, answer) in claims.iter().zip(answers) {
            let (decision, is_new) = match answer {
                Some(Answer::Decision(decision, is_new)) => (decision, is_new),
                Some(Answer::IdTaken) => {
                    let reason = format!(
                        "request id {} was already used by another user; send a new one",
                        claim.request_id
                    );
                    let answer = refusal_event(
                        ctx,
                        WireOutcome::Conflict,
                        claim.request_id.as_str(),
                        claim.user_id.as_str(),
                        &claim.correlation_id,
                        claim.received_ms,
                        &reason,
                    );
                    decided.push(Decided {
                        request_id: crate::log_request_id(
                            &claim.correlation_id,
                            claim.request_id.as_str(),
                        )
                        .to_owned(),
                        user_id: claim.user_id.as_str().to_owned(),
                        outcome: WireOutcome::Conflict.name(),
                        coupon_code: None,
                        redelivered: false,
                        reason: Some(reason),
                    });
                    decisions.push(answer);
                    continue;
                }
                None => return Err(ClaimsError::Undecided(claim.request_id.to_string()).into()),
            };
            decided.push(Decided {
                request_id: crate::log_request_id(&claim.correlation_id, claim.request_id.as_str())
                    .to_owned(),
                user_id: decision.user_id.to_string(),
                outcome: decision.outcome.as_str(),
                coupon_code: decision.coupon_code.map(|code| code.to_string()),
                redelivered: !is_new,
                reason: None,
            });
            decisions.push((
                decision.user_id.to_string(),
                event_of(&decision, ctx.publisher.name(), &claim.correlation_id),
            ));
            if is_new {
                fresh.push(decision);
            }
        }
        let inserted = store::insert_decisions(&mut tx, &fresh).await?;
        if inserted != fresh.len() as u64 {
            return Err(ClaimsError::Concurrent {
                conflicting: fresh.len() as u64 - inserted,
                of: fresh.len(),
            }
            .into());
        }
        tx.commit().await?;
        let ended: Vec<EndedHold> = view
            .released
            .iter()
            .map(|r| EndedHold {
                code: r.code,
                user: r.user_id.clone(),
            })
            .collect();
        // Redis mirrors the holds; it is a cache, so a failure only costs speed.
        if let Err(error) = ctx.cache.remove_holds(&ended).await {
            tracing::warn!(%error, "could not delete released holds from Redis");
        }
        metrics::counter!("coupon_holds_released_total").increment(ended.len() as u64);
        // Released holds are supply (a coupon of another category than the
        // one its user claims now stays available): void the marks first.
        if !ended.is_empty() {
            crate::supply_changed(ctx).await;
        }
        // Before any mark: the gateway reads a missing hold or quota key as
        // "may be told sold out", so a winner's keys must be there first.
        if mirror_users(ctx, &fresh).await {
            if let Some(version) = supply {
                mark_sold_out(ctx, &view.pool, &version).await;
            }
            rearm_sold_out(ctx, &claims).await;
        }
    } else {
        drop(tx);
    }

    // Counted after the commit, so a retried batch is not counted twice.
    for decision in &fresh {
        metrics::counter!("coupon_claim_decisions_total", "outcome" => decision.outcome.as_str())
            .increment(1);
    }
    let topic = ctx.topics.claim_results();
    ctx.publisher.send_all(&topic, &decisions).await?;
    for d in &decided {
        d.log("claim");
    }
    dead_letter_all(&ctx.dead_letters(ROLE), &refused).await
}

/// Mirrors the holds and used quotas of a batch's new decisions to Redis;
/// `false` if that failed. The gateway's sold-out answer reads their
/// absence, so a write that fails forgets the supply version too: sold-out
/// answers stop until a restore has refilled the cache (`crate::restore`);
/// this process writes no mark until the version is deleted.
async fn mirror_users(ctx: &Context, fresh: &[StoredDecision]) -> bool {
    let mut new_holds = Vec::new();
    let mut quota_used = Vec::new();
    for decision in fresh {
        match decision.outcome {
            ClaimOutcomeKind::Granted if !decision.repeated => quota_used.push((
                decision.user_id.to_string(),
                ctx.policy.quota_window.end_of(decision.decided_at),
            )),
            ClaimOutcomeKind::RateLimited => {
                if let Some(retry_at) = decision.retry_at {
                    quota_used.push((decision.user_id.to_string(), retry_at));
                }
            }
            _ => {}
        }
        if decision.outcome == ClaimOutcomeKind::Granted && !decision.repeated {
            if let (Some(code), Some(category), Some(expires_at)) = (
                &decision.coupon_code,
                &decision.category,
                decision.expires_at,
            ) {
                new_holds.push(CachedHold {
                    code: code.to_string(),
                    user_id: decision.user_id.to_string(),
                    category: category.to_string(),
                    expires_at,
                });
            }
        }
    }
    let written = match ctx.cache.put_holds(&new_holds).await {
        Ok(()) => ctx.cache.put_quota_used(&quota_used).await,
        Err(error) => Err(error),
    };
    let Err(error) = written else {
        return true;
    };
    tracing::warn!(%error, holds = new_holds.len(), users = quota_used.len(),
        "could not mirror holds and used quotas to Redis; sold-out answers stop until it is refilled");
    crate::restore::forget_supply(ctx);
    false
}

/// The supply version now; `None` when Redis does not answer or has none.
/// Without one, Redis lost its data since the last restore: one is started
/// (in the background; claims take the full path meanwhile).
async fn current_supply_version(ctx: &Context) -> Option<String> {
    if ctx.mirror.is_unmirrored() {
        return None;
    }
    match ctx.cache.supply_version().await {
        Ok(Some(version)) => Some(version),
        Ok(None) => {
            crate::restore::restore_in_background(ctx);
            None
        }
        Err(error) => {
            tracing::debug!(%error, "no supply version; marking nothing sold out");
            None
        }
    }
}

/// Marks the pools this batch found empty as sold out as of supply
/// `version` (read before the batch's allocations). Redis trouble costs
/// only speed: unmarked pools are decided here as before.
async fn mark_sold_out(ctx: &Context, pool: &PoolKnowledge, version: &str) {
    put_sold_out_marks(ctx, &pool.empty_pools(), version).await;
}

/// Renews the sold-out marks that claims of this batch were answered from,
/// while their pools are still empty. A mark's TTL is only a safety net (a
/// supply whose Redis write was lost); without renewal it would lapse in the
/// middle of a sale and send every claim in flight down the full path at
/// once, a p99 spike every TTL. As for any mark, the supply version is read
/// before Postgres is asked: a supply landing in between changes the version
/// and voids the renewed mark at once, and a supply whose Redis write was
/// lost shows in Postgres, so its pool is not renewed and lapses as before.
async fn rearm_sold_out(ctx: &Context, claims: &[Claim]) {
    let mut pools: Vec<Option<&Category>> = claims
        .iter()
        .filter(|claim| claim.answered_sold_out)
        .map(|claim| claim.category.as_ref())
        .collect();
    pools.sort_unstable();
    pools.dedup();
    if pools.is_empty() {
        return;
    }
    let Some(version) = current_supply_version(ctx).await else {
        return;
    };
    let mut empty = Vec::with_capacity(pools.len());
    for pool in pools {
        match coupon_platform::store::coupons::any_available(&ctx.pool, pool).await {
            // The marks name their pools by text (Redis keys).
            Ok(false) => empty.push(pool.map(Category::as_str)),
            Ok(true) => {}
            Err(error) => {
                tracing::debug!(%error, "pool not readable; renewing no sold-out mark");
                return;
            }
        }
    }
    put_sold_out_marks(ctx, &empty, &version).await;
}

/// Writes the sold-out marks of `pools` as of supply `version`. Redis
/// trouble costs only speed, so it is logged, never returned.
async fn put_sold_out_marks(ctx: &Context, pools: &[Option<&str>], version: &str) {
    if pools.is_empty() {
        return;
    }
    match ctx
        .cache
        .mark_sold_out(pools, version, ctx.policy.sold_out_mark_ttl)
        .await
    {
        Ok(()) => metrics::counter!("coupon_sold_out_marks_total").increment(pools.len() as u64),
        Err(error) => tracing::warn!(%error, "could not mark pools sold out in Redis"),
    }
}

/// Sets aside a claim request that fails on its own: the requester is
/// answered `invalid` with the reason (so the gateway does not time out),
/// and the record goes to the dead-letter topic.
pub async fn reject(ctx: &Context, record: &Record, reason: &str) -> Result<(), BatchError> {
    if let Ok(request) = decode::<ClaimRequested>(record) {
        let reason = format!("the claim could not be decided: {reason}");
        if let Some(decision) = invalid_decision(ctx, record, &request, &reason) {
            crate::answer_if_possible(ctx, &ctx.topics.claim_results(), decision).await?;
        }
    }
    ctx.dead_letters(ROLE).send(record, reason).await?;
    Ok(())
}

/// The `invalid` answer to a request that has a usable request id (else
/// there is no one to answer), keyed by the user id it gave.
fn invalid_decision(
    ctx: &Context,
    record: &Record,
    request: &ClaimRequested,
    reason: &str,
) -> Option<(String, ClaimDecided)> {
    RequestId::parse(request.request_id.as_str()).ok()?;
    let envelope = request.envelope.as_ref();
    Some(refusal_event(
        ctx,
        WireOutcome::Invalid,
        &request.request_id,
        &crate::echoed_id(&request.user_id),
        envelope.map_or("", |e| e.correlation_id.as_str()),
        stable_time_ms(record, envelope.map(|e| e.occurred_at_ms)),
        reason,
    ))
}

/// An answer that decides nothing (`invalid`, or `conflict`: the request
/// id is another user's) to `user_key`'s request `request_id`. Never
/// stored, so its event id comes from the request and the user, and its
/// time from the record: a redelivery publishes the very same event.
fn refusal_event(
    ctx: &Context,
    outcome: WireOutcome,
    request_id: &str,
    user_key: &str,
    correlation_id: &str,
    time_ms: i64,
    reason: &str,
) -> (String, ClaimDecided) {
    let envelope = coupon_schemas::new_envelope::<ClaimDecided>(
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("invalid-claim:{request_id}:{user_key}").as_bytes(),
        )
        .to_string(),
        time_ms,
        ctx.publisher.name(),
        correlation_id,
    );
    (
        user_key.to_owned(),
        ClaimDecided {
            envelope: Some(envelope),
            request_id: request_id.to_owned(),
            user_id: user_key.to_owned(),
            outcome: outcome as i32,
            // The reason may quote the request: bounded like any echo.
            reason: reason.chars().take(1024).collect(),
            ..Default::default()
        },
    )
}

fn invalid_logged(request: &ClaimRequested, user_id: &str, reason: &str) -> Decided {
    Decided {
        request_id: crate::log_request_id(
            request
                .envelope
                .as_ref()
                .map_or("", |e| e.correlation_id.as_str()),
            &request.request_id,
        )
        .to_owned(),
        user_id: user_id.to_owned(),
        outcome: "invalid",
        coupon_code: None,
        redelivered: false,
        reason: Some(reason.to_owned()),
    }
}

/// The event for a stored decision; a stored decision always yields the
/// same event id, so consumers can deduplicate republished decisions.
pub fn event_of(decision: &StoredDecision, producer: &str, correlation_id: &str) -> ClaimDecided {
    let outcome = WireOutcome::from(decision.outcome);
    ClaimDecided {
        envelope: Some(coupon_schemas::new_envelope::<ClaimDecided>(
            decision.event_id.to_string(),
            to_ms(decision.decided_at),
            producer,
            correlation_id,
        )),
        request_id: decision.request_id.to_string(),
        user_id: decision.user_id.to_string(),
        outcome: outcome as i32,
        coupon_code: decision
            .coupon_code
            .map(|code| code.to_string())
            .unwrap_or_default(),
        category: decision
            .category
            .as_ref()
            .map(|category| category.to_string())
            .unwrap_or_default(),
        expires_at_ms: decision.expires_at.map(to_ms).unwrap_or(0),
        repeated: decision.repeated,
        retry_at_ms: decision.retry_at.map(to_ms).unwrap_or(0),
        blacklisted_until_ms: decision.blacklisted_until.map(to_ms).unwrap_or(0),
        reason: String::new(),
    }
}

crate::role_handler!(ROLE, ClaimRequested, answers);
