//! `GET`, `POST`, `DELETE /api/v1/blacklist`: the blacklist, changed through
//! [`crate::blacklist`] (Postgres and the log, as the CLI does).

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use coupon_domain::UserId;

use super::super::responses;
use super::super::{json_rejection, AdminCaller, ApiError, ErrorBody, GatewayState};
use super::{millis, query_rejection, store_unavailable, MAX_BLACKLIST_SECONDS};
use crate::blacklist::{self, Blacklist, Source};

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
pub(crate) async fn blacklist_list(
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

/// `POST /api/v1/blacklist` body (a field it does not know is refused, `400`
/// naming it, as on every route).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
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
    #[serde(default, deserialize_with = "crate::gateway::api::whole_seconds")]
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
pub(crate) async fn blacklist_add(
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
pub(crate) async fn blacklist_remove(
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
    let unblocked = state.cache.unblock(&user).await;
    if let Err(error) = unblocked {
        tracing::warn!(%error, "could not lift the flood block in Redis; it ends at its TTL");
    }
    Ok(Json(BlacklistRemoved {
        user_id: user.as_str().to_owned(),
        removed,
    }))
}
