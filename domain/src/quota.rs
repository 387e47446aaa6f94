//! The quota window: one coupon per user per window.
//!
//! Windows are fixed and aligned to the UNIX epoch, so `1d` is the UTC calendar
//! day and `1h` the clock hour. Fixed windows have a name (their start), which
//! lets Postgres enforce the quota structurally with a unique key on
//! `(user_id, window_start)` instead of trusting a read-then-write check.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("quota window must be between 1 second and 366 days, and a whole number of seconds")]
pub struct InvalidWindow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaWindow {
    seconds: i64,
}

impl QuotaWindow {
    pub const DAY: Self = Self { seconds: 86_400 };

    pub fn new(length: Duration) -> Result<Self, InvalidWindow> {
        if length.subsec_nanos() != 0 || length.as_secs() == 0 || length.as_secs() > 366 * 86_400 {
            return Err(InvalidWindow);
        }
        Ok(Self {
            seconds: length.as_secs() as i64,
        })
    }

    pub fn length(self) -> Duration {
        Duration::from_secs(self.seconds as u64)
    }

    /// The start of the window that contains `at`.
    pub fn start_of(self, at: DateTime<Utc>) -> DateTime<Utc> {
        let secs = at.timestamp().div_euclid(self.seconds) * self.seconds;
        Utc.timestamp_opt(secs, 0).single().unwrap_or(at)
    }

    /// When the window that contains `at` ends (the next one starts).
    pub fn end_of(self, at: DateTime<Utc>) -> DateTime<Utc> {
        self.start_of(at) + chrono::Duration::seconds(self.seconds)
    }

    /// Whole seconds until the window ends, rounded up, at least 1: what a
    /// `Retry-After` header should say.
    pub fn retry_after_secs(self, now: DateTime<Utc>) -> u64 {
        let millis = (self.end_of(now) - now).num_milliseconds().max(1);
        (millis as u64).div_ceil(1000)
    }
}

impl Default for QuotaWindow {
    fn default() -> Self {
        Self::DAY
    }
}

/// As a flag value would say it, e.g. `1d`.
impl std::fmt::Display for QuotaWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&compact_duration(self.length()))
    }
}

/// `d` in the largest unit that divides it exactly (`1d`, `5m`, `30s`,
/// `250ms`): how the flags and their defaults write durations, and what
/// `humantime` parses back.
pub fn compact_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms.checked_rem(size) == Some(0) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations_are_written_in_their_largest_exact_unit() {
        let cases = [
            (86_400, "1d"),
            (300, "5m"),
            (5, "5s"),
            (600, "10m"),
            (3_600, "1h"),
        ];
        for (secs, text) in cases {
            assert_eq!(compact_duration(Duration::from_secs(secs)), text);
        }
        assert_eq!(compact_duration(Duration::from_millis(1_500)), "1500ms");
        assert_eq!(QuotaWindow::DAY.to_string(), "1d");
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn a_day_is_the_utc_calendar_day() {
        let w = QuotaWindow::DAY;
        assert_eq!(
            w.start_of(at("2026-11-25T17:38:00Z")),
            at("2026-11-25T00:00:00Z")
        );
        assert_eq!(
            w.end_of(at("2026-11-25T23:59:59Z")),
            at("2026-11-26T00:00:00Z")
        );
        assert_eq!(w.retry_after_secs(at("2026-11-25T23:59:59.200Z")), 1);
        assert_eq!(w.retry_after_secs(at("2026-11-25T23:00:00Z")), 3600);
    }

    #[test]
    fn refuses_silly_windows() {
        assert!(QuotaWindow::new(Duration::ZERO).is_err());
        assert!(QuotaWindow::new(Duration::from_millis(1500)).is_err());
        assert!(QuotaWindow::new(Duration::from_secs(3600)).is_ok());
    }

    proptest! {
        #[test]
        fn instant_lies_inside_its_window(secs in 0i64..4_000_000_000, len in 1u64..200_000) {
            let w = QuotaWindow::new(Duration::from_secs(len)).unwrap();
            let t = Utc.timestamp_opt(secs, 0).unwrap();
            prop_assert!(w.start_of(t) <= t && t < w.end_of(t));
            prop_assert_eq!(w.start_of(w.end_of(t)), w.end_of(t));
            prop_assert!(w.retry_after_secs(t) <= len);
        }
    }
}
