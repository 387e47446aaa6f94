//! `coupons.v1` cannot break silently: the current `events.proto` is checked
//! against the released one kept in `schemas/compat/v1/` (see
//! `schemas/compat/README.md`).
//!
//! - [`breaking_changes`] applies buf's `FILE` wire rules to the two
//!   descriptor sets (both compiled with protox, as the build does): every
//!   released message, enum, field and enum value is still there with the same
//!   number, name, type and cardinality, or its number and name are reserved.
//! - Events written by the released version (`compat/v1/fixtures/*.bin`,
//!   every field set) decode with the current types to the values they were
//!   written with (`*.json`); fields added since decode as their defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use coupon_schemas::*;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};
use serde_json::{json, Value};

fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn released_dir() -> PathBuf {
    schemas_dir().join("compat/v1")
}

fn compile(include: &Path) -> FileDescriptorSet {
    protox::compile(["coupons/v1/events.proto"], [include])
        .unwrap_or_else(|e| panic!("compiling {}: {e}", include.display()))
}

fn messages(set: &FileDescriptorSet) -> BTreeMap<String, &DescriptorProto> {
    fn walk<'a>(
        prefix: &str,
        list: &'a [DescriptorProto],
        out: &mut BTreeMap<String, &'a DescriptorProto>,
    ) {
        for m in list {
            let name = format!("{prefix}.{}", m.name());
            walk(&name, &m.nested_type, out);
            out.insert(name, m);
        }
    }
    let mut out = BTreeMap::new();
    for file in &set.file {
        walk(
            &format!(".{}", file.package()),
            &file.message_type,
            &mut out,
        );
    }
    out
}

fn enums(set: &FileDescriptorSet) -> BTreeMap<String, &EnumDescriptorProto> {
    let mut out = BTreeMap::new();
    for file in &set.file {
        let package = format!(".{}", file.package());
        for e in &file.enum_type {
            out.insert(format!("{package}.{}", e.name()), e);
        }
        for (name, m) in messages(set) {
            for e in &m.enum_type {
                out.insert(format!("{name}.{}", e.name()), e);
            }
        }
    }
    out
}

/// What `current` breaks of `released`, one line per break (empty: none).
fn breaking_changes(released: &FileDescriptorSet, current: &FileDescriptorSet) -> Vec<String> {
    let mut breaks = Vec::new();
    let now = messages(current);
    for (name, old) in messages(released) {
        let Some(new) = now.get(&name) else {
            breaks.push(format!("message {name} was removed"));
            continue;
        };
        for field in &old.field {
            let number = field.number();
            let place = format!("{name} field {number} ({})", field.name());
            match new.field.iter().find(|f| f.number() == number) {
                None => {
                    let number_reserved = new
                        .reserved_range
                        .iter()
                        .any(|r| r.start() <= number && number < r.end());
                    let name_reserved = new.reserved_name.iter().any(|n| n == field.name());
                    if !(number_reserved && name_reserved) {
                        breaks.push(format!(
                            "{place} was removed without reserving its number and name"
                        ));
                    }
                }
                Some(f) => {
                    if f.name() != field.name() {
                        breaks.push(format!("{place} was renamed to {}", f.name()));
                    }
                    if f.r#type() != field.r#type() || f.type_name() != field.type_name() {
                        breaks.push(format!(
                            "{place} changed type from {:?} {} to {:?} {}",
                            field.r#type(),
                            field.type_name(),
                            f.r#type(),
                            f.type_name()
                        ));
                    }
                    if f.label() != field.label() {
                        breaks.push(format!(
                            "{place} changed cardinality from {:?} to {:?}",
                            field.label(),
                            f.label()
                        ));
                    }
                    if f.oneof_index.is_some() != field.oneof_index.is_some() {
                        breaks.push(format!("{place} moved into or out of a oneof"));
                    }
                }
            }
        }
    }
    let now = enums(current);
    for (name, old) in enums(released) {
        let Some(new) = now.get(&name) else {
            breaks.push(format!("enum {name} was removed"));
            continue;
        };
        for value in &old.value {
            match new.value.iter().find(|v| v.number() == value.number()) {
                Some(v) if v.name() == value.name() => {}
                Some(v) => breaks.push(format!(
                    "{name} value {} ({}) was renamed to {}",
                    value.number(),
                    value.name(),
                    v.name()
                )),
                None => {
                    let reserved = new
                        .reserved_range
                        .iter()
                        .any(|r| r.start() <= value.number() && value.number() <= r.end());
                    if !reserved {
                        breaks.push(format!(
                            "{name} value {} ({}) was removed without reserving its number",
                            value.number(),
                            value.name()
                        ));
                    }
                }
            }
        }
    }
    breaks
}

#[test]
fn the_current_schema_keeps_every_released_field() {
    let breaks = breaking_changes(&compile(&released_dir()), &compile(&schemas_dir()));
    assert!(
        breaks.is_empty(),
        "coupons.v1 breaks the released schema (add fields, never renumber, rename, retype or reuse; see schemas/compat/README.md):\n{}",
        breaks.join("\n")
    );
}

