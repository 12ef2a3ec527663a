//! Search through the HTTP API, on the embedded index (the default backend).

use std::time::Duration;

use serde_json::json;

use chat_system::config::SearchConfig;
use chat_system::search::identity::IndexGroup;
use chat_system::search::{MessageDoc, Search, SearchError, SearchQuery};
use chat_system::startup::build_worker;
use chat_system::worker::Role;

use crate::helpers::{TestApp, eventually, worker_config};

async fn search(app: &TestApp, token: &str, chat: u64, query: &str) -> Vec<String> {
    let reply = app
        .send(
            app.client
                .get(app.url(&format!(
                    "/applications/{token}/chats/{chat}/messages/search"
                )))
                .query(&[("q", query)]),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn matching_is_partial_case_insensitive_and_needs_every_term() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let other = app.chat(&token).await;
    for body in [
        "Hello World",
        "hello there",
        "say HELLO to the world",
        "nothing here",
        "abcd xbcde",
        "100% *sure* a_b",
    ] {
        app.message(&token, chat, body).await;
    }
    app.message(&token, other, "hello from another chat").await;
    app.drain().await;

    assert_eq!(
        search(&app, &token, chat, "ell").await,
        ["Hello World", "hello there", "say HELLO to the world"]
    );
    assert_eq!(
        search(&app, &token, chat, "hel wor").await,
        ["Hello World", "say HELLO to the world"]
    );
    assert_eq!(
        search(&app, &token, chat, "WORLD").await,
        ["Hello World", "say HELLO to the world"]
    );
    assert_eq!(
        search(&app, &token, chat, "lo th").await,
        ["hello there", "say HELLO to the world"],
        "terms match separately, anywhere"
    );
    assert_eq!(
        search(&app, &token, chat, "o").await.len(),
        4,
        "one-character terms"
    );
    assert_eq!(
        search(&app, &token, chat, "%").await,
        ["100% *sure* a_b"],
        "special characters are literal"
    );
    assert_eq!(
        search(&app, &token, chat, "*sure*").await,
        ["100% *sure* a_b"]
    );
    assert_eq!(search(&app, &token, chat, "a_b").await, ["100% *sure* a_b"]);
    assert_eq!(
        search(&app, &token, chat, "a*").await,
        Vec::<String>::new(),
        "`*` is not a wildcard"
    );
    assert_eq!(
        search(&app, &token, chat, "xyz hello").await,
        Vec::<String>::new(),
        "every term must match"
    );
    assert_eq!(
        search(&app, &token, chat, "abcde").await,
        Vec::<String>::new(),
        "the trigrams of `abcde` are all in `abcd xbcde`, but not together"
    );
    assert_eq!(
        search(&app, &token, other, "hello").await,
        ["hello from another chat"],
        "one chat only"
    );
}

/// Over HTTP: terms and bodies compared after Unicode NFKC case folding, bodies
/// returned as written, and the next page's link repeating the terms as sent (a folded
/// `¨` holds a space, which would split it into other terms).
#[tokio::test]
async fn matching_folds_unicode_and_the_next_link_keeps_the_terms_as_sent() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    for body in [
        "Straße ¨",
        "STRASSE ¨",
        "strasse ¨",
        "ΟΔΟΣ",
        "ﬁnance",
        "E\u{301}COLE",
    ] {
        app.message(&token, chat, body).await;
    }
    app.message(&token, chat, "strasse without the mark").await;
    app.drain().await;
    assert_eq!(search(&app, &token, chat, "οδος").await, ["ΟΔΟΣ"]);
    assert_eq!(search(&app, &token, chat, "FINANCE").await, ["ﬁnance"]);
    assert_eq!(
        search(&app, &token, chat, "\u{e9}cole").await,
        ["E\u{301}COLE"]
    );
    let base = format!("/applications/{token}/chats/{chat}/messages/search");
    let first = app
        .get(&format!("{base}?q=STRA%E1%BA%9EE+%C2%A8&limit=2"))
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.body,
        json!([first.body[0].clone(), first.body[1].clone()])
    );
    assert_eq!(first.body[0]["body"], "Straße ¨");
    let link = first.header("link").expect("a next page");
    assert!(link.contains("q=STRA%E1%BA%9EE+%C2%A8"), "{link}");
    let next = app.get(&link[1..link.find('>').unwrap()]).await;
    assert_eq!(next.body.as_array().unwrap().len(), 1);
    assert_eq!(next.body[0]["body"], "strasse ¨");
}

