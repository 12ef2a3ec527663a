//! The Elasticsearch 8 backend: a thin adapter over the documented REST API.
//!
//! It is written on `reqwest` and serde rather than the `elasticsearch` crate, which has
//! only ever published alpha releases; the four calls used here (create index, bulk,
//! search, cluster health) are small and stable.
//!
//! * Mapping: `body` is a [`wildcard`] field, built for substring matching on long text;
//!   `token` is a `keyword`, `chat` and `number` are `long`s.
//! * Query: a `bool` filter on token and chat, a `range` on number for pagination and,
//!   per term, a `wildcard` query `*term*` with `case_insensitive: true`; `*`, `?` and `\`
//!   in a term are escaped so they match literally. Sorted by `number` ascending.
//! * Writes: the `_bulk` API, document id `token:chat:number`, with external versioning
//!   (`version_type: external`): an older version is refused with 409, which is success
//!   here, so redelivered or reordered entries never bring back an old body.
//!
//! [`wildcard`]: https://www.elastic.co/guide/en/elasticsearch/reference/8.15/keyword.html#wildcard-field-type

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{MessageDoc, SearchError, SearchQuery};

#[derive(Clone)]
pub struct ElasticIndex {
    client: reqwest::Client,
    base: String,
    index: String,
    /// The index is known to exist. Until then, every call makes sure of it first.
    ready: Arc<AtomicBool>,
}

/// The index definition: settings and the explicit mapping.
pub fn index_definition() -> Value {
    json!({
        "settings": { "number_of_shards": 1 },
        "mappings": {
            "dynamic": "strict",
            "properties": {
                "token": { "type": "keyword" },
                "chat": { "type": "long" },
                "number": { "type": "long" },
                "body": { "type": "wildcard" },
                "created_at": { "type": "date" },
                "updated_at": { "type": "date" }
            }
        }
    })
}

