//! Reading every shard: fetchers wait on the shards' streams and hand what they read to
//! the consumers of their process through a bounded channel (the [`Inbox`]).
//!
//! A fetcher blocks in `XREADGROUP` on a connection of its own, so a shard with no
//! traffic costs one waiting command, not polling. On one Redis, one fetcher waits on
//! every shard's stream at once; a Redis Cluster allows one slot per command, so there
//! each shard has a fetcher (and a connection) of its own. Consumers take entries from
//! several shards into one batch, so persisting keeps its large transactions whatever
//! the number of shards.
//!
//! What a fetcher has read is pending for the process's consumer name until a consumer
//! acknowledges it. If the process dies first, other workers take it over after
//! `WORKER_CLAIM_IDLE`; a consumer that fails keeps its batch and retries it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, watch};

use crate::store::Store;
use crate::store::queue::stream::Delivered;
use crate::store::queue::{RedisConn, Shard};

/// Longest a fetcher's read blocks: bounds how long it takes to notice a shutdown.
const FETCH_BLOCK: Duration = Duration::from_secs(1);
const FETCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The receiving end of a process's fetchers, shared by its consumers of one group.
#[derive(Clone)]
pub struct Inbox {
    rx: Arc<Mutex<mpsc::Receiver<Vec<Delivered>>>>,
}

impl Inbox {
    /// Starts the fetchers of `group` for `consumer`, reading up to `batch` entries per
    /// read, until `shutdown`. After a read of less than a batch, a fetcher waits `pace`
    /// before it reads again (see [`Fetcher::run`]).
    pub async fn spawn(
        store: &Store,
        group: &'static str,
        consumer: &str,
        batch: usize,
        pace: Duration,
        shutdown: &watch::Receiver<bool>,
    ) -> redis::RedisResult<Self> {
        let queue = &store.queue;
        let shards: Vec<Shard> = queue.keys.shards().collect();
        let sets: Vec<Vec<Shard>> = if queue.conn().is_cluster() {
            shards.into_iter().map(|s| vec![s]).collect()
        } else {
            vec![shards]
        };
        let (tx, rx) = mpsc::channel(4);
        for shards in sets {
            let conn = queue.reader(FETCH_BLOCK).await?;
            let fetcher = Fetcher {
                store: store.clone(),
                conn,
                group,
                consumer: consumer.to_owned(),
                shards,
                batch,
                pace,
                tx: tx.clone(),
            };
            tokio::spawn(fetcher.run(shutdown.clone()));
        }
        Ok(Self {
            rx: Arc::new(Mutex::new(rx)),
        })
    }

    /// The next batch: waits up to `wait_first` for entries, then takes what else the
    /// fetchers have already handed over, up to `max` entries. Empty when nothing came,
    /// or when the fetchers have stopped.
    pub async fn next(&self, max: usize, wait_first: Duration) -> Vec<Delivered> {
        let mut rx = self.rx.lock().await;
        let mut batch = match tokio::time::timeout(wait_first, rx.recv()).await {
            Ok(Some(first)) => first,
            _ => return Vec::new(),
        };
        while batch.len() < max {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        batch
    }

    /// Once the shutdown has begun: the next batch of what the fetchers read ahead. What
    /// they read is pending under this process's consumer name, which no later process
    /// has, so left unhandled it would wait `WORKER_CLAIM_IDLE` to be taken over. Each
    /// fetcher hands over the read under way (it blocks `FETCH_BLOCK` at most) and
    /// stops; empty once every fetcher has stopped and nothing is left, or after
    /// `REST_WAIT`.
    pub async fn rest(&self, max: usize) -> Vec<Delivered> {
        self.next(max, REST_WAIT).await
    }
}

/// Longest a stopping consumer waits for the fetchers' last reads.
const REST_WAIT: Duration = Duration::from_secs(5);

struct Fetcher {
    store: Store,
    conn: RedisConn,
    group: &'static str,
    consumer: String,
    shards: Vec<Shard>,
    batch: usize,
    pace: Duration,
    tx: mpsc::Sender<Vec<Delivered>>,
}

impl Fetcher {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        // First what this consumer name left unacknowledged in an earlier life.
        let mut from = "0";
        let mut backoff = Duration::from_millis(100);
        while !*shutdown.borrow() {
            let block = (from == ">").then_some(FETCH_BLOCK);
            let read = self
                .store
                .queue
                .read_group(
                    &mut self.conn,
                    (self.group, &self.consumer),
                    &self.shards,
                    from,
                    self.batch,
                    block,
                )
                .await;
            match read {
                Ok(entries) if entries.is_empty() => {
                    from = ">";
                    backoff = Duration::from_millis(100);
                }
                Ok(entries) => {
                    backoff = Duration::from_millis(100);
                    let pause = pause_after(entries.len(), self.batch, from, self.pace);
                    // Handed over even once the shutdown has begun: the consumers finish
                    // what was read before they stop (`Inbox::rest`).
                    for chunk in batches(entries, self.batch) {
                        if self.tx.send(chunk).await.is_err() {
                            return;
                        }
                    }
                    // Own entries are read again from the start until none is left:
                    // consumers acknowledge them meanwhile.
                    if from == "0" {
                        from = ">";
                    }
                    if let Some(pause) = pause {
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = shutdown.changed() => {}
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, group = self.group, shards = ?self.shards, retry_in = ?backoff, "cannot read the queue");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(FETCH_BACKOFF_MAX);
                }
            }
        }
    }
}

