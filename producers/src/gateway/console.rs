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

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, TimeZone as _, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use coupon_domain::{EmployeeId, UserId};

use super::responses;
use super::{json_rejection, AdminCaller, ApiError, ErrorBody, GatewayState};
use crate::blacklist::{self, Blacklist, Source};
use crate::console_store::{self, BatchFilter};

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

/// What the binary provides to download a time range of the log.
pub trait Exporter: Send + Sync + 'static {
    /// Writes every record of every topic with a time in `[since, until]`,
    /// encoded as `format`, to `out` as it goes. Blocking (it reads the
    /// broker); it should stop soon after `out` reports the client gone
    /// ([`ExportOut::send`] fails, [`ExportOut::is_closed`]).
    fn export(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        format: ExportFormat,
        out: &ExportOut,
    ) -> Result<(), String>;
}

/// Chunks of a download in flight between the exporter and the client:
/// with [`EXPORT_CHUNK`] bytes each, a download holds this many chunks
/// (plus the socket's buffers and the replay's own batches) whatever its
/// length, and an exporter whose client reads nothing waits.
pub const EXPORT_CHUNKS_IN_FLIGHT: usize = 8;

/// The size an exporter should cut its output into.
pub const EXPORT_CHUNK: usize = 64 * 1024;

/// The client of a download went away (or the body was dropped).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the client of the download went away")]
pub struct ClientGone;

/// What is known of this gateway's downloads (read by tests and logs).
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Exports whose exporter has not returned yet.
    pub running: std::sync::atomic::AtomicUsize,
    /// Bytes the exporters offered to their clients' bodies.
    pub produced_bytes: std::sync::atomic::AtomicU64,
    /// Exporters waiting now because their client has not read what it was
    /// given (the channel is full).
    pub waiting: std::sync::atomic::AtomicUsize,
}

/// Where an exporter writes a download: the HTTP body, through a channel of
/// [`EXPORT_CHUNKS_IN_FLIGHT`] chunks.
pub struct ExportOut {
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    stats: Arc<ExportStats>,
}

impl ExportOut {
    /// Hands `chunk` to the body, waiting while the client has not read
    /// what it was given. Blocking: call it from the exporter's thread.
    pub fn send(&self, chunk: Vec<u8>) -> Result<(), ClientGone> {
        use std::sync::atomic::Ordering::Relaxed;
        if chunk.is_empty() {
            return Ok(());
        }
        self.stats
            .produced_bytes
            .fetch_add(chunk.len() as u64, Relaxed);
        let chunk = match self.tx.try_send(Ok(chunk.into())) {
            Ok(()) => return Ok(()),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return Err(ClientGone),
            Err(tokio::sync::mpsc::error::TrySendError::Full(chunk)) => chunk,
        };
        self.stats.waiting.fetch_add(1, Relaxed);
        let sent = self.tx.blocking_send(chunk);
        self.stats.waiting.fetch_sub(1, Relaxed);
        sent.map_err(|_| ClientGone)
    }

    /// Whether the client went away (an exporter that reads without writing
    /// for a while checks it).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Counts an export as running until dropped.
struct RunningExport(Arc<ExportStats>);

impl RunningExport {
    fn start(stats: &Arc<ExportStats>) -> Self {
        stats
            .running
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(stats.clone())
    }
}

impl Drop for RunningExport {
    fn drop(&mut self) {
        self.0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How a download is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// One JSON object per record and line (`couponctl replay`'s output).
    #[default]
    Jsonl,
    /// The same records in columns (`couponctl replay --format parquet`).
    Parquet,
}

// ---------------------------------------------------------------- the page

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");

/// Nothing but this origin: the page loads its script from here and talks
/// to this API only.
const CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
    style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

fn static_answer(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// The web console (employees, analysts, operators).
///
/// The page asks for the admin token (COUPON_ADMIN_TOKEN) and calls the
/// routes tagged `console` with it; loading the page itself needs no token.
#[utoipa::path(
    get,
    path = "/console",
    tag = "console",
    responses(
        (status = 200, description = "The console's HTML page.", body = String, content_type = "text/html"),
    )
)]
pub(super) async fn console_page() -> Response {
    static_answer("text/html; charset=utf-8", PAGE)
}

/// The console's script (loaded by `/console`).
#[utoipa::path(
    get,
    path = "/console/console.js",
    tag = "console",
    responses(
        (status = 200, description = "JavaScript.", body = String, content_type = "text/javascript"),
    )
)]
pub(super) async fn console_script() -> Response {
    static_answer("text/javascript; charset=utf-8", SCRIPT)
}

