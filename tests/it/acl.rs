//! Who may write what on the log: the ACL set of `infra/kafka/acls.tsv`
//! against the catalogue, and on a broker that authorizes every request
//! (KRaft's `StandardAuthorizer`, nothing allowed that no ACL allows), which
//! `infra/local/sasl.sh` starts next to the shared one (own ports, own
//! directory) with one SASL/PLAIN user per role. Anyone who can write
//! `created` mints coupons, and anyone who can write a results topic can
//! answer another user's request: the storefront's principal can do
//! neither, and a claim still goes through with every role on its own
//! principal.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::consumer::StreamConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::Message;
use serde_json::Value;

use coupon_platform::kafka::admin::AdminError;
use coupon_platform::kafka::{ensure_topics, PublishError, Publisher, TopicSpec};
use coupon_platform::{KafkaSettings, Topics};
use coupon_schemas::{ClaimDecided, PurchaseDecided, Role, TopicKind};

use crate::harness::{database_url, free_port, Child, TestEnv};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One line of the ACL table, with `{prefix}` left in.
#[derive(Debug, Clone)]
struct Acl {
    principal: String,
    resource: String,
    prefixed: bool,
    name: String,
    operations: Vec<String>,
}

fn table() -> Vec<Acl> {
    let text = std::fs::read_to_string(repo().join("infra/kafka/acls.tsv")).expect("acls.tsv");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 5, "five columns: {line}");
            assert!(matches!(f[1], "topic" | "group"), "{line}");
            assert!(matches!(f[2], "literal" | "prefixed"), "{line}");
            Acl {
                principal: f[0].into(),
                resource: f[1].into(),
                prefixed: f[2] == "prefixed",
                name: f[3].into(),
                operations: f[4].split(',').map(str::to_owned).collect(),
            }
        })
        .collect()
}

/// Whether the table lets `principal` do `operation` on the topic or group
/// `name` (written with `{prefix}`).
fn allowed(table: &[Acl], principal: &str, resource: &str, name: &str, operation: &str) -> bool {
    table.iter().any(|acl| {
        acl.principal == principal
            && acl.resource == resource
            && (if acl.prefixed {
                name.starts_with(&acl.name)
            } else {
                name == acl.name
            })
            && acl.operations.iter().any(|op| op == operation)
    })
}

fn topic(kind: TopicKind) -> String {
    format!("{{prefix}}.{}", kind.short())
}

/// The principal a consumer role runs as.
fn processor(role: Role) -> String {
    format!("{}-processor", role.name())
}

