//! The formats Redis holds, written and read in one place: queue entries, pending
//! records, the create scripts' answers and stream ids as versions.
//!
//! A queue entry has one field, `e`, and a pending record is one string: both are a few
//! `|`-separated fields with the free text (title or body) last, so it may hold `|`.
//! One field instead of a dozen makes every create, read and acknowledgement cheaper in
//! Redis and in the worker.
//!
//! * entry: `kind|app_id|token|chat|number|created_us|updated_us|has_text|text`, where
//!   kind is `c` (chat, number 0) or `m` (message);
//! * record: `version|messages_count`, where version is the id of the stream entry that
//!   wrote it. A read takes the content from that entry (one script, atomically), so the
//!   text is stored once: a queued 64 KB body costs about 64 KB of Redis, not twice that.
//!
//! Anything that does not decode is a [`CodecError`], never a default: a corrupt record
//! is not "not pending", and a corrupt answer is not number 0.

/// Something Redis holds that is not in the expected format.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("malformed queue entry: {0}")]
    Entry(String),
    #[error("malformed pending record {0}")]
    Record(String),
    #[error("malformed script answer: {0}")]
    Answer(String),
}

impl From<CodecError> for redis::RedisError {
    fn from(e: CodecError) -> Self {
        redis::RedisError::from((
            redis::ErrorKind::Client,
            "corrupt data in Redis",
            e.to_string(),
        ))
    }
}

/// What a create script answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Allocation {
    Created {
        number: u64,
        entry_id: String,
    },
    /// The idempotency key was used before: what it recorded.
    Replayed {
        fingerprint: String,
        number: u64,
        at_us: i64,
    },
    /// The token is not in the cache: look it up in MySQL.
    NoApplication,
    /// The application's chat counter is missing: rebuild it from MySQL.
    NoChatCounter,
    /// The chat number is above the application's counter: no such chat.
    NoChat,
    /// The chat's message counter is missing: rebuild it from MySQL.
    NoMessageCounter,
    /// The write backlog is over its bound: nothing was allocated.
    Full,
}

impl Allocation {
    pub fn from_reply((status, number, detail): (String, u64, String)) -> Result<Self, CodecError> {
        Ok(match status.as_str() {
            "ok" => Self::Created {
                number,
                entry_id: detail,
            },
            "replay" => {
                // The recorded value: fingerprint|number|accepted_us.
                let bad = || CodecError::Answer(format!("idempotency record `{detail}`"));
                let mut parts = detail.splitn(3, '|');
                let fingerprint = parts.next().ok_or_else(bad)?.to_owned();
                let number = parts.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
                let at_us = parts.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
                Self::Replayed {
                    fingerprint,
                    number,
                    at_us,
                }
            }
            "noapp" => Self::NoApplication,
            "nochatseq" => Self::NoChatCounter,
            "nochat" => Self::NoChat,
            "nomsgseq" => Self::NoMessageCounter,
            "full" => Self::Full,
            other => return Err(CodecError::Answer(format!("status `{other}`"))),
        })
    }
}

/// The kind of a queued write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Message,
}

/// A queue entry's payload: the whole state of one chat or message at one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedWrite {
    pub kind: Kind,
    pub app_id: u64,
    pub token: String,
    pub chat: u64,
    /// The message number; 0 for a chat.
    pub number: u64,
    pub created_us: i64,
    pub updated_us: i64,
    /// Title (`None` is null) or body.
    pub text: Option<String>,
}

impl QueuedWrite {
    pub fn encode(&self) -> String {
        let kind = match self.kind {
            Kind::Chat => 'c',
            Kind::Message => 'm',
        };
        let (flag, text) = match &self.text {
            Some(t) => ('1', t.as_str()),
            None => ('0', ""),
        };
        format!(
            "{kind}|{}|{}|{}|{}|{}|{}|{flag}|{text}",
            self.app_id, self.token, self.chat, self.number, self.created_us, self.updated_us
        )
    }

    /// Parses an entry; the error says what is wrong with it.
    pub fn decode(s: &str) -> Result<Self, CodecError> {
        let f: Vec<&str> = s.splitn(9, '|').collect();
        let [kind, app, token, chat, number, ca, ua, flag, text] = f.as_slice() else {
            return Err(CodecError::Entry(format!(
                "expected 9 fields, found {}",
                f.len()
            )));
        };
        let num = |name: &str, v: &str| -> Result<u64, CodecError> {
            v.parse()
                .map_err(|_| CodecError::Entry(format!("{name} `{v}` is not a number")))
        };
        let time = |name: &str, v: &str| -> Result<i64, CodecError> {
            v.parse()
                .map_err(|_| CodecError::Entry(format!("{name} `{v}` is not a timestamp")))
        };
        let kind = match *kind {
            "c" => Kind::Chat,
            "m" => Kind::Message,
            other => return Err(CodecError::Entry(format!("unknown kind `{other}`"))),
        };
        if token.is_empty() {
            return Err(CodecError::Entry("the token is empty".into()));
        }
        let text = match (*flag, kind) {
            ("1", _) => Some((*text).to_owned()),
            ("0", Kind::Chat) => None,
            (other, _) => return Err(CodecError::Entry(format!("bad text flag `{other}`"))),
        };
        Ok(Self {
            kind,
            app_id: num("app id", app)?,
            token: (*token).to_owned(),
            chat: num("chat", chat)?,
            number: num("number", number)?,
            created_us: time("created_at", ca)?,
            updated_us: time("updated_at", ua)?,
            text,
        })
    }
}