// --------------------------------------------------------------- the pool

/// The coupons of one category by status.
#[derive(Debug, Serialize, ToSchema)]
pub struct CategoryPool {
    #[schema(example = "Electronics")]
    pub category: String,
    pub available: i64,
    pub held: i64,
    pub redeemed: i64,
    /// available + held + redeemed.
    pub issued: i64,
}

/// The pool per category and in total.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolAnswer {
    pub categories: Vec<CategoryPool>,
    pub available: i64,
    pub held: i64,
    pub redeemed: i64,
    pub issued: i64,
}

fn store_unavailable(error: sqlx::Error) -> ApiError {
    tracing::warn!(%error, "a console read failed");
    ApiError::unavailable("the coupon store is not available; retrying is safe")
}

/// The pool per category: coupons available, held and redeemed.
///
/// The numbers of `couponctl status` (the same query), as Postgres has them
/// now: coupons published but not yet projected are not counted.
#[utoipa::path(
    get,
    path = "/api/v1/pool",
    tag = "console",
    responses(
        (status = 200, description = "Every category with its coupons by status.", body = PoolAnswer),
        responses::AdminUnauthorized,
        responses::StoreUnavailable,
    ),
    security(("admin_token" = []))
)]
pub(super) async fn pool(
    State(state): State<Arc<GatewayState>>,
    _caller: AdminCaller,
) -> Result<Json<PoolAnswer>, ApiError> {
    let rows = coupon_platform::store::stats::pool_by_category(&state.pool)
        .await
        .map_err(store_unavailable)?;
    let categories: Vec<CategoryPool> = rows
        .into_iter()
        .map(|c| CategoryPool {
            issued: c.available + c.held + c.redeemed,
            category: c.category,
            available: c.available,
            held: c.held,
            redeemed: c.redeemed,
        })
        .collect();
    let sum = |f: fn(&CategoryPool) -> i64| categories.iter().map(f).sum::<i64>();
    Ok(Json(PoolAnswer {
        available: sum(|c| c.available),
        held: sum(|c| c.held),
        redeemed: sum(|c| c.redeemed),
        issued: sum(|c| c.issued),
        categories,
    }))
}

// ------------------------------------------------------------ the batches

/// `GET /api/v1/batches` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BatchQuery {
    /// Only this employee's batches (1 to 64 characters, no control
    /// characters, no white space first or last).
    #[param(
        min_length = 1,
        max_length = 64,
        pattern = "{ID_PATTERN}",
        example = "e1"
    )]
    pub employee: Option<String>,
    /// Only this batch (the `batch_id` a release answered with): how far
    /// its projection has got.
    #[param(
        value_type = String,
        required = false,
        pattern = "{UUID_PATTERN}",
        example = "0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6f"
    )]
    pub batch_id: Option<String>,
    /// At most this many batches, newest first (1 to 500; default 50).
    #[param(minimum = 1, maximum = 500, example = 20)]
    pub limit: Option<u32>,
}

/// A batch as projected so far.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchInfo {
    #[schema(format = "uuid")]
    pub batch_id: String,
    #[schema(example = "e1")]
    pub employee_id: String,
    #[schema(example = "Electronics")]
    pub category: String,
    /// Coupons of the batch the projector has stored.
    pub projected: i64,
    pub available: i64,
    pub held: i64,
    pub redeemed: i64,
    /// When its first coupon was generated (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub generated_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchesAnswer {
    /// Newest first; a batch is listed from its first projected coupon.
    pub batches: Vec<BatchInfo>,
}

