//! The worker: drains the write queue into MySQL and into the search index, in batches,
//! and keeps counts fresh. Each destination has its own consumer group on the one
//! stream (`persist`, `index`), so a search outage delays indexing, never persistence.
//!
//! * Reads the stream through its consumer group, up to `WORKER_BATCH_SIZE` entries per
//!   read, waiting at most `WORKER_BATCH_WAIT` for the first one.
//! * Persists a batch as multi-row idempotent upserts in one transaction and acknowledges
//!   the entries only after the commit: a crash before the ack means redelivery, and
//!   redelivery changes nothing.
//! * Takes over entries another consumer left unacknowledged for `WORKER_CLAIM_IDLE`.
//! * Sends an entry that cannot be persisted to the dead-letter stream, with the reason.
//! * `persist` only: trims the stream behind the slowest consumer group and, every
//!   `COUNTS_SYNC_INTERVAL`, refreshes the counts of the parents touched since.
//! * `index` only: indexes message bodies; an entry it cannot parse is left to the
//!   `persist` group, which owns the dead-letter stream.

mod catch_up;
mod entry;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use redis::streams::{StreamId, StreamReadOptions, StreamReadReply};
use tokio::sync::watch;

pub use entry::{Entry, Parent, Write};

use crate::config::WorkerConfig;
use crate::search::{MessageDoc, Search, SearchError};
use crate::store::queue::accepted_ms;
use crate::store::{Store, mysql, mysql_is_transient};

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

const TRIM_EVERY: Duration = Duration::from_secs(1);
/// Entries one `XTRIM` call may remove, and calls per trim: up to 2,000,000 entries a
/// second, far above what the API can queue.
const TRIM_LIMIT: u64 = 10_000;
const TRIM_MAX_CALLS: usize = 200;
/// The embedded index commits (and the `index` group acknowledges) at most this often:
/// a commit per small batch would cost more than the indexing itself.
const INDEX_COMMIT_EVERY: Duration = Duration::from_millis(200);
const INDEX_COMMIT_MAX_PENDING: usize = 50_000;
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The indexer of a process whose persisting consumers read a full batch this recently
/// leaves the CPU to them (see [`Backlog`]), checking again this often, and for at most
/// `INDEX_YIELD_MAX` in a row: indexing slows down under a backlog but never stops.
const BACKLOG_RECENT: Duration = Duration::from_millis(250);
const INDEX_YIELD_STEP: Duration = Duration::from_millis(50);
const INDEX_YIELD_MAX: Duration = Duration::from_secs(5);

/// Shared by the consumers of one process: when a persisting consumer last read a full
/// batch, i.e. worked through a backlog. While it does, the process's indexer waits:
/// persistence (durability, the counts, what other readers see) takes the CPU first, and
/// indexing, whose lag nothing waits on, catches up right after. When MySQL is down no
/// batch completes, so indexing goes on as usual.
#[derive(Clone, Default)]
pub struct Backlog(Arc<Mutex<Option<Instant>>>);

