//! `kill -9` in the middle of a burst: of the whole system (`couponctl run`),
//! then of the gateway alone while the consumers go on deciding. Every
//! request still gets exactly one decision, and every answer a client got is
//! the decision the database holds.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use serde_json::Value;

use coupon_platform::kafka::{decode, Publisher};
use coupon_schemas::{ClaimDecided, ClaimRequested};

use coupon_test_support::harness::{
    assert_invariants, eventually, free_port, release, Child, TestEnv, CONSUME_ALL,
};
use coupon_test_support::processes::{claim_with_retries, eventually_some, Progress};

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
