//! Sold out at the speed of a cache read (issue #16 item 1): once a pool is
//! empty the gateway answers `sold_out` from the pool's mark in Redis, with
//! no broker round trip and no Postgres statement on the request path; the
//! claim still goes on the log, flagged, and the claim processor records
//! `sold_out` for it and never allocates it a coupon. A release voids the
//! marks at once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coupon_domain::{Category, UserId};
use coupon_platform::kafka::{decode, Publisher};
use coupon_schemas::{ClaimDecided, ClaimOutcome, ClaimRequested};
use couponctl::app::Role;

use crate::harness::{eventually, eventually_ok, redis_url, release, App, TestEnv};

/// One claim over HTTP with its own request id: (status, error or code).
/// A claim as a storefront sends it, without an `x-request-id` of its own
/// (only an id the gateway generates is answered from the sold-out mark);
/// `_label` names the claim in the test.
async fn claim(http: &reqwest::Client, app: &App, user: &str, _label: &str) -> (u16, String) {
    let (status, what, _) = claim_with_id(http, app, user, None).await;
    (status, what)
}

/// A claim with the client's `x-request-id` when given; the answer's
/// status, coupon code or error, and the request id the gateway echoed.
async fn claim_with_id(
    http: &reqwest::Client,
    app: &App,
    user: &str,
    request_id: Option<&str>,
) -> (u16, String, String) {
    let mut request = http.get(app.url(&format!("/api/v1/coupon?id={user}")));
    if let Some(id) = request_id {
        request = request.header("x-request-id", id);
    }
    let response = request.send().await.expect("claim request");
    let echoed = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let what = body["coupon_code"]
        .as_str()
        .or(body["error"].as_str())
        .unwrap_or_default()
        .to_owned();
    (status, what, echoed)
}

/// Every decision on `coupons.claim-results`, by request id: the outcomes
/// of its distinct events (a republished decision keeps its event id).
async fn decisions(env: &TestEnv) -> HashMap<String, HashMap<String, (i32, String)>> {
    decisions_by(env, |event| event.request_id.clone()).await
}

