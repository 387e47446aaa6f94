//! The scenarios of the fault-injection run and the checks that score them.
//!
//! Scoring reads the truth from the event log and the database, never from
//! what the clients believe: a request is *lost* when it reached the claims
//! topic but has no decision (stored and published), or when its client never
//! got a final answer; *duplicated* when the results topic carries two
//! different decisions for it; and an *invariant violation* is a broken rule
//! of the spec or an HTTP answer that disagrees with the stored decision.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use coupon_platform::kafka::decode;
use coupon_schemas::{ClaimDecided, ClaimRequested};
use couponctl::dev::bench::profile::{self, MemoryProfile};

use crate::harness::{free_port, invariant_violations, release, Child, TestEnv, CONSUME_ALL};
use crate::processes::{claim_with_retries, Progress};

/// How long a client keeps retrying one request through an outage.
const CLIENT_PATIENCE: Duration = Duration::from_secs(240);
/// How long a whole scenario may take before it counts as failed.
const SCENARIO_LIMIT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone)]
pub struct Profile {
    /// Distinct users in each burst; the pool holds half as many coupons.
    pub users: usize,
    /// Claims per second in the sustained scenario.
    pub rate: u32,
    pub sustained: Duration,
}

impl Profile {
    pub fn quick() -> Self {
        Self {
            users: 400,
            rate: 100,
            sustained: Duration::from_secs(15),
        }
    }

    /// `CHAOS_USERS`, `CHAOS_RATE` and `CHAOS_SUSTAINED` (e.g. `10m`) override
    /// the defaults.
    pub fn long() -> Self {
        let number = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let sustained = std::env::var("CHAOS_SUSTAINED")
            .ok()
            .and_then(|v| humantime::parse_duration(&v).ok())
            .unwrap_or(Duration::from_secs(300));
        Self {
            users: number("CHAOS_USERS", 5_000) as usize,
            rate: number("CHAOS_RATE", 200) as u32,
            sustained,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    KillConsumers,
    KillGateway,
    CrashBroker,
    RestartPostgres,
    RestartRedis,
    /// Redis stops answering for `FREEZE` (SIGSTOP, then SIGCONT): its
    /// connections stay open, so only timeouts tell.
    FreezeRedis,
    /// Every Postgres process stops for `FREEZE`.
    FreezePostgres,
    /// The broker stops for `FREEZE`.
    FreezeBroker,
    /// A second consumers process joins the groups mid-burst (classic
    /// protocol, cooperative-sticky); once it holds partitions, the first is
    /// killed with `kill -9` and not restarted: the second takes over all.
    ScaleOutThenKill,
    /// The same under KIP-848's `consumer` group protocol.
    ScaleOutThenKillKip848,
    /// On the 3-node cluster: `kill -9` of the node that leads the claims
    /// topic's first partition, restarted once the system answers again.
    ClusterKillLeader,
    /// On the 3-node cluster: `kill -9` of a node that leads no claims
    /// partition (a follower of them all), restarted the same way.
    ClusterKillFollower,
    /// On the 3-node cluster: a controlled shutdown of the claims leader and
    /// a start, as a rolling upgrade does.
    ClusterRestartBroker,
}

impl Fault {
    /// The faults of the single-node services.
    pub const ALL: [Fault; 10] = [
        Fault::KillConsumers,
        Fault::KillGateway,
        Fault::CrashBroker,
        Fault::RestartPostgres,
        Fault::RestartRedis,
        Fault::FreezeRedis,
        Fault::FreezePostgres,
        Fault::FreezeBroker,
        Fault::ScaleOutThenKill,
        Fault::ScaleOutThenKillKip848,
    ];
    /// The faults of one node of the 3-node cluster.
    pub const CLUSTER: [Fault; 3] = [
        Fault::ClusterKillLeader,
        Fault::ClusterKillFollower,
        Fault::ClusterRestartBroker,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillConsumers => "kill -9 consumers",
            Fault::KillGateway => "kill -9 gateway",
            Fault::CrashBroker => "broker crash + restart",
            Fault::RestartPostgres => "postgres restart",
            Fault::RestartRedis => "redis restart (data lost)",
            Fault::FreezeRedis => "redis frozen 5 s",
            Fault::FreezePostgres => "postgres frozen 5 s",
            Fault::FreezeBroker => "broker frozen 5 s",
            Fault::ScaleOutThenKill => "join + kill -9 (cooperative)",
            Fault::ScaleOutThenKillKip848 => "join + kill -9 (KIP-848)",
            Fault::ClusterKillLeader => "cluster: kill -9 leader",
            Fault::ClusterKillFollower => "cluster: kill -9 follower",
            Fault::ClusterRestartBroker => "cluster: broker restart",
        }
    }

    fn on_cluster(self) -> bool {
        Fault::CLUSTER.contains(&self)
    }

    /// The consumer-group protocol the system's consumers speak.
    fn group_protocol(self) -> &'static str {
        if self == Fault::ScaleOutThenKillKip848 {
            "consumer"
        } else {
            "classic"
        }
    }
}

