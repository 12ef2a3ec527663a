//! The HTTP+Redis ceiling probe (not part of the product).
//!
//! A minimal axum server whose only handler parses a small JSON body and makes one
//! EVALSHA round trip of the product's own create-message script, over the same kind of
//! Redis connection the product uses. `scripts/bench` loads it exactly like the real
//! create endpoint: the ratio between the two is the cost of everything else the
//! product does per request (validation, middleware, metrics, logging).
//!
//!   cargo run --release --example probe -- <bind> <redis-url> <prefix>

use std::sync::Arc;

use axum::Router;
use axum::extract::{Json, Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use chat_system::config::StoreConfig;
use chat_system::resources::now;
use chat_system::store::queue::{Allocation, Queue};
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    body: String,
}

const TOKEN: &str = "probe";

async fn create(
    State(queue): State<Arc<Queue>>,
    Path(chat): Path<u64>,
    Json(input): Json<Input>,
) -> (StatusCode, String) {
    for _ in 0..2 {
        match queue
            .allocate_message(TOKEN, chat, &input.body, now(), None)
            .await
        {
            Ok(Allocation::Created { number, .. }) => {
                return (StatusCode::CREATED, format!("{{\"number\":{number}}}"));
            }
            Ok(Allocation::NoMessageCounter) => {
                if queue.restore_message_counter(TOKEN, chat, 0).await.is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    (StatusCode::SERVICE_UNAVAILABLE, String::new())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, bind, redis_url, prefix] = args.as_slice() else {
        eprintln!("usage: probe <bind> <redis-url> <prefix>");
        std::process::exit(2);
    };
    let config = StoreConfig {
        database_url: "mysql://unused@127.0.0.1/unused".parse().expect("url"),
        database_pool_size: 1,
        redis_url: redis_url.parse().expect("REDIS url"),
        redis_cluster_nodes: None,
        redis_shards: 16,
        redis_prefix: prefix.clone(),
        dependency_timeout: std::time::Duration::from_secs(2),
        database_idle_timeout: std::time::Duration::from_secs(10),
        queue_max_entries: u64::MAX,
        queue_max_memory: None,
    };
    let conn = chat_system::store::connect_redis(&config)
        .await
        .expect("redis");
    let target = chat_system::store::redis_target(&config);
    let queue = Queue::new(conn, target, config.dependency_timeout, prefix, 16);
    // One application whose chats 1..=1,000,000 all exist.
    queue.cache_application(TOKEN, 1, true).await.expect("seed");
    let _: () =
        redis::AsyncCommands::set(&mut queue.conn(), queue.keys.chat_counter(TOKEN), 1_000_000)
            .await
            .expect("seed");
    let queue = Arc::new(queue);
    let app = Router::new()
        .route("/probe/{chat}", post(create))
        .with_state(queue);
    let listener = tokio::net::TcpListener::bind(bind).await.expect("bind");
    axum::serve(listener, app).await.expect("serve");
}
