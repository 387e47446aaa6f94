//! Admission: who may use the gateway's capacity, decided from the headers
//! alone, before a byte of the body is read.
//!
//! Every route has an [`Audience`] in the route table. A request for a
//! storefront or admin route whose token is missing or wrong is answered
//! `401` here, at once: it never takes one of the `max_in_flight` slots
//! the paying callers need, and its body is never read (the connection is
//! closed after the answer). Public routes (`/healthz`, `/metrics`, the
//! OpenAPI document, the console's page) have slots of their own (as many
//! as `max_in_flight`: a load balancer's health checks and a load test of
//! `/healthz` are served), so a flood of them cannot take the storefront's
//! either.
//!
//! What the headers proved is passed on, resolved once: the storefront
//! [`Caller`] and, for an employee or the admin token, the [`AdminCaller`]
//! ride on the request's extensions, and handlers take them as extractors
//! instead of checking tokens again.
//!
//! An admitted request's body is read here, within `body_read_timeout`
//! (`408` past it) and before a slot is taken: a client that trickles its
//! body holds a connection, never a slot. Then the request runs within
//! [`GatewayConfig::request_deadline`](super::GatewayConfig::request_deadline)
//! (`504` past it).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::auth::{self, Caller};
use super::employees::AdminCaller;
use super::{ApiError, ErrorCode, GatewayConfig, GatewayState};

/// Who a route is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Anyone: health, metrics, the OpenAPI document, the console's page.
    Public,
    /// The storefront: its token (or the admin's) when COUPON_API_TOKEN is
    /// set, anyone otherwise (then limited per address by the route).
    Storefront,
    /// Employees and operators: an employee's credential, or the shared
    /// admin token ([`super::employees`]).
    Admin,
}

/// The most a request body may be (the JSON bodies are a few hundred
/// bytes; a release is one small object).
pub const MAX_BODY: usize = 64 * 1024;

