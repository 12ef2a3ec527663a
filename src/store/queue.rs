//! Redis: number allocation, the write queue, the token cache and pending records.
//!
//! # Keys
//! Every key of an application carries the hash tag `{token}`, so an application's
//! counters and records stay in one slot should Redis be clustered:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{T}:app` | hash | `id`: the application's MySQL id (the token cache) |
//! | `P:{T}:chats` | string | last chat number handed out |
//! | `P:{T}:c:N` | string | pending chat N ([`Record`]): served until persisted |
//! | `P:{T}:c:N:msgs` | string | last message number handed out in chat N |
//! | `P:{T}:c:N:m:M` | string | pending message M of chat N ([`Record`]) |
//! | `P:q` | stream | the write queue: one entry ([`QueuedWrite`]) per create or update |
//! | `P:dlq` | stream | entries no worker could persist, with the reason |
//! | `P:touched` | set | parents whose counts need a refresh |
//!
//! # Why a counter never hands out a number twice
//! A create runs as one Lua script: it checks the parent, increments the counter, appends
//! the entry to the stream and writes the pending record, atomically. A counter that is
//! missing is rebuilt from `MAX(number)` in MySQL with `SET NX` (the first rebuild wins)
//! and the script runs again. That is only safe if no entry numbered by the lost counter
//! is still waiting in the queue, and none can be:
//! * Redis runs with `maxmemory-policy noeviction` and no key here has a TTL, so a counter
//!   never disappears on its own; it goes only when Redis loses its data set.
//! * Redis persists through one append-only file, in command order. Whatever survives a
//!   crash is a prefix of history, and a counter is written before every stream entry
//!   numbered from it (the create of its parent sets it to 0). If the counter is gone,
//!   so is every later stream entry that used it.
//! * The one gap is a Redis crash, which loses up to the last second of history
//!   (`appendfsync everysec`): entries a worker had already committed to MySQL may be
//!   among the lost, and the counter then restarts below their numbers. That window is
//!   the documented durability limit (README, docs/RELIABILITY.md); `appendfsync always`
//!   closes it.
//!
//! # Encodings
//! A queue entry has one field, `e`, and a pending record is one string: both are a few
//! `|`-separated fields with the free text (title or body) last, so it may hold `|`.
//! One field instead of a dozen makes every create, read and acknowledgement cheaper in
//! Redis and in the worker.
//!
//! * entry: `kind|app_id|token|chat|number|created_us|updated_us|has_text|text`, where
//!   kind is `c` (chat, number 0) or `m` (message);
//! * record: `version|created_us|updated_us|messages_count|has_text|text`, where version
//!   is the id of the stream entry that wrote it.

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, Value};

use crate::resources::{Chat, Message, from_micros, to_micros};
use chrono::{DateTime, Utc};

const CREATE_CHAT: &str = r"
local app = redis.call('HGET', KEYS[1], 'id')
if not app then return {'noapp', 0, ''} end
if ARGV[5] ~= '' then
  local prior = redis.call('GET', KEYS[5])
  if prior then return {'replay', 0, prior} end
end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'nochatseq', 0, ''} end
local n = redis.call('INCR', KEYS[2])
local id = redis.call('XADD', KEYS[3], '*', 'e',
  'c|' .. app .. '|' .. ARGV[1] .. '|' .. n .. '|0|' .. ARGV[2] .. '|' .. ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[4])
redis.call('SET', KEYS[4] .. n, id .. '|' .. ARGV[2] .. '|' .. ARGV[2] .. '|0|' .. ARGV[3] .. '|' .. ARGV[4])
redis.call('SET', KEYS[4] .. n .. ':msgs', 0)
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[5], ARGV[5] .. '|' .. n .. '|' .. ARGV[2], 'EX', ARGV[6])
end
return {'ok', n, id}
";

const CREATE_MESSAGE: &str = r"
local app = redis.call('HGET', KEYS[1], 'id')
if not app then return {'noapp', 0, ''} end
local chats = redis.call('GET', KEYS[2])
if not chats then return {'nochatseq', 0, ''} end
if tonumber(ARGV[2]) > tonumber(chats) then return {'nochat', 0, ''} end
if ARGV[5] ~= '' then
  local prior = redis.call('GET', KEYS[6])
  if prior then return {'replay', 0, prior} end
end
if redis.call('EXISTS', KEYS[3]) == 0 then return {'nomsgseq', 0, ''} end
local n = redis.call('INCR', KEYS[3])
local id = redis.call('XADD', KEYS[4], '*', 'e',
  'm|' .. app .. '|' .. ARGV[1] .. '|' .. ARGV[2] .. '|' .. n .. '|' .. ARGV[4] .. '|' .. ARGV[4] .. '|1|' .. ARGV[3])
