//! No record stops a partition: requests that collide on their id, values
//! Postgres refuses, and redelivered refusals (issue #14, items 1 and 4).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::future::join_all;
use prost::Message as _;
use serde_json::Value;

use coupon_platform::kafka::{decode, Publisher, Record};
use coupon_schemas::{
    new_envelope, ClaimDecided, ClaimOutcome, ClaimRequested, DeadLetter, PurchaseDecided,
    PurchaseRequested,
};
use couponctl::app::Role;

use crate::harness::{assert_invariants, release, TestEnv};

async fn publish_claim(publisher: &Publisher, env: &TestEnv, request_id: &str, user: &str) {
    let event = ClaimRequested {
        envelope: Some(publisher.envelope::<ClaimRequested>(request_id)),
        request_id: request_id.into(),
        user_id: user.into(),
        category: String::new(),
        answered_sold_out: false,
    };
    publisher
        .send(&env.topics.claims(), user, &event)
        .await
        .expect("publish claim");
}

/// Every claim decision published so far.
async fn claim_results(env: &TestEnv) -> Vec<(Record, ClaimDecided)> {
    env.read_topic(&env.topics.claim_results())
        .await
        .into_iter()
        .map(|record| {
            let decision = decode::<ClaimDecided>(&record).expect("a decision");
            (record, decision)
        })
        .collect()
}

/// Five pairs of claims, each pair two users under one request id, in one
/// burst on the claims topic: before, the processor put two decisions under
/// one id in a batch, rolled it back and retried it forever, so every later
/// claim went unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_sharing_a_request_id_in_one_burst_stall_nothing() {
    let env = TestEnv::new().await;
    let app = env.start(&[Role::Coupons, Role::Claims], |_| {}).await;
    release(&env, "Shared", 20).await;
    let publisher = Publisher::new(&env.kafka, "storefront").unwrap();
    join_all((0..5).flat_map(|i| {
        let (publisher, env) = (&publisher, &env);
        ["first", "second"].map(move |who| async move {
            publish_claim(
                publisher,
                env,
                &format!("shared-{i}"),
                &format!("{who}-{i}"),
            )
            .await
        })
    }))
    .await;
    env.wait_caught_up("claims", &env.topics.claims(), Duration::from_secs(60))
        .await;
    publish_claim(&publisher, &env, "later", "latecomer").await;
    env.wait_caught_up("claims", &env.topics.claims(), Duration::from_secs(60))
        .await;

    let results = claim_results(&env).await;
    for i in 0..5 {
        let id = format!("shared-{i}");
        let pair: Vec<&ClaimDecided> = results
            .iter()
            .map(|(_, d)| d)
            .filter(|d| d.request_id == id)
            .collect();
        let users: HashSet<&str> = pair.iter().map(|d| d.user_id.as_str()).collect();
        assert_eq!(
            users,
            HashSet::from([
                format!("first-{i}").as_str(),
                format!("second-{i}").as_str()
            ]),
            "each user of {id} is answered, addressed to them: {pair:?}"
        );
        let granted: Vec<&&ClaimDecided> = pair
            .iter()
            .filter(|d| d.outcome == ClaimOutcome::Granted as i32)
            .collect();
        let invalid: Vec<&&ClaimDecided> = pair
            .iter()
            .filter(|d| d.outcome == ClaimOutcome::Conflict as i32)
            .collect();
        assert_eq!((granted.len(), invalid.len()), (1, 1), "{pair:?}");
        assert!(invalid[0].coupon_code.is_empty());
        assert!(
            invalid[0].reason.contains("already used by another user"),
            "{}",
            invalid[0].reason
        );
        let owner: String =
            sqlx::query_scalar("SELECT user_id FROM claim_decisions WHERE request_id = $1")
                .bind(&id)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        assert_eq!(
            owner, granted[0].user_id,
            "the stored decision is the winner's"
        );
    }
    assert!(
        results
            .iter()
            .any(|(_, d)| d.user_id == "latecomer" && d.outcome == ClaimOutcome::Granted as i32),
        "a later claim is decided"
    );
    assert_invariants(&env, 20).await;
    app.stop().await;
}

