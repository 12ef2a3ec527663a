//! The test harness: the real app on port 0 against the real MariaDB and Redis that
//! `scripts/test` starts, a fresh database and Redis key prefix per test, typed helpers.
//!
//! Nothing is mocked. Faults are injected with [`Proxy`], a TCP relay between the app
//! and a real server that a test can cut and restore.
//!
//! A test ends with the queue handled: the teardown fails it if an entry is left
//! unpersisted or a dead letter is left behind, unless it says it means to
//! ([`TestApp::allow_leftovers`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_system::config::{
    ApiConfig, SearchConfig, StoreConfig, WorkerConfig, parse_cluster_nodes, parse_duration,
};
use chat_system::search::Search;
use chat_system::startup::{ApiServer, build_worker};
use chat_system::store::queue::RedisConn;
use chat_system::store::queue::stream::QueueStatus;
use chat_system::store::{MIGRATOR, Store, connect_queue};
use chat_system::worker::{Role, Worker};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub fn mysql_server_url() -> String {
    std::env::var("TEST_MYSQL_URL")
        .expect("TEST_MYSQL_URL is not set: run the tests with scripts/test")
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL")
        .expect("TEST_REDIS_URL is not set: run the tests with scripts/test")
}

/// `TEST_REDIS_CLUSTER_NODES`: when set (`scripts/test` does for its cluster pass), apps
/// use this Redis Cluster instead of `TEST_REDIS_URL`, except where a test needs a Redis
/// of its own (a proxy in front of it, a private server).
pub fn redis_cluster_nodes() -> Option<String> {
    std::env::var("TEST_REDIS_CLUSTER_NODES")
        .ok()
        .filter(|n| !n.is_empty())
}

fn unique_name(prefix: &str) -> String {
    format!("{prefix}{:016x}", getrandom::u64().expect("random"))
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts this is a problem+json document with the given status.
    #[track_caller]
    pub fn assert_problem(&self, status: u16) -> &Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(self.body["status"], status);
        assert!(self.body["type"].is_string(), "{}", self.body);
        assert!(self.body["title"].is_string(), "{}", self.body);
        assert!(self.body["detail"].is_string(), "{}", self.body);
        &self.body
    }
}

/// The admin key of [`TestApp::with_admin_key`].
pub const ADMIN_KEY: &str = "test-admin-key";

