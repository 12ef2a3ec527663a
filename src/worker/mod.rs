//! The worker: drains the write queue into MySQL and into the search index, in batches,
//! and keeps counts fresh. Each destination has its own consumer group on every shard's
//! stream (`persist`, `index`), so a search outage delays indexing, never persistence.
//!
//! * [`fetch`]: fetchers wait on every shard's stream and hand entries to the consumers
//!   of their process; a consumer's batch may mix shards.
//! * [`persist`]: a batch becomes multi-row idempotent upserts in one transaction; the
//!   entries are acknowledged only after the commit (a crash before means redelivery,
//!   and redelivery changes nothing). An entry that cannot be persisted goes to its
//!   shard's dead-letter stream, with the reason.
//! * [`index`]: message bodies go to the search index, acknowledged once committed;
//!   `catch_up` reads back from MySQL what was trimmed before the indexer saw it.
//! * [`maintenance`] (one persisting consumer per process): takes over entries other
//!   consumers left unacknowledged for `WORKER_CLAIM_IDLE`, trims each stream behind the
//!   slowest group, measures the backlog, and every `COUNTS_SYNC_INTERVAL` refreshes the
//!   counts of the parents touched since.

mod catch_up;
mod entry;
mod fetch;
mod index;
mod maintenance;
mod persist;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use entry::{Entry, Parent, Write};
pub use fetch::Inbox;

use crate::config::WorkerConfig;
use crate::search::{Search, SearchError};
use crate::store::Store;
use crate::store::queue::codec::accepted_ms;
use crate::store::queue::stream::Delivered;

/// The consumer group that persists to MySQL.
pub const PERSIST_GROUP: &str = "persist";
/// The consumer group that feeds the search index.
pub const INDEX_GROUP: &str = "index";

