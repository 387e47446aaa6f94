//! The history in Cassandra under test: the settings of a test's own
//! keyspace on the shared node (`make cassandra-up`, 127.0.0.1:9042, or
//! `CASSANDRA_NODES`), and a node of a test's own ([`OwnNode`]) for the
//! faults that kill it, so that the shared node other tests use stays up.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, Utc};

use coupon_platform::cassandra::{CassandraHistory, CassandraSettings};
use coupon_platform::settings;

use crate::harness::TestEnv;

/// The shared node's contact points.
pub fn nodes() -> String {
    std::env::var("CASSANDRA_NODES").unwrap_or_else(|_| settings::CASSANDRA_NODES.into())
}

/// A keyspace of the test's own on `nodes`: its name is the test's
/// (`it_<seconds>_<id>`, a valid keyspace name).
pub fn settings_for(env: &TestEnv, nodes: &str) -> CassandraSettings {
    let mut settings = CassandraSettings::new(nodes, &env.name);
    // Short: a killed node's requests fail fast and the role retries.
    settings.request_timeout = Duration::from_secs(2);
    settings
}

/// Connects to the keyspace of `settings` (creating it), retrying for up
/// to `within`.
pub async fn connect(settings: &CassandraSettings, within: Duration) -> CassandraHistory {
    let deadline = std::time::Instant::now() + within;
    loop {
        match CassandraHistory::connect(settings).await {
            Ok(store) => return store,
            Err(error) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "cannot reach Cassandra at {:?}: {error:?} (is `make cassandra-up` done?)",
                    settings.nodes
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Every history row of the last day and the next (a test's whole history)
/// by kind, from the time table; `None` while Cassandra does not answer.
pub async fn rows_by_kind(
    store: &CassandraHistory,
) -> Option<std::collections::BTreeMap<String, usize>> {
    let now: DateTime<Utc> = Utc::now();
    let rows = store
        .entries(
            None,
            None,
            Some(now - chrono::Duration::days(1)),
            Some(now + chrono::Duration::days(1)),
        )
        .await
        .ok()?;
    let mut kinds = std::collections::BTreeMap::new();
    for row in rows {
        *kinds.entry(row.kind).or_insert(0) += 1;
    }
    Some(kinds)
}

/// A Cassandra node of a test's own (`infra/local/cassandra.sh` with its
/// own directory and ports): started by [`OwnNode::start`], killed with
/// `kill -9`, restarted, and stopped (its directory removed) on drop.
pub struct OwnNode {
    pub dir: PathBuf,
    pub port: u16,
    storage_port: u16,
    jmx_port: u16,
    /// More settings for `cassandra.sh` (`CASSANDRA_AUTH`, TLS).
    env: Vec<(String, String)>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../infra/local/cassandra.sh")
}

impl OwnNode {
    /// A node on `port` (CQL), `port - 2000` (storage) and `port + 100`
    /// (JMX), its state in `target/tmp/<name>`. Pick ports no other test uses,
    /// below the ephemeral range (32768 on Linux), where a client's socket
    /// may hold the port.
    pub fn new(name: &str, port: u16) -> Self {
        Self {
            dir: crate::harness::target_tmp_dir().join(name),
            port,
            storage_port: port - 2_000,
            jmx_port: port + 100,
            env: Vec::new(),
        }
    }

    /// The node started with `cassandra.sh`'s setting `key` = `value`.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    pub fn nodes(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn command(&self, verb: &str) -> Command {
        let mut command = Command::new("bash");
        command
            .arg(script())
            .arg(verb)
            .env("CASSANDRA_DIR", &self.dir)
            .env("CASSANDRA_PORT", self.port.to_string())
            .env("CASSANDRA_STORAGE_PORT", self.storage_port.to_string())
            .env("CASSANDRA_JMX_PORT", self.jmx_port.to_string())
            .env_remove("CASSANDRA_SEEDS")
            .env_remove("CASSANDRA_HOST")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Starts the node (or restarts it after a kill) and waits until it
    /// serves CQL.
    pub async fn start(&self) {
        let mut command = self.command("up");
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("cassandra.sh")
            .expect("run cassandra.sh up");
        assert!(
            output.status.success(),
            "cassandra.sh up failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The node's process id (its pid file).
    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("cassandra.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `kill -9` of the node, then waits until the process is gone.
    pub async fn kill_9(&self) {
        let pid = self.pid().expect("the node's pid file");
        let status = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill -9");
        assert!(status.success(), "kill -9 {pid}");
        crate::harness::eventually(
            "the killed node is gone",
            Duration::from_secs(30),
            || async {
                !std::path::Path::new(&format!("/proc/{pid}")).exists()
                    || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .map(|s| s.contains(") Z "))
                        .unwrap_or(true)
            },
        )
        .await;
        // Its pid file stays behind, as after a crash; a zombie that this
        // machine's init reaps late would read as a node still starting.
        let _ = std::fs::remove_file(self.dir.join("cassandra.pid"));
    }

    /// Stops the node and removes its state (nothing of it is kept, so
    /// no flush is waited for: `kill -9`).
    pub fn stop(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for OwnNode {
    fn drop(&mut self) {
        self.stop();
    }
}
