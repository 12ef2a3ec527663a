//! `reindex` with Elasticsearch, against an HTTP mock in ES 8's documented format (see
//! `elastic.rs`): messages come from the real MySQL of the test app; the requests made
//! to ES, and their order, are what is checked.
//! Alias switch: <https://www.elastic.co/guide/en/elasticsearch/reference/8.15/indices-aliases.html>;
//! index `_meta`: <https://www.elastic.co/guide/en/elasticsearch/reference/8.15/mapping-meta-field.html>.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chat_system::config::ElasticConfig;
use chat_system::reindex::{Options, run_with};
use chat_system::search::Search;
use chat_system::search::elastic::client::Connection;
use chat_system::search::elastic::{ElasticIndex, Retry};
use serde_json::{Value, json};
use wiremock::matchers::{body_json, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::helpers::TestApp;

fn options() -> Options {
    Options {
        fresh: false,
        attempts: 3,
        pause: Duration::from_millis(1),
        settle: Duration::ZERO,
    }
}

fn mappings(meta: Value) -> Value {
    json!({
        "dynamic": "strict",
        "_source": {"excludes": ["body_folded"]},
        "_meta": {"chat_system": meta},
        "properties": {
            "token": {"type": "keyword"}, "chat": {"type": "long"}, "number": {"type": "long"},
            "body": {"type": "wildcard"}, "body_folded": {"type": "wildcard"},
            "created_at": {"type": "date"}, "updated_at": {"type": "date"}
        }
    })
}

fn acknowledged() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"acknowledged": true}))
}

/// `messages` on `messages-v1`; `versions` is the answer to `GET messages-v*/_mapping`.
async fn mount_cluster(server: &MockServer, versions: Value) {
    Mock::given(method("GET"))
        .and(path("/_alias/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"messages-v1": {"aliases": {"messages": {"is_write_index": true}}}}),
        ))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path("/messages/_mapping"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"messages-v1": {"mappings": mappings(json!({"mapping": 2, "state": "complete"}))}}),
        ))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path("/messages-v*/_mapping"))
        .respond_with(ResponseTemplate::new(200).set_body_json(versions))
        .mount(server)
        .await;
    for (verb, route) in [
        ("PUT", "/messages-v2/_mapping"),
        ("PUT", "/messages-v2/_settings"),
        ("POST", "/messages-v2/_refresh"),
        ("DELETE", "/messages-v1"),
    ] {
        Mock::given(method(verb))
            .and(path(route))
            .respond_with(acknowledged())
            .mount(server)
            .await;
    }
    Mock::given(method("POST"))
        .and(path("/_aliases"))
        .and(body_json(json!({"actions": [
            {"remove": {"index": "messages-v1", "alias": "messages"}},
            {"add": {"index": "messages-v2", "alias": "messages", "is_write_index": true}}
        ]})))
        .respond_with(acknowledged())
        .expect(1)
        .mount(server)
        .await;
}

fn bulk_docs(request: &Request) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(&request.body).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines
        .chunks(2)
        .map(|pair| {
            (
                pair[0]["index"]["_index"].as_str().unwrap().to_owned(),
                pair[1].clone(),
            )
        })
        .collect()
}

fn all_created(request: &Request) -> ResponseTemplate {
    let items: Vec<Value> = bulk_docs(request)
        .iter()
        .map(|_| json!({"index": {"_index": "messages-v2", "status": 201, "result": "created"}}))
        .collect();
    ResponseTemplate::new(200).set_body_json(json!({"took": 1, "errors": false, "items": items}))
}

async fn search_on(server: &MockServer) -> Search {
    let connection = Connection {
        url: server.uri().parse().unwrap(),
        config: ElasticConfig::default(),
    };
    let es = ElasticIndex::connect(&connection, "messages")
        .await
        .unwrap()
        .with_retry(Retry {
            first: Duration::from_millis(1),
            attempts: 3,
        });
    Search::Elastic(Arc::new(es))
}

/// An app with `n` persisted messages in one chat.
async fn app_with_messages(n: usize) -> (TestApp, String) {
    let mut app = TestApp::spawn().await;
    let token = app.application("reindex").await;
    let chat = app.chat(&token).await;
    for i in 1..=n {
        app.message(&token, chat, &format!("message {i}")).await;
    }
    app.worker.drain().await.unwrap();
    (app, token)
}

