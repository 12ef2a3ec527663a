//! The embedded backend: a Tantivy index on local disk.
//!
//! Bodies are indexed as lowercased 1- to 3-character n-grams. A query term of at most
//! three characters is itself one gram, so its posting list is the exact answer. A longer
//! term becomes the conjunction of its trigrams, which finds every body containing it
//! plus a few that hold the trigrams apart; those candidates are checked against the
//! stored body, so results are exactly the substring matches.
//!
//! Tantivy allows one writer per index: the process that gets it indexes, the others on
//! the same host only read (their reader reloads when the writer commits). The writer's
//! lock is a file lock, which the system releases when its process dies, so a standby
//! process can take the writer over ([`EmbeddedIndex::try_take_writer`]).

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tantivy::collector::TopDocs;
use tantivy::directory::{Directory, MmapDirectory, WatchCallback, WatchHandle};
use tantivy::indexer::{IndexWriterOptions, LogMergePolicy};
use tantivy::query::{BooleanQuery, Occur, Query, RangeQuery, TermQuery};
use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing,
    TextOptions, Value,
};
use tantivy::tokenizer::{LowerCaser, NgramTokenizer, TextAnalyzer};
use tantivy::{
    DocAddress, DocSet, Index, IndexReader, IndexWriter, Order, ReloadPolicy, Searcher, TERMINATED,
    TantivyDocument, Term,
};

use super::{MessageDoc, SearchError, SearchQuery, matches};
use crate::resources::{from_micros, to_micros};

const TOKENIZER: &str = "ngram1_3";
const GRAM: usize = 3;
/// The writer's indexing buffer. It fills only between two commits (a fraction of a
/// second of writes), then becomes a segment.
const WRITER_HEAP: usize = 32 * 1024 * 1024;
/// Segment merges run one at a time (Tantivy's default is four): each merge holds its
/// own buffers, and on a small box concurrent merges took both cores and a worker's
/// private memory in steps of tens of MiB.
const MERGE_THREADS: usize = 1;
/// Only segments of at most this many documents are merged. A merge holds about 20
/// bytes per document it writes (Tantivy's document-id maps and field norms), so with
/// eight or so segments per merge the largest one writes about 2 million documents
/// and holds about 45 MiB, however large the index grows. Without a bound, merges grow
/// with the index (Tantivy's default stops at 10 million documents per input segment,
/// some 1.6 GiB for one merge), and so does the worker's memory. The price: an index
/// keeps one segment per 0.25 to 2 million documents, and searches visit each.
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
    index: Index,
    reader: IndexReader,
    /// `None` while another process holds the writer (or none was asked for).
    writer: Mutex<Option<Writer>>,
    fields: Fields,
    /// Sweeps of the directory's file cache so far (see [`sweep_file_cache`]).
    sweeps: Arc<AtomicU64>,
    _sweeper: WatchHandle,
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
            .set_index_option(IndexRecordOption::Basic),
    );
    let fields = Fields {
        id: builder.add_text_field("id", STRING),
        token: builder.add_text_field("token", STRING),
        chat: builder.add_u64_field("chat", INDEXED),
        number: builder.add_u64_field("number", INDEXED | FAST | STORED),
        body: builder.add_text_field("body", body_options),
        version: builder.add_u64_field("version", STORED),
        created_at: builder.add_i64_field("created_at", STORED),
        updated_at: builder.add_i64_field("updated_at", STORED),
    };
    (builder.build(), fields)
}