/// What a worker does with the entries it reads.
#[derive(Clone)]
pub enum Role {
    Persist,
    Index(Search),
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A batch that failed this many times in a row is let go: its entries stay pending in
/// Redis and are taken over after `WORKER_CLAIM_IDLE` (by this or another worker), so one
/// shard whose Redis is down cannot hold the entries of the others.
const BATCH_ATTEMPTS: u32 = 3;
/// Longest a consumer waits for entries before it does its periodic work.
const IDLE_WAIT: Duration = Duration::from_millis(200);
/// The indexer of a process whose persisting consumers read a full batch this recently
/// leaves the CPU to them (see [`Backlog`]), checking again this often, and for at most
/// `INDEX_YIELD_MAX` in a row: indexing slows down under a backlog but never stops.
const BACKLOG_RECENT: Duration = Duration::from_millis(250);
const INDEX_YIELD_STEP: Duration = Duration::from_millis(50);
const INDEX_YIELD_MAX: Duration = Duration::from_secs(5);

/// A full persisting batch whose oldest entry was accepted longer ago than this is a
/// backlog. A full batch of fresh entries is only a busy queue that persistence keeps up
/// with: the indexer goes on beside it, or it would fall behind for as long as the load
/// lasts and have the whole load to index after it.
const BACKLOG_AGE_MS: u64 = 1_000;

/// Whether a persisting batch of `handled` entries, the oldest accepted at `oldest_ms`,
/// shows a backlog at `now_ms`.
fn is_backlog(handled: usize, batch_size: usize, oldest_ms: Option<u64>, now_ms: u64) -> bool {
    handled >= batch_size
        && oldest_ms.is_some_and(|oldest| now_ms.saturating_sub(oldest) >= BACKLOG_AGE_MS)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Shared by the consumers of one process: when a persisting consumer last read a full
/// batch of old entries (see [`is_backlog`]), i.e. worked through a backlog. While it does, the process's indexer waits:
/// persistence (durability, the counts, what other readers see) takes the CPU first, and
/// indexing, whose lag nothing waits on, catches up right after. When MySQL is down no
/// batch completes, so indexing goes on as usual. Timed on tokio's clock, which tests
/// can pause.
#[derive(Clone, Default)]
pub struct Backlog(Arc<Mutex<Option<tokio::time::Instant>>>);

impl Backlog {
    fn mark(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now());
    }

    /// Whether a full batch was persisted within `recent`.
    fn active(&self, recent: Duration) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < recent)
    }

    /// Waits while the backlog is active, for at most `max` or until shutdown; how long,
    /// when it waited at all.
    async fn wait_out(
        &self,
        max: Duration,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Duration> {
        let started = tokio::time::Instant::now();
        let mut waited = false;
        while self.active(BACKLOG_RECENT) && started.elapsed() < max && !*shutdown.borrow() {
            waited = true;
            tokio::select! {
                _ = tokio::time::sleep(INDEX_YIELD_STEP) => {}
                _ = shutdown.changed() => {}
            }
        }
        waited.then(|| started.elapsed())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("search: {0}")]
    Search(#[from] SearchError),
}

/// One consumer of one group.
pub struct Worker {
    store: Store,
    config: WorkerConfig,
    consumer: String,
    role: Role,
    /// Where the scan for idle entries goes on, per shard.
    claim_cursors: Vec<String>,
    /// Index role: entries added to the index but not yet committed, hence not yet
    /// acknowledged, and since when.
    unacked: Vec<Delivered>,
    unacked_since: Option<Instant>,
    /// Index role: the batch being added to the embedded index, if any.
    adding: Option<index::Adding>,
    /// Index role: the entries of a batch the index could not take, to add again.
    retry: Vec<Delivered>,
    /// Index role: the acknowledgement of the last commit's entries, while under way.
    acking: Option<index::Acking>,
    /// Index role: whether the last batch indexed was a backlog's (see [`is_backlog`]),
    /// when commits come less often (see `index::INDEX_COMMIT_BEHIND`).
    index_behind: bool,
    /// Persist role: claims, trims and syncs counts (one consumer per process does).
    maintenance: bool,
    backlog: Backlog,
    /// The entries fetched for this consumer's group; made at `run` if not shared.
    inbox: Option<Inbox>,
    /// Per shard: whether the last trim went past the indexer (logged once per episode).
    trimming_past_index: Vec<AtomicBool>,
}

impl Worker {
    /// A consumer named `WORKER_NAME` (default: host and pid). Creates its group on
    /// every shard if missing (an existing group is only read, so that a worker starts
    /// while Redis is at its `maxmemory`; `migrate` creates the groups ahead of time), and
    /// removes the group's consumers left behind by earlier processes.
    pub async fn new(store: Store, config: WorkerConfig, role: Role) -> Result<Self, WorkerError> {
        let consumer = config.name.clone().unwrap_or_else(default_consumer_name);
        let shards = store.queue.keys.shard_count();
        let worker = Self {
            store,
            config,
            consumer,
            claim_cursors: vec!["0-0".into(); shards],
            role,
            unacked: Vec::new(),
            unacked_since: None,
            adding: None,
            retry: Vec::new(),
            acking: None,
            index_behind: false,
            maintenance: true,
            backlog: Backlog::default(),
            inbox: None,
            trimming_past_index: (0..shards).map(|_| AtomicBool::new(false)).collect(),
        };
        for shard in worker.store.queue.keys.shards() {
            worker
                .store
                .queue
                .ensure_group(shard, worker.group())
                .await?;
            // Every restart leaves a consumer name behind. Those with nothing pending,
            // idle for longer than `WORKER_CLAIM_IDLE`, are removed: live consumers read
            // at least every second, and removing one with nothing pending loses nothing.
            let idle = worker.config.claim_idle.as_millis();
            let removed = worker
                .store
                .queue
                .remove_stale_consumers(shard, worker.group(), idle)
                .await?;
            if removed > 0 {
                tracing::info!(
                    count = removed,
                    shard,
                    group = worker.group(),
                    "removed stale consumers"
                );
            }
        }
        Ok(worker)
    }

    /// Leaves claiming, trimming and count syncing to another consumer of this process.
    pub fn skip_maintenance(&mut self) {
        self.maintenance = false;
    }

    /// Joins the other consumers of this process in reporting (persist) or heeding
    /// (index) a persistence backlog.
    pub fn share_backlog(&mut self, backlog: Backlog) {
        self.backlog = backlog;
    }

    /// Takes entries from these fetchers (shared with other consumers of the group).
    pub fn share_inbox(&mut self, inbox: Inbox) {
        self.inbox = Some(inbox);
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Index role: waits while this process's persisting consumers work through a
    /// backlog, up to `INDEX_YIELD_MAX`.
    async fn yield_to_persistence(&self, shutdown: &mut watch::Receiver<bool>) {
        if matches!(self.role, Role::Index(_))
            && let Some(waited) = self.backlog.wait_out(INDEX_YIELD_MAX, shutdown).await
        {
            metrics::histogram!("worker_index_yield_seconds").record(waited.as_secs_f64());
        }
    }

    pub fn group(&self) -> &'static str {
        match self.role {
            Role::Persist => PERSIST_GROUP,
            Role::Index(_) => INDEX_GROUP,
        }
    }

    /// Runs until `shutdown` turns true; the batch in hand, and whatever else this
    /// process has read from the queue, is finished and acknowledged first.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let inbox = match self.inbox.clone() {
            Some(inbox) => inbox,
            None => loop {
                let spawned = Inbox::spawn(
                    &self.store,
                    self.group(),
                    &self.consumer,
                    self.config.batch_size,
                    self.config.batch_wait,
                    &shutdown,
                )
                .await;
                match spawned {
                    Ok(inbox) => break inbox,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot connect the queue's readers; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(MAX_BACKOFF) => {}
                            _ = shutdown.changed() => {}
                        }
                        if *shutdown.borrow() {
                            return;
                        }
                    }
                }
            },
        };
        tracing::info!(consumer = %self.consumer, group = self.group(), "worker started");
        let mut backoff = Duration::from_millis(100);
        let mut in_hand: Vec<Delivered> = Vec::new();
        let mut failures = 0;
        let (mut last_periodic, mut last_counts) = (Instant::now(), Instant::now());
        while !*shutdown.borrow() {
            self.yield_to_persistence(&mut shutdown).await;
            let result = async {
                // Periodic work that fails (a shard's Redis down, say) is logged and
                // tried again next round; it does not hold up the batches.
                if last_periodic.elapsed() >= maintenance::EVERY {
                    last_periodic = Instant::now();
                    if let Err(e) = self.periodic().await {
                        tracing::warn!(error = %e, "periodic queue work failed");
                    }
                }
                if self.maintenance
                    && matches!(self.role, Role::Persist)
                    && last_counts.elapsed() >= self.config.counts_sync_interval
                {
                    last_counts = Instant::now();
                    if let Err(e) = self.sync_counts().await {
                        tracing::warn!(error = %e, "count sync failed");
                    }
                }
                if in_hand.is_empty() {
                    in_hand = inbox.next(self.config.batch_size, IDLE_WAIT).await;
                }
                let idle = in_hand.is_empty();
                let oldest = in_hand.iter().filter_map(|d| accepted_ms(d.id())).min();
                let handled = self.process(&mut in_hand).await?;
                in_hand.clear();
                if matches!(self.role, Role::Index(_)) {
                    self.index_behind =
                        is_backlog(handled, self.config.batch_size, oldest, now_ms());
                }
                self.flush_index(idle).await?;
                Ok::<(usize, Option<u64>), WorkerError>((handled, oldest))
            }
            .await;
            match result {
                Ok((handled, oldest)) => {
                    backoff = Duration::from_millis(100);
                    failures = 0;
                    if matches!(self.role, Role::Persist)
                        && is_backlog(handled, self.config.batch_size, oldest, now_ms())
                    {
                        self.backlog.mark();
                    }
                }
                Err(e) => {
                    // The batch in hand is tried again, a few times.
                    failures += 1;
                    if failures >= BATCH_ATTEMPTS && !in_hand.is_empty() {
                        tracing::warn!(
                            entries = in_hand.len(),
                            "letting a failing batch go; its entries will be taken over"
                        );
                        in_hand.clear();
                        failures = 0;
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "worker step failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        // The batch in hand, then what the fetchers read ahead (see `Inbox::rest`).
        loop {
            if in_hand.is_empty() {
                in_hand = inbox.rest(self.config.batch_size).await;
            }
            if in_hand.is_empty() {
                break;
            }
            if let Err(e) = self.process(&mut in_hand).await {
                tracing::warn!(error = %e, "could not finish the entries read; they will be taken over");
                break;
            }
            in_hand.clear();
        }
        if let Err(e) = self.flush_index(true).await {
            tracing::warn!(error = %e, "could not commit the last indexed entries; they will be redelivered");
        }
        tracing::info!(consumer = %self.consumer, group = self.group(), "worker stopped");
    }

    /// Handles everything queued now in every shard, then refreshes counts and trims: a
    /// worker step callable from tests and tools. Returns the number of entries handled.
    pub async fn drain(&mut self) -> Result<usize, WorkerError> {
        let mut total = 0;
        if let Role::Index(search) = &self.role {
            let search = search.clone();
            self.catch_up_index(&search).await?;
        }
        let mut conn = self.store.queue.conn();
        let shards: Vec<_> = self.store.queue.keys.shards().collect();
        for shard in shards {
            // This consumer's own pending entries once each (the indexer acknowledges
            // only at its commit, so they stay pending meanwhile), then new ones.
            for from in ["0", ">"] {
                let mut cursor = from.to_owned();
                loop {
                    let mut entries = self
                        .store
                        .queue
                        .read_group(
                            &mut conn,
                            (self.group(), &self.consumer),
                            &[shard],
                            &cursor,
                            self.config.batch_size,
                            None,
                        )
                        .await?;
                    let Some(last) = entries.last() else {
                        break;
                    };
                    if from != ">" {
                        cursor = last.id().to_owned();
                    }
                    total += self.process(&mut entries).await?;
                }
            }
        }
        self.flush_index(true).await?;
        if let Role::Persist = self.role {
            self.sync_counts().await?;
            self.trim_and_measure().await?;
        }
        Ok(total)
    }

    /// Handles one batch; returns how many entries it acknowledged.
    /// Handles a batch; on success it is emptied, on an error left as it was, to try
    /// again.
    async fn process(&mut self, batch: &mut Vec<Delivered>) -> Result<usize, WorkerError> {
        if batch.is_empty() {
            return Ok(0);
        }
        match &self.role {
            Role::Persist => {
                let handled = self.persist_batch(batch).await?;
                batch.clear();
                Ok(handled)
            }
            Role::Index(search) => {
                let search = search.clone();
                self.index_batch(&search, batch).await
            }
        }
    }
}

/// Creates the consumer groups of every shard's stream if missing (`migrate` does, so
/// that workers can start while Redis is at its `maxmemory`).
pub async fn create_groups(store: &Store) -> Result<(), WorkerError> {
    for shard in store.queue.keys.shards() {
        for group in [PERSIST_GROUP, INDEX_GROUP] {
            store.queue.ensure_group(shard, group).await?;
        }
    }
    Ok(())
}

/// A consumer name unique to this process: host name and pid.
pub fn default_consumer_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_full_batch_of_old_entries_is_a_backlog() {
        let now = 1_700_000_000_000;
        assert!(is_backlog(1000, 1000, Some(now - 5_000), now));
        assert!(is_backlog(1000, 1000, Some(now - BACKLOG_AGE_MS), now));
        assert!(
            !is_backlog(1000, 1000, Some(now - 200), now),
            "a full batch of fresh entries: persistence keeps up"
        );
        assert!(
            !is_backlog(999, 1000, Some(now - 5_000), now),
            "a partial batch"
        );
        assert!(!is_backlog(1000, 1000, None, now));
    }

    #[test]
    fn a_backlog_is_active_only_while_a_full_batch_is_recent() {
        let backlog = Backlog::default();
        assert!(!backlog.active(Duration::from_secs(60)));
        backlog.clone().mark();
        assert!(
            backlog.active(Duration::from_secs(60)),
            "clones share the signal"
        );
        assert!(!backlog.active(Duration::ZERO));
    }

    /// How long `wait_out(limit)` took.
    async fn time_wait_out(
        backlog: &Backlog,
        limit: Duration,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Duration {
        let started = tokio::time::Instant::now();
        backlog.wait_out(limit, shutdown).await;
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn the_indexer_waits_out_a_backlog_for_a_bounded_time_only() {
        let (stop, mut shutdown) = watch::channel(false);
        let backlog = Backlog::default();
        // The wait is checked every INDEX_YIELD_STEP: it ends within one step of its cause.
        let within_a_step =
            |waited: Duration, from: Duration| waited >= from && waited < from + INDEX_YIELD_STEP;

        let waited = time_wait_out(&backlog, Duration::from_secs(30), &mut shutdown).await;
        assert_eq!(waited, Duration::ZERO, "no backlog: no wait");

        backlog.mark();
        let limit = Duration::from_millis(120);
        let waited = time_wait_out(&backlog, limit, &mut shutdown).await;
        assert!(
            within_a_step(waited, limit),
            "waited {waited:?} for {limit:?}"
        );

        backlog.mark();
        let waited = time_wait_out(&backlog, Duration::from_secs(30), &mut shutdown).await;
        assert!(
            within_a_step(waited, BACKLOG_RECENT),
            "waited {waited:?}: the backlog went quiet after {BACKLOG_RECENT:?}"
        );

        backlog.mark();
        stop.send(true).unwrap();
        let waited = time_wait_out(&backlog, Duration::from_secs(30), &mut shutdown).await;
        assert_eq!(waited, Duration::ZERO, "shutdown ends the wait");
    }
}