/// The same, by what `key` makes of each decision (e.g. its user, when
/// every claim is a user of its own).
async fn decisions_by(
    env: &TestEnv,
    key: impl Fn(&ClaimDecided) -> String,
) -> HashMap<String, HashMap<String, (i32, String)>> {
    let mut by_key: HashMap<String, HashMap<String, (i32, String)>> = HashMap::new();
    for record in env.read_topic(&env.topics.claim_results()).await {
        let event = decode::<ClaimDecided>(&record).expect("decision");
        let id = event
            .envelope
            .as_ref()
            .map(|e| e.event_id.clone())
            .unwrap_or_default();
        by_key
            .entry(key(&event))
            .or_default()
            .insert(id, (event.outcome, event.coupon_code));
    }
    by_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sold_out_is_answered_without_the_claim_processor_and_decided_on_the_log() {
    let env = TestEnv::new().await;
    let long_marks = |c: &mut couponctl::app::AppConfig| {
        c.policy.sold_out_mark_ttl = Duration::from_secs(300);
    };
    let processor = env.start(&[Role::Coupons, Role::Claims], long_marks).await;
    let gateway = env
        .start(&[Role::Gateway], |c| {
            c.gateway.reply_timeout = Duration::from_secs(4);
        })
        .await;
    let http = TestEnv::http_client();
    release(&env, "Books", 1).await;
    assert_eq!(claim(&http, &gateway, "holder", "r-holder").await.0, 200);
    // Found empty by the processor: the pool is marked sold out.
    assert_eq!(
        claim(&http, &gateway, "drain", "r-drain").await,
        (404, "sold_out".to_owned())
    );
    processor.stop().await;

    // No processor runs: the gateway still answers sold out, at once.
    let mut fast = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let (status, what, request_id) =
            claim_with_id(&http, &gateway, &format!("late-{i}"), None).await;
        assert_eq!((status, what), (404, "sold_out".to_owned()), "claim {i}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered in {:?}, not from the mark",
            started.elapsed()
        );
        fast.push(request_id);
    }
    // A user who holds a coupon is never told sold out: that claim waits
    // for the (stopped) processor, which would return the user's coupon.
    let (status, _) = claim(&http, &gateway, "holder", "r-holder-again").await;
    assert_eq!(status, 504, "the holder's claim must go to the processor");
    let decided_fast: i64 =
        sqlx::query_scalar("SELECT count(*) FROM claim_decisions WHERE request_id = ANY($1)")
            .bind(&fast)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        decided_fast, 0,
        "nothing decided while the processor is down"
    );

    // A coupon comes back before the processor sees the flagged claims:
    // they stay sold out all the same.
    sqlx::query(
        "UPDATE coupons SET status = 'available', holder_user_id = NULL, hold_id = NULL,
                            held_until = NULL",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM quota_grants")
        .execute(&env.pool)
        .await
        .unwrap();
    let _processor = env.start(&[Role::Claims], |_| {}).await;
    eventually_ok(
        "the fast answers are decided on the log",
        Duration::from_secs(60),
        || async {
            let found = decisions(&env).await;
            for request_id in &fast {
                match found
                    .get(request_id)
                    .map(|d| d.values().collect::<Vec<_>>())
                {
                    Some(d) if d.len() == 1 && d[0].0 == ClaimOutcome::SoldOut as i32 => {}
                    other => return Err(format!("{request_id}: {other:?}")),
                }
            }
            Ok(())
        },
    )
    .await;
    let stored: Vec<(String, String)> = sqlx::query_as(
        "SELECT request_id, outcome FROM claim_decisions WHERE request_id = ANY($1)",
    )
    .bind(&fast)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(stored.len(), fast.len());
    assert!(stored.iter().all(|(_, outcome)| outcome == "sold_out"));
    assert_eq!(
        env.count("SELECT count(*) FROM coupons WHERE holder_user_id LIKE 'late-%'")
            .await,
        0,
        "no user told sold out holds a coupon"
    );
}

/// New users claim from an empty pool, each answered `sold_out`, until the
/// pool is marked sold out again (after Redis lost or missed writes): the
/// point from which the gateway answers from the mark and the users' keys
/// in Redis decide who is asked instead.
async fn newcomers_until_marked_sold_out(
    http: &reqwest::Client,
    app: &App,
    cache: &coupon_platform::redis::Cache,
) {
    let newcomer = std::sync::atomic::AtomicUsize::new(0);
    eventually(
        "the empty pool is marked sold out again",
        Duration::from_secs(30),
        || async {
            let n = newcomer.fetch_add(1, Ordering::Relaxed);
            let user = format!("newcomer-{n}");
            assert_eq!(
                claim(http, app, &user, &user).await,
                (404, "sold_out".to_owned())
            );
            let facts = cache
                .fast_path_facts(&UserId::parse("someone-new").unwrap(), None)
                .await
                .expect("facts");
            coupon_domain::sold_out::pool_sold_out(&facts)
        },
    )
    .await;
}

