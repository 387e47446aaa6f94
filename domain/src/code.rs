//! Coupon codes shown to people: the Snowflake id in Crockford base32.
//!
//! Crockford's alphabet leaves out I, L, O and U, so a code read aloud or typed
//! from a screenshot survives: decoding accepts lower case, treats I and L as 1
//! and O as 0, and ignores hyphens. A 64-bit id is always 13 symbols, so codes
//! sort like the ids they encode.

use std::fmt;

use crate::snowflake::{SnowflakeError, SnowflakeId, SnowflakeParts};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
pub const CODE_LEN: usize = 13;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    #[error("coupon code must be {CODE_LEN} symbols (got {0})")]
    WrongLength(usize),
    #[error("coupon code contains {0:?}, which is not a Crockford base32 symbol")]
    BadSymbol(char),
    #[error("coupon code is not a valid id: {0}")]
    NotAnId(#[from] SnowflakeError),
}

/// A coupon's public code; equal codes mean the same coupon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CouponCode(SnowflakeId);

impl CouponCode {
    pub fn from_id(id: SnowflakeId) -> Self {
        Self(id)
    }

    pub fn id(self) -> SnowflakeId {
        self.0
    }

    /// Time, datacenter, machine and sequence the code was generated with.
    pub fn parts(self) -> SnowflakeParts {
        self.0.parts()
    }

    pub fn parse(raw: &str) -> Result<Self, CodeError> {
        let mut value: u64 = 0;
        let mut symbols = 0usize;
        for c in raw.chars().filter(|c| *c != '-') {
            let digit = match c.to_ascii_uppercase() {
                'O' => 0,
                'I' | 'L' => 1,
                upper => ALPHABET
                    .iter()
                    .position(|a| *a as char == upper)
                    .ok_or(CodeError::BadSymbol(c))? as u64,
            };
            symbols += 1;
            if symbols > CODE_LEN {
                return Err(CodeError::WrongLength(
                    raw.chars().filter(|c| *c != '-').count(),
                ));
            }
            // 13 symbols carry 65 bits; the first symbol may only use its low 4.
            if symbols == 1 && digit > 0b1111 {
                return Err(CodeError::NotAnId(SnowflakeError::ReservedBitSet(
                    digit << 60,
                )));
            }
            value = (value << 5) | digit;
        }
        if symbols != CODE_LEN {
            return Err(CodeError::WrongLength(symbols));
        }
        Ok(Self(SnowflakeId::from_raw(value)?))
    }
}

impl fmt::Display for CouponCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; CODE_LEN];
        let mut value = self.0.raw();
        for slot in buf.iter_mut().rev() {
            *slot = ALPHABET[(value & 31) as usize];
            value >>= 5;
        }
        // The alphabet is ASCII, so this cannot fail.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl serde::Serialize for CouponCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// Stored as the code people see (`coupons.code`, the decisions'
// `coupon_code`); a row that is not a code fails to decode.
text_column!(CouponCode, |s| s.to_string(), |t| CouponCode::parse(t)?);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encodes_to_thirteen_readable_symbols() {
        let code = CouponCode::from_id(SnowflakeId::from_raw(0).unwrap());
        assert_eq!(code.to_string(), "0000000000000");
        let code = CouponCode::from_id(SnowflakeId::from_raw(i64::MAX as u64).unwrap());
        assert_eq!(code.to_string(), "7ZZZZZZZZZZZZ");
    }

    #[test]
    fn decoding_forgives_case_confusable_letters_and_hyphens() {
        let code = CouponCode::parse("7ZZZZ-ZZZZ-ZZZZ").unwrap();
        assert_eq!(code.id().raw(), i64::MAX as u64);
        assert_eq!(
            CouponCode::parse("0000000000OIL").unwrap().id().raw(),
            0b00000_00001_00001
        );
        assert_eq!(
            CouponCode::parse("7zzzzzzzzzzzz").unwrap(),
            CouponCode::parse("7ZZZZZZZZZZZZ").unwrap()
        );
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(CouponCode::parse(""), Err(CodeError::WrongLength(0)));
        assert!(matches!(
            CouponCode::parse("U000000000000"),
            Err(CodeError::BadSymbol('U'))
        ));
        assert!(matches!(
            CouponCode::parse("00000000000000"),
            Err(CodeError::WrongLength(14))
        ));
        assert!(CouponCode::parse("8000000000000").is_err(), "reserved bit");
        assert!(CouponCode::parse("000000000000!").is_err());
    }

    proptest! {
        #[test]
        fn round_trips_and_keeps_order(a in 0u64..(1 << 63), b in 0u64..(1 << 63)) {
            let ca = CouponCode::from_id(SnowflakeId::from_raw(a).unwrap());
            let cb = CouponCode::from_id(SnowflakeId::from_raw(b).unwrap());
            prop_assert_eq!(CouponCode::parse(&ca.to_string()).unwrap(), ca);
            prop_assert_eq!(ca.to_string().cmp(&cb.to_string()), a.cmp(&b));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,20}") {
            let _ = CouponCode::parse(&s);
        }
    }
}
