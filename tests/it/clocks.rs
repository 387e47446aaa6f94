//! One clock, and no hold that blocks a claim (issue #14, items 2 and 3):
//! requests are judged at the time the broker accepted them, bounded by the
//! database's clock; holds end on the database's clock after a grace; an
//! overdue hold is released by its user's next grant.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use coupon_domain::QuotaWindow;
use coupon_platform::kafka::Publisher;
use coupon_schemas::{HoldExpired, PurchaseRequested};
use couponctl::app::Role;

use crate::harness::{assert_invariants_in, eventually, record_at as record, release, TestEnv};

async fn claim(http: &reqwest::Client, app: &crate::harness::App, user: &str) -> (u16, Value) {
    let response = http
        .get(app.url(&format!("/api/v1/coupon?id={user}")))
        .send()
        .await
        .expect("claim");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Gateway and claims only, no expiry: a user's hold runs out, the next
/// window starts, and the user claims again. Before, the grant collided with
/// the user's overdue hold (`coupons_one_hold_per_user`), the batch was
/// retried forever and no user's claim was answered from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overdue_hold_never_blocks_a_claim_without_the_expiry_role() {
    let env = TestEnv::new().await;
    let window = QuotaWindow::new(Duration::from_secs(3)).unwrap();
    let app = env
        .start(&[Role::Gateway, Role::Coupons, Role::Claims], |c| {
            c.policy.hold_ttl = Duration::from_secs(1);
            c.policy.quota_window = window;
            c.gateway.reply_timeout = Duration::from_secs(15);
        })
        .await;
    release(&env, "Overdue", 10).await;
    let http = TestEnv::http_client();

    let (status, body) = claim(&http, &app, "returning").await;
    assert_eq!(status, 200, "{body}");
    let first_code = body["coupon_code"].as_str().unwrap().to_owned();
    let expires: DateTime<Utc> = body["expires_at"].as_str().unwrap().parse().unwrap();
    // The next window, with the hold overdue and nothing to release it.
    let next_window = window.end_of(expires - chrono::Duration::seconds(1));
    let ready = next_window.max(expires) + chrono::Duration::milliseconds(200);
    eventually(
        "the hold is overdue in a new window",
        Duration::from_secs(10),
        || async { Utc::now() >= ready },
    )
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM coupons WHERE status = 'held'")
            .await,
        1,
        "nothing released the overdue hold"
    );

    let (status, body) = claim(&http, &app, "returning").await;
    assert_eq!(status, 200, "the user's next claim is granted: {body}");
    let released: (String, Value) = sqlx::query_as(
        "SELECT user_id, detail FROM coupon_history WHERE kind = 'released' AND coupon_code = $1",
    )
    .bind(&first_code)
    .fetch_one(&env.pool)
    .await
    .expect("the grant recorded the release of the overdue hold");
    assert_eq!(released.0, "returning");
    assert_eq!(released.1["released_by"], "next_grant");
    for i in 0..5 {
        let (status, body) = claim(&http, &app, &format!("bystander-{i}")).await;
        assert_eq!(status, 200, "every other user's claim is answered: {body}");
    }
    assert_eq!(
        env.count(
            "SELECT count(*) FROM claim_decisions
              WHERE user_id = 'returning' AND outcome = 'granted' AND NOT repeated"
        )
        .await,
        2
    );
    assert_invariants_in(&env, 10, window).await;
    app.stop().await;
}

/// A coupon `code` held by `user` until `held_until` (the database's clock).
async fn hold(env: &TestEnv, code: &str, user: &str, hold_id: &str, held_until: DateTime<Utc>) {
    sqlx::query(
        "UPDATE coupons SET status = 'held', holder_user_id = $2, hold_id = $3, held_until = $4
          WHERE code = $1",
    )
    .bind(code)
    .bind(user)
    .bind(hold_id)
    .bind(held_until)
    .execute(&env.pool)
    .await
    .expect("hold");
}

async fn db_now(env: &TestEnv) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(&env.pool)
        .await
        .expect("now")
}

