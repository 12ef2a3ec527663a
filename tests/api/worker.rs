//! The worker against real MariaDB and Redis: counts, cold Redis, dead letters,
//! ordering and idempotence of the upserts.

use std::time::Duration;

use chat_system::resources::now;
use chat_system::store::mysql::{self, MessageWrite};
use serde_json::json;

use chat_system::startup::build_worker;
use chat_system::store::queue::RedisConn;
use chat_system::worker::Role;
use redis::AsyncCommands;

use crate::helpers::{Options, TestApp, eventually, within, worker_config};

#[tokio::test]
async fn counts_converge_within_the_sync_interval() {
    let app = TestApp::spawn().await;
    let _worker = app.spawn_worker().await; // COUNTS_SYNC_INTERVAL = 200ms
    let token = app.application("a").await;
    let (one, two) = (app.chat(&token).await, app.chat(&token).await);
    app.chat(&token).await;
    for i in 0..4 {
        app.message(&token, one, &format!("m{i}")).await;
    }
    app.message(&token, two, "x").await;
    eventually(Duration::from_secs(5), "counts to converge", || async {
        let application = app.get(&format!("/applications/{token}")).await.body;
        let chat_one = app
            .get(&format!("/applications/{token}/chats/{one}"))
            .await
            .body;
        let chat_two = app
            .get(&format!("/applications/{token}/chats/{two}"))
            .await
            .body;
        application["chats_count"] == 3
            && chat_one["messages_count"] == 4
            && chat_two["messages_count"] == 1
    })
    .await;
}

#[tokio::test]
async fn lost_counters_and_tokens_are_rebuilt_from_mysql() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    for _ in 0..3 {
        app.chat(&token).await;
    }
    app.message(&token, 2, "a").await;
    app.message(&token, 2, "b").await;
    app.drain().await;

    let keys = &app.store.queue.keys;
    // One slot (the application's shard): a multi-key DEL works on a cluster too.
    let _: () = redis::cmd("DEL")
        .arg(keys.chat_counter(&token))
        .arg(keys.message_counters(&token))
        .arg(keys.application(&token))
        .query_async(&mut app.redis().await)
        .await
        .unwrap();

    assert_eq!(
        app.message(&token, 2, "c").await,
        3,
        "continues after the persisted maximum"
    );
    assert_eq!(app.message(&token, 3, "first").await, 1);
    assert_eq!(app.chat(&token).await, 4);
    app.post(
        &format!("/applications/{token}/chats/5/messages"),
        json!({"body": "x"}),
    )
    .await
    .assert_problem(404);
    app.drain().await;
    assert_eq!(app.scalar("SELECT COUNT(*) FROM messages").await, 4);
    assert_eq!(app.scalar("SELECT COUNT(*) FROM chats").await, 4);
}

#[tokio::test]
async fn a_malformed_entry_goes_to_the_dead_letter_stream_and_the_rest_goes_on() {
    let mut app = TestApp::spawn().await;
    app.allow_leftovers(); // Leaves its dead letter behind, on purpose.
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let keys = app.store.queue.keys.clone();
    let shard = keys.shard_of(&token);
    let mut conn = app.redis().await;
    app.store
        .queue
        .inject_raw_entries(shard, ["m|not-a-number|t|1|1|1|1|1|body"])
        .await
        .unwrap();
    app.message(&token, chat, "after the bad one").await;
    app.drain().await;

    assert_eq!(app.scalar("SELECT COUNT(*) FROM messages").await, 1);
    let dead: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(keys.dead_letters(shard))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(keys.dead_letters(shard))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reason: String = reply.ids[0].get("dlq_reason").unwrap();
    assert!(reason.contains("app id"), "{reason}");
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(keys.stream(shard))
        .arg("persist")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending.count(), 0, "nothing is left unacknowledged");
}

