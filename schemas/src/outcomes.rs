//! The wire enums of the decisions, mapped to the domain's once.
//!
//! `ClaimOutcome` and `PurchaseOutcome` on the wire carry two values the
//! domain never stores (`UNSPECIFIED`, and `INVALID` for a request refused
//! before any rule ran); everything else is the domain's
//! `ClaimOutcomeKind` / `PurchaseOutcome`, whose names are the ones used in
//! the database, the metrics and the history.

use coupon_domain::purchase::PurchaseRejection;
use coupon_domain::{ClaimOutcomeKind, PurchaseOutcome as Purchase};

use crate::{ClaimOutcome, PurchaseOutcome};

impl From<ClaimOutcomeKind> for ClaimOutcome {
    fn from(kind: ClaimOutcomeKind) -> Self {
        match kind {
            ClaimOutcomeKind::Granted => ClaimOutcome::Granted,
            ClaimOutcomeKind::RateLimited => ClaimOutcome::RateLimited,
            ClaimOutcomeKind::Blacklisted => ClaimOutcome::Blacklisted,
            ClaimOutcomeKind::SoldOut => ClaimOutcome::SoldOut,
        }
    }
}

impl ClaimOutcome {
    /// The domain's outcome (`None`: invalid or unspecified).
    pub fn kind(self) -> Option<ClaimOutcomeKind> {
        match self {
            ClaimOutcome::Granted => Some(ClaimOutcomeKind::Granted),
            ClaimOutcome::RateLimited => Some(ClaimOutcomeKind::RateLimited),
            ClaimOutcome::Blacklisted => Some(ClaimOutcomeKind::Blacklisted),
            ClaimOutcome::SoldOut => Some(ClaimOutcomeKind::SoldOut),
            ClaimOutcome::Invalid | ClaimOutcome::Conflict | ClaimOutcome::Unspecified => None,
        }
    }

    /// The outcome of a raw wire value (unknown numbers are unspecified).
    pub fn of(raw: i32) -> Self {
        ClaimOutcome::try_from(raw).unwrap_or(ClaimOutcome::Unspecified)
    }

    /// The outcome's name in the history and the logs.
    pub fn name(self) -> &'static str {
        match self {
            ClaimOutcome::Invalid => "invalid",
            ClaimOutcome::Conflict => "conflict",
            ClaimOutcome::Unspecified => "unspecified",
            other => other.kind().map_or("unspecified", ClaimOutcomeKind::as_str),
        }
    }
}

impl From<Purchase> for PurchaseOutcome {
    fn from(outcome: Purchase) -> Self {
        match outcome {
            Purchase::Redeemed => PurchaseOutcome::Redeemed,
            Purchase::Rejected(PurchaseRejection::HoldExpired) => PurchaseOutcome::HoldExpired,
            Purchase::Rejected(PurchaseRejection::NotHolder) => PurchaseOutcome::NotHolder,
            Purchase::Rejected(PurchaseRejection::AlreadyRedeemed) => {
                PurchaseOutcome::AlreadyRedeemed
            }
            Purchase::Rejected(PurchaseRejection::UnknownCoupon) => PurchaseOutcome::UnknownCoupon,
            Purchase::Rejected(PurchaseRejection::OrderBelowMinimum) => {
                PurchaseOutcome::OrderBelowMinimum
            }
            Purchase::Rejected(PurchaseRejection::CurrencyMismatch) => {
                PurchaseOutcome::CurrencyMismatch
            }
            Purchase::Rejected(PurchaseRejection::OrderTotalRequired) => {
                PurchaseOutcome::OrderTotalRequired
            }
        }
    }
}

impl PurchaseOutcome {
    /// The domain's outcome (`None`: invalid or unspecified).
    pub fn decision(self) -> Option<Purchase> {
        Purchase::ALL
            .into_iter()
            .find(|o| PurchaseOutcome::from(*o) == self)
    }

    /// The outcome of a raw wire value (unknown numbers are unspecified).
    pub fn of(raw: i32) -> Self {
        PurchaseOutcome::try_from(raw).unwrap_or(PurchaseOutcome::Unspecified)
    }

    /// The outcome's name in the history and the logs.
    pub fn name(self) -> &'static str {
        match self {
            PurchaseOutcome::Invalid => "invalid",
            PurchaseOutcome::Conflict => "conflict",
            PurchaseOutcome::Unspecified => "unspecified",
            PurchaseOutcome::Cancelled => "cancelled",
            other => other.decision().map_or("unspecified", Purchase::as_str),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_outcomes_round_trip_through_the_wire() {
        for kind in ClaimOutcomeKind::ALL {
            assert_eq!(ClaimOutcome::from(kind).kind(), Some(kind));
            assert_eq!(ClaimOutcome::from(kind).name(), kind.as_str());
        }
        for outcome in Purchase::ALL {
            assert_eq!(PurchaseOutcome::from(outcome).decision(), Some(outcome));
            assert_eq!(PurchaseOutcome::from(outcome).name(), outcome.as_str());
        }
        assert_eq!(ClaimOutcome::Invalid.kind(), None);
        assert_eq!(PurchaseOutcome::of(99), PurchaseOutcome::Unspecified);
    }
}
