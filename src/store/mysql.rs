//! MySQL statements. All SQL of the service lives here, parameterised.

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::mysql::MySqlPool;
use sqlx::query_builder::Separated;
use sqlx::{FromRow, MySql, QueryBuilder, Transaction};

use crate::resources::{Application, Chat, Message};

#[derive(FromRow)]
struct ApplicationRow {
    token: String,
    name: String,
    chats_count: u64,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
}

impl From<ApplicationRow> for Application {
    fn from(r: ApplicationRow) -> Self {
        Self {
            token: r.token,
            name: r.name,
            chats_count: r.chats_count,
            created_at: r.created_at.and_utc(),
            updated_at: r.updated_at.and_utc(),
        }
    }
}

#[derive(FromRow)]
struct ChatRow {
    number: u64,
    title: Option<String>,
    messages_count: u64,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
}

impl From<ChatRow> for Chat {
    fn from(r: ChatRow) -> Self {
        Self {
            number: r.number,
            title: r.title,
            messages_count: r.messages_count,
            created_at: r.created_at.and_utc(),
            updated_at: r.updated_at.and_utc(),
        }
    }
}

#[derive(FromRow)]
struct MessageRow {
    chat_number: u64,
    number: u64,
    body: String,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
}

impl From<MessageRow> for Message {
    fn from(r: MessageRow) -> Self {
        Self {
            number: r.number,
            chat_number: r.chat_number,
            body: r.body,
            created_at: r.created_at.and_utc(),
            updated_at: r.updated_at.and_utc(),
        }
    }
}

fn naive(t: DateTime<Utc>) -> NaiveDateTime {
    t.naive_utc()
}

// ---- applications -------------------------------------------------------------------

pub async fn insert_application(db: &MySqlPool, app: &Application) -> sqlx::Result<u64> {
    let result = sqlx::query(
        "INSERT INTO applications (token, name, created_at, updated_at) VALUES (?, ?, ?, ?)",
    )
    .bind(&app.token)
    .bind(&app.name)
    .bind(naive(app.created_at))
    .bind(naive(app.updated_at))
    .execute(db)
    .await?;
    Ok(result.last_insert_id())
}

const APPLICATION_COLUMNS: &str = "token, name, chats_count, created_at, updated_at";

pub async fn application(db: &MySqlPool, token: &str) -> sqlx::Result<Option<Application>> {
    let row: Option<ApplicationRow> = sqlx::query_as(
        "SELECT token, name, chats_count, created_at, updated_at FROM applications WHERE token = ?",
    )
    .bind(token)
    .fetch_optional(db)
    .await?;
    Ok(row.map(Into::into))
}

pub async fn application_id(db: &MySqlPool, token: &str) -> sqlx::Result<Option<u64>> {
    sqlx::query_scalar("SELECT id FROM applications WHERE token = ?")
        .bind(token)
        .fetch_optional(db)
        .await
}

/// A page of applications in creation order. `after` is the token of the last one seen;
/// `None` when that token does not exist.
pub async fn applications_after(
    db: &MySqlPool,
    after: Option<&str>,
    limit: u32,
) -> sqlx::Result<Option<Vec<Application>>> {
    let after_id: u64 = match after {
        None => 0,
        Some(token) => match application_id(db, token).await? {
            Some(id) => id,
            None => return Ok(None),
        },
    };
    let sql =
        format!("SELECT {APPLICATION_COLUMNS} FROM applications WHERE id > ? ORDER BY id LIMIT ?");
    let rows: Vec<ApplicationRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(after_id)
        .bind(limit)
        .fetch_all(db)
        .await?;
    Ok(Some(rows.into_iter().map(Into::into).collect()))
}

/// Renames an application; returns the updated row, or `None` for an unknown token.
pub async fn rename_application(
    db: &MySqlPool,
    token: &str,
    name: &str,
    at: DateTime<Utc>,
) -> sqlx::Result<Option<Application>> {
    sqlx::query("UPDATE applications SET name = ?, updated_at = ? WHERE token = ?")
        .bind(name)
        .bind(naive(at))
        .bind(token)
        .execute(db)
        .await?;
    application(db, token).await
}

