//! The Elasticsearch 8 backend: a thin adapter over the documented REST API.
//!
//! It is written on `reqwest` and serde rather than the `elasticsearch` crate, which has
//! only ever published alpha releases; the calls used here are few, small and stable.
//!
//! * Connection: HTTPS with a CA bundle, API key or Basic authentication, timeouts
//!   ([`client`]).
//! * Storage: an alias (`ELASTICSEARCH_INDEX`, `messages` by default) in front of a
//!   versioned index (`messages-v1`, `messages-v2`, ...). Every read and write goes
//!   through the alias, and writes set `require_alias`, so ES never auto-creates an
//!   index with a guessed mapping (a `body` of type `text` would silently break substring
//!   search). `chat-system reindex` builds the next version and switches the alias
//!   ([`alias`]). What is indexed and how it is queried: [`mapping`].
//! * Writes: `_bulk`, capped in bytes, one outcome per document ([`bulk`]): written (or
//!   already newer: 409) is done; 429 and 5xx are sent again, those documents only, after
//!   a pause; a document refused for its content is returned to the caller with ES's
//!   reason; anything that concerns the whole index (closed, write-blocked, missing,
//!   forbidden) fails the call as unavailable, so that no document is given up on.
//! * Reads: any failure, ES's error answers included, is "unavailable" (503 to the
//!   client, the cause in the log); so is an answer with failed shards, which would
//!   otherwise be a silent partial result.
//! * Readiness: the alias exists and a search through it answers, which needs only the
//!   privileges the service has anyway (no cluster privilege such as `monitor`).

pub mod alias;
pub mod bulk;
pub mod client;
pub mod mapping;
pub mod verify;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use self::bulk::Outcome;
use self::client::{Body, CallError, Client, Connection};
use super::{MessageDoc, Refused, SearchError, SearchQuery};

/// How documents answered with 429 or 5xx are sent again within one call: after
/// `first`, then twice as long each time (at most [`MAX_PAUSE`]), `attempts` sends in
/// all. Past that the call fails as unavailable and the caller retries it later.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    pub first: Duration,
    pub attempts: u32,
}

const MAX_PAUSE: Duration = Duration::from_secs(5);

impl Default for Retry {
    fn default() -> Self {
        // 0.2 + 0.4 + 0.8 + 1.6 s: long enough for a rejected-execution spike to pass,
        // short enough that a real outage goes back to the worker's own back-off.
        Self {
            first: Duration::from_millis(200),
            attempts: 5,
        }
    }
}

pub struct ElasticIndex {
    client: Client,
    alias: String,
    bulk_max_bytes: u64,
    retry: Retry,
    /// The alias is known to exist. Until then, every call makes sure of it first.
    ready: AtomicBool,
}

fn unavailable(context: &str, e: impl std::fmt::Display) -> SearchError {
    SearchError::Unavailable(format!("{context}: {e}"))
}

impl ElasticIndex {
    /// Connects and, when no alias exists yet, creates the first index behind it. With
    /// Elasticsearch unreachable or refusing, it starts anyway (persistence must not
    /// wait for search) and tries again on first use; a configuration that can never
    /// work (a bad URL, an unreadable key) is fatal.
    pub async fn connect(connection: &Connection, alias: &str) -> Result<Self, SearchError> {
        let client = Client::new(connection).map_err(|e| SearchError::Failed(e.to_string()))?;
        let this = Self {
            client,
            alias: alias.to_owned(),
            bulk_max_bytes: connection.config.elasticsearch_bulk_max_bytes,
            retry: Retry::default(),
            ready: AtomicBool::new(false),
        };
        match this.ensure_alias().await {
            Err(SearchError::Unavailable(e)) => {
                tracing::warn!(error = %e, "elasticsearch not usable yet; will retry on first use");
                Ok(this)
            }
            other => other.map(|()| this),
        }
    }

