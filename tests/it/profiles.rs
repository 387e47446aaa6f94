//! Profiles, eligibility and the shop's day (issue #28 items 6, 2 and 7):
//! `PUT /api/v1/users/{id}` and `UserProfileUpdated` events published
//! straight onto `<prefix>.users` are projected into `users` (the later
//! profile wins, a redelivery changes nothing, bad input is refused or
//! dead-lettered); a campaign with locations or a minimum age is granted
//! only to users whose profile passes, without its refusals marking the
//! pool sold out for the others; and with `QUOTA_TZ` the quota day is the
//! zone's calendar day, `Retry-After` its next midnight.

use std::time::Duration;

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, TimeZone, Utc};
use serde_json::{json, Value};

use coupon_domain::{QuotaWindow, Tz};
use coupon_platform::kafka::{decode, Publisher};
use coupon_schemas::{DeadLetter, UserProfileUpdated};
use couponctl::app::{self, Role};

use crate::harness::{assert_invariants, assert_invariants_in, eventually, App, TestEnv};

const ALL: [Role; 7] = Role::ALL;

/// PUTs a profile body for `user`: the status and the JSON answer.
pub async fn put_profile(app: &App, user: &str, body: &Value) -> (u16, Value) {
    let response = TestEnv::http_client()
        .put(app.url(&format!("/api/v1/users/{user}")))
        .json(body)
        .send()
        .await
        .unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

/// The stored (name, dob, location) of `user`, if it has a profile.
async fn stored(
    env: &TestEnv,
    user: &str,
) -> Option<(Option<String>, Option<NaiveDate>, Option<String>)> {
    sqlx::query_as(
        "SELECT name, dob, location FROM users WHERE user_id = $1 AND profile_updated_at IS NOT NULL",
    )
    .bind(user)
    .fetch_optional(&env.pool)
    .await
    .unwrap()
}

/// PUTs a profile and waits until it is projected.
pub async fn set_profile(env: &TestEnv, app: &App, user: &str, dob: &str, location: &str) {
    let (status, body) = put_profile(
        app,
        user,
        &json!({"name": user, "dob": dob, "location": location}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let want = (
        Some(location.to_owned()),
        Some(dob.parse::<NaiveDate>().unwrap()),
    );
    eventually(
        &format!("{user}'s profile is projected"),
        Duration::from_secs(30),
        || async {
            stored(env, user)
                .await
                .is_some_and(|(_, dob, location)| (location, dob) == want)
        },
    )
    .await;
}

async fn claim(app: &App, user: &str, category: Option<&str>) -> (u16, Value, Option<String>) {
    let path = match category {
        Some(c) => format!("/api/v1/coupon?id={user}&category={c}"),
        None => format!("/api/v1/coupon?id={user}"),
    };
    let response = TestEnv::http_client()
        .get(app.url(&path))
        .send()
        .await
        .unwrap();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
        retry_after,
    )
}

async fn post_release(app: &App, body: &Value) {
    let response = TestEnv::http_client()
        .post(app.url("/api/v1/coupon"))
        .bearer_auth("admin-secret")
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    assert_eq!(status, 202, "{}", response.text().await.unwrap_or_default());
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

fn profile_event(
    publisher: &Publisher,
    user: &str,
    location: &str,
    dob: &str,
    updated_ms: i64,
) -> UserProfileUpdated {
    UserProfileUpdated {
        envelope: Some(publisher.envelope::<UserProfileUpdated>("")),
        user_id: user.into(),
        name: format!("{user} direct"),
        dob: dob.into(),
        location: location.into(),
        updated_at_ms: updated_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_projected_from_the_route_and_the_topic_and_the_latest_wins() {
    let env = TestEnv::new().await;
    let app = env.start(&[Role::Gateway, Role::Profiles], |_| {}).await;

    // Through the route: 202, then projected.
    let (status, body) = put_profile(
        &app,
        "ann",
        &json!({"name": "Ann", "dob": "1990-04-01", "location": "DE"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (body["user_id"].as_str(), body["status"].as_str()),
        (Some("ann"), Some("accepted"))
    );
    eventually(
        "ann's profile is projected",
        Duration::from_secs(30),
        || async {
            stored(&env, "ann").await
                == Some((
                    Some("Ann".into()),
                    Some("1990-04-01".parse().unwrap()),
                    Some("DE".into()),
                ))
        },
    )
    .await;

    // Bad bodies: refused by field, nothing published.
    let with = |field: &str, value: Value| {
        let mut body = json!({"name": "Ann", "dob": "1990-04-01", "location": "DE"});
        body[field] = value;
        body
    };
    let cases = [
        (with("age", json!(30)), 400, "invalid_request", "age"),
        (
            json!({"name": "Ann", "location": "DE"}),
            400,
            "invalid_request",
            "dob",
        ),
        (
            with("dob", json!("01.04.1990")),
            400,
            "invalid_request",
            "dob",
        ),
        (with("dob", json!(19900401)), 400, "invalid_request", "dob"),
        (
            with("dob", json!("2999-01-01")),
            422,
            "invalid_profile",
            "dob",
        ),
        (
            with("dob", json!("1850-01-01")),
            422,
            "invalid_profile",
            "dob",
        ),
        (
            with("name", json!("x".repeat(201))),
            422,
            "invalid_profile",
            "name",
        ),
        (
            with("location", json!(" DE")),
            422,
            "invalid_profile",
            "location",
        ),
    ];
    for (body, status, code, field) in cases {
        let (got, answer) = put_profile(&app, "ann", &body).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
        assert!(
            answer["message"].as_str().unwrap().contains(field),
            "{body}: {answer}"
        );
    }
    let response = TestEnv::http_client()
        .put(app.url("/api/v1/users/ann"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let refused: Value = response.json().await.unwrap();
    assert_eq!(refused["error"], "invalid_request");
    assert_eq!(
        env.read_topic(&env.topics.users()).await.len(),
        1,
        "only the valid PUT was published"
    );

    // Straight onto the topic: an older profile of ann changes nothing, a
    // newer one of bob is projected; an invalid one and garbage are
    // dead-lettered, and the processor keeps going.
    let publisher = Publisher::new(&env.kafka, "storefront-direct").unwrap();
    let topic = env.topics.users();
    let now_ms = Utc::now().timestamp_millis();
    let older = profile_event(&publisher, "ann", "FR", "1980-01-01", now_ms - 3_600_000);
    publisher.send(&topic, "ann", &older).await.unwrap();
    let bob = profile_event(&publisher, "bob", "AT", "2001-02-03", now_ms);
    publisher.send(&topic, "bob", &bob).await.unwrap();
    let future = profile_event(&publisher, "eve", "AT", "2999-01-01", now_ms);
    publisher.send(&topic, "eve", &future).await.unwrap();
    publisher
        .send_bytes(&topic, Some(b"mallory"), b"\xff\xff not protobuf")
        .await
        .unwrap();
    let after = profile_event(&publisher, "carl", "CH", "", now_ms);
    publisher.send(&topic, "carl", &after).await.unwrap();
    eventually(
        "carl's profile (after the bad records) is projected",
        Duration::from_secs(30),
        || async { stored(&env, "carl").await.is_some() },
    )
    .await;
    assert_eq!(
        stored(&env, "carl").await,
        Some((Some("carl direct".into()), None, Some("CH".into())))
    );
    assert_eq!(stored(&env, "bob").await.unwrap().2.as_deref(), Some("AT"));
    assert_eq!(
        stored(&env, "ann").await.unwrap().2.as_deref(),
        Some("DE"),
        "the older event lost"
    );
    assert_eq!(stored(&env, "eve").await, None);
    eventually(
        "two records dead-lettered",
        Duration::from_secs(30),
        || async { env.read_topic(&env.topics.dead_letter()).await.len() == 2 },
    )
    .await;
    let letters = env.read_topic(&env.topics.dead_letter()).await;
    let reasons: Vec<String> = letters
        .iter()
        .map(|r| decode::<DeadLetter>(r).unwrap().reason)
        .collect();
    assert!(reasons.iter().any(|r| r.contains("dob")), "{reasons:?}");

    // Redelivery of the whole topic changes nothing.
    env.wait_caught_up("profiles", &topic, Duration::from_secs(30))
        .await;
    let before = coupon_platform::store::users::all_profiles(&env.pool)
        .await
        .unwrap();
    assert_eq!(before.len(), 3);
    let ctx = app::connect(&env.config()).await.unwrap();
    let records = env.read_topic(&topic).await;
    coupon_consumers::profiles::handle_batch(&ctx, &records)
        .await
        .unwrap();
    coupon_consumers::profiles::handle_batch(&ctx, &records)
        .await
        .unwrap();
    assert_eq!(
        coupon_platform::store::users::all_profiles(&env.pool)
            .await
            .unwrap(),
        before
    );
    // A newer PUT still wins over everything before it.
    let (status, _) = put_profile(
        &app,
        "bob",
        &json!({"name": null, "dob": null, "location": "DE"}),
    )
    .await;
    assert_eq!(status, 202);
    eventually(
        "bob's newer profile wins",
        Duration::from_secs(30),
        || async { stored(&env, "bob").await == Some((None, None, Some("DE".into()))) },
    )
    .await;

    // A rebuild from the log projects the same profiles.
    env.wait_caught_up("profiles", &topic, Duration::from_secs(30))
        .await;
    app.stop().await;
    let live = coupon_platform::store::users::all_profiles(&env.pool)
        .await
        .unwrap();
    let rebuilt_db = env.rebuild_into("rebuilt").await;
    let rebuilt = rebuilt_db.connect(1).await;
    assert_eq!(
        coupon_platform::store::users::all_profiles(&rebuilt)
            .await
            .unwrap(),
        live
    );
    assert_eq!(live.len(), 3);
    rebuilt.close().await;
    rebuilt_db.drop_database().await;

    // The audit compares them, and sees a profile changed behind the log.
    let audit = |env: &TestEnv| {
        let mut command = env.couponctl();
        command.arg("audit");
        tokio::task::spawn_blocking(move || command.output())
    };
    let clean = audit(&env).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&clean.stdout).into_owned();
    assert!(
        clean.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(stdout.contains(", 3 profiles, "), "{stdout}");
    sqlx::query("UPDATE users SET location = 'FR' WHERE user_id = 'carl'")
        .execute(&env.pool)
        .await
        .unwrap();
    let tampered = audit(&env).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&tampered.stdout).into_owned();
    assert!(!tampered.status.success(), "{stdout}");
    assert!(stdout.contains("profile of user carl"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_with_locations_or_a_minimum_age_go_only_to_eligible_users() {
    let env = TestEnv::new().await;
    let app = env
        .start(&ALL, |c| {
            // A mark written by an ineligible user's refusal would outlive
            // the test: only not writing it lets the eligible users in.
            c.policy.sold_out_mark_ttl = Duration::from_secs(300)
        })
        .await;
    // A German-only campaign first (the oldest coupons), then a French one,
    // then one for adults.
    post_release(
        &app,
        &json!({"id": "e1", "category": "Local", "count": 2, "locations": ["DE", "AT"]}),
    )
    .await;
    wait_projected(&env, "Local", 2).await;
    post_release(
        &app,
        &json!({"id": "e1", "category": "France", "count": 1, "locations": ["FR"]}),
    )
    .await;
    wait_projected(&env, "France", 1).await;
    post_release(
        &app,
        &json!({"id": "e1", "category": "Adults", "count": 1, "min_age": 18}),
    )
    .await;
    wait_projected(&env, "Adults", 1).await;

    let today = Utc::now().date_naive();
    let years_ago = |n: i32| {
        NaiveDate::from_ymd_opt(today.year() - n, today.month(), today.day().min(28)).unwrap()
    };
    let (adult, minor) = (years_ago(30).to_string(), years_ago(17).to_string());
    set_profile(&env, &app, "ann", &adult, "DE").await;
    set_profile(&env, &app, "bob", &adult, "US").await;
    set_profile(&env, &app, "kid", &minor, "de").await;
    set_profile(&env, &app, "dora", &adult, "at").await;
    set_profile(&env, &app, "fred", &adult, "FR").await;

    // Ineligible users are refused (sold out for them), and then, through the
    // same gateway, eligible ones are still granted: no refusal marked the
    // pool sold out for everyone.
    for (user, category) in [
        ("bob", "Local"),
        ("nobody", "Local"),
        ("nobody", "Adults"),
        ("kid", "Adults"),
        ("bob", "France"),
    ] {
        let (status, body, _) = claim(&app, user, Some(category)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("sold_out")),
            "{user} {category}: {body}"
        );
    }
    let (status, body, _) = claim(&app, "ann", Some("Local")).await;
    assert_eq!(
        (status, body["category"].as_str()),
        (200, Some("Local")),
        "{body}"
    );
    let (status, body, _) = claim(&app, "kid", Some("Local")).await;
    assert_eq!(
        (status, body["category"].as_str()),
        (200, Some("Local")),
        "location only: {body}"
    );
    // Without a category: a coupon of a campaign the user may have (fred:
    // the French one, though the German coupons are older; dora, of Austria:
    // the adults' one, the German ones being gone).
    let (status, body, _) = claim(&app, "fred", None).await;
    assert_eq!(
        (status, body["category"].as_str()),
        (200, Some("France")),
        "{body}"
    );
    let (status, body, _) = claim(&app, "dora", None).await;
    assert_eq!(
        (status, body["category"].as_str()),
        (200, Some("Adults")),
        "{body}"
    );
    // Everything is gone now: sold out for everyone, and marked so.
    let (status, body, _) = claim(&app, "late", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("sold_out")),
        "{body}"
    );
    let decisions: Vec<(String, String)> =
        sqlx::query_as("SELECT user_id, outcome FROM claim_decisions ORDER BY decided_at, user_id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let granted: Vec<&str> = decisions
        .iter()
        .filter(|(_, outcome)| outcome == "granted")
        .map(|(user, _)| user.as_str())
        .collect();
    assert_eq!(granted.len(), 4, "{decisions:?}");
    for user in ["bob", "nobody"] {
        assert!(
            !granted.contains(&user),
            "{user} was granted: {decisions:?}"
        );
    }
    assert_invariants(&env, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_quota_tz_the_day_turns_at_the_zones_midnight() {
    let env = TestEnv::new().await;
    let zone: Tz = "Asia/Kolkata".parse().unwrap();
    let window = QuotaWindow::DAY.in_zone(zone);
    let app = env
        .start(
            &[Role::Gateway, Role::Coupons, Role::Claims, Role::Purchases],
            |c| c.policy.quota_window = window,
        )
        .await;
    crate::harness::release(&env, "Shop", 3).await;
    let (status, body, _) = claim(&app, "ann", None).await;
    assert_eq!(status, 200, "{body}");
    // Bought, so that her next claim is judged on the quota (not answered
    // with the coupon she holds).
    let response = TestEnv::http_client()
        .post(app.url("/api/v1/purchase"))
        .json(&json!({"user_id": "ann", "coupon_code": body["coupon_code"], "order_id": "o-ann"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (status, body, retry_after) = claim(&app, "ann", None).await;
    let now = Utc::now();
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited")),
        "{body}"
    );

    // India is UTC+05:30 all year: its day starts at 18:30 UTC. Computed
    // here without the code under test.
    let ist = FixedOffset::east_opt(5 * 3600 + 1800).unwrap();
    let local_midnight = |t: DateTime<Utc>| {
        let date = t.with_timezone(&ist).date_naive();
        ist.from_local_datetime(&date.and_hms_opt(0, 0, 0).unwrap())
            .single()
            .unwrap()
            .with_timezone(&Utc)
    };
    let start = local_midnight(now);
    let next = start + chrono::Duration::days(1);
    let stored: DateTime<Utc> =
        sqlx::query_scalar("SELECT window_start FROM quota_grants WHERE user_id = 'ann'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        stored, start,
        "the quota slot is named by the Indian day's start"
    );
    let secs: i64 = retry_after.expect("a Retry-After").parse().unwrap();
    let expected = (next - now).num_seconds();
    assert!(
        (secs - expected).abs() <= 5,
        "Retry-After {secs}, the next Indian midnight is {expected} s away"
    );
    let said = next.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    assert!(
        body["message"].as_str().unwrap().contains(&said),
        "{said}: {body}"
    );
    // A grant in yesterday's Indian day (a UTC instant of today when it is
    // before 18:30 UTC) does not use today's quota.
    let yesterday = start - chrono::Duration::hours(1);
    sqlx::query("INSERT INTO quota_grants (user_id, window_start, request_id, granted_at) VALUES ('bob', $1, 'old-bob', $2)")
        .bind(window.start_of(yesterday))
        .bind(yesterday)
        .execute(&env.pool)
        .await
        .unwrap();
    let (status, body, _) = claim(&app, "bob", None).await;
    assert_eq!(status, 200, "yesterday's Indian day is over: {body}");
    assert_invariants_in(&env, 3, window).await;
    app.stop().await;
}
