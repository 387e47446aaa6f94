//! Claims: one coupon per user per window, one user per coupon, under real
//! concurrency, two processors and redelivery.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use serde_json::Value;

use coupon_domain::QuotaWindow;
use coupon_platform::kafka::{decode, Publisher};
use coupon_schemas::{ClaimDecided, ClaimOutcome, ClaimRequested};
use couponctl::app::Role;

use crate::harness::{assert_invariants, eventually, release, TestEnv};

/// Claims through HTTP, `concurrency` at a time; returns (status, body) per user.
async fn claim_all(
    app: &crate::harness::App,
    users: Vec<String>,
    concurrency: usize,
) -> Vec<(String, u16, Value)> {
    let http = TestEnv::http_client();
    stream::iter(users)
        .map(|user| {
            let http = http.clone();
            let url = app.url(&format!("/api/v1/coupon?id={user}"));
            async move {
                let response = http.get(url).send().await.expect("claim request");
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                (user, status, body)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_sale_of_1000_coupons_to_3000_users_is_exact() {
    let env = TestEnv::new().await;
    // Two claim processors in the one process (CLAIM_PROCESSORS=2) share
    // the claims partitions and decide batches side by side: the sale is
    // exact whichever of them decides a claim.
    let app = env
        .start(
            &[Role::Gateway, Role::Coupons, Role::Claims, Role::History],
            |c| c.claim_processors = 2,
        )
        .await;
    release(&env, "Electronics", 1_000).await;

    let users: Vec<String> = (0..3_000).map(|i| format!("user-{i}")).collect();
    let results = claim_all(&app, users, 200).await;
    let mut granted = HashMap::new();
    let mut sold_out = 0;
    for (user, status, body) in &results {
        match status {
            200 => {
                assert_eq!(body["user_id"], user.as_str());
                assert_eq!(body["category"], "Electronics");
                assert!(body["expires_at"].as_str().is_some());
                granted.insert(
                    user.clone(),
                    body["coupon_code"].as_str().unwrap().to_owned(),
                );
            }
            404 => {
                assert_eq!(body["error"], "sold_out");
                sold_out += 1;
            }
            other => panic!("unexpected {other} for {user}: {body}"),
        }
    }
    assert_eq!(granted.len(), 1_000, "exactly the pool is granted");
    assert_eq!(sold_out, 2_000);
    let codes: HashSet<&String> = granted.values().collect();
    assert_eq!(codes.len(), 1_000, "every winner has a different coupon");

    // A winner asking again gets the same hold back.
    let (winner, code) = granted.iter().next().unwrap();
    let again = claim_all(&app, vec![winner.clone()], 1).await;
    assert_eq!(again[0].1, 200);
    assert_eq!(again[0].2["coupon_code"], code.as_str());

    assert_eq!(env.status_counts().await.held, 1_000);
    // A claim answered from the sold-out mark is decided on the log after
    // its answer: wait for the last of them, then exactly one decision per
    // request must be stored.
    eventually(
        "every claim is decided on the log",
        Duration::from_secs(30),
        || async { env.count("SELECT count(*) FROM claim_decisions").await >= 3_001 },
    )
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM claim_decisions").await,
        3_001
    );
    assert_invariants(&env, 1_000).await;
    // Postgres says who holds what, exactly as the answers did.
    let holder: String = sqlx::query_scalar("SELECT holder_user_id FROM coupons WHERE code = $1")
        .bind(code)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(&holder, winner);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_hold_ends_the_next_claim_is_rate_limited_until_the_window_ends() {
    let env = TestEnv::new().await;
    let app = env
        .start(
            &[Role::Gateway, Role::Coupons, Role::Claims, Role::Expiry],
            |c| {
                c.policy.hold_ttl = Duration::from_secs(1);
            },
        )
        .await;
    let codes = release(&env, "Garden", 2).await;
    let first = claim_all(&app, vec!["gardener".into()], 1).await;
    assert_eq!(first[0].1, 200);
    let code = first[0].2["coupon_code"].as_str().unwrap().to_owned();
    assert!(codes.contains(&code));

    eventually(
        "the expired hold is released",
        Duration::from_secs(20),
        || async {
            env.count(&format!(
                "SELECT count(*) FROM coupons WHERE code = '{code}' AND status = 'available'"
            ))
            .await
                == 1
        },
    )
    .await;
    let http = TestEnv::http_client();
    let response = http
        .get(app.url("/api/v1/coupon?id=gardener"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let expected = QuotaWindow::DAY.retry_after_secs(chrono::Utc::now());
    assert!(
        retry_after.abs_diff(expected) <= 2,
        "Retry-After {retry_after}, expected about {expected}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");

    // The released coupon goes to the next user; the first user's quota stays used.
    let next = claim_all(&app, vec!["neighbour".into()], 1).await;
    assert_eq!(next[0].1, 200);
    assert_invariants(&env, 2).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processors_concurrent_duplicates_and_redelivery_keep_the_invariants() {
    let env = TestEnv::new().await;
    let app = env
        .start(
            &[Role::Gateway, Role::Coupons, Role::Claims, Role::History],
            |_| {},
        )
        .await;
    // The second instance joins the same consumer groups: the broker hands it
    // a share of every partitioned role while the burst runs.
    let second = env
        .start(&[Role::Claims, Role::Coupons, Role::History], |_| {})
        .await;
    release(&env, "Toys", 300).await;

    // One user hammering 40 times at once, plus 400 users once each.
    let mut users: Vec<String> = std::iter::repeat_n("eager".to_owned(), 40).collect();
    users.extend((0..400).map(|i| format!("kid-{i}")));
    let results = claim_all(&app, users, 100).await;
    let eager: Vec<&(String, u16, Value)> =
        results.iter().filter(|(u, _, _)| u == "eager").collect();
    let eager_statuses: HashSet<u16> = eager.iter().map(|(_, s, _)| *s).collect();
    let eager_codes: HashSet<&str> = eager
        .iter()
        .filter_map(|(_, _, b)| b["coupon_code"].as_str())
        .collect();
    assert_eq!(
        eager_statuses.len(),
        1,
        "one user's concurrent claims all get the same answer"
    );
    assert!(
        eager_codes.len() <= 1,
        "one user, one coupon, however many requests: {eager_codes:?}"
    );
    let winners: HashMap<String, String> = results
        .iter()
        .filter(|(_, status, _)| *status == 200)
        .map(|(u, _, b)| (u.clone(), b["coupon_code"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(winners.len(), 300);
    assert_eq!(winners.values().collect::<HashSet<_>>().len(), 300);
    let losers: HashSet<&String> = results
        .iter()
        .filter(|(_, s, _)| *s == 404)
        .map(|(u, _, _)| u)
        .collect();
    assert_eq!(losers.len(), 101);
    assert!(results.iter().all(|(_, s, _)| *s == 200 || *s == 404));

    // A storefront publishing straight to Kafka gets decisions too, an
    // invalid request included.
    let publisher = Publisher::new(&env.kafka, "storefront").unwrap();
    for (request_id, user) in [("direct-1", "late-kid"), ("direct-2", "")] {
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
            .unwrap();
    }
    env.wait_caught_up("claims", &env.topics.claims(), Duration::from_secs(60))
        .await;
    let decisions_before = env.count("SELECT count(*) FROM claim_decisions").await;
    assert_eq!(
        decisions_before, 441,
        "one stored decision per valid request"
    );

    // Redeliver every claim ever published: nothing changes, and every
    // decision is republished with its original event id.
    let claims = env.read_topic(&env.topics.claims()).await;
    assert_eq!(claims.len(), 442);
    for record in &claims {
        publisher
            .send_bytes(
                &env.topics.claims(),
                record.key.as_deref(),
                record.value.as_deref().unwrap(),
            )
            .await
            .unwrap();
    }
    env.wait_caught_up("claims", &env.topics.claims(), Duration::from_secs(60))
        .await;
    assert_eq!(
        env.count("SELECT count(*) FROM claim_decisions").await,
        decisions_before
    );
    assert_eq!(env.status_counts().await.held, 300);
    assert_invariants(&env, 300).await;

    let results_log = env.read_topic(&env.topics.claim_results()).await;
    let mut event_ids: HashMap<String, HashSet<String>> = HashMap::new();
    for record in &results_log {
        let decision = decode::<ClaimDecided>(record).unwrap();
        event_ids
            .entry(decision.request_id.clone())
            .or_default()
            .insert(decision.envelope.unwrap().event_id);
        if decision.request_id == "direct-1" {
            assert_eq!(decision.outcome, ClaimOutcome::SoldOut as i32);
        }
        if decision.request_id == "direct-2" {
            assert_eq!(decision.outcome, ClaimOutcome::Invalid as i32);
            assert!(
                decision.reason.contains("user id must not be empty"),
                "{}",
                decision.reason
            );
        }
    }
    assert_eq!(event_ids.len(), 442, "every request has a decision");
    assert!(
        event_ids.values().all(|ids| ids.len() == 1),
        "a redelivered request yields the same decision event"
    );
    let letters = env.read_topic(&env.topics.dead_letter()).await;
    assert!(
        letters.len() >= 2,
        "the invalid request was dead-lettered (each time it was delivered)"
    );

    second.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_tokens_blacklists_and_floods_are_refused() {
    let env = TestEnv::new().await;
    let app = env
        .start(&[Role::Gateway, Role::Coupons, Role::Claims], |c| {
            c.gateway.api_token = Some("store-token".into());
            c.gateway.flood_limit_per_sec = 5;
        })
        .await;
    release(&env, "Books", 10).await;
    let http = TestEnv::http_client();
    let get = |query: String, token: Option<&'static str>| {
        let mut request = http.get(app.url(&format!("/api/v1/coupon{query}")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    let response = get("?id=reader".into(), None).await.unwrap();
    assert_eq!(response.status(), 401);
    let response = get("?id=reader".into(), Some("nope")).await.unwrap();
    assert_eq!(response.status(), 401);

    let long = "x".repeat(129);
    for query in [
        "".to_owned(),
        "?id=".into(),
        format!("?id={long}"),
        "?id=a%00b".into(),
        "?id=a%0Ab".into(),
    ] {
        let response = get(query.clone(), Some("store-token")).await.unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request", "{query}");
    }

    // Manual blacklist through the CLI.
    let cli = |args: &[&str]| env.couponctl().args(args).output().expect("couponctl");
    let added = cli(&[
        "blacklist",
        "add",
        "villain",
        "--for",
        "1h",
        "--reason",
        "fraud",
    ]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let listed = String::from_utf8_lossy(&cli(&["blacklist", "list"]).stdout).to_string();
    assert!(
        listed.contains("villain") && listed.contains("fraud"),
        "{listed}"
    );
    let response = get("?id=villain".into(), Some("store-token"))
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "blacklisted"
    );
    assert!(cli(&["blacklist", "remove", "villain"]).status.success());
    let response = get("?id=villain".into(), Some("store-token"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let missing = cli(&["blacklist", "remove", "nobody"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).starts_with("error: nobody is not blacklisted")
    );

    // Automatic: more than 5 claims a second blocks the user.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(
            get("?id=flooder".into(), Some("store-token"))
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert!(statuses.contains(&403), "{statuses:?}");
    assert_eq!(*statuses.last().unwrap(), 403, "{statuses:?}");
    let reason: Option<String> = sqlx::query_scalar(
        "SELECT blacklist_reason FROM users WHERE user_id = 'flooder' AND blacklisted",
    )
    .fetch_optional(&env.pool)
    .await
    .unwrap();
    assert_eq!(reason.as_deref(), Some("flooding the gateway"));
    app.stop().await;
}

/// One batch straight into the claim processor: each pool is asked once,
/// its oldest coupons go to its earliest claims, a user's second request
/// and a redelivered one are decided after the grants, and sold out keeps
/// the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_grants_pool_by_pool_in_arrival_order() {
    let env = TestEnv::new().await;
    let projector = env.start(&[Role::Coupons], |_| {}).await;
    release(&env, "Toys", 3).await;
    release(&env, "Books", 2).await;
    projector.stop().await;
    let oldest = |category: &'static str| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT code FROM coupons WHERE category = $1 ORDER BY id",
            )
            .bind(category)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let (toys, books) = (oldest("Toys").await, oldest("Books").await);
    let now = chrono::Utc::now();
    sqlx::query(
        "INSERT INTO quota_grants (user_id, window_start, request_id, granted_at)
         VALUES ('u8', $1, 'earlier', $2)",
    )
    .bind(QuotaWindow::DAY.start_of(now))
    .bind(now)
    .execute(&env.pool)
    .await
    .unwrap();

    let ctx = couponctl::app::connect(&env.config()).await.unwrap();
    let publisher = Publisher::new(&env.kafka, "test").unwrap();
    let arrivals = [
        ("r0", "u1", "Toys"),
        ("r1", "u2", ""),
        ("r2", "u3", "Toys"),
        ("r3", "u1", "Toys"),
        ("r4", "u4", "Toys"),
        ("r5", "u5", "Toys"),
        ("r6", "u6", "Books"),
        ("r7", "u7", "Books"),
        ("r0", "u1", "Toys"),
        ("r9", "u8", "Toys"),
    ];
    let batch: Vec<coupon_platform::kafka::Record> = arrivals
        .iter()
        .enumerate()
        .map(|(offset, (request_id, user, category))| {
            let event = ClaimRequested {
                envelope: Some(publisher.envelope::<ClaimRequested>(request_id)),
                request_id: (*request_id).into(),
                user_id: (*user).into(),
                category: (*category).into(),
                answered_sold_out: false,
            };
            coupon_platform::kafka::Record {
                topic: env.topics.claims(),
                partition: 0,
                offset: offset as i64,
                key: Some(user.as_bytes().to_vec()),
                value: Some(prost::Message::encode_to_vec(&event)),
                timestamp_ms: None,
            }
        })
        .collect();
    coupon_consumers::claims::handle_batch(&ctx, &batch)
        .await
        .unwrap();

    let decision = |request_id: &'static str| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_as::<_, (String, Option<String>, bool)>(
                "SELECT outcome, coupon_code, repeated FROM claim_decisions WHERE request_id = $1",
            )
            .bind(request_id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let granted = |code: &str, repeated| ("granted".to_owned(), Some(code.to_owned()), repeated);
    let refused = |outcome: &str| (outcome.to_owned(), None, false);
    assert_eq!(decision("r0").await, granted(&toys[0], false));
    assert_eq!(decision("r2").await, granted(&toys[1], false));
    assert_eq!(decision("r4").await, granted(&toys[2], false));
    assert_eq!(decision("r5").await, refused("sold_out"));
    assert_eq!(
        decision("r1").await,
        granted(&books[0], false),
        "any category draws after the Toys pool, which asked first"
    );
    assert_eq!(decision("r6").await, granted(&books[1], false));
    assert_eq!(decision("r7").await, refused("sold_out"));
    assert_eq!(
        decision("r3").await,
        granted(&toys[0], true),
        "a second request in the batch sees the first one's hold"
    );
    assert_eq!(decision("r9").await, refused("rate_limited"));
    assert_eq!(env.count("SELECT count(*) FROM claim_decisions").await, 9);
    assert_eq!(
        env.count("SELECT count(*) FROM quota_grants").await,
        6,
        "five winners and the earlier grant; sold out keeps the quota"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM users WHERE last_coupon_at IS NOT NULL")
            .await,
        5
    );

    // Redelivered whole: nothing changes and every decision is republished
    // with its event id, in arrival order per user.
    coupon_consumers::claims::handle_batch(&ctx, &batch)
        .await
        .unwrap();
    assert_eq!(env.count("SELECT count(*) FROM claim_decisions").await, 9);
    assert_invariants(&env, 5).await;
    let published = env.read_topic(&env.topics.claim_results()).await;
    assert_eq!(published.len(), 20);
    let mut per_request: HashMap<String, HashSet<String>> = HashMap::new();
    let mut first_user_sequence = Vec::new();
    for record in &published {
        let event = decode::<ClaimDecided>(record).unwrap();
        if event.user_id == "u1" {
            first_user_sequence.push(event.request_id.clone());
        }
        per_request
            .entry(event.request_id)
            .or_default()
            .insert(event.envelope.unwrap().event_id);
    }
    assert_eq!(first_user_sequence, ["r0", "r3", "r0", "r0", "r3", "r0"]);
    assert!(per_request.values().all(|ids| ids.len() == 1));
}

/// Issue #24, item 6: a skipped lock is not an empty pool. The only
/// available coupon is locked by another transaction (as a purchase of it,
/// or a second processor, would) when a claim arrives: `SKIP LOCKED` passes
/// over it. Before, the claim was stored and answered `sold_out` (and the
/// pool marked) while the coupon was there; now the batch waits for the
/// lock and the claim gets the coupon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coupon_locked_by_another_transaction_is_not_sold_out() {
    let env = TestEnv::new().await;
    let app = env
        .start(&[Role::Gateway, Role::Coupons, Role::Claims], |_| {})
        .await;
    let codes = release(&env, "Locked", 1).await;
    let mut lock = env.pool.begin().await.unwrap();
    sqlx::query("SELECT code FROM coupons WHERE code = $1 FOR UPDATE")
        .bind(&codes[0])
        .execute(&mut *lock)
        .await
        .unwrap();
    let http = TestEnv::http_client();
    let claim = tokio::spawn({
        let url = app.url("/api/v1/coupon?id=patient&category=Locked");
        let http = http.clone();
        async move {
            let response = http.get(url).send().await.expect("claim");
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    });
    // The processor met the lock and is retrying its batch.
    let metrics_url = app.url("/metrics");
    eventually(
        "the claims batch is retried",
        Duration::from_secs(20),
        || {
            let (http, url) = (&http, &metrics_url);
            async move {
                let text = http.get(url).send().await.unwrap().text().await.unwrap();
                text.lines().any(|l| {
                    l.starts_with("coupon_batch_retries_total")
                        && l.contains("claims")
                        && l.split_whitespace().last() != Some("0")
                })
            }
        },
    )
    .await;
    assert!(!claim.is_finished(), "the claim waits for the lock");
    lock.commit().await.unwrap();
    let (status, body) = claim.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["coupon_code"], codes[0].as_str());
    assert_eq!(
        env.count("SELECT count(*) FROM claim_decisions WHERE outcome = 'sold_out'")
            .await,
        0
    );
    assert_invariants(&env, 1).await;
    app.stop().await;
}
