//! The performance targets, each beside the figure this run measured and the
//! same-run baseline it is judged against. A target the machine cannot reach
//! still gets its row: the table says what was measured, never a guess.

use super::{Row, Scenario};

/// One target: what it asks, what was measured, against what.
struct Target {
    name: &'static str,
    goal: String,
    measured: String,
    baseline: String,
    met: Option<bool>,
}

/// The flash sale as users run it against `/healthz` of the same server.
fn as_run_target(rows: &[Row]) -> Option<Target> {
    let find = |kind: Scenario| rows.iter().find(|r| r.kind == kind);
    let (claims, healthz) = (find(Scenario::AsRunClaims)?, find(Scenario::AsRunHealthz)?);
    let ratio = claims.throughput() / healthz.throughput().max(1e-9);
    Some(Target {
        name: "flash sale as users run it (couponctl run, wrk)",
        goal: ">= 0.9x wrk's /healthz on the same server".into(),
        measured: format!("{:.0} claims/s, {ratio:.2}x", claims.throughput()),
        baseline: format!(
            "/healthz {:.0}/s, same server, same run",
            healthz.throughput()
        ),
        met: Some(ratio >= 0.9),
    })
}

/// The targets table (markdown), from the rows of one run.
pub fn render_targets(rows: &[Row]) -> String {
    let find = |kind: Scenario| rows.iter().find(|r| r.kind == kind);
    let echo = find(Scenario::Echo).map(Row::throughput);
    let healthz = find(Scenario::Healthz).map(Row::throughput);
    let mut targets = Vec::new();
    if let Some(flash) = find(Scenario::FlashSale) {
        let rate = flash.throughput();
        targets.push(Target {
            name: "flash sale: claims decided per second",
            goal: ">= 10,000/s (1,000,000 in <= 100 s)".into(),
            measured: format!(
                "{rate:.0}/s ({} claims in {:.1} s)",
                flash.operations, flash.seconds
            ),
            baseline: echo.map_or("-".into(), |e| format!("echo {e:.0}/s")),
            met: Some(rate >= 10_000.0),
        });
        if let Some(healthz) = healthz {
            let ratio = rate / healthz.max(1e-9);
            targets.push(Target {
                name: "claims/s / bare /healthz req/s",
                goal: ">= 0.5".into(),
                measured: format!("{ratio:.2}"),
                baseline: format!("/healthz {healthz:.0}/s, same generator"),
                met: Some(ratio >= 0.5),
            });
        }
        if let Some((warm, end)) = flash.memory.as_ref().and_then(|m| m.warm_and_end()) {
            let growth = end as f64 / warm.max(1) as f64 - 1.0;
            targets.push(Target {
                name: "memory over the flash sale",
                goal: "last quarter within 10% of warm".into(),
                measured: format!("{:+.1}%", growth * 100.0),
                baseline: format!("warm {:.1} MiB", warm as f64 / 1024.0),
                met: Some(growth <= 0.10),
            });
        }
    }
    targets.extend(as_run_target(rows));
    if let Some(steady) = find(Scenario::SteadySale).or_else(|| find(Scenario::SteadyDay)) {
        let p99 = steady.latencies.map(|l| l.p99.as_secs_f64() * 1000.0);
        let at_target_rate = steady.throughput() >= super::STEADY_TARGET_RATE * 0.95;
        targets.push(Target {
            name: "claim latency, open loop",
            goal: "p99 <= 50 ms at 5,000 claims/s".into(),
            measured: p99.map_or("-".into(), |p| {
                format!("p99 {p:.1} ms at {:.0}/s", steady.throughput())
            }),
            baseline: echo.map_or("-".into(), |e| format!("echo {e:.0}/s")),
            met: p99.map(|p| p <= 50.0 && at_target_rate),
        });
    }
    if let Some(release) = find(Scenario::Release) {
        let rate = release.throughput();
        targets.push(Target {
            name: "release, projected into Postgres",
            goal: ">= 100,000 coupons/s".into(),
            measured: format!("{rate:.0}/s"),
            baseline: echo.map_or("-".into(), |e| format!("echo {e:.0}/s")),
            met: Some(rate >= 100_000.0),
        });
    }
    if let Some(replay) = find(Scenario::Replay) {
        let json = replay.throughput();
        let parquet = find(Scenario::ReplayParquet).map(Row::throughput);
        let slowest = parquet.map_or(json, |p| p.min(json));
        targets.push(Target {
            name: "replay to JSON lines / Parquet",
            goal: ">= 500,000 events/s".into(),
            measured: match parquet {
                Some(parquet) => format!("JSON lines {json:.0}/s, Parquet {parquet:.0}/s"),
                None => format!("JSON lines {json:.0}/s"),
            },
            baseline: echo.map_or("-".into(), |e| format!("echo {e:.0}/s")),
            met: Some(slowest >= 500_000.0),
        });
    }
    let mut out = String::from(
        "| target | goal | measured | same-run baseline | met |\n|---|---|---|---|---|\n",
    );
    for t in targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {met} |\n",
            t.name, t.goal, t.measured, t.baseline
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::dev::bench::profile::MemoryProfile;
    use crate::dev::bench::Latencies;

    fn row(kind: Scenario, operations: u64, seconds: f64) -> Row {
        Row {
            kind,
            scenario: String::new(),
            operations,
            seconds,
            latencies: None,
            note: String::new(),
            memory: None,
        }
    }

    #[test]
    fn targets_compare_the_measured_figures_with_their_goals() {
        let mut flash = row(Scenario::FlashSale, 1_000_000, 80.0);
        flash.memory = Some(MemoryProfile {
            rss_kib: vec![100, 100, 200, 200, 200, 200, 230, 230],
        });
        let mut steady = row(Scenario::SteadyDay, 50_000, 10.0);
        steady.latencies = Some(Latencies {
            p50: Duration::from_millis(5),
            p99: Duration::from_millis(60),
            max: Duration::from_millis(90),
        });
        let rows = [
            row(Scenario::Echo, 20_000, 1.0),
            row(Scenario::Healthz, 20_000, 1.0),
            flash,
            steady,
            row(Scenario::Release, 100_000, 2.0),
            row(Scenario::Replay, 1_000_000, 1.0),
            row(Scenario::ReplayParquet, 600_000, 1.0),
        ];
        let table = render_targets(&rows);
        let line = |name: &str| {
            table
                .lines()
                .find(|l| l.starts_with(&format!("| {name}")))
                .unwrap_or_else(|| panic!("no row {name} in\n{table}"))
                .to_owned()
        };
        assert!(line("flash sale").contains("12500/s") && line("flash sale").ends_with("| yes |"));
        assert!(line("claims/s").contains("| 0.62 |") && line("claims/s").ends_with("| yes |"));
        assert!(line("memory").contains("+15.0%") && line("memory").ends_with("| no |"));
        assert!(line("claim latency").contains("p99 60.0 ms at 5000/s"));
        assert!(line("claim latency").ends_with("| no |"));
        assert!(line("release").contains("50000/s") && line("release").ends_with("| no |"));
        assert!(line("replay").contains("JSON lines 1000000/s, Parquet 600000/s"));
        assert!(line("replay").ends_with("| yes |"));
    }
}
