//! The purchase processor: `coupons.purchases` → redemption or a rejection on
//! `coupons.purchase-results`.
//!
//! The coupon row is locked (`FOR UPDATE`) while the rules decide, so a
//! purchase and the expiry of the same hold are serialised by Postgres: the
//! coupon ends exactly one way. The hold is the user's until `held_until`,
//! exclusive, and a purchase is judged at the time the broker accepted it,
//! not when this processor got to it (`coupon_domain::clock`): a purchase
//! made in time is honoured even if this consumer lags, within the grace
//! the expiry waits before releasing a hold. Never before the grant of the
//! hold it finds, though (`coupon_domain::purchase::judged_at`): a purchase
//! sent before its grant and decided after it is judged at the grant, so the
//! log never dates a redemption before the hold it redeems.
//!
//! An order is one user's: a request for an order already decided for
//! another user is answered `invalid` (addressed to the requester, with no
//! trace of the other user's decision), never with that user's answer.
//!
//! Delivery guarantee: at least once, effect exactly once, idempotent on
//! `order_id`: the decision is stored under the order id in the same
//! transaction as the redemption, so the same order again gets the same answer
//! and one redemption. Offsets are stored after commit and publish.
//!
//! The topic also carries `PurchaseCancelled` (an order cancelled, told
//! apart by the envelope's `event_type`): see [`cancel`].
//!
//! A campaign's coupon is redeemed only on the campaign's terms
//! (`coupon_domain::purchase::decide_with_campaign`): the order total the
//! purchase sends meets the minimum, in the campaign's currency; the
//! discount is stored with the decision, so a repeat answers the same.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use coupon_domain::clock::judged_at;
use coupon_domain::purchase::{self as rules, decide_with_campaign, PurchaseOutcome};
use coupon_domain::{CouponCode, Money, OrderId, RequestId, RequestedCode, UserId};
use coupon_platform::kafka::consumer::BatchError;
use coupon_platform::kafka::role::RoleEvent;
use coupon_platform::kafka::{decode_topic, DecodeError, Record};
use coupon_platform::redis::EndedHold;
use coupon_platform::store::decisions::PurchaseDecisionRecord;
use coupon_platform::store::{campaigns, coupons, decisions};
use coupon_platform::time::to_ms;
use coupon_platform::Topics;
use coupon_schemas::{
    PurchaseCancelled, PurchaseDecided, PurchaseOutcome as WireOutcome, PurchaseRequested,
    TopicEvent, TopicKind,
};

pub mod cancel;
mod refused;

use coupon_platform::kafka::role::{dead_letter_all, Decoded};

use crate::{Context, Decided, Role};
use refused::Refused;

pub const ROLE: Role = Role::Purchases;

/// What the purchases topic carries: a purchase, or an order cancelled.
#[derive(Debug, Clone, PartialEq)]
pub enum PurchaseEvent {
    Requested(PurchaseRequested),
    Cancelled(PurchaseCancelled),
}

impl RoleEvent for PurchaseEvent {
    fn decode(_: &Topics, record: &Record) -> Result<Self, DecodeError> {
        match decode_topic(TopicKind::Purchases, record.value.as_deref())? {
            TopicEvent::PurchaseRequested(e) => Ok(Self::Requested(e)),
            TopicEvent::PurchaseCancelled(e) => Ok(Self::Cancelled(e)),
            _ => Err(DecodeError::NotRead {
                role: "purchase processor",
                topic: record.topic.clone(),
            }),
        }
    }
}

/// The decisions this role makes, by outcome (counted once per new order).
pub const DECISIONS: crate::DecisionCounter = crate::DecisionCounter {
    metric: "coupon_purchase_decisions_total",
    outcomes: || PurchaseOutcome::ALL.iter().map(|o| o.as_str()).collect(),
};

#[derive(Debug, Clone)]
pub struct Purchase {
    pub request_id: RequestId,
    pub user_id: UserId,
    /// As given; may not be a valid code (then the answer is `unknown_coupon`).
    pub coupon_code: String,
    pub order_id: OrderId,
    pub correlation_id: String,
    /// The order's total before the coupon, if sent.
    pub order_total: Option<Money>,
}

