//! `Idempotency-Key` on the create endpoints (the IETF httpapi draft's convention): what a
//! key is, what a request's fingerprint is, and what to do next with a request that
//! carries one ([`NextAction`]).
//!
//! A retry of a `POST` with the same key and the same body, within 24 hours, gets the
//! original answer (201, same number, same `Location`) and creates nothing new; the same
//! key with a different body is a 422. Keys are scoped to where they are used: the
//! application list, one application's chats, or one chat's messages.
//!
//! Where keys are kept: for chats and messages, inside the same Lua script that
//! allocates the number (`store::queue`), so a retry racing its original still cannot
//! allocate twice. Applications are created in MySQL, so their key is first reserved in
//! Redis (`Queue::begin`), then completed with the answer or abandoned on failure; a
//! retry arriving while the original is still in progress gets a 409.

use crate::domain::Malformed;

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
    pub fn parse(value: &str) -> Result<Self, Malformed> {
        let valid = (MIN_KEY_LEN..=255).contains(&value.len())
            && value.bytes().all(|b| b.is_ascii_graphic());
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(Malformed(
                "Idempotency-Key must be 16 to 255 visible ASCII characters; send a UUID".into(),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
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

/// What to do with a request that carries a key.
#[derive(Debug, PartialEq, Eq)]
pub enum NextAction<T> {
    /// The key is new (and now reserved): do the work, then record its answer.
    Proceed,
    /// The same request was answered before: send that answer again.
    Replay(T),
    /// The same request is being worked on right now: the client retries later (409).
    InProgress,
    /// The key was used with another body (422).
    Mismatch,
}

impl<T> NextAction<T> {
    /// Given what a key recorded (its fingerprint and, once answered, the answer), what to
    /// do with a request of `fingerprint`.
    pub fn after(recorded: &str, answer: Option<T>, fingerprint: &str) -> Self {
        match answer {
            _ if recorded != fingerprint => Self::Mismatch,
            Some(answer) => Self::Replay(answer),
            None => Self::InProgress,
        }
    }
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
    fn the_next_action_follows_what_the_key_recorded() {
        assert_eq!(NextAction::after("a", Some(1), "a"), NextAction::Replay(1));
        assert_eq!(
            NextAction::<u8>::after("a", None, "a"),
            NextAction::InProgress
        );
        assert_eq!(NextAction::after("a", Some(1), "b"), NextAction::Mismatch);
        assert_eq!(
            NextAction::<u8>::after("a", None, "b"),
            NextAction::Mismatch
        );
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
