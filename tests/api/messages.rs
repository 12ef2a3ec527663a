use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn a_message_can_be_posted_right_after_its_chat_201() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let reply = app
        .post(
            &format!("/applications/{token}/chats/{chat}/messages"),
            json!({"body": "hi"}),
        )
        .await;
    assert_eq!(reply.status, 201);
    assert_eq!(
        reply.header("location"),
        Some(format!("/applications/{token}/chats/{chat}/messages/1").as_str())
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
        ["body", "chat_number", "created_at", "number", "updated_at"]
    );
    assert_eq!(app.scalar("SELECT COUNT(*) FROM messages").await, 0);

    let path = format!("/applications/{token}/chats/{chat}/messages/1");
    assert_eq!(
        app.get(&path).await.body,
        reply.body,
        "served before persistence"
    );
    app.drain().await;
    assert_eq!(app.scalar("SELECT COUNT(*) FROM messages").await, 1);
    assert_eq!(app.get(&path).await.body, reply.body, "served from MySQL");
}

#[tokio::test]
async fn messages_are_numbered_from_one_per_chat() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Never drained: the answers are what it checks.
    let token = app.application("a").await;
    let (one, two) = (app.chat(&token).await, app.chat(&token).await);
    assert_eq!(app.message(&token, one, "a").await, 1);
    assert_eq!(app.message(&token, one, "b").await, 2);
    assert_eq!(app.message(&token, two, "c").await, 1);
}

#[tokio::test]
async fn invalid_messages_are_rejected_and_nothing_is_queued() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Never drained: the answers are what it checks.
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let before = app.stream_len().await;
    let path = format!("/applications/{token}/chats/{chat}/messages");
    for body in [
        json!({}),
        json!({"body": ""}),
        json!({"body": " "}),
        json!({"body": "x".repeat(65_536)}),
    ] {
        let reply = app.post(&path, body).await;
        assert_eq!(reply.assert_problem(422)["errors"][0]["field"], "body");
    }
    assert_eq!(
        app.post(&path, json!({"body": "x".repeat(65_535)}))
            .await
            .status,
        201
    );
    app.post(
        &format!("/applications/{token}/chats/2/messages"),
        json!({"body": "x"}),
    )
    .await
    .assert_problem(404);
    app.post(
        "/applications/unknown/chats/1/messages",
        json!({"body": "x"}),
    )
    .await
    .assert_problem(404);
    assert_eq!(app.stream_len().await, before + 1);
}

#[tokio::test]
async fn messages_are_listed_in_number_order_with_pagination() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let other = app.chat(&token).await;
    for i in 1..=3 {
        app.message(&token, chat, &format!("m{i}")).await;
    }
    app.message(&token, other, "elsewhere").await;
    app.drain().await;
    let base = format!("/applications/{token}/chats/{chat}/messages");
    let page = app.get(&format!("{base}?limit=2")).await;
    let bodies: Vec<&str> = page
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["m1", "m2"]);
    assert_eq!(
        page.header("link"),
        Some(format!("<{base}?limit=2&after=2>; rel=\"next\"").as_str())
    );
    let rest = app.get(&format!("{base}?limit=2&after=2")).await;
    assert_eq!(rest.body[0]["body"], "m3");
    assert!(rest.header("link").is_none());
    app.get(&format!("/applications/{token}/chats/9/messages"))
        .await
        .assert_problem(404);
    app.get(&format!("{base}?limit=5000"))
        .await
        .assert_problem(400);
}

