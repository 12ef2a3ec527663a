//! What Elasticsearch stores and how it is asked: the index definition, the documents
//! and the `_search` body.
//!
//! * `body` is kept as written (returned in results), `body_folded` holds it under the
//!   shared folding ([`crate::search::fold`]), and queries go to `body_folded` with
//!   folded terms, compared case-sensitively: ES 8's `case_insensitive` option folds
//!   ASCII only, so it is not used. Both are [`wildcard`] fields, built for substring
//!   matching on long text, which check each candidate against the whole value (no
//!   false positives). `body_folded` is left out of the stored `_source`: it is derived,
//!   and would double the disk taken by bodies.
//! * `token` is a `keyword`, `chat` and `number` are `long`s; `dynamic: strict`, so a
//!   document that does not fit the mapping is refused rather than guessed at.
//! * `_meta.chat_system.mapping` is [`MAPPING_VERSION`]: an index with an older one is
//!   reported at start, and rebuilt with `chat-system reindex`.
//!
//! [`wildcard`]: https://www.elastic.co/guide/en/elasticsearch/reference/8.15/keyword.html#wildcard-field-type

use serde_json::{Value, json};

use crate::search::fold::fold;
use crate::search::{MessageDoc, SearchQuery};

/// Raised whenever the mapping below changes, so that older indices are recognised.
pub const MAPPING_VERSION: u64 = 2;

/// The field mappings.
pub fn properties() -> Value {
    json!({
        "token": { "type": "keyword" },
        "chat": { "type": "long" },
        "number": { "type": "long" },
        "body": { "type": "wildcard" },
        "body_folded": { "type": "wildcard" },
        "created_at": { "type": "date" },
        "updated_at": { "type": "date" }
    })
}

/// The mappings of a new index; `meta` is merged into its `_meta.chat_system`.
pub fn mappings(meta: Value) -> Value {
    let mut ours = json!({ "mapping": MAPPING_VERSION });
    if let (Some(ours), Some(extra)) = (ours.as_object_mut(), meta.as_object()) {
        ours.extend(extra.clone());
    }
    json!({
        "dynamic": "strict",
        "_source": { "excludes": ["body_folded"] },
        "_meta": { "chat_system": ours },
        "properties": properties()
    })
}

/// A new index's definition. `aliases` is `{}` or the alias to put on it at creation.
pub fn index_definition(aliases: Value, meta: Value) -> Value {
    json!({
        "settings": { "number_of_shards": 1 },
        "mappings": mappings(meta),
        "aliases": aliases
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
        json!({ "wildcard": { "body_folded": {
            "value": format!("*{}*", escape_wildcard(&fold(t)))
        } } })
    }));
    json!({
        "size": query.limit + 1,
        "query": { "bool": { "filter": filter } },
        "sort": [ { "number": "asc" } ],
        "track_total_hits": false
    })
}

/// A document's `_source`, as sent.
pub fn source(doc: &MessageDoc) -> Value {
    json!({
        "token": doc.token, "chat": doc.chat, "number": doc.number,
        "body": doc.body, "body_folded": fold(&doc.body),
        "created_at": doc.created_at, "updated_at": doc.updated_at
    })
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;

    #[test]
    fn the_mapping_is_pinned() {
        let expected = json!({
            "settings": { "number_of_shards": 1 },
            "mappings": {
                "dynamic": "strict",
                "_source": { "excludes": ["body_folded"] },
                "_meta": { "chat_system": { "mapping": 2, "state": "building" } },
                "properties": {
                    "token": { "type": "keyword" }, "chat": { "type": "long" },
                    "number": { "type": "long" }, "body": { "type": "wildcard" },
                    "body_folded": { "type": "wildcard" },
                    "created_at": { "type": "date" }, "updated_at": { "type": "date" }
                }
            },
            "aliases": {}
        });
        assert_eq!(
            index_definition(json!({}), json!({ "state": "building" })),
            expected
        );
    }

    #[test]
    fn the_query_is_pinned_and_folded() {
        let query = SearchQuery {
            token: "tok".into(),
            chat: 3,
            terms: vec![
                "HEL".into(),
                "a*b?c\\".into(),
                "STRASSE".into(),
                "ΟΔΟΣ".into(),
            ],
            after: 10,
            limit: 50,
        };
        let expected = json!({
            "size": 51,
            "query": { "bool": { "filter": [
                { "term": { "token": "tok" } },
                { "term": { "chat": 3 } },
                { "range": { "number": { "gt": 10 } } },
                { "wildcard": { "body_folded": { "value": "*hel*" } } },
                { "wildcard": { "body_folded": { "value": "*a\\*b\\?c\\\\*" } } },
                { "wildcard": { "body_folded": { "value": "*strasse*" } } },
                { "wildcard": { "body_folded": { "value": "*οδοσ*" } } }
            ] } },
            "sort": [ { "number": "asc" } ],
            "track_total_hits": false
        });
        assert_eq!(search_body(&query), expected);
    }

    #[test]
    fn the_source_carries_the_body_and_its_folding() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap();
        let doc = MessageDoc {
            token: "tok".into(),
            chat: 2,
            number: 7,
            body: "Straße ＡＢＣ ﬁnance".into(),
            version: 99,
            created_at: at,
            updated_at: at,
        };
        let source = source(&doc);
        assert_eq!(source["body"], "Straße ＡＢＣ ﬁnance");
        assert_eq!(source["body_folded"], "strasse abc finance");
        assert_eq!(source["created_at"], "2023-11-14T22:13:20Z");
    }
}
