//! The indexer's catch-up from MySQL after the stream was trimmed past it.
//!
//! A search backend that is down or slow must not hold the write queue (and so Redis
//! memory) for ever: past `INDEX_LAG_MAX`, or under memory pressure, the persisting
//! workers mark where the indexer's gap begins (`Queue::mark_index_gap`), then trim the
//! stream behind persistence alone. Everything trimmed was persisted first, so the
//! indexer reads the gap back from MySQL, the system of record:
//!
//! 1. one script turns the gap mark into a catch-up mark and makes the index group anew
//!    just before the stream's first entry (it then reads every entry still there);
//! 2. the messages whose row version is at or after the gap's start are indexed from
//!    MySQL, in batches (versions make this idempotent, and never let an older document
//!    replace a newer one);
//! 3. the catch-up mark is removed. A worker that dies during step 2 finds the mark at
//!    its next start and does step 2 again.

use futures_util::future::join_all;

use crate::search::Search;
use crate::store::mysql::{self, MessageCursor};
use crate::store::queue::{Shard, version_of};

use super::{INDEX_GROUP, Worker, WorkerError};

/// Messages read from MySQL per catch-up batch.
const CATCH_UP_BATCH: u32 = 5_000;

impl Worker {
    /// Index role: catches up from MySQL in every shard whose stream was trimmed past
    /// this group. Returns the number of messages indexed from MySQL.
    ///
    /// Every shard's marks are read at once, one round trip in all (read shard after
    /// shard, they held up the indexer, the group's one consumer, for up to half a
    /// second at every round under load); only a shard with a mark is then caught up.
    pub(super) async fn catch_up_index(&mut self, search: &Search) -> Result<u64, WorkerError> {
        let queue = &self.store.queue;
        let marks = join_all(queue.keys.shards().map(|shard| async move {
            let marks = async {
                let in_progress = queue.index_catch_up_in_progress(shard).await?;
                let gap = in_progress.is_none() && queue.index_gap_marked(shard).await?;
                Ok::<_, redis::RedisError>((in_progress, gap))
            };
            (shard, marks.await)
        }))
        .await;
        let (mut indexed, mut outcome) = (0, Ok(()));
        for (shard, marks) in marks {
            let result = match marks {
                Ok((None, false)) => Ok(0),
                Ok((in_progress, _)) => self.catch_up_shard(search, shard, in_progress).await,
                Err(e) => Err(e.into()),
            };
            match result {
                Ok(n) => indexed += n,
                Err(e) => super::maintenance::first_error(&mut outcome, Err(e)),
            }
        }
        outcome.map(|()| indexed)
    }

    /// Catches up one shard: `in_progress` is where a catch-up already under way
    /// starts; without one, the shard had a gap mark when its marks were read, and the
    /// catch-up script starts one if the mark is still there.
    async fn catch_up_shard(
        &mut self,
        search: &Search,
        shard: Shard,
        in_progress: Option<String>,
    ) -> Result<u64, WorkerError> {
        let from = match in_progress {
            Some(from) => from,
            None => {
                // What this worker holds was read before the reset: commit and
                // acknowledge it first.
                self.flush_index(true).await?;
                match self
                    .store
                    .queue
                    .start_index_catch_up(shard, INDEX_GROUP)
                    .await?
                {
                    Some(from) => from,
                    None => return Ok(0),
                }
            }
        };
        // Versions come from each shard's own stream; rows of other shards at or after
        // this one are indexed again too, which is harmless (a document is replaced only
        // by a newer version) and keeps the scan to one index range.
        let min_version = version_of(&from).unwrap_or(0);
        tracing::warn!(shard, from = %from, "search index: catching up from MySQL");
        let mut cursor = MessageCursor::default();
        let mut indexed = 0u64;
        loop {
            let (docs, next) =
                mysql::messages_for_index(&self.store.mysql, cursor, min_version, CATCH_UP_BATCH)
                    .await?;
            if docs.is_empty() {
                break;
            }
            indexed += docs.len() as u64;
            search.index(docs).await?;
            cursor = next;
        }
        self.store.queue.finish_index_catch_up(shard).await?;
        metrics::counter!("index_caught_up_total").increment(indexed);
        tracing::info!(
            shard,
            messages = indexed,
            "search index: caught up from MySQL"
        );
        Ok(indexed)
    }
}
