//! The Elasticsearch adapter against an HTTP mock (wiremock) that answers in ES 8's
//! documented format. Elasticsearch cannot run here: these tests pin the requests the
//! adapter makes and what it does with each documented answer, not ES's own behaviour.
//!
//! Shapes are taken from the ES 8.15 reference:
//! * bulk requests and item results, including errors:
//!   <https://www.elastic.co/guide/en/elasticsearch/reference/8.15/docs-bulk.html>
//! * error answers (`{"error": {"type", "reason", ...}, "status"}`) and the HTTP codes:
//!   <https://www.elastic.co/guide/en/elasticsearch/reference/8.15/common-options.html>
//! * aliases: <https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-get-alias.html>,
//!   <https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-aliases.html>
//! * search: <https://www.elastic.co/guide/en/elasticsearch/reference/8.15/search-search.html>
//! * API keys (`Authorization: ApiKey <encoded>`):
//!   <https://www.elastic.co/guide/en/elasticsearch/reference/8.15/security-api-create-api-key.html>

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chat_system::config::ElasticConfig;
use chat_system::search::elastic::client::Connection;
use chat_system::search::elastic::{ElasticIndex, Retry};
use chat_system::search::{MessageDoc, Refused, Search, SearchError, SearchQuery};
use chat_system::worker::Role;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::helpers::{TestApp, eventually, worker_config};

fn at() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap()
}

fn doc(number: u64, body: &str) -> MessageDoc {
    MessageDoc {
        token: "tok".into(),
        chat: 1,
        number,
        body: body.into(),
        version: 100 + number,
        created_at: at(),
        updated_at: at(),
    }
}

fn mapping_v2() -> Value {
    json!({
        "dynamic": "strict",
        "_source": {"excludes": ["body_folded"]},
        "_meta": {"chat_system": {"mapping": 2, "state": "complete"}},
        "properties": {
            "token": {"type": "keyword"}, "chat": {"type": "long"}, "number": {"type": "long"},
            "body": {"type": "wildcard"}, "body_folded": {"type": "wildcard"},
            "created_at": {"type": "date"}, "updated_at": {"type": "date"}
        }
    })
}

/// The alias `messages` on `messages-v1`, with the current mapping.
async fn mount_alias(server: &MockServer) {
    Mock::given(method("GET"))
        .and(path("/_alias/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"messages-v1": {"aliases": {"messages": {"is_write_index": true}}}}),
        ))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path("/messages/_mapping"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"messages-v1": {"mappings": mapping_v2()}})),
        )
        .mount(server)
        .await;
}

fn connection(url: &str, config: ElasticConfig) -> Connection {
    Connection {
        url: url.parse().unwrap(),
        config,
    }
}

/// Retries after 1 ms, three sends in all: the tests do not wait for real back-off.
async fn connect_with(server: &MockServer, config: ElasticConfig) -> ElasticIndex {
    ElasticIndex::connect(&connection(&server.uri(), config), "messages")
        .await
        .expect("connect")
        .with_retry(Retry {
            first: Duration::from_millis(1),
            attempts: 3,
        })
}

async fn connect(server: &MockServer) -> ElasticIndex {
    connect_with(server, ElasticConfig::default()).await
}