// ---- chats and messages: reads ------------------------------------------------------

pub async fn chat(db: &MySqlPool, app_id: u64, number: u64) -> sqlx::Result<Option<Chat>> {
    let row: Option<ChatRow> = sqlx::query_as(
        "SELECT number, title, messages_count, created_at, updated_at \
         FROM chats WHERE application_id = ? AND number = ?",
    )
    .bind(app_id)
    .bind(number)
    .fetch_optional(db)
    .await?;
    Ok(row.map(Into::into))
}

/// Up to `limit` messages of a chat whose current content was accepted after `version`,
/// with their versions, in version order (a subscriber resuming from its last event).
pub async fn messages_since(
    db: &MySqlPool,
    app_id: u64,
    chat: u64,
    version: u64,
    limit: u32,
) -> sqlx::Result<Vec<(u64, Message)>> {
    let rows: Vec<(u64, MessageRow)> = sqlx::query_as::<_, VersionedMessageRow>(
        "SELECT version, chat_number, number, body, created_at, updated_at FROM messages \
         WHERE application_id = ? AND chat_number = ? AND version > ? ORDER BY version LIMIT ?",
    )
    .bind(app_id)
    .bind(chat)
    .bind(version)
    .bind(limit)
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|r| (r.version, r.row))
    .collect();
    Ok(rows.into_iter().map(|(v, r)| (v, r.into())).collect())
}

#[derive(sqlx::FromRow)]
struct VersionedMessageRow {
    version: u64,
    #[sqlx(flatten)]
    row: MessageRow,
}

/// Which rows of a numbered list (chats of an application, messages of a chat) to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// Up to `limit` rows numbered above `after`, ascending.
    After { after: u64, limit: u32 },
    /// Up to `limit` rows numbered below `before`, descending.
    Before { before: u64, limit: u32 },
    /// The rows numbered `lo..=hi`, ascending: one range scan of the primary key.
    Between { lo: u64, hi: u64 },
}

impl Rows {
    /// The condition on `number`, its order and limit, and the two values to bind.
    fn clause(self) -> (&'static str, u64, u64) {
        match self {
            Self::After { after, limit } => (
                "number > ? ORDER BY number LIMIT ?",
                after,
                u64::from(limit),
            ),
            Self::Before { before, limit } => (
                "number < ? ORDER BY number DESC LIMIT ?",
                before,
                u64::from(limit),
            ),
            Self::Between { lo, hi } => ("number BETWEEN ? AND ? ORDER BY number", lo, hi),
        }
    }
}

/// Chats of an application, as `rows` says.
pub async fn chats_in(db: &MySqlPool, app_id: u64, rows: Rows) -> sqlx::Result<Vec<Chat>> {
    let (clause, a, b) = rows.clause();
    let sql = format!(
        "SELECT number, title, messages_count, created_at, updated_at \
         FROM chats WHERE application_id = ? AND {clause}"
    );
    let found: Vec<ChatRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(app_id)
        .bind(a)
        .bind(b)
        .fetch_all(db)
        .await?;
    Ok(found.into_iter().map(Into::into).collect())
}

/// Messages of a chat, as `rows` says.
pub async fn messages_in(
    db: &MySqlPool,
    app_id: u64,
    chat: u64,
    rows: Rows,
) -> sqlx::Result<Vec<Message>> {
    let (clause, a, b) = rows.clause();
    let sql = format!(
        "SELECT chat_number, number, body, created_at, updated_at FROM messages \
         WHERE application_id = ? AND chat_number = ? AND {clause}"
    );
    let found: Vec<MessageRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(app_id)
        .bind(chat)
        .bind(a)
        .bind(b)
        .fetch_all(db)
        .await?;
    Ok(found.into_iter().map(Into::into).collect())
}

/// Which messages of one chat to read: the numbers `lo..=hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageRange {
    pub app_id: u64,
    pub chat: u64,
    pub lo: u64,
    pub hi: u64,
}

#[derive(FromRow)]
struct OwnedMessageRow {
    application_id: u64,
    #[sqlx(flatten)]
    row: MessageRow,
}

