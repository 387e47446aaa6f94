//! Analysts' tools against a real system: `replay` (JSON lines, time and
//! offset ranges, never touching the live groups), `replay --rebuild`,
//! `audit` (clean, tampered, in flight), a rebuilt database put live, and
//! `history`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use coupon_analyst::replay::{committed_offsets, TopicKind};
use coupon_platform::kafka::{decode, Publisher, Record};
use coupon_schemas::{
    BlacklistChanged, ClaimDecided, ClaimOutcome, ClaimRequested, CouponsCreated, DeadLetter,
    HoldExpired, PurchaseDecided, PurchaseOutcome, PurchaseRequested,
};
use couponctl::app::Role;

use crate::harness::{eventually, release, App, TestEnv};

const ALL: [Role; 7] = Role::ALL;

/// Bytes no topic's message type decodes.
const GARBAGE: &[u8] = b"\xff\xfe not protobuf";

struct Scenario {
    app: App,
    /// The Shoes coupon alice let expire, then dave bought.
    expired_then_redeemed: String,
    /// The Shoes coupon bob bought.
    redeemed: String,
    /// The Hats coupon nobody claimed.
    untouched: String,
    /// A time between the first and the second half of the scenario.
    middle: DateTime<Utc>,
}

async fn claim(app: &App, user: &str, category: &str) -> (u16, Value) {
    let response = TestEnv::http_client()
        .get(app.url(&format!("/api/v1/coupon?id={user}&category={category}")))
        .send()
        .await
        .expect("claim");
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn purchase(app: &App, user: &str, code: &str, order: &str) -> (u16, Value) {
    let response = TestEnv::http_client()
        .post(app.url("/api/v1/purchase"))
        .json(&json!({"user_id": user, "coupon_code": code, "order_id": order}))
        .send()
        .await
        .expect("purchase");
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

/// Coupons issued, granted, sold out, rate limited, redeemed, expired and
/// granted again, with a poison record; returns once every live consumer
/// has committed everything.
async fn scenario(env: &TestEnv) -> Scenario {
    let app = env
        .start(&ALL, |c| c.policy.hold_ttl = Duration::from_secs(3))
        .await;
    let shoes = release(env, "Shoes", 2).await;
    let hats = release(env, "Hats", 1).await;

    let (status, alice) = claim(&app, "alice", "Shoes").await;
    assert_eq!(status, 200, "{alice}");
    let alice_code = alice["coupon_code"].as_str().unwrap().to_owned();
    let (status, bob) = claim(&app, "bob", "Shoes").await;
    assert_eq!(status, 200, "{bob}");
    let bob_code = bob["coupon_code"].as_str().unwrap().to_owned();
    let (status, body) = purchase(&app, "bob", &bob_code, "order-bob").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = claim(&app, "carol", "Shoes").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("sold_out")));
    let (status, body) = claim(&app, "bob", "Shoes").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );

    // A profile, so that every topic has records (`users` too).
    let response = TestEnv::http_client()
        .put(app.url("/api/v1/users/erin"))
        .json(&json!({"name": "Erin", "dob": "1990-04-01", "location": "DE"}))
        .send()
        .await
        .expect("put a profile");
    assert_eq!(response.status().as_u16(), 202);
    eventually(
        "erin's profile is projected",
        Duration::from_secs(20),
        || async {
            env.count("SELECT count(*) FROM users WHERE user_id = 'erin' AND location = 'DE'")
                .await
                == 1
        },
    )
    .await;

    let middle = Utc::now();
    // Record timestamps are taken by the producer at send time: make sure
    // everything after this point is at least a millisecond later.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let blacklisted = couponctl(env)
        .args(["blacklist", "add", "mallory", "--reason", "sends poison"])
        .output()
        .await
        .expect("run couponctl");
    assert!(blacklisted.status.success(), "{blacklisted:?}");
    let poison = Publisher::new(&env.kafka, "test-poison").unwrap();
    poison
        .send_bytes(&env.topics.claims(), Some(b"mallory"), GARBAGE)
        .await
        .unwrap();

    let sql = format!(
        "SELECT count(*) FROM coupons WHERE code = '{alice_code}' AND status = 'available'"
    );
    eventually("alice's hold expires", Duration::from_secs(20), || async {
        env.count(&sql).await == 1
    })
    .await;
    let (status, dave) = claim(&app, "dave", "Shoes").await;
    assert_eq!(status, 200, "{dave}");
    assert_eq!(
        dave["coupon_code"],
        alice_code.as_str(),
        "the released coupon goes to dave"
    );
    let (status, again) = claim(&app, "dave", "Shoes").await;
    assert_eq!(status, 200, "a repeated claim returns the hold: {again}");
    for _ in 0..2 {
        let (status, body) = purchase(&app, "dave", &alice_code, "order-dave").await;
        assert_eq!(status, 200, "{body}");
    }

    env.wait_every_role_caught_up(Duration::from_secs(20)).await;
    let redeemed = "SELECT count(*) FROM coupons WHERE status = 'redeemed'";
    assert_eq!(env.count(redeemed).await, 2);
    assert_eq!(
        env.read_topic(&env.topics.dead_letter()).await.len(),
        1,
        "the poison record was dead-lettered"
    );
    Scenario {
        app,
        expired_then_redeemed: alice_code,
        redeemed: bob_code,
        untouched: hats[0].clone(),
        middle,
    }
    .check(&shoes)
}

impl Scenario {
    fn check(self, shoes: &[String]) -> Self {
        let mut mine = vec![self.expired_then_redeemed.clone(), self.redeemed.clone()];
        mine.sort();
        let mut issued = shoes.to_vec();
        issued.sort();
        assert_eq!(mine, issued);
        self
    }
}

