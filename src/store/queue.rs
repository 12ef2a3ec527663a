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
//! | `P:full` | string | exists while Redis memory is over `QUEUE_MAX_MEMORY` (expires) |
//! | `P:index:gap` | string | oldest entry the indexer had not handled when the stream was trimmed past it |
//! | `P:index:catchup` | string | where the indexer's catch-up from MySQL starts, while it runs |
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
//! * record: `version|messages_count`, where version is the id of the stream entry that
//!   wrote it. A read takes the content from that entry (one script, atomically), so the
//!   text is stored once: a queued 64 KB body costs about 64 KB of Redis, not twice that.
//!
//! # Backpressure
//! Creates and updates are refused (`full`, a 503 for the client) while the stream holds
//! `QUEUE_MAX_ENTRIES` entries or more, or while `P:full` exists; Redis's own `OOM` is
//! answered the same way. Reads and the workers' draining go on.

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, Value};

use crate::idempotency::{self, NextAction};
use crate::resources::{Chat, Message, from_micros, to_micros};
use chrono::{DateTime, Utc};

// Every create and update script refuses new work (`full`) while the backlog is over its
// bound: the stream holds `max entries` or more, or the memory flag (set by the workers'
// maintenance while Redis memory is over `QUEUE_MAX_MEMORY`) exists. A replay of an
// accepted request is answered first: a retry always gets its original answer.

// KEYS: 1 app, 2 chat counter, 3 stream, 4 chat record prefix, 5 idempotency key,
// 6 memory flag. ARGV: 1 token, 2 accepted_us, 3 has_title, 4 title, 5 fingerprint,
// 6 idempotency TTL, 7 max entries.
const CREATE_CHAT: &str = r"
local app = redis.call('HGET', KEYS[1], 'id')
if not app then return {'noapp', 0, ''} end
if ARGV[5] ~= '' then
  local prior = redis.call('GET', KEYS[5])
  if prior then return {'replay', 0, prior} end
end
if redis.call('EXISTS', KEYS[6]) == 1 or redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[7]) then
  return {'full', 0, ''}
end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'nochatseq', 0, ''} end
local n = redis.call('INCR', KEYS[2])
local id = redis.call('XADD', KEYS[3], '*', 'e',
  'c|' .. app .. '|' .. ARGV[1] .. '|' .. n .. '|0|' .. ARGV[2] .. '|' .. ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[4])
redis.call('SET', KEYS[4] .. n, id .. '|0')
redis.call('SET', KEYS[4] .. n .. ':msgs', 0)
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[5], ARGV[5] .. '|' .. n .. '|' .. ARGV[2], 'EX', ARGV[6])
end
return {'ok', n, id}
";

// KEYS: 1 app, 2 chat counter, 3 message counter, 4 stream, 5 message record prefix,
// 6 idempotency key, 7 memory flag. ARGV: 1 token, 2 chat, 3 body, 4 accepted_us,
// 5 fingerprint, 6 idempotency TTL, 7 max entries.
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
if redis.call('EXISTS', KEYS[7]) == 1 or redis.call('XLEN', KEYS[4]) >= tonumber(ARGV[7]) then
  return {'full', 0, ''}
end
if redis.call('EXISTS', KEYS[3]) == 0 then return {'nomsgseq', 0, ''} end
local n = redis.call('INCR', KEYS[3])
local id = redis.call('XADD', KEYS[4], '*', 'e',
  'm|' .. app .. '|' .. ARGV[1] .. '|' .. ARGV[2] .. '|' .. n .. '|' .. ARGV[4] .. '|' .. ARGV[4] .. '|1|' .. ARGV[3])
redis.call('SET', KEYS[5] .. n, id .. '|0')
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[6], ARGV[5] .. '|' .. n .. '|' .. ARGV[4], 'EX', ARGV[6])
end
return {'ok', n, id}
";

