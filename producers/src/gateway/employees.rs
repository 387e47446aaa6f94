//! Who an admin call comes from: an employee, as their credential says.
//!
//! A release is recorded under an employee id and a blacklist change under
//! its author; both are only worth what the credential behind them is. So
//! the admin routes take three kinds of bearer token, and [`admission`]
//! resolves the one a request carries into an [`AdminCaller`] once, from the
//! headers, before the body is read; handlers take that identity (a request
//! extension) and never look at a token again.
//!
//! - **Per-employee tokens from a file** (COUPON_EMPLOYEE_TOKENS), the local
//!   default: one `employee_id sha256:<hex digest>` (or `employee_id token`)
//!   a line. Digests are preferred, so the file names who may call but holds
//!   no secret. A presented token is hashed and compared with every entry in
//!   constant time, as [`super::Secret`] does.
//! - **OIDC bearer tokens** (COUPON_OIDC_JWKS with COUPON_OIDC_ISSUER and
//!   COUPON_OIDC_AUDIENCE): JWTs signed by the identity provider, verified
//!   against the public keys of a JWKS file with `jsonwebtoken`. Only
//!   asymmetric algorithms (RS*, PS*, ES256/ES384, EdDSA) are accepted, the
//!   one the key allows; `exp`, `iss` and `aud` are required, `nbf` checked;
//!   the employee is a claim of the token (`sub` unless configured).
//! - **COUPON_ADMIN_TOKEN**, the shared operator token (legacy and
//!   development mode): whoever holds it is [`AdminCaller::SharedToken`],
//!   no one in particular. Its releases are recorded under the employee the
//!   body names, as before per-employee identities existed, and its
//!   blacklist changes under [`SHARED_TOKEN_AUTHOR`]. A deployment that wants
//!   every change attributed leaves it unset.
//!
//! A per-employee caller's release is recorded under the credential's
//! employee; a body naming someone else is refused (`403
//! employee_mismatch`) rather than silently rewritten, so a client that
//! believes it acts for another employee learns that it does not.
//!
//! [`admission`]: super::admission

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use coupon_domain::EmployeeId;

use super::auth::Secret;

/// The author recorded for a blacklist change made with COUPON_ADMIN_TOKEN
/// (which names no employee). Refused as an employee id in the token file.
pub const SHARED_TOKEN_AUTHOR: &str = "admin-token";

/// How an employee proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// A token of COUPON_EMPLOYEE_TOKENS.
    TokenFile,
    /// An OIDC bearer token verified against COUPON_OIDC_JWKS.
    Oidc,
}

/// Who an admin request comes from, as [`admission`](super::admission)
/// resolved it from the bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCaller {
    /// COUPON_ADMIN_TOKEN: the shared operator token (legacy, development).
    SharedToken,
    /// An employee, by their own credential.
    Employee(EmployeeId, Credential),
}

/// A release naming another employee than the caller's credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this credential is employee {caller:?}'s, but the release names employee {named:?}: \
     an employee releases under their own id only (send \"id\": {caller:?})"
)]
pub struct EmployeeMismatch {
    pub caller: String,
    pub named: String,
}

impl AdminCaller {
    /// Who a change this caller makes is recorded as made by.
    pub fn author(&self) -> EmployeeId {
        match self {
            AdminCaller::Employee(id, _) => id.clone(),
            AdminCaller::SharedToken => EmployeeId::parse(SHARED_TOKEN_AUTHOR)
                .unwrap_or_else(|_| unreachable!("a valid employee id")),
        }
    }

    /// The employee a release by this caller is recorded under, given the
    /// one its body names: the credential's own (the body must agree), or,
    /// for the shared token, the body's.
    pub fn release_employee(&self, named: EmployeeId) -> Result<EmployeeId, EmployeeMismatch> {
        match self {
            AdminCaller::SharedToken => Ok(named),
            AdminCaller::Employee(id, _) if *id == named => Ok(named),
            AdminCaller::Employee(id, _) => Err(EmployeeMismatch {
                caller: id.as_str().to_owned(),
                named: named.into_string(),
            }),
        }
    }
}

/// A configuration file of employee identities that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

/// The per-employee tokens of COUPON_EMPLOYEE_TOKENS, as SHA-256 digests.
pub struct EmployeeTokens {
    entries: Vec<([u8; 32], EmployeeId)>,
}

impl std::fmt::Debug for EmployeeTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EmployeeTokens({} employees)", self.entries.len())
    }
}