/// The messages of several ranges (of any chats) in one statement, each with its
/// application's id, in no particular order. Every range is one interval of the primary
/// key, so this is one range scan per interval.
///
/// No `ORDER BY`: MariaDB 10.11 was seen answering it wrongly here, through the binary
/// protocol, with the rows of two single-row ranges of one application ordered by
/// `number` alone; the caller sorts.
pub async fn messages_in_ranges(
    db: &MySqlPool,
    ranges: &[MessageRange],
) -> sqlx::Result<Vec<(u64, Message)>> {
    let mut query = QueryBuilder::<MySql>::new(
        "SELECT application_id, chat_number, number, body, created_at, updated_at \
         FROM messages WHERE ",
    );
    for (i, r) in ranges.iter().enumerate() {
        if i > 0 {
            query.push(" OR ");
        }
        query
            .push("(application_id = ")
            .push_bind(r.app_id)
            .push(" AND chat_number = ")
            .push_bind(r.chat)
            .push(" AND number BETWEEN ")
            .push_bind(r.lo)
            .push(" AND ")
            .push_bind(r.hi)
            .push(")");
    }
    let rows: Vec<OwnedMessageRow> = query.build_query_as().fetch_all(db).await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.application_id, r.row.into()))
        .collect())
}

/// Highest persisted chat number of an application (0 when it has none).
pub async fn max_chat_number(db: &MySqlPool, app_id: u64) -> sqlx::Result<u64> {
    let max: Option<u64> =
        sqlx::query_scalar("SELECT MAX(number) FROM chats WHERE application_id = ?")
            .bind(app_id)
            .fetch_one(db)
            .await?;
    Ok(max.unwrap_or(0))
}

/// Highest persisted message number of a chat (0 when it has none).
pub async fn max_message_number(db: &MySqlPool, app_id: u64, chat: u64) -> sqlx::Result<u64> {
    let max: Option<u64> = sqlx::query_scalar(
        "SELECT MAX(number) FROM messages WHERE application_id = ? AND chat_number = ?",
    )
    .bind(app_id)
    .bind(chat)
    .fetch_one(db)
    .await?;
    Ok(max.unwrap_or(0))
}

// ---- chats and messages: the workers' writes ----------------------------------------

/// A chat as a queue entry carries it: the whole row at one version.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatWrite {
    pub app_id: u64,
    pub number: u64,
    pub title: Option<String>,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A message as a queue entry carries it: the whole row at one version.
#[derive(Clone, Debug, PartialEq)]
pub struct MessageWrite {
    pub app_id: u64,
    pub chat_number: u64,
    pub number: u64,
    pub body: String,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

// Last accepted write wins: a row changes only for a higher version. `version` is
// assigned last because MySQL evaluates the assignments left to right. `VALUES(col)`
// rather than the row alias syntax, which MariaDB does not accept.
const CHAT_UPSERT_TAIL: &str = " ON DUPLICATE KEY UPDATE \
    title = IF(VALUES(version) > version, VALUES(title), title), \
    updated_at = IF(VALUES(version) > version, VALUES(updated_at), updated_at), \
    version = GREATEST(version, VALUES(version))";

const MESSAGE_UPSERT_TAIL: &str = " ON DUPLICATE KEY UPDATE \
    body = IF(VALUES(version) > version, VALUES(body), body), \
    updated_at = IF(VALUES(version) > version, VALUES(updated_at), updated_at), \
    version = GREATEST(version, VALUES(version))";

/// One multi-row idempotent upsert of chats.
pub async fn upsert_chats<'a>(
    tx: &mut Transaction<'_, MySql>,
    chats: impl IntoIterator<Item = &'a ChatWrite>,
) -> sqlx::Result<()> {
    let insert =
        "INSERT INTO chats (application_id, number, title, version, created_at, updated_at) ";
    upsert(tx, insert, CHAT_UPSERT_TAIL, chats, |mut row, c| {
        row.push_bind(c.app_id)
            .push_bind(c.number)
            .push_bind(c.title.as_deref())
            .push_bind(c.version)
            .push_bind(naive(c.created_at))
            .push_bind(naive(c.updated_at));
    })
    .await
}

