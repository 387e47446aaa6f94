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
    BlacklistChanged, CampaignEnded, ClaimDecided, ClaimRequested, CouponExpired, CouponsCreated,
    DeadLetter, Envelope, Event, HoldExpired, PurchaseCancelled, PurchaseDecided,
    PurchaseRequested, UserProfileUpdated,
};

/// One of the topics: the seven of the spec, plus `blacklist` and `users`
/// (profiles).
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
    Users,
}

/// A record decoded as the message its topic carries.
#[derive(Debug, Clone, PartialEq)]
pub enum TopicEvent {
    Created(CouponsCreated),
    ClaimRequested(ClaimRequested),
    ClaimDecided(ClaimDecided),
    PurchaseRequested(PurchaseRequested),
    PurchaseDecided(PurchaseDecided),
    HoldExpired(HoldExpired),
    DeadLetter(DeadLetter),
    BlacklistChanged(BlacklistChanged),
    /// On `expirations`, beside `HoldExpired`: a campaign's end.
    CouponExpired(CouponExpired),
    /// On `purchases`, beside `PurchaseRequested`: an order cancelled.
    PurchaseCancelled(PurchaseCancelled),
    /// On `expirations`: a campaign ended early.
    CampaignEnded(CampaignEnded),
    UserProfileUpdated(UserProfileUpdated),
}

/// How a record's bytes become one message type (the platform's decoder
/// checks size, protobuf and envelope); [`TopicKind::decode`] says which
/// type.
pub trait MessageDecoder {
    type Error;
    fn decode<E: Event>(self) -> Result<E, Self::Error>;
    /// The record's value, for a topic that carries several messages: its
    /// envelope's `event_type` says which ([`event_type_of`]). `None`: the
    /// topic's first message is decoded.
    fn value(&self) -> Option<&[u8]> {
        None
    }
}

/// Any event's envelope alone: it is field 1 of every message, so every
/// record decodes as this (the other fields skipped as unknown).
#[derive(Clone, PartialEq, prost::Message)]
struct Head {
    #[prost(message, optional, tag = "1")]
    envelope: Option<Envelope>,
}

/// The `event_type` a record's envelope names, if it decodes that far.
pub fn event_type_of(value: &[u8]) -> Option<String> {
    <Head as prost::Message>::decode(value)
        .ok()?
        .envelope
        .map(|e| e.event_type)
}

impl TopicEvent {
    pub fn envelope(&self) -> Option<&crate::Envelope> {
        match self {
            TopicEvent::Created(e) => e.envelope(),
            TopicEvent::ClaimRequested(e) => e.envelope(),
            TopicEvent::ClaimDecided(e) => e.envelope(),
            TopicEvent::PurchaseRequested(e) => e.envelope(),
            TopicEvent::PurchaseDecided(e) => e.envelope(),
            TopicEvent::HoldExpired(e) => e.envelope(),
            TopicEvent::DeadLetter(e) => e.envelope(),
            TopicEvent::BlacklistChanged(e) => e.envelope(),
            TopicEvent::CouponExpired(e) => e.envelope(),
            TopicEvent::PurchaseCancelled(e) => e.envelope(),
            TopicEvent::CampaignEnded(e) => e.envelope(),
            TopicEvent::UserProfileUpdated(e) => e.envelope(),
        }
    }

