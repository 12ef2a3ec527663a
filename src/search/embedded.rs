//! The embedded backend: a Tantivy index on local disk.
//!
//! Bodies are indexed as positioned n-grams of their folded text ([`super::grams`]), and
//! every term is answered from the index alone: a term of three characters or more as a
//! phrase of trigrams (exactly substring containment), a shorter one as a prefix of the
//! grams. No stored body is read to decide a match; only the page's hits are loaded.
//! Each search has a time budget: past it, it stops with [`SearchError::TimedOut`]
//! rather than hold a search slot. A search can be shared among threads
//! ([`EmbeddedIndex::search_on`]): the chat's documents are cut into shares of about
//! as many documents each, and the shares' best matches are merged.
//! A complete scan of a part of a segment that tested many candidates keeps its
//! matches in the [`super::matches`] cache, which answers the same search again.
//!
//! Tantivy allows one writer per index: the process that gets it indexes, the others on
//! the same host only read (their reader reloads when the writer commits). The writer's
//! lock is a file lock, which the system releases when its process dies, so a standby
//! process can take the writer over ([`EmbeddedIndex::try_take_writer`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tantivy::directory::{Directory, MmapDirectory, WatchCallback, WatchHandle};
use tantivy::indexer::{IndexWriterOptions, LogMergePolicy};
use tantivy::postings::{Postings, SegmentPostings};
use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing,
    TextOptions, Value,
};
use tantivy::{
    DocAddress, DocId, DocSet, Index, IndexReader, IndexWriter, InvertedIndexReader, ReloadPolicy,
    Searcher, SegmentReader, TERMINATED, TantivyDocument, Term,
};

use super::grams::{FoldedGrams, TermPlan};
use super::identity::Membership;
use super::matches::{self, Asked, MatchCache, PartKey};
use super::{MessageDoc, SearchError, SearchQuery};
use crate::resources::{from_micros, to_micros};

/// The body's analyzer: folded, positioned grams. Its name is part of the schema, so an
/// index written with another analyzer is recognised and refused at open.
const TOKENIZER: &str = "folded_grams";
/// A search's time budget unless configured.
pub const DEFAULT_BUDGET: Duration = Duration::from_millis(500);
/// How long a chat counts as heavy after one of its searches took longer than a slice.
const HEAVY_FOR: Duration = Duration::from_secs(60);
/// Heavy chats remembered at most.
const HEAVY_CHATS: usize = 1024;
/// Shares per thread of a search shared among threads (see [`EmbeddedIndex::search_on`]).
const SHARES_PER_THREAD: usize = 4;
/// Candidates examined between two looks at the clock.
const CLOCK_EVERY: u32 = 64;
/// The writer's indexing buffer. It fills only between two commits (a fraction of a
/// second of writes), then becomes a segment.
const WRITER_HEAP: usize = 32 * 1024 * 1024;
/// Segment merges run one at a time (Tantivy's default is four): each merge holds its
/// own buffers and a core, which the worker's persisting needs more.
const MERGE_THREADS: usize = 1;
/// Only segments of at most this many documents are merged: a merge's memory grows with
/// the documents it writes (Tantivy's document-id maps and field norms), so this bound
/// keeps the largest merge, with eight or so inputs, near 2 million documents however
/// large the index grows, where Tantivy's default lets merges, and the worker's memory,
/// grow with the index. The price: an index keeps one segment per 0.25 to 2 million
/// documents, and searches visit each. (Measurements: `docs/BENCHMARKS.md`,
/// "Search-index merges grew with the index".)
const MERGE_MAX_SEGMENT_DOCS: usize = 250_000;

struct Fields {
    id: Field,
    token: Field,
    chat: Field,
    number: Field,
    body: Field,
    version: Field,
    created_at: Field,
    updated_at: Field,
}

pub struct EmbeddedIndex {
    dir: PathBuf,
    /// Set when the index serves a deployment through its index group (see
    /// [`super::identity`]); tests and tools use an index on its own.
    membership: OnceLock<Membership>,
    index: Index,
    reader: IndexReader,
    /// `None` while another process holds the writer (or none was asked for).
    writer: Mutex<Option<Writer>>,
    fields: Fields,
    /// Reloads `reader`, one at a time.
    reloader: Reloader,
    /// Sweeps of the directory's file cache so far (see [`follow_meta`]).
    sweeps: Arc<AtomicU64>,
    _sweeper: WatchHandle,
    /// How long one search may run.
    budget: Duration,
    /// Chats whose searches took longer than a slice lately, and when.
    heavy: Mutex<HashMap<(String, u64), Instant>>,
    /// The matches of heavy scans, per part of a segment.
    matches: MatchCache,
}

/// The index writer and the versions of the documents added since its last commit
/// (which searches cannot see yet).
struct Writer {
    inner: IndexWriter,
    uncommitted: HashMap<String, u64>,
}

fn schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    let body_options = TextOptions::default().set_stored().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(TOKENIZER)
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let fields = Fields {
        id: builder.add_text_field("id", STRING),
        token: builder.add_text_field("token", STRING),
        chat: builder.add_u64_field("chat", INDEXED),
        // A fast field, not a term: pages are cut and sorted by each document's number
        // (`number > after`), never looked up by it. As a term as well, unique to each
        // document, it cost 2 µs of the 15 µs of CPU each indexed message took
        // (`cargo run --release --example index`).
        number: builder.add_u64_field("number", FAST | STORED),
        body: builder.add_text_field("body", body_options),
        version: builder.add_u64_field("version", STORED),
        created_at: builder.add_i64_field("created_at", STORED),
        updated_at: builder.add_i64_field("updated_at", STORED),
    };
    (builder.build(), fields)
}

/// Moves the reader to the index's latest commit, one reload at a time.
///
/// Tantivy's reload reads the meta file, opens the segments and then swaps the searcher
/// in, with nothing to order two reloads: one that read the meta file before a commit
/// could swap its searcher in after a reload that read it after, and the commit's
/// documents would vanish from searches until the next reload (the likely cause of one
/// failure of the search property test). Every reload of this process goes through
/// here, under one lock, so a later reload never sees an earlier commit than the one
/// before it.
#[derive(Clone)]
struct Reloader {
    reader: IndexReader,
    lock: Arc<Mutex<()>>,
}