/// The `_id`s of a bulk request's actions, in order.
fn bulk_ids(request: &Request) -> Vec<String> {
    std::str::from_utf8(&request.body)
        .unwrap()
        .lines()
        .step_by(2)
        .map(|l| {
            let action: Value = serde_json::from_str(l).unwrap();
            action["index"]["_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// A bulk item result as the bulk page shows them: success, or `status` with an error.
fn item(id: &str, status: u16, error: Option<(&str, &str)>) -> Value {
    match error {
        None => json!({"index": {
            "_index": "messages-v1", "_id": id, "_version": 101, "result": "created",
            "_shards": {"total": 2, "successful": 1, "failed": 0},
            "_seq_no": 0, "_primary_term": 1, "status": status
        }}),
        Some((kind, reason)) => json!({"index": {
            "_index": "messages-v1", "_id": id, "status": status,
            "error": {"type": kind, "reason": reason, "index_uuid": "aAsFqTI0Tc2W0LCWgPNrOA",
                      "shard": "0", "index": "messages-v1"}
        }}),
    }
}

fn bulk_answer(items: Vec<Value>) -> ResponseTemplate {
    let errors = items.iter().any(|i| i["index"]["error"].is_object());
    ResponseTemplate::new(200).set_body_json(json!({"took": 3, "errors": errors, "items": items}))
}

/// Answers every bulk request with 201 for each of its documents.
fn all_created(request: &Request) -> ResponseTemplate {
    bulk_answer(
        bulk_ids(request)
            .iter()
            .map(|id| item(id, 201, None))
            .collect(),
    )
}

async fn bulk_requests(server: &MockServer) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.url.path() == "/_bulk")
        .collect()
}

fn es_error(status: u16, kind: &str, reason: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({
        "error": {"root_cause": [{"type": kind, "reason": reason}], "type": kind, "reason": reason},
        "status": status
    }))
}

#[tokio::test]
async fn writes_go_through_the_alias_with_require_alias_and_the_api_key() {
    let server = MockServer::start().await;
    mount_alias(&server).await;
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .and(query_param("require_alias", "true"))
        .and(header(
            "authorization",
            "ApiKey VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==",
        ))
        .and(header("content-type", "application/x-ndjson"))
        .respond_with(all_created)
        .expect(1)
        .mount(&server)
        .await;
    let config = ElasticConfig {
        elasticsearch_api_key: Some(
            "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw=="
                .parse()
                .unwrap(),
        ),
        ..ElasticConfig::default()
    };
    let es = connect_with(&server, config).await;
    assert_eq!(es.add(&[doc(1, "Straße")]).await.unwrap(), []);

    let bulk = &bulk_requests(&server).await[0];
    let lines: Vec<Value> = std::str::from_utf8(&bulk.body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines[0],
        json!({"index": {"_index": "messages", "_id": "tok:1:1", "version": 101, "version_type": "external"}})
    );
    assert_eq!(lines[1]["body"], "Straße");
    assert_eq!(lines[1]["body_folded"], "strasse");
    // Every call carried the key.
    for request in server.received_requests().await.unwrap() {
        assert!(
            request.headers.get("authorization").is_some(),
            "{}",
            request.url
        );
    }
}

#[tokio::test]
async fn the_user_and_password_of_the_url_are_sent_as_basic_auth_and_never_shown() {
    let server = MockServer::start().await;
    // base64("chat_system:p@ss word")
    let basic = "Basic Y2hhdF9zeXN0ZW06cEBzcyB3b3Jk";
    Mock::given(method("GET"))
        .and(path("/_alias/messages"))
        .and(header("authorization", basic))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"messages-v1": {"aliases": {"messages": {"is_write_index": true}}}}),
        ))
        .expect(1..)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/messages/_mapping"))
        .and(header("authorization", basic))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"messages-v1": {"mappings": mapping_v2()}})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let url = server
        .uri()
        .replace("http://", "http://chat_system:p%40ss%20word@");
    let connection = connection(&url, ElasticConfig::default());
    assert!(!format!("{connection:?}").contains("p%40ss"));
    ElasticIndex::connect(&connection, "messages")
        .await
        .unwrap();
}

#[tokio::test]
async fn each_bulk_item_has_its_own_outcome_and_only_429_items_are_sent_again() {
    let server = MockServer::start().await;
    mount_alias(&server).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(move |request: &Request| {
            let ids = bulk_ids(request);
            if counter.fetch_add(1, Ordering::SeqCst) > 0 {
                return all_created(request);
            }
            bulk_answer(vec![
                item(&ids[0], 201, None),
                item(&ids[1], 409, Some(("version_conflict_engine_exception",
                    "[tok:1:2]: version conflict, current version [300] is higher or equal to the one provided [102]"))),
                item(&ids[2], 429, Some(("es_rejected_execution_exception",
                    "rejected execution of coordinating operation [coordinating_and_primary_bytes=0, replica_bytes=0, all_bytes=0, coordinating_operation_bytes=1024, max_coordinating_and_primary_bytes=1024]"))),
                item(&ids[3], 400, Some(("document_parsing_exception",
                    "[1:42] failed to parse field [created_at] of type [date] in document with id 'tok:1:4'"))),
                item(&ids[4], 201, None),
            ])
        })
        .expect(2)
        .mount(&server)
        .await;
    let es = connect(&server).await;
    let docs: Vec<MessageDoc> = (1..=5).map(|n| doc(n, "x")).collect();
    let refused = es.add(&docs).await.unwrap();

    assert_eq!(
        refused,
        [Refused {
            position: 3,
            reason: "400 document_parsing_exception: [1:42] failed to parse field [created_at] \
                     of type [date] in document with id '<token>:1:4'"
                .into(),
        }]
    );
    let bulks = bulk_requests(&server).await;
    assert_eq!(bulk_ids(&bulks[1]), ["tok:1:3"], "only the 429 item again");
}

