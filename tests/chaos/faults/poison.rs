//! Poison records on every input topic, written by a hostile producer:
//! each gets a dead letter with its reason and original bytes, the
//! consumers keep going past it, and nothing valid is invented from it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use prost::Message as _;

use coupon_domain::{CouponCode, SnowflakeId};
use coupon_platform::kafka::{decode, Publisher};
use coupon_platform::time::now_ms;
use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::{
    new_envelope, ClaimDecided, ClaimRequested, CouponsCreated, DeadLetter, Envelope, Event,
    HoldExpired, PurchaseRequested,
};
use couponctl::app::Role;

use coupon_test_support::harness::{eventually, TestEnv};
use coupon_test_support::processes::eventually_some;

/// A bad record: where it goes, what it is, and what its dead letter must say.
struct Poison {
    topic: String,
    label: String,
    key: Vec<u8>,
    value: Vec<u8>,
    /// The reason must contain one of these.
    reasons: &'static [&'static str],
    /// The consumer that owns the topic.
    consumer: &'static str,
}

/// The largest field a hostile producer can get onto a topic: Apache Kafka
/// refuses records over `message.max.bytes` (1 MiB by default) at the
/// broker, so a field just under it is the worst a consumer will ever see.
const HUGE: usize = 1000 * 1024;
/// Year 200,000: representable by chrono and Postgres, but absurd.
const FAR_FUTURE_MS: i64 = 6_250_000_000_000_000;
/// Year -7,500: chrono can hold it, Postgres cannot.
const FAR_PAST_MS: i64 = -300_000_000_000_000;

fn envelope_of<E: Event>() -> Envelope {
    new_envelope::<E>(uuid::Uuid::new_v4().to_string(), now_ms(), "chaos", "")
}

/// The cases every input topic gets, built from a valid event of the topic.
fn generic_poison<E: Event + Clone>(topic: &str, consumer: &'static str, valid: &E) -> Vec<Poison> {
    let with = |label: &str, change: &dyn Fn(&mut Envelope), reasons: &'static [&'static str]| {
        let mut event = valid.clone();
        let mut envelope = envelope_of::<E>();
        change(&mut envelope);
        *event.envelope_mut() = Some(envelope);
        Poison {
            topic: topic.to_owned(),
            label: label.to_owned(),
            key: b"chaos".to_vec(),
            value: event.encode_to_vec(),
            reasons,
            consumer,
        }
    };
    let raw = |label: &str, value: Vec<u8>, reasons: &'static [&'static str]| Poison {
        topic: topic.to_owned(),
        label: label.to_owned(),
        key: b"chaos".to_vec(),
        value,
        reasons,
        consumer,
    };
    vec![
        raw(
            "undecodable bytes",
            vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01],
            &["not a valid protobuf"],
        ),
        raw(
            "text, not protobuf",
            b"{\"user_id\": \"json is not protobuf\"}".to_vec(),
            &["not a valid protobuf", "no envelope"],
        ),
        raw("empty value", Vec::new(), &["no envelope", "no value"]),
        with(
            "wrong event type",
            &|e| e.event_type = "coupons.v1.DeadLetter".into(),
            &["event type \"coupons.v1.DeadLetter\""],
        ),
        with(
            "future schema version",
            &|e| e.schema_version = 99,
            &["schema version 99"],
        ),
        with("no event id", &|e| e.event_id.clear(), &["no event id"]),
        with(
            "1000 KiB event type",
            &|e| e.event_type = "t".repeat(HUGE),
            &["event type \"ttt", "larger than the"],
        ),
        with(
            "far-future timestamp",
            &|e| e.occurred_at_ms = FAR_FUTURE_MS,
            &["occurred_at_ms"],
        ),
        with(
            "i64::MAX timestamp",
            &|e| e.occurred_at_ms = i64::MAX,
            &["occurred_at_ms"],
        ),
        with(
            "far-past timestamp",
            &|e| e.occurred_at_ms = FAR_PAST_MS,
            &["occurred_at_ms"],
        ),
        with(
            "no timestamp",
            &|e| e.occurred_at_ms = 0,
            &["occurred_at_ms"],
        ),
    ]
}

