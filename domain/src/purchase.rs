//! How a purchase is decided: only the current holder, before the deadline,
//! turns a held coupon into a redeemed one. The adapter makes the same test
//! atomically (a conditional update), so a purchase racing the expiry sweeper
//! ends in exactly one of redeemed or released.

use chrono::{DateTime, Utc};

use crate::campaign::{purchase_terms, Campaign, Money, TermsRefusal};
use crate::ids::UserId;
use crate::lifecycle::CouponStatus;

/// The coupon as the purchase processor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CouponView {
    pub status: CouponStatus,
    pub holder_user_id: Option<UserId>,
    pub held_until: Option<DateTime<Utc>>,
    /// When the current hold was granted (its claim's decision time), if
    /// the coupon is held under a known grant.
    pub held_since: Option<DateTime<Utc>>,
}

/// The time a purchase is judged at, and its redemption dated at: the time
/// it was requested (see `crate::clock::judged_at`), but never before the
/// grant of the hold it finds.
///
/// A purchase can be sent before its grant and decided after it: an order
/// retried with a code the user held before (a released coupon is often
/// granted to the same user again), a code guessed from an earlier release.
/// Dated at its request, the log would say the coupon was redeemed before it
/// was held, and a rebuild, which applies the log in time order, would
/// disagree with the live database. Judged at the grant instead, it is
/// decided against the hold it actually found, which is what happened.
pub fn judged_at(coupon: Option<&CouponView>, requested_at: DateTime<Utc>) -> DateTime<Utc> {
    match coupon.filter(|c| c.status == CouponStatus::Held) {
        Some(CouponView {
            held_since: Some(since),
            ..
        }) if *since > requested_at => *since,
        _ => requested_at,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PurchaseRejection {
    HoldExpired,
    NotHolder,
    AlreadyRedeemed,
    UnknownCoupon,
    /// The campaign's minimum order is not met (or no order total was sent).
    OrderBelowMinimum,
    /// The order total is in another currency than the campaign's.
    CurrencyMismatch,
    /// The campaign takes a percent off and the purchase sent no order total.
    OrderTotalRequired,
}

impl PurchaseRejection {
    pub const ALL: [PurchaseRejection; 7] = [
        Self::HoldExpired,
        Self::NotHolder,
        Self::AlreadyRedeemed,
        Self::UnknownCoupon,
        Self::OrderBelowMinimum,
        Self::CurrencyMismatch,
        Self::OrderTotalRequired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::HoldExpired => "hold_expired",
            Self::NotHolder => "not_holder",
            Self::AlreadyRedeemed => "already_redeemed",
            Self::UnknownCoupon => "unknown_coupon",
            Self::OrderBelowMinimum => "order_below_minimum",
            Self::CurrencyMismatch => "currency_mismatch",
            Self::OrderTotalRequired => "order_total_required",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurchaseOutcome {
    Redeemed,
    Rejected(PurchaseRejection),
}

impl PurchaseOutcome {
    pub const ALL: [PurchaseOutcome; 8] = [
        Self::Redeemed,
        Self::Rejected(PurchaseRejection::HoldExpired),
        Self::Rejected(PurchaseRejection::NotHolder),
        Self::Rejected(PurchaseRejection::AlreadyRedeemed),
        Self::Rejected(PurchaseRejection::UnknownCoupon),
        Self::Rejected(PurchaseRejection::OrderBelowMinimum),
        Self::Rejected(PurchaseRejection::CurrencyMismatch),
        Self::Rejected(PurchaseRejection::OrderTotalRequired),
    ];

    /// The stable name used in events, metrics, history and the database
    /// (`purchase_decisions.outcome`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redeemed => "redeemed",
            Self::Rejected(r) => r.as_str(),
        }
    }
}

text_enum!(PurchaseOutcome);

impl std::str::FromStr for PurchaseOutcome {
    type Err = crate::UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| crate::UnknownName {
                what: "purchase outcome",
                name: s.to_owned(),
            })
    }
}

/// `user_held_it_before`: whether this user was ever granted this coupon, so a
/// late buyer hears "your hold expired" rather than "not yours".
pub fn decide(
    coupon: Option<&CouponView>,
    user_id: &UserId,
    user_held_it_before: bool,
    now: DateTime<Utc>,
) -> PurchaseOutcome {
    use PurchaseRejection::*;
    let Some(coupon) = coupon else {
        return PurchaseOutcome::Rejected(UnknownCoupon);
    };
    let holds_it = coupon.holder_user_id.as_ref() == Some(user_id);
    match coupon.status {
        CouponStatus::Redeemed => PurchaseOutcome::Rejected(AlreadyRedeemed),
        CouponStatus::Held if holds_it => match coupon.held_until {
            Some(deadline) if deadline > now => PurchaseOutcome::Redeemed,
            _ => PurchaseOutcome::Rejected(HoldExpired),
        },
        // An expired coupon's campaign ended: whoever held it, the hold is
        // over.
        CouponStatus::Held | CouponStatus::Available | CouponStatus::Expired
            if user_held_it_before =>
        {
            PurchaseOutcome::Rejected(HoldExpired)
        }
        CouponStatus::Held | CouponStatus::Available | CouponStatus::Expired => {
            PurchaseOutcome::Rejected(NotHolder)
        }
    }
}

