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
//! after the commit the decisions are published and only once the broker
//! has acknowledged them are offsets stored (the next batch is decided while
//! it does: `Confirmations`). A redelivered request finds its stored decision and publishes it
//! again unchanged (same event id), so a crash between commit and publish
//! loses no decision and a redelivery creates no second one. Answers that
//! are not stored (invalid requests) take their event id from the request
//! and their time from the record, so a redelivery repeats them exactly.
//!
//! Eligibility (issue #28): a campaign with locations or a minimum age is
//! claimable only by users whose profile passes its rules
//! (`coupon_domain::profile::eligible`, on the claim's day). The batch reads
//! the campaigns with rules that still have coupons (one small indexed
//! statement) and, only if there are any, its users' profiles; claims are
//! then grouped by pool *and* by the campaigns their users may not have, and
//! each group's grant leaves those out. A group that leaves something out
//! and finds nothing proves nothing about the pool for other users: it is
//! answered `sold_out` but neither recorded as the batch's empty pool nor
//! marked sold out in Redis (an eligible user must still be asked). Only a
//! grant over the whole pool marks it.
//!
//! `decide` is the batch's rules (pure but for the reads it is given),
//! `mirror` what Redis learns after the commit, `outbox` what a batch sends
//! after it, `answers` the events of
//! invalid requests and refusals, `stages` the timing of each step of a
//! batch; the SQL is `coupon_platform::store::claims`.

mod answers;
mod decide;
mod mirror;
mod outbox;
pub mod stages;

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use coupon_domain::claim::{allocation_groups, Allocation, ClaimOutcome};
use coupon_domain::clock::judged_at;
use coupon_domain::{Category, CouponCode, RequestId, UserId};
use coupon_platform::kafka::consumer::{stable_time_ms, BatchError, Confirmations};
use coupon_platform::kafka::Record;
use coupon_schemas::ClaimRequested;

use coupon_domain::lifecycle::release_event_id;
use coupon_platform::kafka::role::{dead_letter_all, Decoded};
use coupon_platform::store::history::{HistoryRow, HoldRelease, ReleasedBy};

use crate::{Context, Role};

use coupon_platform::store::claims as store;
pub use store::{insert_decisions, ClaimDecisionRecord};

pub use answers::{event_of, reject};
use answers::{invalid_decision, invalid_logged};
use decide::{
    apply_rules, category_of, classify, decisions_since, users_to_read, windows_since, BatchView,
    Candidate, Step,
};
use mirror::{current_supply_version, mirror_batch};
use outbox::Outbox;

pub const ROLE: Role = Role::Claims;