impl Reloader {
    fn reload(&self) -> Result<(), SearchError> {
        let _one_at_a_time = self
            .lock
            .lock()
            .map_err(|_| failed("index reload poisoned"))?;
        self.reader.reload().map_err(failed)
    }
}

/// Follows the index's meta file, which changes at every commit and merge: the reader
/// is reloaded (other processes' commits become visible) and the directory's cache of
/// mapped files is swept.
///
/// `MmapDirectory` remembers every file it has mapped (path and a weak reference), and
/// forgets one only when that path is opened again or when its cache is inspected. Each
/// commit writes a new segment and each merge deletes old ones, so under a steady load
/// the entries of deleted files would pile up in every process that has the index open
/// (`docs/BENCHMARKS.md`, "The index's file cache grew with every commit"). The cache is
/// swept (`get_cache_info` drops the dead entries) whenever the index's meta file
/// changes, which is when readers move to new segments.
fn follow_meta(
    directory: MmapDirectory,
    reloader: Reloader,
) -> Result<(Arc<AtomicU64>, WatchHandle), SearchError> {
    let sweeps = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&sweeps);
    let swept = directory.clone();
    let handle = directory
        .watch(WatchCallback::new(move || {
            if let Err(e) = reloader.reload() {
                tracing::warn!(error = %e, "could not reload the search index");
            }
            swept.get_cache_info();
            counted.fetch_add(1, Ordering::Relaxed);
        }))
        .map_err(failed)?;
    Ok((sweeps, handle))
}

fn merge_policy() -> LogMergePolicy {
    let mut policy = LogMergePolicy::default();
    policy.set_max_docs_before_merge(MERGE_MAX_SEGMENT_DOCS);
    policy
}

fn failed(e: impl std::fmt::Display) -> SearchError {
    SearchError::Failed(e.to_string())
}