#[tokio::test]
async fn items_still_answered_429_or_5xx_after_the_retries_fail_the_call_as_unavailable() {
    let server = MockServer::start().await;
    mount_alias(&server).await;
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(|request: &Request| {
            let ids = bulk_ids(request);
            bulk_answer(vec![item(
                &ids[0],
                503,
                Some((
                    "unavailable_shards_exception",
                    "[messages-v1][0] primary shard is not active Timeout: [1m]",
                )),
            )])
        })
        .expect(3)
        .mount(&server)
        .await;
    let es = connect(&server).await;
    let err = es.add(&[doc(1, "x")]).await.unwrap_err();
    assert!(
        matches!(&err, SearchError::Unavailable(e) if e.contains("unavailable_shards_exception")),
        "{err}"
    );
}

#[tokio::test]
async fn a_closed_index_or_a_write_block_gives_up_no_document() {
    for (status, kind, reason) in [
        (400, "index_closed_exception", "closed"),
        (
            403,
            "cluster_block_exception",
            "index [messages-v1] blocked by: [FORBIDDEN/8/index write (api)];",
        ),
        (
            404,
            "index_not_found_exception",
            "no such index [messages] and [require_alias] request flag is [true] and [messages] is not an alias",
        ),
    ] {
        let server = MockServer::start().await;
        mount_alias(&server).await;
        Mock::given(method("POST"))
            .and(path("/_bulk"))
            .respond_with(move |request: &Request| {
                let ids = bulk_ids(request);
                bulk_answer(vec![
                    item(&ids[0], 201, None),
                    item(&ids[1], status, Some((kind, reason))),
                ])
            })
            .expect(1)
            .mount(&server)
            .await;
        let es = connect(&server).await;
        let err = es.add(&[doc(1, "a"), doc(2, "b")]).await.unwrap_err();
        assert!(
            matches!(&err, SearchError::Unavailable(e) if e.contains(kind)),
            "{status} {kind}: {err}"
        );
    }
}

#[tokio::test]
async fn top_level_401_and_403_are_unavailable_429_and_503_are_retried() {
    for (status, kind) in [(401, "security_exception"), (403, "security_exception")] {
        let server = MockServer::start().await;
        mount_alias(&server).await;
        Mock::given(method("POST"))
            .and(path("/_bulk"))
            .respond_with(es_error(status, kind, "action [indices:data/write/bulk] is unauthorized for API key id [VuaCfGcBCdbkQm-e5aOx] of user [chat_system]"))
            .expect(1)
            .mount(&server)
            .await;
        let es = connect(&server).await;
        let err = es.add(&[doc(1, "x")]).await.unwrap_err();
        assert!(
            matches!(&err, SearchError::Unavailable(e) if e.contains("security_exception")),
            "{err}"
        );
    }
    for status in [429, 503] {
        let server = MockServer::start().await;
        mount_alias(&server).await;
        Mock::given(method("POST"))
            .and(path("/_bulk"))
            .respond_with(es_error(
                status,
                "es_rejected_execution_exception",
                "rejected execution",
            ))
            .up_to_n_times(1)
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/_bulk"))
            .respond_with(all_created)
            .expect(1)
            .mount(&server)
            .await;
        let es = connect(&server).await;
        assert_eq!(es.add(&[doc(1, "x")]).await.unwrap(), [], "{status}");
    }
}

/// Answers 413 (ES sends no body with it) to a request of more than `max_docs`
/// documents, or holding `HUGE`; else 201 for each document.
fn too_large_over(max_docs: usize) -> impl Fn(&Request) -> ResponseTemplate {
    move |request: &Request| {
        let text = std::str::from_utf8(&request.body).unwrap();
        if bulk_ids(request).len() > max_docs || text.contains("HUGE") {
            ResponseTemplate::new(413)
        } else {
            all_created(request)
        }
    }
}

