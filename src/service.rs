//! The operations behind the chat and message endpoints: Redis first, MySQL as the
//! fallback and the truth. Handlers call these and only translate HTTP.

use std::future::Future;

use chrono::{DateTime, Utc};

use crate::domain::{Body, Title, Token};
use crate::error::{ApiError, Overload};
use crate::idempotency::{IdempotencyKey, NextAction, fingerprint};
use crate::resources::{Chat, Message, from_micros, now};
use crate::store::queue::{Allocation, Enqueued};
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
        let app_id = match found.app_id {
            Some(id) => id,
            None => self.load_application_id(token).await?,
        };
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
        let app_id = match found.app_id {
            Some(id) => id,
            None => self.load_application_id(token).await?,
        };
        if let Some(message) = found.pending {
            return Ok((message, app_id));
        }
        let message = mysql::message(&self.mysql, app_id, chat, number)
            .await?
            .ok_or_else(|| ApiError::not_found("message"))?;
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

fn admitted(queued: Enqueued) -> Result<(), ApiError> {
    match queued {
        Enqueued::Entry(_) => Ok(()),
        Enqueued::Full => Err(ApiError::Overloaded(Overload::Backlog)),
    }
}
