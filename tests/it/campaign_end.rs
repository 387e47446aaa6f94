//! A campaign ends (issue #28 item 3) and a cancelled order gives its coupon
//! back (item 5), end to end: early by an employee (`DELETE
//! /api/v1/campaigns/<id>`, `couponctl campaign end`) or at `valid_until`,
//! its available coupons become `expired` (a `CouponExpired` on the log, a
//! history row), its holds keep their deadline and end in `expired`; a
//! cancelled order's coupon goes back to the pool, or to `expired` after its
//! campaign's end. Redeliveries change nothing; the audit and the rebuild
//! agree with the live state.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use coupon_platform::kafka::{decode_topic, Record};
use coupon_schemas::{TopicEvent, TopicKind};
use couponctl::app::{self, Role};

use crate::harness::{assert_invariants, eventually, App, TestEnv};

const ALL: [Role; 7] = Role::ALL;

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn answer(response: reqwest::Response) -> (u16, Value) {
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

/// Releases `count` coupons of `category` as a campaign ending at `until`;
/// returns the batch id (the campaign's id) once they are projected.
async fn release_campaign(
    env: &TestEnv,
    app: &App,
    category: &str,
    count: i64,
    until: DateTime<Utc>,
) -> String {
    let response = TestEnv::http_client()
        .post(app.url("/api/v1/coupon"))
        .bearer_auth("admin-secret")
        .json(&json!({"id": "e1", "category": category, "count": count,
                      "campaign": format!("{category} sale"), "valid_until": rfc3339(until)}))
        .send()
        .await
        .unwrap();
    let (status, body) = answer(response).await;
    assert_eq!(status, 202, "{body}");
    eventually(
        &format!("{count} {category} coupons projected"),
        Duration::from_secs(60),
        || async {
            env.count(&format!(
                "SELECT count(*) FROM coupons WHERE category = '{category}'"
            ))
            .await
                == count
        },
    )
    .await;
    body["batch_id"].as_str().unwrap().to_owned()
}

async fn end_campaign(app: &App, id: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = TestEnv::http_client().delete(app.url(&format!("/api/v1/campaigns/{id}")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    answer(request.send().await.unwrap()).await
}

/// `GET /api/v1/campaigns<query>`'s campaigns, once every role has caught
/// up (the funnel is the history sink's).
async fn campaigns(app: &App, query: &str) -> Vec<Value> {
    let response = TestEnv::http_client()
        .get(app.url(&format!("/api/v1/campaigns{query}")))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    let (status, body) = answer(response).await;
    assert_eq!(status, 200, "{body}");
    body["campaigns"].as_array().cloned().unwrap_or_default()
}

async fn claim(app: &App, user: &str, category: &str) -> (u16, Value) {
    let url = app.url(&format!("/api/v1/coupon?id={user}&category={category}"));
    answer(TestEnv::http_client().get(url).send().await.unwrap()).await
}

async fn purchase(app: &App, user: &str, code: &str, order: &str) -> (u16, Value) {
    let body = json!({"user_id": user, "coupon_code": code, "order_id": order});
    let url = app.url("/api/v1/purchase");
    answer(
        TestEnv::http_client()
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn cancel(app: &App, order: &str) -> (u16, Value) {
    let url = app.url(&format!("/api/v1/purchase/{order}/cancel"));
    answer(TestEnv::http_client().post(url).send().await.unwrap()).await
}

async fn status_of(env: &TestEnv, code: &str) -> String {
    sqlx::query_scalar("SELECT status FROM coupons WHERE code = $1")
        .bind(code)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn count_in(env: &TestEnv, category: &str, status: &str) -> i64 {
    env.count(&format!(
        "SELECT count(*) FROM coupons WHERE category = '{category}' AND status = '{status}'"
    ))
    .await
}

/// The records of `topic` that decode as a message `pick` accepts.
async fn events_on(
    env: &TestEnv,
    topic: &str,
    kind: TopicKind,
    pick: impl Fn(&TopicEvent) -> bool,
) -> Vec<Record> {
    env.read_topic(topic)
        .await
        .into_iter()
        .filter(|r| {
            decode_topic(kind, r.value.as_deref())
                .map(|e| pick(&e))
                .unwrap_or(false)
        })
        .collect()
}

/// Every coupon's status, by code.
async fn statuses(pool: &sqlx::PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT code, status FROM coupons ORDER BY code")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// `couponctl audit` agrees with the live database, and the log rebuilt
/// into a fresh database gives every coupon the live status.
async fn audit_and_rebuild_agree(env: &TestEnv) {
    env.wait_every_role_caught_up(Duration::from_secs(60)).await;
    let audit = env.couponctl().arg("audit").output().unwrap();
    assert!(
        audit.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );
    let rebuilt_db = env.rebuild_into("rb").await;
    let rebuilt_pool = rebuilt_db.connect(1).await;
    let rebuilt = statuses(&rebuilt_pool).await;
    let rebuilt_ends = ends(&rebuilt_pool).await;
    let rebuilt_cancels = cancels(&rebuilt_pool).await;
    rebuilt_pool.close().await;
    rebuilt_db.drop_database().await;
    assert_eq!(rebuilt, statuses(&env.pool).await);
    assert_eq!(rebuilt_ends, ends(&env.pool).await);
    assert_eq!(rebuilt_cancels, cancels(&env.pool).await);
}

/// Every campaign's early end, to the millisecond (the log's precision).
async fn ends(pool: &sqlx::PgPool) -> Vec<(String, Option<i64>)> {
    sqlx::query_as(
        "SELECT batch_id::text, floor(extract(epoch FROM ended_at) * 1000)::bigint
           FROM campaigns ORDER BY batch_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Every cancelled order's cancellation.
async fn cancels(pool: &sqlx::PgPool) -> Vec<(String, String, String, String, i64)> {
    sqlx::query_as(
        "SELECT order_id, cancelled_to, cancel_request_id, cancel_event_id::text,
                floor(extract(epoch FROM cancelled_at) * 1000)::bigint
           FROM purchase_decisions WHERE cancelled_at IS NOT NULL ORDER BY order_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_end_expires_the_pool_and_a_hold_taken_before_ends_expired() {
    let env = TestEnv::new().await;
    let app = env
        .start(&ALL, |c| {
            c.policy.hold_ttl = Duration::from_secs(4);
            c.policy.hold_grace = Duration::ZERO;
        })
        .await;
    let id = release_campaign(
        &env,
        &app,
        "Ends",
        5,
        Utc::now() + chrono::Duration::hours(1),
    )
    .await;
    let (status, held) = claim(&app, "holder", "Ends").await;
    assert_eq!(status, 200, "{held}");
    let held_code = held["coupon_code"].as_str().unwrap().to_owned();

    // Bad ids and callers are refused; nothing ends.
    let (status, body) = end_campaign(&app, &id, None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = end_campaign(&app, "not-a-uuid", Some("admin-secret")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let unknown = uuid::Uuid::new_v4().to_string();
    let (status, body) = end_campaign(&app, &unknown, Some("admin-secret")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("unknown_campaign"))
    );
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(count_in(&env, "Ends", "available").await, 4);

    // The end, and its repeat: the same answer.
    let (status, ended) = end_campaign(&app, &id, Some("admin-secret")).await;
    assert_eq!(status, 200, "{ended}");
    assert_eq!(ended["status"], "ended");
    assert_eq!(ended["campaign_id"], id.as_str());
    assert_eq!(ended["ended_by"], "admin-token");
    let (status, again) = end_campaign(&app, &id, Some("admin-secret")).await;
    assert_eq!((status, &again), (200, &ended));

    // From the end on, nothing of the campaign is granted.
    let (status, body) = claim(&app, "late", "Ends").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("sold_out")),
        "{body}"
    );

    // Its available coupons leave the pool as `expired`, each with an event
    // and a history row; the hold keeps its deadline.
    eventually("the pool expired", Duration::from_secs(30), || async {
        count_in(&env, "Ends", "expired").await == 4
    })
    .await;
    assert_eq!(status_of(&env, &held_code).await, "held");
    assert_invariants(&env, 5).await;
    let expired_events = events_on(
        &env,
        &env.topics.expirations(),
        TopicKind::Expirations,
        |e| matches!(e, TopicEvent::CouponExpired(_)),
    )
    .await;
    assert_eq!(expired_events.len(), 4);
    // The early end itself is on the log once (for the rebuild), by whom.
    let ends_on_log = events_on(
        &env,
        &env.topics.expirations(),
        TopicKind::Expirations,
        |e| matches!(e, TopicEvent::CampaignEnded(c) if c.ended_by == "admin-token"),
    )
    .await;
    assert_eq!(ends_on_log.len(), 1);
    assert_eq!(
        env.count("SELECT count(*) FROM coupon_history WHERE kind = 'expired'")
            .await,
        4
    );

    // The hold ends unbought after the end: its coupon expires too, with
    // its holder in the history row.
    eventually(
        "the hold ended in expired",
        Duration::from_secs(30),
        || async { status_of(&env, &held_code).await == "expired" },
    )
    .await;
    let holder_row: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM coupon_history
          WHERE kind = 'expired' AND coupon_code = $1 AND user_id = 'holder'",
    )
    .bind(&held_code)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(holder_row, 1);
    assert_eq!(count_in(&env, "Ends", "expired").await, 5);
    assert_eq!(count_in(&env, "Ends", "available").await, 0);
    assert_invariants(&env, 5).await;
    // The console's campaigns page: ended, its pool expired, its funnel.
    env.wait_every_role_caught_up(Duration::from_secs(60)).await;
    let listed = campaigns(&app, "").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        json!([
            listed[0]["phase"],
            listed[0]["coupons"],
            listed[0]["funnel"]
        ]),
        json!(["ended",
               {"issued": 5, "available": 0, "held": 0, "redeemed": 0, "expired": 5},
               {"claimed": 1, "redeemed": 0, "released": 0, "cancelled": 0, "expired": 5}])
    );
    // The console's pool counts them: issued stays whole.
    let pool: Value = TestEnv::http_client()
        .get(app.url("/api/v1/pool"))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        pool["categories"][0],
        json!({"category": "Ends", "available": 0, "held": 0, "redeemed": 0, "expired": 5, "issued": 5})
    );
    // The holder's quota stays used: a second claim today is rate limited.
    let (status, body) = claim(&app, "holder", "Ends").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited")),
        "{body}"
    );

    // Redelivering every expiration changes nothing.
    env.wait_every_role_caught_up(Duration::from_secs(60)).await;
    let history = env.count("SELECT count(*) FROM coupon_history").await;
    let ctx = app::connect(&env.config()).await.unwrap();
    let all = env.read_topic(&env.topics.expirations()).await;
    coupon_consumers::expiry::handle_batch(&ctx, &all)
        .await
        .unwrap();
    assert_eq!(count_in(&env, "Ends", "expired").await, 5);
    assert_eq!(
        env.count("SELECT count(*) FROM coupon_history").await,
        history
    );
    assert_invariants(&env, 5).await;

    audit_and_rebuild_agree(&env).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_ends_at_its_valid_until_and_a_hold_taken_before_may_still_buy() {
    let env = TestEnv::new().await;
    let app = env.start(&ALL, |_| {}).await;
    let until = Utc::now() + chrono::Duration::seconds(5);
    release_campaign(&env, &app, "Natural", 3, until).await;
    let (status, held) = claim(&app, "buyer", "Natural").await;
    assert_eq!(status, 200, "{held}");
    let code = held["coupon_code"].as_str().unwrap().to_owned();
    assert!(Utc::now() < until, "the test machine was too slow");

    eventually(
        "the window's end expired the pool",
        Duration::from_secs(30),
        || async { count_in(&env, "Natural", "expired").await == 2 },
    )
    .await;
    assert!(Utc::now() >= until, "expired before the campaign's end");
    let (status, body) = claim(&app, "too-late", "Natural").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("sold_out")),
        "{body}"
    );
    // The hold taken before the end keeps its deadline: it may be bought.
    assert_eq!(status_of(&env, &code).await, "held");
    let (status, body) = purchase(&app, "buyer", &code, "natural-1").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("redeemed")),
        "{body}"
    );
    assert_invariants(&env, 3).await;
    audit_and_rebuild_agree(&env).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn couponctl_campaign_end_ends_it_once() {
    let env = TestEnv::new().await;
    let app = env.start(&ALL, |_| {}).await;
    let id = release_campaign(
        &env,
        &app,
        "Cli",
        2,
        Utc::now() + chrono::Duration::hours(1),
    )
    .await;
    let run = |args: &[&str]| env.couponctl().args(args).output().unwrap();
    let first = run(&["campaign", "end", &id, "--by", "alice"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let printed = String::from_utf8_lossy(&first.stdout).to_string();
    assert!(
        printed.contains(&id) && printed.contains("by alice"),
        "{printed}"
    );
    // A repeat answers the first end, whoever asks.
    let second = run(&["campaign", "end", &id, "--by", "bob"]);
    assert!(second.status.success());
    assert_eq!(String::from_utf8_lossy(&second.stdout), printed);
    let unknown = run(&["campaign", "end", &uuid::Uuid::new_v4().to_string()]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no campaign"));
    let bad = run(&["campaign", "end", "nope"]);
    assert!(!bad.status.success());
    eventually("the pool expired", Duration::from_secs(30), || async {
        count_in(&env, "Cli", "expired").await == 2
    })
    .await;
    assert_invariants(&env, 2).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_order_gives_its_coupon_back_or_expires_it_after_the_end() {
    let env = TestEnv::new().await;
    let app = env.start(&ALL, |_| {}).await;
    let later = Utc::now() + chrono::Duration::hours(1);
    release_campaign(&env, &app, "Back", 2, later).await;
    let gone = release_campaign(&env, &app, "Gone", 1, later).await;

    // A coupon bought, then its order cancelled: back in the pool.
    let (status, held) = claim(&app, "u1", "Back").await;
    assert_eq!(status, 200, "{held}");
    let code = held["coupon_code"].as_str().unwrap().to_owned();
    let (status, body) = purchase(&app, "u1", &code, "order-1").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("redeemed")),
        "{body}"
    );
    let (status, body) = cancel(&app, "order-1").await;
    assert_eq!((status, &body), (200, &json!({"status": "cancelled"})));
    assert_eq!(status_of(&env, &code).await, "available");
    // Idempotent: the same answer, nothing changes.
    let (status, body) = cancel(&app, "order-1").await;
    assert_eq!((status, &body), (200, &json!({"status": "cancelled"})));
    assert_eq!(status_of(&env, &code).await, "available");
    assert_eq!(count_in(&env, "Back", "available").await, 2);
    // The user's quota stays used; someone else may have the coupon.
    let (status, body) = claim(&app, "u1", "Back").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited")),
        "{body}"
    );
    let (status, body) = claim(&app, "u2", "Back").await;
    assert_eq!(status, 200, "{body}");

    // Unknown orders, and an order that redeemed nothing: 404.
    let (status, body) = cancel(&app, "no-such-order").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("unknown_order")),
        "{body}"
    );
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    let (status, body) = purchase(&app, "u9", &code, "order-refused").await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = cancel(&app, "order-refused").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("unknown_order")),
        "{body}"
    );

    // Cancelled after its campaign's end: the coupon expires instead.
    let (status, held) = claim(&app, "u3", "Gone").await;
    assert_eq!(status, 200, "{held}");
    let gone_code = held["coupon_code"].as_str().unwrap().to_owned();
    let (status, body) = purchase(&app, "u3", &gone_code, "order-3").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("redeemed")),
        "{body}"
    );
    let (status, _) = end_campaign(&app, &gone, Some("admin-secret")).await;
    assert_eq!(status, 200);
    let (status, body) = cancel(&app, "order-3").await;
    assert_eq!((status, &body), (200, &json!({"status": "cancelled"})));
    assert_eq!(status_of(&env, &gone_code).await, "expired");
    assert_invariants(&env, 3).await;

    // On the log: each cancellation request, and one fresh decision per
    // cancelled order; in the history: one `cancelled` row per order.
    let requests = events_on(&env, &env.topics.purchases(), TopicKind::Purchases, |e| {
        matches!(e, TopicEvent::PurchaseCancelled(_))
    })
    .await;
    assert_eq!(requests.len(), 3);
    let decided = events_on(
        &env,
        &env.topics.purchase_results(),
        TopicKind::PurchaseResults,
        |e| {
            matches!(e, TopicEvent::PurchaseDecided(d)
            if d.outcome == coupon_schemas::PurchaseOutcome::Cancelled as i32 && !d.repeated)
        },
    )
    .await;
    assert_eq!(decided.len(), 2);
    env.wait_every_role_caught_up(Duration::from_secs(60)).await;
    let rows: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT coupon_code, detail FROM coupon_history WHERE kind = 'cancelled' ORDER BY occurred_at",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (rows[0].0.as_str(), &rows[0].1["coupon_status"]),
        (code.as_str(), &json!("available"))
    );
    assert_eq!(
        (rows[1].0.as_str(), &rows[1].1["coupon_status"]),
        (gone_code.as_str(), &json!("expired"))
    );

    // The console's campaigns, newest first: the coupons by status now, and
    // the funnel from the history (a cancel after the end is `cancelled`
    // in the funnel, its coupon `expired` in the pool).
    let listed = campaigns(&app, "").await;
    let view = |c: &Value| {
        json!([
            c["name"],
            c["phase"],
            c["category"],
            c["coupons"],
            c["funnel"]
        ])
    };
    assert_eq!(
        listed.iter().map(view).collect::<Vec<_>>(),
        [
            json!(["Gone sale", "ended", "Gone",
                   {"issued": 1, "available": 0, "held": 0, "redeemed": 0, "expired": 1},
                   {"claimed": 1, "redeemed": 1, "released": 0, "cancelled": 1, "expired": 0}]),
            json!(["Back sale", "running", "Back",
                   {"issued": 2, "available": 1, "held": 1, "redeemed": 0, "expired": 0},
                   {"claimed": 2, "redeemed": 1, "released": 0, "cancelled": 1, "expired": 0}]),
        ]
    );
    assert_eq!(listed[0]["batch_id"], gone.as_str());
    assert_eq!(listed[0]["ended_by"], "admin-token");
    assert!(listed[1]["ended_at"].is_null());
    assert_eq!(campaigns(&app, "?limit=1").await.len(), 1);
    for bad in ["?limit=0", "?limit=501", "?limit=x"] {
        let response = TestEnv::http_client()
            .get(app.url(&format!("/api/v1/campaigns{bad}")))
            .bearer_auth("admin-secret")
            .send()
            .await
            .unwrap();
        let (status, body) = answer(response).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}: {body}"
        );
    }

    // Redelivering every purchase and cancellation changes nothing.
    let before = statuses(&env.pool).await;
    let history = env.count("SELECT count(*) FROM coupon_history").await;
    let ctx = app::connect(&env.config()).await.unwrap();
    let all = env.read_topic(&env.topics.purchases()).await;
    coupon_consumers::purchases::handle_batch(&ctx, &all)
        .await
        .unwrap();
    env.wait_every_role_caught_up(Duration::from_secs(60)).await;
    assert_eq!(statuses(&env.pool).await, before);
    assert_eq!(
        env.count("SELECT count(*) FROM coupon_history").await,
        history
    );
    assert_invariants(&env, 3).await;

    audit_and_rebuild_agree(&env).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_records_of_the_new_messages_are_dead_lettered() {
    use coupon_schemas::{new_envelope, CouponExpired, DeadLetter, Event, PurchaseCancelled};
    use prost::Message;

    let env = TestEnv::new().await;
    let app = env.start(&ALL, |_| {}).await;
    let ctx = app::connect(&env.config()).await.unwrap();
    let now = coupon_platform::time::now_ms();
    let envelope = |type_name: &str| {
        let mut e =
            new_envelope::<PurchaseCancelled>(uuid::Uuid::new_v4().to_string(), now, "foreign", "");
        e.event_type = type_name.to_owned();
        Some(e)
    };
    let record = |topic: String, offset, value: Vec<u8>| {
        crate::harness::record_at(topic, offset, "k", value, now)
    };
    // On the purchases topic: a message it does not carry, and a
    // cancellation without an order id.
    let stray = CouponExpired {
        envelope: envelope(CouponExpired::TYPE_NAME),
        coupon_code: "0AN35HST00000".into(),
        ..Default::default()
    };
    let no_order = PurchaseCancelled {
        envelope: envelope(PurchaseCancelled::TYPE_NAME),
        request_id: "foreign-cancel".into(),
        user_id: "mallory".into(),
        order_id: String::new(),
    };
    coupon_consumers::purchases::handle_batch(
        &ctx,
        &[
            record(env.topics.purchases(), 0, stray.encode_to_vec()),
            record(env.topics.purchases(), 1, no_order.encode_to_vec()),
        ],
    )
    .await
    .unwrap();
    // On the expirations topic: a coupon's expiry under another event id
    // than the coupon's own (it would add a second history row).
    let forged = CouponExpired {
        envelope: envelope(CouponExpired::TYPE_NAME),
        coupon_code: "0AN35HST00000".into(),
        batch_id: "b".into(),
        campaign_ended_at_ms: now,
    };
    coupon_consumers::expiry::handle_batch(
        &ctx,
        &[record(env.topics.expirations(), 0, forged.encode_to_vec())],
    )
    .await
    .unwrap();
    let letters: Vec<DeadLetter> = env
        .read_topic(&env.topics.dead_letter())
        .await
        .iter()
        .map(|r| DeadLetter::decode(r.value.as_deref().unwrap()).unwrap())
        .collect();
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert!(
        letters
            .iter()
            .any(|l| l.reason.contains("coupons.v1.CouponExpired")),
        "{letters:?}"
    );
    assert!(
        letters.iter().any(|l| l.reason.contains("order id")),
        "{letters:?}"
    );
    assert!(
        letters.iter().any(|l| l.reason.contains("event_id")),
        "{letters:?}"
    );
    // The invalid cancellation is answered, so a waiting requester hears.
    let answered = events_on(
        &env,
        &env.topics.purchase_results(),
        TopicKind::PurchaseResults,
        |e| {
            matches!(e, TopicEvent::PurchaseDecided(d)
            if d.request_id == "foreign-cancel"
                && d.outcome == coupon_schemas::PurchaseOutcome::Invalid as i32)
        },
    )
    .await;
    assert_eq!(answered.len(), 1);
    app.stop().await;
}