#[tokio::test]
async fn a_413_splits_the_request_until_it_fits_and_a_document_too_large_alone_is_refused() {
    let server = MockServer::start().await;
    mount_alias(&server).await;
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(too_large_over(2))
        .mount(&server)
        .await;
    let es = connect(&server).await;
    let docs: Vec<MessageDoc> = (1..=5)
        .map(|n| doc(n, if n == 4 { "HUGE" } else { "ok" }))
        .collect();
    let refused = es.add(&docs).await.unwrap();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].position, 3);
    assert!(
        refused[0].reason.starts_with("413"),
        "{}",
        refused[0].reason
    );

    // Every other document was written once, in order.
    let written: Vec<String> = bulk_requests(&server)
        .await
        .iter()
        .filter(|r| !std::str::from_utf8(&r.body).unwrap().contains("HUGE"))
        .filter(|r| bulk_ids(r).len() <= 2)
        .flat_map(bulk_ids)
        .collect();
    assert_eq!(written, ["tok:1:1", "tok:1:2", "tok:1:3", "tok:1:5"]);
}

#[tokio::test]
async fn bulk_requests_stay_under_the_byte_cap() {
    let server = MockServer::start().await;
    mount_alias(&server).await;
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(all_created)
        .mount(&server)
        .await;
    let cap = 2_000;
    let es = connect_with(
        &server,
        ElasticConfig {
            elasticsearch_bulk_max_bytes: cap,
            ..ElasticConfig::default()
        },
    )
    .await;
    let docs: Vec<MessageDoc> = (1..=20).map(|n| doc(n, &"é".repeat(200))).collect();
    assert_eq!(es.add(&docs).await.unwrap(), []);
    let bulks = bulk_requests(&server).await;
    assert!(bulks.len() > 1);
    assert!(bulks.iter().all(|r| r.body.len() as u64 <= cap));
    assert_eq!(bulks.iter().map(|r| bulk_ids(r).len()).sum::<usize>(), 20);
}

#[tokio::test]
async fn an_index_with_the_alias_name_is_never_written_to() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/_alias/messages"))
        .respond_with(
            ResponseTemplate::new(404)
                .set_body_json(json!({"error": "alias [messages] missing", "status": 404})),
        )
        .mount(&server)
        .await;
    Mock::given(method("HEAD"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(all_created)
        .expect(0)
        .mount(&server)
        .await;
    let es = connect(&server).await;
    let err = es.add(&[doc(1, "x")]).await.unwrap_err();
    assert!(
        matches!(&err, SearchError::Unavailable(e) if e.contains("chat-system reindex")),
        "{err}"
    );
}

fn query() -> SearchQuery {
    SearchQuery {
        token: "tok".into(),
        chat: 1,
        terms: vec!["hello".into()],
        after: 0,
        limit: 50,
    }
}

#[tokio::test]
async fn every_es_answer_to_a_search_is_unavailable_never_an_internal_error() {
    let answers = [
        es_error(400, "search_phase_execution_exception", "all shards failed"),
        es_error(401, "security_exception", "missing authentication credentials"),
        es_error(403, "security_exception", "action [indices:data/read/search] is unauthorized"),
        es_error(404, "index_not_found_exception", "no such index [messages]"),
        es_error(500, "null_pointer_exception", "boom"),
        ResponseTemplate::new(200).set_body_string("not json"),
        // A partial answer: one shard of two failed.
        ResponseTemplate::new(200).set_body_json(json!({
            "took": 2, "timed_out": false,
            "_shards": {"total": 2, "successful": 1, "skipped": 0, "failed": 1,
                        "failures": [{"shard": 1, "index": "messages-v1", "reason": {"type": "node_not_connected_exception"}}]},
            "hits": {"max_score": null, "hits": []}
        })),
    ];
    for answer in answers {
        let server = MockServer::start().await;
        mount_alias(&server).await;
        Mock::given(method("POST"))
            .and(path("/messages/_search"))
            .respond_with(answer)
            .mount(&server)
            .await;
        let es = connect(&server).await;
        let err = es.search(&query()).await.unwrap_err();
        assert!(matches!(err, SearchError::Unavailable(_)), "{err}");
    }
}

/// A replayed answer: this shows the adapter reads hits from the documented shape, not
/// what ES would match.
#[tokio::test]
async fn search_reads_hits_from_the_documented_answer() {
    let server = MockServer::start().await;
    mount_alias(&server).await;
    Mock::given(method("POST"))
        .and(path("/messages/_search"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "took": 2, "timed_out": false,
            "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
            "hits": {"max_score": null, "hits": [{
                "_index": "messages-v1", "_id": "tok:1:7", "_score": null,
                "_source": {"token": "tok", "chat": 1, "number": 7, "body": "Hello",
                            "created_at": "2023-11-14T22:13:20Z", "updated_at": "2023-11-14T22:13:20Z"},
                "sort": [7]
            }]}
        })))
        .mount(&server)
        .await;
    let es = connect(&server).await;
    let found = es.search(&query()).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].number, found[0].body.as_str()), (7, "Hello"));
}

