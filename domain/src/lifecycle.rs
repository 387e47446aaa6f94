//! A coupon's life: `available` → `held` (granted to one user until a deadline)
//! → `redeemed` (bought in time), or back to `available` when the hold ends
//! unbought. Nothing else moves a coupon, and `redeemed` is final.

use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CouponStatus {
    Available,
    Held,
    Redeemed,
}

impl CouponStatus {
    pub const ALL: [CouponStatus; 3] = [Self::Available, Self::Held, Self::Redeemed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Held => "held",
            Self::Redeemed => "redeemed",
        }
    }

    /// Whether the lifecycle allows going from `self` to `next`.
    pub fn may_become(self, next: CouponStatus) -> bool {
        matches!(
            (self, next),
            (Self::Available, Self::Held)
                | (Self::Held, Self::Redeemed)
                | (Self::Held, Self::Available)
        )
    }
}

text_enum!(CouponStatus);

/// The event id of a hold's release, derived from the hold: every sweeper
/// that sees the same overdue hold publishes the same `HoldExpired` event,
/// and a grant that ends the overdue hold first records its release under
/// the same id, so the hold has one release in the history whichever path
/// ended it.
pub fn release_event_id(hold_id: &str, code: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("expiry:{code}:{hold_id}").as_bytes(),
    )
}

/// What a `coupon_history` row records: one state change of a coupon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HistoryKind {
    /// Issued (`available`).
    Created,
    /// Held by a user.
    Granted,
    /// A claim or purchase refused (no state changed).
    Rejected,
    /// Bought in time.
    Redeemed,
    /// A hold ended unbought (back to `available`).
    Released,
}

impl HistoryKind {
    pub const ALL: [HistoryKind; 5] = [
        Self::Created,
        Self::Granted,
        Self::Rejected,
        Self::Redeemed,
        Self::Released,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Granted => "granted",
            Self::Rejected => "rejected",
            Self::Redeemed => "redeemed",
            Self::Released => "released",
        }
    }
}

text_enum!(HistoryKind);

impl FromStr for HistoryKind {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "history kind",
                name: s.to_owned(),
            })
    }
}

/// A stored name that none of a domain enum's values has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {name:?}")]
pub struct UnknownName {
    pub what: &'static str,
    pub name: String,
}

impl FromStr for CouponStatus {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "coupon status",
                name: s.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_text() {
        for status in CouponStatus::ALL {
            assert_eq!(status.as_str().parse::<CouponStatus>().unwrap(), status);
        }
        assert!("used".parse::<CouponStatus>().is_err());
        for kind in HistoryKind::ALL {
            assert_eq!(kind.as_str().parse::<HistoryKind>().unwrap(), kind);
        }
        assert!("expired".parse::<HistoryKind>().is_err());
    }

    #[test]
    fn redeemed_is_final_and_available_cannot_be_redeemed_directly() {
        for next in CouponStatus::ALL {
            assert!(!CouponStatus::Redeemed.may_become(next));
        }
        assert!(!CouponStatus::Available.may_become(CouponStatus::Redeemed));
        assert!(CouponStatus::Held.may_become(CouponStatus::Available));
    }
}