/// Redis loses its data under a sold-out pool. The claims that keep coming
/// find the pool empty and would mark it sold out again at once, but the
/// users' holds and used quotas went with the data: read as absent, they
/// would tell a holder `sold_out` instead of giving the coupon back, and a
/// buyer `sold_out` instead of `429`. No mark counts until the cache is
/// refilled from Postgres; then newcomers get the fast answer again while
/// the holder and the buyer get theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_loses_its_data_no_holder_or_buyer_is_told_sold_out() {
    let env = TestEnv::new().await;
    let app = env
        .start(
            &[Role::Gateway, Role::Coupons, Role::Claims, Role::Purchases],
            |c| c.policy.sold_out_mark_ttl = Duration::from_secs(300),
        )
        .await;
    let http = TestEnv::http_client();
    release(&env, "Books", 2).await;
    let (status, held) = claim(&http, &app, "holder", "r-holder").await;
    assert_eq!(status, 200, "{held}");
    let (status, bought) = claim(&http, &app, "buyer", "r-buyer").await;
    assert_eq!(status, 200, "{bought}");
    let response = http
        .post(app.url("/api/v1/purchase"))
        .json(&serde_json::json!({"user_id": "buyer", "coupon_code": bought, "order_id": "o-1"}))
        .send()
        .await
        .expect("purchase");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        claim(&http, &app, "drain", "r-drain").await,
        (404, "sold_out".to_owned())
    );

    let cache = coupon_platform::redis::Cache::connect(&redis_url(), &env.name)
        .await
        .expect("redis");
    assert!(
        cache.clear().await.expect("wipe") > 0,
        "Redis had the holds"
    );
    newcomers_until_marked_sold_out(&http, &app, &cache).await;
    assert_eq!(
        claim(&http, &app, "holder", "r-holder-again").await,
        (200, held),
        "the holder gets the held coupon back"
    );
    assert_eq!(
        claim(&http, &app, "buyer", "r-buyer-again").await,
        (429, "rate_limited".to_owned()),
        "the buyer's quota is used"
    );
    app.stop().await;
}

/// A Redis server of this test's own, so that it can be frozen without
/// stopping the one every other test shares. Killed when dropped.
struct OwnRedis {
    child: std::process::Child,
    url: String,
}

impl OwnRedis {
    async fn start() -> Self {
        let port = crate::harness::free_port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (make setup installs it)");
        let url = format!("redis://127.0.0.1:{port}");
        let own = Self { child, url };
        eventually(
            "the test's own Redis answers",
            Duration::from_secs(10),
            || async {
                coupon_platform::redis::Cache::connect(&own.url, "probe")
                    .await
                    .is_ok()
            },
        )
        .await;
        own
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Redis freezes (connections open, nothing answers) while a user wins the
/// last coupon: the claim is decided without Redis, and the winner's hold
/// never reaches it (the writes are skipped while Redis does not answer).
/// When Redis goes on it still has the supply version, so the next claims,
/// finding the pool empty, would mark it sold out and the winner asking
/// again would be told `sold_out`. The claim processor writes no mark
/// until it has deleted that version; a restore then refills the hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_winner_during_a_redis_freeze_is_not_told_sold_out_after_it() {
    let env = TestEnv::new().await;
    let redis = OwnRedis::start().await;
    let app = env
        .start(&[Role::Gateway, Role::Coupons, Role::Claims], |c| {
            c.redis_url = redis.url.clone();
            c.policy.sold_out_mark_ttl = Duration::from_secs(300);
        })
        .await;
    let http = TestEnv::http_client();
    release(&env, "Books", 1).await;

    redis.signal("-STOP");
    let (status, held) = claim(&http, &app, "winner", "r-winner").await;
    assert_eq!(status, 200, "decided without Redis: {held}");
    redis.signal("-CONT");

    let cache = coupon_platform::redis::Cache::connect(&redis.url, &env.name)
        .await
        .expect("redis");
    newcomers_until_marked_sold_out(&http, &app, &cache).await;
    assert_eq!(
        claim(&http, &app, "winner", "r-winner-again").await,
        (200, held),
        "the winner gets the held coupon back"
    );
    app.stop().await;
}

/// The supply version is the cache's proof of completeness: only a restore
/// that nothing was lost in the middle of writes it, a supply only replaces
/// it, and a failed hold write takes it (and a restore under way) away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_restore_no_loss_interrupted_turns_sold_out_answers_on() {
    let env = TestEnv::new().await;
    let cache = coupon_platform::redis::Cache::connect(&redis_url(), &env.name)
        .await
        .expect("redis");
    let version = || async { cache.supply_version().await.expect("version") };
    cache.supply_changed().await.expect("supply");
    assert_eq!(
        version().await,
        None,
        "a supply does not vouch for the cache"
    );

    let token = cache.begin_restore().await.expect("begin");
    cache.clear().await.expect("lost again");
    assert!(!cache.finish_restore(&token).await.expect("finish"));
    assert_eq!(version().await, None);