#[tokio::test]
async fn patch_and_put_replace_the_body() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    app.message(&token, chat, "original").await;
    let path = format!("/applications/{token}/chats/{chat}/messages/1");
    let patched = app.patch(&path, json!({"body": "edited"})).await;
    assert_eq!(
        (patched.status.as_u16(), patched.body["body"].as_str()),
        (200, Some("edited"))
    );
    assert_eq!(app.get(&path).await.body["body"], "edited");
    app.drain().await;
    let put = app.put(&path, json!({"body": "again"})).await;
    assert_eq!(put.body["body"], "again");
    assert_eq!(
        app.get(&path).await.body["body"],
        "again",
        "pending update over a persisted row"
    );
    app.patch(&path, json!({"body": ""}))
        .await
        .assert_problem(422);
    app.patch(
        &format!("/applications/{token}/chats/{chat}/messages/7"),
        json!({"body": "x"}),
    )
    .await
    .assert_problem(404);
    app.drain().await;
    let body: String = sqlx::query_scalar("SELECT body FROM messages")
        .fetch_one(&app.store.mysql)
        .await
        .unwrap();
    assert_eq!(body, "again");
}

#[tokio::test]
async fn sequential_updates_end_with_the_last_one() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    app.message(&token, chat, "v0").await;
    let path = format!("/applications/{token}/chats/{chat}/messages/1");
    for i in 1..=50 {
        app.patch(&path, json!({"body": format!("v{i}")})).await;
        if i % 7 == 0 {
            app.drain().await; // some persisted in between, some batched together
        }
    }
    app.drain().await;
    assert_eq!(app.get(&path).await.body["body"], "v50");
}

/// The numbers and bodies of a page, and its `Link` header.
async fn page(app: &TestApp, path: &str) -> (Vec<(u64, String)>, Option<String>) {
    let reply = app.get(path).await;
    assert_eq!(reply.status, 200, "{path}: {}", reply.body);
    let items = reply
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["number"].as_u64().unwrap(),
                m["body"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (items, reply.header("link").map(str::to_owned))
}

/// The URL of a `Link: <...>; rel="next"` header.
fn next_of(link: &str) -> String {
    link.trim_start_matches('<')
        .split('>')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn lists_show_accepted_messages_at_once_in_both_orders() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    for i in 1..=3 {
        app.message(&token, chat, &format!("m{i}")).await;
    }
    app.drain().await;
    // Persisted 1-3; then 4-6 accepted but not persisted, and 2 updated (pending).
    for i in 4..=6 {
        app.message(&token, chat, &format!("m{i}")).await;
    }
    let base = format!("/applications/{token}/chats/{chat}/messages");
    app.patch(&format!("{base}/2"), json!({"body": "m2 edited"}))
        .await;

    let (items, link) = page(&app, &format!("{base}?order=desc&limit=4")).await;
    assert_eq!(
        items,
        [
            (6, "m6".into()),
            (5, "m5".into()),
            (4, "m4".into()),
            (3, "m3".into())
        ]
    );
    let next = next_of(&link.expect("a next page"));
    assert_eq!(next, format!("{base}?order=desc&limit=4&before=3"));
    let (items, link) = page(&app, &next).await;
    assert_eq!(items, [(2, "m2 edited".into()), (1, "m1".into())]);
    assert_eq!(link, None, "the oldest page has no next");

    let (items, link) = page(&app, &format!("{base}?limit=4")).await;
    let numbers: Vec<u64> = items.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [1, 2, 3, 4]);
    assert_eq!(
        items[1].1, "m2 edited",
        "a pending update wins over its row"
    );
    let (items, link) = page(&app, &next_of(&link.unwrap())).await;
    assert_eq!(items, [(5, "m5".into()), (6, "m6".into())]);
    assert_eq!(link, None);

    // The same pages once everything is persisted.
    app.drain().await;
    let (items, _) = page(&app, &format!("{base}?order=desc&limit=10")).await;
    let numbers: Vec<u64> = items.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [6, 5, 4, 3, 2, 1]);
    assert_eq!(items[4].1, "m2 edited");
}

