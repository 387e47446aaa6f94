//! Fault injection, the quick suite: `kill -9` in the middle of a burst,
//! poison records on every input topic, hostile HTTP input and Redis loss
//! while serving. Everything runs against the real services; every wait is a
//! condition with a deadline, never a fixed sleep.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use futures::FutureExt as _;
use prost::Message as _;
use serde_json::{json, Value};

use coupon_domain::{CouponCode, SnowflakeId};
use coupon_platform::kafka::{decode, Publisher};
use coupon_platform::redis::Cache;
use coupon_platform::time::now_ms;
use coupon_platform::KafkaSettings;
use coupon_schemas::{
    new_envelope, ClaimDecided, ClaimRequested, CouponsCreated, DeadLetter, Envelope, Event,
    HoldExpired, PurchaseRequested,
};
use couponctl::app::Role;

use crate::harness::{
    assert_invariants, eventually, free_port, redis_url, release, Child, TestEnv, CONSUME_ALL,
};
use crate::processes::{claim_with_retries, eventually_some, Progress};

/// Publishes claims straight to Kafka, as a storefront may.
async fn publish_claims(topic: &str, publisher: &Publisher, ids: impl Iterator<Item = usize>) {
    for i in ids {
        let request_id = format!("direct-{i}");
        let user = format!("direct-user-{i}");
        let event = ClaimRequested {
            envelope: Some(publisher.envelope::<ClaimRequested>(&request_id)),
            request_id,
            user_id: user.clone(),
            category: String::new(),
            answered_sold_out: false,
        };
        publisher
            .send(topic, &user, &event)
            .await
            .expect("publish claim");
    }
}

/// Every claim request on the topic has exactly one stored decision, and the
/// results topic carries that decision (same event id in every copy) for each.
/// Returns the request ids.
async fn assert_every_claim_decided_once(env: &TestEnv, within: Duration) -> HashSet<String> {
    // A claim answered `sold_out` by the gateway reaches the topic after its
    // answer, so the topic is read again until it and the decisions agree.
    let read_requests = || async {
        env.read_topic(&env.topics.claims())
            .await
            .iter()
            .map(|r| {
                decode::<ClaimRequested>(r)
                    .expect("a claim we published")
                    .request_id
            })
            .collect::<HashSet<String>>()
    };
    eventually(
        "every published claim has a stored decision",
        within,
        || async {
            let ids: Vec<String> = read_requests().await.into_iter().collect();
            let decided: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM claim_decisions WHERE request_id = ANY($1)",
            )
            .bind(&ids)
            .fetch_one(&env.pool)
            .await
            .expect("count decisions");
            decided == ids.len() as i64
                && env.count("SELECT count(*) FROM claim_decisions").await == decided
        },
    )
    .await;
    let requests = read_requests().await;
    let stored: HashMap<String, uuid::Uuid> =
        sqlx::query_as("SELECT request_id, event_id FROM claim_decisions")
            .fetch_all(&env.pool)
            .await
            .expect("stored decisions")
            .into_iter()
            .collect();
    assert_eq!(
        stored.len(),
        requests.len(),
        "no decision for a request that was never published"
    );

    let published = eventually_some(
        "the results topic has a decision for every request",
        within,
        || async {
            let mut published: HashMap<String, HashSet<String>> = HashMap::new();
            for record in env.read_topic(&env.topics.claim_results()).await {
                let decision = decode::<ClaimDecided>(&record).expect("a decision we published");
                let event_id = decision.envelope.expect("envelope").event_id;
                published
                    .entry(decision.request_id)
                    .or_default()
                    .insert(event_id);
            }
            requests
                .iter()
                .all(|id| published.contains_key(id))
                .then_some(published)
        },
    )
    .await;
    for (request_id, event_ids) in &published {
        assert_eq!(
            event_ids.len(),
            1,
            "{request_id} was decided more than once: {event_ids:?}"
        );
        let stored_id = stored
            .get(request_id)
            .unwrap_or_else(|| panic!("{request_id} published but not stored"));
        assert!(
            event_ids.contains(&stored_id.to_string()),
            "{request_id}: published event is not the stored decision"
        );
    }
    requests
}