fn couponctl(env: &TestEnv) -> tokio::process::Command {
    tokio::process::Command::from(env.couponctl())
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn run(env: &TestEnv, args: &[&str]) -> Run {
    let output = couponctl(env)
        .args(args)
        .output()
        .await
        .expect("run couponctl");
    let run = Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    eprintln!("couponctl {}: {}", args.join(" "), run.stderr.trim());
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_audit_agrees_reports_a_tampered_coupon_and_ignores_in_flight_work() {
    let env = TestEnv::new().await;
    let scenario = scenario(&env).await;

    // The system keeps running: the audit reads the live groups' offsets.
    let clean = run(&env, &["audit"]).await;
    assert_eq!(clean.code, Some(0), "{}\n{}", clean.stdout, clean.stderr);
    assert_eq!(
        clean.stdout.trim(),
        "no differences (3 coupons, 3 users, 3 quota grants, 6 claim decisions, \
         2 purchase decisions, 1 blacklist entries, 1 profiles, 10 history rows checked)"
    );
    assert!(clean.stderr.contains("events/s"), "{}", clean.stderr);

    // An operator "fixes" a redeemed coupon by hand.
    sqlx::query(
        "UPDATE coupons SET status = 'available', holder_user_id = NULL, hold_id = NULL,
                held_until = NULL WHERE code = $1",
    )
    .bind(&scenario.redeemed)
    .execute(&env.pool)
    .await
    .unwrap();
    let tampered = run(&env, &["audit"]).await;
    assert_eq!(tampered.code, Some(1), "{}", tampered.stdout);
    let lines: Vec<&str> = tampered.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", tampered.stdout);
    assert!(
        lines[0].starts_with(&format!("coupon {}:", scenario.redeemed)),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("live available"), "{}", lines[0]);
    assert!(
        lines[0].contains("log says redeemed holder=bob order=order-bob"),
        "{}",
        lines[0]
    );
    assert!(
        tampered.stderr.contains("error: 1 difference"),
        "{}",
        tampered.stderr
    );

    // Work in flight: a claim the processor has decided and committed in
    // Postgres, but whose offset is not committed (and decision not
    // published), must not count as a difference.
    scenario.app.stop().await;
    let publisher = Publisher::new(&env.kafka, "test-in-flight").unwrap();
    let request = ClaimRequested {
        envelope: Some(publisher.envelope::<ClaimRequested>("")),
        request_id: "r-zed".into(),
        user_id: "zed".into(),
        category: String::new(),
        answered_sold_out: false,
    };
    publisher
        .send(&env.topics.claims(), "zed", &request)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE coupons SET status = 'held', holder_user_id = 'zed', hold_id = 'r-zed',
                held_until = now() + interval '1 hour' WHERE code = $1",
    )
    .bind(&scenario.untouched)
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO users (user_id, last_coupon_at) VALUES ('zed', now())")
        .execute(&env.pool)
        .await
        .unwrap();
    let in_flight = run(&env, &["audit"]).await;
    assert_eq!(in_flight.code, Some(1));
    let lines: Vec<&str> = in_flight.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "only the tampered coupon: {}",
        in_flight.stdout
    );
    assert!(lines[0].starts_with(&format!("coupon {}:", scenario.redeemed)));
    assert!(
        in_flight
            .stderr
            .contains("1 records still in flight: 1 coupons and 1 users left out"),
        "{}",
        in_flight.stderr
    );

    // Every audit dropped its scratch database (named after this test's:
    // other tests' audits may be running beside it).
    let left = env
        .count(&format!(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'audit\\_{}\\_%'",
            env.name.to_ascii_lowercase()
        ))
        .await;
    assert_eq!(left, 0, "scratch databases left behind");
}

/// `audit` checks the history too (issue #29, item 3): every row of a
/// record the history sink has committed is in the history store; a row the
/// store lost is a difference naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_finds_a_history_row_the_store_lost() {
    let env = TestEnv::new().await;
    let scenario = scenario(&env).await;
    let clean = run(&env, &["audit"]).await;
    assert_eq!(clean.code, Some(0), "{}\n{}", clean.stdout, clean.stderr);
    let rows = env
        .count("SELECT count(*) FROM coupon_history WHERE kind <> 'released'")
        .await;
    assert!(
        clean
            .stdout
            .contains(&format!(", {rows} history rows checked)")),
        "every row but the releases is checked: {}",
        clean.stdout
    );

    // The store loses bob's grant.
    let lost = sqlx::query(
        "DELETE FROM coupon_history WHERE user_id = 'bob' AND kind = 'granted' RETURNING event_id",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    assert_eq!(lost.rows_affected(), 1);
    let audited = run(&env, &["audit"]).await;
    assert_eq!(audited.code, Some(1), "{}", audited.stdout);
    let lines: Vec<&str> = audited.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", audited.stdout);
    assert!(
        lines[0].starts_with("history: the granted row of event ")
            && lines[0].contains(&format!("coupon {}, user bob,", scenario.redeemed))
            && lines[0].ends_with("is on the log but missing from the history store"),
        "{}",
        lines[0]
    );
    scenario.app.stop().await;
}

