//! Separate OS processes of the real binary: two `api` and two `worker` processes
//! sharing one MariaDB and one Redis, under concurrent load, and a worker killed with
//! SIGKILL in the middle of a batch.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::helpers::{TestApp, eventually};

/// A child process of the binary, killed when dropped.
struct Process {
    child: Child,
    addr: Option<String>,
}

impl Process {
    async fn start(app: &TestApp, role: &str, extra: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_chat-system"));
        command
            .arg(role)
            .env("DATABASE_URL", app.store_config.database_url.expose())
            .env("REDIS_URL", app.store_config.redis_url.expose())
            .env_remove("REDIS_CLUSTER_NODES")
            .envs(app.cluster_env())
            .env("REDIS_PREFIX", &app.prefix)
            .env("SEARCH_INDEX_DIR", &app.search_config.search_index_dir)
            .env("LOG_LEVEL", "warn")
            .env("WORKER_CLAIM_IDLE", "1s")
            .env("COUNTS_SYNC_INTERVAL", "200ms")
            .kill_on_drop(true);
        let addr = if role == "api" {
            let addr = free_addr();
            command.env("BIND", &addr);
            Some(addr)
        } else {
            None
        };
        for (k, v) in extra {
            command.env(k, v);
        }
        let child = command.spawn().expect("spawn chat-system");
        let process = Self { child, addr };
        if let Some(addr) = &process.addr {
            let url = format!("http://{addr}/healthz");
            eventually(
                Duration::from_secs(20),
                "the api process to listen",
                || async { reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) },
            )
            .await;
        }
        process
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr.as_deref().unwrap())
    }

    async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL");
    }
}