/// The same, one after the other: before, the second user was answered with
/// the first user's stored decision, coupon code included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_reused_by_another_user_never_gets_the_first_users_decision() {
    let env = TestEnv::new().await;
    let app = env.start(&[Role::Coupons, Role::Claims], |_| {}).await;
    release(&env, "Reused", 2).await;
    let publisher = Publisher::new(&env.kafka, "storefront").unwrap();
    publish_claim(&publisher, &env, "reused", "alice").await;
    env.wait_caught_up("claims", &env.topics.claims(), Duration::from_secs(60))
        .await;
    publish_claim(&publisher, &env, "reused", "bob").await;
    env.wait_caught_up("claims", &env.topics.claims(), Duration::from_secs(60))
        .await;

    let results = claim_results(&env).await;
    let answers: Vec<&(Record, ClaimDecided)> = results
        .iter()
        .filter(|(_, d)| d.request_id == "reused")
        .collect();
    assert_eq!(answers.len(), 2, "{answers:?}");
    // Partitions are read one after the other: find each answer by its key.
    let by_key = |key: &str| answers.iter().find(|(r, _)| r.key_str() == Some(key));
    let (_, first) = by_key("alice").expect("alice's answer");
    assert_eq!(first.user_id, "alice");
    assert_eq!(first.outcome, ClaimOutcome::Granted as i32);
    let (record, second) = by_key("bob").expect("an answer keyed by bob");
    assert_eq!(second.user_id, "bob", "addressed to bob: {second:?}");
    assert_eq!(record.key_str(), Some("bob"));
    assert_eq!(second.outcome, ClaimOutcome::Conflict as i32);
    assert!(second.coupon_code.is_empty(), "never alice's coupon");
    assert_eq!(
        env.count("SELECT count(*) FROM coupons WHERE status = 'held'")
            .await,
        1
    );
    assert_invariants(&env, 2).await;
    app.stop().await;
}

/// Over HTTP: pairs of users sending the same `x-request-id` at the same
/// moment each get their own answer (one coupon, one `request_id_conflict`), and
/// everyone after them is served. Before, these answers and every later
/// claim timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_http_claims_sharing_an_x_request_id_are_each_answered() {
    let env = TestEnv::new().await;
    let app = env
        .start(&[Role::Gateway, Role::Coupons, Role::Claims], |c| {
            c.gateway.reply_timeout = Duration::from_secs(15);
        })
        .await;
    release(&env, "Pairs", 20).await;
    let http = TestEnv::http_client();
    let claim = |user: String, request_id: Option<String>| {
        let mut request = http.get(app.url(&format!("/api/v1/coupon?id={user}")));
        if let Some(id) = request_id {
            request = request.header("x-request-id", id);
        }
        async move {
            let response = request.send().await.expect("claim");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (user, status, body)
        }
    };
    let answers = join_all((0..5).flat_map(|i| {
        let claim = &claim;
        ["a", "b"].map(move |who| claim(format!("pair{i}-{who}"), Some(format!("dup-{i}"))))
    }))
    .await;
    let mut per_pair: HashMap<String, Vec<(u16, Value)>> = HashMap::new();
    for (user, status, body) in answers {
        if status == 200 {
            assert_eq!(body["user_id"], user.as_str(), "an answer meant for {user}");
        }
        let pair = user.split('-').next().unwrap().to_owned();
        per_pair.entry(pair).or_default().push((status, body));
    }
    for (pair, answers) in &per_pair {
        let mut statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 409], "{pair}: {answers:?}");
        let refused = answers.iter().find(|(s, _)| *s == 409).unwrap();
        assert_eq!(refused.1["error"], "request_id_conflict");
    }
    let later = join_all((0..5).map(|i| claim(format!("after-{i}"), None))).await;
    for (user, status, body) in later {
        assert_eq!(status, 200, "{user}: {body}");
    }
    assert_invariants(&env, 20).await;
    app.stop().await;
}

fn claim_decided(event_id: uuid::Uuid, request_id: &str, user: &str) -> ClaimDecided {
    ClaimDecided {
        envelope: Some(new_envelope::<ClaimDecided>(
            event_id.to_string(),
            coupon_platform::time::now_ms(),
            "foreign-producer",
            "",
        )),
        request_id: request_id.into(),
        user_id: user.into(),
        outcome: ClaimOutcome::SoldOut as i32,
        ..Default::default()
    }
}

