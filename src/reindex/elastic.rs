//! `reindex` with Elasticsearch: a new version of the index is built from MySQL beside
//! the one in use, then the alias is switched over and the old version deleted.
//! Searches keep being answered by the old index until the switch, which is atomic; a
//! mapping change is applied this way.
//!
//! 1. The alias is looked up (an index that has the alias's name, made before aliases
//!    were used, is replaced by the switch). An index `<alias>-v<n>` that an earlier run
//!    left `building` is resumed from the cursor in its `_meta`; `--fresh` deletes it
//!    and starts over. Otherwise `<alias>-v<n+1>` is created, refreshes off.
//! 2. Every message is copied, in primary-key order; the cursor is saved in the index's
//!    `_meta` every few seconds.
//! 3. Messages written since the run began (their version is at least the one recorded
//!    at the start, less a margin) are copied again: live indexing was writing them to
//!    the old index meanwhile.
//! 4. Refreshes back on, then one `_aliases` call points the alias at the new index.
//! 5. After `--settle`, writes of that version or later are copied once more, for those
//!    that reached MySQL around the switch; then the old index is deleted.
//!
//! Transient failures (ES or MySQL unreachable, 429, 5xx) are retried with back-off;
//! past the last attempt the run stops, and running it again resumes.

use std::fmt::Display;
use std::future::Future;
use std::io::IsTerminal;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode};
use sqlx::MySqlPool;

use super::{Progress, connect_error};
use crate::search::elastic::ElasticIndex;
use crate::search::elastic::alias::{self, BuildState, Previous};
use crate::search::elastic::client::{Body, CallError};
use crate::search::{MessageDoc, SearchError};
use crate::startup::StartError;
use crate::store::mysql::{self, MessageCursor};
use crate::store::queue::version_of;

/// The build's cursor is saved this often.
const SAVE_EVERY: Duration = Duration::from_secs(5);
/// Versions come from Redis's clock, and a write can reach MySQL a while after it was
/// accepted: writes accepted up to this long before the run began are copied again too.
const SINCE_MARGIN: Duration = Duration::from_secs(600);
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// How a run behaves.
#[derive(Clone, Debug)]
pub struct Options {
    /// Start a new build even if an earlier run left one unfinished.
    pub fresh: bool,
    /// Calls made before a transient failure stops the run.
    pub attempts: u32,
    /// The first pause after a transient failure (doubling, up to 30 s).
    pub pause: Duration,
    /// Wait after the switch before the last copy of recent writes.
    pub settle: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            fresh: false,
            attempts: 10,
            pause: Duration::from_secs(1),
            settle: Duration::from_secs(30),
        }
    }
}

/// Whether a failure may pass by itself.
trait Transient: Display {
    fn transient(&self) -> bool;
}

impl Transient for CallError {
    fn transient(&self) -> bool {
        match self {
            CallError::Transport(_) => true,
            CallError::Status(status, _) => {
                *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
            }
        }
    }
}

impl Transient for SearchError {
    fn transient(&self) -> bool {
        matches!(self, SearchError::Unavailable(_))
    }
}

impl Transient for sqlx::Error {
    fn transient(&self) -> bool {
        crate::store::mysql_is_transient(self)
    }
}

