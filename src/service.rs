//! The operations behind the chat and message endpoints: Redis first, MySQL as the
//! fallback and the truth. Handlers call these and only translate HTTP.

use std::future::Future;

use chrono::{DateTime, Utc};

use crate::domain::{Body, Title, Token};
use crate::error::{ApiError, Overload};
use crate::idempotency::{IdempotencyKey, NextAction, fingerprint};
use crate::resources::{Chat, Message, from_micros, now};
use crate::store::mysql::MessageRange;
use crate::store::queue::{
    Allocation, Direction, Enqueued, PageLookup, QueuedMessage, entry_id_of, version_of,
};
use crate::store::read_cache::MessageKey;
use crate::store::{Store, mysql};

/// A create retries after repairing a cold cache: a message create can need three
/// repairs (the token, the chat counter, the message counter), so a fourth miss means
/// something else is wrong.
const CREATE_ATTEMPTS: usize = 4;

impl Store {
    /// The MySQL id of an application, from the Redis cache or, on a miss, from MySQL
    /// (and then cached again).
    pub async fn application_id(&self, token: &Token) -> Result<u64, ApiError> {
        if let Some(id) = self.queue.cached_application_id(token.as_str()).await? {
            return Ok(id);
        }
        self.load_application_id(token).await
    }

    /// The application's id as Redis had it cached (`cached`), else from MySQL.
    async fn app_id_or_load(&self, token: &Token, cached: Option<u64>) -> Result<u64, ApiError> {
        match cached {
            Some(id) => Ok(id),
            None => self.load_application_id(token).await,
        }
    }

    async fn load_application_id(&self, token: &Token) -> Result<u64, ApiError> {
        let id = mysql::application_id(&self.mysql, token.as_str())
            .await?
            .ok_or_else(|| ApiError::not_found("application"))?;
        self.queue
            .cache_application(token.as_str(), id, false)
            .await?;
        Ok(id)
    }

    /// Rebuilds the application's chat counter from MySQL if it is missing.
    async fn restore_chat_counter(&self, token: &Token) -> Result<(), ApiError> {
        let id = self.application_id(token).await?;
        let max = mysql::max_chat_number(&self.mysql, id).await?;
        tracing::info!(max, "restoring a chat counter from MySQL");
        Ok(self.queue.restore_chat_counter(token.as_str(), max).await?)
    }

    async fn restore_message_counter(&self, token: &Token, chat: u64) -> Result<(), ApiError> {
        let id = self.application_id(token).await?;
        let max = mysql::max_message_number(&self.mysql, id, chat).await?;
        tracing::info!(chat, max, "restoring a message counter from MySQL");
        Ok(self
            .queue
            .restore_message_counter(token.as_str(), chat, max)
            .await?)
    }

    /// Allocates the chat's number and queues it. No MySQL write; a MySQL read only on
    /// a cold cache.
    pub async fn create_chat(
        &self,
        token: &Token,
        title: Option<Title>,
        key: Option<&IdempotencyKey>,
    ) -> Result<Chat, ApiError> {
        let title = title.map(Title::into_string);
        let at = now();
        let fingerprint = fingerprint(&[title.as_deref()]);
        let idem_key = key.map(|k| {
            self.queue
                .keys
                .idempotency_chats(token.as_str(), k.as_str())
        });
        let idempotency = idem_key.as_deref().map(|k| (k, fingerprint.as_str()));
        let (number, at) = self
            .allocate(token, None, &fingerprint, at, "chats_created_total", || {
                self.queue
                    .allocate_chat(token.as_str(), title.as_deref(), at, idempotency)
            })
            .await?;
        Ok(Chat {
            number,
            title,
            messages_count: 0,
            created_at: at,
            updated_at: at,
        })
    }

