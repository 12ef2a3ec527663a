//! `chat-system reindex`: rebuilds the search index from MySQL, the system of record.
//!
//! Messages are read in primary-key order, a batch at a time, and indexed with the
//! version of their row, so a re-run (or a run alongside live indexing) never replaces a
//! newer document with an older one.
//!
//! * Embedded index: the documents are written in place (the process holding the index
//!   writer must be stopped first).
//! * Elasticsearch: a new version of the index is built beside the one in use, then the
//!   alias is switched over and the old index deleted ([`elastic`]); searches and live
//!   indexing go on throughout.
//!
//! Progress is shown as a bar on a terminal and as log lines elsewhere ([`progress`]).

mod elastic;
mod progress;

use std::io::IsTerminal;

use sqlx::MySqlPool;

use crate::search::Search;
use crate::startup::StartError;
use crate::store::mysql::{self, MessageCursor};

pub use elastic::Options;
use progress::Progress;

/// [`run_with`] the default options.
pub async fn run(db: &MySqlPool, search: &Search, batch: u32) -> Result<(), StartError> {
    run_with(db, search, batch, Options::default()).await
}

pub async fn run_with(
    db: &MySqlPool,
    search: &Search,
    batch: u32,
    options: Options,
) -> Result<(), StartError> {
    match search {
        Search::Elastic(es) => elastic::run(db, es, batch, options).await,
        Search::Embedded(_) => in_place(db, search, batch).await,
    }
}

/// Rewrites every message into the index in use.
async fn in_place(db: &MySqlPool, search: &Search, batch: u32) -> Result<(), StartError> {
    if !search.can_index() {
        return Err(StartError::Search(crate::search::SearchError::Failed(
            "another process holds the index writer; stop it and re-run".into(),
        )));
    }
    let total = mysql::count_messages(db).await.map_err(connect_error)?;
    let mut progress = Progress::new(total, 0, std::io::stderr().is_terminal());
    let mut cursor = MessageCursor::default();
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
        progress.advance(n);
    }
    progress.finish(search.name());
    Ok(())
}

fn connect_error(source: sqlx::Error) -> StartError {
    StartError::Connect(crate::store::ConnectError::Mysql {
        url: "DATABASE_URL".into(),
        source,
    })
}
