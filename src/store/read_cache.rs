//! Persisted messages kept by an API process, so that reading one again skips MySQL.
//!
//! A message read takes one Redis round trip anyway (its pending record, see
//! `queue::Queue::lookup_message`). That trip also brings back the chat's *update mark*:
//! the stream entry id of the latest update of any message of the chat, which each
//! message update sets (`enqueue_update.lua`) for [`UPDATE_MARK_LIFETIME`]. A copy is
//! kept with the mark seen by the read that fetched it from MySQL, and served only while
//! the chat's mark is still that one:
//!
//! * An update queued before that read left a pending record (then the read served the
//!   record and kept nothing) or had been persisted (the worker commits the row before it
//!   deletes the record): the copy holds it.
//! * An update queued after it moved the mark, so the copy is no longer served.
//! * A mark does not outlive the copies it guards: a copy is served for at most
//!   [`MAX_AGE`], less than a mark's lifetime, so an expired mark (back to none) cannot
//!   make a copy taken before that update look current again.
//!
//! A chat with frequent updates has its copies refreshed often, but nothing stale is
//! served. Copies are bounded in bytes (`READ_CACHE_SIZE`), least recently used first out.
//!
//! What it trusts: that Redis keeps its marks. A Redis brought back in an earlier state
//! (the lost tail of its append-only file, a failover to a lagging replica) can lose the
//! mark of an update that already reached MySQL; a copy taken before that update may then
//! be served until it is [`MAX_AGE`] old. `READ_CACHE_SIZE=0` turns the cache off.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::resources::Message;

/// How long a message update's mark lasts in Redis. It bounds the marks' memory: one
/// small key (about 150 bytes) per chat updated in the last two minutes, and writes are
/// refused with the rest when Redis nears its `maxmemory`.
pub const UPDATE_MARK_LIFETIME: Duration = Duration::from_secs(120);
/// The longest a copy is served; it must stay below [`UPDATE_MARK_LIFETIME`]. A hot
/// message is read from MySQL once a minute per API process.
pub const MAX_AGE: Duration = Duration::from_secs(60);
const _: () = assert!(MAX_AGE.as_secs() < UPDATE_MARK_LIFETIME.as_secs());

/// Bytes counted for a copy besides its body and mark: the entry, the key, the LRU's node
/// and hash slot, the mark's own allocation and the allocator's rounding (an estimate on
/// the high side, so that the budget bounds the real memory).
const OVERHEAD: usize = 256;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct MessageKey {
    pub app_id: u64,
    pub chat: u64,
    pub number: u64,
}

struct Copy {
    message: Message,
    mark: Option<String>,
    taken: Instant,
}

impl Copy {
    fn weight(&self) -> usize {
        OVERHEAD + self.message.body.len() + self.mark.as_ref().map_or(0, String::len)
    }
}

struct Copies {
    lru: LruCache<MessageKey, Copy>,
    bytes: usize,
}

/// Thread-safe; one per API process, shared by its requests.
pub struct ReadCache {
    copies: Mutex<Copies>,
    budget: usize,
}