/// How a test app is put together.
#[derive(Default)]
pub struct Options {
    pub admin_api_key: Option<String>,
    /// Route MySQL and Redis through cuttable proxies.
    pub proxies: bool,
    pub body_limit: Option<usize>,
    /// `QUEUE_MAX_ENTRIES` (default 1,000,000).
    pub queue_max_entries: Option<u64>,
    /// A Redis URL other than the shared test server's.
    pub redis_url: Option<String>,
    /// Seed nodes of a Redis Cluster of the test's own (`host:port,...`).
    pub redis_cluster_nodes: Option<String>,
    pub request_timeout: Option<Duration>,
    pub header_read_timeout: Option<Duration>,
    pub keep_alive_timeout: Option<Duration>,
    pub max_connections: Option<u32>,
    pub events_max_subscribers: Option<u32>,
    /// `DATABASE_IDLE_TIMEOUT` (default 30 s).
    pub database_idle_timeout: Option<Duration>,
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub store: Store,
    pub store_config: StoreConfig,
    pub worker: Worker,
    pub indexer: Worker,
    pub search: Search,
    pub search_config: SearchConfig,
    pub database: String,
    pub prefix: String,
    pub mysql_proxy: Option<Proxy>,
    pub redis_proxy: Option<Proxy>,
    /// Where the teardown reads the queue: Redis itself, never through the proxy (which
    /// runs on the test's runtime, stopped by then, and may be cut).
    teardown_store_config: StoreConfig,
    leftovers_allowed: AtomicBool,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::with(Options::default()).await
    }

    /// An app that reaches MySQL and Redis through proxies a test can cut
    /// ([`TestApp::mysql_proxy`], [`TestApp::redis_proxy`]).
    pub async fn with_proxies() -> Self {
        Self::with(Options {
            proxies: true,
            ..Options::default()
        })
        .await
    }

    /// An app whose `ADMIN_API_KEY` is [`ADMIN_KEY`] (the application list is enabled).
    pub async fn with_admin_key() -> Self {
        Self::with(Options {
            admin_api_key: Some(ADMIN_KEY.into()),
            ..Options::default()
        })
        .await
    }

    pub async fn with(options: Options) -> Self {
        let database = unique_name("t_");
        let prefix = unique_name("t");
        let server = mysql_server_url();
        let (mysql_proxy, redis_proxy) = if options.proxies {
            let mysql_target = server
                .trim_start_matches("mysql://")
                .rsplit('@')
                .next()
                .unwrap();
            let redis_target = redis_url().trim_start_matches("redis://").to_owned();
            (
                Some(Proxy::start(mysql_target).await),
                Some(Proxy::start(&redis_target).await),
            )
        } else {
            (None, None)
        };
        let database_url = match &mysql_proxy {
            Some(p) => format!("mysql://root@{}/{database}", p.addr),
            None => format!("{server}/{database}"),
        };
        let cluster = match (&redis_proxy, &options.redis_url) {
            (None, None) => options.redis_cluster_nodes.or_else(redis_cluster_nodes),
            _ => None,
        };
        let redis = match (&redis_proxy, options.redis_url) {
            (Some(p), _) => format!("redis://{}", p.addr),
            (None, Some(url)) => url,
            (None, None) => redis_url(),
        };
        let store_config = StoreConfig {
            database_url: database_url.parse().unwrap(),
            database_pool_size: 8,
            redis_url: redis.parse().unwrap(),
            redis_cluster_nodes: cluster.map(|n| parse_cluster_nodes(&n).unwrap()),
            redis_shards: 16,
            redis_prefix: prefix.clone(),
            dependency_timeout: Duration::from_secs(2),
            database_idle_timeout: options
                .database_idle_timeout
                .unwrap_or(Duration::from_secs(30)),
            queue_max_entries: options.queue_max_entries.unwrap_or(1_000_000),
            queue_max_memory: None,
        };
        let store = Store::connect(&store_config).await.expect("connect");
        MIGRATOR.run(&store.mysql).await.expect("migrate");
        let api_config = ApiConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            body_limit: options.body_limit.unwrap_or(256 * 1024),
            request_timeout: options.request_timeout.unwrap_or(Duration::from_secs(10)),
            header_read_timeout: options
                .header_read_timeout
                .unwrap_or(Duration::from_secs(10)),
            keep_alive_timeout: options
                .keep_alive_timeout
                .unwrap_or(Duration::from_secs(75)),
            max_connections: options.max_connections.unwrap_or(10_000),
            events_max_subscribers: options.events_max_subscribers.unwrap_or(10_000),
            read_cache_size: 16 << 20,
            admin_api_key: options.admin_api_key.map(|k| k.parse().expect("admin key")),
        };
        let search_config = SearchConfig {
            elasticsearch_url: None,
            elasticsearch_index: "messages".into(),
            search_index_dir: std::env::temp_dir().join(format!("chat-system-test-{prefix}")),
            search_time_budget: Duration::from_secs(5),
            elastic: Default::default(),
        };
        let search = Search::open(&search_config, true)
            .await
            .expect("search index");
        let server = ApiServer::build(store.clone(), search.clone(), &api_config)
            .await
            .expect("build");
        let addr = server.local_addr();
        tokio::spawn(server.run(std::future::pending()));
        let worker = build_worker(
            store.clone(),
            &store_config,
            &worker_config(),
            Role::Persist,
        )
        .await
        .expect("worker");
        let indexer = build_worker(
            store.clone(),
            &store_config,
            &worker_config(),
            Role::Index(search.clone()),
        )
        .await
        .expect("indexer");
        let mut teardown_store_config = store_config.clone();
        if redis_proxy.is_some() {
            teardown_store_config.redis_url = redis_url().parse().unwrap();
        }
        Self {
            addr,
            client: reqwest::Client::new(),
            store,
            store_config,
            teardown_store_config,
            leftovers_allowed: AtomicBool::new(false),
            worker,
            indexer,
            search,
            search_config,
            database,
            prefix,
            mysql_proxy,
            redis_proxy,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("request");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.client.get(self.url(path))).await
    }

    /// A `GET` with `Authorization: Bearer` [`ADMIN_KEY`].
    pub async fn get_as_admin(&self, path: &str) -> Reply {
        self.send(self.client.get(self.url(path)).bearer_auth(ADMIN_KEY))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(self.client.post(self.url(path)).json(&body))
            .await
    }

    pub async fn patch(&self, path: &str, body: Value) -> Reply {
        self.send(self.client.patch(self.url(path)).json(&body))
            .await
    }

    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.send(self.client.put(self.url(path)).json(&body)).await
    }

    /// Creates an application and returns its token.
    pub async fn application(&self, name: &str) -> String {
        let reply = self.post("/applications", json!({ "name": name })).await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        reply.body["token"].as_str().unwrap().to_owned()
    }

    /// The database id of the application with this token.
    pub async fn application_id(&self, token: &str) -> u64 {
        let token = chat_system::domain::Token::parse(token).unwrap();
        self.store.application_id(&token).await.unwrap()
    }

    /// Creates a chat and returns its number.
    pub async fn chat(&self, token: &str) -> u64 {
        let reply = self
            .post(&format!("/applications/{token}/chats"), json!({}))
            .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        reply.body["number"].as_u64().unwrap()
    }

    /// Posts a message and returns its number.
    pub async fn message(&self, token: &str, chat: u64, body: &str) -> u64 {
        let reply = self
            .post(
                &format!("/applications/{token}/chats/{chat}/messages"),
                json!({ "body": body }),
            )
            .await;
        assert_eq!(reply.status, 201, "{}", reply.body);
        reply.body["number"].as_u64().unwrap()
    }

    /// Persists everything queued so far and refreshes counts.
    pub async fn drain(&mut self) -> usize {
        self.indexer.drain().await.expect("drain the index group");
        self.worker.drain().await.expect("drain the persist group")
    }

    /// Lets this test end with queued entries unpersisted or dead letters, which the
    /// teardown otherwise fails it for: for tests of dead letters, of a full queue or an
    /// outage, and of entries that no worker is meant to take.
    pub fn allow_leftovers(&self) {
        self.leftovers_allowed.store(true, Ordering::SeqCst);
    }

    /// Queued entries the persist group has not acknowledged: what a test with workers
    /// in the background waits to see at 0 before it ends (see [`leftovers`]).
    pub async fn unpersisted(&self) -> u64 {
        unpersisted(&self.store.queue.status(&[]).await.unwrap())
    }

    pub async fn redis(&self) -> RedisConn {
        self.store.queue.conn()
    }

    /// `REDIS_CLUSTER_NODES` for a process of this app, when it runs on the test cluster.
    pub fn cluster_env(&self) -> Vec<(&'static str, String)> {
        match (
            &self.store_config.redis_cluster_nodes,
            redis_cluster_nodes(),
        ) {
            (Some(_), Some(nodes)) => vec![("REDIS_CLUSTER_NODES", nodes)],
            _ => Vec::new(),
        }
    }

    /// Entries in every shard's stream.
    pub async fn stream_len(&self) -> u64 {
        self.store.queue.length().await.unwrap()
    }

    pub async fn scalar(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.store.mysql)
            .await
            .unwrap()
    }
}

