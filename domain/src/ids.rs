//! Validated identifiers. Anything that crosses a trust boundary (HTTP, Kafka,
//! the CLI) is parsed into one of these first, so the rest of the code never sees
//! an empty, oversized or control-character-laden id.

use std::fmt;

/// Why a piece of input was refused. The message is safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {problem}")]
pub struct InvalidInput {
    pub field: &'static str,
    pub problem: String,
}

impl InvalidInput {
    pub fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

/// Lengths count characters (Unicode scalar values), as JSON Schema's
/// `maxLength` does, so the gateway's OpenAPI document states the rule
/// exactly; a stored id is at most four bytes a character.
fn validate(field: &'static str, raw: &str, max_chars: usize) -> Result<(), InvalidInput> {
    if raw.is_empty() {
        return Err(InvalidInput::new(field, "must not be empty"));
    }
    let chars = raw.chars().count();
    if chars > max_chars {
        return Err(InvalidInput::new(
            field,
            format!("must be at most {max_chars} characters (got {chars})"),
        ));
    }
    if raw.chars().any(char::is_control) {
        return Err(InvalidInput::new(
            field,
            "must not contain control characters",
        ));
    }
    if raw.trim() != raw {
        return Err(InvalidInput::new(
            field,
            "must not start or end with white space",
        ));
    }
    Ok(())
}

macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The most characters it may have.
            pub const MAX_CHARS: usize = $max;

            pub fn parse(raw: impl Into<String>) -> Result<Self, InvalidInput> {
                let raw = raw.into();
                validate($field, &raw, $max)?;
                Ok(Self(raw))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Stored as the text it was parsed from. A row is read back as it
        // is, without validating it again: only parsed ids are written.
        text_column!($name, |s| s.as_str(), |t| $name(t.to_owned()));
    };
}

text_id!(
    /// A storefront user. Opaque to us; at most 128 characters.
    UserId, "user id", 128
);
text_id!(
    /// The employee who released a batch.
    EmployeeId, "employee id", 64
);
text_id!(
    /// A coupon category such as `Electronics`. Matched exactly.
    Category, "category", 64
);
text_id!(
    /// The storefront's order id; purchases are idempotent on it.
    OrderId, "order id", 128
);
text_id!(
    /// A claim or purchase request (the HTTP request id, or chosen by a
    /// storefront publishing to Kafka); decisions are stored under it.
    RequestId, "request id", 128
);

/// A coupon code as a purchase names it, checked only as far as every store
/// takes it: 1 to 64 characters (as the OpenAPI document's `maxLength`
/// counts them), no control characters (Postgres text refuses NUL). Whether
/// it is a real code is the purchase's decision (`unknown_coupon`), not a
/// refusal, so it is kept as given rather than parsed into a `CouponCode`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestedCode(String);

impl RequestedCode {
    /// The most characters it may have.
    pub const MAX_CHARS: usize = 64;

    pub fn parse(raw: impl Into<String>) -> Result<Self, InvalidInput> {
        let raw = raw.into();
        if raw.is_empty() || raw.chars().count() > Self::MAX_CHARS {
            return Err(InvalidInput::new(
                "coupon code",
                format!("must be 1 to {} characters", Self::MAX_CHARS),
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err(InvalidInput::new(
                "coupon code",
                "must not contain control characters",
            ));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requested_code_is_kept_as_given_within_its_bounds() {
        assert_eq!(
            RequestedCode::parse(" not-a-code ").unwrap().as_str(),
            " not-a-code "
        );
        assert_eq!(
            RequestedCode::parse("").unwrap_err().to_string(),
            "coupon code must be 1 to 64 characters"
        );
        assert!(RequestedCode::parse("ユ".repeat(64)).is_ok());
        assert!(RequestedCode::parse("ユ".repeat(65)).is_err());
        assert_eq!(
            RequestedCode::parse("0\0").unwrap_err().to_string(),
            "coupon code must not contain control characters"
        );
    }

    #[test]
    fn accepts_ordinary_ids() {
        assert_eq!(UserId::parse("user-42").unwrap().as_str(), "user-42");
        assert!(UserId::parse("ユーザー").is_ok());
    }

    #[test]
    fn refuses_empty_oversized_and_control_characters() {
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a".repeat(129)).is_err());
        assert!(UserId::parse("a".repeat(128)).is_ok());
        assert!(UserId::parse("a\u{0}b").is_err());
        assert!(UserId::parse("a\nb").is_err());
        assert!(UserId::parse(" padded").is_err());
        // Lengths are characters, as the OpenAPI document's maxLength.
        assert!(UserId::parse("ユ".repeat(128)).is_ok());
        assert!(UserId::parse("ユ".repeat(129)).is_err());
        assert_eq!(
            UserId::parse("a".repeat(129)).unwrap_err().to_string(),
            "user id must be at most 128 characters (got 129)"
        );
        assert!(RequestId::parse("req\u{0}").is_err());
        assert!(RequestId::parse("r".repeat(129)).is_err());
        let err = Category::parse("").unwrap_err();
        assert_eq!(err.to_string(), "category must not be empty");
    }
}
