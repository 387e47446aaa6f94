//! The replay's JSON line for one record, written straight from the decoded
//! message into a byte buffer.
//!
//! Why by hand: the first encoder built a `serde_json::Value` tree per record
//! (a `BTreeMap` per object, a `String` per key and value) and then wrote it
//! out; `perf` put a third of the replay's CPU in `malloc`/`free`/`memmove`.
//! This one writes the same bytes with no allocation per record.
//!
//! The format is the one analysts rely on and must not move: compact JSON,
//! the keys of every object in byte order (as a `serde_json::Map` without
//! `preserve_order` sorts them), strings escaped by `serde_json`, enums by
//! their protobuf name (a number this schema does not know stays a number),
//! bytes in base64. The field lists below are in that order; debug builds
//! check it on every key, and the unit tests compare every message type byte
//! for byte with the `serde_json::Value` encoder (which follows the derived
//! `Serialize`, so a field added to the schema and missing here fails them).

use base64::Engine as _;

use coupon_platform::kafka::DecodeError;
use coupon_schemas::{
    BlacklistChanged, Campaign, CampaignEnded, ClaimDecided, ClaimOutcome, ClaimRequested,
    CouponExpired, CouponsCreated, DeadLetter, Envelope, HoldExpired, Money, PurchaseCancelled,
    PurchaseDecided, PurchaseOutcome, PurchaseRequested,
};

use crate::replay::{TopicEvent, TopicKind};

/// A record as read from the log, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct RawRecord<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub timestamp_ms: Option<i64>,
}

/// Where the payload object sits in the line just written (Parquet keeps it
/// as a column of its own).
pub type PayloadSpan = Option<std::ops::Range<usize>>;

/// Appends the JSON line of one record (without the trailing newline) to
/// `out`, and returns where its payload object is in `out`.
pub fn write_line(
    out: &mut Vec<u8>,
    kind: TopicKind,
    record: &RawRecord<'_>,
    decoded: &Result<TopicEvent, DecodeError>,
) -> PayloadSpan {
    let mut o = Obj::open(out);
    let mut payload = None;
    if let Ok(event) = decoded {
        o.key("envelope");
        envelope(o.out, event.envelope());
    }
    if let Err(error) = decoded {
        o.key("error");
        // A `Display` into a short-lived string: undecodable records are rare.
        string(o.out, &error.to_string());
    }
    o.key("key");
    let binary_key = match record.key {
        None => {
            o.out.extend_from_slice(b"null");
            None
        }
        Some(key) => match std::str::from_utf8(key) {
            Ok(text) => {
                string(o.out, text);
                None
            }
            Err(_) => {
                o.out.extend_from_slice(b"null");
                Some(key)
            }
        },
    };
    if let Some(key) = binary_key {
        o.key("key_base64");
        base64(o.out, key);
    }
    o.key("offset");
    int(o.out, record.offset);
    o.key("partition");
    int(o.out, record.partition);
    if let Ok(event) = decoded {
        o.key("payload");
        let start = o.out.len();
        event_payload(o.out, event);
        payload = Some(start..o.out.len());
    }
    o.key("timestamp_ms");
    match record.timestamp_ms.filter(|t| *t >= 0) {
        Some(t) => int(o.out, t),
        None => o.out.extend_from_slice(b"null"),
    }
    o.key("topic");
    string(o.out, record.topic);
    o.key("topic_kind");
    string(o.out, kind.short());
    if decoded.is_err() {
        o.key("value_base64");
        match record.value {
            Some(value) => base64(o.out, value),
            None => o.out.extend_from_slice(b"null"),
        }
    }
    o.close();
    payload
}

fn envelope(out: &mut Vec<u8>, envelope: Option<&Envelope>) {
    let Some(e) = envelope else {
        out.extend_from_slice(b"null");
        return;
    };
    let mut o = Obj::open(out);
    o.str("correlation_id", &e.correlation_id);
    o.str("event_id", &e.event_id);
    o.str("event_type", &e.event_type);
    o.int("occurred_at_ms", e.occurred_at_ms);
    o.str("producer", &e.producer);
    o.int("schema_version", e.schema_version);
    o.close();
}

