//! `Idempotency-Key` on the create endpoints (the IETF httpapi draft's convention).
//!
//! A retry of a `POST` with the same key and the same body, within 24 hours, gets the
//! original answer (201, same number, same `Location`) and creates nothing new; the same
//! key with a different body is a 422. Keys are scoped to where they are used: the
//! application list, one application's chats, or one chat's messages.
//!
//! For chats and messages the key is checked and recorded inside the same Lua script
//! that allocates the number, so a retry racing its original still cannot allocate
//! twice. Applications are created in MySQL, so their key is first reserved in Redis
//! (`SET NX`); a retry arriving while the original is still in progress gets a 409.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::error::ApiError;

/// How long a key is remembered.
pub const TTL_SECONDS: u64 = 24 * 60 * 60;
pub const HEADER: &str = "idempotency-key";

/// Shortest accepted key: short keys collide by accident between clients (`1`, `retry`),
/// and a colliding key replays another request's answer. A UUID has 36 characters.
pub const MIN_KEY_LEN: usize = 16;

/// A validated `Idempotency-Key`: 16 to 255 visible ASCII characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(value: &str) -> Result<Self, ApiError> {
        let valid = (MIN_KEY_LEN..=255).contains(&value.len())
            && value.bytes().all(|b| b.is_ascii_graphic());
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(ApiError::BadRequest(
                "Idempotency-Key must be 16 to 255 visible ASCII characters; send a UUID".into(),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The optional `Idempotency-Key` header of a request.
pub struct MaybeIdempotencyKey(pub Option<IdempotencyKey>);

impl<S: Send + Sync> FromRequestParts<S> for MaybeIdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get(HEADER) {
            None => Ok(Self(None)),
            Some(value) => {
                let value = value.to_str().map_err(|_| {
                    ApiError::BadRequest("Idempotency-Key must be visible ASCII".into())
                })?;
                IdempotencyKey::parse(value).map(|k| Self(Some(k)))
            }
        }
    }
}

/// A stable 64-bit fingerprint (FNV-1a) of a request's meaningful content, so that the
/// same body sent twice is recognised whatever its JSON spacing or field order.
pub fn fingerprint(parts: &[Option<&str>]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        let bytes: &[u8] = match part {
            Some(text) => text.as_bytes(),
            None => b"\x00null",
        };
        for &b in bytes.iter().chain(b"\x1f") {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

pub fn mismatch() -> ApiError {
    ApiError::invalid(
        "Idempotency-Key",
        "this key was used with a different request body",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii() {
        assert!(IdempotencyKey::parse("order-42_a.b.c.d.e").is_ok());
        assert!(IdempotencyKey::parse("3f2b8c1e-9d4a-4f6b-8e2a-7c5d1b9e0a42").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("order-42").is_err(), "too short");
        assert!(IdempotencyKey::parse(&"k".repeat(15)).is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(16)).is_ok());
        assert!(IdempotencyKey::parse("has space has space").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    }

    #[test]
    fn fingerprints_tell_bodies_apart() {
        assert_eq!(fingerprint(&[Some("a")]), fingerprint(&[Some("a")]));
        assert_ne!(fingerprint(&[Some("a")]), fingerprint(&[Some("b")]));
        assert_ne!(fingerprint(&[None]), fingerprint(&[Some("")]));
        assert_ne!(
            fingerprint(&[Some("ab"), Some("c")]),
            fingerprint(&[Some("a"), Some("bc")])
        );
    }
}