/// [`decide`], then, for a purchase that would redeem, the campaign's terms
/// ([`crate::campaign::purchase_terms`]): the holder's order must meet the
/// minimum in the campaign's currency. Returns the outcome and, when
/// redeemed, the discount the coupon gives.
pub fn decide_with_campaign(
    coupon: Option<&CouponView>,
    user_id: &UserId,
    user_held_it_before: bool,
    now: DateTime<Utc>,
    campaign: Option<&Campaign>,
    order_total: Option<Money>,
) -> (PurchaseOutcome, Option<Money>) {
    match decide(coupon, user_id, user_held_it_before, now) {
        PurchaseOutcome::Redeemed => match purchase_terms(campaign, order_total) {
            Ok(discount) => (PurchaseOutcome::Redeemed, discount),
            Err(refusal) => (
                PurchaseOutcome::Rejected(match refusal {
                    TermsRefusal::OrderBelowMinimum => PurchaseRejection::OrderBelowMinimum,
                    TermsRefusal::CurrencyMismatch => PurchaseRejection::CurrencyMismatch,
                    TermsRefusal::OrderTotalRequired => PurchaseRejection::OrderTotalRequired,
                }),
                None,
            ),
        },
        rejected => (rejected, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    fn u(id: &str) -> UserId {
        UserId::parse(id).unwrap()
    }

    fn held_by(user: &str, secs_left: i64) -> CouponView {
        CouponView {
            status: CouponStatus::Held,
            holder_user_id: Some(u(user)),
            held_until: Some(now() + chrono::Duration::seconds(secs_left)),
            held_since: Some(now() - chrono::Duration::seconds(60)),
        }
    }

    #[test]
    fn a_purchase_is_never_judged_before_the_grant_it_finds() {
        let mut coupon = held_by("u", 240);
        let granted = now() + chrono::Duration::seconds(2);
        coupon.held_since = Some(granted);
        assert_eq!(
            judged_at(Some(&coupon), now()),
            granted,
            "sent before the grant"
        );
        let later = granted + chrono::Duration::seconds(1);
        assert_eq!(judged_at(Some(&coupon), later), later, "sent after it");
        coupon.status = CouponStatus::Redeemed;
        assert_eq!(
            judged_at(Some(&coupon), now()),
            now(),
            "no hold: its own time"
        );
        assert_eq!(judged_at(None, now()), now());
    }

    #[test]
    fn holder_within_deadline_redeems() {
        assert_eq!(
            decide(Some(&held_by("u", 10)), &u("u"), true, now()),
            PurchaseOutcome::Redeemed
        );
    }

    #[test]
    fn deadline_is_exclusive() {
        assert_eq!(
            decide(Some(&held_by("u", 0)), &u("u"), true, now()),
            PurchaseOutcome::Rejected(PurchaseRejection::HoldExpired)
        );
    }

    #[test]
    fn others_and_late_buyers_are_told_apart() {
        let regranted = held_by("v", 100);
        assert_eq!(
            decide(Some(&regranted), &u("u"), true, now()),
            PurchaseOutcome::Rejected(PurchaseRejection::HoldExpired)
        );
        assert_eq!(
            decide(Some(&regranted), &u("w"), false, now()),
            PurchaseOutcome::Rejected(PurchaseRejection::NotHolder)
        );
        let redeemed = CouponView {
            status: CouponStatus::Redeemed,
            holder_user_id: Some(u("u")),
            held_until: None,
            held_since: None,
        };
        assert_eq!(
            decide(Some(&redeemed), &u("u"), true, now()),
            PurchaseOutcome::Rejected(PurchaseRejection::AlreadyRedeemed)
        );
        assert_eq!(
            decide(None, &u("u"), false, now()),
            PurchaseOutcome::Rejected(PurchaseRejection::UnknownCoupon)
        );
    }

    #[test]
    fn an_expired_coupon_is_never_redeemed() {
        let expired = CouponView {
            status: CouponStatus::Expired,
            holder_user_id: None,
            held_until: None,
            held_since: None,
        };
        // Its last holder hears the hold is over; anyone else, not theirs.
        assert_eq!(
            decide(Some(&expired), &u("u"), true, now()),
            PurchaseOutcome::Rejected(PurchaseRejection::HoldExpired)
        );
        assert_eq!(
            decide(Some(&expired), &u("w"), false, now()),
            PurchaseOutcome::Rejected(PurchaseRejection::NotHolder)
        );
    }

    #[test]
    fn the_campaign_is_judged_only_for_the_holder_in_time() {
        use crate::campaign::{CampaignFields, Discount};
        let eur = |a| Money::parse("m", a, "EUR", false).unwrap();
        let campaign = Campaign::from_stored(CampaignFields {
            discount: Some(Discount::PercentOff(10)),
            min_order: Some(eur(1000)),
            ..CampaignFields::default()
        })
        .unwrap();
        let held = held_by("u", 10);
        let judge = |user: &str, total| {
            decide_with_campaign(Some(&held), &u(user), true, now(), Some(&campaign), total)
        };
        assert_eq!(
            judge("u", Some(eur(999))),
            (
                PurchaseOutcome::Rejected(PurchaseRejection::OrderBelowMinimum),
                None
            )
        );
        assert_eq!(
            judge("u", Some(eur(1999))),
            (PurchaseOutcome::Redeemed, Some(eur(199)))
        );
        // Not the holder: told so, whatever the order.
        assert_eq!(
            judge("v", Some(eur(1))).0,
            PurchaseOutcome::Rejected(PurchaseRejection::HoldExpired)
        );
    }
}