impl EmbeddedIndex {
    /// Opens (or creates) the index in `dir`. With `writer`, tries to take the writer
    /// lock; if another process holds it, this one opens read-only.
    pub fn open(dir: &Path, writer: bool) -> Result<Self, SearchError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
        let (schema, fields) = schema();
        let directory = MmapDirectory::open(dir).map_err(failed)?;
        let index = Index::open_or_create(directory.clone(), schema).map_err(|e| match e {
            tantivy::TantivyError::SchemaError(_) => failed(format!(
                "{} holds a search index of another format: remove the directory and \
                 rebuild it with `chat-system reindex`",
                dir.display()
            )),
            e => failed(e),
        })?;
        index.tokenizers().register(TOKENIZER, FoldedGrams);
        // Reloads are this module's (see [`Reloader`]), not Tantivy's own watcher's.
        let reader: IndexReader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(failed)?;
        let reloader = Reloader {
            reader: reader.clone(),
            lock: Arc::new(Mutex::new(())),
        };
        let (sweeps, sweeper) = follow_meta(directory, reloader.clone())?;
        let this = Self {
            dir: dir.to_owned(),
            membership: OnceLock::new(),
            index,
            reader,
            reloader,
            writer: Mutex::new(None),
            fields,
            sweeps,
            _sweeper: sweeper,
            budget: DEFAULT_BUDGET,
            heavy: Mutex::new(HashMap::new()),
            matches: MatchCache::new(matches::BUDGET),
        };
        if writer && !this.try_take_writer()? {
            tracing::warn!(dir = %dir.display(), "another process holds the search index writer; this one only reads");
        }
        Ok(this)
    }

    /// Sets how long one search may run before it stops with [`SearchError::TimedOut`].
    pub fn with_budget(mut self, budget: Duration) -> Self {
        self.budget = budget;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes this index a member of its index group; once only.
    pub fn join(&self, membership: Membership) {
        let _ = self.membership.set(membership);
    }

    pub fn membership(&self) -> Option<&Membership> {
        self.membership.get()
    }

    /// Gives the writer back (its lock with it), dropping what was not committed.
    pub fn release_writer(&self) -> Result<(), SearchError> {
        let held = self
            .writer
            .lock()
            .map_err(|_| failed("index writer poisoned"))?
            .take();
        // Dropping the writer waits for its threads and frees the lock.
        drop(held);
        Ok(())
    }

    pub fn has_writer(&self) -> bool {
        self.writer.lock().is_ok_and(|w| w.is_some())
    }

    /// Takes the index writer if no process holds it; true when this one now does.
    pub fn try_take_writer(&self) -> Result<bool, SearchError> {
        let mut writer = self
            .writer
            .lock()
            .map_err(|_| failed("index writer poisoned"))?;
        if writer.is_some() {
            return Ok(true);
        }
        let options = IndexWriterOptions::builder()
            .num_worker_threads(1)
            .memory_budget_per_thread(WRITER_HEAP)
            .num_merge_threads(MERGE_THREADS)
            .build();
        match self.index.writer_with_options(options) {
            Ok(inner) => {
                inner.set_merge_policy(Box::new(merge_policy()));
                *writer = Some(Writer {
                    inner,
                    uncommitted: HashMap::new(),
                });
                // What the previous holder committed last.
                self.reloader.reload()?;
                Ok(true)
            }
            Err(tantivy::TantivyError::LockFailure(..)) => Ok(false),
            Err(e) => Err(failed(e)),
        }
    }

    /// Adds or replaces documents (the highest version of each wins), without
    /// committing: they become visible, and durable, at the next [`Self::commit`].
    pub fn add(&self, docs: Vec<MessageDoc>) -> Result<(), SearchError> {
        let mut latest: HashMap<String, MessageDoc> = HashMap::new();
        for doc in docs {
            let id = doc.id();
            if latest.get(&id).is_none_or(|d| d.version < doc.version) {
                latest.insert(id, doc);
            }
        }
        let searcher = self.reader.searcher();
        // Each segment's id field, looked up once per call rather than once per document.
        let ids = searcher
            .segment_readers()
            .iter()
            .map(|segment| segment.inverted_index(self.fields.id))
            .collect::<Result<Vec<_>, _>>()
            .map_err(failed)?;
        let mut guard = self
            .writer
            .lock()
            .map_err(|_| failed("index writer poisoned"))?;
        let writer = guard
            .as_mut()
            .ok_or_else(|| failed("this process does not hold the index writer"))?;
        for (id, doc) in latest {
            let id_term = Term::from_field_text(self.fields.id, &id);
            let known = match writer.uncommitted.get(&id) {
                Some(version) => Some(*version),
                None => self.indexed_version(&searcher, &ids, &id_term)?,
            };
            match known {
                Some(version) if version >= doc.version => continue,
                // Deletes apply to every earlier document, committed or not.
                Some(_) => {
                    writer.inner.delete_term(id_term);
                }
                None => {}
            }
            let mut document = TantivyDocument::default();
            document.add_text(self.fields.id, &id);
            document.add_text(self.fields.token, &doc.token);
            document.add_u64(self.fields.chat, doc.chat);
            document.add_u64(self.fields.number, doc.number);
            document.add_text(self.fields.body, &doc.body);
            document.add_u64(self.fields.version, doc.version);
            document.add_i64(self.fields.created_at, to_micros(doc.created_at));
            document.add_i64(self.fields.updated_at, to_micros(doc.updated_at));
            writer.inner.add_document(document).map_err(failed)?;
            writer.uncommitted.insert(id, doc.version);
        }
        Ok(())
    }

    /// Makes every added document durable and visible to searches.
    pub fn commit(&self) -> Result<(), SearchError> {
        let mut guard = self
            .writer
            .lock()
            .map_err(|_| failed("index writer poisoned"))?;
        let Some(writer) = guard.as_mut() else {
            return Ok(());
        };
        if writer.uncommitted.is_empty() {
            return Ok(());
        }
        writer.inner.commit().map_err(failed)?;
        writer.uncommitted.clear();
        // Under the lock: a concurrent commit that found nothing left to commit (this one
        // took its documents) returns only once they are visible.
        self.reloader.reload()
    }

    /// Adds and commits.
    pub fn index(&self, docs: Vec<MessageDoc>) -> Result<(), SearchError> {
        self.add(docs)?;
        self.commit()
    }

    /// The version of the live indexed document with this id, if any. A term-dictionary
    /// lookup per segment: most ids (new messages) stop there.
    fn indexed_version(
        &self,
        searcher: &Searcher,
        ids: &[Arc<InvertedIndexReader>],
        id: &Term,
    ) -> Result<Option<u64>, SearchError> {
        let mut found = None;
        for (ordinal, (segment, inverted)) in searcher.segment_readers().iter().zip(ids).enumerate()
        {
            let Some(mut postings) = inverted
                .read_postings(id, IndexRecordOption::Basic)
                .map_err(failed)?
            else {
                continue;
            };
            let mut doc = postings.doc();
            while doc != TERMINATED {
                if !segment.is_deleted(doc) {
                    let stored: TantivyDocument = searcher
                        .doc(DocAddress::new(ordinal as u32, doc))
                        .map_err(failed)?;
                    let version = stored
                        .get_first(self.fields.version)
                        .and_then(|v| v.as_u64());
                    found = found.max(version);
                }
                doc = postings.advance();
            }
        }
        Ok(found)
    }

    /// One page of matches, ascending `number`: at most `limit + 1` documents, found from
    /// the index alone (see the module documentation), within the search budget.
    pub fn search(&self, query: &SearchQuery) -> Result<Vec<MessageDoc>, SearchError> {
        self.run(query, &Clock::start(self.budget), 1)
    }

    /// As [`Self::search`], with the chat's documents shared among `threads` threads.
    pub fn search_on(
        &self,
        query: &SearchQuery,
        threads: usize,
    ) -> Result<Vec<MessageDoc>, SearchError> {
        self.run(query, &Clock::start(self.budget), threads)
    }

    /// As [`Self::search`], but gives up after `slice` (`None`), unless the budget ends
    /// first: a search that takes longer is then known to be a heavy one.
    pub fn search_within(
        &self,
        query: &SearchQuery,
        slice: Duration,
    ) -> Result<Option<Vec<MessageDoc>>, SearchError> {
        if slice >= self.budget {
            return self.search(query).map(Some);
        }
        let clock = Clock::start(slice);
        match self.run(query, &clock, 1) {
            Err(SearchError::TimedOut(_)) => Ok(None),
            found => found.map(Some),
        }
    }

    /// Whether searches of this chat took longer than a slice lately.
    pub fn is_heavy(&self, query: &SearchQuery) -> bool {
        let Ok(heavy) = self.heavy.lock() else {
            return false;
        };
        heavy
            .get(&(query.token.clone(), query.chat))
            .is_some_and(|at| at.elapsed() < HEAVY_FOR)
    }

    /// Remembers that a search of this chat took longer than a slice.
    pub fn mark_heavy(&self, query: &SearchQuery) {
        if let Ok(mut heavy) = self.heavy.lock() {
            if heavy.len() >= HEAVY_CHATS {
                heavy.retain(|_, at| at.elapsed() < HEAVY_FOR);
                if heavy.len() >= HEAVY_CHATS {
                    heavy.clear();
                }
            }
            heavy.insert((query.token.clone(), query.chat), Instant::now());
        }
    }

    fn run(
        &self,
        query: &SearchQuery,
        clock: &Clock,
        threads: usize,
    ) -> Result<Vec<MessageDoc>, SearchError> {
        self.run_on(self.reader.searcher(), query, clock, threads)
    }

    /// [`Self::run`] on one snapshot of the index.
    fn run_on(
        &self,
        searcher: Searcher,
        query: &SearchQuery,
        clock: &Clock,
        threads: usize,
    ) -> Result<Vec<MessageDoc>, SearchError> {
        let plans: Vec<TermPlan> = query.terms.iter().map(|t| TermPlan::of(t)).collect();
        let search = Search {
            query,
            plans: &plans,
            asked: Arc::new(Asked::new(&query.token, query.chat, &query.terms)),
        };
        let wanted = query.limit as usize + 1;
        let segments = searcher.segment_readers();
        let shares = if threads > 1 {
            self.shares(segments, query, threads * SHARES_PER_THREAD)?
        } else {
            vec![
                (0..segments.len() as u32)
                    .map(|ordinal| Part {
                        ordinal,
                        from: 0,
                        to: TERMINATED,
                    })
                    .collect(),
            ]
        };
        // Each thread takes the next share not taken yet, so that a thread held up
        // (by the scheduler, say) leaves its shares to the others.
        let next = AtomicUsize::new(0);
        let work = || {
            // The `wanted` smallest numbers found so far, largest on top.
            let mut best = Best {
                heap: BinaryHeap::with_capacity(wanted + 1),
                wanted,
            };
            while let Some(share) = shares.get(next.fetch_add(1, Ordering::Relaxed)) {
                for part in share {
                    let segment = &segments[part.ordinal as usize];
                    self.search_segment(segment, part, &search, clock, &mut best)?;
                }
            }
            Ok::<_, SearchError>(best.heap.into_vec())
        };
        let mut hits = if threads > 1 {
            std::thread::scope(|scope| {
                let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
                let mut hits = work()?;
                for helper in helpers {
                    let found = helper
                        .join()
                        .map_err(|_| failed("a search thread panicked"))??;
                    hits.extend(found);
                }
                Ok::<_, SearchError>(hits)
            })?
        } else {
            work()?
        };
        hits.sort_unstable();
        hits.truncate(wanted);
        let mut found = Vec::with_capacity(hits.len());
        for (_, ordinal, doc) in hits {
            let stored: TantivyDocument = searcher
                .doc(DocAddress::new(ordinal, doc))
                .map_err(failed)?;
            if let Some(doc) = self.to_doc(&stored, query) {
                found.push(doc);
            }
        }
        Ok(found)
    }

    /// The chat's documents cut into `count` shares of about as many documents each,
    /// every share a run of parts of segments.
    fn shares(
        &self,
        segments: &[SegmentReader],
        query: &SearchQuery,
        count: usize,
    ) -> Result<Vec<Vec<Part>>, SearchError> {
        let f = &self.fields;
        // Each segment's documents of the chat's application, or of chats of its number
        // in any application, whichever are fewer: a superset of the chat's documents.
        let mut docs: Vec<(u32, Vec<DocId>)> = Vec::new();
        for (ordinal, segment) in segments.iter().enumerate() {
            let mut shortest: Option<SegmentPostings> = None;
            for term in [
                Term::from_field_text(f.token, &query.token),
                Term::from_field_u64(f.chat, query.chat),
            ] {
                let inverted = segment.inverted_index(term.field()).map_err(failed)?;
                let postings = inverted
                    .read_postings(&term, IndexRecordOption::Basic)
                    .map_err(failed)?;
                match postings {
                    None => {
                        shortest = None;
                        break;
                    }
                    Some(p)
                        if shortest
                            .as_ref()
                            .is_none_or(|s| p.doc_freq() < s.doc_freq()) =>
                    {
                        shortest = Some(p);
                    }
                    Some(_) => {}
                }
            }
            let Some(mut postings) = shortest else {
                continue;
            };
            let mut ids = Vec::with_capacity(postings.doc_freq() as usize);
            let mut doc = postings.doc();
            while doc != TERMINATED {
                ids.push(doc);
                doc = postings.advance();
            }
            docs.push((ordinal as u32, ids));
        }
        let total: usize = docs.iter().map(|(_, ids)| ids.len()).sum();
        let each = total.div_ceil(count).max(1);
        let mut shares = Vec::with_capacity(count);
        let mut share = Vec::new();
        let mut room = each;
        for (ordinal, ids) in docs {
            let start = |i: usize| if i == 0 { 0 } else { ids[i] };
            let mut from = 0;
            while ids.len() - from > room && shares.len() + 1 < count {
                let cut = from + room;
                if cut > from {
                    share.push(Part {
                        ordinal,
                        from: start(from),
                        to: ids[cut],
                    });
                }
                shares.push(std::mem::take(&mut share));
                from = cut;
                room = each;
            }
            room = room.saturating_sub(ids.len() - from);
            share.push(Part {
                ordinal,
                from: start(from),
                to: TERMINATED,
            });
        }
        shares.push(share);
        Ok(shares)
    }

    /// Adds the matches of one part of a segment to `best`: from the match cache when
    /// a complete scan of the part was kept, else by scanning it.
    fn search_segment(
        &self,
        segment: &SegmentReader,
        part: &Part,
        search: &Search,
        clock: &Clock,
        best: &mut Best,
    ) -> Result<(), SearchError> {
        let f = &self.fields;
        let &Search {
            query,
            plans,
            ref asked,
        } = search;
        let numbers = segment.fast_fields().u64("number").map_err(failed)?;
        let key = PartKey {
            segment: segment.segment_id(),
            from: part.from,
            to: part.to,
            asked: Arc::clone(asked),
        };
        if let Some(kept) = self.matches.get(&key) {
            let mut below = best.below();
            for &doc in kept.iter() {
                if !segment.is_deleted(doc)
                    && let Some(number) = numbers.first(doc)
                    && number > query.after
                    && number < below
                {
                    below = best.offer(number, part.ordinal, doc);
                }
            }
            return Ok(());
        }
        let basic = IndexRecordOption::Basic;
        let body = segment.inverted_index(f.body).map_err(failed)?;
        // The documents of the chat: every candidate is in each of these lists.
        let mut lists = Vec::new();
        for (field, term) in [
            (f.token, Term::from_field_text(f.token, &query.token)),
            (f.chat, Term::from_field_u64(f.chat, query.chat)),
        ] {
            let inverted = segment.inverted_index(field).map_err(failed)?;
            match inverted.read_postings(&term, basic).map_err(failed)? {
                Some(postings) => lists.push(postings),
                None => return Ok(()),
            }
        }
        // Each distinct gram of the phrases once, with positions.
        let mut grams: Vec<String> = Vec::new();
        let mut phrases: Vec<Vec<(u32, usize)>> = Vec::new();
        let mut prefixes = Vec::new();
        for plan in plans {
            match plan {
                TermPlan::Phrase(parts) => {
                    let mut phrase = Vec::with_capacity(parts.len());
                    for (offset, gram) in parts {
                        let at = match grams.iter().position(|g| g == gram) {
                            Some(at) => at,
                            None => {
                                grams.push(gram.clone());
                                grams.len() - 1
                            }
                        };
                        phrase.push((*offset, lists.len() + at));
                    }
                    phrases.push(phrase);
                }
                TermPlan::Prefix(prefix) => {
                    prefixes.push(PrefixUnion::open(&body, prefix, clock)?);
                }
            }
        }
        for gram in &grams {
            let term = Term::from_field_text(f.body, gram);
            match body
                .read_postings(&term, IndexRecordOption::WithFreqsAndPositions)
                .map_err(failed)?
            {
                Some(postings) => lists.push(postings),
                None => return Ok(()),
            }
        }
        if prefixes.iter().any(PrefixUnion::is_empty) {
            return Ok(());
        }
        // The shortest list leads the intersection.
        let lead = (0..lists.len())
            .min_by_key(|&i| lists[i].doc_freq())
            .unwrap_or(0);
        lists.swap(0, lead);
        for phrase in &mut phrases {
            for (_, list) in phrase.iter_mut() {
                if *list == lead {
                    *list = 0;
                } else if *list == 0 {
                    *list = lead;
                }
            }
        }
        let mut below = best.below();
        let mut positions = PhraseBuffers::default();
        let mut examined = 0u32;
        // Every match of the part, until a candidate goes untested because its number
        // is outside the page: then the scan is not complete, and is not kept.
        let mut complete = Some(Vec::new());
        let mut doc = lists[0].doc();
        if doc < part.from {
            doc = lists[0].seek(part.from);
        }
        loop {
            doc = intersect(&mut lists, doc, clock)?;
            if doc >= part.to {
                if let Some(found) = complete
                    && examined >= matches::MIN_CANDIDATES
                {
                    self.matches.keep(key, &found);
                }
                return Ok(());
            }
            examined += 1;
            if examined.is_multiple_of(CLOCK_EVERY) {
                clock.check()?;
            }
            let live = !segment.is_deleted(doc);
            // While the scan is complete, a deleted document is tested too: what is kept
            // must hold for every snapshot of the segment, and a search on an older one
            // (begun before the commit that deleted it) still has it live.
            if live || complete.is_some() {
                match numbers.first(doc) {
                    Some(number) if number > query.after && number < below => {
                        if phrases
                            .iter()
                            .all(|phrase| positions.phrase_at(&mut lists, phrase))
                            && prefixes.iter_mut().all(|prefix| prefix.contains(doc))
                        {
                            if let Some(found) = &mut complete {
                                found.push(doc);
                            }
                            if live {
                                below = best.offer(number, part.ordinal, doc);
                            }
                        }
                    }
                    _ => complete = None,
                }
            }
            doc = lists[0].advance();
        }
    }

    fn to_doc(&self, stored: &TantivyDocument, query: &SearchQuery) -> Option<MessageDoc> {
        let f = &self.fields;
        let u64_of = |field| stored.get_first(field).and_then(|v| v.as_u64());
        let time_of = |field| {
            stored
                .get_first(field)
                .and_then(|v| v.as_i64())
                .and_then(from_micros)
        };
        Some(MessageDoc {
            token: query.token.clone(),
            chat: query.chat,
            number: u64_of(f.number)?,
            body: stored.get_first(f.body)?.as_str()?.to_owned(),
            version: u64_of(f.version)?,
            created_at: time_of(f.created_at)?,
            updated_at: time_of(f.updated_at)?,
        })
    }

    /// The match cache of this index's searches (for tests and tools).
    pub fn match_cache(&self) -> &MatchCache {
        &self.matches
    }

    /// How many times the file cache has been swept (for tests and tools).
    pub fn file_cache_sweeps(&self) -> u64 {
        self.sweeps.load(Ordering::Relaxed)
    }

    /// Documents in the index (all of them; for tests and tools).
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One search, as each part of it is searched.
struct Search<'a> {
    query: &'a SearchQuery,
    /// How each term is looked up.
    plans: &'a [TermPlan],
    /// What the match cache knows the search by.
    asked: Arc<Asked>,
}

