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

use crate::harness::{eventually, TestEnv};

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
