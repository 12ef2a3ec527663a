//! Indexing: message bodies go to the search index; entries are acknowledged, shard by
//! shard, once the index has committed them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::search::{MessageDoc, Refused, Search, SearchError};
use crate::store::Store;
use crate::store::queue::stream::Delivered;

use super::persist::record_lag;
use super::{Entry, INDEX_GROUP, Role, Worker, WorkerError, Write};

/// The embedded index commits (and the `index` group acknowledges) at most this often:
/// a commit per small batch would cost more than the indexing itself.
const INDEX_COMMIT_EVERY: Duration = Duration::from_millis(200);
/// How often it commits while working through a backlog (full batches of old entries):
/// each commit writes a segment, which merges later write again, so fewer, larger
/// segments cost less CPU per message (in-process, 1,000,000 messages committed every
/// 20,000: 13.2 µs each; every 100,000: 11.1 µs). The backlog's messages are seconds
/// late already; this adds at most a second.
const INDEX_COMMIT_BEHIND: Duration = Duration::from_secs(1);
/// Entries added and not yet committed, at most: a commit is due at this many. Their
/// payloads are dropped once added (only the ids are kept, to acknowledge).
const INDEX_COMMIT_MAX_PENDING: usize = 100_000;

/// Whether additions that have waited `waited`, `pending` of them, are due to be
/// committed, `behind` a backlog or not.
fn commit_due(waited: Duration, pending: usize, behind: bool) -> bool {
    let every = if behind {
        INDEX_COMMIT_BEHIND
    } else {
        INDEX_COMMIT_EVERY
    };
    waited >= every || pending >= INDEX_COMMIT_MAX_PENDING
}

/// A batch being added to the embedded index while the indexer reads and parses the
/// next one.
pub(super) struct Adding {
    handle: JoinHandle<Result<Vec<Refused>, SearchError>>,
    /// The batch's entries, payloads included (a refused document is dead-lettered).
    batch: Vec<Delivered>,
    /// For each document added, its entry's place in `batch`.
    positions: Vec<usize>,
}

/// Acknowledgements of committed entries on their way to Redis while indexing goes on:
/// the entries come back when they could not be sent, to go with the next commit's.
pub(super) type Acking = JoinHandle<Result<(), (WorkerError, Vec<Delivered>)>>;