/// The documents `from..to` of one segment.
struct Part {
    ordinal: u32,
    from: DocId,
    to: DocId,
}

/// The matches with the smallest numbers found so far (the page and one more).
struct Best {
    /// Largest number on top.
    heap: BinaryHeap<(u64, u32, DocId)>,
    wanted: usize,
}

impl Best {
    /// The number below which a match is still wanted.
    fn below(&self) -> u64 {
        match self.heap.peek() {
            Some((number, _, _)) if self.heap.len() >= self.wanted => *number,
            _ => u64::MAX,
        }
    }

    fn offer(&mut self, number: u64, segment: u32, doc: DocId) -> u64 {
        self.heap.push((number, segment, doc));
        if self.heap.len() > self.wanted {
            self.heap.pop();
        }
        self.below()
    }
}

/// The deadline of one search.
struct Clock {
    deadline: Instant,
    budget: Duration,
}

impl Clock {
    fn start(budget: Duration) -> Self {
        Self {
            deadline: Instant::now() + budget,
            budget,
        }
    }

    fn check(&self) -> Result<(), SearchError> {
        if Instant::now() >= self.deadline {
            return Err(SearchError::TimedOut(self.budget));
        }
        Ok(())
    }
}

/// Moves every list to the first document at or after `from` that all of them hold
/// (`lists[0]` leads); `TERMINATED` when there is none.
fn intersect(
    lists: &mut [SegmentPostings],
    from: DocId,
    clock: &Clock,
) -> Result<DocId, SearchError> {
    let mut target = from;
    let mut rounds = 0u32;
    'next: loop {
        if target == TERMINATED {
            return Ok(TERMINATED);
        }
        rounds += 1;
        if rounds.is_multiple_of(1024) {
            clock.check()?;
        }
        for list in lists.iter_mut() {
            let doc = if list.doc() < target {
                list.seek(target)
            } else {
                list.doc()
            };
            if doc > target {
                target = doc;
                continue 'next;
            }
        }
        return Ok(target);
    }
}