fn specific<E: Event>(
    topic: &str,
    consumer: &'static str,
    label: &str,
    mut event: E,
    reasons: &'static [&'static str],
) -> Poison {
    *event.envelope_mut() = Some(envelope_of::<E>());
    Poison {
        topic: topic.to_owned(),
        label: label.to_owned(),
        key: b"chaos".to_vec(),
        value: event.encode_to_vec(),
        reasons,
        consumer,
    }
}

fn snowflake(sequence: u16) -> SnowflakeId {
    SnowflakeId::compose(coupon_domain::snowflake::SnowflakeParts {
        unix_ms: now_ms() as u64,
        datacenter: 7,
        machine: 7,
        sequence,
    })
    .expect("snowflake id")
}

/// One valid event per input topic, the base every poison case changes.
struct Valid {
    code: String,
    created: CouponsCreated,
    claim: ClaimRequested,
    purchase: PurchaseRequested,
    expired: HoldExpired,
}

impl Valid {
    fn new() -> Self {
        let coupon_id = snowflake(1);
        let code = CouponCode::from_id(coupon_id).to_string();
        Self {
            created: CouponsCreated {
                envelope: None,
                batch_id: uuid::Uuid::new_v4().to_string(),
                employee_id: "e-chaos".into(),
                category: "Survivors".into(),
                coupon_ids: vec![coupon_id.as_i64()],
                chunk_index: 0,
                chunk_count: 1,
                campaign: None,
            },
            claim: ClaimRequested {
                envelope: None,
                request_id: "valid-claim".into(),
                user_id: "chaos".into(),
                category: String::new(),
                answered_sold_out: false,
            },
            purchase: PurchaseRequested {
                envelope: None,
                request_id: "valid-purchase".into(),
                user_id: "chaos".into(),
                coupon_code: code.clone(),
                order_id: "valid-order".into(),
                order_total: None,
            },
            expired: HoldExpired {
                envelope: None,
                coupon_code: code.clone(),
                user_id: "chaos".into(),
                hold_id: "no-such-hold".into(),
                held_until_ms: now_ms(),
                campaign_ended_at_ms: 0,
            },
            code,
        }
    }
}

