//! Keyed records land on the partition the Java client would pick (issue
//! 30): a storefront on the Java producer (or one that copies its
//! partitioner) publishing claims for user `u-42` reaches the partition our
//! gateway publishes that user's claims to, so one processor decides a
//! user's requests in order. librdkafka's default partitioner hashes with
//! CRC32; the Java client's with murmur2. Our producer (`Publisher`) is set
//! to `murmur2_random`, and this test holds it to what Apache Kafka's own
//! `Utils.murmur2` computes, run from the `kafka-clients` jar `make setup`
//! installs with the broker (`tests/java/Murmur.java`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use coupon_platform::kafka::{ensure_topics, Publisher, TopicSpec};
use coupon_schemas::ClaimRequested;

use crate::harness::TestEnv;

/// The keys: user ids as storefronts send them, and the edges of murmur2
/// (every tail length, empty, one byte, bytes that are not UTF-8, multi-byte
/// characters, ids at and far beyond the 128-character limit).
fn keys() -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = [
        "u-42",
        "user-42",
        "a",
        "ab",
        "abc",
        "abcd",
        "abcde",
        "abcdef",
        "abcdefg",
        " ",
        "0",
        "user with spaces",
        "ユーザー-42",
        "üser-ß-Ø",
        "🎟️-7",
        "𝔘𝔰𝔢𝔯",
        "Straße/東京/القاهرة",
    ]
    .iter()
    .map(|k| k.as_bytes().to_vec())
    .collect();
    keys.push(Vec::new());
    keys.push(vec![0]);
    keys.push(vec![0xff, 0xfe, 0x00, 0x80, 0x7f]);
    keys.push("x".repeat(128).into_bytes());
    keys.push("é".repeat(128).into_bytes());
    keys.push(
        (0..1000)
            .map(|i| char::from(b'!' + (i % 90) as u8))
            .collect::<String>()
            .into_bytes(),
    );
    keys.extend((0..40).map(|i| format!("storefront-user-{i}").into_bytes()));
    keys
}