#[tokio::test]
async fn a_cursor_of_the_other_order_is_a_400() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Never drained: the answers are what it checks.
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let base = format!("/applications/{token}/chats/{chat}/messages");
    for query in [
        "order=desc&after=1",
        "before=3",
        "order=asc&before=3",
        "order=sideways",
    ] {
        app.get(&format!("{base}?{query}"))
            .await
            .assert_problem(400);
    }
    app.get(&format!("/applications/{token}/chats?before=2"))
        .await
        .assert_problem(400);
    app.get(&format!(
        "/applications/{token}/chats/{}/messages?order=desc",
        chat + 1
    ))
    .await
    .assert_problem(404);
}

/// A second API process over the same stores, with a read cache of its own.
async fn second_api(app: &TestApp) -> String {
    let config = chat_system::config::ApiConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        body_limit: 256 * 1024,
        request_timeout: std::time::Duration::from_secs(10),
        header_read_timeout: std::time::Duration::from_secs(10),
        keep_alive_timeout: std::time::Duration::from_secs(75),
        max_connections: 100,
        events_max_subscribers: 10,
        read_cache_size: 16 << 20,
        admin_api_key: None,
    };
    let server =
        chat_system::startup::ApiServer::build(app.store.clone(), app.search.clone(), &config)
            .await
            .expect("build");
    let base = format!("http://{}", server.local_addr());
    tokio::spawn(server.run(std::future::pending()));
    base
}

#[tokio::test]
async fn a_repeated_read_of_a_persisted_message_is_served_without_mysql() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    app.message(&token, chat, "as sent").await;
    app.drain().await;
    app.message(&token, chat, "second").await;
    let path = format!("/applications/{token}/chats/{chat}/messages/1");
    let list = format!("/applications/{token}/chats/{chat}/messages");
    assert_eq!(app.get(&path).await.body["body"], "as sent");
    // A page with a pending message (2) reads the persisted one (1) from MySQL; once 2
    // is persisted, the page reads MySQL again and keeps both.
    assert_eq!(page(&app, &list).await.0.len(), 2);
    app.drain().await;
    assert_eq!(page(&app, &list).await.0.len(), 2);
    // Changed behind the API's back (never done in production): the copies still
    // answer, which shows the repeated reads did not reach MySQL.
    sqlx::query("UPDATE messages SET body = 'changed in MySQL only' WHERE number = 1")
        .execute(&app.store.mysql)
        .await
        .unwrap();
    assert_eq!(app.get(&path).await.body["body"], "as sent");
    let (items, _) = page(&app, &list).await;
    assert_eq!(items, [(1, "as sent".to_owned()), (2, "second".to_owned())]);
}

