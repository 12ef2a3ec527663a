//! Health, readiness, metrics, the OpenAPI document, and behaviour with a dependency down.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{Options, TestApp};

#[tokio::test]
async fn healthz_and_readyz_answer() {
    let app = TestApp::spawn().await;
    let health = app.get("/healthz").await;
    assert_eq!(
        (health.status.as_u16(), &health.body),
        (200, &json!({"status": "ok"}))
    );
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status, 200);
    assert_eq!(
        ready.body["checks"],
        json!({"mysql": "ok", "redis": "ok", "search": "ok", "queue": "ok"})
    );
}

#[tokio::test]
async fn readyz_names_the_dependency_that_is_down() {
    let app = TestApp::with_proxies().await;
    let mysql = app.mysql_proxy.as_ref().unwrap();
    let redis = app.redis_proxy.as_ref().unwrap();

    mysql.cut();
    let reply = app.get("/readyz").await;
    reply.assert_problem(503);
    assert_eq!(
        reply.body["checks"],
        json!({"mysql": "unavailable", "redis": "ok", "search": "ok", "queue": "ok"})
    );
    assert!(reply.body["detail"].as_str().unwrap().contains("mysql"));
    mysql.restore();

    redis.cut();
    let reply = app.get("/readyz").await;
    reply.assert_problem(503);
    assert_eq!(reply.body["checks"]["redis"], "unavailable");
    assert_eq!(reply.body["checks"]["queue"], "unavailable");
    redis.restore();
}

#[tokio::test]
async fn with_mysql_down_creates_are_accepted_and_reads_get_a_fast_503() {
    let mut app = TestApp::with_proxies().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    app.message(&token, chat, "persisted before").await;
    app.drain().await;
    app.mysql_proxy.as_ref().unwrap().cut();

    // The create path needs Redis only.
    let number = app
        .message(&token, chat, "queued while MySQL is down")
        .await;
    // A page holding a persisted message needs MySQL: a fast 503.
    let started = Instant::now();
    let reply = app
        .get(&format!("/applications/{token}/chats/{chat}/messages"))
        .await;
    let problem = reply.assert_problem(503);
    assert!(
        problem["detail"].as_str().unwrap().contains("mysql"),
        "{problem}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "503 must be fast"
    );
    // A pending message is still served from Redis, alone or as a page of pending ones.
    let shown = app
        .get(&format!(
            "/applications/{token}/chats/{chat}/messages/{number}"
        ))
        .await;
    assert_eq!(shown.status, 200);
    let pending_page = app
        .get(&format!(
            "/applications/{token}/chats/{chat}/messages?after=1"
        ))
        .await;
    assert_eq!(pending_page.status, 200, "{}", pending_page.body);
    assert_eq!(pending_page.body[0]["number"], number);

    app.mysql_proxy.as_ref().unwrap().restore();
    app.drain().await;
    let listed = app
        .get(&format!("/applications/{token}/chats/{chat}/messages"))
        .await;
    assert_eq!(listed.body[1]["body"], "queued while MySQL is down");
}

#[tokio::test]
async fn with_redis_down_creates_get_a_503_naming_redis() {
    let app = TestApp::with_proxies().await;
    app.allow_leftovers(); // Never drained: the answers are what it checks.
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    app.redis_proxy.as_ref().unwrap().cut();
    let started = Instant::now();
    let reply = app
        .post(
            &format!("/applications/{token}/chats/{chat}/messages"),
            json!({"body": "x"}),
        )
        .await;
    let problem = reply.assert_problem(503);
    assert!(
        problem["detail"].as_str().unwrap().contains("redis"),
        "{problem}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "503 must be fast"
    );
    // Reads of persisted applications do not need Redis.
    assert_eq!(app.get(&format!("/applications/{token}")).await.status, 200);
    app.redis_proxy.as_ref().unwrap().restore();
}

