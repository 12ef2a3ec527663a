//! Message search: every whitespace-separated term of the query must occur in the body
//! as a case-insensitive substring, within one chat. "Case-insensitive" is Unicode NFKC
//! case folding ([`fold`]): body and terms are compared folded, the body is stored as
//! written ([`matches`] is the definition). Two backends, one behaviour:
//!
//! * [`embedded`]: a Tantivy index on local disk (the default), of positioned n-grams
//!   ([`grams`]). One process holds its writer; any process on the same host can read
//!   it, and no other host can ([`identity`]).
//! * [`elastic`]: Elasticsearch 8 over its REST API (set `ELASTICSEARCH_URL`), for more
//!   than one host.
//!
//! Both are fed from the write queue by their own consumer group and can be rebuilt from
//! MySQL with `chat-system reindex`. Each document carries the version of the write it
//! holds; a backend never replaces a document with an older version, so redelivered or
//! reordered entries cannot bring back an old body.

pub mod elastic;
pub mod embedded;
pub mod fold;
pub mod grams;
pub mod identity;
pub mod matches;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::config::SearchConfig;
use crate::domain::Malformed;
use crate::resources::Message;
use crate::store::mysql::IndexedMessage;
use identity::{IndexGroup, Membership, Verdict};

/// A message as the index holds it: the persisted message with its application's token,
/// the row type the index is fed from (`store::mysql::messages_for_index`).
pub type MessageDoc = IndexedMessage;

impl MessageDoc {
    /// Deterministic document id: re-indexing replaces rather than duplicates.
    pub fn id(&self) -> String {
        format!("{}:{}:{}", self.token, self.chat, self.number)
    }

