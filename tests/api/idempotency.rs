//! `Idempotency-Key` on the three create endpoints.

use serde_json::{Value, json};

use crate::helpers::{Reply, TestApp};

async fn post_with_key(app: &TestApp, path: &str, key: &str, body: Value) -> Reply {
    app.send(
        app.client
            .post(app.url(path))
            .header("Idempotency-Key", key)
            .json(&body),
    )
    .await
}

#[tokio::test]
async fn application_retries_return_the_original_answer() {
    let app = TestApp::spawn().await;
    let first = post_with_key(
        &app,
        "/applications",
        "key-00000000000-k1",
        json!({"name": "a"}),
    )
    .await;
    let again = post_with_key(
        &app,
        "/applications",
        "key-00000000000-k1",
        json!({"name": "a"}),
    )
    .await;
    assert_eq!((first.status.as_u16(), again.status.as_u16()), (201, 201));
    assert_eq!(first.body, again.body);
    assert_eq!(first.header("location"), again.header("location"));
    assert_eq!(app.scalar("SELECT COUNT(*) FROM applications").await, 1);

    let other_body = post_with_key(
        &app,
        "/applications",
        "key-00000000000-k1",
        json!({"name": "b"}),
    )
    .await;
    assert_eq!(
        other_body.assert_problem(422)["errors"][0]["field"],
        "Idempotency-Key"
    );
    app.post("/applications", json!({"name": "a"})).await;
    app.post("/applications", json!({"name": "a"})).await;
    assert_eq!(
        app.scalar("SELECT COUNT(*) FROM applications").await,
        3,
        "no key, no dedup"
    );
}

#[tokio::test]
async fn chat_retries_return_the_same_number_and_queue_nothing() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Never drained: the answers are what it checks.
    let token = app.application("a").await;
    let path = format!("/applications/{token}/chats");
    let first = post_with_key(&app, &path, "key-00000000000-c1", json!({"title": "t"})).await;
    // Same content, different spelling of the JSON: still the same request.
    let again = app
        .send(
            app.client
                .post(app.url(&path))
                .header("Idempotency-Key", "key-00000000000-c1")
                .header("content-type", "application/json")
                .body("{ \"title\" : \"t\", \"ignored\": 1 }"),
        )
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(first.body, again.body);
    assert_eq!(app.stream_len().await, 1);
    post_with_key(&app, &path, "key-00000000000-c1", json!({"title": "other"}))
        .await
        .assert_problem(422);
    assert_eq!(
        post_with_key(&app, &path, "key-00000000000-c2", json!({"title": "t"}))
            .await
            .body["number"],
        2
    );
}

#[tokio::test]
async fn concurrent_message_retries_create_one_message() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let path = format!("/applications/{token}/chats/{chat}/messages");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let request = app
            .client
            .post(app.url(&path))
            .header("Idempotency-Key", "key-00000000000-m1")
            .json(&json!({"body": "once"}));
        tasks.spawn(async move { request.send().await.unwrap().json::<Value>().await.unwrap() });
    }
    let mut numbers = std::collections::HashSet::new();
    while let Some(body) = tasks.join_next().await {
        numbers.insert(body.unwrap()["number"].as_u64().unwrap());
    }
    assert_eq!(numbers, [1].into_iter().collect());
    // The key is scoped to the chat: another chat may use it for its own message.
    let other = app.chat(&token).await;
    let reply = post_with_key(
        &app,
        &format!("/applications/{token}/chats/{other}/messages"),
        "key-00000000000-m1",
        json!({"body": "once"}),
    )
    .await;
    assert_eq!(reply.status, 201);
    app.drain().await;
    assert_eq!(app.scalar("SELECT COUNT(*) FROM messages").await, 2);
}

#[tokio::test]
async fn malformed_keys_are_rejected() {
    let app = TestApp::spawn().await;
    // Short keys collide by accident between clients: at least 16 characters.
    for key in [
        "",
        "k1",
        "fifteen-chars-k",
        "with space with space",
        &"k".repeat(256),
    ] {
        post_with_key(&app, "/applications", key, json!({"name": "a"}))
            .await
            .assert_problem(400);
    }
    assert_eq!(app.scalar("SELECT COUNT(*) FROM applications").await, 0);
}
