//! Every Redis key name, in one place.
//!
//! The write queue is split into a fixed number of shards (`REDIS_SHARDS`). An
//! application belongs to one shard, chosen by a stable hash of its token, and every key
//! of the application shares its shard's hash tag with the shard's stream, dead-letter
//! stream and sets. Each script therefore touches one cluster slot, and a Redis Cluster
//! spreads applications over its masters shard by shard.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{S}:a:T` | hash | `id`: the application's MySQL id (the token cache) |
//! | `P:{S}:n:T` | string | last chat number handed out |
//! | `P:{S}:mn:T` | hash | chat number → last message number handed out in it |
//! | `P:{S}:pc:T` | hash | chat number → its pending record, until persisted |
//! | `P:{S}:pm:T:C` | hash | message number → its pending record, until persisted |
//! | `P:{S}:mu:T:C` | string, expires | the entry id of the chat's latest message update (the read cache's mark) |
//! | `P:{S}:ic:T:K`, `P:{S}:im:T:C:K` | string | an `Idempotency-Key` of a chat or message create |
//! | `P:{S}:q` | stream | the shard's write queue: one entry per create or update |
//! | `P:{S}:dlq` | stream | entries no worker could handle, with the reason |
//! | `P:{S}:touched` | set | parents whose counts need a refresh |
//! | `P:{S}:full` | string | exists while the shard's Redis is over `QUEUE_MAX_MEMORY` (expires) |
//! | `P:{S}:index:gap` | string | oldest entry the indexer had not handled when the stream was trimmed past it |
//! | `P:{S}:index:catchup` | string | where the indexer's catch-up from MySQL starts, while it runs |
//! | `P:idem:apps:K` | string | an `Idempotency-Key` of an application create |
//! | `P:search:index-id` | string | the id of the embedded index the index group feeds |
//!
//! `P` is `REDIS_PREFIX`, `S` the shard's hash tag, `T` a token, `C` a chat number and
//! `K` an idempotency key.
//!
//! # Shard tags
//! Redis Cluster places a key by the CRC16 of its hash tag, and `redis-cli --cluster
//! create` gives each master one contiguous range of the 16,384 slots. Shard `i` of `n`
//! takes the first tag `i.k` (k = 0, 1, …) whose slot lies near the middle of the `i`-th
//! of `n` equal slot ranges, so shards spread over the masters as evenly as their slot
//! ranges are: 64 shards over 3 masters give 21, 21 and 22.

use std::sync::Arc;

/// Slots of a Redis Cluster.
const SLOTS: u32 = 16_384;
/// Most shards: each then still owns a range of 16 slots to find its tag in.
pub const MAX_SHARDS: u16 = 1024;

/// A shard of the write queue: an index in `0..REDIS_SHARDS`.
pub type Shard = usize;

/// Names of the keys, all under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
    /// `{tag}` of each shard, braces included.
    tags: Arc<[String]>,
}

impl Keys {
    /// Keys for `shards` shards (1 to [`MAX_SHARDS`]; out-of-range values are clamped).
    pub fn new(prefix: &str, shards: u16) -> Self {
        let shards = shards.clamp(1, MAX_SHARDS);
        let tags = (0..shards)
            .map(|i| format!("{{{}}}", shard_tag(i, shards)))
            .collect();
        Self {
            prefix: prefix.to_owned(),
            tags,
        }
    }

    pub fn shard_count(&self) -> usize {
        self.tags.len()
    }

    pub fn shards(&self) -> std::ops::Range<Shard> {
        0..self.tags.len()
    }

    /// The shard of an application: FNV-1a of its token, stable across versions and hosts.
    pub fn shard_of(&self, token: &str) -> Shard {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in token.as_bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        (hash % self.tags.len() as u64) as usize
    }

    fn of(&self, shard: Shard, rest: std::fmt::Arguments<'_>) -> String {
        format!("{}:{}:{rest}", self.prefix, self.tags[shard])
    }

    fn app_key(&self, token: &str, rest: std::fmt::Arguments<'_>) -> String {
        self.of(self.shard_of(token), rest)
    }

    pub fn application(&self, token: &str) -> String {
        self.app_key(token, format_args!("a:{token}"))
    }
    pub fn chat_counter(&self, token: &str) -> String {
        self.app_key(token, format_args!("n:{token}"))
    }
    /// Hash: chat number → last message number.
    pub fn message_counters(&self, token: &str) -> String {
        self.app_key(token, format_args!("mn:{token}"))
    }
    /// Hash: chat number → pending record.
    pub fn chat_records(&self, token: &str) -> String {
        self.app_key(token, format_args!("pc:{token}"))
    }
    /// Hash: message number → pending record.
    pub fn message_records(&self, token: &str, chat: u64) -> String {
        self.app_key(token, format_args!("pm:{token}:{chat}"))
    }
    /// String, expiring: the entry id of the chat's latest message update (see
    /// `store::read_cache`).
    pub fn message_update_mark(&self, token: &str, chat: u64) -> String {
        self.app_key(token, format_args!("mu:{token}:{chat}"))
    }
    pub fn idempotency_chats(&self, token: &str, key: &str) -> String {
        self.app_key(token, format_args!("ic:{token}:{key}"))
    }
    pub fn idempotency_messages(&self, token: &str, chat: u64, key: &str) -> String {
        self.app_key(token, format_args!("im:{token}:{chat}:{key}"))
    }
    pub fn idempotency_applications(&self, key: &str) -> String {
        format!("{}:idem:apps:{key}", self.prefix)
    }
    /// The id of the embedded search index the index group feeds (`search::identity`).
    pub fn search_index_id(&self) -> String {
        format!("{}:search:index-id", self.prefix)
    }