async fn claim_as(app: &App, user: &str, request_id: &str) -> (u16, Value) {
    let response = TestEnv::http_client()
        .get(app.url(&format!("/api/v1/coupon?id={user}")))
        .header("x-request-id", request_id)
        .send()
        .await
        .expect("claim");
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

/// The decisions published for claim `request_id`, in log order per partition.
fn claim_answers(records: &[Record], request_id: &str) -> Vec<ClaimDecided> {
    records
        .iter()
        .filter_map(|r| decode::<ClaimDecided>(r).ok())
        .filter(|d| d.request_id == request_id)
        .collect()
}

/// The decisions published for purchases of `order_id`.
fn purchase_answers(records: &[Record], order_id: &str) -> Vec<PurchaseDecided> {
    records
        .iter()
        .filter_map(|r| decode::<PurchaseDecided>(r).ok())
        .filter(|d| d.order_id == order_id)
        .collect()
}

/// The item 5 of issue #14: a database rebuilt from the log and put live
/// decides as the old one would. Every answer that differs is collected, so
/// one run shows each piece the rebuild lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_database_put_live_refuses_todays_winners_and_repeats_its_answers() {
    let env = TestEnv::new().await;
    let app = env.start(&ALL, |_| {}).await;
    release(&env, "Shoes", 3).await;

    // Today's winners: alice bought her coupon, bob still holds his.
    let (status, alice) = claim_as(&app, "alice", "alice-1").await;
    assert_eq!(status, 200, "{alice}");
    let alice_code = alice["coupon_code"].as_str().unwrap().to_owned();
    let (status, body) = purchase(&app, "alice", &alice_code, "order-alice").await;
    assert_eq!(status, 200, "{body}");
    let (status, bob) = claim_as(&app, "bob", "bob-1").await;
    assert_eq!(status, 200, "{bob}");
    let bob_code = bob["coupon_code"].as_str().unwrap().to_owned();
    // mallory is blacklisted, lifted, blacklisted again: the last change counts.
    for args in [
        &["blacklist", "add", "mallory", "--reason", "fraud"][..],
        &["blacklist", "remove", "mallory"][..],
        &[
            "blacklist",
            "add",
            "mallory",
            "--for",
            "2h",
            "--reason",
            "chargebacks",
        ][..],
    ] {
        let changed = run(&env, args).await;
        assert_eq!(changed.code, Some(0), "{}", changed.stderr);
    }
    let (status, body) = claim_as(&app, "mallory", "mallory-1").await;
    assert_eq!((status, body["error"].as_str()), (403, Some("blacklisted")));
    for (role, topic) in [
        ("claims", env.topics.claims()),
        ("purchases", env.topics.purchases()),
    ] {
        env.wait_caught_up(role, &topic, Duration::from_secs(20))
            .await;
    }
    app.stop().await;

    // The log into a fresh database, which goes live in place of the old one.
    let rebuilt_db = env.rebuild_into("live").await;
    eprintln!("rebuild: {}", rebuilt_db.stdout.trim());
    let rebuilt_url = rebuilt_db.url.clone();
    let url = rebuilt_url.clone();
    let app = env.start(&ALL, move |c| c.database_url = url).await;
    let mut problems: Vec<String> = Vec::new();

    let (status, body) = claim_as(&app, "mallory", "mallory-2").await;
    if (status, body["error"].as_str()) != (403, Some("blacklisted")) {
        problems.push(format!("mallory is no longer blacklisted: {status} {body}"));
    }
    let (status, body) = claim_as(&app, "alice", "alice-2").await;
    if (status, body["error"].as_str()) != (429, Some("rate_limited")) {
        problems.push(format!(
            "alice claimed a second coupon today: {status} {body}"
        ));
    }
    let (status, body) = claim_as(&app, "bob", "bob-2").await;
    if (status, body["coupon_code"].as_str()) != (200, Some(bob_code.as_str())) {
        problems.push(format!("bob lost his hold: {status} {body}"));
    }

    // Redelivered requests: the same records again.
    let claim_results = env.read_topic(&env.topics.claim_results()).await;
    let purchase_results = env.read_topic(&env.topics.purchase_results()).await;
    let first_claim = claim_answers(&claim_results, "alice-1");
    let first_purchase = purchase_answers(&purchase_results, "order-alice");
    assert_eq!((first_claim.len(), first_purchase.len()), (1, 1));
    let claims = env.read_topic(&env.topics.claims()).await;
    let request = claims
        .iter()
        .find(|r| decode::<ClaimRequested>(r).is_ok_and(|c| c.request_id == "alice-1"))
        .expect("alice's claim");
    let purchases = env.read_topic(&env.topics.purchases()).await;
    let order = purchases
        .iter()
        .find(|r| decode::<PurchaseRequested>(r).is_ok_and(|p| p.order_id == "order-alice"))
        .expect("alice's purchase");
    let redelivery = Publisher::new(&env.kafka, "test-redelivery").unwrap();
    for (topic, record) in [
        (env.topics.claims(), request),
        (env.topics.purchases(), order),
    ] {
        redelivery
            .send_bytes(
                &topic,
                record.key.as_deref(),
                record.value.as_deref().unwrap(),
            )
            .await
            .unwrap();
    }
    eventually(
        "the redelivered requests are answered",
        Duration::from_secs(30),
        || async {
            let claims = env.read_topic(&env.topics.claim_results()).await;
            let purchases = env.read_topic(&env.topics.purchase_results()).await;
            claim_answers(&claims, "alice-1").len() == 2
                && purchase_answers(&purchases, "order-alice").len() == 2
        },
    )
    .await;
    let claims = claim_answers(
        &env.read_topic(&env.topics.claim_results()).await,
        "alice-1",
    );
    if claims[1] != first_claim[0] {
        problems.push(format!(
            "the redelivered claim got another decision: {:?}, first {:?}",
            claims[1], first_claim[0]
        ));
    }
    let purchases = purchase_answers(
        &env.read_topic(&env.topics.purchase_results()).await,
        "order-alice",
    );
    if purchases[1] != first_purchase[0] {
        problems.push(format!(
            "the redelivered purchase got another decision: {:?}, first {:?}",
            purchases[1], first_purchase[0]
        ));
    }
    for (role, topic) in [
        ("claims", env.topics.claims()),
        ("purchases", env.topics.purchases()),
    ] {
        env.wait_caught_up(role, &topic, Duration::from_secs(20))
            .await;
    }
    app.stop().await;

    // The new live database audits clean; what decides claims is audited.
    let audit = run(&env, &["audit", "--database-url", &rebuilt_url]).await;
    if audit.code != Some(0) {
        problems.push(format!(
            "the rebuilt database does not audit clean: {}",
            audit.stdout
        ));
    }
    let rebuilt = coupon_platform::db::connect(&rebuilt_url, 2).await.unwrap();
    for tamper in [
        "DELETE FROM quota_grants WHERE user_id = 'alice'",
        "UPDATE claim_decisions SET outcome = 'sold_out', coupon_code = NULL WHERE request_id = 'bob-1'",
        "DELETE FROM purchase_decisions WHERE order_id = 'order-alice'",
        "UPDATE users SET blacklisted = false, blacklisted_until = NULL, blacklist_reason = NULL,
                          blacklisted_at = NULL WHERE user_id = 'mallory'",
    ] {
        sqlx::query(tamper).execute(&rebuilt).await.unwrap();
    }
    rebuilt.close().await;
    let tampered = run(&env, &["audit", "--database-url", &rebuilt_url]).await;
    let lines: Vec<&str> = tampered.stdout.lines().collect();
    let expected = [
        "quota of alice in the window from ",
        "claim decision bob-1 (user bob): live sold_out ",
        "purchase decision for order order-alice (user alice): missing from the live database, log says redeemed ",
        "blacklist of user mallory: live not blacklisted, log says blacklisted until=",
    ];
    let found = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
    for prefix in expected {
        if !found(prefix) {
            problems.push(format!("the audit misses {prefix:?}: {}", tampered.stdout));
        }
    }
    if tampered.code != Some(1) || lines.len() != expected.len() {
        problems.push(format!(
            "the tampered audit: {:?}\n{}",
            tampered.code, tampered.stdout
        ));
    }
    rebuilt_db.drop_database().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Every line of a replay, by (topic, partition, offset).
fn lines_of(text: &str) -> BTreeMap<(String, i32, i64), Value> {
    text.lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).expect("a JSON line");
            let key = (
                value["topic"].as_str().expect("topic").to_owned(),
                value["partition"].as_i64().expect("partition") as i32,
                value["offset"].as_i64().expect("offset"),
            );
            (key, value)
        })
        .collect()
}

