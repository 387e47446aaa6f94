//! The producers: everything that turns a person's or a storefront's action
//! into an event.
//!
//! - [`keygen`]: Snowflake generators on leased machine ids.
//! - [`issue`]: an employee's coupon batch → `coupons.created` events
//!   (used by `couponctl issue` and `POST /api/v1/coupon`).
//! - [`gateway`]: the HTTP API; claims and purchases become events and the
//!   gateway waits for their decisions (request/reply over Kafka).

pub mod blacklist;
/// The console's reads live with the other stores.
pub use coupon_platform::store::console as console_store;
pub mod gateway;
pub mod issue;
pub mod keygen;
