//! A worker's periodic work, shard by shard: taking over idle entries, trimming the
//! streams behind their slowest group, measuring the backlog, and refreshing counts.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::join_all;

use crate::store::mysql;
use crate::store::queue::Shard;
use crate::store::queue::accepted_ms;
use crate::store::queue::stream::{GroupState, Position};

use super::persist::now_ms;
use super::{INDEX_GROUP, PERSIST_GROUP, Parent, Role, Worker, WorkerError};

/// How often the periodic work runs.
pub(super) const EVERY: Duration = Duration::from_secs(1);
/// Entries one `XTRIM` call may remove, and calls per trim: up to 2,000,000 entries a
/// second per shard, far above what the API can queue.
const TRIM_LIMIT: u64 = 10_000;
const TRIM_MAX_CALLS: usize = 200;

impl Worker {
    /// The periodic work of this consumer: the maintaining persister claims, trims and
    /// measures; the indexer claims and catches up. Each part runs whatever became of
    /// the one before: entries that cannot be taken over yet (their rows held by a
    /// frozen worker's transaction, say) must not keep the stream from being trimmed
    /// past an indexer, nor the queue from being measured.
    pub(super) async fn periodic(&mut self) -> Result<(), WorkerError> {
        let mut outcome = Ok(());
        match &self.role {
            Role::Persist if self.maintenance => {
                first_error(&mut outcome, self.claim_idle().await);
                first_error(&mut outcome, self.trim_and_measure().await);
            }
            Role::Persist => {}
            Role::Index(search) => {
                let search = search.clone();
                first_error(&mut outcome, self.claim_idle().await);
                first_error(&mut outcome, self.catch_up_index(&search).await.map(drop));
            }
        }
        outcome
    }

    /// Takes over entries other consumers left idle too long, in every shard, and
    /// handles them. The shards are asked all at once: asked one after the other, each
    /// a round trip behind the API's traffic, they held up the consumer for up to a
    /// second at every round under load, which for the indexer (one consumer) was half
    /// its time.
    async fn claim_idle(&mut self) -> Result<(), WorkerError> {
        let idle_ms = self.config.claim_idle.as_millis() as u64;
        let queue = &self.store.queue;
        let (group, consumer, cursors) = (self.group(), &self.consumer, &self.claim_cursors);
        let batch = self.config.batch_size;
        let asked = join_all(queue.keys.shards().map(|shard| async move {
            let found = queue
                .claim_idle(shard, group, consumer, idle_ms, &cursors[shard], batch)
                .await;
            (shard, found)
        }))
        .await;
        let mut outcome = Ok(());
        for (shard, found) in asked {
            let result = match found {
                Ok((cursor, mut claimed)) => {
                    self.claim_cursors[shard] = cursor;
                    if claimed.is_empty() {
                        Ok(())
                    } else {
                        tracing::info!(count = claimed.len(), shard, "took over idle entries");
                        metrics::counter!("worker_claimed_total").increment(claimed.len() as u64);
                        self.process(&mut claimed).await.map(drop)
                    }
                }
                Err(e) => Err(e.into()),
            };
            first_error(&mut outcome, result);
        }
        outcome
    }

