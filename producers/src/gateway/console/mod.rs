//! The web console (`GET /console`) and the admin routes it calls.
//!
//! The console is a page and a script embedded in the binary (nothing is
//! fetched from elsewhere at run time); it holds no secret of its own: the
//! person types their token (an employee's, or the shared admin token), the
//! page keeps it in `sessionStorage` and sends it as `Authorization: Bearer`
//! on every call. Blacklist changes made here are authored by the token's
//! employee ([`AdminCaller::author`]). It uses only the public
//! API below (documented in the OpenAPI document, callable by any script)
//! plus `GET /metrics`, so every number it shows is what these routes and
//! `/metrics` say.
//!
//! The SQL of these routes is in [`crate::console_store`]; the pool per
//! category is `couponctl status`'s query and the blacklist changes go
//! through [`crate::blacklist`] (Postgres and the log, as the CLI does). The
//! download replays the topics (the analyst replay of `couponctl replay`),
//! which lives in the binary crate: the binary hands it in as an
//! [`Exporter`].
//!
//! One file per part of the page: `page` (the page and its script), `pool`,
//! `batches`, `campaigns` (terms, phase and funnel per campaign), `blacklist`,
//! `analytics` (claims and the funnel) and `export`
//! (the download); this file keeps the limits and error helpers they share.

mod analytics;
mod batches;
mod blacklist;
mod campaigns;
mod export;
mod page;
mod pool;

pub use analytics::*;
pub use batches::*;
pub use blacklist::*;
pub use campaigns::*;
pub use export::*;
pub use page::*;
pub use pool::*;

use axum::extract::rejection::QueryRejection;
use chrono::{DateTime, Utc};

use super::ApiError;

/// The latest time a range may name: 9999-12-31T23:59:59Z.
pub const MAX_UNIX_SECONDS: u64 = 253_402_300_799;
/// The longest blacklisting with an expiry: ten years (none: until removed).
pub const MAX_BLACKLIST_SECONDS: u64 = 315_360_000;
/// The most buckets a claims chart gets: a day of minutes.
pub const MAX_BUCKETS: i64 = 1440;
/// The most batches one listing returns.
pub const MAX_BATCHES: u32 = 500;
/// A range with no `since`: this long before `until`.
pub const DEFAULT_RANGE_SECONDS: u64 = 3600;
/// The strict UUID form `batch_id` must have.
pub const UUID_PATTERN: &str =
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

fn store_unavailable(error: sqlx::Error) -> ApiError {
    tracing::warn!(%error, "a console read failed");
    ApiError::unavailable("the coupon store is not available; retrying is safe")
}

fn millis(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A listing's `limit`: 1 to [`MAX_BATCHES`], 50 when absent.
fn listing_limit(limit: Option<u32>) -> Result<i64, ApiError> {
    match limit.unwrap_or(50) {
        limit @ 1..=MAX_BATCHES => Ok(i64::from(limit)),
        _ => Err(ApiError::invalid(format!(
            "limit must be between 1 and {MAX_BATCHES}"
        ))),
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::invalid(rejection.body_text())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).unwrap()
    }

    #[test]
    fn buckets_are_minutes_up_to_a_day_then_wider() {
        assert_eq!(bucket_seconds(at(0), at(0)), 60);
        assert_eq!(bucket_seconds(at(10), at(0)), 60, "an empty range");
        assert_eq!(bucket_seconds(at(0), at(3600)), 60);
        assert_eq!(bucket_seconds(at(0), at(86_400)), 60);
        assert_eq!(bucket_seconds(at(0), at(86_401)), 120);
        assert_eq!(bucket_seconds(at(0), at(7 * 86_400)), 7 * 60);
        for span in [1, 59, 61, 3_599, 86_400, 86_460, 1_000_000, 31_536_000] {
            let width = bucket_seconds(at(0), at(span));
            assert_eq!(width % 60, 0);
            assert!((span + width - 1) / width <= MAX_BUCKETS, "{span}: {width}");
        }
    }

    #[test]
    fn ranges_default_to_the_last_hour_and_refuse_what_is_not_a_time() {
        let now = at(1_000_000);
        assert_eq!(
            resolve_range(None, None, now).unwrap(),
            (at(1_000_000 - 3600), now)
        );
        assert_eq!(
            resolve_range(Some(5), Some(10), now).unwrap(),
            (at(5), at(10))
        );
        assert_eq!(
            resolve_range(None, Some(7200), now).unwrap(),
            (at(3600), at(7200))
        );
        assert!(resolve_range(Some(MAX_UNIX_SECONDS), Some(MAX_UNIX_SECONDS), now).is_ok());
        assert!(resolve_range(Some(MAX_UNIX_SECONDS + 1), None, now).is_err());
        assert!(resolve_range(None, Some(MAX_UNIX_SECONDS + 1), now).is_err());
    }

    /// What the document says is required is what the handlers require.
    #[test]
    fn the_documented_parameters_are_optional_but_the_user_to_remove() {
        let doc = super::super::openapi::document_json();
        let required = |path: &str, method: &str| -> Vec<(String, bool)> {
            let pointer = format!("/paths/{}/{method}/parameters", path.replace('/', "~1"));
            doc.pointer(&pointer)
                .and_then(serde_json::Value::as_array)
                .unwrap_or_else(|| panic!("{pointer}"))
                .iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap().to_owned(),
                        p["required"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        };
        for (path, method) in [
            ("/api/v1/batches", "get"),
            ("/api/v1/campaigns", "get"),
            ("/api/v1/analytics/claims", "get"),
            ("/api/v1/analytics/funnel", "get"),
            ("/api/v1/analytics/export", "get"),
        ] {
            for (name, required) in required(path, method) {
                assert!(
                    !required,
                    "{method} {path}: {name} is documented as required"
                );
            }
        }
        assert_eq!(
            required("/api/v1/blacklist", "delete"),
            [("user_id".to_owned(), true)]
        );
        let limit = doc
            .pointer("/paths/~1api~1v1~1analytics~1claims/get/parameters/0/schema/maximum")
            .and_then(serde_json::Value::as_f64);
        assert_eq!(limit, Some(MAX_UNIX_SECONDS as f64));
    }

    #[test]
    fn batch_ids_are_hyphenated_uuids_only() {
        let re = regex::Regex::new(UUID_PATTERN).unwrap();
        for probe in [
            "0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6f",
            "0B5D1C3E-8F7A-4D2B-9C6E-1A2B3C4D5E6F",
            "0b5d1c3e8f7a4d2b9c6e1a2b3c4d5e6f",
            "{0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6f}",
            "urn:uuid:0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6f",
            "0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6",
            "0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6g",
            "",
            "x",
        ] {
            assert_eq!(
                re.is_match(probe),
                parse_batch_id(probe).is_ok(),
                "{probe:?}"
            );
        }
    }
}
