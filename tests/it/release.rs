//! Releasing coupons: CLI and HTTP to `coupons` rows and history, exactly once.

use std::collections::HashSet;
use std::time::Duration;

use prost::Message;
use serde_json::Value;

use coupon_consumers::{coupons, history};
use coupon_domain::CouponCode;
use coupon_platform::kafka::{decode, Publisher, Record};
use coupon_producers::keygen::{self, KeygenError};
use coupon_schemas::{CouponsCreated, DeadLetter};
use couponctl::app::{self, Role};

use crate::harness::{eventually, release, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_release_projects_every_coupon_and_replays_add_nothing() {
    let env = TestEnv::new().await;
    let app = env.start(&[Role::Coupons, Role::History], |_| {}).await;

    let output = env
        .couponctl()
        .args([
            "issue",
            "--employee",
            "e1",
            "--category",
            "Electronics",
            "--count",
            "10000",
        ])
        .output()
        .expect("run couponctl issue");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "issue failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("issued 10000 Electronics coupons"),
        "{stdout}"
    );

    eventually(
        "10,000 available coupons and 10,000 history rows",
        Duration::from_secs(60),
        || async {
            env.count("SELECT count(*) FROM coupons WHERE status = 'available'")
                .await
                == 10_000
                && env
                    .count("SELECT count(*) FROM coupon_history WHERE kind = 'created'")
                    .await
                    == 10_000
        },
    )
    .await;

    // Codes are the readable form of the Snowflake ids and decode back.
    let rows: Vec<(String, i64, String, String)> =
        sqlx::query_as("SELECT code, id, category, employee_id FROM coupons ORDER BY id LIMIT 50")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    for (code, id, category, employee) in rows {
        assert_eq!(CouponCode::parse(&code).unwrap().id().as_i64(), id);
        assert_eq!(
            (category.as_str(), employee.as_str()),
            ("Electronics", "e1")
        );
    }

    // Publish every batch event again, byte for byte: nothing changes.
    let records = env.read_topic(&env.topics.created()).await;
    assert_eq!(
        records.len(),
        10,
        "10,000 coupons travel as 10 chunks of 1,000"
    );
    let publisher = Publisher::new(&env.kafka, "replayer").unwrap();
    for record in &records {
        publisher
            .send_bytes(
                &env.topics.created(),
                record.key.as_deref(),
                record.value.as_deref().unwrap(),
            )
            .await
            .unwrap();
    }
    env.wait_caught_up("coupons", &env.topics.created(), Duration::from_secs(60))
        .await;
    env.wait_caught_up("history", &env.topics.created(), Duration::from_secs(60))
        .await;
    assert_eq!(env.count("SELECT count(*) FROM coupons").await, 10_000);
    assert_eq!(
        env.count("SELECT count(*) FROM coupon_history").await,
        10_000
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_release_requires_the_admin_token_and_answers_with_codes() {
    let env = TestEnv::new().await;
    let app = env.start(&[Role::Gateway, Role::Coupons], |_| {}).await;
    let http = TestEnv::http_client();
    let url = app.url("/api/v1/coupon");
    let body = serde_json::json!({"id": "e7", "category": "Books", "count": 5});

    let response = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"], "unauthorized");

    let response = http
        .post(&url)
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    for bad in [
        serde_json::json!({"id": "e7", "category": "Books", "count": 0}),
        serde_json::json!({"id": "", "category": "Books"}),
        serde_json::json!({"id": "e7", "category": 5}),
        serde_json::json!({"id": "e7", "category": "Books", "count": -3}),
    ] {
        let response = http
            .post(&url)
            .bearer_auth("admin-secret")
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"], "invalid_request", "{bad}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let response = http
        .post(&url)
        .bearer_auth("admin-secret")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    let response = http
        .post(&url)
        .bearer_auth("admin-secret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let created: Value = response.json().await.unwrap();
    let codes: Vec<String> = created["codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(codes.len(), 5);
    assert!(created["batch_id"].as_str().is_some());
    let unique: HashSet<_> = codes.iter().collect();
    assert_eq!(unique.len(), 5);

    eventually(
        "the 5 coupons are projected",
        Duration::from_secs(30),
        || async {
            env.count(
                "SELECT count(*) FROM coupons WHERE category = 'Books' AND status = 'available'",
            )
            .await
                == 5
        },
    )
    .await;
    let status: Value = http
        .get(app.url(&format!("/api/v1/coupon/{}", codes[0].to_lowercase())))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["coupon_code"], codes[0].as_str());
    assert_eq!(status["status"], "available");
    assert_eq!(status["category"], "Books");
    assert!(status["holder"].is_null());
    let missing = http
        .get(app.url("/api/v1/coupon/0000000000000"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let garbage = http
        .get(app.url("/api/v1/coupon/not-a-code"))
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    app.stop().await;
}

/// The `coupons.created` events of a 1,500-coupon release by `employee`, as
/// `couponctl issue` would publish them, with codes from a generator lease
/// of the given datacenter id (each test its own, so their codes differ).
async fn release_events(
    env: &TestEnv,
    publisher: &Publisher,
    employee: &str,
    category: &str,
    datacenter: u16,
) -> Vec<(String, coupon_schemas::CouponsCreated)> {
    let request = coupon_producers::issue::IssueRequest {
        employee: coupon_domain::EmployeeId::parse(employee).unwrap(),
        category: coupon_domain::Category::parse(category).unwrap(),
        count: 1_500,
        campaign: None,
    };
    let mut generator = keygen::lease(&env.pool, datacenter, Duration::from_secs(10))
        .await
        .unwrap();
    let codes: Vec<CouponCode> = generator
        .generate(1_500)
        .unwrap()
        .into_iter()
        .map(CouponCode::from_id)
        .collect();
    generator.release().await.unwrap();
    coupon_producers::issue::batch_events(publisher, uuid::Uuid::new_v4(), &request, &codes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_batches_are_idempotent_and_poison_goes_to_dead_letter() {
    let env = TestEnv::new().await;
    let ctx = app::connect(&env.config()).await.unwrap();
    let publisher = Publisher::new(&env.kafka, "test").unwrap();
    let events = release_events(&env, &publisher, "e2", "Toys", 3).await;
    let as_record = |offset: i64, value: Vec<u8>| Record {
        topic: env.topics.created(),
        partition: 0,
        offset,
        key: Some(b"k".to_vec()),
        value: Some(value),
        timestamp_ms: None,
    };
    let mut batch: Vec<Record> = events
        .iter()
        .enumerate()
        .map(|(i, (_, e))| as_record(i as i64, e.encode_to_vec()))
        .collect();
    batch.push(as_record(10, b"\xff\xfe not protobuf".to_vec()));
    let mut wrong_type = events[0].1.clone();
    wrong_type.envelope.as_mut().unwrap().event_type = "coupons.v1.Nonsense".into();
    batch.push(as_record(11, wrong_type.encode_to_vec()));
    let mut negative = events[0].1.clone();
    negative.coupon_ids = vec![-5];
    batch.push(as_record(12, negative.encode_to_vec()));

    coupons::handle_batch(&ctx, &batch).await.unwrap();
    assert_eq!(env.count("SELECT count(*) FROM coupons").await, 1_500);
    coupons::handle_batch(&ctx, &batch).await.unwrap();
    assert_eq!(
        env.count("SELECT count(*) FROM coupons").await,
        1_500,
        "redelivery adds nothing"
    );

    let letters = env.read_topic(&env.topics.dead_letter()).await;
    assert_eq!(letters.len(), 6, "three poison records, delivered twice");
    let reasons: Vec<String> = letters
        .iter()
        .map(|r| {
            let letter = decode::<DeadLetter>(r).unwrap();
            assert_eq!(letter.source_topic, env.topics.created());
            assert!(letter.source_offset >= 10);
            assert_eq!(letter.consumer, "coupons");
            if letter.source_offset == 10 {
                assert_eq!(letter.original_value, b"\xff\xfe not protobuf");
            }
            letter.reason
        })
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("not a valid protobuf")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("coupons.v1.Nonsense")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("negative")),
        "{reasons:?}"
    );
    let _ = CouponsCreated::default();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_id_leases_are_exclusive_and_resume_after_the_last_id() {
    let env = TestEnv::new().await;
    let leases = futures::future::join_all(
        (0..32).map(|_| keygen::lease(&env.pool, 9, Duration::from_secs(30))),
    )
    .await;
    let mut leases: Vec<_> = leases.into_iter().map(|l| l.expect("lease")).collect();
    let machines: HashSet<u16> = leases.iter().map(|l| l.machine()).collect();
    assert_eq!(
        machines.len(),
        32,
        "32 concurrent leases get 32 different machine ids"
    );

    let error = keygen::lease(&env.pool, 9, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(matches!(error, KeygenError::NoFreeMachineId(9)), "{error}");
    assert!(error
        .to_string()
        .contains("all 32 machine ids of datacenter 9 are leased"));

    // Another datacenter is independent.
    keygen::lease(&env.pool, 10, Duration::from_secs(30))
        .await
        .unwrap();

    let mut first = leases.swap_remove(0);
    let machine = first.machine();
    let last_id = *first.generate(5_000).unwrap().last().unwrap();
    first.release().await.unwrap();
    let mut again = keygen::lease(&env.pool, 9, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        again.machine(),
        machine,
        "the released id is the only free one"
    );
    let next = again.generate(1).unwrap()[0];
    assert!(
        next > last_id,
        "a new owner starts after the previous owner's last id"
    );
    assert!(next.parts().unix_ms > last_id.parts().unix_ms);
}

/// The projector and the history sink write with `COPY`, which a row already
/// there makes fail whole: a chunk that is partly new (a redelivery that
/// overlaps a batch already written) must still add exactly the new rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_writes_fall_back_to_skipping_known_rows() {
    let env = TestEnv::new().await;
    let publisher = Publisher::new(&env.kafka, "test").unwrap();
    let events = release_events(&env, &publisher, "e3", "Garden", 4).await;
    let all: Vec<coupons::NewCoupon> = events
        .iter()
        .flat_map(|(_, e)| coupons::coupons_of(e).unwrap())
        .collect();

    assert_eq!(
        coupons::insert_coupons(&env.pool, &all[..500])
            .await
            .unwrap(),
        500
    );
    assert_eq!(
        coupons::insert_coupons(&env.pool, &all).await.unwrap(),
        1_000,
        "only the new coupons are added"
    );
    assert_eq!(coupons::insert_coupons(&env.pool, &all).await.unwrap(), 0);
    assert_eq!(env.count("SELECT count(*) FROM coupons").await, 1_500);

    let records: Vec<Record> = events
        .iter()
        .enumerate()
        .map(|(i, (_, e))| Record {
            topic: env.topics.created(),
            partition: 0,
            offset: i as i64,
            key: None,
            value: Some(e.encode_to_vec()),
            timestamp_ms: None,
        })
        .collect();
    let rows: Vec<history::HistoryRow> = records
        .iter()
        .flat_map(|r| history::rows_of(&env.topics, r).unwrap())
        .collect();
    assert_eq!(rows.len(), 1_500);
    assert_eq!(
        history::append_bulk(&env.pool, &rows[..700]).await.unwrap(),
        700
    );
    assert_eq!(
        history::append_bulk(&env.pool, &rows).await.unwrap(),
        800,
        "only the new history rows are added"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM coupon_history").await,
        1_500
    );
    // What COPY wrote reads back as the statement would have written it.
    type Written = (
        String,
        String,
        Value,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    );
    let (code, employee, detail, generated_at, occurred_at): Written = sqlx::query_as(
        "SELECT h.coupon_code, c.employee_id, h.detail, c.generated_at, h.occurred_at
         FROM coupon_history h JOIN coupons c ON c.code = h.coupon_code ORDER BY c.id LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(code, all[0].code.to_string());
    assert_eq!(generated_at, all[0].generated_at);
    assert_eq!(occurred_at, rows[0].occurred_at);
    assert_eq!(employee, "e3");
    assert_eq!(detail["category"], "Garden");
}

// Idempotent releases (issue #24, item 9).

/// POSTs a release (with `key` as its `Idempotency-Key`): its status and body.
async fn post_release(
    http: &reqwest::Client,
    app: &crate::harness::App,
    key: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut request = http
        .post(app.url("/api/v1/coupon"))
        .bearer_auth("admin-secret")
        .json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("release request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The coupon ids on `coupons.created`: every one (a chunk published twice
/// counts twice) and the distinct ones.
async fn ids_on_the_log(env: &TestEnv) -> (usize, HashSet<i64>) {
    let mut all = 0;
    let mut distinct = HashSet::new();
    for record in env.read_topic(&env.topics.created()).await {
        let event = decode::<CouponsCreated>(&record).expect("a CouponsCreated");
        all += event.coupon_ids.len();
        distinct.extend(event.coupon_ids);
    }
    (all, distinct)
}

/// Watches the record count of `coupons.created` by its partitions'
/// watermarks (made before the release it watches, so that polling starts
/// at once).
struct Watermarks {
    consumer: std::sync::Arc<rdkafka::consumer::BaseConsumer>,
    topic: String,
    partitions: Vec<i32>,
}

impl Watermarks {
    async fn new(env: &TestEnv) -> Self {
        use rdkafka::consumer::Consumer;
        let kafka = env.kafka.clone();
        let topic = env.topics.created();
        tokio::task::spawn_blocking(move || {
            let mut config = kafka.client_config();
            config.set(
                "group.id",
                format!("it-watermarks-{}", uuid::Uuid::new_v4().simple()),
            );
            let consumer: rdkafka::consumer::BaseConsumer = config.create().expect("consumer");
            let metadata = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .expect("metadata");
            let partitions = metadata.topics()[0]
                .partitions()
                .iter()
                .map(|p| p.id())
                .collect();
            Watermarks {
                consumer: std::sync::Arc::new(consumer),
                topic,
                partitions,
            }
        })
        .await
        .expect("watermarks")
    }

    /// Waits (at most `within`) until the topic holds at least `at_least`
    /// records; returns how many it holds.
    async fn wait_for(&self, at_least: i64, within: Duration) -> i64 {
        use rdkafka::consumer::Consumer;
        let (consumer, topic, partitions) = (
            self.consumer.clone(),
            self.topic.clone(),
            self.partitions.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + within;
            loop {
                let records: i64 = partitions
                    .iter()
                    .map(|&p| {
                        let (low, high) = consumer
                            .fetch_watermarks(&topic, p, Duration::from_secs(10))
                            .expect("watermarks");
                        high - low
                    })
                    .sum();
                if records >= at_least {
                    return records;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{topic} has {records} records after {within:?}, waited for {at_least}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .await
        .expect("watermark poller")
    }
}

async fn coupons_of(env: &TestEnv, category: &str) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM coupons WHERE category = $1")
        .bind(category)
        .fetch_one(&env.pool)
        .await
        .expect("count coupons")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_release_with_one_key_answers_the_first_batch() {
    let env = TestEnv::new().await;
    let app = env.start(&[Role::Gateway, Role::Coupons], |_| {}).await;
    let http = TestEnv::http_client();
    let body = serde_json::json!({"id": "e1", "category": "Books", "count": 1_500});

    let mut answers = Vec::new();
    for _ in 0..3 {
        let (status, answer) = post_release(&http, &app, Some("books-2026-12-02"), &body).await;
        assert_eq!(status, 202, "{answer}");
        answers.push(answer);
    }
    assert_eq!(answers[0]["codes"].as_array().map(Vec::len), Some(1_500));
    assert_eq!(answers[0], answers[1], "a repeat answers the first batch");
    assert_eq!(answers[0], answers[2], "a repeat answers the first batch");

    eventually("1,500 Books coupons", Duration::from_secs(60), || async {
        coupons_of(&env, "Books").await == 1_500
    })
    .await;
    env.wait_caught_up("coupons", &env.topics.created(), Duration::from_secs(60))
        .await;
    assert_eq!(env.count("SELECT count(*) FROM coupons").await, 1_500);
    let (all, distinct) = ids_on_the_log(&env).await;
    assert_eq!(
        (all, distinct.len()),
        (1_500, 1_500),
        "the batch is on the log once"
    );

    // Keys that are not 1-128 visible ASCII characters are refused.
    for bad in ["", "a b", &"k".repeat(129)] {
        let (status, answer) = post_release(&http, &app, Some(bad), &body).await;
        assert_eq!(status, 400, "{bad:?}: {answer}");
        assert_eq!(answer["error"], "invalid_request");
    }
    let response = http
        .post(app.url("/api/v1/coupon"))
        .bearer_auth("admin-secret")
        .header(
            "Idempotency-Key",
            reqwest::header::HeaderValue::from_bytes(b"cl\xe9").unwrap(),
        )
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // A new key is a new batch.
    let (status, other) = post_release(&http, &app, Some("books-2"), &body).await;
    assert_eq!(status, 202, "{other}");
    assert_ne!(other["batch_id"], answers[0]["batch_id"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_with_another_body_is_refused_and_mints_nothing() {
    let env = TestEnv::new().await;
    let app = env.start(&[Role::Gateway, Role::Coupons], |_| {}).await;
    let http = TestEnv::http_client();
    let body = serde_json::json!({"id": "e1", "category": "Toys", "count": 100});
    let (status, first) = post_release(&http, &app, Some("toys"), &body).await;
    assert_eq!(status, 202, "{first}");

    for other in [
        serde_json::json!({"id": "e1", "category": "Toys", "count": 101}),
        serde_json::json!({"id": "e1", "category": "Games", "count": 100}),
        serde_json::json!({"id": "e2", "category": "Toys", "count": 100}),
    ] {
        let (status, answer) = post_release(&http, &app, Some("toys"), &other).await;
        assert_eq!(status, 422, "{other}: {answer}");
        assert_eq!(answer["error"], "idempotency_key_reused", "{answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("toys") && message.contains("new key"),
            "{message}"
        );
    }
    eventually("100 Toys coupons", Duration::from_secs(60), || async {
        coupons_of(&env, "Toys").await == 100
    })
    .await;
    env.wait_caught_up("coupons", &env.topics.created(), Duration::from_secs(60))
        .await;
    assert_eq!(env.count("SELECT count(*) FROM coupons").await, 100);
    assert_eq!(ids_on_the_log(&env).await.0, 100, "nothing else was minted");
    app.stop().await;
}

/// A client that goes away mid-release: with a key, two repeats answer the
/// one batch, completed; without a key the cut release completes on its own.
/// (Before: the handler was dropped mid-publish, and the repeats each minted
/// a new batch.)
///
/// The cut is the client leaving once the first chunks are on the log; on a
/// loaded machine the release can outrun the watcher, so each kind of release
/// is tried up to [`CUT_ATTEMPTS`] times, and every try, cut or not, must end
/// as exactly one complete batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_cut_mid_way_completes_and_repeats_add_nothing() {
    let env = TestEnv::new().await;
    let app = env.start(&[Role::Gateway, Role::Coupons], |_| {}).await;
    let http = TestEnv::http_client();
    let marks = Watermarks::new(&env).await;
    let mut categories = Vec::new();

    // With a key: the two repeats after the cut answer the one batch.
    let mut cut_once = false;
    for attempt in 0..CUT_ATTEMPTS {
        let category = format!("Keyed{attempt}");
        let key = format!("keyed-50k-{attempt}");
        let body = serde_json::json!({"id": "e1", "category": category, "count": CUT_COUNT});
        cut_once |= cut_a_release(&http, &app, &marks, Some(&key), &body).await;
        let mut answers = Vec::new();
        for _ in 0..2 {
            let (status, answer) = post_release(&http, &app, Some(&key), &body).await;
            assert_eq!(status, 202, "{answer}");
            answers.push(answer);
        }
        assert_eq!(answers[0], answers[1]);
        assert_eq!(answers[0]["count"], CUT_COUNT);
        eventually(
            "the keyed release is complete",
            Duration::from_secs(120),
            || async { coupons_of(&env, &category).await >= CUT_COUNT },
        )
        .await;
        categories.push(category);
        if cut_once {
            break;
        }
    }
    assert!(
        cut_once,
        "every keyed release was over before it could be cut"
    );

    // Without a key: cut the same way; it completes all the same.
    let mut cut_once = false;
    for attempt in 0..CUT_ATTEMPTS {
        let category = format!("Keyless{attempt}");
        let body = serde_json::json!({"id": "e1", "category": category, "count": CUT_COUNT});
        cut_once |= cut_a_release(&http, &app, &marks, None, &body).await;
        eventually(
            "the keyless release completes though its client left",
            Duration::from_secs(120),
            || async { coupons_of(&env, &category).await >= CUT_COUNT },
        )
        .await;
        categories.push(category);
        if cut_once {
            break;
        }
    }
    assert!(
        cut_once,
        "every keyless release was over before it could be cut"
    );

    env.wait_caught_up("coupons", &env.topics.created(), Duration::from_secs(120))
        .await;
    for category in &categories {
        assert_eq!(
            coupons_of(&env, category).await,
            CUT_COUNT,
            "one {category} batch"
        );
    }
    let releases = categories.len() as i64;
    assert_eq!(
        env.count("SELECT count(*) FROM coupons").await,
        releases * CUT_COUNT
    );
    let (_, distinct) = ids_on_the_log(&env).await;
    assert_eq!(
        distinct.len() as i64,
        releases * CUT_COUNT,
        "nothing else on the log"
    );
    app.stop().await;
}

/// The size of a release the test above cuts: 50 chunks, published 10 at a
/// time, so there is a moment between the first chunks and the last.
const CUT_COUNT: i64 = 50_000;
/// How often the test above tries to cut a release before it gives up.
const CUT_ATTEMPTS: usize = 4;

/// Posts a release and leaves (drops the request) as soon as its first
/// chunk is on the log; answers whether the release was then still under way.
async fn cut_a_release(
    http: &reqwest::Client,
    app: &crate::harness::App,
    marks: &Watermarks,
    key: Option<&str>,
    body: &Value,
) -> bool {
    let before = marks.wait_for(0, Duration::from_secs(1)).await;
    let mut request = http
        .post(app.url("/api/v1/coupon"))
        .bearer_auth("admin-secret")
        .json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let cut = tokio::spawn(request.send());
    let on_log = marks.wait_for(before + 1, Duration::from_secs(60)).await;
    cut.abort();
    let _ = cut.await;
    on_log - before < CUT_COUNT / 1_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_repeats_of_one_key_release_one_batch() {
    let env = TestEnv::new().await;
    let app = env.start(&[Role::Gateway, Role::Coupons], |_| {}).await;
    let http = TestEnv::http_client();
    let body = serde_json::json!({"id": "e1", "category": "Garden", "count": 5_000});
    let answers = futures::future::join_all(
        (0..8).map(|_| post_release(&http, &app, Some("garden-once"), &body)),
    )
    .await;
    for (status, answer) in &answers {
        assert_eq!(*status, 202, "{answer}");
        assert_eq!(answer, &answers[0].1, "every repeat answers the one batch");
    }
    eventually("5,000 Garden coupons", Duration::from_secs(60), || async {
        coupons_of(&env, "Garden").await == 5_000
    })
    .await;
    env.wait_caught_up("coupons", &env.topics.created(), Duration::from_secs(60))
        .await;
    assert_eq!(env.count("SELECT count(*) FROM coupons").await, 5_000);
    let (all, distinct) = ids_on_the_log(&env).await;
    assert_eq!((all, distinct.len()), (5_000, 5_000));
    app.stop().await;
}

/// `couponctl issue --idempotency-key`, killed (`kill -9`) mid-publish, then
/// run again: the second run publishes the stored codes again and the
/// release is exactly its count, in `coupons` and in the history (the
/// republished chunks keep their event ids); a third run prints the same
/// batch and mints nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cli_release_is_completed_by_running_it_again() {
    let env = TestEnv::new().await;
    let app = env.start(&[Role::Coupons, Role::History], |_| {}).await;
    const COUNT: i64 = 100_000;
    let args = [
        "issue",
        "--employee",
        "e1",
        "--category",
        "Electronics",
        "--count",
        "100000",
        "--idempotency-key",
        "xmas-electronics",
    ];
    let marks = Watermarks::new(&env).await;
    let mut first = env
        .couponctl()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run couponctl issue");
    let on_log = marks.wait_for(1, Duration::from_secs(60)).await;
    first.kill().expect("kill -9 couponctl issue");
    let _ = first.wait();
    assert!(on_log < COUNT / 1_000, "the run was over before its kill");

    let mut printed = Vec::new();
    for _ in 0..2 {
        let output = env.couponctl().args(args).output().expect("run again");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("issued 100000 Electronics coupons"),
            "{stdout}"
        );
        assert!(stdout.contains("nothing new was minted"), "{stdout}");
        let batch = stdout
            .split("as batch ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_default()
            .to_owned();
        printed.push(batch);
    }
    assert_eq!(printed[0], printed[1]);

    // Another body under the key: refused, nothing minted.
    let output = env
        .couponctl()
        .args([
            "issue",
            "--employee",
            "e1",
            "--category",
            "Toys",
            "--count",
            "5",
        ])
        .args(["--idempotency-key", "xmas-electronics"])
        .output()
        .expect("run with another body");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("already used"));

    eventually(
        "100,000 coupons and 100,000 created rows in the history",
        Duration::from_secs(180),
        || async {
            env.count("SELECT count(*) FROM coupons").await >= COUNT
                && env
                    .count("SELECT count(*) FROM coupon_history WHERE kind = 'created'")
                    .await
                    >= COUNT
        },
    )
    .await;
    env.wait_caught_up("coupons", &env.topics.created(), Duration::from_secs(120))
        .await;
    env.wait_caught_up("history", &env.topics.created(), Duration::from_secs(120))
        .await;
    assert_eq!(env.count("SELECT count(*) FROM coupons").await, COUNT);
    assert_eq!(
        env.count("SELECT count(*) FROM coupon_history WHERE kind = 'created'")
            .await,
        COUNT,
        "republished chunks add no history"
    );
    let (_, distinct) = ids_on_the_log(&env).await;
    assert_eq!(distinct.len() as i64, COUNT);
    app.stop().await;
}

/// A release that is large against the table refreshes the planner's
/// statistics of `coupons` at once (`store::statistics::refresh_coupons_after_insert`).
/// Without it the claim processor's cached plan for the grant statement,
/// made while the pool was nearly empty, joined each batch against every
/// available coupon, and a steady day right after a release granted 543 of
/// 50,000 coupons in 20 s. Autovacuum is off for the table here, so only the
/// release can have analyzed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_release_refreshes_the_planner_statistics_of_coupons() {
    let env = TestEnv::new().await;
    sqlx::query("ALTER TABLE coupons SET (autovacuum_enabled = false)")
        .execute(&env.pool)
        .await
        .unwrap();
    let reltuples = || async {
        sqlx::query_scalar::<_, f64>(
            "SELECT reltuples::float8 FROM pg_class WHERE oid = 'coupons'::regclass",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    // A new table has never been analyzed.
    assert!(reltuples().await < 0.0);
    let app = env.start(&[Role::Coupons], |_| {}).await;

    release(&env, "Big", 20_000).await;
    eventually(
        "the statistics of coupons to know of the 20,000 released",
        Duration::from_secs(60),
        || async { reltuples().await >= 20_000.0 * 0.9 },
    )
    .await;
    assert_eq!(env.count("SELECT count(*) FROM coupons").await, 20_000);
    app.stop().await;
}
