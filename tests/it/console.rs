//! The web console's page and the admin routes it calls (issue #18), against
//! a whole system in-process: every number they answer is checked against
//! Postgres, the blacklist routes against the `users` table, the download
//! against the log, and bad input against the JSON error shape.
//! (The page itself in a browser: tests/console/run.sh.)

use std::time::Duration;

use serde_json::{json, Value};

use couponctl::app::Role;

use crate::harness::{eventually, eventually_ok, App, TestEnv};

const ADMIN: &str = "admin-secret";

async fn get(http: &reqwest::Client, app: &App, path: &str) -> (u16, Value) {
    let response = http
        .get(app.url(path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn rows(env: &TestEnv, sql: &str) -> Vec<(String, i64, i64, i64)> {
    sqlx::query_as(sql)
        .fetch_all(&env.pool)
        .await
        .expect("query")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_routes_answer_what_postgres_holds() {
    let env = TestEnv::new().await;
    let app = env
        .start(&Role::ALL, |c| {
            c.policy.hold_ttl = Duration::from_secs(2);
            c.metrics_interval = Duration::from_millis(200);
        })
        .await;
    let http = TestEnv::http_client();

    // A release, followed by batch id until every coupon is projected.
    let released: Value = http
        .post(app.url("/api/v1/coupon"))
        .bearer_auth(ADMIN)
        .json(&json!({"id": "e-console", "category": "Books", "count": 30}))
        .send()
        .await
        .expect("release")
        .json()
        .await
        .expect("batch");
    let batch = released["batch_id"].as_str().expect("batch id").to_owned();
    eventually_ok(
        "the batch route shows every coupon projected",
        Duration::from_secs(60),
        || async {
            let (status, body) =
                get(&http, &app, &format!("/api/v1/batches?batch_id={batch}")).await;
            let projected = body["batches"][0]["projected"].as_i64().unwrap_or(0);
            if status == 200 && projected == 30 {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        },
    )
    .await;
    let (_, listed) = get(&http, &app, "/api/v1/batches?employee=e-console&limit=5").await;
    assert_eq!(
        listed["batches"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    assert_eq!(listed["batches"][0]["batch_id"], batch.as_str());
    assert_eq!(listed["batches"][0]["category"], "Books");
    let (_, none) = get(&http, &app, "/api/v1/batches?employee=nobody").await;
    assert_eq!(none["batches"], json!([]));

    // Claims: 6 granted, 2 bought, 1 refused for the quota; the rest expire.
    let mut granted = Vec::new();
    for i in 0..6 {
        let (status, body) = get(&http, &app, &format!("/api/v1/coupon?id=reader-{i}")).await;
        assert_eq!(status, 200, "{body}");
        granted.push(body);
    }
    for grant in &granted[..2] {
        let answer = http
            .post(app.url("/api/v1/purchase"))
            .json(&json!({"user_id": grant["user_id"], "coupon_code": grant["coupon_code"], "order_id": format!("o-{}", grant["user_id"].as_str().unwrap())}))
            .send()
            .await
            .expect("purchase");
        assert_eq!(answer.status(), 200);
    }
    let (status, _) = get(&http, &app, "/api/v1/coupon?id=reader-0").await;
    assert_eq!(status, 429);

    // The blacklist: add with a reason and an expiry, list, refuse, remove.
    let added: Value = http
        .post(app.url("/api/v1/blacklist"))
        .bearer_auth(ADMIN)
        .json(&json!({"user_id": "mallory", "reason": "chargeback fraud", "for_seconds": 3600}))
        .send()
        .await
        .expect("blacklist")
        .json()
        .await
        .expect("entry");
    assert_eq!(added["user_id"], "mallory");
    assert_eq!(added["reason"], "chargeback fraud");
    let (listed, reason, minutes): (bool, Option<String>, f64) = sqlx::query_as(
        "SELECT blacklisted, blacklist_reason,
                extract(epoch FROM blacklisted_until - now())::float8 / 60
           FROM users WHERE user_id = 'mallory'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("users row");
    assert!(listed);
    assert_eq!(reason.as_deref(), Some("chargeback fraud"));
    assert!((58.0..=60.0).contains(&minutes), "{minutes}");
    let (status, _) = get(&http, &app, "/api/v1/coupon?id=mallory").await;
    assert_eq!(status, 403);
    let (_, list) = get(&http, &app, "/api/v1/blacklist").await;
    let users: Vec<&str> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["user_id"].as_str())
        .collect();
    assert_eq!(users, ["mallory"]);
    let forever: Value = http
        .post(app.url("/api/v1/blacklist"))
        .bearer_auth(ADMIN)
        .json(&json!({"user_id": "trent", "reason": "mistake"}))
        .send()
        .await
        .expect("blacklist")
        .json()
        .await
        .expect("entry");
    assert_eq!(
        forever["expires_at"],
        Value::Null,
        "no expiry: until removed"
    );
    for expected in [true, false] {
        let removed: Value = http
            .delete(app.url("/api/v1/blacklist?user_id=trent"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("remove")
            .json()
            .await
            .expect("answer");
        assert_eq!(removed["removed"], expected, "{removed}");
    }
    assert_eq!(
        env.count("SELECT count(*) FROM users WHERE user_id = 'trent' AND blacklisted")
            .await,
        0
    );

    // The holds not bought expire; then the pool, the funnel and the claims
    // chart all equal Postgres.
    eventually(
        "the unbought holds expire",
        Duration::from_secs(60),
        || async {
            env.count("SELECT count(*) FROM coupons WHERE status = 'held'")
                .await
                == 0
        },
    )
    .await;
    let (_, pool) = get(&http, &app, "/api/v1/pool").await;
    let truth = rows(
        &env,
        "SELECT category, count(*) FILTER (WHERE status = 'available'),
                count(*) FILTER (WHERE status = 'held'), count(*) FILTER (WHERE status = 'redeemed')
           FROM coupons GROUP BY category ORDER BY category",
    )
    .await;
    assert_eq!(truth, [("Books".to_owned(), 28, 0, 2)]);
    assert_eq!(
        pool,
        json!({"categories": [{"category": "Books", "available": 28, "held": 0, "redeemed": 2, "expired": 0, "issued": 30}],
               "available": 28, "held": 0, "redeemed": 2, "expired": 0, "issued": 30})
    );

    let now = chrono::Utc::now().timestamp();
    let range = format!("since={}&until={}", now - 600, now + 60);
    eventually_ok(
        "the funnel equals the history",
        Duration::from_secs(30),
        || async {
            let (_, funnel) = get(&http, &app, &format!("/api/v1/analytics/funnel?{range}")).await;
            let expected =
                json!([{"category": "Books", "granted": 6, "redeemed": 2, "released": 4, "cancelled": 0, "expired": 0}]);
            if funnel["by_category"] == expected
                && funnel["by_batch"][0]["batch_id"] == batch.as_str()
                && funnel["by_batch"][0]["granted"] == 6
            {
                Ok(())
            } else {
                Err(funnel.to_string())
            }
        },
    )
    .await;
    eventually_ok(
        "the claims per minute equal the history",
        Duration::from_secs(30),
        || async {
            let (_, claims) = get(&http, &app, &format!("/api/v1/analytics/claims?{range}")).await;
            let totals = &claims["totals"];
            let sum_of_buckets: i64 = claims["buckets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| b["granted"].as_i64().unwrap_or(0))
                .sum();
            if claims["bucket_seconds"] == 60
                && *totals == json!({"granted": 6, "sold_out": 0, "rate_limited": 1, "blacklisted": 1, "other": 0})
                && sum_of_buckets == 6
            {
                Ok(())
            } else {
                Err(claims.to_string())
            }
        },
    )
    .await;
    // A range that ends before it starts is empty, not an error.
    let (status, empty) = get(&http, &app, "/api/v1/analytics/claims?since=200&until=100").await;
    assert_eq!((status, &empty["buckets"]), (200, &json!([])));

    // The download: the replay of the range, as JSON lines and as Parquet.
    let lines = http
        .get(app.url(&format!("/api/v1/analytics/export?{range}")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("export");
    assert_eq!(lines.status(), 200);
    assert_eq!(
        lines.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let text = lines.text().await.expect("lines");
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(
        records
            .iter()
            .any(|r| r["payload"]["batch_id"] == batch.as_str()),
        "the batch's creation is in the download"
    );
    assert!(
        records.iter().any(|r| r["topic"] == env.topics.blacklist()),
        "the blacklist changes are in the download"
    );
    let parquet = http
        .get(app.url(&format!("/api/v1/analytics/export?{range}&format=parquet")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("export");
    assert_eq!(parquet.status(), 200);
    let bytes = parquet.bytes().await.expect("bytes");
    assert!(bytes.starts_with(b"PAR1") && bytes.ends_with(b"PAR1"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_routes_refuse_bad_input_with_json_errors() {
    let env = TestEnv::new().await;
    let app = env.start(&Role::ALL, |_| {}).await;
    let http = TestEnv::http_client();
    let check = |status: u16, code: &'static str, what: &'static str| {
        move |answer: (u16, Value)| {
            assert_eq!(answer.0, status, "{what}: {}", answer.1);
            assert_eq!(answer.1["error"], code, "{what}: {}", answer.1);
            assert!(answer.1["message"].is_string(), "{what}");
        }
    };
    let call = |request: reqwest::RequestBuilder| async move {
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (
            status,
            response.json::<Value>().await.unwrap_or(Value::Null),
        )
    };
    for path in [
        "/api/v1/pool",
        "/api/v1/batches",
        "/api/v1/blacklist",
        "/api/v1/analytics/claims",
        "/api/v1/analytics/funnel",
        "/api/v1/analytics/export",
    ] {
        check(401, "unauthorized", path)(call(http.get(app.url(path))).await);
        check(401, "unauthorized", path)(call(http.get(app.url(path)).bearer_auth("wrong")).await);
    }
    for (path, what) in [
        ("/api/v1/batches?limit=0", "limit 0"),
        ("/api/v1/batches?limit=501", "limit 501"),
        ("/api/v1/batches?limit=x", "limit x"),
        ("/api/v1/batches?batch_id=nope", "a bad batch id"),
        ("/api/v1/batches?employee=%20e", "a bad employee id"),
        ("/api/v1/analytics/claims?since=-1", "a negative time"),
        (
            "/api/v1/analytics/claims?until=253402300800",
            "after the year 9999",
        ),
        ("/api/v1/analytics/funnel?since=1.5", "a fraction"),
        ("/api/v1/analytics/export?format=csv", "an unknown format"),
    ] {
        check(400, "invalid_request", what)(call(http.get(app.url(path)).bearer_auth(ADMIN)).await);
    }
    for (body, what) in [
        (json!({"user_id": "u", "reason": ""}), "an empty reason"),
        (
            json!({"user_id": "u", "reason": "x\u{7}"}),
            "a control character",
        ),
        (json!({"user_id": " u", "reason": "r"}), "a bad user id"),
        (
            json!({"user_id": "u", "reason": "r", "for_seconds": 0}),
            "zero seconds",
        ),
        (
            json!({"user_id": "u", "reason": "r", "for_seconds": 1.5}),
            "a fraction",
        ),
        (
            json!({"user_id": "u", "reason": "r", "for_seconds": 315_360_001}),
            "over ten years",
        ),
        (json!({"reason": "r"}), "no user"),
    ] {
        check(400, "invalid_request", what)(
            call(
                http.post(app.url("/api/v1/blacklist"))
                    .bearer_auth(ADMIN)
                    .json(&body),
            )
            .await,
        );
    }
    check(400, "invalid_request", "no user to remove")(
        call(http.delete(app.url("/api/v1/blacklist")).bearer_auth(ADMIN)).await,
    );
    check(415, "unsupported_media_type", "a text body")(
        call(
            http.post(app.url("/api/v1/blacklist"))
                .bearer_auth(ADMIN)
                .body("{}"),
        )
        .await,
    );
    assert_eq!(
        env.count("SELECT count(*) FROM users").await,
        0,
        "nothing refused was written"
    );

    // The page and its script: embedded, no token needed, nothing from elsewhere.
    let page = http.get(app.url("/console")).send().await.expect("page");
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let html = page.text().await.expect("html");
    assert!(html.contains(r#"<script src="/console/console.js">"#));
    assert!(
        !html.contains("://"),
        "the page loads nothing from elsewhere"
    );
    let script = http
        .get(app.url("/console/console.js"))
        .send()
        .await
        .expect("script");
    assert_eq!(script.status(), 200);
    let script = script.text().await.expect("js");
    assert!(script.contains("Authorization") && script.contains("sessionStorage"));
    assert!(
        !script.contains("https://"),
        "the script loads nothing from elsewhere"
    );
    app.stop().await;
}