#[tokio::test]
async fn an_entry_mysql_rejects_is_dead_lettered_alone() {
    let mut app = TestApp::spawn().await;
    app.allow_leftovers(); // Leaves its dead letter behind, on purpose.
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let keys = app.store.queue.keys.clone();
    let shard = keys.shard_of(&token);
    // Well formed, but for an application that does not exist: the foreign key fails.
    app.store
        .queue
        .inject_raw_entries(
            shard,
            ["m|999999|x|1|1|1700000000000000|1700000000000000|1|orphan"],
        )
        .await
        .unwrap();
    app.message(&token, chat, "kept").await;
    app.drain().await;
    let bodies: Vec<String> = sqlx::query_scalar("SELECT body FROM messages")
        .fetch_all(&app.store.mysql)
        .await
        .unwrap();
    assert_eq!(bodies, ["kept"]);
    let dead: u64 = redis::cmd("XLEN")
        .arg(keys.dead_letters(shard))
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    assert_eq!(dead, 1);
}

#[tokio::test]
async fn upserts_keep_the_highest_version_whatever_the_order_and_repeat_harmlessly() {
    let app = TestApp::spawn().await;
    let token = app.application("a").await;
    let app_id = app.application_id(&token).await;
    let at = now();
    let write = |version: u64, body: &str| MessageWrite {
        app_id,
        chat_number: 1,
        number: 1,
        body: body.to_owned(),
        version,
        created_at: at,
        updated_at: at,
    };
    // The update (version 20) is persisted before its create (version 10), then both
    // are delivered again.
    for batch in [
        vec![write(20, "updated")],
        vec![write(10, "created")],
        vec![write(10, "created"), write(20, "updated")],
    ] {
        let mut tx = app.store.mysql.begin().await.unwrap();
        mysql::upsert_messages(&mut tx, &batch).await.unwrap();
        tx.commit().await.unwrap();
    }
    let (body, version): (String, u64) = sqlx::query_as("SELECT body, version FROM messages")
        .fetch_one(&app.store.mysql)
        .await
        .unwrap();
    assert_eq!((body.as_str(), version), ("updated", 20));
    assert_eq!(app.scalar("SELECT COUNT(*) FROM messages").await, 1);
}

#[tokio::test]
async fn a_steady_trickle_is_read_in_a_few_large_batches() {
    let app = TestApp::spawn().await;
    // The entries are read here, not persisted.
    app.allow_leftovers();
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let pace = Duration::from_millis(250);
    let inbox = chat_system::worker::Inbox::spawn(
        &app.store,
        chat_system::worker::PERSIST_GROUP,
        "trickle",
        1_000,
        pace,
        &shutdown,
    )
    .await
    .unwrap();
    // The chat's create, then 60 messages, one every 10 ms or so (with the request's
    // own time): about a second.
    let reading = tokio::spawn(async move {
        let mut sizes = Vec::new();
        while sizes.iter().sum::<usize>() < 61 {
            let batch = inbox.next(1_000, Duration::from_secs(5)).await;
            assert!(!batch.is_empty(), "read {sizes:?}, then nothing for 5 s");
            sizes.push(batch.len());
        }
        sizes
    });
    for i in 0..60 {
        app.message(&token, chat, &format!("m{i}")).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sizes = tokio::time::timeout(Duration::from_secs(10), reading)
        .await
        .expect("every entry read within 10 s")
        .unwrap();
    // Read again at once after each read, each read would bring an entry or two.
    assert!(sizes.len() <= 10, "{} batches: {sizes:?}", sizes.len());
}

/// Statements this session has prepared so far.
async fn prepared_statements(conn: &mut sqlx::MySqlConnection) -> u64 {
    let (_, count): (String, String) =
        sqlx::query_as("SHOW SESSION STATUS LIKE 'Com_stmt_prepare'")
            .fetch_one(conn)
            .await
            .unwrap();
    count.parse().unwrap()
}

#[tokio::test]
async fn batches_of_every_size_reuse_a_few_prepared_statements() {
    let app = TestApp::spawn().await;
    let token = app.application("a").await;
    let app_id = app.application_id(&token).await;
    let at = now();
    let message = |number: u64| MessageWrite {
        app_id,
        chat_number: 1,
        number,
        body: format!("m{number}"),
        version: 1,
        created_at: at,
        updated_at: at,
    };
    // One connection, so that its session's count of prepared statements tells.
    let mut conn = app.store.mysql.acquire().await.unwrap();
    prepared_statements(&mut conn).await;
    let before = prepared_statements(&mut conn).await;
    let (mut next, sizes) = (1, 1..=300u64);
    for size in sizes.clone() {
        let batch: Vec<MessageWrite> = (next..next + size).map(message).collect();
        next += size;
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        mysql::upsert_messages(&mut tx, &batch).await.unwrap();
        tx.commit().await.unwrap();
    }
    // A statement per batch size would be 300 statements, each prepared on first use
    // (and again whenever the connection's cache of 100 had dropped it).
    let statements = prepared_statements(&mut conn).await - before;
    assert!(
        statements <= 9,
        "{statements} statements prepared for batches of 1 to 300 rows"
    );
    let rows: u64 = sizes.sum();
    assert_eq!(
        app.scalar("SELECT COUNT(*) FROM messages").await,
        rows as i64
    );
}

#[tokio::test]
async fn a_count_sync_neither_waits_for_nor_blocks_a_batch_being_persisted() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    app.drain().await;
    let app_id = app.application_id(&token).await;
    let at = now();
    let message = |number: u64| MessageWrite {
        app_id,
        chat_number: chat,
        number,
        body: format!("m{number}"),
        version: number,
        created_at: at,
        updated_at: at,
    };
    // A batch in flight: its rows are locked until it commits.
    let mut batch = app.store.mysql.begin().await.unwrap();
    mysql::upsert_messages(&mut batch, &[message(1)])
        .await
        .unwrap();
    // A sync that counted with a locking read would wait here for the batch (and its
    // shared locks would then hold up the batch's next inserts into this chat).
    let limit = Duration::from_secs(5);
    tokio::time::timeout(
        limit,
        mysql::sync_messages_count(&app.store.mysql, app_id, chat),
    )
    .await
    .expect("the sync does not wait for the uncommitted batch")
    .unwrap();
    tokio::time::timeout(limit, mysql::upsert_messages(&mut batch, &[message(2)]))
        .await
        .expect("the batch is not held up by the sync")
        .unwrap();
    batch.commit().await.unwrap();
    assert_eq!(
        app.scalar("SELECT CAST(messages_count AS SIGNED) FROM chats")
            .await,
        0
    );

    mysql::sync_messages_count(&app.store.mysql, app_id, chat)
        .await
        .unwrap();
    assert_eq!(
        app.scalar("SELECT CAST(messages_count AS SIGNED) FROM chats")
            .await,
        2
    );
}