// KEYS: 1 stream, 2 record, 3 memory flag. ARGV: 1 the entry, 2 messages_count (the
// record's only field besides its version, the new entry's id), 3 max entries.
// Answers the entry id, or `full`.
const ENQUEUE_UPDATE: &str = r"
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return 'full'
end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
redis.call('SET', KEYS[2], id .. '|' .. ARGV[2])
return id
";

// Starts the indexer's catch-up after the stream was trimmed past it: the gap mark
// becomes the catch-up mark, and the index group is made anew just before the stream's
// first entry, so that it reads every entry still there (and forgets pending entries
// that are gone). Everything before that entry was persisted before it was trimmed, so
// MySQL holds it. The SET comes first: at `maxmemory` Redis refuses it (and with it,
// the rest of the script) before anything has changed.
// KEYS: 1 gap mark, 2 catch-up mark, 3 stream. ARGV: 1 group. Answers where the
// catch-up starts, or nil without a gap.
const START_CATCH_UP: &str = r"
local from = redis.call('GET', KEYS[1])
if not from then return false end
redis.call('SET', KEYS[2], from)
redis.call('DEL', KEYS[1])
local first = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
local start = '$'
if #first > 0 then
  local ms, seq = string.match(first[1][1], '^(%d+)-(%d+)$')
  if tonumber(seq) > 0 then
    start = ms .. '-' .. string.format('%.0f', tonumber(seq) - 1)
  else
    start = string.format('%.0f', tonumber(ms) - 1) .. '-18446744073709551615'
  end
end
redis.call('XGROUP', 'DESTROY', KEYS[3], ARGV[1])
redis.call('XGROUP', 'CREATE', KEYS[3], ARGV[1], start, 'MKSTREAM')
return from
";

// A read's one round trip: the application's cached id, and a pending record with the
// stream entry it points to, read atomically (the worker deletes the record before it
// acknowledges, and the stream is trimmed only behind acknowledged entries, so a
// record's entry is always there). KEYS: 1 record, 2 stream, 3 application.
// Answers {app id or nil, record or nil, entry payload or nil}.
const READ_PENDING: &str = r"
local app = redis.call('HGET', KEYS[3], 'id')
local record = redis.call('GET', KEYS[1])
if not record then return {app, false, false} end
local version = string.match(record, '^[^|]*')
local found = redis.call('XRANGE', KEYS[2], version, version)
if #found == 0 then return {app, record, false} end
return {app, record, found[1][2][2]}
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
    /// The write backlog is over its bound: nothing was allocated.
    Full,
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
            "full" => Self::Full,
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

/// A pending record: what a read serves until the write is persisted. It holds only
/// the version (the id of the stream entry that wrote it) and, for a chat, its
/// `messages_count`; the content is read from that entry, so a body is stored once.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    version: String,
    messages_count: u64,
}

impl Record {
    fn decode(s: &str) -> Result<Self, String> {
        let (version, count) = s
            .split_once('|')
            .ok_or_else(|| format!("pending record `{s}` has no `|`"))?;
        let messages_count = count
            .parse()
            .map_err(|_| format!("pending record `{s}`: bad messages_count"))?;
        if version_of(version).is_none() {
            return Err(format!("pending record `{s}`: bad version"));
        }
        Ok(Self {
            version: version.to_owned(),
            messages_count,
        })
    }
}

/// What a read finds in Redis, in one round trip: the item's pending state, if it is not
/// persisted yet, and the application's cached MySQL id (`None`: not cached).
#[derive(Debug)]
pub struct Lookup<T> {
    pub pending: Option<T>,
    pub app_id: Option<u64>,
}

