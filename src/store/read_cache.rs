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
//! Only what is read twice is kept ([`ReadCache::offer`]): a message the second time it
//! is read from MySQL within the memory of a small admission table, a page the second
//! time the same window is read. Reads spread over more messages than the cache holds
//! (a client paging through a long history, reads at random) then cost no copying and
//! no evictions, and do not push out the messages that are read again and again.
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
    /// Taken under the chat's current update `mark`, and younger than [`MAX_AGE`].
    fn is_current(&self, mark: Option<&str>) -> bool {
        self.mark.as_deref() == mark && self.taken.elapsed() < MAX_AGE
    }

    fn weight(&self) -> usize {
        OVERHEAD + self.message.body.len() + self.mark.as_ref().map_or(0, String::len)
    }
}

struct Copies {
    lru: LruCache<MessageKey, Copy>,
    bytes: usize,
    /// The admission table: fingerprints of the reads offered lately, one per slot
    /// (a newer read takes the slot of an older one).
    seen: Vec<u64>,
}

impl Copies {
    /// True when `fingerprint` was offered before and still holds its slot; else it
    /// takes the slot.
    fn seen_before(&mut self, fingerprint: u64) -> bool {
        // The table's length is a power of two.
        let at = fingerprint as usize & (self.seen.len().max(1) - 1);
        let Some(slot) = self.seen.get_mut(at) else {
            return false;
        };
        let again = *slot == fingerprint;
        *slot = fingerprint;
        again
    }
}

/// The admission table's slots for a budget: one per copy the budget can hold at the
/// most (8 bytes per [`OVERHEAD`] bytes of budget, about 3% more memory), a power of two.
fn seen_slots(budget: usize) -> usize {
    if budget == 0 {
        return 0;
    }
    (budget / OVERHEAD).max(1).next_power_of_two()
}

/// What the admission table remembers of a read: a hash of what identifies it.
fn fingerprint(parts: [u64; 4]) -> u64 {
    // FNV-1a over the words, then a finalizer that spreads every bit (SplitMix64's).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        h = (h ^ part).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    // 0 marks an empty slot.
    (h ^ (h >> 31)).max(1)
}

/// Thread-safe; one per API process, shared by its requests.
pub struct ReadCache {
    copies: Mutex<Copies>,
    budget: usize,
    // Registered once: the registry's look-up of a metric by name costs more than the
    // rest of a lookup.
    bytes: metrics::Gauge,
    hits: metrics::Counter,
    misses: metrics::Counter,
}

impl ReadCache {
    /// A cache of at most `budget` bytes; 0 keeps nothing.
    pub fn new(budget: usize) -> Self {
        Self {
            copies: Mutex::new(Copies {
                lru: LruCache::unbounded(),
                bytes: 0,
                seen: vec![0; seen_slots(budget)],
            }),
            budget,
            bytes: metrics::gauge!("read_cache_bytes"),
            hits: metrics::counter!("read_cache_lookups_total", "outcome" => "hit"),
            misses: metrics::counter!("read_cache_lookups_total", "outcome" => "miss"),
        }
    }

    fn count(&self, found: bool) {
        if found {
            self.hits.increment(1);
        } else {
            self.misses.increment(1);
        }
    }