    /// Allocates the message's number and queues it. No MySQL write; a MySQL read only
    /// on a cold cache.
    pub async fn create_message(
        &self,
        token: &Token,
        chat: u64,
        body: Body,
        key: Option<&IdempotencyKey>,
    ) -> Result<Message, ApiError> {
        let body = body.into_string();
        let at = now();
        let fingerprint = fingerprint(&[Some(&body)]);
        let idem_key = key.map(|k| {
            self.queue
                .keys
                .idempotency_messages(token.as_str(), chat, k.as_str())
        });
        let idempotency = idem_key.as_deref().map(|k| (k, fingerprint.as_str()));
        let (number, at) = self
            .allocate(
                token,
                Some(chat),
                &fingerprint,
                at,
                "messages_created_total",
                || {
                    self.queue
                        .allocate_message(token.as_str(), chat, &body, at, idempotency)
                },
            )
            .await?;
        Ok(Message {
            number,
            chat_number: chat,
            body,
            created_at: at,
            updated_at: at,
        })
    }

    /// Runs a create script until it allocates (or replays), repairing what a cold cache
    /// lacks in between: the token's id, the application's chat counter, the chat's
    /// message counter (under `chat`). Answers the number and its acceptance time (the
    /// original one for a replay); counts a new create in the `created` metric.
    async fn allocate<F, Fut>(
        &self,
        token: &Token,
        chat: Option<u64>,
        fingerprint: &str,
        at: DateTime<Utc>,
        created: &'static str,
        mut script: F,
    ) -> Result<(u64, DateTime<Utc>), ApiError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = redis::RedisResult<Allocation>>,
    {
        for _ in 0..CREATE_ATTEMPTS {
            match script().await? {
                Allocation::Created { number, .. } => {
                    metrics::counter!(created).increment(1);
                    return Ok((number, at));
                }
                Allocation::Replayed {
                    fingerprint: recorded,
                    number,
                    at_us,
                } => {
                    // The script answers only once the original was allocated.
                    let original = (number, from_micros(at_us).unwrap_or(at));
                    return match NextAction::after(&recorded, Some(original), fingerprint) {
                        NextAction::Replay(original) => Ok(original),
                        _ => Err(ApiError::idempotency_mismatch()),
                    };
                }
                Allocation::Full => return Err(ApiError::Overloaded(Overload::Backlog)),
                Allocation::NoApplication => {
                    self.load_application_id(token).await?;
                }
                Allocation::NoChatCounter => self.restore_chat_counter(token).await?,
                Allocation::NoChat => return Err(ApiError::not_found("chat")),
                Allocation::NoMessageCounter => match chat {
                    Some(chat) => self.restore_message_counter(token, chat).await?,
                    None => {
                        return Err(ApiError::internal("a chat create found no message counter"));
                    }
                },
            }
        }
        Err(ApiError::internal("create: the cache kept missing"))
    }

    /// A chat: its pending record while one exists, else its MySQL row. Redis is read
    /// first (one round trip, which also brings the token's cached id): a record is
    /// deleted only after its row is committed, so a miss in Redis followed by a read of
    /// MySQL cannot fall between the two.
    pub async fn chat(&self, token: &Token, number: u64) -> Result<Chat, ApiError> {
        self.chat_and_app(token, number).await.map(|(chat, _)| chat)
    }

    async fn chat_and_app(&self, token: &Token, number: u64) -> Result<(Chat, u64), ApiError> {
        let found = self.queue.lookup_chat(token.as_str(), number).await?;
        let app_id = self.app_id_or_load(token, found.app_id).await?;
        if let Some(chat) = found.pending {
            return Ok((chat, app_id));
        }
        let chat = mysql::chat(&self.mysql, app_id, number)
            .await?
            .ok_or_else(|| ApiError::not_found("chat"))?;
        Ok((chat, app_id))
    }

    /// A message, read like [`Store::chat`].
    pub async fn message(
        &self,
        token: &Token,
        chat: u64,
        number: u64,
    ) -> Result<Message, ApiError> {
        self.message_and_app(token, chat, number)
            .await
            .map(|(message, _)| message)
    }

