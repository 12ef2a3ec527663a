//! Redis: number allocation, the write queue, the token cache and pending records. This
//! module is the one home of the Redis protocol: key names ([`keys`]), the formats of
//! what Redis holds ([`codec`]), the Lua scripts (`scripts/*.lua`, each with a header
//! listing its `KEYS` and `ARGV`), and the stream operations of the workers
//! ([`stream`]). Nothing outside it spells a key or parses a record.
//!
//! The queue is split into `REDIS_SHARDS` shards, each a stream with its own keys under
//! one hash tag ([`keys`]): every script touches one slot, so the same layout runs on one
//! Redis or on a Redis Cluster ([`conn`]).
//!
//! # Why a counter never hands out a number twice
//! A create runs as one Lua script: it checks the parent, increments the counter, appends
//! the entry to the shard's stream and writes the pending record, atomically. A counter
//! that is missing is rebuilt from `MAX(number)` in MySQL with `SETNX`/`HSETNX` (the
//! first rebuild wins) and the script runs again. That is only safe if no entry numbered
//! by the lost counter is still waiting in the queue, and none can be:
//! * Redis runs with `maxmemory-policy noeviction` and no counter has a TTL, so a counter
//!   never disappears on its own; it goes only when Redis loses its data set.
//! * A counter and every stream entry numbered from it live in one slot, so on one
//!   Redis (one append-only file, in command order). Whatever survives a crash is a
//!   prefix of that node's history, and a counter is written before every stream entry
//!   numbered from it (the create of its parent sets it to 0). If the counter is gone,
//!   so is every later stream entry that used it.
//! * The one gap is a crash (or a cluster failover to a replica that had not received
//!   the last writes), which loses up to the last second of history: entries a worker
//!   had already committed to MySQL may be among the lost, and the counter then restarts
//!   below their numbers. That window is the documented durability limit (README,
//!   docs/RELIABILITY.md); `appendfsync always` (and `WAIT` on a cluster) closes it.
//!
//! # Backpressure
//! Creates and updates are refused (`full`, a 503 for the client) while their shard's
//! stream holds `QUEUE_MAX_ENTRIES` entries or more, or while the shard's memory flag
//! exists (set by the workers while the shard's Redis uses more than
//! `QUEUE_MAX_MEMORY`); Redis's own `OOM` is answered the same way. Reads and the
//! workers' draining go on.

pub mod codec;
pub mod conn;
pub mod keys;
pub mod stream;
mod tail;
pub use tail::QueuedMessage;

use std::borrow::Cow;

use redis::{AsyncCommands, Script, Value};

pub use codec::{
    Allocation, CodecError, Kind, QueuedWrite, Record, accepted_ms, entry_id_of, version_of,
};
pub use conn::{RedisConn, Target};
pub use keys::{Keys, Shard};

use crate::idempotency::{self, NextAction};
use crate::resources::{Chat, Message, from_micros, to_micros};
use crate::store::read_cache::UPDATE_MARK_LIFETIME;
use chrono::{DateTime, Utc};

/// What a read finds in Redis, in one round trip: the item's pending state, if it is not
/// persisted yet, and the application's cached MySQL id (`None`: not cached).
#[derive(Debug)]
pub struct Lookup<T> {
    pub pending: Option<T>,
    pub app_id: Option<u64>,
    /// Messages only: the chat's update mark (see `store::read_cache`).
    pub update_mark: Option<String>,
}

/// Which way a list goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Direction {
    #[default]
    Asc,
    Desc,
}

/// What a list page finds in Redis, in one round trip (`read_page.lua`).
#[derive(Debug)]
pub struct PageLookup<T> {
    pub app_id: Option<u64>,
    /// The last number handed out in the parent: every number up to it was accepted.
    /// `None` when the counter is missing (it is rebuilt at the next create).
    pub last: Option<u64>,
    /// Messages only: whether the chat exists (`None`: unknown, its counter is missing).
    pub chat_exists: Option<bool>,
    /// The page's items that are not persisted yet (or whose update is not), by number.
    pub pending: std::collections::BTreeMap<u64, T>,
    /// Messages only: the chat's update mark (see `store::read_cache`).
    pub update_mark: Option<String>,
}

