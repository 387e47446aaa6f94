//! An employee is who the credential says (issue #24, item 12): a release
//! is recorded under the employee of the caller's credential and a
//! blacklist change is authored by them, from a per-employee token file or
//! an OIDC token. The tests mint their own keys (P-256, generated at run
//! time) and tokens; nothing is shared with another test.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::EncodePrivateKey as _;
use serde_json::{json, Value};
use sha2::Digest as _;

use coupon_platform::kafka::decode;
use coupon_producers::gateway::employees::{
    EmployeeTokens, OidcSettings, OidcVerifier, SHARED_TOKEN_AUTHOR,
};
use coupon_producers::gateway::EmployeeAuth;
use coupon_schemas::{BlacklistChanged, CouponsCreated};
use couponctl::app::Role;

use crate::harness::{eventually, App, TestEnv};

const ISSUER: &str = "https://idp.test.example";
const AUDIENCE: &str = "couponctl-admin";

/// A file of this test's, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(env: &TestEnv, name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}-{name}", env.name));
        std::fs::write(&path, text).expect("write a test file");
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A P-256 signing key made now, with its JWK (`kid`).
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn generate(kid: &str) -> Self {
        let key = loop {
            if let Ok(key) = p256::ecdsa::SigningKey::from_slice(&rand::random::<[u8; 32]>()) {
                break key;
            }
        };
        let der = key.to_pkcs8_der().expect("pkcs8");
        let point = key.verifying_key().to_sec1_point(false);
        let bytes = point.as_bytes();
        assert_eq!(bytes.len(), 65, "an uncompressed P-256 point");
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        Self {
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ec_der(der.as_bytes()),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": b64(&bytes[1..33]), "y": b64(&bytes[33..65]),
            }),
        }
    }

    /// A token of these claims, signed with this key.
    fn token(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign a token")
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The claims of a good token for `employee`.
fn claims(employee: &str) -> Value {
    json!({"sub": employee, "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + 600})
}

fn oidc_settings() -> OidcSettings {
    OidcSettings {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        employee_claim: "sub".into(),
        leeway: Duration::from_secs(5),
    }
}

fn sha256_hex(token: &str) -> String {
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A gateway and the coupon projector with `auth` (and the harness's shared
/// admin token).
async fn start(env: &TestEnv, auth: EmployeeAuth) -> App {
    env.start(&[Role::Gateway, Role::Coupons], move |c| {
        c.gateway.employees = auth;
    })
    .await
}

async fn release(
    http: &reqwest::Client,
    app: &App,
    token: &str,
    employee: &str,
    category: &str,
) -> (u16, Value) {
    let response = http
        .post(app.url("/api/v1/coupon"))
        .bearer_auth(token)
        .json(&json!({"id": employee, "category": category, "count": 3}))
        .send()
        .await
        .expect("release request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The employees the `coupons.created` events of `category` name.
async fn released_by(env: &TestEnv, category: &str) -> Vec<String> {
    env.read_topic(&env.topics.created())
        .await
        .iter()
        .filter_map(|r| decode::<CouponsCreated>(r).ok())
        .filter(|e| e.category == category)
        .map(|e| e.employee_id)
        .collect()
}

/// The stored employee of every coupon of `category`, once `count` are
/// projected.
async fn stored_employees(env: &TestEnv, category: &str, count: i64) -> Vec<String> {
    eventually(
        "the released coupons are projected",
        Duration::from_secs(60),
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM coupons WHERE category = $1")
                .bind(category)
                .fetch_one(&env.pool)
                .await
                .expect("count coupons")
                == count
        },
    )
    .await;
    sqlx::query_scalar("SELECT DISTINCT employee_id FROM coupons WHERE category = $1")
        .bind(category)
        .fetch_all(&env.pool)
        .await
        .expect("employees of the coupons")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_employee_releases_as_themselves_and_not_as_another() {
    let env = TestEnv::new().await;
    let file = TempFile::new(
        &env,
        "tokens",
        &format!(
            "# employees\nalice sha256:{}\nbob\tbobs-plain-token\n",
            sha256_hex("alices-token")
        ),
    );
    let tokens = EmployeeTokens::from_file(&file.0).expect("the token file");
    let app = start(
        &env,
        EmployeeAuth {
            tokens: Some(Arc::new(tokens)),
            oidc: None,
        },
    )
    .await;
    let http = TestEnv::http_client();

    let (status, body) = release(&http, &app, "alices-token", "alice", "IdA").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["employee_id"], "alice");
    assert_eq!(stored_employees(&env, "IdA", 3).await, ["alice"]);
    assert!(released_by(&env, "IdA").await.iter().all(|e| e == "alice"));

    // Alice's credential naming Bob: refused, nothing minted.
    let (status, body) = release(&http, &app, "alices-token", "bob", "IdB").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "employee_mismatch");
    assert!(body["message"]
        .as_str()
        .is_some_and(|m| m.contains("alice")));
    // Bob's plain token works as Bob; a token that is no one's is 401.
    let (status, _) = release(&http, &app, "bobs-plain-token", "bob", "IdC").await;
    assert_eq!(status, 202);
    assert_eq!(stored_employees(&env, "IdC", 3).await, ["bob"]);
    let (status, body) = release(&http, &app, "alices-token-", "alice", "IdB").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "unauthorized");
    // A digest is not a token.
    let digest = format!("sha256:{}", sha256_hex("alices-token"));
    let (status, _) = release(&http, &app, &digest, "alice", "IdB").await;
    assert_eq!(status, 401);

    // The shared admin token is the legacy mode: the body names the employee.
    let (status, body) = release(&http, &app, "admin-secret", "carol", "IdD").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(stored_employees(&env, "IdD", 3).await, ["carol"]);

    assert!(
        released_by(&env, "IdB").await.is_empty(),
        "a refused release publishes nothing"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM coupons WHERE category = 'IdB'")
            .await,
        0
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oidc_token_names_the_employee_and_a_bad_one_is_401() {
    let env = TestEnv::new().await;
    let key = SigningKey::generate("k1");
    let other = SigningKey::generate("k1"); // same kid, another key
    let spare = SigningKey::generate("k2");
    let jwks = TempFile::new(
        &env,
        "jwks.json",
        &json!({"keys": [key.jwk, spare.jwk]}).to_string(),
    );
    let verifier = OidcVerifier::from_jwks_file(&jwks.0, oidc_settings()).expect("the JWKS");
    let app = start(
        &env,
        EmployeeAuth {
            tokens: None,
            oidc: Some(Arc::new(verifier)),
        },
    )
    .await;
    let http = TestEnv::http_client();

    let dana = key.token(&claims("dana"));
    let (status, body) = release(&http, &app, &dana, "dana", "OidcA").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(stored_employees(&env, "OidcA", 3).await, ["dana"]);
    assert!(released_by(&env, "OidcA").await.iter().all(|e| e == "dana"));
    // The second key of the set verifies its own tokens.
    let erin = spare.token(&claims("erin"));
    let (status, _) = release(&http, &app, &erin, "erin", "OidcE").await;
    assert_eq!(status, 202);

    let (status, body) = release(&http, &app, &dana, "mallory", "OidcB").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "employee_mismatch");

    let mut expired = claims("dana");
    expired["exp"] = json!(now() - 3_600);
    let mut wrong_audience = claims("dana");
    wrong_audience["aud"] = json!("another-service");
    let mut wrong_issuer = claims("dana");
    wrong_issuer["iss"] = json!("https://evil.example");
    let mut not_yet = claims("dana");
    not_yet["nbf"] = json!(now() + 3_600);
    let mut no_expiry = claims("dana");
    no_expiry.as_object_mut().unwrap().remove("exp");
    let mut no_employee = claims("dana");
    no_employee.as_object_mut().unwrap().remove("sub");
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": "k1"})),
        b64(&claims("dana"))
    );
    // HS256 "signed" with the public key's text: the classic confusion.
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some("k1".into());
    let hs256 = jsonwebtoken::encode(
        &hs_header,
        &claims("dana"),
        &EncodingKey::from_secret(key.jwk.to_string().as_bytes()).unwrap(),
    )
    .unwrap();
    let refused = [
        ("expired", key.token(&expired), "expired"),
        ("another key", other.token(&claims("dana")), "signature"),
        ("wrong audience", key.token(&wrong_audience), "audience"),
        ("wrong issuer", key.token(&wrong_issuer), "issuer"),
        ("not yet valid", key.token(&not_yet), "not valid yet"),
        ("no exp", key.token(&no_expiry), "lacks"),
        ("no sub", key.token(&no_employee), "claim"),
        ("alg none", unsigned, "refused"),
        ("HS256", hs256, "algorithm"),
    ];
    for (what, token, says) in refused {
        let (status, body) = release(&http, &app, &token, "dana", "OidcB").await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], "unauthorized", "{what}");
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains(says)),
            "{what}: {body}"
        );
    }
    // No admin token is configured here but the harness's; a JWT is not it.
    assert!(released_by(&env, "OidcB").await.is_empty());
    assert_eq!(
        env.count("SELECT count(*) FROM coupons WHERE category = 'OidcB'")
            .await,
        0
    );
    app.stop().await;
}

