//! A cancelled order gives its coupon back (issue #28 item 5): a
//! `PurchaseCancelled` on `coupons.purchases`, decided here beside the
//! purchases (the same topic, keyed by the same user, so an order's
//! purchase and its cancellation are decided in order by one processor).
//!
//! The coupon the order redeemed goes back to `available` while its
//! campaign runs (or when it has none), to `expired` once the campaign has
//! ended (`coupon_domain::lifecycle::after_cancel`, on the database's
//! clock). The user's quota stays used: nothing here touches it. The
//! cancellation is stored with the order's decision, in the same
//! transaction as the coupon's change, so a repeat (a retry, another
//! request for the same order, a redelivery) answers the same and changes
//! nothing; its answer is a `PurchaseDecided` with outcome `CANCELLED`.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use coupon_domain::lifecycle::after_cancel;
use coupon_domain::{CouponCode, CouponStatus, OrderId, PurchaseOutcome, RequestId, UserId};
use coupon_platform::store::decisions::{self, CancelRecord};
use coupon_platform::store::{campaigns, coupons};
use coupon_platform::time::to_ms;
use coupon_schemas::{PurchaseCancelled, PurchaseDecided, PurchaseOutcome as WireOutcome};

/// A cancellation request, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Cancel {
    pub request_id: RequestId,
    pub user_id: UserId,
    pub order_id: OrderId,
    pub correlation_id: String,
}

pub fn validate(request: &PurchaseCancelled) -> Result<Cancel, String> {
    Ok(Cancel {
        request_id: RequestId::parse(request.request_id.clone()).map_err(|e| e.to_string())?,
        user_id: UserId::parse(request.user_id.clone()).map_err(|e| e.to_string())?,
        order_id: OrderId::parse(request.order_id.clone()).map_err(|e| e.to_string())?,
        correlation_id: request
            .envelope
            .as_ref()
            .map(|e| e.correlation_id.clone())
            .unwrap_or_default(),
    })
}

/// A cancellation decided: the order, its coupon and where it went.
#[derive(Debug, Clone, PartialEq)]
pub struct Cancelled {
    pub user_id: UserId,
    pub order_id: OrderId,
    pub coupon_code: String,
    pub record: CancelRecord,
    /// Set when this answers a later request for an order cancelled before.
    pub repeated: bool,
}

impl Cancelled {
    pub fn to_event(&self, producer: &str, correlation_id: &str) -> PurchaseDecided {
        PurchaseDecided {
            envelope: Some(coupon_schemas::new_envelope::<PurchaseDecided>(
                self.record.event_id.to_string(),
                to_ms(self.record.cancelled_at),
                producer,
                correlation_id,
            )),
            request_id: self.record.request_id.to_string(),
            user_id: self.user_id.to_string(),
            coupon_code: self.coupon_code.clone(),
            order_id: self.order_id.to_string(),
            outcome: WireOutcome::Cancelled as i32,
            repeated: self.repeated,
            coupon_status: self.record.coupon_status.as_str().to_owned(),
            ..Default::default()
        }
    }
}

/// What a cancellation gets.
#[derive(Debug, PartialEq)]
pub enum CancelAnswer {
    /// `true`: cancelled now (the coupon changed); `false`: before.
    Cancelled(Cancelled, bool),
    /// Refused, with the outcome and the reason: no redeemed order of this
    /// user has this id.
    Refused(WireOutcome, String),
}

/// The answer to `cancel` for an order cancelled before (pure): the stored
/// cancellation, addressed to this request under a stable event id.
pub fn answer_stored(cancel: &Cancel, coupon_code: String, mut record: CancelRecord) -> Cancelled {
    let repeated = record.request_id != cancel.request_id;
    if repeated {
        record.event_id = Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("cancel:{}:{}", cancel.order_id, cancel.request_id).as_bytes(),
        );
        record.request_id = cancel.request_id.clone();
    }
    Cancelled {
        user_id: cancel.user_id.clone(),
        order_id: cancel.order_id.clone(),
        coupon_code,
        record,
        repeated,
    }
}