/// A result a foreign producer published with a NUL in an id: Postgres
/// refuses it on every attempt. Before, the history sink retried that batch
/// forever; now the record is dead-lettered with the reason and the sink
/// goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_postgres_refuses_is_dead_lettered_and_the_history_sink_goes_on() {
    let env = TestEnv::new().await;
    let app = env.start(&[Role::History], |_| {}).await;
    let publisher = Publisher::new(&env.kafka, "foreign").unwrap();
    let topic = env.topics.claim_results();
    let (good1, bad, good2) = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
    );
    // One key, one partition: the poison sits between the two good ones.
    publisher
        .send(&topic, "k", &claim_decided(good1, "g1", "user-1"))
        .await
        .unwrap();
    let poison = publisher
        .send(&topic, "k", &claim_decided(bad, "bad", "nul\0user"))
        .await
        .unwrap();
    publisher
        .send(&topic, "k", &claim_decided(good2, "g2", "user-2"))
        .await
        .unwrap();
    env.wait_caught_up("history", &topic, Duration::from_secs(60))
        .await;

    let rows: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM coupon_history")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        rows.iter().collect::<HashSet<_>>(),
        HashSet::from([&good1, &good2])
    );
    let letters: Vec<DeadLetter> = env
        .read_topic(&env.topics.dead_letter())
        .await
        .iter()
        .map(|r| DeadLetter::decode(r.value.as_deref().unwrap()).unwrap())
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.consumer, "history");
    assert_eq!(
        (
            letter.source_topic.as_str(),
            letter.source_partition,
            letter.source_offset
        ),
        (topic.as_str(), poison.partition, poison.offset)
    );
    assert!(
        letter.reason.starts_with("permanent failure"),
        "{}",
        letter.reason
    );
    assert!(letter.reason.contains("0x00"), "{}", letter.reason);
    app.stop().await;
}

/// A redelivered batch of invalid requests repeats their answers and dead
/// letters exactly (same ids, same times), so the history sink adds one row
/// per answer and a reader of the dead letters sees one letter per record.
/// Before, each delivery stamped a new time and a new dead-letter id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_invalid_requests_add_no_second_history_row_or_dead_letter() {
    let env = TestEnv::new().await;
    let ctx = couponctl::app::connect(&env.config()).await.unwrap();
    let publisher = Publisher::new(&env.kafka, "storefront").unwrap();
    publish_claim(&publisher, &env, "no-user", "").await;
    let purchase = PurchaseRequested {
        envelope: Some(publisher.envelope::<PurchaseRequested>("")),
        request_id: "bad-order".into(),
        user_id: "shopper".into(),
        coupon_code: "C0DE".into(),
        order_id: String::new(),
        order_total: None,
    };
    publisher
        .send(&env.topics.purchases(), "shopper", &purchase)
        .await
        .unwrap();
    let claims = env.read_topic(&env.topics.claims()).await;
    let purchases = env.read_topic(&env.topics.purchases()).await;
    for _delivery in 0..2 {
        coupon_consumers::claims::handle_batch(&ctx, &claims)
            .await
            .unwrap();
        coupon_consumers::purchases::handle_batch(&ctx, &purchases)
            .await
            .unwrap();
    }

    let claim_answers = env.read_topic(&env.topics.claim_results()).await;
    let purchase_answers = env.read_topic(&env.topics.purchase_results()).await;
    assert_eq!((claim_answers.len(), purchase_answers.len()), (2, 2));
    let envelopes: HashSet<_> = claim_answers
        .iter()
        .map(|r| decode::<ClaimDecided>(r).unwrap().envelope)
        .chain(
            purchase_answers
                .iter()
                .map(|r| decode::<PurchaseDecided>(r).unwrap().envelope),
        )
        .collect();
    assert_eq!(
        envelopes.len(),
        2,
        "one answer per request, repeated exactly"
    );

    let answers: Vec<Record> = claim_answers.into_iter().chain(purchase_answers).collect();
    coupon_consumers::history::handle_batch(&ctx, &answers)
        .await
        .unwrap();
    assert_eq!(
        env.count("SELECT count(*) FROM coupon_history WHERE kind = 'rejected'")
            .await,
        2,
        "one history row per answer"
    );

    let letters: Vec<DeadLetter> = env
        .read_topic(&env.topics.dead_letter())
        .await
        .iter()
        .map(|r| DeadLetter::decode(r.value.as_deref().unwrap()).unwrap())
        .collect();
    assert_eq!(letters.len(), 4, "each delivery dead-letters both records");
    let distinct: HashSet<_> = letters.iter().map(|l| l.envelope.clone()).collect();
    assert_eq!(
        distinct.len(),
        2,
        "a redelivered record repeats its dead letter"
    );
}