    let token = cache.begin_restore().await.expect("begin");
    assert!(cache.finish_restore(&token).await.expect("finish"));
    let restored = version().await.expect("a version after the restore");
    cache.supply_changed().await.expect("supply");
    let supplied = version().await.expect("a version after the supply");
    assert_ne!(supplied, restored, "a supply voids the marks");

    let token = cache.begin_restore().await.expect("begin");
    cache.forget_supply().await.expect("forget");
    assert_eq!(version().await, None);
    assert!(
        !cache.finish_restore(&token).await.expect("finish"),
        "a restore under way may have missed the write that failed"
    );
    assert_eq!(version().await, None);
}

/// A claim the gateway answered sold out is decided sold out even though a
/// coupon is available when the processor sees it; redelivered, the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_answered_sold_out_is_never_allocated() {
    let env = TestEnv::new().await;
    let app = env.start(&[Role::Coupons], |_| {}).await;
    release(&env, "Toys", 2).await;
    app.stop().await;
    let ctx = couponctl::app::connect(&env.config()).await.unwrap();
    let publisher = Publisher::new(&env.kafka, "test").unwrap();
    let record = |offset: i64, request_id: &str, user: &str, answered: bool| {
        let event = ClaimRequested {
            envelope: Some(publisher.envelope::<ClaimRequested>(request_id)),
            request_id: request_id.into(),
            user_id: user.into(),
            category: String::new(),
            answered_sold_out: answered,
        };
        coupon_platform::kafka::Record {
            topic: env.topics.claims(),
            partition: 0,
            offset,
            key: Some(user.as_bytes().to_vec()),
            value: Some(prost::Message::encode_to_vec(&event)),
            timestamp_ms: None,
        }
    };
    let batch = vec![
        record(0, "told", "u1", true),
        record(1, "asks", "u1", false),
        record(2, "told-2", "u2", true),
    ];
    for _ in 0..2 {
        coupon_consumers::claims::handle_batch(&ctx, &batch)
            .await
            .unwrap();
    }
    let outcome = |request_id: &'static str| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT outcome FROM claim_decisions WHERE request_id = $1",
            )
            .bind(request_id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(outcome("told").await, "sold_out");
    assert_eq!(outcome("told-2").await, "sold_out");
    assert_eq!(outcome("asks").await, "granted", "sold out used no quota");
    assert_eq!(
        env.count("SELECT count(*) FROM coupons WHERE status = 'held'")
            .await,
        1
    );
    let found = decisions(&env).await;
    for request_id in ["told", "asks", "told-2"] {
        assert_eq!(found[request_id].len(), 1, "{request_id}: one decision");
    }
}

/// What the claim stream saw: (gateway, user, sent at, status).
type Seen = Arc<Mutex<Vec<(usize, String, Instant, u16)>>>;

