//! Input parsed once into domain values; everything past the HTTP layer trusts them.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use serde::Serialize;
use utoipa::ToSchema;

/// Longest application name and chat title, in characters.
pub const MAX_NAME_CHARS: usize = 255;
/// Longest message body, in bytes (the size of a MySQL `TEXT`).
pub const MAX_BODY_BYTES: usize = 65_535;
/// Random bytes in a token: 192 bits, 32 URL-safe characters.
const TOKEN_BYTES: usize = 24;

/// One invalid field of a request body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// The field's name in the request body.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// A path or query value that is not well formed (a 400 for the client), with what is
/// wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

/// Text that cannot be a token names no application (a 404, like an unknown token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no such application")]
pub struct UnknownToken;

/// An application token: the only public handle of an application.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Token(String);

impl Token {
    /// A fresh token from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut bytes)?;
        Ok(Self(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// A token taken from a URL. Anything that cannot be a token is simply unknown.
    pub fn parse(s: &str) -> Result<Self, UnknownToken> {
        let valid = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(UnknownToken)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What logs show instead of the token: the first 8 hex digits of its SHA-256.
    /// Lines about one application can be correlated; the token cannot be recovered.
    pub fn log_id(&self) -> String {
        let digest = Sha256::digest(self.0.as_bytes());
        digest[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A number from a path or a query: plain ASCII digits, no sign, no leading zero
/// (`0` itself aside), at most `i64::MAX`. One spelling per number, so that caches,
/// logs and idempotency never see two names for one resource.
pub fn parse_canonical(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical
        .then(|| s.parse::<u64>().ok())
        .flatten()
        .filter(|n| *n <= i64::MAX as u64)
}

/// A chat or message number taken from a URL: a positive integer in canonical form.
pub fn parse_number(s: &str, what: &str) -> Result<u64, Malformed> {
    match parse_canonical(s) {
        Some(n) if n >= 1 => Ok(n),
        _ => Err(Malformed(format!(
            "{what} number must be a positive integer written in plain digits without \
             sign or leading zeros, got `{}`",
            s.chars().take(32).collect::<String>()
        ))),
    }
}

/// Text checked once, at the edge: past it, a value of one of these types is valid.
macro_rules! text_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }
    };
}

text_type!(
    /// An application's name: 1 to 255 characters, not only blanks.
    Name
);
text_type!(
    /// A chat's title: at most 255 characters.
    Title
);
text_type!(
    /// A message's body: 1 to 65,535 bytes, not only blanks.
    Body
);

impl Name {
    /// `name` of a request body: required.
    pub fn parse(name: Option<String>) -> Result<Self, FieldError> {
        let name = name.ok_or_else(|| FieldError::new("name", "is required"))?;
        if name.trim().is_empty() {
            return Err(FieldError::new("name", "must not be empty"));
        }
        if name.chars().count() > MAX_NAME_CHARS {
            return Err(FieldError::new(
                "name",
                format!("must be at most {MAX_NAME_CHARS} characters"),
            ));
        }
        Ok(Self(name))
    }
}

impl Title {
    /// `title` of a request body: optional, and null means none.
    pub fn parse(title: Option<String>) -> Result<Option<Self>, FieldError> {
        match title {
            Some(t) if t.chars().count() > MAX_NAME_CHARS => Err(FieldError::new(
                "title",
                format!("must be at most {MAX_NAME_CHARS} characters"),
            )),
            other => Ok(other.map(Self)),
        }
    }
}

impl Body {
    /// `body` of a request body: required.
    pub fn parse(body: Option<String>) -> Result<Self, FieldError> {
        let body = body.ok_or_else(|| FieldError::new("body", "is required"))?;
        if body.trim().is_empty() {
            return Err(FieldError::new("body", "must not be empty"));
        }
        if body.len() > MAX_BODY_BYTES {
            return Err(FieldError::new(
                "body",
                format!("must be at most {MAX_BODY_BYTES} bytes"),
            ));
        }
        Ok(Self(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_url_safe_and_distinct() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 32);
        assert!(Token::parse(a.as_str()).is_ok());
    }

    #[test]
    fn malformed_tokens_are_unknown() {
        for bad in ["", "a/b", "a b", "ä", &"x".repeat(65)] {
            assert!(Token::parse(bad) == Err(UnknownToken), "{bad}");
        }
    }

    #[test]
    fn numbers_must_be_positive_integers() {
        assert_eq!(parse_number("1", "chat").unwrap(), 1);
        for bad in [
            "0",
            "-1",
            "1.5",
            "abc",
            "",
            "99999999999999999999",
            "9223372036854775808",
            "+1",
            "01",
            "0001",
            " 1",
            "1 ",
            "１",
        ] {
            assert!(parse_number(bad, "chat").is_err(), "{bad}");
        }
    }

    #[test]
    fn canonical_numbers_have_one_spelling() {
        assert_eq!(parse_canonical("0"), Some(0));
        assert_eq!(parse_canonical("10"), Some(10));
        assert_eq!(
            parse_canonical("9223372036854775807"),
            Some(i64::MAX as u64)
        );
        for bad in [
            "",
            "00",
            "+5",
            "-0",
            "05",
            "5.0",
            "0x5",
            "9223372036854775808",
        ] {
            assert_eq!(parse_canonical(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_token_is_logged_as_a_short_digest() {
        let token = Token::parse("abc").unwrap();
        let id = token.log_id();
        assert_eq!(id.len(), 8);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(id, Token::parse("abc").unwrap().log_id(), "stable");
        assert_ne!(id, Token::parse("abd").unwrap().log_id());
    }

    #[test]
    fn names_are_required_non_blank_and_bounded() {
        assert!(Name::parse(None).is_err());
        assert!(Name::parse(Some("  ".into())).is_err());
        assert!(Name::parse(Some("é".repeat(255))).is_ok());
        assert!(Name::parse(Some("a".repeat(256))).is_err());
    }

    #[test]
    fn titles_are_optional_and_bounded() {
        assert_eq!(Title::parse(None).unwrap(), None);
        assert_eq!(
            Title::parse(Some("t".into()))
                .unwrap()
                .map(Title::into_string),
            Some("t".to_owned())
        );
        assert!(Title::parse(Some("a".repeat(255))).is_ok());
        assert!(Title::parse(Some("a".repeat(256))).is_err());
    }

    #[test]
    fn bodies_are_bounded_in_bytes() {
        assert!(Body::parse(None).is_err());
        assert!(Body::parse(Some(String::new())).is_err());
        assert!(Body::parse(Some("a".repeat(MAX_BODY_BYTES))).is_ok());
        // 32,768 two-byte characters: under the character count, over the byte limit.
        assert!(Body::parse(Some("é".repeat(32_768))).is_err());
    }
}
