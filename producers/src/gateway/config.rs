//! The gateway's configuration: limits, timeouts, credentials, and the
//! check that open storefront routes are not served where others can reach them.

use std::net::SocketAddr;
use std::time::Duration;

use super::{EmployeeAuth, Secret};

/// Largest batch one HTTP call may release (the CLI goes higher).
pub const MAX_HTTP_ISSUE: u32 = 100_000;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// When set, storefront routes require `Authorization: Bearer <token>`.
    /// Without it they are open, which [`GatewayConfig::check_exposure`]
    /// allows on a loopback address only (or when
    /// `insecure_open_storefront` says so).
    pub api_token: Option<Secret>,
    /// The shared operator token (legacy, development): admits to the admin
    /// routes as [`AdminCaller::SharedToken`], whose releases name their
    /// employee in the body.
    pub admin_token: Option<Secret>,
    /// The per-employee credentials (a token file, OIDC). With neither
    /// these nor `admin_token`, the admin routes are closed.
    pub employees: EmployeeAuth,
    /// Serve open storefront routes (no `api_token`) on a non-loopback
    /// address anyway.
    pub insecure_open_storefront: bool,
    /// How long a claim or purchase may take, from the handler's start:
    /// publishing the event and waiting for its decision.
    pub reply_timeout: Duration,
    /// Deadline of a whole request (body read included); never shorter
    /// than `reply_timeout` (see [`GatewayConfig::request_deadline`]).
    pub request_timeout: Duration,
    /// A client must send a request's headers within this; it also closes
    /// idle keep-alive connections.
    pub header_read_timeout: Duration,
    /// A client must send a request's body within this once its headers
    /// are in (`408` past it); the body is read before the request takes
    /// one of the `max_in_flight` slots.
    pub body_read_timeout: Duration,
    /// Requests handled at once; beyond, `503` with `Retry-After`.
    pub max_in_flight: usize,
    /// Requests waiting for a decision at once; beyond, `503`.
    pub max_waiting: usize,
    /// Open connections; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// Requests per second per client address when the storefront routes
    /// are open (no `api_token`); beyond, `429`.
    pub address_limit_per_sec: u64,
    /// Count loopback clients against `address_limit_per_sec` too. Off by
    /// default: a local load test or a proxy on the same host is not what
    /// the limit is for (the open storefront serves loopback only unless
    /// told otherwise, so off, the limit bites only with
    /// `insecure_open_storefront`).
    pub address_limit_loopback: bool,
    /// Claims per second per user beyond which the user is blocked (with
    /// `api_token` only: open routes never block the users they name).
    pub flood_limit_per_sec: u64,
    pub flood_block: Duration,
    pub datacenter_id: u16,
}

impl Default for GatewayConfig {
    /// The defaults of `coupon_platform::settings`.
    fn default() -> Self {
        use coupon_platform::settings;
        Self {
            api_token: None,
            admin_token: None,
            employees: EmployeeAuth::default(),
            insecure_open_storefront: false,
            reply_timeout: settings::REPLY_TIMEOUT,
            request_timeout: settings::REQUEST_TIMEOUT,
            header_read_timeout: settings::HEADER_READ_TIMEOUT,
            body_read_timeout: settings::BODY_READ_TIMEOUT,
            max_in_flight: settings::MAX_IN_FLIGHT as usize,
            max_waiting: settings::MAX_WAITING_REPLIES as usize,
            max_connections: settings::MAX_CONNECTIONS as usize,
            address_limit_per_sec: settings::ADDRESS_LIMIT,
            address_limit_loopback: false,
            flood_limit_per_sec: settings::FLOOD_LIMIT,
            flood_block: settings::FLOOD_BLOCK,
            datacenter_id: 0,
        }
    }
}

/// Serving open storefront routes on an address others can reach.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "refusing to serve the storefront routes without COUPON_API_TOKEN on {0}, which is not a \
     loopback address: set COUPON_API_TOKEN (or COUPON_API_TOKEN_FILE), bind HTTP_ADDR to \
     127.0.0.1, or pass --insecure-open-storefront"
)]
pub struct Exposed(pub SocketAddr);

impl GatewayConfig {
    /// Open storefront routes (no `api_token`) only on a loopback address,
    /// unless `insecure_open_storefront` is set.
    pub fn check_exposure(&self, addr: SocketAddr) -> Result<(), Exposed> {
        if self.api_token.is_some() || self.insecure_open_storefront || addr.ip().is_loopback() {
            Ok(())
        } else {
            Err(Exposed(addr))
        }
    }

    /// Whether any admin credential is configured.
    pub fn admin_routes_open(&self) -> bool {
        self.admin_token.is_some() || !self.employees.is_empty()
    }

    /// The deadline of a whole request: `request_timeout`, but never
    /// shorter than the reply wait plus a second to answer.
    pub fn request_deadline(&self) -> Duration {
        self.request_timeout
            .max(self.reply_timeout + Duration::from_secs(1))
    }
}