/// The check itself: a renumbered field, a retyped one, a removed one and a
/// renamed enum value are each reported.
#[test]
fn the_check_reports_renumbered_retyped_and_removed_fields() {
    let text = std::fs::read_to_string(schemas_dir().join("coupons/v1/events.proto")).unwrap();
    let cases = [
        // ClaimRequested.user_id 3 -> 9
        (
            "  string user_id = 3;\n  // Optional: only allocate",
            "  string user_id = 9;\n  // Optional: only allocate",
            "ClaimRequested field 3 (user_id)",
        ),
        (
            "  int64 occurred_at_ms = 2;",
            "  string occurred_at_ms = 2;",
            "Envelope field 2 (occurred_at_ms) changed type",
        ),
        (
            "  // Purchases are idempotent on order_id.\n  string order_id = 5;",
            "",
            "PurchaseRequested field 5 (order_id) was removed",
        ),
        (
            "CLAIM_OUTCOME_SOLD_OUT = 4;",
            "CLAIM_OUTCOME_GONE = 4;",
            "value 4 (CLAIM_OUTCOME_SOLD_OUT) was renamed",
        ),
    ];
    let released = compile(&released_dir());
    for (from, to, expected) in cases {
        assert!(
            text.contains(from),
            "the mutation {from:?} no longer applies"
        );
        let dir = std::env::temp_dir().join(format!(
            "coupon-schemas-compat-{}-{}",
            std::process::id(),
            uuid_like(expected)
        ));
        std::fs::create_dir_all(dir.join("coupons/v1")).unwrap();
        std::fs::write(
            dir.join("coupons/v1/events.proto"),
            text.replacen(from, to, 1),
        )
        .unwrap();
        let breaks = breaking_changes(&released, &compile(&dir));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            breaks.iter().any(|b| b.contains(expected)),
            "{expected:?} not reported; got {breaks:?}"
        );
    }
}

fn uuid_like(text: &str) -> u64 {
    text.bytes().fold(1469598103934665603u64, |h, b| {
        (h ^ b as u64).wrapping_mul(1099511628211)
    })
}

fn envelope<E: Event>() -> Option<Envelope> {
    Some(new_envelope::<E>(
        "5b0d1f8e-0c53-4e9a-9d55-2f3a4c1b7e01".into(),
        1_764_072_000_123,
        "couponctl/gateway@compat",
        "req-7",
    ))
}

/// One event of each kind with every released field set (what the fixtures
/// hold); fields added later stay at their defaults.
#[allow(clippy::needless_update)]
fn samples() -> Vec<(&'static str, Vec<u8>, Value)> {
    fn sample<E: Event>(event: E) -> (&'static str, Vec<u8>, Value) {
        let name = E::TYPE_NAME.trim_start_matches("coupons.v1.");
        (
            name,
            event.encode_to_vec(),
            serde_json::to_value(&event).unwrap(),
        )
    }
    vec![
        sample(CouponsCreated {
            envelope: envelope::<CouponsCreated>(),
            batch_id: "8c6f3a52-3d2e-4f11-a0b6-5b8e9d1c2a10".into(),
            employee_id: "e1".into(),
            category: "Electronics".into(),
            coupon_ids: vec![371_742_318_012_416_001, 371_742_318_012_416_002],
            chunk_index: 2,
            chunk_count: 3,
            ..Default::default()
        }),
        sample(ClaimRequested {
            envelope: envelope::<ClaimRequested>(),
            request_id: "req-7".into(),
            user_id: "user-42".into(),
            category: "Electronics".into(),
            ..Default::default()
        }),
        sample(ClaimDecided {
            envelope: envelope::<ClaimDecided>(),
            request_id: "req-7".into(),
            user_id: "user-42".into(),
            outcome: ClaimOutcome::Granted as i32,
            coupon_code: "0AN35HST00000".into(),
            category: "Electronics".into(),
            expires_at_ms: 1_764_072_300_123,
            repeated: true,
            retry_at_ms: 1_764_115_200_000,
            blacklisted_until_ms: 1_764_200_000_000,
            reason: "a reason".into(),
            ..Default::default()
        }),
        sample(PurchaseRequested {
            envelope: envelope::<PurchaseRequested>(),
            request_id: "req-8".into(),
            user_id: "user-42".into(),
            coupon_code: "0AN35HST00000".into(),
            order_id: "order-1".into(),
            ..Default::default()
        }),
        sample(PurchaseDecided {
            envelope: envelope::<PurchaseDecided>(),
            request_id: "req-8".into(),
            user_id: "user-42".into(),
            coupon_code: "0AN35HST00000".into(),
            order_id: "order-1".into(),
            outcome: PurchaseOutcome::AlreadyRedeemed as i32,
            redeemed_at_ms: 1_764_072_090_000,
            reason: "a reason".into(),
            repeated: true,
            ..Default::default()
        }),
        sample(HoldExpired {
            envelope: envelope::<HoldExpired>(),
            coupon_code: "0AN35HST00000".into(),
            user_id: "user-42".into(),
            hold_id: "req-7".into(),
            held_until_ms: 1_764_072_300_123,
            ..Default::default()
        }),
        sample(BlacklistChanged {
            envelope: envelope::<BlacklistChanged>(),
            user_id: "user-13".into(),
            blacklisted: true,
            blacklisted_until_ms: 1_764_200_000_000,
            reason: "flooding".into(),
            blacklisted_at_ms: 1_764_072_000_000,
            source: "automatic".into(),
            ..Default::default()
        }),
        sample(DeadLetter {
            envelope: envelope::<DeadLetter>(),
            source_topic: "coupons.claims".into(),
            source_partition: 3,
            source_offset: 1234,
            original_key: b"user-42".to_vec(),
            original_value: vec![0x0a, 0xff, 0x00],
            reason: "undecodable".into(),
            consumer: "claims".into(),
            original_size: 70_000,
            original_truncated: true,
            ..Default::default()
        }),
    ]
}

