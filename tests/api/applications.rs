use serde_json::json;

use crate::helpers::{Options, TestApp};

#[tokio::test]
async fn create_returns_the_application_with_a_location() {
    let app = TestApp::spawn().await;
    let reply = app.post("/applications", json!({"name": "demo"})).await;
    assert_eq!(reply.status, 201);
    let token = reply.body["token"].as_str().unwrap();
    assert_eq!(
        reply.header("location"),
        Some(format!("/applications/{token}").as_str())
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
        ["chats_count", "created_at", "name", "token", "updated_at"]
    );
    assert_eq!(reply.body["name"], "demo");
    assert_eq!(reply.body["chats_count"], 0);
    let created = reply.body["created_at"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(created).is_ok(),
        "{created}"
    );
    assert!(created.ends_with('Z'), "UTC: {created}");

    let shown = app.get(&format!("/applications/{token}")).await;
    assert_eq!(shown.status, 200);
    assert_eq!(shown.body, reply.body);
}

#[tokio::test]
async fn tokens_are_long_url_safe_and_unique() {
    let app = TestApp::spawn().await;
    let mut seen = std::collections::HashSet::new();
    for i in 0..100 {
        let token = app.application(&format!("app {i}")).await;
        // 32 base64url characters carry 192 bits.
        assert_eq!(token.len(), 32, "{token}");
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert!(seen.insert(token), "duplicate token");
    }
}

#[tokio::test]
async fn client_supplied_fields_are_ignored() {
    let app = TestApp::spawn().await;
    let reply = app
        .post(
            "/applications",
            json!({"name": "n", "token": "mine", "id": 7, "chats_count": 9, "extra": true}),
        )
        .await;
    assert_eq!(reply.status, 201);
    assert_ne!(reply.body["token"], "mine");
    assert_eq!(reply.body["chats_count"], 0);
    assert!(reply.body.get("id").is_none());
}

#[tokio::test]
async fn invalid_names_are_rejected_and_nothing_is_created() {
    let app = TestApp::spawn().await;
    for body in [
        json!({}),
        json!({"name": null}),
        json!({"name": ""}),
        json!({"name": "   "}),
        json!({"name": "x".repeat(256)}),
    ] {
        let reply = app.post("/applications", body.clone()).await;
        let problem = reply.assert_problem(422);
        assert_eq!(problem["errors"][0]["field"], "name", "{body}");
    }
    assert_eq!(app.scalar("SELECT COUNT(*) FROM applications").await, 0);
    let ok = app
        .post("/applications", json!({"name": "é".repeat(255)}))
        .await;
    assert_eq!(ok.status, 201);
}

#[tokio::test]
async fn unknown_tokens_are_not_found() {
    let app = TestApp::spawn().await;
    app.get("/applications/doesnotexist")
        .await
        .assert_problem(404);
    app.get("/applications/bad%20token")
        .await
        .assert_problem(404);
    app.patch("/applications/doesnotexist", json!({"name": "x"}))
        .await
        .assert_problem(404);
}

#[tokio::test]
async fn patch_and_put_rename() {
    let app = TestApp::spawn().await;
    let token = app.application("before").await;
    let original = app.get(&format!("/applications/{token}")).await.body;
    let patched = app
        .patch(
            &format!("/applications/{token}"),
            json!({"name": "patched"}),
        )
        .await;
    assert_eq!(patched.status, 200);
    assert_eq!(patched.body["name"], "patched");
    assert_eq!(patched.body["created_at"], original["created_at"]);
    assert_ne!(patched.body["updated_at"], original["updated_at"]);
    let put = app
        .put(&format!("/applications/{token}"), json!({"name": "put"}))
        .await;
    assert_eq!(put.status, 200);
    assert_eq!(
        app.get(&format!("/applications/{token}")).await.body["name"],
        "put"
    );
    app.patch(&format!("/applications/{token}"), json!({"name": ""}))
        .await
        .assert_problem(422);
    assert_eq!(
        app.get(&format!("/applications/{token}")).await.body["name"],
        "put"
    );
}

#[tokio::test]
async fn the_list_is_paginated_with_link_headers() {
    let app = TestApp::with_admin_key().await;
    let mut tokens = Vec::new();
    for i in 0..5 {
        tokens.push(app.application(&format!("a{i}")).await);
    }
    let mut seen = Vec::new();
    let mut path = "/applications?limit=2".to_owned();
    loop {
        let reply = app.get_as_admin(&path).await;
        assert_eq!(reply.status, 200);
        let page = reply.body.as_array().unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|a| a["token"].as_str().unwrap().to_owned()));
        match reply.header("link") {
            Some(link) => {
                assert!(link.ends_with("; rel=\"next\""), "{link}");
                path = link[1..link.find('>').unwrap()].to_owned();
                assert!(path.starts_with("/applications?"), "{path}");
            }
            None => break,
        }
    }
    assert_eq!(seen, tokens, "creation order, each once");
    let all = app.get_as_admin("/applications").await;
    assert_eq!(all.body.as_array().unwrap().len(), 5);
    assert!(all.header("link").is_none());
}

#[tokio::test]
async fn bad_pagination_is_a_400() {
    let app = TestApp::with_admin_key().await;
    for query in [
        "limit=0",
        "limit=1001",
        "limit=abc",
        "limit=-1",
        "after=unknown-cursor",
        // Not a token at all (bytes MySQL cannot even compare with a token).
        "after=%13%F3%B8%AD%9D.",
        "after=%C3%A9t%C3%A9",
        // One spelling per number.
        "limit=%2B5",
        "limit=05",
    ] {
        app.get_as_admin(&format!("/applications?{query}"))
            .await
            .assert_problem(400);
    }
    assert_eq!(
        app.get_as_admin("/applications?limit=1000").await.status,
        200
    );
}

#[tokio::test]
async fn the_admin_key_guards_the_list() {
    let app = TestApp::with(Options {
        admin_api_key: Some("s3cret".into()),
        ..Options::default()
    })
    .await;
    app.application("a").await;
    let missing = app.get("/applications").await;
    assert_eq!(
        missing.assert_problem(401)["type"],
        "/problems/unauthorized"
    );
    for wrong in ["nope", "", "test-admin-key-and-more", "s3cre"] {
        let request = app.client.get(app.url("/applications")).bearer_auth(wrong);
        app.send(request).await.assert_problem(401);
    }
    let right = app
        .client
        .get(app.url("/applications"))
        .bearer_auth("s3cret");
    let reply = app.send(right).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn without_an_admin_key_the_list_is_disabled_and_reveals_nothing() {
    let app = TestApp::spawn().await;
    let token = app.application("a").await;
    for request in [
        app.client.get(app.url("/applications")),
        app.client.get(app.url("/applications")).bearer_auth(""),
        app.client
            .get(app.url("/applications"))
            .bearer_auth("anything"),
    ] {
        let reply = app.send(request).await;
        let problem = reply.assert_problem(403);
        assert_eq!(problem["type"], "/problems/listing-disabled");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("ADMIN_API_KEY")
        );
        assert!(!reply.body.to_string().contains(&token));
    }
}