/// Sends `requests` (url, body) with at most 64 in flight; returns each answer's JSON.
async fn post_all(requests: Vec<(String, serde_json::Value)>) -> Vec<serde_json::Value> {
    let client = reqwest::Client::new();
    let permits = Arc::new(Semaphore::new(64));
    let mut tasks = JoinSet::new();
    for (url, body) in requests {
        let (client, permits) = (client.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let response = client.post(&url).json(&body).send().await.expect("post");
            assert_eq!(response.status(), 201);
            response.json::<serde_json::Value>().await.unwrap()
        });
    }
    let mut answers = Vec::new();
    while let Some(answer) = tasks.join_next().await {
        answers.push(answer.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_through_two_apis_and_two_workers_are_numbered_exactly_once() {
    let app = TestApp::spawn().await;
    let apis = [
        Process::start(&app, "api", &[]).await,
        Process::start(&app, "api", &[]).await,
    ];
    let _workers = [
        Process::start(&app, "worker", &[]).await,
        Process::start(&app, "worker", &[]).await,
    ];
    let token = app.application("load").await;

    // 1,000 chats on one application, alternating between the API processes.
    let requests = (0..1000)
        .map(|i| {
            (
                apis[i % 2].url(&format!("/applications/{token}/chats")),
                json!({"title": format!("c{i}")}),
            )
        })
        .collect();
    let answers = post_all(requests).await;
    let numbers: HashSet<u64> = answers
        .iter()
        .map(|a| a["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (1..=1000).collect::<HashSet<u64>>());

    // 2,000 messages over 10 chats.
    let requests = (0..2000)
        .map(|i| {
            let chat = i % 10 + 1;
            let url = apis[i % 2].url(&format!("/applications/{token}/chats/{chat}/messages"));
            (url, json!({"body": format!("message {i}")}))
        })
        .collect();
    let answers = post_all(requests).await;
    let mut accepted: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for a in &answers {
        let key = (
            a["chat_number"].as_u64().unwrap(),
            a["number"].as_u64().unwrap(),
        );
        assert!(
            accepted
                .insert(key, a["body"].as_str().unwrap().to_owned())
                .is_none(),
            "duplicate {key:?}"
        );
    }
    for chat in 1..=10 {
        let numbers: Vec<u64> = accepted
            .keys()
            .filter(|(c, _)| *c == chat)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(numbers, (1..=200).collect::<Vec<u64>>(), "chat {chat}");
    }

    eventually(
        Duration::from_secs(60),
        "every accepted write to be persisted",
        || async {
            app.scalar("SELECT COUNT(*) FROM chats").await == 1000
                && app.scalar("SELECT COUNT(*) FROM messages").await == 2000
        },
    )
    .await;
    let chats: Vec<u64> = sqlx::query_scalar("SELECT number FROM chats ORDER BY number")
        .fetch_all(&app.store.mysql)
        .await
        .unwrap();
    assert_eq!(chats, (1..=1000).collect::<Vec<u64>>());
    let rows: Vec<(u64, u64, String)> = sqlx::query_as(
        "SELECT chat_number, number, body FROM messages ORDER BY chat_number, number",
    )
    .fetch_all(&app.store.mysql)
    .await
    .unwrap();
    let persisted: BTreeMap<(u64, u64), String> =
        rows.into_iter().map(|(c, n, b)| ((c, n), b)).collect();
    assert_eq!(persisted, accepted, "every 201 matches exactly one row");

    eventually(Duration::from_secs(10), "counts to converge", || async {
        app.scalar("SELECT CAST(chats_count AS SIGNED) FROM applications")
            .await
            == 1000
            && app
                .scalar("SELECT CAST(SUM(messages_count) AS SIGNED) FROM chats")
                .await
                == 2000
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_and_duplicates_nothing() {
    let app = TestApp::spawn().await;
    let token = app.application("crash").await;
    let chat = app.chat(&token).await;
    let total = 6000u64;
    let body = |i: u64| format!("{i:06} {}", "x".repeat(1000));
    let permits = Arc::new(Semaphore::new(32));
    let mut tasks = JoinSet::new();
    for i in 0..total {
        let (store, token, permits) = (app.store.clone(), token.clone(), permits.clone());
        let text = body(i);
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let token = chat_system::domain::Token::parse(&token).unwrap();
            store
                .create_message(
                    &token,
                    chat,
                    chat_system::domain::Body::parse(Some(text)).unwrap(),
                    None,
                )
                .await
                .unwrap()
        });
    }
    let mut accepted = BTreeMap::new();
    while let Some(m) = tasks.join_next().await {
        let m = m.unwrap();
        accepted.insert(m.number, m.body);
    }
    assert_eq!(accepted.len() as u64, total);

    let mut doomed = Process::start(
        &app,
        "worker",
        &[("WORKER_NAME", "doomed"), ("WORKER_BATCH_SIZE", "3000")],
    )
    .await;
    let stream = app
        .store
        .queue
        .keys
        .stream(app.store.queue.keys.shard_of(&token));
    let pending_of_doomed = || async {
        let reply: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&stream)
            .arg("persist")
            .arg("-")
            .arg("+")
            .arg(100_000)
            .query_async(&mut app.redis().await)
            .await
            .unwrap();
        // The process's persisting consumers share the name doomed-persist.
        reply
            .ids
            .iter()
            .filter(|p| p.consumer.starts_with("doomed-"))
            .count()
    };
    eventually(
        Duration::from_secs(20),
        "the doomed worker to hold a batch",
        || async { pending_of_doomed().await > 0 },
    )
    .await;
    doomed.kill().await;
    let held = pending_of_doomed().await;
    assert!(held > 0, "the worker died holding unacknowledged entries");

    let _survivor = Process::start(&app, "worker", &[("WORKER_NAME", "survivor")]).await;
    eventually(
        Duration::from_secs(60),
        "the survivor to persist everything",
        || async {
            app.scalar("SELECT COUNT(*) FROM messages").await == total as i64
                && pending_of_doomed().await == 0
                && app.unpersisted().await == 0
        },
    )
    .await;
    let rows: Vec<(u64, String)> =
        sqlx::query_as("SELECT number, body FROM messages ORDER BY number")
            .fetch_all(&app.store.mysql)
            .await
            .unwrap();
    let persisted: BTreeMap<u64, String> = rows.into_iter().collect();
    assert_eq!(persisted, accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_through_alternating_apis_apply_in_acceptance_order() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // The worker processes are stopped with whatever they still hold.
    let apis = [
        Process::start(&app, "api", &[]).await,
        Process::start(&app, "api", &[]).await,
    ];
    let _workers = [
        Process::start(&app, "worker", &[]).await,
        Process::start(&app, "worker", &[]).await,
    ];
    let client = reqwest::Client::new();
    let token = app.application("order").await;
    let chat = app.chat(&token).await;
    let path = format!("/applications/{token}/chats/{chat}/messages");

    // An update sent right after its create, through the other process, is kept.
    let created: serde_json::Value = client
        .post(apis[0].url(&path))
        .json(&json!({"body": "new"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let number = created["number"].as_u64().unwrap();
    let message = format!("{path}/{number}");
    let reply = client
        .patch(apis[1].url(&message))
        .json(&json!({"body": "updated at once"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);

    // Fifty sequential updates of another message, alternating processes.
    let second = app.message(&token, chat, "v0").await;
    let second_path = format!("{path}/{second}");
    for i in 1..=50 {
        let reply = client
            .put(apis[i % 2].url(&second_path))
            .json(&json!({"body": format!("v{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200);
    }

    eventually(
        Duration::from_secs(20),
        "the updates to be persisted",
        || async {
            let bodies: Vec<(u64, String)> =
                sqlx::query_as("SELECT number, body FROM messages ORDER BY number")
                    .fetch_all(&app.store.mysql)
                    .await
                    .unwrap();
            bodies
                == vec![
                    (number, "updated at once".to_owned()),
                    (second, "v50".to_owned()),
                ]
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_bodies_tokens_or_forged_fields() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // The process is killed once the create is persisted, the update maybe not.
    let log_path = std::env::temp_dir().join(format!("chat-system-log-{}.txt", app.prefix));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_chat-system"));
    let addr = free_addr();
    command
        .arg("serve")
        .env("DATABASE_URL", app.store_config.database_url.expose())
        .env("REDIS_URL", app.store_config.redis_url.expose())
        .env_remove("REDIS_CLUSTER_NODES")
        .envs(app.cluster_env())
        .env("REDIS_PREFIX", &app.prefix)
        .env("SEARCH_INDEX_DIR", log_path.with_extension("index"))
        .env("BIND", &addr)
        .env("LOG_LEVEL", "debug")
        .env("LOG_FORMAT", "text")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    let base = format!("http://{addr}");
    eventually(Duration::from_secs(20), "serve to listen", || async {
        reqwest::get(format!("{base}/healthz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let client = reqwest::Client::new();
    let secret = "a secret body 5bd1e7";
    // An application created through the process: its creation is logged, its token not.
    let created: serde_json::Value = client
        .post(format!("{base}/applications"))
        .json(&json!({"name": "logs"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    // Request ids: a safe one is kept; one that would forge log fields, or bloat every
    // line, is replaced.
    for (id, kept) in [
        ("req-42.a_B", true),
        ("abc status=500 token=FORGED", false),
        (&"x".repeat(129), false),
    ] {
        let reply = client
            .get(format!("{base}/applications/{token}"))
            .header("x-request-id", id)
            .send()
            .await
            .unwrap();
        let echoed = reply.headers()["x-request-id"].to_str().unwrap();
        assert_eq!(echoed == id, kept, "{id} -> {echoed}");
        assert!(!echoed.is_empty() && echoed.len() <= 128);
    }
    let chat: serde_json::Value = client
        .post(format!("{base}/applications/{token}/chats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let path = format!(
        "{base}/applications/{token}/chats/{}/messages",
        chat["number"]
    );
    let created = client
        .post(&path)
        .json(&json!({"body": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    client
        .patch(format!("{path}/1"))
        .json(&json!({"body": format!("{secret} edited")}))
        .send()
        .await
        .unwrap();
    client
        .get(format!("{path}/search"))
        .query(&[("q", secret)])
        .send()
        .await
        .unwrap();
    // Bad input is logged as an event too; its body must not be. (A wrong type: unknown
    // fields alone are ignored, and would create a second message.)
    let rejected = client
        .post(&path)
        .json(&json!({"body": [secret]}))
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status(), 400);
    eventually(
        Duration::from_secs(10),
        "the message to be persisted",
        || async { app.scalar("SELECT COUNT(*) FROM messages").await == 1 },
    )
    .await;
    child.kill().await.unwrap();
    let logged = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    let _ = std::fs::remove_dir_all(log_path.with_extension("index"));
    assert!(
        logged.contains("request"),
        "info logs were written: {logged}"
    );
    assert!(
        !logged.contains("5bd1e7"),
        "a body reached the logs:\n{logged}"
    );
    assert!(
        !logged.contains(&token),
        "a token reached the logs:\n{logged}"
    );
    assert!(logged.contains("application created"), "{logged}");
    assert!(!logged.contains("FORGED"), "a forged field:\n{logged}");
    assert!(
        !logged.contains(&"x".repeat(129)),
        "an unbounded request id"
    );
    assert!(
        logged.contains("route=\"/applications/{token}/chats/{chat}/messages\""),
        "requests are logged by route template:\n{logged}"
    );
}

#[tokio::test]
async fn help_never_prints_secret_values() {
    for command in ["serve", "api", "worker", "migrate", "reindex"] {
        let output = Command::new(env!("CARGO_BIN_EXE_chat-system"))
            .args([command, "--help"])
            .env("DATABASE_URL", "mysql://app:sekrit-db@db:3306/chat")
            .env("REDIS_URL", "redis://:sekrit-redis@redis:6379")
            .env("ELASTICSEARCH_URL", "https://elastic:sekrit-es@es:9200")
            .env("ADMIN_API_KEY", "sekrit-admin")
            .output()
            .await
            .unwrap();
        assert!(output.status.success(), "{command} --help");
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(help.contains("DATABASE_URL"), "{help}");
        assert!(
            !help.contains("sekrit"),
            "{command} --help shows a secret:\n{help}"
        );
    }
}

#[tokio::test]
async fn an_empty_admin_key_stops_the_process_at_start() {
    let output = Command::new(env!("CARGO_BIN_EXE_chat-system"))
        .arg("api")
        .env("ADMIN_API_KEY", "")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ADMIN_API_KEY"), "{stderr}");
    assert!(stderr.contains("must not be empty"), "{stderr}");
}

/// A free port on loopback, for a child process to bind right after.
fn free_addr() -> String {
    free_addrs::<1>()[0].clone()
}

/// `N` distinct free ports on loopback: all held at once while they are picked, so that
/// the system cannot hand out the same one twice.
fn free_addrs<const N: usize>() -> [String; N] {
    let listeners: Vec<_> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| format!("127.0.0.1:{}", listeners[i].local_addr().unwrap().port()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_holding_the_index_writer_says_so_in_its_metrics() {
    let app = TestApp::spawn().await;
    // An index directory of their own (the test app holds its own directory's writer):
    // the first worker takes its writer, the second finds it taken.
    let dir = app
        .search_config
        .search_index_dir
        .with_extension("processes");
    let dir = dir.to_str().unwrap();
    // The gauge's value once the worker serves its metrics.
    let held = |addr: String| async move {
        let url = format!("http://{addr}/metrics");
        let value = std::sync::Mutex::new(None);
        eventually(Duration::from_secs(20), "the worker's metrics", || async {
            let Ok(reply) = reqwest::get(&url).await else {
                return false;
            };
            let text = reply.text().await.unwrap_or_default();
            let found = text
                .lines()
                .find_map(|l| l.strip_prefix("search_index_writer_held "))
                .map(str::to_owned);
            let seen = found.is_some();
            *value.lock().unwrap() = found;
            seen
        })
        .await;
        value.into_inner().unwrap().unwrap()
    };
    let [first_addr, second_addr] = free_addrs::<2>();
    let first = [
        ("WORKER_METRICS_BIND", first_addr.as_str()),
        ("SEARCH_INDEX_DIR", dir),
    ];
    let _first = Process::start(&app, "worker", &first).await;
    assert_eq!(held(first_addr.clone()).await, "1");
    let second = [
        ("WORKER_METRICS_BIND", second_addr.as_str()),
        ("SEARCH_INDEX_DIR", dir),
    ];
    let _second = Process::start(&app, "worker", &second).await;
    assert_eq!(held(second_addr).await, "0");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_accepted_by_one_api_is_listed_at_once_by_the_other() {
    let app = TestApp::spawn().await;
    app.allow_leftovers(); // Never drained: lists of accepted messages are what it checks.
    let apis = [
        Process::start(&app, "api", &[]).await,
        Process::start(&app, "api", &[]).await,
    ];
    let token = app.application("a").await;
    let client = reqwest::Client::new();
    let chats = apis[0].url(&format!("/applications/{token}/chats"));
    let chat: serde_json::Value = client
        .post(&chats)
        .json(&json!({"title": "t"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let chat = chat["number"].as_u64().unwrap();
    let path = format!("/applications/{token}/chats/{chat}/messages");
    for i in 1..=3 {
        // Created on one process, listed on the other right after the 201 (no worker
        // runs: nothing is persisted).
        let created = client
            .post(apis[i % 2].url(&path))
            .json(&json!({"body": format!("m{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        for (order, first) in [("asc", 1), ("desc", i as u64)] {
            let listed: Vec<serde_json::Value> = client
                .get(apis[(i + 1) % 2].url(&format!("{path}?order={order}")))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(listed.len(), i, "{order}: {listed:?}");
            assert_eq!(listed[0]["number"], first, "{order}");
        }
    }
    assert_eq!(app.scalar("SELECT COUNT(*) FROM messages").await, 0);
}

/// A metric of the worker whose metrics are served at `addr`, once it is there.
async fn worker_metric(addr: &str, name: &str, wanted: &str) {
    let url = format!("http://{addr}/metrics");
    let prefix = format!("{name} ");
    eventually(
        Duration::from_secs(20),
        &format!("{name} {wanted} at {addr}"),
        || async {
            let Ok(reply) = reqwest::get(&url).await else {
                return false;
            };
            let text = reply.text().await.unwrap_or_default();
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .is_some_and(|v| v == wanted)
        },
    )
    .await;
}

/// An embedded index belongs to one host. Two hosts are played by two directories: the
/// first worker's index becomes the published one; a worker on the other directory
/// gives its writer back and never joins the index group, and an API on the other
/// directory refuses to search (503, pointing to Elasticsearch) and says so in
/// `/readyz`, while an API on the first directory serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_index_serves_one_host_and_another_directory_refuses_search() {
    let app = TestApp::spawn().await;
    let base = &app.search_config.search_index_dir;
    let (one, two) = (
        base.with_extension("host-one"),
        base.with_extension("host-two"),
    );
    let (one, two) = (one.to_str().unwrap(), two.to_str().unwrap());
    let (metrics_one, metrics_two) = (free_addr(), free_addr());
    let _writer = Process::start(
        &app,
        "worker",
        &[
            ("SEARCH_INDEX_DIR", one),
            ("WORKER_METRICS_BIND", &metrics_one),
            ("WORKER_NAME", "host-one"),
        ],
    )
    .await;
    worker_metric(&metrics_one, "search_index_writer_held", "1").await;
    let _other = Process::start(
        &app,
        "worker",
        &[
            ("SEARCH_INDEX_DIR", two),
            ("WORKER_METRICS_BIND", &metrics_two),
            ("WORKER_NAME", "host-two"),
        ],
    )
    .await;
    worker_metric(&metrics_two, "search_index_foreign", "1").await;
    worker_metric(&metrics_two, "search_index_writer_held", "0").await;

    let api_one = Process::start(&app, "api", &[("SEARCH_INDEX_DIR", one)]).await;
    let api_two = Process::start(&app, "api", &[("SEARCH_INDEX_DIR", two)]).await;
    let client = reqwest::Client::new();
    let token = client
        .post(api_one.url("/applications"))
        .json(&json!({"name": "hosts"}))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let chat = format!("/applications/{token}/chats/1");
    let created = client
        .post(api_one.url(&format!("/applications/{token}/chats")))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created = client
        .post(api_one.url(&format!("{chat}/messages")))
        .json(&json!({"body": "Hello from host one"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let search = format!("{chat}/messages/search?q=HELLO");
    eventually(
        Duration::from_secs(20),
        "the message to be found on the writer's host",
        || async {
            let reply = client.get(api_one.url(&search)).send().await.unwrap();
            reply.status() == 200
                && reply.json::<serde_json::Value>().await.unwrap()[0]["body"]
                    == "Hello from host one"
        },
    )
    .await;
    let ready = client.get(api_one.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let refused = client.get(api_two.url(&search)).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(problem["type"], "/problems/search-index-elsewhere");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Elasticsearch"),
        "{problem}"
    );
    let ready = client.get(api_two.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["checks"]["search"], "foreign_index", "{ready}");

    // The index group has the first worker's consumer, never the second's (a consumer
    // reads every shard: shard 0 shows it).
    let consumers: Vec<Vec<redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(app.store.queue.keys.stream(0))
        .arg(chat_system::worker::INDEX_GROUP)
        .query_async(&mut app.store.queue.conn())
        .await
        .unwrap();
    let names: Vec<String> = consumers
        .iter()
        .filter_map(|fields| match fields.get(1) {
            Some(redis::Value::BulkString(name)) => Some(String::from_utf8_lossy(name).into()),
            _ => None,
        })
        .collect();
    assert!(names.iter().any(|n| n.starts_with("host-one")), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("host-two")),
        "{names:?}"
    );
    for dir in [one, two] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_api_receives_the_messages_accepted_by_the_other() {
    let mut app = TestApp::spawn().await;
    let apis = [
        Process::start(&app, "api", &[]).await,
        Process::start(&app, "api", &[]).await,
    ];
    let token = app.application("a").await;
    let chat = app.chat(&token).await;
    let path = format!("/applications/{token}/chats/{chat}/messages");
    let mut stream = reqwest::get(apis[1].url(&format!("{path}/events")))
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let client = reqwest::Client::new();
    for i in 1..=3 {
        let created = client
            .post(apis[0].url(&path))
            .json(&json!({"body": format!("from api one {i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
    }
    let mut text = String::new();
    while text.matches("event: message.created").count() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
            .await
            .expect("events in time")
            .unwrap()
            .expect("the stream is open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    for i in 1..=3 {
        assert!(text.contains(&format!("from api one {i}")), "{text}");
    }
    app.drain().await;
}