fn millis(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A UUID in its hyphenated form only (what [`UUID_PATTERN`] allows).
pub fn parse_batch_id(raw: &str) -> Result<uuid::Uuid, ApiError> {
    let hyphens = [8, 13, 18, 23];
    let well_formed = raw.len() == 36
        && raw.char_indices().all(|(i, c)| {
            if hyphens.contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if !well_formed {
        return Err(ApiError::invalid(
            "batch_id must be a UUID like 0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6f",
        ));
    }
    uuid::Uuid::parse_str(raw).map_err(|e| ApiError::invalid(format!("batch_id: {e}")))
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::invalid(rejection.body_text())
}

/// Recent batches by employee, with how far each is projected.
///
/// With `batch_id`, that batch alone: the console polls it after a release
/// until `projected` reaches the batch's count (an empty list: nothing of
/// it is projected yet).
#[utoipa::path(
    get,
    path = "/api/v1/batches",
    tag = "console",
    params(BatchQuery),
    responses(
        (status = 200, description = "The batches, newest first.", body = BatchesAnswer),
        (status = 400, description = "An invalid employee id, batch id or limit.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "limit must be between 1 and 500"})),
        responses::AdminUnauthorized,
        responses::StoreUnavailable,
    ),
    security(("admin_token" = []))
)]
pub(super) async fn batches(
    State(state): State<Arc<GatewayState>>,
    _caller: AdminCaller,
    query: Result<Query<BatchQuery>, QueryRejection>,
) -> Result<Json<BatchesAnswer>, ApiError> {
    let Query(query) = query.map_err(query_rejection)?;
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_BATCHES {
        return Err(ApiError::invalid(format!(
            "limit must be between 1 and {MAX_BATCHES}"
        )));
    }
    let employee = query
        .employee
        .map(|e| EmployeeId::parse(e).map_err(|e| ApiError::invalid(e.to_string())))
        .transpose()?;
    let batch_id = query.batch_id.as_deref().map(parse_batch_id).transpose()?;
    let filter = BatchFilter {
        employee: employee.map(|e| e.as_str().to_owned()),
        batch_id,
        limit: i64::from(limit),
    };
    let rows = console_store::batches(&state.pool, &filter)
        .await
        .map_err(store_unavailable)?;
    Ok(Json(BatchesAnswer {
        batches: rows
            .into_iter()
            .map(|r| BatchInfo {
                batch_id: r.batch_id.to_string(),
                employee_id: r.employee_id,
                category: r.category,
                projected: r.projected,
                available: r.available,
                held: r.held,
                redeemed: r.redeemed,
                generated_at: millis(r.generated_at),
            })
            .collect(),
    }))
}

// ----------------------------------------------------------- the blacklist

/// A blacklisted user.
#[derive(Debug, Serialize, ToSchema)]
pub struct BlacklistItem {
    #[schema(example = "user-42")]
    pub user_id: String,
    #[schema(required = true, example = "chargeback fraud")]
    pub reason: Option<String>,
    /// When the entry was made (RFC 3339, UTC).
    #[schema(required = true, format = DateTime)]
    pub blacklisted_at: Option<String>,
    /// When it ends; `null`: until removed.
    #[schema(required = true, format = DateTime)]
    pub expires_at: Option<String>,
}

impl From<blacklist::BlacklistEntry> for BlacklistItem {
    fn from(e: blacklist::BlacklistEntry) -> Self {
        Self {
            user_id: e.user_id.into_string(),
            reason: e.blacklist_reason,
            blacklisted_at: e.blacklisted_at.map(millis),
            expires_at: e.blacklisted_until.map(millis),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BlacklistAnswer {
    /// Current entries (ended ones are left out), by user id.
    pub entries: Vec<BlacklistItem>,
}

/// The users blacklisted now (manually, or by the gateway's flood control).
#[utoipa::path(
    get,
    path = "/api/v1/blacklist",
    tag = "console",
    responses(
        (status = 200, description = "Current entries, by user id.", body = BlacklistAnswer),
        responses::AdminUnauthorized,
        responses::StoreUnavailable,
    ),
    security(("admin_token" = []))
)]
pub(super) async fn blacklist_list(
    State(state): State<Arc<GatewayState>>,
    _caller: AdminCaller,
) -> Result<Json<BlacklistAnswer>, ApiError> {
    let entries = blacklist::list(&state.pool)
        .await
        .map_err(store_unavailable)?;
    Ok(Json(BlacklistAnswer {
        entries: entries.into_iter().map(BlacklistItem::from).collect(),
    }))
}

/// `POST /api/v1/blacklist` body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct BlacklistAdd {
    /// The user to refuse: 1 to 128 characters, no control characters, no
    /// white space first or last.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "{ID_PATTERN}",
        example = "user-42"
    )]
    pub user_id: String,
    /// Why, for the next person reading the list: 1 to 200 characters, no
    /// control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "{CODE_PATTERN}",
        example = "chargeback fraud"
    )]
    pub reason: String,
    /// For how many seconds (1 to 315360000, ten years); absent or `null`:
    /// until removed. An existing entry is extended, never shortened.
    #[serde(default, deserialize_with = "super::api::whole_seconds")]
    #[schema(minimum = 1, maximum = 315_360_000, example = 86400)]
    pub for_seconds: Option<u64>,
}

