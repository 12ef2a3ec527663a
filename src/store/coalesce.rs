//! Message reads from MySQL, coalesced: the reads that arrive while earlier ones are on
//! their way share one statement.
//!
//! A single-row read by primary key costs MySQL and this process far more in the round
//! trip (a statement to send, a connection thread to wake, a reply to parse) than in the
//! row. So reads are queued, and a dispatcher sends whatever is queued, up to
//! [`MAX_BATCH`] reads, as one statement of primary-key ranges
//! ([`mysql::messages_in_ranges`]), keeping at most `in_flight` statements out at once.
//! When those are all out, new reads wait for one to come back and then go together.
//! A read that finds a statement free goes at once and alone: coalescing adds no wait
//! when the load is light, and batches grow only with the load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::mysql::MySqlPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::resources::Message;
use crate::store::mysql::{self, MessageRange};

/// Reads sent in one statement at most.
pub const MAX_BATCH: usize = 32;
/// Reads waiting for a statement at most; further reads wait to be queued.
const QUEUE: usize = 4096;

/// What a coalesced read fails with: the statement's error, shared by its reads.
pub type ReadError = Arc<sqlx::Error>;

struct Read {
    range: MessageRange,
    reply: oneshot::Sender<Result<Vec<Message>, ReadError>>,
}

/// Cheap to clone; the dispatcher ends when the last clone is dropped.
#[derive(Clone)]
pub struct MessageReads {
    queue: mpsc::Sender<Read>,
    statements: Arc<AtomicU64>,
}

impl MessageReads {
    /// Starts the dispatcher on the current Tokio runtime.
    pub fn new(db: MySqlPool, in_flight: usize) -> Self {
        let (queue, reads) = mpsc::channel(QUEUE);
        let statements = Arc::new(AtomicU64::new(0));
        let slots = Arc::new(Semaphore::new(in_flight.max(1)));
        tokio::spawn(dispatch(db, reads, slots, statements.clone()));
        Self { queue, statements }
    }

    /// Statements sent so far (for tests and tools; `message_reads_total` and
    /// `message_read_statements_total` in the metrics).
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    /// The persisted messages of `range`, ascending by number.
    pub async fn range(&self, range: MessageRange) -> Result<Vec<Message>, ReadError> {
        let (reply, answer) = oneshot::channel();
        let gone = || Arc::new(sqlx::Error::PoolClosed);
        self.queue
            .send(Read { range, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// One persisted message, if there is one.
    pub async fn one(
        &self,
        app_id: u64,
        chat: u64,
        number: u64,
    ) -> Result<Option<Message>, ReadError> {
        let range = MessageRange {
            app_id,
            chat,
            lo: number,
            hi: number,
        };
        Ok(self.range(range).await?.pop())
    }
}

async fn dispatch(
    db: MySqlPool,
    mut reads: mpsc::Receiver<Read>,
    slots: Arc<Semaphore>,
    statements: Arc<AtomicU64>,
) {
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = reads.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match reads.try_recv() {
                Ok(read) => batch.push(read),
                Err(_) => break,
            }
        }
        metrics::counter!("message_reads_total").increment(batch.len() as u64);
        metrics::counter!("message_read_statements_total").increment(1);
        statements.fetch_add(1, Ordering::Relaxed);
        let db = db.clone();
        tokio::spawn(async move {
            answer(&db, batch).await;
            drop(slot);
        });
    }
}

/// Runs one statement for `batch` and hands each read its rows.
async fn answer(db: &MySqlPool, mut batch: Vec<Read>) {
    // Reads whose caller has gone (a timed-out request) are not sent.
    batch.retain(|read| !read.reply.is_closed());
    let Some(last) = batch.last() else {
        return;
    };
    // Few statement shapes (1, 2, 4, ... ranges), each prepared once per connection: the
    // last range is repeated up to the next power of two, which MySQL merges away.
    let mut ranges: Vec<MessageRange> = batch.iter().map(|read| read.range).collect();
    ranges.resize(batch.len().next_power_of_two(), last.range);
    match mysql::messages_in_ranges(db, &ranges).await {
        Ok(rows) if batch.len() == 1 => {
            let rows = rows.into_iter().map(|(_, m)| m).collect();
            let _ = batch.swap_remove(0).reply.send(Ok(rows));
        }
        Ok(rows) => {
            for read in batch {
                let r = read.range;
                // Rows are in primary-key order: the range's rows are one run of them.
                let start = rows.partition_point(|(app, m)| {
                    (*app, m.chat_number, m.number) < (r.app_id, r.chat, r.lo)
                });
                let mine = rows[start..]
                    .iter()
                    .take_while(|(app, m)| {
                        (*app, m.chat_number, m.number) <= (r.app_id, r.chat, r.hi)
                    })
                    .map(|(_, m)| m.clone())
                    .collect();
                let _ = read.reply.send(Ok(mine));
            }
        }
        Err(err) => {
            let err = Arc::new(err);
            for read in batch {
                let _ = read.reply.send(Err(err.clone()));
            }
        }
    }
}
