//! `GET /api/v1/analytics/export`: a time range of the log as a download,
//! streamed in bounded chunks from the binary's [`Exporter`].

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::super::responses;
use super::super::{AdminCaller, ApiError, ErrorBody, GatewayState};
use super::{analytics::resolve_range, query_rejection};

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
pub(crate) async fn analytics_export(
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
