//! A coupon's life: `available` → `held` (granted to one user until a deadline)
//! → `redeemed` (bought in time), or back to `available` when the hold ends
//! unbought. A coupon of a campaign (`crate::campaign`) also leaves the pool
//! for good when the campaign ends (issue #28): `available` → `expired` at
//! the end, and a hold taken before the end that ends unbought after it
//! goes to `expired` instead of `available` ([`after_hold`]). A cancelled
//! order gives its coupon back: `redeemed` → `available`, or `expired` once
//! its campaign has ended ([`after_cancel`]). `expired` is final: an ended
//! campaign never opens again.

use std::str::FromStr;

use chrono::{DateTime, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CouponStatus {
    Available,
    Held,
    Redeemed,
    /// Its campaign ended: out of the pool for good.
    Expired,
}

impl CouponStatus {
    pub const ALL: [CouponStatus; 4] = [Self::Available, Self::Held, Self::Redeemed, Self::Expired];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Held => "held",
            Self::Redeemed => "redeemed",
            Self::Expired => "expired",
        }
    }

    /// Whether the lifecycle allows going from `self` to `next`.
    pub fn may_become(self, next: CouponStatus) -> bool {
        matches!(
            (self, next),
            (Self::Available, Self::Held)
                | (Self::Held, Self::Redeemed)
                | (Self::Held, Self::Available)
                | (Self::Available, Self::Expired)
                | (Self::Held, Self::Expired)
                | (Self::Redeemed, Self::Available)
                | (Self::Redeemed, Self::Expired)
        )
    }
}