fn decode_current(name: &str, bytes: &[u8]) -> Value {
    fn as_json<E: Event>(bytes: &[u8]) -> Value {
        serde_json::to_value(E::decode(bytes).expect("decodes")).unwrap()
    }
    match name {
        "CouponsCreated" => as_json::<CouponsCreated>(bytes),
        "ClaimRequested" => as_json::<ClaimRequested>(bytes),
        "ClaimDecided" => as_json::<ClaimDecided>(bytes),
        "PurchaseRequested" => as_json::<PurchaseRequested>(bytes),
        "PurchaseDecided" => as_json::<PurchaseDecided>(bytes),
        "HoldExpired" => as_json::<HoldExpired>(bytes),
        "BlacklistChanged" => as_json::<BlacklistChanged>(bytes),
        "DeadLetter" => as_json::<DeadLetter>(bytes),
        other => panic!("a fixture for an unknown event {other}"),
    }
}

fn is_default(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_default),
    }
}

/// `actual` has every value of `expected`; anything more is a default (a
/// field added after the fixture was written).
fn compare(expected: &Value, actual: &Value, at: &str, problems: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (key, value) in e {
                compare(
                    value,
                    a.get(key).unwrap_or(&Value::Null),
                    &format!("{at}.{key}"),
                    problems,
                );
            }
            for (key, value) in a {
                if !e.contains_key(key) && !is_default(value) {
                    problems.push(format!("{at}.{key}: a field added since is {value}"));
                }
            }
        }
        _ if expected != actual => {
            problems.push(format!("{at}: written {expected}, decoded {actual}"));
        }
        _ => {}
    }
}

#[test]
fn events_written_by_the_released_schema_decode_unchanged() {
    let fixtures = released_dir().join("fixtures");
    if std::env::var_os("COMPAT_WRITE_FIXTURES").is_some() {
        std::fs::create_dir_all(&fixtures).unwrap();
        for (name, bytes, mut value) in samples() {
            std::fs::write(fixtures.join(format!("{name}.bin")), bytes).unwrap();
            // Fields left at their defaults are not written (proto3 does
            // not encode them): those added after the release.
            if let Value::Object(fields) = &mut value {
                fields.retain(|_, v| !is_default(v));
            }
            let text = serde_json::to_string_pretty(&value).unwrap() + "\n";
            std::fs::write(fixtures.join(format!("{name}.json")), text).unwrap();
        }
    }
    let mut problems = Vec::new();
    let mut seen = 0;
    for (name, _, _) in samples() {
        let bytes = std::fs::read(fixtures.join(format!("{name}.bin")))
            .unwrap_or_else(|e| panic!("fixture {name}.bin: {e}"));
        let expected: Value =
            serde_json::from_slice(&std::fs::read(fixtures.join(format!("{name}.json"))).unwrap())
                .unwrap();
        // The fixture sets every field it has, so a field that moved cannot
        // hide behind a default.
        if let Value::Object(fields) = &expected {
            for (key, value) in fields {
                assert!(!is_default(value), "fixture {name}.{key} is a default");
            }
        }
        compare(
            &expected,
            &decode_current(name, &bytes),
            name,
            &mut problems,
        );
        seen += 1;
    }
    assert_eq!(seen, 8);
    assert!(
        problems.is_empty(),
        "events written by the released coupons.v1 decode differently:\n{}",
        problems.join("\n")
    );
    // And the comparison itself notices a swapped field.
    let mut swapped = Vec::new();
    compare(
        &json!({"user_id": "u", "category": "c"}),
        &json!({"user_id": "c", "category": "u"}),
        "ClaimRequested",
        &mut swapped,
    );
    assert_eq!(swapped.len(), 2);
}
