//! The workers' side of the queue: the shards' streams read through consumer groups,
//! acknowledged, dead-lettered and trimmed, the pending records released and the
//! `touched` sets handed out, each shard on its own (every command or script touches one
//! shard's slot).

use std::collections::HashMap;

use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamInfoGroupsReply,
    StreamPendingReply, StreamRangeReply, StreamReadOptions,
};
use redis::{AsyncCommands, Value};

use super::{Queue, RedisConn, Shard};

/// A stream entry handed to a worker, with the shard it came from.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub shard: Shard,
    pub raw: StreamId,
}

impl Delivered {
    pub fn id(&self) -> &str {
        &self.raw.id
    }

    /// Frees the entry's fields (its payload), keeping what acknowledging it needs.
    pub fn drop_payload(&mut self) {
        self.raw.map = Default::default();
    }
}

/// Where a consumer group is in a shard's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub id: String,
    /// The entry `id` itself is still needed (it is pending), not only those after it.
    pub needed: bool,
}

/// A consumer group of a shard's stream, as `XINFO GROUPS` and `XPENDING` tell it.
#[derive(Clone, Debug)]
pub struct GroupState {
    pub name: String,
    pub pending: u64,
    pub lag: Option<u64>,
    pub position: Position,
}

/// The queue's state, for operators and tools (`chat-system queue-status`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct QueueStatus {
    /// Entries in every shard's stream.
    pub length: u64,
    /// Entries in every shard's dead-letter stream.
    pub dead_letters: u64,
    /// Per group, summed over the shards.
    pub groups: Vec<GroupStatus>,
    /// Whether a shard's stream was trimmed past the indexer, which has not caught up yet.
    pub index_gap: bool,
    pub shards: Vec<ShardStatus>,
    /// The number counters of the applications asked for.
    pub counters: std::collections::BTreeMap<String, Counters>,
}

/// An application's number counters: the last numbers handed out.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Counters {
    /// `None`: missing (rebuilt from MySQL at the next create).
    pub chats: Option<u64>,
    /// Chat number → last message number.
    pub messages: std::collections::BTreeMap<u64, u64>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GroupStatus {
    pub name: String,
    pub pending: u64,
    pub lag: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ShardStatus {
    pub shard: Shard,
    /// The cluster slot of the shard's keys.
    pub slot: u16,
    pub length: u64,
    pub dead_letters: u64,
    pub index_gap: bool,
    pub groups: Vec<GroupStatus>,
}

/// A pending record to release once its entry is persisted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub hash: String,
    pub field: u64,
    pub version: String,
}

impl Queue {
    /// Reads up to `count` entries per shard for `consumer` of `group` from `shards`
    /// (which must share one slot on a cluster: one shard, or all of them on one node),
    /// with a connection of the caller's own when `block` is set. `from` is `>` for new
    /// entries, or `0` for the consumer's own unacknowledged ones.
    pub async fn read_group(
        &self,
        conn: &mut RedisConn,
        (group, consumer): (&str, &str),
        shards: &[Shard],
        from: &str,
        count: usize,
        block: Option<std::time::Duration>,
    ) -> redis::RedisResult<Vec<Delivered>> {
        let mut options = StreamReadOptions::default()
            .group(group, consumer)
            .count(count);
        if let Some(block) = block {
            options = options.block(block.as_millis() as usize);
        }
        let streams: Vec<String> = shards.iter().map(|&s| self.keys.stream(s)).collect();
        let ids = vec![from; shards.len()];
        let reply: Value = conn.xread_options(&streams, &ids, &options).await?;
        let shard_of: HashMap<&str, Shard> = streams
            .iter()
            .map(String::as_str)
            .zip(shards.iter().copied())
            .collect();
        let mut delivered = Vec::new();
        for (key, entries) in stream_read_reply(reply)? {
            let shard = shard_of.get(key.as_str()).copied().unwrap_or_default();
            delivered.extend(entries.into_iter().map(|raw| Delivered { shard, raw }));
        }
        Ok(delivered)
    }

