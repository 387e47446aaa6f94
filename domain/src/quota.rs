//! The quota window: one coupon per user per window.
//!
//! Windows are fixed and aligned to the UNIX epoch, so `1d` is the UTC calendar
//! day and `1h` the clock hour. Fixed windows have a name (their start), which
//! lets Postgres enforce the quota structurally with a unique key on
//! `(user_id, window_start)` instead of trusting a read-then-write check.
//!
//! The shop's day (issue #28 item 7, `QUOTA_TZ`): a window of whole days
//! carries a zone, and is then whole calendar days *in that zone*, counted
//! from 1970-01-01 there: `1d` in `Asia/Kolkata` turns at 00:00 IST (18:30
//! UTC), and in `Europe/Berlin` the day the clocks go forward lasts 23 hours
//! and the day they go back 25. A day whose midnight does not exist (a zone
//! that moves its clocks at midnight) starts at its first local instant. The
//! start is still one instant per window, so the unique key keeps working.
//! Windows shorter than a day, or not a whole number of days, stay fixed
//! UTC-aligned lengths whatever the zone (the zone's hour is the UTC hour in
//! all but a few zones).

use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDate, TimeZone, Utc};
pub use chrono_tz::Tz;

const DAY_SECS: i64 = 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("quota window must be between 1 second and 366 days, and a whole number of seconds")]
pub struct InvalidWindow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaWindow {
    seconds: i64,
    zone: Tz,
}

/// A `QUOTA_TZ` that is not an IANA zone name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown time zone {0:?}: expected an IANA zone name such as UTC, Europe/Berlin or Asia/Kolkata")]
pub struct UnknownZone(pub String);

/// Parses an IANA zone name (`QUOTA_TZ`).
pub fn parse_zone(raw: &str) -> Result<Tz, UnknownZone> {
    raw.parse::<Tz>().map_err(|_| UnknownZone(raw.to_owned()))
}

impl QuotaWindow {
    pub const DAY: Self = Self {
        seconds: DAY_SECS,
        zone: Tz::UTC,
    };

    pub fn new(length: Duration) -> Result<Self, InvalidWindow> {
        if length.subsec_nanos() != 0 || length.as_secs() == 0 || length.as_secs() > 366 * 86_400 {
            return Err(InvalidWindow);
        }
        Ok(Self {
            seconds: length.as_secs() as i64,
            zone: Tz::UTC,
        })
    }

    /// This window's length, its days counted in `zone`.
    pub fn in_zone(self, zone: Tz) -> Self {
        Self { zone, ..self }
    }

    /// The zone whose calendar days a window of whole days follows.
    pub fn zone(self) -> Tz {
        self.zone
    }

    /// The nominal length (a zoned day may last 23 or 25 hours).
    pub fn length(self) -> Duration {
        Duration::from_secs(self.seconds as u64)
    }

    /// Days per window when the window follows the zone's calendar.
    fn zoned_days(self) -> Option<i64> {
        (self.zone != Tz::UTC && self.seconds % DAY_SECS == 0).then_some(self.seconds / DAY_SECS)
    }

    /// The start of the window that contains `at`.
    pub fn start_of(self, at: DateTime<Utc>) -> DateTime<Utc> {
        match self.zoned_days() {
            Some(days) => midnight(self.zone, first_day(self.zone, days, at)),
            None => {
                let secs = at.timestamp().div_euclid(self.seconds) * self.seconds;
                Utc.timestamp_opt(secs, 0).single().unwrap_or(at)
            }
        }
    }

    /// When the window that contains `at` ends (the next one starts).
    pub fn end_of(self, at: DateTime<Utc>) -> DateTime<Utc> {
        match self.zoned_days() {
            Some(days) => {
                let first = first_day(self.zone, days, at);
                let next = first
                    .checked_add_days(chrono::Days::new(days as u64))
                    .unwrap_or(first);
                midnight(self.zone, next)
            }
            None => self.start_of(at) + chrono::Duration::seconds(self.seconds),
        }
    }

    /// The local date of `at` in the window's zone (the claim's day, which
    /// a minimum age is judged on).
    pub fn local_date(self, at: DateTime<Utc>) -> NaiveDate {
        at.with_timezone(&self.zone).date_naive()
    }

    /// Whole seconds until the window ends, rounded up, at least 1: what a
    /// `Retry-After` header should say.
    pub fn retry_after_secs(self, now: DateTime<Utc>) -> u64 {
        let millis = (self.end_of(now) - now).num_milliseconds().max(1);
        (millis as u64).div_ceil(1000)
    }
}

/// The first calendar day (in `zone`) of the `days`-day window holding `at`.
fn first_day(zone: Tz, days: i64, at: DateTime<Utc>) -> NaiveDate {
    let local = at.with_timezone(&zone).date_naive();
    let since = (local - NaiveDate::default()).num_days();
    let offset = since - since.div_euclid(days) * days;
    local
        .checked_sub_days(chrono::Days::new(offset as u64))
        .unwrap_or(local)
}