#[tokio::test]
async fn entries_left_by_a_dead_consumer_are_taken_over() {
    let app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    for i in 0..10 {
        app.message(&token, chat, &format!("m{i}")).await;
    }
    // A consumer reads everything and dies without acknowledging.
    let keys = app.store.queue.keys.clone();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&["GROUP", "persist", "doomed", "COUNT", "100", "STREAMS"])
        .arg(keys.stream(keys.shard_of(&token)))
        .arg(">")
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    let _worker = app.spawn_worker().await; // WORKER_CLAIM_IDLE = 1s
    eventually(
        Duration::from_secs(10),
        "the entries to be taken over",
        || async {
            app.scalar("SELECT COUNT(*) FROM messages").await == 10
                && app.scalar("SELECT COUNT(*) FROM chats").await == 1
                && app.unpersisted().await == 0
        },
    )
    .await;
}

#[tokio::test]
async fn the_stream_is_trimmed_behind_every_group_however_long_it_grew() {
    let app = TestApp::spawn().await;
    // 60,000 entries every group has already acknowledged: far more than one
    // approximate trim call removes (10,000).
    acknowledged_entries(&app, 0, 60_000).await;
    let _stop = app.spawn_worker().await;
    // The first trim runs a second after the worker starts, and must finish the job.
    eventually(
        Duration::from_millis(2500),
        "the stream to be trimmed",
        || async { app.stream_len().await < 1_000 },
    )
    .await;
}

#[tokio::test]
async fn the_dead_letter_stream_is_capped() {
    let mut app = TestApp::spawn().await;
    app.allow_leftovers(); // Leaves its dead letters behind, on purpose.
    let keys = app.store.queue.keys.clone();
    let mut conn = app.redis().await;
    let mut config = worker_config();
    config.dead_letter_max = 10;
    let mut worker = build_worker(app.store.clone(), &app.store_config, &config, Role::Persist)
        .await
        .unwrap();
    app.store
        .queue
        .inject_raw_entries(0, ["garbage"; 500])
        .await
        .unwrap();
    assert_eq!(worker.drain().await.unwrap(), 500);
    let dead: u64 = redis::cmd("XLEN")
        .arg(keys.dead_letters(0))
        .query_async(&mut conn)
        .await
        .unwrap();
    // Approximate trimming removes whole stream nodes (100 entries by default).
    assert!(dead <= 10 + 100, "{dead} dead letters kept");
    app.drain().await;
}