    /// A message and its application's id: pending in Redis, else this process's copy
    /// (see `read_cache`), else MySQL (and kept).
    async fn message_and_app(
        &self,
        token: &Token,
        chat: u64,
        number: u64,
    ) -> Result<(Message, u64), ApiError> {
        let found = self
            .queue
            .lookup_message(token.as_str(), chat, number)
            .await?;
        let app_id = self.app_id_or_load(token, found.app_id).await?;
        if let Some(message) = found.pending {
            return Ok((message, app_id));
        }
        let key = MessageKey {
            app_id,
            chat,
            number,
        };
        let mark = found.update_mark;
        if let Some(message) = self.read_cache.get(&key, mark.as_deref()) {
            return Ok((message, app_id));
        }
        let message = self
            .message_reads
            .one(app_id, chat, number)
            .await?
            .ok_or_else(|| ApiError::not_found("message"))?;
        self.read_cache.offer(key, mark, message.clone());
        Ok((message, app_id))
    }

    /// Replaces a chat's title (`Some(None)` sets it to null; `None` changes nothing).
    /// The new state goes through the queue at a version later than any write accepted
    /// before it.
    pub async fn update_chat(
        &self,
        token: &Token,
        number: u64,
        title: Option<Option<Title>>,
    ) -> Result<Chat, ApiError> {
        let (mut chat, app_id) = self.chat_and_app(token, number).await?;
        let Some(title) = title else {
            return Ok(chat);
        };
        chat.title = title.map(Title::into_string);
        chat.updated_at = now();
        let queued = self
            .queue
            .enqueue_chat_update(token.as_str(), app_id, &chat)
            .await?;
        admitted(queued)?;
        Ok(chat)
    }

    /// Replaces a message's body, through the queue like [`Store::update_chat`].
    pub async fn update_message(
        &self,
        token: &Token,
        chat: u64,
        number: u64,
        body: Body,
    ) -> Result<Message, ApiError> {
        let (mut message, app_id) = self.message_and_app(token, chat, number).await?;
        message.body = body.into_string();
        message.updated_at = now();
        let queued = self
            .queue
            .enqueue_message_update(token.as_str(), app_id, &message)
            .await?;
        admitted(queued)?;
        Ok(message)
    }
}

/// A page request on numbered items: which way, from where (`after` ascending, `before`
/// descending; `None` from the start or the end), how many.
#[derive(Clone, Copy, Debug)]
pub struct PageRequest {
    pub direction: Direction,
    pub cursor: Option<u64>,
    pub limit: u32,
}

/// A page of items and, when more may follow, the cursor of the next page.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<u64>,
}

impl PageRequest {
    /// The numbers `lo..=hi` this page covers when `last` is the last number handed out
    /// (numbers are gap-free, so every one of them was accepted), or `None` when the page
    /// is past the end.
    fn window(&self, last: u64) -> Option<(u64, u64)> {
        let limit = u64::from(self.limit.max(1));
        match self.direction {
            Direction::Asc => {
                let lo = self.cursor.unwrap_or(0).saturating_add(1);
                let hi = self.cursor.unwrap_or(0).saturating_add(limit).min(last);
                (lo <= hi).then_some((lo, hi))
            }
            Direction::Desc => {
                let hi = self.cursor.map_or(last, |b| b.saturating_sub(1)).min(last);
                let lo = hi.saturating_sub(limit - 1).max(1);
                (hi >= 1).then_some((lo, hi))
            }
        }
    }

    /// The first number the page looks at, for the Redis side.
    fn first(&self) -> u64 {
        match self.direction {
            Direction::Asc => self.cursor.unwrap_or(0).saturating_add(1),
            Direction::Desc => self.cursor.map_or(MAX_NUMBER, |b| b.saturating_sub(1)),
        }
    }
}