/// A record read with its entry by [`READ_PENDING`].
struct Pending {
    record: Record,
    entry: QueuedWrite,
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
    pub fn index_gap(&self) -> String {
        format!("{}:index:gap", self.prefix)
    }
    pub fn index_catch_up(&self) -> String {
        format!("{}:index:catchup", self.prefix)
    }
    /// Exists while Redis memory is over `QUEUE_MAX_MEMORY` (set by the workers).
    pub fn memory_full(&self) -> String {
        format!("{}:full", self.prefix)
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
    /// Creates and updates are refused while the stream holds this many entries.
    max_entries: u64,
    /// `QUEUE_MAX_MEMORY`; `None`: 90% of Redis's `maxmemory`, if any.
    max_memory: Option<u64>,
    create_chat: Script,
    create_message: Script,
    enqueue_update: Script,
    read_pending: Script,
    release_pending: Script,
    start_catch_up: Script,
}

/// The write backlog against its bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pressure {
    /// Entries in the stream (not yet trimmed).
    pub entries: u64,
    /// Redis's `used_memory`.
    pub used_memory: u64,
    /// Memory above which writes are refused, if any.
    pub memory_limit: Option<u64>,
    /// Whether creates and updates are refused now.
    pub full: bool,
}

/// Answer of an update's enqueue.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued as this stream entry.
    Entry(String),
    /// The write backlog is over its bound: nothing was queued.
    Full,
}

