//! `chat-system reindex`: rebuilds the search index from MySQL, the system of record.
//!
//! Messages are read in primary-key order, a batch at a time, and indexed with the
//! version of their row, so a re-run (or a run alongside live indexing) never replaces a
//! newer document with an older one.

use indicatif::{ProgressBar, ProgressStyle};
use sqlx::MySqlPool;

use crate::search::Search;
use crate::startup::StartError;
use crate::store::mysql::{self, MessageCursor};

pub async fn run(db: &MySqlPool, search: &Search, batch: u32) -> Result<(), StartError> {
    if !search.can_index() {
        return Err(StartError::Search(crate::search::SearchError::Failed(
            "another process holds the index writer; stop it and re-run".into(),
        )));
    }
    let total = mysql::count_messages(db).await.map_err(connect_error)?;
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} messages ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut cursor = MessageCursor::default();
    let mut done = 0u64;
    loop {
        let (docs, next) = mysql::messages_for_index(db, cursor, 0, batch)
            .await
            .map_err(connect_error)?;
        if docs.is_empty() {
            break;
        }
        let n = docs.len() as u64;
        search.index(docs).await?;
        cursor = next;
        done += n;
        bar.set_position(done);
    }
    bar.finish();
    tracing::info!(messages = done, backend = search.name(), "reindex complete");
    Ok(())
}

fn connect_error(source: sqlx::Error) -> StartError {
    StartError::Connect(crate::store::ConnectError::Mysql {
        url: "DATABASE_URL".into(),
        source,
    })
}
