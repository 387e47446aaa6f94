//! Helpers shared by the fault-injection tests (the quick ones in this
//! binary and `make chaos`): a claim client that retries the way a
//! storefront does, and waits on a burst's progress.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

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