/// Blacklist a user: claims are answered `403 blacklisted` until the entry
/// ends. The change is written to Postgres and to the log, as
/// `couponctl blacklist add` does.
#[utoipa::path(
    post,
    path = "/api/v1/blacklist",
    tag = "console",
    request_body = BlacklistAdd,
    responses(
        (status = 200, description = "The entry as it now is (an existing one may end later than asked).", body = BlacklistItem),
        (status = 400, description = "An invalid user id, reason or duration.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "for_seconds must be between 1 and 315360000"})),
        responses::AdminUnauthorized,
        responses::BodyRefused,
        responses::BlacklistUnavailable,
    ),
    security(("admin_token" = []))
)]
pub(super) async fn blacklist_add(
    State(state): State<Arc<GatewayState>>,
    caller: AdminCaller,
    body: Result<Json<BlacklistAdd>, JsonRejection>,
) -> Result<Json<BlacklistItem>, ApiError> {
    let Json(body) = body.map_err(json_rejection)?;
    let user = UserId::parse(body.user_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let reason_chars = body.reason.chars().count();
    if reason_chars == 0 || reason_chars > 200 || body.reason.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "reason must be 1 to 200 characters without control characters",
        ));
    }
    let until = match body.for_seconds {
        None => None,
        Some(secs) if (1..=MAX_BLACKLIST_SECONDS).contains(&secs) => {
            Some(Utc::now() + chrono::Duration::seconds(secs as i64))
        }
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "for_seconds must be between 1 and {MAX_BLACKLIST_SECONDS}"
            )))
        }
    };
    let list = Blacklist {
        pool: &state.pool,
        publisher: &state.publisher,
        topics: &state.topics,
    };
    let author = caller.author();
    let entry = list
        .add(&user, until, &body.reason, Source::Manual(&author))
        .await
        .map_err(|error| {
            tracing::warn!(%error, "blacklisting from the console failed");
            ApiError::unavailable("the blacklist could not be changed; retrying is safe")
        })?;
    tracing::info!(user = %user, reason = %body.reason, by = %author, "blacklisted from the console");
    Ok(Json(entry.into()))
}

/// `DELETE /api/v1/blacklist` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BlacklistRemove {
    /// The user whose entry ends now. Optional in the type only so that a
    /// missing one is answered with the JSON error shape.
    #[param(required = true, value_type = String, min_length = 1, max_length = 128,
        pattern = "{ID_PATTERN}", example = "user-42")]
    pub user_id: Option<String>,
}

/// The answer to a removal.
#[derive(Debug, Serialize, ToSchema)]
pub struct BlacklistRemoved {
    #[schema(example = "user-42")]
    pub user_id: String,
    /// Whether the user was blacklisted (`false`: nothing changed).
    pub removed: bool,
}

/// Lift a user's blacklisting (idempotent: a user not on the list is
/// answered `removed: false`).
#[utoipa::path(
    delete,
    path = "/api/v1/blacklist",
    tag = "console",
    params(BlacklistRemove),
    responses(
        (status = 200, description = "Whether an entry was lifted.", body = BlacklistRemoved),
        (status = 400, description = "A missing or invalid user id.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "missing query parameter 'user_id'"})),
        responses::AdminUnauthorized,
        responses::BlacklistUnavailable,
    ),
    security(("admin_token" = []))
)]
pub(super) async fn blacklist_remove(
    State(state): State<Arc<GatewayState>>,
    caller: AdminCaller,
    query: Result<Query<BlacklistRemove>, QueryRejection>,
) -> Result<Json<BlacklistRemoved>, ApiError> {
    let Query(query) = query.map_err(query_rejection)?;
    let raw = query
        .user_id
        .ok_or_else(|| ApiError::invalid("missing query parameter 'user_id'"))?;
    let user = UserId::parse(raw).map_err(|e| ApiError::invalid(e.to_string()))?;
    let list = Blacklist {
        pool: &state.pool,
        publisher: &state.publisher,
        topics: &state.topics,
    };
    let author = caller.author();
    let removed = list
        .remove(&user, Source::Manual(&author))
        .await
        .map_err(|error| {
            tracing::warn!(%error, "lifting a blacklisting from the console failed");
            ApiError::unavailable("the blacklist could not be changed; retrying is safe")
        })?;
    // A flood block lifts at once on every gateway, not at its TTL.
    let unblocked = state.cache.unblock(user.as_str()).await;
    if let Err(error) = unblocked {
        tracing::warn!(%error, "could not lift the flood block in Redis; it ends at its TTL");
    }
    Ok(Json(BlacklistRemoved {
        user_id: user.as_str().to_owned(),
        removed,
    }))
}

