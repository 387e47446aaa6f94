//! What an operator sees, from a real `couponctl run` child process (the
//! metrics recorder is per process, so the child's `/metrics` counts exactly
//! what this test did):
//!
//! - `/metrics` parsed as Prometheus text: decision counters equal both the
//!   decisions this test caused and the decisions table; the pool and hold
//!   gauges equal the database; dead letters are counted; consumer lag is
//!   reported per group, topic and partition;
//! - with `LOG_FORMAT=json`, one request id is in the gateway's "received"
//!   and "answered" lines and in the consumer's "decided" line.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use coupon_platform::kafka::Publisher;

use crate::harness::{eventually, eventually_ok, free_port, Child, TestEnv};

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples and the `# TYPE` of each metric family.
#[derive(Debug, Default)]
struct Exposition {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    /// Parses the text format (version 0.0.4); panics on a malformed line.
    fn parse(text: &str) -> Self {
        let mut exposition = Exposition::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                        exposition.types.insert(name.to_owned(), kind.to_owned());
                    }
                }
                continue;
            }
            exposition.samples.push(parse_sample(line));
        }
        exposition
    }

    /// The value of the sample `name` whose labels include `labels`
    /// (exactly one must match).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(matching.len() <= 1, "{name}{labels:?} matches {matching:?}");
        matching.first().map(|s| s.value)
    }

    fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

fn parse_sample(line: &str) -> Sample {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => panic!("no value in {line:?}"),
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest;
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let end;
        loop {
            // label name
            while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                chars.next();
            }
            if chars.peek().is_some_and(|(_, c)| *c == '}') {
                end = chars.next().map(|(i, _)| i);
                break;
            }
            if chars.peek().is_none() {
                end = None;
                break;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "in {line:?}");
            let mut value = String::new();
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(other) => value.push(other),
                        None => panic!("dangling escape in {line:?}"),
                    },
                    '"' => break,
                    other => value.push(other),
                }
            }
            labels.insert(key.trim().to_owned(), value);
        }
        let end = end.unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
        rest = &inner[end + 1..];
    }
    let value = rest
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no value in {line:?}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

#[test]
fn the_parser_reads_labels_with_escapes() {
    let text = "# TYPE x counter\nx{a=\"1\",b=\"q\\\"uote\\\\\"} 3\ny 2.5\n";
    let exposition = Exposition::parse(text);
    assert_eq!(exposition.types["x"], "counter");
    assert_eq!(exposition.value("x", &[("b", "q\"uote\\")]), Some(3.0));
    assert_eq!(exposition.value("y", &[]), Some(2.5));
}

async fn scrape(http: &reqwest::Client, base: &str) -> Exposition {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    Exposition::parse(&text)
}

async fn release(http: &reqwest::Client, base: &str, category: &str, count: u32) -> Value {
    let answer = http
        .post(format!("{base}/api/v1/coupon"))
        .bearer_auth("admin-secret")
        .json(&json!({"id": "e1", "category": category, "count": count}))
        .send()
        .await
        .expect("release");
    assert_eq!(answer.status(), 202);
    answer.json().await.expect("batch")
}

async fn claim(http: &reqwest::Client, base: &str, user: &str, request_id: &str) -> (u16, Value) {
    let answer = http
        .get(format!("{base}/api/v1/coupon?id={user}"))
        .header("x-request-id", request_id)
        .send()
        .await
        .expect("claim");
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

async fn purchase(
    http: &reqwest::Client,
    base: &str,
    user: &str,
    code: &str,
    request_id: &str,
) -> u16 {
    http.post(format!("{base}/api/v1/purchase"))
        .header("x-request-id", request_id)
        .json(&json!({"user_id": user, "coupon_code": code, "order_id": format!("order-{user}")}))
        .send()
        .await
        .expect("purchase")
        .status()
        .as_u16()
}

async fn decisions_in_db(env: &TestEnv) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT outcome, count(*) FROM claim_decisions GROUP BY outcome",
    )
    .fetch_all(&env.pool)
    .await
    .expect("claim decisions")
    .into_iter()
    .collect()
}

