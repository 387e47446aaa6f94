//! The `coupons.v1` protobuf events, generated from `schemas/coupons/v1/events.proto`.
//!
//! [`Event`] ties each message to the topic that carries it and gives uniform
//! access to its envelope, so the Kafka adapter can encode, decode and
//! validate any event the same way. [`catalogue`] names every topic, the
//! message it carries and its key, and the roles that read them.

pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/coupons.v1.rs"));
}

mod campaign;
pub mod catalogue;
mod outcomes;

pub use catalogue::{MessageDecoder, RecordKey, Role, TopicEvent, TopicKind};
pub use v1::*;

/// The version producers write into [`Envelope::schema_version`].
pub const SCHEMA_VERSION: u32 = 1;

/// A top-level event: one Kafka record value.
pub trait Event: prost::Message + Default + serde::Serialize + Sized {
    /// Fully qualified protobuf name, as written into `Envelope::event_type`.
    const TYPE_NAME: &'static str;
    /// The largest encoded record a consumer accepts for this message; a
    /// larger one is refused (dead-lettered) before anything reads it. The
    /// bound keeps whatever a consumer stores, echoes or publishes from the
    /// record well inside the broker's record size limit (1 MB by default):
    /// an answer that can never be published would otherwise be retried
    /// forever and stall its partition.
    const MAX_BYTES: usize;
    fn envelope(&self) -> Option<&Envelope>;
    fn envelope_mut(&mut self) -> &mut Option<Envelope>;
}

macro_rules! event {
    ($($ty:ident: $max:expr),* $(,)?) => {$(
        impl Event for $ty {
            const TYPE_NAME: &'static str = concat!("coupons.v1.", stringify!($ty));
            const MAX_BYTES: usize = $max;
            fn envelope(&self) -> Option<&Envelope> {
                self.envelope.as_ref()
            }
            fn envelope_mut(&mut self) -> &mut Option<Envelope> {
                &mut self.envelope
            }
        }
    )*};
}

/// Requests, answers and the other small events: a few ids and a reason.
const SMALL_EVENT: usize = 16 * 1024;

// A chunk of CouponsCreated holds at most 1,000 ids (about 10 KB); a dead
// letter carries up to 256 KiB of the original (see the dead-letter bounds).
event!(
    CouponsCreated: 256 * 1024,
    ClaimRequested: SMALL_EVENT,
    ClaimDecided: SMALL_EVENT,
    PurchaseRequested: SMALL_EVENT,
    PurchaseDecided: SMALL_EVENT,
    HoldExpired: SMALL_EVENT,
    DeadLetter: 512 * 1024,
    BlacklistChanged: SMALL_EVENT,
    CouponExpired: SMALL_EVENT,
    PurchaseCancelled: SMALL_EVENT,
    CampaignEnded: SMALL_EVENT,
    UserProfileUpdated: SMALL_EVENT,
);

/// Builds an envelope for a new event of type `E`.
pub fn new_envelope<E: Event>(
    event_id: String,
    occurred_at_ms: i64,
    producer: &str,
    correlation_id: &str,
) -> Envelope {
    Envelope {
        event_id,
        occurred_at_ms,
        producer: producer.to_owned(),
        schema_version: SCHEMA_VERSION,
        event_type: E::TYPE_NAME.to_owned(),
        correlation_id: correlation_id.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn events_round_trip_through_protobuf() {
        let event = ClaimRequested {
            envelope: Some(new_envelope::<ClaimRequested>(
                "e1".into(),
                42,
                "test",
                "c1",
            )),
            request_id: "r1".into(),
            user_id: "u1".into(),
            category: String::new(),
            answered_sold_out: false,
        };
        let bytes = event.encode_to_vec();
        let back = ClaimRequested::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, event);
        assert_eq!(
            back.envelope.unwrap().event_type,
            "coupons.v1.ClaimRequested"
        );
    }
}