// ------------------------------------------------------------ the analytics

/// A time range in Unix seconds (UTC).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RangeQuery {
    /// From this time (Unix seconds, inclusive); default: an hour before
    /// `until`.
    #[param(minimum = 0, maximum = 253_402_300_799.0, example = 1_764_547_200)]
    pub since: Option<u64>,
    /// Up to this time (Unix seconds, inclusive); default: now. A range
    /// that ends before it starts is empty.
    #[param(minimum = 0, maximum = 253_402_300_799.0, example = 1_764_633_600)]
    pub until: Option<u64>,
}

/// `[since, until]` of a query, defaults applied. No I/O.
pub fn resolve_range(
    since: Option<u64>,
    until: Option<u64>,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    for (name, value) in [("since", since), ("until", until)] {
        if value.is_some_and(|v| v > MAX_UNIX_SECONDS) {
            return Err(ApiError::invalid(format!(
                "{name} must be Unix seconds between 0 and {MAX_UNIX_SECONDS}"
            )));
        }
    }
    let at = |secs: u64| Utc.timestamp_opt(secs as i64, 0).single();
    let until = match until {
        Some(secs) => at(secs).ok_or_else(|| ApiError::invalid("until is not a time"))?,
        None => now,
    };
    let since = match since {
        Some(secs) => at(secs).ok_or_else(|| ApiError::invalid("since is not a time"))?,
        None => until - chrono::Duration::seconds(DEFAULT_RANGE_SECONDS as i64),
    };
    Ok((since, until))
}

/// The bucket width of a claims chart over `[since, until]`: a minute, or
/// whole minutes wide enough that the range has at most [`MAX_BUCKETS`].
pub fn bucket_seconds(since: DateTime<Utc>, until: DateTime<Utc>) -> i64 {
    let span = (until - since).num_seconds().max(0);
    let minutes = (span + 59) / 60;
    let per_bucket = (minutes + MAX_BUCKETS - 1) / MAX_BUCKETS;
    per_bucket.max(1) * 60
}

/// Claim decisions of one bucket.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClaimCounts {
    /// The bucket's start (RFC 3339, UTC); absent in the totals.
    #[schema(format = DateTime)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    pub granted: i64,
    pub sold_out: i64,
    pub rate_limited: i64,
    pub blacklisted: i64,
    /// Invalid requests.
    pub other: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClaimsAnswer {
    #[schema(format = DateTime)]
    pub since: String,
    #[schema(format = DateTime)]
    pub until: String,
    /// Width of each bucket: 60 (claims per minute), wider for ranges
    /// longer than a day so that there are at most 1440.
    pub bucket_seconds: i64,
    /// Buckets with at least one decision, oldest first.
    pub buckets: Vec<ClaimCounts>,
    /// The whole range.
    pub totals: ClaimCounts,
}

