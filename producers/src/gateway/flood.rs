//! Flood control for claims: a user claiming faster than the limit is
//! blocked for a while, everywhere (Redis, Postgres, the blacklist topic).

use axum::http::StatusCode;
use chrono::Utc;

use coupon_domain::UserId;
use coupon_platform::redis::ClaimFacts;

use super::{ApiError, ErrorCode, GatewayState};

/// Flood control: more than `flood_limit_per_sec` claims in one second from
/// one user blocks that user for `flood_block` (Redis for the fast check,
/// Postgres so the claim processor refuses too, and the blacklist topic so a
/// rebuilt database does). Redis trouble disables the check rather than the
/// API.
///
/// `facts` is what the claim's one Redis round trip read
/// ([`coupon_platform::redis::Cache::claim_facts`], with the claim counted);
/// `None` when Redis did not answer.
pub(super) async fn flood_check(
    state: &GatewayState,
    user: &UserId,
    facts: Option<&ClaimFacts>,
) -> Result<(), ApiError> {
    let Some(facts) = facts else {
        tracing::debug!("flood check skipped: Redis did not answer");
        return Ok(());
    };
    if facts.fast_path.blocked {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Blacklisted,
            "this user is temporarily blocked for flooding",
        ));
    }
    let count = facts.claims_this_second.unwrap_or(0);
    if count > state.config.flood_limit_per_sec {
        let block = state.config.flood_block;
        let _ = state.cache.block(user, block).await;
        let until = Utc::now() + coupon_domain::clock::span(block);
        let blacklist = crate::blacklist::Blacklist {
            pool: &state.pool,
            publisher: &state.publisher,
            topics: &state.topics,
        };
        if let Err(error) = blacklist
            .add(
                user,
                Some(until),
                "flooding the gateway",
                crate::blacklist::Source::Automatic,
            )
            .await
        {
            tracing::warn!(%error, "could not record automatic blacklisting");
        }
        metrics::counter!("coupon_flood_blocks_total").increment(1);
        tracing::warn!(user = %user, count, "user blocked for flooding");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Blacklisted,
            "too many requests: this user is temporarily blocked",
        ));
    }
    Ok(())
}
