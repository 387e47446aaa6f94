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
        super::routes::claim::claim,
        super::routes::release::create_coupons,
        super::routes::status::coupon_status,
        super::routes::purchase::purchase,
        super::routes::cancel::cancel_order,
        super::routes::campaign_end::end_campaign,
        super::routes::profile::put_profile,
        super::routes::health::healthz,
        super::routes::health::metrics_text,
        super::routes::health::openapi_json,
        super::console::console_page,
        super::console::console_script,
        super::console::pool,
        super::console::batches,
        super::console::campaigns,
        super::console::blacklist_list,
        super::console::blacklist_add,
        super::console::blacklist_remove,
        super::console::analytics_claims,
        super::console::analytics_funnel,
        super::console::analytics_export,
    ),
    components(schemas(ErrorBody, ErrorCode)),
    modifiers(&BearerTokens, &Limits),
    tags(
        (name = "storefront", description = "Claims, purchases and coupon look-ups (COUPON_API_TOKEN, when set)"),
        (name = "employees", description = "Releasing coupons and ending campaigns (COUPON_ADMIN_TOKEN)"),
        (name = "operations", description = "Health, metrics and this document"),
        (name = "console", description = "The web console (`/console`) and the admin routes it calls: the pool, batches, the blacklist, analytics (COUPON_ADMIN_TOKEN)"),
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
                        "`Authorization: Bearer <token>`: an employee's own token (from the \
                         server's COUPON_EMPLOYEE_TOKENS), an employee's OIDC token (a JWT the \
                         server verifies against COUPON_OIDC_JWKS, COUPON_OIDC_ISSUER and \
                         COUPON_OIDC_AUDIENCE), or the shared COUPON_ADMIN_TOKEN (legacy: it \
                         names no employee). The employee of a per-employee token is the one a \
                         release and a blacklist change are recorded under. With none of them \
                         configured the admin routes are closed",
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
                error(serde_json::json!({"error": "overloaded", "message": "the gateway is overloaded (too many requests in flight); retry later"})),
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
            for operation in [&mut item.get, &mut item.post, &mut item.delete]
                .into_iter()
                .flatten()
            {
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

/// A coupon code in a path: 13 Crockford base32 symbols (the first at most
/// `7`: the id's top bit is reserved), any number of hyphens; lower case and
/// `I`/`L`/`O` are forgiven (`coupon_domain::CouponCode::parse`).
pub const PATH_CODE_PATTERN: &str =
    "^-*[0-7IiLlOo](-*[0-9A-HJKMNP-TV-Za-hjkmnp-tv-zIiLlOo]){12}-*$";

/// An `Idempotency-Key`: visible ASCII (`crate::issue::IdempotencyKey`).
pub const IDEMPOTENCY_KEY_PATTERN: &str = "^[!-~]{1,128}$";

/// Puts each pattern in place of its placeholder (`api::PATTERNS`), in
/// every schema of the document.
fn patterns(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(text) if key == "pattern" => {
                        if let Some((_, pattern)) =
                            super::api::PATTERNS.iter().find(|(name, _)| name == text)
                        {
                            *text = (*pattern).to_owned();
                        }
                    }
                    other => patterns(other),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(patterns),
        _ => {}
    }
}

/// What the derive cannot say, added to the JSON form of the document
/// (utoipa's builders have no setter for links' request bodies): the id
/// patterns (`api::PATTERNS`), the exact error codes of each status, the
/// constraints of the path and header parameters, and the links a client
/// follows (a granted claim's code into the purchase and the status route).
fn contract(doc: &mut serde_json::Value) {
    use serde_json::Value;
    patterns(doc);
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for operation in item.values_mut() {
            error_codes(operation);
            parameter_constraints(operation);
        }
        links(path, item);
    }
}