/// The 3-node cluster's script (`infra/local/cluster.sh`).
pub async fn cluster(args: &[&str]) -> Result<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/local/cluster.sh");
    let output = tokio::process::Command::new(&script)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "cluster.sh {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The node ids that lead the partitions of `topic`, by partition.
fn partition_leaders(env: &TestEnv, topic: &str) -> Result<Vec<i32>, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = env
        .kafka
        .client_config()
        .create()
        .map_err(|e| e.to_string())?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    let mut partitions: Vec<(i32, i32)> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| (p.id(), p.leader())))
        .collect();
    partitions.sort();
    Ok(partitions.into_iter().map(|(_, leader)| leader).collect())
}

#[derive(Debug, Default)]
pub struct Row {
    pub scenario: String,
    pub requests: usize,
    pub decisions: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub violations: usize,
    /// From the fault to the first fresh claim answered again.
    pub recovery: Option<Duration>,
    /// The Patroni scenarios only: answered grants the new leader does not
    /// hold (the user was told "yours", the database forgot it, so the
    /// coupon can be granted again), plus coupons answered to two users.
    pub granted_twice: Option<usize>,
    /// A negative control: the scenario must lose something, or the check
    /// could not tell a loss (then the row fails).
    pub expect_loss: bool,
    pub notes: Vec<String>,
    /// Set when the scenario itself broke (a panic, a timeout, a script).
    pub error: Option<String>,
}

impl Row {
    pub fn failed(scenario: &str, error: String) -> Self {
        Self {
            scenario: scenario.to_owned(),
            error: Some(error),
            ..Self::default()
        }
    }

    /// Whether anything was lost, duplicated, broken or granted twice.
    pub fn lossy(&self) -> bool {
        self.lost > 0
            || self.duplicated > 0
            || self.violations > 0
            || self.granted_twice.unwrap_or(0) > 0
            || self.decisions != self.requests
    }

    pub fn clean(&self) -> bool {
        if self.expect_loss {
            return self.error.is_none() && self.requests > 0 && self.lossy();
        }
        self.error.is_none()
            && self.granted_twice.unwrap_or(0) == 0
            && self.lost == 0
            && self.duplicated == 0
            && self.violations == 0
            && self.requests > 0
            && self.decisions == self.requests
    }

    pub fn summary(&self) -> String {
        match &self.error {
            Some(error) => format!("{}: FAILED: {error}", self.scenario),
            None => format!(
                "{}: {} requests, {} decisions, {} lost, {} duplicated, {} violations, {} granted twice, recovery {}{}",
                self.scenario,
                self.requests,
                self.decisions,
                self.lost,
                self.duplicated,
                self.violations,
                twice(self.granted_twice),
                recovery(self.recovery),
                self.notes
                    .iter()
                    .map(|n| format!("; {n}"))
                    .collect::<String>()
            ),
        }
    }
}

fn twice(count: Option<usize>) -> String {
    count.map_or("-".into(), |n| n.to_string())
}

