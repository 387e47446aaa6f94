//! `POST /api/v1/coupon`: an employee's release, idempotent with an
//! `Idempotency-Key`, run to completion whatever the client does.
//!
//! The batch's employee is the caller's ([`AdminCaller`], resolved by
//! admission from the credential): the body's `id` must name that same
//! employee (`403 employee_mismatch` otherwise). Only the shared
//! COUPON_ADMIN_TOKEN, which proves no one in particular, releases under
//! the employee the body names (the legacy and development mode).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tracing::Instrument as _;

use chrono::{DateTime, Utc};

use coupon_domain::campaign::{CampaignFields, Discount, InvalidCampaign};
use coupon_domain::{Campaign, Category, EmployeeId, Money};

use crate::gateway::{
    json_rejection, responses, AdminCaller, ApiError, CouponBatch, CreateCoupons, ErrorBody,
    ErrorCode, GatewayState, MAX_HTTP_ISSUE,
};
use crate::issue::{self, IdempotencyKey, IssueError, IssueRequest};

/// Release a batch of coupons (employees).
///
/// Generates the codes and publishes them; they become claimable as soon as
/// the coupon projector has stored them (and, for a campaign with a window,
/// while it is open).
///
/// The campaign fields (`campaign`, `discount`, `min_order`, `valid_from`,
/// `valid_until`, `locations`, `min_age`; all optional) make the batch a
/// campaign: every coupon is worth the discount, needs the minimum order,
/// and is claimable only inside the window. The batch id is the campaign's
/// id. `locations` and `min_age` restrict who may claim (the user's profile).
/// A field the route does not know is refused (`400`), never ignored.
///
/// The release runs in a task of its own, which the handler awaits: a client
/// that goes away (or a request past its deadline) does not cut it, it
/// completes. With an `Idempotency-Key` the batch is stored before it is
/// published (`crate::issue`): a repeat with the key and the same body
/// answers that batch (the same batch id and codes) and mints nothing, and
/// completes it if it was cut (e.g. the process died mid-publish); the key
/// with another body is `422`. A repeat while the first is still publishing
/// waits for it (up to REPLY_TIMEOUT, then `409` with `Retry-After`). Without
/// a key a repeat is another batch, and a process that dies mid-publish
/// leaves the chunks it published.
#[utoipa::path(
    post,
    path = "/api/v1/coupon",
    tag = "employees",
    request_body = CreateCoupons,
    params(
        ("Idempotency-Key" = Option<String>, Header,
            description = "Your name for this release (1-128 visible ASCII characters). A repeat with the same key and body answers the first release (same batch id and codes) and mints nothing; it also completes a release that was cut mid-way. The same key with another body is refused (422). Without a key, every request releases a new batch.",
            example = "release-2026-12-02-electronics")
    ),
    responses(
        (status = 202, description = "Published: the batch id and the codes (for a repeat with the same Idempotency-Key: those of the first release).", body = CouponBatch),
        (status = 400, description = "Invalid employee id, category, count or Idempotency-Key; a field the route does not know (named in the message); a `valid_from`/`valid_until` that is not RFC 3339. Nothing was released.",
            body = ErrorBody, example = json!({"error": "invalid_request", "message": "count must be between 1 and 100000 (use `couponctl issue` for more)"})),
        responses::AdminUnauthorized,
        (status = 403, description = "The body's `id` names another employee than the caller's credential (a per-employee token or OIDC token): an employee releases under their own id only. Nothing was released.",
            body = ErrorBody, example = json!({"error": "employee_mismatch", "message": "this credential is employee \"alice\"'s, but the release names employee \"bob\": an employee releases under their own id only (send \"id\": \"alice\")"})),
        (status = 409, description = "A release with this Idempotency-Key is still being published by another request and did not end within REPLY_TIMEOUT; repeat the request (same key and body) after Retry-After for its answer.",
            headers(("Retry-After" = u64, description = "Seconds to wait before repeating")),
            body = ErrorBody, example = json!({"error": "idempotency_key_in_progress", "message": "the release with idempotency key \"k1\" is still being published; repeat the request (same key, same body) in a moment for its answer"})),
        responses::BodyRefused,
        (status = 422, description = "`idempotency_key_reused`: this Idempotency-Key was already used for a release with another employee, category, count or campaign. `invalid_campaign`: a campaign field is out of range (a percent outside 1-100, an amount not above 0, a currency that is no active ISO 4217 code, two currencies, a `valid_until` not after `valid_from` or already passed, a `min_age` outside 1-120, more than 32 locations). Nothing was released.",
            body = ErrorBody, examples(
                ("idempotency_key_reused" = (summary = "the key names another release", value = json!({"error": "idempotency_key_reused", "message": "idempotency key \"k1\" was already used for another release (100 Books coupons by employee e1, without a campaign); a new release needs a new key"}))),
                ("invalid_campaign" = (summary = "a campaign field out of range", value = json!({"error": "invalid_campaign", "message": "discount.percent_off: must be 1 to 100 (got 0); nothing was released"})))
            )),
        (status = 503, description = "The batch could not be published (or no machine id could be leased), or the gateway is at its limit of requests in flight. The message says whether repeating is safe: always with an Idempotency-Key (the repeat completes the stored batch); without one, only when nothing was published.",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
            body = ErrorBody, example = json!({"error": "unavailable", "message": "the release failed part-way: some of its coupons may already be claimable; repeating it without an Idempotency-Key releases another batch"})),
        (status = 504, description = "The release took longer than REPLY_TIMEOUT; it goes on and completes. With an Idempotency-Key, repeat the request for its answer; without one, do not repeat it: that would release another batch.",
            body = ErrorBody, example = json!({"error": "timeout", "message": "the release is still being published and will complete; repeat the request with the same Idempotency-Key and body for its answer"})),
    ),
    security(("admin_token" = []))
)]
pub(in crate::gateway) async fn create_coupons(
    State(state): State<Arc<GatewayState>>,
    caller: AdminCaller,
    headers: HeaderMap,
    body: Result<Json<CreateCoupons>, JsonRejection>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let Json(body) = body.map_err(json_rejection)?;
    let request = release_request(caller, body)?;
    // The release is not this request's to cut: it runs in its own task,
    // which goes on when the client leaves or this handler stops waiting.
    let wait = state.config.reply_timeout;
    let lock_wait = wait
        .saturating_sub(Duration::from_millis(500))
        .max(Duration::from_millis(100));
    let task = tokio::spawn({
        let state = Arc::clone(&state);
        let request = request.clone();
        let key = key.clone();
        async move {
            issue::release(
                &state.pool,
                &state.publisher,
                &state.topics,
                state.config.datacenter_id,
                &request,
                key.as_ref(),
                lock_wait,
                |_| {},
            )
            .await
        }
        .in_current_span()
    });
    let keyed = key.is_some();
    let outcome = match tokio::time::timeout(wait, task).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(error)) => {
            tracing::error!(%error, "the release task failed");
            return Err(task_failed(keyed));
        }
        Err(_) => return Err(still_publishing(keyed)),
    };
    let batch = outcome.map_err(|error| {
        tracing::warn!(%error, "releasing coupons failed");
        refused(error, keyed)
    })?;
    let codes: Vec<String> = batch.codes.iter().map(ToString::to_string).collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(CouponBatch {
            batch_id: batch.batch_id.to_string(),
            employee_id: request.employee.as_str().to_owned(),
            category: request.category.as_str().to_owned(),
            count: codes.len(),
            codes,
        }),
    )
        .into_response())
}