/// What the database says about each HTTP answer must be what the user was told.
async fn assert_answers_match_the_database(
    env: &TestEnv,
    answers: &[(String, String, u16, Value)],
) {
    for (user, request_id, status, body) in answers {
        let (outcome, code): (String, Option<String>) = sqlx::query_as(
            "SELECT outcome, coupon_code FROM claim_decisions WHERE request_id = $1",
        )
        .bind(request_id)
        .fetch_one(&env.pool)
        .await
        .unwrap_or_else(|e| panic!("{request_id} answered {status} but has no decision: {e}"));
        match status {
            200 => {
                assert_eq!(outcome, "granted", "{user}");
                assert_eq!(body["coupon_code"].as_str(), code.as_deref(), "{user}");
                let holder: Option<String> =
                    sqlx::query_scalar("SELECT holder_user_id FROM coupons WHERE code = $1")
                        .bind(&code)
                        .fetch_one(&env.pool)
                        .await
                        .expect("held coupon");
                assert_eq!(holder.as_deref(), Some(user.as_str()));
            }
            404 => {
                assert_eq!(outcome, "sold_out", "{user}");
                assert_eq!(body["error"], "sold_out");
            }
            other => panic!("{user}: unexpected final answer {other}: {body}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_burst_loses_and_duplicates_no_decision() {
    let env = TestEnv::new().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut first = Child::spawn(&env, &["run"], port, "run-1");
    first.wait_healthy(&base, Duration::from_secs(60)).await;
    release(&env, "Flash", 200).await;
    let publisher = Publisher::new(&env.kafka, "chaos-storefront").expect("publisher");

    // 500 users through HTTP (retrying through the outage) ...
    let answered = Progress::new(150);
    let burst = {
        let http = TestEnv::http_client();
        let base = base.clone();
        let answered = answered.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        tokio::spawn(async move {
            stream::iter(0..500)
                .map(|i| {
                    let (http, base, answered) = (http.clone(), base.clone(), answered.clone());
                    async move {
                        let user = format!("http-user-{i}");
                        let request_id = format!("http-{i}");
                        let (answer, failures) =
                            claim_with_retries(&http, &base, &user, &request_id, deadline).await;
                        answered.tick();
                        (user, request_id, answer, failures)
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await
        })
    };
    // ... and 200 straight to Kafka, half before the crash, half during it.
    let direct = {
        let (topic, publisher) = (env.topics.claims(), publisher.clone());
        tokio::spawn(async move { publish_claims(&topic, &publisher, 0..100).await })
    };
    let answered_before = answered.wait(Duration::from_secs(30)).await;
    let killed_at = Instant::now();
    first.kill_9().await;
    direct.await.expect("direct claims");
    publish_claims(&env.topics.claims(), &publisher, 100..200).await;

    let restarted_at = Instant::now();
    let mut second = Child::spawn(&env, &["run"], port, "run-2");
    second.wait_healthy(&base, Duration::from_secs(30)).await;
    let recovery = killed_at.elapsed();

    let results = burst.await.expect("burst");
    let failed_attempts: u32 = results.iter().map(|r| r.3).sum();
    let answers: Vec<(String, String, u16, Value)> = results
        .into_iter()
        .map(|(user, request_id, answer, _)| {
            let (status, body) =
                answer.unwrap_or_else(|| panic!("{user} got no answer within the deadline"));
            (user, request_id, status, body)
        })
        .collect();

    let requests = assert_every_claim_decided_once(&env, Duration::from_secs(30)).await;
    let decided_in = restarted_at.elapsed();
    for i in 0..200 {
        assert!(requests.contains(&format!("direct-{i}")), "direct-{i}");
    }
    assert_eq!(requests.len(), 700, "every user's claim reached the log");
    assert_answers_match_the_database(&env, &answers).await;
    let granted = answers.iter().filter(|a| a.2 == 200).count();
    assert_eq!(env.status_counts().await.held, 200, "the pool is all held");
    assert_eq!(
        env.count("SELECT count(*) FROM claim_decisions WHERE outcome = 'granted'")
            .await,
        200
    );
    assert_invariants(&env, 200).await;
    second.assert_alive();
    eprintln!(
        "kill -9 after {answered_before} of 500 HTTP answers: healthy again {recovery:?} after the kill; \
         all 700 requests decided {decided_in:?} after the restart; \
         {granted} HTTP winners, {failed_attempts} failed HTTP attempts retried"
    );
    second.kill_9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_gateway_leaves_the_consumers_deciding() {
    let env = TestEnv::new().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut consumers = Child::spawn(&env, CONSUME_ALL, free_port(), "consumers");
    let mut gateway = Child::spawn(&env, &["gateway"], port, "gateway-1");
    gateway.wait_healthy(&base, Duration::from_secs(60)).await;
    release(&env, "Gadgets", 50).await;

    // No retries this time: what was in flight when the gateway died fails.
    let answered = Progress::new(40);
    let burst = {
        let http = TestEnv::http_client();
        let base = base.clone();
        let answered = answered.clone();
        tokio::spawn(async move {
            stream::iter(0..150)
                .map(|i| {
                    let (http, base, answered) = (http.clone(), base.clone(), answered.clone());
                    async move {
                        let user = format!("shopper-{i}");
                        let request_id = format!("gw-{i}");
                        let (answer, _) =
                            claim_with_retries(&http, &base, &user, &request_id, Instant::now())
                                .await;
                        answered.tick();
                        (user, request_id, answer)
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<_>>()
                .await
        })
    };
    answered.wait(Duration::from_secs(30)).await;
    let killed_at = Instant::now();
    gateway.kill_9().await;
    let results = burst.await.expect("burst");
    let failed: Vec<(String, String)> = results
        .iter()
        .filter(|r| r.2.is_none())
        .map(|r| (r.0.clone(), r.1.clone()))
        .collect();
    assert!(!failed.is_empty(), "the kill interrupted some requests");

    // The consumers keep deciding while no gateway runs.
    let publisher = Publisher::new(&env.kafka, "chaos-storefront").expect("publisher");
    publish_claims(&env.topics.claims(), &publisher, 0..20).await;
    let ids: Vec<String> = (0..20).map(|i| format!("direct-{i}")).collect();
    eventually(
        "direct claims decided with the gateway down",
        Duration::from_secs(20),
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM claim_decisions WHERE request_id = ANY($1)",
            )
            .bind(&ids)
            .fetch_one(&env.pool)
            .await
            .expect("count");
            n == 20
        },
    )
    .await;
    consumers.assert_alive();

    let mut gateway = Child::spawn(&env, &["gateway"], port, "gateway-2");
    gateway.wait_healthy(&base, Duration::from_secs(30)).await;
    let recovery = killed_at.elapsed();
    // Those who saw an error retry with their request id; new users come too.
    let http = TestEnv::http_client();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answers: Vec<(String, String, u16, Value)> = results
        .into_iter()
        .filter_map(|(user, request_id, answer)| answer.map(|(s, b)| (user, request_id, s, b)))
        .collect();
    let retried = failed.len();
    let mut again: Vec<(String, String)> = failed;
    again.extend((0..10).map(|i| (format!("latecomer-{i}"), format!("late-{i}"))));
    let more = stream::iter(again)
        .map(|(user, request_id)| {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let (answer, _) =
                    claim_with_retries(&http, &base, &user, &request_id, deadline).await;
                let (status, body) =
                    answer.unwrap_or_else(|| panic!("{user}: the new gateway did not answer"));
                (user, request_id, status, body)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    answers.extend(more);

    let requests = assert_every_claim_decided_once(&env, Duration::from_secs(30)).await;
    assert_eq!(requests.len(), 180);
    assert_answers_match_the_database(&env, &answers).await;
    assert_eq!(env.status_counts().await.held, 50);
    assert_invariants(&env, 50).await;
    consumers.assert_alive();
    eprintln!(
        "gateway kill -9: {retried} requests failed, a new gateway answered {recovery:?} after the kill"
    );
    gateway.kill_9().await;
    consumers.kill_9().await;
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_hostile_events_are_dead_lettered_and_the_consumers_keep_going() {
    let env = TestEnv::new().await;
    let app = env.start(&Role::CONSUMERS, |_| {}).await;
    let topics = &env.topics;
    let huge = "u".repeat(HUGE);
    let coupon_id = snowflake(1);
    let code = CouponCode::from_id(coupon_id).to_string();

    let created = CouponsCreated {
        envelope: None,
        batch_id: uuid::Uuid::new_v4().to_string(),
        employee_id: "e-chaos".into(),
        category: "Survivors".into(),
        coupon_ids: vec![coupon_id.as_i64()],
        chunk_index: 0,
        chunk_count: 1,
    };
    let claim = ClaimRequested {
        envelope: None,
        request_id: "valid-claim".into(),
        user_id: "chaos".into(),
        category: String::new(),
        answered_sold_out: false,
    };
    let purchase = PurchaseRequested {
        envelope: None,
        request_id: "valid-purchase".into(),
        user_id: "chaos".into(),
        coupon_code: code.clone(),
        order_id: "valid-order".into(),
    };
    let expired = HoldExpired {
        envelope: None,
        coupon_code: code.clone(),
        user_id: "chaos".into(),
        hold_id: "no-such-hold".into(),
        held_until_ms: now_ms(),
    };

    let (c, cl, p, x) = (
        topics.created(),
        topics.claims(),
        topics.purchases(),
        topics.expirations(),
    );
    let mut poison = Vec::new();
    poison.extend(generic_poison(&c, "coupons", &created));
    poison.extend(generic_poison(&cl, "claims", &claim));
    poison.extend(generic_poison(&p, "purchases", &purchase));
    poison.extend(generic_poison(&x, "expiry", &expired));
    let created_with = |change: &dyn Fn(&mut CouponsCreated)| {
        let mut event = created.clone();
        change(&mut event);
        event
    };
    poison.extend([
        specific(
            &c,
            "coupons",
            "no coupon ids",
            created_with(&|e| e.coupon_ids.clear()),
            &["coupon_ids is empty"],
        ),
        specific(
            &c,
            "coupons",
            "negative coupon id",
            created_with(&|e| e.coupon_ids = vec![-5]),
            &["is negative"],
        ),
        specific(
            &c,
            "coupons",
            "batch id not a uuid",
            created_with(&|e| e.batch_id = "batch-1".into()),
            &["batch_id"],
        ),
        specific(
            &c,
            "coupons",
            "empty employee id",
            created_with(&|e| e.employee_id.clear()),
            &["employee id must not be empty"],
        ),
        specific(
            &c,
            "coupons",
            "1000 KiB employee id",
            created_with(&|e| e.employee_id = huge.clone()),
            &[
                "employee id must be at most 64 characters",
                "larger than the",
            ],
        ),
        specific(
            &c,
            "coupons",
            "NUL in category",
            created_with(&|e| e.category = "a\0b".into()),
            &["control characters"],
        ),
    ]);
    let claim_with = |change: &dyn Fn(&mut ClaimRequested)| {
        let mut event = claim.clone();
        change(&mut event);
        event
    };
    poison.extend([
        specific(
            &cl,
            "claims",
            "empty user id",
            claim_with(&|e| {
                e.user_id.clear();
                e.request_id = "bad-claim-1".into()
            }),
            &["user id must not be empty"],
        ),
        specific(
            &cl,
            "claims",
            "empty request id",
            claim_with(&|e| e.request_id.clear()),
            &["request id must not be empty"],
        ),
        specific(
            &cl,
            "claims",
            "1000 KiB user id",
            claim_with(&|e| {
                e.user_id = huge.clone();
                e.request_id = "bad-claim-2".into()
            }),
            &["user id must be at most 128 characters", "larger than the"],
        ),
        specific(
            &cl,
            "claims",
            "1000 KiB request id",
            claim_with(&|e| e.request_id = huge.clone()),
            &[
                "request id must be at most 128 characters",
                "larger than the",
            ],
        ),
        specific(
            &cl,
            "claims",
            "NUL in request id",
            claim_with(&|e| e.request_id = "bad\0claim".into()),
            &["request id must not contain control characters"],
        ),
        specific(
            &cl,
            "claims",
            "NUL in user id",
            claim_with(&|e| {
                e.user_id = "a\0b".into();
                e.request_id = "bad-claim-4".into()
            }),
            &["user id must not contain control characters"],
        ),
        specific(
            &cl,
            "claims",
            "NUL in category",
            claim_with(&|e| {
                e.category = "x\0".into();
                e.request_id = "bad-claim-3".into()
            }),
            &["category must not contain control characters"],
        ),
    ]);
    let purchase_with = |change: &dyn Fn(&mut PurchaseRequested)| {
        let mut event = purchase.clone();
        change(&mut event);
        event
    };
    poison.extend([
        specific(
            &p,
            "purchases",
            "empty coupon code",
            purchase_with(&|e| {
                e.coupon_code.clear();
                e.request_id = "bad-purchase-1".into()
            }),
            &["coupon code must"],
        ),
        specific(
            &p,
            "purchases",
            "empty order id",
            purchase_with(&|e| {
                e.order_id.clear();
                e.request_id = "bad-purchase-2".into()
            }),
            &["order id must not be empty"],
        ),
        specific(
            &p,
            "purchases",
            "empty user id",
            purchase_with(&|e| {
                e.user_id.clear();
                e.request_id = "bad-purchase-3".into()
            }),
            &["user id must not be empty"],
        ),
        specific(
            &p,
            "purchases",
            "empty request id",
            purchase_with(&|e| e.request_id.clear()),
            &["request id must not be empty"],
        ),
        specific(
            &p,
            "purchases",
            "1000 KiB user id",
            purchase_with(&|e| {
                e.user_id = huge.clone();
                e.request_id = "bad-purchase-4".into()
            }),
            &["user id must be at most 128 characters", "larger than the"],
        ),
        specific(
            &p,
            "purchases",
            "1000 KiB order id",
            purchase_with(&|e| {
                e.order_id = huge.clone();
                e.request_id = "bad-purchase-5".into()
            }),
            &["order id must be at most 128 characters", "larger than the"],
        ),
        specific(
            &p,
            "purchases",
            "NUL in coupon code",
            purchase_with(&|e| {
                e.coupon_code = "0\0".into();
                e.request_id = "bad-purchase-6".into()
            }),
            &["coupon code must not contain control characters"],
        ),
        specific(
            &p,
            "purchases",
            "NUL in user id",
            purchase_with(&|e| {
                e.user_id = "a\0b".into();
                e.request_id = "bad-purchase-7".into()
            }),
            &["user id must not contain control characters"],
        ),
        specific(
            &p,
            "purchases",
            "NUL in request id",
            purchase_with(&|e| e.request_id = "bad\0purchase".into()),
            &["request id must not contain control characters"],
        ),
    ]);
    let expired_with = |change: &dyn Fn(&mut HoldExpired)| {
        let mut event = expired.clone();
        change(&mut event);
        event
    };
    let mut not_a_uuid = expired.clone();
    not_a_uuid.envelope = Some(Envelope {
        event_id: "not-a-uuid".into(),
        ..envelope_of::<HoldExpired>()
    });
    poison.push(Poison {
        topic: x.clone(),
        label: "event id not a uuid".into(),
        key: b"chaos".to_vec(),
        value: not_a_uuid.encode_to_vec(),
        reasons: &["event_id is not a UUID"],
        consumer: "expiry",
    });
    poison.extend([
        specific(
            &x,
            "expiry",
            "empty coupon code",
            expired_with(&|e| e.coupon_code.clear()),
            &["coupon code"],
        ),
        specific(
            &x,
            "expiry",
            "coupon code not a code",
            expired_with(&|e| e.coupon_code = "not a code!".into()),
            &["coupon code"],
        ),
        specific(
            &x,
            "expiry",
            "empty hold id",
            expired_with(&|e| e.hold_id.clear()),
            &["hold_id"],
        ),
        specific(
            &x,
            "expiry",
            "NUL in hold id",
            expired_with(&|e| e.hold_id = "h\0".into()),
            &["hold_id", "control characters"],
        ),
        specific(
            &x,
            "expiry",
            "1000 KiB hold id",
            expired_with(&|e| e.hold_id = huge.clone()),
            &["hold_id", "larger than the"],
        ),
    ]);

    // A key too large for a dead letter's key, on a record that is refused.
    poison.push(Poison {
        topic: cl.clone(),
        label: "1000 KiB key".into(),
        key: vec![b'k'; HUGE],
        value: vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01],
        reasons: &["not a valid protobuf"],
        consumer: "claims",
    });

    // One key for everything on a topic: the bad records and the valid event
    // after them share a partition, so the valid one is only processed if the
    // consumer got past every bad one.
    let mut kafka = KafkaSettings::new(env.kafka.brokers.clone());
    kafka.extra = vec![("message.max.bytes".into(), (4 * 1024 * 1024).to_string())];
    let hostile = Publisher::new(&kafka, "hostile-producer").expect("publisher");
    let mut sent: HashMap<(String, i32, i64), &Poison> = HashMap::new();
    for bad in &poison {
        let delivered = hostile
            .send_bytes(&bad.topic, Some(&bad.key), &bad.value)
            .await
            .unwrap_or_else(|e| panic!("publishing {} to {}: {e}", bad.label, bad.topic));
        sent.insert(
            (bad.topic.clone(), delivered.partition, delivered.offset),
            bad,
        );
    }
    let valid: [(&str, Vec<u8>); 4] = [
        (&c, with_envelope(created.clone()).encode_to_vec()),
        (&cl, with_envelope(claim.clone()).encode_to_vec()),
        (&p, with_envelope(purchase.clone()).encode_to_vec()),
        (&x, with_envelope(expired.clone()).encode_to_vec()),
    ];
    for (topic, value) in &valid {
        hostile
            .send_bytes(topic, Some(b"chaos"), value)
            .await
            .expect("publish valid event");
    }

    // The valid events after the poison took effect ...
    let started = Instant::now();
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
    // ... and every consumer is caught up: nothing wedged on a bad record.
    let waits = [
        ("coupons", &c),
        ("claims", &cl),
        ("purchases", &p),
        ("expiry", &x),
        ("history", &c),
    ]
    .map(|(role, topic)| {
        std::panic::AssertUnwindSafe(env.wait_caught_up(role, topic, Duration::from_secs(30)))
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
    // The processors' answers to invalid requests, poison echoed in them
    // included, go through the history sink as well.
    for topic in [topics.claim_results(), topics.purchase_results()] {
        env.wait_caught_up("history", &topic, Duration::from_secs(30))
            .await;
    }
    let caught_up = started.elapsed();

    // Every bad record has its dead letter: reason, original bytes, source.
    let letters = eventually_some(
        "every bad record is dead-lettered",
        Duration::from_secs(30),
        || async {
            let mut letters: HashMap<(String, i32, i64, String), DeadLetter> = HashMap::new();
            for record in env.read_topic(&topics.dead_letter()).await {
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
    .await;
    for ((topic, partition, offset), bad) in &sent {
        let letter = &letters[&(topic.clone(), *partition, *offset, bad.consumer.to_owned())];
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
        // Huge originals are cut to fit the topic, and say so.
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
    // Invalid requests that can be addressed still get an answer; a record
    // over its message's size bound (the 1000 KiB user id) is refused before
    // it is read, dead-lettered unanswered (issue #24, item 1).
    let invalid_answers = env
        .read_topic(&topics.claim_results())
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

/// Checks one HTTP answer: never a 5xx, and every 4xx is the JSON error shape.
async fn answer(label: &str, response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = response.bytes().await.unwrap_or_default();
    assert!(
        status < 500,
        "{label}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if status >= 400 {
        assert!(
            content_type.starts_with("application/json"),
            "{label}: {status} with content type {content_type:?}: {}",
            String::from_utf8_lossy(&bytes)
        );
        assert!(
            body["error"].is_string() && body["message"].is_string(),
            "{label}: {status} body is not {{error, message}}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_input_gets_json_errors_and_never_a_5xx() {
    let env = TestEnv::new().await;
    let app = env
        .start(
            &[Role::Gateway, Role::Coupons, Role::Claims, Role::Purchases],
            |c| {
                c.gateway.api_token = Some("store-token".into());
                c.gateway.reply_timeout = Duration::from_secs(10);
            },
        )
        .await;
    release(&env, "Hostile", 50).await;
    let http = TestEnv::http_client();
    let url = |path: &str| app.url(path);
    let store = |request: reqwest::RequestBuilder| request.bearer_auth("store-token");
    let admin = |request: reqwest::RequestBuilder| request.bearer_auth("admin-secret");
    macro_rules! expect {
        ($label:expr, $request:expr, $status:expr) => {{
            let label = $label;
            let response = $request
                .send()
                .await
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let (status, body) = answer(&label, response).await;
            assert_eq!(status, $status, "{label}: {body}");
            body
        }};
    }

    // Routes and methods.
    for path in [
        "/nope",
        "/api/v2/coupon",
        "/api/v1/coupon/A/B",
        "/api/v1/",
        "/%FF",
    ] {
        let body = expect!(format!("GET {path}"), store(http.get(url(path))), 404);
        assert_eq!(body["error"], "not_found");
    }
    for (method, path) in [
        (reqwest::Method::DELETE, "/api/v1/coupon"),
        (reqwest::Method::PUT, "/api/v1/purchase"),
        (reqwest::Method::GET, "/api/v1/purchase"),
        (reqwest::Method::POST, "/healthz"),
        (reqwest::Method::PATCH, "/api/v1/coupon/0000000000000"),
    ] {
        let body = expect!(
            format!("{method} {path}"),
            store(http.request(method.clone(), url(path))),
            405
        );
        assert_eq!(body["error"], "method_not_allowed");
    }

    // Tokens: storefront routes (COUPON_API_TOKEN is set) and admin routes.
    let purchase_body = json!({"user_id": "u", "coupon_code": "0000000000000", "order_id": "o"});
    let create_body = json!({"id": "e-hostile", "category": "Hostile", "count": 1});
    let no_token: [(&str, reqwest::RequestBuilder); 4] = [
        ("claim", http.get(url("/api/v1/coupon?id=anon"))),
        (
            "purchase",
            http.post(url("/api/v1/purchase")).json(&purchase_body),
        ),
        ("status", http.get(url("/api/v1/coupon/0000000000000"))),
        (
            "create",
            http.post(url("/api/v1/coupon")).json(&create_body),
        ),
    ];
    for (label, request) in no_token {
        let body = expect!(format!("{label} without a token"), request, 401);
        assert_eq!(body["error"], "unauthorized");
    }
    let bad_headers: [&[u8]; 6] = [
        b"Bearer wrong",
        b"Bearer ",
        b"Basic c3RvcmUtdG9rZW4=",
        b"Bearer store-token-and-more",
        b"Bearer  store-token",
        b"Bearer store-\xfftoken",
    ];
    for header in bad_headers {
        let value = reqwest::header::HeaderValue::from_bytes(header).expect("header value");
        let label = String::from_utf8_lossy(header).to_string();
        expect!(
            format!("claim with {label:?}"),
            http.get(url("/api/v1/coupon?id=anon"))
                .header(reqwest::header::AUTHORIZATION, value.clone()),
            401
        );
        expect!(
            format!("create with {label:?}"),
            http.post(url("/api/v1/coupon"))
                .header(reqwest::header::AUTHORIZATION, value)
                .json(&create_body),
            401
        );
    }
    expect!(
        "create with the storefront token",
        store(http.post(url("/api/v1/coupon"))).json(&create_body),
        401
    );

    // Oversized bodies: 413, also without a Content-Length.
    let filler = "x".repeat(70 * 1024);
    let big = json!({"user_id": filler, "coupon_code": "0000000000000", "order_id": "o"});
    let body = expect!(
        "70 KiB purchase",
        store(http.post(url("/api/v1/purchase"))).json(&big),
        413
    );
    assert_eq!(body["error"], "payload_too_large");
    expect!(
        "70 KiB create",
        admin(http.post(url("/api/v1/coupon"))).json(&json!({"id": filler, "category": "c"})),
        413
    );
    let addr = app.http.expect("gateway");
    let mut chunk = format!("{:x}\r\n", 8 * 1024).into_bytes();
    chunk.extend(std::iter::repeat_n(b' ', 8 * 1024));
    chunk.extend(b"\r\n");
    let mut parts = vec![format!(
        "POST /api/v1/purchase HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer store-token\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()];
    parts.extend(std::iter::repeat_n(chunk, 20));
    parts.push(b"0\r\n\r\n".to_vec());
    let (status, content_type, body) = raw_exchange(addr, parts).await;
    assert_eq!(status, 413, "160 KiB chunked purchase: {body}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON body")["error"],
        "payload_too_large"
    );

    // Oversized query strings: refused as invalid ids, or by the HTTP parser.
    let long_id = "q".repeat(60 * 1024);
    expect!(
        "60 KiB user id",
        store(http.get(url(&format!("/api/v1/coupon?id={long_id}")))),
        400
    );
    let padding = "&pad=1".repeat(5_000);
    let response = store(http.get(url(&format!("/api/v1/coupon?id=padded{padding}"))))
        .send()
        .await
        .expect("padded query");
    answer("30 KiB of extra parameters", response).await;
    let request_line = format!(
        "GET /api/v1/coupon?id={} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer store-token\r\n\
         Connection: close\r\n\r\n",
        "q".repeat(70 * 1024)
    );
    let (status, _, _) = raw_exchange(addr, vec![request_line.into_bytes()]).await;
    // hyper answers a request line over 64 KiB itself, before any handler
    // runs (414, empty body); only the status can be checked.
    assert_eq!(status, 414);
    for query in ["?id=a&id=b", "?id[]=x", "?category=Hostile", "?id=%ZZ"] {
        let (status, _) = answer(
            query,
            store(http.get(url(&format!("/api/v1/coupon{query}"))))
                .send()
                .await
                .expect(query),
        )
        .await;
        assert!(matches!(status, 200 | 400 | 404), "{query}: {status}");
    }

    // Invalid JSON and wrong types.
    let nested = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let malformed: [(&str, String); 7] = [
        ("truncated JSON", "{\"user_id\":".into()),
        ("array", "[]".into()),
        ("null", "null".into()),
        ("string", "\"purchase\"".into()),
        ("deeply nested", nested),
        (
            "numbers for strings",
            json!({"user_id": 1, "coupon_code": 2, "order_id": 3}).to_string(),
        ),
        (
            "not UTF-8",
            String::from_utf8_lossy(b"{\"user_id\": \"\xff\"}").into_owned(),
        ),
    ];
    for (label, text) in malformed {
        let body = expect!(
            label,
            store(http.post(url("/api/v1/purchase")))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(text),
            400
        );
        assert_eq!(body["error"], "invalid_request");
    }
    expect!(
        "raw invalid UTF-8",
        store(http.post(url("/api/v1/purchase")))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(
                b"{\"user_id\": \"\xff\xfe\", \"coupon_code\": \"x\", \"order_id\": \"o\"}"
                    .to_vec()
            ),
        400
    );
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut request = store(http.post(url("/api/v1/purchase"))).body(purchase_body.to_string());
        if let Some(content_type) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        let body = expect!(format!("content type {content_type:?}"), request, 415);
        assert_eq!(body["error"], "unsupported_media_type");
    }
    for count in [
        json!(0),
        json!(-1),
        json!(1e100),
        json!("ten"),
        json!(100_001),
    ] {
        expect!(
            format!("count {count}"),
            admin(http.post(url("/api/v1/coupon")))
                .json(&json!({"id": "e", "category": "c", "count": count})),
            400
        );
    }

    // Unicode tricks: legal ids or clean refusals, never a 5xx.
    let tricky = [
        "\u{202E}resu-lieve",
        "zero\u{200B}width",
        "\u{200B}",
        "e\u{0301}\u{0302}\u{0303}\u{0304}\u{0305}\u{0306}\u{0307}\u{0308}",
        "\u{FEFF}bom",
        "مستخدم",
        "👩‍👩‍👧‍👦",
        "\u{0000}",
        "\u{0085}next-line",
        "\u{2028}separator",
        "a\u{E000}private",
        " ",
    ];
    for (i, id) in tricky.iter().enumerate() {
        let encoded: String = url_encode(id);
        let (status, body) = answer(
            &format!("claim by {id:?}"),
            store(http.get(url(&format!("/api/v1/coupon?id={encoded}"))))
                .send()
                .await
                .expect("claim"),
        )
        .await;
        assert!(matches!(status, 200 | 400 | 404), "{id:?}: {status} {body}");
        if status == 200 {
            assert_eq!(body["user_id"], *id, "the id comes back unchanged");
        }
        let (status, _) = answer(
            &format!("purchase by {id:?}"),
            store(http.post(url("/api/v1/purchase")))
                .json(&json!({"user_id": id, "coupon_code": "0000000000000", "order_id": format!("{id}-{i}")}))
                .send()
                .await
                .expect("purchase"),
        )
        .await;
        assert!(matches!(status, 400 | 404), "{id:?}: {status}");
        let (status, _) = answer(
            &format!("status of {id:?}"),
            store(http.get(url(&format!("/api/v1/coupon/{encoded}"))))
                .send()
                .await
                .expect("status"),
        )
        .await;
        assert!(matches!(status, 400 | 404), "{id:?}: {status}");
    }
    for path in [
        "/api/v1/coupon/%FF%FE",
        "/api/v1/coupon/%00",
        "/api/v1/coupon/%E2%80%AE0000",
    ] {
        expect!(format!("GET {path}"), store(http.get(url(path))), 400);
    }

    // A client-chosen request id must not reveal another user's decision.
    let (status, first) = answer(
        "claim by victim",
        store(http.get(url("/api/v1/coupon?id=victim")))
            .header("x-request-id", "shared-request-id")
            .send()
            .await
            .expect("victim"),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = answer(
        "claim by thief with the victim's request id",
        store(http.get(url("/api/v1/coupon?id=thief")))
            .header("x-request-id", "shared-request-id")
            .send()
            .await
            .expect("thief"),
    )
    .await;
    assert_ne!(
        second["coupon_code"], first["coupon_code"],
        "the thief got the victim's coupon ({status})"
    );
    assert_eq!(status, 409, "{second}");
    assert_eq!(second["error"], "request_id_conflict");

    // After all that, the gateway still serves ordinary requests.
    let body = expect!(
        "ordinary claim",
        store(http.get(url("/api/v1/coupon?id=regular"))),
        200
    );
    assert!(body["coupon_code"].is_string());
    assert_invariants(&env, 50).await;
    app.stop().await;
}

/// Sends `parts` over a plain socket, one after the other (the server may
/// answer and close before reading them all), and returns the status, the
/// content type and the body of the answer. For requests an HTTP client
/// refuses to send: over-long request lines, chunked bodies without a length.
async fn raw_exchange(addr: std::net::SocketAddr, parts: Vec<Vec<u8>>) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    for part in parts {
        if socket.write_all(&part).await.is_err() {
            break;
        }
    }
    let mut response = Vec::new();
    let _ = socket.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {:?}", &head[..head.len().min(200)]));
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

fn url_encode(raw: &str) -> String {
    raw.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_loss_while_serving_changes_no_answer_and_holds_still_expire() {
    let env = TestEnv::new().await;
    let hold_ttl = Duration::from_secs(3);
    let app = env
        .start(
            &[
                Role::Gateway,
                Role::Coupons,
                Role::Claims,
                Role::Purchases,
                Role::Expiry,
            ],
            |c| c.policy.hold_ttl = hold_ttl,
        )
        .await;
    let codes: HashSet<String> = release(&env, "Volatile", 40).await.into_iter().collect();
    let cache = Cache::connect(&redis_url(), &env.name)
        .await
        .expect("redis");
    let http = TestEnv::http_client();

    // Wipes this test's keys over and over while `round` runs.
    async fn with_redis_loss<T>(
        cache: &Cache,
        round: impl std::future::Future<Output = T>,
    ) -> (T, u64, u32) {
        let stop = tokio_util::sync::CancellationToken::new();
        let wiper = {
            let (cache, stop) = (cache.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut deleted, mut wipes) = (0u64, 0u32);
                while !stop.is_cancelled() {
                    deleted += cache.clear().await.expect("clear redis");
                    wipes += 1;
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
                (deleted, wipes)
            })
        };
        let result = round.await;
        stop.cancel();
        let (deleted, wipes) = wiper.await.expect("wiper");
        (result, deleted, wipes)
    }
    let claim_round = |users: Vec<String>| {
        let http = http.clone();
        let app = &app;
        async move {
            stream::iter(users)
                .map(|user| {
                    let http = http.clone();
                    let url = app.url(&format!("/api/v1/coupon?id={user}"));
                    async move {
                        let response = http.get(url).send().await.expect("claim");
                        let status = response.status().as_u16();
                        (
                            user,
                            status,
                            response.json::<Value>().await.unwrap_or(Value::Null),
                        )
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<_>>()
                .await
        }
    };

    let users: Vec<String> = (0..100).map(|i| format!("volatile-{i}")).collect();
    let (results, deleted, wipes) = with_redis_loss(&cache, claim_round(users)).await;
    let winners: HashMap<String, String> = results
        .iter()
        .filter(|(_, s, _)| *s == 200)
        .map(|(u, _, b)| {
            (
                u.clone(),
                b["coupon_code"].as_str().expect("code").to_owned(),
            )
        })
        .collect();
    assert!(
        results
            .iter()
            .all(|(_, s, b)| *s == 200 || (*s == 404 && b["error"] == "sold_out")),
        "only grants and sold out"
    );
    assert_eq!(winners.len(), 40);
    assert_eq!(winners.values().collect::<HashSet<_>>().len(), 40);
    assert!(winners.values().all(|c| codes.contains(c)));

    // Winners asking again with Redis empty get their hold back from Postgres.
    cache.clear().await.expect("clear");
    let some: Vec<String> = winners.keys().take(10).cloned().collect();
    for (user, status, body) in claim_round(some).await {
        assert_eq!(status, 200, "{user}: {body}");
        assert_eq!(body["coupon_code"].as_str(), Some(winners[&user].as_str()));
    }
    assert_invariants(&env, 40).await;

    // Every hold still ends: Postgres deadlines, not Redis TTLs, drive expiry.
    cache.clear().await.expect("clear");
    let last_deadline: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT max(held_until) FROM coupons WHERE status = 'held'")
            .fetch_one(&env.pool)
            .await
            .expect("deadline");
    eventually(
        "every hold is released after its deadline",
        hold_ttl + Duration::from_secs(15),
        || async { env.status_counts().await.available == 40 },
    )
    .await;
    let lag = chrono::Utc::now() - last_deadline;

    // The released coupons go to new users, Redis wiped all along; the first
    // winners' quota stays used.
    let mut users: Vec<String> = (0..40).map(|i| format!("second-{i}")).collect();
    users.extend(winners.keys().take(5).cloned());
    let (results, more_deleted, more_wipes) = with_redis_loss(&cache, claim_round(users)).await;
    let second_winners = results
        .iter()
        .filter(|(u, s, _)| u.starts_with("second-") && *s == 200)
        .count();
    assert_eq!(second_winners, 40);
    for (user, status, body) in &results {
        if !user.starts_with("second-") {
            assert_eq!(*status, 429, "{user}: {body}");
            assert_eq!(body["error"], "rate_limited");
        }
    }
    assert_eq!(env.status_counts().await.held, 40);
    assert_invariants(&env, 40).await;
    eprintln!(
        "redis wiped {} times ({} keys) during the claims; last hold released {} ms after its deadline",
        wipes + more_wipes,
        deleted + more_deleted,
        lag.num_milliseconds()
    );
    app.stop().await;
}
