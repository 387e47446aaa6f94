//! The claim processor's batches while a row ran (issue #27 item 2): how
//! many, how big, how long their first claim waited, and the mean time of
//! each step per batch, from the histograms the processor records
//! (`coupon_consumers::claims::stages`), read from this process's recorder
//! before and after the row.

use std::collections::HashMap;

use coupon_consumers::claims::stages::{BATCH_CLAIMS, BATCH_WAIT_SECONDS, STAGES, STAGE_SECONDS};

/// The sums and counts of the processor's histograms at one moment.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// `(metric, stage label or "")` → (sum, count).
    series: HashMap<(String, String), (f64, f64)>,
}

impl Snapshot {
    /// The recorder's values now.
    pub fn now() -> Self {
        Self::parse(&coupon_platform::metrics::prometheus().render())
    }

    /// The `_sum` and `_count` lines of the three histograms in
    /// Prometheus's text format.
    pub fn parse(text: &str) -> Self {
        let mut series: HashMap<(String, String), (f64, f64)> = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series_name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series_name.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series_name, ""),
            };
            let stage = labels
                .split(',')
                .find_map(|l| l.strip_prefix("stage=\""))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default();
            for metric in [STAGE_SECONDS, BATCH_CLAIMS, BATCH_WAIT_SECONDS] {
                let is_sum = match name.strip_prefix(metric) {
                    Some("_sum") => true,
                    Some("_count") => false,
                    _ => continue,
                };
                let entry = series
                    .entry((metric.to_owned(), stage.clone()))
                    .or_default();
                if is_sum {
                    entry.0 = value;
                } else {
                    entry.1 = value;
                }
            }
        }
        Self { series }
    }

    fn get(&self, metric: &str, stage: &str) -> (f64, f64) {
        self.series
            .get(&(metric.to_owned(), stage.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    /// What happened between `before` and `self`, as a row's note: batches,
    /// claims per batch, the wait and each step's mean per batch in ms.
    pub fn since(&self, before: &Snapshot) -> Option<String> {
        let delta = |metric: &str, stage: &str| {
            let (sum, count) = self.get(metric, stage);
            let (sum0, count0) = before.get(metric, stage);
            (sum - sum0, count - count0)
        };
        let (claims, batches) = delta(BATCH_CLAIMS, "");
        if batches < 1.0 {
            return None;
        }
        let (waited, _) = delta(BATCH_WAIT_SECONDS, "");
        let steps: Vec<String> = STAGES
            .iter()
            .map(|stage| {
                let (seconds, _) = delta(STAGE_SECONDS, stage);
                format!("{stage} {:.1}", 1_000.0 * seconds / batches)
            })
            .collect();
        Some(format!(
            "claim processor: {batches:.0} batches of {:.0} claims, first claim waited {:.1} ms; ms per batch: {}",
            claims / batches,
            1_000.0 * waited / batches,
            steps.join(", ")
        ))
    }
}

/// Where a row's processor records its batches.
#[derive(Debug, Clone, Copy)]
pub(super) enum Recorder<'a> {
    /// This process (the in-process rows).
    ThisProcess,
    /// A `couponctl run` serving at this base URL (the rows as users run
    /// it): its `/metrics`.
    Served(&'a str),
}

impl Recorder<'_> {
    /// The recorder's values now; empty when a served one does not answer
    /// (the row then goes without its batches' note).
    pub async fn snapshot(self) -> Snapshot {
        match self {
            Recorder::ThisProcess => Snapshot::now(),
            Recorder::Served(base) => {
                let text = async { reqwest::get(format!("{base}/metrics")).await?.text().await };
                text.await
                    .map(|text| Snapshot::parse(&text))
                    .unwrap_or_default()
            }
        }
    }
}

/// Runs a scenario that keeps the claim processor busy and notes, in its
/// row, the processor's batches meanwhile (see the module doc).
pub(super) async fn noted(
    scenario: impl std::future::Future<Output = anyhow::Result<super::Row>>,
) -> anyhow::Result<super::Row> {
    noted_from(Recorder::ThisProcess, scenario).await
}

/// [`noted`], with the batches of the processor `recorder` reads.
pub(super) async fn noted_from(
    recorder: Recorder<'_>,
    scenario: impl std::future::Future<Output = anyhow::Result<super::Row>>,
) -> anyhow::Result<super::Row> {
    let before = recorder.snapshot().await;
    let mut row = scenario.await?;
    append_batches(&mut row, &before, &recorder.snapshot().await);
    Ok(row)
}

/// Adds the batches between `before` and `after` to `row`'s note.
pub(super) fn append_batches(row: &mut super::Row, before: &Snapshot, after: &Snapshot) {
    if let Some(batches) = after.since(before) {
        row.note = if row.note.is_empty() {
            batches
        } else {
            format!("{}; {batches}", row.note)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_gives_the_means_per_batch_between_two_renders() {
        let before = Snapshot::parse(
            "# TYPE coupon_claim_batch_claims summary\n\
             coupon_claim_batch_claims_sum 100\n\
             coupon_claim_batch_claims_count 10\n\
             coupon_claim_batch_wait_seconds_sum 1\n\
             coupon_claim_batch_wait_seconds_count 10\n\
             coupon_claim_batch_seconds_sum{stage=\"grant\"} 0.5\n\
             coupon_claim_batch_seconds_count{stage=\"grant\"} 10\n\
             coupon_claim_batch_seconds_bucket{stage=\"grant\",le=\"0.1\"} 10\n",
        );
        let after = Snapshot::parse(
            "coupon_claim_batch_claims_sum 300\n\
             coupon_claim_batch_claims_count 20\n\
             coupon_claim_batch_wait_seconds_sum 1.5\n\
             coupon_claim_batch_seconds_sum{stage=\"grant\"} 0.8\n\
             coupon_claim_batch_seconds_sum{stage=\"publish\"} 0.1\n",
        );
        let note = after.since(&before).unwrap();
        assert!(
            note.starts_with(
                "claim processor: 10 batches of 20 claims, first claim waited 50.0 ms"
            ),
            "{note}"
        );
        assert!(note.contains("grant 30.0, "), "{note}");
        assert!(note.contains("publish 10.0"), "{note}");
        assert!(note.contains("begin 0.0"), "{note}");
        assert_eq!(before.since(&before), None, "no batch, no note");
    }
}
