//! Campaigns (issue #28, first slice): a batch released as a campaign is
//! stored once per batch, its coupons are claimable only inside its window,
//! the claim and status answers show its terms, and purchases apply them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use coupon_consumers::coupons;
use coupon_platform::kafka::decode;
use coupon_schemas::{ClaimRequested, CouponsCreated, PurchaseDecided, PurchaseRequested};
use couponctl::app::{self, Role};

use crate::harness::{assert_invariants, eventually, App, TestEnv};

const ALL: [Role; 7] = Role::ALL;

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// POSTs a release body (with `key` as its `Idempotency-Key`).
async fn post_release(app: &App, body: &Value, key: Option<&str>) -> (u16, Value) {
    let mut request = TestEnv::http_client()
        .post(app.url("/api/v1/coupon"))
        .bearer_auth("admin-secret")
        .json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn get(app: &App, path: &str) -> (u16, Value) {
    let response = TestEnv::http_client()
        .get(app.url(path))
        .send()
        .await
        .unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn claim(app: &App, user: &str, category: &str) -> (u16, Value) {
    get(
        app,
        &format!("/api/v1/coupon?id={user}&category={category}"),
    )
    .await
}

async fn purchase(app: &App, body: Value) -> (u16, Value) {
    let response = TestEnv::http_client()
        .post(app.url("/api/v1/purchase"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn wait_projected(env: &TestEnv, category: &str, count: i64) {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_is_stored_once_per_batch_and_shown_in_claims_and_status() {
    let env = TestEnv::new().await;
    let app = env.start(&ALL, |_| {}).await;
    let until = Utc::now() + chrono::Duration::hours(1);
    let body = json!({
        "id": "e1", "category": "Winter", "count": 2500,
        "campaign": "Winter sale",
        "discount": {"percent_off": 15},
        "min_order": {"amount": 5000, "currency": "EUR"},
        "valid_until": rfc3339(until),
        "locations": ["DE", "AT"],
        "min_age": 18,
    });
    let (status, batch) = post_release(&app, &body, Some("winter-1")).await;
    assert_eq!(status, 202, "{batch}");
    let batch_id = batch["batch_id"].as_str().unwrap().to_owned();
    wait_projected(&env, "Winter", 2500).await;

    // Once per batch, not per coupon.
    assert_eq!(env.count("SELECT count(*) FROM campaigns").await, 1);
    let row: (String, i16, i64, String, DateTime<Utc>, Vec<String>, i32) = sqlx::query_as(
        "SELECT name, percent_off, min_order_amount, min_order_currency, valid_until, locations,
                min_age FROM campaigns WHERE batch_id = $1::uuid",
    )
    .bind(&batch_id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(row.0, "Winter sale");
    assert_eq!((row.1, row.2, row.3.as_str()), (15, 5000, "EUR"));
    assert_eq!(row.4.timestamp_millis(), until.timestamp_millis());
    assert_eq!(row.5, ["DE", "AT"]);
    assert_eq!(row.6, 18);
    // Every chunk on the log carries the campaign.
    let chunks = env.read_topic(&env.topics.created()).await;
    assert_eq!(chunks.len(), 3);
    for record in &chunks {
        let event = decode::<CouponsCreated>(record).unwrap();
        let campaign = event.campaign.expect("the chunk carries its campaign");
        assert_eq!(
            (campaign.name.as_str(), campaign.percent_off),
            ("Winter sale", 15)
        );
        assert_eq!(campaign.valid_until_ms, until.timestamp_millis());
    }

    // The claim answer and the status route show the terms (to an eligible
    // user: the campaign is for adults in Germany and Austria).
    let (status, refused) = claim(&app, "ann", "Winter").await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (404, Some("sold_out")),
        "no profile yet"
    );
    crate::profiles::set_profile(&env, &app, "ann", "1990-04-01", "AT").await;
    let (status, granted) = claim(&app, "ann", "Winter").await;
    assert_eq!(status, 200, "{granted}");
    assert_eq!(granted["campaign"], "Winter sale");
    assert_eq!(granted["discount"], json!({"percent_off": 15}));
    assert_eq!(
        granted["min_order"],
        json!({"amount": 5000, "currency": "EUR"})
    );
    assert_eq!(granted["valid_until"], rfc3339(until));
    let code = granted["coupon_code"].as_str().unwrap();
    let (status, shown) = get(&app, &format!("/api/v1/coupon/{code}")).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["campaign"], "Winter sale");
    assert_eq!(shown["discount"], json!({"percent_off": 15}));
    assert_eq!(shown["min_order"]["amount"], 5000);
    assert_eq!(shown["valid_from"], Value::Null);
    assert_eq!(shown["valid_until"], rfc3339(until));
    assert_eq!(shown["locations"], json!(["DE", "AT"]));
    assert_eq!(shown["min_age"], 18);

    // A repeat with the key and the body answers the batch; the key with
    // another campaign is refused; neither mints.
    let (status, again) = post_release(&app, &body, Some("winter-1")).await;
    assert_eq!(
        (status, again["batch_id"].as_str()),
        (202, Some(&*batch_id))
    );
    let mut other = body.clone();
    other["discount"] = json!({"percent_off": 20});
    let (status, refused) = post_release(&app, &other, Some("winter-1")).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{refused}"
    );
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("with a campaign"),
        "{refused}"
    );

    // Redelivering the batch's chunks adds nothing.
    let ctx = app::connect(&env.config()).await.unwrap();
    coupons::handle_batch(&ctx, &chunks).await.unwrap();
    coupons::handle_batch(&ctx, &chunks).await.unwrap();
    assert_eq!(env.count("SELECT count(*) FROM campaigns").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM coupons").await, 2500);
    assert_eq!(
        env.read_topic(&env.topics.created()).await.len(),
        3,
        "the repeat published nothing"
    );
    assert_invariants(&env, 2500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_in_the_future_is_sold_out_until_it_opens_and_ends_at_its_end() {
    let env = TestEnv::new().await;
    // Sold-out marks that would outlive the test: only their cap at the
    // campaign's opening (`coupon_domain::sold_out::mark_ttl`) lets the
    // gateway see the coupons in time.
    let app = env
        .start(&ALL, |c| {
            c.policy.sold_out_mark_ttl = Duration::from_secs(300)
        })
        .await;
    let opens = Utc::now() + chrono::Duration::seconds(8);
    let (status, _) = post_release(
        &app,
        &json!({"id": "e1", "category": "Later", "count": 2,
                "valid_from": rfc3339(opens), "valid_until": rfc3339(opens + chrono::Duration::hours(1))}),
        None,
    )
    .await;
    assert_eq!(status, 202);
    let closes = Utc::now() + chrono::Duration::seconds(6);
    let (status, _) = post_release(
        &app,
        &json!({"id": "e1", "category": "Ending", "count": 2, "valid_until": rfc3339(closes)}),
        None,
    )
    .await;
    assert_eq!(status, 202);
    wait_projected(&env, "Later", 2).await;
    wait_projected(&env, "Ending", 2).await;

    // Before it opens: not allocated; soon answered from the pool's
    // sold-out mark by the gateway itself.
    let mut n = 0;
    eventually(
        "a claim of the unopened campaign answered from the sold-out mark",
        Duration::from_secs(5),
        || {
            n += 1;
            let user = format!("early-{n}");
            let (app, env) = (&app, &env);
            async move {
                let (status, body) = claim(app, &user, "Later").await;
                assert_eq!((status, body["error"].as_str()), (404, Some("sold_out")));
                env.read_topic(&env.topics.claims()).await.iter().any(|r| {
                    let claim = decode::<ClaimRequested>(r).unwrap();
                    claim.category == "Later" && claim.answered_sold_out
                })
            }
        },
    )
    .await;
    let (status, body) = claim(&app, "early-ending", "Ending").await;
    assert_eq!(status, 200, "the open campaign's coupon: {body}");
    assert!(
        Utc::now() < opens,
        "the test machine was too slow to see the window closed"
    );

    // Once it opens, claimable at once: the mark did not outlive the opening.
    let mut n = 0;
    eventually(
        "the campaign's coupon is granted once its window opens",
        Duration::from_secs(30),
        || {
            n += 1;
            let user = format!("on-time-{n}");
            let app = &app;
            async move {
                let before = Utc::now();
                let (status, body) = claim(app, &user, "Later").await;
                if status == 200 {
                    assert!(
                        before + chrono::Duration::milliseconds(500) >= opens,
                        "granted at {before} before the window opened at {opens}"
                    );
                    return true;
                }
                assert_eq!(body["error"], "sold_out", "{body}");
                assert!(
                    before < opens + chrono::Duration::seconds(5),
                    "still sold out 5 s after the window opened"
                );
                false
            }
        },
    )
    .await;

    // Past its end, the other campaign's last coupon is no longer given.
    eventually(
        "the other campaign's end has passed",
        Duration::from_secs(30),
        || async { Utc::now() > closes },
    )
    .await;
    let (status, body) = claim(&app, "late-1", "Ending").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("sold_out")));
    // Its last coupon leaves the pool as `expired` (issue #28 item 3).
    eventually(
        "the ended campaign's available coupon expired",
        Duration::from_secs(30),
        || async {
            env.count(
                "SELECT count(*) FROM coupons WHERE category = 'Ending' AND status = 'expired'",
            )
            .await
                == 1
        },
    )
    .await;
    assert_invariants(&env, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_campaign_fields_and_unknown_fields_are_refused_and_mint_nothing() {
    let env = TestEnv::new().await;
    let app = env.start(&ALL, |_| {}).await;
    let base = json!({"id": "e1", "category": "Bad", "count": 5});
    let with = |field: &str, value: Value| {
        let mut body = base.clone();
        body[field] = value;
        body
    };
    let past = rfc3339(Utc::now() - chrono::Duration::hours(1));
    let future = rfc3339(Utc::now() + chrono::Duration::hours(1));
    let cases = [
        (
            with("discount", json!({"percent_off": 0})),
            422,
            "invalid_campaign",
            "percent_off",
        ),
        (
            with("discount", json!({"percent_off": 101})),
            422,
            "invalid_campaign",
            "percent_off",
        ),
        (
            with("discount", json!({"amount_off": 500, "currency": "EURO"})),
            422,
            "invalid_campaign",
            "ISO 4217",
        ),
        (
            with("discount", json!({"amount_off": 0, "currency": "EUR"})),
            422,
            "invalid_campaign",
            "amount_off",
        ),
        (
            with("discount", json!({"amount_off": 500})),
            422,
            "invalid_campaign",
            "currency",
        ),
        (
            with(
                "discount",
                json!({"percent_off": 5, "amount_off": 5, "currency": "EUR"}),
            ),
            422,
            "invalid_campaign",
            "not both",
        ),
        (
            with("min_order", json!({"amount": 100, "currency": "XYZ"})),
            422,
            "invalid_campaign",
            "ISO 4217",
        ),
        (
            with("min_order", json!({"amount": -1, "currency": "EUR"})),
            422,
            "invalid_campaign",
            "min_order",
        ),
        (
            with("min_age", json!(0)),
            422,
            "invalid_campaign",
            "min_age",
        ),
        (
            with("min_age", json!(300)),
            422,
            "invalid_campaign",
            "min_age",
        ),
        (
            with("valid_until", json!(past)),
            422,
            "invalid_campaign",
            "has passed",
        ),
        (
            with("valid_until", json!("next week")),
            400,
            "invalid_request",
            "valid_until",
        ),
        (
            with("campaign", json!("")),
            422,
            "invalid_campaign",
            "campaign",
        ),
        (
            with("locations", json!(vec!["X"; 33])),
            422,
            "invalid_campaign",
            "locations",
        ),
        (
            with("valid_til", json!(future)),
            400,
            "invalid_request",
            "unknown field `valid_til`",
        ),
        (
            with("discount", json!({"percent": 10})),
            400,
            "invalid_request",
            "unknown field `percent`",
        ),
    ];
    let mut window = base.clone();
    window["valid_from"] = json!(future);
    window["valid_until"] = json!(rfc3339(Utc::now() + chrono::Duration::minutes(30)));
    for (body, status, code, says) in
        cases
            .into_iter()
            .chain([(window, 422, "invalid_campaign", "after valid_from")])
    {
        let (got, answer) = post_release(&app, &body, Some("bad-1")).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }

    // An unknown field on a purchase is refused too, named.
    let (status, answer) = purchase(
        &app,
        json!({"user_id": "u", "coupon_code": "0AN35HST00000", "order_id": "o", "coupon": "x"}),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_request"))
    );
    assert!(answer["message"]
        .as_str()
        .unwrap()
        .contains("unknown field `coupon`"));
    let (status, answer) = purchase(
        &app,
        json!({"user_id": "u", "coupon_code": "0AN35HST00000", "order_id": "o",
               "order_total": {"amount": 100, "currency": "eur"}}),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_request")),
        "{answer}"
    );

    // And on the console's blacklist body.
    let response = TestEnv::http_client()
        .post(app.url("/api/v1/blacklist"))
        .bearer_auth("admin-secret")
        .json(&json!({"user_id": "u", "reason": "r", "for_hours": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `for_hours`"),
        "{answer}"
    );

    // The CLI refuses the same, before anything is generated.
    let output = env
        .couponctl()
        .args([
            "issue",
            "--employee",
            "e1",
            "--category",
            "Bad",
            "--count",
            "5",
        ])
        .args(["--percent-off", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("percent_off"), "{stderr}");

    // Nothing was half-created: no row, no stored release, no event.
    assert_eq!(env.count("SELECT count(*) FROM releases").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM campaigns").await, 0);
    assert!(env.read_topic(&env.topics.created()).await.is_empty());
    // The key was never used: a valid body with it releases.
    let (status, _) = post_release(&app, &base, Some("bad-1")).await;
    assert_eq!(status, 202);
    wait_projected(&env, "Bad", 5).await;
    assert_eq!(env.count("SELECT count(*) FROM coupons").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_meet_the_minimum_in_the_currency_and_get_the_discount() {
    let env = TestEnv::new().await;
    let app = env.start(&ALL, |_| {}).await;
    for body in [
        json!({"id": "e1", "category": "Pct", "count": 2, "campaign": "Fifteen",
               "discount": {"percent_off": 15}, "min_order": {"amount": 5000, "currency": "EUR"}}),
        json!({"id": "e1", "category": "Amt", "count": 2,
               "discount": {"amount_off": 1000, "currency": "EUR"}}),
        json!({"id": "e1", "category": "Ten", "count": 1, "discount": {"percent_off": 10}}),
    ] {
        let (status, answer) = post_release(&app, &body, None).await;
        assert_eq!(status, 202, "{answer}");
    }
    wait_projected(&env, "Pct", 2).await;
    wait_projected(&env, "Amt", 2).await;
    wait_projected(&env, "Ten", 1).await;
    let code_for = |user: &'static str, category: &'static str| {
        let app = &app;
        async move {
            let (status, body) = claim(app, user, category).await;
            assert_eq!(status, 200, "{body}");
            body["coupon_code"].as_str().unwrap().to_owned()
        }
    };
    let buy = |user: &str, code: &str, order: &str, total: Option<(i64, &str)>| {
        let mut body = json!({"user_id": user, "coupon_code": code, "order_id": order});
        if let Some((amount, currency)) = total {
            body["order_total"] = json!({"amount": amount, "currency": currency});
        }
        purchase(&app, body)
    };

    let pct = code_for("ann", "Pct").await;
    let refusals = [
        ("o-none", None, 409, "order_below_minimum"),
        ("o-low", Some((4999, "EUR")), 409, "order_below_minimum"),
        ("o-usd", Some((9000, "USD")), 409, "currency_mismatch"),
    ];
    for (order, total, status, code) in refusals {
        let (got, answer) = buy("ann", &pct, order, total).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(code)),
            "{order}: {answer}"
        );
    }
    // 15% of 50.33 EUR is 7.5495 EUR: 754 cents, rounded down.
    let (status, answer) = buy("ann", &pct, "o-ok", Some((5033, "EUR"))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["discount_amount"],
        json!({"amount": 754, "currency": "EUR"})
    );
    let (status, again) = buy("ann", &pct, "o-ok", Some((5033, "EUR"))).await;
    assert_eq!(status, 200);
    assert_eq!(
        again["discount_amount"], answer["discount_amount"],
        "a repeat answers the same"
    );
    let (status, again) = buy("ann", &pct, "o-low", Some((4999, "EUR"))).await;
    assert_eq!(
        (status, again["error"].as_str()),
        (409, Some("order_below_minimum"))
    );

    // A fixed amount is capped at the order total; without a total it is whole.
    let amt = code_for("bob", "Amt").await;
    let (status, answer) = buy("bob", &amt, "o-b", Some((600, "EUR"))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["discount_amount"],
        json!({"amount": 600, "currency": "EUR"})
    );
    let amt = code_for("cid", "Amt").await;
    let (status, answer) = buy("cid", &amt, "o-c", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["discount_amount"],
        json!({"amount": 1000, "currency": "EUR"})
    );

    // A percent needs the order total.
    let ten = code_for("dee", "Ten").await;
    let (status, answer) = buy("dee", &ten, "o-d", None).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("order_total_required"))
    );
    let (status, answer) = buy("dee", &ten, "o-d2", Some((999, "JPY"))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["discount_amount"],
        json!({"amount": 99, "currency": "JPY"})
    );

    // The events carry the order total and the discount.
    let requests = env.read_topic(&env.topics.purchases()).await;
    let ok = requests
        .iter()
        .map(|r| decode::<PurchaseRequested>(r).unwrap())
        .find(|p| p.order_id == "o-ok")
        .unwrap();
    assert_eq!(ok.order_total.unwrap().amount, 5033);
    let decided: Vec<PurchaseDecided> = env
        .read_topic(&env.topics.purchase_results())
        .await
        .iter()
        .map(|r| decode::<PurchaseDecided>(r).unwrap())
        .collect();
    let first = decided.iter().find(|d| d.order_id == "o-ok").unwrap();
    assert_eq!(first.discount_amount.as_ref().unwrap().amount, 754);
    assert_eq!(first.order_total.as_ref().unwrap().currency, "EUR");
    assert_eq!(
        env.count("SELECT count(*) FROM coupons WHERE status = 'redeemed'")
            .await,
        4
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM purchase_decisions WHERE order_id = 'o-ok'
               AND order_total_amount = 5033 AND discount_amount = 754"
        )
        .await,
        1
    );

    // Redelivered purchases change nothing, and the audit agrees with the log.
    let ctx = app::connect(&env.config()).await.unwrap();
    coupon_consumers::purchases::handle_batch(&ctx, &requests)
        .await
        .unwrap();
    assert_eq!(
        env.count("SELECT count(*) FROM coupons WHERE status = 'redeemed'")
            .await,
        4
    );
    assert_invariants(&env, 5).await;
    env.wait_every_role_caught_up(Duration::from_secs(30)).await;
    let audit = env.couponctl().arg("audit").output().unwrap();
    assert!(
        audit.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );

    // The log rebuilt into a fresh database has the same campaigns.
    let rebuilt_db = env.rebuild_into("rb").await;
    let terms = "SELECT batch_id::text, name, percent_off, amount_off, min_order_amount
                 FROM campaigns ORDER BY batch_id";
    type Terms = (
        String,
        Option<String>,
        Option<i16>,
        Option<i64>,
        Option<i64>,
    );
    let live: Vec<Terms> = sqlx::query_as(terms).fetch_all(&env.pool).await.unwrap();
    let rebuilt_pool = rebuilt_db.connect(1).await;
    let rebuilt: Vec<Terms> = sqlx::query_as(terms)
        .fetch_all(&rebuilt_pool)
        .await
        .unwrap();
    rebuilt_pool.close().await;
    rebuilt_db.drop_database().await;
    assert_eq!(live.len(), 3);
    assert_eq!(rebuilt, live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn couponctl_issue_releases_a_campaign() {
    let env = TestEnv::new().await;
    let app = env.start(&[Role::Coupons], |_| {}).await;
    let until = rfc3339(Utc::now() + chrono::Duration::days(30));
    let output = env
        .couponctl()
        .args([
            "issue",
            "--employee",
            "e1",
            "--category",
            "Cli",
            "--count",
            "1500",
        ])
        .args([
            "--campaign",
            "Spring",
            "--amount-off",
            "500",
            "--currency",
            "EUR",
        ])
        .args(["--min-order", "2000", "--valid-until", &until])
        .args(["--location", "FR", "--location", "BE", "--min-age", "21"])
        .args(["--idempotency-key", "spring-1"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    wait_projected(&env, "Cli", 1500).await;
    let row: (String, i64, String, i64, Vec<String>, i32) = sqlx::query_as(
        "SELECT name, amount_off, amount_currency, min_order_amount, locations, min_age
         FROM campaigns",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            "Spring".into(),
            500,
            "EUR".into(),
            2000,
            vec!["FR".into(), "BE".into()],
            21
        )
    );
    // Run again with the key and another campaign: refused, nothing minted.
    let output = env
        .couponctl()
        .args([
            "issue",
            "--employee",
            "e1",
            "--category",
            "Cli",
            "--count",
            "1500",
        ])
        .args(["--campaign", "Autumn", "--idempotency-key", "spring-1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("already used"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(env.count("SELECT count(*) FROM coupons").await, 1500);
    assert_eq!(env.count("SELECT count(*) FROM campaigns").await, 1);
    app.stop().await;
}

/// The race at a campaign's opening: a claim sent just before it, decided
/// just after, finds the pool empty; its mark must not hide the coupons
/// that are now claimable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sold_out_mark_outlives_an_opening_after_the_pool_was_judged() {
    use coupon_domain::campaign::CampaignFields;
    use coupon_domain::sold_out::mark_ttl;
    use coupon_platform::store::campaigns::{insert, until_next_opening};

    let env = TestEnv::new().await;
    let max = Duration::from_secs(10);
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let opening = |at| {
        coupon_domain::Campaign::from_stored(CampaignFields {
            valid_from: Some(at),
            ..CampaignFields::default()
        })
        .unwrap()
    };
    assert_eq!(until_next_opening(&env.pool, None).await.unwrap(), None);
    let mut conn = env.pool.acquire().await.unwrap();
    insert(
        &mut conn,
        uuid::Uuid::new_v4(),
        &opening(now + chrono::Duration::hours(1)),
    )
    .await
    .unwrap();
    let later = until_next_opening(&env.pool, None).await.unwrap();
    assert_eq!(mark_ttl(max, later), Some(max), "an opening in an hour");
    insert(
        &mut conn,
        uuid::Uuid::new_v4(),
        &opening(now - chrono::Duration::seconds(1)),
    )
    .await
    .unwrap();
    // Judged empty 5 s ago: the campaign that opened 1 s ago is supply now.
    let judged = now - chrono::Duration::seconds(5);
    let since = until_next_opening(&env.pool, Some(judged)).await.unwrap();
    assert!(
        since.is_some_and(|left| left <= chrono::Duration::zero()),
        "{since:?}"
    );
    assert_eq!(mark_ttl(max, since), None, "no mark");
    // Judged now, only the opening in an hour is still to come.
    let left = until_next_opening(&env.pool, None).await.unwrap().unwrap();
    assert!(left > chrono::Duration::minutes(59), "{left:?}");
}