/// Persisted messages one resume of a live subscriber reads at most.
pub const CATCH_UP_MAX: u32 = 1000;

/// Above any number ever handed out (and exact as a Lua number).
const MAX_NUMBER: u64 = 1 << 53;

/// Merges the pending items of a window with its persisted rows: a pending item (not
/// persisted yet, or updated since) wins over its row. A number found in neither was
/// accepted and dead-lettered, and is skipped.
fn merge<T>(
    request: &PageRequest,
    (lo, hi): (u64, u64),
    last: u64,
    mut pending: std::collections::BTreeMap<u64, T>,
    rows: Vec<T>,
    number: impl Fn(&T) -> u64,
) -> Page<T> {
    let mut rows: std::collections::BTreeMap<u64, T> =
        rows.into_iter().map(|r| (number(&r), r)).collect();
    let mut take = |n: u64| pending.remove(&n).or_else(|| rows.remove(&n));
    let (items, next) = match request.direction {
        Direction::Asc => (
            (lo..=hi).filter_map(&mut take).collect(),
            (hi < last).then_some(hi),
        ),
        Direction::Desc => (
            (lo..=hi).rev().filter_map(&mut take).collect(),
            (lo > 1).then_some(lo),
        ),
    };
    Page { items, next }
}

/// A page from MySQL alone (the counter is missing, so pending items cannot be placed):
/// one more row than asked tells whether more follow.
fn page_from_rows<T>(
    request: &PageRequest,
    mut rows: Vec<T>,
    number: impl Fn(&T) -> u64,
) -> Page<T> {
    let more = rows.len() > request.limit as usize;
    rows.truncate(request.limit as usize);
    let next = more.then(|| rows.last().map(&number)).flatten();
    Page { items: rows, next }
}

impl Store {
    /// A page of an application's chats, pending ones included: one Redis round trip and
    /// one MySQL range scan.
    pub async fn list_chats(
        &self,
        token: &Token,
        request: PageRequest,
    ) -> Result<Page<Chat>, ApiError> {
        let found = self
            .queue
            .page_of_chats(
                token.as_str(),
                request.first(),
                request.direction,
                request.limit,
            )
            .await?;
        let app_id = self.app_id_or_load(token, found.app_id).await?;
        assemble(
            &request,
            found,
            |rows| async move { Ok(mysql::chats_in(&self.mysql, app_id, rows).await?) },
            |c| c.number,
        )
        .await
    }

    /// A page of a chat's messages, pending ones included: one Redis round trip and one
    /// MySQL range scan. 404 when the chat does not exist.
    pub async fn list_messages(
        &self,
        token: &Token,
        chat: u64,
        request: PageRequest,
    ) -> Result<Page<Message>, ApiError> {
        let found = self
            .queue
            .page_of_messages(
                token.as_str(),
                chat,
                request.first(),
                request.direction,
                request.limit,
            )
            .await?;
        let app_id = self.app_id_or_load(token, found.app_id).await?;
        match found.chat_exists {
            Some(true) => {}
            Some(false) => return Err(ApiError::not_found("chat")),
            // The chat counter is missing: ask the chat itself.
            None => {
                self.chat(token, chat).await?;
            }
        }
        // The persisted part of the window: nothing to read when every message in it is
        // pending; else this process's copies, when it holds every one of them under the
        // chat's current update mark (see `read_cache`); else MySQL. Only rows Redis
        // showed to be persisted are kept: the row of a message whose update is pending
        // is older than the mark, and with no counter Redis showed nothing.
        let mark = found.update_mark.clone();
        let persisted: Option<Vec<u64>> =
            found
                .last
                .and_then(|last| request.window(last))
                .map(|(lo, hi)| {
                    (lo..=hi)
                        .filter(|n| !found.pending.contains_key(n))
                        .collect()
                });
        let cached = match &persisted {
            Some(numbers) if numbers.is_empty() => Some(Vec::new()),
            Some(numbers) => {
                self.read_cache
                    .get_all(app_id, chat, numbers.iter().copied(), mark.as_deref())
            }
            None => None,
        };
        assemble(
            &request,
            found,
            |rows| async move {
                if let Some(copies) = cached {
                    return Ok(copies);
                }
                let (mysql::Rows::Between { lo, hi }, Some(persisted)) = (rows, persisted) else {
                    // No counter: Redis showed nothing persisted, so nothing is kept.
                    return Ok(mysql::messages_in(&self.mysql, app_id, chat, rows).await?);
                };
                let range = MessageRange {
                    app_id,
                    chat,
                    lo,
                    hi,
                };
                let rows = self.message_reads.range(range).await?;
                let shown = rows
                    .iter()
                    .filter(|m| persisted.binary_search(&m.number).is_ok());
                self.read_cache
                    .offer_page(app_id, chat, (lo, hi), mark, shown.cloned());
                Ok(rows)
            },
            |m| m.number,
        )
        .await
    }
}