/// Claim decisions per minute by outcome, from the history.
///
/// Counts the history sink's rows: a `granted` row per hold given, a
/// `rejected` row per refused claim (repeated grants of a hold already
/// given are not history, so not counted).
#[utoipa::path(
    get,
    path = "/api/v1/analytics/claims",
    tag = "console",
    params(RangeQuery),
    responses(
        (status = 200, description = "Decisions per bucket and in total.", body = ClaimsAnswer),
        (status = 400, description = "A bound that is not Unix seconds between 0 and 253402300799.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "since must be Unix seconds between 0 and 253402300799"})),
        responses::AdminUnauthorized,
        responses::StoreUnavailable,
    ),
    security(("admin_token" = []))
)]
pub(super) async fn analytics_claims(
    State(state): State<Arc<GatewayState>>,
    _caller: AdminCaller,
    query: Result<Query<RangeQuery>, QueryRejection>,
) -> Result<Json<ClaimsAnswer>, ApiError> {
    let Query(query) = query.map_err(query_rejection)?;
    let (since, until) = resolve_range(query.since, query.until, Utc::now())?;
    let width = bucket_seconds(since, until);
    let rows = if until < since {
        Vec::new()
    } else {
        console_store::claims_per_bucket(&state.read_pool, since, until, width)
            .await
            .map_err(store_unavailable)?
    };
    let mut totals = ClaimCounts {
        start: None,
        granted: 0,
        sold_out: 0,
        rate_limited: 0,
        blacklisted: 0,
        other: 0,
    };
    let buckets = rows
        .into_iter()
        .map(|r| {
            totals.granted += r.granted;
            totals.sold_out += r.sold_out;
            totals.rate_limited += r.rate_limited;
            totals.blacklisted += r.blacklisted;
            totals.other += r.other;
            ClaimCounts {
                start: Some(millis(r.bucket_start)),
                granted: r.granted,
                sold_out: r.sold_out,
                rate_limited: r.rate_limited,
                blacklisted: r.blacklisted,
                other: r.other,
            }
        })
        .collect();
    Ok(Json(ClaimsAnswer {
        since: millis(since),
        until: millis(until),
        bucket_seconds: width,
        buckets,
        totals,
    }))
}

/// The funnel of one category or batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct FunnelStep {
    #[schema(example = "Electronics")]
    pub category: String,
    /// Absent in the per-category rows.
    #[schema(format = "uuid")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub employee_id: Option<String>,
    /// Holds given in the range.
    pub granted: i64,
    /// Purchases in the range.
    pub redeemed: i64,
    /// Holds that ended unbought in the range (the coupon went back to the pool).
    pub expired: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunnelAnswer {
    #[schema(format = DateTime)]
    pub since: String,
    #[schema(format = DateTime)]
    pub until: String,
    pub by_category: Vec<FunnelStep>,
    pub by_batch: Vec<FunnelStep>,
}

/// The redemption funnel (granted → redeemed / expired) per category and per
/// batch, from the history.
#[utoipa::path(
    get,
    path = "/api/v1/analytics/funnel",
    tag = "console",
    params(RangeQuery),
    responses(
        (status = 200, description = "The funnel per category and per batch.", body = FunnelAnswer),
        (status = 400, description = "A bound that is not Unix seconds between 0 and 253402300799.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "since must be Unix seconds between 0 and 253402300799"})),
        responses::AdminUnauthorized,
        responses::StoreUnavailable,
    ),
    security(("admin_token" = []))
)]
pub(super) async fn analytics_funnel(
    State(state): State<Arc<GatewayState>>,
    _caller: AdminCaller,
    query: Result<Query<RangeQuery>, QueryRejection>,
) -> Result<Json<FunnelAnswer>, ApiError> {
    let Query(query) = query.map_err(query_rejection)?;
    let (since, until) = resolve_range(query.since, query.until, Utc::now())?;
    let rows = if until < since {
        Vec::new()
    } else {
        console_store::funnel(&state.read_pool, since, until)
            .await
            .map_err(store_unavailable)?
    };
    let mut by_category: Vec<FunnelStep> = Vec::new();
    for r in &rows {
        match by_category.iter_mut().find(|c| c.category == r.category) {
            Some(c) => {
                c.granted += r.granted;
                c.redeemed += r.redeemed;
                c.expired += r.expired;
            }
            None => by_category.push(FunnelStep {
                category: r.category.clone(),
                batch_id: None,
                employee_id: None,
                granted: r.granted,
                redeemed: r.redeemed,
                expired: r.expired,
            }),
        }
    }
    Ok(Json(FunnelAnswer {
        since: millis(since),
        until: millis(until),
        by_category,
        by_batch: rows
            .into_iter()
            .map(|r| FunnelStep {
                category: r.category,
                batch_id: Some(r.batch_id.to_string()),
                employee_id: Some(r.employee_id),
                granted: r.granted,
                redeemed: r.redeemed,
                expired: r.expired,
            })
            .collect(),
    }))
}

/// `GET /api/v1/analytics/export` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// From this time (Unix seconds, inclusive); default: an hour before
    /// `until`.
    #[param(minimum = 0, maximum = 253_402_300_799.0, example = 1_764_547_200)]
    pub since: Option<u64>,
    /// Up to this time (Unix seconds, inclusive); default: now.
    #[param(minimum = 0, maximum = 253_402_300_799.0, example = 1_764_633_600)]
    pub until: Option<u64>,
    /// `jsonl` (default) or `parquet`.
    #[param(inline)]
    pub format: Option<ExportFormat>,
}