    pub fn take_envelope(self) -> Option<crate::Envelope> {
        match self {
            TopicEvent::Created(e) => e.envelope,
            TopicEvent::ClaimRequested(e) => e.envelope,
            TopicEvent::ClaimDecided(e) => e.envelope,
            TopicEvent::PurchaseRequested(e) => e.envelope,
            TopicEvent::PurchaseDecided(e) => e.envelope,
            TopicEvent::HoldExpired(e) => e.envelope,
            TopicEvent::DeadLetter(e) => e.envelope,
            TopicEvent::BlacklistChanged(e) => e.envelope,
            TopicEvent::CouponExpired(e) => e.envelope,
            TopicEvent::PurchaseCancelled(e) => e.envelope,
            TopicEvent::CampaignEnded(e) => e.envelope,
            TopicEvent::UserProfileUpdated(e) => e.envelope,
        }
    }
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
    pub const ALL: [TopicKind; 9] = [
        TopicKind::Created,
        TopicKind::Claims,
        TopicKind::ClaimResults,
        TopicKind::Purchases,
        TopicKind::PurchaseResults,
        TopicKind::Expirations,
        TopicKind::DeadLetter,
        TopicKind::Blacklist,
        TopicKind::Users,
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
            TopicKind::Users => "users",
        }
    }

    /// Every message the topic's records may carry: its first
    /// ([`TopicKind::type_name`]), and the others its envelope's
    /// `event_type` selects.
    pub fn type_names(self) -> &'static [&'static str] {
        match self {
            TopicKind::Purchases => &[PurchaseRequested::TYPE_NAME, PurchaseCancelled::TYPE_NAME],
            TopicKind::Expirations => &[
                HoldExpired::TYPE_NAME,
                CouponExpired::TYPE_NAME,
                CampaignEnded::TYPE_NAME,
            ],
            _ => &[],
        }
    }

    /// The protobuf message every record of this topic carries (the first,
    /// for a topic that carries several), read off
    /// [`TopicKind::decode`] (so the map is written once): a decoder that,
    /// asked for a message type, answers with its name instead of a message.
    pub fn type_name(self) -> &'static str {
        struct TypeName;
        impl MessageDecoder for TypeName {
            type Error = &'static str;
            fn decode<E: Event>(self) -> Result<E, &'static str> {
                Err(E::TYPE_NAME)
            }
        }
        self.decode(TypeName).err().unwrap_or_default()
    }

    /// Decodes a record of this topic as the message it carries: the one
    /// map from a topic to its message that every reader of several topics
    /// (the replay, the rebuild, the audit, the history sink) goes through.
    /// On a topic that carries several messages, the envelope's
    /// `event_type` picks one; any other type is decoded as the topic's first
    /// message, whose decoder refuses it (a foreign producer's record of the
    /// wrong type is dead-lettered, as on any topic).
    pub fn decode<D: MessageDecoder>(self, decoder: D) -> Result<TopicEvent, D::Error> {
        let second = |name: &str| decoder.value().and_then(event_type_of).as_deref() == Some(name);
        Ok(match self {
            TopicKind::Purchases if second(PurchaseCancelled::TYPE_NAME) => {
                TopicEvent::PurchaseCancelled(decoder.decode()?)
            }
            TopicKind::Expirations if second(CouponExpired::TYPE_NAME) => {
                TopicEvent::CouponExpired(decoder.decode()?)
            }
            TopicKind::Expirations if second(CampaignEnded::TYPE_NAME) => {
                TopicEvent::CampaignEnded(decoder.decode()?)
            }
            TopicKind::Created => TopicEvent::Created(decoder.decode()?),
            TopicKind::Claims => TopicEvent::ClaimRequested(decoder.decode()?),
            TopicKind::ClaimResults => TopicEvent::ClaimDecided(decoder.decode()?),
            TopicKind::Purchases => TopicEvent::PurchaseRequested(decoder.decode()?),
            TopicKind::PurchaseResults => TopicEvent::PurchaseDecided(decoder.decode()?),
            TopicKind::Expirations => TopicEvent::HoldExpired(decoder.decode()?),
            TopicKind::DeadLetter => TopicEvent::DeadLetter(decoder.decode()?),
            TopicKind::Blacklist => TopicEvent::BlacklistChanged(decoder.decode()?),
            TopicKind::Users => TopicEvent::UserProfileUpdated(decoder.decode()?),
        })
    }

    /// What the topic's records are keyed by.
    pub fn key(self) -> RecordKey {
        match self {
            TopicKind::Created => RecordKey::BatchId,
            TopicKind::Claims
            | TopicKind::ClaimResults
            | TopicKind::Purchases
            | TopicKind::PurchaseResults
            | TopicKind::Blacklist
            | TopicKind::Users => RecordKey::UserId,
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
    Profiles,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Gateway,
        Role::Coupons,
        Role::Claims,
        Role::Purchases,
        Role::Expiry,
        Role::History,
        Role::Profiles,
    ];
    /// The roles that read in a consumer group of their own.
    pub const CONSUMERS: [Role; 6] = [
        Role::Coupons,
        Role::Claims,
        Role::Purchases,
        Role::Expiry,
        Role::History,
        Role::Profiles,
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
            Role::Profiles => "profiles",
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
            Role::Profiles => &[TopicKind::Users],
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

    /// Decodes with prost alone: enough to see which message a topic maps to.
    struct Prost<'a>(&'a [u8]);
    impl MessageDecoder for Prost<'_> {
        type Error = prost::DecodeError;
        fn decode<E: Event>(self) -> Result<E, prost::DecodeError> {
            E::decode(self.0)
        }
    }

    #[test]
    fn each_topic_decodes_as_the_message_it_names() {
        let mut names = std::collections::HashSet::new();
        for kind in TopicKind::ALL {
            assert!(kind.type_name().starts_with("coupons.v1."), "{kind}");
            assert!(names.insert(kind.type_name()), "{kind} shares its message");
            let event = kind.decode(Prost(&[])).expect("an empty message decodes");
            assert_eq!(event.envelope(), None, "{kind}");
            assert_eq!(event.take_envelope(), None, "{kind}");
        }
        let created = crate::CouponsCreated {
            batch_id: "b".into(),
            ..Default::default()
        };
        let bytes = prost::Message::encode_to_vec(&created);
        assert_eq!(
            TopicKind::Created.decode(Prost(&bytes)),
            Ok(TopicEvent::Created(created))
        );
    }

    /// Decodes with prost and shows its value, as the platform's decoder.
    struct Typed<'a>(&'a [u8]);
    impl MessageDecoder for Typed<'_> {
        type Error = prost::DecodeError;
        fn decode<E: Event>(self) -> Result<E, prost::DecodeError> {
            E::decode(self.0)
        }
        fn value(&self) -> Option<&[u8]> {
            Some(self.0)
        }
    }

    fn typed<E: Event>(mut event: E) -> Vec<u8> {
        *event.envelope_mut() = Some(crate::new_envelope::<E>("e".into(), 1, "t", ""));
        prost::Message::encode_to_vec(&event)
    }

    #[test]
    fn a_topic_of_two_messages_decodes_by_the_envelope_type() {
        let cancel = typed(crate::PurchaseCancelled {
            order_id: "o1".into(),
            ..Default::default()
        });
        assert!(matches!(
            TopicKind::Purchases.decode(Typed(&cancel)),
            Ok(TopicEvent::PurchaseCancelled(e)) if e.order_id == "o1"
        ));
        let request = typed(crate::PurchaseRequested::default());
        assert!(matches!(
            TopicKind::Purchases.decode(Typed(&request)),
            Ok(TopicEvent::PurchaseRequested(_))
        ));
        let ended = typed(crate::CouponExpired {
            coupon_code: "c".into(),
            ..Default::default()
        });
        assert!(matches!(
            TopicKind::Expirations.decode(Typed(&ended)),
            Ok(TopicEvent::CouponExpired(e)) if e.coupon_code == "c"
        ));
        // A type a topic does not carry is read as its first message (whose
        // envelope check then refuses it), never as the other topic's.
        assert!(matches!(
            TopicKind::Expirations.decode(Typed(&cancel)),
            Ok(TopicEvent::HoldExpired(_))
        ));
        assert!(matches!(
            TopicKind::Created.decode(Typed(&ended)),
            Ok(TopicEvent::Created(_))
        ));
        for kind in [TopicKind::Purchases, TopicKind::Expirations] {
            assert_eq!(kind.type_names()[0], kind.type_name());
        }
        assert_eq!(
            event_type_of(&ended).as_deref(),
            Some("coupons.v1.CouponExpired")
        );
        assert_eq!(event_type_of(b"\xff"), None);
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
