//! Reading `wrk --latency`'s summary: the bench drives `wrk` on `/healthz`
//! beside its own generator, so a generator that cannot keep up shows as a
//! gap between the two rows of the same run.

use std::time::Duration;

use anyhow::bail;

use super::{Latencies, Row, Scenario};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub requests: u64,
    pub per_second: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub non_2xx: u64,
}

impl Summary {
    /// The bench's row of this run: its requests, their time and latencies.
    pub fn row(&self, kind: Scenario, scenario: &str, note: String) -> Row {
        Row {
            kind,
            memory: None,
            open_loop: None,
            scenario: scenario.into(),
            operations: self.requests,
            seconds: self.requests as f64 / self.per_second.max(1e-9),
            latencies: Some(Latencies {
                p50: self.p50,
                p99: self.p99,
                max: self.max,
            }),
            note,
        }
    }
}

/// Runs `wrk -t2 --latency` with `connections` for `seconds` and `args`
/// (the URL among them) and reads its summary; `None` when `wrk` is not
/// installed (`make setup` installs it).
pub async fn run(
    connections: usize,
    seconds: u64,
    args: &[&str],
) -> anyhow::Result<Option<Summary>> {
    let mut command = tokio::process::Command::new("wrk");
    command
        .args(["-t2", "-c", &connections.to_string()])
        .args(["-d", &format!("{seconds}s"), "--latency"])
        .args(args);
    let Some(output) = super::run_tool(&mut command, "wrk").await? else {
        return Ok(None);
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    match parse(&stdout) {
        Some(summary) => Ok(Some(summary)),
        None => bail!("could not read wrk's output: {stdout}"),
    }
}

/// `"15.32ms"`, `"812.00us"`, `"1.02s"`, `"2.00m"` as a duration.
fn duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

/// The figures of a `wrk --latency` run, or `None` if a line is missing.
pub fn parse(output: &str) -> Option<Summary> {
    let mut requests = None;
    let mut per_second = None;
    let (mut p50, mut p99, mut max) = (None, None, None);
    let mut non_2xx = 0;
    for line in output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Latency", _avg, _stdev, top, ..] => max = duration(top),
            ["50%", at] => p50 = duration(at),
            ["99%", at] => p99 = duration(at),
            [count, "requests", "in", ..] => requests = count.parse().ok(),
            ["Requests/sec:", rate] => per_second = rate.parse().ok(),
            ["Non-2xx", "or", "3xx", "responses:", count] => non_2xx = count.parse().ok()?,
            _ => {}
        }
    }
    Some(Summary {
        requests: requests?,
        per_second: per_second?,
        p50: p50?,
        p99: p99?,
        max: max?,
        non_2xx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "Running 10s test @ http://127.0.0.1:40000/healthz
  2 threads and 128 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    15.32ms    5.10ms   1.02s    80.00%
    Req/Sec     4.20k   300.00     5.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%   17.00ms
     90%   20.00ms
     99%   35.50ms
  83456 requests in 10.01s, 12.34MB read
  Non-2xx or 3xx responses: 12
Requests/sec:   8337.66
Transfer/sec:      1.23MB
";

    #[test]
    fn reads_the_summary() {
        let summary = parse(OUTPUT).unwrap();
        assert_eq!(summary.requests, 83_456);
        assert_eq!(summary.per_second, 8337.66);
        assert_eq!(summary.p50, Duration::from_micros(812));
        assert_eq!(summary.p99, Duration::from_micros(35_500));
        assert_eq!(summary.max, Duration::from_millis(1_020));
        assert_eq!(summary.non_2xx, 12);
    }

    #[test]
    fn a_truncated_output_is_refused() {
        assert_eq!(parse("Running 10s test @ http://x/healthz\n"), None);
        assert_eq!(duration("12.0parsecs"), None);
    }
}