    pub fn into_message(self) -> Message {
        Message {
            number: self.number,
            chat_number: self.chat,
            body: self.body,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// A validated search: folded terms, one chat, one page.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchQuery {
    pub token: String,
    pub chat: u64,
    /// Each term under [`fold::fold`], none empty.
    pub terms: Vec<String>,
    pub after: u64,
    pub limit: u32,
}

/// Splits `q` on whitespace and folds each term ([`fold::fold`]); 400 when no term is
/// left, or when there are more than 32 terms or a term over 256 bytes (as sent). A term
/// that folds to nothing (only default-ignorable code points, such as a soft hyphen)
/// would match every body, so it is left out.
pub fn parse_terms(q: Option<&str>) -> Result<Vec<String>, Malformed> {
    let raw: Vec<&str> = q.unwrap_or("").split_whitespace().collect();
    if raw.len() > 32 || raw.iter().any(|t| t.len() > 256) {
        return Err(Malformed(
            "`q` may hold at most 32 terms of at most 256 bytes".into(),
        ));
    }
    let terms: Vec<String> = raw
        .into_iter()
        .map(|t| fold::fold(t).into_owned())
        .filter(|t| !t.is_empty())
        .collect();
    if terms.is_empty() {
        return Err(Malformed("`q` is required and must not be blank".into()));
    }
    Ok(terms)
}

/// True when the folded body contains every folded term: the definition of a match,
/// which every backend answers exactly.
pub fn matches(body: &str, terms: &[String]) -> bool {
    let body = fold::fold(body);
    terms.iter().all(|t| body.contains(t.as_str()))
}

/// A document the backend refused for good (sending it again would fail the same way):
/// its position in the batch given, and the backend's reason. Transient failures are
/// errors instead, and nothing of the batch counts as done then.
#[derive(Clone, Debug, PartialEq)]
pub struct Refused {
    pub position: usize,
    pub reason: String,
}

impl Refused {
    /// Logs the refusal of a message that has no queue entry to keep it (read from
    /// MySQL): it is found again by a `reindex` once the cause is fixed.
    pub fn log(&self, token: &str, chat: u64, number: u64) {
        let app = crate::domain::Token::parse(token).ok().map(|t| t.log_id());
        tracing::error!(
            app = app.as_deref().unwrap_or("?"),
            chat,
            number,
            reason = %self.reason,
            "message refused by the search backend"
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("search backend unavailable: {0}")]
    Unavailable(String),
    #[error("search backend failed: {0}")]
    Failed(String),
    /// The search ran past its time budget and was stopped.
    #[error("the search ran past its budget of {0:?}")]
    TimedOut(std::time::Duration),
    /// This process's embedded index is not the one the index writer publishes: it
    /// would answer from another host's index, or a partial one.
    #[error("{0}")]
    ForeignIndex(String),
}

/// The configured backend; cheap to clone.
#[derive(Clone)]
pub enum Search {
    Embedded(Arc<embedded::EmbeddedIndex>),
    Elastic(Arc<elastic::ElasticIndex>),
}

/// `search_index_writer_held`: 1 in the process that holds the embedded index's writer
/// (the one that indexes), 0 in the others, for operators and tools to find it.
fn record_writer(held: bool) {
    metrics::gauge!("search_index_writer_held").set(if held { 1.0 } else { 0.0 });
}

impl Search {
    /// Opens the configured backend. `writer` asks for the right to index; with the
    /// embedded index only one process on a host can have it.
    pub async fn open(config: &SearchConfig, writer: bool) -> Result<Self, SearchError> {
        match &config.elasticsearch_url {
            Some(url) => {
                let connection = elastic::client::Connection {
                    url: url.clone(),
                    config: config.elastic.clone(),
                };
                Ok(Self::Elastic(Arc::new(
                    elastic::ElasticIndex::connect(&connection, &config.elasticsearch_index)
                        .await?,
                )))
            }
            None => {
                let dir = config.search_index_dir.clone();
                let budget = config.search_time_budget;
                let index = blocking(move || {
                    Ok(embedded::EmbeddedIndex::open(&dir, writer)?.with_budget(budget))
                })
                .await?;
                record_writer(index.has_writer());
                Ok(Self::Embedded(Arc::new(index)))
            }
        }
    }

    /// True when this handle may index.
    pub fn can_index(&self) -> bool {
        match self {
            Self::Embedded(index) => index.has_writer(),
            Self::Elastic(_) => true,
        }
    }

    /// Takes the right to index if it is free (the embedded index's writer, released
    /// when the process holding it stops or dies) and, in an index group, if the group
    /// feeds this index; true when this handle may index.
    pub async fn try_take_writer(&self) -> Result<bool, SearchError> {
        match self {
            Self::Embedded(index) => {
                let taken = {
                    let index = index.clone();
                    blocking(move || index.try_take_writer()).await?
                };
                let kept = taken && self.claim_or_release(index).await?;
                record_writer(kept);
                Ok(kept)
            }
            Self::Elastic(_) => Ok(true),
        }
    }

    /// Puts the embedded index in `group` ([`identity`]): from now on it serves searches
    /// only while its directory holds the index the group feeds, and if this handle holds
    /// the writer it claims the group, or gives the writer back when the group feeds
    /// another index. Elasticsearch, shared by every host, needs none of this.
    pub async fn join(&self, group: IndexGroup) -> Result<(), SearchError> {
        let Self::Embedded(index) = self else {
            return Ok(());
        };
        index.join(Membership::new(index.dir().to_owned(), group));
        if index.has_writer() {
            // Without an answer from Redis, the writer is given back: the standby that
            // every worker runs claims again later.
            let kept = self.claim_or_release(index).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "could not claim the search index group");
                false
            });
            record_writer(kept);
        } else if let Some(membership) = index.membership() {
            // Logs and reports a foreign index at once, rather than at the first search.
            let _ = membership.verdict().await;
        }
        Ok(())
    }

    /// Publishes this embedded index as the one `group` feeds, whatever it fed before:
    /// for `chat-system reindex`, once the index holds every message.
    pub async fn adopt(&self, group: IndexGroup) -> Result<(), SearchError> {
        let Self::Embedded(index) = self else {
            return Ok(());
        };
        let id = Membership::new(index.dir().to_owned(), group)
            .adopt()
            .await?;
        tracing::info!(dir = %index.dir().display(), index = %id, "this search index is now the one the index group feeds");
        Ok(())
    }

    /// In an index group, claims it for the writer just taken; gives the writer back
    /// when the group feeds another index. True when the writer is kept.
    async fn claim_or_release(
        &self,
        index: &Arc<embedded::EmbeddedIndex>,
    ) -> Result<bool, SearchError> {
        let Some(membership) = index.membership() else {
            return Ok(true);
        };
        match membership.claim().await {
            Ok(Verdict::Ours) => Ok(true),
            Ok(Verdict::Foreign(_)) => {
                let index = index.clone();
                blocking(move || index.release_writer()).await?;
                Ok(false)
            }
            Err(e) => {
                let index = index.clone();
                blocking(move || index.release_writer()).await?;
                Err(e)
            }
        }
    }

    /// Whether this embedded index may serve and index now: [`SearchError::ForeignIndex`]
    /// when its group feeds another index.
    async fn check_membership(&self) -> Result<(), SearchError> {
        let Self::Embedded(index) = self else {
            return Ok(());
        };
        let Some(membership) = index.membership() else {
            return Ok(());
        };
        match membership.verdict().await? {
            Verdict::Ours => Ok(()),
            Verdict::Foreign(why) => Err(SearchError::ForeignIndex(why)),
        }
    }

