//! `_bulk` writes: the NDJSON body, its splitting by size, and one outcome per document.
//!
//! Request and response shapes: <https://www.elastic.co/guide/en/elasticsearch/reference/8.15/docs-bulk.html>.
//! Each document is written with `version_type: external` and the version of the write
//! it holds: ES refuses an older version with 409 (a newer one is already there), which
//! is the outcome wanted, so redelivered or reordered entries never bring back an old body.
//! The answer's `items` are in the order of the request's actions.

use serde_json::{Value, json};

use super::client::describe_error;
use super::mapping;
use crate::search::MessageDoc;

/// What became of one document of a bulk request.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Written, or a newer version was already there (409).
    Done,
    /// 429 or 5xx: worth sending again, after a pause.
    Retry(String),
    /// Refused for this document's sake (a 4xx about its content): sending it again
    /// would fail the same way.
    Refused(String),
    /// Refused for the index's sake (closed, blocked, missing, not ours to write): every
    /// other document would fail the same way, so none is given up on.
    Blocked(String),
}

/// Error types of a refused item that concern the index rather than the document.
const INDEX_WIDE: &[&str] = &[
    "index_closed_exception",
    "cluster_block_exception",
    "index_not_found_exception",
    "security_exception",
    "strict_dynamic_mapping_exception",
];

/// The two NDJSON lines writing `doc` into `target` (an alias or an index).
pub fn encode(target: &str, doc: &MessageDoc) -> String {
    let action = json!({ "index": {
        "_index": target, "_id": doc.id(),
        "version": doc.version, "version_type": "external"
    } });
    let mut lines = action.to_string();
    lines.push('\n');
    lines.push_str(&mapping::source(doc).to_string());
    lines.push('\n');
    lines
}

/// Splits `positions` into runs whose encoded sizes add up to at most `max_bytes`; a
/// document larger than that goes alone.
pub fn chunks(positions: &[usize], sizes: &[usize], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut chunks = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0u64;
    for &position in positions {
        let size = sizes[position] as u64;
        if !current.is_empty() && bytes + size > max_bytes {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(position);
        bytes += size;
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// The outcome of an item from its `status` and `error`.
pub fn classify(status: u64, error: &Value) -> Outcome {
    match status {
        200..=299 | 409 => Outcome::Done,
        429 | 500..=599 => Outcome::Retry(format!("{status} {}", describe_error(error))),
        _ => {
            let reason = format!("{status} {}", describe_error(error));
            let kind = error["type"].as_str().unwrap_or_default();
            if matches!(status, 401 | 403 | 404) || INDEX_WIDE.contains(&kind) {
                Outcome::Blocked(reason)
            } else {
                Outcome::Refused(reason)
            }
        }
    }
}

/// The outcomes of a 200 answer to a request of `expected` actions, in request order.
pub fn read_items(answer: &Value, expected: usize) -> Result<Vec<Outcome>, String> {
    let items = answer["items"]
        .as_array()
        .ok_or("a bulk answer without `items`")?;
    if items.len() != expected {
        return Err(format!(
            "a bulk answer of {} items to {expected} actions",
            items.len()
        ));
    }
    items
        .iter()
        .map(|item| {
            // `{"index": {...}}`: one key, the action's name.
            let result = item
                .as_object()
                .and_then(|o| o.values().next())
                .ok_or("a bulk item without a result")?;
            let status = result["status"]
                .as_u64()
                .ok_or("a bulk item without a status")?;
            Ok(classify(status, &result["error"]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;

    fn doc(body: &str) -> MessageDoc {
        let at = DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap();
        MessageDoc {
            token: "tok".into(),
            chat: 2,
            number: 7,
            body: body.into(),
            version: 99,
            created_at: at,
            updated_at: at,
        }
    }

    #[test]
    fn a_document_is_two_lines_with_its_id_and_external_version() {
        let text = encode("messages", &doc("Hi"));
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            json!({ "index": { "_index": "messages", "_id": "tok:2:7", "version": 99, "version_type": "external" } })
        );
        assert_eq!(lines[1]["body"], "Hi");
        assert_eq!(lines[1]["body_folded"], "hi");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn requests_are_capped_in_bytes_and_a_large_document_goes_alone() {
        let sizes = [40, 40, 40, 500, 10, 10];
        let all: Vec<usize> = (0..sizes.len()).collect();
        assert_eq!(
            chunks(&all, &sizes, 100),
            vec![vec![0, 1], vec![2], vec![3], vec![4, 5]]
        );
        assert_eq!(chunks(&[5, 1], &sizes, 1000), vec![vec![5, 1]]);
        assert!(chunks(&[], &sizes, 100).is_empty());
    }

    #[test]
    fn item_outcomes_by_status_and_error_type() {
        let error = |kind: &str| json!({ "type": kind, "reason": "why" });
        assert_eq!(classify(201, &Value::Null), Outcome::Done);
        assert_eq!(
            classify(409, &error("version_conflict_engine_exception")),
            Outcome::Done
        );
        assert!(matches!(
            classify(429, &error("es_rejected_execution_exception")),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            classify(503, &error("unavailable_shards_exception")),
            Outcome::Retry(_)
        ));
        assert_eq!(
            classify(400, &error("document_parsing_exception")),
            Outcome::Refused("400 document_parsing_exception: why".into())
        );
        assert!(matches!(
            classify(400, &error("index_closed_exception")),
            Outcome::Blocked(_)
        ));
        assert!(matches!(
            classify(403, &error("cluster_block_exception")),
            Outcome::Blocked(_)
        ));
        assert!(matches!(
            classify(404, &error("index_not_found_exception")),
            Outcome::Blocked(_)
        ));
    }

    #[test]
    fn answers_that_do_not_match_the_request_are_errors() {
        let answer = json!({ "errors": false, "items": [ { "index": { "status": 201 } } ] });
        assert_eq!(read_items(&answer, 1), Ok(vec![Outcome::Done]));
        assert!(read_items(&answer, 2).is_err());
        assert!(read_items(&json!({ "errors": false }), 1).is_err());
    }
}