/// `read_page.lua`'s answer: the application's id, the last number, whether the chat
/// exists, the pending items (number, record, entry, ...) and the chat's update mark.
type PageAnswer = (
    Option<u64>,
    Option<u64>,
    u8,
    Vec<Option<String>>,
    Option<String>,
);

/// A record read with its entry by `read_pending.lua`.
struct Pending {
    record: Record,
    entry: QueuedWrite,
}

/// A pending chat as a resource: its entry's content and its record's count (`None` when
/// a timestamp does not convert, as a single read treats it).
fn pending_chat(number: u64, record: Record, entry: QueuedWrite) -> Option<Chat> {
    Some(Chat {
        number,
        title: entry.text,
        messages_count: record.messages_count,
        created_at: from_micros(entry.created_us)?,
        updated_at: from_micros(entry.updated_us)?,
    })
}

/// A pending message as a resource (`None` as for [`pending_chat`]).
fn pending_message(chat: u64, number: u64, entry: QueuedWrite) -> Option<Message> {
    Some(Message {
        number,
        chat_number: chat,
        body: entry.text?,
        created_at: from_micros(entry.created_us)?,
        updated_at: from_micros(entry.updated_us)?,
    })
}

impl PageLookup<Pending> {
    /// The pending items as resources; an entry whose timestamps do not convert is left
    /// out, like a single read does.
    fn map<T>(self, f: impl Fn(u64, Record, QueuedWrite) -> Option<T>) -> PageLookup<T> {
        PageLookup {
            app_id: self.app_id,
            last: self.last,
            chat_exists: self.chat_exists,
            update_mark: self.update_mark,
            pending: self
                .pending
                .into_iter()
                .filter_map(|(n, Pending { record, entry })| Some((n, f(n, record, entry)?)))
                .collect(),
        }
    }
}

/// The Lua scripts, loaded once per process.
struct Scripts {
    create_chat: Script,
    create_message: Script,
    enqueue_update: Script,
    read_pending: Script,
    release_pending: Script,
    start_catch_up: Script,
    measure: Script,
    read_page: Script,
    pending_since: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            create_chat: Script::new(include_str!("scripts/create_chat.lua")),
            create_message: Script::new(include_str!("scripts/create_message.lua")),
            enqueue_update: Script::new(include_str!("scripts/enqueue_update.lua")),
            read_pending: Script::new(include_str!("scripts/read_pending.lua")),
            release_pending: Script::new(include_str!("scripts/release_pending.lua")),
            start_catch_up: Script::new(include_str!("scripts/start_catch_up.lua")),
            measure: Script::new(include_str!("scripts/measure.lua")),
            read_page: Script::new(include_str!("scripts/read_page.lua")),
            pending_since: Script::new(include_str!("scripts/pending_since.lua")),
        }
    }
}

/// The Redis side of the store; cheap to clone (one multiplexed connection per node).
pub struct Queue {
    conn: RedisConn,
    /// Where Redis is, and the response timeout: for the workers' blocking readers.
    target: Target,
    timeout: std::time::Duration,
    pub keys: Keys,
    /// Creates and updates are refused while a shard's stream holds this many entries.
    max_entries: u64,
    /// `QUEUE_MAX_MEMORY`; `None`: 90% of Redis's `maxmemory`, if any.
    max_memory: Option<u64>,
    scripts: Scripts,
}

/// A shard's write backlog against its bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pressure {
    /// Entries in the stream (not yet trimmed).
    pub entries: u64,
    /// `used_memory` of the Redis holding the shard.
    pub used_memory: u64,
    /// Memory above which writes are refused, if any.
    pub memory_limit: Option<u64>,
    /// Whether creates and updates are refused now.
    pub full: bool,
}

