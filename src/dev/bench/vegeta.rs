//! Driving a server with `vegeta` (github.com/tsenart/vegeta, built from the
//! Go module proxy by `make setup`), the open-loop generator of the as-run
//! rows.
//!
//! `wrk` is closed loop: each connection sends its next request when the
//! last one is answered, so a server that slows down slows the load down
//! with it and its queue never shows. Users arriving at a storefront do not
//! wait for each other: `vegeta attack -rate` sends at a fixed rate whatever
//! the answers do, which is what the steady and overload targets ask.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context as _};

use super::Latencies;

/// Whether `vegeta` is on the `PATH`.
pub fn installed() -> bool {
    std::process::Command::new("vegeta")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What an attack's requests were answered: each status code's latencies
/// (code `0`: no answer, a refused connection or a timeout), and the time
/// from the first request sent to the last answer.
#[derive(Debug, Default)]
pub struct Outcome {
    pub by_code: BTreeMap<u16, Vec<Duration>>,
    pub seconds: f64,
}

impl Outcome {
    pub fn sent(&self) -> usize {
        self.by_code.values().map(Vec::len).sum()
    }

    pub fn count(&self, codes: &[u16]) -> usize {
        codes
            .iter()
            .filter_map(|c| self.by_code.get(c))
            .map(Vec::len)
            .sum()
    }

    /// The latencies of the answers with one of `codes`.
    pub fn latencies(&self, codes: &[u16]) -> Option<Latencies> {
        let samples: Vec<Duration> = codes
            .iter()
            .filter_map(|c| self.by_code.get(c))
            .flatten()
            .copied()
            .collect();
        Latencies::of(samples)
    }

    /// Codes other than `expected`, with their counts, for an error message.
    pub fn unexpected(&self, expected: &[u16]) -> Vec<(u16, usize)> {
        self.by_code
            .iter()
            .filter(|(code, _)| !expected.contains(code))
            .map(|(code, l)| (*code, l.len()))
            .collect()
    }
}

/// Requests `vegeta` keeps in flight at most (and connections it opens).
/// Unbounded, a server that slows down makes it open connection after
/// connection until it takes the machine for itself (at 13,000/s it took
/// 80% of the two cores and the server 7%): past this many, the load waits,
/// and the row's own rate shows it fell short of the offered one. Twice
/// the gateway's `MAX_IN_FLIGHT` (1,024), so a server that answers or sheds
/// at the rate asked never meets it.
const MAX_WORKERS: usize = 2_048;

/// Sends one `GET` to each of `urls`, in order, at `rate` a second, with
/// `header` on each, and reads back every answer.
pub async fn attack(urls: &[String], header: &str, rate: f64) -> anyhow::Result<Outcome> {
    if urls.is_empty() {
        bail!("an attack needs at least one URL");
    }
    let dir = Scratch::create()?;
    let (targets, results) = (dir.0.join("targets"), dir.0.join("results"));
    let mut text = String::with_capacity(urls.len() * (urls[0].len() + 8));
    for url in urls {
        text.push_str("GET ");
        text.push_str(url);
        text.push_str("\n\n");
    }
    std::fs::write(&targets, text).context("writing vegeta's targets")?;
    // Exactly as many requests as targets: vegeta would go round them again.
    let duration = Duration::from_secs_f64(urls.len() as f64 / rate);
    let mut attack = tokio::process::Command::new("vegeta");
    attack
        .arg("attack")
        .args(["-rate", &format!("{}/s", rate.round() as u64)])
        .args(["-duration", &format!("{}ms", duration.as_millis())])
        .args(["-timeout", "30s", "-max-body", "0", "-header", header])
        .args(["-max-workers", &MAX_WORKERS.to_string()])
        .args(["-max-connections", &MAX_WORKERS.to_string()])
        .arg("-targets")
        .arg(&targets)
        .arg("-output")
        .arg(&results);
    super::run_tool(&mut attack, "vegeta attack")
        .await?
        .context("vegeta is not installed")?;
    let mut encode = tokio::process::Command::new("vegeta");
    encode.args(["encode", "--to", "csv"]).arg(&results);
    let encoded = super::run_tool(&mut encode, "vegeta encode")
        .await?
        .context("vegeta is not installed")?;
    parse_csv(&String::from_utf8_lossy(&encoded.stdout))
}

/// A folder of its own for an attack's files, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn create() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("couponctl-vegeta-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `vegeta encode --to csv`: a line per request, its first three columns the
/// time it was sent (Unix nanoseconds), the status code and the latency
/// (nanoseconds); the columns after them may hold quoted commas.
fn parse_csv(text: &str) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    let (mut first, mut last) = (u128::MAX, 0u128);
    for line in text.lines().filter(|l| !l.is_empty()) {
        let mut columns = line.splitn(4, ',');
        let mut number = |what: &str| -> anyhow::Result<u128> {
            columns
                .next()
                .and_then(|c| c.parse().ok())
                .with_context(|| format!("vegeta's result has no {what}: {line}"))
        };
        let (sent, code, latency) = (number("time")?, number("code")?, number("latency")?);
        let code = u16::try_from(code).with_context(|| format!("status {code} in: {line}"))?;
        first = first.min(sent);
        last = last.max(sent + latency);
        let latency = Duration::from_nanos(u64::try_from(latency).unwrap_or(u64::MAX));
        outcome.by_code.entry(code).or_default().push(latency);
    }
    if outcome.by_code.is_empty() {
        bail!("vegeta recorded no results");
    }
    outcome.seconds = (last - first) as f64 / 1e9;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_codes_latencies_and_the_span_of_the_attack() {
        let text = "\
1000000000,200,2000000,0,0,,,,0,GET,http://x/?id=a,
1500000000,404,1000000,0,0,\"404 Not Found, sold out\",,,1,GET,http://x/?id=b,
1600000000,0,30000000,0,0,\"dial tcp: connection refused\",,,2,GET,http://x/?id=c,
2000000000,200,500000000,0,0,,,,3,GET,http://x/?id=d,
";
        let outcome = parse_csv(text).unwrap();
        assert_eq!(outcome.sent(), 4);
        assert_eq!(outcome.count(&[200]), 2);
        assert_eq!(outcome.count(&[404, 0]), 2);
        assert_eq!(outcome.unexpected(&[200, 404]), vec![(0, 1)]);
        // From the first send (1.0 s) to the last answer (2.0 s + 0.5 s).
        assert!((outcome.seconds - 1.5).abs() < 1e-9);
        let grants = outcome.latencies(&[200]).unwrap();
        assert_eq!(grants.max, Duration::from_millis(500));
    }

    #[test]
    fn an_unreadable_line_is_an_error_not_a_zero() {
        assert!(parse_csv("1000,abc,5\n").is_err());
        assert!(parse_csv("").is_err());
    }
}
