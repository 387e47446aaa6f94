//! Failover of the authority: the same burst as the other scenarios, on
//! Postgres under Patroni (`infra/local/ha.sh`, started here: three members,
//! synchronous replication, HAProxy's write port 5440 as DATABASE_URL), with
//! the leader broken a third of the way in.
//!
//! Scored like the others (lost, duplicated, violations, recovery), plus
//! *granted twice*: a claim answered `200` with a coupon whose grant the new
//! leader does not hold. Such a grant is forgotten (the coupon is free again
//! and can be handed to a second user), which is what asynchronous
//! replication loses in a failover and synchronous replication must not.
//! Each scenario also samples every member's `/primary` health check five
//! times a second: two members answering 200 at once is a split brain (a
//! violation). And each waits until the cluster is whole again (the old
//! leader a replica on the new timeline, a synchronous standby), noting how
//! long that took and whether Patroni rewound the old leader with pg_rewind.
//!
//! The negative control (`CHAOS_HA_NEGATIVE=1`, not part of `make test`)
//! turns synchronous replication off, stops the standbys' WAL receivers
//! while the burst goes on, and then loses the leader: the check must report
//! what that loses, or the row fails.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};

use coupon_platform::settings;

use crate::harness::{brokers, release, TestEnv};
use crate::processes::Progress;
use crate::profile::Profile;
use crate::score::{claim, guarded, score, Answer, Row};
use crate::system::System;

/// How long the frozen leader stays stopped: past Patroni's TTL (10 s).
const FREEZE: Duration = Duration::from_secs(15);
/// How many members `ha.sh` runs (HA_MEMBERS) and their REST ports.
const MEMBERS: u16 = 3;
const REST_BASE_PORT: u16 = 8008;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaFault {
    /// `kill -9` of the leader's postmaster; its Patroni fails over to the
    /// synchronous standby at once (primary_start_timeout 0) and the old
    /// leader rejoins as a replica.
    KillPostmaster,
    /// The leader's Patroni and Postgres stopped (SIGSTOP) past the TTL, then
    /// thawed: it must come back as a replica, never as a second leader.
    FreezeLeader,
    /// A controlled `patronictl switchover` to the synchronous standby.
    Switchover,
    /// The leader's machine dies (`kill -9` of Patroni and Postgres); once
    /// the system answers again it is started and rejoins (pg_rewind when
    /// its WAL went past the new leader's timeline switch).
    LoseLeaderThenRejoin,
    /// Negative control: asynchronous replication, standbys lagging (WAL
    /// receivers stopped), then the leader lost.
    AsyncLaggingStandby,
}

impl HaFault {
    /// The scenarios of `make chaos`; `make test` runs the first.
    pub const ALL: [HaFault; 4] = [
        HaFault::KillPostmaster,
        HaFault::FreezeLeader,
        HaFault::Switchover,
        HaFault::LoseLeaderThenRejoin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HaFault::KillPostmaster => "ha: kill -9 postmaster",
            HaFault::FreezeLeader => "ha: leader frozen 15 s",
            HaFault::Switchover => "ha: switchover",
            HaFault::LoseLeaderThenRejoin => "ha: leader lost, rejoins",
            HaFault::AsyncLaggingStandby => "ha: async, lagging (ctrl)",
        }
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/local/ha.sh")
}

/// Runs `infra/local/ha.sh ARGS`; its standard output, or why it failed.
pub async fn ha(args: &[&str]) -> Result<String, String> {
    let output = tokio::process::Command::new(script())
        .args(args)
        .output()
        .await
        .map_err(|e| format!("{}: {e}", script().display()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "ha.sh {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Starts `ha.sh ARGS` (a freeze) and returns once its first line says the
/// processes are stopped, with the task that ends when they go on again.
async fn ha_background(
    args: &[&str],
) -> Result<tokio::task::JoinHandle<Result<(), String>>, String> {
    use tokio::io::AsyncBufReadExt as _;
    let mut child = tokio::process::Command::new(script())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", script().display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = lines.next_line().await.map_err(|e| e.to_string())?;
    let what = format!("ha.sh {}", args.join(" "));
    let done = tokio::spawn(async move {
        while let Ok(Some(_)) = lines.next_line().await {}
        let output = child.wait_with_output().await.map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    });
    if first.as_deref().is_some_and(|l| l.contains("stopped")) {
        Ok(done)
    } else {
        Err(done
            .await
            .map_err(|e| e.to_string())?
            .err()
            .unwrap_or_else(|| format!("ha.sh said {first:?}")))
    }
}

/// Where `ha.sh` keeps the members' data and logs (`ha.sh dir`).
fn ha_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        std::process::Command::new(script())
            .arg("dir")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".state/ha"))
    })
    .clone()
}

fn member_log(member: &str) -> PathBuf {
    ha_dir().join(member).join("log/patroni.log")
}