impl Queue {
    /// A queue with no backlog bound; see [`Queue::with_max_entries`].
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            keys: Keys::new(prefix),
            max_entries: u64::MAX,
            max_memory: None,
            create_chat: Script::new(CREATE_CHAT),
            create_message: Script::new(CREATE_MESSAGE),
            enqueue_update: Script::new(ENQUEUE_UPDATE),
            read_pending: Script::new(READ_PENDING),
            release_pending: Script::new(RELEASE_PENDING),
            start_catch_up: Script::new(START_CATCH_UP),
        }
    }

    /// Refuse creates and updates while the stream holds `max_entries` or more, or while
    /// Redis uses more than `max_memory` bytes (default: 90% of its `maxmemory`).
    pub fn with_limits(mut self, max_entries: u64, max_memory: Option<u64>) -> Self {
        self.max_entries = max_entries;
        self.max_memory = max_memory;
        self
    }

    /// Measures the backlog against its bounds and sets or clears the memory flag that the
    /// scripts check. Called every second by the workers' maintenance.
    pub async fn measure_pressure(&self) -> redis::RedisResult<Pressure> {
        let pressure = self.pressure().await?;
        let mut conn = self.conn.clone();
        let memory_full = pressure
            .memory_limit
            .is_some_and(|l| pressure.used_memory >= l);
        if memory_full {
            // Expires on its own: a flag left by a worker that died would otherwise refuse
            // writes for ever.
            let set: redis::RedisResult<()> = conn.set_ex(self.keys.memory_full(), 1, 5).await;
            if let Some(e) = set
                .as_ref()
                .err()
                .filter(|e| !crate::store::redis_is_full(e))
            {
                tracing::warn!(error = %e, "cannot set the memory-full flag");
            }
        } else {
            let _: () = conn.del(self.keys.memory_full()).await?;
        }
        Ok(pressure)
    }

    /// The backlog against its bounds (reads only).
    pub async fn pressure(&self) -> redis::RedisResult<Pressure> {
        let mut conn = self.conn.clone();
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await?;
        let field = |name: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let used = field("used_memory");
        let maxmemory = field("maxmemory");
        let limit = self
            .max_memory
            .or((maxmemory > 0).then(|| maxmemory / 10 * 9));
        let entries: u64 = conn.xlen(self.keys.stream()).await?;
        let pressure = Pressure {
            entries,
            used_memory: used,
            memory_limit: limit,
            full: entries >= self.max_entries || limit.is_some_and(|l| used >= l),
        };
        Ok(pressure)
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
            .key(self.keys.memory_full())
            .arg(token)
            .arg(to_micros(at))
            .arg(if title.is_some() { "1" } else { "0" })
            .arg(title.unwrap_or(""))
            .arg(fingerprint)
            .arg(idempotency::TTL_SECONDS)
            .arg(self.max_entries)
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
            .key(self.keys.memory_full())
            .arg(token)
            .arg(chat)
            .arg(body)
            .arg(to_micros(at))
            .arg(fingerprint)
            .arg(idempotency::TTL_SECONDS)
            .arg(self.max_entries)
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
    ) -> redis::RedisResult<Enqueued> {
        let entry = QueuedWrite {
            kind: Kind::Chat,
            app_id,
            token: token.to_owned(),
            chat: chat.number,
            number: 0,
            created_us: to_micros(chat.created_at),
            updated_us: to_micros(chat.updated_at),
            text: chat.title.clone(),
        };
        let key = self.keys.chat_record(token, chat.number);
        self.enqueue_update(key, &entry, chat.messages_count).await
    }

    /// Queues the whole new state of a message and makes it the pending record.
    pub async fn enqueue_message_update(
        &self,
        token: &str,
        app_id: u64,
        message: &Message,
    ) -> redis::RedisResult<Enqueued> {
        let entry = QueuedWrite {
            kind: Kind::Message,
            app_id,
            token: token.to_owned(),
            chat: message.chat_number,
            number: message.number,
            created_us: to_micros(message.created_at),
            updated_us: to_micros(message.updated_at),
            text: Some(message.body.clone()),
        };
        let key = self
            .keys
            .message_record(token, message.chat_number, message.number);
        self.enqueue_update(key, &entry, 0).await
    }

    async fn enqueue_update(
        &self,
        record_key: String,
        entry: &QueuedWrite,
        messages_count: u64,
    ) -> redis::RedisResult<Enqueued> {
        let reply: String = self
            .enqueue_update
            .key(self.keys.stream())
            .key(record_key)
            .key(self.keys.memory_full())
            .arg(entry.encode())
            .arg(messages_count)
            .arg(self.max_entries)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(if reply == "full" {
            Enqueued::Full
        } else {
            Enqueued::Entry(reply)
        })
    }

    /// The pending record under `key` with the entry it points to, and the token's
    /// cached application id. A record that cannot be decoded, or whose entry is gone, is
    /// an error: never "not pending".
    async fn pending(&self, token: &str, key: String) -> redis::RedisResult<Lookup<Pending>> {
        let (app_id, record, entry): (Option<u64>, Option<String>, Option<String>) = self
            .read_pending
            .key(key)
            .key(self.keys.stream())
            .key(self.keys.application(token))
            .invoke_async(&mut self.conn.clone())
            .await?;
        let Some(record) = record else {
            return Ok(Lookup {
                pending: None,
                app_id,
            });
        };
        let corrupt = |detail: String| {
            redis::RedisError::from((redis::ErrorKind::Client, "corrupt pending record", detail))
        };
        let record = Record::decode(&record).map_err(corrupt)?;
        let entry = entry.ok_or_else(|| corrupt(format!("entry {} is missing", record.version)))?;
        let entry = QueuedWrite::decode(&entry).map_err(corrupt)?;
        Ok(Lookup {
            pending: Some(Pending { record, entry }),
            app_id,
        })
    }

    /// Chat `number` of `token` if it is not persisted yet, and the application's id.
    pub async fn lookup_chat(&self, token: &str, number: u64) -> redis::RedisResult<Lookup<Chat>> {
        let found = self
            .pending(token, self.keys.chat_record(token, number))
            .await?;
        Ok(Lookup {
            pending: found.pending.and_then(|Pending { record, entry }| {
                Some(Chat {
                    number,
                    title: entry.text,
                    messages_count: record.messages_count,
                    created_at: from_micros(entry.created_us)?,
                    updated_at: from_micros(entry.updated_us)?,
                })
            }),
            app_id: found.app_id,
        })
    }

    /// Message `number` of a chat if it is not persisted yet, and the application's id.
    pub async fn lookup_message(
        &self,
        token: &str,
        chat: u64,
        number: u64,
    ) -> redis::RedisResult<Lookup<Message>> {
        let found = self
            .pending(token, self.keys.message_record(token, chat, number))
            .await?;
        Ok(Lookup {
            pending: found.pending.and_then(|Pending { entry, .. }| {
                Some(Message {
                    number,
                    chat_number: chat,
                    body: entry.text?,
                    created_at: from_micros(entry.created_us)?,
                    updated_at: from_micros(entry.updated_us)?,
                })
            }),
            app_id: found.app_id,
        })
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

    /// Reserves an idempotency key for a request of `fingerprint` (for 24 hours), or says
    /// what the key recorded: its fingerprint and, once answered, the answer. The record
    /// is `pending|fingerprint` until [`Queue::complete`] makes it
    /// `done|fingerprint|answer`.
    pub async fn begin(
        &self,
        key: &str,
        fingerprint: &str,
    ) -> redis::RedisResult<NextAction<String>> {
        let mut conn = self.conn.clone();
        let reserved: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(format!("pending|{fingerprint}"))
            .arg("NX")
            .arg("EX")
            .arg(idempotency::TTL_SECONDS)
            .query_async(&mut conn)
            .await?;
        if reserved.is_some() {
            return Ok(NextAction::Proceed);
        }
        // Gone since (it expired): as good as in progress, the retry will reserve it.
        let recorded: String = conn
            .get::<_, Option<String>>(key)
            .await?
            .unwrap_or_default();
        let mut parts = recorded.splitn(3, '|');
        let (state, recorded, answer) = (parts.next(), parts.next(), parts.next());
        let answer = answer.filter(|_| state == Some("done")).map(str::to_owned);
        Ok(NextAction::after(
            recorded.unwrap_or_default(),
            answer,
            fingerprint,
        ))
    }

    /// Records the answer to the request that reserved `key`.
    pub async fn complete(
        &self,
        key: &str,
        fingerprint: &str,
        answer: &str,
    ) -> redis::RedisResult<()> {
        self.conn
            .clone()
            .set_ex(
                key,
                format!("done|{fingerprint}|{answer}"),
                idempotency::TTL_SECONDS,
            )
            .await
    }

    /// Frees `key` after its request failed, so that a retry can proceed.
    pub async fn abandon(&self, key: &str) -> redis::RedisResult<()> {
        self.conn.clone().del(key).await
    }

    /// Records that the stream is about to be trimmed past entries the indexer has not
    /// handled, from `entry` on; an older mark is kept.
    pub async fn mark_index_gap(&self, entry: &str) -> redis::RedisResult<()> {
        let _: bool = self
            .conn
            .clone()
            .set_nx(self.keys.index_gap(), entry)
            .await?;
        Ok(())
    }

    /// Where an unfinished catch-up of the indexer started, if one is in progress.
    pub async fn index_catch_up_in_progress(&self) -> redis::RedisResult<Option<String>> {
        self.conn.clone().get(self.keys.index_catch_up()).await
    }

    /// Whether a gap is marked for which no catch-up has started yet.
    pub async fn index_gap_marked(&self) -> redis::RedisResult<bool> {
        self.conn.clone().exists(self.keys.index_gap()).await
    }

    /// Turns the gap mark into a catch-up mark and resets `group` to read what the stream
    /// still holds; answers where the catch-up starts (nothing without a gap).
    pub async fn start_index_catch_up(&self, group: &str) -> redis::RedisResult<Option<String>> {
        self.start_catch_up
            .key(self.keys.index_gap())
            .key(self.keys.index_catch_up())
            .key(self.keys.stream())
            .arg(group)
            .invoke_async(&mut self.conn.clone())
            .await
    }

    pub async fn finish_index_catch_up(&self) -> redis::RedisResult<()> {
        self.conn.clone().del(self.keys.index_catch_up()).await
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
}