/// The `Idempotency-Key` header, if sent; a key that is not 1 to 128
/// visible ASCII characters is refused.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|raw| IdempotencyKey::parse(raw).ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid(
                "Idempotency-Key must be 1 to 128 visible ASCII characters ('!' to '~')",
            )
        })
}

/// The release a body asks for, by the employee the caller may release as.
fn release_request(caller: AdminCaller, body: CreateCoupons) -> Result<IssueRequest, ApiError> {
    let count = body.count.unwrap_or(1);
    if count == 0 || count > MAX_HTTP_ISSUE {
        return Err(ApiError::invalid(format!(
            "count must be between 1 and {MAX_HTTP_ISSUE} (use `couponctl issue` for more)"
        )));
    }
    let campaign = campaign_of(&body, Utc::now())?;
    let named = EmployeeId::parse(body.id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let employee = caller.release_employee(named).map_err(|mismatch| {
        tracing::warn!(%mismatch, "a release naming another employee was refused");
        ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::EmployeeMismatch,
            mismatch.to_string(),
        )
    })?;
    Ok(IssueRequest {
        employee,
        category: Category::parse(body.category).map_err(|e| ApiError::invalid(e.to_string()))?,
        count,
        campaign,
    })
}

/// The release's campaign (`None`: no campaign field given), validated by
/// the domain (`coupon_domain::Campaign::parse`): a field that is not even
/// of its form (a time that is not RFC 3339) is `400 invalid_request`, a
/// value out of range `422 invalid_campaign`.
fn campaign_of(body: &CreateCoupons, now: DateTime<Utc>) -> Result<Option<Campaign>, ApiError> {
    let time = |field: &str, raw: &Option<String>| -> Result<Option<DateTime<Utc>>, ApiError> {
        raw.as_deref()
            .map(|raw| {
                DateTime::parse_from_rfc3339(raw)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        ApiError::invalid(format!(
                            "{field}: {raw:?} is not an RFC 3339 time (e.g. \"2026-12-20T00:00:00Z\"): {e}"
                        ))
                    })
            })
            .transpose()
    };
    let unprocessable = |e: InvalidCampaign| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidCampaign,
            format!("{e}; nothing was released"),
        )
    };
    let discount = body
        .discount
        .as_ref()
        .map(|d| Discount::parse(d.percent_off, d.amount_off, d.currency.as_deref()))
        .transpose()
        .map_err(unprocessable)?;
    let min_order = body
        .min_order
        .as_ref()
        .map(|m| Money::parse("min_order", m.amount, &m.currency, true))
        .transpose()
        .map_err(unprocessable)?;
    let fields = CampaignFields {
        name: body.campaign.clone(),
        discount,
        min_order,
        valid_from: time("valid_from", &body.valid_from)?,
        valid_until: time("valid_until", &body.valid_until)?,
        locations: body.locations.clone().unwrap_or_default(),
        min_age: body.min_age,
    };
    Campaign::parse(fields, now).map_err(unprocessable)
}