/// A change to a valid event, and what its dead letter's reason must say.
type Case<E> = (&'static str, Box<dyn Fn(&mut E)>, &'static [&'static str]);

/// The cases of one topic: the generic ones and `cases` applied to `valid`.
fn topic_poison<E: Event + Clone>(
    topic: &str,
    consumer: &'static str,
    valid: &E,
    cases: Vec<Case<E>>,
) -> Vec<Poison> {
    let mut poison = generic_poison(topic, consumer, valid);
    poison.extend(cases.into_iter().map(|(label, change, reasons)| {
        let mut event = valid.clone();
        change(&mut event);
        specific(topic, consumer, label, event, reasons)
    }));
    poison
}

fn huge() -> String {
    "u".repeat(HUGE)
}

fn coupons_cases() -> Vec<Case<CouponsCreated>> {
    vec![
        (
            "no coupon ids",
            Box::new(|e| e.coupon_ids.clear()),
            &["coupon_ids is empty"],
        ),
        (
            "negative coupon id",
            Box::new(|e| e.coupon_ids = vec![-5]),
            &["is negative"],
        ),
        (
            "batch id not a uuid",
            Box::new(|e| e.batch_id = "batch-1".into()),
            &["batch_id"],
        ),
        (
            "empty employee id",
            Box::new(|e| e.employee_id.clear()),
            &["employee id must not be empty"],
        ),
        (
            "1000 KiB employee id",
            Box::new(|e| e.employee_id = huge()),
            &[
                "employee id must be at most 64 characters",
                "larger than the",
            ],
        ),
        (
            "NUL in category",
            Box::new(|e| e.category = "a\0b".into()),
            &["control characters"],
        ),
    ]
}

/// Claims whose request id can be read are answered (`INVALID`): they get
/// a `bad-claim-` request id, which the test counts on the results topic.
fn claims_cases() -> Vec<Case<ClaimRequested>> {
    vec![
        (
            "empty user id",
            Box::new(|e| {
                e.user_id.clear();
                e.request_id = "bad-claim-1".into()
            }),
            &["user id must not be empty"],
        ),
        (
            "empty request id",
            Box::new(|e| e.request_id.clear()),
            &["request id must not be empty"],
        ),
        (
            "1000 KiB user id",
            Box::new(|e| {
                e.user_id = huge();
                e.request_id = "bad-claim-2".into()
            }),
            &["user id must be at most 128 characters", "larger than the"],
        ),
        (
            "1000 KiB request id",
            Box::new(|e| e.request_id = huge()),
            &[
                "request id must be at most 128 characters",
                "larger than the",
            ],
        ),
        (
            "NUL in request id",
            Box::new(|e| e.request_id = "bad\0claim".into()),
            &["request id must not contain control characters"],
        ),
        (
            "NUL in user id",
            Box::new(|e| {
                e.user_id = "a\0b".into();
                e.request_id = "bad-claim-4".into()
            }),
            &["user id must not contain control characters"],
        ),
        (
            "NUL in category",
            Box::new(|e| {
                e.category = "x\0".into();
                e.request_id = "bad-claim-3".into()
            }),
            &["category must not contain control characters"],
        ),
    ]
}

fn purchases_cases() -> Vec<Case<PurchaseRequested>> {
    vec![
        (
            "empty coupon code",
            Box::new(|e| {
                e.coupon_code.clear();
                e.request_id = "bad-purchase-1".into()
            }),
            &["coupon code must"],
        ),
        (
            "empty order id",
            Box::new(|e| {
                e.order_id.clear();
                e.request_id = "bad-purchase-2".into()
            }),
            &["order id must not be empty"],
        ),
        (
            "empty user id",
            Box::new(|e| {
                e.user_id.clear();
                e.request_id = "bad-purchase-3".into()
            }),
            &["user id must not be empty"],
        ),
        (
            "empty request id",
            Box::new(|e| e.request_id.clear()),
            &["request id must not be empty"],
        ),
        (
            "1000 KiB user id",
            Box::new(|e| {
                e.user_id = huge();
                e.request_id = "bad-purchase-4".into()
            }),
            &["user id must be at most 128 characters", "larger than the"],
        ),
        (
            "1000 KiB order id",
            Box::new(|e| {
                e.order_id = huge();
                e.request_id = "bad-purchase-5".into()
            }),
            &["order id must be at most 128 characters", "larger than the"],
        ),
        (
            "NUL in coupon code",
            Box::new(|e| {
                e.coupon_code = "0\0".into();
                e.request_id = "bad-purchase-6".into()
            }),
            &["coupon code must not contain control characters"],
        ),
        (
            "NUL in user id",
            Box::new(|e| {
                e.user_id = "a\0b".into();
                e.request_id = "bad-purchase-7".into()
            }),
            &["user id must not contain control characters"],
        ),
        (
            "NUL in request id",
            Box::new(|e| e.request_id = "bad\0purchase".into()),
            &["request id must not contain control characters"],
        ),
    ]
}

fn expiry_cases() -> Vec<Case<HoldExpired>> {
    vec![
        (
            "empty coupon code",
            Box::new(|e| e.coupon_code.clear()),
            &["coupon code"],
        ),
        (
            "coupon code not a code",
            Box::new(|e| e.coupon_code = "not a code!".into()),
            &["coupon code"],
        ),
        (
            "empty hold id",
            Box::new(|e| e.hold_id.clear()),
            &["hold_id"],
        ),
        (
            "NUL in hold id",
            Box::new(|e| e.hold_id = "h\0".into()),
            &["hold_id", "control characters"],
        ),
        (
            "1000 KiB hold id",
            Box::new(|e| e.hold_id = huge()),
            &["hold_id", "larger than the"],
        ),
    ]
}

/// Every bad record of the test, on every input topic.
fn all_poison(topics: &Topics, valid: &Valid) -> Vec<Poison> {
    let mut poison = Vec::new();
    poison.extend(topic_poison(
        &topics.created(),
        "coupons",
        &valid.created,
        coupons_cases(),
    ));
    poison.extend(topic_poison(
        &topics.claims(),
        "claims",
        &valid.claim,
        claims_cases(),
    ));
    poison.extend(topic_poison(
        &topics.purchases(),
        "purchases",
        &valid.purchase,
        purchases_cases(),
    ));
    poison.extend(topic_poison(
        &topics.expirations(),
        "expiry",
        &valid.expired,
        expiry_cases(),
    ));
    // An envelope whose event id is no UUID (the generic cases only clear it).
    let mut not_a_uuid = valid.expired.clone();
    not_a_uuid.envelope = Some(Envelope {
        event_id: "not-a-uuid".into(),
        ..envelope_of::<HoldExpired>()
    });
    poison.push(Poison {
        topic: topics.expirations(),
        label: "event id not a uuid".into(),
        key: b"chaos".to_vec(),
        value: not_a_uuid.encode_to_vec(),
        reasons: &["event_id is not a UUID"],
        consumer: "expiry",
    });
    // A key too large for a dead letter's key, on a record that is refused.
    poison.push(Poison {
        topic: topics.claims(),
        label: "1000 KiB key".into(),
        key: vec![b'k'; HUGE],
        value: vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01],
        reasons: &["not a valid protobuf"],
        consumer: "claims",
    });
    poison
}

/// Where each bad record landed (topic, partition, offset).
type Sent<'a> = HashMap<(String, i32, i64), &'a Poison>;

/// Publishes the poison and then the valid events as a hostile producer
/// would. One key for everything on a topic: the bad records and the valid
/// event after them share a partition, so the valid one is only processed
/// if the consumer got past every bad one.
async fn publish<'a>(env: &TestEnv, poison: &'a [Poison], valid: &Valid) -> Sent<'a> {
    let mut kafka = KafkaSettings::new(env.kafka.brokers.clone());
    kafka.extra = vec![("message.max.bytes".into(), (4 * 1024 * 1024).to_string())];
    let hostile = Publisher::new(&kafka, "hostile-producer").expect("publisher");
    let mut sent = Sent::new();
    for bad in poison {
        let delivered = hostile
            .send_bytes(&bad.topic, Some(&bad.key), &bad.value)
            .await
            .unwrap_or_else(|e| panic!("publishing {} to {}: {e}", bad.label, bad.topic));
        sent.insert(
            (bad.topic.clone(), delivered.partition, delivered.offset),
            bad,
        );
    }
    let topics = &env.topics;
    let valid_events: [(String, Vec<u8>); 4] = [
        (
            topics.created(),
            with_envelope(valid.created.clone()).encode_to_vec(),
        ),
        (
            topics.claims(),
            with_envelope(valid.claim.clone()).encode_to_vec(),
        ),
        (
            topics.purchases(),
            with_envelope(valid.purchase.clone()).encode_to_vec(),
        ),
        (
            topics.expirations(),
            with_envelope(valid.expired.clone()).encode_to_vec(),
        ),
    ];
    for (topic, value) in &valid_events {
        hostile
            .send_bytes(topic, Some(b"chaos"), value)
            .await
            .expect("publish valid event");
    }
    sent
}