/// Download a time range of the log: every event of every topic, decoded,
/// as JSON lines or Parquet (what `couponctl replay --since --until` writes).
///
/// Reads the topics from their start (like the replay), so it takes longer
/// the longer the log; for large exports use `couponctl replay`. The body is
/// streamed (chunked) as the log is read: a download's memory does not grow
/// with its length, and it stops when its client goes. A failure after the
/// first bytes ends the body early, without its last chunk, so a client
/// cannot take a cut download for a whole one.
#[utoipa::path(
    get,
    path = "/api/v1/analytics/export",
    tag = "console",
    params(ExportQuery),
    responses(
        (status = 200, description = "The records: JSON lines (`application/x-ndjson`) or a Parquet file (`application/vnd.apache.parquet`).",
            content(
                (String = "application/x-ndjson"),
                (Vec<u8> = "application/vnd.apache.parquet"),
            )),
        (status = 400, description = "A bound that is not Unix seconds between 0 and 253402300799, or an unknown format.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "since must be Unix seconds between 0 and 253402300799"})),
        responses::AdminUnauthorized,
        (status = 503, description = "The broker is not available (or this process cannot export), or the gateway is at its limit of requests in flight.",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            body = ErrorBody, example = json!({"error": "unavailable", "message": "the log could not be read; retrying is safe"})),
    ),
    security(("admin_token" = []))
)]
pub(super) async fn analytics_export(
    State(state): State<Arc<GatewayState>>,
    _caller: AdminCaller,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(query_rejection)?;
    let (since, until) = resolve_range(query.since, query.until, Utc::now())?;
    let format = query.format.unwrap_or_default();
    let Some(exporter) = state.exporter.clone() else {
        return Err(ApiError::unavailable(
            "this process cannot export; use `couponctl replay`",
        ));
    };
    if until < since && format == ExportFormat::Jsonl {
        // An empty range: no lines (a Parquet file is still a file).
        return Ok(export_response(
            format,
            since,
            until,
            axum::body::Body::empty(),
        ));
    }
    let range_until = until.max(since);
    // The exporter writes into a bounded channel from a blocking thread;
    // the body reads it. A client that reads nothing makes the exporter
    // wait; a client gone drops the body and the channel, and the exporter
    // stops at its next write (or batch of the log).
    let (tx, mut rx) = tokio::sync::mpsc::channel(EXPORT_CHUNKS_IN_FLIGHT);
    let out = ExportOut {
        tx,
        stats: state.exports.clone(),
    };
    let running = RunningExport::start(&state.exports);
    tokio::task::spawn_blocking(move || {
        let _running = running;
        if let Err(error) = exporter.export(since, range_until, format, &out) {
            if out.is_closed() {
                tracing::debug!(%error, "the client left its download; the export stopped");
            } else {
                tracing::warn!(%error, "exporting from the console failed");
                let _ = out.tx.blocking_send(Err(std::io::Error::other(error)));
            }
        }
    });
    // The first chunk (or the end, or a failure) before the answer: a
    // broker that cannot be read is still a 503, not a 200 with no body.
    let first = match rx.recv().await {
        None => bytes::Bytes::new(),
        Some(Ok(chunk)) => chunk,
        Some(Err(_)) => {
            return Err(ApiError::unavailable(
                "the log could not be read; retrying is safe",
            ))
        }
    };
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let body = futures::stream::StreamExt::chain(
        futures::stream::once(std::future::ready(Ok::<_, std::io::Error>(first))),
        rest,
    );
    Ok(export_response(
        format,
        since,
        until,
        axum::body::Body::from_stream(body),
    ))
}

/// The download's answer: its type, its file name, and `body`.
fn export_response(
    format: ExportFormat,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    body: axum::body::Body,
) -> Response {
    let (content_type, extension) = match format {
        ExportFormat::Jsonl => ("application/x-ndjson", "jsonl"),
        ExportFormat::Parquet => ("application/vnd.apache.parquet", "parquet"),
    };
    let name = format!(
        "attachment; filename=\"coupons-{}-{}.{extension}\"",
        since.timestamp(),
        until.timestamp()
    );
    let disposition =
        HeaderValue::from_str(&name).unwrap_or_else(|_| HeaderValue::from_static("attachment"));
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

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