/// Position buffers reused from one candidate to the next.
#[derive(Default)]
struct PhraseBuffers {
    positions: Vec<u32>,
    /// The starts still possible, as a bitset over the document's positions.
    starts: Vec<u64>,
    next: Vec<u64>,
}

impl PhraseBuffers {
    /// True when every gram of `phrase` (offset, list) occurs at one start plus its
    /// offset in the current document: the term is a substring of the folded body.
    ///
    /// This is most of what a search costs when a chat's bodies hold every gram of a term
    /// but not the term: each gram's positions are read once, marked in a bitset of the
    /// starts they allow, and the bitsets are intersected a word at a time.
    fn phrase_at(&mut self, lists: &mut [SegmentPostings], phrase: &[(u32, usize)]) -> bool {
        // The rarest gram in this document gives the fewest starts.
        let Some(&(first_offset, first)) = phrase.iter().min_by_key(|(_, l)| lists[*l].term_freq())
        else {
            return true;
        };
        lists[first].positions(&mut self.positions);
        let Some(&last) = self.positions.last() else {
            return false;
        };
        let Some(last_start) = last.checked_sub(first_offset) else {
            return false;
        };
        let words = last_start as usize / 64 + 1;
        self.starts.clear();
        self.starts.resize(words, 0);
        mark(&mut self.starts, &self.positions, first_offset);
        for &(offset, list) in phrase {
            if list == first && offset == first_offset {
                continue;
            }
            lists[list].positions(&mut self.positions);
            self.next.clear();
            self.next.resize(words, 0);
            mark(&mut self.next, &self.positions, offset);
            let mut any = 0;
            for (start, next) in self.starts.iter_mut().zip(&self.next) {
                *start &= next;
                any |= *start;
            }
            if any == 0 {
                return false;
            }
        }
        true
    }
}

