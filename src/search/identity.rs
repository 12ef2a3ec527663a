//! Which embedded index is *the* index: an embedded index lives on one host's disk, and
//! is fed by one consumer group of the write queue. A second host's index would hold
//! only what its own writer read, and its API would answer from it without a word.
//!
//! So each index directory carries an identity, a random id in its file [`ID_FILE`], and
//! the index group publishes the id of the index it feeds, in Redis:
//!
//! * a process that takes an index's writer *claims* the group for its index: it becomes
//!   the published one if none is, and if another is, this process gives the writer back
//!   and never reads from the group (it retries as a standby, and is refused again);
//! * a process serves searches from its directory only while the directory's id is the
//!   published one; otherwise searches answer 503 and `/readyz` says `foreign_index`;
//! * `chat-system reindex` rebuilds an index from MySQL and then publishes its id,
//!   whatever was published before: that is how an index moves, or is replaced.
//!
//! Several hosts use Elasticsearch, which every host reaches.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use crate::store::queue::RedisConn;

use super::SearchError;

/// The file of an index directory that holds its id.
pub const ID_FILE: &str = "index-id";

/// How long a verdict on the identity is trusted before Redis is asked again: a
/// replaced index stops being served within this time, at one read per process.
const RECHECK: Duration = Duration::from_secs(1);

/// Where the index group publishes the id of its index.
#[derive(Clone)]
pub struct IndexGroup {
    conn: RedisConn,
    key: String,
}

impl IndexGroup {
    /// The group whose published id is at `key` (`Keys::search_index_id`).
    pub fn new(conn: RedisConn, key: String) -> Self {
        Self { conn, key }
    }

    /// The published id, if any.
    pub async fn published(&self) -> Result<Option<String>, SearchError> {
        self.conn.clone().get(&self.key).await.map_err(redis_down)
    }

    /// Publishes `id` unless another is; returns the id published now.
    async fn claim(&self, id: &str) -> Result<Option<String>, SearchError> {
        let mut conn = self.conn.clone();
        let _: bool = conn.set_nx(&self.key, id).await.map_err(redis_down)?;
        self.published().await
    }

    /// Publishes `id`, replacing whatever was published.
    async fn publish(&self, id: &str) -> Result<(), SearchError> {
        self.conn
            .clone()
            .set(&self.key, id)
            .await
            .map_err(redis_down)
    }
}

fn redis_down(e: redis::RedisError) -> SearchError {
    SearchError::Unavailable(format!("cannot read the search index's identity: {e}"))
}

/// The id in `dir`, if it has one.
pub fn local_id(dir: &Path) -> Result<Option<String>, SearchError> {
    match std::fs::read_to_string(dir.join(ID_FILE)) {
        Ok(text) => Ok(Some(text.trim().to_owned()).filter(|id| !id.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SearchError::Failed(format!(
            "cannot read {}: {e}",
            dir.join(ID_FILE).display()
        ))),
    }
}

/// The id in `dir`, made now if it has none (only the writer's process does this).
fn ensure_local_id(dir: &Path) -> Result<String, SearchError> {
    if let Some(id) = local_id(dir)? {
        return Ok(id);
    }
    let failed = |e: &dyn std::fmt::Display| {
        SearchError::Failed(format!("cannot write {}: {e}", dir.join(ID_FILE).display()))
    };
    let id = format!(
        "{:016x}{:016x}",
        getrandom::u64().map_err(|e| failed(&e))?,
        getrandom::u64().map_err(|e| failed(&e))?
    );
    // Written aside and renamed: a reader never sees half an id.
    let aside = dir.join(format!("{ID_FILE}.new"));
    let mut file = std::fs::File::create(&aside).map_err(|e| failed(&e))?;
    file.write_all(id.as_bytes()).map_err(|e| failed(&e))?;
    file.sync_all().map_err(|e| failed(&e))?;
    std::fs::rename(&aside, dir.join(ID_FILE)).map_err(|e| failed(&e))?;
    Ok(id)
}

/// What was found when this directory's id was compared with the published one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The directory holds the published index.
    Ours,
    /// It does not; the text says what was found, for logs.
    Foreign(String),
}

