//! One clock: the time at which an event is judged.
//!
//! Deadlines (holds), quota windows and purchases must not depend on which
//! process handles an event or how late it gets to it. So no consumer asks
//! its own host for the time. Each request is judged at **its broker
//! timestamp** (the time Kafka accepted it: `LogAppendTime` on the request
//! topics, so no client can forge it), bounded by **the database's clock**,
//! which every instance shares:
//!
//! - never later than the database's `now()`: a broker clock running ahead
//!   cannot push an event past a deadline that has not come yet;
//! - never earlier than `now() - grace`: a record that sat in the log longer
//!   than the grace (a consumer was down, or a producer set an old
//!   `CreateTime` on a topic created before this rule) is judged as if it
//!   arrived `grace` ago, so an old timestamp buys at most `grace`.
//!
//! Releases of overdue holds are judged on the database's clock alone and
//! wait out the same grace (`held_until + grace <= now()`): a purchase the
//! broker accepted before the deadline is therefore decided against a hold
//! that still stands, however slow its consumer was, within the grace.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

/// A configured span as a calendar span, at most a thousand years: settings
/// are bounded where they are read (the `*_SPAN` ranges of `settings.rs`, a year at most), so
/// the cap never bites in practice, and when it would, the span stays one
/// that can be added to any date without overflowing, rather than falling
/// back to a second, hidden default.
pub fn span(duration: Duration) -> chrono::Duration {
    const CAP: chrono::TimeDelta = chrono::TimeDelta::days(365_000);
    chrono::Duration::from_std(duration).map_or(CAP, |span| span.min(CAP))
}

/// The time `record_ms` (the record's broker timestamp, if it has one) is
/// judged at, when the database's clock reads `db_now`: the broker time,
/// clamped into `[db_now - grace, db_now]`. Without a broker time, `db_now`.
pub fn judged_at(record_ms: Option<i64>, db_now: DateTime<Utc>, grace: Duration) -> DateTime<Utc> {
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::zero());
    let earliest = db_now - grace;
    match record_ms.and_then(|ms| Utc.timestamp_millis_opt(ms).single()) {
        Some(at) => at.clamp(earliest, db_now),
        None => db_now,
    }
}

/// Whether the expiry may release a hold whose deadline is `held_until`
/// at database time `db_now`: only once the grace after the deadline has
/// passed, so that no purchase the broker accepted in time is refused.
pub fn may_release(held_until: DateTime<Utc>, db_now: DateTime<Utc>, grace: Duration) -> bool {
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::zero());
    held_until + grace <= db_now
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GRACE: Duration = Duration::from_secs(5);

    #[test]
    fn a_span_is_the_duration_capped_so_any_date_can_take_it() {
        assert_eq!(
            super::span(Duration::from_secs(300)),
            chrono::Duration::minutes(5)
        );
        let huge = super::span(Duration::MAX);
        assert_eq!(huge, chrono::TimeDelta::days(365_000));
        assert!(Utc::now().checked_add_signed(huge).is_some());
    }

    fn db_now() -> DateTime<Utc> {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    fn ms(at: &str) -> Option<i64> {
        Some(at.parse::<DateTime<Utc>>().unwrap().timestamp_millis())
    }

    #[test]
    fn a_recent_record_is_judged_at_its_broker_time() {
        assert_eq!(
            judged_at(ms("2026-11-25T11:59:58Z"), db_now(), GRACE),
            "2026-11-25T11:59:58Z".parse::<DateTime<Utc>>().unwrap()
        );
    }

    #[test]
    fn a_broker_clock_ahead_is_capped_at_the_database_clock() {
        assert_eq!(
            judged_at(ms("2026-11-25T12:00:03Z"), db_now(), GRACE),
            db_now()
        );
    }

    #[test]
    fn an_old_record_buys_at_most_the_grace() {
        assert_eq!(
            judged_at(ms("2026-11-25T11:00:00Z"), db_now(), GRACE),
            "2026-11-25T11:59:55Z".parse::<DateTime<Utc>>().unwrap()
        );
    }

    #[test]
    fn no_or_absurd_broker_time_is_the_database_clock() {
        assert_eq!(judged_at(None, db_now(), GRACE), db_now());
        assert_eq!(judged_at(Some(i64::MAX), db_now(), GRACE), db_now());
    }

    #[test]
    fn a_hold_is_released_only_after_its_grace() {
        let deadline: DateTime<Utc> = "2026-11-25T11:59:56Z".parse().unwrap();
        assert!(!may_release(deadline, db_now(), GRACE));
        assert!(may_release(
            deadline,
            db_now() + chrono::Duration::seconds(1),
            GRACE
        ));
    }

    proptest! {
        /// The rule that makes purchases and releases agree: a purchase the
        /// broker accepted before the deadline and decided while the hold
        /// may not yet be released is judged before the deadline.
        #[test]
        fn a_purchase_in_time_is_judged_in_time_until_the_hold_may_be_released(
            accepted_before in 1i64..100_000,
            decided_after in 0i64..100_000,
            grace_ms in 0u64..30_000,
        ) {
            let grace = Duration::from_millis(grace_ms);
            let deadline = db_now();
            let accepted = deadline - chrono::Duration::milliseconds(accepted_before);
            let decided = accepted + chrono::Duration::milliseconds(decided_after);
            let at = judged_at(Some(accepted.timestamp_millis()), decided, grace);
            prop_assert!(at <= decided && at >= decided - chrono::Duration::milliseconds(grace_ms as i64));
            if !may_release(deadline, decided, grace) {
                prop_assert!(at < deadline);
            }
        }
    }
}
