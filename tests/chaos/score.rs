//! How a scenario is scored, and the clients whose answers it scores.
//!
//! Scoring reads the truth from the event log and the database, never from
//! what the clients believe: a request is *lost* when it reached the claims
//! topic but has no decision (stored and published), or when its client never
//! got a final answer; *duplicated* when the results topic carries two
//! different decisions for it; and an *invariant violation* is a broken rule
//! of the spec or an HTTP answer that disagrees with the stored decision.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use coupon_platform::kafka::decode;
use coupon_schemas::{ClaimDecided, ClaimRequested};

use crate::harness::{invariant_violations, TestEnv};
use crate::processes::claim_with_retries;

/// How long a client keeps retrying one request through an outage.
/// How long a whole scenario may take before it counts as failed.
const SCENARIO_LIMIT: Duration = Duration::from_secs(900);
/// How long a client keeps retrying one request through an outage.
pub const CLIENT_PATIENCE: Duration = Duration::from_secs(240);

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

    // Invariant 4 counts `expired` coupons too (a campaign's end takes them
    // out of the pool, never out of the issued total): see the harness.
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