impl EmployeeTokens {
    /// Reads the file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, IdentityError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// One entry a line: `employee_id sha256:<64 hex digits>` or
    /// `employee_id <token>` (a tab or spaces between); blank lines and
    /// lines starting with `#` are skipped. Refuses an empty file, a bad
    /// employee id, a malformed digest and one token given to two entries.
    pub fn parse(text: &str, path: &str) -> Result<Self, IdentityError> {
        let mut entries: Vec<([u8; 32], EmployeeId)> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| IdentityError::Line {
                path: path.to_owned(),
                line: index + 1,
                reason,
            };
            let (id, token) = line
                .split_once([' ', '\t'])
                .map(|(id, token)| (id, token.trim()))
                .filter(|(_, token)| !token.is_empty())
                .ok_or_else(|| {
                    bad("expected `employee_id sha256:<hex digest>` or `employee_id token`".into())
                })?;
            let id = EmployeeId::parse(id).map_err(|e| bad(e.to_string()))?;
            if id.as_str() == SHARED_TOKEN_AUTHOR {
                return Err(bad(format!(
                    "{SHARED_TOKEN_AUTHOR:?} is reserved for changes made with COUPON_ADMIN_TOKEN"
                )));
            }
            let digest = match token.strip_prefix("sha256:") {
                Some(hex) => parse_digest(hex).ok_or_else(|| {
                    bad(
                        "a sha256: digest is 64 hexadecimal digits (`sha256sum` of the token)"
                            .into(),
                    )
                })?,
                None => Sha256::digest(token.as_bytes()).into(),
            };
            if let Some((_, other)) = entries.iter().find(|(d, _)| *d == digest) {
                return Err(bad(format!(
                    "this token is also employee {:?}'s: every employee needs a token of their own",
                    other.as_str()
                )));
            }
            entries.push((digest, id));
        }
        if entries.is_empty() {
            return Err(IdentityError::File {
                path: path.to_owned(),
                reason: "no employee token in it".into(),
            });
        }
        Ok(Self { entries })
    }

    /// The employee whose token `given` is. Every entry is compared, in
    /// constant time: the time taken says nothing of which one matched.
    pub fn find(&self, given: &str) -> Option<&EmployeeId> {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        let mut found = None;
        for (digest, id) in &self.entries {
            if bool::from(digest.ct_eq(&given)) {
                found = Some(id);
            }
        }
        found
    }

    /// The employee whose token `secret` is (for checking that the other
    /// tokens are not also employee tokens).
    pub fn holder_of(&self, secret: &Secret) -> Option<&EmployeeId> {
        self.find(secret.expose())
    }
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(digest)
}

/// What the OIDC verifier checks besides the signature.
#[derive(Debug, Clone)]
pub struct OidcSettings {
    /// The `iss` a token must carry (COUPON_OIDC_ISSUER).
    pub issuer: String,
    /// The `aud` a token must include (COUPON_OIDC_AUDIENCE).
    pub audience: String,
    /// The claim naming the employee (COUPON_OIDC_EMPLOYEE_CLAIM).
    pub employee_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

/// One verification key of the JWKS.
struct Key {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// Verifies employees' OIDC bearer tokens against the keys of a JWKS.
pub struct OidcVerifier {
    keys: Vec<Key>,
    settings: OidcSettings,
}

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("keys", &self.keys.len())
            .field("settings", &self.settings)
            .finish()
    }
}