    /// The copy of `key`, if it was taken under the chat's current update `mark` and is
    /// younger than [`MAX_AGE`].
    pub fn get(&self, key: &MessageKey, mark: Option<&str>) -> Option<Message> {
        if self.budget == 0 {
            return None;
        }
        let mut copies = self.lock();
        let current = copies.lru.get(key).is_some_and(|c| c.is_current(mark));
        let found = if current {
            copies.lru.get(key).map(|c| c.message.clone())
        } else {
            if let Some(old) = copies.lru.pop(key) {
                copies.bytes -= old.weight();
                self.bytes.set(copies.bytes as f64);
            }
            None
        };
        drop(copies);
        self.count(found.is_some());
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
                    .filter(|c| c.is_current(mark))
                    .map(|c| c.message.clone())
            })
            .collect();
        drop(copies);
        self.count(found.is_some());
        found
    }

    /// Keeps `message`, read from MySQL after Redis showed the chat's update `mark`, if
    /// it was offered before (see the module's documentation).
    pub fn offer(&self, key: MessageKey, mark: Option<String>, message: Message) {
        if self.admits(fingerprint([key.app_id, key.chat, key.number, 0])) {
            self.put(key, mark, message);
        }
    }

    /// Keeps `messages`, the persisted rows of a page whose window of numbers was
    /// `lo..=hi`, if the same window was offered before.
    pub fn offer_page(
        &self,
        app_id: u64,
        chat: u64,
        (lo, hi): (u64, u64),
        mark: Option<String>,
        messages: impl IntoIterator<Item = Message>,
    ) {
        // Told apart from a single read's by the last word (a window is never empty).
        if self.admits(fingerprint([app_id, chat, lo, hi.wrapping_add(1)])) {
            self.put_all(app_id, chat, mark, messages);
        }
    }

    fn admits(&self, fingerprint: u64) -> bool {
        self.budget > 0 && self.lock().seen_before(fingerprint)
    }

    /// Keeps `message`, read from MySQL after Redis showed the chat's update `mark`.
    pub fn put(&self, key: MessageKey, mark: Option<String>, message: Message) {
        self.put_all(key.app_id, key.chat, mark, std::iter::once(message));
    }

    /// Keeps `messages` of a chat, read from MySQL after Redis showed the chat's update
    /// `mark` (one lock for a page).
    pub fn put_all(
        &self,
        app_id: u64,
        chat: u64,
        mark: Option<String>,
        messages: impl IntoIterator<Item = Message>,
    ) {
        if self.budget == 0 {
            return;
        }
        let taken = Instant::now();
        let mut copies = self.lock();
        for message in messages {
            let key = MessageKey {
                app_id,
                chat,
                number: message.number,
            };
            let copy = Copy {
                message,
                mark: mark.clone(),
                taken,
            };
            let weight = copy.weight();
            if weight > self.budget / 8 {
                continue;
            }
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
        }
        self.bytes.set(copies.bytes as f64);
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
    fn only_what_is_read_twice_is_kept() {
        let cache = ReadCache::new(1 << 20);
        cache.offer(key(1), None, message(1, "once"));
        assert!(cache.get(&key(1), None).is_none(), "read once");
        cache.offer(key(1), None, message(1, "twice"));
        assert_eq!(cache.get(&key(1), None).unwrap().body, "twice");
        // A page's rows go in when the same window is read again.
        let page = || (11..=13).map(|n| message(n, "p"));
        cache.offer_page(7, 1, (11, 13), None, page());
        assert!(
            cache.get_all(7, 1, 11..=13, None).is_none(),
            "window read once"
        );
        cache.offer_page(7, 1, (11, 14), None, page());
        assert!(
            cache.get_all(7, 1, 11..=13, None).is_none(),
            "another window"
        );
        cache.offer_page(7, 1, (11, 13), None, page());
        assert!(cache.get_all(7, 1, 11..=13, None).is_some());
    }

    #[test]
    fn a_scan_through_a_long_history_keeps_nothing_and_evicts_nothing() {
        let cache = ReadCache::new(64 * (OVERHEAD + 1));
        cache.offer(key(1), None, message(1, "h"));
        cache.offer(key(1), None, message(1, "h"));
        for lo in (100..100_000).step_by(50) {
            let rows = (lo..lo + 50).map(|n| message(n, "s"));
            cache.offer_page(7, 1, (lo, lo + 49), None, rows);
        }
        assert!(cache.get(&key(1), None).is_some(), "the hot copy stayed");
        assert_eq!(cache.lock().lru.len(), 1);
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let cache = ReadCache::new(0);
        cache.put(key(1), None, message(1, "x"));
        assert!(cache.get(&key(1), None).is_none());
        assert_eq!(cache.lock().lru.len(), 0);
    }
}