#[tokio::test]
async fn results_are_paginated_in_number_order() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    for i in 1..=7 {
        app.message(&token, chat, &format!("c++ match {i}")).await;
        // Found too if a `+` of the query were lost in the next page's link.
        app.message(&token, chat, "c match decoy").await;
    }
    app.drain().await;
    let base = format!("/applications/{token}/chats/{chat}/messages/search");
    let mut path = format!("{base}?q=C%2B%2B+Match&limit=3");
    let mut seen = Vec::new();
    loop {
        let reply = app.get(&path).await;
        assert_eq!(reply.status, 200);
        seen.extend(
            reply
                .body
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["body"].as_str().unwrap().to_owned()),
        );
        match reply.header("link") {
            Some(link) => path = link[1..link.find('>').unwrap()].to_owned(),
            None => break,
        }
    }
    let expected: Vec<String> = (1..=7).map(|i| format!("c++ match {i}")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn bad_searches_are_rejected() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Never drained: the answers are what it checks.
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let base = format!("/applications/{token}/chats/{chat}/messages/search");
    app.get(&base).await.assert_problem(400);
    app.get(&format!("{base}?q=%20%20"))
        .await
        .assert_problem(400);
    app.get(&format!("{base}?q=x&limit=0"))
        .await
        .assert_problem(400);
    // Above any number there can be (and above what Elasticsearch's `long` holds).
    app.get(&format!("{base}?q=x&after=9223372036854775808"))
        .await
        .assert_problem(400);
    app.get(&format!(
        "/applications/{token}/chats/9/messages/search?q=x"
    ))
    .await
    .assert_problem(404);
    app.get("/applications/unknown/chats/1/messages/search?q=x")
        .await
        .assert_problem(404);
}

#[tokio::test]
async fn a_search_reads_no_chat_row_and_answers_with_mysql_down() {
    let mut app = TestApp::with_proxies().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    app.message(&token, chat, "persisted before the outage")
        .await;
    app.drain().await;
    // The chat's message is found; the next chat number is not a chat.
    let answers = async |app: &TestApp| {
        assert_eq!(
            search(app, &token, chat, "outage").await,
            ["persisted before the outage"]
        );
        app.get(&format!(
            "/applications/{token}/chats/{}/messages/search?q=outage",
            chat + 1
        ))
        .await
        .assert_problem(404);
    };

    // Whether the chat exists comes from Redis (its counter), the matches from the index.
    app.mysql_proxy.as_ref().unwrap().cut();
    answers(&app).await;
    app.mysql_proxy.as_ref().unwrap().restore();

    // With the counter lost, MySQL says whether the chat exists.
    let _: () = redis::cmd("DEL")
        .arg(app.store.queue.keys.chat_counter(&token))
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    answers(&app).await;
}

#[tokio::test]
async fn an_updated_body_replaces_the_old_one() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    app.message(&token, chat, "first draft").await;
    app.drain().await;
    assert_eq!(search(&app, &token, chat, "draft").await, ["first draft"]);
    app.patch(
        &format!("/applications/{token}/chats/{chat}/messages/1"),
        json!({"body": "final text"}),
    )
    .await;
    app.drain().await;
    assert_eq!(
        search(&app, &token, chat, "draft").await,
        Vec::<String>::new()
    );
    assert_eq!(search(&app, &token, chat, "final").await, ["final text"]);
}

#[tokio::test]
async fn a_message_is_findable_within_seconds_of_its_201() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Only indexed: search is what it checks.
    let _indexer = app.spawn_indexer().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    app.message(&token, chat, "needle in a haystack").await;
    eventually(
        Duration::from_secs(3),
        "the message to be findable",
        || async { search(&app, &token, chat, "needle").await == ["needle in a haystack"] },
    )
    .await;
}