/// The `BlacklistChanged` events of `user`, in log order (one partition).
async fn blacklist_changes(env: &TestEnv, user: &str) -> Vec<BlacklistChanged> {
    let mut records = env.read_topic(&env.topics.blacklist()).await;
    records.sort_by_key(|r| r.offset);
    records
        .iter()
        .filter_map(|r| decode::<BlacklistChanged>(r).ok())
        .filter(|e| e.user_id == user)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blacklist_change_is_authored_by_the_credentials_employee() {
    let env = TestEnv::new().await;
    let key = SigningKey::generate("k1");
    let jwks = TempFile::new(&env, "jwks.json", &json!({"keys": [key.jwk]}).to_string());
    let file = TempFile::new(
        &env,
        "tokens",
        &format!("frank sha256:{}\n", sha256_hex("franks-token")),
    );
    let auth = EmployeeAuth {
        tokens: Some(Arc::new(EmployeeTokens::from_file(&file.0).unwrap())),
        oidc: Some(Arc::new(
            OidcVerifier::from_jwks_file(&jwks.0, oidc_settings()).unwrap(),
        )),
    };
    let app = start(&env, auth).await;
    let http = TestEnv::http_client();
    let user = format!("villain-{}", &env.name[env.name.len() - 6..]);

    let add = |token: String| {
        let http = http.clone();
        let url = app.url("/api/v1/blacklist");
        let user = user.clone();
        async move {
            let response = http
                .post(url)
                .bearer_auth(token)
                .json(&json!({"user_id": user, "reason": "fraud", "for_seconds": 3600}))
                .send()
                .await
                .expect("blacklist request");
            response.status().as_u16()
        }
    };
    let remove = |token: String| {
        let http = http.clone();
        let url = app.url(&format!("/api/v1/blacklist?user_id={user}"));
        async move {
            let response = http
                .delete(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("unblacklist request");
            response.status().as_u16()
        }
    };
    assert_eq!(add("franks-token".into()).await, 200);
    assert_eq!(remove(key.token(&claims("gina"))).await, 200);
    assert_eq!(add("admin-secret".into()).await, 200);
    let mut expired = claims("gina");
    expired["exp"] = json!(now() - 3_600);
    assert_eq!(remove(key.token(&expired)).await, 401);
    assert_eq!(add("nobodys-token".into()).await, 401);

    let changes = blacklist_changes(&env, &user).await;
    let authors: Vec<(&str, bool)> = changes
        .iter()
        .map(|e| (e.changed_by.as_str(), e.blacklisted))
        .collect();
    assert_eq!(
        authors,
        [
            ("frank", true),
            ("gina", false),
            (SHARED_TOKEN_AUTHOR, true)
        ],
        "one change per accepted call, by its credential's employee"
    );
    assert!(changes.iter().all(|e| e.source == "manual"));
    app.stop().await;

    // The CLI records the operator it is told (it is trusted as the
    // gateway is: it writes to Postgres and the broker itself).
    let output = env
        .couponctl()
        .args(["blacklist", "remove", &user, "--by", "hank"])
        .output()
        .expect("couponctl blacklist remove");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = blacklist_changes(&env, &user).await.pop().unwrap();
    assert_eq!(
        (last.changed_by.as_str(), last.blacklisted),
        ("hank", false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_identity_settings_are_refused_in_one_line_at_start() {
    let env = TestEnv::new().await;
    let bad_tokens = TempFile::new(&env, "bad-tokens", "alice sha256:12ab\n");
    let shared_tokens = TempFile::new(&env, "shared-tokens", "alice same-token\n");
    let secret_jwks = TempFile::new(
        &env,
        "secret-jwks.json",
        r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"s"}]}"#,
    );
    let good_jwks = TempFile::new(
        &env,
        "jwks.json",
        &json!({"keys": [SigningKey::generate("k1").jwk]}).to_string(),
    );
    let path = |f: &TempFile| f.0.display().to_string();
    let issuer = [
        ("COUPON_OIDC_ISSUER", ISSUER.to_owned()),
        ("COUPON_OIDC_AUDIENCE", AUDIENCE.to_owned()),
    ];
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("COUPON_EMPLOYEE_TOKENS", path(&bad_tokens))],
            "COUPON_EMPLOYEE_TOKENS",
        ),
        (
            vec![("COUPON_EMPLOYEE_TOKENS", "/nonexistent/tokens".into())],
            "COUPON_EMPLOYEE_TOKENS",
        ),
        (
            vec![
                ("COUPON_EMPLOYEE_TOKENS", path(&shared_tokens)),
                ("COUPON_API_TOKEN", "same-token".into()),
            ],
            "COUPON_API_TOKEN is employee",
        ),
        (
            [("COUPON_OIDC_JWKS", path(&secret_jwks))]
                .into_iter()
                .chain(issuer.clone())
                .collect(),
            "COUPON_OIDC_JWKS",
        ),
        (
            vec![
                ("COUPON_OIDC_JWKS", path(&good_jwks)),
                ("COUPON_OIDC_AUDIENCE", AUDIENCE.into()),
            ],
            "COUPON_OIDC_ISSUER",
        ),
    ];
    for (vars, expected) in cases {
        let mut command = env.couponctl();
        command.arg("gateway").env("HTTP_ADDR", "127.0.0.1:0");
        for (var, value) in &vars {
            command.env(var, value);
        }
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run couponctl");
        let started = std::time::Instant::now();
        while child.try_wait().expect("wait").is_none() {
            if started.elapsed() > Duration::from_secs(8) {
                let _ = child.kill();
                panic!("{vars:?} started instead of refusing");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = child.wait_with_output().expect("couponctl output");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_ne!(output.status.code(), Some(0), "{vars:?}");
        assert_eq!(lines.len(), 1, "{vars:?}: {stderr}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(expected),
            "{vars:?}: {stderr}"
        );
    }
}
