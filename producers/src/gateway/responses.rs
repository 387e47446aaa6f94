//! The error answers several routes share, written once for the OpenAPI
//! document: a route lists the set (`responses(..., AdminUnauthorized)`)
//! instead of repeating its status, description and example. The codes and
//! messages are those `ApiError` sends (`error.rs`); `openapi::contract`
//! narrows each answer's `error` to the codes its examples name. The types
//! only carry the document: nothing constructs them.
#![allow(dead_code)]

use utoipa::IntoResponses;

use super::error::ErrorBody;

/// 401 on the operators' routes.
#[derive(IntoResponses)]
#[response(
    status = 401,
    description = "The bearer token is missing, is no employee's token, an OIDC token that does not verify (expired, another issuer or audience, an unknown key or a bad signature) nor COUPON_ADMIN_TOKEN; or the server has no admin credential configured.",
    example = json!({"error": "unauthorized", "message": "wrong admin token"})
)]
pub struct AdminUnauthorized(ErrorBody);

/// 401 on the storefront's routes.
#[derive(IntoResponses)]
#[response(
    status = 401,
    description = "COUPON_API_TOKEN is set and the bearer token is missing or wrong.",
    example = json!({"error": "unauthorized", "message": "wrong API token"})
)]
pub struct ApiUnauthorized(ErrorBody);

/// 429 of a storefront route on a gateway without `COUPON_API_TOKEN`.
#[derive(IntoResponses)]
#[response(
    status = 429,
    description = "On a gateway without COUPON_API_TOKEN: too many requests from this address.",
    headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
    example = json!({"error": "address_limited", "message": "too many requests from this address; slow down"})
)]
pub struct AddressLimited(ErrorBody);

/// 413 and 415: a JSON body refused before it is read.
#[derive(IntoResponses)]
pub enum BodyRefused {
    #[response(
        status = 413,
        description = "The body is larger than 64 KiB.",
        example = json!({"error": "payload_too_large", "message": "request body is larger than 64 KiB"})
    )]
    TooLarge(ErrorBody),
    #[response(
        status = 415,
        description = "The body is not sent as application/json.",
        example = json!({"error": "unsupported_media_type", "message": "send 'Content-Type: application/json'"})
    )]
    NotJson(ErrorBody),
}

/// 503 of a route that only reads Postgres.
#[derive(IntoResponses)]
#[response(
    status = 503,
    description = "Postgres is not available, or the gateway is at its limit of requests in flight.",
    headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
    example = json!({"error": "unavailable", "message": "the coupon store is not available; retrying is safe"})
)]
pub struct StoreUnavailable(ErrorBody);

/// 503 of a blacklist change (Postgres; the log follows the commit).
#[derive(IntoResponses)]
#[response(
    status = 503,
    description = "Postgres is not available (nothing was changed), or the gateway is at its limit of requests in flight. A change made while the broker is away is answered 200 and reaches the log later.",
    headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
    example = json!({"error": "unavailable", "message": "the blacklist could not be changed; retrying is safe"})
)]
pub struct BlacklistUnavailable(ErrorBody);