async fn retry<T, E: Transient, F: Future<Output = Result<T, E>>>(
    what: &str,
    options: &Options,
    mut call: impl FnMut() -> F,
) -> Result<T, E> {
    let mut pause = options.pause;
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if e.transient() && attempt < options.attempts => {
                tracing::warn!(error = %e, attempt, retry_in = ?pause, "reindex: {what} failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn es_error(what: &str) -> impl Fn(CallError) -> StartError + '_ {
    move |e| StartError::Search(SearchError::Unavailable(format!("{what}: {e}")))
}

/// The lowest version of a write accepted since `SINCE_MARGIN` before now.
fn since_version() -> u64 {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let from = now_ms.saturating_sub(SINCE_MARGIN.as_millis() as u64);
    version_of(&format!("{from}-0")).unwrap_or(0)
}

pub async fn run(
    db: &MySqlPool,
    es: &ElasticIndex,
    batch: u32,
    options: Options,
) -> Result<(), StartError> {
    let client = es.client();
    let alias_name = es.alias();
    let previous = previous(es, &options).await?;
    let in_use: Vec<String> = match &previous {
        Previous::Indices(indices) => indices.clone(),
        Previous::LegacyIndex => Vec::new(),
    };
    let versions = retry("listing the indices", &options, || {
        alias::versions(client, alias_name)
    })
    .await
    .map_err(es_error("listing the indices"))?;
    let mut resumable = None;
    for version in versions.iter().filter(|v| !in_use.contains(&v.name)) {
        let building = version.build.as_ref().filter(|b| b.state == "building");
        match building {
            Some(state)
                if !options.fresh
                    && version.mapping == crate::search::elastic::mapping::MAPPING_VERSION =>
            {
                resumable = Some((version.name.clone(), state.clone()));
            }
            _ => {
                // Left by an earlier run (abandoned, or switched away from).
                tracing::info!(index = %version.name, "reindex: deleting an index not in use");
                retry("deleting an index", &options, || {
                    alias::delete(client, &version.name)
                })
                .await
                .map_err(es_error("deleting an index not in use"))?;
            }
        }
    }
    let (target, mut state) = match resumable {
        Some((name, state)) => {
            tracing::info!(index = %name, copied = state.copied, "reindex: resuming");
            (name, state)
        }
        None => {
            let next = versions.last().map_or(1, |v| v.number + 1);
            let name = alias::versioned(alias_name, next);
            let state = BuildState {
                state: "building".into(),
                since_version: since_version(),
                ..BuildState::default()
            };
            retry("creating the index", &options, || {
                alias::create_for_build(client, &name, &state)
            })
            .await
            .map_err(es_error("creating the new index"))?;
            tracing::info!(index = %name, alias = %alias_name, "reindex: building a new index");
            (name, state)
        }
    };

    // 2. Every message.
    let total = retry("counting messages", &options, || mysql::count_messages(db))
        .await
        .map_err(connect_error)?;
    let mut progress = Progress::new(total, state.copied, std::io::stderr().is_terminal());
    let mut refused = 0u64;
    let mut saved = Instant::now();
    loop {
        let cursor = state.cursor();
        let (docs, next) = retry("reading messages", &options, || {
            mysql::messages_for_index(db, cursor, 0, batch)
        })
        .await
        .map_err(connect_error)?;
        if docs.is_empty() {
            break;
        }
        refused += copy(es, &target, &docs, &options).await?;
        state.set_cursor(&next);
        state.copied += docs.len() as u64;
        progress.advance(docs.len() as u64);
        if saved.elapsed() >= SAVE_EVERY {
            save(es, &target, &state, &options).await?;
            saved = Instant::now();
        }
    }
    save(es, &target, &state, &options).await?;

    // 3. What was written meanwhile.
    refused += copy_since(db, es, &target, state.since_version, batch, &options).await?;

    // 4. The switch.
    retry("opening the index for search", &options, || {
        alias::open_for_search(client, &target)
    })
    .await
    .map_err(es_error("turning refreshes back on"))?;
    retry("switching the alias", &options, || {
        alias::switch(client, alias_name, &previous, &target)
    })
    .await
    .map_err(es_error("switching the alias"))?;
    tracing::info!(alias = %alias_name, index = %target, "reindex: the alias now points at the new index");
    state.state = "complete".into();
    save(es, &target, &state, &options).await?;

    // 5. Writes that reached MySQL around the switch, then the old index goes.
    tokio::time::sleep(options.settle).await;
    refused += copy_since(db, es, &target, state.since_version, batch, &options).await?;
    for old in in_use.iter().filter(|index| **index != target) {
        retry("deleting the old index", &options, || {
            alias::delete(client, old)
        })
        .await
        .map_err(es_error("deleting the old index"))?;
        tracing::info!(index = %old, "reindex: old index deleted");
    }
    progress.finish("elasticsearch");
    if refused > 0 {
        tracing::error!(
            refused,
            "reindex: Elasticsearch refused some messages (each one logged above, with the reason)"
        );
    }
    Ok(())
}

/// What the alias points at; an alias is made first if there is none (nor an index of
/// that name), so that there is always something to switch from.
async fn previous(es: &ElasticIndex, options: &Options) -> Result<Previous, StartError> {
    let client = es.client();
    let indices = retry("looking up the alias", options, || {
        alias::indices_of(client, es.alias())
    })
    .await
    .map_err(es_error("looking up the alias"))?;
    if !indices.is_empty() {
        return Ok(Previous::Indices(indices));
    }
    let legacy = retry("looking up the index", options, || async {
        match client.call(Method::HEAD, es.alias(), Body::None).await {
            Ok(_) => Ok(true),
            Err(CallError::Status(StatusCode::NOT_FOUND, _)) => Ok(false),
            Err(e) => Err(e),
        }
    })
    .await
    .map_err(es_error("looking up the index"))?;
    if legacy {
        tracing::info!(index = %es.alias(), "reindex: an index has the alias's name; it will be replaced");
        return Ok(Previous::LegacyIndex);
    }
    retry("creating the alias", options, || es.ensure_alias()).await?;
    let indices = retry("looking up the alias", options, || {
        alias::indices_of(client, es.alias())
    })
    .await
    .map_err(es_error("looking up the alias"))?;
    Ok(Previous::Indices(indices))
}

async fn save(
    es: &ElasticIndex,
    target: &str,
    state: &BuildState,
    options: &Options,
) -> Result<(), StartError> {
    retry("saving progress", options, || {
        alias::save_state(es.client(), target, state)
    })
    .await
    .map_err(es_error("saving progress"))
}

/// Writes `docs` into `target`; returns how many were refused (each is logged).
async fn copy(
    es: &ElasticIndex,
    target: &str,
    docs: &[MessageDoc],
    options: &Options,
) -> Result<u64, StartError> {
    let refused = retry("indexing", options, || es.write(target, docs, false)).await?;
    for r in &refused {
        if let Some(doc) = docs.get(r.position) {
            r.log(&doc.token, doc.chat, doc.number);
        }
    }
    Ok(refused.len() as u64)
}

/// Copies the messages whose version is at least `since`.
async fn copy_since(
    db: &MySqlPool,
    es: &ElasticIndex,
    target: &str,
    since: u64,
    batch: u32,
    options: &Options,
) -> Result<u64, StartError> {
    let mut cursor = MessageCursor::default();
    let (mut copied, mut refused) = (0u64, 0u64);
    loop {
        let (docs, next) = retry("reading recent messages", options, || {
            mysql::messages_for_index(db, cursor, since, batch)
        })
        .await
        .map_err(connect_error)?;
        if docs.is_empty() {
            break;
        }
        refused += copy(es, target, &docs, options).await?;
        copied += docs.len() as u64;
        cursor = next;
    }
    tracing::info!(
        messages = copied,
        "reindex: messages written during the run copied again"
    );
    Ok(refused)
}
