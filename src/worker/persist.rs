//! Persisting: a batch (entries of any shards) becomes one MySQL transaction, then each
//! shard's entries are released and acknowledged.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use crate::store::queue::accepted_ms;
use crate::store::queue::stream::Delivered;
use crate::store::{mysql, mysql_is_transient};

use super::{Entry, PERSIST_GROUP, Worker, WorkerError, Write};

impl Worker {
    /// Persists one batch; returns how many entries it handled (persisted or
    /// dead-lettered).
    pub(super) async fn persist_batch(&self, raw: &[Delivered]) -> Result<usize, WorkerError> {
        let mut entries = Vec::with_capacity(raw.len());
        for item in raw {
            match Entry::parse(item) {
                Ok(entry) => entries.push(entry),
                Err(reason) => self.dead_letter(item, &reason).await?,
            }
        }
        let started = Instant::now();
        let persisted = self.persist(&entries).await;
        let sql_done = started.elapsed();
        if let Err(err) = persisted {
            if mysql_is_transient(&err) {
                return Err(err.into());
            }
            // A statement failed on its data: find the culprits one by one, so that
            // they alone go to the dead-letter stream and the rest are kept.
            tracing::warn!(error = %err, "batch failed; retrying entries one by one");
            let mut kept = Vec::with_capacity(entries.len());
            for entry in entries {
                match self.persist(std::slice::from_ref(&entry)).await {
                    Ok(()) => kept.push(entry),
                    Err(e) if mysql_is_transient(&e) => return Err(e.into()),
                    Err(e) => {
                        let item = raw.iter().find(|r| r.id() == entry.id);
                        if let Some(item) = item {
                            self.dead_letter(item, &e.to_string()).await?;
                        }
                    }
                }
            }
            entries = kept;
        }
        self.acknowledge(&entries).await?;
        tracing::debug!(entries = raw.len(), sql = ?sql_done, total = ?started.elapsed(), "batch persisted");
        Ok(raw.len())
    }

    async fn persist(&self, entries: &[Entry]) -> Result<(), sqlx::Error> {
        let mut chats = Vec::new();
        let mut messages = Vec::new();
        for entry in entries {
            match &entry.write {
                Write::Chat(c) => chats.push(c),
                Write::Message(m) => messages.push(m),
            }
        }
        let mut tx = self.store.mysql.begin().await?;
        mysql::upsert_chats(&mut tx, chats).await?;
        mysql::upsert_messages(&mut tx, messages).await?;
        tx.commit().await
    }

    /// After the commit, shard by shard: release the pending records and mark the
    /// parents touched, then acknowledge. In that order, a crash or a Redis error
    /// part-way leaves the entries unacknowledged, so they are redelivered and the whole
    /// step runs again (each part of it is idempotent); acknowledging first could leave a
    /// stale pending record that nothing would ever release.
    async fn acknowledge(&self, entries: &[Entry]) -> Result<(), WorkerError> {
        let mut by_shard: BTreeMap<usize, Vec<&Entry>> = BTreeMap::new();
        for entry in entries {
            by_shard.entry(entry.shard).or_default().push(entry);
        }
        let queue = &self.store.queue;
        for (shard, entries) in by_shard {
            let releases: Vec<_> = entries.iter().map(|e| e.release(&queue.keys)).collect();
            queue.release_pending(shard, &releases).await?;
            let touched: Vec<String> = entries
                .iter()
                .flat_map(|e| e.touched())
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            match queue.mark_touched(shard, &touched).await {
                Ok(()) => {}
                // At `maxmemory` the set cannot grow: refresh these counts now instead,
                // so that acknowledging (which frees memory) goes on.
                Err(e) if crate::store::redis_is_full(&e) => self.refresh_counts(&touched).await?,
                Err(e) => return Err(e.into()),
            }
            let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            queue.ack(shard, PERSIST_GROUP, &ids).await?;
        }
        record_lag("persist_lag_seconds", entries.iter().map(|e| e.id.as_str()));
        metrics::histogram!("worker_batch_size").record(entries.len() as f64);
        metrics::counter!("worker_persisted_total").increment(entries.len() as u64);
        Ok(())
    }

    /// Moves an entry to its shard's dead-letter stream with the reason, and
    /// acknowledges it for this worker's group.
    pub(super) async fn dead_letter(
        &self,
        item: &Delivered,
        reason: &str,
    ) -> Result<(), WorkerError> {
        tracing::error!(entry = %item.id(), shard = item.shard, group = self.group(), %reason, "entry sent to the dead-letter stream");
        metrics::counter!("dead_letters_total", "group" => self.group()).increment(1);
        let cap = usize::try_from(self.config.dead_letter_max).unwrap_or(usize::MAX);
        self.store
            .queue
            .dead_letter(item, self.group(), reason, cap)
            .await?;
        Ok(())
    }
}

/// Milliseconds since the epoch.
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Records, for each entry, the time from its acceptance (its stream id) to now.
pub(super) fn record_lag<'a>(metric: &'static str, ids: impl Iterator<Item = &'a str>) {
    let now_ms = now_ms();
    let histogram = metrics::histogram!(metric);
    for ms in ids.filter_map(accepted_ms) {
        histogram.record(now_ms.saturating_sub(ms) as f64 / 1000.0);
    }
}