impl ReadCache {
    /// A cache of at most `budget` bytes; 0 keeps nothing.
    pub fn new(budget: usize) -> Self {
        Self {
            copies: Mutex::new(Copies {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            budget,
        }
    }

    /// The copy of `key`, if it was taken under the chat's current update `mark` and is
    /// younger than [`MAX_AGE`].
    pub fn get(&self, key: &MessageKey, mark: Option<&str>) -> Option<Message> {
        if self.budget == 0 {
            return None;
        }
        let mut copies = self.lock();
        let current = copies
            .lru
            .get(key)
            .is_some_and(|c| c.mark.as_deref() == mark && c.taken.elapsed() < MAX_AGE);
        let found = if current {
            copies.lru.get(key).map(|c| c.message.clone())
        } else {
            if let Some(old) = copies.lru.pop(key) {
                copies.bytes -= old.weight();
                metrics::gauge!("read_cache_bytes").set(copies.bytes as f64);
            }
            None
        };
        drop(copies);
        let outcome = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!("read_cache_lookups_total", "outcome" => outcome).increment(1);
        found
    }

    /// Copies of every one of `numbers` of a chat, each taken under `mark` and younger
    /// than [`MAX_AGE`], or `None` if any is missing (a page then reads MySQL once).
    pub fn get_all(
        &self,
        app_id: u64,
        chat: u64,
        numbers: impl Iterator<Item = u64>,
        mark: Option<&str>,
    ) -> Option<Vec<Message>> {
        if self.budget == 0 {
            return None;
        }
        let mut copies = self.lock();
        let found: Option<Vec<Message>> = numbers
            .map(|number| {
                let key = MessageKey {
                    app_id,
                    chat,
                    number,
                };
                copies
                    .lru
                    .get(&key)
                    .filter(|c| c.mark.as_deref() == mark && c.taken.elapsed() < MAX_AGE)
                    .map(|c| c.message.clone())
            })
            .collect();
        drop(copies);
        let outcome = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!("read_cache_lookups_total", "outcome" => outcome).increment(1);
        found
    }

    /// Keeps `message`, read from MySQL after Redis showed the chat's update `mark`.
    pub fn put(&self, key: MessageKey, mark: Option<String>, message: Message) {
        let copy = Copy {
            message,
            mark,
            taken: Instant::now(),
        };
        let weight = copy.weight();
        if weight > self.budget / 8 {
            return;
        }
        let mut copies = self.lock();
        if let Some(old) = copies.lru.put(key, copy) {
            copies.bytes -= old.weight();
        }
        copies.bytes += weight;
        while copies.bytes > self.budget {
            match copies.lru.pop_lru() {
                Some((_, old)) => copies.bytes -= old.weight(),
                None => break,
            }
        }
        metrics::gauge!("read_cache_bytes").set(copies.bytes as f64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Copies> {
        self.copies.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::now;

    fn message(number: u64, body: &str) -> Message {
        Message {
            number,
            chat_number: 1,
            body: body.into(),
            created_at: now(),
            updated_at: now(),
        }
    }

    fn key(number: u64) -> MessageKey {
        MessageKey {
            app_id: 7,
            chat: 1,
            number,
        }
    }

    #[test]
    fn a_copy_is_served_only_under_the_mark_it_was_taken_with() {
        let cache = ReadCache::new(1 << 20);
        cache.put(key(1), None, message(1, "first"));
        assert_eq!(cache.get(&key(1), None).unwrap().body, "first");
        assert!(
            cache.get(&key(1), Some("1700000000000-0")).is_none(),
            "an update since"
        );
        assert!(
            cache.get(&key(1), None).is_none(),
            "a stale copy is dropped"
        );
        cache.put(key(2), Some("1-0".into()), message(2, "second"));
        assert!(cache.get(&key(2), None).is_none(), "the mark expired");
        assert!(
            cache.get(&key(2), Some("1-0")).is_none(),
            "and the copy with it"
        );
    }

    #[test]
    fn copies_stay_within_the_budget_least_recently_used_first_out() {
        let body = "x".repeat(1000);
        let cache = ReadCache::new(10 * (OVERHEAD + 1000));
        for n in 1..=10 {
            cache.put(key(n), None, message(n, &body));
        }
        assert!(cache.get(&key(1), None).is_some());
        cache.put(key(11), None, message(11, &body));
        assert!(
            cache.get(&key(2), None).is_none(),
            "the least recently used went"
        );
        assert!(cache.get(&key(1), None).is_some());
        assert!(cache.get(&key(11), None).is_some());
        assert!(cache.lock().bytes <= 10 * (OVERHEAD + 1000));
    }

    #[test]
    fn a_page_is_served_only_when_every_copy_is_current() {
        let cache = ReadCache::new(1 << 20);
        for n in 1..=3 {
            cache.put(key(n), Some("5-0".into()), message(n, "m"));
        }
        let page = cache.get_all(7, 1, 1..=3, Some("5-0")).unwrap();
        assert_eq!(page.iter().map(|m| m.number).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(
            cache.get_all(7, 1, 1..=4, Some("5-0")).is_none(),
            "4 is missing"
        );
        assert!(
            cache.get_all(7, 1, 1..=3, Some("6-0")).is_none(),
            "an update since"
        );
        assert!(
            cache.get_all(7, 2, 1..=3, Some("5-0")).is_none(),
            "another chat"
        );
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let cache = ReadCache::new(0);
        cache.put(key(1), None, message(1, "x"));
        assert!(cache.get(&key(1), None).is_none());
        assert_eq!(cache.lock().lru.len(), 0);
    }
}