/// Decides one cancellation in the batch transaction: read the order's
/// decision and cancellation, undo the redemption, store the cancellation.
pub async fn decide(tx: &mut PgConnection, cancel: &Cancel) -> Result<CancelAnswer, sqlx::Error> {
    let unknown = |why: &str| {
        CancelAnswer::Refused(
            WireOutcome::Invalid,
            format!("unknown_order: order {} {why}", cancel.order_id),
        )
    };
    let Some(purchase) = decisions::find_purchase(&mut *tx, &cancel.order_id).await? else {
        return Ok(unknown("was never purchased"));
    };
    if purchase.user_id != cancel.user_id {
        return Ok(CancelAnswer::Refused(
            WireOutcome::Conflict,
            format!("order id {} is another user's order", cancel.order_id),
        ));
    }
    if purchase.outcome != PurchaseOutcome::Redeemed {
        return Ok(unknown("redeemed no coupon"));
    }
    if let Some(stored) = decisions::find_cancel(&mut *tx, &cancel.order_id).await? {
        let answer = answer_stored(cancel, purchase.coupon_code, stored);
        return Ok(CancelAnswer::Cancelled(answer, false));
    }
    let Ok(code) = CouponCode::parse(&purchase.coupon_code) else {
        return Ok(unknown("names no coupon"));
    };
    let (end, now): (Option<DateTime<Utc>>, DateTime<Utc>) =
        campaigns::end_of_coupon(&mut *tx, code).await?;
    let to = after_cancel(end, now);
    if !coupons::cancel_redemption(&mut *tx, code, &cancel.order_id, to).await? {
        return Ok(unknown("no longer holds its coupon"));
    }
    let record = CancelRecord {
        cancelled_at: now,
        request_id: cancel.request_id.clone(),
        event_id: Uuid::new_v4(),
        coupon_status: to,
    };
    if !decisions::record_cancel(&mut *tx, &cancel.order_id, &record).await? {
        // Cancelled meanwhile by another processor: the batch rolls back
        // (the coupon's update with it) and the retry reads that one.
        return Err(sqlx::Error::Protocol(format!(
            "order {} was cancelled concurrently",
            cancel.order_id
        )));
    }
    Ok(CancelAnswer::Cancelled(
        Cancelled {
            user_id: cancel.user_id.clone(),
            order_id: cancel.order_id.clone(),
            coupon_code: code.to_string(),
            record,
            repeated: false,
        },
        true,
    ))
}

/// Whether a cancellation put its coupon back in the pool.
pub fn back_in_pool(cancelled: &Cancelled) -> bool {
    cancelled.record.coupon_status == CouponStatus::Available
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cancel(request: &str) -> Cancel {
        Cancel {
            request_id: RequestId::parse(request).unwrap(),
            user_id: UserId::parse("u1").unwrap(),
            order_id: OrderId::parse("o1").unwrap(),
            correlation_id: String::new(),
        }
    }

    fn stored() -> CancelRecord {
        CancelRecord {
            cancelled_at: "2026-12-06T03:00:00Z".parse().unwrap(),
            request_id: RequestId::parse("r1").unwrap(),
            event_id: Uuid::from_u128(7),
            coupon_status: CouponStatus::Expired,
        }
    }

    #[test]
    fn a_redelivered_cancel_gets_its_stored_answer_unchanged() {
        let answer = answer_stored(&cancel("r1"), "C1".into(), stored());
        assert!(!answer.repeated);
        assert_eq!(answer.record, stored());
        let event = answer.to_event("p", "c");
        assert_eq!(event.outcome, WireOutcome::Cancelled as i32);
        assert_eq!(event.coupon_status, "expired");
        assert_eq!(
            event.envelope.unwrap().event_id,
            Uuid::from_u128(7).to_string()
        );
    }

    #[test]
    fn another_request_for_a_cancelled_order_repeats_it_under_a_stable_id() {
        let first = answer_stored(&cancel("r2"), "C1".into(), stored());
        let again = answer_stored(&cancel("r2"), "C1".into(), stored());
        assert_eq!(first, again);
        assert!(first.repeated);
        assert_eq!(first.record.request_id.as_str(), "r2");
        assert_ne!(first.record.event_id, Uuid::from_u128(7));
        assert_eq!(first.record.coupon_status, CouponStatus::Expired);
        assert!(!back_in_pool(&first));
    }

    #[test]
    fn a_cancel_without_ids_is_refused() {
        let mut request = PurchaseCancelled {
            request_id: "r1".into(),
            user_id: "u1".into(),
            order_id: "o1".into(),
            ..Default::default()
        };
        assert!(validate(&request).is_ok());
        request.order_id = String::new();
        assert!(validate(&request).is_err());
        request.order_id = "o\0".into();
        assert!(validate(&request).is_err());
    }
}