#[tokio::test]
async fn reindex_rebuilds_the_index_from_mysql() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    app.message(&token, chat, "alpha").await;
    app.message(&token, chat, "beta").await;
    // Persist only: the index group is left behind, as if search had been down.
    app.worker.drain().await.unwrap();
    assert_eq!(search(&app, &token, chat, "a").await, Vec::<String>::new());
    for _ in 0..2 {
        // Safe to re-run.
        chat_system::reindex::run(&app.store.mysql, &app.search, 1)
            .await
            .unwrap();
    }
    assert_eq!(search(&app, &token, chat, "a").await, ["alpha", "beta"]);
}

/// The app's index group, and the configuration of an embedded index in a directory of
/// its own, beside the app's.
fn group_and_dirs(app: &TestApp) -> (IndexGroup, impl Fn(&str) -> SearchConfig + use<>) {
    let group = IndexGroup::new(
        app.store.queue.conn(),
        app.store.queue.keys.search_index_id(),
    );
    let base = app.search_config.clone();
    let config = move |name: &str| SearchConfig {
        search_index_dir: base.search_index_dir.with_extension(name),
        ..base.clone()
    };
    (group, config)
}

/// A rebuilt index becomes the one the index group feeds (as `chat-system reindex`
/// does once it has rebuilt one): the index it replaces stops serving searches, and its
/// writer stops taking documents (they wait in the queue for the group's writer).
#[tokio::test]
async fn an_adopted_index_replaces_the_one_the_group_fed() {
    let app = TestApp::spawn().await;
    let (group, config) = group_and_dirs(&app);
    let (old_config, new_config) = (config("old"), config("new"));
    let old = Search::open(&old_config, true).await.unwrap();
    old.join(group.clone()).await.unwrap();
    assert!(old.can_index(), "the first writer claims the group");
    let doc = |number: u64| MessageDoc {
        token: "t".into(),
        chat: 1,
        number,
        body: "hello".into(),
        version: number,
        created_at: chrono::Utc::now(),
        updated_at: chrono::Utc::now(),
    };
    old.index(vec![doc(1)]).await.unwrap();
    let query = SearchQuery {
        token: "t".into(),
        chat: 1,
        terms: vec!["hello".into()],
        after: 0,
        limit: 10,
    };
    assert_eq!(old.search(query.clone()).await.unwrap().len(), 1);

    let rebuilt = Search::open(&new_config, true).await.unwrap();
    rebuilt.index(vec![doc(1), doc(2)]).await.unwrap();
    rebuilt.adopt(group.clone()).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the replaced index to refuse searches",
        || async {
            matches!(
                old.search(query.clone()).await,
                Err(SearchError::ForeignIndex(_))
            )
        },
    )
    .await;
    assert!(matches!(
        old.index(vec![doc(3)]).await,
        Err(SearchError::Unavailable(_))
    ));
    rebuilt.join(group).await.unwrap();
    assert!(rebuilt.can_index());
    assert_eq!(rebuilt.search(query).await.unwrap().len(), 2);
    drop((old, rebuilt));
    for dir in [old_config, new_config].map(|c| c.search_index_dir) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// An indexer whose index the group no longer feeds adds nothing, and loses nothing:
