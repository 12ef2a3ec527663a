use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn chats_are_numbered_from_one_per_application() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Never drained: the answers are what it checks.
    let (a, b) = (app.application("a").await, app.application("b").await);
    assert_eq!(app.chat(&a).await, 1);
    assert_eq!(app.chat(&a).await, 2);
    assert_eq!(app.chat(&b).await, 1);
}

#[tokio::test]
async fn create_answers_201_with_location_and_no_mysql_write() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Never drained: nothing reaches MySQL before a worker runs.
    let token = app.application("a").await;
    let reply = app
        .post(
            &format!("/applications/{token}/chats"),
            json!({"title": "t"}),
        )
        .await;
    assert_eq!(reply.status, 201);
    assert_eq!(
        reply.header("location"),
        Some(format!("/applications/{token}/chats/1").as_str())
    );
    let mut keys: Vec<&str> = reply
        .body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "created_at",
            "messages_count",
            "number",
            "title",
            "updated_at"
        ]
    );
    assert_eq!(reply.body["title"], "t");
    assert_eq!(
        app.scalar("SELECT COUNT(*) FROM chats").await,
        0,
        "the API does not write chats"
    );
    assert_eq!(app.stream_len().await, 1);
}

#[tokio::test]
async fn an_empty_body_is_allowed() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Never drained: the answers are what it checks.
    let token = app.application("a").await;
    let bare = app
        .client
        .post(app.url(&format!("/applications/{token}/chats")));
    let reply = app.send(bare).await;
    assert_eq!(reply.status, 201);
    assert_eq!(reply.body["title"], serde_json::Value::Null);
}

#[tokio::test]
async fn a_body_that_is_not_empty_must_be_a_json_object() {
    let app = TestApp::spawn().await;
    let token = app.application("a").await;
    for body in ["\x0c", " ", "\n", "null", "[]"] {
        let request = app
            .client
            .post(app.url(&format!("/applications/{token}/chats")))
            .header("content-type", "application/json")
            .body(body);
        app.send(request).await.assert_problem(400);
    }
    assert_eq!(app.stream_len().await, 0);
}

#[tokio::test]
async fn invalid_chats_are_rejected_and_nothing_is_queued() {
    let app = TestApp::spawn().await;
    let token = app.application("a").await;
    let reply = app
        .post(
            &format!("/applications/{token}/chats"),
            json!({"title": "x".repeat(256)}),
        )
        .await;
    assert_eq!(reply.assert_problem(422)["errors"][0]["field"], "title");
    app.post("/applications/unknown/chats", json!({}))
        .await
        .assert_problem(404);
    assert_eq!(app.stream_len().await, 0);
}

#[tokio::test]
async fn a_chat_is_readable_right_after_its_201_and_after_persistence() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let created = app
        .post(
            &format!("/applications/{token}/chats"),
            json!({"title": "t"}),
        )
        .await;
    let path = format!("/applications/{token}/chats/1");
    let pending = app.get(&path).await;
    assert_eq!(pending.status, 200);
    assert_eq!(pending.body, created.body);

    app.drain().await;
    assert_eq!(app.scalar("SELECT COUNT(*) FROM chats").await, 1);
    let record = app.store.queue.lookup_chat(&token, 1).await.unwrap();
    assert!(
        record.pending.is_none(),
        "the pending record is released once persisted"
    );
    let persisted = app.get(&path).await;
    assert_eq!(persisted.body, created.body, "same resource from MySQL");
    app.get(&format!("/applications/{token}/chats/2"))
        .await
        .assert_problem(404);
}

#[tokio::test]
async fn chats_are_listed_in_number_order_with_pagination() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    for _ in 0..5 {
        app.chat(&token).await;
    }
    app.drain().await;
    let first = app
        .get(&format!("/applications/{token}/chats?limit=2"))
        .await;
    let numbers: Vec<u64> = first
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2]);
    assert_eq!(
        first.header("link"),
        Some(format!("</applications/{token}/chats?limit=2&after=2>; rel=\"next\"").as_str())
    );
    let last = app
        .get(&format!("/applications/{token}/chats?limit=2&after=4"))
        .await;
    assert_eq!(last.body.as_array().unwrap().len(), 1);
    assert!(last.header("link").is_none());
    for query in [
        "limit=0",
        "limit=1001",
        "after=-1",
        "after=x",
        "after=%2B2",
        "after=02",
        "limit=+2",
    ] {
        app.get(&format!("/applications/{token}/chats?{query}"))
            .await
            .assert_problem(400);
    }
    app.get("/applications/unknown/chats")
        .await
        .assert_problem(404);
}

#[tokio::test]
async fn patch_and_put_update_the_title() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    app.chat(&token).await;
    let path = format!("/applications/{token}/chats/1");
    let patched = app.patch(&path, json!({"title": "first"})).await;
    assert_eq!(patched.status, 200);
    assert_eq!(patched.body["title"], "first");
    assert_eq!(
        app.get(&path).await.body["title"],
        "first",
        "read your update"
    );
    let put = app.put(&path, json!({"title": null})).await;
    assert_eq!(put.body["title"], serde_json::Value::Null);
    let unchanged = app.patch(&path, json!({})).await;
    assert_eq!(unchanged.body["title"], serde_json::Value::Null);
    app.patch(&path, json!({"title": "y".repeat(256)}))
        .await
        .assert_problem(422);
    app.patch(
        &format!("/applications/{token}/chats/9"),
        json!({"title": "z"}),
    )
    .await
    .assert_problem(404);
    app.drain().await;
    assert_eq!(app.get(&path).await.body["title"], serde_json::Value::Null);
}

#[tokio::test]
async fn an_update_right_after_the_create_is_kept() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    app.chat(&token).await;
    let path = format!("/applications/{token}/chats/1");
    app.patch(&path, json!({"title": "renamed"})).await;
    app.drain().await;
    let title: Option<String> = sqlx::query_scalar("SELECT title FROM chats WHERE number = 1")
        .fetch_one(&app.store.mysql)
        .await
        .unwrap();
    assert_eq!(title.as_deref(), Some("renamed"));
}

#[tokio::test]
async fn chats_are_listed_newest_first_as_soon_as_accepted() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Never drained: lists of accepted chats are what it checks.
    let token = app.application("a").await;
    for _ in 0..5 {
        app.chat(&token).await;
    }
    // Nothing persisted yet.
    let reply = app
        .get(&format!("/applications/{token}/chats?order=desc&limit=2"))
        .await;
    assert_eq!(reply.status, 200);
    let numbers: Vec<u64> = reply
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [5, 4]);
    assert_eq!(
        reply.header("link"),
        Some(
            format!("</applications/{token}/chats?order=desc&limit=2&before=4>; rel=\"next\"")
                .as_str()
        )
    );
    assert_eq!(app.scalar("SELECT COUNT(*) FROM chats").await, 0);
}
