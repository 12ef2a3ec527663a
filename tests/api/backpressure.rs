//! Bounded Redis: the write backlog's bound, Redis at its `maxmemory`, and how much Redis
//! a queued message costs. Overload is a 503 with `Retry-After`, never a 500, and reads
//! keep working.

use chat_system::startup::build_worker;
use chat_system::worker::Role;
use serde_json::json;

use crate::helpers::{Options, PrivateRedis, Reply, TestApp, worker_config};

#[track_caller]
fn assert_overloaded(reply: &Reply) {
    let problem = reply.assert_problem(503);
    assert_eq!(problem["type"], "/problems/overloaded", "{problem}");
    assert_eq!(reply.header("retry-after"), Some("5"));
}

/// A message create, a chat create and an update all get the overload 503.
async fn assert_every_write_refused(app: &TestApp, token: &str, chat: u64) {
    let messages = format!("/applications/{token}/chats/{chat}/messages");
    assert_overloaded(&app.post(&messages, json!({"body": "refused"})).await);
    assert_overloaded(
        &app.post(&format!("/applications/{token}/chats"), json!({}))
            .await,
    );
    assert_overloaded(
        &app.patch(&format!("{messages}/1"), json!({"body": "x"}))
            .await,
    );
}

#[tokio::test]
async fn over_the_backlog_bound_writes_get_a_503_and_reads_keep_working() {
    let mut app = TestApp::with(Options {
        queue_max_entries: Some(3),
        ..Options::default()
    })
    .await;
    app.allow_leftovers(); // Leaves a full backlog behind, on purpose.
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    app.message(&token, chat, "one").await;
    app.message(&token, chat, "two").await;
    let messages = format!("/applications/{token}/chats/{chat}/messages");

    // Three entries queued, none persisted: every kind of write is refused...
    assert_every_write_refused(&app, &token, chat).await;
    assert_eq!(app.stream_len().await, 3, "nothing half-written");
    // ...while reads, of pending items too, go on, and readiness says why.
    let read = app.get(&format!("{messages}/2")).await;
    assert_eq!(
        (read.status.as_u16(), &read.body["body"]),
        (200, &json!("two"))
    );
    let ready = app.get("/readyz").await;
    ready.assert_problem(503);
    assert_eq!(ready.body["checks"]["queue"], "full");
    assert!(
        ready.body["detail"]
            .as_str()
            .unwrap()
            .contains("queue full")
    );

    // Once the workers have drained it, writes are taken again, numbered without a gap.
    app.drain().await;
    let created = app.post(&messages, json!({"body": "three"})).await;
    assert_eq!(
        (created.status.as_u16(), &created.body["number"]),
        (201, &json!(3))
    );
    assert_eq!(app.get("/readyz").await.status, 200);
}

#[tokio::test]
async fn a_retry_of_an_accepted_create_is_answered_even_when_the_backlog_is_full() {
    let app = TestApp::with(Options {
        queue_max_entries: Some(2),
        ..Options::default()
    })
    .await;
    app.allow_leftovers(); // Leaves a full backlog behind, on purpose.
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let path = format!("/applications/{token}/chats/{chat}/messages");
    let send = || {
        app.client
            .post(app.url(&path))
            .header("Idempotency-Key", "a-uuid-like-key-0001")
            .json(&json!({"body": "once"}))
    };
    let first = app.send(send()).await;
    assert_eq!(first.status, 201);
    assert_overloaded(&app.post(&path, json!({"body": "other"})).await);
    let retry = app.send(send()).await;
    assert_eq!((retry.status.as_u16(), &retry.body), (201, &first.body));
}

/// Sets the private Redis's `maxmemory` to half of what it uses: every write that needs
/// memory is then refused with `OOM`, however a few bytes more or less are in use.
async fn set_maxmemory_below_use(conn: &mut chat_system::store::queue::RedisConn) {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap();
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    set_maxmemory(conn, used / 2).await;
    let refused: redis::RedisResult<()> = redis::cmd("SET")
        .arg("probe")
        .arg(1)
        .query_async(conn)
        .await;
    assert_eq!(refused.unwrap_err().code(), Some("OOM"));
}