fn recovery(duration: Option<Duration>) -> String {
    duration.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

pub fn render(rows: &[Row]) -> String {
    let mut out = format!(
        "\n| {:<26} | {:>8} | {:>9} | {:>4} | {:>10} | {:>10} | {:>13} | {:>8} |\n|{}|\n",
        "scenario",
        "requests",
        "decisions",
        "lost",
        "duplicated",
        "violations",
        "granted twice",
        "recovery",
        "---|".repeat(8).trim_end_matches('|')
    );
    for row in rows {
        match &row.error {
            Some(error) => out.push_str(&format!("| {:<26} | FAILED: {error} |\n", row.scenario)),
            None => out.push_str(&format!(
                "| {:<26} | {:>8} | {:>9} | {:>4} | {:>10} | {:>10} | {:>13} | {:>8} |\n",
                row.scenario,
                row.requests,
                row.decisions,
                row.lost,
                row.duplicated,
                row.violations,
                twice(row.granted_twice),
                recovery(row.recovery)
            )),
        }
    }
    for row in rows.iter().filter(|r| !r.notes.is_empty()) {
        out.push_str(&format!("\n{}: {}", row.scenario, row.notes.join("; ")));
    }
    out
}

/// Runs a scenario on its own task, so a panic in it (a harness assertion)
/// becomes a failed row instead of ending the whole run.
pub async fn guarded<F>(name: &str, scenario: F) -> Row
where
    F: std::future::Future<Output = Row> + Send + 'static,
{
    match tokio::time::timeout(SCENARIO_LIMIT, tokio::spawn(scenario)).await {
        Ok(Ok(row)) => row,
        Ok(Err(join)) => {
            let reason = match join.try_into_panic() {
                Ok(panic) => panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panicked".into()),
                Err(join) => join.to_string(),
            };
            Row::failed(name, reason)
        }
        Err(_) => Row::failed(name, format!("did not finish within {SCENARIO_LIMIT:?}")),
    }
}

/// The system under test as two processes, so either can be killed alone.
pub struct System {
    pub consumers: Child,
    pub gateway: Child,
    port: u16,
    pub base: String,
    generation: u32,
    /// A cluster node the fault stopped, to start again once the system
    /// answers without it.
    stopped_node: Option<i32>,
    /// A freeze under way: ends (SIGCONT) when this task does.
    frozen: Option<tokio::task::JoinHandle<Result<(), String>>>,
    /// `KAFKA_GROUP_PROTOCOL` of every consumers process.
    protocol: &'static str,
}

/// A consumers process speaking `protocol`.
fn spawn_consumers(env: &TestEnv, protocol: &'static str, label: &str) -> Child {
    Child::spawn_with(env, CONSUME_ALL, free_port(), label, |command| {
        command.env("KAFKA_GROUP_PROTOCOL", protocol);
    })
}

impl System {
    pub async fn start(env: &TestEnv, protocol: &'static str) -> Self {
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let consumers = spawn_consumers(env, protocol, "consumers-0");
        let mut gateway = Child::spawn(env, &["gateway"], port, "gateway-0");
        gateway.wait_healthy(&base, Duration::from_secs(60)).await;
        Self {
            consumers,
            gateway,
            port,
            base,
            generation: 0,
            stopped_node: None,
            frozen: None,
            protocol,
        }
    }

    /// Breaks what `fault` names and starts it again, the way an operator's
    /// supervisor (systemd, Kubernetes) would.
    async fn inject(self, env: &TestEnv, fault: Fault) -> Result<Self, String> {
        let Self {
            mut consumers,
            mut gateway,
            port,
            base,
            generation,
            mut stopped_node,
            mut frozen,
            protocol,
        } = self;
        let generation = generation + 1;
        match fault {
            Fault::KillConsumers => {
                consumers.kill_9().await;
                consumers = spawn_consumers(env, protocol, &format!("consumers-{generation}"));
            }
            Fault::ScaleOutThenKill | Fault::ScaleOutThenKillKip848 => {
                let joined = spawn_consumers(env, protocol, &format!("consumers-{generation}"));
                // The newcomer must really hold claims partitions before the
                // first dies, or this would be a plain restart.
                let group = env.topics.group(couponctl::app::Role::Claims);
                let claims = format!("{}[", env.topics.claims());
                let deadline = Instant::now() + Duration::from_secs(60);
                while !joined.log_text().lines().any(|line| {
                    line.contains("partitions assigned")
                        && line.contains(&group)
                        && line.contains(&claims)
                }) {
                    if Instant::now() > deadline {
                        return Err(format!(
                            "the second consumers process got no claims partition within 60 s: {}",
                            joined.log_tail()
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                consumers.kill_9().await;
                consumers = joined;
            }
            Fault::KillGateway => {
                gateway.kill_9().await;
                gateway = Child::spawn(env, &["gateway"], port, &format!("gateway-{generation}"));
                gateway.wait_healthy(&base, Duration::from_secs(60)).await;
            }
            Fault::CrashBroker => restart_service("broker").await?,
            Fault::RestartPostgres => restart_service("postgres").await?,
            Fault::RestartRedis => restart_service("redis").await?,
            // The probe claims while the service is stopped: a frozen cache
            // should cost speed only, a frozen authority an answer after it.
            Fault::FreezeRedis => frozen = Some(freeze_service("redis").await?),
            Fault::FreezePostgres => frozen = Some(freeze_service("postgres").await?),
            Fault::FreezeBroker => frozen = Some(freeze_service("broker").await?),
            Fault::ClusterKillLeader | Fault::ClusterKillFollower | Fault::ClusterRestartBroker => {
                let leaders = partition_leaders(env, &env.topics.claims())?;
                let leader = *leaders
                    .first()
                    .ok_or("the claims topic has no partitions")?;
                let node = if fault == Fault::ClusterKillFollower {
                    (1..=3)
                        .find(|n| !leaders.contains(n))
                        .or_else(|| (1..=3).find(|n| *n != leader))
                        .ok_or("no follower")?
                } else {
                    leader
                };
                let how = if fault == Fault::ClusterRestartBroker {
                    "stop"
                } else {
                    "kill"
                };
                eprintln!("chaos: claims partition leaders {leaders:?}; {how} node {node}");
                cluster(&[how, &node.to_string()]).await?;
                stopped_node = Some(node);
            }
        }
        Ok(Self {
            consumers,
            gateway,
            port,
            base,
            generation,
            stopped_node,
            frozen,
            protocol,
        })
    }

    /// Starts the cluster node the fault stopped, if any.
    async fn heal(&mut self) -> Result<(), String> {
        if let Some(freeze) = self.frozen.take() {
            freeze.await.map_err(|e| e.to_string())??;
        }
        if let Some(node) = self.stopped_node.take() {
            cluster(&["start", &node.to_string()]).await?;
        }
        Ok(())
    }

    pub fn assert_alive(&mut self) {
        self.consumers.assert_alive();
        self.gateway.assert_alive();
    }
}

/// How long a frozen service stays stopped.
const FREEZE: Duration = Duration::from_secs(5);

fn fault_script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/local/restart.sh")
}

/// `Ok` if the fault script succeeded, else its reason.
fn script_outcome(what: &str, output: &std::process::Output) -> Result<(), String> {
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

async fn restart_service(service: &str) -> Result<(), String> {
    let output = tokio::process::Command::new(fault_script())
        .arg(service)
        .output()
        .await
        .map_err(|e| format!("{}: {e}", fault_script().display()))?;
    script_outcome(&format!("restarting {service}"), &output)
}

/// Stops `service`'s processes for `FREEZE`; returns once they are
/// stopped, with the task that ends when they go on again.
async fn freeze_service(
    service: &str,
) -> Result<tokio::task::JoinHandle<Result<(), String>>, String> {
    use tokio::io::AsyncBufReadExt as _;
    let mut child = tokio::process::Command::new(fault_script())
        .args(["freeze", service, &FREEZE.as_secs().to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", fault_script().display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = lines.next_line().await.map_err(|e| e.to_string())?;
    let stopped = first.as_deref().is_some_and(|l| l.contains("stopped"));
    let what = format!("freezing {service}");
    let thawed = tokio::spawn(async move {
        // Read to the end, or the script's last line would meet a closed pipe.
        while let Ok(Some(_)) = lines.next_line().await {}
        let output = child.wait_with_output().await.map_err(|e| e.to_string())?;
        script_outcome(&what, &output)
    });
    if stopped {
        Ok(thawed)
    } else {
        Err(thawed
            .await
            .map_err(|e| e.to_string())?
            .err()
            .unwrap_or_else(|| format!("the freeze script said {first:?}")))
    }
}

/// One user's claim and the final answer it got, if any.
pub struct Answer {
    pub user: String,
    pub request_id: String,
    pub answer: Option<(u16, Value)>,
}

pub async fn claim(http: &reqwest::Client, base: &str, user: String, request_id: String) -> Answer {
    let deadline = Instant::now() + CLIENT_PATIENCE;
    let (answer, _) = claim_with_retries(http, base, &user, &request_id, deadline).await;
    Answer {
        user,
        request_id,
        answer,
    }
}

pub async fn burst_with_fault(fault: Fault, profile: &Profile) -> Row {
    let profile = profile.clone();
    guarded(fault.name(), burst(fault, profile)).await
}

async fn burst(fault: Fault, profile: Profile) -> Row {
    let env = if fault.on_cluster() {
        match cluster(&["brokers"]).await {
            Ok(brokers) => TestEnv::on_brokers(brokers).await,
            Err(error) => return Row::failed(fault.name(), error),
        }
    } else {
        TestEnv::new().await
    };
    let mut system = System::start(&env, fault.group_protocol()).await;
    let issued = (profile.users / 2) as u32;
    release(&env, "Chaos", issued).await;

    let http = TestEnv::http_client();
    let progress = Progress::new(profile.users / 3);
    let burst = {
        let (http, base, progress) = (http.clone(), system.base.clone(), progress.clone());
        tokio::spawn(async move {
            stream::iter(0..profile.users)
                .map(|i| {
                    let (http, base, progress) = (http.clone(), base.clone(), progress.clone());
                    async move {
                        let answer =
                            claim(&http, &base, format!("user-{i}"), format!("req-{i}")).await;
                        progress.tick();
                        answer
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await
        })
    };
    progress.wait(Duration::from_secs(120)).await;
    let fault_at = Instant::now();
    system = match system.inject(&env, fault).await {
        Ok(system) => system,
        Err(error) => return Row::failed(fault.name(), error),
    };
    // A fresh user, after the fault: the system serves again once it answers.
    let probe = claim(&http, &system.base, "probe".into(), "probe-req".into()).await;
    let recovered = probe.answer.is_some().then(|| fault_at.elapsed());
    if let Err(error) = system.heal().await {
        return Row::failed(fault.name(), error);
    }
    let mut answers = burst.await.expect("the burst task");
    answers.push(probe);

    let mut row = score(&env, fault.name(), i64::from(issued), &answers).await;
    row.recovery = recovered;
    // Redis is a cache: while it is stopped, claims are decided without it.
    if fault == Fault::FreezeRedis && recovered.is_none_or(|r| r >= FREEZE) {
        row.error.get_or_insert_with(|| {
            format!("no claim was answered while Redis was frozen (recovery {recovered:?})")
        });
    }
    system.assert_alive();
    row
}

/// Scores a scenario from the claims topic, the results topic and the
/// database, after giving the system up to a minute to drain.
pub async fn score(env: &TestEnv, scenario: &str, issued: i64, answers: &[Answer]) -> Row {
    // A claim answered from a sold-out mark is answered before its record is
    // delivered (the gateway does not wait for that produce), and a leader
    // failover can hold the delivery for seconds: wait for every answered
    // request to reach the log before calling one "never requested".
    let answered: HashSet<&str> = answers
        .iter()
        .filter(|a| a.answer.is_some())
        .map(|a| a.request_id.as_str())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let requested: HashSet<String> = loop {
        let requested: HashSet<String> = env
            .read_topic(&env.topics.claims())
            .await
            .iter()
            .filter_map(|record| decode::<ClaimRequested>(record).ok())
            .map(|claim| claim.request_id)
            .collect();
        if answered.iter().all(|id| requested.contains(*id)) || Instant::now() > deadline {
            break requested;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ids: Vec<String> = requested.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored: HashMap<String, (String, Option<String>, uuid::Uuid)> = loop {
        let rows: Vec<(String, String, Option<String>, uuid::Uuid)> = sqlx::query_as(
            "SELECT request_id, outcome, coupon_code, event_id FROM claim_decisions
              WHERE request_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&env.pool)
        .await
        .expect("stored decisions");
        if rows.len() == ids.len() || Instant::now() > deadline {
            break rows
                .into_iter()
                .map(|(id, outcome, code, event)| (id, (outcome, code, event)))
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut published: HashMap<String, HashSet<String>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        published.clear();
        for record in env.read_topic(&env.topics.claim_results()).await {
            if let Ok(decision) = decode::<ClaimDecided>(&record) {
                let event_id = decision.envelope.map(|e| e.event_id).unwrap_or_default();
                published
                    .entry(decision.request_id)
                    .or_default()
                    .insert(event_id);
            }
        }
        if stored.keys().all(|id| published.contains_key(id)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut row = Row {
        scenario: scenario.to_owned(),
        requests: answers.len().max(requested.len()),
        decisions: stored.len(),
        ..Row::default()
    };
    let undecided = requested
        .iter()
        .filter(|id| !stored.contains_key(*id))
        .count();
    let unpublished = stored
        .keys()
        .filter(|id| !published.contains_key(*id))
        .count();
    let unanswered = answers.iter().filter(|a| a.answer.is_none()).count();
    let never_requested = answers
        .iter()
        .filter(|a| a.answer.is_some() && !requested.contains(&a.request_id))
        .count();
    row.lost = undecided + unpublished + unanswered;
    row.duplicated = published.values().filter(|events| events.len() > 1).count();
    for (what, n) in [
        ("undecided", undecided),
        ("decided, never published", unpublished),
        ("no final HTTP answer", unanswered),
        ("answered but never requested", never_requested),
    ] {
        if n > 0 {
            row.notes.push(format!("{n} {what}"));
        }
    }

    for (invariant, n) in invariant_violations(env, issued).await {
        row.violations += n as usize;
        row.notes.push(format!("{invariant}: {n} violations"));
    }
    let mut wrong = Vec::new();
    for answer in answers {
        let Some((status, body)) = &answer.answer else {
            continue;
        };
        let decision = stored.get(&answer.request_id);
        let right = match (status, decision) {
            (200, Some((outcome, code, _))) => {
                outcome == "granted" && body["coupon_code"].as_str() == code.as_deref()
            }
            (404, Some((outcome, _, _))) => outcome == "sold_out",
            _ => false,
        };
        if !right {
            wrong.push(format!(
                "{} answered {status} {body}, stored {decision:?}",
                answer.user
            ));
        }
    }
    row.violations += wrong.len() + never_requested;
    if let Some(first) = wrong.first() {
        row.notes
            .push(format!("{} wrong answers, e.g. {first}", wrong.len()));
    }
    row
}

pub async fn sustained(profile: &Profile) -> Row {
    let profile = profile.clone();
    guarded("sustained mixed load", sustained_load(profile)).await
}

/// Memory and lag, sampled once a second while the load runs.
#[derive(Default)]
struct Samples {
    rss_kib: Vec<u64>,
    lag: Vec<i64>,
}

async fn sustained_load(profile: Profile) -> Row {
    let env = TestEnv::new().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    // A short hold, so that expirations return coupons to the pool while
    // the load runs: claims, purchases and expirations all mix.
    let mut run = Child::spawn_with(&env, &["run"], port, "run", |command| {
        command.env("HOLD_TTL", "3s");
    });
    run.wait_healthy(&base, Duration::from_secs(60)).await;
    let total = (profile.rate as f64 * profile.sustained.as_secs_f64()) as usize;
    let issued = (total / 4).max(50) as u32;
    release(&env, "Steady", issued).await;

    let samples = Arc::new(Mutex::new(Samples::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (samples, stop, pid) = (samples.clone(), stop.clone(), run.pid());
        let (kafka, group, topic) = (
            env.kafka.clone(),
            env.topics.group(couponctl::app::Role::Claims),
            env.topics.claims(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !stop.is_cancelled() {
                tick.tick().await;
                let rss = pid.and_then(profile::rss_kib);
                let (k, g, t) = (kafka.clone(), group.clone(), topic.clone());
                let lag = tokio::task::spawn_blocking(move || {
                    coupon_platform::kafka::lag::group_lag(&k, &g, &[t])
                        .map(|lags| lags.iter().map(|p| p.lag).sum::<i64>())
                })
                .await;
                let mut samples = samples.lock().await;
                samples.rss_kib.extend(rss);
                if let Ok(Ok(lag)) = lag {
                    samples.lag.push(lag);
                }
            }
        })
    };

    let http = TestEnv::http_client();
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let redeemed_answers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(total);
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / profile.rate as f64));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..total {
        pace.tick().await;
        let (http, base) = (http.clone(), base.clone());
        let (latencies, redeemed) = (latencies.clone(), redeemed_answers.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let answer = claim(
                &http,
                &base,
                format!("steady-{i}"),
                format!("steady-req-{i}"),
            )
            .await;
            latencies.lock().await.push(started.elapsed());
            // Two in five winners buy at once; the rest let the hold expire.
            if let Some((200, body)) = &answer.answer {
                if i % 5 < 2 {
                    if let Some(code) = body["coupon_code"].as_str() {
                        if purchase(&http, &base, &answer.user, code, &format!("order-{i}")).await {
                            redeemed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
            }
            answer
        }));
    }
    let mut answers = Vec::with_capacity(total);
    for task in tasks {
        answers.push(task.await.expect("a client task"));
    }
    stop.cancel();
    let _ = sampler.await;

    let mut row = score(&env, "sustained mixed load", i64::from(issued), &answers).await;
    let redeemed_answers = redeemed_answers.load(std::sync::atomic::Ordering::SeqCst) as i64;
    let redeemed = env.status_counts().await.redeemed;
    if redeemed != redeemed_answers {
        row.violations += 1;
        row.notes.push(format!(
            "{redeemed_answers} purchases answered 200 but {redeemed} coupons redeemed"
        ));
    }
    let expired = env
        .count("SELECT count(*) FROM coupon_history WHERE kind = 'released'")
        .await;
    let samples = samples.lock().await;
    let mut latencies = latencies.lock().await.clone();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    row.notes.push(format!(
        "{} claims at {}/s for {} s: p50 {} ms, p99 {} ms; {redeemed} redeemed, {expired} holds expired",
        latencies.len(),
        profile.rate,
        profile.sustained.as_secs(),
        at(0.5).as_millis(),
        at(0.99).as_millis()
    ));
    row.violations += judge_memory(&samples.rss_kib, &mut row.notes);
    row.violations += judge_lag(&samples.lag, profile.rate, &mut row.notes);
    run.assert_alive();
    row
}

fn median<T: Copy + Ord>(values: &[T]) -> Option<T> {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied()
}

/// Memory must not grow once warmed up: the median of the last quarter of
/// the run may exceed the second quarter's by 25% + 16 MiB at most (caches
/// and allocator slack), not more.
fn judge_memory(rss_kib: &[u64], notes: &mut Vec<String>) -> usize {
    let profile = MemoryProfile {
        rss_kib: rss_kib.to_vec(),
    };
    let Some((warm, late)) = profile.warm_and_end() else {
        notes.push(format!("only {} memory samples", rss_kib.len()));
        return 1;
    };
    notes.push(profile.to_string());
    usize::from(late > warm + warm / 4 + 16 * 1024)
}

/// Lag must not grow: the second half's median may not exceed the first
/// half's by more than one second of traffic.
fn judge_lag(lag: &[i64], rate: u32, notes: &mut Vec<String>) -> usize {
    let half = lag.len() / 2;
    let (Some(first), Some(second)) = (median(&lag[..half]), median(&lag[half..])) else {
        notes.push(format!("only {} lag samples", lag.len()));
        return 1;
    };
    notes.push(format!(
        "claims lag median {first} then {second}, max {}",
        lag.iter().max().copied().unwrap_or(0)
    ));
    usize::from(second > first + i64::from(rate))
}

/// Buys `code`, retrying through outages on the same order id. True when
/// the answer was 200 (redeemed).
async fn purchase(http: &reqwest::Client, base: &str, user: &str, code: &str, order: &str) -> bool {
    let deadline = Instant::now() + CLIENT_PATIENCE;
    loop {
        let attempt = http
            .post(format!("{base}/api/v1/purchase"))
            .json(&json!({"user_id": user, "coupon_code": code, "order_id": order}))
            .send()
            .await;
        match attempt {
            Ok(response) if !matches!(response.status().as_u16(), 502..=504) => {
                return response.status() == 200
            }
            _ if Instant::now() >= deadline => return false,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