#[test]
fn the_acl_table_follows_the_catalogue() {
    let table = table();
    // Every consumer role reads exactly what the catalogue says it reads,
    // in its own group; the storefront reads the gateway's topics.
    for role in Role::CONSUMERS {
        let principal = processor(role);
        for kind in TopicKind::ALL {
            let reads = allowed(&table, &principal, "topic", &topic(kind), "Read");
            assert_eq!(
                reads,
                role.topics().contains(&kind),
                "{principal} reading {kind}"
            );
        }
        let group = format!("{{prefix}}.{}-processor", role.name());
        assert!(
            allowed(&table, &principal, "group", &group, "Read"),
            "{principal} in its group {group}"
        );
        assert!(
            allowed(
                &table,
                &principal,
                "topic",
                &topic(TopicKind::DeadLetter),
                "Write"
            ),
            "{principal} sets records aside"
        );
    }
    for kind in Role::Gateway.topics() {
        assert!(allowed(
            &table,
            "storefront",
            "topic",
            &topic(*kind),
            "Read"
        ));
    }
    // Who may write each topic, and nobody else. Minting and answering
    // are one principal each.
    let writers = |kind: TopicKind| -> BTreeSet<String> {
        table
            .iter()
            .map(|acl| acl.principal.clone())
            .filter(|p| allowed(&table, p, "topic", &topic(kind), "Write"))
            .collect()
    };
    let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(writers(TopicKind::Created), set(&["issuer"]));
    assert_eq!(writers(TopicKind::Claims), set(&["storefront"]));
    assert_eq!(writers(TopicKind::Purchases), set(&["storefront"]));
    assert_eq!(writers(TopicKind::ClaimResults), set(&["claims-processor"]));
    assert_eq!(
        writers(TopicKind::PurchaseResults),
        set(&["purchases-processor"])
    );
    assert_eq!(writers(TopicKind::Expirations), set(&["expiry-processor"]));
    assert_eq!(
        writers(TopicKind::Blacklist),
        set(&["issuer", "storefront"])
    );
    for kind in TopicKind::ALL {
        assert!(!writers(kind).is_empty(), "nobody may write {kind}");
    }
    assert_eq!(
        writers(TopicKind::DeadLetter),
        Role::CONSUMERS.iter().map(|r| processor(*r)).collect()
    );
    // Nobody but the operator creates topics, nobody deletes them, and
    // nothing is granted on the cluster (ACL changes are the super user's).
    for acl in &table {
        assert!(
            matches!(acl.resource.as_str(), "topic" | "group"),
            "{acl:?}"
        );
        assert!(
            !acl.operations
                .iter()
                .any(|op| op == "Delete" || op == "All"),
            "{acl:?}"
        );
        if acl.operations.iter().any(|op| op == "Create") {
            assert_eq!(acl.principal, "operator", "{acl:?}");
        }
    }
}

/// A throwaway SASL broker with the ACL set applied for one prefix, stopped
/// (`kill -9`) and removed on drop.
struct SaslBroker {
    dir: PathBuf,
    port: u16,
    controller_port: u16,
}

impl SaslBroker {
    fn script() -> PathBuf {
        repo().join("infra/local/sasl.sh")
    }

    fn start(prefix: &str) -> Self {
        // Ports below the ephemeral range (other tests' clients use those),
        // free when picked.
        let mut pick = Vec::new();
        while pick.len() < 2 {
            let port: u16 = rand::random_range(20_000..32_000);
            if !pick.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                pick.push(port);
            }
        }
        let broker = Self {
            dir: repo()
                .join(".state")
                .join(format!("sasl-it-{}", uuid::Uuid::new_v4().simple())),
            port: pick[0],
            controller_port: pick[1],
        };
        let output = broker
            .command()
            .arg("up")
            .arg(&broker.dir)
            .arg(prefix)
            .output()
            .expect("run infra/local/sasl.sh");
        assert!(
            output.status.success(),
            "starting the SASL broker failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        broker
    }