    /// Takes over entries of `group` idle for `min_idle_ms` or more; answers the cursor to
    /// continue from and the entries.
    pub async fn claim_idle(
        &self,
        shard: Shard,
        group: &str,
        consumer: &str,
        min_idle_ms: u64,
        cursor: &str,
        count: usize,
    ) -> redis::RedisResult<(String, Vec<Delivered>)> {
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(self.keys.stream(shard))
            .arg(group)
            .arg(consumer)
            .arg(min_idle_ms)
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn())
            .await?;
        let claimed = reply
            .claimed
            .into_iter()
            .map(|raw| Delivered { shard, raw })
            .collect();
        Ok((reply.next_stream_id, claimed))
    }

    pub async fn ack(&self, shard: Shard, group: &str, ids: &[&str]) -> redis::RedisResult<()> {
        for chunk in ids.chunks(10_000) {
            let _: i64 = self
                .conn()
                .xack(self.keys.stream(shard), group, chunk)
                .await?;
        }
        Ok(())
    }

    /// Moves an entry to the shard's dead-letter stream (capped near `cap` entries) with
    /// the reason, and acknowledges it for `group`, atomically.
    pub async fn dead_letter(
        &self,
        item: &Delivered,
        group: &str,
        reason: &str,
        cap: usize,
    ) -> redis::RedisResult<()> {
        let mut fields: Vec<(String, Vec<u8>)> = vec![
            ("dlq_reason".into(), reason.as_bytes().to_vec()),
            ("dlq_entry".into(), item.id().as_bytes().to_vec()),
            ("dlq_group".into(), group.as_bytes().to_vec()),
        ];
        fields.extend(item.raw.map.iter().map(|(k, v)| {
            let bytes = redis::from_redis_value_ref::<Vec<u8>>(v).unwrap_or_default();
            (k.clone(), bytes)
        }));
        let cap = redis::streams::StreamMaxlen::Approx(cap);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .xadd_maxlen(self.keys.dead_letters(item.shard), cap, "*", &fields)
            .ignore()
            .xack(self.keys.stream(item.shard), group, &[item.id()])
            .ignore();
        pipe.exec_async(&mut self.conn()).await
    }

    /// Deletes the pending records persisted at exactly these versions (all of `shard`).
    pub async fn release_pending(
        &self,
        shard: Shard,
        records: &[Release],
    ) -> redis::RedisResult<()> {
        let _ = shard;
        for chunk in records.chunks(1_000) {
            // Each hash once, with its records in their order (the sort is stable).
            let mut chunk: Vec<&Release> = chunk.iter().collect();
            chunk.sort_by(|a, b| a.hash.cmp(&b.hash));
            let mut invocation = self.scripts.release_pending.prepare_invoke();
            for same in chunk.chunk_by(|a, b| a.hash == b.hash) {
                invocation.key(&same[0].hash).arg(same.len());
                for r in same {
                    invocation.arg(r.field).arg(&r.version);
                }
            }
            let _: i64 = invocation.invoke_async(&mut self.conn()).await?;
        }
        Ok(())
    }

    /// Marks parents whose counts need a refresh.
    pub async fn mark_touched(&self, shard: Shard, members: &[String]) -> redis::RedisResult<()> {
        if members.is_empty() {
            return Ok(());
        }
        self.conn().sadd(self.keys.touched(shard), members).await
    }

    /// Hands out up to `count` touched parents; each goes to exactly one caller.
    pub async fn pop_touched(&self, shard: Shard, count: usize) -> redis::RedisResult<Vec<String>> {
        redis::cmd("SPOP")
            .arg(self.keys.touched(shard))
            .arg(count)
            .query_async(&mut self.conn())
            .await
    }

    /// The consumer groups of a shard's stream and where each is.
    pub async fn groups(&self, shard: Shard) -> redis::RedisResult<Vec<GroupState>> {
        let stream = self.keys.stream(shard);
        let mut conn = self.conn();
        let info: StreamInfoGroupsReply = match conn.xinfo_groups(&stream).await {
            Ok(info) => info,
            // No stream yet.
            Err(e) if is_missing_stream(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut groups = Vec::with_capacity(info.groups.len());
        for group in info.groups {
            let last_delivered = Position {
                id: group.last_delivered_id.clone(),
                needed: false,
            };
            let position = if group.pending > 0 {
                let summary: StreamPendingReply = conn.xpending(&stream, &group.name).await?;
                match summary {
                    StreamPendingReply::Data(d) => Position {
                        id: d.start_id,
                        needed: true,
                    },
                    _ => last_delivered,
                }
            } else {
                last_delivered
            };
            groups.push(GroupState {
                name: group.name,
                pending: group.pending as u64,
                lag: group.lag.map(|l| l as u64),
                position,
            });
        }
        Ok(groups)
    }

    /// Creates `group` on the shard's stream (and the stream) if missing. An existing
    /// group is only read, so that a worker starts while Redis is at its `maxmemory`. A
    /// new group starts at the beginning of the stream, so entries queued before any
    /// worker existed are kept.
    pub async fn ensure_group(&self, shard: Shard, group: &str) -> redis::RedisResult<()> {
        if self.groups(shard).await?.iter().any(|g| g.name == group) {
            return Ok(());
        }
        let created: redis::RedisResult<()> = self
            .conn()
            .xgroup_create_mkstream(self.keys.stream(shard), group, "0")
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Removes the consumers of `group` with nothing pending that have been idle longer
    /// than `idle_ms`; answers how many.
    pub async fn remove_stale_consumers(
        &self,
        shard: Shard,
        group: &str,
        idle_ms: u128,
    ) -> redis::RedisResult<usize> {
        let stream = self.keys.stream(shard);
        let reply: StreamInfoConsumersReply = self.conn().xinfo_consumers(&stream, group).await?;
        let stale: Vec<&str> = reply
            .consumers
            .iter()
            .filter(|c| c.pending == 0 && c.idle as u128 > idle_ms)
            .map(|c| c.name.as_str())
            .collect();
        for name in &stale {
            let _: i64 = redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(&stream)
                .arg(group)
                .arg(*name)
                .query_async(&mut self.conn())
                .await?;
        }
        Ok(stale.len())
    }

    /// The first entry of the shard's stream at or after `from` (`(id` for after).
    pub async fn first_entry_from(
        &self,
        shard: Shard,
        from: &str,
    ) -> redis::RedisResult<Option<String>> {
        let next: StreamRangeReply = self
            .conn()
            .xrange_count(self.keys.stream(shard), from, "+", 1)
            .await?;
        Ok(next.ids.first().map(|e| e.id.clone()))
    }

    /// Trims the shard's stream up to (not including) `floor`, `limit` entries at a time:
    /// an approximate trim removes whole stream nodes at most `limit` entries per call,
    /// so it is called until it has caught up (each call stays short, so creates
    /// interleave), then the rest of the first node exactly: the stream's length is what
    /// the backlog bound counts.
    pub async fn trim_behind(
        &self,
        shard: Shard,
        floor: &str,
        limit: u64,
        max_calls: usize,
    ) -> redis::RedisResult<()> {
        let stream = self.keys.stream(shard);
        let mut conn = self.conn();
        for _ in 0..max_calls {
            let trimmed: u64 = redis::cmd("XTRIM")
                .arg(&stream)
                .arg("MINID")
                .arg("~")
                .arg(floor)
                .arg("LIMIT")
                .arg(limit)
                .query_async(&mut conn)
                .await?;
            // Whole nodes go at once, so a call may stop a little short of the limit with
            // more to come: only a call that removed nothing is the last.
            if trimmed == 0 {
                let _: u64 = redis::cmd("XTRIM")
                    .arg(&stream)
                    .arg("MINID")
                    .arg(floor)
                    .query_async(&mut conn)
                    .await?;
                break;
            }
        }
        Ok(())
    }

    /// Entries in the shard's stream and in its dead-letter stream.
    pub async fn lengths(&self, shard: Shard) -> redis::RedisResult<(u64, u64)> {
        redis::pipe()
            .xlen(self.keys.stream(shard))
            .xlen(self.keys.dead_letters(shard))
            .query_async(&mut self.conn())
            .await
    }

    /// Every shard's entries, dead letters and groups, and the counters of `tokens`.
    pub async fn status(&self, tokens: &[String]) -> redis::RedisResult<QueueStatus> {
        let mut status = QueueStatus {
            length: 0,
            dead_letters: 0,
            groups: Vec::new(),
            index_gap: false,
            shards: Vec::new(),
            counters: Default::default(),
        };
        for token in tokens {
            let (chats, messages): (Option<u64>, std::collections::BTreeMap<u64, u64>) =
                redis::pipe()
                    .get(self.keys.chat_counter(token))
                    .hgetall(self.keys.message_counters(token))
                    .query_async(&mut self.conn())
                    .await?;
            status
                .counters
                .insert(token.clone(), Counters { chats, messages });
        }
        for shard in self.keys.shards() {
            let (length, dead_letters) = self.lengths(shard).await?;
            let groups: Vec<GroupStatus> = self
                .groups(shard)
                .await?
                .into_iter()
                .map(|g| GroupStatus {
                    name: g.name,
                    pending: g.pending,
                    lag: g.lag.unwrap_or(0),
                })
                .collect();
            for g in &groups {
                match status.groups.iter_mut().find(|t| t.name == g.name) {
                    Some(total) => {
                        total.pending += g.pending;
                        total.lag += g.lag;
                    }
                    None => status.groups.push(g.clone()),
                }
            }
            let index_gap = self.index_gap_marked(shard).await?
                || self.index_catch_up_in_progress(shard).await?.is_some();
            status.length += length;
            status.dead_letters += dead_letters;
            status.index_gap |= index_gap;
            status.shards.push(ShardStatus {
                shard,
                slot: self.keys.slot_of(shard),
                length,
                dead_letters,
                index_gap,
                groups,
            });
        }
        Ok(status)
    }

    /// Entries in every shard's stream.
    pub async fn length(&self) -> redis::RedisResult<u64> {
        let mut total = 0;
        for shard in self.keys.shards() {
            total += self.lengths(shard).await?.0;
        }
        Ok(total)
    }

    /// Records that the shard's stream is about to be trimmed past entries the indexer
    /// has not handled, from `entry` on; an older mark is kept.
    pub async fn mark_index_gap(&self, shard: Shard, entry: &str) -> redis::RedisResult<()> {
        let _: bool = self
            .conn()
            .set_nx(self.keys.index_gap(shard), entry)
            .await?;
        Ok(())
    }

    /// Where an unfinished catch-up of the shard's indexer started, if one is in progress.
    pub async fn index_catch_up_in_progress(
        &self,
        shard: Shard,
    ) -> redis::RedisResult<Option<String>> {
        self.conn().get(self.keys.index_catch_up(shard)).await
    }

    /// Whether a gap is marked for which no catch-up has started yet.
    pub async fn index_gap_marked(&self, shard: Shard) -> redis::RedisResult<bool> {
        self.conn().exists(self.keys.index_gap(shard)).await
    }

    /// Turns the gap mark into a catch-up mark and resets `group` to read what the stream
    /// still holds; answers where the catch-up starts (nothing without a gap).
    pub async fn start_index_catch_up(
        &self,
        shard: Shard,
        group: &str,
    ) -> redis::RedisResult<Option<String>> {
        self.scripts
            .start_catch_up
            .key(self.keys.index_gap(shard))
            .key(self.keys.index_catch_up(shard))
            .key(self.keys.stream(shard))
            .arg(group)
            .invoke_async(&mut self.conn())
            .await
    }

    pub async fn finish_index_catch_up(&self, shard: Shard) -> redis::RedisResult<()> {
        self.conn().del(self.keys.index_catch_up(shard)).await
    }

    /// For tests and tools only: appends entries whose payload (the `e` field of
    /// [`super::codec`]) is taken as given, bypassing the create scripts, so that the
    /// workers can be shown entries the API never writes (malformed ones, or ones for an
    /// application that does not exist). One round trip for them all; their ids, in order.
    pub async fn inject_raw_entries<P: redis::ToRedisArgs>(
        &self,
        shard: Shard,
        payloads: impl IntoIterator<Item = P>,
    ) -> redis::RedisResult<Vec<String>> {
        let stream = self.keys.stream(shard);
        let mut pipe = redis::pipe();
        for payload in payloads {
            pipe.xadd(&stream, "*", &[("e", payload)]);
        }
        pipe.query_async(&mut self.conn()).await
    }
}

/// An entry's payload (its field `e`, as the create scripts write it), read in place; the
/// error says why there is none.
pub fn payload(entry: &StreamId) -> Result<&str, &'static str> {
    match entry.map.get("e") {
        Some(Value::BulkString(bytes)) => {
            std::str::from_utf8(bytes).map_err(|_| "field `e` is not UTF-8")
        }
        Some(Value::SimpleString(text)) => Ok(text),
        Some(_) => Err("field `e` is not a string"),
        None => Err("field `e` is missing"),
    }
}

fn is_missing_stream(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
}

/// The entries of an `XREAD`/`XREADGROUP` reply by stream key, taken out of the reply
/// (RESP2 arrays or a RESP3 map). redis-rs's `StreamReadReply` copies the whole reply
/// before parsing it: every body the worker reads, once more.
pub(super) fn stream_read_reply(reply: Value) -> redis::RedisResult<Vec<(String, Vec<StreamId>)>> {
    let unexpected = |what: &str| {
        redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected stream reply",
            what.to_owned(),
        ))
    };
    let streams: Vec<(Value, Value)> = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(pairs) => pairs,
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Array(pair) if pair.len() == 2 => {
                    let mut pair = pair.into_iter();
                    Ok((
                        pair.next().unwrap_or(Value::Nil),
                        pair.next().unwrap_or(Value::Nil),
                    ))
                }
                _ => Err(unexpected("a stream is not a [key, entries] pair")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(unexpected("not an array or a map of streams")),
    };
    let mut out = Vec::with_capacity(streams.len());
    for (key, entries) in streams {
        let key: String = redis::from_redis_value(key)?;
        let entries = match entries {
            Value::Array(entries) => entries,
            Value::Nil => Vec::new(),
            _ => return Err(unexpected("a stream's entries are not an array")),
        };
        let mut ids = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(parts) = entry else {
                return Err(unexpected("an entry is not an array"));
            };
            let mut parts = parts.into_iter();
            let id: String = redis::from_redis_value(parts.next().unwrap_or(Value::Nil))?;
            // An entry deleted while pending comes back with no fields.
            let fields = match parts.next() {
                Some(Value::Array(fields)) => fields,
                Some(Value::Map(pairs)) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                Some(Value::Nil) | None => Vec::new(),
                Some(_) => return Err(unexpected("an entry's fields are not an array")),
            };
            let mut map = HashMap::with_capacity(fields.len() / 2);
            let mut fields = fields.into_iter();
            while let (Some(field), Some(value)) = (fields.next(), fields.next()) {
                map.insert(redis::from_redis_value::<String>(field)?, value);
            }
            ids.push(StreamId {
                id,
                map,
                ..StreamId::default()
            });
        }
        out.push((key, ids));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[&str]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(fields.iter().map(|f| bulk(f)).collect()),
        ])
    }

    /// An entry's id and its fields, sorted.
    type Entry = (String, Vec<(String, String)>);

    fn read(reply: Value) -> Vec<(String, Vec<Entry>)> {
        stream_read_reply(reply)
            .unwrap()
            .into_iter()
            .map(|(key, ids)| {
                let ids = ids
                    .into_iter()
                    .map(|id| {
                        let mut fields: Vec<(String, String)> = id
                            .map
                            .iter()
                            .map(|(k, v)| (k.clone(), redis::from_redis_value_ref(v).unwrap()))
                            .collect();
                        fields.sort();
                        (id.id, fields)
                    })
                    .collect();
                (key, ids)
            })
            .collect()
    }

    #[test]
    fn stream_replies_are_read_in_both_protocols_deleted_entries_included() {
        let streams = |pair: fn(Value, Value) -> Value| {
            vec![
                pair(
                    bulk("q:0"),
                    Value::Array(vec![
                        entry("1-1", &["e", "one", "x", "y"]),
                        // Deleted while pending: no fields.
                        Value::Array(vec![bulk("1-2"), Value::Nil]),
                    ]),
                ),
                pair(bulk("q:1"), Value::Array(vec![entry("2-1", &["e", "two"])])),
            ]
        };
        let expected = vec![
            (
                "q:0".to_owned(),
                vec![
                    (
                        "1-1".to_owned(),
                        vec![("e".into(), "one".into()), ("x".into(), "y".into())],
                    ),
                    ("1-2".to_owned(), vec![]),
                ],
            ),
            (
                "q:1".to_owned(),
                vec![("2-1".to_owned(), vec![("e".into(), "two".into())])],
            ),
        ];
        let resp2 = Value::Array(streams(|k, v| Value::Array(vec![k, v])));
        assert_eq!(read(resp2), expected);
        let resp3 = Value::Map(
            streams(|k, v| Value::Array(vec![k, v]))
                .into_iter()
                .map(|pair| match pair {
                    Value::Array(mut kv) => {
                        let v = kv.pop().unwrap();
                        (kv.pop().unwrap(), v)
                    }
                    _ => unreachable!(),
                })
                .collect(),
        );
        assert_eq!(read(resp3), expected);
        assert!(read(Value::Nil).is_empty());
        assert!(stream_read_reply(Value::Int(3)).is_err());
        assert!(stream_read_reply(Value::Array(vec![bulk("lonely")])).is_err());
    }

    #[test]
    fn an_entry_without_its_payload_keeps_its_shard_and_id() {
        let mut read = stream_read_reply(Value::Array(vec![Value::Array(vec![
            bulk("q:0"),
            Value::Array(vec![entry("1-1", &["e", &"x".repeat(65_536)])]),
        ])]))
        .unwrap();
        let raw = read.pop().unwrap().1.pop().unwrap();
        let mut delivered = Delivered { shard: 3, raw };
        assert!(payload(&delivered.raw).is_ok());
        delivered.drop_payload();
        assert!(payload(&delivered.raw).is_err());
        assert_eq!((delivered.shard, delivered.id()), (3, "1-1"));
        assert_eq!(delivered.raw.map.capacity(), 0);
    }
}