#[tokio::test]
async fn an_application_created_while_redis_is_down_is_a_201_and_works_after() {
    let app = TestApp::with_proxies().await;
    app.allow_leftovers(); // Never drained: the answers are what it checks.
    app.redis_proxy.as_ref().unwrap().cut();
    let reply = app.post("/applications", json!({"name": "no cache"})).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let token = reply.body["token"].as_str().unwrap().to_owned();
    app.redis_proxy.as_ref().unwrap().restore();
    // The cold cache is filled from MySQL on first use; numbering starts at 1.
    let chat = app
        .post(&format!("/applications/{token}/chats"), json!({}))
        .await;
    assert_eq!(chat.status, 201, "{}", chat.body);
    assert_eq!(chat.body["number"], 1);
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let app = TestApp::spawn().await;
    app.get("/applications/nope").await;
    let reply = app.send(app.client.get(app.url("/metrics"))).await;
    assert_eq!(reply.status, 200);
    let text = reply.body.as_str().unwrap();
    assert!(
        text.contains(
            r#"http_requests_total{method="GET",route="/applications/{token}",status="404"}"#
        ),
        "{text}"
    );
    assert!(
        text.contains("http_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn metric_labels_stay_bounded_whatever_the_method() {
    let app = TestApp::spawn().await;
    let long = "M".repeat(5_000);
    for method in ["FROB", "X-ANY", long.as_str()] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let reply = app
            .send(app.client.request(method, app.url("/healthz")))
            .await;
        reply.assert_problem(405);
    }
    let text = app.get("/metrics").await.body;
    let text = text.as_str().unwrap();
    assert!(
        text.contains(r#"http_requests_total{method="other",route="/healthz",status="405"}"#),
        "{text}"
    );
    for unbounded in ["FROB", "X-ANY", "MMMM"] {
        assert!(!text.contains(unbounded), "{unbounded} became a label");
    }
}

#[tokio::test]
async fn the_openapi_document_covers_every_endpoint() {
    let app = TestApp::spawn().await;
    let doc = app.get("/openapi.json").await.body;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/applications", &["get", "post"][..]),
        ("/applications/{token}", &["get", "patch", "put"]),
        ("/applications/{token}/chats", &["get", "post"]),
        (
            "/applications/{token}/chats/{number}",
            &["get", "patch", "put"],
        ),
        (
            "/applications/{token}/chats/{chat}/messages",
            &["get", "post"],
        ),
        (
            "/applications/{token}/chats/{chat}/messages/{number}",
            &["get", "patch", "put"],
        ),
        (
            "/applications/{token}/chats/{chat}/messages/search",
            &["get"],
        ),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
        ("/openapi.json", &["get"]),
    ] {
        for method in methods {
            assert!(
                paths[path].get(*method).is_some(),
                "{method} {path} is missing"
            );
        }
    }
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    // Every documented error is a problem+json document, as the server sends it.
    for (path, operations) in paths {
        for (method, operation) in operations.as_object().unwrap() {
            for (status, response) in operation["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    // Shared error responses are references into components.responses.
                    let response = match response["$ref"].as_str() {
                        Some(name) => {
                            let name = name.trim_start_matches("#/components/responses/");
                            &doc["components"]["responses"][name]
                        }
                        None => response,
                    };
                    let content = response["content"].as_object().unwrap();
                    assert_eq!(
                        content.keys().collect::<Vec<_>>(),
                        ["application/problem+json"],
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn responses_carry_a_request_id() {
    let app = TestApp::spawn().await;
    let reply = app.get("/healthz").await;
    assert_eq!(reply.header("x-request-id").map(str::len), Some(16));
}

#[tokio::test]
async fn docs_serve_an_interactive_reference_without_a_cdn() {
    let app = TestApp::spawn().await;
    let page = app.get("/docs/").await;
    assert_eq!(page.status, 200);
    let html = page.body.as_str().unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("https://"),
        "everything is served locally: {html}"
    );
    let init = app.get("/docs/swagger-initializer.js").await;
    assert_eq!(init.status, 200);
    assert!(init.body.as_str().unwrap().contains("/openapi.json"));
    let bundle = app
        .send(app.client.get(app.url("/docs/swagger-ui-bundle.js")))
        .await;
    assert_eq!(bundle.status, 200);
}

#[tokio::test]
async fn a_request_over_the_time_limit_gets_a_problem_503() {
    let app = TestApp::with(Options {
        request_timeout: Some(Duration::from_millis(300)),
        ..Options::default()
    })
    .await;
    // An unknown token is looked up in MySQL, where a table lock held here makes the
    // lookup wait (well past the time limit, and short of the dependency timeout).
    let mut lock = app.store.mysql.acquire().await.unwrap();
    sqlx::raw_sql("LOCK TABLES applications WRITE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let reply = app
        .get("/applications/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        .await;
    sqlx::raw_sql("UNLOCK TABLES")
        .execute(&mut *lock)
        .await
        .unwrap();
    reply.assert_problem(503);
    assert_eq!(reply.body["type"], "/problems/timeout");
}