#[tokio::test]
async fn a_starting_worker_removes_consumers_left_idle_with_nothing_pending() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Leaves the entry a dead consumer holds behind, on purpose.
    let keys = app.store.queue.keys.clone();
    let mut conn = app.redis().await;
    let token = app.application("a").await;
    app.chat(&token).await;
    let shard = keys.shard_of(&token);
    // A consumer of a process long gone, and one that still holds an entry.
    for (name, read) in [("ghost", false), ("holder", true)] {
        let _: i64 = redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg(keys.stream(shard))
            .arg("persist")
            .arg(name)
            .query_async(&mut conn)
            .await
            .unwrap();
        if read {
            let _: redis::Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("persist")
                .arg(name)
                .arg("COUNT")
                .arg(1)
                .arg("STREAMS")
                .arg(keys.stream(shard))
                .arg(">")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    let config = worker_config();
    let consumers = |conn: RedisConn| {
        let stream = keys.stream(shard);
        async move {
            let mut conn = conn;
            let reply: redis::streams::StreamInfoConsumersReply =
                conn.xinfo_consumers(stream, "persist").await.unwrap();
            reply.consumers
        }
    };
    eventually(
        Duration::from_secs(10),
        "both consumers idle longer than WORKER_CLAIM_IDLE",
        || async {
            consumers(conn.clone())
                .await
                .iter()
                .all(|c| c.idle as u128 > config.claim_idle.as_millis())
        },
    )
    .await;
    build_worker(app.store.clone(), &app.store_config, &config, Role::Persist)
        .await
        .unwrap();
    let names: Vec<String> = consumers(conn.clone())
        .await
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert!(!names.contains(&"ghost".to_owned()), "{names:?}");
    assert!(names.contains(&"holder".to_owned()), "{names:?}");
}

#[tokio::test]
async fn counts_of_many_touched_parents_are_refreshed_in_batches() {
    let mut app = TestApp::spawn().await;
    let token = app.application("a").await;
    // More chats than one statement refreshes, each touched.
    let chats = mysql::COUNT_SYNC_BATCH + 150;
    for _ in 0..chats {
        app.chat(&token).await;
    }
    for (chat, messages) in [(1, 3), (chats as u64, 2)] {
        for i in 0..messages {
            app.message(&token, chat, &format!("m{i}")).await;
        }
    }
    app.drain().await;
    assert_eq!(
        app.scalar("SELECT CAST(chats_count AS SIGNED) FROM applications")
            .await,
        chats as i64
    );
    assert_eq!(
        app.scalar("SELECT CAST(SUM(messages_count) AS SIGNED) FROM chats")
            .await,
        5
    );
    assert_eq!(
        app.get(&format!("/applications/{token}/chats/{chats}"))
            .await
            .body["messages_count"],
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counts_under_concurrent_workers_only_rise_and_converge_to_the_truth() {
    let app = TestApp::spawn().await;
    let (_one, _two) = (app.spawn_worker().await, app.spawn_worker().await);
    let token = app.application("a").await;
    let chats: Vec<u64> = vec![app.chat(&token).await, app.chat(&token).await];
    let counts = |app: &TestApp| {
        let db = app.store.mysql.clone();
        async move {
            sqlx::query_scalar::<_, u64>("SELECT messages_count FROM chats ORDER BY number")
                .fetch_all(&db)
                .await
                .unwrap()
        }
    };
    // Writers on both chats while two workers persist and sync; the counts are sampled
    // all along and must never go down.
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..8 {
        let client = app.client.clone();
        let url = app.url(&format!(
            "/applications/{token}/chats/{}/messages",
            chats[writer % 2]
        ));
        writers.spawn(async move {
            for i in 0..50 {
                let reply = client
                    .post(&url)
                    .json(&json!({"body": format!("w{writer} m{i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(reply.status(), 201);
            }
        });
    }
    let mut last = vec![0, 0];
    while !writers.is_empty() {
        if let Ok(Some(done)) =
            tokio::time::timeout(Duration::from_millis(20), writers.join_next()).await
        {
            done.unwrap();
        }
        let now = counts(&app).await;
        if now.len() == 2 {
            assert!(
                now[0] >= last[0] && now[1] >= last[1],
                "{last:?} -> {now:?}"
            );
            last = now;
        }
    }
    eventually(Duration::from_secs(20), "counts of 200 and 200", || async {
        counts(&app).await == vec![200, 200]
    })
    .await;
}

#[tokio::test]
async fn a_write_held_by_a_stalled_transaction_gives_up_within_the_dependency_timeout() {
    let app = TestApp::spawn().await;
    let token = app.application("a").await;
    let id = app.application_id(&token).await;
    // A transaction that took the application's row and stalled, as a frozen process's
    // would (its connection stays open).
    let mut stalled = app.store.mysql.begin().await.unwrap();
    sqlx::query("UPDATE applications SET chats_count = chats_count WHERE id = ?")
        .bind(id)
        .execute(&mut *stalled)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let held = mysql::rename_application(&app.store.mysql, &token, "b", now()).await;
    let waited = started.elapsed();
    // Let go before asserting: a test that fails must not leave the row held.
    stalled.rollback().await.unwrap();
    let err = held.expect_err("the row is held");
    // InnoDB's default lock wait is 50 s; the test's dependency timeout is 2 s.
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert!(chat_system::store::mysql_is_transient(&err), "{err}");
    let renamed = mysql::rename_application(&app.store.mysql, &token, "b", now()).await;
    assert_eq!(renamed.unwrap().unwrap().name, "b");
}

/// Adds `count` entries to a shard's stream that every group is done with.
async fn acknowledged_entries(app: &TestApp, shard: usize, count: u32) {
    let stream = app.store.queue.keys.stream(shard);
    app.store
        .queue
        .inject_raw_entries(shard, 0..count)
        .await
        .unwrap();
    for group in ["persist", "index"] {
        let _: () = redis::cmd("XGROUP")
            .arg("SETID")
            .arg(&stream)
            .arg(group)
            .arg("$")
            .query_async(&mut app.redis().await)
            .await
            .unwrap();
    }
}

/// What a worker stopped mid-batch (`SIGSTOP`) leaves behind: a chat and its messages
/// delivered to a consumer that never acknowledges them, and an open transaction that
/// holds the first message's row. Before them in the same shard, `acked` entries every
/// group is done with. Returns the stalled transaction.
async fn frozen_mid_batch(
    app: &TestApp,
    acked: u32,
    messages: usize,
) -> sqlx::Transaction<'static, sqlx::MySql> {
    let token = app.application("a").await;
    let id = app.application_id(&token).await;
    let keys = app.store.queue.keys.clone();
    let shard = keys.shard_of(&token);
    let stream = keys.stream(shard);
    if acked > 0 {
        acknowledged_entries(app, shard, acked).await;
    }
    let chat = app.chat(&token).await;
    for i in 0..messages {
        app.message(&token, chat, &format!("m{i}")).await;
    }
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&["GROUP", "persist", "frozen", "COUNT", "1000", "STREAMS"])
        .arg(&stream)
        .arg(">")
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    let mut stalled = app.store.mysql.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO messages (application_id, chat_number, number, body, version, created_at, updated_at) \
         VALUES (?, ?, 1, 'm0', 0, NOW(), NOW())",
    )
    .bind(id)
    .bind(chat)
    .execute(&mut *stalled)
    .await
    .unwrap();
    stalled
}

#[tokio::test]
async fn entries_a_frozen_transaction_holds_back_do_not_stop_the_stream_being_trimmed() {
    let app = TestApp::spawn().await; // DATABASE_IDLE_TIMEOUT = 30s: the hold outlasts the test
    let stalled = frozen_mid_batch(&app, 20_000, 5).await;
    let _worker = app.spawn_worker().await; // WORKER_CLAIM_IDLE = 1s
    // Taking the entries over fails (each try waits 2 s for the held row); the stream is
    // trimmed all the same, up to them.
    let trimmed = within(Duration::from_secs(8), || async {
        app.stream_len().await < 1_000
    })
    .await;
    let persisted_meanwhile = app.scalar("SELECT COUNT(*) FROM messages").await;
    stalled.rollback().await.unwrap();
    assert!(trimmed, "the stream was not trimmed up to the held entries");
    assert_eq!(persisted_meanwhile, 0);
    eventually(
        Duration::from_secs(10),
        "the held entries to be persisted once the row is free",
        || async { all_persisted(&app, 5).await },
    )
    .await;
}

#[tokio::test]
async fn a_transaction_left_open_by_a_frozen_worker_is_rolled_back_and_its_entries_taken_over() {
    let app = TestApp::with(Options {
        database_idle_timeout: Some(Duration::from_secs(3)),
        ..Options::default()
    })
    .await;
    let stalled = frozen_mid_batch(&app, 0, 5).await;
    let _worker = app.spawn_worker().await; // WORKER_CLAIM_IDLE = 1s
    // Nothing lets the stalled transaction go but the server's idle timeout.
    let taken_over = within(Duration::from_secs(15), || async {
        all_persisted(&app, 5).await
    })
    .await;
    let committed = stalled.commit().await;
    assert!(taken_over, "the entries were not taken over and persisted");
    assert!(
        committed.is_err(),
        "the server rolled the stalled transaction back"
    );
}

#[tokio::test]
async fn a_connection_the_server_closed_counts_as_mysql_down() {
    let app = TestApp::spawn().await;
    let mut victim = app.store.mysql.acquire().await.unwrap();
    let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
        .fetch_one(&mut *victim)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}")))
        .execute(&app.store.mysql)
        .await
        .unwrap();
    let err = sqlx::query("SELECT 1")
        .execute(&mut *victim)
        .await
        .unwrap_err();
    assert!(chat_system::store::mysql_is_down(&err), "{err:?}");
}

#[tokio::test]
async fn persisting_releases_each_pending_record_only_at_the_version_it_holds() {
    use chat_system::store::queue::stream::Release;
    use std::collections::HashMap;
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // No worker: the entries stay queued.
    let token = app.application("a").await;
    let (one, two) = (app.chat(&token).await, app.chat(&token).await);
    for body in ["m1", "m2", "m3"] {
        app.message(&token, one, body).await;
    }
    app.message(&token, two, "n1").await;
    let keys = &app.store.queue.keys;
    let (hash_one, hash_two) = (
        keys.message_records(&token, one),
        keys.message_records(&token, two),
    );
    let conn = app.redis().await;
    let records = |hash: String| {
        let mut conn = conn.clone();
        async move {
            let all: HashMap<u64, String> = conn.hgetall(&hash).await.unwrap();
            all
        }
    };
    let before_one = records(hash_one.clone()).await;
    let before_two = records(hash_two.clone()).await;
    assert_eq!(before_one.len(), 3);
    // A record holds `<version>|…`; the version is its stream entry's id.
    let version =
        |all: &HashMap<u64, String>, n: u64| all[&n].split('|').next().unwrap().to_owned();
    let release = |hash: &str, field: u64, version: String| Release {
        hash: hash.to_owned(),
        field,
        version,
    };
    let v3 = version(&before_one, 3);
    // Another version of the same length: the last digit changed.
    let mut other = version(&before_one, 2);
    let last = if other.ends_with('0') { '1' } else { '0' };
    other.pop();
    other.push(last);
    let releases = vec![
        release(&hash_one, 1, version(&before_one, 1)),
        // Replaced by a later update: its record holds another version.
        release(&hash_one, 2, other),
        release(&hash_two, 1, version(&before_two, 1)),
        // A version that is only the start of the record's own.
        release(&hash_one, 3, v3[..v3.len() - 1].to_owned()),
        // The same record twice in one batch (a create and its update, say).
        release(&hash_one, 1, version(&before_one, 1)),
    ];
    app.store
        .queue
        .release_pending(keys.shard_of(&token), &releases)
        .await
        .unwrap();
    let after_one = records(hash_one.clone()).await;
    assert_eq!(
        after_one
            .keys()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        [2, 3].into(),
        "only record 1 of chat one goes"
    );
    assert_eq!(after_one[&2], before_one[&2]);
    assert!(records(hash_two.clone()).await.is_empty());
}

/// Whether exactly `messages` messages are persisted and nothing is left to persist.
async fn all_persisted(app: &TestApp, messages: i64) -> bool {
    app.scalar("SELECT COUNT(*) FROM messages").await == messages && app.unpersisted().await == 0
}

/// An application whose one chat has 300 messages queued, none persisted.
async fn three_hundred_queued() -> TestApp {
    let app = TestApp::spawn().await;
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    for i in 0..300 {
        app.message(&token, chat, &format!("m{i}")).await;
    }
    app
}

/// A group's entries delivered and not acknowledged, and not delivered yet.
async fn group_state(app: &TestApp, group: &str) -> (u64, u64) {
    let status = app.store.queue.status(&[]).await.unwrap();
    let g = status.groups.into_iter().find(|g| g.name == group).unwrap();
    (g.pending, g.lag)
}

/// Every message is persisted or not read yet: none was acknowledged unpersisted. Then a
/// worker persists the rest.
async fn none_acknowledged_unpersisted(app: &TestApp) {
    let (_, unread) = group_state(app, chat_system::worker::PERSIST_GROUP).await;
    let persisted = app.scalar("SELECT COUNT(*) FROM messages").await as u64;
    assert_eq!(persisted + unread, 300);
    let _worker = app.spawn_worker().await;
    eventually(
        Duration::from_secs(10),
        "the rest to be persisted",
        || async { all_persisted(app, 300).await },
    )
    .await;
}

#[tokio::test]
async fn a_stopping_worker_finishes_what_it_read_ahead_and_leaves_nothing_pending() {
    let app = three_hundred_queued().await;
    // The persisting consumer, slower than its fetcher (a transaction per batch), always
    // has entries read ahead when it stops: without the drain at shutdown, 25 are left
    // pending. The indexing one is faster, and may have none; its run checks that the
    // drain commits and acknowledges what it handles.
    for role in [Role::Index(app.search.clone()), Role::Persist] {
        let group = match role {
            Role::Persist => chat_system::worker::PERSIST_GROUP,
            Role::Index(_) => chat_system::worker::INDEX_GROUP,
        };
        // Batches of 5: the fetcher reads ahead of the consumer by several batches.
        let config = chat_system::config::WorkerConfig {
            batch_size: 5,
            ..worker_config()
        };
        let worker = build_worker(app.store.clone(), &app.store_config, &config, role)
            .await
            .unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(worker.run(stopped));
        // Stopped as soon as the fetcher has read ahead (two reads or more), however far
        // the consumer has got.
        eventually(
            Duration::from_secs(10),
            "the fetcher to read ahead",
            || async { group_state(&app, group).await.1 <= 290 },
        )
        .await;
        stop.send(true).unwrap();
        running.await.unwrap();
        // What it had read is handled and acknowledged: nothing waits for
        // WORKER_CLAIM_IDLE under the name of a process that is gone.
        let (pending, _) = group_state(&app, group).await;
        assert_eq!(
            pending, 0,
            "{group}: entries left pending by the stopped worker"
        );
    }
    none_acknowledged_unpersisted(&app).await;
}

#[tokio::test]
async fn a_stopping_worker_process_with_several_consumers_leaves_nothing_pending() {
    let app = three_hundred_queued().await;
    // As `chat-system worker` runs them: three persisting consumers share one inbox.
    let config = chat_system::config::WorkerConfig {
        batch_size: 5,
        concurrency: 3,
        ..worker_config()
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = chat_system::startup::spawn_workers(
        &app.store,
        &app.search,
        &app.store_config,
        &config,
        &stopped,
    )
    .await
    .unwrap();
    // A few batches in, the fetchers have filled the inbox ahead of the consumers.
    eventually(
        Duration::from_secs(10),
        "a few batches persisted",
        || async { app.scalar("SELECT COUNT(*) FROM messages").await >= 30 },
    )
    .await;
    stop.send(true).unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let status = app.store.queue.status(&[]).await.unwrap();
    for group in &status.groups {
        assert_eq!(group.pending, 0, "{}: entries left pending", group.name);
    }
    none_acknowledged_unpersisted(&app).await;
}