    /// Adds or replaces documents and makes them durable and visible; a document older
    /// than the indexed one is skipped. For callers with no stream entry to hand a
    /// refused document to (a catch-up from MySQL): those are logged, with the reason.
    pub async fn index(&self, docs: Vec<MessageDoc>) -> Result<(), SearchError> {
        let ids: Vec<(String, u64, u64)> = docs
            .iter()
            .map(|d| (d.token.clone(), d.chat, d.number))
            .collect();
        for refused in self.add(docs).await? {
            if let Some((token, chat, number)) = ids.get(refused.position) {
                refused.log(token, *chat, *number);
            }
        }
        self.commit().await
    }

    /// Adds or replaces documents; returns those refused for good (see [`Refused`]).
    /// Elasticsearch makes them durable at once; the embedded index does so at the next
    /// [`Search::commit`], which is what makes batching commits (far cheaper than one
    /// per batch) possible.
    pub async fn add(&self, docs: Vec<MessageDoc>) -> Result<Vec<Refused>, SearchError> {
        if docs.is_empty() {
            return Ok(Vec::new());
        }
        // Documents of a writer whose index the group no longer feeds wait in the queue
        // (unavailable, not refused), for the group's own writer to take over.
        self.check_membership().await.map_err(|e| match e {
            SearchError::ForeignIndex(why) => SearchError::Unavailable(why),
            e => e,
        })?;
        match self {
            Self::Embedded(index) => {
                let index = index.clone();
                blocking(move || index.add(docs)).await?;
                Ok(Vec::new())
            }
            Self::Elastic(index) => index.add(&docs).await,
        }
    }

    /// Makes everything added so far durable and visible.
    pub async fn commit(&self) -> Result<(), SearchError> {
        match self {
            Self::Embedded(index) => {
                let index = index.clone();
                blocking(move || index.commit()).await
            }
            Self::Elastic(_) => Ok(()),
        }
    }

    /// True when documents only become durable at [`Search::commit`].
    pub fn batches_commits(&self) -> bool {
        matches!(self, Self::Embedded(_))
    }

    /// One page of matches, in ascending message number.
    pub async fn search(&self, query: SearchQuery) -> Result<Vec<Message>, SearchError> {
        self.check_membership().await?;
        let docs = match self {
            Self::Embedded(index) => embedded_search(index, query).await?,
            Self::Elastic(index) => index.search(&query).await?,
        };
        Ok(docs.into_iter().map(MessageDoc::into_message).collect())
    }

    pub async fn ping(&self) -> Result<(), SearchError> {
        match self {
            Self::Embedded(_) => self.check_membership().await,
            Self::Elastic(index) => index.ping().await,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Embedded(_) => "tantivy",
            Self::Elastic(_) => "elasticsearch",
        }
    }
}

/// How long a search may hold one of the shared slots: a search that needs longer is
/// heavy, and finishes in the heavy lane.
const SLICE: Duration = Duration::from_millis(5);

/// Searches of the embedded index under way in this process, in either lane.
static SEARCHING: AtomicUsize = AtomicUsize::new(0);

/// Counts one search under way while it lives.
struct Searching;

impl Searching {
    fn start() -> Self {
        SEARCHING.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for Searching {
    fn drop(&mut self) {
        SEARCHING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Searches the embedded index in one of two lanes. Every search starts with one slice
/// of time in the shared slots ([`blocking`]); one that needs more, and every search of
/// a chat that needed more lately, runs in the heavy lane ([`blocking_heavy`]), which
/// has fewer slots. However many heavy searches loop, the others never wait behind
/// them for more than a slice.
async fn embedded_search(
    index: &Arc<embedded::EmbeddedIndex>,
    query: SearchQuery,
) -> Result<Vec<MessageDoc>, SearchError> {
    let _searching = Searching::start();
    let query = Arc::new(query);
    if !index.is_heavy(&query) {
        let (index, query) = (index.clone(), query.clone());
        if let Some(found) = blocking(move || index.search_within(&query, SLICE)).await? {
            return Ok(found);
        }
    }
    index.mark_heavy(&query);
    metrics::counter!("search_heavy_total").increment(1);
    let index = index.clone();
    blocking_heavy(move |threads| index.search_on(&query, threads)).await
}

/// The most threads one heavy search is shared among.
const HEAVY_THREADS: usize = 4;

/// Runs a heavy search off the async threads, at most one per two cores at a time
/// (at least one). A heavy search that finds no other search under way is shared among
/// the cores (up to [`HEAVY_THREADS`]): the cores are spare. Otherwise it runs on one,
/// so that however many searches run, heavy ones keep to their slots.
async fn blocking_heavy<T: Send + 'static>(
    f: impl FnOnce(usize) -> Result<T, SearchError> + Send + 'static,
) -> Result<T, SearchError> {
    // The cores, read once (on Linux, from the cgroup's files), and the lane's slots.
    static LANE: OnceLock<(usize, Semaphore)> = OnceLock::new();
    let (cores, slots) = LANE.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores, Semaphore::new((cores / 2).max(1)))
    });
    let _slot = slots
        .acquire()
        .await
        .map_err(|e| SearchError::Failed(e.to_string()))?;
    let threads = heavy_threads(*cores, SEARCHING.load(Ordering::Relaxed));
    tokio::task::spawn_blocking(move || f(threads))
        .await
        .map_err(|e| SearchError::Failed(e.to_string()))?
}