/// Purchases are judged at the time the broker accepted them: one accepted
/// before the deadline is redeemed although its consumer gets to it after
/// the deadline, within the grace; one older than the grace is not.
/// Before, both were judged on the consumer's clock at batch time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_accepted_before_the_deadline_is_redeemed_when_decided_late() {
    let env = TestEnv::new().await;
    let projector = env.start(&[Role::Coupons], |_| {}).await;
    let codes = release(&env, "Late", 2).await;
    projector.stop().await;
    let mut config = env.config();
    config.policy.hold_grace = Duration::from_secs(5);
    let ctx = couponctl::app::connect(&config).await.unwrap();

    let now = db_now(&env).await;
    let (in_time, too_late) = (&codes[0], &codes[1]);
    let deadline = now - chrono::Duration::seconds(2);
    hold(&env, in_time, "prompt", "h-prompt", deadline).await;
    let old_deadline = now - chrono::Duration::seconds(30);
    hold(&env, too_late, "tardy", "h-tardy", old_deadline).await;

    let publisher = Publisher::new(&env.kafka, "test").unwrap();
    let purchase = |user: &str, code: &str, order: &str| {
        prost::Message::encode_to_vec(&PurchaseRequested {
            envelope: Some(publisher.envelope::<PurchaseRequested>("")),
            request_id: format!("req-{order}"),
            user_id: user.into(),
            coupon_code: code.into(),
            order_id: order.into(),
            order_total: None,
        })
    };
    let topic = env.topics.purchases();
    let batch = [
        record(
            topic.clone(),
            0,
            "prompt",
            purchase("prompt", in_time, "o-prompt"),
            (deadline - chrono::Duration::milliseconds(500)).timestamp_millis(),
        ),
        record(
            topic,
            1,
            "tardy",
            purchase("tardy", too_late, "o-tardy"),
            (old_deadline - chrono::Duration::milliseconds(500)).timestamp_millis(),
        ),
    ];
    coupon_consumers::purchases::handle_batch(&ctx, &batch)
        .await
        .unwrap();
    let outcome = |order: &'static str| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT outcome FROM purchase_decisions WHERE order_id = $1",
            )
            .bind(order)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(outcome("o-prompt").await, "redeemed");
    assert_eq!(
        outcome("o-tardy").await,
        "hold_expired",
        "an old broker time buys at most the grace"
    );
}

/// Holds end on the database's clock, a grace after their deadline, so that
/// a purchase accepted in time still finds its hold. Before, the expiry
/// released any hold past the deadline by its own host's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hold_is_released_before_its_deadline_and_grace_by_the_database_clock() {
    let env = TestEnv::new().await;
    let projector = env.start(&[Role::Coupons], |_| {}).await;
    let codes = release(&env, "Grace", 2).await;
    projector.stop().await;
    let mut config = env.config();
    config.policy.hold_grace = Duration::from_secs(5);
    let ctx = couponctl::app::connect(&config).await.unwrap();

    let now = db_now(&env).await;
    let (recent, overdue) = (&codes[0], &codes[1]);
    let recent_deadline = now - chrono::Duration::seconds(1);
    hold(&env, recent, "u-recent", "h-recent", recent_deadline).await;
    hold(
        &env,
        overdue,
        "u-overdue",
        "h-overdue",
        now - chrono::Duration::seconds(60),
    )
    .await;

    let mut announced = std::collections::HashMap::new();
    let published =
        coupon_consumers::expiry::sweep_once(&ctx, &mut announced, Duration::from_secs(60))
            .await
            .unwrap();
    assert_eq!(published, 1, "only the hold past its grace is announced");

    let publisher = Publisher::new(&env.kafka, "test").unwrap();
    let expired = |code: &str, hold_id: &str, deadline: DateTime<Utc>| {
        prost::Message::encode_to_vec(&HoldExpired {
            envelope: Some(publisher.envelope::<HoldExpired>(hold_id)),
            coupon_code: code.into(),
            user_id: String::new(),
            hold_id: hold_id.into(),
            held_until_ms: deadline.timestamp_millis(),
            campaign_ended_at_ms: 0,
        })
    };
    let topic = env.topics.expirations();
    let batch = [
        record(
            topic.clone(),
            0,
            recent,
            expired(recent, "h-recent", recent_deadline),
            Utc::now().timestamp_millis(),
        ),
        record(
            topic,
            1,
            overdue,
            expired(overdue, "h-overdue", now),
            Utc::now().timestamp_millis(),
        ),
    ];
    coupon_consumers::expiry::handle_batch(&ctx, &batch)
        .await
        .unwrap();
    let status = |code: String| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT status FROM coupons WHERE code = $1")
                .bind(code)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        status(recent.clone()).await,
        "held",
        "still within its grace"
    );
    assert_eq!(status(overdue.clone()).await, "available");
}

/// The request topics are stamped by the broker: a producer that sets an old
/// timestamp on a claim or a purchase (to buy after the deadline, say) does
/// not get it judged at that time. Before, topics kept the producer's
/// `CreateTime`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_cannot_set_the_time_a_request_is_judged_at() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let env = TestEnv::new().await;
    let producer: FutureProducer = env
        .kafka
        .client_config()
        .set("partitioner", coupon_platform::kafka::producer::PARTITIONER)
        .create()
        .unwrap();
    let forged = (Utc::now() - chrono::Duration::hours(1)).timestamp_millis();
    let before = Utc::now().timestamp_millis();
    for topic in [env.topics.claims(), env.topics.purchases()] {
        producer
            .send(
                FutureRecord::to(&topic)
                    .key("forger")
                    .payload("a request")
                    .timestamp(forged),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(error, _)| error)
            .unwrap();
        let records = env.read_topic(&topic).await;
        assert_eq!(records.len(), 1);
        let stamped = records[0].timestamp_ms.unwrap();
        assert!(
            stamped >= before - 1_000,
            "{topic}: the broker's time, not the producer's ({stamped} vs forged {forged})"
        );
    }
}
