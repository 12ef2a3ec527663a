//! One conformance suite for both search backends.
//!
//! * Tantivy runs for real, on a temporary directory: its cases prove the matching
//!   (folded, case-insensitive substrings of every term) end to end.
//! * Elasticsearch cannot run on this machine. Its adapter is run against an HTTP mock
//!   (wiremock) that serves request/response pairs in the Elasticsearch 8 REST format,
//!   written from ES's documentation (alias, create index, `_bulk`, `_search`): each query's
//!   request body is stated here independently of the adapter and must match exactly,
//!   and each response is what ES returns for the expected hits. This proves the
//!   adapter's requests (the folded terms the API passes) and its reading of responses,
//!   not ES's matching itself; the mapping and query are built on ES's documented
//!   `wildcard` field and query.

use chat_system::config::SearchConfig;
use chat_system::search::fold::fold;
use chat_system::search::{MessageDoc, Search, SearchQuery, parse_terms};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use wiremock::matchers::{body_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TOKEN: &str = "tok";

fn at() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap()
}

fn doc(chat: u64, number: u64, body: &str, version: u64) -> MessageDoc {
    MessageDoc {
        token: TOKEN.into(),
        chat,
        number,
        body: body.into(),
        version,
        created_at: at(),
        updated_at: at(),
    }
}

/// Batches to index, in order: the last one redelivers a stale version of message 2,
/// which must not bring its old body back.
fn batches() -> Vec<Vec<MessageDoc>> {
    vec![
        vec![
            doc(1, 1, "Hello World", 10),
            doc(1, 2, "hello there", 11),
            doc(1, 3, "say HELLO to the world", 12),
            doc(1, 4, "100% *sure* a_b", 13),
            doc(1, 5, "Ünïcode Straße", 14),
            doc(1, 6, "abcd xbcde", 16),
            doc(2, 1, "hello elsewhere", 15),
            doc(3, 1, "Straße", 30),
            doc(3, 2, "ΟΔΟΣ", 31),
            doc(3, 3, "ﬁnance", 32),
            doc(3, 4, "ＡＢＣ", 33),
            doc(3, 5, "\u{c9}cole", 34),
            doc(3, 6, "E\u{301}COLE", 35),
            doc(3, 7, "e\u{301}cole", 36),
            doc(3, 8, "İstanbul", 37),
            doc(3, 9, "東京タワーで🎉パーティー", 38),
            doc(3, 10, "DİYARBAKIR", 39),
            doc(
                3,
                11,
                "\u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467} family",
                40,
            ),
        ],
        vec![doc(1, 2, "goodbye there", 20)],
        vec![doc(1, 2, "hello there", 11)],
    ]
}

/// The indexed state once every batch is applied.
fn final_docs() -> Vec<MessageDoc> {
    let mut docs = batches()[0].clone();
    docs[1] = doc(1, 2, "goodbye there", 20);
    docs
}

struct Case {
    terms: &'static [&'static str],
    chat: u64,
    after: u64,
    limit: u32,
    /// What the backend returns: up to `limit + 1` numbers, ascending.
    expected: &'static [u64],
}

