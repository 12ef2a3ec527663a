//! The error rules of the API (README, docs/openapi.json): every error is problem+json
//! with the right status.

use serde_json::json;

use crate::helpers::{Options, TestApp};

#[tokio::test]
async fn malformed_json_and_wrong_types_are_400() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Never drained: the answers are what it checks.
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let cases = [
        ("/applications".to_owned(), "{\"name\": "),
        ("/applications".to_owned(), "{\"name\": 5}"),
        ("/applications".to_owned(), "[\"name\"]"),
        ("/applications".to_owned(), "null"),
        (format!("/applications/{token}/chats"), "{\"title\": false}"),
        (
            format!("/applications/{token}/chats/{chat}/messages"),
            "{\"body\": {}}",
        ),
        (
            format!("/applications/{token}/chats/{chat}/messages"),
            "not json",
        ),
    ];
    for (path, body) in cases {
        let request = app
            .client
            .post(app.url(&path))
            .header("content-type", "application/json")
            .body(body);
        app.send(request).await.assert_problem(400);
    }
    assert_eq!(app.stream_len().await, 1, "only the chat was queued");
}

#[tokio::test]
async fn unknown_routes_are_404() {
    let app = TestApp::spawn().await;
    let reply = app.get("/nothing/here").await;
    assert_eq!(reply.assert_problem(404)["type"], "/problems/not-found");
}

#[tokio::test]
async fn wrong_methods_are_405_with_allow() {
    let app = TestApp::spawn().await;
    let reply = app.send(app.client.delete(app.url("/applications"))).await;
    reply.assert_problem(405);
    let allow = reply.header("allow").unwrap();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = TestApp::with(Options {
        body_limit: Some(1024),
        ..Options::default()
    })
    .await;
    let reply = app
        .post("/applications", json!({"name": "x".repeat(2000)}))
        .await;
    reply.assert_problem(413);
    assert_eq!(app.scalar("SELECT COUNT(*) FROM applications").await, 0);
}

#[tokio::test]
async fn non_json_bodies_are_415() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Never drained: the answers are what it checks.
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    for path in [
        "/applications".to_owned(),
        format!("/applications/{token}/chats"),
        format!("/applications/{token}/chats/{chat}/messages"),
    ] {
        let request = app
            .client
            .post(app.url(&path))
            .header("content-type", "text/plain")
            .body("name=x");
        app.send(request).await.assert_problem(415);
    }
    let no_type = app
        .client
        .post(app.url("/applications"))
        .body("{\"name\":\"x\"}");
    app.send(no_type).await.assert_problem(415);
}

#[tokio::test]
async fn path_numbers_must_be_positive_integers_in_plain_digits() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Never drained: the answers are what it checks.
    let token = app.application("a").await;
    app.chat(&token).await;
    // Chat 1 exists, but only `1` names it.
    for bad in [
        "0",
        "-1",
        "abc",
        "1.5",
        "99999999999999999999999",
        "+1",
        "%2B1",
        "01",
        "0001",
    ] {
        app.get(&format!("/applications/{token}/chats/{bad}"))
            .await
            .assert_problem(400);
        app.get(&format!("/applications/{token}/chats/1/messages/{bad}"))
            .await
            .assert_problem(400);
        app.post(
            &format!("/applications/{token}/chats/{bad}/messages"),
            json!({"body": "x"}),
        )
        .await
        .assert_problem(400);
    }
    assert_eq!(app.stream_len().await, 1, "only the chat's create");
}