#[tokio::test]
async fn an_update_through_any_api_process_is_never_hidden_by_another_ones_copy() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    for body in ["one", "two"] {
        app.message(&token, chat, body).await;
    }
    app.drain().await;
    let (one, two) = (
        format!("/applications/{token}/chats/{chat}/messages/1"),
        format!("/applications/{token}/chats/{chat}/messages/2"),
    );
    // Both are read (and kept) by the test app's API process.
    let list = format!("/applications/{token}/chats/{chat}/messages");
    assert_eq!(app.get(&one).await.body["body"], "one");
    assert_eq!(app.get(&two).await.body["body"], "two");
    assert_eq!(page(&app, &list).await.0.len(), 2);
    // Another process updates message 1; once it is persisted there is no pending
    // record left to serve, only the row.
    let other = second_api(&app).await;
    let reply = app
        .client
        .patch(format!("{other}{one}"))
        .json(&json!({"body": "one, edited"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(app.get(&one).await.body["body"], "one, edited", "pending");
    // A page read while the update is pending reads the old row of message 1 from
    // MySQL: it must not keep it.
    assert_eq!(page(&app, &list).await.0[0].1, "one, edited");
    app.drain().await;
    assert_eq!(app.get(&one).await.body["body"], "one, edited", "persisted");
    assert_eq!(app.get(&two).await.body["body"], "two");
    assert_eq!(
        page(&app, &list).await.0,
        [(1, "one, edited".to_owned()), (2, "two".to_owned())]
    );
    // The chat's update mark outlives every copy taken before it, and no longer than
    // its lifetime (which bounds the marks' memory).
    let mark = app.store.queue.keys.message_update_mark(&token, chat);
    let ttl: i64 = redis::cmd("TTL")
        .arg(&mark)
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    let max_age = chat_system::store::read_cache::MAX_AGE.as_secs() as i64;
    let lifetime = chat_system::store::read_cache::UPDATE_MARK_LIFETIME.as_secs() as i64;
    assert!(
        ttl > max_age && ttl <= lifetime,
        "mark {mark} expires in {ttl} s"
    );
}

#[tokio::test]
async fn concurrent_reads_share_statements_and_each_gets_its_own_rows() {
    use chat_system::store::MessageReads;
    use chat_system::store::mysql::MessageRange;
    let mut app = TestApp::spawn().await;
    // Two applications of three chats of 12 messages each.
    let mut chats = Vec::new();
    for name in ["a", "b"] {
        let token = app.application(name).await;
        for _ in 0..3 {
            let chat = app.chat(&token).await;
            for n in 1..=12 {
                app.message(&token, chat, &format!("{name}{chat}.{n}"))
                    .await;
            }
            chats.push((token.clone(), name, chat));
        }
    }
    app.drain().await;
    let mut ids = Vec::new();
    for (token, name, chat) in &chats {
        ids.push((app.application_id(token).await, *name, *chat));
    }
    // Each chat of `b` made long enough that its rows span pages of the primary key, by
    // 4,000 more rows written straight to MySQL (never done in production): MariaDB then
    // reads a few rows by range rather than the table whole.
    for &(app_id, _, chat) in &ids[3..] {
        let mut insert = sqlx::QueryBuilder::<sqlx::MySql>::new(
            "INSERT INTO messages (application_id, chat_number, number, body, version, created_at, updated_at) ",
        );
        insert.push_values(13..=4000u64, |mut row, n| {
            row.push_bind(app_id)
                .push_bind(chat)
                .push_bind(n)
                .push_bind("filler")
                .push_bind(1u64)
                .push("NOW(6)")
                .push("NOW(6)");
        });
        insert.build().execute(&app.store.mysql).await.unwrap();
    }
    // Reads written from the highest key down.
    let asked: Vec<(usize, u64, u64)> = (0..64u64)
        .map(|i| {
            let which = ids.len() - 1 - (i as usize % ids.len());
            let lo = 12 - i % 12;
            // Single messages, and ranges overlapping others.
            let hi = if i % 3 == 0 { lo } else { (lo + i % 5).min(12) };
            (which, lo, hi)
        })
        .collect();
    let range = |&(which, lo, hi): &(usize, u64, u64)| {
        let (app_id, _, chat) = ids[which];
        MessageRange {
            app_id,
            chat,
            lo,
            hi,
        }
    };
    let expected = |&(which, lo, hi): &(usize, u64, u64)| -> Vec<String> {
        let (_, name, chat) = ids[which];
        (lo..=hi.min(12))
            .map(|n| format!("{name}{chat}.{n}"))
            .collect()
    };
    // Through the coalescer, one statement out at a time: the reads queued behind it go
    // together, and each gets exactly its own rows.
    let reads = MessageReads::new(app.store.mysql.clone(), 1);
    let answers = futures_util::future::join_all(asked.iter().map(|a| reads.range(range(a)))).await;
    for (a, answer) in asked.iter().zip(answers) {
        let got: Vec<String> = answer.unwrap().into_iter().map(|m| m.body).collect();
        assert_eq!(got, expected(a), "{a:?}");
    }
    let statements = reads.statements();
    assert!(
        statements <= 64 / chat_system::store::coalesce::MAX_BATCH as u64 + 2,
        "64 reads took {statements} statements"
    );
    let (app_id, _, chat) = ids[0];
    assert!(reads.one(app_id, chat, 13).await.unwrap().is_none());
}