    /// Changes how 429 and 5xx answers are retried (tests use short pauses).
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    pub fn alias(&self) -> &str {
        &self.alias
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Makes sure the alias exists: creates `<alias>-v1` with it when there is neither
    /// alias nor index of that name.
    pub async fn ensure_alias(&self) -> Result<(), SearchError> {
        if self.ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let found = match alias::indices_of(&self.client, &self.alias).await {
            Ok(indices) => !indices.is_empty(),
            Err(e) => return Err(unavailable("looking up the alias", e)),
        };
        if !found {
            match self
                .client
                .call(Method::HEAD, &self.alias, Body::None)
                .await
            {
                Ok(_) => {
                    return Err(SearchError::Unavailable(format!(
                        "`{0}` is an index, not an alias: run `chat-system reindex` once to \
                         move it behind the alias `{0}`",
                        self.alias
                    )));
                }
                Err(CallError::Status(StatusCode::NOT_FOUND, _)) => {}
                Err(e) => return Err(unavailable("looking up the index", e)),
            }
            self.create_first_index().await?;
        }
        self.check_mapping().await?;
        self.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn create_first_index(&self) -> Result<(), SearchError> {
        let index = alias::versioned(&self.alias, 1);
        let definition = mapping::index_definition(
            json!({ &self.alias: { "is_write_index": true } }),
            json!({ "state": "complete" }),
        );
        match self
            .client
            .call(Method::PUT, &index, Body::Json(definition))
            .await
        {
            Ok(_) => {
                tracing::info!(%index, alias = %self.alias, "elasticsearch index created");
                Ok(())
            }
            // Another process made it meanwhile; whether it carries the alias is checked
            // on the next use.
            Err(CallError::Status(_, reason))
                if reason.starts_with("resource_already_exists_exception") =>
            {
                let indices = alias::indices_of(&self.client, &self.alias)
                    .await
                    .map_err(|e| unavailable("looking up the alias", e))?;
                if indices.is_empty() {
                    return Err(SearchError::Unavailable(format!(
                        "index `{index}` exists without the alias `{}`: run `chat-system reindex`",
                        self.alias
                    )));
                }
                Ok(())
            }
            Err(CallError::Status(status, reason))
                if status.is_client_error()
                    && !matches!(status.as_u16(), 401 | 403 | 408 | 429) =>
            {
                Err(SearchError::Failed(format!(
                    "Elasticsearch refuses the definition of `{index}`: {reason}"
                )))
            }
            Err(e) => Err(unavailable("creating the index", e)),
        }
    }

    /// Warns when the indices behind the alias were made with an older mapping, after
    /// adding the fields that are new (adding fields is allowed in place; the documents
    /// already there get them only from `reindex`).
    async fn check_mapping(&self) -> Result<(), SearchError> {
        let mappings = self
            .client
            .json(Method::GET, &format!("{}/_mapping", self.alias), Body::None)
            .await
            .map_err(|e| unavailable("reading the mapping", e))?;
        let old: Vec<&String> = mappings
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, m)| alias::mapping_version(m) < mapping::MAPPING_VERSION)
            .map(|(index, _)| index)
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        self.client
            .call(
                Method::PUT,
                &format!("{}/_mapping", self.alias),
                Body::Json(json!({ "properties": mapping::properties() })),
            )
            .await
            .map_err(|e| unavailable("adding the new fields to the mapping", e))?;
        tracing::warn!(
            indices = ?old,
            alias = %self.alias,
            "the index was made by an older version: messages indexed before are not found \
             by every search until `chat-system reindex` rebuilds it"
        );
        Ok(())
    }

    /// Adds or replaces documents through the alias. Returns those refused for good,
    /// with ES's reason; fails (as unavailable) when the rest could not all be written.
    pub async fn add(&self, docs: &[MessageDoc]) -> Result<Vec<Refused>, SearchError> {
        self.ensure_alias().await?;
        self.write(&self.alias, docs, true).await
    }

    /// [`ElasticIndex::add`] to any index or alias: `reindex` fills a new index directly.
    pub async fn write(
        &self,
        target: &str,
        docs: &[MessageDoc],
        require_alias: bool,
    ) -> Result<Vec<Refused>, SearchError> {
        let texts: Vec<String> = docs.iter().map(|d| bulk::encode(target, d)).collect();
        let sizes: Vec<usize> = texts.iter().map(String::len).collect();
        let path = if require_alias {
            "_bulk?require_alias=true"
        } else {
            "_bulk"
        };
        let mut pending: Vec<usize> = (0..docs.len()).collect();
        let mut refused = Vec::new();
        let mut pause = self.retry.first;
        for attempt in 1.. {
            let mut results = Vec::with_capacity(pending.len());
            for chunk in bulk::chunks(&pending, &sizes, self.bulk_max_bytes) {
                self.send(path, chunk, &texts, &mut results).await?;
            }
            let mut again = Vec::new();
            let mut last_reason = String::new();
            for (position, outcome) in results {
                match outcome {
                    Outcome::Done => {}
                    Outcome::Retry(reason) => {
                        again.push(position);
                        last_reason = reason;
                    }
                    Outcome::Refused(reason) => refused.push(Refused {
                        position,
                        reason: redact(&reason, &docs[position].token),
                    }),
                    Outcome::Blocked(reason) => {
                        return Err(SearchError::Unavailable(format!(
                            "Elasticsearch refuses writes to `{target}`: {}",
                            redact(&reason, &docs[position].token)
                        )));
                    }
                }
            }
            if again.is_empty() {
                break;
            }
            if attempt >= self.retry.attempts {
                return Err(SearchError::Unavailable(format!(
                    "{} documents still refused after {attempt} attempts, last: {}",
                    again.len(),
                    redact(&last_reason, &docs[again[0]].token)
                )));
            }
            metrics::counter!("search_bulk_retries_total").increment(again.len() as u64);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
            pending = again;
        }
        if !refused.is_empty() {
            metrics::counter!("search_documents_refused_total").increment(refused.len() as u64);
        }
        Ok(refused)
    }

