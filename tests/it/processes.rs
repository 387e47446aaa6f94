//! Child processes and clients shared by the fault-injection tests (the
//! quick ones in this binary and `make chaos`): the real `couponctl` binary
//! run as a separate process, so a test can `kill -9` it, and a claim client
//! that retries the way a storefront does.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{redis_url, TestEnv};

/// Like `eventually`, but hands back what the successful check found.
pub async fn eventually_some<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Counts answers and wakes whoever waits for the `at`-th one at once (a
/// polling wait would see the burst long past that point).
pub struct Progress {
    count: AtomicUsize,
    at: usize,
    reached: tokio::sync::Notify,
}

impl Progress {
    pub fn new(at: usize) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            at,
            reached: tokio::sync::Notify::new(),
        })
    }

    pub fn tick(&self) {
        if self.count.fetch_add(1, Ordering::SeqCst) + 1 == self.at {
            self.reached.notify_one();
        }
    }

    pub async fn wait(&self, within: Duration) -> usize {
        tokio::time::timeout(within, self.reached.notified())
            .await
            .unwrap_or_else(|_| panic!("fewer than {} answers after {within:?}", self.at));
        self.count.load(Ordering::SeqCst)
    }
}

pub fn free_port() -> u16 {
    // Bound and released at once: the child binds it a moment later.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// A `couponctl` child process. Dropping it kills it (SIGKILL), so a failing
/// test leaves nothing running.
pub struct Child {
    process: tokio::process::Child,
    log: PathBuf,
    label: String,
}

impl Child {
    pub fn spawn(env: &TestEnv, args: &[&str], port: u16, label: &str) -> Self {
        Self::spawn_with(env, args, port, label, &[])
    }

    /// Like `spawn`, with settings of the test's own laid over the defaults.
    pub fn spawn_with(
        env: &TestEnv,
        args: &[&str],
        port: u16,
        label: &str,
        settings: &[(&str, &str)],
    ) -> Self {
        // Kept after the run (in the target dir) for a look when a test fails.
        let log =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{label}.log", env.name));
        let file = std::fs::File::create(&log).expect("child log file");
        let process = tokio::process::Command::new(env!("CARGO_BIN_EXE_couponctl"))
            .args(args)
            .env("DATABASE_URL", &env.database_url)
            .env("COUPON_TOPIC_PREFIX", &env.name)
            .env("REDIS_URL", redis_url())
            .env("KAFKA_BROKERS", &env.kafka.brokers)
            .env("TOPIC_PARTITIONS", "2")
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("COUPON_ADMIN_TOKEN", "admin-secret")
            .env("HOLD_TTL", "60s")
            .env("REPLY_TIMEOUT", "2s")
            .env("FLOOD_LIMIT", "1000000")
            .env("SLOW_FETCH_WAIT_MS", "50")
            .env("SWEEP_INTERVAL", "250ms")
            .env("RUST_LOG", "info,rdkafka=warn,sqlx=warn")
            .env_remove("COUPON_API_TOKEN")
            .env_remove("COUPON_REDIS_PREFIX")
            .env_remove("CONSUMER_INSTANCE")
            .envs(settings.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file handle"))
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn couponctl");
        Self {
            process,
            log,
            label: label.to_owned(),
        }
    }

    #[allow(dead_code)] // only the chaos binary samples memory
    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Fails early, with the child's log, if the child has died.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.process.try_wait() {
            panic!(
                "couponctl {} exited with {status}:\n{}",
                self.label,
                self.log_tail()
            );
        }
    }

    pub async fn wait_healthy(&mut self, base: &str, within: Duration) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let deadline = Instant::now() + within;
        loop {
            self.assert_alive();
            if let Ok(response) = http.get(format!("{base}/healthz")).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "couponctl {} not healthy after {within:?}:\n{}",
                self.label,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`: no shutdown hook runs, nothing is flushed or committed.
    pub async fn kill_9(mut self) {
        self.assert_alive();
        self.process.kill().await.expect("kill -9");
    }
}

/// One claim through HTTP with a chosen request id. Transport errors, 503 and
/// 504 are retried with the same request id (what a storefront does; the
/// spec says retrying is safe) until `deadline`. Returns the final answer, if
/// any, and how many attempts failed on the way.
pub async fn claim_with_retries(
    http: &reqwest::Client,
    base: &str,
    user: &str,
    request_id: &str,
    deadline: Instant,
) -> (Option<(u16, Value)>, u32) {
    let mut failures = 0;
    loop {
        let attempt = http
            .get(format!("{base}/api/v1/coupon?id={user}"))
            .header("x-request-id", request_id)
            .send()
            .await;
        match attempt {
            Ok(response) if !matches!(response.status().as_u16(), 502..=504) => {
                let status = response.status().as_u16();
                let body = response.json().await.unwrap_or(Value::Null);
                return (Some((status, body)), failures);
            }
            _ => failures += 1,
        }
        if Instant::now() >= deadline {
            return (None, failures);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