/// The create-message script's `KEYS` and `ARGV` for one message: what
/// [`Queue::allocate_message`] sends, and what `chat-system create-script` prints for
/// benchmarks that drive the script directly (as `redis-benchmark` does).
pub fn create_message_call<'a>(
    keys: &Keys,
    max_entries: u64,
    token: &'a str,
    (chat, body): (u64, &'a str),
    accepted_us: i64,
    idempotency: Option<(&str, &'a str)>,
) -> ScriptCall<'a> {
    let app_key = keys.application(token);
    let (idem_key, fingerprint) = idempotency.unwrap_or((&app_key, ""));
    let shard = keys.shard_of(token);
    ScriptCall {
        script: include_str!("scripts/create_message.lua"),
        shard,
        slot: keys.slot_of(shard),
        keys: vec![
            app_key.clone(),
            keys.chat_counter(token),
            keys.message_counters(token),
            keys.stream(shard),
            keys.message_records(token, chat),
            idem_key.to_owned(),
            keys.memory_full(shard),
        ],
        args: vec![
            Cow::Borrowed(token),
            Cow::Owned(chat.to_string()),
            Cow::Borrowed(body),
            Cow::Owned(accepted_us.to_string()),
            Cow::Borrowed(fingerprint),
            Cow::Owned(idempotency::TTL_SECONDS.to_string()),
            Cow::Owned(max_entries.to_string()),
        ],
        seed: vec![
            vec!["HSET".into(), app_key, "id".into(), "1".into()],
            vec!["SET".into(), keys.chat_counter(token), chat.to_string()],
            vec![
                "HSET".into(),
                keys.message_counters(token),
                chat.to_string(),
                "0".into(),
            ],
        ],
    }
}

/// One call of a script, spelled out: for tools that drive it themselves.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ScriptCall<'a> {
    /// The Lua source.
    pub script: &'static str,
    /// The shard and cluster slot every key belongs to.
    pub shard: Shard,
    pub slot: u16,
    pub keys: Vec<String>,
    /// Borrowed where it can be: the body is not copied on the create path.
    pub args: Vec<Cow<'a, str>>,
    /// Commands that make the call succeed on an empty Redis: the application cached, its
    /// chats up to this one created.
    pub seed: Vec<Vec<String>>,
}

/// Answer of an update's enqueue.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued as this stream entry.
    Entry(String),
    /// The write backlog is over its bound: nothing was queued.
    Full,
}

/// How long the memory flag outlives the last measure that set it.
const MEMORY_FLAG_TTL_SECONDS: u64 = 5;

impl Queue {
    /// A queue of `shards` shards with no backlog bound; see [`Queue::with_limits`].
    /// `conn` is connected to `target` with `timeout`.
    pub fn new(
        conn: RedisConn,
        target: Target,
        timeout: std::time::Duration,
        prefix: &str,
        shards: u16,
    ) -> Self {
        Self {
            conn,
            target,
            timeout,
            keys: Keys::new(prefix, shards),
            max_entries: u64::MAX,
            max_memory: None,
            scripts: Scripts::new(),
        }
    }

    /// Refuse creates and updates while a shard's stream holds `max_entries` or more, or
    /// while its Redis uses more than `max_memory` bytes (default: 90% of `maxmemory`).
    pub fn with_limits(mut self, max_entries: u64, max_memory: Option<u64>) -> Self {
        self.max_entries = max_entries;
        self.max_memory = max_memory;
        self
    }

    /// A clone of the shared connection (for commands that do not block).
    pub fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// A connection of its own, for reads that block up to `block`: a blocking command
    /// would hold up every other command on the shared connection.
    pub async fn reader(&self, block: std::time::Duration) -> redis::RedisResult<RedisConn> {
        RedisConn::connect(&self.target, self.timeout + block).await
    }

    /// Measures a shard's backlog on the Redis that holds it, and sets or clears the
    /// memory flag that the scripts check. Called every second by the workers.
    pub async fn measure_pressure(&self, shard: Shard) -> redis::RedisResult<Pressure> {
        self.measure(shard, true).await
    }