/// The time `--since`/`--until` filter on.
fn line_time(line: &Value) -> i64 {
    line["timestamp_ms"]
        .as_i64()
        .or_else(|| line["envelope"]["occurred_at_ms"].as_i64())
        .expect("a record time")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Checks a line against the record it came from, decoded independently.
fn assert_round_trip(kind: TopicKind, record: &Record, line: &Value) {
    assert_eq!(line["topic_kind"], kind.short());
    assert_eq!(line["key"].as_str(), record.key_str(), "{line}");
    let payload = &line["payload"];
    let envelope = match kind {
        TopicKind::Created => {
            let e: CouponsCreated = decode(record).unwrap();
            assert_eq!(payload["batch_id"], e.batch_id.as_str());
            assert_eq!(payload["employee_id"], e.employee_id.as_str());
            assert_eq!(payload["category"], e.category.as_str());
            assert_eq!(payload["coupon_ids"], json!(e.coupon_ids));
            assert_eq!(payload["chunk_count"], e.chunk_count);
            e.envelope
        }
        TopicKind::Claims => {
            let Ok(e) = decode::<ClaimRequested>(record) else {
                assert_eq!(record.value.as_deref(), Some(GARBAGE));
                assert!(line["error"].as_str().unwrap().contains("protobuf"));
                assert_eq!(line["value_base64"], b64(GARBAGE));
                assert!(line.get("payload").is_none());
                return;
            };
            assert_eq!(payload["request_id"], e.request_id.as_str());
            assert_eq!(payload["user_id"], e.user_id.as_str());
            assert_eq!(payload["category"], e.category.as_str());
            e.envelope
        }
        TopicKind::ClaimResults => {
            let e: ClaimDecided = decode(record).unwrap();
            let outcome = ClaimOutcome::try_from(e.outcome).unwrap().as_str_name();
            assert_eq!(payload["outcome"], outcome);
            assert_eq!(payload["request_id"], e.request_id.as_str());
            assert_eq!(payload["user_id"], e.user_id.as_str());
            assert_eq!(payload["coupon_code"], e.coupon_code.as_str());
            assert_eq!(payload["expires_at_ms"], e.expires_at_ms);
            assert_eq!(payload["retry_at_ms"], e.retry_at_ms);
            assert_eq!(payload["repeated"], e.repeated);
            e.envelope
        }
        TopicKind::Purchases => {
            let e: PurchaseRequested = decode(record).unwrap();
            assert_eq!(payload["order_id"], e.order_id.as_str());
            assert_eq!(payload["coupon_code"], e.coupon_code.as_str());
            assert_eq!(payload["user_id"], e.user_id.as_str());
            e.envelope
        }
        TopicKind::PurchaseResults => {
            let e: PurchaseDecided = decode(record).unwrap();
            let outcome = PurchaseOutcome::try_from(e.outcome).unwrap().as_str_name();
            assert_eq!(payload["outcome"], outcome);
            assert_eq!(payload["order_id"], e.order_id.as_str());
            assert_eq!(payload["redeemed_at_ms"], e.redeemed_at_ms);
            assert_eq!(payload["repeated"], e.repeated);
            e.envelope
        }
        TopicKind::Expirations => {
            let e: HoldExpired = decode(record).unwrap();
            assert_eq!(payload["coupon_code"], e.coupon_code.as_str());
            assert_eq!(payload["hold_id"], e.hold_id.as_str());
            assert_eq!(payload["user_id"], e.user_id.as_str());
            assert_eq!(payload["held_until_ms"], e.held_until_ms);
            e.envelope
        }
        TopicKind::Blacklist => {
            let e: BlacklistChanged = decode(record).unwrap();
            assert_eq!(payload["user_id"], e.user_id.as_str());
            assert_eq!(payload["blacklisted"], e.blacklisted);
            assert_eq!(payload["blacklisted_until_ms"], e.blacklisted_until_ms);
            assert_eq!(payload["reason"], e.reason.as_str());
            assert_eq!(payload["source"], e.source.as_str());
            assert_eq!(payload["changed_by"], e.changed_by.as_str());
            e.envelope
        }
        TopicKind::Users => {
            let e: coupon_schemas::UserProfileUpdated = decode(record).unwrap();
            assert_eq!(payload["user_id"], e.user_id.as_str());
            assert_eq!(payload["dob"], e.dob.as_str());
            assert_eq!(payload["location"], e.location.as_str());
            assert_eq!(payload["updated_at_ms"], e.updated_at_ms);
            e.envelope
        }
        TopicKind::DeadLetter => {
            let e: DeadLetter = decode(record).unwrap();
            assert_eq!(payload["source_topic"], e.source_topic.as_str());
            assert_eq!(payload["source_offset"], e.source_offset);
            assert_eq!(payload["reason"], e.reason.as_str());
            assert_eq!(payload["original_value"], b64(&e.original_value));
            assert_eq!(payload["original_key"], b64(&e.original_key));
            e.envelope
        }
    };
    let envelope = envelope.unwrap();
    assert!(line.get("error").is_none(), "{line}");
    assert!(payload.get("envelope").is_none());
    assert_eq!(line["envelope"]["event_id"], envelope.event_id.as_str());
    assert_eq!(line["envelope"]["occurred_at_ms"], envelope.occurred_at_ms);
    assert_eq!(line["envelope"]["event_type"], kind.type_name());
}

/// Every live group's committed offsets on every topic.
async fn live_offsets(env: &TestEnv) -> Vec<(String, String, BTreeMap<i32, Option<i64>>)> {
    let kafka = env.kafka.clone();
    let topics = env.topics.clone();
    tokio::task::spawn_blocking(move || {
        [
            ("coupons", topics.created()),
            ("claims", topics.claims()),
            ("purchases", topics.purchases()),
            ("expiry", topics.expirations()),
            ("history", topics.created()),
            ("history", topics.claim_results()),
            ("history", topics.purchase_results()),
        ]
        .into_iter()
        .map(|(role, topic)| {
            let group = topics.group(role.parse().unwrap());
            let offsets = committed_offsets(&kafka, &group, &topic).unwrap();
            (group, topic, offsets)
        })
        .collect::<Vec<_>>()
    })
    .await
    .unwrap()
}

async fn kinds_in_history(pool: &sqlx::PgPool) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT kind, count(*) FROM coupon_history GROUP BY kind")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_writes_every_event_as_json_lines_rebuilds_and_leaves_live_groups_alone() {
    let env = TestEnv::new().await;
    let scenario = scenario(&env).await;
    scenario.app.stop().await;
    let before = live_offsets(&env).await;
    assert!(
        before
            .iter()
            .any(|(_, _, offsets)| offsets.values().any(Option::is_some)),
        "the live groups have committed offsets"
    );

    // Everything, to a file.
    let dir = std::env::temp_dir().join(format!("{}-replay", env.name));
    std::fs::create_dir_all(&dir).unwrap();
    let all_path = dir.join("all.jsonl");
    let full = run(&env, &["replay", "--output", all_path.to_str().unwrap()]).await;
    assert_eq!(full.code, Some(0), "{}", full.stderr);
    assert!(full.stderr.contains("records/s"), "{}", full.stderr);
    let all = lines_of(&std::fs::read_to_string(&all_path).unwrap());
    let mut outcomes = HashSet::new();
    for kind in TopicKind::ALL {
        let topic = env.topics.of(kind);
        let records = env.read_topic(&topic).await;
        assert!(!records.is_empty(), "{topic} has records");
        let in_file = all.keys().filter(|(t, _, _)| *t == topic).count();
        assert_eq!(in_file, records.len(), "every record of {topic}, once");
        for record in &records {
            let line = &all[&(topic.clone(), record.partition, record.offset)];
            assert_round_trip(kind, record, line);
            if let Some(outcome) = line["payload"]["outcome"].as_str() {
                outcomes.insert(outcome.to_owned());
            }
        }
    }

    // The same records as Parquet columns, for larger exports.
    let parquet_path = dir.join("all.parquet");
    let columnar = run(
        &env,
        &["replay", "--output", parquet_path.to_str().unwrap()],
    )
    .await;
    assert_eq!(columnar.code, Some(0), "{}", columnar.stderr);
    let file = std::fs::File::open(&parquet_path).unwrap();
    let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
    let mut rows = 0;
    for row in parquet::file::reader::FileReader::get_row_iter(&reader, None).unwrap() {
        use parquet::record::RowAccessor;
        let row = row.unwrap();
        let key = (
            row.get_string(0).unwrap().clone(),
            row.get_int(1).unwrap(),
            row.get_long(2).unwrap(),
        );
        let line = all
            .get(&key)
            .unwrap_or_else(|| panic!("{key:?} is not in the JSON lines"));
        assert_eq!(
            row.get_string(6).ok(),
            line["envelope"]["event_id"]
                .as_str()
                .map(str::to_owned)
                .as_ref()
        );
        match row.get_string(8) {
            Ok(payload) => assert_eq!(
                &serde_json::from_str::<Value>(payload).unwrap(),
                &line["payload"]
            ),
            Err(_) => assert!(line.get("payload").is_none_or(Value::is_null), "{line}"),
        }
        rows += 1;
    }
    assert_eq!(rows, all.len(), "the Parquet file holds every record once");
    let no_output = run(&env, &["replay", "--format", "parquet"]).await;
    assert_eq!(no_output.code, Some(1));
    assert!(
        no_output.stderr.contains("--format parquet needs --output"),
        "{}",
        no_output.stderr
    );
    for outcome in [
        "CLAIM_OUTCOME_GRANTED",
        "CLAIM_OUTCOME_SOLD_OUT",
        "CLAIM_OUTCOME_RATE_LIMITED",
        "PURCHASE_OUTCOME_REDEEMED",
    ] {
        assert!(outcomes.contains(outcome), "{outcome} in {outcomes:?}");
    }

    // --since: only records at or after the time; --until: the rest.
    let middle = scenario
        .middle
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let middle_ms = scenario.middle.timestamp_millis();
    let since = run(&env, &["replay", "--since", &middle]).await;
    assert_eq!(since.code, Some(0), "{}", since.stderr);
    let since = lines_of(&since.stdout);
    let expected: HashSet<&(String, i32, i64)> = all
        .iter()
        .filter(|(_, line)| line_time(line) >= middle_ms)
        .map(|(key, _)| key)
        .collect();
    assert!(!since.is_empty() && since.len() < all.len());
    assert_eq!(since.keys().collect::<HashSet<_>>(), expected);
    assert!(since.values().all(|line| line_time(line) >= middle_ms));
    assert!(
        since
            .values()
            .any(|line| line["payload"]["user_id"] == "dave"),
        "dave's claims came after the middle"
    );
    let until = run(
        &env,
        &[
            "replay",
            "--until",
            &middle,
            "--topic",
            "claims,claim-results",
        ],
    )
    .await;
    assert_eq!(until.code, Some(0), "{}", until.stderr);
    let until = lines_of(&until.stdout);
    assert!(!until.is_empty());
    assert!(until.values().all(|line| line_time(line) <= middle_ms
        && ["claims", "claim-results"].contains(&line["topic_kind"].as_str().unwrap())));
    assert!(until
        .values()
        .all(|line| line["payload"]["user_id"] != "dave"));

    // --offset: from that offset in every partition.
    let from_one = run(
        &env,
        &["replay", "--topic", "claim-results", "--offset", "1"],
    )
    .await;
    assert_eq!(from_one.code, Some(0), "{}", from_one.stderr);
    let from_one = lines_of(&from_one.stdout);
    let expected = all
        .keys()
        .filter(|(t, _, o)| *t == env.topics.claim_results() && *o >= 1)
        .count();
    assert_eq!(from_one.len(), expected);

    // Bad input is refused clearly.
    let bad = run(&env, &["replay", "--topic", "nope"]).await;
    assert_ne!(bad.code, Some(0));
    assert!(bad.stderr.contains("unknown topic"), "{}", bad.stderr);

    assert_eq!(
        live_offsets(&env).await,
        before,
        "replays never move the live groups"
    );

    // The log, projected into a fresh database, is the live state.
    let rebuilt_db = env.rebuild_into("rb").await;
    assert!(
        rebuilt_db.stdout.contains("events/s"),
        "{}",
        rebuilt_db.stdout
    );
    eprintln!("rebuild: {}", rebuilt_db.stdout.trim());
    let rebuilt = rebuilt_db.connect(2).await;
    let state = "SELECT code, status, holder_user_id, hold_id, redeemed_order_id FROM coupons ORDER BY code";
    type Row = (
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let live_rows: Vec<Row> = sqlx::query_as(state).fetch_all(&env.pool).await.unwrap();
    let rebuilt_rows: Vec<Row> = sqlx::query_as(state).fetch_all(&rebuilt).await.unwrap();
    assert_eq!(rebuilt_rows, live_rows);
    // Times to the millisecond: events carry milliseconds.
    let users = "SELECT user_id, date_trunc('milliseconds', last_coupon_at), blacklisted,
                        blacklisted_until, blacklist_reason, date_trunc('milliseconds', blacklisted_at)
                 FROM users ORDER BY 1";
    type User = (
        String,
        Option<DateTime<Utc>>,
        bool,
        Option<DateTime<Utc>>,
        Option<String>,
        Option<DateTime<Utc>>,
    );
    let live_users: Vec<User> = sqlx::query_as(users).fetch_all(&env.pool).await.unwrap();
    let rebuilt_users: Vec<User> = sqlx::query_as(users).fetch_all(&rebuilt).await.unwrap();
    assert_eq!(rebuilt_users, live_users);
    assert!(live_users.iter().any(|u| u.0 == "mallory" && u.2));
    // What decides later requests: quota slots and stored decisions.
    for table in [
        "SELECT user_id || ' ' || window_start || ' ' || request_id || ' '
                || date_trunc('milliseconds', granted_at)
         FROM quota_grants ORDER BY 1",
        "SELECT concat_ws(' ', request_id, event_id, user_id, outcome, coupon_code, category,
                          date_trunc('milliseconds', expires_at), repeated,
                          date_trunc('milliseconds', retry_at), blacklisted_until, reason,
                          date_trunc('milliseconds', decided_at))
         FROM claim_decisions ORDER BY 1",
        "SELECT concat_ws(' ', order_id, request_id, event_id, user_id, coupon_code, outcome,
                          reason, date_trunc('milliseconds', decided_at))
         FROM purchase_decisions ORDER BY 1",
    ] {
        let live: Vec<String> = sqlx::query_scalar(table)
            .fetch_all(&env.pool)
            .await
            .unwrap();
        let again: Vec<String> = sqlx::query_scalar(table).fetch_all(&rebuilt).await.unwrap();
        assert!(!live.is_empty(), "{table}");
        assert_eq!(again, live, "{table}");
    }
    assert_eq!(
        kinds_in_history(&rebuilt).await,
        kinds_in_history(&env.pool).await,
        "the rebuilt history has the same rows"
    );
    let again = run(&env, &["replay", "--rebuild", &rebuilt_db.url]).await;
    assert_eq!(again.code, Some(1));
    assert!(
        again.stderr.contains("already has coupons"),
        "{}",
        again.stderr
    );
    rebuilt.close().await;
    rebuilt_db.drop_database().await;

    // History by coupon and by user, in time order.
    let kinds = |text: &str| -> Vec<String> {
        text.lines()
            .map(|line| line.split('\t').nth(1).unwrap_or_default().to_owned())
            .collect()
    };
    let coupon = run(
        &env,
        &[
            "history",
            "--coupon",
            &scenario.expired_then_redeemed.to_lowercase(),
        ],
    )
    .await;
    assert_eq!(coupon.code, Some(0), "{}", coupon.stderr);
    assert_eq!(
        kinds(&coupon.stdout),
        ["created", "granted", "released", "granted", "redeemed"],
        "{}",
        coupon.stdout
    );
    let users: Vec<&str> = coupon
        .stdout
        .lines()
        .map(|line| line.split('\t').nth(3).unwrap())
        .collect();
    assert_eq!(users, ["-", "alice", "alice", "dave", "dave"]);
    let later = run(
        &env,
        &[
            "history",
            "--coupon",
            &scenario.expired_then_redeemed,
            "--since",
            &middle,
        ],
    )
    .await;
    assert_eq!(kinds(&later.stdout), ["released", "granted", "redeemed"]);
    let bob = run(&env, &["history", "--user", "bob"]).await;
    assert_eq!(
        kinds(&bob.stdout),
        ["granted", "redeemed", "rejected"],
        "{}",
        bob.stdout
    );
    let detail: Value = serde_json::from_str(
        bob.stdout
            .lines()
            .nth(2)
            .unwrap()
            .split('\t')
            .nth(4)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(detail["reason"], "rate_limited");
    let nobody = run(&env, &["history"]).await;
    assert_ne!(nobody.code, Some(0), "a user or a coupon is required");

    let _ = std::fs::remove_dir_all(&dir);
}

