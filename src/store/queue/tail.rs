//! Following the write queue as it grows, for live delivery: a shard's stream read from
//! a position (no consumer group: every API process reads it for its own subscribers),
//! and a chat's pending messages written after a position, for a subscriber resuming.

use std::time::Duration;

use redis::AsyncCommands;
use redis::streams::{StreamRangeReply, StreamReadOptions};

use super::{CodecError, Kind, Queue, QueuedWrite, Record, RedisConn, Shard};
use crate::resources::{Message, from_micros};

/// Most pending writes of one chat a resuming subscriber's catch-up reads in one call.
pub const PENDING_SINCE_MAX: usize = 10_000;

/// A message write read from the queue: its entry id (the write's version) and the
/// message as that write left it.
#[derive(Clone, Debug, PartialEq)]
pub struct QueuedMessage {
    pub token: String,
    pub entry_id: String,
    pub message: Message,
    /// A create (its two timestamps are equal), not an update.
    pub created: bool,
}

impl QueuedMessage {
    fn from_entry(entry_id: String, write: QueuedWrite) -> Option<Self> {
        if write.kind != Kind::Message {
            return None;
        }
        let message = Message {
            number: write.number,
            chat_number: write.chat,
            body: write.text?,
            created_at: from_micros(write.created_us)?,
            updated_at: from_micros(write.updated_us)?,
        };
        Some(Self {
            token: write.token,
            entry_id,
            created: write.created_us == write.updated_us,
            message,
        })
    }
}

impl Queue {
    /// The id of the shard's newest entry (`0-0` when it is empty): where a reader that
    /// wants only what comes next starts.
    pub async fn last_entry_id(&self, shard: Shard) -> redis::RedisResult<String> {
        let newest: StreamRangeReply = self
            .conn()
            .xrevrange_count(self.keys.stream(shard), "+", "-", 1)
            .await?;
        Ok(newest
            .ids
            .first()
            .map_or_else(|| "0-0".to_owned(), |e| e.id.clone()))
    }

    /// The shard's message writes after entry `after`, waiting up to `block` for one,
    /// on a connection of the caller's own. Answers the id to read on from, and the
    /// writes (chat entries and entries that do not decode are skipped, but moved past).
    pub async fn tail(
        &self,
        conn: &mut RedisConn,
        shard: Shard,
        after: &str,
        block: Duration,
        count: usize,
    ) -> redis::RedisResult<(String, Vec<QueuedMessage>)> {
        let options = StreamReadOptions::default()
            .count(count)
            .block(block.as_millis() as usize);
        let reply: redis::Value = conn
            .xread_options(&[self.keys.stream(shard)], &[after], &options)
            .await?;
        let mut last = after.to_owned();
        let mut writes = Vec::new();
        let entries = super::stream::stream_read_reply(reply)?;
        for item in entries.into_iter().flat_map(|(_, ids)| ids) {
            last.clone_from(&item.id);
            let Ok(payload) = super::stream::payload(&item) else {
                continue;
            };
            if let Some(write) = QueuedWrite::decode(payload)
                .ok()
                .and_then(|w| QueuedMessage::from_entry(item.id.clone(), w))
            {
                writes.push(write);
            }
        }
        Ok((last, writes))
    }

    /// The chat's messages whose pending write came after entry `after`; `None` while the
    /// chat has more than [`PENDING_SINCE_MAX`] pending writes (a backlog being drained:
    /// retry later), so that one call stays short for Redis.
    pub async fn pending_since(
        &self,
        token: &str,
        chat: u64,
        after: &str,
    ) -> redis::RedisResult<Option<Vec<QueuedMessage>>> {
        let found: Vec<Option<String>> = self
            .scripts
            .pending_since
            .key(self.keys.message_records(token, chat))
            .key(self.keys.stream(self.keys.shard_of(token)))
            .arg(after)
            .arg(PENDING_SINCE_MAX)
            .invoke_async(&mut self.conn())
            .await?;
        let Some((status, found)) = found.split_first() else {
            return Err(CodecError::Answer("an empty pending-since answer".into()).into());
        };
        if status.as_deref() != Some("ok") {
            return Ok(None);
        }
        let mut writes = Vec::new();
        for item in found.chunks(3) {
            let [Some(_), Some(record), entry] = item else {
                return Err(CodecError::Answer("a pending record since".into()).into());
            };
            let record = Record::decode(record)?;
            let entry = entry.as_deref().ok_or_else(|| {
                CodecError::Record(format!("{}: its entry is missing", record.version))
            })?;
            let write = QueuedWrite::decode(entry)?;
            writes.extend(QueuedMessage::from_entry(record.version, write));
        }
        Ok(Some(writes))
    }
}