/// The sold-out cache stays true both ways: an end only takes supply away
/// (the pool is answered sold out from the gateway's mark afterwards), and
/// a cancelled order's coupon back in the pool voids the marks at once, so
/// the next claim gets it instead of a stale `sold_out`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_order_voids_the_sold_out_mark() {
    use coupon_platform::kafka::decode;
    use coupon_schemas::ClaimRequested;

    let env = TestEnv::new().await;
    // Marks that would outlive the test: only the supply signal voids them.
    let app = env
        .start(&ALL, |c| {
            c.policy.sold_out_mark_ttl = Duration::from_secs(300)
        })
        .await;
    release_campaign(
        &env,
        &app,
        "One",
        1,
        Utc::now() + chrono::Duration::hours(1),
    )
    .await;
    let (status, held) = claim(&app, "buyer", "One").await;
    assert_eq!(status, 200, "{held}");
    let code = held["coupon_code"].as_str().unwrap().to_owned();
    let (status, body) = purchase(&app, "buyer", &code, "one-order").await;
    assert_eq!(status, 200, "{body}");

    // Sold out, until the gateway answers it from the pool's mark.
    let mut n = 0;
    eventually(
        "a claim answered from the sold-out mark",
        Duration::from_secs(15),
        || {
            n += 1;
            let user = format!("early-{n}");
            let (app, env) = (&app, &env);
            async move {
                let (status, body) = claim(app, &user, "One").await;
                assert_eq!((status, body["error"].as_str()), (404, Some("sold_out")));
                env.read_topic(&env.topics.claims()).await.iter().any(|r| {
                    let claim = decode::<ClaimRequested>(r).unwrap();
                    claim.user_id == user && claim.answered_sold_out
                })
            }
        },
    )
    .await;

    // The order is cancelled: the very next claim gets the coupon.
    let (status, body) = cancel(&app, "one-order").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = claim(&app, "after-cancel", "One").await;
    assert_eq!(
        status, 200,
        "a stale sold-out mark hid the returned coupon: {body}"
    );
    assert_eq!(body["coupon_code"], code.as_str());
    assert_invariants(&env, 1).await;
    app.stop().await;
}