    pub fn stream(&self, shard: Shard) -> String {
        self.of(shard, format_args!("q"))
    }
    pub fn dead_letters(&self, shard: Shard) -> String {
        self.of(shard, format_args!("dlq"))
    }
    pub fn touched(&self, shard: Shard) -> String {
        self.of(shard, format_args!("touched"))
    }
    /// Exists while the shard's Redis is over `QUEUE_MAX_MEMORY` (set by the workers).
    pub fn memory_full(&self, shard: Shard) -> String {
        self.of(shard, format_args!("full"))
    }
    pub fn index_gap(&self, shard: Shard) -> String {
        self.of(shard, format_args!("index:gap"))
    }
    pub fn index_catch_up(&self, shard: Shard) -> String {
        self.of(shard, format_args!("index:catchup"))
    }

    /// The cluster slot of a shard's keys.
    pub fn slot_of(&self, shard: Shard) -> u16 {
        slot(self.tags[shard].trim_matches(['{', '}']))
    }
}

/// The cluster slot of a hash tag (CRC16/XMODEM, as Redis Cluster computes it).
pub fn slot(tag: &str) -> u16 {
    (u32::from(crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes())) % SLOTS) as u16
}

/// The first tag `i.k` whose slot lies near the middle of the `i`-th of `n` equal slot
/// ranges (within an eighth of the range): any contiguous split of the slots into equal
/// ranges then holds as many shard middles, give or take one.
fn shard_tag(i: u16, n: u16) -> String {
    let range = SLOTS / u32::from(n);
    let middle = u32::from(i) * SLOTS / u32::from(n) + range / 2;
    let reach = (range / 8).max(1);
    (0u32..)
        .map(|k| format!("{i}.{k}"))
        .find(|tag| u32::from(slot(tag)).abs_diff(middle) <= reach)
        .unwrap_or_else(|| i.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_an_application_shares_its_shard_tag() {
        let keys = Keys::new("cs", 16);
        let shard = keys.shard_of("T");
        let tag = &keys.tags[shard];
        for key in [
            keys.application("T"),
            keys.chat_counter("T"),
            keys.message_counters("T"),
            keys.chat_records("T"),
            keys.message_records("T", 3),
            keys.idempotency_chats("T", "k{x}"),
            keys.idempotency_messages("T", 3, "k"),
            keys.stream(shard),
            keys.dead_letters(shard),
            keys.touched(shard),
            keys.memory_full(shard),
            keys.index_gap(shard),
            keys.index_catch_up(shard),
        ] {
            assert!(key.starts_with(&format!("cs:{tag}:")), "{key}");
            assert_eq!(slot_of_key(&key), slot_of_key(&keys.stream(shard)), "{key}");
        }
    }

    fn slot_of_key(key: &str) -> u16 {
        let open = key.find('{').unwrap();
        let close = key[open..].find('}').unwrap() + open;
        slot(&key[open + 1..close])
    }

    #[test]
    fn a_token_always_has_the_same_shard() {
        let keys = Keys::new("cs", 16);
        // Pinned: changing the hash would move every application to another shard.
        assert_eq!(keys.shard_of("abc"), 0xe71fa2190541574b_u64 as usize % 16);
        let spread: std::collections::HashSet<_> = (0..200)
            .map(|i| keys.shard_of(&format!("token{i}")))
            .collect();
        assert_eq!(spread.len(), 16);
    }

    #[test]
    fn shards_spread_evenly_over_contiguous_slot_ranges() {
        for (shards, masters) in [(64u16, 3u32), (16, 3), (1024, 7), (5, 5)] {
            let keys = Keys::new("cs", shards);
            let mut per_master = vec![0u32; masters as usize];
            for tag in keys.tags.iter() {
                let slot = u32::from(slot(tag.trim_matches(['{', '}'])));
                per_master[(slot * masters / SLOTS) as usize] += 1;
            }
            let (min, max) = (
                *per_master.iter().min().unwrap(),
                *per_master.iter().max().unwrap(),
            );
            assert!(max - min <= 1, "{shards} over {masters}: {per_master:?}");
        }
    }
}