/// The first instant of `date` in `zone`: its midnight, the earlier one if
/// the clocks went back over it, or the end of the gap if they skipped it.
fn midnight(zone: Tz, date: NaiveDate) -> DateTime<Utc> {
    let start = date.and_time(chrono::NaiveTime::MIN);
    // A gap lasts at most a few hours: the first minute after it that exists.
    for minute in 0..=24 * 60 {
        let local = start + chrono::Duration::minutes(minute);
        match zone.from_local_datetime(&local) {
            LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => return t.with_timezone(&Utc),
            LocalResult::None => continue,
        }
    }
    start.and_utc()
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

    fn berlin_day() -> QuotaWindow {
        QuotaWindow::DAY.in_zone(parse_zone("Europe/Berlin").unwrap())
    }

    #[test]
    fn a_zoned_day_is_the_calendar_day_there_with_its_dst() {
        let w = berlin_day();
        // Winter: midnight in Berlin is 23:00 UTC the day before.
        assert_eq!(
            w.start_of(at("2026-12-06T12:00:00Z")),
            at("2026-12-05T23:00:00Z")
        );
        assert_eq!(
            w.start_of(at("2026-12-05T23:30:00Z")),
            at("2026-12-05T23:00:00Z")
        );
        assert_eq!(
            w.end_of(at("2026-12-05T22:59:59Z")),
            at("2026-12-05T23:00:00Z")
        );
        // The day the clocks go forward lasts 23 hours, back 25.
        let spring = w.start_of(at("2026-03-29T12:00:00Z"));
        assert_eq!(w.end_of(spring) - spring, chrono::Duration::hours(23));
        let autumn = w.start_of(at("2026-10-25T12:00:00Z"));
        assert_eq!(w.end_of(autumn) - autumn, chrono::Duration::hours(25));
        assert_eq!(w.retry_after_secs(at("2026-12-06T22:00:00Z")), 3600);
        // India: the day turns at 18:30 UTC.
        let india = QuotaWindow::DAY.in_zone(parse_zone("Asia/Kolkata").unwrap());
        assert_eq!(
            india.start_of(at("2026-12-06T18:29:59Z")),
            at("2026-12-05T18:30:00Z")
        );
        assert_eq!(
            india.start_of(at("2026-12-06T18:30:00Z")),
            at("2026-12-06T18:30:00Z")
        );
        // A zone whose clocks skipped midnight (Santiago, 2026-09-06):
        // the day starts at 01:00 local.
        let santiago = QuotaWindow::DAY.in_zone(parse_zone("America/Santiago").unwrap());
        let start = santiago.start_of(at("2026-09-06T12:00:00Z"));
        assert_eq!(
            start
                .with_timezone(&santiago.zone())
                .date_naive()
                .to_string(),
            "2026-09-06"
        );
        // Sub-day windows stay UTC-aligned.
        let hour = QuotaWindow::new(Duration::from_secs(3600))
            .unwrap()
            .in_zone(santiago.zone());
        assert_eq!(
            hour.start_of(at("2026-12-06T12:34:00Z")),
            at("2026-12-06T12:00:00Z")
        );
        assert!(parse_zone("Mars/Olympus").is_err());
        assert_eq!(parse_zone("UTC").unwrap(), Tz::UTC);
    }

    const ZONES: &[&str] = &[
        "Europe/Berlin",
        "Asia/Kolkata",
        "America/Santiago",
        "America/New_York",
        "Australia/Lord_Howe",
        "Pacific/Apia",
        "Asia/Kathmandu",
        "UTC",
    ];

    proptest! {
        /// A zoned window always contains its instant, consecutive windows
        /// tile time (each starts where the last ended), and a window is 1
        /// to `days` local days long (give or take a DST shift or a skipped day).
        #[test]
        fn zoned_windows_contain_their_instant_and_tile(secs in -2_000_000_000i64..4_000_000_000,
                                                        zone in 0..ZONES.len(), days in 1u64..4) {
            let zone = parse_zone(ZONES[zone]).unwrap();
            let w = QuotaWindow::new(Duration::from_secs(days * 86_400)).unwrap().in_zone(zone);
            let t = Utc.timestamp_opt(secs, 0).unwrap();
            let (start, end) = (w.start_of(t), w.end_of(t));
            prop_assert!(start <= t && t < end, "{start} <= {t} < {end}");
            prop_assert_eq!(w.start_of(end), end);
            prop_assert_eq!(w.start_of(start), start);
            prop_assert_eq!(w.end_of(end - chrono::Duration::seconds(1)), end);
            let hours = (end - start).num_hours();
            prop_assert!(hours <= days as i64 * 24 + 2 && hours >= 20, "{hours}");
            prop_assert!(w.retry_after_secs(t) <= (end - start).num_seconds() as u64);
        }
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
