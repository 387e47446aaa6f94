//! Purchases and expiry: every hold ends exactly one way.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use coupon_domain::CouponCode;
use coupon_platform::redis::Cache;
use couponctl::app::Role;

use crate::harness::{assert_invariants, eventually, redis_url, release, App, TestEnv};

async fn claim(http: &reqwest::Client, app: &App, user: &str) -> (u16, Value) {
    let response = http
        .get(app.url(&format!("/api/v1/coupon?id={user}")))
        .send()
        .await
        .unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn purchase(
    http: &reqwest::Client,
    app: &App,
    user: &str,
    code: &str,
    order: &str,
) -> (u16, Value) {
    let response = http
        .post(app.url("/api/v1/purchase"))
        .json(&json!({"user_id": user, "coupon_code": code, "order_id": order}))
        .send()
        .await
        .unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

const ALL: [Role; 7] = Role::ALL;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchase_inside_the_hold_redeems_once_per_order() {
    let env = TestEnv::new().await;
    let app = env
        .start(&ALL, |c| c.policy.hold_ttl = Duration::from_secs(60))
        .await;
    release(&env, "Shoes", 3).await;
    let http = TestEnv::http_client();
    let cache = Cache::connect(&redis_url(), &env.name).await.unwrap();

    let (status, body) = claim(&http, &app, "buyer").await;
    assert_eq!(status, 200);
    let code = body["coupon_code"].as_str().unwrap().to_owned();
    let typed_code = CouponCode::parse(&code).expect("a coupon code");
    assert!(
        cache.hold(&typed_code).await.unwrap().is_some(),
        "the hold is mirrored in Redis"
    );
    let (_, other) = claim(&http, &app, "bystander").await;
    let other_code = other["coupon_code"].as_str().unwrap().to_owned();

    let (status, body) = purchase(&http, &app, "bystander", &code, "o-0").await;
    assert_eq!((status, body["error"].as_str()), (409, Some("not_holder")));

    let (status, body) = purchase(&http, &app, "buyer", &code, "o-1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "redeemed");
    let (status, again) = purchase(&http, &app, "buyer", &code, "o-1").await;
    assert_eq!(status, 200, "the same order gets the same answer");
    assert_eq!(again["redeemed_at"], body["redeemed_at"]);
    let (status, body) = purchase(&http, &app, "bystander", &code, "o-1").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("order_id_conflict"))
    );
    assert!(
        !body.to_string().contains(&code),
        "another user's order is not revealed: {body}"
    );
    let (status, body) = purchase(&http, &app, "buyer", &code, "o-2").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("already_redeemed"))
    );
    let (status, body) = purchase(&http, &app, "buyer", "0000000000000", "o-3").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("unknown_coupon"))
    );
    let (status, body) = purchase(&http, &app, "buyer", "not a code at all", "o-4").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("unknown_coupon"))
    );

    for bad in [
        json!({"user_id": "buyer", "coupon_code": code}),
        json!({"user_id": 7, "coupon_code": code, "order_id": "o"}),
        json!({"user_id": "", "coupon_code": code, "order_id": "o"}),
    ] {
        let response = http
            .post(app.url("/api/v1/purchase"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
        assert_eq!(
            response.json::<Value>().await.unwrap()["error"],
            "invalid_request"
        );
    }

    let redemptions = env
        .count(&format!("SELECT count(*) FROM coupons WHERE code = '{code}' AND status = 'redeemed' AND redeemed_order_id = 'o-1'"))
        .await;
    assert_eq!(redemptions, 1);
    assert!(
        cache.hold(&typed_code).await.unwrap().is_none(),
        "a redeemed hold leaves Redis"
    );
    eventually("history shows the redemption", Duration::from_secs(20), || async {
        env.count(&format!("SELECT count(*) FROM coupon_history WHERE coupon_code = '{code}' AND kind = 'redeemed'")).await == 1
    })
    .await;

    // Redis is a cache: wiped, it is rebuilt from Postgres by the CLI.
    cache.clear().await.unwrap();
    let output = env.couponctl().args(["holds", "rebuild"]).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("1 live holds"));
    let rebuilt = cache
        .hold(&CouponCode::parse(&other_code).expect("a coupon code"))
        .await
        .unwrap()
        .expect("rebuilt hold");
    assert_eq!(rebuilt.user_id.as_str(), "bystander");

    assert_invariants(&env, 3).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbought_hold_returns_to_the_pool_for_the_next_user() {
    let env = TestEnv::new().await;
    let app = env
        .start(&ALL, |c| c.policy.hold_ttl = Duration::from_secs(1))
        .await;
    let codes = release(&env, "Hats", 1).await;
    let http = TestEnv::http_client();

    let (status, body) = claim(&http, &app, "dawdler").await;
    assert_eq!(status, 200);
    assert_eq!(body["coupon_code"], codes[0].as_str());
    eventually("the hold is released", Duration::from_secs(15), || async {
        env.count("SELECT count(*) FROM coupons WHERE status = 'available'")
            .await
            == 1
    })
    .await;
    let (status, body) = purchase(&http, &app, "dawdler", &codes[0], "late-order").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("hold_expired"))
    );

    let (status, body) = claim(&http, &app, "next-in-line").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["coupon_code"],
        codes[0].as_str(),
        "the same coupon goes to the next user"
    );
    let (status, _) = claim(&http, &app, "dawdler").await;
    assert_eq!(status, 429, "the first user's quota stays used");
    // The late buyer is told the hold expired even now that someone else holds it.
    let (status, body) = purchase(&http, &app, "dawdler", &codes[0], "later-order").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("hold_expired"))
    );
    let released = env
        .count(&format!("SELECT count(*) FROM coupon_history WHERE coupon_code = '{}' AND kind = 'released' AND user_id = 'dawdler'", codes[0]))
        .await;
    assert_eq!(released, 1);
    assert_invariants(&env, 1).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_racing_the_deadline_end_exactly_one_way() {
    let env = TestEnv::new().await;
    let app = env
        .start(&ALL, |c| {
            c.policy.hold_ttl = Duration::from_secs(2);
            c.sweep_interval = Duration::from_millis(50);
        })
        .await;
    release(&env, "Racing", 30).await;
    let http = TestEnv::http_client();
    let mut holds = Vec::new();
    // All at once, so no hold runs out before every racer has one.
    let claims = futures::future::join_all((0..30).map(|i| {
        let http = http.clone();
        let app = &app;
        async move {
            let user = format!("racer-{i}");
            let (status, body) = claim(&http, app, &user).await;
            (user, status, body)
        }
    }))
    .await;
    for (user, status, body) in claims {
        assert_eq!(status, 200, "{body}");
        let expires: chrono::DateTime<chrono::Utc> =
            body["expires_at"].as_str().unwrap().parse().unwrap();
        holds.push((
            user,
            body["coupon_code"].as_str().unwrap().to_owned(),
            expires,
        ));
    }
    // Fire every purchase within ±60 ms of its hold's deadline.
    let answers =
        futures::future::join_all(holds.iter().enumerate().map(|(i, (user, code, expires))| {
            let http = http.clone();
            let app = &app;
            async move {
                let offset = chrono::Duration::milliseconds((i as i64 % 13) * 10 - 60);
                let wait = (*expires + offset - chrono::Utc::now())
                    .to_std()
                    .unwrap_or_default();
                tokio::time::sleep(wait).await;
                let order = format!("race-{i}");
                let (status, body) = purchase(&http, app, user, code, &order).await;
                (user.clone(), code.clone(), order, status, body)
            }
        }))
        .await;
    eventually("every hold has ended", Duration::from_secs(15), || async {
        env.count("SELECT count(*) FROM coupons WHERE status = 'held'")
            .await
            == 0
    })
    .await;
    // Judged per hold (user and coupon): under load a released coupon may be
    // granted again to a racer who claimed late, so one code can see two holds.
    let mut redeemed = 0;
    for (user, code, order, status, body) in &answers {
        let (status_in_db, redeemed_by): (String, Option<String>) =
            sqlx::query_as("SELECT status, redeemed_order_id FROM coupons WHERE code = $1")
                .bind(code)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        let released = env
            .count(&format!(
                "SELECT count(*) FROM coupon_history
                 WHERE coupon_code = '{code}' AND user_id = '{user}' AND kind = 'released'"
            ))
            .await;
        match status {
            200 => {
                assert_eq!(status_in_db, "redeemed", "{code} was answered redeemed");
                assert_eq!(redeemed_by.as_deref(), Some(order.as_str()));
                assert_eq!(
                    released, 0,
                    "{user}'s hold on {code} was both redeemed and released"
                );
                redeemed += 1;
            }
            409 => {
                assert_eq!(body["error"], "hold_expired");
                assert_eq!(
                    released, 1,
                    "{user} was refused but the hold on {code} was not released"
                );
                assert_ne!(redeemed_by.as_deref(), Some(order.as_str()));
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    eprintln!("race: {redeemed} of 30 purchases beat the deadline");
    assert_invariants(&env, 30).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_are_released_after_redis_loss_and_an_expiry_outage() {
    let env = TestEnv::new().await;
    // No expiry role: the worker is "down" while the holds run out.
    let app = env
        .start(
            &[Role::Gateway, Role::Coupons, Role::Claims, Role::Purchases],
            |c| c.policy.hold_ttl = Duration::from_secs(1),
        )
        .await;
    release(&env, "Outage", 10).await;
    let http = TestEnv::http_client();
    for i in 0..10 {
        assert_eq!(claim(&http, &app, &format!("stranded-{i}")).await.0, 200);
    }
    let cache = Cache::connect(&redis_url(), &env.name).await.unwrap();
    assert!(cache.clear().await.unwrap() > 0, "Redis held the holds");
    eventually(
        "every deadline has passed",
        Duration::from_secs(10),
        || async {
            env.count("SELECT count(*) FROM coupons WHERE status = 'held' AND held_until > now()")
                .await
                == 0
        },
    )
    .await;
    assert_eq!(
        env.status_counts().await.held,
        10,
        "nothing released them yet"
    );

    let started = Instant::now();
    let expiry = env
        .start(&[Role::Expiry], |c| {
            c.sweep_interval = Duration::from_millis(500)
        })
        .await;
    eventually(
        "every overdue hold is released",
        Duration::from_secs(10),
        || async {
            env.count("SELECT count(*) FROM coupons WHERE status = 'available'")
                .await
                == 10
        },
    )
    .await;
    eprintln!(
        "released 10 overdue holds {:?} after the expiry worker started",
        started.elapsed()
    );
    assert_invariants(&env, 10).await;
    expiry.stop().await;
    app.stop().await;
}
