//! The public resources, exactly as the OpenAPI document (docs/openapi.json) shows them.
//! No internal id appears here.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Application {
    /// The application's secret handle, used in every URL under it.
    #[schema(example = "b3JkZXJzLWFyZS1yYW5kb20tYnl0ZXMx")]
    pub token: String,
    pub name: String,
    /// Number of persisted chats; refreshed every `COUNTS_SYNC_INTERVAL`.
    pub chats_count: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct Chat {
    /// 1, 2, 3, ... within the application.
    #[schema(minimum = 1)]
    pub number: u64,
    pub title: Option<String>,
    /// Number of persisted messages; refreshed every `COUNTS_SYNC_INTERVAL`.
    pub messages_count: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct Message {
    /// 1, 2, 3, ... within the chat.
    #[schema(minimum = 1)]
    pub number: u64,
    /// The number of the chat it belongs to.
    #[schema(minimum = 1)]
    pub chat_number: u64,
    pub body: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Microseconds since the epoch, the unit timestamps travel in through Redis.
pub fn to_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub fn from_micros(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
}

/// Now, truncated to the microsecond precision MySQL stores, so a record read back
/// from MySQL equals the one served from Redis before it was persisted.
pub fn now() -> DateTime<Utc> {
    from_micros(to_micros(Utc::now())).unwrap_or_else(Utc::now)
}
