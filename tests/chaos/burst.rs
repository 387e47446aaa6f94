//! The burst scenarios: a claim burst through HTTP with one fault a third
//! of the way in, on the single-node services (kills, crashes, restarts,
//! freezes, a consumer joining then killed) or on the 3-node Kafka cluster
//! (`infra/local/cluster.sh`: its leader or a follower killed, a broker's
//! controlled restart).

use std::path::Path;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};

use crate::harness::{release, TestEnv};
use crate::processes::Progress;
use crate::profile::Profile;
use crate::score::{claim, guarded, score, Row};
use crate::system::{System, FREEZE};

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

    pub fn on_cluster(self) -> bool {
        Fault::CLUSTER.contains(&self)
    }

    /// The consumer-group protocol the system's consumers speak.
    pub fn group_protocol(self) -> &'static str {
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
pub fn partition_leaders(env: &TestEnv, topic: &str) -> Result<Vec<i32>, String> {
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