fn log_len(member: &str) -> u64 {
    std::fs::metadata(member_log(member)).map_or(0, |m| m.len())
}

/// Whether `member`'s Patroni logged a pg_rewind after byte `from`.
fn rewound_since(member: &str, from: u64) -> bool {
    let text = std::fs::read(member_log(member)).unwrap_or_default();
    let tail = text.get(from as usize..).unwrap_or_default();
    String::from_utf8_lossy(tail).contains("running pg_rewind")
}

/// Samples every member's `/primary` check until cancelled: how many
/// samples saw two or more members answer 200 (a split brain), and how
/// many samples were taken.
fn watch_split_brain(
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<(usize, usize)> {
    tokio::spawn(async move {
        let Ok(http) = reqwest::Client::builder()
            .timeout(Duration::from_millis(500))
            .build()
        else {
            return (0, 0);
        };
        let (mut split, mut samples) = (0, 0);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        while !stop.is_cancelled() {
            tick.tick().await;
            let checks = (0..MEMBERS).map(|i| {
                let http = http.clone();
                async move {
                    let url = format!("http://127.0.0.1:{}/primary", REST_BASE_PORT + i);
                    // OPTIONS: Patroni answers with the status code only.
                    http.request(reqwest::Method::OPTIONS, url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().as_u16() == 200)
                }
            });
            let primaries = futures::future::join_all(checks)
                .await
                .into_iter()
                .filter(|p| *p)
                .count();
            samples += 1;
            if primaries > 1 {
                split += 1;
            }
        }
        (split, samples)
    })
}

/// Answered grants the database (the new leader) does not hold.
async fn granted_twice(env: &TestEnv, answers: &[Answer]) -> (usize, Option<String>) {
    let granted: Vec<(&str, &str, &str)> = answers
        .iter()
        .filter_map(|a| match &a.answer {
            Some((200, body)) => body["coupon_code"]
                .as_str()
                .map(|code| (a.request_id.as_str(), a.user.as_str(), code)),
            _ => None,
        })
        .collect();
    let ids: Vec<String> = granted.iter().map(|(id, _, _)| (*id).to_owned()).collect();
    let known: std::collections::HashMap<String, Option<String>> = sqlx::query_as(
        "SELECT request_id, coupon_code FROM claim_decisions
          WHERE request_id = ANY($1) AND outcome = 'granted'",
    )
    .bind(&ids)
    .fetch_all(&env.pool)
    .await
    .expect("stored grants")
    .into_iter()
    .collect::<Vec<(String, Option<String>)>>()
    .into_iter()
    .collect();
    let forgotten: Vec<String> = granted
        .iter()
        .filter(|(id, _, code)| known.get(*id).and_then(|c| c.as_deref()) != Some(*code))
        .map(|(id, user, code)| format!("{user} ({id}) was told {code}"))
        .collect();
    (forgotten.len(), forgotten.into_iter().next())
}

/// `couponctl audit` with DATABASE_READ_URL on HAProxy's read port: the
/// live state read from a replica (once it replayed what the leader had
/// written) must match the log. 1 when it does not.
async fn audit_on_replica(env: &TestEnv, notes: &mut Vec<String>) -> usize {
    let read_url = format!("postgres://postgres@127.0.0.1:5439/{}", env.name);
    let mut command = tokio::process::Command::from(env.couponctl());
    command.arg("audit").env("DATABASE_READ_URL", &read_url);
    match command.output().await {
        Ok(output) if output.status.success() => {
            let stdout = String::from_utf8_lossy(&output.stdout);
            notes.push(format!(
                "audit on a replica: {}",
                stdout.lines().last().unwrap_or_default()
            ));
            0
        }
        Ok(output) => {
            let text = String::from_utf8_lossy(&output.stdout);
            let err = String::from_utf8_lossy(&output.stderr);
            let lines: Vec<&str> = text.lines().chain(err.lines()).collect();
            notes.push(format!(
                "audit on a replica failed: {}",
                lines[lines.len().saturating_sub(3)..].join(" / ")
            ));
            1
        }
        Err(error) => {
            notes.push(format!("couponctl audit: {error}"));
            1
        }
    }
}

pub async fn burst_with_fault(fault: HaFault, profile: &Profile) -> Row {
    let profile = profile.clone();
    guarded(fault.name(), burst(fault, profile)).await
}

async fn burst(fault: HaFault, profile: Profile) -> Row {
    let name = fault.name();
    let started = match ha(&["wait-healthy", "180"]).await {
        Ok(_) => ha(&["leader"]).await,
        Err(error) => Err(error),
    };
    let old_leader = match started {
        Ok(leader) => leader,
        Err(error) => return Row::failed(name, error),
    };
    let env = TestEnv::on_server(settings::HA_DATABASE_URL, brokers()).await;
    let negative = fault == HaFault::AsyncLaggingStandby;
    if negative {
        // Asynchronous, and any standby may be promoted however far behind.
        if let Err(error) = ha(&[
            "set-config",
            r#"{"synchronous_mode": false, "maximum_lag_on_failover": 1073741824}"#,
        ])
        .await
        {
            return Row::failed(name, error);
        }
    }
    let mut system = System::start(&env, "classic").await;
    let issued = (profile.users / 2) as u32;
    release(&env, "Chaos", issued).await;

    let http = TestEnv::http_client();
    let progress = Progress::new(profile.users / 3);
    let answered = Arc::new(AtomicUsize::new(0));
    let burst = {
        let (http, base, progress) = (http.clone(), system.base.clone(), progress.clone());
        let answered = answered.clone();
        tokio::spawn(async move {
            stream::iter(0..profile.users)
                .map(|i| {
                    let (http, base, progress) = (http.clone(), base.clone(), progress.clone());
                    let answered = answered.clone();
                    async move {
                        let answer =
                            claim(&http, &base, format!("user-{i}"), format!("req-{i}")).await;
                        progress.tick();
                        answered.fetch_add(1, Ordering::SeqCst);
                        answer
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await
        })
    };
    progress.wait(Duration::from_secs(120)).await;
    let log_from = log_len(&old_leader);
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = watch_split_brain(stop.clone());
    let fault_at = Instant::now();
    let mut frozen = None;
    let injected = match fault {
        HaFault::KillPostmaster => ha(&["kill-postmaster", &old_leader]).await.map(drop),
        HaFault::FreezeLeader => {
            ha_background(&["freeze", &old_leader, &FREEZE.as_secs().to_string()])
                .await
                .map(|task| frozen = Some(task))
        }
        HaFault::Switchover => ha(&["switchover"]).await.map(drop),
        HaFault::LoseLeaderThenRejoin => ha(&["kill", &old_leader]).await.map(drop),
        HaFault::AsyncLaggingStandby => match ha(&["stop-receivers"]).await {
            Ok(_) => {
                // Grants the standbys do not receive; then the leader and the
                // WAL still in the receivers' sockets are lost.
                let from = answered.load(Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(30);
                while answered.load(Ordering::SeqCst) < from + profile.users / 10
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let killed = ha(&["kill", &old_leader]).await;
                let receivers = ha(&["kill-receivers"]).await;
                killed.and(receivers).map(drop)
            }
            Err(error) => Err(error),
        },
    };
    if let Err(error) = injected {
        stop.cancel();
        return Row::failed(name, error);
    }
    // A fresh user, after the fault: the system serves again once it answers.
    let probe = claim(&http, &system.base, "probe".into(), "probe-req".into()).await;
    let recovered = probe.answer.is_some().then(|| fault_at.elapsed());
    if let Some(task) = frozen.take() {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Row::failed(name, error),
            Err(error) => return Row::failed(name, error.to_string()),
        }
    }
    if matches!(
        fault,
        HaFault::LoseLeaderThenRejoin | HaFault::AsyncLaggingStandby
    ) {
        if let Err(error) = ha(&["start", &old_leader]).await {
            return Row::failed(name, error);
        }
    }
    if negative {
        if let Err(error) = ha(&[
            "set-config",
            r#"{"synchronous_mode": true, "maximum_lag_on_failover": 1048576}"#,
        ])
        .await
        {
            return Row::failed(name, error);
        }
    }
    let whole = ha(&["wait-healthy", "180"]).await;
    let whole_after = fault_at.elapsed();
    if let Err(error) = whole {
        return Row::failed(name, error);
    }
    let new_leader = ha(&["leader"]).await.unwrap_or_default();
    let mut answers = burst.await.expect("the burst task");
    answers.push(probe);
    stop.cancel();
    let (split, samples) = watcher.await.unwrap_or((0, 0));

    let mut row = score(&env, name, i64::from(issued), &answers).await;
    row.recovery = recovered;
    row.expect_loss = negative;
    if negative {
        row.notes.push(
            "negative control: asynchronous and lagging, so it must lose grants (the row fails if it does not)".into(),
        );
    }
    let (twice, example) = granted_twice(&env, &answers).await;
    row.granted_twice = Some(twice);
    if let Some(example) = example {
        row.notes.push(format!("granted twice, e.g. {example}"));
    }
    row.violations += split;
    // The state on the new leader, as a replica serves it, against the log.
    row.violations += audit_on_replica(&env, &mut row.notes).await;
    row.notes.push(format!(
        "leader {old_leader} -> {new_leader}; whole again (old leader a replica, synchronous) after {:.1} s, pg_rewind {}; {split} of {samples} samples saw two primaries",
        whole_after.as_secs_f64(),
        if rewound_since(&old_leader, log_from) { "ran" } else { "not needed" },
    ));
    if new_leader == old_leader {
        row.error
            .get_or_insert_with(|| format!("{old_leader} still leads: no failover happened"));
    }
    system.assert_alive();
    row
}