/// Keeps the directory's cache of mapped files to the files in use.
///
/// `MmapDirectory` remembers every file it has mapped (path and a weak reference), and
/// forgets one only when that path is opened again or when its cache is inspected. Each
/// commit writes a new segment and each merge deletes old ones, so under a steady load
/// the entries of deleted files piled up in every process that had the index open: the
/// API's memory grew by about 0.25 MiB a minute at 8,000 creates/s. The cache is now
/// swept (`get_cache_info` drops the dead entries) whenever the index's meta file
/// changes, which is when readers move to new segments.
fn sweep_file_cache(
    directory: MmapDirectory,
) -> Result<(Arc<AtomicU64>, WatchHandle), SearchError> {
    let sweeps = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&sweeps);
    let swept = directory.clone();
    let handle = directory
        .watch(WatchCallback::new(move || {
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
        let index = Index::open_or_create(directory.clone(), schema).map_err(failed)?;
        let (sweeps, sweeper) = sweep_file_cache(directory)?;
        let analyzer = TextAnalyzer::builder(NgramTokenizer::new(1, GRAM, false).map_err(failed)?)
            .filter(LowerCaser)
            .build();
        index.tokenizers().register(TOKENIZER, analyzer);
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::OnCommitWithDelay)
            .try_into()
            .map_err(failed)?;
        let this = Self {
            index,
            reader,
            writer: Mutex::new(None),
            fields,
            sweeps,
            _sweeper: sweeper,
        };
        if writer && !this.try_take_writer()? {
            tracing::warn!(dir = %dir.display(), "another process holds the search index writer; this one only reads");
        }
        Ok(this)
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
                self.reader.reload().map_err(failed)?;
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
                None => self.indexed_version(&searcher, &id_term)?,
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
        drop(guard);
        self.reader.reload().map_err(failed)
    }

    /// Adds and commits.
    pub fn index(&self, docs: Vec<MessageDoc>) -> Result<(), SearchError> {
        self.add(docs)?;
        self.commit()
    }

    /// The version of the live indexed document with this id, if any. A term-dictionary
    /// lookup per segment: most ids (new messages) stop there.
    fn indexed_version(&self, searcher: &Searcher, id: &Term) -> Result<Option<u64>, SearchError> {
        let mut found = None;
        for (ordinal, segment) in searcher.segment_readers().iter().enumerate() {
            let inverted = segment.inverted_index(self.fields.id).map_err(failed)?;
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

    pub fn search(&self, query: &SearchQuery) -> Result<Vec<MessageDoc>, SearchError> {
        let f = &self.fields;
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![
            term(Term::from_field_text(f.token, &query.token)),
            term(Term::from_field_u64(f.chat, query.chat)),
            (
                Occur::Must,
                Box::new(RangeQuery::new(
                    Bound::Excluded(Term::from_field_u64(f.number, query.after)),
                    Bound::Unbounded,
                )),
            ),
        ];
        let mut grams = HashSet::new();
        for t in &query.terms {
            let chars: Vec<char> = t.chars().collect();
            if chars.len() <= GRAM {
                grams.insert(t.clone());
            } else {
                grams.extend(chars.windows(GRAM).map(|w| w.iter().collect::<String>()));
            }
        }
        clauses.extend(grams.iter().map(|g| term(Term::from_field_text(f.body, g))));
        let boolean = BooleanQuery::new(clauses);
        // Short terms are answered exactly by their gram; longer ones need a check.
        let verify = query.terms.iter().any(|t| t.chars().count() > GRAM);
        let wanted = query.limit as usize + 1;
        let searcher = self.reader.searcher();
        let mut cap = if verify { wanted * 2 + 64 } else { wanted };
        loop {
            let candidates: Vec<(Option<u64>, DocAddress)> = searcher
                .search(
                    &boolean,
                    &TopDocs::with_limit(cap).order_by_fast_field("number", Order::Asc),
                )
                .map_err(failed)?;
            let exhausted = candidates.len() < cap;
            let mut found = Vec::with_capacity(wanted);
            for (_, address) in candidates {
                let stored: TantivyDocument = searcher.doc(address).map_err(failed)?;
                let Some(doc) = self.to_doc(&stored, query) else {
                    continue;
                };
                if !verify || matches(&doc.body, &query.terms) {
                    found.push(doc);
                    if found.len() == wanted {
                        return Ok(found);
                    }
                }
            }
            if exhausted {
                return Ok(found);
            }
            cap *= 4;
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

fn term(t: Term) -> (Occur, Box<dyn Query>) {
    (
        Occur::Must,
        Box::new(TermQuery::new(t, IndexRecordOption::Basic)),
    )
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