fn envelope<E: coupon_schemas::Event>(at: i64) -> Option<coupon_schemas::Envelope> {
    Some(coupon_schemas::new_envelope::<E>(
        uuid::Uuid::new_v4().to_string(),
        at,
        "test-volume",
        "",
    ))
}

/// The number in `text` just before `unit` (e.g. the rate before "events/s").
fn number_before(text: &str, unit: &str) -> f64 {
    let head = &text[..text.find(unit).expect(unit)];
    let digits: String = head
        .trim_end()
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().expect("a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_rebuild_a_20k_event_log_exactly_and_report_their_rates() {
    const COUPONS: u64 = 10_000;
    let env = TestEnv::new().await;
    let publisher = Publisher::new(&env.kafka, "test-volume").unwrap();
    let t0 = Utc::now().timestamp_millis() - 3_600_000;
    let base = ((t0 as u64 - coupon_domain::snowflake::EPOCH_MS) << 22) as i64;
    let ids: Vec<i64> = (0..COUPONS as i64).map(|i| base + i).collect();
    let code = |i: usize| {
        coupon_domain::CouponCode::from_id(
            coupon_domain::SnowflakeId::from_raw(ids[i] as u64).unwrap(),
        )
        .to_string()
    };
    let created: Vec<(String, CouponsCreated)> = ids
        .chunks(1_000)
        .enumerate()
        .map(|(n, chunk)| {
            let batch = uuid::Uuid::new_v4().to_string();
            (
                batch.clone(),
                CouponsCreated {
                    envelope: envelope::<CouponsCreated>(t0),
                    batch_id: batch,
                    employee_id: "e1".into(),
                    category: "Bulk".into(),
                    coupon_ids: chunk.to_vec(),
                    chunk_index: n as u32,
                    chunk_count: 1,
                    campaign: None,
                },
            )
        })
        .collect();
    let granted_at = |i: usize| t0 + 1_000 + i as i64;
    let grants: Vec<(String, ClaimDecided)> = (0..COUPONS as usize)
        .map(|i| {
            let user = format!("user-{i}");
            (
                user.clone(),
                ClaimDecided {
                    envelope: envelope::<ClaimDecided>(granted_at(i)),
                    request_id: format!("r-{i}"),
                    user_id: user,
                    outcome: ClaimOutcome::Granted as i32,
                    coupon_code: code(i),
                    category: "Bulk".into(),
                    expires_at_ms: granted_at(i) + 60_000,
                    ..Default::default()
                },
            )
        })
        .collect();
    let redemptions: Vec<(String, PurchaseDecided)> = (0..COUPONS as usize)
        .step_by(2)
        .map(|i| {
            let at = granted_at(i) + 30_000;
            (
                format!("user-{i}"),
                PurchaseDecided {
                    envelope: envelope::<PurchaseDecided>(at),
                    request_id: format!("p-{i}"),
                    user_id: format!("user-{i}"),
                    coupon_code: code(i),
                    order_id: format!("o-{i}"),
                    outcome: PurchaseOutcome::Redeemed as i32,
                    redeemed_at_ms: at,
                    ..Default::default()
                },
            )
        })
        .collect();
    let expirations: Vec<(String, HoldExpired)> = (1..COUPONS as usize)
        .step_by(2)
        .map(|i| {
            let at = granted_at(i) + 60_000;
            (
                code(i),
                HoldExpired {
                    envelope: envelope::<HoldExpired>(at),
                    coupon_code: code(i),
                    user_id: format!("user-{i}"),
                    hold_id: format!("r-{i}"),
                    held_until_ms: at,
                    campaign_ended_at_ms: 0,
                },
            )
        })
        .collect();
    let published = std::time::Instant::now();
    publisher
        .send_all(&env.topics.created(), &created)
        .await
        .unwrap();
    publisher
        .send_all(&env.topics.claim_results(), &grants)
        .await
        .unwrap();
    publisher
        .send_all(&env.topics.purchase_results(), &redemptions)
        .await
        .unwrap();
    publisher
        .send_all(&env.topics.expirations(), &expirations)
        .await
        .unwrap();
    let events = created.len() + grants.len() + redemptions.len() + expirations.len();
    eprintln!("published {events} events in {:.2?}", published.elapsed());

    let path = std::env::temp_dir().join(format!("{}-volume.jsonl", env.name));
    let replay = run(&env, &["replay", "--output", path.to_str().unwrap()]).await;
    assert_eq!(replay.code, Some(0), "{}", replay.stderr);
    assert!(
        replay.stderr.contains(&format!(
            "replayed {events} records ({events} written, 0 undecodable)"
        )),
        "{}",
        replay.stderr
    );
    let lines = std::fs::read_to_string(&path).unwrap().lines().count();
    assert_eq!(lines, events);
    let _ = std::fs::remove_file(&path);

    // The test database is fresh (no system ran on it): rebuild into it.
    let rebuild = run(&env, &["replay", "--rebuild", &env.database_url]).await;
    assert_eq!(rebuild.code, Some(0), "{}", rebuild.stderr);
    eprintln!("rebuild: {}", rebuild.stdout.trim());
    assert!(
        rebuild
            .stdout
            .contains(&format!("rebuilt from {events} events")),
        "{}",
        rebuild.stdout
    );
    let counts = env.status_counts().await;
    assert_eq!(
        (counts.available, counts.held, counts.redeemed),
        (COUPONS as i64 / 2, 0, COUPONS as i64 / 2)
    );
    assert_eq!(
        env.count("SELECT count(*) FROM users WHERE last_coupon_at IS NOT NULL")
            .await,
        COUPONS as i64
    );
    let wrong_time = env
        .count(&format!(
            "SELECT count(*) FROM users
             WHERE last_coupon_at <> to_timestamp(({t0} + 1000 + substr(user_id, 6)::bigint) / 1000.0)"
        ))
        .await;
    assert_eq!(wrong_time, 0, "last_coupon_at is the grant's time");
    let history = kinds_in_history(&env.pool).await;
    let expected: BTreeMap<String, i64> = [
        ("created", COUPONS as i64),
        ("granted", COUPONS as i64),
        ("redeemed", COUPONS as i64 / 2),
        ("released", COUPONS as i64 / 2),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n))
    .collect();
    assert_eq!(history, expected);
    eprintln!(
        "RATES: replay {:.0} records/s, rebuild {:.0} events/s over {events} events",
        number_before(&replay.stderr, "records/s"),
        number_before(&rebuild.stdout, "events/s")
    );
}