redis.call('SET', KEYS[5] .. n, id .. '|' .. ARGV[4] .. '|' .. ARGV[4] .. '|0|1|' .. ARGV[3])
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[6], ARGV[5] .. '|' .. n .. '|' .. ARGV[4], 'EX', ARGV[6])
end
return {'ok', n, id}
";

// KEYS[1] stream, KEYS[2] record. ARGV[1] the entry, ARGV[2] the record without its
// version, which is the new entry's id.
const ENQUEUE_UPDATE: &str = r"
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
redis.call('SET', KEYS[2], id .. '|' .. ARGV[2])
return id
";

// Deletes each pending record whose version is the one just persisted; a record that
// a later update has replaced stays until that update is persisted too.
const RELEASE_PENDING: &str = r"
local released = 0
for i, key in ipairs(KEYS) do
  local record = redis.call('GET', key)
  if record and string.sub(record, 1, #ARGV[i] + 1) == ARGV[i] .. '|' then
    redis.call('DEL', key)
    released = released + 1
  end
end
return released
";

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
}

impl Allocation {
    fn from_reply((status, number, entry_id): (String, u64, String)) -> Self {
        match status.as_str() {
            "ok" => Self::Created { number, entry_id },
            "replay" => {
                // The recorded value: fingerprint|number|accepted_us.
                let mut parts = entry_id.splitn(3, '|');
                let fingerprint = parts.next().unwrap_or_default().to_owned();
                let number = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let at_us = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                Self::Replayed {
                    fingerprint,
                    number,
                    at_us,
                }
            }
            "noapp" => Self::NoApplication,
            "nochatseq" => Self::NoChatCounter,
            "nochat" => Self::NoChat,
            _ => Self::NoMessageCounter,
        }
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
    pub fn decode(s: &str) -> Result<Self, String> {
        let f: Vec<&str> = s.splitn(9, '|').collect();
        let [kind, app, token, chat, number, ca, ua, flag, text] = f.as_slice() else {
            return Err(format!("expected 9 fields, found {}", f.len()));
        };
        let num = |name: &str, v: &str| -> Result<u64, String> {
            v.parse()
                .map_err(|_| format!("{name} `{v}` is not a number"))
        };
        let time = |name: &str, v: &str| -> Result<i64, String> {
            v.parse()
                .map_err(|_| format!("{name} `{v}` is not a timestamp"))
        };
        let kind = match *kind {
            "c" => Kind::Chat,
            "m" => Kind::Message,
            other => return Err(format!("unknown kind `{other}`")),
        };
        if token.is_empty() {
            return Err("the token is empty".into());
        }
        let text = match (*flag, kind) {
            ("1", _) => Some((*text).to_owned()),
            ("0", Kind::Chat) => None,
            (other, _) => return Err(format!("bad text flag `{other}`")),
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

/// A pending record: what a read serves until the write is persisted.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    created_us: i64,
    updated_us: i64,
    messages_count: u64,
    text: Option<String>,
}

impl Record {
    /// The record without its version (the script prepends the entry id).
    fn encode(&self) -> String {
        let (flag, text) = match &self.text {
            Some(t) => ('1', t.as_str()),
            None => ('0', ""),
        };
        format!(
            "{}|{}|{}|{flag}|{text}",
            self.created_us, self.updated_us, self.messages_count
        )
    }

    fn decode(s: &str) -> Option<Self> {
        let f: Vec<&str> = s.splitn(6, '|').collect();
        let [_version, ca, ua, mc, flag, text] = f.as_slice() else {
            return None;
        };
        Some(Self {
            created_us: ca.parse().ok()?,
            updated_us: ua.parse().ok()?,
            messages_count: mc.parse().ok()?,
            text: (*flag == "1").then(|| (*text).to_owned()),
        })
    }
}

/// Names of the keys, all under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }
    pub fn application(&self, token: &str) -> String {
        format!("{}:{{{token}}}:app", self.prefix)
    }
    pub fn chat_counter(&self, token: &str) -> String {
        format!("{}:{{{token}}}:chats", self.prefix)
    }
    fn chat_record_prefix(&self, token: &str) -> String {
        format!("{}:{{{token}}}:c:", self.prefix)
    }
    pub fn chat_record(&self, token: &str, chat: u64) -> String {
        format!("{}{chat}", self.chat_record_prefix(token))
    }
    pub fn message_counter(&self, token: &str, chat: u64) -> String {
        format!("{}:msgs", self.chat_record(token, chat))
    }
    fn message_record_prefix(&self, token: &str, chat: u64) -> String {
        format!("{}:m:", self.chat_record(token, chat))
    }
    pub fn message_record(&self, token: &str, chat: u64, number: u64) -> String {
        format!("{}{number}", self.message_record_prefix(token, chat))
    }
    pub fn stream(&self) -> String {
        format!("{}:q", self.prefix)
    }
    pub fn dead_letters(&self) -> String {
        format!("{}:dlq", self.prefix)
    }
    pub fn touched(&self) -> String {
        format!("{}:touched", self.prefix)
    }
    pub fn idempotency_applications(&self, key: &str) -> String {
        format!("{}:idem:apps:{key}", self.prefix)
    }
    pub fn idempotency_chats(&self, token: &str, key: &str) -> String {
        format!("{}:{{{token}}}:idem:c:{key}", self.prefix)
    }
    pub fn idempotency_messages(&self, token: &str, chat: u64, key: &str) -> String {
        format!("{}:{{{token}}}:idem:m:{chat}:{key}", self.prefix)
    }
}

/// The Redis side of the store; cheap to clone (one multiplexed connection).
#[derive(Clone)]
pub struct Queue {
    pub conn: ConnectionManager,
    pub keys: Keys,
    create_chat: Script,
    create_message: Script,
    enqueue_update: Script,
    release_pending: Script,
}

impl Queue {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            keys: Keys::new(prefix),
            create_chat: Script::new(CREATE_CHAT),
            create_message: Script::new(CREATE_MESSAGE),
            enqueue_update: Script::new(ENQUEUE_UPDATE),
            release_pending: Script::new(RELEASE_PENDING),
        }
    }

