//! `chat-system verify-elasticsearch`: checks a real cluster against the definition of a
//! match, for operators (the test suite only replays documented ES answers).
//!
//! In a scratch index `<alias>-verify-<random>` (same mapping, deleted at the end) it
//! writes a corpus of bodies in several scripts and forms, then runs each query both
//! through Elasticsearch and through [`crate::search::matches`], the shared definition
//! the embedded index follows too, and compares the results. It also checks pagination,
//! per-chat scoping and that an older version cannot replace a newer one. It needs the
//! privileges the service needs (create, write, read and delete indices named after the
//! alias), so it checks those too.

use reqwest::Method;
use serde_json::json;

use super::client::Body;
use super::{ElasticIndex, alias, mapping};
use crate::search::{MessageDoc, SearchError, SearchQuery, matches, parse_terms};

const TOKEN: &str = "verify";

/// Bodies of chat 1, numbered from 1.
const CORPUS: &[&str] = &[
    "Hello World",
    "Straße und STRASSE",
    "ΟΔΟΣ",
    "ﬁnance report",
    "ＡＢＣ fullwidth",
    "École precomposed",
    "E\u{301}cole decomposed",
    "İstanbul DİYARBAKIR",
    "Ünïcode ÉCOLE",
    "Москва СЛОВО",
    "東京タワーに行きました",
    "party 🎉🙂 time",
    "100% *sure* a_b? back\\slash",
    "abcd xbcde",
];

/// Queries, as a client sends `q`.
const QUERIES: &[&str] = &[
    "ell",
    "hel wor",
    "STRASSE",
    "straße",
    "strasse",
    "οδος",
    "ΟΔΟΣ",
    "οδοσ",
    "finance",
    "FINANCE",
    "abc",
    "école",
    "ÉCOLE",
    "E\u{301}COLE",
    "İSTANBUL",
    "istanbul",
    "stanbul",
    "diyarbakir",
    "ünï",
    "москва",
    "слово",
    "京タ",
    "🙂",
    "🎉🙂",
    "*sure*",
    "a*",
    "%",
    "b?",
    "\\",
    "bcde",
    "abcde",
    "nothing-matches-this",
];

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub checks: usize,
    pub failures: Vec<String>,
}

fn doc(chat: u64, number: u64, body: &str, version: u64) -> MessageDoc {
    let at = chrono::Utc::now();
    MessageDoc {
        token: TOKEN.into(),
        chat,
        number,
        body: body.into(),
        version,
        created_at: at,
        updated_at: at,
    }
}

/// Runs every check in a scratch index, which is deleted whatever the outcome.
pub async fn run(es: &ElasticIndex) -> Result<Report, SearchError> {
    let index = format!(
        "{}-verify-{:08x}",
        es.alias(),
        getrandom::u32().map_err(|e| SearchError::Failed(e.to_string()))?
    );
    let definition = mapping::index_definition(json!({}), json!({ "state": "verify" }));
    es.client()
        .call(Method::PUT, &index, Body::Json(definition))
        .await
        .map_err(|e| SearchError::Unavailable(format!("creating `{index}`: {e}")))?;
    let result = checks(es, &index).await;
    if let Err(e) = alias::delete(es.client(), &index).await {
        tracing::warn!(%index, error = %e, "could not delete the scratch index");
    }
    result
}

async fn checks(es: &ElasticIndex, index: &str) -> Result<Report, SearchError> {
    let mut report = Report::default();
    let mut docs: Vec<MessageDoc> = CORPUS
        .iter()
        .enumerate()
        .map(|(i, body)| doc(1, i as u64 + 1, body, 100))
        .collect();
    // Another chat with matching text: never found from chat 1.
    docs.push(doc(2, 1, "Hello from chat 2", 100));
    let refused = es.write(index, &docs, false).await?;
    report.checks += 1;
    for r in &refused {
        report
            .failures
            .push(format!("document {} refused: {}", r.position + 1, r.reason));
    }
    // An older version of message 1 must not replace it.
    let stale = es
        .write(index, &[doc(1, 1, "stale body", 50)], false)
        .await?;
    report.checks += 1;
    if !stale.is_empty() {
        report
            .failures
            .push("an older version was refused instead of skipped (409)".into());
    }
    es.client()
        .call(Method::POST, &format!("{index}/_refresh"), Body::None)
        .await
        .map_err(|e| SearchError::Unavailable(format!("refresh: {e}")))?;

    for q in QUERIES {
        let Ok(terms) = parse_terms(Some(q)) else {
            continue;
        };
        let expected: Vec<u64> = docs
            .iter()
            .filter(|d| d.chat == 1 && matches(&d.body, &terms))
            .map(|d| d.number)
            .collect();
        let query = SearchQuery {
            token: TOKEN.into(),
            chat: 1,
            terms,
            after: 0,
            limit: 1000,
        };
        let found: Vec<u64> = es
            .search_in(index, &query)
            .await?
            .iter()
            .map(|d| d.number)
            .collect();
        report.checks += 1;
        if found != expected {
            report.failures.push(format!(
                "q={q:?}: Elasticsearch found {found:?}, the definition {expected:?}"
            ));
        }
    }

    // Pages: `limit + 1` results from after `after`, in ascending number.
    let terms = parse_terms(Some("e"))
        .map_err(|e| SearchError::Failed(format!("the page check's query: {}", e.0)))?;
    let all: Vec<u64> = docs
        .iter()
        .filter(|d| d.chat == 1 && matches(&d.body, &terms))
        .map(|d| d.number)
        .collect();
    let query = SearchQuery {
        token: TOKEN.into(),
        chat: 1,
        terms,
        after: all.first().copied().unwrap_or(0),
        limit: 2,
    };
    let page: Vec<u64> = es
        .search_in(index, &query)
        .await?
        .iter()
        .map(|d| d.number)
        .collect();
    let expected: Vec<u64> = all.iter().skip(1).take(3).copied().collect();
    report.checks += 1;
    if page != expected {
        report.failures.push(format!(
            "page after {}: Elasticsearch found {page:?}, expected {expected:?}",
            query.after
        ));
    }
    Ok(report)
}