/// Appends only the payload object of a decoded record to `out` (the bytes
/// [`write_line`] puts under `payload`), and returns where it is: all a
/// Parquet row keeps of the line. `None` for an undecodable record.
pub fn write_payload(out: &mut Vec<u8>, decoded: &Result<TopicEvent, DecodeError>) -> PayloadSpan {
    let event = decoded.as_ref().ok()?;
    let start = out.len();
    event_payload(out, event);
    Some(start..out.len())
}

/// The message without its envelope.
fn event_payload(out: &mut Vec<u8>, event: &TopicEvent) {
    let mut o = Obj::open(out);
    match event {
        TopicEvent::Created(e) => created(&mut o, e),
        TopicEvent::ClaimRequested(e) => claim_requested(&mut o, e),
        TopicEvent::ClaimDecided(e) => claim_decided(&mut o, e),
        TopicEvent::PurchaseRequested(e) => purchase_requested(&mut o, e),
        TopicEvent::PurchaseDecided(e) => purchase_decided(&mut o, e),
        TopicEvent::HoldExpired(e) => hold_expired(&mut o, e),
        TopicEvent::DeadLetter(e) => dead_letter(&mut o, e),
        TopicEvent::BlacklistChanged(e) => blacklist_changed(&mut o, e),
        TopicEvent::CouponExpired(e) => coupon_expired(&mut o, e),
        TopicEvent::PurchaseCancelled(e) => purchase_cancelled(&mut o, e),
        TopicEvent::CampaignEnded(e) => campaign_ended(&mut o, e),
        TopicEvent::UserProfileUpdated(e) => user_profile_updated(&mut o, e),
    }
    o.close();
}

fn created(o: &mut Obj<'_>, e: &CouponsCreated) {
    let CouponsCreated {
        envelope: _,
        batch_id,
        employee_id,
        category,
        coupon_ids,
        chunk_index,
        chunk_count,
        campaign: terms,
    } = e;
    o.str("batch_id", batch_id);
    o.key("campaign");
    campaign(o.out, terms.as_ref());
    o.str("category", category);
    o.int("chunk_count", *chunk_count);
    o.int("chunk_index", *chunk_index);
    o.key("coupon_ids");
    o.out.push(b'[');
    for (i, id) in coupon_ids.iter().enumerate() {
        if i > 0 {
            o.out.push(b',');
        }
        int(o.out, *id);
    }
    o.out.push(b']');
    o.str("employee_id", employee_id);
}

fn claim_requested(o: &mut Obj<'_>, e: &ClaimRequested) {
    let ClaimRequested {
        envelope: _,
        request_id,
        user_id,
        category,
        answered_sold_out,
    } = e;
    o.bool("answered_sold_out", *answered_sold_out);
    o.str("category", category);
    o.str("request_id", request_id);
    o.str("user_id", user_id);
}

fn claim_decided(o: &mut Obj<'_>, e: &ClaimDecided) {
    let ClaimDecided {
        envelope: _,
        request_id,
        user_id,
        outcome,
        coupon_code,
        category,
        expires_at_ms,
        repeated,
        retry_at_ms,
        blacklisted_until_ms,
        reason,
        campaign: terms,
    } = e;
    o.int("blacklisted_until_ms", *blacklisted_until_ms);
    o.key("campaign");
    campaign(o.out, terms.as_ref());
    o.str("category", category);
    o.str("coupon_code", coupon_code);
    o.int("expires_at_ms", *expires_at_ms);
    o.key("outcome");
    match ClaimOutcome::try_from(*outcome) {
        Ok(name) => string(o.out, name.as_str_name()),
        Err(_) => int(o.out, *outcome),
    }
    o.str("reason", reason);
    o.bool("repeated", *repeated);
    o.str("request_id", request_id);
    o.int("retry_at_ms", *retry_at_ms);
    o.str("user_id", user_id);
}

