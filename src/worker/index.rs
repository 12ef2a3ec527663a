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
            || !search.batches_commits()
            || commit_due(since.elapsed(), self.unacked.len(), self.index_behind);
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
        // Only the ids are needed until the commit: the payloads (bodies of up to
        // 64 KB each, copied into the documents) go now.
        raw.iter_mut().for_each(Delivered::drop_payload);
        self.unacked.append(raw);
        self.unacked_since.get_or_insert_with(Instant::now);
        Ok(count)
    }
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