pub fn validate(request: &PurchaseRequested) -> Result<Purchase, String> {
    // Every id ends up in a Postgres text column, which refuses NUL: a NUL
    // let through here fails the batch forever instead of refusing one record.
    let request_id = RequestId::parse(request.request_id.clone()).map_err(|e| e.to_string())?;
    let coupon_code =
        RequestedCode::parse(request.coupon_code.clone()).map_err(|e| e.to_string())?;
    Ok(Purchase {
        request_id,
        user_id: UserId::parse(request.user_id.clone()).map_err(|e| e.to_string())?,
        coupon_code: coupon_code.into_string(),
        order_id: OrderId::parse(request.order_id.clone()).map_err(|e| e.to_string())?,
        order_total: request
            .order_total
            .as_ref()
            .map(|m| m.to_domain("order_total"))
            .transpose()
            .map_err(|e| e.to_string())?,
        correlation_id: request
            .envelope
            .as_ref()
            .map(|e| e.correlation_id.clone())
            .unwrap_or_default(),
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredPurchase {
    /// Set when the decision answers a later request for the same order.
    pub repeated: bool,
    pub order_id: OrderId,
    pub request_id: RequestId,
    pub event_id: Uuid,
    pub user_id: UserId,
    pub coupon_code: String,
    pub outcome: PurchaseOutcome,
    pub decided_at: DateTime<Utc>,
    pub order_total: Option<Money>,
    /// Redeemed: what the coupon's campaign took off the order.
    pub discount: Option<Money>,
}

/// Money as stored in two columns; a pair that does not parse back (an
/// edited row) reads as none.
fn stored_money(amount: Option<i64>, currency: Option<String>) -> Option<Money> {
    Money::parse("money", amount?, &currency?, false).ok()
}

impl From<PurchaseDecisionRecord> for StoredPurchase {
    fn from(r: PurchaseDecisionRecord) -> Self {
        Self {
            order_total: stored_money(r.order_total_amount, r.order_total_currency),
            discount: stored_money(r.discount_amount, r.discount_currency),
            repeated: false,
            order_id: r.order_id,
            request_id: r.request_id,
            event_id: r.event_id,
            user_id: r.user_id,
            coupon_code: r.coupon_code,
            outcome: r.outcome,
            decided_at: r.decided_at,
        }
    }
}

impl StoredPurchase {
    /// The `purchase_decisions` row of this decision.
    pub fn record(&self) -> PurchaseDecisionRecord {
        PurchaseDecisionRecord {
            order_id: self.order_id.clone(),
            request_id: self.request_id.clone(),
            event_id: self.event_id,
            user_id: self.user_id.clone(),
            coupon_code: self.coupon_code.clone(),
            outcome: self.outcome,
            decided_at: self.decided_at,
            order_total_amount: self.order_total.map(|m| m.amount),
            order_total_currency: self.order_total.map(|m| m.currency.to_string()),
            discount_amount: self.discount.map(|m| m.amount),
            discount_currency: self.discount.map(|m| m.currency.to_string()),
        }
    }

    pub fn to_event(&self, producer: &str, correlation_id: &str) -> PurchaseDecided {
        let outcome = WireOutcome::from(self.outcome);
        PurchaseDecided {
            envelope: Some(coupon_schemas::new_envelope::<PurchaseDecided>(
                self.event_id.to_string(),
                to_ms(self.decided_at),
                producer,
                correlation_id,
            )),
            request_id: self.request_id.to_string(),
            user_id: self.user_id.to_string(),
            coupon_code: self.coupon_code.clone(),
            order_id: self.order_id.to_string(),
            outcome: outcome as i32,
            redeemed_at_ms: if outcome == WireOutcome::Redeemed {
                to_ms(self.decided_at)
            } else {
                0
            },
            reason: String::new(),
            repeated: self.repeated,
            order_total: self.order_total.map(Into::into),
            discount_amount: self.discount.map(Into::into),
            coupon_status: String::new(),
        }
    }
}

/// Why deciding a purchase failed.
#[derive(Debug, thiserror::Error)]
enum DecideError {
    #[error("postgres")]
    Db(#[from] sqlx::Error),
    /// Another processor decided the same order meanwhile (a rebalance).
    /// The next attempt reads its decision, so this resolves at once; it is
    /// reported as permanent so that the batch loop's isolation bounds it
    /// should it ever recur.
    #[error("order {0} was decided concurrently by another processor")]
    Concurrent(OrderId),
}

impl From<DecideError> for BatchError {
    fn from(error: DecideError) -> Self {
        match error {
            DecideError::Db(error) => error.into(),
            concurrent @ DecideError::Concurrent(_) => BatchError::permanent(concurrent),
        }
    }
}

/// What a purchase gets.
#[derive(Debug, PartialEq)]
enum Answer {
    /// `true` with a decision made now, `false` with one stored earlier.
    Decided(StoredPurchase, bool),
    /// Refused without a decision of its own (the order is another user's).
    Conflict(String),
}

/// The answer to `purchase` when its order was decided before (read
/// state → this pure step → nothing to write): the stored decision again,
/// addressed to this request, or `conflict` when the order is another user's.
fn answer_stored(purchase: &Purchase, mut stored: StoredPurchase) -> Answer {
    if stored.user_id != purchase.user_id {
        return Answer::Conflict(format!(
            "order id {} was already used by another user",
            purchase.order_id
        ));
    }
    if stored.request_id != purchase.request_id {
        // Another request for an order already decided: the same answer,
        // addressed to this request (with its own, stable event id).
        stored.event_id = Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("purchase:{}:{}", stored.order_id, purchase.request_id).as_bytes(),
        );
        stored.request_id = purchase.request_id.clone();
        stored.repeated = true;
    }
    Answer::Decided(stored, false)
}

/// Decides one purchase in the batch transaction: read the stored decision
/// and the coupon (locked), decide with `coupon_domain::purchase::decide`
/// (pure), write the redemption and the decision. `now` is the time the
/// request is judged at; a purchase that finds a hold granted after it is
/// judged at that grant instead (`coupon_domain::purchase::judged_at`), so
/// no redemption is dated before the grant it redeems.
async fn decide_one(
    tx: &mut PgConnection,
    purchase: &Purchase,
    now: DateTime<Utc>,
) -> Result<Answer, DecideError> {
    if let Some(stored) = decisions::find_purchase(&mut *tx, &purchase.order_id).await? {
        return Ok(answer_stored(purchase, StoredPurchase::from(stored)));
    }
    let code = CouponCode::parse(&purchase.coupon_code).ok();
    let view = match code {
        Some(code) => coupons::lock_for_purchase(&mut *tx, code).await?,
        None => None,
    };
    let user = &purchase.user_id;
    let now = rules::judged_at(view.as_ref(), now);
    // The coupon's campaign: its minimum order, currency and discount.
    let campaign = match (code, &view) {
        (Some(code), Some(_)) => campaigns::of_coupon(&mut *tx, code).await?,
        _ => None,
    };
    let judge = |held_before| {
        decide_with_campaign(
            view.as_ref(),
            user,
            held_before,
            now,
            campaign.as_ref(),
            purchase.order_total,
        )
    };
    let (mut outcome, mut discount) = judge(false);
    if outcome != PurchaseOutcome::Redeemed && view.is_some() {
        // Tell a late buyer "your hold expired" rather than "not yours".
        let held_before = match code {
            Some(code) => decisions::was_granted(&mut *tx, user, code).await?,
            None => false,
        };
        (outcome, discount) = judge(held_before);
    }
    if let (PurchaseOutcome::Redeemed, Some(code)) = (outcome, code) {
        coupons::redeem(&mut *tx, code, now, &purchase.order_id).await?;
    }
    let decision = StoredPurchase {
        repeated: false,
        order_id: purchase.order_id.clone(),
        request_id: purchase.request_id.clone(),
        event_id: Uuid::new_v4(),
        user_id: user.clone(),
        // Canonical when it is a code; else as given (`unknown_coupon`).
        coupon_code: code.map_or_else(|| purchase.coupon_code.clone(), |c| c.to_string()),
        outcome,
        decided_at: now,
        order_total: purchase.order_total,
        discount,
    };
    if !decisions::insert_purchase(&mut *tx, &decision.record()).await? {
        return Err(DecideError::Concurrent(decision.order_id));
    }
    Ok(Answer::Decided(decision, true))
}

/// The `invalid` answer to a purchase request that has a usable request id
/// (else there is no one to answer), keyed by the user id it gave. Its event
/// id and time come from the request and the record, so a redelivery
/// publishes the very same event (and the history sink adds no second row).
fn refusal(
    ctx: &Context,
    record: &Record,
    request: &PurchaseRequested,
    outcome: WireOutcome,
    reason: &str,
) -> Option<(String, PurchaseDecided)> {
    let refused = Refused {
        id_space: "invalid-purchase",
        request_id: &request.request_id,
        user_id: &request.user_id,
        order_id: &request.order_id,
        envelope: request.envelope.as_ref(),
    };
    refused.answer(ctx, record, outcome, reason)
}

fn refusal_logged(
    request: &PurchaseRequested,
    user_id: &str,
    outcome: WireOutcome,
    reason: &str,
) -> Decided {
    let correlation_id = request
        .envelope
        .as_ref()
        .map_or("", |e| e.correlation_id.as_str());
    Decided {
        request_id: crate::log_request_id(correlation_id, &request.request_id).to_owned(),
        user_id: user_id.to_owned(),
        outcome: outcome.name(),
        coupon_code: None,
        redelivered: false,
        reason: Some(reason.to_owned()),
    }
}

/// The hold a decision ended, if it redeemed one. A redeemed coupon's code
/// is a real one; the cache keys name it canonically, whatever spelling the
/// buyer used.
fn ended_hold(decision: &StoredPurchase) -> Option<EndedHold> {
    if decision.outcome != PurchaseOutcome::Redeemed {
        return None;
    }
    let code = CouponCode::parse(&decision.coupon_code).ok()?;
    Some(EndedHold {
        code,
        user: decision.user_id.clone(),
    })
}

/// The refusal of a cancellation (`invalid`, or `conflict`), addressed to
/// its requester when it has a usable request id; its event id and time
/// come from the request and the record, so a redelivery publishes the
/// very same event.
fn cancel_refusal(
    ctx: &Context,
    record: &Record,
    request: &PurchaseCancelled,
    outcome: WireOutcome,
    reason: &str,
) -> Option<(String, PurchaseDecided)> {
    let refused = Refused {
        id_space: "refused-cancel",
        request_id: &request.request_id,
        user_id: &request.user_id,
        order_id: &request.order_id,
        envelope: request.envelope.as_ref(),
    };
    refused.answer(ctx, record, outcome, reason)
}

pub async fn handle_events(
    ctx: &Context,
    batch: &[Decoded<PurchaseEvent>],
) -> Result<(), BatchError> {
    let mut decisions: Vec<(String, PurchaseDecided)> = Vec::new();
    let mut ended_holds = Vec::new();
    let mut refused = Vec::new();
    // Logged once the decisions are published (a retried batch logs once).
    let mut decided: Vec<Decided> = Vec::new();
    let mut returned = false;
    let mut tx = ctx.pool.begin().await?;
    let db_now = crate::db_now(&mut tx).await?;
    for (record, event) in batch {
        let request = match event {
            PurchaseEvent::Requested(request) => request,
            PurchaseEvent::Cancelled(request) => {
                let cancel = match cancel::validate(request) {
                    Ok(cancel) => cancel,
                    Err(reason) => {
                        let invalid = WireOutcome::Invalid;
                        decisions.extend(cancel_refusal(ctx, record, request, invalid, &reason));
                        refused.push((record, reason));
                        continue;
                    }
                };
                match cancel::decide(&mut tx, &cancel).await? {
                    cancel::CancelAnswer::Cancelled(cancelled, is_new) => {
                        if is_new {
                            metrics::counter!(DECISIONS.metric, "outcome" => "cancelled")
                                .increment(1);
                            returned |= cancel::back_in_pool(&cancelled);
                        }
                        decided.push(Decided {
                            request_id: crate::log_request_id(
                                &cancel.correlation_id,
                                cancel.request_id.as_str(),
                            )
                            .to_owned(),
                            user_id: cancelled.user_id.to_string(),
                            outcome: "cancelled",
                            coupon_code: Some(cancelled.coupon_code.clone()),
                            redelivered: !is_new,
                            reason: None,
                        });
                        decisions.push((
                            cancelled.user_id.to_string(),
                            cancelled.to_event(ctx.publisher.name(), &cancel.correlation_id),
                        ));
                    }
                    cancel::CancelAnswer::Refused(outcome, reason) => {
                        decisions.extend(cancel_refusal(ctx, record, request, outcome, &reason));
                    }
                }
                continue;
            }
        };
        let purchase = match validate(request) {
            Ok(purchase) => purchase,
            Err(reason) => {
                if let Some(decision) = refusal(ctx, record, request, WireOutcome::Invalid, &reason)
                {
                    decided.push(refusal_logged(
                        request,
                        &decision.0,
                        WireOutcome::Invalid,
                        &reason,
                    ));
                    decisions.push(decision);
                }
                refused.push((record, reason));
                continue;
            }
        };
        let at = judged_at(record.timestamp_ms, db_now, ctx.policy.hold_grace);
        let (decision, is_new) = match decide_one(&mut tx, &purchase, at).await? {
            Answer::Decided(decision, is_new) => (decision, is_new),
            Answer::Conflict(reason) => {
                let conflict = WireOutcome::Conflict;
                if let Some(decision) = refusal(ctx, record, request, conflict, &reason) {
                    decided.push(refusal_logged(request, &decision.0, conflict, &reason));
                    decisions.push(decision);
                }
                continue;
            }
        };
        if is_new {
            metrics::counter!(DECISIONS.metric, "outcome" => decision.outcome.as_str())
                .increment(1);
            ended_holds.extend(ended_hold(&decision));
        }
        decided.push(Decided {
            request_id: crate::log_request_id(
                &purchase.correlation_id,
                purchase.request_id.as_str(),
            )
            .to_owned(),
            user_id: decision.user_id.to_string(),
            outcome: decision.outcome.as_str(),
            coupon_code: Some(decision.coupon_code.clone()),
            redelivered: !is_new,
            reason: None,
        });
        decisions.push((
            decision.user_id.to_string(),
            decision.to_event(ctx.publisher.name(), &purchase.correlation_id),
        ));
    }
    tx.commit().await?;
    if let Err(error) = ctx.cache.remove_holds(&ended_holds).await {
        tracing::warn!(%error, "could not delete redeemed holds from Redis");
    }
    // A cancelled order's coupon is claimable again: void the sold-out marks.
    if returned {
        crate::supply_changed(ctx).await;
    }
    let topic = ctx.topics.purchase_results();
    ctx.publisher.send_all(&topic, &decisions).await?;
    for d in &decided {
        d.log("purchase");
    }
    dead_letter_all(&ctx.dead_letters(ROLE), &refused).await
}

/// Sets aside a purchase request that fails on its own: the requester is
/// answered `invalid` with the reason (so the gateway does not time out),
/// and the record goes to the dead-letter topic.
pub async fn reject(ctx: &Context, record: &Record, reason: &str) -> Result<(), BatchError> {
    let reason_now = format!("the purchase could not be decided: {reason}");
    let answer = match decode_topic(TopicKind::Purchases, record.value.as_deref()) {
        Ok(TopicEvent::PurchaseRequested(request)) => {
            refusal(ctx, record, &request, WireOutcome::Invalid, &reason_now)
        }
        Ok(TopicEvent::PurchaseCancelled(request)) => {
            cancel_refusal(ctx, record, &request, WireOutcome::Invalid, &reason_now)
        }
        _ => None,
    };
    if let Some(decision) = answer {
        crate::answer_if_possible(ctx, &ctx.topics.purchase_results(), decision).await?;
    }
    ctx.dead_letters(ROLE).send(record, reason).await?;
    Ok(())
}

crate::role_handler!(ROLE, PurchaseEvent, answers);

#[cfg(test)]
mod tests {
    use super::*;

    fn purchase(request: &str, user: &str, order: &str) -> Purchase {
        Purchase {
            request_id: RequestId::parse(request).unwrap(),
            user_id: UserId::parse(user).unwrap(),
            coupon_code: "C1".into(),
            order_id: OrderId::parse(order).unwrap(),
            correlation_id: String::new(),
            order_total: None,
        }
    }

    fn stored(request: &str, user: &str, order: &str) -> StoredPurchase {
        StoredPurchase {
            repeated: false,
            order_id: OrderId::parse(order).unwrap(),
            request_id: RequestId::parse(request).unwrap(),
            event_id: Uuid::from_u128(7),
            user_id: UserId::parse(user).unwrap(),
            coupon_code: "C1".into(),
            outcome: PurchaseOutcome::Redeemed,
            decided_at: "2026-11-25T12:00:00Z".parse().unwrap(),
            order_total: None,
            discount: None,
        }
    }

    #[test]
    fn a_redelivered_purchase_gets_its_stored_decision_unchanged() {
        let decision = stored("r1", "u1", "o1");
        assert_eq!(
            answer_stored(&purchase("r1", "u1", "o1"), decision.clone()),
            Answer::Decided(decision, false)
        );
    }

    #[test]
    fn another_request_for_a_decided_order_repeats_its_answer_under_a_stable_id() {
        let first = answer_stored(&purchase("r2", "u1", "o1"), stored("r1", "u1", "o1"));
        let again = answer_stored(&purchase("r2", "u1", "o1"), stored("r1", "u1", "o1"));
        assert_eq!(first, again, "a redelivery of the retry repeats it exactly");
        let Answer::Decided(answer, false) = first else {
            panic!("the stored decision is answered again")
        };
        assert!(answer.repeated);
        assert_eq!(answer.request_id.as_str(), "r2");
        assert_eq!(answer.outcome, PurchaseOutcome::Redeemed);
        assert_ne!(answer.event_id, Uuid::from_u128(7));
    }

    #[test]
    fn an_order_of_another_user_is_a_conflict_and_reveals_nothing() {
        match answer_stored(&purchase("r9", "u2", "o1"), stored("r1", "u1", "o1")) {
            Answer::Conflict(reason) => assert!(!reason.contains("u1"), "{reason}"),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
}