    /// A shard's backlog against its bounds, measured now (reads only).
    pub async fn pressure(&self, shard: Shard) -> redis::RedisResult<Pressure> {
        self.measure(shard, false).await
    }

    async fn measure(&self, shard: Shard, set_flag: bool) -> redis::RedisResult<Pressure> {
        let (entries, used_memory, limit, full): (u64, u64, u64, u8) = self
            .scripts
            .measure
            .key(self.keys.stream(shard))
            .key(self.keys.memory_full(shard))
            .arg(self.max_memory.map(|m| m.to_string()).unwrap_or_default())
            .arg(self.max_entries)
            .arg(MEMORY_FLAG_TTL_SECONDS)
            .arg(if set_flag { "1" } else { "0" })
            .invoke_async(&mut self.conn())
            .await?;
        Ok(Pressure {
            entries,
            used_memory,
            memory_limit: (limit > 0).then_some(limit),
            full: full == 1,
        })
    }

    /// Whether creates and updates are refused now in any shard (reads only).
    pub async fn any_shard_full(&self) -> redis::RedisResult<bool> {
        for shard in self.keys.shards() {
            if self.pressure(shard).await?.full {
                return Ok(true);
            }
        }
        Ok(false)
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
        pipe.exec_async(&mut self.conn()).await
    }

    pub async fn cached_application_id(&self, token: &str) -> redis::RedisResult<Option<u64>> {
        self.conn().hget(self.keys.application(token), "id").await
    }

    /// Sets the application's chat counter to `value` if it is missing.
    pub async fn restore_chat_counter(&self, token: &str, value: u64) -> redis::RedisResult<()> {
        let _: bool = self
            .conn()
            .set_nx(self.keys.chat_counter(token), value)
            .await?;
        Ok(())
    }

    /// Sets a chat's message counter to `value` if it is missing.
    pub async fn restore_message_counter(
        &self,
        token: &str,
        chat: u64,
        value: u64,
    ) -> redis::RedisResult<()> {
        let _: bool = self
            .conn()
            .hset_nx(self.keys.message_counters(token), chat, value)
            .await?;
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
        let shard = self.keys.shard_of(token);
        let reply = self
            .scripts
            .create_chat
            .key(&app_key)
            .key(self.keys.chat_counter(token))
            .key(self.keys.stream(shard))
            .key(self.keys.chat_records(token))
            .key(self.keys.message_counters(token))
            .key(idem_key)
            .key(self.keys.memory_full(shard))
            .arg(token)
            .arg(to_micros(at))
            .arg(if title.is_some() { "1" } else { "0" })
            .arg(title.unwrap_or(""))
            .arg(fingerprint)
            .arg(idempotency::TTL_SECONDS)
            .arg(self.max_entries)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(Allocation::from_reply(reply)?)
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
        let call = self.create_message_call(token, chat, body, to_micros(at), idempotency);
        let mut invocation = self.scripts.create_message.prepare_invoke();
        for key in &call.keys {
            invocation.key(key);
        }
        for arg in &call.args {
            invocation.arg(arg.as_ref());
        }
        let reply = invocation.invoke_async(&mut self.conn()).await?;
        Ok(Allocation::from_reply(reply)?)
    }