#[tokio::test]
async fn reindex_builds_the_next_version_switches_the_alias_then_deletes_the_old_index() {
    let (app, _) = app_with_messages(5).await;
    let server = MockServer::start().await;
    mount_cluster(
        &server,
        json!({"messages-v1": {"mappings": mappings(json!({"mapping": 2, "state": "complete"}))}}),
    )
    .await;
    Mock::given(method("PUT"))
        .and(path("/messages-v2"))
        .respond_with(acknowledged())
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(all_created)
        .mount(&server)
        .await;
    let search = search_on(&server).await;
    run_with(&app.store.mysql, &search, 2, options())
        .await
        .unwrap();

    let requests = server.received_requests().await.unwrap();
    let position = |verb: &str, route: &str| {
        requests
            .iter()
            .position(|r| r.method.as_str() == verb && r.url.path() == route)
            .unwrap_or_else(|| panic!("no {verb} {route}"))
    };
    // The new index: built without the alias and without refreshes.
    let created: Value =
        serde_json::from_slice(&requests[position("PUT", "/messages-v2")].body).unwrap();
    assert_eq!(created["aliases"], json!({}));
    assert_eq!(created["settings"]["refresh_interval"], "-1");
    assert_eq!(
        created["mappings"]["_meta"]["chat_system"]["state"],
        "building"
    );
    assert_eq!(
        created["mappings"]["properties"]["body_folded"]["type"],
        "wildcard"
    );

    // Every message copied into messages-v2 directly (no alias, no require_alias) before
    // the switch; refreshes back on before it; the old index deleted after it.
    let switch = position("POST", "/_aliases");
    let bulks: Vec<&Request> = requests[..switch]
        .iter()
        .filter(|r| r.url.path() == "/_bulk")
        .collect();
    assert!(bulks.iter().all(|r| r.url.query().is_none()));
    let mut copied: Vec<String> = bulks
        .iter()
        .flat_map(|r| bulk_docs(r))
        .map(|(index, source)| {
            assert_eq!(index, "messages-v2");
            source["body"].as_str().unwrap().to_owned()
        })
        .collect();
    copied.sort();
    copied.dedup();
    assert_eq!(copied.len(), 5, "{copied:?}");
    assert!(position("PUT", "/messages-v2/_settings") < switch);
    assert!(switch < position("DELETE", "/messages-v1"));
    let last_state = requests
        .iter()
        .rfind(|r| r.url.path() == "/messages-v2/_mapping")
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap())
        .unwrap();
    assert_eq!(last_state["_meta"]["chat_system"]["state"], "complete");
}

#[tokio::test]
async fn reindex_resumes_an_unfinished_build_from_its_cursor_and_retries_transient_failures() {
    let (app, token) = app_with_messages(5).await;
    let app_id = app.application_id(&token).await;
    let server = MockServer::start().await;
    // messages-v2 was left building, after message 3; writes since its start are far in
    // the future, so only the copy's own progress is seen here.
    let building = json!({"mapping": 2, "state": "building", "since_version": u64::MAX / 2,
                          "cursor": [app_id, 1, 3], "copied": 3});
    mount_cluster(
        &server,
        json!({
            "messages-v1": {"mappings": mappings(json!({"mapping": 2, "state": "complete"}))},
            "messages-v2": {"mappings": mappings(building)}
        }),
    )
    .await;
    Mock::given(method("PUT"))
        .and(path("/messages-v2"))
        .respond_with(acknowledged())
        .expect(0)
        .mount(&server)
        .await;
    // The first bulk: the cluster is overloaded; then it takes them.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    Mock::given(method("POST"))
        .and(path("/_bulk"))
        .respond_with(move |request: &Request| {
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                return ResponseTemplate::new(503).set_body_json(json!({
                    "error": {"type": "unavailable_shards_exception", "reason": "primary shard is not active"},
                    "status": 503
                }));
            }
            all_created(request)
        })
        .mount(&server)
        .await;
    let search = search_on(&server).await;
    run_with(&app.store.mysql, &search, 10, options())
        .await
        .unwrap();

    let requests = server.received_requests().await.unwrap();
    let copied: Vec<String> = requests
        .iter()
        .filter(|r| r.url.path() == "/_bulk")
        .skip(1)
        .flat_map(bulk_docs)
        .map(|(_, source)| source["body"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(copied, ["message 4", "message 5"]);
}