const CASES: &[Case] = &[
    Case {
        terms: &["ell"],
        chat: 1,
        after: 0,
        limit: 50,
        expected: &[1, 3],
    },
    Case {
        terms: &["hel", "wor"],
        chat: 1,
        after: 0,
        limit: 50,
        expected: &[1, 3],
    },
    Case {
        terms: &["goodbye"],
        chat: 1,
        after: 0,
        limit: 50,
        expected: &[2],
    },
    Case {
        terms: &["%"],
        chat: 1,
        after: 0,
        limit: 50,
        expected: &[4],
    },
    Case {
        terms: &["*sure*"],
        chat: 1,
        after: 0,
        limit: 50,
        expected: &[4],
    },
    Case {
        terms: &["a*"],
        chat: 1,
        after: 0,
        limit: 50,
        expected: &[],
    },
    Case {
        terms: &["straße"],
        chat: 1,
        after: 0,
        limit: 50,
        expected: &[5],
    },
    Case {
        terms: &["ünï"],
        chat: 1,
        after: 0,
        limit: 50,
        expected: &[5],
    },
    Case {
        terms: &["llo wo"],
        chat: 1,
        after: 0,
        limit: 50,
        expected: &[1, 3],
    },
    // Every trigram of "abcde" occurs in message 6, but not together: not a match.
    Case {
        terms: &["abcde"],
        chat: 1,
        after: 0,
        limit: 50,
        expected: &[],
    },
    Case {
        terms: &["bcde"],
        chat: 1,
        after: 0,
        limit: 50,
        expected: &[6],
    },
    Case {
        terms: &["e"],
        chat: 1,
        after: 0,
        limit: 2,
        expected: &[1, 2, 3],
    },
    Case {
        terms: &["e"],
        chat: 1,
        after: 2,
        limit: 2,
        expected: &[3, 4, 5],
    },
    Case {
        terms: &["hello"],
        chat: 2,
        after: 0,
        limit: 50,
        expected: &[1],
    },
    Case {
        terms: &["STRASSE"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[1],
    },
    Case {
        terms: &["strasse"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[1],
    },
    Case {
        terms: &["straße"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[1],
    },
    Case {
        terms: &["STRAẞE"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[1],
    },
    Case {
        terms: &["οδος"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[2],
    },
    Case {
        terms: &["ΟΔΟΣ"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[2],
    },
    Case {
        terms: &["οδοσ"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[2],
    },
    Case {
        terms: &["ΟΔΟς"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[2],
    },
    Case {
        terms: &["finance"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[3],
    },
    Case {
        terms: &["FINANCE"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[3],
    },
    Case {
        terms: &["ﬁ"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[3],
    },
    Case {
        terms: &["abc"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[4],
    },
    Case {
        terms: &["ＡＢＣ"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[4],
    },
    Case {
        terms: &["Ab"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[4],
    },
    Case {
        terms: &["Ｂ"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[4, 8, 10],
    },
    Case {
        terms: &["école"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[5, 6, 7],
    },
    Case {
        terms: &["ÉCOLE"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[5, 6, 7],
    },
    Case {
        terms: &["E\u{301}cole"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[5, 6, 7],
    },
    Case {
        terms: &["e\u{301}COLE"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[5, 6, 7],
    },
    Case {
        terms: &["\u{c9}"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[5, 6, 7],
    },
    Case {
        terms: &["İstanbul"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[8],
    },
    Case {
        terms: &["İSTANBUL"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[8],
    },
    Case {
        terms: &["stanbul"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[8],
    },
    Case {
        terms: &["i\u{307}"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[8, 10],
    },
    Case {
        terms: &["istanbul"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[],
    },
    Case {
        terms: &["DİYARBAKIR"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[10],
    },
    Case {
        terms: &["diyarbakir"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[],
    },
    Case {
        terms: &["タワー"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[9],
    },
    Case {
        terms: &["京タ"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[9],
    },
    Case {
        terms: &["で🎉パ"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[9],
    },
    Case {
        terms: &["🎉"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[9],
    },
    Case {
        terms: &["ワーで🎉"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[9],
    },
    Case {
        terms: &["パーティー"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[9],
    },
    Case {
        terms: &["東京タワーで🎉パーティー"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[9],
    },
    Case {
        terms: &["ィー"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[9],
    },
    Case {
        terms: &["ー"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[9],
    },
    Case {
        terms: &["東京タワーで🎉パーティーー"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[],
    },
    Case {
        terms: &["\u{1f469}\u{200d}\u{1f467}"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[11],
    },
    Case {
        terms: &["\u{1f469}\u{1f467}", "FAMILY"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[11],
    },
    Case {
        terms: &["é", "cole"],
        chat: 3,
        after: 0,
        limit: 50,
        expected: &[5, 6, 7],
    },
    Case {
        terms: &["é"],
        chat: 3,
        after: 5,
        limit: 1,
        expected: &[6, 7],
    },
];

fn query(case: &Case) -> SearchQuery {
    SearchQuery {
        token: TOKEN.into(),
        chat: case.chat,
        // As the API passes them: split on whitespace, folded.
        terms: parse_terms(Some(&case.terms.join(" "))).expect("valid terms"),
        after: case.after,
        limit: case.limit,
    }
}

async fn run_suite(search: &Search) {
    for batch in batches() {
        search.index(batch).await.expect("index");
    }
    let docs = final_docs();
    for case in CASES {
        let found = search.search(query(case)).await.expect("search");
        let numbers: Vec<u64> = found.iter().map(|m| m.number).collect();
        assert_eq!(
            numbers,
            case.expected,
            "{} for {:?}",
            search.name(),
            case.terms
        );
        for message in &found {
            let doc = docs
                .iter()
                .find(|d| d.chat == case.chat && d.number == message.number)
                .unwrap();
            assert_eq!(message.body, doc.body);
            assert_eq!(message.chat_number, case.chat);
            assert_eq!(message.created_at, doc.created_at);
        }
    }
}

/// The embedded backend's settings, with an index directory of its own.
fn embedded_config() -> SearchConfig {
    SearchConfig {
        elasticsearch_url: None,
        elasticsearch_index: "messages".into(),
        elastic: Default::default(),
        search_index_dir: std::env::temp_dir().join(format!(
            "chat-system-search-test-{:016x}",
            getrandom::u64().unwrap()
        )),
        search_time_budget: std::time::Duration::from_secs(5),
    }
}

#[tokio::test]
async fn conformance_embedded_tantivy() {
    let config = embedded_config();
    let search = Search::open(&config, true).await.unwrap();
    run_suite(&search).await;
    drop(search);
    let _ = std::fs::remove_dir_all(config.search_index_dir);
}

#[tokio::test]
async fn a_standby_takes_the_embedded_writer_over_when_its_holder_goes() {
    let config = embedded_config();
    let holder = Search::open(&config, true).await.unwrap();
    let standby = Search::open(&config, true).await.unwrap();
    assert!(holder.can_index());
    assert!(!standby.can_index());
    assert!(!standby.try_take_writer().await.unwrap());
    holder
        .index(vec![doc(1, 1, "before the takeover", 1)])
        .await
        .unwrap();

    drop(holder); // its writer lock goes with it, as with a process that dies
    assert!(standby.try_take_writer().await.unwrap());
    assert!(standby.can_index());
    standby
        .index(vec![doc(1, 2, "after the takeover", 2)])
        .await
        .unwrap();
    let mut q = query(&CASES[0]);
    q.terms = vec!["takeover".into()];
    let found: Vec<u64> = standby
        .search(q)
        .await
        .unwrap()
        .iter()
        .map(|m| m.number)
        .collect();
    assert_eq!(found, [1, 2]);
    drop(standby);
    let _ = std::fs::remove_dir_all(config.search_index_dir);
}

/// The `_search` body ES receives for a case, stated from the ES query DSL.
fn es_request(case: &Case) -> Value {
    let mut filter = vec![
        json!({"term": {"token": TOKEN}}),
        json!({"term": {"chat": case.chat}}),
        json!({"range": {"number": {"gt": case.after}}}),
    ];
    // The folded field, with folded terms, case-sensitively (ES 8's `case_insensitive`
    // folds ASCII only).
    for term in query(case).terms {
        let escaped = fold(&term)
            .replace('\\', "\\\\")
            .replace('*', "\\*")
            .replace('?', "\\?");
        filter.push(json!({"wildcard": {"body_folded": {"value": format!("*{escaped}*")}}}));
    }
    json!({
        "size": case.limit + 1,
        "query": {"bool": {"filter": filter}},
        "sort": [{"number": "asc"}],
        "track_total_hits": false
    })
}

/// An ES 8 `_search` response holding `docs` as hits.
fn es_response(docs: &[&MessageDoc]) -> Value {
    let hits: Vec<Value> = docs
        .iter()
        .map(|d| {
            json!({
                "_index": "messages", "_id": d.id(), "_score": null,
                "_source": {
                    "token": d.token, "chat": d.chat, "number": d.number, "body": d.body,
                    "created_at": "2023-11-14T22:13:20Z", "updated_at": "2023-11-14T22:13:20Z"
                },
                "sort": [d.number]
            })
        })
        .collect();
    json!({
        "took": 2, "timed_out": false,
        "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
        "hits": {"max_score": null, "hits": hits}
    })
}

fn es_bulk_response(items: &[(String, u16)]) -> Value {
    let errors = items.iter().any(|(_, s)| *s >= 300);
    let items: Vec<Value> = items
        .iter()
        .map(|(id, status)| match status {
            409 => json!({"index": {"_index": "messages", "_id": id, "status": 409, "error": {
                "type": "version_conflict_engine_exception",
                "reason": format!("[{id}]: version conflict, current version [20] is higher or equal to the one provided [11]")
            }}}),
            s => json!({"index": {"_index": "messages", "_id": id, "_version": 1, "result": "created", "status": s}}),
        })
        .collect();
    json!({"took": 3, "errors": errors, "items": items})
}

async fn mount_index_creation(server: &MockServer) {
    // No alias and no index yet: the first version is made with the alias on it.
    Mock::given(method("GET"))
        .and(path("/_alias/messages"))
        .respond_with(
            ResponseTemplate::new(404)
                .set_body_json(json!({"error": "alias [messages] missing", "status": 404})),
        )
        .expect(1)
        .mount(server)
        .await;
    Mock::given(method("HEAD"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(404))
        .expect(1)
        .mount(server)
        .await;
    let properties = json!({
        "token": {"type": "keyword"}, "chat": {"type": "long"}, "number": {"type": "long"},
        "body": {"type": "wildcard"}, "body_folded": {"type": "wildcard"},
        "created_at": {"type": "date"}, "updated_at": {"type": "date"}
    });
    let mappings = json!({
        "dynamic": "strict",
        "_source": {"excludes": ["body_folded"]},
        "_meta": {"chat_system": {"mapping": 2, "state": "complete"}},
        "properties": properties
    });
    Mock::given(method("PUT"))
        .and(path("/messages-v1"))
        .and(body_json(json!({
            "settings": {"number_of_shards": 1},
            "mappings": mappings,
            "aliases": {"messages": {"is_write_index": true}}
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"acknowledged": true, "shards_acknowledged": true, "index": "messages-v1"}),
        ))
        .expect(1)
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path("/messages/_mapping"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"messages-v1": {"mappings": mappings}})),
        )
        .expect(1)
        .mount(server)
        .await;
}

async fn elastic(server: &MockServer) -> Search {
    let config = SearchConfig {
        elasticsearch_url: Some(server.uri().parse().unwrap()),
        elasticsearch_index: "messages".into(),
        search_index_dir: std::env::temp_dir(),
        search_time_budget: std::time::Duration::from_secs(5),
        elastic: Default::default(),
    };
    Search::open(&config, true).await.expect("connect")
}

#[tokio::test]
async fn conformance_elasticsearch_adapter_against_recorded_es8_exchanges() {
    let server = MockServer::start().await;
    mount_index_creation(&server).await;
    // Bulk answers: all created, then the update, then a 409 for the stale redelivery.
    let bulk_answers: Vec<Value> = batches()
        .iter()
        .enumerate()
        .map(|(i, batch)| {
            let status = if i == 2 { 409 } else { 201 };
            es_bulk_response(&batch.iter().map(|d| (d.id(), status)).collect::<Vec<_>>())
        })
        .collect();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(move |_: &wiremock::Request| {
            let i = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ResponseTemplate::new(200).set_body_json(bulk_answers[i.min(2)].clone())
        })
        .expect(3)
        .mount(&server)
        .await;
    let docs = final_docs();
    // Cases whose terms fold alike send one request: one exchange each, expected as
    // many times as it is sent.
    let mut exchanges: Vec<(Value, Value, u64)> = Vec::new();
    for case in CASES {
        let hits: Vec<&MessageDoc> = case
            .expected
            .iter()
            .map(|n| {
                docs.iter()
                    .find(|d| d.chat == case.chat && d.number == *n)
                    .unwrap()
            })
            .collect();
        let request = es_request(case);
        match exchanges.iter_mut().find(|(r, _, _)| *r == request) {
            Some((_, _, times)) => *times += 1,
            None => exchanges.push((request, es_response(&hits), 1)),
        }
    }
    for (request, response, times) in exchanges {
        Mock::given(method("POST"))
            .and(path("/messages/_search"))
            .and(body_json(request))
            .respond_with(ResponseTemplate::new(200).set_body_json(response))
            .expect(times)
            .mount(&server)
            .await;
    }
    let search = elastic(&server).await;
    run_suite(&search).await;

    // What the adapter sent to `_bulk`: NDJSON, deterministic ids, external versions.
    let requests = server.received_requests().await.unwrap();
    let bulk = requests.iter().find(|r| r.url.path() == "/_bulk").unwrap();
    assert_eq!(
        bulk.headers.get("content-type").unwrap(),
        "application/x-ndjson"
    );
    let first: Value = serde_json::from_str(
        std::str::from_utf8(&bulk.body)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        first,
        json!({"index": {"_index": "messages", "_id": "tok:1:1", "version": 10, "version_type": "external"}})
    );
}