/// What `/metrics` says against what this test did and the database holds.
async fn check_metrics(
    http: &reqwest::Client,
    base: &str,
    env: &TestEnv,
    expected_claims: &[(&str, f64)],
) -> Result<(), String> {
    let m = scrape(http, base).await;
    let in_db = decisions_in_db(env).await;
    let counts = env.status_counts().await;
    let mut problems = Vec::new();
    for (outcome, expected) in expected_claims {
        let got = m.value("coupon_claim_decisions_total", &[("outcome", outcome)]);
        let db = *in_db.get(*outcome).unwrap_or(&0) as f64;
        if got != Some(*expected) || db != *expected {
            problems.push(format!(
                "claims {outcome}: metric {got:?}, db {db}, expected {expected}"
            ));
        }
    }
    for (outcome, expected) in [
        ("redeemed", 1.0),
        ("not_holder", 0.0),
        ("hold_expired", 0.0),
    ] {
        let got = m.value("coupon_purchase_decisions_total", &[("outcome", outcome)]);
        if got != Some(expected) {
            problems.push(format!("purchases {outcome}: {got:?}, expected {expected}"));
        }
    }
    let dead = m.value("coupon_dead_letters_total", &[("consumer", "claims")]);
    if dead != Some(1.0) {
        problems.push(format!("dead letters from claims: {dead:?}"));
    }
    let pool = m.value("coupon_pool_available", &[("category", "Toys")]);
    if pool != Some(counts.available as f64) {
        problems.push(format!("pool {pool:?} vs db {}", counts.available));
    }
    let holds = m.value("coupon_holds_active", &[]);
    if holds != Some(counts.held as f64) {
        problems.push(format!("holds {holds:?} vs db {}", counts.held));
    }
    let group = env.topics.group(couponctl::app::Role::Claims);
    let topic = env.topics.claims();
    for partition in ["0", "1"] {
        let lag = m.value(
            "coupon_consumer_lag",
            &[
                ("group", group.as_str()),
                ("topic", topic.as_str()),
                ("partition", partition),
            ],
        );
        if lag != Some(0.0) {
            problems.push(format!("claims lag on partition {partition}: {lag:?}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_decision_and_gauges_match_the_database() {
    let env = TestEnv::new().await;
    let port = free_port();
    let mut child = Child::spawn_with(&env, &["run"], port, "metrics", |command| {
        command
            .env("METRICS_INTERVAL", "200ms")
            .env("REPLY_TIMEOUT", "30s");
    });
    let base = format!("http://127.0.0.1:{port}");
    child.wait_healthy(&base, Duration::from_secs(60)).await;
    let http = TestEnv::http_client();

    // Before anything happened, every decision series is there, at zero.
    let start = scrape(&http, &base).await;
    for outcome in ["granted", "sold_out", "rate_limited", "blacklisted"] {
        assert_eq!(
            start.value("coupon_claim_decisions_total", &[("outcome", outcome)]),
            Some(0.0),
            "{outcome}"
        );
    }

    // 3 coupons; 3 grants, 2 sold out, 1 purchase, then 2 rate-limited claims.
    release(&http, &base, "Toys", 3).await;
    eventually("3 coupons projected", Duration::from_secs(60), || async {
        env.count("SELECT count(*) FROM coupons").await == 3
    })
    .await;
    let mut codes = BTreeMap::new();
    for user in ["a1", "a2", "a3"] {
        let (status, body) = claim(&http, &base, user, &format!("{user}-1")).await;
        assert_eq!(status, 200, "{user}: {body}");
        codes.insert(user, body["coupon_code"].as_str().unwrap().to_owned());
    }
    for user in ["b1", "b2"] {
        assert_eq!(claim(&http, &base, user, &format!("{user}-1")).await.0, 404);
    }
    assert_eq!(
        purchase(&http, &base, "a1", &codes["a1"], "a1-buy").await,
        200
    );
    for attempt in ["a1-2", "a1-3"] {
        assert_eq!(claim(&http, &base, "a1", attempt).await.0, 429);
    }
    // One record that does not decode: a dead letter.
    let publisher = Publisher::new(&env.kafka, "metrics-test").expect("publisher");
    publisher
        .send_bytes(
            &env.topics.claims(),
            Some(&b"poison"[..]),
            b"\xffnot protobuf",
        )
        .await
        .expect("publish poison");

    let expected_claims = [
        ("granted", 3.0),
        ("sold_out", 2.0),
        ("rate_limited", 2.0),
        ("blacklisted", 0.0),
    ];
    eventually_ok(
        "the metrics show every decision and the database's pool and holds",
        Duration::from_secs(30),
        || check_metrics(&http, &base, &env, &expected_claims),
    )
    .await;

    let m = scrape(&http, &base).await;
    let counts = env.status_counts().await;
    assert_eq!((counts.available, counts.held, counts.redeemed), (0, 2, 1));
    assert_eq!(m.types["coupon_claim_decisions_total"], "counter");
    assert_eq!(m.types["coupon_purchase_decisions_total"], "counter");
    assert_eq!(m.types["coupon_dead_letters_total"], "counter");
    for gauge in [
        "coupon_consumer_lag",
        "coupon_pool_available",
        "coupon_holds_active",
    ] {
        assert_eq!(m.types[gauge], "gauge", "{gauge}");
    }
    // Lag is reported for every consumer group of the process, per partition.
    for role in ["coupons", "claims", "purchases", "expiry", "history"] {
        let group = env.topics.group(role.parse().unwrap());
        let partitions: Vec<&Sample> = m
            .all("coupon_consumer_lag")
            .into_iter()
            .filter(|s| s.labels.get("group") == Some(&group))
            .collect();
        assert!(partitions.len() >= 2, "{group}: {partitions:?}");
        assert!(partitions
            .iter()
            .all(|s| s.labels.contains_key("partition")));
    }
    assert_eq!(m.value("coupon_holds_overdue", &[]), Some(0.0));
    child.kill_9().await;
}

/// The JSON log lines of the child that mention `id`.
fn lines_with(log: &str, id: &str) -> Vec<Value> {
    log.lines()
        .filter(|line| line.contains(id))
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn has_line(lines: &[Value], message: &str, check: impl Fn(&Value) -> bool) -> bool {
    lines
        .iter()
        .any(|line| line["fields"]["message"] == message && check(line))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_id_follows_a_claim_from_http_to_its_decision() {
    let env = TestEnv::new().await;
    let port = free_port();
    let mut child = Child::spawn_with(&env, &["run"], port, "request-ids", |command| {
        // The received and decided lines are at debug: the default level
        // writes one line per request.
        command
            .env("LOG_FORMAT", "json")
            .env("REPLY_TIMEOUT", "30s")
            .env(
                "RUST_LOG",
                "info,coupon_producers=debug,coupon_consumers=debug,rdkafka=warn,sqlx=warn",
            );
    });
    let base = format!("http://127.0.0.1:{port}");
    child.wait_healthy(&base, Duration::from_secs(60)).await;
    let http = TestEnv::http_client();
    release(&http, &base, "Books", 1).await;
    eventually("1 coupon projected", Duration::from_secs(60), || async {
        env.count("SELECT count(*) FROM coupons").await == 1
    })
    .await;

    let claim_id = format!("trace-claim-{}", uuid::Uuid::new_v4().simple());
    let (status, body) = claim(&http, &base, "reader", &claim_id).await;
    assert_eq!(status, 200, "{body}");
    let code = body["coupon_code"].as_str().unwrap().to_owned();
    let purchase_id = format!("trace-buy-{}", uuid::Uuid::new_v4().simple());
    assert_eq!(
        purchase(&http, &base, "reader", &code, &purchase_id).await,
        200
    );

    let in_span = |id: &str| {
        let id = id.to_owned();
        move |line: &Value| line["span"]["request_id"] == id.as_str()
    };
    eventually(
        "the claim's and the purchase's request ids are in the gateway's and the consumers' lines",
        Duration::from_secs(20),
        || {
            let log = child.log_text();
            let (claim_id, purchase_id, code) = (&claim_id, &purchase_id, &code);
            let in_span = &in_span;
            async move {
                let claim_lines = lines_with(&log, claim_id);
                let purchase_lines = lines_with(&log, purchase_id);
                has_line(&claim_lines, "claim received", in_span(claim_id))
                    && has_line(&claim_lines, "claim answered", |l| {
                        in_span(claim_id)(l) && l["fields"]["status"] == 200
                    })
                    && has_line(&claim_lines, "claim decided", |l| {
                        l["fields"]["request_id"] == claim_id.as_str()
                            && l["fields"]["outcome"] == "granted"
                            && l["fields"]["coupon"] == code.as_str()
                    })
                    && has_line(&purchase_lines, "purchase received", in_span(purchase_id))
                    && has_line(&purchase_lines, "purchase answered", |l| {
                        in_span(purchase_id)(l) && l["fields"]["status"] == 200
                    })
                    && has_line(&purchase_lines, "purchase decided", |l| {
                        l["fields"]["request_id"] == purchase_id.as_str()
                            && l["fields"]["outcome"] == "redeemed"
                    })
            }
        },
    )
    .await;
    child.kill_9().await;
}

/// Issue #27, item 1: at the default level a claim costs one log line (the
/// gateway's answer), written without colour codes into a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_level_writes_one_plain_line_per_request() {
    let env = TestEnv::new().await;
    let port = free_port();
    let mut child = Child::spawn_with(&env, &["run"], port, "one-line", |command| {
        command.env_remove("RUST_LOG").env("REPLY_TIMEOUT", "30s");
    });
    let base = format!("http://127.0.0.1:{port}");
    child.wait_healthy(&base, Duration::from_secs(60)).await;
    let http = TestEnv::http_client();
    let ids: Vec<String> = (0..5)
        .map(|_| format!("one-line-{}", uuid::Uuid::new_v4().simple()))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let (status, body) = claim(&http, &base, &format!("quiet-{i}"), id).await;
        assert_eq!(status, 404, "{body}");
    }
    eventually("every answer is logged", Duration::from_secs(20), || {
        let log = child.log_text();
        let ids = &ids;
        async move {
            ids.iter()
                .all(|id| log.lines().filter(|l| l.contains(id.as_str())).count() == 1)
        }
    })
    .await;
    let log = child.log_text();
    for id in &ids {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(id.as_str())).collect();
        assert_eq!(lines.len(), 1, "{id}: {lines:?}");
        assert!(lines[0].contains("claim answered"), "{}", lines[0]);
    }
    assert!(!log.contains('\u{1b}'), "colour codes in a file");
    child.kill_9().await;
}