/// A drained pool, a stream of claims through two gateways, and coupons
/// coming back twice (a new batch, then expired holds) while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_race_a_drained_pool_across_two_gateways() {
    let env = TestEnv::new().await;
    let short_holds = |c: &mut couponctl::app::AppConfig| {
        c.policy.hold_ttl = Duration::from_secs(4);
        c.policy.hold_grace = Duration::from_secs(1);
        c.policy.sold_out_mark_ttl = Duration::from_secs(300);
        c.gateway.reply_timeout = Duration::from_secs(20);
    };
    let one = env
        .start(
            &[Role::Gateway, Role::Coupons, Role::Claims, Role::Expiry],
            short_holds,
        )
        .await;
    let two = env.start(&[Role::Gateway], short_holds).await;
    let gateways = Arc::new([one, two]);
    let http = TestEnv::http_client();
    release(&env, "Games", 3).await;
    for i in 0..3 {
        assert_eq!(
            claim(
                &http,
                &gateways[0],
                &format!("first-{i}"),
                &format!("first-{i}")
            )
            .await
            .0,
            200
        );
    }

    let seen: Seen = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..6 {
        let (http, gateways, seen, stop) =
            (http.clone(), gateways.clone(), seen.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let gateway = (worker + n) % 2;
                let user = format!("w{worker}-{n}");
                let sent = Instant::now();
                let (status, _) = claim(&http, &gateways[gateway], &user, &user).await;
                seen.lock().unwrap().push((gateway, user, sent, status));
                n += 1;
            }
        }));
    }
    let statuses = |since: Instant| {
        let seen = seen.lock().unwrap();
        seen.iter()
            .filter(|(_, _, sent, _)| *sent >= since)
            .map(|(g, _, _, s)| (*g, *s))
            .collect::<Vec<_>>()
    };
    // Drained: both gateways answer sold out.
    let drained = Instant::now();
    eventually(
        "both gateways answer sold out",
        Duration::from_secs(30),
        || async {
            let s = statuses(drained);
            (0..2).all(|g| s.contains(&(g, 404)))
        },
    )
    .await;

    // A new batch lands while the stream runs.
    let releasing = Instant::now();
    let cards = release(&env, "Cards", 4).await;
    let available = Instant::now();
    eventually(
        "the new batch is granted",
        Duration::from_secs(30),
        || async {
            env.count("SELECT count(*) FROM coupons WHERE status = 'available'")
                .await
                == 0
        },
    )
    .await;
    // Once the coupons were there (the release saw them projected), a claim
    // sent within the bound got one: the sold-out marks did not hide them.
    // The claims that won them are known from their decisions; their
    // answers reach the workers after the processor's commit (decision on
    // the log, gateway, HTTP), so wait for those answers before reading
    // when they were sent.
    // By user: each claim of the stream is a user of its own (their
    // request ids are the gateways').
    let winners: Vec<String> = sqlx::query_scalar(
        "SELECT user_id FROM claim_decisions
          WHERE outcome = 'granted' AND NOT repeated AND coupon_code = ANY($1)",
    )
    .bind(&cards)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(winners.len(), cards.len(), "one grant per new coupon");
    let sent_by_winners = || {
        let seen = seen.lock().unwrap();
        winners
            .iter()
            .map(|winner| {
                seen.iter()
                    .find(|(_, user, ..)| user == winner)
                    .map(|(_, _, sent, status)| (*sent, *status))
            })
            .collect::<Option<Vec<_>>>()
    };
    eventually(
        "the claims granted the new batch are answered",
        Duration::from_secs(30),
        || async { sent_by_winners().is_some() },
    )
    .await;
    let answered = sent_by_winners().unwrap_or_default();
    assert!(
        answered.iter().all(|(_, status)| *status == 200),
        "a claim granted a new coupon was not answered 200: {answered:?}"
    );
    let first_grant = answered
        .iter()
        .map(|(sent, _)| *sent)
        .min()
        .expect("the new batch was granted");
    assert!(
        first_grant <= available + Duration::from_secs(1),
        "the first grant went to a claim sent {:?} after the coupons were available",
        first_grant.saturating_duration_since(available)
    );
    // The first holders' holds expire: their coupons come back and are
    // granted again through the stream.
    eventually("expired holds are granted again", Duration::from_secs(30), || async {
        env.count(
            "SELECT count(*) FROM coupons WHERE status = 'held' AND holder_user_id LIKE 'w%'",
        )
        .await
            >= 7
            || env.count("SELECT count(*) FROM claim_decisions WHERE outcome = 'granted' AND user_id LIKE 'w%'").await >= 7
    })
    .await;
    // Both gateways grant after the release. Which gateway's claims win a
    // batch is chance, but the expiring holds keep coming back, so both do
    // within the deadline.
    eventually(
        "both gateways granted after the release",
        Duration::from_secs(30),
        || async {
            let s = statuses(releasing);
            (0..2).all(|g| s.contains(&(g, 200)))
        },
    )
    .await;
    let after_expiry = Instant::now();
    eventually(
        "sold out again on both gateways",
        Duration::from_secs(30),
        || async {
            let s = statuses(after_expiry);
            (0..2).all(|g| s.contains(&(g, 404)))
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();

    // Both gateways granted after the release, and answered sold out from
    // the mark (the fast path ran).
    let granted_by: HashSet<usize> = seen
        .iter()
        .filter(|(_, _, sent, s)| *sent >= releasing && *s == 200)
        .map(|(g, ..)| *g)
        .collect();
    assert_eq!(
        granted_by.len(),
        2,
        "both gateways granted after the release"
    );
    let metrics = http
        .get(gateways[1].url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let fast: f64 = metrics
        .lines()
        .find(|l| l.starts_with("coupon_claims_sold_out_fast_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(fast > 0.0, "no claim took the sold-out fast path");

    // Every claim has exactly one decision on the log; none answered sold
    // out was granted, and no such user holds a coupon.
    let sold_out: Vec<&String> = seen
        .iter()
        .filter(|(.., s)| *s == 404)
        .map(|(_, user, ..)| user)
        .collect();
    eventually_ok(
        "every claim is decided once",
        Duration::from_secs(60),
        || async {
            let found = decisions_by(&env, |event| event.user_id.clone()).await;
            for (_, user, _, status) in &seen {
                let Some(d) = found.get(user) else {
                    return Err(format!("{user} ({status}) has no decision"));
                };
                if d.len() != 1 {
                    return Err(format!("{user} has {} decisions: {d:?}", d.len()));
                }
                let (outcome, _) = d.values().next().unwrap();
                let expected = match status {
                    200 => ClaimOutcome::Granted,
                    404 => ClaimOutcome::SoldOut,
                    other => panic!("{user}: unexpected status {other}"),
                };
                if *outcome != expected as i32 {
                    panic!("{user} answered {status} but decided {outcome}");
                }
            }
            Ok(())
        },
    )
    .await;
    let holders: Vec<String> =
        sqlx::query_scalar("SELECT user_id FROM claim_decisions WHERE outcome = 'granted'")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let holders: HashSet<String> = holders.into_iter().collect();
    for user in sold_out {
        assert!(
            !holders.contains(user),
            "{user} was told sold out but granted"
        );
    }
    crate::harness::assert_invariants(&env, 7).await;
}

/// While claims keep arriving for an empty pool, its sold-out mark is renewed
/// and never lapses: every claim after the first mark is answered from it
/// (flagged on the log), for several times the mark's TTL. Without renewal
/// the mark would lapse every TTL and claims in flight would take the full
/// path (a p99 spike in the flash sale every 10 s). A release still voids
/// the renewed mark at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sold_out_mark_is_renewed_while_claims_keep_coming() {
    let env = TestEnv::new().await;
    let mark_ttl = Duration::from_secs(3);
    let _processor = env
        .start(&[Role::Coupons, Role::Claims], |c| {
            c.policy.sold_out_mark_ttl = mark_ttl;
        })
        .await;
    let gateway = env.start(&[Role::Gateway], |_| {}).await;
    let http = TestEnv::http_client();
    release(&env, "Books", 1).await;
    assert_eq!(claim(&http, &gateway, "holder", "r-holder").await.0, 200);
    assert_eq!(
        claim(&http, &gateway, "drain", "r-drain").await,
        (404, "sold_out".to_owned())
    );

    // Claims for 4 TTLs, four a second, each from a new user.
    let mut pace = tokio::time::interval(Duration::from_millis(250));
    let mut steady: Vec<String> = Vec::new();
    for i in 0..(4 * mark_ttl.as_millis() / 250) {
        pace.tick().await;
        let (status, what, request_id) =
            claim_with_id(&http, &gateway, &format!("steady-{i}"), None).await;
        assert_eq!((status, what), (404, "sold_out".to_owned()), "claim {i}");
        steady.push(request_id);
    }
    let read_flags = || async {
        let mut flags = HashMap::new();
        for record in env.read_topic(&env.topics.claims()).await {
            let request = decode::<ClaimRequested>(&record).expect("claim request");
            if steady.contains(&request.request_id) {
                flags.insert(request.request_id, request.answered_sold_out);
            }
        }
        flags
    };
    eventually_ok(
        "every steady claim is on the log",
        Duration::from_secs(30),
        || async {
            let on_log = read_flags().await.len();
            if on_log == steady.len() {
                Ok(())
            } else {
                Err(format!("{on_log} of {} on the log", steady.len()))
            }
        },
    )
    .await;
    let flags = read_flags().await;
    let slow: Vec<&String> = steady.iter().filter(|id| !flags[*id]).collect();
    assert!(
        slow.is_empty(),
        "claims that found no mark and took the full path: {slow:?}"
    );

    // A release voids the renewed mark at once: the next claim wins.
    release(&env, "Books", 1).await;
    let attempt = std::sync::atomic::AtomicUsize::new(0);
    eventually(
        "a claim after the release gets the new coupon",
        Duration::from_secs(20),
        || async {
            let n = attempt.fetch_add(1, Ordering::Relaxed);
            let (user, request_id) = (format!("after-{n}"), format!("r-after-{n}"));
            claim(&http, &gateway, &user, &request_id).await.0 == 200
        },
    )
    .await;
}

/// Issue #24, item 3: one request id, one answer, on every path. Each user
/// sends one request id twice at once, for a sold-out pool (marked) and for
/// one in stock. Before, the first copy was answered `404` from the mark
/// while the second was granted: 4 of 5 users got both. Now a client's own
/// request id is never answered from the mark: both copies get the one
/// decision stored (and published) for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_id_gets_one_answer_whatever_its_category() {
    let env = TestEnv::new().await;
    let app = env
        .start(&[Role::Gateway, Role::Coupons, Role::Claims], |c| {
            c.policy.sold_out_mark_ttl = Duration::from_secs(300);
        })
        .await;
    let http = TestEnv::http_client();
    // Both pools first: a release voids every sold-out mark.
    release(&env, "Kept", 5).await;
    release(&env, "Gone", 1).await;
    let gone = |user: &'static str| {
        http.get(app.url(&format!("/api/v1/coupon?id={user}&category=Gone")))
            .send()
    };
    assert_eq!(gone("first").await.unwrap().status().as_u16(), 200);
    let cache = coupon_platform::redis::Cache::connect(&crate::harness::redis_url(), &env.name)
        .await
        .unwrap();
    eventually(
        "the empty pool is marked",
        Duration::from_secs(30),
        || async {
            assert_eq!(gone("drain").await.unwrap().status().as_u16(), 404);
            let facts = cache
                .fast_path_facts(
                    &UserId::parse("someone-new").unwrap(),
                    Some(&Category::parse("Gone").unwrap()),
                )
                .await
                .unwrap();
            coupon_domain::sold_out::pool_sold_out(&facts)
        },
    )
    .await;
    for i in 0..5 {
        let (user, id) = (format!("twice-{i}"), format!("same-id-{i}"));
        let gone = http
            .get(app.url(&format!("/api/v1/coupon?id={user}&category=Gone")))
            .header("x-request-id", &id)
            .send();
        let kept = http
            .get(app.url(&format!("/api/v1/coupon?id={user}&category=Kept")))
            .header("x-request-id", &id)
            .send();
        let (gone, kept) = tokio::join!(gone, kept);
        let answer = |r: reqwest::Response| async move {
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, body["coupon_code"].clone(), body["error"].clone())
        };
        let (gone, kept) = (answer(gone.unwrap()).await, answer(kept.unwrap()).await);
        assert_eq!(gone, kept, "{user}: one request id, two answers");
        let stored: String =
            sqlx::query_scalar("SELECT outcome FROM claim_decisions WHERE request_id = $1")
                .bind(&id)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        let expected = if gone.0 == 200 { "granted" } else { "sold_out" };
        assert_eq!(
            stored, expected,
            "{user}: the answer is the stored decision"
        );
    }
    crate::harness::assert_invariants(&env, 6).await;
    app.stop().await;
}
