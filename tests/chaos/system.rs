//! The system under test as separate processes (a gateway and the
//! consumers, so either can be killed alone), and the faults done to the
//! shared services (`infra/local/restart.sh`: restart, freeze).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::burst::{cluster, partition_leaders, Fault};
use crate::harness::{free_port, Child, TestEnv, CONSUME_ALL};

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
    pub async fn inject(self, env: &TestEnv, fault: Fault) -> Result<Self, String> {
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
    pub async fn heal(&mut self) -> Result<(), String> {
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
pub const FREEZE: Duration = Duration::from_secs(5);

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
