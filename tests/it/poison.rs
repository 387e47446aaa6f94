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
            .filter(|d| d.outcome == ClaimOutcome::Invalid as i32)
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
    assert_eq!(second.outcome, ClaimOutcome::Invalid as i32);
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
/// moment each get their own answer (one coupon, one `invalid_request`), and
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
        assert_eq!(statuses, [200, 400], "{pair}: {answers:?}");
        let refused = answers.iter().find(|(s, _)| *s == 400).unwrap();
        assert_eq!(refused.1["error"], "invalid_request");
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