/// How long a fetcher waits before its next read, after a read of `read` entries.
///
/// A read of less than a batch means the queue keeps up. Read again at once, the next
/// read would block until the next entry and bring it alone: a read, a batch, a MySQL
/// transaction, an acknowledgement and an index addition per few entries, each costing
/// about as much as a full one. Waiting `pace` first lets the entries of the interval
/// gather in the stream, and one read brings them all, to one batch. A full read (a
/// backlog), or a read of this consumer's own pending entries, is followed by the next
/// at once.
fn pause_after(read: usize, batch: usize, from: &str, pace: Duration) -> Option<Duration> {
    (from == ">" && read < batch && !pace.is_zero()).then_some(pace)
}

/// A read of several shards holds up to a batch from each: it is handed over a batch
/// (at least one entry) at a time, in order, the entries moved rather than copied.
fn batches<T>(entries: Vec<T>, batch: usize) -> impl Iterator<Item = Vec<T>> {
    let mut entries = entries.into_iter();
    std::iter::from_fn(move || {
        let chunk: Vec<T> = entries.by_ref().take(batch.max(1)).collect();
        (!chunk.is_empty()).then_some(chunk)
    })
}

#[cfg(test)]
mod tests {
    use super::{batches, pause_after};
    use std::time::Duration;

    #[test]
    fn a_fetcher_waits_after_a_partial_read_of_new_entries_only() {
        let pace = Duration::from_millis(50);
        assert_eq!(pause_after(1, 1_000, ">", pace), Some(pace));
        assert_eq!(pause_after(999, 1_000, ">", pace), Some(pace));
        assert_eq!(pause_after(1_000, 1_000, ">", pace), None, "a backlog");
        assert_eq!(
            pause_after(5_000, 1_000, ">", pace),
            None,
            "a backlog in several shards"
        );
        assert_eq!(
            pause_after(3, 1_000, "0", pace),
            None,
            "own pending entries"
        );
        assert_eq!(pause_after(3, 1_000, ">", Duration::ZERO), None);
    }

    #[test]
    fn a_read_is_handed_over_a_batch_at_a_time_in_order() {
        let handed: Vec<Vec<u32>> = batches((0..2_500).collect(), 1_000).collect();
        assert_eq!(
            handed.iter().map(Vec::len).collect::<Vec<_>>(),
            [1_000, 1_000, 500]
        );
        assert!(handed.concat().into_iter().eq(0..2_500));
        assert_eq!(batches(vec![7, 8], 0).collect::<Vec<_>>(), [[7], [8]]);
        assert_eq!(batches(Vec::<u32>::new(), 10).count(), 0);
    }
}