/// The broker's record size limit (Kafka's `message.max.bytes`, 1,048,588
/// bytes for a record batch) less room for the key and the batch's own
/// framing: a record this size is one the broker takes from a foreign
/// producer (the Java client's `max.request.size` is 1 MiB), and more than
/// our own producer sends (librdkafka's `message.max.bytes`, 1,000,000).
const BROKER_LIMIT: usize = 1_048_588;
const AT_THE_LIMIT: usize = BROKER_LIMIT - 1_024;

type Fill<E> = Box<dyn Fn(&mut E, String)>;

/// The envelope's fields, each a way to fill an event of type `E`.
fn envelope_fields<E: coupon_schemas::Event + 'static>() -> Vec<(&'static str, Fill<E>)> {
    fn with<E: coupon_schemas::Event>(set: fn(&mut coupon_schemas::Envelope, String)) -> Fill<E> {
        Box::new(move |event: &mut E, text| {
            set(
                event.envelope_mut().get_or_insert_with(Default::default),
                text,
            )
        })
    }
    vec![
        ("envelope.event_id", with::<E>(|e, t| e.event_id = t)),
        ("envelope.producer", with::<E>(|e, t| e.producer = t)),
        ("envelope.event_type", with::<E>(|e, t| e.event_type = t)),
        (
            "envelope.correlation_id",
            with::<E>(|e, t| e.correlation_id = t),
        ),
    ]
}

/// One record per field of `base`, that field padded until the record is
/// [`AT_THE_LIMIT`] bytes long.
fn at_the_limit<E: coupon_schemas::Event + Clone + 'static>(
    base: &E,
    fields: Vec<(&'static str, Fill<E>)>,
) -> Vec<(String, Vec<u8>)> {
    envelope_fields::<E>()
        .into_iter()
        .chain(fields)
        .map(|(name, fill)| {
            let mut event = base.clone();
            fill(&mut event, String::new());
            let rest = event.encoded_len();
            // The field's tag and its length's varint take a few bytes, and
            // a nested envelope's own length grows too: shrink to fit.
            let mut pad = AT_THE_LIMIT - rest;
            let bytes = loop {
                fill(&mut event, "x".repeat(pad));
                let bytes = event.encode_to_vec();
                if bytes.len() <= AT_THE_LIMIT {
                    break bytes;
                }
                pad -= bytes.len() - AT_THE_LIMIT;
            };
            assert!(
                bytes.len() <= AT_THE_LIMIT && bytes.len() > AT_THE_LIMIT - 8,
                "{name}: {} bytes",
                bytes.len()
            );
            (format!("{} {name}", E::TYPE_NAME), bytes)
        })
        .collect()
}

/// One key per partition of the test's topics (they all have the same
/// count), found by where probes land on the dead-letter topic, which no
/// role reads.
async fn a_key_per_partition(env: &TestEnv, publisher: &Publisher) -> Vec<String> {
    let mut keys: HashMap<i32, String> = HashMap::new();
    for i in 0..64 {
        let key = format!("probe-{i}");
        let landed = publisher
            .send_bytes(&env.topics.dead_letter(), Some(key.as_bytes()), b"probe")
            .await
            .expect("probe");
        keys.entry(landed.partition).or_insert(key);
        if keys.len() == 2 {
            break;
        }
    }
    assert_eq!(keys.len(), 2, "probes reached every partition: {keys:?}");
    keys.into_values().collect()
}