#[tokio::test]
async fn readiness_asks_the_alias_and_a_search_through_it_not_the_cluster() {
    let server = MockServer::start().await;
    mount_alias(&server).await;
    Mock::given(method("GET"))
        .and(path("/_cluster/health"))
        .respond_with(ResponseTemplate::new(403))
        .expect(0)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/messages/_search"))
        .and(body_json(json!({"size": 0, "track_total_hits": false})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "took": 1, "timed_out": false,
            "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
            "hits": {"max_score": null, "hits": []}
        })))
        .mount(&server)
        .await;
    let es = connect(&server).await;
    es.ping().await.unwrap();

    // The alias gone: not ready.
    server.reset().await;
    Mock::given(method("GET"))
        .and(path("/_alias/messages"))
        .respond_with(
            ResponseTemplate::new(404)
                .set_body_json(json!({"error": "alias [messages] missing", "status": 404})),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/messages/_search"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "took": 1, "timed_out": false,
            "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
            "hits": {"max_score": null, "hits": []}
        })))
        .mount(&server)
        .await;
    assert!(matches!(es.ping().await, Err(SearchError::Unavailable(_))));
}

#[tokio::test]
async fn elasticsearch_down_at_start_delays_the_alias_creation_not_the_start() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/_alias/messages"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    let es = connect(&server).await;
    // Back up: the first use makes the index and its alias, then writes.
    server.reset().await;
    Mock::given(method("GET"))
        .and(path("/_alias/messages"))
        .respond_with(ResponseTemplate::new(404))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("HEAD"))
        .and(path("/messages"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/messages-v1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"acknowledged": true, "shards_acknowledged": true, "index": "messages-v1"}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    mount_alias(&server).await;
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(all_created)
        .expect(2)
        .mount(&server)
        .await;
    es.add(&[doc(1, "x")]).await.unwrap();
    es.add(&[doc(2, "y")]).await.unwrap();

    // Nothing listening at all.
    drop(server);
    assert!(matches!(
        es.search(&query()).await,
        Err(SearchError::Unavailable(_))
    ));
}