fn purchase_requested(o: &mut Obj<'_>, e: &PurchaseRequested) {
    let PurchaseRequested {
        envelope: _,
        request_id,
        user_id,
        coupon_code,
        order_id,
        order_total,
    } = e;
    o.str("coupon_code", coupon_code);
    o.str("order_id", order_id);
    o.key("order_total");
    money(o.out, order_total.as_ref());
    o.str("request_id", request_id);
    o.str("user_id", user_id);
}

fn purchase_decided(o: &mut Obj<'_>, e: &PurchaseDecided) {
    let PurchaseDecided {
        envelope: _,
        request_id,
        user_id,
        coupon_code,
        order_id,
        outcome,
        redeemed_at_ms,
        reason,
        repeated,
        order_total,
        discount_amount,
        coupon_status,
    } = e;
    o.str("coupon_code", coupon_code);
    o.str("coupon_status", coupon_status);
    o.key("discount_amount");
    money(o.out, discount_amount.as_ref());
    o.str("order_id", order_id);
    o.key("order_total");
    money(o.out, order_total.as_ref());
    o.key("outcome");
    match PurchaseOutcome::try_from(*outcome) {
        Ok(name) => string(o.out, name.as_str_name()),
        Err(_) => int(o.out, *outcome),
    }
    o.str("reason", reason);
    o.int("redeemed_at_ms", *redeemed_at_ms);
    o.bool("repeated", *repeated);
    o.str("request_id", request_id);
    o.str("user_id", user_id);
}

fn hold_expired(o: &mut Obj<'_>, e: &HoldExpired) {
    let HoldExpired {
        envelope: _,
        coupon_code,
        user_id,
        hold_id,
        held_until_ms,
        campaign_ended_at_ms,
    } = e;
    o.int("campaign_ended_at_ms", *campaign_ended_at_ms);
    o.str("coupon_code", coupon_code);
    o.int("held_until_ms", *held_until_ms);
    o.str("hold_id", hold_id);
    o.str("user_id", user_id);
}

fn coupon_expired(o: &mut Obj<'_>, e: &CouponExpired) {
    let CouponExpired {
        envelope: _,
        coupon_code,
        batch_id,
        campaign_ended_at_ms,
    } = e;
    o.str("batch_id", batch_id);
    o.int("campaign_ended_at_ms", *campaign_ended_at_ms);
    o.str("coupon_code", coupon_code);
}

fn campaign_ended(o: &mut Obj<'_>, e: &CampaignEnded) {
    let CampaignEnded {
        envelope: _,
        batch_id,
        ended_at_ms,
        ended_by,
    } = e;
    o.str("batch_id", batch_id);
    o.int("ended_at_ms", *ended_at_ms);
    o.str("ended_by", ended_by);
}

fn purchase_cancelled(o: &mut Obj<'_>, e: &PurchaseCancelled) {
    let PurchaseCancelled {
        envelope: _,
        request_id,
        user_id,
        order_id,
    } = e;
    o.str("order_id", order_id);
    o.str("request_id", request_id);
    o.str("user_id", user_id);
}

fn dead_letter(o: &mut Obj<'_>, e: &DeadLetter) {
    let DeadLetter {
        envelope: _,
        source_topic,
        source_partition,
        source_offset,
        original_key,
        original_value,
        reason,
        consumer,
        original_size,
        original_truncated,
    } = e;
    o.str("consumer", consumer);
    o.key("original_key");
    base64(o.out, original_key);
    o.int("original_size", *original_size);
    o.bool("original_truncated", *original_truncated);
    o.key("original_value");
    base64(o.out, original_value);
    o.str("reason", reason);
    o.int("source_offset", *source_offset);
    o.int("source_partition", *source_partition);
    o.str("source_topic", source_topic);
}