/// One multi-row idempotent upsert of messages.
pub async fn upsert_messages<'a>(
    tx: &mut Transaction<'_, MySql>,
    messages: impl IntoIterator<Item = &'a MessageWrite>,
) -> sqlx::Result<()> {
    let insert = "INSERT INTO messages \
        (application_id, chat_number, number, body, version, created_at, updated_at) ";
    upsert(tx, insert, MESSAGE_UPSERT_TAIL, messages, |mut row, m| {
        row.push_bind(m.app_id)
            .push_bind(m.chat_number)
            .push_bind(m.number)
            .push_bind(m.body.as_str())
            .push_bind(m.version)
            .push_bind(naive(m.created_at))
            .push_bind(naive(m.updated_at));
    })
    .await
}

/// `insert`, one row per item bound by `bind`, then `tail`: in statements of a few sizes
/// ([`statement_chunks`]), so that each size is prepared once per connection.
async fn upsert<'a, T: 'a>(
    tx: &mut Transaction<'_, MySql>,
    insert: &'static str,
    tail: &'static str,
    items: impl IntoIterator<Item = &'a T>,
    mut bind: impl FnMut(Separated<'_, MySql, &'static str>, &'a T),
) -> sqlx::Result<()> {
    let items: Vec<&T> = items.into_iter().collect();
    for chunk in statement_chunks(&items) {
        let mut query = QueryBuilder::<MySql>::new(insert);
        query.push_values(chunk.iter().copied(), &mut bind);
        query.push(tail);
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Most rows in one multi-row statement.
const MAX_ROWS_PER_STATEMENT: usize = 512;

/// Splits rows into statements of a power of two rows each (largest first, at most
/// [`MAX_ROWS_PER_STATEMENT`]): 100 rows go as 64, 32 and 4.
///
/// Each distinct number of rows is a distinct statement, which a connection prepares
/// (MySQL parses and plans it) before its first run and then keeps in its cache of
/// prepared statements. One statement per batch, of whatever size the batch had, made
/// MySQL prepare a new statement for nearly every batch at a steady load, where batches
/// are small and of every size: creates paced at 7,000/s cost MySQL 35 µs of CPU each
/// on average, 21 µs with statements from this short ladder, which a connection
/// prepares once each (`docs/BENCHMARKS.md`, "What the profiles showed", 17).
fn statement_chunks<T>(rows: &[T]) -> impl Iterator<Item = &[T]> {
    let mut left = rows;
    std::iter::from_fn(move || {
        let n = left.len().min(MAX_ROWS_PER_STATEMENT);
        if n == 0 {
            return None;
        }
        let size = 1 << n.ilog2();
        let (chunk, rest) = left.split_at(size);
        left = rest;
        Some(chunk)
    })
}

// ---- counts -------------------------------------------------------------------------

// A parent's count of persisted children is the highest persisted number: numbers are
// handed out without gaps and rows are never deleted, so once every accepted child is
// persisted, `MAX(number)` is the count, and before that it lies between the persisted
// count and the accepted one. `MAX` over the primary key's prefix is one B-tree descent,
// whatever the number of rows (`COUNT(*)` reads them all).
//
// The maxima are read with a plain `SELECT` (a consistent read, which takes no locks)
// and then written. Reading them inside the `UPDATE` would be a locking read: next-key
// locks on the last row and the gap after it, which block the persisting consumers'
// inserts into that parent and deadlocked with their batches under load. The maximum only
// grows, and `GREATEST` keeps a sync that read earlier from writing its figure over a
// later one; a row committed after the read marks its parent touched again (the worker
// marks parents after its commit), so the next sync includes it.

/// Parents refreshed per statement: two statements per this many parents.
pub const COUNT_SYNC_BATCH: usize = 500;

/// Raises `chats_count` of these applications to their highest persisted chat number.
pub async fn sync_chats_counts(db: &MySqlPool, apps: &[u64]) -> sqlx::Result<()> {
    let parents: Vec<[u64; 1]> = apps.iter().map(|app| [*app]).collect();
    sync_counts(db, &CHATS_COUNT, &parents).await
}

/// Raises `messages_count` of these chats (application id, chat number) to their highest
/// persisted message number.
pub async fn sync_messages_counts(db: &MySqlPool, chats: &[(u64, u64)]) -> sqlx::Result<()> {
    let parents: Vec<[u64; 2]> = chats.iter().map(|(app, chat)| [*app, *chat]).collect();
    sync_counts(db, &MESSAGES_COUNT, &parents).await
}

/// Where one kind of count lives: the parent's key columns and count, and the children's
/// columns that hold the parent's key. Fixed strings only: nothing here comes from input.
struct CountColumns<const N: usize> {
    parent_table: &'static str,
    parent_key: [&'static str; N],
    count: &'static str,
    child_table: &'static str,
    child_key: [&'static str; N],
}

const CHATS_COUNT: CountColumns<1> = CountColumns {
    parent_table: "applications",
    parent_key: ["id"],
    count: "chats_count",
    child_table: "chats",
    child_key: ["application_id"],
};

const MESSAGES_COUNT: CountColumns<2> = CountColumns {
    parent_table: "chats",
    parent_key: ["application_id", "number"],
    count: "messages_count",
    child_table: "messages",
    child_key: ["application_id", "chat_number"],
};

/// For each statement's worth of parents ([`statement_chunks`]): the lock-free read of
/// each parent's highest child number, then an `UPDATE` that raises every count to it.
async fn sync_counts<const N: usize>(
    db: &MySqlPool,
    columns: &CountColumns<N>,
    parents: &[[u64; N]],
) -> sqlx::Result<()> {
    for parents in statement_chunks(parents) {
        // SELECT k1, k2, (SELECT MAX(number) FROM child WHERE c1 = k1 AND c2 = k2) UNION ALL ...
        let mut read = QueryBuilder::<MySql>::new("");
        for (i, key) in parents.iter().enumerate() {
            read.push(if i > 0 {
                " UNION ALL SELECT "
            } else {
                "SELECT "
            });
            read.push("(SELECT MAX(number) FROM ")
                .push(columns.child_table)
                .push(" WHERE ");
            for (j, (column, value)) in columns.child_key.iter().zip(key).enumerate() {
                read.push(if j > 0 { " AND " } else { "" })
                    .push(*column)
                    .push(" = ")
                    .push_bind(*value);
            }
            read.push(")");
        }
        let maxima: Vec<Option<u64>> = read.build_query_scalar().fetch_all(db).await?;
        let found: Vec<(&[u64; N], u64)> = parents
            .iter()
            .zip(maxima)
            .filter_map(|(key, max)| Some((key, max?)))
            .collect();
        for found in statement_chunks(&found) {
            raise_counts(db, columns, found).await?;
        }
    }
    Ok(())
}

/// Raises each parent's count to the maximum found for it.
async fn raise_counts<const N: usize>(
    db: &MySqlPool,
    columns: &CountColumns<N>,
    found: &[(&[u64; N], u64)],
) -> sqlx::Result<()> {
    // UPDATE parent p JOIN (SELECT ? k0, ? k1, ? m UNION ALL ...) v ON p.key = v.k...
    // SET p.count = GREATEST(p.count, v.m)
    let mut write = QueryBuilder::<MySql>::new("UPDATE ");
    write.push(columns.parent_table).push(" p JOIN (");
    for (i, (key, max)) in found.iter().enumerate() {
        write.push(if i > 0 {
            " UNION ALL SELECT "
        } else {
            "SELECT "
        });
        for (j, value) in key.iter().enumerate() {
            write.push_bind(*value).push(format!(" AS k{j}, "));
        }
        write.push_bind(*max).push(" AS m");
    }
    write.push(") v ON ");
    for (j, column) in columns.parent_key.iter().enumerate() {
        write
            .push(if j > 0 { " AND " } else { "" })
            .push(format!("p.{column} = v.k{j}"));
    }
    write.push(format!(
        " SET p.{count} = GREATEST(p.{count}, v.m)",
        count = columns.count
    ));
    write.build().execute(db).await?;
    Ok(())
}

/// Raises `messages_count` of one chat (see [`sync_messages_counts`]).
pub async fn sync_messages_count(db: &MySqlPool, app_id: u64, chat: u64) -> sqlx::Result<()> {
    sync_messages_counts(db, &[(app_id, chat)]).await
}

pub async fn ping(db: &MySqlPool) -> sqlx::Result<()> {
    sqlx::query("SELECT 1").execute(db).await.map(drop)
}

// ---- reindexing ---------------------------------------------------------------------

/// Where a reindex has got to: the primary key of the last message read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MessageCursor {
    pub app_id: u64,
    pub chat: u64,
    pub number: u64,
}

/// A persisted message with its application's token, as the search index is fed from it.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexedMessage {
    pub token: String,
    pub chat: u64,
    pub number: u64,
    pub body: String,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(FromRow)]
struct IndexRow {
    application_id: u64,
    token: String,
    chat_number: u64,
    number: u64,
    body: String,
    version: u64,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
}

/// The next `limit` messages after `cursor` whose version is at least `min_version`, in
/// primary-key order, with their token. (The version filter reads the rows it skips: a
/// catch-up costs a scan of the table.) The cursor is spelled out as `OR`s: MariaDB does not
/// turn a row comparison `(a, b, c) > (?, ?, ?)` into a range of the primary key, so each
/// batch scanned from the table's start, and a reindex of n rows read O(n²) of them.
/// `STRAIGHT_JOIN` keeps `messages` the driving table: otherwise, on a large table, the
/// optimizer starts from `applications` and sorts every remaining message for each batch.
pub async fn messages_for_index(
    db: &MySqlPool,
    cursor: MessageCursor,
    min_version: u64,
    limit: u32,
) -> sqlx::Result<(Vec<IndexedMessage>, MessageCursor)> {
    let rows: Vec<IndexRow> = sqlx::query_as(
        "SELECT STRAIGHT_JOIN m.application_id, a.token, m.chat_number, m.number, m.body, \
                m.version, m.created_at, m.updated_at \
         FROM messages m JOIN applications a ON a.id = m.application_id \
         WHERE (m.application_id > ? OR (m.application_id = ? AND (m.chat_number > ? \
                OR (m.chat_number = ? AND m.number > ?)))) AND m.version >= ? \
         ORDER BY m.application_id, m.chat_number, m.number LIMIT ?",
    )
    .bind(cursor.app_id)
    .bind(cursor.app_id)
    .bind(cursor.chat)
    .bind(cursor.chat)
    .bind(cursor.number)
    .bind(min_version)
    .bind(limit)
    .fetch_all(db)
    .await?;
    let next = rows.last().map_or(cursor, |r| MessageCursor {
        app_id: r.application_id,
        chat: r.chat_number,
        number: r.number,
    });
    let docs = rows
        .into_iter()
        .map(|r| IndexedMessage {
            token: r.token,
            chat: r.chat_number,
            number: r.number,
            body: r.body,
            version: r.version,
            created_at: r.created_at.and_utc(),
            updated_at: r.updated_at.and_utc(),
        })
        .collect();
    Ok((docs, next))
}

pub async fn count_messages(db: &MySqlPool) -> sqlx::Result<u64> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages")
        .fetch_one(db)
        .await?;
    Ok(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_go_in_statements_of_a_few_sizes_covering_every_row_once() {
        let sizes = |n: usize| {
            let rows: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = statement_chunks(&rows).collect();
            assert_eq!(chunks.concat(), rows, "{n} rows");
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>()
        };
        assert!(sizes(0).is_empty());
        assert_eq!(sizes(1), [1]);
        assert_eq!(sizes(100), [64, 32, 4]);
        assert_eq!(sizes(1000), [512, 256, 128, 64, 32, 8]);
        assert_eq!(sizes(1100), [512, 512, 64, 8, 4]);
        let mut seen = std::collections::BTreeSet::new();
        for n in 0..=2000 {
            seen.extend(sizes(n));
        }
        assert_eq!(seen.len(), 10, "1, 2, 4, ... 512: {seen:?}");
    }
}