/// An index directory's membership of its index group.
pub struct Membership {
    dir: PathBuf,
    group: IndexGroup,
    /// The last verdict and when it was reached.
    last: Mutex<Option<(Instant, Verdict)>>,
}

impl Membership {
    pub fn new(dir: PathBuf, group: IndexGroup) -> Self {
        Self {
            dir,
            group,
            last: Mutex::new(None),
        }
    }

    fn remember(&self, verdict: Verdict) -> Verdict {
        if let Ok(mut last) = self.last.lock() {
            let changed = last.as_ref().is_none_or(|(_, v)| *v != verdict);
            if changed && let Verdict::Foreign(why) = &verdict {
                tracing::error!(
                    dir = %self.dir.display(),
                    "search refused: {why}; an embedded index serves one host, several \
                     hosts use Elasticsearch (ELASTICSEARCH_URL)"
                );
            }
            metrics::gauge!("search_index_foreign").set(match verdict {
                Verdict::Ours => 0.0,
                Verdict::Foreign(_) => 1.0,
            });
            *last = Some((Instant::now(), verdict.clone()));
        }
        verdict
    }

    fn foreign(&self, local: Option<&str>, published: Option<&str>) -> Verdict {
        let dir = self.dir.display();
        Verdict::Foreign(match (local, published) {
            (None, _) => format!("{dir} holds no index id: no index writer wrote it"),
            (Some(local), None) => {
                format!("{dir} holds index {local}, and no index writer has published one yet")
            }
            (Some(local), Some(published)) => format!(
                "{dir} holds index {local}, not index {published}, which the index writer \
                 publishes"
            ),
        })
    }

    /// Compares the directory's id with the published one (at most once per
    /// [`RECHECK`]; a verdict reached before stays while Redis cannot be read).
    pub async fn verdict(&self) -> Result<Verdict, SearchError> {
        let cached = self.last.lock().ok().and_then(|last| last.clone());
        if let Some((at, verdict)) = &cached
            && at.elapsed() < RECHECK
        {
            return Ok(verdict.clone());
        }
        let local = local_id(&self.dir)?;
        let published = match self.group.published().await {
            Ok(published) => published,
            Err(e) => return cached.map(|(_, v)| v).ok_or(e),
        };
        Ok(self.remember(match (&local, &published) {
            (Some(l), Some(p)) if l == p => Verdict::Ours,
            _ => self.foreign(local.as_deref(), published.as_deref()),
        }))
    }

    /// Claims the group for this directory's index (giving it an id if it has none):
    /// [`Verdict::Ours`] when it is, or now is, the published one.
    pub async fn claim(&self) -> Result<Verdict, SearchError> {
        let dir = self.dir.clone();
        let local = tokio::task::spawn_blocking(move || ensure_local_id(&dir))
            .await
            .map_err(|e| SearchError::Failed(e.to_string()))??;
        let published = self.group.claim(&local).await?;
        Ok(
            self.remember(if published.as_deref() == Some(local.as_str()) {
                Verdict::Ours
            } else {
                self.foreign(Some(&local), published.as_deref())
            }),
        )
    }

    /// Publishes this directory's index (giving it an id if it has none), replacing
    /// whatever was published.
    pub async fn adopt(&self) -> Result<String, SearchError> {
        let dir = self.dir.clone();
        let local = tokio::task::spawn_blocking(move || ensure_local_id(&dir))
            .await
            .map_err(|e| SearchError::Failed(e.to_string()))??;
        self.group.publish(&local).await?;
        self.remember(Verdict::Ours);
        Ok(local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_gets_one_id_and_keeps_it() {
        let dir = std::env::temp_dir().join(format!("identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(local_id(&dir).unwrap(), None);
        let id = ensure_local_id(&dir).unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(ensure_local_id(&dir).unwrap(), id);
        assert_eq!(local_id(&dir).unwrap(), Some(id));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