/// Escapes the wildcard query's special characters so a term matches literally.
pub fn escape_wildcard(term: &str) -> String {
    let mut escaped = String::with_capacity(term.len() + 2);
    for c in term.chars() {
        if matches!(c, '*' | '?' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// The `_search` request body of a query.
pub fn search_body(query: &SearchQuery) -> Value {
    let mut filter = vec![
        json!({ "term": { "token": query.token } }),
        json!({ "term": { "chat": query.chat } }),
        json!({ "range": { "number": { "gt": query.after } } }),
    ];
    filter.extend(query.terms.iter().map(|t| {
        json!({ "wildcard": { "body": {
            "value": format!("*{}*", escape_wildcard(t)),
            "case_insensitive": true
        } } })
    }));
    json!({
        "size": query.limit + 1,
        "query": { "bool": { "filter": filter } },
        "sort": [ { "number": "asc" } ],
        "track_total_hits": false
    })
}

/// The `_bulk` request body (NDJSON) indexing `docs`.
pub fn bulk_body(index: &str, docs: &[MessageDoc]) -> String {
    let mut body = String::new();
    for doc in docs {
        let action = json!({ "index": {
            "_index": index, "_id": doc.id(),
            "version": doc.version, "version_type": "external"
        } });
        let source = json!({
            "token": doc.token, "chat": doc.chat, "number": doc.number, "body": doc.body,
            "created_at": doc.created_at, "updated_at": doc.updated_at
        });
        body.push_str(&action.to_string());
        body.push('\n');
        body.push_str(&source.to_string());
        body.push('\n');
    }
    body
}

#[derive(Deserialize)]
struct SearchResponse {
    hits: Hits,
}

#[derive(Deserialize)]
struct Hits {
    hits: Vec<Hit>,
}

#[derive(Deserialize)]
struct Hit {
    #[serde(rename = "_source")]
    source: Source,
    #[serde(rename = "_version", default)]
    version: Option<u64>,
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

#[derive(Deserialize)]
struct BulkResponse {
    errors: bool,
    #[serde(default)]
    items: Vec<Value>,
}

fn unavailable(e: impl std::fmt::Display) -> SearchError {
    SearchError::Unavailable(e.to_string())
}

impl ElasticIndex {
    /// Connects and creates the index with its mapping if it does not exist. With
    /// Elasticsearch unreachable, it starts anyway (persistence must not wait for search)
    /// and creates the index on first use; a definition Elasticsearch rejects is fatal.
    pub async fn connect(base: &str, index: &str) -> Result<Self, SearchError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| SearchError::Failed(e.to_string()))?;
        let this = Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            index: index.to_owned(),
            ready: Arc::new(AtomicBool::new(false)),
        };
        match this.ensure_index().await {
            Err(SearchError::Unavailable(e)) => {
                tracing::warn!(error = %e, "elasticsearch unreachable; the index will be made on first use");
                Ok(this)
            }
            other => other.map(|()| this),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }

    async fn ensure_index(&self) -> Result<(), SearchError> {
        if self.ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let head = self
            .client
            .head(self.url(&self.index))
            .send()
            .await
            .map_err(unavailable)?;
        if head.status().is_success() {
            self.ready.store(true, Ordering::Relaxed);
            return Ok(());
        }
        if head.status().is_server_error() {
            return Err(unavailable(head.status()));
        }
        let created = self
            .client
            .put(self.url(&self.index))
            .json(&index_definition())
            .send()
            .await
            .map_err(unavailable)?;
        let status = created.status();
        if status.is_server_error() {
            return Err(unavailable(status));
        }
        let text = created.text().await.unwrap_or_default();
        // Another process may have created it in between.
        if status.is_success() || text.contains("resource_already_exists_exception") {
            tracing::info!(index = %self.index, "elasticsearch index ready");
            self.ready.store(true, Ordering::Relaxed);
            Ok(())
        } else {
            Err(SearchError::Failed(format!(
                "creating index {}: {status} {text}",
                self.index
            )))
        }
    }

    pub async fn index(&self, docs: &[MessageDoc]) -> Result<(), SearchError> {
        self.ensure_index().await?;
        let response = self
            .client
            .post(self.url("_bulk"))
            .header("content-type", "application/x-ndjson")
            .body(bulk_body(&self.index, docs))
            .send()
            .await
            .map_err(unavailable)?;
        if response.status().is_server_error() {
            return Err(unavailable(response.status()));
        }
        let bulk: BulkResponse = response.json().await.map_err(unavailable)?;
        if !bulk.errors {
            return Ok(());
        }
        // 409: the index already holds a newer version, which is what we want.
        let failures: Vec<&Value> = bulk
            .items
            .iter()
            .filter_map(|item| item.get("index"))
            .filter(|r| r["status"].as_u64().is_some_and(|s| s >= 300 && s != 409))
            .collect();
        match failures.first() {
            None => Ok(()),
            Some(first)
                if first["status"]
                    .as_u64()
                    .is_some_and(|s| s == 429 || s >= 500) =>
            {
                Err(unavailable(first))
            }
            Some(first) => Err(SearchError::Failed(format!(
                "{} documents refused, first: {first}",
                failures.len()
            ))),
        }
    }

    pub async fn search(&self, query: &SearchQuery) -> Result<Vec<MessageDoc>, SearchError> {
        self.ensure_index().await?;
        let response = self
            .client
            .post(self.url(&format!("{}/_search", self.index)))
            .json(&search_body(query))
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(if status.is_server_error() || status.as_u16() == 429 {
                unavailable(format!("{status} {text}"))
            } else {
                SearchError::Failed(format!("{status} {text}"))
            });
        }
        let parsed: SearchResponse = response
            .json()
            .await
            .map_err(|e| SearchError::Failed(e.to_string()))?;
        Ok(parsed
            .hits
            .hits
            .into_iter()
            .map(|h| MessageDoc {
                token: h.source.token,
                chat: h.source.chat,
                number: h.source.number,
                body: h.source.body,
                version: h.version.unwrap_or(0),
                created_at: h.source.created_at,
                updated_at: h.source.updated_at,
            })
            .collect())
    }

    pub async fn ping(&self) -> Result<(), SearchError> {
        let response = self
            .client
            .get(self.url("_cluster/health"))
            .send()
            .await
            .map_err(unavailable)?;
        let health: Value = response.json().await.map_err(unavailable)?;
        match health["status"].as_str() {
            Some("green" | "yellow") => Ok(()),
            other => Err(unavailable(format!("cluster status {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_is_pinned() {
        let expected = json!({
            "settings": { "number_of_shards": 1 },
            "mappings": { "dynamic": "strict", "properties": {
                "token": { "type": "keyword" }, "chat": { "type": "long" },
                "number": { "type": "long" }, "body": { "type": "wildcard" },
                "created_at": { "type": "date" }, "updated_at": { "type": "date" }
            } }
        });
        assert_eq!(index_definition(), expected);
    }

    #[test]
    fn the_query_is_pinned() {
        let query = SearchQuery {
            token: "tok".into(),
            chat: 3,
            terms: vec!["hel".into(), "a*b?c\\".into()],
            after: 10,
            limit: 50,
        };
        let expected = json!({
            "size": 51,
            "query": { "bool": { "filter": [
                { "term": { "token": "tok" } },
                { "term": { "chat": 3 } },
                { "range": { "number": { "gt": 10 } } },
                { "wildcard": { "body": { "value": "*hel*", "case_insensitive": true } } },
                { "wildcard": { "body": { "value": "*a\\*b\\?c\\\\*", "case_insensitive": true } } }
            ] } },
            "sort": [ { "number": "asc" } ],
            "track_total_hits": false
        });
        assert_eq!(search_body(&query), expected);
    }

    #[test]
    fn bulk_lines_use_deterministic_ids_and_external_versions() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap();
        let doc = MessageDoc {
            token: "tok".into(),
            chat: 2,
            number: 7,
            body: "hi".into(),
            version: 99,
            created_at: at,
            updated_at: at,
        };
        let body = bulk_body("messages", &[doc]);
        let lines: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            json!({ "index": { "_index": "messages", "_id": "tok:2:7", "version": 99, "version_type": "external" } })
        );
        assert_eq!(lines[1]["body"], "hi");
        assert_eq!(lines[1]["created_at"], "2023-11-14T22:13:20Z");
        assert!(body.ends_with('\n'));
    }
}