/// Error answers: `error` is one of the codes this status can carry here
/// (the examples name each of them).
fn error_codes(operation: &mut serde_json::Value) {
    use serde_json::{json, Value};
    for (status, response) in operation
        .get_mut("responses")
        .and_then(Value::as_object_mut)
        .into_iter()
        .flatten()
    {
        if !status.starts_with('4') && !status.starts_with('5') {
            continue;
        }
        let Some(content) = response.pointer_mut("/content/application~1json") else {
            continue;
        };
        if content.pointer("/schema/$ref") != Some(&json!("#/components/schemas/ErrorBody")) {
            continue;
        }
        let mut codes: Vec<Value> = Vec::new();
        if let Some(code) = content.pointer("/example/error") {
            codes.push(code.clone());
        }
        for example in content["examples"].as_object().into_iter().flatten() {
            if let Some(code) = example.1.pointer("/value/error") {
                codes.push(code.clone());
            }
        }
        // Every route is shed when the gateway is at MAX_IN_FLIGHT.
        if status == "503" && !codes.contains(&json!("overloaded")) {
            codes.push(json!("overloaded"));
        }
        if codes.is_empty() {
            continue;
        }
        content["schema"] = json!({
            "type": "object",
            "description": "The error body (`ErrorBody`) with the codes of this answer",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string", "enum": codes},
                "message": {"type": "string", "description": "For people: what went wrong and what to do."}
            }
        });
    }
}

/// The constraints of the path and header parameters.
fn parameter_constraints(operation: &mut serde_json::Value) {
    use serde_json::{json, Value};
    for parameter in operation
        .get_mut("parameters")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        match (parameter["in"].as_str(), parameter["name"].as_str()) {
            // Any value is accepted: one that does not match is
            // replaced by a generated id, so the pattern is told,
            // not a constraint.
            (Some("header"), Some("x-request-id")) => {
                parameter["description"] = json!(format!(
                    "{} Used when it matches `{}`; otherwise replaced by a generated id.",
                    parameter["description"].as_str().unwrap_or_default(),
                    super::api::REQUEST_ID_PATTERN
                ));
            }
            // Checked: anything else is `400`.
            (Some("header"), Some("Idempotency-Key")) => {
                parameter["schema"] = json!({
                    "type": "string",
                    "minLength": 1,
                    "maxLength": crate::issue::MAX_KEY_LEN,
                    "pattern": IDEMPOTENCY_KEY_PATTERN,
                });
            }
            (Some("path"), Some("code")) => {
                parameter["schema"] = json!({
                    "type": "string",
                    "pattern": PATH_CODE_PATTERN,
                });
            }
            _ => {}
        }
    }
}

/// The links a client follows: a granted claim's code into the purchase
/// and the status route, a redemption's into the status route.
fn links(path: &str, item: &mut serde_json::Map<String, serde_json::Value>) {
    use serde_json::json;
    if path == "/api/v1/coupon" {
        if let Some(granted) = item
            .get_mut("get")
            .and_then(|get| get.pointer_mut("/responses/200"))
        {
            granted["links"] = json!({
                "Purchase": {
                    "operationId": "purchase",
                    "description": "Buy the coupon just granted: the claim's `user_id` and `coupon_code` (and, for a fresh order, its request id as `order_id`).",
                    "requestBody": {
                        "user_id": "$response.body#/user_id",
                        "coupon_code": "$response.body#/coupon_code",
                        "order_id": "$response.header.x-request-id"
                    }
                },
                "CouponStatus": {
                    "operationId": "coupon_status",
                    "description": "Look the granted coupon up.",
                    "parameters": {"path.code": "$response.body#/coupon_code"}
                }
            });
        }
    }
    if path == "/api/v1/purchase" {
        if let Some(redeemed) = item
            .get_mut("post")
            .and_then(|post| post.pointer_mut("/responses/200"))
        {
            redeemed["links"] = json!({
                "CouponStatus": {
                    "operationId": "coupon_status",
                    "description": "Look the redeemed coupon up.",
                    "parameters": {"path.code": "$response.body#/coupon_code"}
                }
            });
        }
    }
}