/// the batches it could not add wait (in the queue, and in the indexer while it runs),
/// and go into the index once the group feeds it again.
#[tokio::test]
async fn an_indexer_keeps_what_its_index_could_not_take_and_adds_it_once_back() {
    let mut app = TestApp::spawn().await;
    let (group, config) = group_and_dirs(&app);
    let (own_config, other_config) = (config("own"), config("other"));
    let own = Search::open(&own_config, true).await.unwrap();
    own.join(group.clone()).await.unwrap();
    let mut indexer = build_worker(
        app.store.clone(),
        &app.store_config,
        &worker_config(),
        Role::Index(own.clone()),
    )
    .await
    .unwrap();
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let query = SearchQuery {
        token: token.clone(),
        chat,
        terms: vec!["needle".into()],
        after: 0,
        limit: 10,
    };

    // Another index takes the group over.
    let other = Search::open(&other_config, true).await.unwrap();
    other.adopt(group.clone()).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "this index to learn that the group feeds another",
        || async { own.search(query.clone()).await.is_err() },
    )
    .await;
    for body in ["needle one", "needle two", "needle three"] {
        app.message(&token, chat, body).await;
    }
    app.worker.drain().await.unwrap();
    for _ in 0..2 {
        assert!(matches!(
            indexer.drain().await,
            Err(chat_system::worker::WorkerError::Search(
                SearchError::Unavailable(_)
            ))
        ));
    }

    // The group feeds this index again: what waited goes in.
    own.adopt(group).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "this index to serve again",
        || async { own.search(query.clone()).await.is_ok() },
    )
    .await;
    indexer.drain().await.unwrap();
    let found: Vec<String> = own
        .search(query)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert_eq!(found, ["needle one", "needle two", "needle three"]);
    drop((indexer, own, other));
    for dir in [own_config, other_config].map(|c| c.search_index_dir) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Every body matching `query`, across all pages.
async fn search_all(app: &TestApp, token: &str, chat: u64, query: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut after = 0;
    loop {
        let reply = app
            .send(
                app.client
                    .get(app.url(&format!(
                        "/applications/{token}/chats/{chat}/messages/search"
                    )))
                    .query(&[
                        ("q", query),
                        ("limit", "1000"),
                        ("after", &after.to_string()),
                    ]),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let page = reply.body.as_array().unwrap().clone();
        let Some(last) = page.last() else {
            return found;
        };
        after = last["number"].as_u64().unwrap();
        found.extend(page.iter().map(|m| m["body"].as_str().unwrap().to_owned()));
    }
}

/// A persisting worker with no patience for the indexer's lag (`INDEX_LAG_MAX` zero).
async fn impatient_persister(app: &TestApp) -> chat_system::worker::Worker {
    let mut config = worker_config();
    config.index_lag_max = Duration::ZERO;
    build_worker(app.store.clone(), &app.store_config, &config, Role::Persist)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_stopped_indexer_holds_no_stream_and_catches_up_from_mysql() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let messages = format!("/applications/{token}/chats/{chat}/messages");
    app.message(&token, chat, "early needle").await;
    app.drain().await;

    // The indexer stops; persistence goes on, with no patience for the indexer's lag.
    let mut persist = impatient_persister(&app).await;
    const N: usize = 2_000;
    for i in 0..N {
        app.message(&token, chat, &format!("needle {i}")).await;
    }
    let edited = app
        .patch(
            &format!("{messages}/1"),
            json!({"body": "early needle, edited"}),
        )
        .await;
    assert_eq!(edited.status, 200);
    persist.drain().await.unwrap();
    assert!(
        app.stream_len().await <= 1,
        "the stream is not held for the stopped indexer"
    );

    // The indexer comes back: what was trimmed it reads from MySQL.
    app.drain().await;
    let found = search_all(&app, &token, chat, "needle").await;
    assert_eq!(found.len(), N + 1);
    assert_eq!(found[0], "early needle, edited");
    assert!(found.contains(&format!("needle {}", N - 1)));

    // And it reads the stream again from there.
    app.message(&token, chat, "late needle").await;
    app.drain().await;
    assert_eq!(
        search(&app, &token, chat, "late needle").await,
        vec!["late needle".to_owned()]
    );
}

#[tokio::test]
async fn an_indexer_only_behind_on_entries_still_in_the_stream_has_no_gap() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    app.message(&token, chat, "first needle").await;
    app.drain().await;

    // Persistence moves on by one entry, with no patience for the indexer's lag; the
    // indexer has not read that entry yet, but it is still in the stream.
    let mut persist = impatient_persister(&app).await;
    app.message(&token, chat, "second needle").await;
    persist.drain().await.unwrap();
    let shard = app.store.queue.keys.shard_of(&token);
    let gap = app.store.queue.index_gap_marked(shard).await.unwrap();
    assert!(
        !gap,
        "no entry the indexer needs was trimmed: no catch-up is due"
    );

    app.drain().await;
    assert_eq!(search(&app, &token, chat, "needle").await.len(), 2);
}