/// The release's task died (a panic): what the client may do depends on
/// whether the release was keyed.
fn task_failed(keyed: bool) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        if keyed {
            "the release failed unexpectedly; repeating the request with the same \
             Idempotency-Key and body completes it"
        } else {
            "the release failed unexpectedly; some of its coupons may already be \
             claimable, and repeating it without an Idempotency-Key releases another batch"
        },
    )
}

/// The release outlasted the reply timeout; it goes on in its task.
fn still_publishing(keyed: bool) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::Timeout,
        if keyed {
            "the release is still being published and will complete; repeat the request \
             with the same Idempotency-Key and body for its answer"
        } else {
            "the release is still being published and will complete; do not repeat it \
             without an Idempotency-Key: that would release another batch"
        },
    )
}

/// The answer to a release that failed, by what a repeat would do.
fn refused(error: IssueError, keyed: bool) -> ApiError {
    match error {
        IssueError::KeyReused { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::IdempotencyKeyReused,
            error.to_string(),
        ),
        IssueError::InProgress(_) => {
            let mut answer = ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::IdempotencyKeyInProgress,
                error.to_string(),
            );
            answer.retry_after_secs = Some(1);
            answer
        }
        IssueError::BadCount(_) => ApiError::invalid(error.to_string()),
        _ if keyed => ApiError::unavailable(
            "the coupons could not be released now; the batch is stored: repeating the \
             request with the same Idempotency-Key and body completes it",
        ),
        // Nothing was published before the codes were generated.
        IssueError::Keygen(_) | IssueError::Store(_) => ApiError::unavailable(
            "no machine id could be leased, so no coupon was released; retrying is safe",
        ),
        _ => ApiError::unavailable(
            "the release failed part-way: some of its coupons may already be claimable; \
             repeating it without an Idempotency-Key releases another batch",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::Credential;

    fn body(id: &str, count: Option<u32>) -> CreateCoupons {
        CreateCoupons {
            id: id.into(),
            category: "Electronics".into(),
            count,
            ..CreateCoupons::default()
        }
    }

    #[test]
    fn campaign_fields_are_validated_before_anything_is_released() {
        let now: DateTime<Utc> = "2026-12-05T12:00:00Z".parse().unwrap();
        let mut with = body("e1", Some(3));
        assert_eq!(campaign_of(&with, now).expect("no campaign"), None);
        with.discount = Some(crate::gateway::api::DiscountBody {
            percent_off: Some(0),
            amount_off: None,
            currency: None,
        });
        let refused = campaign_of(&with, now).expect_err("0%");
        assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(refused.code, ErrorCode::InvalidCampaign);
        assert!(
            refused.message.contains("percent_off"),
            "{}",
            refused.message
        );
        with.discount = None;
        with.valid_from = Some("tomorrow".into());
        let refused = campaign_of(&with, now).expect_err("not RFC 3339");
        assert_eq!(refused.code, ErrorCode::InvalidRequest);
        with.valid_from = Some("2026-12-06T00:00:00+01:00".into());
        with.valid_until = Some("2026-12-05T23:00:00Z".into());
        let refused = campaign_of(&with, now).expect_err("ends when it starts");
        assert!(
            refused.message.contains("valid_until"),
            "{}",
            refused.message
        );
        with.valid_until = Some("2026-12-07T00:00:00Z".into());
        with.campaign = Some("Winter".into());
        let campaign = campaign_of(&with, now).expect("valid").expect("a campaign");
        assert_eq!(campaign.name(), Some("Winter"));
        assert_eq!(
            campaign.valid_from(),
            Some("2026-12-05T23:00:00Z".parse().unwrap())
        );
    }

    fn employee(id: &str) -> AdminCaller {
        AdminCaller::Employee(EmployeeId::parse(id).expect("an id"), Credential::TokenFile)
    }

    #[test]
    fn an_idempotency_key_is_optional_but_must_be_visible_ascii() {
        let mut headers = HeaderMap::new();
        assert!(idempotency_key(&headers).expect("no key").is_none());
        headers.insert("idempotency-key", "release-2026-12-05".parse().unwrap());
        assert!(idempotency_key(&headers).expect("a key").is_some());
        headers.insert("idempotency-key", "two words".parse().unwrap());
        let refused = idempotency_key(&headers).expect_err("a space");
        assert_eq!(refused.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn a_count_outside_the_http_limit_is_refused() {
        for count in [0, MAX_HTTP_ISSUE + 1] {
            let refused = release_request(AdminCaller::SharedToken, body("e1", Some(count)))
                .expect_err("out of range");
            assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{count}");
            assert!(refused.message.contains("couponctl issue"), "{count}");
        }
        let one = release_request(AdminCaller::SharedToken, body("e1", None)).expect("one");
        assert_eq!(one.count, 1);
    }

    #[test]
    fn an_employee_releases_under_their_own_id_only() {
        let own = release_request(employee("e1"), body("e1", Some(3))).expect("own id");
        assert_eq!(own.employee.as_str(), "e1");
        let other = release_request(employee("e1"), body("e2", Some(3))).expect_err("other");
        assert_eq!(other.status, StatusCode::FORBIDDEN);
        assert_eq!(other.code, ErrorCode::EmployeeMismatch);
        let shared = release_request(AdminCaller::SharedToken, body("e2", Some(3)))
            .expect("the shared token names anyone");
        assert_eq!(shared.employee.as_str(), "e2");
    }

    #[test]
    fn what_a_client_is_told_to_do_depends_on_whether_the_release_was_keyed() {
        assert!(still_publishing(true)
            .message
            .contains("same Idempotency-Key"));
        assert!(still_publishing(false).message.contains("do not repeat"));
        assert!(task_failed(true).message.contains("completes it"));
        assert!(task_failed(false).message.contains("another batch"));
        let in_progress = refused(IssueError::InProgress("k".into()), true);
        assert_eq!(in_progress.status, StatusCode::CONFLICT);
        assert_eq!(in_progress.retry_after_secs, Some(1));
    }
}