/// The document as derived from the code, before [`contract`] adds to it.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as served (`null` only if serialising failed, which a
/// document of plain strings and maps does not).
pub fn document_json() -> serde_json::Value {
    let mut doc = serde_json::to_value(document()).unwrap_or(serde_json::Value::Null);
    contract(&mut doc);
    doc
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

    fn schema_of<'a>(doc: &'a serde_json::Value, pointer: &str) -> &'a serde_json::Value {
        doc.pointer(pointer)
            .unwrap_or_else(|| panic!("{pointer} is not in the document"))
    }

    /// Strings on both sides of every rule of the id parsers.
    fn probes() -> Vec<String> {
        let mut probes: Vec<String> = [
            "",
            "a",
            "user-42",
            "ユーザー",
            " a",
            "a ",
            "a b",
            "\ta",
            "a\n",
            "a\u{0}b",
            "a\u{7f}",
            "a\u{85}",
            "\u{85}a",
            "\u{a0}a",
            "a\u{a0}",
            "a\u{a0}b",
            "\u{3000}a",
            "a\u{2028}",
            "a\u{200b}",
            "a\u{9f}b",
            "\u{1680}",
            "x\u{202f}",
            "\u{205f}y",
            "é",
            "0",
            "-",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        for n in [63, 64, 65, 127, 128, 129] {
            probes.push("a".repeat(n));
            probes.push("ユ".repeat(n));
        }
        probes
    }

    fn agrees(pattern: &str, max: u64, min: u64, parse: impl Fn(&str) -> bool, what: &str) {
        let re = regex::Regex::new(pattern).expect("the pattern is a regex");
        for probe in probes() {
            let chars = probe.chars().count() as u64;
            let documented = re.is_match(&probe) && chars <= max && chars >= min;
            assert_eq!(
                documented,
                parse(&probe),
                "{what}: the document and the server disagree on {probe:?}"
            );
        }
    }

    /// Each documented constraint is exactly the server's rule: the strings
    /// the document allows are the ones the parsers accept.
    #[test]
    fn documented_constraints_are_the_parsers_rules() {
        use coupon_domain::{Category, CouponCode, EmployeeId, OrderId, UserId};
        let doc = document_json();
        let params = schema_of(&doc, "/paths/~1api~1v1~1coupon/get/parameters");
        let param = |name: &str| {
            params
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("parameter {name}"))["schema"]
                .clone()
        };
        let check = |schema: &serde_json::Value, parse: &dyn Fn(&str) -> bool, what: &str| {
            agrees(
                schema["pattern"].as_str().expect("a pattern"),
                schema["maxLength"].as_u64().unwrap_or(u64::MAX),
                schema["minLength"].as_u64().unwrap_or(0),
                parse,
                what,
            )
        };
        check(&param("id"), &|s| UserId::parse(s).is_ok(), "claim id");
        check(
            &param("category"),
            &|s| s.is_empty() || Category::parse(s).is_ok(),
            "claim category",
        );
        let purchase = schema_of(&doc, "/components/schemas/PurchaseBody/properties");
        check(
            &purchase["user_id"],
            &|s| UserId::parse(s).is_ok(),
            "purchase user_id",
        );
        check(
            &purchase["order_id"],
            &|s| OrderId::parse(s).is_ok(),
            "purchase order_id",
        );
        check(
            &purchase["coupon_code"],
            &|s| !s.is_empty() && s.chars().count() <= 64 && !s.chars().any(char::is_control),
            "purchase coupon_code",
        );
        let create = schema_of(&doc, "/components/schemas/CreateCoupons/properties");
        check(
            &create["id"],
            &|s| EmployeeId::parse(s).is_ok(),
            "employee id",
        );
        check(
            &create["category"],
            &|s| Category::parse(s).is_ok(),
            "category",
        );
        for (pattern, expected) in [
            (super::super::api::ID_PATTERN, &purchase["user_id"]),
            (super::super::api::OPTIONAL_ID_PATTERN, &param("category")),
            (super::super::api::CODE_PATTERN, &purchase["coupon_code"]),
        ] {
            assert_eq!(expected["pattern"], pattern);
        }
        // The status route's code.
        let code_param = schema_of(
            &doc,
            "/paths/~1api~1v1~1coupon~1{code}/get/parameters/0/schema",
        );
        let code = "0AN35HST00000";
        let mut codes: Vec<String> = vec![
            code.into(),
            code.to_lowercase(),
            "0AN3-5HST-0000-0".into(),
            "OAN35HST0000O".into(),
            "0an35hst0000l".into(),
            "FZZZZZZZZZZZZ".into(),
            "7ZZZZZZZZZZZZ".into(),
            "8ZZZZZZZZZZZZ".into(),
            "GZZZZZZZZZZZZ".into(),
            "0AN35HST0000".into(),
            "0AN35HST000000".into(),
            "0AN35HST0000U".into(),
            "0AN35HST0000!".into(),
            "-".into(),
            "".into(),
        ];
        codes.push(format!("-{code}-"));
        let re = regex::Regex::new(code_param["pattern"].as_str().unwrap()).unwrap();
        for probe in codes {
            assert_eq!(
                re.is_match(&probe),
                CouponCode::parse(&probe).is_ok(),
                "path code {probe:?}"
            );
        }
    }

    /// Every error answer names exactly the codes of its status, and the
    /// links lead from a granted claim to the purchase and the status route.
    #[test]
    fn errors_have_their_codes_and_claims_link_to_purchases() {
        let doc = document_json();
        let codes = |path: &str, method: &str, status: &str| -> Vec<String> {
            let pointer = format!(
                "/paths/{}/{method}/responses/{status}/content/application~1json/schema/properties/error/enum",
                path.replace('/', "~1")
            );
            schema_of(&doc, &pointer)
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect()
        };
        let mut conflicts = codes("/api/v1/purchase", "post", "409");
        conflicts.sort();
        assert_eq!(
            conflicts,
            [
                "already_redeemed",
                "currency_mismatch",
                "hold_expired",
                "not_holder",
                "order_below_minimum",
                "order_id_conflict",
                "order_total_required"
            ]
        );
        assert_eq!(codes("/api/v1/purchase", "post", "404"), ["unknown_coupon"]);
        assert_eq!(
            codes("/api/v1/coupon", "get", "429"),
            ["address_limited", "rate_limited"]
        );
        assert_eq!(
            codes("/api/v1/coupon", "get", "409"),
            ["request_id_conflict"]
        );
        assert_eq!(codes("/api/v1/coupon", "get", "404"), ["sold_out"]);
        assert_eq!(codes("/api/v1/coupon", "get", "403"), ["blacklisted"]);
        assert_eq!(codes("/api/v1/coupon", "get", "400"), ["invalid_request"]);
        assert_eq!(
            codes("/api/v1/coupon/{code}", "get", "503"),
            ["unavailable", "overloaded"]
        );
        assert_eq!(codes("/api/v1/coupon", "post", "504"), ["timeout"]);
        assert_eq!(
            codes("/api/v1/coupon", "post", "409"),
            ["idempotency_key_in_progress"]
        );
        assert_eq!(
            codes("/api/v1/coupon", "post", "422"),
            ["idempotency_key_reused", "invalid_campaign"]
        );
        assert_eq!(
            codes("/api/v1/coupon", "post", "403"),
            ["employee_mismatch"]
        );
        let key = doc
            .pointer("/paths/~1api~1v1~1coupon/post/parameters")
            .and_then(|p| p.as_array())
            .and_then(|p| p.iter().find(|p| p["name"] == "Idempotency-Key"))
            .expect("the Idempotency-Key header is documented");
        assert_eq!(key["in"], "header");
        assert_eq!(key["required"], false);
        let re = regex::Regex::new(key["schema"]["pattern"].as_str().unwrap()).unwrap();
        for probe in [
            "",
            "a",
            "a b",
            "é",
            "\u{7f}",
            &"k".repeat(128),
            &"k".repeat(129),
        ] {
            assert_eq!(
                re.is_match(probe),
                crate::issue::IdempotencyKey::parse(probe).is_ok(),
                "Idempotency-Key {probe:?}"
            );
        }
        // Nothing the edits did not mean to add (indexing adds `null`s).
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for key in ["parameters", "responses", "requestBody"] {
                    assert!(
                        op.get(key) != Some(&serde_json::Value::Null),
                        "{method} {path} {key} is null"
                    );
                }
            }
        }
        // No error answer is left with the open ErrorBody.
        let text = doc["paths"].to_string();
        assert!(
            !text.contains("#/components/schemas/ErrorBody"),
            "an error answer without its codes"
        );

        let links = schema_of(&doc, "/paths/~1api~1v1~1coupon/get/responses/200/links");
        assert_eq!(links["Purchase"]["operationId"], "purchase");
        assert_eq!(
            links["Purchase"]["requestBody"]["coupon_code"],
            "$response.body#/coupon_code"
        );
        assert_eq!(
            links["Purchase"]["requestBody"]["user_id"],
            "$response.body#/user_id"
        );
        assert_eq!(links["CouponStatus"]["operationId"], "coupon_status");
        assert_eq!(
            links["CouponStatus"]["parameters"]["path.code"],
            "$response.body#/coupon_code"
        );
        let ids: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .filter_map(|op| op["operationId"].as_str())
            .collect();
        assert!(
            ids.contains(&"purchase") && ids.contains(&"coupon_status"),
            "{ids:?}"
        );
    }
}
