//! The flash sale over time, as an SVG the bench writes (#16): answers per
//! second and the p50/p99 latency of the answers of each second.
//!
//! Why our own few lines of SVG: a plotting crate would pull in fonts and
//! image codecs for two polylines, and the bench runs offline. The timeline
//! keeps each answer's latency and second (8 bytes, room taken up front);
//! the rendering is pure and unit tested.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Each answer's latency (µs) with the second, since `start`, it arrived in.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    samples: Vec<(u32, u32)>,
}

/// One second of the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Second {
    pub answers: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Timeline {
    /// A timeline with room for `expected` answers, taken up front (see
    /// [`touched_buffer`]) so that it does not show as the system's memory
    /// growing during the run.
    pub fn new(start: Instant, expected: usize) -> Self {
        Self {
            start,
            samples: touched_buffer(expected),
        }
    }

    /// Records an answer that arrived now after `latency`.
    pub fn record(&mut self, latency: Duration) {
        self.record_at(self.start.elapsed(), latency);
    }

    fn record_at(&mut self, since_start: Duration, latency: Duration) {
        let second = u32::try_from(since_start.as_secs()).unwrap_or(u32::MAX);
        let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        self.samples.push((second, us));
    }

    /// Per second: answers, p50 and p99 (0 for a second without answers).
    pub fn seconds(&self) -> Vec<Second> {
        let last = self.samples.iter().map(|(s, _)| *s).max();
        let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); last.map_or(0, |s| s as usize + 1)];
        for (second, us) in &self.samples {
            buckets[*second as usize].push(*us);
        }
        buckets
            .into_iter()
            .map(|mut sorted| {
                sorted.sort_unstable();
                let at = |q: f64| {
                    sorted
                        .get(((sorted.len().max(1) - 1) as f64 * q).round() as usize)
                        .map_or(0.0, |us| f64::from(*us) / 1000.0)
                };
                Second {
                    answers: sorted.len(),
                    p50_ms: at(0.50),
                    p99_ms: at(0.99),
                }
            })
            .collect()
    }
}

/// An empty vector with room for `capacity` items whose pages are already
/// written: the load generator's sample buffers are then part of the warm
/// memory, not growth the memory target would charge to the system.
pub fn touched_buffer<T: Copy + Default>(capacity: usize) -> Vec<T> {
    let mut buffer = Vec::with_capacity(capacity);
    buffer.resize(capacity, T::default());
    buffer.clear();
    buffer
}

/// A round axis maximum at or above `value` (1, 2 or 5 times a power of ten).
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|v| *v >= value)
        .unwrap_or(10.0 * power)
}

const WIDTH: f64 = 860.0;
const PANEL_HEIGHT: f64 = 200.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 60.0;

/// Two panels sharing the time axis: answers/s on top, p50 and p99 below.
pub fn svg(title: &str, seconds: &[Second]) -> String {
    let height = TOP + 2.0 * PANEL_HEIGHT + GAP + 50.0;
    let plot_width = WIDTH - LEFT - RIGHT;
    let n = seconds.len().max(1) as f64;
    let x = |i: usize| LEFT + plot_width * (i as f64 + 0.5) / n;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        WIDTH / 2.0,
        escape(title)
    );
    let rate_max = nice_ceiling(seconds.iter().map(|s| s.answers as f64).fold(0.0, f64::max));
    let latency_max = nice_ceiling(seconds.iter().map(|s| s.p99_ms).fold(0.0, f64::max));
    let panels = [
        (TOP, rate_max, "answers/s"),
        (TOP + PANEL_HEIGHT + GAP, latency_max, "latency ms"),
    ];
    for (top, max, label) in panels {
        let bottom = top + PANEL_HEIGHT;
        let _ = writeln!(
            out,
            r##"<rect x="{LEFT}" y="{top}" width="{plot_width}" height="{PANEL_HEIGHT}" fill="none" stroke="#888"/>"##
        );
        for step in 0..=4 {
            let value = max * f64::from(step) / 4.0;
            let y = bottom - PANEL_HEIGHT * f64::from(step) / 4.0;
            let _ = writeln!(
                out,
                r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + plot_width,
                LEFT - 6.0,
                y + 4.0,
                value
            );
        }
        let _ = writeln!(
            out,
            r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{label}</text>"#,
            top + PANEL_HEIGHT / 2.0
        );
    }
    let polyline = |values: &mut dyn Iterator<Item = f64>, top: f64, max: f64| -> String {
        values
            .enumerate()
            .map(|(i, v)| {
                let y = top + PANEL_HEIGHT - PANEL_HEIGHT * (v / max).min(1.0);
                format!("{:.1},{:.1}", x(i), y)
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let series = [
        (
            polyline(
                &mut seconds.iter().map(|s| s.answers as f64),
                panels[0].0,
                rate_max,
            ),
            "#1f77b4",
        ),
        (
            polyline(
                &mut seconds.iter().map(|s| s.p50_ms),
                panels[1].0,
                latency_max,
            ),
            "#2ca02c",
        ),
        (
            polyline(
                &mut seconds.iter().map(|s| s.p99_ms),
                panels[1].0,
                latency_max,
            ),
            "#d62728",
        ),
    ];
    for (points, colour) in &series {
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>"#
        );
    }
    let legend_y = panels[1].0 + 16.0;
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{legend_y}" fill="#2ca02c">p50</text><text x="{}" y="{legend_y}" fill="#d62728">p99</text>"##,
        LEFT + 10.0,
        LEFT + 45.0
    );
    // Time ticks: about ten, on whole seconds.
    let bottom = panels[1].0 + PANEL_HEIGHT;
    let every = (seconds.len() / 10).max(1);
    for i in (0..seconds.len()).step_by(every) {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{i}</text>"#,
            x(i),
            bottom + 16.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds since the first claim</text>"#,
        LEFT + plot_width / 2.0,
        bottom + 36.0
    );
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_land_in_the_second_they_arrived_in() {
        let mut timeline = Timeline::new(Instant::now(), 0);
        for ms in [1, 2, 3, 4] {
            timeline.record_at(Duration::from_millis(100), Duration::from_millis(ms));
        }
        timeline.record_at(Duration::from_millis(2_500), Duration::from_millis(50));
        let seconds = timeline.seconds();
        assert_eq!(seconds.len(), 3);
        assert_eq!(seconds[0].answers, 4);
        assert_eq!(seconds[0].p99_ms, 4.0);
        assert_eq!(
            seconds[1],
            Second {
                answers: 0,
                p50_ms: 0.0,
                p99_ms: 0.0
            }
        );
        assert_eq!(seconds[2].p50_ms, 50.0);
    }

    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7_900.0), 10_000.0);
        assert_eq!(nice_ceiling(151.0), 200.0);
        assert_eq!(nice_ceiling(35.7), 50.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
    }

    #[test]
    fn the_svg_has_three_series_and_an_escaped_title() {
        let seconds = vec![
            Second {
                answers: 8_000,
                p50_ms: 10.0,
                p99_ms: 30.0,
            };
            12
        ];
        let svg = svg("a < b & c", &seconds);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("a &lt; b &amp; c"));
        assert!(!svg.contains("NaN"));
    }
}