pub fn worker_config() -> WorkerConfig {
    WorkerConfig {
        batch_size: 1000,
        batch_wait: Duration::from_millis(20),
        claim_idle: Duration::from_secs(1),
        name: Some(unique_name("w")),
        metrics_bind: None,
        concurrency: 1,
        counts_sync_interval: parse_duration("200ms").unwrap(),
        dead_letter_max: 100_000,
        index_lag_max: Duration::from_secs(60),
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let database = self.database.clone();
        let prefix = self.prefix.clone();
        // A test that already failed is not failed again (a panic in a panic aborts).
        let check = (!self.leftovers_allowed.load(Ordering::SeqCst) && !std::thread::panicking())
            .then(|| self.teardown_store_config.clone());
        let _ = std::fs::remove_dir_all(&self.search_config.search_index_dir);
        // The test's runtime is blocked in this drop: check and clean up on a thread with
        // a runtime of its own.
        let left = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let left = match check {
                    Some(config) => leftovers(&config).await,
                    None => Ok(()),
                };
                cleanup(database, prefix).await;
                left
            })
        })
        .join();
        if let Ok(Err(left)) = left {
            panic!("{left}");
        }
    }
}

/// Entries the persist group has not acknowledged, or not read yet (every entry while
/// no persisting worker has ever started).
fn unpersisted(status: &QueueStatus) -> u64 {
    status
        .groups
        .iter()
        .find(|g| g.name == chat_system::worker::PERSIST_GROUP)
        .map_or(status.length, |g| g.pending + g.lag)
}