/// What the admission step needs: the audience of every route, and the
/// slots of the public routes.
pub(super) struct Admission {
    state: Arc<GatewayState>,
    audiences: HashMap<(Method, &'static str), Audience>,
    public: Arc<Semaphore>,
}

impl Admission {
    pub(super) fn new(
        state: Arc<GatewayState>,
        audiences: impl IntoIterator<Item = (Method, &'static str, Audience)>,
    ) -> Self {
        let public = Arc::new(Semaphore::new(state.config.max_in_flight.max(1)));
        Self {
            state,
            audiences: audiences
                .into_iter()
                .map(|(method, path, audience)| ((method, path), audience))
                .collect(),
            public,
        }
    }

    /// The audience of the matched route; an unmatched path (answered
    /// `404`/`405`) is public.
    fn audience(&self, method: &Method, path: Option<&str>) -> Audience {
        path.and_then(|path| {
            self.audiences
                .iter()
                .find(|((m, p), _)| m == method && *p == path)
                .map(|(_, audience)| *audience)
        })
        .unwrap_or(Audience::Public)
    }

    /// Who the headers say the caller is, when `audience` admits them.
    fn authenticate(&self, audience: Audience, request: &Request) -> Result<Admitted, ApiError> {
        let config = &self.state.config;
        let headers = request.headers();
        match audience {
            Audience::Public => Ok(Admitted::Public),
            Audience::Admin => admin_caller(config, auth::bearer(headers)).map(Admitted::Admin),
            Audience::Storefront => {
                let given = auth::bearer(headers);
                // A storefront's own token first: the common case costs one
                // comparison, never a JWT verification.
                if let (Some(expected), Some(given)) = (&config.api_token, given) {
                    if expected.matches(given) {
                        return Ok(Admitted::Storefront(Caller::Storefront, None));
                    }
                }
                let admin = given
                    .filter(|_| config.admin_routes_open())
                    .map(|given| admin_caller(config, Some(given)));
                match (admin, &config.api_token) {
                    (Some(Ok(who)), _) => Ok(Admitted::Storefront(Caller::Admin, Some(who))),
                    // Open routes: a token that is not the admin's changes nothing.
                    (_, None) => Ok(Admitted::Storefront(Caller::Open, None)),
                    (Some(Err(_)), Some(_)) => Err(ApiError::unauthorized("wrong API token")),
                    (None, Some(_)) if given.is_some() => {
                        Err(ApiError::unauthorized("wrong API token"))
                    }
                    (None, Some(_)) => Err(ApiError::unauthorized(
                        "missing 'Authorization: Bearer <COUPON_API_TOKEN>'",
                    )),
                }
            }
        }
    }
}

/// What admission learnt of the caller; the handlers read it from the
/// request's extensions ([`Caller`], [`AdminCaller`]).
enum Admitted {
    Public,
    Storefront(Caller, Option<AdminCaller>),
    Admin(AdminCaller),
}

/// The admin caller `given` (the bearer token) is, or why it is refused.
fn admin_caller(config: &GatewayConfig, given: Option<&str>) -> Result<AdminCaller, ApiError> {
    if !config.admin_routes_open() {
        return Err(ApiError::unauthorized(
            "admin routes are closed: the server has none of COUPON_ADMIN_TOKEN, \
             COUPON_EMPLOYEE_TOKENS, COUPON_OIDC_JWKS",
        ));
    }
    let Some(given) = given else {
        return Err(ApiError::unauthorized(
            "missing 'Authorization: Bearer <token>' (an employee's token, or COUPON_ADMIN_TOKEN)",
        ));
    };
    config
        .employees
        .resolve(config.admin_token.as_ref(), given)
        .map_err(|refused| ApiError::unauthorized(refused.0))
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    /// The storefront caller admission found; a handler of a route that was
    /// not admitted as a storefront route gets `401`.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().copied().ok_or_else(|| {
            ApiError::unauthorized("this route was not admitted as a storefront route")
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AdminCaller {
    type Rejection = ApiError;

    /// The admin caller admission resolved; none (a route not admitted as
    /// an admin route) is `401`, never a default identity.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<AdminCaller>()
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("this route was not admitted as an admin route"))
    }
}

/// Refuses what the headers do not authorise, reads the body within its
/// deadline, then runs the request in a slot of its audience within the
/// request deadline.
pub(super) async fn admit(
    State(admission): State<Arc<Admission>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let audience = admission.audience(request.method(), path.as_deref());
    let mut request = request;
    let admitted = match admission.authenticate(audience, &request) {
        Ok(admitted) => admitted,
        Err(error) => {
            metrics::counter!("coupon_http_shed_total", "reason" => "unauthenticated").increment(1);
            let mut response = error.into_response();
            // The body was not read: the connection cannot carry another request.
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return response;
        }
    };
    match admitted {
        Admitted::Public => {}
        Admitted::Storefront(caller, admin) => {
            request.extensions_mut().insert(caller);
            if let Some(admin) = admin {
                request.extensions_mut().insert(admin);
            }
        }
        Admitted::Admin(admin) => {
            request.extensions_mut().insert(admin);
        }
    }
    let state = &admission.state;
    let request = match read_body(request, state.config.body_read_timeout).await {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    let slots = match audience {
        Audience::Public => &admission.public,
        Audience::Storefront | Audience::Admin => &state.in_flight,
    };
    let Ok(permit) = slots.clone().try_acquire_owned() else {
        metrics::counter!("coupon_http_shed_total", "reason" => "in_flight").increment(1);
        return ApiError::overloaded("too many requests in flight").into_response();
    };
    let deadline = state.config.request_deadline();
    let response = match tokio::time::timeout(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("coupon_http_deadline_exceeded_total").increment(1);
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                ErrorCode::Timeout,
                "the request took longer than its deadline; retrying is safe",
            )
            .into_response()
        }
    };
    drop(permit);
    response
}

/// The request with its body read into memory, within `within` and at most
/// [`MAX_BODY`] bytes.
async fn read_body(request: Request, within: std::time::Duration) -> Result<Request, ApiError> {
    let (parts, body) = request.into_parts();
    let bytes = match tokio::time::timeout(within, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) if too_large(&error) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge,
                format!("the request body must be at most {MAX_BODY} bytes"),
            ))
        }
        Ok(Err(error)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("the request body could not be read: {error}"),
            ))
        }
        Err(_) => {
            metrics::counter!("coupon_http_shed_total", "reason" => "slow_body").increment(1);
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::Timeout,
                format!(
                    "the request body did not arrive within {within:?} (BODY_READ_TIMEOUT); \
                     nothing was done, retrying is safe"
                ),
            ));
        }
    };
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// Whether reading a body failed because it passed [`MAX_BODY`].
fn too_large(error: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = error.source();
    }
    false
}