/// The decisions this role makes, by outcome (counted after their commit).
pub const DECISIONS: crate::DecisionCounter = crate::DecisionCounter {
    metric: "coupon_claim_decisions_total",
    outcomes: || {
        coupon_domain::ClaimOutcomeKind::ALL
            .iter()
            .map(|outcome| outcome.as_str())
            .collect()
    },
};

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
    Contended(Option<Category>),
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
    history: coupon_platform::store::history::HistoryStore,
    category: Option<&Category>,
    excluded: &[uuid::Uuid],
    waiting: Vec<(usize, Candidate<'_>)>,
) -> Result<Vec<(usize, ClaimDecisionRecord)>, ClaimsError> {
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
            coupon_platform::store::history::append_in_tx(&mut *tx, history, &rows).await?;
            view.released.extend(released);
        }
        let claims: Vec<Allocation> = waiting.iter().map(|(_, c)| c.allocation()).collect();
        store::grant(tx, category, excluded, &claims)
            .await?
            .into_iter()
            .map(|g| (g.request_id.clone(), g))
            .collect()
    };
    if granted.len() < waiting.len() {
        // A skipped lock is not an empty pool: only a pool without
        // available rows is recorded (and marked) sold out.
        let pool = waiting.first().and_then(|(_, c)| c.claim.category.as_ref());
        let earliest = waiting.iter().map(|(_, c)| c.claim.at).min();
        let latest = waiting.iter().map(|(_, c)| c.claim.at).max();
        if !view.pool.known_empty(category)
            && coupon_platform::store::coupons::any_available(
                &mut *tx, pool, earliest, latest, excluded,
            )
            .await?
        {
            return Err(ClaimsError::Contended(category.cloned()));
        }
        // Empty for these users only, when they may not have everything:
        // another user may still be granted, so nothing is recorded (or
        // marked sold out).
        if coupon_domain::sold_out::proves_empty(excluded.len()) {
            view.pool.record_empty(category);
        }
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
            // Back to `available` even after its campaign's end: the coupon
            // is not claimable then, and the expiry sweeper makes it
            // `expired` on its next pass (as the rebuild does).
            campaign_ended_at: None,
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
) -> Result<(ClaimDecisionRecord, bool), ClaimsError> {
    if let Some(stored) = view.decided.get(&claim.request_id) {
        return Ok((stored.clone(), false));
    }
    let since = ctx.policy.quota_window.start_of(claim.at);
    let state = store::user_states(&mut *tx, &[&claim.user_id], since)
        .await?
        .remove(&claim.user_id)
        .unwrap_or_default();
    match apply_rules(&ctx.policy, claim, &state, &view.pool) {
        Ok(outcome) => Ok(view.record(claim, outcome)),
        Err(candidate) => {
            let category = category_of(claim);
            let excluded = view.excluded(&ctx.policy, claim);
            let decided = grant_group(
                tx,
                view,
                ctx.history.store(),
                category,
                &excluded,
                vec![(0, candidate)],
            )
            .await?;
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
    Decision(ClaimDecisionRecord, bool),
    IdTaken,
}

/// Decides a batch and publishes its answers; the broker's acknowledgement
/// of them is returned outstanding, so the batch loop decides the next batch
/// meanwhile and stores this one's offsets once it is in.
pub async fn handle_events(
    ctx: &Context,
    batch: &[Decoded<ClaimRequested>],
) -> Result<Confirmations, BatchError> {
    let oldest_ms = batch
        .iter()
        .map(|(record, _)| record.timestamp_ms)
        .min()
        .flatten();
    let mut stages = stages::Stages::start(batch.len(), oldest_ms);
    let mut out = Outbox::with_capacity(batch.len());
    let mut tx = ctx.pool.begin().await?;
    let db_now = crate::db_now(&mut tx).await?;
    let mut claims = validate_batch(ctx, batch, db_now, &mut out);
    decide::told_sold_out_wins(&mut claims);
    stages.done("begin");
    let mut fresh = Vec::new();
    if claims.is_empty() {
        drop(tx);
    } else {
        let (answers, view, supply) = decide_batch(&mut tx, ctx, &claims, &mut stages).await?;
        // The granted coupons' campaigns, for their answers.
        let granted: Vec<CouponCode> = answers
            .iter()
            .filter_map(|answer| match answer {
                Some(Answer::Decision(decision, _)) => decision.coupon_code,
                _ => None,
            })
            .collect();
        let campaigns = coupon_platform::store::campaigns::of_coupons(&mut *tx, &granted).await?;
        for (claim, answer) in claims.iter().zip(answers) {
            match answer {
                Some(Answer::Decision(decision, is_new)) => {
                    let campaign = decision.coupon_code.and_then(|code| campaigns.get(&code));
                    out.decision(ctx, claim, &decision, is_new, campaign);
                    if is_new {
                        fresh.push(decision);
                    }
                }
                Some(Answer::IdTaken) => out.conflict(ctx, claim),
                None => return Err(ClaimsError::Undecided(claim.request_id.to_string()).into()),
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
        stages.done("write");
        tx.commit().await?;
        stages.done("commit");
        mirror_batch(ctx, &view, &fresh, supply, &claims).await;
        stages.done("mirror");
    }

    // Counted after the commit, so a retried batch is not counted twice.
    for decision in &fresh {
        metrics::counter!(DECISIONS.metric, "outcome" => decision.outcome.as_str()).increment(1);
    }
    let topic = ctx.topics.claim_results();
    let confirming = ctx.publisher.enqueue_all(&topic, &out.decisions).await?;
    for d in &out.decided {
        d.log("claim");
    }
    let set_aside = dead_letter_all(&ctx.dead_letters(ROLE), &out.refused).await;
    stages.done("publish");
    set_aside?;
    Ok(Confirmations::of(stages::confirmed(confirming)))
}

/// The batch's valid claims; the invalid ones are answered (where they can
/// be addressed) and set aside in `out`.
fn validate_batch<'a>(
    ctx: &Context,
    batch: &'a [Decoded<ClaimRequested>],
    db_now: DateTime<Utc>,
    out: &mut Outbox<'a>,
) -> Vec<Claim> {
    let mut claims = Vec::with_capacity(batch.len());
    for (record, request) in batch {
        match validate(request, record, db_now, ctx.policy.hold_grace) {
            Ok(claim) => claims.push(claim),
            Err(reason) => {
                if let Some(decision) = invalid_decision(ctx, record, request, &reason) {
                    out.decided
                        .push(invalid_logged(request, &decision.0, &reason));
                    out.decisions.push(decision);
                }
                out.refused.push((record, reason));
            }
        }
    }
    claims
}

/// Decides every valid claim of a batch in its transaction: the rules on
/// one read of the stored decisions and user states, then the grants pool
/// by pool, then users' second requests on a fresh read. Returns each
/// claim's answer, the batch's view, and the supply version read before the
/// first allocation (what the sold-out marks carry).
async fn decide_batch(
    tx: &mut sqlx::PgConnection,
    ctx: &Context,
    claims: &[Claim],
    stages: &mut stages::Stages,
) -> Result<(Vec<Option<Answer>>, BatchView, Option<String>), BatchError> {
    let request_ids: Vec<&RequestId> = claims.iter().map(|c| &c.request_id).collect();
    let user_ids = users_to_read(claims);
    let since = decisions_since(claims, ctx.policy.request_id_horizon);
    let stored = store::find_decisions(&mut *tx, &request_ids, since).await?;
    let states = if user_ids.is_empty() {
        HashMap::new()
    } else {
        let since = windows_since(claims, ctx.policy.quota_window);
        store::user_states(&mut *tx, &user_ids, since).await?
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
                waiting.push((category_of(claim).cloned(), (index, candidate)));
                None
            }
            Step::Deferred => {
                deferred.push(index);
                None
            }
        });
    }
    stages.done("read");
    // The supply version before any allocation statement of the batch
    // starts: the version its sold-out marks carry (see
    // `coupon_domain::sold_out`). `None` when Redis did not answer or has no
    // version (it lost its data): then nothing is marked.
    let supply = if waiting.is_empty() && deferred.is_empty() {
        None
    } else {
        current_supply_version(ctx).await
    };
    stages.done("supply");
    if !waiting.is_empty() || !deferred.is_empty() {
        read_eligibility(&mut *tx, claims, &mut view).await?;
    }
    stages.done("eligibility");
    let keyed: Vec<_> = waiting
        .into_iter()
        .map(|(category, (index, candidate))| {
            let excluded = view.excluded(&ctx.policy, candidate.claim);
            ((category, excluded), (index, candidate))
        })
        .collect();
    for ((category, excluded), group) in allocation_groups(keyed) {
        for (index, decision) in grant_group(
            &mut *tx,
            &mut view,
            ctx.history.store(),
            category.as_ref(),
            &excluded,
            group,
        )
        .await?
        {
            answers[index] = Some(Answer::Decision(decision, true));
        }
    }
    for index in deferred {
        let (decision, is_new) = decide_deferred(&mut *tx, ctx, &claims[index], &mut view).await?;
        answers[index] = Some(Answer::Decision(decision, is_new));
    }
    stages.done("grant");
    Ok((answers, view, supply))
}

/// Reads what eligibility needs into `view`: the campaigns with rules that
/// still have coupons and, only if there are any, the profiles of the
/// batch's users.
async fn read_eligibility(
    tx: &mut sqlx::PgConnection,
    claims: &[Claim],
    view: &mut BatchView,
) -> Result<(), sqlx::Error> {
    let Some(earliest) = claims.iter().map(|c| c.at).min() else {
        return Ok(());
    };
    view.restricted = coupon_platform::store::campaigns::restricted(&mut *tx, earliest).await?;
    if !view.restricted.is_empty() {
        let users = users_to_read(claims);
        view.profiles = coupon_platform::store::users::profiles_of(&mut *tx, &users).await?;
    }
    Ok(())
}

crate::role_handler!(ROLE, ClaimRequested, answers);