async fn set_maxmemory(conn: &mut chat_system::store::queue::RedisConn, bytes: u64) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(bytes)
        .query_async(conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn at_redis_maxmemory_writes_get_a_503_and_workers_still_start_and_drain() {
    let redis = PrivateRedis::start("64mb").await;
    let app = TestApp::with(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    })
    .await;
    app.allow_leftovers(); // Leaves a full backlog behind, on purpose.
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    app.message(&token, chat, "queued before the fill").await;
    let messages = format!("/applications/{token}/chats/{chat}/messages");
    let mut conn = app.redis().await;
    set_maxmemory_below_use(&mut conn).await;

    assert_every_write_refused(&app, &token, chat).await;
    let read = app.get(&format!("{messages}/1")).await;
    assert_eq!(read.status, 200, "reads keep working: {}", read.body);
    let ready = app.get("/readyz").await;
    ready.assert_problem(503);
    assert_eq!(ready.body["checks"]["queue"], "full");

    // A worker process starting now (its group exists) drains the queue: nothing it
    // does needs memory, and the counts it cannot defer it refreshes at once.
    let mut worker = build_worker(
        app.store.clone(),
        &app.store_config,
        &worker_config(),
        Role::Persist,
    )
    .await
    .expect("a worker starts at maxmemory");
    assert_eq!(
        worker.drain().await.expect("drain at maxmemory"),
        2,
        "chat, message"
    );
    assert_eq!(app.scalar("SELECT COUNT(*) FROM messages").await, 1);
    assert_eq!(
        app.scalar("SELECT CAST(messages_count AS SIGNED) FROM chats")
            .await,
        1,
        "counts refreshed without the touched set"
    );

    // Memory to spare again: writes are taken again.
    set_maxmemory(&mut conn, 64 << 20).await;
    app.message(&token, chat, "after").await;
}

/// Redis memory of everything a queued message keeps: its stream entry and its pending
/// record. `MEMORY USAGE ... SAMPLES 0` measures every element.
async fn queued_bytes_per_message(app: &TestApp, token: &str, chat: u64, n: u64) -> f64 {
    let mut conn = app.redis().await;
    let keys = &app.store.queue.keys;
    let mut total: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(keys.stream(keys.shard_of(token)))
        .arg("SAMPLES")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    let records: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(keys.message_records(token, chat))
        .arg("SAMPLES")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    total += records;
    total as f64 / n as f64
}

#[tokio::test]
async fn a_queued_message_is_stored_once() {
    let app = TestApp::spawn().await;
    let token = app.application("a").await;
    let big_chat = app.chat(&token).await;
    let small_chat = app.chat(&token).await;
    let _: () = redis::cmd("DEL")
        .arg(
            app.store
                .queue
                .keys
                .stream(app.store.queue.keys.shard_of(&token)),
        )
        .query_async(&mut app.redis().await)
        .await
        .unwrap();

    // The largest body. Its stream entry, a little over 64 KiB, gets an 80 KiB block
    // from Redis's allocator (jemalloc's size classes), hence the 1.3 rather than 1.2.
    let body = "b".repeat(64 * 1024 - 1);
    for _ in 0..20 {
        app.message(&token, big_chat, &body).await;
    }
    let big = queued_bytes_per_message(&app, &token, big_chat, 20).await;
    assert!(
        big <= 1.3 * body.len() as f64,
        "{big:.0} bytes of Redis per queued 64 KB message"
    );

    let _: () = redis::cmd("DEL")
        .arg(
            app.store
                .queue
                .keys
                .stream(app.store.queue.keys.shard_of(&token)),
        )
        .query_async(&mut app.redis().await)
        .await
        .unwrap();
    let body = "s".repeat(100);
    for _ in 0..500 {
        app.message(&token, small_chat, &body).await;
    }
    let small = queued_bytes_per_message(&app, &token, small_chat, 500).await;
    assert!(
        small <= 400.0,
        "{small:.0} bytes of Redis per queued 100-byte message"
    );
    println!("Redis per queued message: 64 KB body {big:.0} B, 100-byte body {small:.0} B");
}