    fn command(&self) -> Command {
        let mut command = Command::new("bash");
        command
            .arg(Self::script())
            .env("SASL_KAFKA_PORT", self.port.to_string())
            .env(
                "SASL_KAFKA_CONTROLLER_PORT",
                self.controller_port.to_string(),
            );
        command
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `KAFKA_EXTRA` for `role`'s principal (`sasl.sh`: password
    /// `<role>-secret`).
    fn extra(role: &str) -> String {
        format!(
            "security.protocol=SASL_PLAINTEXT,sasl.mechanism=PLAIN,\
             sasl.username={role},sasl.password={role}-secret"
        )
    }

    fn as_role(&self, role: &str) -> KafkaSettings {
        let mut settings = KafkaSettings::new(self.brokers());
        settings.extra = Self::extra(role)
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        settings
    }
}

impl Drop for SaslBroker {
    fn drop(&mut self) {
        let _ = self
            .command()
            .arg("down")
            .arg(&self.dir)
            .env("SASL_STOP_SIGNAL", "KILL")
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What publishing one record as `publisher` to `topic` came to.
async fn publish(publisher: &Publisher, topic: &str) -> Result<(), PublishError> {
    match tokio::time::timeout(
        Duration::from_secs(30),
        publisher.send_bytes(topic, Some(b"acl-junk"), b"acl"),
    )
    .await
    {
        Ok(result) => result.map(|_| ()),
        Err(_) => panic!("no answer from the broker within 30 s publishing to {topic}"),
    }
}

fn assert_refused(result: Result<(), PublishError>, who: &str, topic: &str) {
    match result {
        Err(PublishError::Send {
            source: KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed),
            ..
        }) => {}
        other => {
            panic!("{who} publishing to {topic}: want TopicAuthorizationFailed, got {other:?}")
        }
    }
}

/// The next record `consumer` reads within 30 s.
async fn next_payload(consumer: &StreamConsumer, what: &str) -> (String, Vec<u8>) {
    match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
        Ok(Ok(message)) => (
            message.topic().to_owned(),
            message.payload().unwrap_or_default().to_vec(),
        ),
        Ok(Err(error)) => panic!("reading {what}: {error}"),
        Err(_) => panic!("nothing read from {what} within 30 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storefront_principal_writes_requests_and_reads_answers_only() {
    let name = TestEnv::fresh_name();
    let topics = Topics::new(&name);
    let prefix = name.clone();
    let broker = tokio::task::spawn_blocking(move || SaslBroker::start(&prefix))
        .await
        .expect("start the SASL broker");
    // The operator creates the topics (dropped before the broker: its
    // clean-up is refused, as the operator may not delete topics).
    let env = TestEnv::named(name.clone(), &database_url(), broker.as_role("operator")).await;

    let storefront = broker.as_role("storefront");
    let as_storefront = Publisher::new(&storefront, "acl-storefront").expect("producer");
    for kind in [TopicKind::Claims, TopicKind::Purchases] {
        let topic = topics.of(kind);
        if let Err(error) = publish(&as_storefront, &topic).await {
            panic!("the storefront may publish to {topic}: {error}");
        }
    }
    for kind in [
        TopicKind::Created,
        TopicKind::ClaimResults,
        TopicKind::PurchaseResults,
    ] {
        let topic = topics.of(kind);
        assert_refused(
            publish(&as_storefront, &topic).await,
            "the storefront",
            &topic,
        );
    }
    // It starts on topics that exist, but may not make one.
    let extra = TopicSpec {
        name: format!("{name}.extra"),
        partitions: 1,
        replication: None,
        configs: Vec::new(),
    };
    match ensure_topics(&storefront, std::slice::from_ref(&extra)).await {
        Err(AdminError::NotAllowed { topic }) => assert_eq!(topic, extra.name),
        other => panic!("the storefront creating a topic: {other:?}"),
    }

    // Only the issuer mints; a consumer role cannot.
    let as_issuer = Publisher::new(&broker.as_role("issuer"), "acl-issuer").expect("producer");
    if let Err(error) = publish(&as_issuer, &topics.created()).await {
        panic!("the issuer may publish to {}: {error}", topics.created());
    }
    let as_claims =
        Publisher::new(&broker.as_role("claims-processor"), "acl-claims").expect("producer");
    assert_refused(
        publish(&as_claims, &topics.created()).await,
        "the claims processor",
        &topics.created(),
    );

    // The storefront reads the answers, through the gateway's own results
    // consumer (a group id of its own, assigned at the ends), as the
    // processors publish them.
    let results = coupon_producers::gateway::replies::results_consumer(&storefront, &topics, 50)
        .await
        .expect("the storefront's results consumer");
    let as_purchases =
        Publisher::new(&broker.as_role("purchases-processor"), "acl-purchases").expect("producer");
    let claim = ClaimDecided {
        request_id: "acl-claim".into(),
        user_id: "acl-user".into(),
        ..Default::default()
    };
    as_claims
        .send(&topics.claim_results(), "acl-user", &claim)
        .await
        .expect("the claims processor answers a claim");
    let (topic, payload) = next_payload(&results, "claim-results as the storefront").await;
    assert_eq!(topic, topics.claim_results());
    assert_eq!(payload, prost::Message::encode_to_vec(&claim));
    let purchase = PurchaseDecided {
        request_id: "acl-purchase".into(),
        user_id: "acl-user".into(),
        ..Default::default()
    };
    as_purchases
        .send(&topics.purchase_results(), "acl-user", &purchase)
        .await
        .expect("the purchases processor answers a purchase");
    let (topic, payload) = next_payload(&results, "purchase-results as the storefront").await;
    assert_eq!(topic, topics.purchase_results());
    assert_eq!(payload, prost::Message::encode_to_vec(&purchase));
    drop(results);

    // The product's own processes, one principal each: the issuer
    // releases, the projector and the claim and purchase processors run as
    // their roles, the storefront's gateway (no admin token) answers a
    // claim and its purchase.
    let with_role = |role: &'static str| {
        let brokers = broker.brokers();
        move |command: &mut Command| {
            command
                .env("KAFKA_BROKERS", &brokers)
                .env("KAFKA_EXTRA", SaslBroker::extra(role))
                .env("REPLY_TIMEOUT", "20s");
        }
    };
    let mut issue = env.couponctl();
    with_role("issuer")(&mut issue);
    let output = issue
        .args([
            "issue",
            "--employee",
            "e-acl",
            "--category",
            "Acl",
            "--count",
            "2",
        ])
        .output()
        .expect("couponctl issue");
    assert!(
        output.status.success(),
        "couponctl issue as the issuer: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut coupons = Child::spawn_with(
        &env,
        &["consume", "coupons"],
        free_port(),
        "acl-coupons",
        with_role("coupons-processor"),
    );
    let mut claims = Child::spawn_with(
        &env,
        &["consume", "claims"],
        free_port(),
        "acl-claims",
        with_role("claims-processor"),
    );
    let mut purchases = Child::spawn_with(
        &env,
        &["consume", "purchases"],
        free_port(),
        "acl-purchases",
        with_role("purchases-processor"),
    );
    let port = free_port();
    let storefront_role = with_role("storefront");
    let mut gateway = Child::spawn_with(&env, &["gateway"], port, "acl-gateway", move |c| {
        storefront_role(c);
        c.env_remove("COUPON_ADMIN_TOKEN");
    });
    let base = format!("http://127.0.0.1:{port}");
    gateway.wait_healthy(&base, Duration::from_secs(90)).await;
    let http = TestEnv::http_client();
    // Until the projector has stored the release (sold out meanwhile).
    let deadline = Instant::now() + Duration::from_secs(90);
    let granted: Value = loop {
        coupons.assert_alive();
        claims.assert_alive();
        purchases.assert_alive();
        gateway.assert_alive();
        let response = http
            .get(format!("{base}/api/v1/coupon?id=acl-user"))
            .send()
            .await
            .expect("claim");
        let status = response.status();
        if status == 200 {
            break response.json().await.expect("grant");
        }
        let body = response.text().await.unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "no grant with a principal per role: {status} {body}\ngateway:\n{}\nclaims:\n{}\ncoupons:\n{}",
            gateway.log_tail(),
            claims.log_tail(),
            coupons.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(granted["category"], "Acl", "{granted}");
    assert!(
        granted["coupon_code"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "{granted}"
    );
    let code = granted["coupon_code"].as_str().unwrap_or_default();
    let bought = http
        .post(format!("{base}/api/v1/purchase"))
        .json(&serde_json::json!({"user_id": "acl-user", "coupon_code": code, "order_id": "acl-order"}))
        .send()
        .await
        .expect("purchase");
    let status = bought.status();
    assert_eq!(
        status,
        200,
        "a purchase with a principal per role: {:?}\npurchases:\n{}",
        bought.text().await,
        purchases.log_tail()
    );
    gateway.kill_9().await;
    purchases.kill_9().await;
    claims.kill_9().await;
    coupons.kill_9().await;
    drop(env);
    drop(broker);
}
