//! The alias and the versioned indices behind it: looking them up, building the next
//! one, switching the alias over.
//!
//! Each index records in its mapping's `_meta.chat_system` the mapping version it was
//! made with and, while `reindex` fills it, how far it got (`state: building`, the
//! cursor, the version from which writes made meanwhile are copied again). A `reindex`
//! that stops part-way finds that index and resumes from the cursor.
//!
//! API pages: <https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-get-alias.html>,
//! <https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-aliases.html>,
//! <https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-put-mapping.html>.

use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::client::{Body, CallError, Client};
use super::mapping;
use crate::store::mysql::MessageCursor;

/// The name of version `n` of the index behind `alias`.
pub fn versioned(alias: &str, n: u64) -> String {
    format!("{alias}-v{n}")
}

/// `n` when `index` is version `n` of `alias`'s index.
pub fn version_number(alias: &str, index: &str) -> Option<u64> {
    index.strip_prefix(alias)?.strip_prefix("-v")?.parse().ok()
}

/// The indices the alias points at; empty when there is no such alias.
pub async fn indices_of(client: &Client, alias: &str) -> Result<Vec<String>, CallError> {
    match client
        .json(Method::GET, &format!("_alias/{alias}"), Body::None)
        .await
    {
        Ok(found) => Ok(found
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()),
        Err(CallError::Status(StatusCode::NOT_FOUND, _)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The mapping version recorded in one index's entry of a `GET <index>/_mapping` answer
/// (`{"mappings": {"_meta": ...}}`); indices made before it was recorded are version 1.
pub fn mapping_version(entry: &Value) -> u64 {
    entry["mappings"]["_meta"]["chat_system"]["mapping"]
        .as_u64()
        .unwrap_or(1)
}

/// Where a `reindex` is in filling an index.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildState {
    /// `building` until the alias points at it, then `complete`.
    pub state: String,
    /// Writes of at least this version (made while the index was filled) are copied
    /// again after the copy and after the switch.
    #[serde(default)]
    pub since_version: u64,
    /// The last message copied: `[application id, chat number, message number]`.
    #[serde(default)]
    pub cursor: [u64; 3],
    /// Messages copied so far.
    #[serde(default)]
    pub copied: u64,
}

impl BuildState {
    pub fn cursor(&self) -> MessageCursor {
        MessageCursor {
            app_id: self.cursor[0],
            chat: self.cursor[1],
            number: self.cursor[2],
        }
    }

    pub fn set_cursor(&mut self, cursor: &MessageCursor) {
        self.cursor = [cursor.app_id, cursor.chat, cursor.number];
    }

    fn meta(&self) -> Value {
        let mut meta = serde_json::to_value(self).unwrap_or_else(|_| json!({}));
        if let Some(o) = meta.as_object_mut() {
            o.insert("mapping".into(), json!(mapping::MAPPING_VERSION));
        }
        meta
    }
}

/// An index named after the alias, with what its `_meta` says.
#[derive(Clone, Debug)]
pub struct Version {
    pub name: String,
    pub number: u64,
    pub mapping: u64,
    pub build: Option<BuildState>,
}

/// Every `<alias>-v<n>` index, in ascending `n`.
pub async fn versions(client: &Client, alias: &str) -> Result<Vec<Version>, CallError> {
    let found = client
        .json(Method::GET, &format!("{alias}-v*/_mapping"), Body::None)
        .await?;
    let mut versions: Vec<Version> = found
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(name, entry)| {
            Some(Version {
                name: name.clone(),
                number: version_number(alias, name)?,
                mapping: mapping_version(entry),
                build: serde_json::from_value(entry["mappings"]["_meta"]["chat_system"].clone())
                    .ok(),
            })
        })
        .collect();
    versions.sort_by_key(|v| v.number);
    Ok(versions)
}

/// Creates `index` for filling: no alias, refreshes off (they would only slow the copy).
pub async fn create_for_build(
    client: &Client,
    index: &str,
    state: &BuildState,
) -> Result<(), CallError> {
    let mut definition = mapping::index_definition(json!({}), state.meta());
    definition["settings"]["refresh_interval"] = json!("-1");
    client
        .call(Method::PUT, index, Body::Json(definition))
        .await
        .map(drop)
}

/// Records progress in the index's `_meta` (which a mapping update replaces whole).
pub async fn save_state(client: &Client, index: &str, state: &BuildState) -> Result<(), CallError> {
    client
        .call(
            Method::PUT,
            &format!("{index}/_mapping"),
            Body::Json(json!({ "_meta": { "chat_system": state.meta() } })),
        )
        .await
        .map(drop)
}

/// Turns refreshes back on (the index default) and makes everything copied searchable.
pub async fn open_for_search(client: &Client, index: &str) -> Result<(), CallError> {
    client
        .call(
            Method::PUT,
            &format!("{index}/_settings"),
            Body::Json(json!({ "index": { "refresh_interval": null } })),
        )
        .await?;
    client
        .call(Method::POST, &format!("{index}/_refresh"), Body::None)
        .await
        .map(drop)
}

/// What the alias points at before the switch.
pub enum Previous {
    /// These indices, behind the alias.
    Indices(Vec<String>),
    /// An index that has the alias's name (made before aliases were used): it is
    /// deleted by the same atomic call that creates the alias.
    LegacyIndex,
}

/// Points the alias at `to` alone, in one atomic call: searches see either the old
/// index or the new one, never neither.
pub async fn switch(
    client: &Client,
    alias: &str,
    previous: &Previous,
    to: &str,
) -> Result<(), CallError> {
    let mut actions: Vec<Value> = match previous {
        Previous::Indices(indices) => indices
            .iter()
            .filter(|index| index.as_str() != to)
            .map(|index| json!({ "remove": { "index": index, "alias": alias } }))
            .collect(),
        Previous::LegacyIndex => vec![json!({ "remove_index": { "index": alias } })],
    };
    actions.push(json!({ "add": { "index": to, "alias": alias, "is_write_index": true } }));
    client
        .call(
            Method::POST,
            "_aliases",
            Body::Json(json!({ "actions": actions })),
        )
        .await
        .map(drop)
}

pub async fn delete(client: &Client, index: &str) -> Result<(), CallError> {
    match client.call(Method::DELETE, index, Body::None).await {
        Ok(_) | Err(CallError::Status(StatusCode::NOT_FOUND, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_names_round_trip() {
        assert_eq!(versioned("messages", 3), "messages-v3");
        assert_eq!(version_number("messages", "messages-v12"), Some(12));
        assert_eq!(version_number("messages", "messages-verify-1"), None);
        assert_eq!(version_number("messages", "other-v1"), None);
    }

    #[test]
    fn build_state_lives_in_the_mapping_meta() {
        let mut state = BuildState {
            state: "building".into(),
            since_version: 42,
            ..BuildState::default()
        };
        state.set_cursor(&MessageCursor {
            app_id: 1,
            chat: 2,
            number: 3,
        });
        let meta = state.meta();
        assert_eq!(meta["mapping"], mapping::MAPPING_VERSION);
        assert_eq!(meta["cursor"], json!([1, 2, 3]));
        let entry = json!({ "mappings": { "_meta": { "chat_system": meta } } });
        assert_eq!(mapping_version(&entry), mapping::MAPPING_VERSION);
        let back: BuildState =
            serde_json::from_value(entry["mappings"]["_meta"]["chat_system"].clone()).unwrap();
        assert_eq!(back, state);
        assert_eq!(mapping_version(&json!({ "mappings": {} })), 1);
    }
}
