//! The history in Apache Cassandra (`HISTORY_STORE=cassandra`, issue #29):
//! a burst's history arrives complete, each row once, releases included;
//! a redelivered batch adds nothing; `kill -9` of Cassandra mid-burst
//! delays the history but loses nothing, duplicates nothing, and never
//! slows the claims. Each test has a keyspace of its own (its name); the
//! kill test has a node of its own, so the shared node stays up.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use serde_json::{json, Value};

use coupon_consumers::history::HistoryConfig;
use coupon_platform::cassandra::CassandraHistory;
use coupon_test_support::cassandra::{self, OwnNode};
use couponctl::app::Role;

use crate::harness::{eventually_ok, release, App, TestEnv};

const ALL: [Role; 6] = [
    Role::Gateway,
    Role::Coupons,
    Role::Claims,
    Role::Purchases,
    Role::Expiry,
    Role::History,
];

/// One claim per user, `concurrency` at a time: (user, status, body, latency).
async fn claim_all(
    app: &App,
    users: Vec<String>,
    concurrency: usize,
) -> Vec<(String, u16, Value, Duration)> {
    let http = TestEnv::http_client();
    stream::iter(users)
        .map(|user| {
            let http = http.clone();
            let url = app.url(&format!("/api/v1/coupon?id={user}"));
            async move {
                let started = Instant::now();
                let response = http.get(url).send().await.expect("claim request");
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                (user, status, body, started.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

async fn purchase(app: &App, user: &str, code: &str) -> u16 {
    TestEnv::http_client()
        .post(app.url("/api/v1/purchase"))
        .json(&json!({"user_id": user, "coupon_code": code, "order_id": format!("order-{user}")}))
        .send()
        .await
        .expect("purchase")
        .status()
        .as_u16()
}

/// What the history must hold after a burst: rows by kind.
#[derive(Debug, Default)]
struct Expected {
    created: usize,
    granted: usize,
    /// Sold out (claims) and refused purchases.
    rejected: usize,
    redeemed: usize,
    /// Holds not bought: each expires once.
    released: usize,
}

impl Expected {
    fn kinds(&self) -> BTreeMap<String, usize> {
        [
            ("created", self.created),
            ("granted", self.granted),
            ("rejected", self.rejected),
            ("redeemed", self.redeemed),
            ("released", self.released),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| (k.to_owned(), n))
        .collect()
    }

    fn total(&self) -> usize {
        self.kinds().values().sum()
    }
}

/// Releases `coupons`, has `users` users claim one each, buys `buy` of the
/// grants; the rest of the holds expire (short holds). Returns what the
/// history must end with and the slowest claim's answer time.
async fn burst(
    env: &TestEnv,
    app: &App,
    coupons: u32,
    users: usize,
    buy: usize,
    mid_burst: impl std::future::Future<Output = ()>,
) -> (Expected, Duration) {
    release(env, "Burst", coupons).await;
    let names: Vec<String> = (0..users).map(|i| format!("user-{i}")).collect();
    let (first, second) = names.split_at(users / 2);
    let mut results = claim_all(app, first.to_vec(), 20).await;
    mid_burst.await;
    results.extend(claim_all(app, second.to_vec(), 20).await);
    let mut expected = Expected {
        created: coupons as usize,
        ..Expected::default()
    };
    let mut slowest = Duration::ZERO;
    let mut grants = Vec::new();
    for (user, status, body, took) in &results {
        slowest = slowest.max(*took);
        match status {
            200 => grants.push((
                user.clone(),
                body["coupon_code"].as_str().unwrap().to_owned(),
            )),
            404 => assert_eq!(body["error"], "sold_out"),
            other => panic!("unexpected {other} for {user}: {body}"),
        }
    }
    expected.granted = grants.len();
    expected.rejected = users - grants.len();
    assert_eq!(grants.len(), coupons.min(users as u32) as usize);
    for (user, code) in grants.iter().take(buy) {
        match purchase(app, user, code).await {
            200 => expected.redeemed += 1,
            // Bought too late (a slow machine): refused, and released.
            409 => expected.rejected += 1,
            other => panic!("purchase answered {other}"),
        }
    }
    expected.released = grants.len() - expected.redeemed;
    (expected, slowest)
}

/// Waits until the history in `store` is `expected`, by kind: complete,
/// and (the rows' keys being the events') each row once. Also: nothing in
/// Postgres's `coupon_history`, nothing left in the outbox.
async fn wait_history(
    env: &TestEnv,
    store: &CassandraHistory,
    expected: &Expected,
    within: Duration,
) {
    let want = expected.kinds();
    eventually_ok("the history in Cassandra is complete", within, || async {
        let got = cassandra::rows_by_kind(store)
            .await
            .ok_or("Cassandra does not answer")?;
        if got == want {
            Ok(())
        } else {
            let decided: Vec<(String, i64)> = sqlx::query_as(
                "SELECT outcome, count(*) FROM claim_decisions GROUP BY 1 ORDER BY 1",
            )
            .fetch_all(&env.pool)
            .await
            .unwrap_or_default();
            Err(format!(
                "have {got:?}, want {want:?}; claims decided in Postgres: {decided:?}"
            ))
        }
    })
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM coupon_history").await,
        0,
        "the history is not in Postgres"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM history_outbox").await,
        0,
        "every release forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_history_of_a_burst_is_complete_once_and_redelivery_adds_nothing() {
    let env = TestEnv::new().await;
    let settings = cassandra::settings_for(&env, &cassandra::nodes());
    let store = cassandra::connect(&settings, Duration::from_secs(30)).await;
    let app = env
        .start(&ALL, |c| {
            c.history = HistoryConfig::cassandra(settings.clone());
            c.policy.hold_ttl = Duration::from_secs(3);
            c.policy.hold_grace = Duration::ZERO;
        })
        .await;
    let started = Instant::now();
    let (expected, _) = burst(&env, &app, 40, 120, 10, async {}).await;
    wait_history(&env, &store, &expected, Duration::from_secs(60)).await;
    eprintln!(
        "cassandra history: {} rows ({expected:?}) complete {:?} after the release",
        expected.total(),
        started.elapsed()
    );

    // By user and by coupon, as analysts read it.
    let user = store
        .entries(Some("user-0"), None, None, None)
        .await
        .unwrap();
    assert!(!user.is_empty() && user.iter().all(|r| r.user_id.as_deref() == Some("user-0")));
    let code = user.iter().find_map(|r| r.coupon_code.clone());
    if let Some(code) = code {
        let coupon = store.entries(None, Some(&code), None, None).await.unwrap();
        assert_eq!(coupon.first().map(|r| r.kind.as_str()), Some("created"));
        assert!(
            coupon
                .windows(2)
                .all(|w| w[0].occurred_at <= w[1].occurred_at),
            "in time order"
        );
    }

    // `couponctl history` reads the store that is configured.
    let output = env
        .couponctl()
        .env("HISTORY_STORE", "cassandra")
        .env("CASSANDRA_NODES", cassandra::nodes())
        .env("CASSANDRA_KEYSPACE", &env.name)
        .args(["history", "--user", "user-0"])
        .output()
        .expect("couponctl history");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let shown: Vec<String> = user.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines, shown,
        "couponctl history --user shows the user's rows"
    );

    // The console's analytics count the same rows, read from Cassandra.
    let now = chrono::Utc::now().timestamp();
    let range = format!("since={}&until={}", now - 3_600, now + 60);
    let admin = |path: String| {
        let url = app.url(&path);
        async move {
            let response = TestEnv::http_client()
                .get(url)
                .bearer_auth("admin-secret")
                .send()
                .await
                .expect("analytics");
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.expect("analytics body")
        }
    };
    let claims = admin(format!("/api/v1/analytics/claims?{range}")).await;
    assert_eq!(
        claims["totals"],
        json!({"granted": expected.granted, "sold_out": 120 - expected.granted, "rate_limited": 0, "blacklisted": 0, "other": 0})
    );
    let funnel = admin(format!("/api/v1/analytics/funnel?{range}")).await;
    assert_eq!(
        funnel["by_category"],
        json!([{"category": "Burst", "granted": expected.granted, "redeemed": expected.redeemed, "released": expected.released, "cancelled": 0, "expired": 0}])
    );

    // Every record of the history's topics again, as a redelivery would
    // bring them: nothing new.
    let mut ctx = app.running.as_ref().unwrap().context.clone();
    ctx.history.connected = Some(store.clone());
    let mut records = Vec::new();
    for topic in [
        env.topics.created(),
        env.topics.claim_results(),
        env.topics.purchase_results(),
    ] {
        records.extend(env.read_topic(&topic).await);
    }
    coupon_consumers::history::handle_batch(&ctx, &records)
        .await
        .expect("the redelivered batch");
    assert_eq!(
        cassandra::rows_by_kind(&store).await,
        Some(expected.kinds()),
        "a redelivered batch adds nothing"
    );

    // `couponctl audit` checks the history in the store that is configured:
    // this keyspace has every row; an empty one has none of them.
    env.wait_every_role_caught_up(Duration::from_secs(30)).await;
    let audit = |keyspace: String| {
        env.couponctl()
            .env("HISTORY_STORE", "cassandra")
            .env("CASSANDRA_NODES", cassandra::nodes())
            .env("CASSANDRA_KEYSPACE", keyspace)
            .arg("audit")
            .output()
            .expect("couponctl audit")
    };
    let checked = expected.total() - expected.released;
    let clean = audit(env.name.clone());
    let stdout = String::from_utf8_lossy(&clean.stdout);
    assert!(
        clean.status.success() && stdout.contains(&format!("{checked} history rows checked")),
        "{stdout}{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    let empty = format!("{}_empty", env.name);
    let lost = audit(empty.clone());
    let stdout = String::from_utf8_lossy(&lost.stdout);
    assert_eq!(lost.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.lines().count() == 21
            && stdout.contains(&format!(
                "history: {} more rows on the log are missing from the history store",
                checked - 20
            )),
        "{stdout}"
    );
    let mut settings = settings.clone();
    settings.keyspace = empty;
    cassandra::connect(&settings, Duration::from_secs(10))
        .await
        .drop_keyspace()
        .await
        .expect("drop the empty keyspace");

    // The console's campaigns count their funnels from Cassandra as well:
    // a campaign of two, one claimed, then ended early (its available
    // coupon expires; the hold keeps its deadline).
    let http = TestEnv::http_client();
    let released: Value = http
        .post(app.url("/api/v1/coupon"))
        .bearer_auth("admin-secret")
        .json(&json!({"id": "e1", "category": "CassandraSale", "count": 2, "campaign": "Cassandra sale"}))
        .send()
        .await
        .expect("release a campaign")
        .json()
        .await
        .expect("release answer");
    let sale = released["batch_id"].as_str().expect("batch id").to_owned();
    eventually_ok(
        "the campaign projected",
        Duration::from_secs(60),
        || async {
            let n = env
                .count("SELECT count(*) FROM coupons WHERE category = 'CassandraSale'")
                .await;
            if n == 2 {
                Ok(())
            } else {
                Err(format!("{n} of 2"))
            }
        },
    )
    .await;
    let claimed = http
        .get(app.url("/api/v1/coupon?id=sale-user&category=CassandraSale"))
        .send()
        .await
        .expect("claim");
    assert_eq!(claimed.status(), 200);
    let ended = http
        .delete(app.url(&format!("/api/v1/campaigns/{sale}")))
        .bearer_auth("admin-secret")
        .send()
        .await
        .expect("end");
    assert_eq!(ended.status(), 200);
    eventually_ok(
        "the campaign's funnel, read from Cassandra",
        Duration::from_secs(60),
        || async {
            let listed = admin("/api/v1/campaigns".to_owned()).await;
            let campaign = &listed["campaigns"][0];
            let expected = json!([sale, "ended",
                {"issued": 2, "available": 0, "held": 1, "redeemed": 0, "expired": 1},
                {"claimed": 1, "redeemed": 0, "released": 0, "cancelled": 0, "expired": 1}]);
            let shown = json!([
                campaign["batch_id"],
                campaign["phase"],
                campaign["coupons"],
                campaign["funnel"]
            ]);
            if shown == expected {
                Ok(())
            } else {
                Err(shown.to_string())
            }
        },
    )
    .await;
    app.stop().await;
    store
        .drop_keyspace()
        .await
        .expect("drop the test's keyspace");
}

/// `kill -9` of the history's Cassandra mid-burst, then a restart: the
/// claims are answered throughout and no slower than a claim may be; the
/// history role retries, catches up, and ends with every row exactly once.
/// The node is the test's own (ports 29042/27042/29142), not the shared one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_killed_mid_burst_loses_nothing_and_never_slows_the_claims() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,scylla=error")
        .with_test_writer()
        .try_init();
    let env = TestEnv::new().await;
    let node = OwnNode::new(&format!("cassandra-{}", env.name), 29042);
    let booted = Instant::now();
    node.start().await;
    eprintln!("own Cassandra node serving after {:?}", booted.elapsed());
    let settings = cassandra::settings_for(&env, &node.nodes());
    let app = env
        .start(&ALL, |c| {
            c.history = HistoryConfig::cassandra(settings.clone());
            c.policy.hold_ttl = Duration::from_secs(3);
            c.policy.hold_grace = Duration::ZERO;
        })
        .await;
    let watcher = cassandra::connect(&settings, Duration::from_secs(30)).await;
    let mut killed_at = None;
    let (expected, slowest) = burst(&env, &app, 60, 200, 10, async {
        // The history role is connected and writing (the release's rows
        // are in): the kill hits it mid-write.
        eventually_ok(
            "the release's history in Cassandra",
            Duration::from_secs(60),
            || async {
                match cassandra::rows_by_kind(&watcher).await {
                    Some(kinds) if kinds.get("created") == Some(&60) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        node.kill_9().await;
        killed_at = Some(Instant::now());
    })
    .await;
    // Every claim was answered (`burst` checks each status), Cassandra down
    // for the second half.
    assert!(
        slowest < Duration::from_secs(5),
        "a claim took {slowest:?} with the history store down"
    );
    let restarted = Instant::now();
    node.start().await;
    eprintln!(
        "Cassandra down {:?}, serving again after {:?}; slowest claim {slowest:?}",
        killed_at.map(|t| t.elapsed()).unwrap_or_default(),
        restarted.elapsed()
    );
    let store = cassandra::connect(&settings, Duration::from_secs(60)).await;
    let caught_up = Instant::now();
    wait_history(&env, &store, &expected, Duration::from_secs(120)).await;
    eprintln!(
        "history caught up {:?} after the restart: {} rows ({expected:?})",
        caught_up.elapsed(),
        expected.total()
    );
    app.stop().await;
    node.stop();
}

/// `keytool` makes a PKCS12 keystore `name.p12` (password `pw`) in `dir`
/// with a self-signed certificate for 127.0.0.1, and exports that
/// certificate as `name.pem`: the CA a client trusts.
fn keystore(
    dir: &std::path::Path,
    name: &str,
    pw: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (p12, pem) = (
        dir.join(format!("{name}.p12")),
        dir.join(format!("{name}.pem")),
    );
    let keytool = |args: &[&str]| {
        let output = std::process::Command::new("keytool")
            .args(args)
            .output()
            .expect("run keytool");
        assert!(output.status.success(), "keytool {args:?}: {output:?}");
    };
    let p12_path = p12.to_str().unwrap();
    keytool(&[
        "-genkeypair",
        "-alias",
        name,
        "-keyalg",
        "RSA",
        "-keysize",
        "2048",
        "-validity",
        "2",
        "-dname",
        "CN=127.0.0.1",
        "-ext",
        "san=ip:127.0.0.1",
        "-storetype",
        "PKCS12",
        "-keystore",
        p12_path,
        "-storepass",
        pw,
        "-keypass",
        pw,
    ]);
    keytool(&[
        "-exportcert",
        "-rfc",
        "-alias",
        name,
        "-keystore",
        p12_path,
        "-storepass",
        pw,
        "-file",
        pem.to_str().unwrap(),
    ]);
    (p12, pem)
}

/// Credentials and TLS, as an operator's cluster has them: a node of the
/// test's own with `PasswordAuthenticator` and client TLS. The history is
/// written and read (the store, and `couponctl history` from its settings)
/// with the right password over TLS trusting the node's CA; a wrong
/// password, no credentials, or a CA that did not sign the node's
/// certificate are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_with_credentials_and_tls() {
    use coupon_domain::HistoryKind;
    use coupon_platform::cassandra::CassandraSettings;
    use coupon_platform::store::history::HistoryRow;
    let env = TestEnv::new().await;
    let dir = coupon_test_support::harness::target_tmp_dir().join(format!("tls-{}", env.name));
    std::fs::create_dir_all(&dir).unwrap();
    let (node_keystore, ca) = keystore(&dir, "node", "node-secret");
    let (_, other_ca) = keystore(&dir, "other", "other-secret");
    let node = OwnNode::new(&format!("cassandra-auth-{}", env.name), 28042)
        .with("CASSANDRA_AUTH", "password")
        .with("CASSANDRA_TLS_KEYSTORE", node_keystore.to_str().unwrap())
        .with("CASSANDRA_TLS_KEYSTORE_PASSWORD", "node-secret");
    node.start().await;

    let settings = |user: Option<&str>, password: Option<&str>, ca: Option<&std::path::Path>| {
        let mut s = CassandraSettings::new(&node.nodes(), &env.name);
        s.request_timeout = Duration::from_secs(5);
        s.username = user.map(Into::into);
        s.password = password.map(Into::into);
        s.tls_ca = ca.map(Into::into);
        s
    };
    // The default superuser exists some seconds after the first start.
    let good = settings(Some("cassandra"), Some("cassandra"), Some(&ca));
    let store = cassandra::connect(&good, Duration::from_secs(120)).await;
    let row = HistoryRow {
        occurred_at: chrono::DateTime::from_timestamp_millis(chrono::Utc::now().timestamp_millis())
            .unwrap(),
        event_id: uuid::Uuid::new_v4(),
        item: 0,
        coupon_code: Some("0AN35HST00000".into()),
        user_id: Some("tls-user".into()),
        kind: HistoryKind::Granted,
        detail: json!({"request_id": "r-1"}),
    };
    assert_eq!(store.append(std::slice::from_ref(&row)).await.unwrap(), 1);
    let read = store
        .entries(Some("tls-user"), None, None, None)
        .await
        .unwrap();
    assert_eq!(read.len(), 1);

    // The CLI, from its settings.
    let history = |password: &str, ca: &std::path::Path| {
        env.couponctl()
            .env("HISTORY_STORE", "cassandra")
            .env("CASSANDRA_NODES", node.nodes())
            .env("CASSANDRA_KEYSPACE", &env.name)
            .env("CASSANDRA_USERNAME", "cassandra")
            .env("CASSANDRA_PASSWORD", password)
            .env("CASSANDRA_TLS_CA", ca)
            .args(["history", "--user", "tls-user"])
            .output()
            .expect("couponctl history")
    };
    let shown = history("cassandra", &ca);
    assert!(shown.status.success(), "{shown:?}");
    assert_eq!(
        String::from_utf8_lossy(&shown.stdout).trim(),
        read[0].to_string()
    );
    let refused = history("wrong", &ca);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.lines().count() == 1 && stderr.contains("Cassandra"),
        "one line naming Cassandra: {stderr}"
    );

    for (what, wrong, reason) in [
        (
            "a wrong password",
            settings(Some("cassandra"), Some("wrong"), Some(&ca)),
            "AuthenticationError",
        ),
        (
            "no credentials",
            settings(None, None, Some(&ca)),
            "MissingAuthentication",
        ),
        (
            "a CA that did not sign the node's certificate",
            settings(Some("cassandra"), Some("cassandra"), Some(&other_ca)),
            "certificate verify failed",
        ),
    ] {
        match CassandraHistory::connect(&wrong).await {
            Ok(_) => panic!("{what} must be refused"),
            Err(error) => {
                let error = format!("{error:?}");
                assert!(error.contains(reason), "{what}: refused for {error}");
            }
        }
    }
    store.drop_keyspace().await.expect("drop the keyspace");
    node.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
