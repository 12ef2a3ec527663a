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
//! | `P:{T}:c:N` | hash | pending chat N: served until a worker has persisted it |
//! | `P:{T}:c:N:msgs` | string | last message number handed out in chat N |
//! | `P:{T}:c:N:m:M` | hash | pending message M of chat N |
//! | `P:q` | stream | the write queue, one entry per accepted create or update |
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
//! * Entries already read by a worker but not yet committed when Redis lost its data are
//!   within the `appendfsync everysec` window, which is the documented durability limit.

use std::collections::HashMap;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, Value};

use crate::resources::{Chat, Message, from_micros, to_micros};
use chrono::{DateTime, Utc};

const CREATE_CHAT: &str = r"
local app = redis.call('HGET', KEYS[1], 'id')
if not app then return {'noapp', 0, ''} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'nochatseq', 0, ''} end
local n = redis.call('INCR', KEYS[2])
local fields = {'k', 'chat', 'a', app, 't', ARGV[1], 'c', n, 'ca', ARGV[2], 'ua', ARGV[2]}
if ARGV[3] == '1' then
  fields[#fields + 1] = 'ti'
  fields[#fields + 1] = ARGV[4]
end
local id = redis.call('XADD', KEYS[3], '*', unpack(fields))
local rec = KEYS[4] .. n
redis.call('HSET', rec, 'v', id, 'ca', ARGV[2], 'ua', ARGV[2], 'mc', 0)
if ARGV[3] == '1' then redis.call('HSET', rec, 'ti', ARGV[4]) end
redis.call('SET', rec .. ':msgs', 0)
return {'ok', n, id}
";

const CREATE_MESSAGE: &str = r"
local app = redis.call('HGET', KEYS[1], 'id')
if not app then return {'noapp', 0, ''} end
local chats = redis.call('GET', KEYS[2])
if not chats then return {'nochatseq', 0, ''} end
if tonumber(ARGV[2]) > tonumber(chats) then return {'nochat', 0, ''} end
if redis.call('EXISTS', KEYS[3]) == 0 then return {'nomsgseq', 0, ''} end
local n = redis.call('INCR', KEYS[3])
local id = redis.call('XADD', KEYS[4], '*', 'k', 'msg', 'a', app, 't', ARGV[1], 'c', ARGV[2],
  'n', n, 'b', ARGV[3], 'ca', ARGV[4], 'ua', ARGV[4])
redis.call('HSET', KEYS[5] .. n, 'v', id, 'b', ARGV[3], 'ca', ARGV[4], 'ua', ARGV[4])
return {'ok', n, id}
";

// KEYS[1] stream, KEYS[2] record. ARGV[1] = number of entry arguments that follow;
// the rest are the record's fields. The record is replaced whole, so a title set to
// null does not keep its old value.
const ENQUEUE_UPDATE: &str = r"
local split = tonumber(ARGV[1]) + 1
local entry = {unpack(ARGV, 2, split)}
local id = redis.call('XADD', KEYS[1], '*', unpack(entry))
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'v', id, unpack(ARGV, split + 1))
return id
";

// Deletes each pending record whose version is the one just persisted; a record that
// a later update has replaced stays until that update is persisted too.
const RELEASE_PENDING: &str = r"
local released = 0
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'v') == ARGV[i] then
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
            "noapp" => Self::NoApplication,
            "nochatseq" => Self::NoChatCounter,
            "nochat" => Self::NoChat,
            _ => Self::NoMessageCounter,
        }
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

    pub async fn allocate_chat(
        &self,
        token: &str,
        title: Option<&str>,
        at: DateTime<Utc>,
    ) -> redis::RedisResult<Allocation> {
        let reply = self
            .create_chat
            .key(self.keys.application(token))
            .key(self.keys.chat_counter(token))
            .key(self.keys.stream())
            .key(self.keys.chat_record_prefix(token))
            .arg(token)
            .arg(to_micros(at))
            .arg(if title.is_some() { "1" } else { "0" })
            .arg(title.unwrap_or(""))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(Allocation::from_reply(reply))
    }

    pub async fn allocate_message(
        &self,
        token: &str,
        chat: u64,
        body: &str,
        at: DateTime<Utc>,
    ) -> redis::RedisResult<Allocation> {
        let reply = self
            .create_message
            .key(self.keys.application(token))
            .key(self.keys.chat_counter(token))
            .key(self.keys.message_counter(token, chat))
            .key(self.keys.stream())
            .key(self.keys.message_record_prefix(token, chat))
            .arg(token)
            .arg(chat)
            .arg(body)
            .arg(to_micros(at))
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
        let (ca, ua) = (to_micros(chat.created_at), to_micros(chat.updated_at));
        let mut entry: Vec<String> = vec![
            "k".into(),
            "chat".into(),
            "a".into(),
            app_id.to_string(),
            "t".into(),
            token.into(),
            "c".into(),
            chat.number.to_string(),
            "ca".into(),
            ca.to_string(),
            "ua".into(),
            ua.to_string(),
        ];
        let mut record: Vec<String> = vec![
            "ca".into(),
            ca.to_string(),
            "ua".into(),
            ua.to_string(),
            "mc".into(),
            chat.messages_count.to_string(),
        ];
        if let Some(title) = &chat.title {
            entry.extend(["ti".into(), title.clone()]);
            record.extend(["ti".into(), title.clone()]);
        }
        self.enqueue_update(self.keys.chat_record(token, chat.number), entry, record)
            .await
    }

    /// Queues the whole new state of a message and makes it the pending record.
    pub async fn enqueue_message_update(
        &self,
        token: &str,
        app_id: u64,
        message: &Message,
    ) -> redis::RedisResult<String> {
        let (ca, ua) = (to_micros(message.created_at), to_micros(message.updated_at));
        let entry: Vec<String> = vec![
            "k".into(),
            "msg".into(),
            "a".into(),
            app_id.to_string(),
            "t".into(),
            token.into(),
            "c".into(),
            message.chat_number.to_string(),
            "n".into(),
            message.number.to_string(),
            "b".into(),
            message.body.clone(),
            "ca".into(),
            ca.to_string(),
            "ua".into(),
            ua.to_string(),
        ];
        let record: Vec<String> = vec![
            "b".into(),
            message.body.clone(),
            "ca".into(),
            ca.to_string(),
            "ua".into(),
            ua.to_string(),
        ];
        let key = self
            .keys
            .message_record(token, message.chat_number, message.number);
        self.enqueue_update(key, entry, record).await
    }

    async fn enqueue_update(
        &self,
        record_key: String,
        entry: Vec<String>,
        record: Vec<String>,
    ) -> redis::RedisResult<String> {
        self.enqueue_update
            .key(self.keys.stream())
            .key(record_key)
            .arg(entry.len())
            .arg(entry)
            .arg(record)
            .invoke_async(&mut self.conn.clone())
            .await
    }

    pub async fn pending_chat(&self, token: &str, number: u64) -> redis::RedisResult<Option<Chat>> {
        let record: HashMap<String, String> = self
            .conn
            .clone()
            .hgetall(self.keys.chat_record(token, number))
            .await?;
        Ok(chat_from_record(number, &record))
    }

    pub async fn pending_message(
        &self,
        token: &str,
        chat: u64,
        number: u64,
    ) -> redis::RedisResult<Option<Message>> {
        let record: HashMap<String, String> = self
            .conn
            .clone()
            .hgetall(self.keys.message_record(token, chat, number))
            .await?;
        Ok(message_from_record(chat, number, &record))
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

fn field<T: std::str::FromStr>(record: &HashMap<String, String>, name: &str) -> Option<T> {
    record.get(name)?.parse().ok()
}

fn chat_from_record(number: u64, record: &HashMap<String, String>) -> Option<Chat> {
    Some(Chat {
        number,
        title: record.get("ti").cloned(),
        messages_count: field(record, "mc").unwrap_or(0),
        created_at: from_micros(field(record, "ca")?)?,
        updated_at: from_micros(field(record, "ua")?)?,
    })
}

fn message_from_record(
    chat: u64,
    number: u64,
    record: &HashMap<String, String>,
) -> Option<Message> {
    Some(Message {
        number,
        chat_number: chat,
        body: record.get("b")?.clone(),
        created_at: from_micros(field(record, "ca")?)?,
        updated_at: from_micros(field(record, "ua")?)?,
    })
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
    fn records_without_timestamps_are_ignored() {
        let mut record = HashMap::new();
        record.insert("b".to_owned(), "hi".to_owned());
        assert_eq!(message_from_record(1, 1, &record), None);
        record.insert("ca".to_owned(), "1".to_owned());
        record.insert("ua".to_owned(), "2".to_owned());
        assert_eq!(message_from_record(1, 1, &record).unwrap().body, "hi");
    }
}