fn blacklist_changed(o: &mut Obj<'_>, e: &BlacklistChanged) {
    let BlacklistChanged {
        envelope: _,
        user_id,
        blacklisted,
        blacklisted_until_ms,
        reason,
        blacklisted_at_ms,
        source,
        changed_by,
    } = e;
    o.bool("blacklisted", *blacklisted);
    o.int("blacklisted_at_ms", *blacklisted_at_ms);
    o.int("blacklisted_until_ms", *blacklisted_until_ms);
    o.str("changed_by", changed_by);
    o.str("reason", reason);
    o.str("source", source);
    o.str("user_id", user_id);
}

fn user_profile_updated(o: &mut Obj<'_>, e: &coupon_schemas::UserProfileUpdated) {
    let coupon_schemas::UserProfileUpdated {
        envelope: _,
        user_id,
        name,
        dob,
        location,
        updated_at_ms,
    } = e;
    o.str("dob", dob);
    o.str("location", location);
    o.str("name", name);
    o.int("updated_at_ms", *updated_at_ms);
    o.str("user_id", user_id);
}

/// One JSON object being written: commas between members and, in debug
/// builds, a check that the keys come in byte order.
struct Obj<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    #[cfg(debug_assertions)]
    last: &'static str,
}

impl<'a> Obj<'a> {
    fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Obj {
            out,
            first: true,
            #[cfg(debug_assertions)]
            last: "",
        }
    }

    /// Keys are plain ASCII names: written without escaping.
    fn key(&mut self, key: &'static str) {
        #[cfg(debug_assertions)]
        {
            debug_assert!(
                self.first || self.last < key,
                "JSON keys out of order: {:?} after {:?}",
                key,
                self.last
            );
            self.last = key;
        }
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn str(&mut self, key: &'static str, value: &str) {
        self.key(key);
        string(self.out, value);
    }

    fn int(&mut self, key: &'static str, value: impl itoa::Integer) {
        self.key(key);
        int(self.out, value);
    }

    fn bool(&mut self, key: &'static str, value: bool) {
        self.key(key);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    fn close(self) {
        self.out.push(b'}');
    }
}

/// An optional `Money` (`null` when absent).
fn money(out: &mut Vec<u8>, money: Option<&Money>) {
    let Some(m) = money else {
        out.extend_from_slice(b"null");
        return;
    };
    let mut o = Obj::open(out);
    o.int("amount", m.amount);
    o.str("currency", &m.currency);
    o.close();
}

/// An optional `Campaign` (`null` when absent).
fn campaign(out: &mut Vec<u8>, campaign: Option<&Campaign>) {
    let Some(c) = campaign else {
        out.extend_from_slice(b"null");
        return;
    };
    let Campaign {
        name,
        percent_off,
        amount_off,
        min_order,
        valid_from_ms,
        valid_until_ms,
        locations,
        min_age,
    } = c;
    let mut o = Obj::open(out);
    o.key("amount_off");
    money(o.out, amount_off.as_ref());
    o.key("locations");
    o.out.push(b'[');
    for (i, location) in locations.iter().enumerate() {
        if i > 0 {
            o.out.push(b',');
        }
        string(o.out, location);
    }
    o.out.push(b']');
    o.int("min_age", *min_age);
    o.key("min_order");
    money(o.out, min_order.as_ref());
    o.str("name", name);
    o.int("percent_off", *percent_off);
    o.int("valid_from_ms", *valid_from_ms);
    o.int("valid_until_ms", *valid_until_ms);
    o.close();
}

fn int(out: &mut Vec<u8>, value: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// A JSON string, escaped exactly as `serde_json` escapes it.
fn string(out: &mut Vec<u8>, value: &str) {
    if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(value.len() + 2);
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, value);
    }
}

