//! The OpenAPI document against the running gateway (the real binary):
//!
//! - the document's (method, path) pairs are exactly the router's route table
//!   (`coupon_producers::gateway::routes`), in both directions, and a
//!   documented path answers every undocumented method with `405`;
//! - every documented operation is called for real — with the document's own
//!   examples, without and with a wrong token, with a broken body or query —
//!   and each answer's status must be one the document lists for it, its
//!   body must match the documented schema (no undocumented field), its error
//!   code must be one the document gives for that status, and documented
//!   headers must be there;
//! - every operation's success status is seen at least once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{eventually, free_port, Child, TestEnv};

const API_TOKEN: &str = "api-secret";
const ADMIN_TOKEN: &str = "admin-secret";
const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// Follows a local `$ref` (`#/components/schemas/X`).
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.trim_start_matches('#');
            resolve(doc, doc.pointer(pointer).unwrap_or(&Value::Null))
        }
        None => schema,
    }
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "null" => value.is_null(),
        _ => false,
    }
}

/// A JSON Schema check of the subset utoipa emits; objects are strict: a
/// field the document does not list is an error.
fn check_schema(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check_schema(doc, s, value, at)?;
        }
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(any) = schema.get(key).and_then(Value::as_array) {
            if !any.iter().any(|s| check_schema(doc, s, value, at).is_ok()) {
                return Err(format!("{at}: {value} matches none of {key} {any:?}"));
            }
        }
    }
    match schema.get("type") {
        Some(Value::String(t)) if !type_matches(t, value) => {
            return Err(format!("{at}: {value} is not a {t}"));
        }
        Some(Value::Array(types))
            if !types
                .iter()
                .any(|t| t.as_str().is_some_and(|t| type_matches(t, value))) =>
        {
            return Err(format!("{at}: {value} is none of {types:?}"));
        }
        _ => {}
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            return Err(format!("{at}: {value} is not one of {options:?}"));
        }
    }
    if let (Some(object), Some(properties)) = (
        value.as_object(),
        schema.get("properties").and_then(Value::as_object),
    ) {
        for required in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(required) {
                return Err(format!("{at}: required field {required} missing"));
            }
        }
        for (key, field) in object {
            let Some(field_schema) = properties.get(key) else {
                return Err(format!("{at}: field {key} is not in the document"));
            };
            check_schema(doc, field_schema, field, &format!("{at}.{key}"))?;
        }
    }
    if let (Some(items), Some(schema)) = (value.as_array(), schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            check_schema(doc, schema, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// An example object for a request body schema, from its fields' examples.
fn example_body(doc: &Value, schema: &Value) -> Value {
    let schema = resolve(doc, schema);
    let mut body = serde_json::Map::new();
    for (key, field) in schema["properties"].as_object().into_iter().flatten() {
        let field = resolve(doc, field);
        if let Some(example) = field.get("example").or_else(|| field.get("examples")) {
            let example = match example {
                Value::Array(list) => list.first().cloned().unwrap_or(Value::Null),
                other => other.clone(),
            };
            body.insert(key.clone(), example);
        }
    }
    Value::Object(body)
}

/// Replaces the document's example values by live ones (e.g. the example
/// coupon code by a coupon this test was granted).
fn substitute(text: &str, live: &BTreeMap<String, String>) -> String {
    live.get(text).cloned().unwrap_or_else(|| text.to_owned())
}

fn substitute_json(value: &Value, live: &BTreeMap<String, String>) -> Value {
    match value {
        Value::String(s) => Value::String(substitute(s, live)),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), substitute_json(v, live)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// One request built from the document.
#[derive(Debug, Clone)]
struct Call {
    what: &'static str,
    path: String,
    query: Vec<(String, String)>,
    token: Option<&'static str>,
    content_type: Option<&'static str>,
    body: Option<Vec<u8>>,
}

struct Operation {
    method: String,
    path: String,
    spec: Value,
}

impl Operation {
    fn label(&self) -> String {
        format!("{} {}", self.method.to_uppercase(), self.path)
    }

    fn security_token(&self) -> Option<&'static str> {
        let requirements = self.spec.get("security")?.as_array()?;
        let names: BTreeSet<&str> = requirements
            .iter()
            .filter_map(Value::as_object)
            .flat_map(|r| r.keys().map(String::as_str))
            .collect();
        if names.contains("admin_token") {
            Some(ADMIN_TOKEN)
        } else if names.contains("api_token") {
            Some(API_TOKEN)
        } else {
            None
        }
    }

    fn parameters(&self, location: &str) -> Vec<&Value> {
        self.spec["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == location)
            .collect()
    }

    fn body_schema(&self) -> Option<&Value> {
        self.spec
            .pointer("/requestBody/content/application~1json/schema")
    }

    /// The request the document's examples describe, with live values.
    fn valid_call(&self, doc: &Value, live: &BTreeMap<String, String>) -> Call {
        let mut path = self.path.clone();
        for p in self.parameters("path") {
            let name = p["name"].as_str().unwrap_or_default();
            let example = p["example"].as_str().unwrap_or("x");
            path = path.replace(&format!("{{{name}}}"), &substitute(example, live));
        }
        let query = self
            .parameters("query")
            .into_iter()
            .filter(|p| p["required"] == true)
            .map(|p| {
                let example = p["example"].as_str().unwrap_or("x");
                (
                    p["name"].as_str().unwrap_or_default().to_owned(),
                    substitute(example, live),
                )
            })
            .collect();
        let body = self.body_schema().map(|schema| {
            serde_json::to_vec(&substitute_json(&example_body(doc, schema), live))
                .expect("encode body")
        });
        Call {
            what: "the document's example",
            path,
            query,
            token: self.security_token(),
            content_type: body.as_ref().map(|_| "application/json"),
            body,
        }
    }

    /// Requests that must be refused, each in a documented way.
    fn bad_calls(&self, valid: &Call) -> Vec<Call> {
        let mut calls = Vec::new();
        if valid.token.is_some() {
            calls.push(Call {
                what: "no token",
                token: None,
                ..valid.clone()
            });
            calls.push(Call {
                what: "a wrong token",
                token: Some("wrong"),
                ..valid.clone()
            });
        }
        if !valid.query.is_empty() {
            calls.push(Call {
                what: "no query",
                query: Vec::new(),
                ..valid.clone()
            });
        }
        if !self.parameters("path").is_empty() {
            let mut path = self.path.clone();
            for p in self.parameters("path") {
                let name = p["name"].as_str().unwrap_or_default();
                path = path.replace(&format!("{{{name}}}"), "not-a-code!");
            }
            calls.push(Call {
                what: "a bad path parameter",
                path,
                ..valid.clone()
            });
        }
        if valid.body.is_some() {
            calls.push(Call {
                what: "a body that is not JSON",
                body: Some(b"{not json".to_vec()),
                ..valid.clone()
            });
            calls.push(Call {
                what: "an empty JSON object",
                body: Some(b"{}".to_vec()),
                ..valid.clone()
            });
            calls.push(Call {
                what: "a text/plain body",
                content_type: Some("text/plain"),
                ..valid.clone()
            });
            calls.push(Call {
                what: "a 70 KiB body",
                body: Some(serde_json::to_vec(&json!({"padding": "x".repeat(70 * 1024)})).unwrap()),
                ..valid.clone()
            });
        }
        calls
    }
}

struct Answer {
    status: u16,
    content_type: String,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

async fn send(http: &reqwest::Client, base: &str, method: &str, call: &Call) -> Answer {
    let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
    let mut request = http
        .request(method, format!("{base}{}", call.path))
        .query(&call.query)
        .header("x-request-id", uuid::Uuid::new_v4().to_string());
    if let Some(token) = call.token {
        request = request.bearer_auth(token);
    }
    if let Some(content_type) = call.content_type {
        request = request.header("content-type", content_type);
    }
    if let Some(body) = &call.body {
        request = request.body(body.clone());
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.bytes().await.expect("body").to_vec();
    Answer {
        status,
        content_type,
        headers,
        body,
    }
}

/// Checks one answer against the operation's documented responses.
fn check_answer(doc: &Value, op: &Operation, call: &Call, answer: &Answer) -> Result<(), String> {
    let label = format!("{} with {}", op.label(), call.what);
    let status = answer.status.to_string();
    let Some(documented) = op.spec["responses"].get(&status) else {
        return Err(format!(
            "{label}: answered {status} ({}), which the document does not list (it lists {:?})",
            String::from_utf8_lossy(&answer.body),
            op.spec["responses"]
                .as_object()
                .map(|r| r.keys().collect::<Vec<_>>())
        ));
    };
    for header in documented["headers"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(h, _)| h)
    {
        if !answer.headers.contains_key(header.as_str()) {
            return Err(format!("{label}: documented header {header} missing"));
        }
    }
    let Some(content) = documented["content"].as_object() else {
        return Ok(());
    };
    let Some((media, spec)) = content
        .iter()
        .find(|(media, _)| answer.content_type.starts_with(media.as_str()))
    else {
        return Err(format!(
            "{label}: content type {:?} is not one of {:?}",
            answer.content_type,
            content.keys().collect::<Vec<_>>()
        ));
    };
    if media != "application/json" {
        return Ok(());
    }
    let value: Value = serde_json::from_slice(&answer.body)
        .map_err(|e| format!("{label}: body is not JSON: {e}"))?;
    check_schema(doc, &spec["schema"], &value, &format!("{label}: body"))?;
    // Error answers: the code must be one the document gives for this status.
    let mut codes: BTreeSet<String> = BTreeSet::new();
    if let Some(code) = spec.pointer("/example/error").and_then(Value::as_str) {
        codes.insert(code.to_owned());
    }
    for example in spec["examples"].as_object().into_iter().flatten() {
        if let Some(code) = example.1.pointer("/value/error").and_then(Value::as_str) {
            codes.insert(code.to_owned());
        }
    }
    if !codes.is_empty() {
        let code = value["error"].as_str().unwrap_or_default();
        if !codes.contains(code) {
            return Err(format!(
                "{label}: error code {code:?} is not documented for {status} (documented: {codes:?})"
            ));
        }
    }
    Ok(())
}

/// Visit order: the example user's profile first (the example release is
/// for adults in Germany), then releasing coupons, then claiming one, so
/// that the other operations can be called on a coupon that exists; a
/// purchase's cancellation last.
fn priority(op: &Operation) -> u8 {
    match (op.method.as_str(), op.path.as_str()) {
        ("put", "/api/v1/users/{id}") => 0,
        ("post", "/api/v1/coupon") => 1,
        ("get", "/api/v1/coupon") => 2,
        ("post", "/api/v1/purchase") => 4,
        // The example order is the one the purchase above redeemed.
        ("post", "/api/v1/purchase/{order_id}/cancel") => 5,
        _ => 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_running_gateway() {
    let env = TestEnv::new().await;
    let port = free_port();
    let mut child = Child::spawn_with(&env, &["run"], port, "openapi", |command| {
        command
            .env("COUPON_API_TOKEN", API_TOKEN)
            .env("REPLY_TIMEOUT", "30s");
    });
    let base = format!("http://127.0.0.1:{port}");
    child.wait_healthy(&base, Duration::from_secs(60)).await;
    let http = TestEnv::http_client();

    let answer = http
        .get(format!("{base}/api/v1/openapi.json"))
        .send()
        .await
        .expect("fetch the document");
    assert_eq!(answer.status(), 200);
    let doc: Value = answer.json().await.expect("the document is JSON");
    assert!(doc["openapi"]
        .as_str()
        .unwrap_or_default()
        .starts_with("3."));
    for scheme in ["api_token", "admin_token"] {
        assert_eq!(
            doc["components"]["securitySchemes"][scheme]["scheme"], "bearer",
            "security scheme {scheme}"
        );
    }

    // The document and the router's route table, both ways.
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, spec) in item.as_object().expect("path item") {
            if METHODS.contains(&method.as_str()) {
                operations.push(Operation {
                    method: method.clone(),
                    path: path.clone(),
                    spec: spec.clone(),
                });
            }
        }
    }
    let documented: BTreeSet<(String, String)> = operations
        .iter()
        .map(|op| (op.method.to_uppercase(), op.path.clone()))
        .collect();
    let routed: BTreeSet<(String, String)> = coupon_producers::gateway::routes()
        .into_iter()
        .map(|r| (r.verb.as_str().to_owned(), r.path.to_owned()))
        .collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the document: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "the document names routes the router lacks: {unrouted:?}"
    );
    assert!(documented.len() >= 7, "{documented:?}");

    // The running router serves no method the document omits on its paths.
    let paths: BTreeSet<&String> = operations.iter().map(|op| &op.path).collect();
    for path in paths {
        let concrete = path.replace("{code}", "0AN35HST00000");
        for method in METHODS {
            if documented.contains(&(method.to_uppercase(), path.clone())) {
                continue;
            }
            let call = Call {
                what: "an undocumented method",
                path: concrete.clone(),
                query: Vec::new(),
                token: Some(API_TOKEN),
                content_type: None,
                body: None,
            };
            let answer = send(&http, &base, method, &call).await;
            assert_eq!(
                answer.status,
                405,
                "{} {path} is not documented but answered {}",
                method.to_uppercase(),
                answer.status
            );
            let body: Value = serde_json::from_slice(&answer.body).expect("405 body is JSON");
            assert_eq!(body["error"], "method_not_allowed");
            assert!(body["message"].is_string());
        }
    }

    // Every operation, for real.
    operations.sort_by_key(|op| (priority(op), op.path.clone(), op.method.clone()));
    let mut live: BTreeMap<String, String> = BTreeMap::new();
    let mut succeeded: BTreeSet<String> = BTreeSet::new();
    let mut failures = Vec::new();
    let mut calls_made = 0;
    for op in &operations {
        let valid = op.valid_call(&doc, &live);
        let mut calls = vec![valid.clone()];
        calls.extend(op.bad_calls(&valid));
        for call in &calls {
            let answer = send(&http, &base, &op.method, call).await;
            calls_made += 1;
            if let Err(failure) = check_answer(&doc, op, call, &answer) {
                failures.push(failure);
                continue;
            }
            if (200..300).contains(&answer.status) {
                succeeded.insert(op.label());
            }
            if call.what != "the document's example" || !(200..300).contains(&answer.status) {
                continue;
            }
            let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
            if op.label() == "POST /api/v1/coupon" {
                // From now on, the example campaign id means this batch's
                // (a campaign's id is its batch id).
                let batch = body["batch_id"].as_str().expect("batch id");
                live.insert(
                    "0b5d1c3e-8f7a-4d2b-9c6e-1a2b3c4d5e6f".into(),
                    batch.to_owned(),
                );
                // Wait until the released coupons can be claimed.
                let count = body["count"].as_i64().expect("count");
                eventually(
                    "the released coupons are projected",
                    Duration::from_secs(60),
                    || async { env.count("SELECT count(*) FROM coupons").await >= count },
                )
                .await;
            }
            if op.label() == "GET /api/v1/coupon" {
                // From now on, the example coupon code means the granted one.
                let code = body["coupon_code"].as_str().expect("granted code");
                live.insert("0AN35HST00000".into(), code.to_owned());
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let never: Vec<String> = operations
        .iter()
        .map(Operation::label)
        .filter(|label| !succeeded.contains(label))
        .collect();
    assert!(never.is_empty(), "never answered with success: {never:?}");
    assert!(calls_made >= 20, "{calls_made} calls");

    // A path nobody documents is the JSON 404.
    let answer = send(
        &http,
        &base,
        "get",
        &Call {
            what: "an unknown path",
            path: "/api/v1/nothing-here".into(),
            query: Vec::new(),
            token: None,
            content_type: None,
            body: None,
        },
    )
    .await;
    assert_eq!(answer.status, 404);
    child.kill_9().await;
}
