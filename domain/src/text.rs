//! Domain enums are stored as text (`coupons.status`, the decisions'
//! `outcome`): one name per value, written once in the enum's `as_str`, read
//! back with its `FromStr`. With the `sqlx` feature, [`text_enum!`] makes
//! such an enum a `sqlx::Type` for Postgres text columns (and text arrays),
//! so the adapters bind and read the enum itself, never its name.
//! The rules do no I/O either way: the feature only adds the encoding.
//!
//! Ids and codes are stored as text too: [`text_column!`] gives any type with
//! a text form and a way back from it the same encoding (`text_enum!` uses
//! it), so the store functions take and return `UserId`, `CouponCode`, ...
//! and an id stays typed from the boundary to the row.

/// Implements `Display` (and, with the `sqlx` feature, Postgres text
/// encoding and decoding) for an enum with `as_str` and `FromStr`.
#[macro_export]
macro_rules! text_enum {
    ($ty:ty) => {
        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        $crate::text_column!($ty, |s| s.as_str(), |t| t.parse::<$ty>()?);
    };
}

/// Postgres text encoding (and text arrays) for a type written as
/// `$to_text(&self)` and read back with `$from_text(&str)`, which may refuse
/// (a decode error: a row the type cannot hold). Only with the `sqlx` feature.
#[macro_export]
macro_rules! text_column {
    ($ty:ty, |$s:ident| $to_text:expr, |$t:ident| $from_text:expr) => {
        #[cfg(feature = "sqlx")]
        impl ::sqlx::Type<::sqlx::Postgres> for $ty {
            fn type_info() -> ::sqlx::postgres::PgTypeInfo {
                <String as ::sqlx::Type<::sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &::sqlx::postgres::PgTypeInfo) -> bool {
                <String as ::sqlx::Type<::sqlx::Postgres>>::compatible(ty)
            }
        }

        #[cfg(feature = "sqlx")]
        impl ::sqlx::postgres::PgHasArrayType for $ty {
            fn array_type_info() -> ::sqlx::postgres::PgTypeInfo {
                <String as ::sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }

        #[cfg(feature = "sqlx")]
        impl<'q> ::sqlx::Encode<'q, ::sqlx::Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut ::sqlx::postgres::PgArgumentBuffer,
            ) -> Result<::sqlx::encode::IsNull, ::sqlx::error::BoxDynError> {
                let $s = self;
                <&str as ::sqlx::Encode<'q, ::sqlx::Postgres>>::encode_by_ref(&&*$to_text, buf)
            }
        }

        #[cfg(feature = "sqlx")]
        impl<'r> ::sqlx::Decode<'r, ::sqlx::Postgres> for $ty {
            fn decode(
                value: ::sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, ::sqlx::error::BoxDynError> {
                let $t = <&str as ::sqlx::Decode<'r, ::sqlx::Postgres>>::decode(value)?;
                Ok($from_text)
            }
        }
    };
}