/// Issue #24, item 1: on every topic a consumer reads, a record with each of
/// its fields in turn at the broker's record size limit, on every partition.
/// Before, a claim whose correlation id filled the record was decided, its
/// answer (which echoes the id) could never be published, and the batch was
/// retried forever: no later claim of that partition was answered. Now each
/// such record is refused at the boundary (dead-lettered, bounded) and every
/// partition goes on deciding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_at_the_size_limit_in_any_field_stall_no_partition() {
    let env = TestEnv::new().await;
    let app = env
        .start(&Role::ALL, |c| {
            c.gateway.reply_timeout = Duration::from_secs(20)
        })
        .await;
    let mut foreign = env.kafka.clone();
    foreign
        .extra
        .push(("message.max.bytes".into(), BROKER_LIMIT.to_string()));
    let publisher = Publisher::new(&foreign, "foreign-producer").unwrap();
    let keys = a_key_per_partition(&env, &publisher).await;

    let claim = ClaimRequested {
        envelope: Some(new_envelope::<ClaimRequested>(
            uuid::Uuid::new_v4().to_string(),
            coupon_platform::time::now_ms(),
            "foreign",
            "corr",
        )),
        request_id: "big-claim".into(),
        user_id: "big-user".into(),
        category: String::new(),
        answered_sold_out: false,
    };
    let purchase = PurchaseRequested {
        envelope: Some(new_envelope::<PurchaseRequested>(
            uuid::Uuid::new_v4().to_string(),
            coupon_platform::time::now_ms(),
            "foreign",
            "corr",
        )),
        request_id: "big-purchase".into(),
        user_id: "big-user".into(),
        coupon_code: "0AN35HST00000".into(),
        order_id: "big-order".into(),
        order_total: None,
    };
    let created = coupon_schemas::CouponsCreated {
        envelope: Some(new_envelope::<coupon_schemas::CouponsCreated>(
            uuid::Uuid::new_v4().to_string(),
            coupon_platform::time::now_ms(),
            "foreign",
            "",
        )),
        batch_id: "big-batch".into(),
        employee_id: "e-big".into(),
        category: "Big".into(),
        coupon_ids: vec![],
        chunk_index: 0,
        chunk_count: 1,
        campaign: None,
    };
    let expired = coupon_schemas::HoldExpired {
        envelope: Some(new_envelope::<coupon_schemas::HoldExpired>(
            uuid::Uuid::new_v4().to_string(),
            coupon_platform::time::now_ms(),
            "foreign",
            "",
        )),
        coupon_code: "0AN35HST00000".into(),
        user_id: "big-user".into(),
        hold_id: "big-hold".into(),
        held_until_ms: coupon_platform::time::now_ms(),
        campaign_ended_at_ms: 0,
    };
    let decided = ClaimDecided {
        outcome: ClaimOutcome::Granted as i32,
        coupon_code: "0AN35HST00000".into(),
        ..claim_decided(uuid::Uuid::new_v4(), "big-claim", "big-user")
    };
    let purchase_decided = PurchaseDecided {
        envelope: Some(new_envelope::<PurchaseDecided>(
            uuid::Uuid::new_v4().to_string(),
            coupon_platform::time::now_ms(),
            "foreign",
            "",
        )),
        request_id: "big-purchase".into(),
        user_id: "big-user".into(),
        coupon_code: "0AN35HST00000".into(),
        order_id: "big-order".into(),
        outcome: coupon_schemas::PurchaseOutcome::Redeemed as i32,
        ..Default::default()
    };
    let mut poison: Vec<(String, String, Vec<u8>)> = Vec::new();
    let mut add = |topic: String, records: Vec<(String, Vec<u8>)>| {
        poison.extend(records.into_iter().map(|(n, b)| (topic.clone(), n, b)));
    };
    add(
        env.topics.claims(),
        at_the_limit(
            &claim,
            vec![
                (
                    "request_id",
                    Box::new(|e: &mut ClaimRequested, t| e.request_id = t),
                ),
                (
                    "user_id",
                    Box::new(|e: &mut ClaimRequested, t| e.user_id = t),
                ),
                (
                    "category",
                    Box::new(|e: &mut ClaimRequested, t| e.category = t),
                ),
            ],
        ),
    );
    add(
        env.topics.purchases(),
        at_the_limit(
            &purchase,
            vec![
                (
                    "request_id",
                    Box::new(|e: &mut PurchaseRequested, t| e.request_id = t),
                ),
                (
                    "user_id",
                    Box::new(|e: &mut PurchaseRequested, t| e.user_id = t),
                ),
                (
                    "coupon_code",
                    Box::new(|e: &mut PurchaseRequested, t| e.coupon_code = t),
                ),
                (
                    "order_id",
                    Box::new(|e: &mut PurchaseRequested, t| e.order_id = t),
                ),
            ],
        ),
    );
    add(
        env.topics.created(),
        at_the_limit(
            &created,
            vec![
                (
                    "batch_id",
                    Box::new(|e: &mut coupon_schemas::CouponsCreated, t| e.batch_id = t),
                ),
                (
                    "employee_id",
                    Box::new(|e: &mut coupon_schemas::CouponsCreated, t| e.employee_id = t),
                ),
                (
                    "category",
                    Box::new(|e: &mut coupon_schemas::CouponsCreated, t| e.category = t),
                ),
                // The repeated ids, filled with one id as often as it fits.
                (
                    "coupon_ids",
                    Box::new(|e: &mut coupon_schemas::CouponsCreated, t: String| {
                        e.coupon_ids = vec![1; t.len()]
                    }),
                ),
            ],
        ),
    );
    add(
        env.topics.expirations(),
        at_the_limit(
            &expired,
            vec![
                (
                    "coupon_code",
                    Box::new(|e: &mut coupon_schemas::HoldExpired, t| e.coupon_code = t),
                ),
                (
                    "user_id",
                    Box::new(|e: &mut coupon_schemas::HoldExpired, t| e.user_id = t),
                ),
                (
                    "hold_id",
                    Box::new(|e: &mut coupon_schemas::HoldExpired, t| e.hold_id = t),
                ),
            ],
        ),
    );
    add(
        env.topics.claim_results(),
        at_the_limit(
            &decided,
            vec![
                (
                    "request_id",
                    Box::new(|e: &mut ClaimDecided, t| e.request_id = t),
                ),
                ("user_id", Box::new(|e: &mut ClaimDecided, t| e.user_id = t)),
                (
                    "coupon_code",
                    Box::new(|e: &mut ClaimDecided, t| e.coupon_code = t),
                ),
                (
                    "category",
                    Box::new(|e: &mut ClaimDecided, t| e.category = t),
                ),
                ("reason", Box::new(|e: &mut ClaimDecided, t| e.reason = t)),
            ],
        ),
    );
    add(
        env.topics.purchase_results(),
        at_the_limit(
            &purchase_decided,
            vec![
                (
                    "request_id",
                    Box::new(|e: &mut PurchaseDecided, t| e.request_id = t),
                ),
                (
                    "user_id",
                    Box::new(|e: &mut PurchaseDecided, t| e.user_id = t),
                ),
                (
                    "coupon_code",
                    Box::new(|e: &mut PurchaseDecided, t| e.coupon_code = t),
                ),
                (
                    "order_id",
                    Box::new(|e: &mut PurchaseDecided, t| e.order_id = t),
                ),
                (
                    "reason",
                    Box::new(|e: &mut PurchaseDecided, t| e.reason = t),
                ),
            ],
        ),
    );
    let mut published = 0;
    for (topic, name, bytes) in &poison {
        for key in &keys {
            publisher
                .send_bytes(topic, Some(key.as_bytes()), bytes)
                .await
                .unwrap_or_else(|e| panic!("the broker takes {name} ({} bytes): {e}", bytes.len()));
            published += 1;
        }
    }

    // Every partition of every role keeps deciding: a release is projected,
    // every claim (users over every partition) and a purchase are answered.
    let codes = release(&env, "After", 30).await;
    let http = TestEnv::http_client();
    let answers = join_all((0..40).map(|i| {
        let http = &http;
        let url = app.url(&format!("/api/v1/coupon?id=after-{i}"));
        async move {
            let response = http.get(url).send().await.expect("claim");
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    }))
    .await;
    let granted: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| body)
        .collect();
    assert_eq!(granted.len(), 30, "30 coupons for 40 users: {answers:?}");
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == 404).count(),
        10,
        "{answers:?}"
    );
    let bought = http
        .post(app.url("/api/v1/purchase"))
        .json(&serde_json::json!({
            "user_id": granted[0]["user_id"],
            "coupon_code": granted[0]["coupon_code"],
            "order_id": "after-order",
        }))
        .send()
        .await
        .expect("purchase");
    assert_eq!(bought.status().as_u16(), 200);
    env.wait_every_role_caught_up(Duration::from_secs(60)).await;
    // Each refused record is set aside once per role that reads it (the
    // history sink reads the created and both results topics too), each
    // letter within the topic's limit.
    let letters: Vec<DeadLetter> = env
        .read_topic(&env.topics.dead_letter())
        .await
        .iter()
        .filter_map(|record| decode::<DeadLetter>(record).ok())
        .collect();
    let readers = |topic: &str| {
        if *topic == env.topics.created() {
            2
        } else if *topic == env.topics.claims()
            || *topic == env.topics.purchases()
            || *topic == env.topics.expirations()
            || *topic == env.topics.claim_results()
            || *topic == env.topics.purchase_results()
        {
            1
        } else {
            0
        }
    };
    let expected: usize = poison
        .iter()
        .map(|(topic, _, _)| readers(topic) * keys.len())
        .sum();
    assert_eq!(published, poison.len() * keys.len());
    assert_eq!(
        letters.len(),
        expected,
        "one dead letter per refused record and reader"
    );
    assert!(letters.iter().all(|l| l.encoded_len() < 300 * 1024));
    assert!(codes.len() == 30);
    assert_invariants(&env, 30).await;
    app.stop().await;
}