/// Issue #24, item 7: the log lives as long as what it rebuilds. Every
/// topic is created keeping its records for ever; a topic that keeps them
/// for less (made by hand, or before the setting) is set right by
/// `couponctl topics`; and an audit or rebuild over a log whose beginning
/// was deleted says so instead of reporting the loss as differences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_keeps_its_records_and_a_cut_log_is_refused_not_compared() {
    use coupon_platform::kafka::admin::{set_topic_configs, topic_config};
    let env = TestEnv::new().await;
    let names = env.topics.all();
    let kept = topic_config(&env.kafka, &names, "retention.ms")
        .await
        .unwrap();
    assert_eq!(kept.len(), names.len());
    for (topic, value) in &kept {
        assert_eq!(value.as_deref(), Some("-1"), "{topic}");
    }

    // A topic made with the broker's 7 days: `couponctl topics` fixes it.
    let created = env.topics.created();
    set_topic_configs(
        &env.kafka,
        &created,
        &[("retention.ms".into(), "604800000".into())],
    )
    .await
    .unwrap();
    let topics = run(&env, &["topics"]).await;
    assert_eq!(topics.code, Some(0), "{}", topics.stderr);
    assert!(
        topics
            .stdout
            .contains(&format!("{created}\texists; retention.ms 604800000 -> -1")),
        "{}",
        topics.stdout
    );
    let kept = topic_config(&env.kafka, std::slice::from_ref(&created), "retention.ms")
        .await
        .unwrap();
    assert_eq!(kept[0].1.as_deref(), Some("-1"));
    // The request topics keep their broker time stamps through the change.
    let stamps = topic_config(&env.kafka, &[env.topics.claims()], "message.timestamp.type")
        .await
        .unwrap();
    assert_eq!(stamps[0].1.as_deref(), Some("LogAppendTime"));

    let app = env.start(&[Role::Coupons], |_| {}).await;
    release(&env, "Kept", 5).await;
    let whole = run(&env, &["audit"]).await;
    assert_eq!(whole.code, Some(0), "{}\n{}", whole.stdout, whole.stderr);

    // The first records of the created topic go, as retention would take them.
    let partitions = {
        let kafka = env.kafka.clone();
        let topic = created.clone();
        tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::{BaseConsumer, Consumer as _};
            let consumer: BaseConsumer = kafka.client_config().create().unwrap();
            (0..2)
                .map(|p| {
                    let (_, high) = consumer
                        .fetch_watermarks(&topic, p, Duration::from_secs(10))
                        .unwrap();
                    (p, high)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap()
    };
    let mut list = rdkafka::TopicPartitionList::new();
    for (partition, high) in &partitions {
        if *high > 0 {
            list.add_partition_offset(&created, *partition, rdkafka::Offset::Offset(*high))
                .unwrap();
        }
    }
    assert!(
        list.count() > 0,
        "the release is on the log: {partitions:?}"
    );
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        env.kafka.client_config().create().unwrap();
    admin
        .delete_records(&list, &rdkafka::admin::AdminOptions::new())
        .await
        .expect("delete the first records");

    let cut = run(&env, &["audit"]).await;
    assert_ne!(cut.code, Some(0), "{}", cut.stdout);
    assert!(
        cut.stderr
            .contains("needs the whole log, but its beginning was deleted")
            && cut.stderr.contains(&format!("{created}[")),
        "{}",
        cut.stderr
    );
    assert!(
        !cut.stdout.contains("coupon "),
        "no differences reported from a cut log: {}",
        cut.stdout
    );
    app.stop().await;
}