    /// Trims every shard's entries that every group has acknowledged, and publishes the
    /// queue gauges (summed over the shards).
    pub(super) async fn trim_and_measure(&self) -> Result<(), WorkerError> {
        let queue = &self.store.queue;
        let (mut length, mut dead, mut used, mut full) = (0u64, 0u64, 0u64, false);
        let mut per_group: Vec<(&'static str, u64, u64)> = Vec::new();
        let mut outcome = Ok(());
        for shard in queue.keys.shards() {
            // A shard whose Redis is down is skipped: the others are still trimmed.
            let groups = match queue.groups(shard).await {
                Ok(groups) => groups,
                Err(e) => {
                    first_error(&mut outcome, Err(e.into()));
                    continue;
                }
            };
            for group in &groups {
                let label = group_label(&group.name);
                match per_group.iter_mut().find(|(l, ..)| *l == label) {
                    Some((_, pending, lag)) => {
                        *pending += group.pending;
                        *lag += group.lag.unwrap_or(0);
                    }
                    None => per_group.push((label, group.pending, group.lag.unwrap_or(0))),
                }
            }
            let measured = async {
                // Measured first: memory pressure decides whether the indexer may hold
                // the stream.
                let pressure = queue.measure_pressure(shard).await?;
                if let Some(floor) = self.trim_floor(shard, &groups, pressure.full).await? {
                    queue
                        .trim_behind(shard, &floor, TRIM_LIMIT, TRIM_MAX_CALLS)
                        .await?;
                }
                let (len, dlq) = queue.lengths(shard).await?;
                Ok::<_, WorkerError>((pressure, len, dlq))
            }
            .await;
            match measured {
                Ok((pressure, len, dlq)) => {
                    length += len;
                    dead += dlq;
                    used = used.max(pressure.used_memory);
                    full |= pressure.full;
                }
                Err(e) => first_error(&mut outcome, Err(e)),
            }
        }
        for (label, pending, lag) in per_group {
            metrics::gauge!("queue_pending", "group" => label).set(pending as f64);
            metrics::gauge!("queue_lag", "group" => label).set(lag as f64);
        }
        metrics::gauge!("queue_length").set(length as f64);
        metrics::gauge!("redis_used_memory_bytes").set(used as f64);
        metrics::gauge!("queue_full").set(if full { 1.0 } else { 0.0 });
        metrics::gauge!("dead_letter_length").set(dead as f64);
        outcome
    }

    /// Where a shard's stream may be trimmed up to. Persistence holds it back always;
    /// the indexer only while it lags persistence by at most `INDEX_LAG_MAX` and Redis is
    /// not under memory pressure. Past that, entries the indexer has not handled are
    /// trimmed anyway (a search outage must not become a Redis outage): MySQL has
    /// everything trimmed, and the indexer reads it back from there (see `catch_up`).
    async fn trim_floor(
        &self,
        shard: Shard,
        groups: &[GroupState],
        pressed: bool,
    ) -> Result<Option<String>, WorkerError> {
        let position = |name: &str| groups.iter().find(|g| g.name == name).map(|g| &g.position);
        let Some(persist) = position(PERSIST_GROUP).map(|p| p.id.clone()) else {
            return Ok(None);
        };
        let Some(index) = position(INDEX_GROUP) else {
            return Ok(Some(persist));
        };
        // The first entry the indexer has not handled: its oldest pending one, or the one
        // after the last delivered to it. Trimming to `persist` removes the entries
        // before it; only if that one is among them does the indexer lose anything.
        let Position { id: index, needed } = index;
        let from = if *needed {
            index.clone()
        } else {
            format!("({index}")
        };
        let Some(next) = self.store.queue.first_entry_from(shard, &from).await? else {
            return Ok(Some(persist));
        };
        if stream_id_le(&persist, &next) {
            return Ok(Some(persist));
        }
        // How long ago that entry was accepted.
        let lag_ms = now_ms().saturating_sub(accepted_ms(&next).unwrap_or(0));
        metrics::gauge!("index_backlog_age_seconds").set(lag_ms as f64 / 1000.0);
        let past_index = &self.trimming_past_index[shard];
        if u128::from(lag_ms) <= self.config.index_lag_max.as_millis() && !pressed {
            if past_index.swap(false, Ordering::Relaxed) {
                tracing::info!(
                    shard,
                    "the stream is trimmed behind the search indexer again"
                );
            }
            return Ok(Some(index.clone()));
        }
        // The mark first: without it the indexer would never learn of its gap. Redis at
        // its very `maxmemory` refuses it; then only what every group is done with goes
        // (which frees memory), and the next round tries again.
        if let Err(e) = self.store.queue.mark_index_gap(shard, index).await {
            if crate::store::redis_is_full(&e) {
                return Ok(Some(index.clone()));
            }
            return Err(e.into());
        }
        if !past_index.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                shard,
                lag_ms,
                pressed,
                from = %index,
                "the search indexer lags too far behind: trimming the stream past it; it \
                 will catch up from MySQL"
            );
        }
        metrics::counter!("index_trimmed_past_total").increment(1);
        Ok(Some(persist))
    }

    /// Refreshes the counts of the parents touched since the last sync, in every shard.
    /// `SPOP` hands each parent to exactly one worker; a failed refresh puts the parent
    /// back.
    pub async fn sync_counts(&self) -> Result<(), WorkerError> {
        let mut outcome = Ok(());
        for shard in self.store.queue.keys.shards() {
            first_error(&mut outcome, self.sync_counts_in(shard).await);
        }
        outcome
    }

    async fn sync_counts_in(&self, shard: Shard) -> Result<(), WorkerError> {
        let queue = &self.store.queue;
        loop {
            let members = queue.pop_touched(shard, mysql::COUNT_SYNC_BATCH).await?;
            if members.is_empty() {
                return Ok(());
            }
            if let Err(e) = self.refresh_counts(&members).await {
                queue.mark_touched(shard, &members).await?;
                return Err(e.into());
            }
        }
    }

    /// Refreshes the parents' counts, each kind of parent with a read and an update per
    /// statement's worth of parents. Repeating it is harmless (counts only rise).
    pub(super) async fn refresh_counts(&self, members: &[String]) -> Result<(), sqlx::Error> {
        let (mut apps, mut chats) = (Vec::new(), Vec::new());
        for member in members {
            match Parent::parse(member) {
                Some(Parent::Application(app)) => apps.push(app),
                Some(Parent::Chat(app, chat)) => chats.push((app, chat)),
                None => {}
            }
        }
        mysql::sync_chats_counts(&self.store.mysql, &apps).await?;
        mysql::sync_messages_counts(&self.store.mysql, &chats).await?;
        metrics::counter!("counts_synced_total").increment(members.len() as u64);
        Ok(())
    }
}

/// Keeps the first error of a round over the shards: one shard whose Redis is down must
/// not stop the work on the others.
pub(super) fn first_error(outcome: &mut Result<(), WorkerError>, result: Result<(), WorkerError>) {
    if let Err(e) = result
        && outcome.is_ok()
    {
        *outcome = Err(e);
    }
}

/// A group's name as a metric label: the known groups, else `other` (labels stay bounded
/// whatever else shares the stream).
fn group_label(name: &str) -> &'static str {
    match name {
        PERSIST_GROUP => PERSIST_GROUP,
        INDEX_GROUP => INDEX_GROUP,
        _ => "other",
    }
}

fn stream_id_le(a: &str, b: &str) -> bool {
    let parse = |s: &str| -> (u64, u64) {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    };
    parse(a) <= parse(b)
}