/// Where `make setup` put the broker's jars (`infra/local/common.sh`).
fn kafka_libs() -> PathBuf {
    if let Ok(libs) = std::env::var("KAFKA_LIBS") {
        return PathBuf::from(libs);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pom =
        std::fs::read_to_string(root.join("infra/kafka/pom.xml")).expect("infra/kafka/pom.xml");
    let version = pom
        .split("<kafka.version>")
        .nth(1)
        .and_then(|rest| rest.split("</kafka.version>").next())
        .expect("kafka.version in infra/kafka/pom.xml");
    let kafka_root =
        std::env::var("KAFKA_ROOT").unwrap_or_else(|_| format!("/opt/kafka-{version}"));
    PathBuf::from(kafka_root).join("libs")
}

/// A key as the failure messages show it: at most 40 characters.
fn shown(key: &[u8]) -> String {
    let text = String::from_utf8_lossy(key);
    let mut shown: String = text.chars().take(40).collect();
    if text.chars().count() > 40 {
        shown.push_str("...");
    }
    format!("{shown:?} ({} bytes)", key.len())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The partition the Java producer picks for each key, for each partition
/// count in `counts`, from the real `kafka-clients` jar.
async fn java_partitions(keys: &[Vec<u8>], counts: &[i32]) -> Vec<Vec<i32>> {
    let libs = kafka_libs();
    let has_clients = std::fs::read_dir(&libs).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("kafka-clients-") && name.ends_with(".jar")
        })
    });
    assert!(
        has_clients,
        "no kafka-clients jar in {} (run `make setup`)",
        libs.display()
    );
    let program = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/java/Murmur.java");
    let mut child = tokio::process::Command::new("java")
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .arg(&program)
        .args(counts.iter().map(ToString::to_string))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run java (a JDK 17: `make setup`)");
    let input: String = keys.iter().map(|k| hex(k) + "\n").collect();
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).await.expect("write keys");
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("Murmur.java ran within 2 minutes")
        .expect("Murmur.java output");
    assert!(
        output.status.success(),
        "Murmur.java failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("ASCII output");
    let rows: Vec<Vec<i32>> = text
        .lines()
        .zip(keys)
        .map(|(line, key)| {
            let mut fields = line.split(' ');
            let echoed = fields.next().expect("the key");
            let expected = if key.is_empty() { "-".into() } else { hex(key) };
            assert_eq!(echoed, expected, "Murmur.java answered out of order");
            fields.map(|p| p.parse().expect("a partition")).collect()
        })
        .collect();
    assert_eq!(rows.len(), keys.len(), "a partition for every key");
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_land_where_the_java_client_puts_them() {
    let env = TestEnv::new().await;
    // A topic of its own with more partitions than the test topics' two,
    // under the test's prefix (deleted with the test's topics).
    let wide = format!("{}.partitioner", env.name);
    ensure_topics(
        &env.kafka,
        &[TopicSpec {
            name: wide.clone(),
            partitions: 12,
            replication: None,
            configs: Vec::new(),
        }],
    )
    .await
    .expect("create the 12-partition topic");
    let claims = env.topics.claims();
    let keys = keys();
    let expected = java_partitions(&keys, &[12, 2]).await;

    let publisher = Publisher::new(&env.kafka, "partitioner-test").expect("publisher");
    let mut mismatches = Vec::new();
    for (index, key) in keys.iter().enumerate() {
        let delivered = publisher
            .send_bytes(&wide, Some(key), index.to_string().as_bytes())
            .await
            .expect("publish to the 12-partition topic");
        let ours = coupon_domain::shard::partition_of(key, 12) as i32;
        if ours != expected[index][0] {
            mismatches.push(format!(
                "shard::partition_of: key {} on {ours} (Java: {})",
                shown(key),
                expected[index][0]
            ));
        }
        if delivered.partition != expected[index][0] {
            mismatches.push(format!(
                "{wide}: key {} on {} (Java: {})",
                shown(key),
                delivered.partition,
                expected[index][0]
            ));
        }
        // Claims keyed by the user id, as the gateway publishes them.
        if let Ok(user) = std::str::from_utf8(key) {
            let claim = ClaimRequested {
                envelope: Some(publisher.envelope::<ClaimRequested>(&format!("req-{index}"))),
                request_id: format!("req-{index}"),
                user_id: user.to_owned(),
                ..Default::default()
            };
            let delivered = publisher
                .send(&claims, user, &claim)
                .await
                .expect("publish a claim");
            if delivered.partition != expected[index][1] {
                mismatches.push(format!(
                    "{claims}: user {} on {} (Java: {})",
                    shown(key),
                    delivered.partition,
                    expected[index][1]
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} records (of {} keys, on two topics) are not where the Java client puts them:\n{}",
        mismatches.len(),
        keys.len(),
        mismatches.join("\n")
    );

    // And read back from the broker: each record sits on its key's partition.
    let by_key: HashMap<&[u8], &Vec<i32>> = keys
        .iter()
        .map(Vec::as_slice)
        .zip(expected.iter())
        .collect();
    for (topic, column) in [(&wide, 0), (&claims, 1)] {
        let records = env.read_topic(topic).await;
        let expected_count = if column == 0 {
            keys.len()
        } else {
            keys.iter()
                .filter(|k| std::str::from_utf8(k).is_ok())
                .count()
        };
        assert_eq!(
            records.len(),
            expected_count,
            "every record of {topic} read back"
        );
        for record in records {
            let key = record.key.as_deref().expect("a keyed record");
            let want = by_key.get(key).expect("one of the test's keys")[column];
            assert_eq!(
                record.partition,
                want,
                "{topic}: key {} read back from partition {} (Java: {want})",
                shown(key),
                record.partition
            );
        }
    }
}