/// Waits until the valid events after the poison took effect and every
/// consumer is caught up: nothing wedged on a bad record.
async fn wait_past_the_poison(env: &TestEnv, code: &str) {
    eventually(
        "the valid coupon, claim and purchase after the poison are processed",
        Duration::from_secs(30),
        || async {
            env.count(&format!(
                "SELECT count(*) FROM coupons WHERE code = '{code}'"
            ))
            .await
                == 1
                && env
                    .count("SELECT count(*) FROM claim_decisions WHERE request_id = 'valid-claim'")
                    .await
                    == 1
                && env
                    .count("SELECT count(*) FROM purchase_decisions WHERE order_id = 'valid-order'")
                    .await
                    == 1
        },
    )
    .await;
    let topics = &env.topics;
    let waits = [
        ("coupons", topics.created()),
        ("claims", topics.claims()),
        ("purchases", topics.purchases()),
        ("expiry", topics.expirations()),
        ("history", topics.created()),
        // The processors' answers to invalid requests, poison echoed in
        // them included, go through the history sink as well.
        ("history", topics.claim_results()),
        ("history", topics.purchase_results()),
    ]
    .map(|(role, topic)| {
        std::panic::AssertUnwindSafe(async move {
            env.wait_caught_up(role, &topic, Duration::from_secs(30))
                .await
        })
        .catch_unwind()
    });
    let wedged: Vec<String> = futures::future::join_all(waits)
        .await
        .into_iter()
        .filter_map(|outcome| outcome.err())
        .map(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "a consumer is stuck".into())
        })
        .collect();
    assert!(wedged.is_empty(), "wedged consumers: {wedged:#?}");
}

type Letters = HashMap<(String, i32, i64, String), DeadLetter>;