impl Worker {
    /// Commits the index and acknowledges what it now holds, when due (or `now`). With
    /// `now`, it returns once the batch being added is committed and acknowledged.
    pub(super) async fn flush_index(&mut self, now: bool) -> Result<(), WorkerError> {
        let Role::Index(search) = &self.role else {
            return Ok(());
        };
        let search = search.clone();
        if now {
            self.finish_adding().await?;
        }
        if let Some(since) = self.unacked_since {
            let due = now
                || !search.batches_commits()
                || commit_due(since.elapsed(), self.unacked.len(), self.index_behind);
            if due {
                // The commit takes the batch being added too.
                self.finish_adding().await?;
                let started = std::time::Instant::now();
                search.commit().await?;
                metrics::histogram!("search_index_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                // One acknowledgement under way at a time: the next waits for it.
                self.finish_acking().await?;
                let committed = std::mem::take(&mut self.unacked);
                self.unacked_since = None;
                let store = self.store.clone();
                self.acking = Some(tokio::spawn(async move {
                    match acknowledge(&store, &committed).await {
                        Ok(()) => Ok(()),
                        Err(e) => Err((e, committed)),
                    }
                }));
            }
        }
        if now {
            self.finish_acking().await?;
        }
        Ok(())
    }

    /// Waits for the acknowledgement under way, if any. Entries it could not
    /// acknowledge go with the next commit's.
    async fn finish_acking(&mut self) -> Result<(), WorkerError> {
        let Some(acking) = self.acking.take() else {
            return Ok(());
        };
        match acking.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err((e, mut committed))) => {
                committed.append(&mut self.unacked);
                self.unacked = committed;
                self.unacked_since.get_or_insert_with(Instant::now);
                Err(e)
            }
            // The task panicked: its entries stay pending, and are taken over.
            Err(e) => Err(SearchError::Failed(e.to_string()).into()),
        }
    }

    /// Waits for the batch being added, if any, and takes its entries to acknowledge
    /// once committed. A batch the index could not take now is kept, to be added again
    /// before the next one.
    async fn finish_adding(&mut self) -> Result<(), WorkerError> {
        let Some(Adding {
            handle,
            batch,
            positions,
        }) = self.adding.take()
        else {
            return Ok(());
        };
        let added = handle
            .await
            .unwrap_or_else(|e| Err(SearchError::Failed(e.to_string())));
        self.settle_added(batch, &positions, added).await
    }

    /// What follows an addition of the documents of `batch` (the entry of each at
    /// `positions`): refused documents are dead-lettered, and the entries kept to
    /// acknowledge at the next commit, their payloads dropped. When the index is
    /// unavailable, or a dead letter cannot be written, the batch is kept whole to add
    /// again, and the error returned.
    async fn settle_added(
        &mut self,
        mut batch: Vec<Delivered>,
        positions: &[usize],
        added: Result<Vec<Refused>, SearchError>,
    ) -> Result<(), WorkerError> {
        match added {
            // A document refused for good goes to the dead-letter stream with the reason
            // (acknowledged for this group only); a transient failure is an error, and
            // the whole batch is tried again.
            Ok(refused) => {
                for r in refused {
                    let Some(item) = positions.get(r.position).and_then(|&i| batch.get(i)) else {
                        continue;
                    };
                    if let Err(e) = self
                        .dead_letter(item, &format!("search: {}", r.reason))
                        .await
                    {
                        self.keep_for_retry(batch);
                        return Err(e);
                    }
                }
            }
            Err(e @ SearchError::Unavailable(_)) => {
                self.keep_for_retry(batch);
                return Err(e.into());
            }
            Err(e) => {
                // The index can be rebuilt from MySQL (`reindex`); holding the queue
                // for a document the backend refuses would stall every later one.
                tracing::error!(error = %e, "documents refused by the search backend");
                metrics::counter!("index_failures_total").increment(1);
            }
        }
        // Only the ids are needed until the commit: the payloads (bodies of up to
        // 64 KB each, copied into the documents) go now.
        batch.iter_mut().for_each(Delivered::drop_payload);
        self.unacked.append(&mut batch);
        self.unacked_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Keeps a batch to add again, before any kept earlier.
    fn keep_for_retry(&mut self, mut batch: Vec<Delivered>) {
        batch.append(&mut self.retry);
        self.retry = batch;
    }

    /// Adds the messages of one batch to the index and takes the batch's entries, to
    /// acknowledge once committed. On an error the batch is left in `raw`, after any
    /// batch kept to add again.
    ///
    /// For the embedded index the addition goes on in the background while the indexer
    /// reads and parses the next batch; this call first waits for the previous one.
    /// Elasticsearch, where an addition is durable at once, adds each batch in turn.
    pub(super) async fn index_batch(
        &mut self,
        search: &Search,
        raw: &mut Vec<Delivered>,
    ) -> Result<usize, WorkerError> {
        // A batch the index could not take goes again, first.
        if !self.retry.is_empty() {
            raw.splice(0..0, std::mem::take(&mut self.retry));
        }
        let count = raw.len();
        let (positions, docs) = documents(raw);
        if !search.batches_commits() {
            let added = search.add(docs).await;
            let batch = std::mem::take(raw);
            if let Err(e) = self.settle_added(batch, &positions, added).await {
                *raw = std::mem::take(&mut self.retry);
                return Err(e);
            }
            return Ok(count);
        }
        self.finish_adding().await?;
        // Commits come as often as before: the wait starts when the batch is handed over.
        self.unacked_since.get_or_insert_with(Instant::now);
        let search = search.clone();
        self.adding = Some(Adding {
            handle: tokio::spawn(async move { search.add(docs).await }),
            batch: std::mem::take(raw),
            positions,
        });
        Ok(count)
    }
}

/// The messages of a batch as documents, each with its entry's place in the batch
/// (chat entries have none).
fn documents(raw: &[Delivered]) -> (Vec<usize>, Vec<MessageDoc>) {
    raw.iter()
        .enumerate()
        .filter_map(|(i, item)| Entry::parse(item).ok().map(|entry| (i, entry)))
        .filter_map(|(i, entry)| match entry.write {
            Write::Message(m) => Some((
                i,
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
        .unzip()
}

/// Acknowledges committed entries for the index group, shard by shard, and records
/// their indexing lag.
async fn acknowledge(store: &Store, committed: &[Delivered]) -> Result<(), WorkerError> {
    let mut by_shard: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for item in committed {
        by_shard.entry(item.shard).or_default().push(item.id());
    }
    for (shard, ids) in by_shard {
        store.queue.ack(shard, INDEX_GROUP, &ids).await?;
    }
    record_lag("index_lag_seconds", committed.iter().map(Delivered::id));
    metrics::counter!("worker_indexed_total").increment(committed.len() as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_come_every_200_ms_and_every_second_behind_a_backlog() {
        let ms = Duration::from_millis;
        assert!(!commit_due(ms(199), 10, false));
        assert!(commit_due(ms(200), 10, false));
        assert!(!commit_due(ms(200), 10, true));
        assert!(!commit_due(ms(999), 99_999, true));
        assert!(commit_due(ms(1_000), 10, true));
        assert!(commit_due(ms(0), INDEX_COMMIT_MAX_PENDING, true));
        assert!(commit_due(ms(0), INDEX_COMMIT_MAX_PENDING, false));
    }
}