/// A pending record: what a read serves until the write is persisted. It holds only
/// the version (the id of the stream entry that wrote it) and, for a chat, its
/// `messages_count`; the content is read from that entry, so a body is stored once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub version: String,
    pub messages_count: u64,
}

impl Record {
    pub fn decode(s: &str) -> Result<Self, CodecError> {
        let bad = |what: &str| CodecError::Record(format!("`{s}`: {what}"));
        let (version, count) = s.split_once('|').ok_or_else(|| bad("no `|`"))?;
        let messages_count = count.parse().map_err(|_| bad("bad messages_count"))?;
        if version_of(version).is_none() {
            return Err(bad("bad version"));
        }
        Ok(Self {
            version: version.to_owned(),
            messages_count,
        })
    }
}

/// The version of a write: its stream entry id `ms-seq` packed into one ordered integer.
pub fn version_of(entry_id: &str) -> Option<u64> {
    let (ms, seq) = entry_id.split_once('-')?;
    let (ms, seq): (u64, u64) = (ms.parse().ok()?, seq.parse().ok()?);
    // 43 bits of milliseconds last until the year 2248; a million entries per
    // millisecond is far beyond what one Redis accepts.
    Some((ms << 20) | seq.min((1 << 20) - 1))
}

/// The stream entry id a version was made from (the inverse of [`version_of`] for every
/// entry id Redis hands out).
pub fn entry_id_of(version: u64) -> String {
    format!("{}-{}", version >> 20, version & ((1 << 20) - 1))
}

/// Milliseconds part of a stream entry id: when the write was accepted.
pub fn accepted_ms(entry_id: &str) -> Option<u64> {
    entry_id.split_once('-')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_follow_stream_order() {
        let a = version_of("1700000000000-0").unwrap();
        let b = version_of("1700000000000-1").unwrap();
        let c = version_of("1700000000001-0").unwrap();
        assert!(a < b && b < c);
        assert_eq!(version_of("nonsense"), None);
    }

    #[test]
    fn entries_round_trip_with_separators_in_the_text() {
        let write = QueuedWrite {
            kind: Kind::Message,
            app_id: 7,
            token: "tok-_1".into(),
            chat: 2,
            number: 5,
            created_us: 1_700_000_000_000_000,
            updated_us: 1_700_000_000_000_001,
            text: Some("a|b||c".into()),
        };
        assert_eq!(QueuedWrite::decode(&write.encode()), Ok(write));
        let chat = QueuedWrite {
            kind: Kind::Chat,
            number: 0,
            text: None,
            ..QueuedWrite::decode("m|1|t|1|1|1|1|1|x").unwrap()
        };
        assert_eq!(QueuedWrite::decode(&chat.encode()), Ok(chat));
    }

    #[test]
    fn malformed_entries_say_why() {
        for (raw, expected) in [
            ("m|x|t|1|1|1|1|1|b", "app id"),
            ("z|1|t|1|1|1|1|1|b", "unknown kind"),
            ("m|1|t|1", "expected 9 fields"),
            ("m|1|t|1|1|1|1|0|", "text flag"),
            ("m|1||1|1|1|1|1|b", "token"),
        ] {
            let err = QueuedWrite::decode(raw).unwrap_err().to_string();
            assert!(err.contains(expected), "{raw}: {err}");
        }
    }

    #[test]
    fn records_decode_or_say_why() {
        assert_eq!(
            Record::decode("1700000000000-3|7"),
            Ok(Record {
                version: "1700000000000-3".into(),
                messages_count: 7
            })
        );
        for bad in ["garbage", "1-0|x", "x|0", ""] {
            assert!(Record::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_turn_back_into_entry_ids() {
        for id in ["1700000000000-0", "1700000000000-7", "1-1048575"] {
            assert_eq!(entry_id_of(version_of(id).unwrap()), id);
        }
    }

    #[test]
    fn script_answers_decode_or_say_why() {
        let answer = |s: &str, n, d: &str| Allocation::from_reply((s.into(), n, d.into()));
        assert_eq!(
            answer("replay", 0, "fp|7|1700000000000000"),
            Ok(Allocation::Replayed {
                fingerprint: "fp".into(),
                number: 7,
                at_us: 1_700_000_000_000_000
            })
        );
        assert_eq!(answer("nomsgseq", 0, ""), Ok(Allocation::NoMessageCounter));
        assert!(answer("replay", 0, "fp|x|1").is_err());
        assert!(answer("what", 0, "").is_err());
    }
}