/// Sets the bit of `p - offset` for each sorted position `p` that has one in `bits`.
///
/// Positions are sorted, so the bits of one word are gathered in a register and stored
/// once: setting each bit in memory would chain every position on the one before
/// through that word.
fn mark(bits: &mut [u64], positions: &[u32], offset: u32) {
    let from = positions.partition_point(|&p| p < offset);
    let mut word = usize::MAX;
    let mut gathered = 0u64;
    for &p in &positions[from..] {
        let start = p - offset;
        let at = start as usize / 64;
        if at != word {
            if let Some(slot) = bits.get_mut(word) {
                *slot |= gathered;
            }
            if at >= bits.len() {
                return;
            }
            word = at;
            gathered = 0;
        }
        gathered |= 1 << (start % 64);
    }
    if let Some(slot) = bits.get_mut(word) {
        *slot |= gathered;
    }
}

/// The documents holding some gram that starts with a prefix: a union of the posting
/// lists of those grams, asked in increasing document order.
struct PrefixUnion {
    lists: Vec<SegmentPostings>,
    /// Each list's current document, smallest on top.
    heads: BinaryHeap<Reverse<(DocId, usize)>>,
}

impl PrefixUnion {
    fn open(
        body: &tantivy::InvertedIndexReader,
        prefix: &str,
        clock: &Clock,
    ) -> Result<Self, SearchError> {
        let mut upper = prefix.as_bytes().to_vec();
        // No UTF-8 byte is 0xFF: every key that starts with the prefix sorts below this.
        upper.push(0xFF);
        let mut stream = body
            .terms()
            .range()
            .ge(prefix.as_bytes())
            .lt(&upper)
            .into_stream()
            .map_err(failed)?;
        let mut lists = Vec::new();
        let mut heads = BinaryHeap::new();
        while stream.advance() {
            let postings = body
                .read_postings_from_terminfo(stream.value(), IndexRecordOption::Basic)
                .map_err(failed)?;
            heads.push(Reverse((postings.doc(), lists.len())));
            lists.push(postings);
            if lists.len().is_multiple_of(CLOCK_EVERY as usize) {
                clock.check()?;
            }
        }
        Ok(Self { lists, heads })
    }

    fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }

    /// True when some list holds `doc`; calls come in increasing `doc` order.
    fn contains(&mut self, doc: DocId) -> bool {
        while let Some(&Reverse((head, i))) = self.heads.peek() {
            if head >= doc {
                return head == doc;
            }
            self.heads.pop();
            let next = self.lists[i].seek(doc);
            if next != TERMINATED {
                self.heads.push(Reverse((next, i)));
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use tantivy::Index;
    use tantivy::index::SegmentId;
    use tantivy::indexer::MergePolicy;

    use super::*;

    fn segments(index: &Index, docs: &[u32]) -> Vec<tantivy::SegmentMeta> {
        docs.iter()
            .map(|&n| index.new_segment_meta(SegmentId::generate_random(), n))
            .collect()
    }

    #[test]
    fn merges_take_small_segments_and_leave_large_ones_alone() {
        let index = Index::create_in_ram(schema().0);
        let policy = merge_policy();

        let small = segments(&index, &[20_000; 8]);
        let candidates = policy.compute_merge_candidates(&small);
        assert_eq!(candidates.len(), 1);
        assert_eq!(candidates[0].0.len(), 8);

        let at_bound = segments(&index, &[MERGE_MAX_SEGMENT_DOCS as u32; 8]);
        assert_eq!(policy.compute_merge_candidates(&at_bound).len(), 1);

        // Eight segments just over the bound would make a merge of 2M+ documents.
        let large = segments(&index, &[MERGE_MAX_SEGMENT_DOCS as u32 + 1; 8]);
        assert!(policy.compute_merge_candidates(&large).is_empty());

        // Large segments are left out; the small ones beside them still merge.
        let mixed = [large, small].concat();
        let candidates = policy.compute_merge_candidates(&mixed);
        assert_eq!(candidates.len(), 1);
        assert_eq!(candidates[0].0.len(), 8);
    }

    #[test]
    fn every_commit_sweeps_the_file_cache_of_each_process_with_the_index_open() {
        let dir = std::env::temp_dir().join(format!("embedded-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let writer = EmbeddedIndex::open(&dir, true).unwrap();
        let reader = EmbeddedIndex::open(&dir, false).unwrap();
        let swept = EmbeddedIndex::file_cache_sweeps;
        let before = (swept(&writer), swept(&reader));
        let at = chrono::Utc::now();
        writer
            .index(vec![MessageDoc {
                token: "t".into(),
                chat: 1,
                number: 1,
                body: "hello".into(),
                version: 1,
                created_at: at,
                updated_at: at,
            }])
            .unwrap();
        // The directory watches its meta file every 500 ms.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while swept(&writer) == before.0 || swept(&reader) == before.1 {
            assert!(
                std::time::Instant::now() < deadline,
                "no sweep after a commit"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        drop((writer, reader));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn message(chat: u64, number: u64, body: &str) -> MessageDoc {
        let at = chrono::Utc::now();
        MessageDoc {
            token: "t".into(),
            chat,
            number,
            body: body.into(),
            version: number,
            created_at: at,
            updated_at: at,
        }
    }

    fn query(chat: u64, terms: &[&str], after: u64, limit: u32) -> SearchQuery {
        SearchQuery {
            token: "t".into(),
            chat,
            terms: terms.iter().map(|t| (*t).to_owned()).collect(),
            after,
            limit,
        }
    }

    fn numbers(found: Vec<MessageDoc>) -> Vec<u64> {
        found.into_iter().map(|d| d.number).collect()
    }

    fn scratch_index(name: &str) -> (std::path::PathBuf, EmbeddedIndex) {
        let dir = std::env::temp_dir().join(format!("embedded-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let index = EmbeddedIndex::open(&dir, true).unwrap();
        (dir, index)
    }

    #[test]
    fn a_search_past_its_budget_stops_with_timed_out() {
        let (dir, index) = scratch_index("budget");
        let index = index.with_budget(Duration::ZERO);
        let docs = (1..=500)
            .map(|n| message(1, n, "abcd cdab abcd cdab"))
            .collect();
        index.index(docs).unwrap();
        assert!(matches!(
            index.search(&query(1, &["abcdabcd"], 0, 50)),
            Err(SearchError::TimedOut(Duration::ZERO))
        ));
        drop(index);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_search_longer_than_its_slice_gives_up_and_its_chat_counts_as_heavy() {
        let (dir, index) = scratch_index("slice");
        let docs = (1..=500)
            .map(|n| message(1, n, "abcd cdab abcd cdab"))
            .collect();
        index.index(docs).unwrap();
        index.index(vec![message(2, 1, "abcdabcd")]).unwrap();
        let adversarial = query(1, &["abcdabcd"], 0, 50);
        assert_eq!(
            index.search_within(&adversarial, Duration::ZERO).unwrap(),
            None
        );
        // Within the budget, the same search answers.
        assert_eq!(
            numbers(index.search(&adversarial).unwrap()),
            Vec::<u64>::new()
        );
        let other = query(2, &["abcdabcd"], 0, 50);
        let found = index.search_within(&other, Duration::from_secs(5)).unwrap();
        assert_eq!(numbers(found.unwrap()), [1]);
        assert!(!index.is_heavy(&adversarial));
        index.mark_heavy(&adversarial);
        assert!(index.is_heavy(&adversarial));
        assert!(!index.is_heavy(&other));
        drop(index);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pages_hold_the_smallest_numbers_across_segments_and_skip_replaced_versions() {
        let (dir, index) = scratch_index("pages");
        // Three commits: three segments, numbers out of order across them.
        index
            .index(vec![message(1, 5, "xyz five"), message(1, 2, "xyz two")])
            .unwrap();
        index
            .index(vec![
                message(1, 4, "xyz four"),
                message(2, 1, "xyz other chat"),
            ])
            .unwrap();
        index
            .index(vec![message(1, 1, "xyz one"), message(1, 3, "xyz three")])
            .unwrap();
        let mut replaced = message(1, 3, "no longer");
        replaced.version = 99;
        index.index(vec![replaced]).unwrap();
        assert_eq!(
            numbers(index.search(&query(1, &["xyz"], 0, 2)).unwrap()),
            [1, 2, 4]
        );
        assert_eq!(
            numbers(index.search(&query(1, &["xy"], 2, 50)).unwrap()),
            [4, 5]
        );
        assert_eq!(
            numbers(index.search(&query(1, &["e", "xyz"], 0, 50)).unwrap()),
            [1, 5]
        );
        assert_eq!(
            numbers(index.search(&query(1, &["longer"], 0, 50)).unwrap()),
            [3]
        );
        assert_eq!(
            numbers(index.search(&query(2, &["x"], 0, 50)).unwrap()),
            [1]
        );
        drop(index);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_search_shared_among_threads_finds_what_one_thread_finds() {
        let (dir, index) = scratch_index("shared");
        // Five segments of unequal size; the chat's matches lie in all of them, out of
        // number order, beside another chat and another application.
        let mut number = 0;
        for size in [700u64, 40, 300, 5, 120] {
            let mut docs = Vec::new();
            for _ in 0..size {
                number += 1;
                let n = (number * 7919) % 1171 + 1;
                let body = if n % 3 == 0 {
                    "abcdabcd x"
                } else {
                    "abcd cdab y"
                };
                docs.push(message(1, n, body));
                docs.push(message(2, n, "abcdabcd x"));
                let mut other = message(1, n, "abcdabcd x");
                other.token = "u".into();
                docs.push(other);
            }
            index.index(docs).unwrap();
        }
        for (terms, after, limit) in [
            (&["abcdabcd"][..], 0, 50),
            (&["abcdabcd", "x"][..], 100, 7),
            (&["cdab", "y"][..], 0, 1000),
            (&["abcdabcd"][..], 1100, 50),
        ] {
            let q = query(1, terms, after, limit);
            let alone = numbers(index.search(&q).unwrap());
            assert!(!alone.is_empty(), "{terms:?}");
            for threads in 2..=5 {
                assert_eq!(
                    numbers(index.search_on(&q, threads).unwrap()),
                    alone,
                    "{terms:?} on {threads}"
                );
            }
        }
        drop(index);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// 3,000 bodies of the chat that hold every gram of `abcdabcd` but not the term,
    /// and the term itself in the bodies of the numbers `matching`, in one segment.
    fn heavy_chat(
        name: &str,
        matching: impl Fn(u64) -> bool,
    ) -> (std::path::PathBuf, EmbeddedIndex) {
        let (dir, index) = scratch_index(name);
        let docs = (1..=3000)
            .map(|n| {
                let body = if matching(n) {
                    "abcd abcdabcd"
                } else {
                    "abcd cdab abcd cdab"
                };
                message(1, n, body)
            })
            .collect();
        index.index(docs).unwrap();
        (dir, index)
    }

    #[test]
    fn a_complete_heavy_scan_is_kept_and_answers_the_same_search_again() {
        let (dir, index) = heavy_chat("heavy-kept", |n| n == 500 || n == 1500);
        let cache = index.match_cache();
        let q = query(1, &["abcdabcd"], 0, 50);
        assert_eq!(numbers(index.search(&q).unwrap()), [500, 1500]);
        assert_eq!(cache.usage().0, 1);
        assert_eq!(cache.hits(), 0);
        assert_eq!(numbers(index.search(&q).unwrap()), [500, 1500]);
        assert_eq!(cache.hits(), 1);
        // A search shared among threads keeps its parts, and finds the same again.
        assert_eq!(numbers(index.search_on(&q, 2).unwrap()), [500, 1500]);
        let parts = cache.usage().0 - 1;
        assert!(parts > 1, "{parts} parts kept");
        assert_eq!(numbers(index.search_on(&q, 2).unwrap()), [500, 1500]);
        assert_eq!(cache.hits(), 1 + parts as u64);
        // A replaced version is left out of what was kept; a newer segment is scanned.
        let mut replaced = message(1, 500, "no longer");
        replaced.version += 1;
        index
            .index(vec![replaced, message(1, 3500, "abcdabcd")])
            .unwrap();
        assert_eq!(numbers(index.search(&q).unwrap()), [1500, 3500]);
        assert_eq!(cache.hits(), 2 + parts as u64);
        drop(index);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn what_a_newer_snapshot_kept_serves_a_search_on_an_older_one() {
        let (dir, index) = heavy_chat("heavy-older", |n| n == 500 || n == 1500);
        let q = query(1, &["abcdabcd"], 0, 50);
        // A search that took its snapshot before message 500 was replaced...
        let older = index.reader.searcher();
        let mut replaced = message(1, 500, "no longer");
        replaced.version += 1;
        index.index(vec![replaced]).unwrap();
        // ...reaches the segment after a search on the newer snapshot kept its matches.
        assert_eq!(numbers(index.search(&q).unwrap()), [1500]);
        assert_eq!(index.match_cache().usage().0, 1);
        let clock = Clock::start(Duration::from_secs(5));
        let found = index.run_on(older, &q, &clock, 1).unwrap();
        assert_eq!(index.match_cache().hits(), 1);
        assert_eq!(numbers(found), [500, 1500]);
        drop(index);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_scan_that_stopped_testing_at_a_full_page_is_not_kept() {
        let (dir, index) = heavy_chat("heavy-full-page", |n| n % 10 == 0);
        let first = query(1, &["abcdabcd"], 0, 4);
        assert_eq!(numbers(index.search(&first).unwrap()), [10, 20, 30, 40, 50]);
        let next = query(1, &["abcdabcd"], 50, 4);
        assert_eq!(numbers(index.search(&next).unwrap()), [60, 70, 80, 90, 100]);
        assert_eq!(index.match_cache().usage(), (0, 0));
        drop(index);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_index_of_another_format_is_refused_with_what_to_do() {
        let dir = std::env::temp_dir().join(format!("embedded-format-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut builder = Schema::builder();
        builder.add_text_field("body", tantivy::schema::TEXT);
        Index::create_in_dir(&dir, builder.build()).unwrap();
        let Err(SearchError::Failed(message)) = EmbeddedIndex::open(&dir, true) else {
            panic!("an index of another schema was opened");
        };
        assert!(message.contains("chat-system reindex"), "{message}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_only_term_unique_to_each_document_is_its_id() {
        let (schema, fields) = schema();
        let indexed = |field| schema.get_field_entry(field).is_indexed();
        assert!(indexed(fields.id));
        assert!(
            !indexed(fields.number),
            "numbers are read from the fast field"
        );
        assert!(schema.get_field_entry(fields.number).is_fast());
        for field in [fields.version, fields.created_at, fields.updated_at] {
            assert!(!indexed(field));
        }
    }

    #[test]
    fn the_writer_uses_the_bounded_merge_policy() {
        let dir = std::env::temp_dir().join(format!("embedded-merge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let index = EmbeddedIndex::open(&dir, true).unwrap();
        let guard = index.writer.lock().unwrap();
        let policy = guard.as_ref().unwrap().inner.get_merge_policy();
        let large = segments(&index.index, &[MERGE_MAX_SEGMENT_DOCS as u32 + 1; 8]);
        assert!(policy.compute_merge_candidates(&large).is_empty());
        drop(guard);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