/// Why a bearer token that looks like a JWT was refused; the text is for
/// the caller (it names no key and no secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl OidcVerifier {
    /// The JWKS file at `path`.
    pub fn from_jwks_file(path: &Path, settings: OidcSettings) -> Result<Self, IdentityError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_jwks(&text, settings).map_err(|reason| IdentityError::File {
            path: shown,
            reason,
        })
    }

    /// The JWKS `json` (`{"keys": [...]}`). Refuses symmetric keys (a JWKS
    /// publishes public keys; a shared secret would let anyone who reads it
    /// mint tokens), keys for another use than signatures, algorithms that
    /// are not asymmetric signatures, and several keys without a `kid`.
    pub fn from_jwks(json: &str, settings: OidcSettings) -> Result<Self, String> {
        if settings.issuer.trim().is_empty() || settings.audience.trim().is_empty() {
            return Err("an issuer and an audience are required".into());
        }
        let set: JwkSet = serde_json::from_str(json)
            .map_err(|e| format!("not a JWKS ({{\"keys\": [...]}}): {e}"))?;
        let mut keys = Vec::new();
        for (index, jwk) in set.keys.iter().enumerate() {
            let name = jwk
                .common
                .key_id
                .clone()
                .unwrap_or_else(|| format!("#{index}"));
            if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
                continue;
            }
            let family: Vec<Algorithm> = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => vec![
                    Algorithm::RS256,
                    Algorithm::RS384,
                    Algorithm::RS512,
                    Algorithm::PS256,
                    Algorithm::PS384,
                    Algorithm::PS512,
                ],
                AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                    EllipticCurve::P256 => vec![Algorithm::ES256],
                    EllipticCurve::P384 => vec![Algorithm::ES384],
                    _ => return Err(format!("key {name}: only the curves P-256 and P-384")),
                },
                AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
                AlgorithmParameters::OctetKey(_) => {
                    return Err(format!(
                        "key {name} is a symmetric (\"oct\") key: a JWKS holds public keys only"
                    ))
                }
                _ => return Err(format!("key {name}: unsupported key type")),
            };
            let algorithms = match jwk.common.key_algorithm {
                None => family,
                Some(named) => {
                    let alg = signing_algorithm(named)
                        .filter(|alg| family.contains(alg))
                        .ok_or_else(|| {
                            format!("key {name}: \"alg\" {named:?} is not a signature algorithm of this key")
                        })?;
                    vec![alg]
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {name}: {e}"))?;
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                algorithms,
                key,
            });
        }
        if keys.is_empty() {
            return Err("no signature key in it".into());
        }
        if keys.len() > 1 && keys.iter().any(|k| k.kid.is_none()) {
            return Err("with several keys, every key needs a \"kid\"".into());
        }
        Ok(Self { keys, settings })
    }

    /// The employee a token names, once its signature, algorithm, issuer,
    /// audience and validity period check out.
    pub fn verify(&self, token: &str) -> Result<EmployeeId, Refused> {
        let refused = |why: &str| Refused(format!("the bearer token was refused: {why}"));
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| refused("it is not a JWT signed with RS*, PS*, ES256, ES384 or EdDSA"))?;
        let key = match &header.kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
        .ok_or_else(|| refused("its key (kid) is not in COUPON_OIDC_JWKS"))?;
        if !key.algorithms.contains(&header.alg) {
            return Err(refused(&format!(
                "its algorithm {:?} is not one its key allows",
                header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.settings.leeway.as_secs();
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.key,
            &validation,
        )
        .map_err(|error| {
            use jsonwebtoken::errors::ErrorKind;
            refused(match error.kind() {
                ErrorKind::ExpiredSignature => "it has expired",
                ErrorKind::ImmatureSignature => "it is not valid yet (nbf)",
                ErrorKind::InvalidIssuer => "its issuer is not COUPON_OIDC_ISSUER",
                ErrorKind::InvalidAudience => "its audience is not COUPON_OIDC_AUDIENCE",
                ErrorKind::InvalidSignature => "its signature does not verify",
                ErrorKind::MissingRequiredClaim(_) => "it lacks one of exp, iss, aud",
                _ => "it is not a valid JWT for this server",
            })
        })?;
        let claim = &self.settings.employee_claim;
        let named = data
            .claims
            .get(claim)
            .and_then(|value| value.as_str())
            .ok_or_else(|| refused(&format!("it has no {claim:?} claim naming the employee")))?;
        EmployeeId::parse(named)
            .map_err(|e| refused(&format!("its {claim:?} claim is not an employee id: {e}")))
    }
}

/// The signature algorithm a JWK's `alg` names; `None` for the symmetric
/// and encryption ones.
fn signing_algorithm(named: KeyAlgorithm) -> Option<Algorithm> {
    Some(match named {
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Every way an admin call may prove who it is; the gateway's
/// configuration. None configured: the admin routes are closed.
#[derive(Debug, Clone, Default)]
pub struct EmployeeAuth {
    /// COUPON_EMPLOYEE_TOKENS.
    pub tokens: Option<Arc<EmployeeTokens>>,
    /// COUPON_OIDC_JWKS.
    pub oidc: Option<Arc<OidcVerifier>>,
}

impl EmployeeAuth {
    pub fn is_empty(&self) -> bool {
        self.tokens.is_none() && self.oidc.is_none()
    }

    /// Who `given` is: COUPON_ADMIN_TOKEN (`shared`), an employee of the
    /// token file, or the employee of a verified OIDC token. `Err` holds
    /// the reason for the caller.
    pub fn resolve(&self, shared: Option<&Secret>, given: &str) -> Result<AdminCaller, Refused> {
        if shared.is_some_and(|secret| secret.matches(given)) {
            return Ok(AdminCaller::SharedToken);
        }
        if let Some(id) = self.tokens.as_ref().and_then(|tokens| tokens.find(given)) {
            return Ok(AdminCaller::Employee(id.clone(), Credential::TokenFile));
        }
        if let Some(oidc) = &self.oidc {
            if looks_like_jwt(given) {
                return oidc
                    .verify(given)
                    .map(|id| AdminCaller::Employee(id, Credential::Oidc));
            }
        }
        Err(Refused("wrong admin token".into()))
    }
}

/// Three base64url parts separated by dots.
fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_hex(token: &str) -> String {
        Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn the_token_file_takes_digests_and_plain_tokens() {
        let text = format!(
            "# employees\n\nalice sha256:{}\nbob\tbobs-token\n",
            sha256_hex("alices-token")
        );
        let tokens = EmployeeTokens::parse(&text, "tokens").unwrap();
        assert_eq!(tokens.find("alices-token").unwrap().as_str(), "alice");
        assert_eq!(tokens.find("bobs-token").unwrap().as_str(), "bob");
        assert!(tokens.find("sha256:".to_owned().as_str()).is_none());
        assert!(tokens.find("").is_none());
        assert!(tokens.find("alices-token ").is_none());
        assert!(!format!("{tokens:?}").contains("token\""));
    }

    #[test]
    fn the_token_file_refuses_what_cannot_identify_one_employee() {
        let refused = |text: &str| EmployeeTokens::parse(text, "f").unwrap_err().to_string();
        assert!(refused("").contains("no employee token"));
        assert!(refused("alice\n").contains("line 1"));
        assert!(refused("alice sha256:abc\n").contains("64 hexadecimal"));
        assert!(refused(&format!("alice sha256:{}", "g".repeat(64))).contains("64 hexadecimal"));
        assert!(refused("alice t1\nbob t1\n").contains("line 2"));
        assert!(refused("admin-token t1\n").contains("reserved"));
        assert!(refused(&format!("{} t\n", "e".repeat(65))).contains("line 1"));
    }

    #[test]
    fn a_shared_caller_releases_as_named_an_employee_only_as_themselves() {
        let alice = EmployeeId::parse("alice").unwrap();
        let bob = EmployeeId::parse("bob").unwrap();
        assert_eq!(
            AdminCaller::SharedToken.release_employee(bob.clone()),
            Ok(bob.clone())
        );
        let caller = AdminCaller::Employee(alice.clone(), Credential::Oidc);
        assert_eq!(caller.release_employee(alice.clone()), Ok(alice.clone()));
        let mismatch = caller.release_employee(bob).unwrap_err();
        assert_eq!(mismatch.caller, "alice");
        assert_eq!(caller.author(), alice);
        assert_eq!(
            AdminCaller::SharedToken.author().as_str(),
            SHARED_TOKEN_AUTHOR
        );
    }

    fn settings() -> OidcSettings {
        OidcSettings {
            issuer: "https://idp.example".into(),
            audience: "couponctl".into(),
            employee_claim: "sub".into(),
            leeway: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_jwks_of_secrets_or_without_kids_is_refused() {
        let oct = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"s"}]}"#;
        assert!(OidcVerifier::from_jwks(oct, settings())
            .unwrap_err()
            .contains("symmetric"));
        assert!(OidcVerifier::from_jwks("{}", settings()).is_err());
        assert!(OidcVerifier::from_jwks(r#"{"keys":[]}"#, settings())
            .unwrap_err()
            .contains("no signature key"));
        let rsa = r#"{"kty":"RSA","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"}"#;
        let two = format!(r#"{{"keys":[{rsa},{rsa}]}}"#);
        assert!(OidcVerifier::from_jwks(&two, settings())
            .unwrap_err()
            .contains("kid"));
        let hs = format!(
            r#"{{"keys":[{}]}}"#,
            rsa.replace(r#""e":"AQAB""#, r#""e":"AQAB","alg":"HS256""#)
        );
        assert!(OidcVerifier::from_jwks(&hs, settings())
            .unwrap_err()
            .contains("not a signature algorithm"));
        let one = format!(r#"{{"keys":[{rsa}]}}"#);
        let verifier = OidcVerifier::from_jwks(&one, settings()).unwrap();
        // alg "none" and HMAC tokens never verify against a public key.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSJ9.";
        assert!(verifier.verify(none).is_err());
        let hs256 = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSJ9.c2ln";
        assert!(verifier.verify(hs256).unwrap_err().0.contains("algorithm"));
        let mut missing = settings();
        missing.audience = " ".into();
        assert!(OidcVerifier::from_jwks(&one, missing).is_err());
    }

    #[test]
    fn only_jwt_shaped_tokens_are_sent_to_the_verifier() {
        assert!(looks_like_jwt("aGVhZA.Ym9keQ.c2ln"));
        assert!(!looks_like_jwt("plain-token"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a b.c.d"));
    }
}