    /// The create-message script's `KEYS` and `ARGV` for one message (see
    /// [`create_message_call`]).
    pub fn create_message_call<'a>(
        &self,
        token: &'a str,
        chat: u64,
        body: &'a str,
        accepted_us: i64,
        idempotency: Option<(&str, &'a str)>,
    ) -> ScriptCall<'a> {
        create_message_call(
            &self.keys,
            self.max_entries,
            token,
            (chat, body),
            accepted_us,
            idempotency,
        )
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
        let hash = self.keys.chat_records(token);
        self.enqueue_update(&entry, hash, chat.number, chat.messages_count, None)
            .await
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
        let hash = self.keys.message_records(token, message.chat_number);
        let mark = self.keys.message_update_mark(token, message.chat_number);
        self.enqueue_update(&entry, hash, message.number, 0, Some(mark))
            .await
    }

    async fn enqueue_update(
        &self,
        entry: &QueuedWrite,
        records: String,
        field: u64,
        messages_count: u64,
        update_mark: Option<String>,
    ) -> redis::RedisResult<Enqueued> {
        let shard = self.keys.shard_of(&entry.token);
        let mut call = self.scripts.enqueue_update.prepare_invoke();
        call.key(self.keys.stream(shard))
            .key(records)
            .key(self.keys.memory_full(shard))
            .arg(entry.encode())
            .arg(messages_count)
            .arg(self.max_entries)
            .arg(field);
        if let Some(mark) = update_mark {
            call.key(mark).arg(UPDATE_MARK_LIFETIME.as_secs());
        }
        let reply: String = call.invoke_async(&mut self.conn()).await?;
        Ok(if reply == "full" {
            Enqueued::Full
        } else {
            Enqueued::Entry(reply)
        })
    }

    /// The pending record `field` of the hash `records` with the entry it points to, and
    /// the token's cached application id. A record that cannot be decoded, or whose entry
    /// is gone, is an error: never "not pending".
    async fn pending(
        &self,
        token: &str,
        records: String,
        field: u64,
        update_mark: Option<String>,
    ) -> redis::RedisResult<Lookup<Pending>> {
        let mut call = self.scripts.read_pending.prepare_invoke();
        call.key(records)
            .key(self.keys.stream(self.keys.shard_of(token)))
            .key(self.keys.application(token))
            .arg(field);
        if let Some(mark) = update_mark {
            call.key(mark);
        }
        let (app_id, record, entry, update_mark): (
            Option<u64>,
            Option<String>,
            Option<String>,
            Option<String>,
        ) = call.invoke_async(&mut self.conn()).await?;
        let Some(record) = record else {
            return Ok(Lookup {
                pending: None,
                app_id,
                update_mark,
            });
        };
        let record = Record::decode(&record)?;
        let entry = entry.ok_or_else(|| {
            CodecError::Record(format!("{}: its entry is missing", record.version))
        })?;
        let entry = QueuedWrite::decode(&entry)?;
        Ok(Lookup {
            pending: Some(Pending { record, entry }),
            app_id,
            update_mark,
        })
    }

    /// Whether chat `number` of `token` exists, and the application's cached id: every
    /// number up to the application's chat counter was handed out, and its create queued
    /// with it, as message creates and message pages also rely on (`None`: unknown, the
    /// counter is missing). One round trip, no script.
    pub async fn chat_exists(
        &self,
        token: &str,
        number: u64,
    ) -> redis::RedisResult<(Option<u64>, Option<bool>)> {
        let (app_id, chats): (Option<u64>, Option<u64>) = redis::pipe()
            .hget(self.keys.application(token), "id")
            .get(self.keys.chat_counter(token))
            .query_async(&mut self.conn())
            .await?;
        Ok((app_id, chats.map(|chats| number <= chats)))
    }

    /// Chat `number` of `token` if it is not persisted yet, and the application's id.
    pub async fn lookup_chat(&self, token: &str, number: u64) -> redis::RedisResult<Lookup<Chat>> {
        let found = self
            .pending(token, self.keys.chat_records(token), number, None)
            .await?;
        Ok(Lookup {
            pending: found
                .pending
                .and_then(|Pending { record, entry }| pending_chat(number, record, entry)),
            app_id: found.app_id,
            update_mark: None,
        })
    }

    /// Message `number` of a chat if it is not persisted yet, and the application's id.
    pub async fn lookup_message(
        &self,
        token: &str,
        chat: u64,
        number: u64,
    ) -> redis::RedisResult<Lookup<Message>> {
        let records = self.keys.message_records(token, chat);
        let mark = self.keys.message_update_mark(token, chat);
        let found = self.pending(token, records, number, Some(mark)).await?;
        Ok(Lookup {
            pending: found
                .pending
                .and_then(|Pending { entry, .. }| pending_message(chat, number, entry)),
            app_id: found.app_id,
            update_mark: found.update_mark,
        })
    }

    /// The pending chats among up to `limit` numbers from `first` (in `direction`), the
    /// application's chat counter and its cached id.
    pub async fn page_of_chats(
        &self,
        token: &str,
        first: u64,
        direction: Direction,
        limit: u32,
    ) -> redis::RedisResult<PageLookup<Chat>> {
        let keys = [
            self.keys.application(token),
            self.keys.chat_counter(token),
            self.keys.chat_records(token),
        ];
        let found = self
            .read_page(token, keys, None, first, direction, limit)
            .await?;
        Ok(found.map(pending_chat))
    }

    /// The pending messages among up to `limit` numbers from `first` (in `direction`),
    /// the chat's message counter, whether the chat exists, and the application's id.
    pub async fn page_of_messages(
        &self,
        token: &str,
        chat: u64,
        first: u64,
        direction: Direction,
        limit: u32,
    ) -> redis::RedisResult<PageLookup<Message>> {
        let keys = [
            self.keys.application(token),
            self.keys.message_counters(token),
            self.keys.message_records(token, chat),
        ];
        let mark = self.keys.message_update_mark(token, chat);
        let found = self
            .read_page(token, keys, Some((chat, mark)), first, direction, limit)
            .await?;
        Ok(found.map(|number, _, entry| pending_message(chat, number, entry)))
    }

    async fn read_page(
        &self,
        token: &str,
        [app, counter, records]: [String; 3],
        chat: Option<(u64, String)>,
        first: u64,
        direction: Direction,
        limit: u32,
    ) -> redis::RedisResult<PageLookup<Pending>> {
        let field = chat
            .as_ref()
            .map(|(c, _)| c.to_string())
            .unwrap_or_default();
        let mut call = self.scripts.read_page.prepare_invoke();
        call.key(app)
            .key(counter)
            .key(records)
            .key(self.keys.stream(self.keys.shard_of(token)))
            .key(self.keys.chat_counter(token))
            .arg(&field)
            .arg(first)
            .arg(match direction {
                Direction::Asc => "asc",
                Direction::Desc => "desc",
            })
            .arg(limit)
            .arg(&field);
        if let Some((_, mark)) = chat {
            call.key(mark);
        }
        let (app_id, last, chat_exists, found, update_mark): PageAnswer =
            call.invoke_async(&mut self.conn()).await?;
        let mut pending = std::collections::BTreeMap::new();
        for item in found.chunks(3) {
            let [Some(number), Some(record), entry] = item else {
                return Err(CodecError::Answer("a page's pending record".into()).into());
            };
            let number: u64 = number
                .parse()
                .map_err(|_| CodecError::Answer(format!("page number `{number}`")))?;
            let record = Record::decode(record)?;
            let entry = entry.as_deref().ok_or_else(|| {
                CodecError::Record(format!("{}: its entry is missing", record.version))
            })?;
            let entry = QueuedWrite::decode(entry)?;
            pending.insert(number, Pending { record, entry });
        }
        Ok(PageLookup {
            app_id,
            last,
            chat_exists: match chat_exists {
                0 => Some(false),
                1 => Some(true),
                _ => None,
            },
            pending,
            update_mark,
        })
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
        let mut conn = self.conn();
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
        self.conn()
            .set_ex(
                key,
                format!("done|{fingerprint}|{answer}"),
                idempotency::TTL_SECONDS,
            )
            .await
    }

    /// Frees `key` after its request failed, so that a retry can proceed.
    pub async fn abandon(&self, key: &str) -> redis::RedisResult<()> {
        self.conn().del(key).await
    }

    /// Whether Redis serves: `PING` on one node; on a cluster, `cluster_state:ok` (every
    /// slot has a master that answers).
    pub async fn ping(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn();
        if !conn.is_cluster() {
            return redis::cmd("PING")
                .query_async::<Value>(&mut conn)
                .await
                .map(drop);
        }
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await?;
        if info.lines().any(|l| l.trim() == "cluster_state:ok") {
            Ok(())
        } else {
            Err(redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                "cluster_state is not ok",
            )))
        }
    }
}
