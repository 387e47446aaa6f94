//! `PUT /api/v1/users/{id}`: a user's profile (issue #28 item 6), which
//! campaigns' eligibility (locations, minimum age) reads.
//!
//! The gateway validates the body and publishes it as a `UserProfileUpdated`
//! on `<prefix>.users`, as a storefront publishing straight to Kafka would,
//! and answers `202` once the broker has it: the profiles processor is the
//! one writer of the `users` profile columns, and the log the source of
//! truth (a rebuild gets the same rows). The profile takes effect when it
//! is projected, normally within moments; a storefront that needs it for a
//! claim right away waits for the `202` first (claims after it see it once
//! the processor has caught up).

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};

use coupon_domain::{InvalidProfile, Profile, UserId};
use coupon_schemas::UserProfileUpdated;

use crate::gateway::api::{ProfileAccepted, ProfileBody};
use crate::gateway::auth::{Caller, ClientAddr};
use crate::gateway::responses;
use crate::gateway::GatewayState;
use crate::gateway::{json_rejection, request_id, storefront_caller};
use crate::gateway::{ApiError, ErrorBody, ErrorCode};

/// Set a user's profile.
///
/// Replaces the user's `name`, `dob` (date of birth) and `location`: all
/// three are required, `null` clears one (`""` too for `name` and `location`). A campaign with `locations` is claimable
/// only by users whose profile location is one of them (case does not
/// matter), one with `min_age` only by users at least that old on the day
/// of the claim; a user without a profile is not eligible for such a
/// campaign. Answered `202` once published: the profile applies as soon as
/// it is projected (normally within moments). Of two updates of one user,
/// the later wins.
#[utoipa::path(
    put,
    path = "/api/v1/users/{id}",
    tag = "storefront",
    params(
        ("id" = String, Path, pattern = "{ID_PATTERN}", max_length = 128, description = "The user id, as claims name it.", example = "user-42"),
        ("x-request-id" = Option<String>, Header,
            description = "Your id for this request; generated when absent, echoed in the answer's x-request-id header.")
    ),
    request_body = ProfileBody,
    responses(
        (status = 202, description = "Published; the profile applies once projected.", body = ProfileAccepted),
        (status = 400, description = "Not JSON, a field of the wrong type, a `dob` that is not a date YYYY-MM-DD, an invalid user id, or a field the route does not know (named in the message).",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "unknown field `age`, expected one of `name`, `dob`, `location`"})),
        responses::ApiUnauthorized,
        (status = 422, description = "`invalid_profile`: a `dob` in the future or before 1900, a `name` over 200 or a `location` over 64 characters, or one with control characters or white space first or last. Nothing was published.",
            body = ErrorBody, example = json!({"error": "invalid_profile", "message": "dob: must not be in the future (got 2090-01-01)"})),
        responses::BodyRefused,
        responses::AddressLimited,
        (status = 503, description = "The profile could not be published; retrying is safe.",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            body = ErrorBody, example = json!({"error": "unavailable", "message": "could not publish the profile; retrying is safe"})),
    ),
    security((), ("api_token" = []))
)]
pub(in crate::gateway) async fn put_profile(
    State(state): State<Arc<GatewayState>>,
    client: ClientAddr,
    caller: Caller,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<ProfileBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    storefront_caller(&state, caller, client)?;
    let Path(raw) = path.map_err(|e| ApiError::invalid(e.body_text()))?;
    let user = UserId::parse(raw).map_err(|e| ApiError::invalid(e.to_string()))?;
    let Json(body) = body.map_err(json_rejection)?;
    let now = Utc::now();
    let profile = profile_of(&body, now)?;
    let request_id = request_id(&headers);
    let event = UserProfileUpdated {
        envelope: Some(state.publisher.envelope::<UserProfileUpdated>(&request_id)),
        user_id: user.to_string(),
        name: profile.name.clone().unwrap_or_default(),
        dob: profile.dob.map(|d| d.to_string()).unwrap_or_default(),
        location: profile.location.clone().unwrap_or_default(),
        updated_at_ms: now.timestamp_millis(),
    };
    state
        .publisher
        .send(&state.topics.users(), user.as_str(), &event)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "publishing a profile failed");
            ApiError::unavailable("could not publish the profile; retrying is safe")
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ProfileAccepted {
            user_id: user.to_string(),
            status: "accepted".into(),
            updated_at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }),
    )
        .into_response())
}

/// The body as a validated profile: a `dob` that is not even a date
/// (`""` included: `null` clears it, as the document's `format: date`
/// says) is `400 invalid_request`, a value out of range `422
/// invalid_profile`.
fn profile_of(body: &ProfileBody, now: DateTime<Utc>) -> Result<Profile, ApiError> {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let dob = text(&body.dob);
    if body.dob.is_some() && chrono::NaiveDate::parse_from_str(&dob, "%Y-%m-%d").is_err() {
        return Err(ApiError::invalid(format!(
            "dob: {dob:?} is not a date YYYY-MM-DD (e.g. \"1990-04-01\")"
        )));
    }
    Profile::parse(&text(&body.name), &dob, &text(&body.location), now).map_err(unprocessable)
}

fn unprocessable(e: InvalidProfile) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::InvalidProfile,
        format!("{e}; nothing was published"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Result<ProfileBody, serde_json::Error> {
        serde_json::from_str(json)
    }

    fn now() -> DateTime<Utc> {
        "2026-12-06T03:00:00Z".parse().unwrap()
    }

    #[test]
    fn bodies_are_refused_by_field() {
        let ok = body(r#"{"name":"Ada","dob":"1990-04-01","location":"DE"}"#).unwrap();
        assert_eq!(
            profile_of(&ok, now()).unwrap().location.as_deref(),
            Some("DE")
        );
        let unknown = body(r#"{"name":"Ada","age":30}"#).unwrap_err().to_string();
        assert!(unknown.contains("unknown field `age`"), "{unknown}");
        let missing = body(r#"{"name":"Ada","dob":null}"#)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("missing field `location`"), "{missing}");
        let cleared = body(r#"{"name":null,"dob":null,"location":""}"#).unwrap();
        assert_eq!(profile_of(&cleared, now()).unwrap(), Profile::default());
        let empty_dob = body(r#"{"name":null,"dob":"","location":null}"#).unwrap();
        let refused = profile_of(&empty_dob, now()).unwrap_err();
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        let not_a_date = body(r#"{"name":null,"dob":"01.04.1990","location":null}"#).unwrap();
        let refused = profile_of(&not_a_date, now()).unwrap_err();
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        let future = body(r#"{"name":null,"dob":"2090-01-01","location":null}"#).unwrap();
        let refused = profile_of(&future, now()).unwrap_err();
        assert_eq!(
            (refused.status, refused.code),
            (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidProfile)
        );
        assert!(refused.message.contains("dob"), "{}", refused.message);
        let long = body(&format!(
            r#"{{"name":"{}","dob":null,"location":null}}"#,
            "x".repeat(201)
        ))
        .unwrap();
        assert_eq!(
            profile_of(&long, now()).unwrap_err().code,
            ErrorCode::InvalidProfile
        );
    }
}
