//! The coupon rules, with no I/O.
//!
//! Everything that decides *what* happens to a coupon or a user lives here, so it
//! can be unit- and property-tested without Kafka, Postgres or Redis. The adapters
//! (`coupon-platform`) and the processes (`coupon-producers`, `coupon-consumers`)
//! only move data in and out of these types and carry the decisions out atomically.

#[macro_use]
mod text;

pub mod campaign;
pub mod claim;
pub mod clock;
pub mod code;
pub mod ids;
pub mod lifecycle;
pub mod profile;
pub mod purchase;
pub mod quota;
pub mod shard;
pub mod snowflake;
pub mod sold_out;

pub use campaign::{Campaign, CampaignFields, Currency, Discount, InvalidCampaign, Money};
pub use claim::{ClaimOutcome, ClaimOutcomeKind, ClaimPrecheck, UserClaimState};
pub use code::CouponCode;
pub use ids::{Category, EmployeeId, InvalidInput, OrderId, RequestId, RequestedCode, UserId};
pub use lifecycle::{CampaignPhase, CouponStatus, HistoryKind, UnknownName};
pub use profile::{Eligibility, InvalidProfile, Profile};
pub use purchase::{PurchaseOutcome, PurchaseRejection};
pub use quota::{QuotaWindow, Tz};
pub use snowflake::{SnowflakeGenerator, SnowflakeId};
