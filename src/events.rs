//! Live delivery: the messages of a chat as they are accepted, to subscribers of any API
//! process.
//!
//! # Fan-out
//! Each API process tails the shard streams of the write queue it has subscribers for
//! (one blocking `XREAD` per shard, on a connection of its own, from the position it has
//! reached) and hands each message write to the subscribers of its chat. A write is read
//! once per API process that has a subscriber in its shard, whatever the number of
//! subscribers there, and a shard nobody follows costs nothing: its tailer stops with its
//! last subscriber. The stream already holds every accepted write in acceptance order,
//! so nothing is added to the create path.
//!
//! # Resuming
//! An event's id is the id of the stream entry of its write (its version). A subscriber
//! that comes back with `Last-Event-ID` first gets, in acceptance order, each message of
//! the chat changed since that id in its current state: pending writes from Redis, then
//! persisted rows from MySQL (in that order: a write persisted in between is found in
//! MySQL, never missed), then the live writes after them. Events go out with strictly
//! increasing ids, so resuming from the last id received repeats and loses nothing.
//!
//! # Bounds
//! A subscriber has a small buffer; one that falls behind is cut off (its stream ends)
//! and resumes by id, so it never delays the others. A process takes at most
//! `EVENTS_MAX_SUBSCRIBERS`; beyond, 503 with `Retry-After`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::Store;
use crate::store::queue::{QueuedMessage, Shard};

/// Events a subscriber may have waiting before it is cut off.
pub const SUBSCRIBER_BUFFER: usize = 64;
/// How long a tailer's read waits for writes before it checks for subscribers again.
const TAIL_BLOCK: Duration = Duration::from_secs(1);
const TAIL_COUNT: usize = 1000;
const TAIL_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A subscription's key: the application's token and the chat.
type ChatKey = (String, u64);

/// Writes are shared, not copied, between the subscribers of a chat; a slot of the
/// buffer is one pointer.
pub type SharedWrite = Arc<QueuedMessage>;

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<SharedWrite>,
}

#[derive(Default)]
struct Registry {
    /// Subscribers by chat.
    chats: HashMap<ChatKey, Vec<Subscriber>>,
    /// Subscribers per shard, and whether its tailer runs.
    shards: HashMap<Shard, usize>,
    next_id: u64,
    closed: bool,
}

/// The subscriptions of one API process; cheap to clone.
#[derive(Clone)]
pub struct EventHub {
    store: Store,
    registry: Arc<Mutex<Registry>>,
    count: Arc<AtomicUsize>,
    max: usize,
}

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("this process has its most subscribers")]
    Full,
    #[error("the process is shutting down")]
    Closed,
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// One subscriber's end: the live writes of its chat, until it is cut off or the
/// process stops. Unsubscribes when dropped.
pub struct Subscription {
    pub rx: mpsc::Receiver<SharedWrite>,
    hub: EventHub,
    key: ChatKey,
    shard: Shard,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.key, self.shard, self.id);
    }
}