/// The dead letters, once every bad record has one.
async fn wait_for_dead_letters(env: &TestEnv, sent: &Sent<'_>) -> Letters {
    eventually_some(
        "every bad record is dead-lettered",
        Duration::from_secs(30),
        || async {
            let mut letters = Letters::new();
            for record in env.read_topic(&env.topics.dead_letter()).await {
                let letter = decode::<DeadLetter>(&record).expect("a dead letter decodes");
                letters.insert(
                    (
                        letter.source_topic.clone(),
                        letter.source_partition,
                        letter.source_offset,
                        letter.consumer.clone(),
                    ),
                    letter,
                );
            }
            let missing: Vec<&str> = sent
                .iter()
                .filter(|((topic, partition, offset), bad)| {
                    !letters.contains_key(&(
                        topic.clone(),
                        *partition,
                        *offset,
                        bad.consumer.to_owned(),
                    ))
                })
                .map(|(_, bad)| bad.label.as_str())
                .collect();
            if !missing.is_empty() {
                eprintln!("not dead-lettered yet: {missing:?}");
            }
            missing.is_empty().then_some(letters)
        },
    )
    .await
}

/// A dead letter carries the reason, the original bytes (cut to fit the
/// topic when huge, and saying so) and where the record came from.
fn assert_dead_letter(bad: &Poison, topic: &str, letter: &DeadLetter) {
    assert!(
        bad.reasons.iter().any(|r| letter.reason.contains(r)),
        "{} on {topic}: reason {:?}, expected one of {:?}",
        bad.label,
        letter.reason,
        bad.reasons
    );
    assert_eq!(
        letter.original_size,
        bad.value.len() as u64,
        "{}",
        bad.label
    );
    let huge = bad.value.len() > 256 * 1024 || bad.key.len() > 1024;
    assert_eq!(letter.original_truncated, huge, "{}", bad.label);
    assert!(
        bad.key.starts_with(&letter.original_key) && !letter.original_key.is_empty(),
        "{}: original key",
        bad.label
    );
    assert!(
        bad.value.starts_with(&letter.original_value),
        "{}: original bytes",
        bad.label
    );
    if huge {
        assert!(
            letter.reason.contains("original truncated"),
            "{}",
            bad.label
        );
    } else {
        assert_eq!(letter.original_key, bad.key, "{}: original key", bad.label);
        assert_eq!(
            letter.original_value, bad.value,
            "{}: original bytes",
            bad.label
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_hostile_events_are_dead_lettered_and_the_consumers_keep_going() {
    let env = TestEnv::new().await;
    let app = env.start(&Role::CONSUMERS, |_| {}).await;
    let valid = Valid::new();
    let poison = all_poison(&env.topics, &valid);
    let sent = publish(&env, &poison, &valid).await;

    let started = Instant::now();
    wait_past_the_poison(&env, &valid.code).await;
    let caught_up = started.elapsed();

    let letters = wait_for_dead_letters(&env, &sent).await;
    for ((topic, partition, offset), bad) in &sent {
        let letter = &letters[&(topic.clone(), *partition, *offset, bad.consumer.to_owned())];
        assert_dead_letter(bad, topic, letter);
    }
    // Invalid requests that can be addressed still get an answer; a record
    // over its message's size bound (the 1000 KiB user id) is refused before
    // it is read, dead-lettered unanswered (issue #24, item 1).
    let invalid_answers = env
        .read_topic(&env.topics.claim_results())
        .await
        .iter()
        .filter_map(|r| decode::<ClaimDecided>(r).ok())
        .filter(|d| d.request_id.starts_with("bad-claim-"))
        .count();
    assert_eq!(
        invalid_answers, 3,
        "each addressable invalid claim is answered"
    );
    // Nothing valid was invented from the poison.
    assert_eq!(env.count("SELECT count(*) FROM coupons").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM claim_decisions").await, 1);
    assert_eq!(
        env.count("SELECT count(*) FROM purchase_decisions").await,
        1
    );
    eprintln!(
        "{} poison records dead-lettered; consumers caught up {caught_up:?} after the valid events",
        sent.len()
    );
    app.stop().await;
}

fn with_envelope<E: Event>(mut event: E) -> E {
    *event.envelope_mut() = Some(envelope_of::<E>());
    event
}
