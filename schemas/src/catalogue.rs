//! The topic catalogue: every topic the system uses, the message each of its
//! records carries and what its records are keyed by, and the consumer roles
//! with the topics each one reads.
//!
//! This is the one place these facts are written. Topic names are
//! `<prefix>.<short name>` (see `coupon_platform::Topics`); consumer groups,
//! the lag gauges, `couponctl status`, the replay and the rebuild all take
//! their lists from here, so adding a topic or a role is one edit.

use std::fmt;
use std::str::FromStr;

use crate::{
    BlacklistChanged, ClaimDecided, ClaimRequested, CouponsCreated, DeadLetter, Event, HoldExpired,
    PurchaseDecided, PurchaseRequested,
};

/// One of the topics: the seven of the spec, plus `blacklist`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TopicKind {
    Created,
    Claims,
    ClaimResults,
    Purchases,
    PurchaseResults,
    Expirations,
    DeadLetter,
    Blacklist,
}

/// What a topic's records are keyed by (so one key's records stay in order
/// on one partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKey {
    /// The batch id of a coupon release.
    BatchId,
    /// The user the request or decision is about.
    UserId,
    /// The coupon's code.
    CouponCode,
    /// The key of the record that was set aside.
    OriginalKey,
}

impl TopicKind {
    pub const ALL: [TopicKind; 8] = [
        TopicKind::Created,
        TopicKind::Claims,
        TopicKind::ClaimResults,
        TopicKind::Purchases,
        TopicKind::PurchaseResults,
        TopicKind::Expirations,
        TopicKind::DeadLetter,
        TopicKind::Blacklist,
    ];

    /// The topic's name without the prefix, e.g. `claim-results`.
    pub fn short(self) -> &'static str {
        match self {
            TopicKind::Created => "created",
            TopicKind::Claims => "claims",
            TopicKind::ClaimResults => "claim-results",
            TopicKind::Purchases => "purchases",
            TopicKind::PurchaseResults => "purchase-results",
            TopicKind::Expirations => "expirations",
            TopicKind::DeadLetter => "dead-letter",
            TopicKind::Blacklist => "blacklist",
        }
    }

    /// The protobuf message every record of this topic carries.
    pub fn type_name(self) -> &'static str {
        match self {
            TopicKind::Created => CouponsCreated::TYPE_NAME,
            TopicKind::Claims => ClaimRequested::TYPE_NAME,
            TopicKind::ClaimResults => ClaimDecided::TYPE_NAME,
            TopicKind::Purchases => PurchaseRequested::TYPE_NAME,
            TopicKind::PurchaseResults => PurchaseDecided::TYPE_NAME,
            TopicKind::Expirations => HoldExpired::TYPE_NAME,
            TopicKind::DeadLetter => DeadLetter::TYPE_NAME,
            TopicKind::Blacklist => BlacklistChanged::TYPE_NAME,
        }
    }

    /// What the topic's records are keyed by.
    pub fn key(self) -> RecordKey {
        match self {
            TopicKind::Created => RecordKey::BatchId,
            TopicKind::Claims
            | TopicKind::ClaimResults
            | TopicKind::Purchases
            | TopicKind::PurchaseResults
            | TopicKind::Blacklist => RecordKey::UserId,
            TopicKind::Expirations => RecordKey::CouponCode,
            TopicKind::DeadLetter => RecordKey::OriginalKey,
        }
    }

    /// Requests judged at the time the broker appended them
    /// (`LogAppendTime`): no producer may set their timestamp.
    pub fn broker_timestamped(self) -> bool {
        matches!(self, TopicKind::Claims | TopicKind::Purchases)
    }
}

impl fmt::Display for TopicKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

impl FromStr for TopicKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        TopicKind::ALL
            .into_iter()
            .find(|k| k.short() == wanted)
            .ok_or_else(|| {
                let names: Vec<&str> = TopicKind::ALL.iter().map(|k| k.short()).collect();
                format!("unknown topic {wanted:?} (one of: {})", names.join(", "))
            })
    }
}

/// One role a process can run: the gateway, or one of the consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Gateway,
    Coupons,
    Claims,
    Purchases,
    Expiry,
    History,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Gateway,
        Role::Coupons,
        Role::Claims,
        Role::Purchases,
        Role::Expiry,
        Role::History,
    ];
    /// The roles that read in a consumer group of their own.
    pub const CONSUMERS: [Role; 5] = [
        Role::Coupons,
        Role::Claims,
        Role::Purchases,
        Role::Expiry,
        Role::History,
    ];

    /// The role's name: `couponctl consume <name>`, and its consumer group
    /// is `<prefix>.<name>-processor`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Coupons => "coupons",
            Role::Claims => "claims",
            Role::Purchases => "purchases",
            Role::Expiry => "expiry",
            Role::History => "history",
        }
    }

    /// The topics the role reads. The consumers subscribe to exactly these,
    /// and `couponctl status` and the lag gauges measure them. The gateway
    /// reads the decisions it waits for (outside any shared group).
    pub fn topics(self) -> &'static [TopicKind] {
        match self {
            Role::Gateway => &[TopicKind::ClaimResults, TopicKind::PurchaseResults],
            Role::Coupons => &[TopicKind::Created],
            Role::Claims => &[TopicKind::Claims],
            Role::Purchases => &[TopicKind::Purchases],
            Role::Expiry => &[TopicKind::Expirations],
            Role::History => &[
                TopicKind::Created,
                TopicKind::ClaimResults,
                TopicKind::PurchaseResults,
            ],
        }
    }

    pub fn is_consumer(self) -> bool {
        self != Role::Gateway
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown role {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in TopicKind::ALL {
            assert_eq!(kind.short().parse::<TopicKind>().unwrap(), kind);
        }
        for role in Role::ALL {
            assert_eq!(role.name().parse::<Role>().unwrap(), role);
        }
        assert!("bogus".parse::<Role>().is_err());
        assert!("bogus".parse::<TopicKind>().is_err());
    }

    #[test]
    fn every_consumer_reads_something_and_claims_are_keyed_by_user() {
        for role in Role::CONSUMERS {
            assert!(!role.topics().is_empty(), "{role}");
        }
        assert_eq!(TopicKind::Claims.key(), RecordKey::UserId);
        assert_eq!(TopicKind::Purchases.key(), RecordKey::UserId);
    }
}