/// The indexer: a refused document goes to the dead-letter stream with ES's reason and
/// the rest of its batch is acknowledged; an index-wide refusal acknowledges nothing.
#[tokio::test]
async fn the_indexer_dead_letters_refused_documents_and_holds_the_batch_on_index_wide_refusals() {
    let mut app = TestApp::spawn().await;
    app.allow_leftovers(); // Leaves its dead letters behind, on purpose.
    let token = app.application("es").await;
    let chat = app.chat(&token).await;
    for body in ["first", "refused", "third"] {
        app.message(&token, chat, body).await;
    }
    // Persisted, not indexed: the index group is left to the Elasticsearch indexer below.
    app.worker.drain().await.unwrap();

    let server = MockServer::start().await;
    mount_alias(&server).await;
    let blocked = Arc::new(AtomicUsize::new(1));
    let first_call = blocked.clone();
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(move |request: &Request| {
            let ids = bulk_ids(request);
            if first_call.fetch_sub(1, Ordering::SeqCst) == 1 {
                let items = ids
                    .iter()
                    .map(|id| {
                        item(
                            id,
                            403,
                            Some((
                                "cluster_block_exception",
                                "index [messages-v1] blocked by: [FORBIDDEN/8/index write (api)];",
                            )),
                        )
                    })
                    .collect();
                return bulk_answer(items);
            }
            let text = std::str::from_utf8(&request.body).unwrap();
            let bodies: Vec<&str> = text.lines().skip(1).step_by(2).collect();
            bulk_answer(
                ids.iter()
                    .zip(bodies)
                    .map(|(id, source)| {
                        if source.contains("\"refused\"") {
                            item(
                                id,
                                400,
                                Some(("document_parsing_exception", "failed to parse")),
                            )
                        } else {
                            item(id, 201, None)
                        }
                    })
                    .collect(),
            )
        })
        .mount(&server)
        .await;
    let es = connect(&server).await;
    let mut indexer = chat_system::startup::build_worker(
        app.store.clone(),
        &app.store_config,
        &worker_config(),
        Role::Index(Search::Elastic(Arc::new(es))),
    )
    .await
    .unwrap();

    // Write-blocked: an error, nothing acknowledged, nothing dead-lettered.
    assert!(indexer.drain().await.is_err());
    assert_eq!(dead_letter_reasons(&app).await, Vec::<String>::new());
    // Unblocked: the refused document alone is dead-lettered; the group is done.
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(indexer.run(shutdown));
    eventually(Duration::from_secs(10), "the index group done", || async {
        index_pending(&app).await == 0
    })
    .await;
    stop.send(true).unwrap();
    running.await.unwrap();
    let reasons = dead_letter_reasons(&app).await;
    assert_eq!(
        reasons,
        ["search: 400 document_parsing_exception: failed to parse"]
    );
    // Persistence is not the indexer's business: its group is untouched.
    assert_eq!(app.scalar("SELECT COUNT(*) FROM messages").await, 3);
}

async fn index_pending(app: &TestApp) -> usize {
    let status = app.store.queue.status(&[]).await.unwrap();
    status
        .groups
        .iter()
        .find(|g| g.name == "index")
        .map_or(0, |g| g.pending as usize)
}

async fn dead_letter_reasons(app: &TestApp) -> Vec<String> {
    let keys = &app.store.queue.keys;
    let mut reasons = Vec::new();
    for shard in keys.shards() {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(keys.dead_letters(shard))
            .arg("-")
            .arg("+")
            .query_async(&mut app.redis().await)
            .await
            .unwrap();
        reasons.extend(
            reply
                .ids
                .iter()
                .filter_map(|e| e.get::<String>("dlq_reason")),
        );
    }
    reasons
}

/// `verify-elasticsearch` against a mock that finds nothing: it cannot show ES's matching
/// (only a real cluster can), but shows that differences are reported and that the
/// scratch index is deleted whatever the outcome.
#[tokio::test]
async fn verify_elasticsearch_reports_each_difference_and_deletes_its_scratch_index() {
    let server = MockServer::start().await;
    mount_alias(&server).await;
    let scratch = || wiremock::matchers::path_regex(r"^/messages-verify-[0-9a-f]{8}$");
    Mock::given(method("PUT"))
        .and(scratch())
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"acknowledged": true})))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(scratch())
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"acknowledged": true})))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(all_created)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(wiremock::matchers::path_regex(
            r"^/messages-verify-[0-9a-f]{8}/_refresh$",
        ))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"_shards": {"total": 1, "successful": 1, "failed": 0}})),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(wiremock::matchers::path_regex(
            r"^/messages-verify-[0-9a-f]{8}/_search$",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "took": 1, "timed_out": false,
            "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
            "hits": {"max_score": null, "hits": []}
        })))
        .mount(&server)
        .await;
    let es = connect(&server).await;
    let report = chat_system::search::elastic::verify::run(&es)
        .await
        .unwrap();
    assert!(report.checks > 30, "{report:?}");
    assert!(
        report
            .failures
            .iter()
            .any(|f| f.starts_with("q=\"STRASSE\"")),
        "{:?}",
        report.failures
    );
    assert!(
        !report
            .failures
            .iter()
            .any(|f| f.starts_with("q=\"nothing-matches-this\"")),
        "{:?}",
        report.failures
    );
}
