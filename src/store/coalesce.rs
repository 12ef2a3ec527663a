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
        Ok(rows) => {
            let split = split(rows, &ranges[..batch.len()]);
            for (read, mine) in batch.into_iter().zip(split) {
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

/// The rows of each of `ranges`, ascending by number, from the rows of all of them in
/// any order (each with its application's id).
fn split(mut rows: Vec<(u64, Message)>, ranges: &[MessageRange]) -> Vec<Vec<Message>> {
    if let [_] = ranges {
        rows.sort_unstable_by_key(|(_, m)| m.number);
        return vec![rows.into_iter().map(|(_, m)| m).collect()];
    }
    rows.sort_unstable_by_key(|(app, m)| (*app, m.chat_number, m.number));
    ranges
        .iter()
        .map(|r| {
            // In primary-key order, the range's rows are one run of them.
            let start = rows.partition_point(|(app, m)| {
                (*app, m.chat_number, m.number) < (r.app_id, r.chat, r.lo)
            });
            rows[start..]
                .iter()
                .take_while(|(app, m)| (*app, m.chat_number, m.number) <= (r.app_id, r.chat, r.hi))
                .map(|(_, m)| m.clone())
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::now;

    fn row(app: u64, chat: u64, number: u64) -> (u64, Message) {
        let message = Message {
            number,
            chat_number: chat,
            body: format!("{app}/{chat}/{number}"),
            created_at: now(),
            updated_at: now(),
        };
        (app, message)
    }

    fn range(app_id: u64, chat: u64, lo: u64, hi: u64) -> MessageRange {
        MessageRange {
            app_id,
            chat,
            lo,
            hi,
        }
    }

    fn bodies(found: &[Message]) -> Vec<&str> {
        found.iter().map(|m| m.body.as_str()).collect()
    }

    #[test]
    fn each_range_gets_its_rows_whatever_order_they_came_in() {
        // As MariaDB was seen to answer two single-row ranges of one application: by
        // number alone.
        let rows = vec![row(8, 95, 18), row(8, 31, 62)];
        let ranges = [range(8, 95, 18, 18), range(8, 31, 62, 62)];
        let found = split(rows, &ranges);
        assert_eq!(bodies(&found[0]), ["8/95/18"]);
        assert_eq!(bodies(&found[1]), ["8/31/62"]);
        // Overlapping ranges share rows; a range past the last row gets what there is.
        let rows = vec![row(2, 1, 3), row(1, 1, 2), row(2, 1, 2), row(1, 1, 1)];
        let ranges = [
            range(1, 1, 1, 2),
            range(2, 1, 2, 9),
            range(1, 1, 2, 2),
            range(3, 1, 1, 1),
        ];
        let found = split(rows, &ranges);
        assert_eq!(bodies(&found[0]), ["1/1/1", "1/1/2"]);
        assert_eq!(bodies(&found[1]), ["2/1/2", "2/1/3"]);
        assert_eq!(bodies(&found[2]), ["1/1/2"]);
        assert!(found[3].is_empty());
        let one = split(vec![row(1, 1, 5), row(1, 1, 4)], &[range(1, 1, 4, 5)]);
        assert_eq!(bodies(&one[0]), ["1/1/4", "1/1/5"]);
    }
}