    /// Caches token -> application id. `fresh` is true for a new application, whose
    /// chat counter starts at 0.
    pub async fn cache_application(
        &self,
        token: &str,
        app_id: u64,
        fresh: bool,
    ) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.hset(self.keys.application(token), "id", app_id)
            .ignore();
        if fresh {
            pipe.set_nx(self.keys.chat_counter(token), 0).ignore();
        }
        pipe.exec_async(&mut self.conn.clone()).await
    }

    pub async fn cached_application_id(&self, token: &str) -> redis::RedisResult<Option<u64>> {
        self.conn
            .clone()
            .hget(self.keys.application(token), "id")
            .await
    }

    /// Sets a missing counter to `value`; an existing counter is left alone.
    pub async fn restore_counter(&self, key: &str, value: u64) -> redis::RedisResult<()> {
        let _: bool = self.conn.clone().set_nx(key, value).await?;
        Ok(())
    }

    /// `idempotency`: the key's Redis name and the request's fingerprint.
    pub async fn allocate_chat(
        &self,
        token: &str,
        title: Option<&str>,
        at: DateTime<Utc>,
        idempotency: Option<(&str, &str)>,
    ) -> redis::RedisResult<Allocation> {
        let app_key = self.keys.application(token);
        let (idem_key, fingerprint) = idempotency.unwrap_or((&app_key, ""));
        let reply = self
            .create_chat
            .key(&app_key)
            .key(self.keys.chat_counter(token))
            .key(self.keys.stream())
            .key(self.keys.chat_record_prefix(token))
            .key(idem_key)
            .arg(token)
            .arg(to_micros(at))
            .arg(if title.is_some() { "1" } else { "0" })
            .arg(title.unwrap_or(""))
            .arg(fingerprint)
            .arg(crate::idempotency::TTL_SECONDS)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(Allocation::from_reply(reply))
    }

    /// `idempotency`: the key's Redis name and the request's fingerprint.
    pub async fn allocate_message(
        &self,
        token: &str,
        chat: u64,
        body: &str,
        at: DateTime<Utc>,
        idempotency: Option<(&str, &str)>,
    ) -> redis::RedisResult<Allocation> {
        let app_key = self.keys.application(token);
        let (idem_key, fingerprint) = idempotency.unwrap_or((&app_key, ""));
        let reply = self
            .create_message
            .key(&app_key)
            .key(self.keys.chat_counter(token))
            .key(self.keys.message_counter(token, chat))
            .key(self.keys.stream())
            .key(self.keys.message_record_prefix(token, chat))
            .key(idem_key)
            .arg(token)
            .arg(chat)
            .arg(body)
            .arg(to_micros(at))
            .arg(fingerprint)
            .arg(crate::idempotency::TTL_SECONDS)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(Allocation::from_reply(reply))
    }

    /// Queues the whole new state of a chat and makes it the pending record.
    pub async fn enqueue_chat_update(
        &self,
        token: &str,
        app_id: u64,
        chat: &Chat,
    ) -> redis::RedisResult<String> {
        let (created_us, updated_us) = (to_micros(chat.created_at), to_micros(chat.updated_at));
        let entry = QueuedWrite {
            kind: Kind::Chat,
            app_id,
            token: token.to_owned(),
            chat: chat.number,
            number: 0,
            created_us,
            updated_us,
            text: chat.title.clone(),
        };
        let record = Record {
            created_us,
            updated_us,
            messages_count: chat.messages_count,
            text: chat.title.clone(),
        };
        self.enqueue_update(self.keys.chat_record(token, chat.number), &entry, &record)
            .await
    }

    /// Queues the whole new state of a message and makes it the pending record.
    pub async fn enqueue_message_update(
        &self,
        token: &str,
        app_id: u64,
        message: &Message,
    ) -> redis::RedisResult<String> {
        let (created_us, updated_us) =
            (to_micros(message.created_at), to_micros(message.updated_at));
        let entry = QueuedWrite {
            kind: Kind::Message,
            app_id,
            token: token.to_owned(),
            chat: message.chat_number,
            number: message.number,
            created_us,
            updated_us,
            text: Some(message.body.clone()),
        };
        let record = Record {
            created_us,
            updated_us,
            messages_count: 0,
            text: Some(message.body.clone()),
        };
        let key = self
            .keys
            .message_record(token, message.chat_number, message.number);
        self.enqueue_update(key, &entry, &record).await
    }

    async fn enqueue_update(
        &self,
        record_key: String,
        entry: &QueuedWrite,
        record: &Record,
    ) -> redis::RedisResult<String> {
        self.enqueue_update
            .key(self.keys.stream())
            .key(record_key)
            .arg(entry.encode())
            .arg(record.encode())
            .invoke_async(&mut self.conn.clone())
            .await
    }

    async fn record(&self, key: String) -> redis::RedisResult<Option<Record>> {
        let raw: Option<String> = self.conn.clone().get(key).await?;
        Ok(raw.as_deref().and_then(Record::decode))
    }

    pub async fn pending_chat(&self, token: &str, number: u64) -> redis::RedisResult<Option<Chat>> {
        let record = self.record(self.keys.chat_record(token, number)).await?;
        Ok(record.and_then(|r| {
            Some(Chat {
                number,
                title: r.text,
                messages_count: r.messages_count,
                created_at: from_micros(r.created_us)?,
                updated_at: from_micros(r.updated_us)?,
            })
        }))
    }

    pub async fn pending_message(
        &self,
        token: &str,
        chat: u64,
        number: u64,
    ) -> redis::RedisResult<Option<Message>> {
        let record = self
            .record(self.keys.message_record(token, chat, number))
            .await?;
        Ok(record.and_then(|r| {
            Some(Message {
                number,
                chat_number: chat,
                body: r.text?,
                created_at: from_micros(r.created_us)?,
                updated_at: from_micros(r.updated_us)?,
            })
        }))
    }

    /// Deletes the pending records persisted at exactly these versions.
    pub async fn release_pending(&self, records: &[(String, String)]) -> redis::RedisResult<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut invocation = self.release_pending.prepare_invoke();
        for (key, version) in records {
            invocation.key(key).arg(version);
        }
        let _: i64 = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    pub async fn ping(&self) -> redis::RedisResult<()> {
        redis::cmd("PING")
            .query_async::<Value>(&mut self.conn.clone())
            .await
            .map(drop)
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
    fn keys_share_the_application_hash_tag() {
        let keys = Keys::new("cs");
        assert_eq!(keys.chat_counter("T"), "cs:{T}:chats");
        assert_eq!(keys.message_counter("T", 3), "cs:{T}:c:3:msgs");
        assert_eq!(keys.message_record("T", 3, 9), "cs:{T}:c:3:m:9");
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
            let err = QueuedWrite::decode(raw).unwrap_err();
            assert!(err.contains(expected), "{raw}: {err}");
        }
    }

    #[test]
    fn records_round_trip() {
        let record = Record {
            created_us: 1,
            updated_us: 2,
            messages_count: 3,
            text: Some("x|y".into()),
        };
        assert_eq!(
            Record::decode(&format!("1-0|{}", record.encode())),
            Some(record)
        );
        assert_eq!(Record::decode("garbage"), None);
    }
}
