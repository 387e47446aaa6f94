//! Hostile HTTP input: malformed, oversized, slow and contradictory
//! requests get a JSON error (`{error, message}`) and never a 5xx.

use std::time::Duration;

use serde_json::{json, Value};

use couponctl::app::Role;

use coupon_test_support::harness::{assert_invariants, release, TestEnv};

/// Checks one HTTP answer: never a 5xx, and every 4xx is the JSON error shape.
async fn answer(label: &str, response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = response.bytes().await.unwrap_or_default();
    assert!(
        status < 500,
        "{label}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if status >= 400 {
        assert!(
            content_type.starts_with("application/json"),
            "{label}: {status} with content type {content_type:?}: {}",
            String::from_utf8_lossy(&bytes)
        );
        assert!(
            body["error"].is_string() && body["message"].is_string(),
            "{label}: {status} body is not {{error, message}}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_input_gets_json_errors_and_never_a_5xx() {
    let env = TestEnv::new().await;
    let app = env
        .start(
            &[Role::Gateway, Role::Coupons, Role::Claims, Role::Purchases],
            |c| {
                c.gateway.api_token = Some("store-token".into());
                c.gateway.reply_timeout = Duration::from_secs(10);
            },
        )
        .await;
    release(&env, "Hostile", 50).await;
    let http = TestEnv::http_client();
    let url = |path: &str| app.url(path);
    let store = |request: reqwest::RequestBuilder| request.bearer_auth("store-token");
    let admin = |request: reqwest::RequestBuilder| request.bearer_auth("admin-secret");
    macro_rules! expect {
        ($label:expr, $request:expr, $status:expr) => {{
            let label = $label;
            let response = $request
                .send()
                .await
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let (status, body) = answer(&label, response).await;
            assert_eq!(status, $status, "{label}: {body}");
            body
        }};
    }

    // Routes and methods.
    for path in [
        "/nope",
        "/api/v2/coupon",
        "/api/v1/coupon/A/B",
        "/api/v1/",
        "/%FF",
    ] {
        let body = expect!(format!("GET {path}"), store(http.get(url(path))), 404);
        assert_eq!(body["error"], "not_found");
    }
    for (method, path) in [
        (reqwest::Method::DELETE, "/api/v1/coupon"),
        (reqwest::Method::PUT, "/api/v1/purchase"),
        (reqwest::Method::GET, "/api/v1/purchase"),
        (reqwest::Method::POST, "/healthz"),
        (reqwest::Method::PATCH, "/api/v1/coupon/0000000000000"),
    ] {
        let body = expect!(
            format!("{method} {path}"),
            store(http.request(method.clone(), url(path))),
            405
        );
        assert_eq!(body["error"], "method_not_allowed");
    }

    // Tokens: storefront routes (COUPON_API_TOKEN is set) and admin routes.
    let purchase_body = json!({"user_id": "u", "coupon_code": "0000000000000", "order_id": "o"});
    let create_body = json!({"id": "e-hostile", "category": "Hostile", "count": 1});
    let no_token: [(&str, reqwest::RequestBuilder); 4] = [
        ("claim", http.get(url("/api/v1/coupon?id=anon"))),
        (
            "purchase",
            http.post(url("/api/v1/purchase")).json(&purchase_body),
        ),
        ("status", http.get(url("/api/v1/coupon/0000000000000"))),
        (
            "create",
            http.post(url("/api/v1/coupon")).json(&create_body),
        ),
    ];
    for (label, request) in no_token {
        let body = expect!(format!("{label} without a token"), request, 401);
        assert_eq!(body["error"], "unauthorized");
    }
    let bad_headers: [&[u8]; 6] = [
        b"Bearer wrong",
        b"Bearer ",
        b"Basic c3RvcmUtdG9rZW4=",
        b"Bearer store-token-and-more",
        b"Bearer  store-token",
        b"Bearer store-\xfftoken",
    ];
    for header in bad_headers {
        let value = reqwest::header::HeaderValue::from_bytes(header).expect("header value");
        let label = String::from_utf8_lossy(header).to_string();
        expect!(
            format!("claim with {label:?}"),
            http.get(url("/api/v1/coupon?id=anon"))
                .header(reqwest::header::AUTHORIZATION, value.clone()),
            401
        );
        expect!(
            format!("create with {label:?}"),
            http.post(url("/api/v1/coupon"))
                .header(reqwest::header::AUTHORIZATION, value)
                .json(&create_body),
            401
        );
    }
    expect!(
        "create with the storefront token",
        store(http.post(url("/api/v1/coupon"))).json(&create_body),
        401
    );

    // Oversized bodies: 413, also without a Content-Length.
    let filler = "x".repeat(70 * 1024);
    let big = json!({"user_id": filler, "coupon_code": "0000000000000", "order_id": "o"});
    let body = expect!(
        "70 KiB purchase",
        store(http.post(url("/api/v1/purchase"))).json(&big),
        413
    );
    assert_eq!(body["error"], "payload_too_large");
    expect!(
        "70 KiB create",
        admin(http.post(url("/api/v1/coupon"))).json(&json!({"id": filler, "category": "c"})),
        413
    );
    let addr = app.http.expect("gateway");
    let mut chunk = format!("{:x}\r\n", 8 * 1024).into_bytes();
    chunk.extend(std::iter::repeat_n(b' ', 8 * 1024));
    chunk.extend(b"\r\n");
    let mut parts = vec![format!(
        "POST /api/v1/purchase HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer store-token\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()];
    parts.extend(std::iter::repeat_n(chunk, 20));
    parts.push(b"0\r\n\r\n".to_vec());
    let (status, content_type, body) = raw_exchange(addr, parts).await;
    assert_eq!(status, 413, "160 KiB chunked purchase: {body}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON body")["error"],
        "payload_too_large"
    );

    // Oversized query strings: refused as invalid ids, or by the HTTP parser.
    let long_id = "q".repeat(60 * 1024);
    expect!(
        "60 KiB user id",
        store(http.get(url(&format!("/api/v1/coupon?id={long_id}")))),
        400
    );
    let padding = "&pad=1".repeat(5_000);
    let response = store(http.get(url(&format!("/api/v1/coupon?id=padded{padding}"))))
        .send()
        .await
        .expect("padded query");
    answer("30 KiB of extra parameters", response).await;
    let request_line = format!(
        "GET /api/v1/coupon?id={} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer store-token\r\n\
         Connection: close\r\n\r\n",
        "q".repeat(70 * 1024)
    );
    let (status, _, _) = raw_exchange(addr, vec![request_line.into_bytes()]).await;
    // hyper answers a request line over 64 KiB itself, before any handler
    // runs (414, empty body); only the status can be checked.
    assert_eq!(status, 414);
    for query in ["?id=a&id=b", "?id[]=x", "?category=Hostile", "?id=%ZZ"] {
        let (status, _) = answer(
            query,
            store(http.get(url(&format!("/api/v1/coupon{query}"))))
                .send()
                .await
                .expect(query),
        )
        .await;
        assert!(matches!(status, 200 | 400 | 404), "{query}: {status}");
    }

    // Invalid JSON and wrong types.
    let nested = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let malformed: [(&str, String); 7] = [
        ("truncated JSON", "{\"user_id\":".into()),
        ("array", "[]".into()),
        ("null", "null".into()),
        ("string", "\"purchase\"".into()),
        ("deeply nested", nested),
        (
            "numbers for strings",
            json!({"user_id": 1, "coupon_code": 2, "order_id": 3}).to_string(),
        ),
        (
            "not UTF-8",
            String::from_utf8_lossy(b"{\"user_id\": \"\xff\"}").into_owned(),
        ),
    ];
    for (label, text) in malformed {
        let body = expect!(
            label,
            store(http.post(url("/api/v1/purchase")))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(text),
            400
        );
        assert_eq!(body["error"], "invalid_request");
    }
    expect!(
        "raw invalid UTF-8",
        store(http.post(url("/api/v1/purchase")))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(
                b"{\"user_id\": \"\xff\xfe\", \"coupon_code\": \"x\", \"order_id\": \"o\"}"
                    .to_vec()
            ),
        400
    );
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut request = store(http.post(url("/api/v1/purchase"))).body(purchase_body.to_string());
        if let Some(content_type) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        let body = expect!(format!("content type {content_type:?}"), request, 415);
        assert_eq!(body["error"], "unsupported_media_type");
    }
    for count in [
        json!(0),
        json!(-1),
        json!(1e100),
        json!("ten"),
        json!(100_001),
    ] {
        expect!(
            format!("count {count}"),
            admin(http.post(url("/api/v1/coupon")))
                .json(&json!({"id": "e", "category": "c", "count": count})),
            400
        );
    }

    // Unicode tricks: legal ids or clean refusals, never a 5xx.
    let tricky = [
        "\u{202E}resu-lieve",
        "zero\u{200B}width",
        "\u{200B}",
        "e\u{0301}\u{0302}\u{0303}\u{0304}\u{0305}\u{0306}\u{0307}\u{0308}",
        "\u{FEFF}bom",
        "مستخدم",
        "👩‍👩‍👧‍👦",
        "\u{0000}",
        "\u{0085}next-line",
        "\u{2028}separator",
        "a\u{E000}private",
        " ",
    ];
    for (i, id) in tricky.iter().enumerate() {
        let encoded: String = url_encode(id);
        let (status, body) = answer(
            &format!("claim by {id:?}"),
            store(http.get(url(&format!("/api/v1/coupon?id={encoded}"))))
                .send()
                .await
                .expect("claim"),
        )
        .await;
        assert!(matches!(status, 200 | 400 | 404), "{id:?}: {status} {body}");
        if status == 200 {
            assert_eq!(body["user_id"], *id, "the id comes back unchanged");
        }
        let (status, _) = answer(
            &format!("purchase by {id:?}"),
            store(http.post(url("/api/v1/purchase")))
                .json(&json!({"user_id": id, "coupon_code": "0000000000000", "order_id": format!("{id}-{i}")}))
                .send()
                .await
                .expect("purchase"),
        )
        .await;
        assert!(matches!(status, 400 | 404), "{id:?}: {status}");
        let (status, _) = answer(
            &format!("status of {id:?}"),
            store(http.get(url(&format!("/api/v1/coupon/{encoded}"))))
                .send()
                .await
                .expect("status"),
        )
        .await;
        assert!(matches!(status, 400 | 404), "{id:?}: {status}");
    }
    for path in [
        "/api/v1/coupon/%FF%FE",
        "/api/v1/coupon/%00",
        "/api/v1/coupon/%E2%80%AE0000",
    ] {
        expect!(format!("GET {path}"), store(http.get(url(path))), 400);
    }

    // A client-chosen request id must not reveal another user's decision.
    let (status, first) = answer(
        "claim by victim",
        store(http.get(url("/api/v1/coupon?id=victim")))
            .header("x-request-id", "shared-request-id")
            .send()
            .await
            .expect("victim"),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = answer(
        "claim by thief with the victim's request id",
        store(http.get(url("/api/v1/coupon?id=thief")))
            .header("x-request-id", "shared-request-id")
            .send()
            .await
            .expect("thief"),
    )
    .await;
    assert_ne!(
        second["coupon_code"], first["coupon_code"],
        "the thief got the victim's coupon ({status})"
    );
    assert_eq!(status, 409, "{second}");
    assert_eq!(second["error"], "request_id_conflict");

    // After all that, the gateway still serves ordinary requests.
    let body = expect!(
        "ordinary claim",
        store(http.get(url("/api/v1/coupon?id=regular"))),
        200
    );
    assert!(body["coupon_code"].is_string());
    assert_invariants(&env, 50).await;
    app.stop().await;
}

/// Sends `parts` over a plain socket, one after the other (the server may
/// answer and close before reading them all), and returns the status, the
/// content type and the body of the answer. For requests an HTTP client
/// refuses to send: over-long request lines, chunked bodies without a length.
async fn raw_exchange(addr: std::net::SocketAddr, parts: Vec<Vec<u8>>) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    for part in parts {
        if socket.write_all(&part).await.is_err() {
            break;
        }
    }
    let mut response = Vec::new();
    let _ = socket.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {:?}", &head[..head.len().min(200)]));
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

fn url_encode(raw: &str) -> String {
    raw.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