/// When a campaign ended or ends: its `valid_until`, or the time an
/// employee ended it early, whichever comes first (`None`: it never ends).
pub fn campaign_end(
    valid_until: Option<DateTime<Utc>>,
    ended_early_at: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    match (valid_until, ended_early_at) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Where a campaign stands at a moment: what the console shows beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CampaignPhase {
    /// Its window has not opened: no claim gets its coupons yet.
    Scheduled,
    /// Claimable (for the users it is meant for).
    Running,
    /// Past its end ([`campaign_end`]): its coupons are not granted any
    /// more; the available ones are, or are about to be, `expired`.
    Ended,
}

impl CampaignPhase {
    /// The phase at `now` of a campaign opening at `valid_from` and ending
    /// at `end` (see [`campaign_end`]): the claim window is
    /// `valid_from <= now < end`, as the claim statement has it.
    pub fn at(
        valid_from: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Self {
        if end.is_some_and(|end| end <= now) {
            Self::Ended
        } else if valid_from.is_some_and(|from| from > now) {
            Self::Scheduled
        } else {
            Self::Running
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Ended => "ended",
        }
    }
}

/// Where a coupon goes when its hold, with deadline `held_until`, ends
/// unbought: `expired` if its campaign had ended by that deadline (`end`,
/// see [`campaign_end`]), else `available` (a campaign that ends later
/// expires it then, with the rest of its pool). Judged on the deadline, not
/// on when the release runs, so every sweeper, a redelivery and the rebuild
/// decide alike: an early end is written once, at the database's time, so
/// whether it came before a deadline that has passed no longer changes.
pub fn after_hold(end: Option<DateTime<Utc>>, held_until: DateTime<Utc>) -> CouponStatus {
    match end {
        Some(end) if end <= held_until => CouponStatus::Expired,
        _ => CouponStatus::Available,
    }
}

/// Where a redeemed coupon goes when its order is cancelled at `at`: back
/// to the pool while its campaign runs (or when it has none), `expired`
/// once the campaign has ended.
pub fn after_cancel(end: Option<DateTime<Utc>>, at: DateTime<Utc>) -> CouponStatus {
    match end {
        Some(end) if end <= at => CouponStatus::Expired,
        _ => CouponStatus::Available,
    }
}

/// The event id of an available coupon's expiry at its campaign's end:
/// a coupon leaves the pool that way at most once (`expired` is final), so
/// every sweep that sees it publishes the same `CouponExpired` event and a
/// redelivery or a second sweeper adds no second history row.
pub fn campaign_expiry_event_id(code: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("campaign-end:{code}").as_bytes(),
    )
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
    /// Out of the pool for good: its campaign ended (an available coupon at
    /// the end, a hold that ended unbought after it).
    Expired,
    /// A redemption undone: its order was cancelled.
    Cancelled,
}

impl HistoryKind {
    pub const ALL: [HistoryKind; 7] = [
        Self::Created,
        Self::Granted,
        Self::Rejected,
        Self::Redeemed,
        Self::Released,
        Self::Expired,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Granted => "granted",
            Self::Rejected => "rejected",
            Self::Redeemed => "redeemed",
            Self::Released => "released",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
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
        assert!("ended".parse::<HistoryKind>().is_err());
    }

    #[test]
    fn a_campaign_is_scheduled_then_running_then_ended_on_its_window() {
        let t = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        let phase = |from: Option<i64>, end: Option<i64>, now: i64| {
            CampaignPhase::at(from.map(t), end.map(t), t(now))
        };
        assert_eq!(phase(None, None, 0), CampaignPhase::Running);
        assert_eq!(phase(Some(10), Some(20), 9), CampaignPhase::Scheduled);
        assert_eq!(phase(Some(10), Some(20), 10), CampaignPhase::Running);
        assert_eq!(phase(Some(10), Some(20), 19), CampaignPhase::Running);
        assert_eq!(phase(Some(10), Some(20), 20), CampaignPhase::Ended);
        // Ended early, before it opened: ended, not scheduled.
        assert_eq!(phase(Some(10), Some(5), 7), CampaignPhase::Ended);
        assert_eq!(
            campaign_end(Some(t(20)), Some(t(15))).map(|e| e.timestamp()),
            Some(15)
        );
    }

    #[test]
    fn expired_is_final_and_available_cannot_be_redeemed_directly() {
        for next in CouponStatus::ALL {
            assert!(!CouponStatus::Expired.may_become(next));
        }
        assert!(!CouponStatus::Available.may_become(CouponStatus::Redeemed));
        assert!(!CouponStatus::Redeemed.may_become(CouponStatus::Held));
        assert!(CouponStatus::Held.may_become(CouponStatus::Available));
        assert!(CouponStatus::Available.may_become(CouponStatus::Expired));
        assert!(CouponStatus::Held.may_become(CouponStatus::Expired));
        assert!(CouponStatus::Redeemed.may_become(CouponStatus::Available));
    }

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn a_campaign_ends_at_the_earlier_of_its_window_and_an_early_end() {
        assert_eq!(campaign_end(None, None), None);
        assert_eq!(campaign_end(Some(t(10)), None), Some(t(10)));
        assert_eq!(campaign_end(None, Some(t(5))), Some(t(5)));
        assert_eq!(campaign_end(Some(t(10)), Some(t(5))), Some(t(5)));
        assert_eq!(campaign_end(Some(t(10)), Some(t(20))), Some(t(10)));
    }

    #[test]
    fn a_hold_ending_unbought_after_its_campaign_ended_expires_its_coupon() {
        // No campaign end, or one after the deadline: back to the pool.
        assert_eq!(after_hold(None, t(0)), CouponStatus::Available);
        assert_eq!(after_hold(Some(t(1)), t(0)), CouponStatus::Available);
        // The campaign ended before (or at) the deadline: the hold kept its
        // deadline, and its coupon does not come back.
        assert_eq!(after_hold(Some(t(0)), t(0)), CouponStatus::Expired);
        assert_eq!(after_hold(Some(t(-60)), t(0)), CouponStatus::Expired);
    }

    #[test]
    fn a_cancelled_order_returns_its_coupon_while_the_campaign_runs() {
        assert_eq!(after_cancel(None, t(0)), CouponStatus::Available);
        assert_eq!(after_cancel(Some(t(1)), t(0)), CouponStatus::Available);
        assert_eq!(after_cancel(Some(t(0)), t(0)), CouponStatus::Expired);
        assert_eq!(after_cancel(Some(t(-1)), t(0)), CouponStatus::Expired);
    }

    #[test]
    fn a_coupon_expires_under_one_event_id() {
        assert_eq!(
            campaign_expiry_event_id("0AN35HST00000"),
            campaign_expiry_event_id("0AN35HST00000")
        );
        assert_ne!(
            campaign_expiry_event_id("0AN35HST00000"),
            campaign_expiry_event_id("0AN35HST00001")
        );
        assert_ne!(
            campaign_expiry_event_id("0AN35HST00000"),
            release_event_id("h", "0AN35HST00000")
        );
    }
}
