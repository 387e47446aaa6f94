//! The OpenAPI document of the gateway, served at `GET /api/v1/openapi.json`.
//!
//! It is generated from the code: each handler's `#[utoipa::path]` attribute
//! (method, path, parameters, every status it can answer) and the body types
//! in `api.rs` and `error.rs`, which the handlers also use to build their
//! answers. The integration test `tests/it/openapi.rs` keeps it honest: it
//! compares the document with the router's route table in both directions
//! and checks real answers against it.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{ErrorBody, ErrorCode};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Coupon system HTTP API",
        description = "Claims and purchases become Kafka events; the gateway waits for their decision. \
Every error answer is `{\"error\": \"<code>\", \"message\": \"...\"}`."
    ),
    paths(
        super::claim,
        super::create_coupons,
        super::coupon_status,
        super::purchase,
        super::healthz,
        super::metrics_text,
        super::openapi_json,
    ),
    components(schemas(ErrorBody, ErrorCode)),
    modifiers(&BearerTokens, &Limits),
    tags(
        (name = "storefront", description = "Claims, purchases and coupon look-ups (COUPON_API_TOKEN, when set)"),
        (name = "employees", description = "Releasing coupons (COUPON_ADMIN_TOKEN)"),
        (name = "operations", description = "Health, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// The two bearer tokens. Declared here rather than per operation because
/// the derive has no syntax for security schemes.
struct BearerTokens;

impl Modify for BearerTokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`Authorization: Bearer <COUPON_API_TOKEN>`; required on the storefront \
                         routes only when the server sets COUPON_API_TOKEN",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`Authorization: Bearer <COUPON_ADMIN_TOKEN>`; without COUPON_ADMIN_TOKEN \
                         on the server the admin routes are closed",
                    ))
                    .build(),
            ),
        );
    }
}

/// The answers every route can give because of the gateway's limits
/// (`503` at the in-flight cap, `504` past the request deadline), added to
/// each operation that does not list them already.
struct Limits;

impl Modify for Limits {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::content::ContentBuilder;
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        use utoipa::openapi::{Ref, RefOr, ResponseBuilder};

        let error = |example: serde_json::Value| {
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .example(Some(example))
                .build()
        };
        let overloaded = ResponseBuilder::new()
            .description("The gateway is at its limit of requests in flight; retrying is safe.")
            .header(
                "Retry-After",
                HeaderBuilder::new()
                    .schema(ObjectBuilder::new().schema_type(Type::Integer))
                    .description(Some("Seconds to wait before retrying"))
                    .build(),
            )
            .content(
                "application/json",
                error(serde_json::json!({"error": "unavailable", "message": "the gateway is overloaded (too many requests in flight); retry later"})),
            )
            .build();
        let late = ResponseBuilder::new()
            .description("The request took longer than REQUEST_TIMEOUT; retrying is safe.")
            .content(
                "application/json",
                error(serde_json::json!({"error": "timeout", "message": "the request took longer than its deadline; retrying is safe"})),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
                let responses = &mut operation.responses.responses;
                responses
                    .entry("503".into())
                    .or_insert_with(|| RefOr::T(overloaded.clone()));
                responses
                    .entry("504".into())
                    .or_insert_with(|| RefOr::T(late.clone()));
            }
        }
    }
}

/// The document as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as JSON (`null` only if serialising failed, which a
/// document of plain strings and maps does not).
pub fn document_json() -> serde_json::Value {
    serde_json::to_value(document()).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_exactly_the_routes_of_the_router() {
        let doc = document_json();
        let mut documented = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
        let mut routed: Vec<(String, String)> = super::super::routes()
            .into_iter()
            .map(|r| (r.verb.as_str().to_owned(), r.path.to_owned()))
            .collect();
        documented.sort();
        routed.sort();
        assert_eq!(documented, routed);
        assert_eq!(
            doc["components"]["securitySchemes"]["api_token"]["scheme"],
            "bearer"
        );
    }
}