/// Bytes as a base64 string (standard alphabet, padded: no character to escape).
fn base64(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    let start = out.len();
    out.resize(
        start + base64::encoded_len(bytes.len(), true).unwrap_or(0),
        0,
    );
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(bytes, &mut out[start..])
        .unwrap_or(0);
    out.truncate(start + written);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    //! The encoder against the one it replaced (a `serde_json::Value` per
    //! record, kept here as the reference), byte for byte.

    use super::*;
    use coupon_platform::kafka::Record;
    use prost::Message as _;
    use serde_json::{Map, Value};

    use crate::replay::{decode_event, json_line};

    fn reference_to_json(event: &TopicEvent) -> (Value, Value) {
        let mut value = match event {
            TopicEvent::Created(e) => serde_json::to_value(e),
            TopicEvent::ClaimRequested(e) => serde_json::to_value(e),
            TopicEvent::ClaimDecided(e) => serde_json::to_value(e),
            TopicEvent::PurchaseRequested(e) => serde_json::to_value(e),
            TopicEvent::PurchaseDecided(e) => serde_json::to_value(e),
            TopicEvent::HoldExpired(e) => serde_json::to_value(e),
            TopicEvent::DeadLetter(e) => serde_json::to_value(e),
            TopicEvent::BlacklistChanged(e) => serde_json::to_value(e),
            TopicEvent::CouponExpired(e) => serde_json::to_value(e),
            TopicEvent::PurchaseCancelled(e) => serde_json::to_value(e),
            TopicEvent::CampaignEnded(e) => serde_json::to_value(e),
            TopicEvent::UserProfileUpdated(e) => serde_json::to_value(e),
        }
        .unwrap();
        let fields = value.as_object_mut().unwrap();
        let envelope = fields.remove("envelope").unwrap_or(Value::Null);
        let name = |name: Option<&'static str>, raw: i32| match name {
            Some(name) => Value::String(name.to_owned()),
            None => Value::from(raw),
        };
        let b64 =
            |bytes: &[u8]| Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        match event {
            TopicEvent::ClaimDecided(e) => {
                let n = ClaimOutcome::try_from(e.outcome)
                    .ok()
                    .map(|o| o.as_str_name());
                fields.insert("outcome".into(), name(n, e.outcome));
            }
            TopicEvent::PurchaseDecided(e) => {
                let n = PurchaseOutcome::try_from(e.outcome)
                    .ok()
                    .map(|o| o.as_str_name());
                fields.insert("outcome".into(), name(n, e.outcome));
            }
            TopicEvent::DeadLetter(e) => {
                fields.insert("original_key".into(), b64(&e.original_key));
                fields.insert("original_value".into(), b64(&e.original_value));
            }
            _ => {}
        }
        (envelope, value)
    }

    fn reference_line(
        kind: TopicKind,
        record: &Record,
        decoded: &Result<TopicEvent, DecodeError>,
    ) -> Vec<u8> {
        let b64 =
            |bytes: &[u8]| Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        let mut line = Map::new();
        line.insert("topic".into(), Value::String(record.topic.clone()));
        line.insert("topic_kind".into(), Value::String(kind.short().to_owned()));
        line.insert("partition".into(), Value::from(record.partition));
        line.insert("offset".into(), Value::from(record.offset));
        line.insert(
            "timestamp_ms".into(),
            record
                .timestamp_ms
                .filter(|t| *t >= 0)
                .map(Value::from)
                .unwrap_or(Value::Null),
        );
        match record.key.as_deref() {
            None => {
                line.insert("key".into(), Value::Null);
            }
            Some(key) => match std::str::from_utf8(key) {
                Ok(text) => {
                    line.insert("key".into(), Value::String(text.to_owned()));
                }
                Err(_) => {
                    line.insert("key".into(), Value::Null);
                    line.insert("key_base64".into(), b64(key));
                }
            },
        }
        match decoded {
            Ok(event) => {
                let (envelope, payload) = reference_to_json(event);
                line.insert("envelope".into(), envelope);
                line.insert("payload".into(), payload);
            }
            Err(error) => {
                line.insert("error".into(), Value::String(error.to_string()));
                line.insert(
                    "value_base64".into(),
                    record.value.as_deref().map(b64).unwrap_or(Value::Null),
                );
            }
        }
        serde_json::to_vec(&Value::Object(line)).unwrap()
    }

    const AWKWARD: &str = "a \"quoted\" \\ back\u{8}\u{c}\n\r\t\u{1}\u{1f}\u{7f} é ✓ 🎟 </script>";

    fn envelope<E: coupon_schemas::Event>(text: &str) -> Option<Envelope> {
        let mut e = coupon_schemas::new_envelope::<E>(
            format!("event-{text}"),
            1_795_564_800_123,
            text,
            text,
        );
        e.schema_version = 1;
        Some(e)
    }

    /// Every message type, once with every field set (awkward text) and
    /// once with the defaults.
    fn events(text: &str) -> Vec<(TopicKind, TopicEvent)> {
        let s = || text.to_owned();
        let money = || Money {
            amount: i64::MIN,
            currency: s(),
        };
        let campaign = || Campaign {
            name: s(),
            percent_off: u32::MAX,
            amount_off: Some(money()),
            min_order: None,
            valid_from_ms: -5,
            valid_until_ms: i64::MAX,
            locations: vec![s(), String::new(), s()],
            min_age: 18,
        };
        vec![
            (
                TopicKind::Created,
                TopicEvent::Created(CouponsCreated {
                    envelope: envelope::<CouponsCreated>(text),
                    batch_id: s(),
                    employee_id: s(),
                    category: s(),
                    coupon_ids: vec![1, -2, i64::MAX, i64::MIN, 0],
                    chunk_index: u32::MAX,
                    chunk_count: 7,
                    campaign: Some(campaign()),
                }),
            ),
            (
                TopicKind::Claims,
                TopicEvent::ClaimRequested(ClaimRequested {
                    envelope: envelope::<ClaimRequested>(text),
                    request_id: s(),
                    user_id: s(),
                    category: s(),
                    answered_sold_out: true,
                }),
            ),
            (
                TopicKind::ClaimResults,
                TopicEvent::ClaimDecided(ClaimDecided {
                    envelope: envelope::<ClaimDecided>(text),
                    request_id: s(),
                    user_id: s(),
                    outcome: ClaimOutcome::SoldOut as i32,
                    coupon_code: s(),
                    category: s(),
                    expires_at_ms: -1,
                    repeated: true,
                    retry_at_ms: 12,
                    blacklisted_until_ms: i64::MAX,
                    reason: s(),
                    campaign: Some(campaign()),
                }),
            ),
            (
                TopicKind::ClaimResults,
                TopicEvent::ClaimDecided(ClaimDecided {
                    envelope: envelope::<ClaimDecided>(text),
                    outcome: 99,
                    ..Default::default()
                }),
            ),
            (
                TopicKind::Purchases,
                TopicEvent::PurchaseRequested(PurchaseRequested {
                    envelope: envelope::<PurchaseRequested>(text),
                    request_id: s(),
                    user_id: s(),
                    coupon_code: s(),
                    order_id: s(),
                    order_total: Some(money()),
                }),
            ),
            (
                TopicKind::PurchaseResults,
                TopicEvent::PurchaseDecided(PurchaseDecided {
                    envelope: envelope::<PurchaseDecided>(text),
                    request_id: s(),
                    user_id: s(),
                    coupon_code: s(),
                    order_id: s(),
                    outcome: PurchaseOutcome::Redeemed as i32,
                    redeemed_at_ms: 5,
                    reason: s(),
                    repeated: true,
                    order_total: Some(money()),
                    discount_amount: Some(Money::default()),
                    coupon_status: s(),
                }),
            ),
            (
                TopicKind::Purchases,
                TopicEvent::PurchaseCancelled(PurchaseCancelled {
                    envelope: envelope::<PurchaseCancelled>(text),
                    request_id: s(),
                    user_id: s(),
                    order_id: s(),
                }),
            ),
            (
                TopicKind::Expirations,
                TopicEvent::CampaignEnded(CampaignEnded {
                    envelope: envelope::<CampaignEnded>(text),
                    batch_id: s(),
                    ended_at_ms: 1 << 41,
                    ended_by: s(),
                }),
            ),
            (
                TopicKind::Expirations,
                TopicEvent::CouponExpired(CouponExpired {
                    envelope: envelope::<CouponExpired>(text),
                    coupon_code: s(),
                    batch_id: s(),
                    campaign_ended_at_ms: 1 << 41,
                }),
            ),
            (
                TopicKind::PurchaseResults,
                TopicEvent::PurchaseDecided(PurchaseDecided {
                    envelope: envelope::<PurchaseDecided>(text),
                    outcome: -3,
                    ..Default::default()
                }),
            ),
            (
                TopicKind::Expirations,
                TopicEvent::HoldExpired(HoldExpired {
                    envelope: envelope::<HoldExpired>(text),
                    coupon_code: s(),
                    user_id: s(),
                    hold_id: s(),
                    held_until_ms: 77,
                    campaign_ended_at_ms: 78,
                }),
            ),
            (
                TopicKind::DeadLetter,
                TopicEvent::DeadLetter(DeadLetter {
                    envelope: envelope::<DeadLetter>(text),
                    source_topic: s(),
                    source_partition: -1,
                    source_offset: 1 << 40,
                    original_key: text.as_bytes().to_vec(),
                    original_value: vec![0, 0xff, 0xfe, 1, 2],
                    reason: s(),
                    consumer: s(),
                    original_size: u64::MAX,
                    original_truncated: true,
                }),
            ),
            (
                TopicKind::Blacklist,
                TopicEvent::BlacklistChanged(BlacklistChanged {
                    envelope: envelope::<BlacklistChanged>(text),
                    user_id: s(),
                    blacklisted: true,
                    blacklisted_until_ms: 3,
                    reason: s(),
                    blacklisted_at_ms: 4,
                    source: s(),
                    changed_by: s(),
                }),
            ),
            (
                TopicKind::Users,
                TopicEvent::UserProfileUpdated(coupon_schemas::UserProfileUpdated {
                    envelope: envelope::<coupon_schemas::UserProfileUpdated>(text),
                    user_id: s(),
                    name: s(),
                    dob: s(),
                    location: s(),
                    updated_at_ms: -9,
                }),
            ),
        ]
    }

    fn encode(event: &TopicEvent) -> Vec<u8> {
        match event {
            TopicEvent::Created(e) => e.encode_to_vec(),
            TopicEvent::ClaimRequested(e) => e.encode_to_vec(),
            TopicEvent::ClaimDecided(e) => e.encode_to_vec(),
            TopicEvent::PurchaseRequested(e) => e.encode_to_vec(),
            TopicEvent::PurchaseDecided(e) => e.encode_to_vec(),
            TopicEvent::HoldExpired(e) => e.encode_to_vec(),
            TopicEvent::DeadLetter(e) => e.encode_to_vec(),
            TopicEvent::BlacklistChanged(e) => e.encode_to_vec(),
            TopicEvent::CouponExpired(e) => e.encode_to_vec(),
            TopicEvent::PurchaseCancelled(e) => e.encode_to_vec(),
            TopicEvent::CampaignEnded(e) => e.encode_to_vec(),
            TopicEvent::UserProfileUpdated(e) => e.encode_to_vec(),
        }
    }

    fn record(
        kind: TopicKind,
        key: Option<&[u8]>,
        value: Option<Vec<u8>>,
        ts: Option<i64>,
    ) -> Record {
        Record {
            topic: format!("p \"{}\".{}", AWKWARD, kind.short()),
            partition: 3,
            offset: 123_456_789,
            key: key.map(<[u8]>::to_vec),
            value,
            timestamp_ms: ts,
        }
    }

    fn assert_same(kind: TopicKind, record: &Record, decoded: &Result<TopicEvent, DecodeError>) {
        let ours = json_line(kind, record, decoded);
        let reference = reference_line(kind, record, decoded);
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&reference),
        );
        assert_eq!(ours, reference);
    }

    #[test]
    fn every_message_type_is_written_as_the_value_encoder_wrote_it() {
        let keys: [Option<&[u8]>; 4] = [None, Some(b""), Some(b"user-1"), Some(b"\xff\x00bin")];
        for text in ["", "plain-text_0123", AWKWARD] {
            for (kind, event) in events(text) {
                for key in keys {
                    for ts in [None, Some(-1), Some(0), Some(1_795_564_800_000)] {
                        let rec = record(kind, key, Some(encode(&event)), ts);
                        // As decoded from the log, and as given.
                        let decoded = decode_event(kind, &rec);
                        assert!(decoded.is_ok(), "{kind:?} {text:?}: {decoded:?}");
                        assert_same(kind, &rec, &decoded);
                        assert_same(kind, &rec, &Ok(event.clone()));
                    }
                }
            }
        }
        // An event without an envelope (not from the log: it would not decode).
        let rec = record(TopicKind::Claims, None, None, None);
        assert_same(
            TopicKind::Claims,
            &rec,
            &Ok(TopicEvent::ClaimRequested(ClaimRequested::default())),
        );
    }

    #[test]
    fn undecodable_records_are_written_as_the_value_encoder_wrote_them() {
        let wrong_type = CouponsCreated {
            envelope: envelope::<CouponsCreated>("x"),
            ..Default::default()
        }
        .encode_to_vec();
        let mut old = ClaimRequested {
            envelope: envelope::<ClaimRequested>("x"),
            ..Default::default()
        };
        old.envelope.as_mut().unwrap().occurred_at_ms = 1;
        let values: [Option<Vec<u8>>; 5] = [
            None,
            Some(Vec::new()),
            Some(b"\xff\xfe not protobuf".to_vec()),
            Some(wrong_type),
            Some(old.encode_to_vec()),
        ];
        for value in values {
            for key in [None, Some(&b"\xfe"[..]), Some(&b"k"[..])] {
                let rec = record(TopicKind::Claims, key, value.clone(), Some(5));
                let decoded = decode_event(TopicKind::Claims, &rec);
                if value.as_ref().is_some_and(|v| !v.is_empty()) {
                    assert!(decoded.is_err(), "{decoded:?}");
                }
                assert_same(TopicKind::Claims, &rec, &decoded);
            }
        }
    }

    #[test]
    fn the_payload_span_is_the_payload_object() {
        for (kind, event) in events(AWKWARD) {
            let rec = record(kind, Some(b"k"), None, Some(1));
            let raw = RawRecord {
                topic: &rec.topic,
                partition: rec.partition,
                offset: rec.offset,
                key: rec.key.as_deref(),
                value: None,
                timestamp_ms: rec.timestamp_ms,
            };
            let mut out = b"previous line\n".to_vec();
            let span = write_line(&mut out, kind, &raw, &Ok(event.clone())).unwrap();
            let line: Value = serde_json::from_slice(&out[14..]).unwrap();
            let payload: Value = serde_json::from_slice(&out[span.clone()]).unwrap();
            assert_eq!(payload, line["payload"]);
            // What a Parquet row gets: the very same bytes, without the line.
            let mut alone = b"previous".to_vec();
            let alone_span = write_payload(&mut alone, &Ok(event)).unwrap();
            assert_eq!(alone_span.start, 8);
            assert_eq!(&alone[alone_span], &out[span]);
        }
        let undecodable = Err(DecodeError::Empty);
        assert_eq!(write_payload(&mut Vec::new(), &undecodable), None);
    }
}
