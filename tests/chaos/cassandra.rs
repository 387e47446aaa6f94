//! The history store killed mid-burst (`HISTORY_STORE=cassandra`, issue
//! #29): `kill -9` of Cassandra a third of the way into a claim burst, a
//! restart once the probe claim is answered. Scored like the other bursts
//! (every claim decided once and answered, the invariants), and on the
//! history: every row the decisions imply is in Cassandra exactly once
//! (none lost, none duplicated), and the claims were answered while
//! Cassandra was down (the history never slows the claim path).
//!
//! The node is the scenario's own (`infra/local/cassandra.sh` on ports
//! 19542/37042/39142, state under `target/tmp`), not the shared one.

use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};

use coupon_test_support::cassandra::{self, OwnNode};

use crate::harness::{free_port, release, Child, TestEnv, CONSUME_ALL};
use crate::processes::Progress;
use crate::profile::Profile;
use crate::score::{claim, guarded, score, Row};

pub const NAME: &str = "cassandra: kill -9 history";

/// A claim answered slower than this while Cassandra is down counts as
/// the history slowing the claim path.
const CLAIM_BUDGET: Duration = Duration::from_secs(5);

pub async fn burst_with_cassandra_kill(profile: &Profile) -> Row {
    let profile = profile.clone();
    guarded(NAME, burst(profile)).await
}

async fn burst(profile: Profile) -> Row {
    let env = TestEnv::new().await;
    let node = OwnNode::new(&format!("cassandra-{}", env.name), 19542);
    node.start().await;
    let settings = cassandra::settings_for(&env, &node.nodes());
    let with_cassandra = |command: &mut std::process::Command| {
        command
            .env("HISTORY_STORE", "cassandra")
            .env("CASSANDRA_NODES", node.nodes())
            .env("CASSANDRA_KEYSPACE", &env.name);
    };
    let mut consumers = Child::spawn_with(
        &env,
        CONSUME_ALL,
        free_port(),
        "consumers-0",
        with_cassandra,
    );
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut gateway = Child::spawn_with(&env, &["gateway"], port, "gateway-0", with_cassandra);
    gateway.wait_healthy(&base, Duration::from_secs(60)).await;
    let issued = (profile.users / 2) as u32;
    release(&env, "Chaos", issued).await;
    // The history role is connected and writing (the release's rows are
    // in) before the burst, so the kill hits it mid-write.
    let store = cassandra::connect(&settings, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while cassandra::rows_by_kind(&store)
        .await
        .and_then(|kinds| kinds.get("created").copied())
        != Some(issued as usize)
    {
        if Instant::now() > deadline {
            return Row::failed(NAME, "the release's history never reached Cassandra".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(store);

    let http = TestEnv::http_client();
    let progress = Progress::new(profile.users / 3);
    let burst = {
        let (http, base, progress) = (http.clone(), base.clone(), progress.clone());
        tokio::spawn(async move {
            stream::iter(0..profile.users)
                .map(|i| {
                    let (http, base, progress) = (http.clone(), base.clone(), progress.clone());
                    async move {
                        let started = Instant::now();
                        let answer =
                            claim(&http, &base, format!("user-{i}"), format!("req-{i}")).await;
                        progress.tick();
                        (answer, started.elapsed())
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await
        })
    };
    progress.wait(Duration::from_secs(120)).await;
    let fault_at = Instant::now();
    node.kill_9().await;
    // A fresh user while Cassandra is down: answered as ever.
    let started = Instant::now();
    let probe = claim(&http, &base, "probe".into(), "probe-req".into()).await;
    let probe_took = started.elapsed();
    let recovered = probe.answer.is_some().then(|| fault_at.elapsed());
    let answered = burst.await.expect("the burst task");
    let slowest_after_kill = answered
        .iter()
        .map(|(_, took)| *took)
        .max()
        .unwrap_or_default()
        .max(probe_took);
    node.start().await;
    let down_for = fault_at.elapsed();
    let mut answers: Vec<_> = answered.into_iter().map(|(answer, _)| answer).collect();
    answers.push(probe);

    let mut row = score(&env, NAME, i64::from(issued), &answers).await;
    row.recovery = recovered;
    if probe_took > CLAIM_BUDGET {
        row.error
            .get_or_insert_with(|| format!("a claim took {probe_took:?} while Cassandra was down"));
    }

    // The history: created rows for the release, one row per decision.
    let decided: Vec<(String, i64)> = sqlx::query_as(
        "SELECT CASE WHEN outcome = 'granted' THEN 'granted' ELSE 'rejected' END, count(*)
           FROM claim_decisions GROUP BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap_or_default();
    let mut expected: std::collections::BTreeMap<String, usize> =
        decided.into_iter().map(|(k, n)| (k, n as usize)).collect();
    expected.insert("created".into(), issued as usize);
    let store = cassandra::connect(&settings, Duration::from_secs(60)).await;
    let caught_up = Instant::now();
    let deadline = caught_up + Duration::from_secs(120);
    let got = loop {
        let got = cassandra::rows_by_kind(&store).await.unwrap_or_default();
        if got == expected || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let kinds: std::collections::BTreeSet<&String> = expected.keys().chain(got.keys()).collect();
    let (mut lost_rows, mut extra_rows) = (0, 0);
    for kind in kinds {
        let want = expected.get(kind).copied().unwrap_or(0);
        let have = got.get(kind).copied().unwrap_or(0);
        lost_rows += want.saturating_sub(have);
        extra_rows += have.saturating_sub(want);
    }
    let postgres_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM coupon_history")
        .fetch_one(&env.pool)
        .await
        .unwrap_or(-1);
    row.lost += lost_rows;
    row.duplicated += extra_rows;
    if postgres_rows != 0 {
        row.violations += 1;
        row.notes
            .push(format!("{postgres_rows} history rows in Postgres"));
    }
    row.notes.push(format!(
        "history: {} rows in Cassandra ({} lost, {} duplicated), caught up {:.1} s after the restart; \
         Cassandra down {:.1} s; slowest claim {:.0} ms, the probe {:.0} ms",
        got.values().sum::<usize>(),
        lost_rows,
        extra_rows,
        caught_up.elapsed().as_secs_f64(),
        down_for.as_secs_f64(),
        slowest_after_kill.as_secs_f64() * 1e3,
        probe_took.as_secs_f64() * 1e3,
    ));
    let retries = consumers
        .log_text()
        .lines()
        .filter(|l| l.contains("consumer=\"history\"") && l.contains("retrying"))
        .count();
    row.notes.push(format!(
        "the history role retried {retries} batches while Cassandra was down"
    ));
    consumers.assert_alive();
    gateway.assert_alive();
    node.stop();
    row
}
