//! Indexing: message bodies go to the search index; entries are acknowledged, shard by
//! shard, once the index has committed them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::search::{MessageDoc, Search, SearchError};
use crate::store::queue::stream::Delivered;

use super::persist::record_lag;
use super::{Entry, INDEX_GROUP, Role, Worker, WorkerError, Write};

/// The embedded index commits (and the `index` group acknowledges) at most this often:
/// a commit per small batch would cost more than the indexing itself.
const INDEX_COMMIT_EVERY: Duration = Duration::from_millis(200);
const INDEX_COMMIT_MAX_PENDING: usize = 50_000;

impl Worker {
    /// Commits the index and acknowledges what it now holds, when due (or `now`).
    pub(super) async fn flush_index(&mut self, now: bool) -> Result<(), WorkerError> {
        let Role::Index(search) = &self.role else {
            return Ok(());
        };
        let Some(since) = self.unacked_since else {
            return Ok(());
        };
        let due = now
            || since.elapsed() >= INDEX_COMMIT_EVERY
            || self.unacked.len() >= INDEX_COMMIT_MAX_PENDING
            || !search.batches_commits();
        if !due {
            return Ok(());
        }
        let started = std::time::Instant::now();
        search.commit().await?;
        metrics::histogram!("search_index_commit_seconds").record(started.elapsed().as_secs_f64());
        let mut by_shard: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
        for item in &self.unacked {
            by_shard.entry(item.shard).or_default().push(item.id());
        }
        for (shard, ids) in by_shard {
            self.store.queue.ack(shard, INDEX_GROUP, &ids).await?;
        }
        record_lag("index_lag_seconds", self.unacked.iter().map(Delivered::id));
        metrics::counter!("worker_indexed_total").increment(self.unacked.len() as u64);
        self.unacked.clear();
        self.unacked_since = None;
        Ok(())
    }

    /// Adds the messages of one batch to the index and takes the batch's entries, to
    /// acknowledge once committed. On an error the batch is left as it was.
    pub(super) async fn index_batch(
        &mut self,
        search: &Search,
        raw: &mut Vec<Delivered>,
    ) -> Result<usize, WorkerError> {
        let (items, docs): (Vec<&Delivered>, Vec<MessageDoc>) = raw
            .iter()
            .filter_map(|item| Entry::parse(item).ok().map(|entry| (item, entry)))
            .filter_map(|(item, entry)| match entry.write {
                Write::Message(m) => Some((
                    item,
                    MessageDoc {
                        token: entry.token,
                        chat: m.chat_number,
                        number: m.number,
                        body: m.body,
                        version: m.version,
                        created_at: m.created_at,
                        updated_at: m.updated_at,
                    },
                )),
                Write::Chat(_) => None,
            })
            .unzip();
        match search.add(docs).await {
            // A document refused for good goes to the dead-letter stream with the reason
            // (acknowledged for this group only); a transient failure is an error, and
            // the whole batch is tried again.
            Ok(refused) => {
                for r in refused {
                    if let Some(item) = items.get(r.position) {
                        self.dead_letter(item, &format!("search: {}", r.reason))
                            .await?;
                    }
                }
            }
            Err(e @ SearchError::Unavailable(_)) => return Err(e.into()),
            Err(e) => {
                // The index can be rebuilt from MySQL (`reindex`); holding the queue
                // for a document the backend refuses would stall every later one.
                tracing::error!(error = %e, "documents refused by the search backend");
                metrics::counter!("index_failures_total").increment(1);
            }
        }
        let count = raw.len();
        self.unacked.append(raw);
        self.unacked_since.get_or_insert_with(Instant::now);
        Ok(count)
    }
}
