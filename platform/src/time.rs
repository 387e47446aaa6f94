//! Conversions between the millisecond timestamps in events and `chrono`.

use chrono::{DateTime, TimeZone, Utc};

pub fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// `0` (the protobuf default) and out-of-range values mean "not set".
pub fn from_ms(ms: i64) -> Option<DateTime<Utc>> {
    if ms == 0 {
        return None;
    }
    Utc.timestamp_millis_opt(ms).single()
}

pub fn now_ms() -> i64 {
    to_ms(Utc::now())
}