impl Backlog {
    fn mark(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Whether a full batch was persisted within `recent`.
    fn active(&self, recent: Duration) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < recent)
    }

    /// Waits while the backlog is active, for at most `max` or until shutdown.
    async fn wait_out(&self, max: Duration, shutdown: &mut watch::Receiver<bool>) {
        let started = Instant::now();
        while self.active(BACKLOG_RECENT) && started.elapsed() < max && !*shutdown.borrow() {
            tokio::select! {
                _ = tokio::time::sleep(INDEX_YIELD_STEP) => {}
                _ = shutdown.changed() => {}
            }
        }
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

pub struct Worker {
    store: Store,
    /// A connection of its own: a blocking read must not hold up other commands.
    reader: ConnectionManager,
    config: WorkerConfig,
    consumer: String,
    claim_cursor: String,
    role: Role,
    /// Index role: entries added to the index but not yet committed, hence not yet
    /// acknowledged, and since when.
    unacked: Vec<String>,
    unacked_since: Option<Instant>,
    /// Persist role: trims the stream and syncs counts (one consumer per process does).
    maintenance: bool,
    backlog: Backlog,
    /// Whether the last trim went past the indexer (logged once per episode).
    trimming_past_index: AtomicBool,
}

impl Worker {
    pub async fn new(
        store: Store,
        reader: ConnectionManager,
        config: WorkerConfig,
        role: Role,
    ) -> Result<Self, WorkerError> {
        let consumer = config.name.clone().unwrap_or_else(default_consumer_name);
        let worker = Self {
            store,
            reader,
            config,
            consumer,
            claim_cursor: "0-0".into(),
            role,
            unacked: Vec::new(),
            unacked_since: None,
            maintenance: true,
            backlog: Backlog::default(),
            trimming_past_index: AtomicBool::new(false),
        };
        worker.ensure_group().await?;
        Ok(worker)
    }

    /// Creates the consumer group (and the stream) if missing, then removes the group's
    /// consumers left behind by earlier processes. An existing group is only read, so a
    /// worker starts (and drains) while Redis is at its `maxmemory`; `migrate` creates
    /// the groups ahead of time. A new group starts at the beginning of the stream, so
    /// entries queued before any worker existed are kept.
    async fn ensure_group(&self) -> Result<(), WorkerError> {
        let group = self.group();
        if !group_exists(&mut self.conn(), &self.store.queue.keys.stream(), group).await? {
            create_group(&mut self.conn(), &self.store.queue.keys.stream(), group).await?;
        }
        self.remove_stale_consumers().await
    }

    /// Every restart leaves a consumer name behind. Those with nothing pending, idle for
    /// longer than `WORKER_CLAIM_IDLE`, are removed: live consumers read every
    /// `WORKER_BATCH_WAIT`, and removing one with nothing pending loses nothing (its next
    /// read makes it again).
    async fn remove_stale_consumers(&self) -> Result<(), WorkerError> {
        let stream = self.store.queue.keys.stream();
        let reply: redis::streams::StreamInfoConsumersReply =
            self.conn().xinfo_consumers(&stream, self.group()).await?;
        let stale: Vec<&str> = reply
            .consumers
            .iter()
            .filter(|c| c.pending == 0 && c.idle as u128 > self.config.claim_idle.as_millis())
            .map(|c| c.name.as_str())
            .collect();
        for name in &stale {
            let _: i64 = redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(&stream)
                .arg(self.group())
                .arg(*name)
                .query_async(&mut self.conn())
                .await?;
        }
        if !stale.is_empty() {
            tracing::info!(
                count = stale.len(),
                group = self.group(),
                "removed stale consumers"
            );
        }
        Ok(())
    }

    /// Leaves trimming and count syncing to another consumer of this process.
    pub fn skip_maintenance(&mut self) {
        self.maintenance = false;
    }

    /// Joins the other consumers of this process in reporting (persist) or heeding
    /// (index) a persistence backlog.
    pub fn share_backlog(&mut self, backlog: Backlog) {
        self.backlog = backlog;
    }

    /// Index role: waits while this process's persisting consumers work through a
    /// backlog, up to `INDEX_YIELD_MAX`.
    async fn yield_to_persistence(&self, shutdown: &mut watch::Receiver<bool>) {
        if matches!(self.role, Role::Index(_)) {
            self.backlog.wait_out(INDEX_YIELD_MAX, shutdown).await;
        }
    }

    fn group(&self) -> &'static str {
        match self.role {
            Role::Persist => PERSIST_GROUP,
            Role::Index(_) => INDEX_GROUP,
        }
    }

    fn conn(&self) -> ConnectionManager {
        self.store.queue.conn.clone()
    }

    /// Runs until `shutdown` turns true; the batch in hand is finished and acknowledged
    /// first.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!(consumer = %self.consumer, group = self.group(), "worker started");
        let mut own_backlog = true;
        let mut backoff = Duration::from_millis(100);
        let (mut last_claim, mut last_trim, mut last_counts) =
            (Instant::now(), Instant::now(), Instant::now());
        while !*shutdown.borrow() {
            self.yield_to_persistence(&mut shutdown).await;
            let step_started = Instant::now();
            let result = async {
                if last_claim.elapsed() >= self.config.claim_idle / 2 {
                    last_claim = Instant::now();
                    self.claim_idle().await?;
                }
                let persist = matches!(self.role, Role::Persist) && self.maintenance;
                if persist && last_trim.elapsed() >= TRIM_EVERY {
                    last_trim = Instant::now();
                    self.trim_and_measure().await?;
                }
                if persist && last_counts.elapsed() >= self.config.counts_sync_interval {
                    last_counts = Instant::now();
                    self.sync_counts().await?;
                }
                if let Role::Index(search) = &self.role
                    && last_trim.elapsed() >= TRIM_EVERY
                {
                    last_trim = Instant::now();
                    let search = search.clone();
                    self.catch_up_index(&search).await?;
                }
                // After a failure (or at start) our own unacknowledged entries come first.
                let from = if own_backlog { "0" } else { ">" };
                let entries = self.read(from).await?;
                if own_backlog && entries.is_empty() {
                    own_backlog = false;
                }
                let idle = entries.is_empty();
                let handled = self.process(entries).await?;
                self.flush_index(idle).await?;
                Ok::<usize, WorkerError>(handled)
            }
            .await;
            match result {
                Ok(handled) => {
                    backoff = Duration::from_millis(100);
                    if handled >= self.config.batch_size && matches!(self.role, Role::Persist) {
                        self.backlog.mark();
                    }
                    // A partial batch means the queue is keeping up: linger until the
                    // batch wait is over, so that the next batch is a bigger one. Many
                    // tiny transactions (several consumers each taking a few entries as
                    // they arrive) cost far more CPU per entry, and it is taken from the
                    // API's latency. A full batch means a backlog: read again at once.
                    if handled > 0 && handled < self.config.batch_size {
                        let until = step_started + self.config.batch_wait;
                        tokio::select! {
                            _ = tokio::time::sleep_until(until.into()) => {}
                            _ = shutdown.changed() => {}
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "worker step failed");
                    own_backlog = true;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        if let Err(e) = self.flush_index(true).await {
            tracing::warn!(error = %e, "could not commit the last indexed entries; they will be redelivered");
        }
        tracing::info!(consumer = %self.consumer, group = self.group(), "worker stopped");
    }

    /// Persists everything queued now, then refreshes counts: a worker step callable from
    /// tests and tools. Returns the number of entries handled.
    pub async fn drain(&mut self) -> Result<usize, WorkerError> {
        let mut total = 0;
        if let Role::Index(search) = &self.role {
            let search = search.clone();
            self.catch_up_index(&search).await?;
        }
        for from in ["0", ">"] {
            loop {
                let entries = self.read(from).await?;
                if entries.is_empty() {
                    break;
                }
                total += self.process(entries).await?;
            }
        }
        self.flush_index(true).await?;
        if let Role::Persist = self.role {
            self.sync_counts().await?;
            self.trim_and_measure().await?;
        }
        Ok(total)
    }

    async fn read(&mut self, from: &str) -> Result<Vec<StreamId>, WorkerError> {
        let mut options = StreamReadOptions::default()
            .group(self.group(), &self.consumer)
            .count(self.config.batch_size);
        if from == ">" {
            options = options.block(self.config.batch_wait.as_millis() as usize);
        }
        let reply: Option<StreamReadReply> = self
            .reader
            .xread_options(&[self.store.queue.keys.stream()], &[from], &options)
            .await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect())
    }

    /// Takes over entries other consumers left idle too long, and persists them.
    async fn claim_idle(&mut self) -> Result<(), WorkerError> {
        let reply: redis::streams::StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(self.store.queue.keys.stream())
            .arg(self.group())
            .arg(&self.consumer)
            .arg(self.config.claim_idle.as_millis() as u64)
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(self.config.batch_size)
            .query_async(&mut self.conn())
            .await?;
        self.claim_cursor = reply.next_stream_id;
        if !reply.claimed.is_empty() {
            tracing::info!(count = reply.claimed.len(), "took over idle entries");
            metrics::counter!("worker_claimed_total").increment(reply.claimed.len() as u64);
            self.process(reply.claimed).await?;
        }
        Ok(())
    }

    /// Handles one batch; returns how many entries it acknowledged.
    async fn process(&mut self, raw: Vec<StreamId>) -> Result<usize, WorkerError> {
        if raw.is_empty() {
            return Ok(0);
        }
        match &self.role {
            Role::Persist => self.persist_batch(raw).await,
            Role::Index(search) => {
                let search = search.clone();
                self.index_batch(&search, raw).await
            }
        }
    }

    /// Commits the index and acknowledges what it now holds, when due (or `now`).
    async fn flush_index(&mut self, now: bool) -> Result<(), WorkerError> {
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
        search.commit().await?;
        for ids in self.unacked.chunks(10_000) {
            let _: i64 = self
                .conn()
                .xack(self.store.queue.keys.stream(), INDEX_GROUP, ids)
                .await?;
        }
        record_lag("index_lag_seconds", self.unacked.iter().map(String::as_str));
        metrics::counter!("worker_indexed_total").increment(self.unacked.len() as u64);
        self.unacked.clear();
        self.unacked_since = None;
        Ok(())
    }

    /// Adds the messages of one batch to the index; they are acknowledged once committed.
    async fn index_batch(
        &mut self,
        search: &Search,
        raw: Vec<StreamId>,
    ) -> Result<usize, WorkerError> {
        let (items, docs): (Vec<&StreamId>, Vec<MessageDoc>) = raw
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
            // A document refused for good goes to the dead-letter stream with the reason;
            // a transient failure is an error, and the whole batch is redelivered.
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
        self.unacked.extend(raw.iter().map(|r| r.id.clone()));
        self.unacked_since.get_or_insert_with(Instant::now);
        Ok(raw.len())
    }

    /// Persists one batch; returns how many entries it acknowledged.
    async fn persist_batch(&self, raw: Vec<StreamId>) -> Result<usize, WorkerError> {
        let mut entries = Vec::with_capacity(raw.len());
        for item in &raw {
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
                        let item = raw.iter().find(|r| r.id == entry.id);
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
                Write::Chat(c) => chats.push(c.clone()),
                Write::Message(m) => messages.push(m.clone()),
            }
        }
        let mut tx = self.store.mysql.begin().await?;
        mysql::upsert_chats(&mut tx, &chats).await?;
        mysql::upsert_messages(&mut tx, &messages).await?;
        tx.commit().await
    }

    /// After the commit: release the pending records and mark the parents touched, then
    /// acknowledge. In that order, a crash or a Redis error part-way leaves the entries
    /// unacknowledged, so they are redelivered and the whole step runs again (each part
    /// of it is idempotent); acknowledging first could leave a stale pending record that
    /// nothing would ever release.
    async fn acknowledge(&self, entries: &[Entry]) -> Result<(), WorkerError> {
        if entries.is_empty() {
            return Ok(());
        }
        let keys = &self.store.queue.keys;
        let records: Vec<(String, String)> = entries
            .iter()
            .map(|e| (e.record_key(keys), e.id.clone()))
            .collect();
        self.store.queue.release_pending(&records).await?;

        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let touched: Vec<String> = entries
            .iter()
            .flat_map(Entry::touched)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let marked: redis::RedisResult<()> = self.conn().sadd(keys.touched(), &touched).await;
        match marked {
            Ok(()) => {}
            // At `maxmemory` the set cannot grow: refresh these counts now instead, so
            // that acknowledging (which frees memory) goes on.
            Err(e) if crate::store::redis_is_full(&e) => self.sync_parents(&touched).await?,
            Err(e) => return Err(e.into()),
        }
        let _: i64 = self.conn().xack(keys.stream(), PERSIST_GROUP, &ids).await?;

        record_lag("persist_lag_seconds", entries.iter().map(|e| e.id.as_str()));
        metrics::histogram!("worker_batch_size").record(entries.len() as f64);
        metrics::counter!("worker_persisted_total").increment(entries.len() as u64);
        Ok(())
    }

    /// Moves an entry to the dead-letter stream with the reason, and acknowledges it.
    async fn dead_letter(&self, item: &StreamId, reason: &str) -> Result<(), WorkerError> {
        tracing::error!(entry = %item.id, %reason, "entry sent to the dead-letter stream");
        metrics::counter!("dead_letters_total").increment(1);
        let keys = &self.store.queue.keys;
        let mut fields: Vec<(String, Vec<u8>)> = vec![
            ("dlq_reason".into(), reason.as_bytes().to_vec()),
            ("dlq_entry".into(), item.id.as_bytes().to_vec()),
        ];
        fields.extend(item.map.iter().map(|(k, v)| {
            let bytes = redis::from_redis_value_ref::<Vec<u8>>(v).unwrap_or_default();
            (k.clone(), bytes)
        }));
        let cap = redis::streams::StreamMaxlen::Approx(self.config.dead_letter_max as usize);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .xadd_maxlen(keys.dead_letters(), cap, "*", &fields)
            .ignore()
            .xack(keys.stream(), self.group(), &[&item.id])
            .ignore();
        pipe.exec_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Trims entries every group has acknowledged, and publishes the queue gauges.
    async fn trim_and_measure(&self) -> Result<(), WorkerError> {
        let stream = self.store.queue.keys.stream();
        let mut conn = self.conn();
        let info: redis::streams::StreamInfoGroupsReply = conn.xinfo_groups(&stream).await?;
        // Where each group still needs the stream from.
        let mut positions: Vec<(String, Position)> = Vec::new();
        for group in &info.groups {
            metrics::gauge!("queue_pending", "group" => group_label(&group.name))
                .set(group.pending as f64);
            if let Some(lag) = group.lag {
                metrics::gauge!("queue_lag", "group" => group_label(&group.name)).set(lag as f64);
            }
            let last_delivered = Position {
                id: group.last_delivered_id.clone(),
                needed: false,
            };
            let position = if group.pending > 0 {
                let summary: redis::streams::StreamPendingReply =
                    conn.xpending(&stream, &group.name).await?;
                match summary {
                    redis::streams::StreamPendingReply::Data(d) => Position {
                        id: d.start_id,
                        needed: true,
                    },
                    _ => last_delivered,
                }
            } else {
                last_delivered
            };
            positions.push((group.name.clone(), position));
        }
        // Measured first: memory pressure decides whether the indexer may hold the stream.
        let pressure = self.store.queue.measure_pressure().await?;
        let floor = self.trim_floor(&positions, pressure.full).await?;
        if let Some(floor) = floor {
            // An approximate trim removes at most `TRIM_LIMIT` entries per call (Redis's
            // own default), which alone would fall behind a queue growing faster than
            // that per second. Call it until it has caught up: each call stays short, so
            // creates interleave with it.
            let mut caught_up = false;
            for _ in 0..TRIM_MAX_CALLS {
                let trimmed: u64 = redis::cmd("XTRIM")
                    .arg(&stream)
                    .arg("MINID")
                    .arg("~")
                    .arg(&floor)
                    .arg("LIMIT")
                    .arg(TRIM_LIMIT)
                    .query_async(&mut conn)
                    .await?;
                // Whole stream nodes go at once, so a call may stop a little short of
                // the limit with more to come: only a call that removed nothing is last.
                if trimmed == 0 {
                    caught_up = true;
                    break;
                }
            }
            // Then the rest of the first node, exactly: the stream's length is what the
            // backlog bound (`QUEUE_MAX_ENTRIES`) counts. Once caught up, that is at most
            // one node's worth of entries.
            if caught_up {
                let _: u64 = redis::cmd("XTRIM")
                    .arg(&stream)
                    .arg("MINID")
                    .arg(&floor)
                    .query_async(&mut conn)
                    .await?;
            }
        }
        let len: u64 = conn.xlen(&stream).await?;
        metrics::gauge!("queue_length").set(len as f64);
        metrics::gauge!("redis_used_memory_bytes").set(pressure.used_memory as f64);
        metrics::gauge!("queue_full").set(if pressure.full { 1.0 } else { 0.0 });
        let dead: u64 = conn.xlen(self.store.queue.keys.dead_letters()).await?;
        metrics::gauge!("dead_letter_length").set(dead as f64);
        Ok(())
    }

    /// Where the stream may be trimmed up to. Persistence holds it back always; the
    /// indexer only while it lags persistence by at most `INDEX_LAG_MAX` and Redis is not
    /// under memory pressure. Past that, entries the indexer has not handled are trimmed
    /// anyway (a search outage must not become a Redis outage): MySQL has everything
    /// trimmed, and the indexer reads it back from there (see `catch_up`).
    async fn trim_floor(
        &self,
        positions: &[(String, Position)],
        pressed: bool,
    ) -> Result<Option<String>, WorkerError> {
        let position = |name: &str| {
            positions
                .iter()
                .find(|(group, _)| group == name)
                .map(|(_, position)| position)
        };
        let Some(persist) = position(PERSIST_GROUP).map(|p| p.id.clone()) else {
            return Ok(None);
        };
        let Some(index) = position(INDEX_GROUP) else {
            return Ok(Some(persist));
        };
        // The first entry the indexer has not handled: its oldest pending one, or the one
        // after the last delivered to it. Trimming to `persist` removes the entries
        // before it; only if that one is among them does the indexer lose anything.
        let from = if index.needed {
            index.id.clone()
        } else {
            format!("({}", index.id)
        };
        let next: redis::streams::StreamRangeReply = self
            .conn()
            .xrange_count(self.store.queue.keys.stream(), from, "+", 1)
            .await?;
        let Some(needed) = next.ids.first().map(|e| e.id.clone()) else {
            return Ok(Some(persist));
        };
        if stream_id_le(&persist, &needed) {
            return Ok(Some(persist));
        }
        let index = index.id.clone();
        // How long ago that entry was accepted.
        let lag_ms = now_ms().saturating_sub(accepted_ms(&needed).unwrap_or(0));
        metrics::gauge!("index_backlog_age_seconds").set(lag_ms as f64 / 1000.0);
        if u128::from(lag_ms) <= self.config.index_lag_max.as_millis() && !pressed {
            if self.trimming_past_index.swap(false, Ordering::Relaxed) {
                tracing::info!("the stream is trimmed behind the search indexer again");
            }
            return Ok(Some(index));
        }
        // The mark first: without it the indexer would never learn of its gap. Redis at
        // its very `maxmemory` refuses it; then only what every group is done with goes
        // (which frees memory), and the next round tries again.
        if let Err(e) = self.store.queue.mark_index_gap(&index).await {
            if crate::store::redis_is_full(&e) {
                return Ok(Some(index));
            }
            return Err(e.into());
        }
        if !self.trimming_past_index.swap(true, Ordering::Relaxed) {
            tracing::warn!(
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

    /// Refreshes the counts of the parents touched since the last sync. `SPOP` hands each
    /// parent to exactly one worker; a failed refresh puts the parent back.
    pub async fn sync_counts(&self) -> Result<(), WorkerError> {
        let key = self.store.queue.keys.touched();
        loop {
            let members: Vec<String> = redis::cmd("SPOP")
                .arg(&key)
                .arg(mysql::COUNT_SYNC_BATCH)
                .query_async(&mut self.conn())
                .await?;
            if members.is_empty() {
                return Ok(());
            }
            if let Err(e) = self.refresh_counts(&members).await {
                let _: () = self.conn().sadd(&key, &members).await?;
                return Err(e.into());
            }
        }
    }

    /// Refreshes the counts of these parents now.
    async fn sync_parents(&self, members: &[String]) -> Result<(), WorkerError> {
        Ok(self.refresh_counts(members).await?)
    }

    /// Refreshes the parents' counts: two statements per `COUNT_SYNC_BATCH` parents of each
    /// kind. Repeating it is harmless (counts only rise).
    async fn refresh_counts(&self, members: &[String]) -> Result<(), sqlx::Error> {
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

async fn group_exists(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> Result<bool, WorkerError> {
    let info: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
        conn.xinfo_groups(stream).await;
    match info {
        Ok(info) => Ok(info.groups.iter().any(|g| g.name == group)),
        // No stream yet.
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) => {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

async fn create_group(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> Result<(), WorkerError> {
    let created: redis::RedisResult<()> = conn.xgroup_create_mkstream(stream, group, "0").await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => Ok(other?),
    }
}

/// Creates the consumer groups of the write queue if missing (`migrate` does, so that
/// workers can start while Redis is at its `maxmemory`).
pub async fn create_groups(store: &Store) -> Result<(), WorkerError> {
    let stream = store.queue.keys.stream();
    let mut conn = store.queue.conn.clone();
    for group in [PERSIST_GROUP, INDEX_GROUP] {
        if !group_exists(&mut conn, &stream, group).await? {
            create_group(&mut conn, &stream, group).await?;
        }
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Records, for each entry, the time from its acceptance (its stream id) to now.
fn record_lag<'a>(metric: &'static str, ids: impl Iterator<Item = &'a str>) {
    let now_ms = now_ms();
    let histogram = metrics::histogram!(metric);
    for ms in ids.filter_map(accepted_ms) {
        histogram.record(now_ms.saturating_sub(ms) as f64 / 1000.0);
    }
}

/// Where a consumer group is in the stream.
struct Position {
    id: String,
    /// The entry `id` itself is still needed (it is pending), not only those after it.
    needed: bool,
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
        let started = Instant::now();
        backlog.wait_out(limit, shutdown).await;
        started.elapsed()
    }

    #[tokio::test]
    async fn the_indexer_waits_out_a_backlog_for_a_bounded_time_only() {
        let (stop, mut shutdown) = watch::channel(false);
        let backlog = Backlog::default();

        let waited = time_wait_out(&backlog, Duration::from_secs(30), &mut shutdown).await;
        assert!(waited < Duration::from_secs(1), "no backlog: no wait");

        backlog.mark();
        let waited = time_wait_out(&backlog, Duration::from_millis(120), &mut shutdown).await;
        assert!(waited >= Duration::from_millis(120), "waited {waited:?}");
        assert!(
            waited < BACKLOG_RECENT + Duration::from_secs(1),
            "waited {waited:?}"
        );

        backlog.mark();
        stop.send(true).unwrap();
        let waited = time_wait_out(&backlog, Duration::from_secs(30), &mut shutdown).await;
        assert!(waited < Duration::from_secs(1), "shutdown ends the wait");
    }
}