/// Fails with what the test left in the queue for the workers: entries the persist group
/// has not acknowledged (or never read) and dead letters.
async fn leftovers(config: &StoreConfig) -> Result<(), String> {
    let status = match connect_queue(config).await {
        Ok(queue) => queue.status(&[]).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
    .map_err(|e| {
        format!("the teardown could not read the queue ({e}); a test that leaves Redis down calls allow_leftovers()")
    })?;
    let unpersisted = unpersisted(&status);
    if unpersisted == 0 && status.dead_letters == 0 {
        return Ok(());
    }
    Err(format!(
        "the test left {unpersisted} queued entries unpersisted and {} dead letters: \
         drain the queue, or call allow_leftovers() if leaving them is what it shows",
        status.dead_letters
    ))
}

async fn cleanup(database: String, prefix: String) {
    use sqlx::Connection;
    if let Ok(mut conn) = sqlx::MySqlConnection::connect(&mysql_server_url()).await {
        // A transaction of the test's own runtime, blocked in this drop, may still hold
        // the database: the drop gives up after a while rather than waiting for ever.
        let sql =
            format!("SET SESSION lock_wait_timeout = 30; DROP DATABASE IF EXISTS `{database}`");
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await;
    }
    // Every node (the seed nodes of a cluster are all its masters here): the keys each
    // holds, found with SCAN and deleted one by one (a multi-key DEL would cross slots).
    let nodes: Vec<String> = match redis_cluster_nodes() {
        Some(nodes) => nodes.split(',').map(|n| format!("redis://{n}")).collect(),
        None => vec![redis_url()],
    };
    for node in nodes {
        let Ok(client) = redis::Client::open(node) else {
            continue;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            continue;
        };
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
            else {
                break;
            };
            for key in keys {
                let _: redis::RedisResult<()> =
                    redis::cmd("UNLINK").arg(key).query_async(&mut conn).await;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
}

/// Polls `check` every 20 ms until it returns true; fails the test after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(within(limit, check).await, "timed out waiting for: {what}");
}

/// Polls `check` every 20 ms until it returns true, for at most `limit`: whether it did.
/// For a test that must let something go (a held lock) before it fails.
pub async fn within<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// A Redis server of one test's own (the shared one cannot be filled up or reconfigured),
/// on a Unix socket, with the given `maxmemory` and `noeviction`. Stopped when dropped.
pub struct PrivateRedis {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl PrivateRedis {
    pub async fn start(maxmemory: &str) -> Self {
        let dir = std::env::temp_dir().join(unique_name("chat-system-redis-"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .args(["--maxmemory", maxmemory, "--maxmemory-policy", "noeviction"])
            .arg("--unixsocket")
            .arg(dir.join("redis.sock"))
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (installed by scripts/deps)");
        let redis = Self { child, dir };
        let url = redis.url();
        eventually(Duration::from_secs(10), "the private Redis", || async {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                return false;
            };
            match client.get_multiplexed_async_connection().await {
                Ok(mut conn) => redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        })
        .await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.dir.join("redis.sock").display())
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP relay to a real server, which a test can cut (every connection dropped, new
/// ones refused) and restore.
pub struct Proxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let target = target.to_owned();
        let accept = {
            let (down, connections) = (down.clone(), connections.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if down.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees the connection closed
                    }
                    let target = target.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(task.abort_handle());
                }
            })
            .abort_handle()
        };
        Self {
            addr,
            down,
            connections,
            accept,
        }
    }

    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

impl TestApp {
    /// Runs another persisting worker in the background (its own consumer name) until
    /// the returned sender is dropped or set.
    pub async fn spawn_worker(&self) -> tokio::sync::watch::Sender<bool> {
        self.spawn_role(Role::Persist).await
    }

    /// Runs another indexing worker in the background, like [`TestApp::spawn_worker`].
    pub async fn spawn_indexer(&self) -> tokio::sync::watch::Sender<bool> {
        self.spawn_role(Role::Index(self.search.clone())).await
    }

    async fn spawn_role(&self, role: Role) -> tokio::sync::watch::Sender<bool> {
        let worker = build_worker(
            self.store.clone(),
            &self.store_config,
            &worker_config(),
            role,
        )
        .await
        .expect("worker");
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(worker.run(rx));
        tx
    }
}