/// How many threads a heavy search is shared among, with `searching` searches under way
/// (itself included).
fn heavy_threads(cores: usize, searching: usize) -> usize {
    if searching <= 1 {
        cores.clamp(1, HEAVY_THREADS)
    } else {
        1
    }
}

/// Runs a call of the embedded index (file I/O, CPU-heavy) off the async threads, at
/// most one per core at a time: without the bound a burst of searches takes one
/// blocking-pool thread each, every one with an allocator heap of its own
/// (`docs/BENCHMARKS.md`, "Embedded-index calls were unbounded"), and more threads than
/// cores would not search faster; the calls wait their turn instead.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SearchError> + Send + 'static,
) -> Result<T, SearchError> {
    static SLOTS: OnceLock<Semaphore> = OnceLock::new();
    let slots = SLOTS.get_or_init(|| {
        Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    });
    let _slot = slots
        .acquire()
        .await
        .map_err(|e| SearchError::Failed(e.to_string()))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SearchError::Failed(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heavy_search_takes_the_cores_only_when_no_other_search_is_under_way() {
        assert_eq!(heavy_threads(2, 1), 2);
        assert_eq!(heavy_threads(16, 1), HEAVY_THREADS);
        assert_eq!(heavy_threads(1, 1), 1);
        assert_eq!(heavy_threads(2, 2), 1);
        assert_eq!(heavy_threads(16, 9), 1);
    }

    #[test]
    fn terms_are_split_and_folded() {
        assert_eq!(parse_terms(Some("  Hel  WOR ")).unwrap(), ["hel", "wor"]);
        assert_eq!(
            parse_terms(Some("STRASSE İstanbul ﬁ")).unwrap(),
            ["strasse", "i\u{307}stanbul", "fi"]
        );
        assert!(parse_terms(Some("   ")).is_err());
        assert!(parse_terms(None).is_err());
    }

    #[test]
    fn terms_that_fold_to_nothing_are_left_out() {
        assert_eq!(parse_terms(Some("\u{ad} hel")).unwrap(), ["hel"]);
        assert!(parse_terms(Some("\u{ad} \u{200b}")).is_err());
    }

    #[test]
    fn term_limits_apply_to_the_terms_as_sent() {
        assert!(parse_terms(Some(&["a"; 32].join(" "))).is_ok());
        assert!(parse_terms(Some(&["a"; 33].join(" "))).is_err());
        assert!(parse_terms(Some(&"a".repeat(256))).is_ok());
        assert!(parse_terms(Some(&"a".repeat(257))).is_err());
        // Folding may lengthen a term (`ﬃ` is three letters): the limit is on what is sent.
        assert_eq!(parse_terms(Some(&"ﬃ".repeat(85))).unwrap()[0].len(), 255);
    }

    #[test]
    fn matching_is_case_insensitive_substring_of_every_term() {
        let terms = |q| parse_terms(Some(q)).unwrap();
        assert!(matches("Hello World", &terms("ell")));
        assert!(matches("hello world", &terms("hel wor")));
        assert!(!matches("hello world", &terms("hel xyz")));
        assert!(matches("100% *sure*", &terms("% *s")));
    }

    #[test]
    fn matching_compares_folded_text() {
        let terms = |q| parse_terms(Some(q)).unwrap();
        assert!(matches("Straße", &terms("STRASSE")));
        assert!(matches("ΟΔΟΣ", &terms("οδος")));
        assert!(matches("ﬁnance", &terms("finance")));
        assert!(matches("E\u{301}cole", &terms("\u{c9}COLE")));
        assert!(matches("İstanbul", &terms("stanbul İSTANBUL")));
        assert!(!matches("Istanbul", &terms("İstanbul")));
    }
}