    /// Sends `chunk` as one request, halving it on a 413 until ES takes it.
    async fn send(
        &self,
        path: &str,
        chunk: Vec<usize>,
        texts: &[String],
        results: &mut Vec<(usize, Outcome)>,
    ) -> Result<(), SearchError> {
        let mut parts = vec![chunk];
        while let Some(part) = parts.pop() {
            let body: String = part.iter().map(|&p| texts[p].as_str()).collect();
            match self
                .client
                .call(Method::POST, path, Body::Ndjson(body))
                .await
            {
                Ok(answer) => {
                    let outcomes = answer
                        .json()
                        .map_err(|e| e.to_string())
                        .and_then(|v| bulk::read_items(&v, part.len()))
                        .map_err(|e| unavailable("bulk answer", e))?;
                    results.extend(part.into_iter().zip(outcomes));
                }
                Err(CallError::Status(StatusCode::PAYLOAD_TOO_LARGE, reason)) => {
                    if part.len() == 1 {
                        results.push((
                            part[0],
                            Outcome::Refused(format!(
                                "413 larger than Elasticsearch accepts \
                                 (http.max_content_length): {reason}"
                            )),
                        ));
                    } else {
                        metrics::counter!("search_bulk_splits_total").increment(1);
                        let mut first = part;
                        let second = first.split_off(first.len() / 2);
                        // Last pushed, first sent: the documents keep their order.
                        parts.push(second);
                        parts.push(first);
                    }
                }
                Err(CallError::Status(status, reason))
                    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() =>
                {
                    let outcome = Outcome::Retry(format!("{status} {reason}"));
                    results.extend(part.into_iter().map(|p| (p, outcome.clone())));
                }
                Err(e) => return Err(unavailable("bulk request", e)),
            }
        }
        Ok(())
    }

    pub async fn search(&self, query: &SearchQuery) -> Result<Vec<MessageDoc>, SearchError> {
        self.ensure_alias().await?;
        self.search_in(&self.alias, query).await
    }

    /// [`ElasticIndex::search`] in any index or alias.
    pub async fn search_in(
        &self,
        target: &str,
        query: &SearchQuery,
    ) -> Result<Vec<MessageDoc>, SearchError> {
        let answer = self
            .client
            .json(
                Method::POST,
                &format!("{target}/_search"),
                Body::Json(mapping::search_body(query)),
            )
            .await
            .map_err(|e| unavailable("search", redact(&e.to_string(), &query.token)))?;
        let parsed: SearchResponse =
            serde_json::from_value(answer).map_err(|e| unavailable("search answer", e))?;
        if parsed.timed_out || parsed.shards.failed > 0 {
            return Err(SearchError::Unavailable(format!(
                "search answered from {} of {} shards (timed out: {})",
                parsed.shards.successful, parsed.shards.total, parsed.timed_out
            )));
        }
        Ok(parsed
            .hits
            .hits
            .into_iter()
            .map(|h| MessageDoc {
                token: h.source.token,
                chat: h.source.chat,
                number: h.source.number,
                body: h.source.body,
                version: 0,
                created_at: h.source.created_at,
                updated_at: h.source.updated_at,
            })
            .collect())
    }

    /// Ready when the alias exists and a search through it answers from every shard.
    pub async fn ping(&self) -> Result<(), SearchError> {
        self.ensure_alias().await?;
        let answer = self
            .client
            .json(
                Method::POST,
                &format!("{}/_search", self.alias),
                Body::Json(json!({ "size": 0, "track_total_hits": false })),
            )
            .await
            .map_err(|e| unavailable("readiness search", e))?;
        let shards: Shards = serde_json::from_value(answer["_shards"].clone())
            .map_err(|e| unavailable("readiness search answer", e))?;
        if shards.failed > 0 {
            return Err(SearchError::Unavailable(format!(
                "{} of {} shards failed",
                shards.failed, shards.total
            )));
        }
        // The alias may have gone since it was found.
        let indices = alias::indices_of(&self.client, &self.alias)
            .await
            .map_err(|e| unavailable("looking up the alias", e))?;
        if indices.is_empty() {
            self.ready.store(false, Ordering::Relaxed);
            return Err(SearchError::Unavailable(format!(
                "the alias `{}` is missing",
                self.alias
            )));
        }
        Ok(())
    }
}

/// ES's reasons can quote a document id (`token:chat:number`); the token is a secret
/// that logs and the dead-letter reason must not carry.
fn redact(reason: &str, token: &str) -> String {
    if token.is_empty() {
        reason.to_owned()
    } else {
        reason.replace(token, "<token>")
    }
}

#[derive(Deserialize)]
struct SearchResponse {
    #[serde(default)]
    timed_out: bool,
    #[serde(rename = "_shards")]
    shards: Shards,
    hits: Hits,
}

#[derive(Deserialize)]
struct Shards {
    total: u64,
    successful: u64,
    #[serde(default)]
    failed: u64,
}

#[derive(Deserialize)]
struct Hits {
    hits: Vec<Hit>,
}

#[derive(Deserialize)]
struct Hit {
    #[serde(rename = "_source")]
    source: Source,
}

#[derive(Deserialize)]
struct Source {
    token: String,
    chat: u64,
    number: u64,
    body: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_taken_out_of_reasons() {
        assert_eq!(
            redact("[s3cret:1:2]: version conflict", "s3cret"),
            "[<token>:1:2]: version conflict"
        );
        assert_eq!(redact("no id here", ""), "no id here");
    }
}
