//! The operational routes: `GET /healthz` (liveness and readiness: Postgres
//! decides, Redis only degrades), `GET /metrics` (Prometheus text) and
//! `GET /api/v1/openapi.json` (the document the route table is checked
//! against).

use std::sync::{Arc, LazyLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use coupon_platform::store;

use crate::gateway::api::{Health, HealthState};
use crate::gateway::openapi;
use crate::gateway::GatewayState;

/// Liveness and readiness.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses(
        (status = 200, description = "Serving (`degraded`: Redis is down, answers stay correct).", body = Health),
        (status = 503, description = "Postgres is not available.", body = Health),
    )
)]
pub(in crate::gateway) async fn healthz(State(state): State<Arc<GatewayState>>) -> Response {
    let postgres = store::ping(&state.pool).await;
    let redis = state.cache.ping().await.is_ok();
    let (status, health) = health_of(postgres, redis);
    (
        status,
        Json(Health {
            status: health,
            postgres,
            redis,
            waiting_requests: state.replies.waiting(),
        }),
    )
        .into_response()
}

/// What the gateway reports for the stores it reached. Postgres decides:
/// without it nothing can be decided. Redis is a cache: without it every
/// answer stays correct, only slower (`degraded`, still `200`, so a load
/// balancer keeps the instance).
fn health_of(postgres: bool, redis: bool) -> (StatusCode, HealthState) {
    match (postgres, redis) {
        (true, true) => (StatusCode::OK, HealthState::Ok),
        (true, false) => (StatusCode::OK, HealthState::Degraded),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, HealthState::Unavailable),
    }
}

/// Prometheus metrics of this process.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format (version 0.0.4).", body = String, content_type = "text/plain"),
    )
)]
pub(in crate::gateway) async fn metrics_text(State(state): State<Arc<GatewayState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI description of this API.", body = Object, content_type = "application/json"),
    )
)]
pub(in crate::gateway) async fn openapi_json() -> Response {
    static DOCUMENT: LazyLock<serde_json::Value> = LazyLock::new(openapi::document_json);
    Json(&*DOCUMENT).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_decides_readiness_and_redis_only_degrades() {
        assert!(matches!(
            health_of(true, true),
            (StatusCode::OK, HealthState::Ok)
        ));
        assert!(matches!(
            health_of(true, false),
            (StatusCode::OK, HealthState::Degraded)
        ));
        for redis in [true, false] {
            assert!(matches!(
                health_of(false, redis),
                (StatusCode::SERVICE_UNAVAILABLE, HealthState::Unavailable)
            ));
        }
    }

    #[tokio::test]
    async fn the_openapi_document_is_served_as_json_with_every_route() {
        let response = openapi_json().await;
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .expect("body");
        let document: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
        for route in crate::gateway::routes() {
            let verb = route.verb.as_str().to_ascii_lowercase();
            assert!(
                document["paths"][route.path][&verb].is_object(),
                "{} {} is not in the document",
                route.verb.as_str(),
                route.path
            );
        }
    }
}