impl EventHub {
    pub fn new(store: Store, max_subscribers: usize) -> Self {
        Self {
            store,
            registry: Arc::default(),
            count: Arc::default(),
            max: max_subscribers,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to the chat's writes accepted from now on (starting a tailer for its
    /// shard if none runs).
    pub async fn subscribe(&self, token: &str, chat: u64) -> Result<Subscription, SubscribeError> {
        if self.count.fetch_add(1, Ordering::SeqCst) >= self.max {
            self.count.fetch_sub(1, Ordering::SeqCst);
            return Err(SubscribeError::Full);
        }
        let shard = self.store.queue.keys.shard_of(token);
        let key = (token.to_owned(), chat);
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        // Where a new tailer starts: read before registering, so that every write after
        // this point reaches the subscriber (a write before it comes from the catch-up).
        let start = {
            let running = self.lock().shards.get(&shard).copied().unwrap_or(0) > 0;
            if running {
                None
            } else {
                match self.store.queue.last_entry_id(shard).await {
                    Ok(id) => Some(id),
                    Err(e) => {
                        self.count.fetch_sub(1, Ordering::SeqCst);
                        return Err(e.into());
                    }
                }
            }
        };
        let (id, start_tailer) = {
            let mut registry = self.lock();
            if registry.closed {
                drop(registry);
                self.count.fetch_sub(1, Ordering::SeqCst);
                return Err(SubscribeError::Closed);
            }
            registry.next_id += 1;
            let id = registry.next_id;
            registry
                .chats
                .entry(key.clone())
                .or_default()
                .push(Subscriber { id, tx });
            let followers = registry.shards.entry(shard).or_insert(0);
            *followers += 1;
            (id, *followers == 1)
        };
        metrics::gauge!("events_subscribers").set(self.count.load(Ordering::SeqCst) as f64);
        if start_tailer {
            let from = match start {
                Some(from) => from,
                // A tailer that stopped in between: start from the newest entry now.
                None => self
                    .store
                    .queue
                    .last_entry_id(shard)
                    .await
                    .unwrap_or_else(|_| "$".into()),
            };
            tokio::spawn(self.clone().tail(shard, from));
        }
        Ok(Subscription {
            rx,
            hub: self.clone(),
            key,
            shard,
            id,
        })
    }

    fn unsubscribe(&self, key: &ChatKey, shard: Shard, id: u64) {
        let mut registry = self.lock();
        // Counted until dropped, cut off or not.
        self.count.fetch_sub(1, Ordering::SeqCst);
        if let Some(list) = registry.chats.get_mut(key) {
            list.retain(|s| s.id != id);
            if list.is_empty() {
                registry.chats.remove(key);
            }
        }
        if let Some(followers) = registry.shards.get_mut(&shard) {
            *followers = followers.saturating_sub(1);
        }
        metrics::gauge!("events_subscribers").set(self.count.load(Ordering::SeqCst) as f64);
    }

    /// Ends every subscription (at shutdown: open streams would otherwise hold it up).
    pub fn close(&self) {
        let mut registry = self.lock();
        registry.closed = true;
        registry.chats.clear();
    }

    /// Follows one shard's stream while it has subscribers.
    async fn tail(self, shard: Shard, mut from: String) {
        let mut conn = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            {
                let mut registry = self.lock();
                if registry.closed || registry.shards.get(&shard).copied().unwrap_or(0) == 0 {
                    registry.shards.remove(&shard);
                    return;
                }
            }
            let reader = match &mut conn {
                Some(reader) => reader,
                None => match self.store.queue.reader(TAIL_BLOCK).await {
                    Ok(reader) => conn.insert(reader),
                    Err(e) => {
                        tracing::warn!(error = %e, shard, "live delivery cannot read the queue");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(TAIL_BACKOFF_MAX);
                        continue;
                    }
                },
            };
            match self
                .store
                .queue
                .tail(reader, shard, &from, TAIL_BLOCK, TAIL_COUNT)
                .await
            {
                Ok((last, writes)) => {
                    backoff = Duration::from_millis(100);
                    from = last;
                    self.dispatch(writes);
                }
                Err(e) => {
                    tracing::warn!(error = %e, shard, "live delivery cannot read the queue");
                    conn = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(TAIL_BACKOFF_MAX);
                }
            }
        }
    }

    /// Hands each write to its chat's subscribers; one whose buffer is full is cut off.
    fn dispatch(&self, writes: Vec<QueuedMessage>) {
        if writes.is_empty() {
            return;
        }
        let mut registry = self.lock();
        let mut cut = 0;
        for write in writes {
            let write = Arc::new(write);
            let key = (write.token.clone(), write.message.chat_number);
            let Some(list) = registry.chats.get_mut(&key) else {
                continue;
            };
            list.retain(|s| match s.tx.try_send(write.clone()) {
                Ok(()) => true,
                Err(_) => {
                    cut += 1;
                    false
                }
            });
            metrics::counter!("events_sent_total").increment(list.len() as u64);
            if list.is_empty() {
                registry.chats.remove(&key);
            }
        }
        if cut > 0 {
            // Their `Subscription`s still count until dropped (when their streams end).
            metrics::counter!("events_subscribers_cut_total").increment(cut);
        }
    }
}
