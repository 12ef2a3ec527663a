//! The matches of heavy scans, kept per part of a segment, so that the same search again
//! does not test every candidate again.
//!
//! A segment never changes once written, except that documents of it get deleted (a
//! replaced version). So the documents of a part of a segment (a range of its document
//! ids) that hold a chat's terms stay the same for as long as the segment lives, and a
//! search can take them from here instead of reading and testing the positions of every
//! candidate. A search checks each kept document against the segment's deletions as it
//! does any other, so a replaced version is never served; documents written since are in
//! newer segments, which are scanned as usual. A merged-away segment's entries are no
//! longer asked for, and make way for others.
//!
//! Only what is costly and complete is kept ([`MIN_CANDIDATES`], [`MatchCache::keep`]):
//! a scan that tested every candidate of its part, at least that many, and found few
//! enough matches. A scan that stopped testing once its page was full knows only the
//! first matches, and is not kept. While it may be kept, a scan tests deleted documents
//! too (and keeps those that match): a search that took its snapshot before their
//! deletion still has them live, and checks the deletions of its own snapshot. A search with a term never seen (an attacker varying
//! the term, say) costs what it costs without the cache: the cache spares repeats
//! (clients polling a search, many users searching the same words, pages after the
//! first), not the first search of a term.
//!
//! Entries are bounded in bytes, least recently used first out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use tantivy::DocId;
use tantivy::index::SegmentId;

/// A scan of fewer candidates than this is cheap enough to do again (at most some
/// 0.1 ms: a candidate of the adversarial chat of `scripts/bench`, 2,000 characters
/// holding every gram of the term, takes about 0.45 µs).
pub const MIN_CANDIDATES: u32 = 256;
/// Bytes counted for an entry besides its documents: the key's strings are counted on
/// top; this covers the entry, the LRU's node and hash slot and the allocator's rounding.
const OVERHEAD: usize = 256;
/// The cache's bytes, for the whole process.
pub const BUDGET: usize = 4 * 1024 * 1024;

/// What a search asks: the chat and its folded terms, in a canonical order.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Asked {
    pub token: String,
    pub chat: u64,
    /// Sorted, without repeats: the order of the terms does not change the matches.
    pub terms: Vec<String>,
}

impl Asked {
    pub fn new(token: &str, chat: u64, terms: &[String]) -> Self {
        let mut terms = terms.to_vec();
        terms.sort_unstable();
        terms.dedup();
        Self {
            token: token.to_owned(),
            chat,
            terms,
        }
    }

    fn bytes(&self) -> usize {
        self.token.len() + self.terms.iter().map(|t| t.len() + 24).sum::<usize>()
    }
}

/// One part of one segment, for one search.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartKey {
    pub segment: SegmentId,
    pub from: DocId,
    pub to: DocId,
    pub asked: Arc<Asked>,
}

struct Entries {
    lru: LruCache<PartKey, Arc<[DocId]>>,
    bytes: usize,
}

/// Thread-safe; one per open index, shared by its searches.
pub struct MatchCache {
    entries: Mutex<Entries>,
    budget: usize,
    /// Lookups answered so far (for tests and tools).
    answered: AtomicU64,
    hits: metrics::Counter,
    misses: metrics::Counter,
}

impl MatchCache {
    /// A cache of at most `budget` bytes; 0 keeps nothing.
    pub fn new(budget: usize) -> Self {
        Self {
            entries: Mutex::new(Entries {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            budget,
            answered: AtomicU64::new(0),
            hits: metrics::counter!("search_match_cache_lookups_total", "outcome" => "hit"),
            misses: metrics::counter!("search_match_cache_lookups_total", "outcome" => "miss"),
        }
    }

    fn weight(key: &PartKey, docs: &[DocId]) -> usize {
        OVERHEAD + key.asked.bytes() + std::mem::size_of_val(docs)
    }

    /// The matches kept for `key`, in increasing document order.
    pub fn get(&self, key: &PartKey) -> Option<Arc<[DocId]>> {
        let found = self
            .entries
            .lock()
            .ok()
            .and_then(|mut entries| entries.lru.get(key).cloned());
        match &found {
            Some(_) => {
                self.answered.fetch_add(1, Ordering::Relaxed);
                self.hits.increment(1);
            }
            None => self.misses.increment(1),
        }
        found
    }

    /// Keeps the matches of a complete scan of `key`'s part (see the module
    /// documentation). An entry over a sixteenth of the budget is not kept: it would
    /// push out many others.
    pub fn keep(&self, key: PartKey, docs: &[DocId]) {
        let weight = Self::weight(&key, docs);
        if weight > self.budget / 16 {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if let Some(old) = entries.lru.put(key.clone(), docs.into()) {
            entries.bytes -= Self::weight(&key, &old);
        }
        entries.bytes += weight;
        while entries.bytes > self.budget {
            match entries.lru.pop_lru() {
                Some((key, docs)) => entries.bytes -= Self::weight(&key, &docs),
                None => break,
            }
        }
    }

    /// Lookups answered from the cache so far (for tests and tools).
    pub fn hits(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Entries kept, and their bytes (for tests and tools).
    pub fn usage(&self) -> (usize, usize) {
        self.entries
            .lock()
            .map(|e| (e.lru.len(), e.bytes))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(segment: SegmentId, from: DocId, term: &str) -> PartKey {
        PartKey {
            segment,
            from,
            to: tantivy::TERMINATED,
            asked: Arc::new(Asked::new("token", 1, &[term.to_owned()])),
        }
    }

    #[test]
    fn the_order_and_repeats_of_terms_do_not_change_what_is_asked() {
        let terms = |t: &[&str]| t.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            Asked::new("t", 1, &terms(&["bb", "aa", "bb"])),
            Asked::new("t", 1, &terms(&["aa", "bb"]))
        );
        assert_ne!(
            Asked::new("t", 1, &terms(&["aa"])),
            Asked::new("t", 2, &terms(&["aa"]))
        );
    }

    #[test]
    fn entries_stay_within_the_budget_least_recently_used_first_out() {
        let budget = 16 * 1024;
        let cache = MatchCache::new(budget);
        let segment = SegmentId::generate_random();
        let docs: Vec<DocId> = (0..100).collect();
        for from in 0..100 {
            cache.keep(key(segment, from, "abcd"), &docs);
            let (_, bytes) = cache.usage();
            assert!(bytes <= budget, "{bytes} bytes kept, over {budget}");
        }
        let (entries, _) = cache.usage();
        assert!(entries > 1 && entries < 100, "{entries} entries");
        // The newest is kept, the oldest went first.
        assert_eq!(
            cache.get(&key(segment, 99, "abcd")).as_deref(),
            Some(&docs[..])
        );
        assert!(cache.get(&key(segment, 0, "abcd")).is_none());
        // Another part, segment or term is another entry.
        assert!(cache.get(&key(segment, 99, "abce")).is_none());
        assert!(
            cache
                .get(&key(SegmentId::generate_random(), 99, "abcd"))
                .is_none()
        );
    }

    #[test]
    fn an_entry_over_a_sixteenth_of_the_budget_is_not_kept() {
        let cache = MatchCache::new(16 * 1024);
        let segment = SegmentId::generate_random();
        let many: Vec<DocId> = (0..1024).collect();
        cache.keep(key(segment, 0, "abcd"), &many);
        assert_eq!(cache.usage(), (0, 0));
        assert!(MatchCache::new(0).get(&key(segment, 0, "abcd")).is_none());
    }
}