/// A page from what Redis found (`found`) and the rows MySQL holds (`fetch`): the
/// window of numbers up to the counter, merged; from MySQL alone when the counter is
/// missing (pending items cannot be placed then), one row more than asked telling
/// whether more follow.
async fn assemble<T, F, Fut>(
    request: &PageRequest,
    found: PageLookup<T>,
    fetch: F,
    number: impl Fn(&T) -> u64,
) -> Result<Page<T>, ApiError>
where
    F: FnOnce(mysql::Rows) -> Fut,
    Fut: Future<Output = Result<Vec<T>, ApiError>>,
{
    let Some(last) = found.last else {
        let limit = request.limit + 1;
        let rows = match request.direction {
            Direction::Asc => mysql::Rows::After {
                after: request.cursor.unwrap_or(0),
                limit,
            },
            Direction::Desc => mysql::Rows::Before {
                before: request.cursor.unwrap_or(MAX_NUMBER),
                limit,
            },
        };
        return Ok(page_from_rows(request, fetch(rows).await?, number));
    };
    let Some((lo, hi)) = request.window(last) else {
        return Ok(Page {
            items: Vec::new(),
            next: None,
        });
    };
    let rows = fetch(mysql::Rows::Between { lo, hi }).await?;
    Ok(merge(request, (lo, hi), last, found.pending, rows, number))
}

impl Store {
    /// What a subscriber resuming after entry `after` has missed: each message of the
    /// chat changed since, in its current state, in acceptance (version) order. Redis is
    /// read before MySQL: a write persisted in between is then found in MySQL.
    ///
    /// At most [`CATCH_UP_MAX`] persisted messages at a time: with more, the answer ends
    /// at the last of them and says it is partial (`false`); the subscriber resumes from
    /// there for the next part. Memory stays bounded whatever the id sent.
    pub async fn messages_changed_since(
        &self,
        token: &Token,
        chat: u64,
        app_id: u64,
        after: &str,
    ) -> Result<(Vec<QueuedMessage>, bool), ApiError> {
        let since = version_of(after).ok_or_else(|| {
            ApiError::BadRequest("Last-Event-ID must be an event id this API sent".into())
        })?;
        // A chat with a backlog of pending writes is caught up once it has drained.
        let pending = self
            .queue
            .pending_since(token.as_str(), chat, after)
            .await?
            .ok_or(ApiError::Overloaded(Overload::Backlog))?;
        let rows = mysql::messages_since(&self.mysql, app_id, chat, since, CATCH_UP_MAX).await?;
        // With as many rows as asked for, more may follow: this part ends at the last.
        let cut = (rows.len() >= CATCH_UP_MAX as usize)
            .then(|| rows.last().map(|(version, _)| *version))
            .flatten();
        let mut latest: std::collections::HashMap<u64, (u64, QueuedMessage)> =
            std::collections::HashMap::new();
        let written = rows.into_iter().map(|(version, message)| {
            (
                version,
                QueuedMessage {
                    token: token.as_str().to_owned(),
                    entry_id: entry_id_of(version),
                    created: message.created_at == message.updated_at,
                    message,
                },
            )
        });
        let queued = pending
            .into_iter()
            .filter_map(|w| Some((version_of(&w.entry_id)?, w)));
        for (version, write) in written.chain(queued) {
            let number = write.message.number;
            match latest.get(&number) {
                Some((seen, _)) if *seen >= version => {}
                _ => {
                    latest.insert(number, (version, write));
                }
            }
        }
        let mut changed: Vec<(u64, QueuedMessage)> = latest
            .into_values()
            .filter(|(version, _)| cut.is_none_or(|cut| *version <= cut))
            .collect();
        changed.sort_by_key(|(version, _)| *version);
        Ok((changed.into_iter().map(|(_, w)| w).collect(), cut.is_none()))
    }

    /// The application id of a chat that exists (pending or persisted); 404 otherwise.
    /// Redis answers it from the chat counter, without reading the chat; MySQL only when
    /// the counter is missing.
    pub async fn existing_chat(&self, token: &Token, chat: u64) -> Result<u64, ApiError> {
        let (cached, exists) = self.queue.chat_exists(token.as_str(), chat).await?;
        let app_id = self.app_id_or_load(token, cached).await?;
        match exists {
            Some(true) => Ok(app_id),
            Some(false) => Err(ApiError::not_found("chat")),
            None => self
                .chat_and_app(token, chat)
                .await
                .map(|(_, app_id)| app_id),
        }
    }
}

fn admitted(queued: Enqueued) -> Result<(), ApiError> {
    match queued {
        Enqueued::Entry(_) => Ok(()),
        Enqueued::Full => Err(ApiError::Overloaded(Overload::Backlog)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(direction: Direction, cursor: Option<u64>, limit: u32) -> PageRequest {
        PageRequest {
            direction,
            cursor,
            limit,
        }
    }

    #[test]
    fn windows_cover_the_accepted_numbers_both_ways() {
        let asc = |c, l| request(Direction::Asc, c, l);
        let desc = |c, l| request(Direction::Desc, c, l);
        assert_eq!(asc(None, 3).window(10), Some((1, 3)));
        assert_eq!(asc(Some(8), 3).window(10), Some((9, 10)));
        assert_eq!(asc(Some(10), 3).window(10), None);
        assert_eq!(asc(None, 3).window(0), None);
        assert_eq!(desc(None, 3).window(10), Some((8, 10)));
        assert_eq!(desc(Some(3), 3).window(10), Some((1, 2)));
        assert_eq!(desc(Some(1), 3).window(10), None);
        assert_eq!(
            desc(Some(50), 3).window(10),
            Some((8, 10)),
            "a cursor past the end"
        );
    }

    #[test]
    fn pending_items_win_and_dead_letters_leave_a_hole() {
        let pending = [(2, "2 pending"), (4, "4 updated")].into_iter().collect();
        let rows = vec!["1 row", "4 row"];
        let number = |s: &&str| s[..1].parse::<u64>().unwrap();
        let page = merge(
            &request(Direction::Desc, None, 4),
            (1, 4),
            4,
            pending,
            rows,
            number,
        );
        assert_eq!(
            page.items,
            ["4 updated", "2 pending", "1 row"],
            "3 was dead-lettered"
        );
        assert_eq!(page.next, None);
        let page = merge(
            &request(Direction::Asc, None, 2),
            (1, 2),
            4,
            [(2, "2 pending")].into_iter().collect(),
            vec!["1 row"],
            number,
        );
        assert_eq!(
            (page.items, page.next),
            (vec!["1 row", "2 pending"], Some(2))
        );
    }
}
